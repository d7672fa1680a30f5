"""The on-disk store-and-forward outbox: predictions, telemetry and events wait here
until the broker has acknowledged them.

Contract (stated plainly, like Greengrass stream manager does):

- **Order.** Entries are published oldest first (by an autoincrement id); paho keeps the
  ones in flight in order across reconnects, so consumers see them in insertion order
  except after a restart, when unacknowledged entries are sent again.
- **At-least-once.** An entry is deleted only when the broker's PUBACK for it arrives
  (``on_publish`` with its mid). A crash or power cut between the broker's PUBACK and our
  delete, or a restart with entries in flight, re-sends them: duplicates are possible,
  loss is not (within the size bound). Consumers dedupe by ``(device, seq)``.
- **Bounded.** ``max_bytes`` counts topic + payload bytes. When a new entry does not fit,
  the oldest entries are dropped (they are the least useful on a production line) and a
  persistent ``dropped`` counter is increased in the same transaction. An entry larger
  than the whole bound is dropped and counted.
- **Durability.** SQLite in WAL mode with ``synchronous=FULL``: a commit is on the disk
  when ``put``/``put_many`` returns, so a power cut loses nothing that was accepted.
  ``NORMAL`` in WAL mode only syncs at checkpoints and a power cut may roll back the
  last commits (the database stays consistent, the messages are gone). FULL costs one
  fsync per transaction, which is why writers batch (``put_many``, one transaction per
  micro-batch) and the pump deletes acknowledged entries in batches. A lost *delete* only
  causes a duplicate, which the contract allows.

Threads: writers call ``put``/``put_many``; one pump thread publishes and deletes; PUBACK
callbacks run on the MQTT network thread and only enqueue ids (no disk I/O there).
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from edge_agent.errors import BrokerError

__all__ = ["Entry", "Outbox", "OutboxPump", "Publisher"]

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    topic   TEXT    NOT NULL,
    payload BLOB    NOT NULL,
    qos     INTEGER NOT NULL,
    retain  INTEGER NOT NULL,
    created REAL    NOT NULL,
    size    INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO counters (name, value) VALUES ('dropped', 0);
"""


@dataclass(frozen=True)
class Entry:
    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    created: float
    size: int


