"""Micro-batching: rows that arrive together are run in one inference call.

Per-message overhead (MQTT, JSON, a runtime call), not the model, sets the agent's
throughput ceiling (field notes section 4), so rows are grouped. The latency rule:

- at low load a row goes straight through: the worker takes what is queued *now* and
  runs it, with no added wait;
- only when more rows were already waiting (evidence of load) does it linger up to
  ``window_ms`` to fill the batch, never past ``max_rows``.

``run_now`` is the zero-hand-off path: when nothing is queued or running, the caller's
thread (the MQTT network thread) runs a lone row itself, saving the thread wake-up that
dominates latency at low load. The caller decides when that is safe (nothing else
waiting on the socket, a fast model); the batcher guarantees order: a row runs inline
only when no earlier row is queued or in progress.

The queue is bounded: a ``submit`` to a full queue waits for room up to ``wait_s``
(the caller, the MQTT thread, stops reading its socket meanwhile: back-pressure), then
returns False (the caller counts an "overload" error) instead of growing memory
without limit. After one such timeout (a worker that no longer drains) it refuses at
once until the worker has made room, so the caller is not held ``wait_s`` per message.
Exceptions from ``run`` are logged and counted; the worker keeps going.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Generic, Protocol, TypeVar

__all__ = ["MicroBatcher", "collect"]

log = logging.getLogger(__name__)

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class _Source(Protocol[T_co]):
    def get_nowait(self) -> T_co: ...
    def get(self, block: bool = True, timeout: float | None = None) -> T_co: ...


def collect(
    source: _Source[T], first: T, *, max_rows: int, window_s: float,
    clock: Callable[[], float] = time.monotonic,
) -> list[T]:
    """A batch starting with ``first``: everything already queued (up to ``max_rows``),
    then, only if that found company, more arrivals until ``window_s`` has passed."""
    batch = [first]
    while len(batch) < max_rows:
        try:
            batch.append(source.get_nowait())
        except queue.Empty:
            break
    if len(batch) == 1 or window_s <= 0:
        return batch  # low load: no added wait
    deadline = clock() + window_s
    while len(batch) < max_rows:
        remaining = deadline - clock()
        if remaining <= 0:
            break
        try:
            batch.append(source.get(timeout=remaining))
        except queue.Empty:
            break
    return batch


class MicroBatcher(Generic[T]):
    """Feeds ``run(batch)`` from a bounded queue on one worker thread."""

    def __init__(
        self,
        run: Callable[[list[T]], None],
        *,
        window_ms: float = 2.0,
        max_rows: int = 64,
        max_queue: int = 1_000,
    ) -> None:
        if max_rows < 1:
            raise ValueError("max_rows must be at least 1")
        self._run = run
        self.window_s = window_ms / 1000.0
        self.max_rows = max_rows
        # A SimpleQueue (C, no condition variable) bounded by hand: one producer (the
        # network thread) submits, so the size check cannot race another producer.
        self._queue: queue.SimpleQueue[T] = queue.SimpleQueue()
        self.max_queue = max_queue
        self._room = threading.Event()  # set by the worker whenever it takes rows
        self._stuck = False  # a wait for room timed out; refuse until room is made
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.batches = 0
        self.rows = 0
        self.run_errors = 0
        self.inline = 0
        # Rows submitted (or running inline) and not yet finished. Only the producer
        # thread raises it, so "zero" seen by the producer stays zero until it acts.
        self._outstanding = 0
        self._count_lock = threading.Lock()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="micro-batcher", daemon=True)
        self._thread.start()

    def submit(self, item: T, *, wait_s: float = 0.0) -> bool:
        """Queue one row; when the queue is full wait up to ``wait_s`` for room, then
        False."""
        if self._queue.qsize() >= self.max_queue and not self._wait_for_room(wait_s):
            return False
        with self._count_lock:
            self._outstanding += 1
        self._queue.put(item)
        return True

    def run_now(self, item: T) -> bool:
        """Run ``item`` alone on the calling thread if no earlier row is queued or
        running; False (nothing done) otherwise, and the caller should ``submit`` it."""
        with self._count_lock:
            if self._outstanding:
                return False
            self._outstanding = 1
        try:
            self._run_guarded([item])
            self.inline += 1
        finally:
            self._finished(1)
        return True

    def _wait_for_room(self, wait_s: float) -> bool:
        if self._stuck and not self._room.is_set():
            return False
        self._stuck = False
        deadline = time.monotonic() + wait_s
        while self._queue.qsize() >= self.max_queue:
            self._room.clear()
            if self._queue.qsize() < self.max_queue:
                break  # room was made between the check and the clear
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._room.wait(remaining):
                self._stuck = wait_s > 0
                return False
        return True

    def idle(self) -> bool:
        """Nothing queued or running."""
        return self._outstanding == 0

    def _finished(self, count: int) -> None:
        with self._count_lock:
            self._outstanding -= count

    def submit_many(self, items: Sequence[T]) -> int:
        """Queue rows in order; returns how many fit."""
        for count, item in enumerate(items):
            if not self.submit(item):
                return count
        return len(items)

    def pending(self) -> int:
        return self._queue.qsize()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop after the rows already queued have been run (bounded by ``timeout``)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _work(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                if self._stop.is_set():
                    return
                continue
            batch = collect(self._queue, first, max_rows=self.max_rows, window_s=self.window_s)
            self._room.set()
            try:
                self._run_guarded(batch)
            finally:
                self._finished(len(batch))

    def _run_guarded(self, batch: list[T]) -> None:
        try:
            self._run(batch)
        except Exception:
            self.run_errors += 1
            log.exception("micro-batch of %d rows failed", len(batch))
        self.batches += 1
        self.rows += len(batch)
