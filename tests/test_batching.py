"""The micro-batcher: no added wait at low load, full batches under load, bounded."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

from edge_agent.batching import MicroBatcher, collect


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_collect_alone_returns_at_once_without_waiting() -> None:
    q: queue.Queue[int] = queue.Queue()
    clock = FakeClock()
    # A window of an hour would hang the test if collect waited at low load.
    assert collect(q, 1, max_rows=64, window_s=3600, clock=clock) == [1]


def test_collect_takes_what_is_queued_up_to_max_rows() -> None:
    q: queue.Queue[int] = queue.Queue()
    for i in range(2, 10):
        q.put(i)
    assert collect(q, 1, max_rows=4, window_s=0) == [1, 2, 3, 4]
    assert collect(q, 0, max_rows=100, window_s=0) == [0, 5, 6, 7, 8, 9]


def test_collect_lingers_under_load_until_the_window_ends() -> None:
    q: queue.Queue[int] = queue.Queue()
    q.put(2)
    late = threading.Timer(0.01, q.put, args=(3,))
    late.start()
    # Under load (2 was waiting) it waits for the late row; max_rows ends the wait.
    batch = collect(q, 1, max_rows=3, window_s=5.0)
    late.join()
    assert batch == [1, 2, 3]


def test_single_row_goes_straight_through() -> None:
    batches: list[list[int]] = []
    batcher: MicroBatcher[int] = MicroBatcher(batches.append, window_ms=60_000, max_rows=64)
    batcher.start()
    try:
        batcher.submit(7)
        # With a one-minute window, only a no-wait path finishes within this bound.
        assert wait_until(lambda: batches == [[7]], 5)
    finally:
        batcher.stop()


def test_burst_is_batched_in_order_once_each_bounded_by_max_rows() -> None:
    gate = threading.Event()
    batches: list[list[int]] = []

    def run(batch: list[int]) -> None:
        gate.wait(10)  # hold the worker so the burst queues up behind it
        batches.append(batch)

    batcher: MicroBatcher[int] = MicroBatcher(run, window_ms=1, max_rows=16)
    batcher.start()
    try:
        batcher.submit(0)
        assert wait_until(lambda: batcher.pending() == 0, 5)
        assert batcher.submit_many(list(range(1, 101))) == 100
        gate.set()
        assert wait_until(lambda: batcher.rows == 101, 10)
    finally:
        batcher.stop()
    flat = [row for batch in batches for row in batch]
    assert flat == list(range(101))
    assert batches[0] == [0]
    assert all(len(b) <= 16 for b in batches)
    assert len(batches) <= 1 + 100 // 16 + 1


def test_full_queue_refuses_and_run_errors_do_not_stop_the_worker() -> None:
    gate = threading.Event()
    seen: list[list[int]] = []

    def run(batch: list[int]) -> None:
        gate.wait(10)
        seen.append(batch)
        if batch == [0]:
            raise RuntimeError("model bug")

    batcher: MicroBatcher[int] = MicroBatcher(run, window_ms=0, max_rows=8, max_queue=5)
    batcher.start()
    try:
        batcher.submit(0)
        assert wait_until(lambda: batcher.pending() == 0, 5)
        assert batcher.submit_many(list(range(1, 10))) == 5
        assert not batcher.submit(99)
        gate.set()
        assert wait_until(lambda: batcher.rows == 6, 5)
    finally:
        batcher.stop()
    assert batcher.run_errors == 1
    assert [r for b in seen for r in b] == [0, 1, 2, 3, 4, 5]


def test_a_full_queue_waits_for_room_then_refuses_at_once_while_the_worker_is_stuck() -> None:
    gate = threading.Event()
    batcher: MicroBatcher[int] = MicroBatcher(
        lambda _b: gate.wait(30), window_ms=0, max_rows=1, max_queue=2
    )
    batcher.start()
    try:
        assert batcher.submit(0)  # taken by the worker, which then blocks on the gate
        assert wait_until(lambda: batcher.pending() == 0, 5)
        assert batcher.submit(1) and batcher.submit(2)  # the queue is full now
        done: list[bool] = []
        waiter = threading.Thread(target=lambda: done.append(batcher.submit(3, wait_s=30)))
        waiter.start()
        time.sleep(0.2)
        assert done == []  # held back, not refused
        gate.set()  # the worker drains: room is made
        waiter.join(10)
        assert done == [True]
        assert wait_until(lambda: batcher.rows == 4, 5)
        # A worker that stops draining: the wait times out once, then refusals are at once.
        gate.clear()
        assert batcher.submit(4)
        assert wait_until(lambda: batcher.pending() == 0, 5)
        assert batcher.submit(5) and batcher.submit(6)
        assert not batcher.submit(7, wait_s=0.2)
        started = time.monotonic()
        assert not batcher.submit(8, wait_s=30)
        assert time.monotonic() - started < 5  # not another 30 s wait
        gate.set()
        assert wait_until(lambda: batcher.rows == 7, 5)
        assert batcher.submit(9, wait_s=30)  # room again: accepted
        assert wait_until(lambda: batcher.rows == 8, 5)
    finally:
        gate.set()
        batcher.stop()
