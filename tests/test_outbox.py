"""The store-and-forward outbox: order, delete only on PUBACK, restarts, the size bound,
and a broker that goes away and comes back (real Mosquitto)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edge_agent.errors import BrokerError
from edge_agent.mqtt import LinkOptions, Message, MqttLink
from edge_agent.outbox import Outbox, OutboxPump
from tests.support.broker import MosquittoBroker


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


@pytest.fixture
def links() -> Iterator[Callable[..., MqttLink]]:
    made: list[MqttLink] = []

    def make(url: str, client_id: str, **options: object) -> MqttLink:
        link = MqttLink(
            LinkOptions(
                url=url, client_id=client_id, backoff_initial=0.1, backoff_max=0.5, **options
            )  # type: ignore[arg-type]
        )
        made.append(link)
        return link

    yield make
    for link in made:
        link.stop(timeout=2.0)


def subscriber(links: Callable[..., MqttLink], url: str, name: str) -> list[Message]:
    got: list[Message] = []
    link = links(url, name)
    link.subscribe("out/#", got.append, qos=1)
    link.start(wait=10)
    return got


def seqs(messages: list[Message]) -> list[int]:
    return [int(m.payload.split(b":")[1]) for m in messages]


def test_keeps_order_and_counts(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", max_bytes=10_000)
    box.put("out/a", b"1")
    assert box.put_many([("out/a", b"2", 1, False), ("out/b", b"3", 0, True)]) == 2
    entries = box.oldest(0, 10)
    assert [e.payload for e in entries] == [b"1", b"2", b"3"]
    assert entries[2].retain and entries[2].qos == 0
    assert box.depth() == 3 and box.bytes() == 3 * (5 + 1)
    assert [e.payload for e in box.oldest(entries[0].id, 10)] == [b"2", b"3"]
    box.delete([entries[1].id])
    assert [e.payload for e in box.oldest(0, 10)] == [b"1", b"3"]
    assert box.depth() == 2


_CRASHING_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from edge_agent.outbox import Outbox
    box = Outbox(Path(sys.argv[1]), max_bytes=10_000_000)
    for start in range(0, 500, 50):
        box.put_many([("out/k", f"m:{i}".encode(), 1, False) for i in range(start, start + 50)])
    print("stored", flush=True)
    time.sleep(60)
    """
)


def test_accepted_entries_survive_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    repo = Path(__file__).resolve().parents[1]
    child = subprocess.Popen([sys.executable, "-c", _CRASHING_WRITER, str(path)], cwd=repo,
                             stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(repo)})
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == b"stored"
    finally:
        child.kill()  # SIGKILL: no close(), no checkpoint
        child.wait(10)
    box = Outbox(path, max_bytes=10_000_000)
    assert box.depth() == 500
    assert [e.payload for e in box.oldest(0, 3)] == [b"m:0", b"m:1", b"m:2"]


def test_invalid_messages_are_refused_at_put(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", max_bytes=10_000)
    for topic, qos in (("out/#", 1), ("", 1), ("out/+/x", 0), ("out/x", 2)):
        with pytest.raises(ValueError):
            box.put(topic, b"x", qos)
    assert box.depth() == 0


class RefusingLink:
    """A connected link that refuses one topic (as paho refuses an oversized packet)."""

    connected = True

    def __init__(self, inner: MqttLink) -> None:
        self.inner = inner

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool):  # type: ignore[no-untyped-def]
        if topic == "out/poison":
            raise BrokerError("refused")
        return self.inner.publish(topic, payload, qos, retain)


def test_a_refused_entry_does_not_block_the_queue(
    broker: MosquittoBroker, tmp_path: Path, links  # type: ignore[no-untyped-def]
) -> None:
    link = links(broker.url, "dev-poison")
    link.start(wait=10)
    box = Outbox(tmp_path / "o.db", max_bytes=1_000_000)
    box.put_many([("out/ok", b"1", 1, False), ("out/poison", b"2", 1, False),
                  ("out/ok", b"3", 1, False)])
    pump = OutboxPump(box, RefusingLink(link))
    pump.start()
    try:
        assert wait_until(lambda: box.depth() == 0, 10)
    finally:
        pump.stop()
    assert box.dropped() == 1


