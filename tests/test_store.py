"""The local model store and the filesystem seam: atomicity, rollback, crash points."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from edge_agent.fsio import CrashingFS, FileSystem, LossyFS, SimulatedCrash
from edge_agent.protocol.chunks import ChunkAssembler, chunk_id, split
from edge_agent.protocol.manifest import load_manifest
from edge_agent.store import ModelStore, StoreError, describe_state
from edge_agent.update.trust import Accepted
from tests.test_protocol import ISSUED, make_signed, trusted, wire


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def model_bytes(n: int) -> bytes:
    """A minimal ONNX ModelProto (ir_version 8, a producer_name) unique to version ``n``."""
    producer = f"model version {n}|".encode() * (200 + n)
    return b"\x08\x08\x12" + _varint(len(producer)) + producer


def prepare(
    n: int, *, sequence: int | None = None, group: str = "line-3"
) -> tuple[bytes, Accepted]:
    """Wire manifest and acceptance for model version ``n`` (sequence defaults to n)."""
    seq = n if sequence is None else sequence
    raw = wire(make_signed(model_bytes(n), version=n, sequence=seq, issued_at=ISSUED + n))
    return raw, Accepted(load_manifest(raw, trusted()), group)


def download(store: ModelStore, raw: bytes, accepted: Accepted, fs: FileSystem) -> None:
    """What the agent does after the trust check: assemble every file, then install."""
    m = accepted.manifest
    data = {m.model_file: model_bytes(m.version)}
    for entry in m.files:
        asm = ChunkAssembler(entry, store.partial_path(m, entry), fs)
        for c in {chunk_id(c): c for c in split(data[entry.path], entry.chunk_size)}.values():
            asm.add(c)
        asm.finish()
    store.install(raw, m)


def deploy(
    store: ModelStore, n: int, fs: FileSystem | None = None, *, sequence: int | None = None
) -> Accepted:
    raw, accepted = prepare(n, sequence=sequence)
    download(store, raw, accepted, fs or FileSystem())
    store.activate(accepted)
    return accepted


def snapshot(state_dir: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(state_dir)): p.read_bytes() for p in state_dir.rglob("*") if p.is_file()
    }


# --- basic behaviour ------------------------------------------------------------


def test_install_and_activate_persist(tmp_path: Path) -> None:
    store = ModelStore.open(tmp_path)
    accepted = deploy(store, 1)
    active = store.active("pump")
    assert active is not None and active.sha256 == accepted.manifest.model_sha256
    assert active.model_path.read_bytes() == model_bytes(1)
    reopened = ModelStore.open(tmp_path)
    assert reopened.active_models() == {"pump": accepted.manifest.model_sha256}
    assert reopened.accepted_sequence("line-3", "pump") == 1
    assert describe_state(reopened)["pump"]["version"] == 1


def test_activate_requires_a_finished_install(tmp_path: Path) -> None:
    store = ModelStore.open(tmp_path)
    _raw, accepted = prepare(1)
    with pytest.raises(StoreError, match="not installed"):
        store.activate(accepted)


def test_install_requires_every_file_assembled(tmp_path: Path) -> None:
    store = ModelStore.open(tmp_path)
    raw, accepted = prepare(1)
    store.partial_path(accepted.manifest, accepted.manifest.model_entry)
    with pytest.raises(StoreError, match="not assembled"):
        store.install(raw, accepted.manifest)


def test_sequence_never_decreases(tmp_path: Path) -> None:
    store = ModelStore.open(tmp_path)
    deploy(store, 5)
    before = snapshot(tmp_path)
    raw, lower = prepare(3)
    download(store, raw, lower, FileSystem())
    with pytest.raises(StoreError, match="below"):
        store.activate(lower)
    with pytest.raises(StoreError, match="below"):
        store.record_sequence("line-3", "pump", 4, ISSUED)
    assert store.accepted_sequence("line-3", "pump") == 5
    assert json.loads(before["state.json"]) == json.loads((tmp_path / "state.json").read_bytes())
    store.record_sequence("line-3", "pump", 9, ISSUED + 9)
    assert ModelStore.open(tmp_path).accepted_sequence("line-3", "pump") == 9


def test_rollback_goes_to_previous_and_marks_bad(tmp_path: Path) -> None:
    store = ModelStore.open(tmp_path)
    v1 = deploy(store, 1)
    v2 = deploy(store, 2)
    assert store.history("pump") == [v1.manifest.model_sha256]
    back = store.rollback("pump")
    assert back is not None and back.sha256 == v1.manifest.model_sha256
    assert store.is_bad(v2.manifest.model_sha256)
    # The sequence stays at 2: rolling back locally is not a downgrade of trust.
    assert store.accepted_sequence("line-3", "pump") == 2
    state = ModelStore.open(tmp_path).trusted_state(trusted())
    assert state.bad == {v2.manifest.model_sha256: ISSUED + 2}
    assert ModelStore.open(tmp_path).active_models() == {"pump": v1.manifest.model_sha256}


def test_rollback_without_history_leaves_no_active(tmp_path: Path) -> None:
    store = ModelStore.open(tmp_path)
    deploy(store, 1)
    assert store.rollback("pump") is None
    assert store.active("pump") is None
    with pytest.raises(StoreError):
        store.rollback("pump")


def test_newer_manifest_clears_bad_mark(tmp_path: Path) -> None:
    store = ModelStore.open(tmp_path)
    deploy(store, 1)
    v2 = deploy(store, 2)
    store.rollback("pump")
    # The operator re-publishes the same model bytes under a new sequence.
    raw = wire(make_signed(model_bytes(2), version=2, sequence=3, issued_at=ISSUED + 50))
    again = Accepted(load_manifest(raw, trusted()), "line-3")
    download(store, raw, again, FileSystem())
    store.activate(again)
    assert not store.is_bad(v2.manifest.model_sha256)


def test_keeps_only_last_n_versions(tmp_path: Path) -> None:
    store = ModelStore.open(tmp_path, keep=3)
    shas = [deploy(store, n).manifest.model_sha256 for n in range(1, 6)]
    assert store.active_models() == {"pump": shas[-1]}
    assert store.history("pump") == [shas[3], shas[2]]
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == sorted(shas[2:])


def test_leftovers_are_cleaned_at_open(tmp_path: Path) -> None:
    store = ModelStore.open(tmp_path)
    v1 = deploy(store, 1)
    models = tmp_path / "models"
    (models / v1.manifest.model_sha256 / "extra.bin.partial").write_bytes(b"x")
    (tmp_path / ".state.json.tmp").write_bytes(b"{")
    unfinished = models / ("ab" * 32)
    unfinished.mkdir()
    (unfinished / "model.onnx.partial").write_bytes(b"half")
    (models / "junk.tmp").write_bytes(b"junk")
    raw2, v2 = prepare(2)
    download(store, raw2, v2, FileSystem())  # installed, never activated
    ModelStore.open(tmp_path)
    assert sorted(p.name for p in models.iterdir()) == [v1.manifest.model_sha256]
    assert not list(tmp_path.rglob("*.partial")) and not list(tmp_path.rglob("*.tmp"))


def test_broken_active_falls_back_to_previous_on_open(tmp_path: Path) -> None:
    store = ModelStore.open(tmp_path)
    v1 = deploy(store, 1)
    v2 = deploy(store, 2)
    model = tmp_path / "models" / v2.manifest.model_sha256 / "model.onnx"
    model.write_bytes(model.read_bytes()[:-1] + b"!")
    reopened = ModelStore.open(tmp_path)
    assert reopened.active_models() == {"pump": v1.manifest.model_sha256}
    assert not (tmp_path / "models" / v2.manifest.model_sha256).exists()
    # Local corruption is not a bad model: the same manifest may be fetched again.
    assert not reopened.is_bad(v2.manifest.model_sha256)
    assert reopened.accepted_sequence("line-3", "pump") == 2


def test_symlinked_model_file_counts_as_broken(tmp_path: Path) -> None:
    store = ModelStore.open(tmp_path)
    v1 = deploy(store, 1)
    v2 = deploy(store, 2)
    d = tmp_path / "models" / v2.manifest.model_sha256
    outside = tmp_path / "outside.onnx"
    (d / "model.onnx").rename(outside)
    (d / "model.onnx").symlink_to(outside)  # same bytes, but a symlink
    assert ModelStore.open(tmp_path).active_models() == {"pump": v1.manifest.model_sha256}


def test_no_intact_version_means_no_active(tmp_path: Path) -> None:
    store = ModelStore.open(tmp_path)
    v1 = deploy(store, 1)
    (tmp_path / "models" / v1.manifest.model_sha256 / "model.onnx").unlink()
    reopened = ModelStore.open(tmp_path)
    assert reopened.active("pump") is None
    assert reopened.accepted_sequence("line-3", "pump") == 1


def test_unreadable_state_refuses_to_open(tmp_path: Path) -> None:
    ModelStore.open(tmp_path)
    (tmp_path / "state.json").write_bytes(b'{"format": 1, "active": ')
    with pytest.raises(StoreError, match="unreadable"):
        ModelStore.open(tmp_path)


# --- crash points and power loss ------------------------------------------------


def _template(tmp_path: Path) -> Path:
    base = tmp_path / "template"
    deploy(ModelStore.open(base), 1)
    return base


def _activate_v2(state_dir: Path, fs: FileSystem) -> None:
    store = ModelStore.open(state_dir, fs=fs)
    deploy(store, 2, fs=fs)


def _count_calls(tmp_path: Path, base: Path) -> int:
    probe = tmp_path / "probe"
    shutil.copytree(base, probe)
    fs = CrashingFS()
    _activate_v2(probe, fs)
    return fs.calls


def _assert_old_or_new(state_dir: Path) -> str:
    store = ModelStore.open(state_dir)
    active = store.active("pump")
    assert active is not None
    version = active.manifest.version
    assert version in (1, 2)
    assert active.model_path.read_bytes() == model_bytes(version)
    # Activation and sequence move together (one atomic state file).
    assert store.accepted_sequence("line-3", "pump") == version
    assert not list(state_dir.rglob("*.partial")) and not list(state_dir.rglob(".*.tmp"))
    return "new" if version == 2 else "old"


def test_crash_at_every_mutating_call_of_an_activation(tmp_path: Path) -> None:
    base = _template(tmp_path)
    total = _count_calls(tmp_path, base)
    assert total > 10
    outcomes = []
    for k in range(1, total + 1):
        d = tmp_path / f"crash-{k}"
        shutil.copytree(base, d)
        with pytest.raises(SimulatedCrash):
            _activate_v2(d, CrashingFS(crash_at=k))
        outcomes.append(_assert_old_or_new(d))
    assert outcomes[0] == "old" and "new" in outcomes


class _CrashingLossyFS(LossyFS):
    def __init__(self, root: Path, crash_at: int) -> None:
        super().__init__(root)
        self.crash_at, self.calls = crash_at, 0

    def _mutating(self, op: str, path: Path) -> None:
        self.calls += 1
        if self.calls >= self.crash_at:
            raise SimulatedCrash(op)


def test_power_loss_at_every_mutating_call_of_an_activation(tmp_path: Path) -> None:
    base = _template(tmp_path)
    total = _count_calls(tmp_path, base)
    outcomes = []
    for k in range(1, total + 2):  # total + 1: power lost right after completion
        d = tmp_path / f"power-{k}"
        shutil.copytree(base, d)
        fs = _CrashingLossyFS(d, crash_at=k)
        with contextlib.suppress(SimulatedCrash):
            _activate_v2(d, fs)
        fs.power_loss()
        outcomes.append(_assert_old_or_new(d))
    assert outcomes[0] == "old" and outcomes[-1] == "new"


# --- the seam itself ------------------------------------------------------------


def test_crashing_fs_raises_at_the_kth_call_before_acting(tmp_path: Path) -> None:
    fs = CrashingFS(crash_at=3)
    fs.write_bytes(tmp_path / "a", b"1")
    fs.write_bytes(tmp_path / "b", b"2")
    with pytest.raises(SimulatedCrash):
        fs.write_bytes(tmp_path / "c", b"3")
    assert not (tmp_path / "c").exists()
    assert fs.calls == 3 and [p.name for _, p in fs.log] == ["a", "b"]


def test_simulated_crash_is_not_swallowed_by_except_exception(tmp_path: Path) -> None:
    fs = CrashingFS(crash_at=1)

    def careless() -> None:
        try:  # noqa: SIM105 - spelled out: this is the pattern under test
            fs.unlink(tmp_path / "x")
        except Exception:
            pass

    with pytest.raises(SimulatedCrash):
        careless()


def _lossy(tmp_path: Path) -> tuple[LossyFS, Path]:
    root = tmp_path / "root"
    root.mkdir()
    (root / "old").write_bytes(b"durable")
    return LossyFS(root), root


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        # new file, never synced: gone
        (lambda fs, r: fs.write_bytes(r / "n", b"x"), {"old": b"durable"}),
        # synced contents but no directory fsync: the entry is lost
        (lambda fs, r: (fs.write_bytes(r / "n", b"x"), fs.fsync(r / "n")), {"old": b"durable"}),
        # directory synced but contents not: the file survives empty
        (
            lambda fs, r: (fs.write_bytes(r / "n", b"x"), fs.fsync_dir(r)),
            {"old": b"durable", "n": b""},
        ),
        # both: survives
        (
            lambda fs, r: (fs.write_bytes(r / "n", b"x"), fs.fsync(r / "n"), fs.fsync_dir(r)),
            {"old": b"durable", "n": b"x"},
        ),
        # rewrite in place without fsync: truncated to nothing
        (lambda fs, r: fs.write_bytes(r / "old", b"new"), {"old": b""}),
        # rename without directory fsync: the old name is what survives
        (
            lambda fs, r: fs.replace(r / "old", r / "moved"),
            {"old": b"durable"},
        ),
        (lambda fs, r: fs.atomic_write(r / "old", b"replaced"), {"old": b"replaced"}),
        (lambda fs, r: (fs.unlink(r / "old"), fs.fsync_dir(r)), {}),
        (lambda fs, r: fs.unlink(r / "old"), {"old": b"durable"}),
    ],
)
def test_lossy_fs_keeps_only_what_was_synced(
    tmp_path: Path, steps: Callable[[LossyFS, Path], object], expected: dict[str, bytes]
) -> None:
    fs, root = _lossy(tmp_path)
    steps(fs, root)
    fs.power_loss()
    assert {p.name: p.read_bytes() for p in root.iterdir()} == expected


def test_lossy_fs_directories_need_parent_fsync(tmp_path: Path) -> None:
    fs, root = _lossy(tmp_path)
    fs.mkdir(root / "d")
    fs.write_bytes(root / "d" / "f", b"x")
    fs.fsync(root / "d" / "f")
    fs.fsync_dir(root / "d")
    fs.power_loss()
    assert not (root / "d").exists()  # "d" itself was never made durable in root
    fs.mkdir(root / "d")
    fs.fsync_dir(root)
    fs.atomic_write(root / "d" / "f", b"y")
    fs.power_loss()
    assert (root / "d" / "f").read_bytes() == b"y"


def test_lossy_fs_write_at_is_durable_only_after_fsync(tmp_path: Path) -> None:
    fs, root = _lossy(tmp_path)
    fs.write_at(root / "p", 4, b"tail")
    fs.fsync_dir(root)
    fs.power_loss()
    assert (root / "p").read_bytes() == b""
    fs.write_at(root / "p", 4, b"tail")
    fs.fsync(root / "p")
    fs.power_loss()
    assert (root / "p").read_bytes() == b"\0\0\0\0tail"


def test_republished_model_reuses_installed_files(tmp_path: Path) -> None:
    store = ModelStore.open(tmp_path)
    deploy(store, 1)
    v2 = deploy(store, 2)
    raw = wire(make_signed(model_bytes(2), version=2, sequence=3, issued_at=ISSUED + 9))
    again = Accepted(load_manifest(raw, trusted()), "line-3")
    assert store.is_installed(again.manifest.model_sha256)
    store.install(raw, again.manifest)  # no partial files: nothing to download
    store.activate(again)
    active = store.active("pump")
    assert active is not None and active.sha256 == v2.manifest.model_sha256
    assert active.manifest.sequence == 3 and describe_state(store)["pump"]["sequence"] == 3


def test_onnx_with_external_data_is_refused_at_install(tmp_path: Path) -> None:
    from edge_agent.update_errors import UnsafeModel

    store = ModelStore.open(tmp_path)
    deploy(store, 1)
    before = snapshot(tmp_path)
    # ModelProto.graph.initializer with data_location = EXTERNAL.
    tensor = b"\x08\x04\x42\x01W\x70\x01"
    graph = b"\x2a" + bytes([len(tensor)]) + tensor
    bad = b"\x08\x08\x3a" + bytes([len(graph)]) + graph
    raw = wire(make_signed(bad, version=2, sequence=2, issued_at=ISSUED + 2))
    m = load_manifest(raw, trusted())
    asm = ChunkAssembler(m.model_entry, store.partial_path(m, m.model_entry), FileSystem())
    asm.add(bad)
    asm.finish()
    with pytest.raises(UnsafeModel, match="external data"):
        store.install(raw, m)
    assert not store.is_installed(m.model_sha256)
    reopened = ModelStore.open(tmp_path)
    assert snapshot(tmp_path) == before
    assert reopened.accepted_sequence("line-3", "pump") == 1


def test_seam_does_not_follow_a_planted_symlink(tmp_path: Path) -> None:
    target = tmp_path / "outside"
    target.write_bytes(b"keep")
    link = tmp_path / "model.onnx.partial"
    link.symlink_to(target)
    fs = FileSystem()
    with pytest.raises(OSError):
        fs.write_at(link, 0, b"evil")
    with pytest.raises(OSError):
        fs.write_bytes(link, b"evil")
    assert target.read_bytes() == b"keep"
