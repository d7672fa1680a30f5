"""Issue 6.2, the outbox's half: power loss under the real SQLite outbox, on a filesystem that
drops every write not fsynced (``tests/support/lossy_fuse.py``, a LazyFS-like FUSE mount).

A child process runs the real ``Outbox`` and ``OutboxPump`` as the agent does (micro-batches
through ``put_and_send`` with acknowledged ids riding on the insert, single ``put``\\s,
``put_many``, the pump publishing the backlog and deleting on PUBACK; the link is a fake
broker that acknowledges after a few ms and drops the connection now and then). It journals,
to a file outside the mount (append + flush), each ``put``/``put_many`` and ``delete``
before it starts and each that *returned* (ids, payload keys, the acked ids deleted in the
same transaction). The test SIGKILLs it at a random moment, cuts the power (the filesystem
drops every unsynced write; half of the cuts first write back a random part of them), and
checks a copy of the database the cut left on the backing directory, the "disk"; the next
child opens the original on the mount, running SQLite's recovery there.

Pass (``synchronous=FULL``, the agent's setting):

- every entry whose put returned and whose delete had not returned is there, payload exact;
- nothing else is there but entries whose put had started (a commit that reached the disk
  just before the cut) or whose delete had returned and was not yet durable: deletes commit
  without an fsync of their own, so an acknowledged entry may come back (at-least-once, a
  duplicate for the consumer), but only one whose delete returned *after* the last durable
  commit (WAL order: a FULL commit syncs every delete before it);
- ids ascend in insertion order; ``PRAGMA integrity_check`` is ``ok``; ``depth()``,
  ``bytes()`` and every row's ``size`` agree with the rows; nothing was dropped.

The cuts chain: each run starts from what the previous cut left (recovery included).

Negative controls: with ``synchronous=OFF`` (nothing ever synced) and ``NORMAL`` (WAL synced
at checkpoints only) entries whose put returned are lost; the test asserts it, showing
the filesystem and the check have teeth. ``test_lossy_fuse_*`` show the filesystem itself
drops unsynced data, keeps synced data, and serves reads, truncation and shared mmap
exactly like a plain file.

Run as a script (``python -m tests.test_fault_power_loss_outbox child DB JOURNAL MODE RUN
SEED``) it is the child.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import mmap
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from edge_agent.errors import BrokerError
from edge_agent.outbox import Entry, Outbox, OutboxPump
from tests.support.lossy_fuse import BLOCK, LossyMount

REPO = Path(__file__).resolve().parents[1]
DB_NAME = "outbox.db"
TOPICS = ("plant/line1/gw-1/predictions", "plant/line1/gw-1/telemetry")
MAX_BYTES = 1 << 30  # far above what a run writes: drop-oldest never interferes


def make_payload(key: str) -> bytes:
    """Deterministic payload of 40 B to ~1.3 KB named by ``key`` (checked byte for byte)."""
    digest = hashlib.sha256(key.encode()).digest()
    return key.encode() + b"|" + digest * (1 + digest[0] % 40)


def key_of(payload: bytes) -> str:
    return payload.split(b"|", 1)[0].decode()


def key_order(key: str) -> tuple[int, int]:
    run, n = key.split("-")
    return int(run), int(n)


# ---- the child ----------------------------------------------------------------------


class JournalingOutbox(Outbox):
    """The real Outbox, journaling what returned (under one lock, so the journal's order
    is the commit order)."""

    def __init__(self, path: Path, journal: Any, mode: str) -> None:
        super().__init__(path, max_bytes=MAX_BYTES,
                         synchronous="FULL" if mode == "FULL" else "NORMAL")
        if mode == "OFF":  # the negative control: the constructor accepts FULL/NORMAL only
            self._db.execute("PRAGMA synchronous=OFF")
            self.synchronous = "OFF"
        self._journal = journal
        self._jlock = threading.Lock()

    def log(self, record: dict[str, Any]) -> None:
        self._journal.write(json.dumps(record) + "\n")
        self._journal.flush()

    def put_many(
        self,
        items: Iterable[tuple[str, bytes, int, bool]],
        *,
        before_commit: Callable[[list[Entry]], None] | None = None,
        acked: Sequence[int] = (),
    ) -> int:
        items = list(items)
        got: list[Entry] = []

        def record(entries: list[Entry]) -> None:
            got.extend(entries)
            if before_commit is not None:
                before_commit(entries)

        with self._jlock:
            self.log({"try": [key_of(p) for _, p, _, _ in items], "acked": list(acked)})
            stored = super().put_many(items, before_commit=record, acked=acked)
            self.log({"put": [[e.id, key_of(e.payload)] for e in got], "acked": list(acked)})
        if before_commit is None:
            self._notify()  # what put_many does without before_commit
        return stored

    def delete(self, ids: Sequence[int]) -> int:
        with self._jlock:
            self.log({"deleting": list(ids)})
            count = super().delete(ids)
            self.log({"del": list(ids)})
        return count


class _Handle:
    def __init__(self) -> None:
        self.callback: Callable[[_Handle], None] | None = None

    def on_ack(self, callback: Callable[[_Handle], None], /) -> None:
        self.callback = callback


class FakeBroker:
    """A link that acknowledges in order after a few ms and goes down now and then."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.connected = True
        self._inflight: collections.deque[_Handle] = collections.deque()
        self._lock = threading.Lock()
        threading.Thread(target=self._acker, daemon=True).start()
        threading.Thread(target=self._flapper, daemon=True).start()

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> _Handle:
        if not self.connected:
            raise BrokerError("not connected")
        handle = _Handle()
        with self._lock:
            self._inflight.append(handle)
        return handle

    def _acker(self) -> None:
        while True:
            time.sleep(self.rng.uniform(0.001, 0.01))
            if not self.connected:
                continue
            for _ in range(self.rng.randint(1, 30)):
                with self._lock:
                    if not self._inflight or self._inflight[0].callback is None:
                        break
                    handle = self._inflight.popleft()
                assert handle.callback is not None
                handle.callback(handle)

    def _flapper(self) -> None:
        while True:
            time.sleep(self.rng.uniform(0.1, 0.4))
            self.connected = False
            time.sleep(self.rng.uniform(0.02, 0.15))
            self.connected = True