class Outbox:
    """An ordered, size-bounded, crash-safe queue of MQTT messages in one SQLite file."""

    def __init__(self, path: Path, *, max_bytes: int, synchronous: str = "FULL") -> None:
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError("synchronous must be FULL or NORMAL")
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        # One connection shared under a lock: SQLite serialises writers anyway.
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.executescript(_SCHEMA)
        row = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM entries").fetchone()
        self._depth, self._bytes = int(row[0]), int(row[1])
        self._listeners: list[Callable[[], None]] = []

    # ---- writers -------------------------------------------------------------------

    def put(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        """Store one message durably; False when it was dropped (larger than the bound)."""
        return self.put_many([(topic, payload, qos, retain)]) == 1

    def put_many(self, items: Iterable[tuple[str, bytes, int, bool]]) -> int:
        """Store messages in one transaction (one fsync); returns how many were kept."""
        now = time.time()
        rows = []
        too_big = 0
        for topic, payload, qos, retain in items:
            _check_message(topic, qos)
            size = len(topic.encode()) + len(payload)
            if size > self.max_bytes:
                too_big += 1
                continue
            rows.append((topic, bytes(payload), int(qos), int(bool(retain)), now, size))
        incoming = sum(r[5] for r in rows)
        # A batch larger than the whole bound keeps its newest part (drop-oldest).
        while incoming > self.max_bytes:
            incoming -= rows.pop(0)[5]
            too_big += 1
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                dropped = too_big + self._make_room(incoming)
                self._db.executemany(
                    "INSERT INTO entries (topic, payload, qos, retain, created, size)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    rows,
                )
                if dropped:
                    self._db.execute(
                        "UPDATE counters SET value = value + ? WHERE name = 'dropped'", (dropped,)
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                self._recount()
                raise
            self._depth += len(rows)
            self._bytes += incoming
        if too_big:
            log.warning("outbox: %d new message(s) beyond the %d-byte bound dropped", too_big,
                        self.max_bytes)
        self._notify()
        return len(rows)

    def _make_room(self, incoming: int) -> int:
        """Delete the oldest entries until ``incoming`` bytes fit; returns how many."""
        excess = self._bytes + incoming - self.max_bytes
        if excess <= 0:
            return 0
        freed = count = 0
        last_id = None
        cursor = self._db.execute("SELECT id, size FROM entries ORDER BY id")
        for entry_id, size in cursor:
            freed += size
            count += 1
            last_id = entry_id
            if freed >= excess:
                break
        cursor.close()
        if last_id is not None:
            self._db.execute("DELETE FROM entries WHERE id <= ?", (last_id,))
        self._depth -= count
        self._bytes -= freed
        return count

    def _recount(self) -> None:
        row = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM entries").fetchone()
        self._depth, self._bytes = int(row[0]), int(row[1])

    # ---- the pump's side -------------------------------------------------------------

    def oldest(self, after_id: int, limit: int) -> list[Entry]:
        """Up to ``limit`` entries with ids above ``after_id``, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, payload, qos, retain, created, size FROM entries"
                " WHERE id > ? ORDER BY id LIMIT ?",
                (after_id, limit),
            ).fetchall()
        return [Entry(r[0], r[1], bytes(r[2]), r[3], bool(r[4]), r[5], r[6]) for r in rows]

    def delete(self, ids: Sequence[int]) -> int:
        """Delete acknowledged entries in one transaction; returns how many existed."""
        if not ids:
            return 0
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                sizes = []
                for start in range(0, len(ids), 500):  # SQLite's variable limit
                    chunk = ids[start : start + 500]
                    marks = ",".join("?" * len(chunk))
                    sizes += self._db.execute(
                        f"DELETE FROM entries WHERE id IN ({marks}) RETURNING size",  # noqa: S608
                        chunk,
                    ).fetchall()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                self._recount()
                raise
            # Entries dropped for room while in flight are simply absent here.
            self._depth -= len(sizes)
            self._bytes -= sum(s[0] for s in sizes)
        return len(sizes)

    def discard(self, ids: Sequence[int]) -> int:
        """Delete entries the broker will never take (counted as dropped)."""
        count = self.delete(ids)
        with self._lock:
            self._db.execute(
                "UPDATE counters SET value = value + ? WHERE name = 'dropped'", (count,)
            )
        return count

    def add_listener(self, callback: Callable[[], None]) -> None:
        """``callback()`` after each successful put (used to wake the pump)."""
        self._listeners.append(callback)

    def _notify(self) -> None:
        for callback in self._listeners:
            callback()

    # ---- observation -----------------------------------------------------------------

    def depth(self) -> int:
        return self._depth

    def bytes(self) -> int:
        return self._bytes

    def dropped(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT value FROM counters WHERE name = 'dropped'").fetchone()
        return int(row[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _check_message(topic: str, qos: int) -> None:
    # Refuse at the door what paho would refuse at publish time, long after the caller.
    if not topic or "+" in topic or "#" in topic or "\x00" in topic:
        raise ValueError(f"invalid MQTT topic for publishing: {topic!r}")
    if qos not in (0, 1):
        raise ValueError(f"QoS must be 0 or 1, got {qos}")


class _Handle(Protocol):
    def on_ack(self, callback: Callable[[_Handle], None], /) -> None: ...


class Publisher(Protocol):
    """What the pump needs from the link (``edge_agent.mqtt.MqttLink`` fits)."""

    @property
    def connected(self) -> bool: ...

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> _Handle: ...


class OutboxPump:
    """Publishes the outbox's oldest entries in order while connected, at most
    ``max_inflight`` unacknowledged at once, and deletes each on its PUBACK."""

    def __init__(
        self,
        outbox: Outbox,
        link: Publisher,
        *,
        max_inflight: int = 100,
        idle_wait: float = 0.1,
    ) -> None:
        self.outbox = outbox
        self.link = link
        self.max_inflight = max_inflight
        self.idle_wait = idle_wait
        self._acked: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._inflight: set[int] = set()
        # Highest id handed to the link. Starts at 0: after a restart every entry still
        # on disk is sent again (at-least-once).
        self._cursor = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        outbox.add_listener(self._wake.set)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="outbox-pump", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._delete_acked()

    def in_flight(self) -> int:
        return len(self._inflight)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                progressed = self.pump_once()
            except Exception:  # a disk error must not end store-and-forward for good
                log.exception("outbox pump iteration failed")
                progressed = False
            if not progressed:
                self._wake.wait(self.idle_wait)
                self._wake.clear()

    def pump_once(self) -> bool:
        """Delete what was acknowledged, publish what fits in flight; True if anything
        happened (the caller then loops again at once)."""
        deleted = self._delete_acked()
        sent = self._publish_next() if self.link.connected else 0
        return bool(deleted or sent)

    def _delete_acked(self) -> int:
        ids: list[int] = []
        while True:
            try:
                ids.append(self._acked.get_nowait())
            except queue.Empty:
                break
        if not ids:
            return 0
        self.outbox.delete(ids)
        self._inflight.difference_update(ids)
        return len(ids)

    def _publish_next(self) -> int:
        room = self.max_inflight - len(self._inflight)
        if room <= 0:
            return 0
        sent = 0
        for entry in self.outbox.oldest(self._cursor, room):
            try:
                handle = self.link.publish(entry.topic, entry.payload, entry.qos, entry.retain)
            except BrokerError as exc:
                if not self.link.connected:  # disconnected meanwhile: retry from here
                    log.debug("outbox: publish deferred: %s", exc)
                    break
                # Connected yet refused: this entry would block the queue forever.
                log.error("outbox: entry %d dropped, publish refused: %s", entry.id, exc)
                self.outbox.discard([entry.id])
                self._cursor = entry.id
                continue
            self._inflight.add(entry.id)
            self._cursor = entry.id
            handle.on_ack(self._ack_callback(entry.id))
            sent += 1
        return sent

    def _ack_callback(self, entry_id: int) -> Callable[[_Handle], None]:
        def acked(_handle: _Handle) -> None:
            self._acked.put(entry_id)
            self._wake.set()

        return acked
