"""MqttLink against a real Mosquitto: acks with timeouts, reconnects, guarded callbacks,
the retained offline will, persistent sessions and the loop watchdog."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edge_agent.errors import BrokerError
from edge_agent.mqtt import Backoff, LinkOptions, Message, MqttLink, parse_broker_url
from tests.support.broker import MosquittoBroker

REPO = Path(__file__).resolve().parents[1]


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
        link = MqttLink(LinkOptions(url=url, client_id=client_id, **options))  # type: ignore[arg-type]
        made.append(link)
        return link

    yield make
    for link in made:
        link.stop(timeout=2.0)


def collector(link: MqttLink, topic_filter: str) -> list[Message]:
    got: list[Message] = []
    link.subscribe(topic_filter, got.append)
    return got


def test_parse_broker_url() -> None:
    assert parse_broker_url("mqtt://10.0.0.5:1883") == (False, "10.0.0.5", 1883)
    assert parse_broker_url("mqtts://broker.plant") == (True, "broker.plant", 8883)
    assert parse_broker_url("mqtts://[::1]:8884") == (True, "::1", 8884)
    for bad in ("foo", "http://x:1", "mqtt://:1883", "mqtt://h:99999", "mqtt://h:1/x"):
        with pytest.raises(ValueError):
            parse_broker_url(bad)


def test_backoff_grows_with_jitter_and_stays_bounded() -> None:
    backoff = Backoff(0.5, 4.0)
    delays = [backoff.next() for _ in range(10)]
    assert 0.25 <= delays[0] <= 0.5
    assert all(d <= 4.0 for d in delays)
    assert max(delays[5:]) >= 2.0
    backoff.reset()
    assert backoff.next() <= 0.5


def test_publish_qos1_is_acked_and_wait_has_a_timeout(broker: MosquittoBroker, links) -> None:  # type: ignore[no-untyped-def]
    link = links(broker.url, "dev-ack")
    link.start(wait=10)
    sock = link._client.socket()
    assert sock is not None
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)  # no Nagle delay
    handle = link.publish("t/ack", b"hello", qos=1)
    assert handle.wait(5.0)
    # Freeze the broker: the PUBACK cannot come, the wait returns False in time.
    os.kill(broker.pid, signal.SIGSTOP)  # type: ignore[arg-type]
    try:
        frozen = link.publish("t/ack", b"frozen", qos=1)
        assert not frozen.wait(0.3)
    finally:
        os.kill(broker.pid, signal.SIGCONT)  # type: ignore[arg-type]
    assert frozen.wait(5.0)


def test_publish_while_disconnected_raises_broker_error(broker: MosquittoBroker, links) -> None:  # type: ignore[no-untyped-def]
    link = links(broker.url, "dev-offline")
    with pytest.raises(BrokerError):
        link.publish("t/x", b"x")
    with pytest.raises(BrokerError):
        links(broker.url, "dev-qos2").publish("t/x", b"x", qos=2)


def test_refused_credentials_raise_broker_error(broker: MosquittoBroker, links) -> None:  # type: ignore[no-untyped-def]
    broker.restart(passwords={"dev": "right"})
    link = links(broker.url, "dev-auth", username="dev", password="wrong")
    with pytest.raises(BrokerError, match=r"refused|cannot connect"):
        link.start(wait=3)
    good = links(broker.url, "dev-auth2", username="dev", password="right")
    good.start(wait=10)
    assert good.publish("t/x", b"x").wait(5)


def test_missing_client_certificate_is_named_in_the_connect_error(tmp_path: Path, links) -> None:  # type: ignore[no-untyped-def]
    # With TLS 1.3 the broker's "certificate required" alert arrives after the handshake,
    # on the first read; paho only logs it. The error must still say what went wrong.
    from tests.support.broker import running_broker

    with running_broker(tmp_path / "mtls", tls=True, require_certificate=True) as b:
        assert b.tls_files is not None
        link = links(b.url, "dev-no-cert", ca=b.tls_files.ca_cert)
        with pytest.raises(BrokerError, match=r"(?i)TLS alert from the broker: .*certificate"):
            link.start(wait=5)
        cert, key = b.tls_files.client_pair("dev-cert")
        good = links(b.url, "dev-cert", ca=b.tls_files.ca_cert, cert=cert, key=key)
        good.start(wait=10)
        assert good.publish("t/x", b"x").wait(5)


def test_reconnects_after_broker_restart(broker: MosquittoBroker, links) -> None:  # type: ignore[no-untyped-def]
    link = links(broker.url, "dev-reconnect", backoff_initial=0.1, backoff_max=1.0)
    got = collector(link, "t/back")
    link.start(wait=10)
    broker.restart()
    assert wait_until(lambda: link.stats["connects"] >= 2 and link.connected, 15)
    assert link.stats["disconnects"] >= 1
    # The subscription was renewed on reconnect (the broker had no persistence).
    assert link.publish("t/back", b"again").wait(5)
    assert wait_until(lambda: [m.payload for m in got] == [b"again"], 5)


def test_callback_exception_does_not_kill_the_loop(broker: MosquittoBroker, links) -> None:  # type: ignore[no-untyped-def]
    link = links(broker.url, "dev-callbacks")
    seen: list[bytes] = []

    def flaky(message: Message) -> None:
        seen.append(message.payload)
        if message.payload == b"boom":
            raise RuntimeError("handler bug")

    link.subscribe("t/flaky", flaky)
    link.start(wait=10)
    first = link.publish("t/flaky", b"boom")
    first.on_ack(lambda _h: 1 / 0)  # type: ignore[func-returns-value]
    assert first.wait(5)
    assert link.publish("t/flaky", b"fine").wait(5)
    assert wait_until(lambda: seen == [b"boom", b"fine"], 5)
    assert link.stats["handler_errors"] == 1
    assert link.healthy()


def test_watchdog_reports_a_stalled_loop_and_never_runs_a_second_one(
    broker: MosquittoBroker, links
) -> None:  # type: ignore[no-untyped-def]
    link = links(broker.url, "dev-stall", stall_timeout=0.5, watchdog_interval=0.1)
    link.start(wait=10)
    release = threading.Event()
    real_loop = link._client.loop
    stalled = threading.Event()
    inside = 0
    most_inside = 0
    lock = threading.Lock()

    def counted_loop(timeout: float = 1.0):  # type: ignore[no-untyped-def]
        nonlocal inside, most_inside
        with lock:
            inside += 1
            most_inside = max(most_inside, inside)
        try:
            if not stalled.is_set():
                stalled.set()
                release.wait(30)  # a network loop stuck inside paho or a handler
            return real_loop(timeout)
        finally:
            with lock:
                inside -= 1

    link._client.loop = counted_loop  # type: ignore[method-assign]
    try:
        assert wait_until(lambda: link.stats["loop_stalls"] >= 1, 10)
        assert not link.healthy()
        assert link.stats["loop_restarts"] == 0
    finally:
        release.set()
    # once it moves again it is healthy, and no two loops ever ran paho at once
    assert wait_until(link.healthy, 10)
    assert link.publish("t/after-stall", b"x").wait(5)
    assert most_inside == 1


def test_watchdog_restarts_a_dead_loop(broker: MosquittoBroker, links) -> None:  # type: ignore[no-untyped-def]
    link = links(broker.url, "dev-dead", watchdog_interval=0.1)
    link.start(wait=10)
    thread = link._thread
    link._generation += 1  # the running loop sees a newer generation and exits: it "dies"
    assert thread is not None
    thread.join(5)
    assert not thread.is_alive()
    assert wait_until(lambda: link.stats["loop_restarts"] >= 1, 10)
    assert wait_until(link.healthy, 10)
    assert link.publish("t/after-death", b"x").wait(5)


_WILL_CHILD = textwrap.dedent(
    """
    import sys, time
    from edge_agent.mqtt import LinkOptions, MqttLink
    link = MqttLink(LinkOptions(url=sys.argv[1], client_id="dev-will",
                                state_topic="lineside/devices/dev-will/state", keepalive=5))
    link.start(wait=10)
    print("ready", flush=True)
    time.sleep(60)
    """
)


def test_will_shows_offline_when_the_process_is_killed(broker: MosquittoBroker, links) -> None:  # type: ignore[no-untyped-def]
    watcher = links(broker.url, "watcher")
    states = collector(watcher, "lineside/devices/+/state")
    watcher.start(wait=10)
    child = subprocess.Popen(
        [sys.executable, "-c", _WILL_CHILD, broker.url],
        cwd=REPO,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == b"ready"
        assert wait_until(lambda: any(json.loads(m.payload)["online"] for m in states), 10)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
    assert wait_until(lambda: not json.loads(states[-1].payload)["online"], 10)
    # Retained: a newcomer sees the device offline too.
    late = links(broker.url, "late-watcher")
    late_states = collector(late, "lineside/devices/dev-will/state")
    late.start(wait=10)
    assert wait_until(lambda: bool(late_states), 5)
    assert late_states[0].retain and json.loads(late_states[0].payload)["online"] is False


def test_persistent_session_receives_qos1_sent_while_offline(
    broker: MosquittoBroker,
    links,  # type: ignore[no-untyped-def]
) -> None:
    first = links(broker.url, "dev-session")
    collector(first, "cmd/dev-session")
    first.start(wait=10)
    first.stop()
    sender = links(broker.url, "sender")
    sender.start(wait=10)
    for i in range(5):
        assert sender.publish("cmd/dev-session", f"m{i}".encode(), qos=1).wait(5)
    again = links(broker.url, "dev-session")
    got = collector(again, "cmd/dev-session")
    again.start(wait=10)
    assert wait_until(lambda: len(got) >= 5, 10)
    assert [m.payload for m in got] == [f"m{i}".encode() for i in range(5)]


def test_tls_with_client_certificate(tmp_path: Path, links) -> None:  # type: ignore[no-untyped-def]
    from tests.support.broker import running_broker

    with running_broker(tmp_path / "tls", tls=True, require_certificate=True) as tls_broker:
        assert tls_broker.tls_files is not None
        cert, key = tls_broker.tls_files.client_pair("dev-tls")
        link = links(tls_broker.url, "dev-tls", ca=tls_broker.tls_files.ca_cert, cert=cert, key=key)
        link.start(wait=10)
        assert link.publish("t/tls", b"x").wait(5)
        no_cert = links(tls_broker.url, "dev-nocert", ca=tls_broker.tls_files.ca_cert)
        with pytest.raises(BrokerError):
            no_cert.start(wait=2)


def test_handlers_follow_subscription_changes_despite_the_route_cache(
    broker: MosquittoBroker, links
) -> None:  # type: ignore[no-untyped-def]
    link = links(broker.url, "dev-routes")
    wide = collector(link, "r/#")
    link.start(wait=10)
    sender = links(broker.url, "dev-routes-tx")
    sender.start(wait=10)
    assert sender.publish("r/a", b"1", qos=1).wait(5.0)
    assert wait_until(lambda: len(wide) >= 1)  # "r/a" -> [wide] is now cached
    narrow = collector(link, "r/+")  # a new subscription must reach the cached topic

    def send_until(payload: bytes, done: Callable[[], bool]) -> bool:
        # The SUBSCRIBE/UNSUBSCRIBE and the sender's PUBLISH travel on two connections:
        # keep sending until the change shows (ordering only, nothing timed).
        return wait_until(lambda: bool(sender.publish("r/a", payload, qos=1)) and done())

    assert send_until(b"2", lambda: b"2" in [m.payload for m in narrow])
    assert b"2" in [m.payload for m in wide]  # both handlers of the topic ran
    link.unsubscribe("r/#")
    before = len(wide)
    assert send_until(b"3", lambda: b"3" in [m.payload for m in narrow])
    assert b"3" not in [m.payload for m in wide[before:]]


def test_a_handler_may_publish_and_flush_on_the_network_thread(
    broker: MosquittoBroker,
    links,  # type: ignore[no-untyped-def]
) -> None:
    # paho calls on_publish for a written QoS 0 message under the lock it already holds
    # around on_message: a flush from inside a handler used to hang the loop for good.
    link = links(broker.url, "flusher")
    out = collector(link, "echo/out")
    flushed: list[bool] = []

    def echo(message: Message) -> None:
        link.publish("echo/out", message.payload, qos=0)
        flushed.append(link.flush())

    link.subscribe("echo/in", echo)
    link.start(wait=10)
    sender = links(broker.url, "echo-sender")
    sender.start(wait=10)
    for i in range(20):
        assert sender.publish("echo/in", f"e{i}".encode(), qos=1).wait(5)
    assert wait_until(lambda: len(out) >= 20, 10), f"{len(out)} echoes: the loop hung"
    assert any(flushed) and link.healthy()


def test_a_flush_from_another_thread_never_waits_for_a_busy_callback(
    broker: MosquittoBroker,
    links,  # type: ignore[no-untyped-def]
) -> None:
    # Found by bench_agent under a burst: the batch worker flushed (holding the outbox
    # lock) while a QoS 0 message was queued and the network thread was inside a
    # handler that needed the outbox lock. Writing the QoS 0 message made paho take its
    # callback lock, held by that handler: both threads hung for good.
    link = links(broker.url, "busy-callback")
    telemetry = collector(link, "busy/telemetry")
    entered, release = threading.Event(), threading.Event()

    def busy(_message: Message) -> None:
        entered.set()
        release.wait(10)

    link.subscribe("busy/in", busy)
    link.start(wait=10)
    sender = links(broker.url, "busy-sender")
    sender.start(wait=10)
    sender.publish("busy/in", b"x", qos=1)
    assert entered.wait(10)
    flushed: list[bool] = []

    def worker() -> None:
        link.publish("busy/telemetry", b"t", qos=0)  # queued: the loop is in a callback
        flushed.append(link.flush())

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    thread.join(5)
    hung = thread.is_alive()
    release.set()
    assert not hung, "flush waited for the network thread's callback"
    assert flushed == [False]  # left to the network thread ...
    assert wait_until(lambda: len(telemetry) == 1, 10)  # ... which wrote it afterwards
    assert link.healthy()


def test_manual_ack_holds_back_the_puback_until_ack(
    broker: MosquittoBroker,
    links,  # type: ignore[no-untyped-def]
) -> None:
    held: list[Message] = []
    receiver = links(broker.url, "manual-acker")
    receiver.subscribe("work/in", held.append, ack="manual")
    receiver.start(wait=10)
    receiver.stop()  # persistent session: the broker queues for it from now on
    sender = links(broker.url, "manual-sender")
    sender.start(wait=10)
    for i in range(3):
        assert sender.publish("work/in", f"w{i}".encode(), qos=1).wait(5)

    # Not acknowledged: the broker delivers them again to the next connection.
    first = links(broker.url, "manual-acker")
    first.subscribe("work/in", held.append, ack="manual")
    first.start(wait=10)
    assert wait_until(lambda: len(held) >= 3, 10)
    first.stop()
    held.clear()
    second = links(broker.url, "manual-acker")
    got: list[Message] = []
    second.subscribe("work/in", got.append, ack="manual")
    second.start(wait=10)
    assert wait_until(lambda: len(got) >= 3, 10)
    assert [m.payload for m in got] == [b"w0", b"w1", b"w2"]
    assert all(second.ack(m) for m in got)
    time.sleep(0.3)  # the PUBACKs reach the broker
    second.stop()

    # Acknowledged: nothing comes back.
    third = links(broker.url, "manual-acker")
    again: list[Message] = []
    third.subscribe("work/in", again.append, ack="manual")
    third.start(wait=10)
    time.sleep(1.0)
    assert again == []
    # an ack for a message of an earlier connection is not sent on the new one
    assert sender.publish("work/in", b"w3", qos=1).wait(5)
    assert wait_until(lambda: len(again) == 1, 10)
    broker.restart()
    assert wait_until(lambda: third.stats["connects"] >= 2 and third.connected, 20)
    assert not third.ack(again[0]) and third.stats["stale_acks"] == 1


def test_ack_many_sends_every_puback_and_only_those(
    broker: MosquittoBroker,
    links,  # type: ignore[no-untyped-def]
) -> None:
    _ack_many_round_trip(lambda cid: links(broker.url, cid))


def test_ack_many_over_tls_wakes_the_network_thread_to_write(
    tmp_path: Path,
    links,  # type: ignore[no-untyped-def]
) -> None:
    # On TLS only the network thread may write: the acks are queued and it is woken.
    from tests.support.broker import running_broker

    with running_broker(tmp_path / "tls", tls=True, require_certificate=True) as tls_broker:
        files = tls_broker.tls_files
        assert files is not None

        def make(cid: str) -> MqttLink:
            cert, key = files.client_pair(cid)
            link: MqttLink = links(tls_broker.url, cid, ca=files.ca_cert, cert=cert, key=key)
            return link

        _ack_many_round_trip(make)


def _ack_many_round_trip(make: Callable[[str], MqttLink]) -> None:
    """The coalesced PUBACK write: of 40 held messages the 30 acknowledged in three
    ``ack_many`` calls (from a thread other than the network thread) never come back,
    the 10 others do, in order. (The broker keeps at most 20 unacknowledged in flight,
    so each call also lets the next messages through.)"""
    first = make("many-acker")
    first.subscribe("work/many", lambda _m: None, ack="manual")
    first.start(wait=10)
    first.stop()
    sender = make("many-sender")
    sender.start(wait=10)
    for i in range(40):
        sender.publish("work/many", f"m{i}".encode(), qos=1)
    assert wait_until(lambda: sender.in_flight() == 0, 10)

    got: list[Message] = []
    second = make("many-acker")
    second.subscribe("work/many", got.append, ack="manual")
    second.start(wait=10)
    for start in (0, 10, 20):
        assert wait_until(lambda: len(got) >= start + 10, 10)  # noqa: B023
        assert second.ack_many(got[start : start + 10]) == 10
    assert wait_until(lambda: len(got) == 40, 10)
    assert [m.payload for m in got] == [f"m{i}".encode() for i in range(40)]
    time.sleep(0.3)  # the PUBACKs reach the broker
    second.stop()

    again: list[Message] = []
    third = make("many-acker")
    third.subscribe("work/many", again.append, ack="manual")
    third.start(wait=10)
    assert wait_until(lambda: len(again) >= 10, 10)
    time.sleep(0.5)
    assert [m.payload for m in again] == [f"m{i}".encode() for i in range(30, 40)]


def test_auto_ack_subscription_is_acknowledged_after_its_handler(
    broker: MosquittoBroker,
    links,  # type: ignore[no-untyped-def]
) -> None:
    receiver = links(broker.url, "auto-acker")
    got = collector(receiver, "auto/in")
    receiver.start(wait=10)
    sender = links(broker.url, "auto-sender")
    sender.start(wait=10)
    assert sender.publish("auto/in", b"a", qos=1).wait(5)
    assert wait_until(lambda: len(got) == 1, 10)
    receiver.stop()
    again = links(broker.url, "auto-acker")
    more = collector(again, "auto/in")
    again.start(wait=10)
    time.sleep(1.0)
    assert more == []  # acknowledged on receipt: not redelivered


def test_read_ahead_keeps_packets_intact_across_buffer_boundaries(
    broker: MosquittoBroker,
    links,  # type: ignore[no-untyped-def]
) -> None:
    # Small messages arrive many to one recv(); a large one spans several 64 KiB reads;
    # sizes around the read-ahead boundary split a packet header between two reads.
    receiver = links(broker.url, "reader")
    got = collector(receiver, "bulk/#")
    receiver.start(wait=10)
    sender = links(broker.url, "bulk-sender", max_inflight=1000)
    sender.start(wait=10)
    sizes = [1, 7, 200, 65_530, 65_536, 65_541, 300_000] + [40 + i % 90 for i in range(600)]
    payloads = [bytes([i % 251]) * size for i, size in enumerate(sizes)]
    handles = [sender.publish(f"bulk/{i}", p, qos=1) for i, p in enumerate(payloads)]
    assert all(h.wait(20) for h in handles)
    assert wait_until(lambda: len(got) >= len(payloads), 20), len(got)
    assert [m.topic for m in got] == [f"bulk/{i}" for i in range(len(payloads))]
    assert [m.payload for m in got] == payloads
    assert receiver.healthy()