def child(db: str, journal_path: str, mode: str, run: int, seed: int) -> None:
    rng = random.Random(seed)
    with Path(journal_path).open("a") as journal:
        outbox = JournalingOutbox(Path(db), journal, mode)
        pump = OutboxPump(outbox, FakeBroker(random.Random(seed + 1)), max_inflight=50,
                          idle_wait=0.01)
        pump.start()
        outbox.log({"ready": True})
        n = 0
        while True:
            batch = [
                (TOPICS[rng.random() < 0.2], make_payload(f"{run}-{n + i}"), 1, False)
                for i in range(rng.randint(1, 12))
            ]
            n += len(batch)
            draw = rng.random()
            if draw < 0.7:  # the agent's micro-batch path
                pump.put_and_send(batch)
            elif draw < 0.85:  # events and telemetry: one put each
                for item in batch:
                    outbox.put(*item)
            else:
                outbox.put_many(batch)
            time.sleep(rng.uniform(0, 0.005))


# ---- the checks ---------------------------------------------------------------------


@dataclass
class Journal:
    """What the child was told. ``inflight_*``: the put that had started and not returned
    (its keys, the acked ids its transaction deletes, its journal line), and the ids of a
    delete that had started and not returned."""

    inflight_keys: list[str] = field(default_factory=list)
    inflight_line: int = -1
    inflight_acked: list[int] = field(default_factory=list)
    inflight_deletes: list[int] = field(default_factory=list)
    returned: dict[int, str] = field(default_factory=dict)
    deleted_at: dict[int, int] = field(default_factory=dict)  # id -> journal line
    last_durable_put: int = -1  # line of the last returned commit that wrote something
    ready: bool = False

    @classmethod
    def read(cls, path: Path) -> Journal:
        journal = cls()
        if not path.exists():
            return journal
        for line_no, line in enumerate(path.read_text().splitlines()):
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut by the kill (flush is whole lines, but be safe)
            if "ready" in record:
                journal.ready = True
            if "deleting" in record:
                journal.inflight_deletes = record["deleting"]
            if "del" in record:
                journal.inflight_deletes = []
            if "try" in record:
                journal.inflight_keys, journal.inflight_acked = record["try"], record["acked"]
                journal.inflight_line = line_no
            if "put" in record:
                journal.inflight_keys, journal.inflight_acked = [], []
                for entry_id, key in record["put"]:
                    journal.returned[entry_id] = key
                for entry_id in record["acked"]:
                    journal.deleted_at[entry_id] = line_no
                if record["put"] or record["acked"]:
                    journal.last_durable_put = line_no
            for entry_id in record.get("del", []):
                journal.deleted_at[entry_id] = line_no
        return journal


