"""Issue 6.7: broker and network faults at exact packets (tests/support/scripted_broker.py),
against the real agent (``Agent`` with its ``MqttLink`` and paho).

- connection cut right after CONNECT, three times: the agent reconnects within its backoff
  bound (Backoff(0.5 s, 30 s), equal jitter: at most 0.5 + 1 + 2 + 4 s of waiting, asserted
  with a generous 12 s) and then updates;
- cut after the agent's PUBLISH reached the broker but before its PUBACK: the outbox resends
  it after the reconnect (at-least-once) and empties;
- cut in the middle of a chunk: after the reconnect the download resumes: only chunks not
  yet received are subscribed to again, and the model activates;
- a chunk trickled over 3 s (60 s under ``-m slow``): the update completes, the link stays
  healthy (watchdog), nothing waits without a timeout (the test itself is bounded).

Mosquitto restarted with persistence on and off: tests/test_agent_stream.py,
tests/test_mqtt_link.py, tests/test_outbox.py and tests/test_fault_outage.py.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.faults import Gateway, Release, release
from tests.support.publisher import wait_until
from tests.support.scripted_broker import ScriptedBroker

ROOT = "lineside"


@pytest.fixture
def sb() -> Iterator[ScriptedBroker]:
    b = ScriptedBroker()
    yield b
    b.close()


def _retain(b: ScriptedBroker, rel: Release) -> None:
    for cid, data in rel.chunks():
        b.retained[f"{ROOT}/chunks/{cid}"] = data
    b.retained[f"{ROOT}/manifests/line-1/pump"] = rel.wire


@contextlib.contextmanager
def _agent(tmp_path: Path, port: int, **config: Any) -> Iterator[Any]:
    """A started in-process agent on the scripted broker, stopped however the test ends."""
    gw = Gateway(tmp_path, port=port, **config)
    gw.close()
    from edge_agent.agent import Agent
    from edge_agent.config import load_config

    agent = Agent(load_config(tmp_path / "agent.toml"))
    agent.start()
    try:
        yield agent
    finally:
        agent.stop(timeout=3)


def _serving(agent: Any) -> str | None:
    cur = agent.engine.current("pump")
    return None if cur is None else str(cur.sha256)


def test_cut_after_connect_reconnects_within_backoff_bound(
    sb: ScriptedBroker, tmp_path: Path
) -> None:
    v1 = release(1)
    _retain(sb, v1)
    sb.cut_after_connect = 3
    t0 = time.monotonic()
    with _agent(tmp_path, sb.port) as agent:
        assert wait_until(lambda: agent.link.connected, 20)
        took = time.monotonic() - t0
        assert [e for e, _ in sb.log].count("cut") == 3
        assert took <= 12.0, f"reconnected after {took:.1f}s"
        assert wait_until(lambda: _serving(agent) == v1.sha256, 20)
        assert agent.link.healthy()


def test_cut_before_puback_is_resent_from_the_outbox(sb: ScriptedBroker, tmp_path: Path) -> None:
    v1 = release(1)
    _retain(sb, v1)
    sb.cut_before_puback = {"/events"}  # the first event the agent publishes
    with _agent(tmp_path, sb.port) as agent:
        assert wait_until(lambda: _serving(agent) == v1.sha256, 30)
        assert wait_until(lambda: agent.outbox.depth() == 0, 30)
        cut = [d for e, d in sb.log if e == "cut"]
        assert len(cut) == 1 and cut[0].endswith("/events")
        events = [p for t, p in sb.received if t.endswith("/events")]
        first = events[0]
        assert events.count(first) >= 2, "the unacknowledged event was not resent"
        assert agent.link.healthy()


def test_cut_mid_chunk_resumes_from_the_missing_chunks(sb: ScriptedBroker, tmp_path: Path) -> None:
    v1 = release(1)
    _retain(sb, v1)
    chunk_ids = [cid for cid, _ in v1.chunks()]
    target = sorted(chunk_ids)[3]  # the agent subscribes in sorted order
    sb.cut_mid_publish = {target}
    with _agent(tmp_path, sb.port) as agent:
        assert wait_until(lambda: _serving(agent) == v1.sha256, 30)
        cut_at = next(i for i, (e, _) in enumerate(sb.log) if e == "cut")
        # chunks the agent had verified and written (it unsubscribes each one it has)
        before = {
            d.rsplit("/", 1)[1]
            for e, d in sb.log[:cut_at]
            if e == "unsubscribe" and "/chunks/" in d
        }
        again = {
            d.rsplit("/", 1)[1] for e, d in sb.log[cut_at:] if e == "subscribe" and "/chunks/" in d
        }
        assert before and target not in before
        assert target in again and not (before & again), "received chunks were fetched again"
        assert agent.link.healthy()


@pytest.mark.parametrize(
    "seconds", [pytest.param(3.0, id="3s"), pytest.param(60.0, id="60s", marks=pytest.mark.slow)]
)
def test_trickled_chunk_completes_and_the_loop_stays_alive(
    sb: ScriptedBroker, tmp_path: Path, seconds: float
) -> None:
    v1 = release(1)
    _retain(sb, v1)
    sb.trickle = (v1.chunks()[2][0], seconds)
    with _agent(tmp_path, sb.port, deadline_s=seconds * 3 + 30) as agent:
        deadline = time.monotonic() + seconds + 30
        while _serving(agent) != v1.sha256:
            assert time.monotonic() < deadline, "update did not complete"
            assert agent.link.healthy(), "network loop dead or stalled during the trickle"
            time.sleep(0.2)
        assert ("trickle", f"{ROOT}/chunks/{v1.chunks()[2][0]}") in sb.log