def test_drops_oldest_at_capacity_with_a_persistent_counter(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", max_bytes=100)  # each entry: 5 + 14 = 19 bytes
    for i in range(7):
        box.put("out/x", f"payload-{i:06d}".encode())
    assert box.depth() == 5 and box.bytes() <= 100
    assert box.dropped() == 2
    assert [e.payload[-1:] for e in box.oldest(0, 10)] == [b"2", b"3", b"4", b"5", b"6"]
    assert not box.put("out/x", b"z" * 200)  # larger than the whole bound
    box.close()
    reopened = Outbox(tmp_path / "o.db", max_bytes=100)
    assert reopened.dropped() == 3
    assert reopened.depth() == 5 and reopened.bytes() == 95


def test_deletes_only_on_puback(broker: MosquittoBroker, tmp_path: Path, links) -> None:  # type: ignore[no-untyped-def]
    link = links(broker.url, "dev-puback")
    link.start(wait=10)
    box = Outbox(tmp_path / "o.db", max_bytes=1_000_000)
    pump = OutboxPump(box, link, max_inflight=10)
    pump.start()
    try:
        os.kill(broker.pid, signal.SIGSTOP)  # type: ignore[arg-type]
        try:
            box.put_many([("out/p", f"m:{i}".encode(), 1, False) for i in range(25)])
            # Published (in flight) but not acknowledged: still on disk.
            assert wait_until(lambda: pump.in_flight() == 10, 5)
            assert box.depth() == 25
        finally:
            os.kill(broker.pid, signal.SIGCONT)  # type: ignore[arg-type]
        assert wait_until(lambda: box.depth() == 0, 10)
    finally:
        pump.stop()


def test_unacked_entries_are_resent_after_restart(
    broker: MosquittoBroker, tmp_path: Path, links
) -> None:  # type: ignore[no-untyped-def]
    got = subscriber(links, broker.url, "collector")
    path = tmp_path / "o.db"
    box = Outbox(path, max_bytes=1_000_000)
    box.put_many([("out/r", f"m:{i}".encode(), 1, False) for i in range(50)])
    box.close()  # the agent dies before anything was sent
    link = links(broker.url, "dev-restart")
    link.start(wait=10)
    again = Outbox(path, max_bytes=1_000_000)
    assert again.depth() == 50
    pump = OutboxPump(again, link, max_inflight=16)
    pump.start()
    try:
        assert wait_until(lambda: again.depth() == 0, 10)
        assert wait_until(lambda: len(got) >= 50, 10)
    finally:
        pump.stop()
    assert seqs(got) == list(range(50))


def test_broker_down_then_up_loses_nothing(broker: MosquittoBroker, tmp_path: Path, links) -> None:  # type: ignore[no-untyped-def]
    broker.restart(persistence=True)  # the plant broker persists sessions and queues
    got = subscriber(links, broker.url, "collector-persistent")
    link = links(broker.url, "dev-flaky")
    link.start(wait=10)
    box = Outbox(tmp_path / "o.db", max_bytes=10_000_000)
    pump = OutboxPump(box, link, max_inflight=50)
    pump.start()
    try:
        box.put_many([("out/f", f"m:{i}".encode(), 1, False) for i in range(300)])
        broker.stop()  # SIGTERM: Mosquitto saves its persistence file
        box.put_many([("out/f", f"m:{i}".encode(), 1, False) for i in range(300, 600)])
        assert box.depth() >= 300
        broker.start()
        box.put_many([("out/f", f"m:{i}".encode(), 1, False) for i in range(600, 900)])
        assert wait_until(lambda: box.depth() == 0, 30)
        assert wait_until(lambda: set(seqs(got)) >= set(range(900)), 30)
    finally:
        pump.stop()
    received = seqs(got)
    assert set(received) == set(range(900))  # duplicates are allowed, loss is not
    first_seen = sorted(set(received), key=received.index)
    assert first_seen == list(range(900))  # first deliveries in order


def test_throughput_is_reported(broker: MosquittoBroker, tmp_path: Path, links) -> None:  # type: ignore[no-untyped-def]
    """Not a timed assertion: measures and prints insert and publish+ack rates."""
    n = 5000
    box = Outbox(tmp_path / "o.db", max_bytes=100_000_000)
    payload = b"x" * 200
    t0 = time.perf_counter()
    for _ in range(0, n, 100):
        box.put_many([("out/t", payload, 1, False)] * 100)
    insert_rate = n / (time.perf_counter() - t0)
    link = links(broker.url, "dev-throughput")
    link.start(wait=10)
    pump = OutboxPump(box, link, max_inflight=100)
    t0 = time.perf_counter()
    pump.start()
    try:
        assert wait_until(lambda: box.depth() == 0, 60)
    finally:
        pump.stop()
    drain_rate = n / (time.perf_counter() - t0)
    print(
        f"\noutbox: insert {insert_rate:,.0f} msg/s (batches of 100), "
        f"publish+ack+delete {drain_rate:,.0f} msg/s"
    )


class _Handle:
    """A publication whose PUBACK the test delivers by hand."""

    def __init__(self) -> None:
        self._callbacks: list[Callable[[_Handle], None]] = []

    def on_ack(self, callback: Callable[[_Handle], None], /) -> None:
        self._callbacks.append(callback)

    def ack(self) -> None:
        for callback in self._callbacks:
            callback(self)


class _ScriptedLink:
    """A connected link that records publications; ``check`` runs inside publish()."""

    def __init__(self, check: Callable[[str, bytes], None] | None = None) -> None:
        self.connected = True
        self.sent: list[tuple[bytes, _Handle]] = []
        self.check = check

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> _Handle:
        if self.check is not None:
            self.check(topic, payload)
        handle = _Handle()
        self.sent.append((payload, handle))
        return handle


def _committed(path: Path) -> list[bytes]:
    """What another connection (a reader after a crash) sees as committed."""
    import sqlite3

    db = sqlite3.connect(str(path))
    try:
        return [bytes(r[0]) for r in db.execute("SELECT payload FROM entries ORDER BY id")]
    finally:
        db.close()


def test_put_and_send_publishes_during_the_commit_and_deletes_after_ack(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    box = Outbox(path, max_bytes=100_000)
    seen_at_publish: list[list[bytes]] = []
    link = _ScriptedLink(check=lambda _t, _p: seen_at_publish.append(_committed(path)))
    pump = OutboxPump(box, link)
    assert pump.put_and_send([("out/a", b"p:0", 1, False), ("out/a", b"p:1", 1, False)]) == 2
    # Handed to the link inside the transaction: not yet committed at that moment ...
    assert seen_at_publish == [[], []]
    # ... and durable once put_and_send returned.
    assert _committed(path) == [b"p:0", b"p:1"]
    assert [p for p, _h in link.sent] == [b"p:0", b"p:1"] and pump.in_flight() == 2
    link.sent[0][1].ack()
    assert box.depth() == 2  # an ack only queues the id: nothing deleted on that thread
    link.check = None
    pump.put_and_send([("out/a", b"p:2", 1, False)])  # the delete rides on this commit
    assert _committed(path) == [b"p:1", b"p:2"]
    assert box.depth() == 2 and pump.in_flight() == 2
    box.close()


def test_put_and_send_keeps_order_behind_older_unsent_entries(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", max_bytes=100_000)
    link = _ScriptedLink()
    pump = OutboxPump(box, link)
    box.put("out/a", b"old")  # e.g. an event stored by another thread, not yet sent
    pump.put_and_send([("out/a", b"new", 1, False)])
    assert link.sent == []  # "new" must not overtake "old"
    assert pump.pump_once()
    assert [p for p, _h in link.sent] == [b"old", b"new"]
    pump.put_and_send([("out/a", b"next", 1, False)])  # caught up: straight out
    assert [p for p, _h in link.sent][-1] == b"next"
    box.close()


def test_put_and_send_leaves_what_exceeds_the_window_to_the_pump(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", max_bytes=100_000)
    link = _ScriptedLink()
    pump = OutboxPump(box, link, max_inflight=2)
    pump.put_and_send([("out/a", f"m:{i}".encode(), 1, False) for i in range(5)])
    assert [p for p, _h in link.sent] == [b"m:0", b"m:1"] and box.depth() == 5
    for _p, handle in list(link.sent):
        handle.ack()
    while pump.pump_once():
        for _p, handle in link.sent[-2:]:
            handle.ack()
    assert [p for p, _h in link.sent] == [f"m:{i}".encode() for i in range(5)]
    assert box.depth() == 0
    box.close()


def test_a_failed_send_never_lends_its_ids_to_another_entry(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", max_bytes=100_000)

    def fail_second(_topic: str, payload: bytes) -> None:
        if payload == b"doomed:1":
            raise RuntimeError("disk or link trouble before the commit")

    link = _ScriptedLink(check=fail_second)
    pump = OutboxPump(box, link)
    with pytest.raises(RuntimeError):
        pump.put_and_send([("out/a", b"doomed:0", 1, False), ("out/a", b"doomed:1", 1, False)])
    assert box.depth() == 0 and pump.in_flight() == 0
    stale = link.sent[0][1]  # "doomed:0" went out before the failure
    pump.put_and_send([("out/a", b"fresh", 1, False)])
    assert box.oldest(0, 10)[0].id == 3  # ids 1 and 2 are never used again
    stale.ack()  # the broker acknowledges the failed publication
    pump.pump_once()
    assert [e.payload for e in box.oldest(0, 10)] == [b"fresh"]  # not deleted
    assert link.sent[-1][0] == b"fresh"  # the pump sent it (the gap paused the fast path)
    link.sent[-1][1].ack()
    pump.pump_once()
    assert box.depth() == 0
    box.close()
    # A restart continues above every id ever used, even with the outbox empty.
    reopened = Outbox(tmp_path / "o.db", max_bytes=100_000)
    reopened.put("out/a", b"after")
    assert reopened.oldest(0, 10)[0].id == 4
    reopened.close()


def test_deletes_skip_their_own_fsync_but_puts_stay_full(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", max_bytes=100_000)
    box.put("out/a", b"1")
    box.delete([box.oldest(0, 1)[0].id])
    # The connection is back to FULL for the next put (2 = FULL in SQLite's numbering).
    assert box._db.execute("PRAGMA synchronous").fetchone()[0] == 2
    normal = Outbox(tmp_path / "n.db", max_bytes=100_000, synchronous="NORMAL")
    normal.put("out/a", b"1")
    normal.delete([normal.oldest(0, 1)[0].id])
    assert normal._db.execute("PRAGMA synchronous").fetchone()[0] == 1
    box.close()
    normal.close()


def test_a_deferred_commit_stores_later_and_only_then_lets_the_inputs_go(
    tmp_path: Path,
) -> None:
    path = tmp_path / "o.db"
    box = Outbox(path, max_bytes=100_000)
    link = _ScriptedLink()
    pump = OutboxPump(box, link)
    done: list[str] = []
    pump.put_and_send([("out/a", b"lone", 1, False)], committed=lambda: done.append("lone"),
                      defer=True)
    assert [p for p, _h in link.sent] == [b"lone"]  # on the wire at once ...
    assert _committed(path) == [] and done == []  # ... stored later, inputs held till then
    link.sent[0][1].ack()  # its PUBACK comes back before the commit
    assert pump.pump_once()  # the next turn: inserted and deleted in one transaction
    assert done == ["lone"] and _committed(path) == [] and box.depth() == 0
    # A batch after a deferred one: the deferred goes first, then the batch, in order.
    pump.put_and_send([("out/a", b"d", 1, False)], committed=lambda: done.append("d"),
                      defer=True)
    pump.put_and_send([("out/a", b"b", 1, False)], committed=lambda: done.append("b"))
    assert done == ["lone", "d", "b"] and _committed(path) == [b"d", b"b"]
    assert [p for p, _h in link.sent] == [b"lone", b"d", b"b"]
    box.close()


def test_a_crash_before_a_deferred_commit_acknowledges_nothing(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    box = Outbox(path, max_bytes=100_000)
    pump = OutboxPump(box, _ScriptedLink())
    done: list[str] = []
    pump.put_and_send([("out/a", b"x", 1, False)], committed=lambda: done.append("x"),
                      defer=True)
    box.close()  # the process dies here: the input was never acknowledged ...
    assert done == [] and _committed(path) == []  # ... so the broker redelivers it
    again = Outbox(path, max_bytes=100_000)
    assert again.put_many([("out/a", b"y", 1, False)]) == 1  # ids go on, none reused
    assert _committed(path) == [b"y"]
    again.close()


def test_a_deferred_answer_that_cannot_go_now_is_stored_at_once(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", max_bytes=100_000)
    link = _ScriptedLink()
    link.connected = False
    pump = OutboxPump(box, link)
    done: list[str] = []
    pump.put_and_send([("out/a", b"x", 1, False)], committed=lambda: done.append("x"),
                      defer=True)
    # Not on the wire: the pump sends it from the disk later, so it is there now.
    assert done == ["x"] and box.depth() == 1 and link.sent == []
    box.close()


def test_the_pump_thread_commits_what_was_deferred(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", max_bytes=100_000)
    pump = OutboxPump(box, _ScriptedLink(), commit_delay=0.005)
    pump.start()
    done: list[str] = []
    try:
        for i in range(5):
            pump.put_and_send([("out/a", f"m:{i}".encode(), 1, False)],
                              committed=lambda i=i: done.append(f"m:{i}"), defer=True)
            time.sleep(0.02)  # alone: nothing else turns the pump
        assert wait_until(lambda: len(done) == 5, 5)
        assert done == [f"m:{i}" for i in range(5)] and box.depth() == 5
    finally:
        pump.stop()
    box.close()