@dataclass
class Verdict:
    lost: list[int]
    resurrected: list[int]
    rows: dict[int, str]


def read_rows(db: Path) -> dict[int, tuple[str, bytes, int]]:
    con = sqlite3.connect(str(db))
    try:
        return {
            r[0]: (r[1], bytes(r[2]), r[3])
            for r in con.execute("SELECT id, topic, payload, size FROM entries ORDER BY id")
        }
    finally:
        con.close()


def check_after_cut(
    db: Path, before: dict[int, str], journal: Journal, *, strict: bool
) -> Verdict:
    """The database as the reboot finds it, against what the child was told. ``strict``:
    the FULL contract (assert); otherwise only measure what was lost."""
    outbox = Outbox(db, max_bytes=MAX_BYTES)  # recovery runs here, as on the reboot
    try:
        integrity = outbox._db.execute("PRAGMA integrity_check").fetchall()
        rows = read_rows(db)
        depth, size, dropped = outbox.depth(), outbox.bytes(), outbox.dropped()
    finally:
        outbox.close()
    present = {entry_id: key_of(payload) for entry_id, (_, payload, _) in rows.items()}
    required = {**before, **journal.returned}
    for entry_id in journal.deleted_at:
        required.pop(entry_id, None)
    # The put in flight at the cut may have committed (it was on the disk, the child was
    # killed before it returned): then its acked ids went with it, atomically.
    present_keys = set(present.values())
    inflight_committed = any(k in present_keys for k in journal.inflight_keys)
    if inflight_committed:
        for entry_id in journal.inflight_acked:
            required.pop(entry_id, None)
    # A delete in flight may have reached the disk too (a checkpoint syncs): acknowledged
    # entries, gone or not.
    for entry_id in journal.inflight_deletes:
        required.pop(entry_id, None)
    lost = sorted(i for i, k in required.items() if present.get(i) != k)
    resurrected = sorted(i for i in journal.deleted_at if i in present)
    if not strict:
        return Verdict(lost, resurrected, present)

    assert integrity == [("ok",)], integrity
    assert not lost, f"entries whose put returned are gone: {lost[:10]}"
    if inflight_committed:  # one transaction: all of it or none
        assert present_keys >= set(journal.inflight_keys), "a put committed in part"
        assert not present.keys() & set(journal.inflight_acked), "a put committed in part"
    known = {**before, **journal.returned}
    for entry_id, (topic, payload, row_size) in rows.items():
        key = present[entry_id]
        assert payload == make_payload(key), f"entry {entry_id}: payload differs"
        assert row_size == len(topic.encode()) + len(payload), f"entry {entry_id}: size"
        if entry_id in known:
            assert known[entry_id] == key, f"entry {entry_id} holds another payload"
        else:  # the put in flight at the cut, whose commit made it: allowed
            assert key in journal.inflight_keys, f"entry {entry_id} ({key}) was never put"
    keys = [key_order(present[i]) for i in sorted(present)]
    assert keys == sorted(keys) and len(set(keys)) == len(keys), "insertion order broken"
    # WAL order: a FULL commit makes every delete before it durable.
    last_durable = journal.inflight_line if inflight_committed else journal.last_durable_put
    for entry_id in resurrected:
        assert journal.deleted_at[entry_id] > last_durable, (
            f"entry {entry_id} came back although a FULL commit followed its delete"
        )
    assert depth == len(rows), (depth, len(rows))
    assert size == sum(len(t.encode()) + len(p) for t, p, _ in rows.values()), size
    assert dropped == 0
    return Verdict(lost, resurrected, present)


