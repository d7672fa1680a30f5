"""Issue 6.2: power loss across updates and outbox traffic.

``LossyFS`` (edge_agent/fsio.py) models what survives a power cut: file contents as of their
last ``fsync``, directory entries as of the last ``fsync_dir`` of their parent. The real agent
runs a scenario that interleaves sensor traffic (predictions into the outbox, prediction
sequence numbers reserved through the seam) with two updates delivered chunk by chunk; the
power is cut before the k-th mutating call for random k, the tree is rewritten to its
durable state, and the agent restarts.

Pass: the issue-6.1 invariants (old or new signed model, never a partial file, sequence
never lower, serving within 5 s, no leftovers); every outbox entry whose ``put`` returned is
still there; prediction sequence numbers handed out after the restart are above every one
handed out before (``(device, seq)`` never repeats).

The outbox is a SQLite file written with its own I/O, not through the seam: here its files
are kept across the cut and its pragmas (WAL, ``synchronous=FULL``) asserted; its
durability under real power loss is simulated by tests/test_fault_power_loss_outbox.py on
a FUSE filesystem that drops unsynced writes (tests/support/lossy_fuse.py).
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import pytest

from edge_agent.fsio import LossyFS, SimulatedCrash
from edge_agent.inference import _Item
from edge_agent.protocol.predictions import iter_predictions
from tests.support.faults import Gateway, check_invariants, copy_tree, release

SEAM_FILES = {"models", "state.json", "prediction-seq", "undeployed.json"}


class CuttingFS(LossyFS):
    """LossyFS that loses power before mutating call number ``cut_at``."""

    def __init__(self, root: Path, cut_at: int | None) -> None:
        super().__init__(root)
        self.cut_at, self.calls = cut_at, 0

    def _mutating(self, op: str, path: Path) -> None:
        self.calls += 1
        if self.cut_at is not None and self.calls >= self.cut_at:
            raise SimulatedCrash(f"power cut at call {self.calls}: {op} {path}")


def _traffic(gw: Gateway, n: int, start: int) -> None:
    items = [
        _Item(
            "plant/line1/a/sensors",
            json.dumps(
                {
                    "vibration": i * 0.1,
                    "temperature": 20.0,
                    "pressure": 1.0,
                    "current": 0.5,
                    "id": f"m{i}",
                }
            ).encode(),
            time.monotonic(),
        )
        for i in range(start, start + n)
    ]
    gw.engine._run_batch(items)


def _prediction_seqs(gw: Gateway) -> list[int]:
    topic = gw.topics.predictions("gw-1")
    return [
        p["seq"]
        for e in gw.agent.outbox.oldest(0, 1_000_000)
        if e.topic == topic
        for p in iter_predictions(json.loads(e.payload))
    ]


def _scenario(gw: Gateway) -> None:
    """Traffic, then v2 and v3 chunk by chunk with traffic between chunks."""
    i = 0
    for rel in (release(2), release(3)):
        _traffic(gw, 5, i)
        i += 5
        gw.manifest(rel.wire)
        for cid, data in rel.chunks():
            _traffic(gw, 3, i)
            i += 3
            gw.chunk(cid, data)
    _traffic(gw, 5, i)


def _template(tmp_path: Path) -> Path:
    root = tmp_path / "template"
    root.mkdir()
    gw = Gateway(root)
    gw.deliver(release(1))
    _traffic(gw, 10, 1000)
    gw.close()
    return root


def _power_cut(gw: Gateway, fs: LossyFS) -> None:
    """The process is dead; only durable data is left. Non-seam files (the SQLite outbox,
    telemetry) are kept as they are (see the module docstring)."""
    gw.close()
    state = gw.state_dir
    keep = gw.root / "non-seam"
    keep.mkdir()
    for p in state.iterdir():
        if p.name not in SEAM_FILES and not p.name.startswith("."):
            shutil.move(str(p), keep / p.name)
    fs.power_loss()
    for p in keep.iterdir():
        shutil.move(str(p), state / p.name)
    keep.rmdir()


def _run_cut(base: Path, root: Path, cut_at: int | None) -> tuple[LossyFS, Gateway]:
    copy_tree(base, root)
    fs = CuttingFS(root / "state", None)
    gw = Gateway(root, fs=fs)  # start-up writes are durable before the scenario begins
    gw.set_fs(fs)
    fs.calls, fs.cut_at = 0, cut_at
    return fs, gw


@pytest.mark.parametrize(
    "cuts",
    [pytest.param(25, id="25-cuts"), pytest.param(100, id="100-cuts", marks=pytest.mark.slow)],
)
def test_power_cut_at_random_points_of_updates_and_traffic(tmp_path: Path, cuts: int) -> None:
    base = _template(tmp_path)
    allowed = {release(n).sha256: n for n in (1, 2, 3)}

    fs, probe = _run_cut(base, tmp_path / "probe", None)
    _scenario(probe)
    assert probe.active_sha() == release(3).sha256
    total = fs.calls
    probe.close()
    assert total > 40

    rng = random.Random(62)
    # The first call, right after the last one, and random points between.
    points = [1, total + 1, *rng.sample(range(2, total + 1), min(cuts - 2, total - 1))]
    if cuts > total + 1:  # more cuts than calls: every point, then random repeats
        points += [rng.randint(1, total + 1) for _ in range(cuts - total - 1)]
    outcomes = set()
    for n, k in enumerate(points):
        root = tmp_path / f"cut-{n}"
        fs, gw = _run_cut(base, root, k)
        if k <= total:
            with pytest.raises(SimulatedCrash):
                _scenario(gw)
        else:
            _scenario(gw)  # power lost right after the scenario completed
        acked = [(e.id, e.topic, e.payload) for e in gw.agent.outbox.oldest(0, 1_000_000)]
        seqs_before = _prediction_seqs(gw)
        _power_cut(gw, fs)

        sha, _seq, _ = check_invariants(root, allowed, min_sequence=1)
        outcomes.add(allowed[sha])
        after = Gateway(root)
        try:
            # SQLite outbox: durable commits (checked, not simulated) and nothing lost.
            db = after.agent.outbox._db
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
            now = [(e.id, e.topic, e.payload) for e in after.agent.outbox.oldest(0, 1_000_000)]
            assert now[: len(acked)] == acked, f"cut {k}: acknowledged outbox entries lost"
            _traffic(after, 3, 5000)
            new = _prediction_seqs(after)[-3:]
            assert min(new) > max(seqs_before), f"cut {k}: prediction seq went back"
        finally:
            after.close()
    assert {1, 3} <= outcomes, outcomes  # cut points land before, between and after updates