# ---- fixtures -----------------------------------------------------------------------


@pytest.fixture
def lossy(tmp_path: Path) -> Iterator[LossyMount]:
    """The lossy mount (not mounted yet); always unmounted at the end, even on failure."""
    fs = LossyMount(tmp_path / "disk", tmp_path / "mnt")
    fs.backing.mkdir()
    try:
        yield fs
    finally:
        fs.unmount()


@dataclass
class Campaign:
    cuts: int
    lost: int = 0
    cuts_with_loss: int = 0
    resurrected: int = 0
    returned: int = 0
    wal_drops: int = 0
    torn: int = 0
    kept_blocks: int = 0
    seconds: float = 0.0


def run_campaign(
    fs: LossyMount, tmp_path: Path, mode: str, cuts: int, seed: int, *, strict: bool,
    tear: float,
) -> Campaign:
    """``cuts`` runs of the child, each ended by a power cut; a fraction ``tear`` of the
    cuts first writes back a random part of the unsynced blocks (``Overlay.tear``)."""
    disk_db = fs.backing / DB_NAME
    template = Outbox(disk_db, max_bytes=MAX_BYTES)  # created durably, before any cut
    template.put_many([(TOPICS[0], make_payload(f"0-{n}"), 1, False) for n in range(20)])
    template.close()
    before = {i: key_of(p) for i, (_, p, _) in read_rows(disk_db).items()}
    rng = random.Random(seed)
    result = Campaign(cuts)
    start = time.monotonic()
    for run in range(1, cuts + 1):
        journal_path = tmp_path / f"journal-{run}.jsonl"
        fs.mount()
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.test_fault_power_loss_outbox", "child",
             str(fs.mountpoint / DB_NAME), str(journal_path), mode, str(run),
             str(rng.randrange(1 << 30))],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        try:
            early = rng.random() < 0.15  # now and then during start-up and recovery
            if not early:
                deadline = time.monotonic() + 30
                while not Journal.read(journal_path).ready:
                    assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
                    assert time.monotonic() < deadline, "child never became ready"
                    time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.4 if early else 0.6))
            assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
        finally:
            proc.kill()
            proc.communicate()
        torn = rng.random() < tear
        report = fs.cut(rng.randrange(1 << 30) if torn else None)
        result.torn += torn
        result.kept_blocks += report["kept_blocks"]
        if any(path.endswith("-wal") for path in report["dropped"]):
            result.wal_drops += 1
        journal = Journal.read(journal_path)
        # Verified on a copy: the disk stays as the cut left it, so the next child runs
        # SQLite's recovery itself, on the lossy mount (and may be cut during it).
        scratch = tmp_path / f"verify-{run}"
        scratch.mkdir()
        for path in fs.backing.glob(DB_NAME + "*"):
            shutil.copy2(path, scratch / path.name)
        verdict = check_after_cut(scratch / DB_NAME, before, journal, strict=strict)
        shutil.rmtree(scratch)
        result.returned += len(journal.returned)
        result.lost += len(verdict.lost)
        result.cuts_with_loss += bool(verdict.lost)
        result.resurrected += len(verdict.resurrected)
        before = verdict.rows
    result.seconds = time.monotonic() - start
    print(f"{mode}: {result}")
    return result


# ---- the outbox under power loss --------------------------------------------------------


@pytest.mark.parametrize(
    "cuts",
    [
        pytest.param(20, id="20-cuts"),
        pytest.param(100, id="100-cuts", marks=[pytest.mark.slow, pytest.mark.timeout(1200)]),
    ],
)
def test_outbox_survives_power_cuts(lossy: LossyMount, tmp_path: Path, cuts: int) -> None:
    result = run_campaign(lossy, tmp_path, "FULL", cuts, seed=6200 + cuts, strict=True,
                          tear=0.5)
    assert result.lost == 0
    assert result.returned > 5 * cuts  # the child did real work before the cuts
    # The cuts really dropped unsynced WAL data (lazy deletes, commits in flight).
    assert result.wal_drops > 0, result


@pytest.mark.parametrize("mode", ["OFF", "NORMAL"])
def test_negative_control_unsynced_outbox_loses_entries(
    lossy: LossyMount, tmp_path: Path, mode: str
) -> None:
    result = run_campaign(lossy, tmp_path, mode, 4, seed=6210, strict=False, tear=0.0)
    assert result.lost > 0, f"synchronous={mode} lost nothing: the simulation has no teeth"


# ---- the filesystem itself --------------------------------------------------------------


def _write(path: Path, data: bytes, *, sync: bool, offset: int | None = None) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        if offset is None:
            os.ftruncate(fd, 0)
            os.write(fd, data)
        else:
            os.pwrite(fd, data, offset)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def test_lossy_fuse_drops_unsynced_data_and_keeps_synced(lossy: LossyMount) -> None:
    mnt, disk = lossy.mountpoint, lossy.backing
    (disk / "old").write_bytes(b"durable before the mount")
    lossy.mount()
    _write(mnt / "unsynced", b"never synced", sync=False)
    _write(mnt / "synced", b"synced", sync=True)
    _write(mnt / "synced", b"+tail not synced", sync=False, offset=6)
    _write(mnt / "old", b"overwritten, not synced", sync=False)
    _write(mnt / "datasync", b"fdatasync'd", sync=False)
    fd = os.open(mnt / "datasync", os.O_RDWR)
    os.fdatasync(fd)
    os.close(fd)
    fd = os.open(mnt / "shrunk", os.O_RDWR | os.O_CREAT)
    os.write(fd, b"0123456789")
    os.fsync(fd)
    os.ftruncate(fd, 3)  # truncation is data too: lost without a sync
    os.close(fd)
    # Before the cut, the mount shows every write.
    assert (mnt / "unsynced").read_bytes() == b"never synced"
    assert (mnt / "synced").read_bytes() == b"synced+tail not synced"
    assert (mnt / "old").read_bytes() == b"overwritten, not synced"
    assert (mnt / "shrunk").read_bytes() == b"012"
    report = lossy.cut()
    assert set(report["dropped"]) == {"/unsynced", "/synced", "/old", "/shrunk"}
    # After it, the disk holds what was synced; entries were durable at once.
    assert (disk / "unsynced").read_bytes() == b""
    assert (disk / "synced").read_bytes() == b"synced"
    assert (disk / "old").read_bytes() == b"durable before the mount"
    assert (disk / "datasync").read_bytes() == b"fdatasync'd"
    assert (disk / "shrunk").read_bytes() == b"0123456789"
    # The mount is back, showing exactly the disk.
    lossy.mount()
    assert (mnt / "synced").read_bytes() == b"synced"


def test_lossy_fuse_rename_and_unlink_semantics(lossy: LossyMount) -> None:
    """Directory operations are durable at once; the data they name only once synced."""
    mnt, disk = lossy.mountpoint, lossy.backing
    lossy.mount()
    _write(mnt / "a", b"version 1", sync=True)
    _write(mnt / "a.tmp", b"version 2, not synced", sync=False)
    (mnt / "a.tmp").replace(mnt / "a")  # rename without fsync of the data
    _write(mnt / "b", b"version 1", sync=True)
    _write(mnt / "b.tmp", b"version 2, synced", sync=True)
    (mnt / "b.tmp").replace(mnt / "b")  # the safe pattern
    _write(mnt / "gone", b"x", sync=True)
    (mnt / "gone").unlink()
    (mnt / "dir").mkdir()
    _write(mnt / "dir" / "f", b"in a new dir", sync=True)
    lossy.cut()
    assert sorted(p.name for p in disk.iterdir()) == ["a", "b", "dir"]
    assert (disk / "a").read_bytes() == b""  # the zero-length file after rename
    assert (disk / "b").read_bytes() == b"version 2, synced"
    assert (disk / "dir" / "f").read_bytes() == b"in a new dir"


def test_lossy_fuse_tear_keeps_whole_blocks_of_unsynced_writes(lossy: LossyMount) -> None:
    """The torn cut: each unsynced 4 KiB block is either written back whole or not at all,
    and an unsynced extension either happened (unwritten blocks read as zeros) or not."""
    mnt, disk = lossy.mountpoint, lossy.backing
    lossy.mount()
    old, new, zero = b"A" * BLOCK, b"B" * BLOCK, bytes(BLOCK)
    for n in range(8):
        _write(mnt / f"over{n}", old * 3, sync=True)
        _write(mnt / f"over{n}", new * 3, sync=False, offset=0)
        _write(mnt / f"grow{n}", old, sync=True)
        _write(mnt / f"grow{n}", new * 2, sync=False, offset=BLOCK)
    report = lossy.cut(tear_seed=62)
    assert report["kept_blocks"] > 0
    seen = set()
    for n in range(8):
        data = (disk / f"over{n}").read_bytes()
        blocks = [data[i : i + BLOCK] for i in range(0, len(data), BLOCK)]
        assert len(blocks) == 3 and set(blocks) <= {old, new}
        seen.update(blocks)
        data = (disk / f"grow{n}").read_bytes()
        assert len(data) in (BLOCK, 3 * BLOCK) and data[:BLOCK] == old
        assert {data[i : i + BLOCK] for i in range(BLOCK, len(data), BLOCK)} <= {new, zero}
    assert seen == {old, new}, "a torn cut keeps some unsynced blocks and drops others"


def test_lossy_fuse_shared_mmap(lossy: LossyMount) -> None:
    """SQLite maps its -shm file shared: writes through the mapping must be seen by read()
    and, unsynced, dropped by a cut (what SQLite expects of -shm after a crash)."""
    mnt, disk = lossy.mountpoint, lossy.backing
    lossy.mount()
    fd = os.open(mnt / "shm", os.O_RDWR | os.O_CREAT)
    os.ftruncate(fd, 2 * mmap.PAGESIZE)
    with mmap.mmap(fd, 2 * mmap.PAGESIZE, mmap.MAP_SHARED) as mapped:
        mapped[0:6] = b"mapped"
        mapped[mmap.PAGESIZE : mmap.PAGESIZE + 4] = b"page"
        other = os.open(mnt / "shm", os.O_RDONLY)
        assert os.pread(other, 6, 0) == b"mapped"
        assert os.pread(other, 4, mmap.PAGESIZE) == b"page"
        os.close(other)
    os.close(fd)
    lossy.cut()
    assert (disk / "shm").read_bytes() == b""


def test_lossy_fuse_matches_a_plain_file(lossy: LossyMount, tmp_path: Path) -> None:
    """Random writes, truncations, reads and syncs against a plain file: the mount reads
    like the plain file, and after the cut the disk holds the plain file as of its last
    sync."""
    lossy.mount()
    rng = random.Random(626)
    ref_path, mnt_path = tmp_path / "reference", lossy.mountpoint / "f"
    (lossy.backing / "f").write_bytes(b"initial content " * 700)
    ref_path.write_bytes(b"initial content " * 700)
    synced = ref_path.read_bytes()
    ref, fd = os.open(ref_path, os.O_RDWR), os.open(mnt_path, os.O_RDWR)
    try:
        for _ in range(400):
            op = rng.random()
            if op < 0.45:
                offset = rng.randrange(0, 30_000)
                data = rng.randbytes(rng.choice([1, 7, 100, 4096, 5000, 9000]))
                os.pwrite(ref, data, offset)
                os.pwrite(fd, data, offset)
            elif op < 0.6:
                length = rng.randrange(0, 30_000)
                os.ftruncate(ref, length)
                os.ftruncate(fd, length)
            elif op < 0.68:
                os.fsync(fd)
                synced = ref_path.read_bytes()
            else:
                offset, size = rng.randrange(0, 32_000), rng.randrange(1, 12_000)
                assert os.pread(fd, size, offset) == os.pread(ref, size, offset)
                assert os.fstat(fd).st_size == os.fstat(ref).st_size
        assert mnt_path.read_bytes() == ref_path.read_bytes()
    finally:
        os.close(ref)
        os.close(fd)
    lossy.cut()
    assert (lossy.backing / "f").read_bytes() == synced


if __name__ == "__main__":
    if sys.argv[1:2] == ["child"]:
        _, _, db_arg, journal_arg, mode_arg, run_arg, seed_arg = sys.argv
        with contextlib.suppress(KeyboardInterrupt):
            child(db_arg, journal_arg, mode_arg, int(run_arg), int(seed_arg))
