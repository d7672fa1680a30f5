"""Issue 6.6: store-and-forward while the broker is down, on a real Mosquitto.

The agent (real ``Agent``: engine, outbox, pump, MQTT link) serves a model from disk; the
broker is SIGKILLed; sensor messages keep coming in on the gateway side (``engine.submit``,
what the local MQTT callback calls) and the agent is restarted several times during the
outage (stop + a new process object on the same state directory; the ``kill -9`` durability
of accepted outbox entries is proven by tests/test_outbox.py and the power-loss test). Then
the broker comes back and a persistent consumer receives the backlog.

Below capacity: every prediction arrives (dedupe by ``(device, seq)``, at-least-once), in
order per device, none lost. At capacity (``outbox_max_bytes`` at its 64 KiB minimum): the
documented policy, drop-oldest: what arrives is exactly the newest contiguous tail, the
outbox never exceeds its cap, and the dropped count is in telemetry.

Counts: 5,000 predictions and 2 restarts by default; 100,000 and 20 restarts under
``-m slow`` (plus an RSS check), same code. The issue's 10-minute outage with a kill every
30 s is the slow variant's shape compressed in time (the outage lasts as long as producing
takes); see docs/faults.md.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.faults import FEATURES, ROOT, Gateway, release
from tests.support.publisher import Collector, wait_until

TOPIC = "plant/line1/a/sensors"


def _config(tmp_path: Path, port: int, outbox_max_bytes: int | None) -> Path:
    gw = Gateway(tmp_path, port=port)
    gw.deliver(release(1))
    gw.close()
    cfg = tmp_path / "agent.toml"
    if outbox_max_bytes is not None:
        text = cfg.read_text().replace(
            "[limits]\n", f"[limits]\noutbox_max_bytes = {outbox_max_bytes}\n"
        )
        cfg.write_text(text)
    return cfg


def _start(cfg: Path) -> Any:
    from edge_agent.agent import Agent
    from edge_agent.config import load_config

    agent = Agent(load_config(cfg))
    agent.start()
    return agent


def _produce(agent: Any, start: int, n: int) -> None:
    base = agent.engine.answered
    for i in range(start, start + n):
        body = {f: (i % 97) * 0.01 + k for k, f in enumerate(FEATURES)}
        agent.engine.submit(TOPIC, json.dumps({**body, "id": f"m{i}"}).encode())
        if i % 500 == 0:  # the gateway's sensors do not outrun the engine unboundedly
            assert wait_until(lambda: agent.engine.pending() < 2000, 30)
    assert wait_until(lambda: agent.engine.answered - base >= n, 60), (
        "engine stalled",
        agent.engine.answered - base,
        n,
        agent.engine.pending(),
        dict(agent.input_errors),
        agent.outbox.depth(),
    )


def _rss_mb() -> float:
    import psutil

    return float(psutil.Process().memory_info().rss) / 2**20


@pytest.mark.parametrize(
    ("count", "restarts"),
    [pytest.param(5_000, 2, id="5k"), pytest.param(100_000, 20, id="100k", marks=pytest.mark.slow)],
)
def test_outage_below_capacity_loses_nothing_and_keeps_order(
    tmp_path: Path, broker: Any, count: int, restarts: int
) -> None:
    broker.restart(persistence=True)
    cfg = _config(tmp_path, broker.port, None)
    col = Collector(broker.port, f"{ROOT}/devices/gw-1/predictions", client_id="outage-consumer")
    agent = _start(cfg)
    assert wait_until(lambda: agent.link.connected, 20)
    broker.stop(sig=signal.SIGKILL)  # the outage starts
    assert wait_until(lambda: not agent.link.connected, 20)
    per = count // (restarts + 1)
    rss: list[float] = []
    produced = 0
    for phase in range(restarts + 1):
        n = per if phase < restarts else count - produced
        _produce(agent, produced, n)
        produced += n
        rss.append(_rss_mb())
        cap = agent.config.limits.outbox_max_bytes
        assert agent.outbox.bytes() <= cap
        if phase < restarts:
            agent.stop(timeout=3)
            agent = _start(cfg)
    assert agent.outbox.depth() >= count  # everything waited on disk
    broker.start()
    try:

        def received() -> int:
            return len({p["seq"] for p in col.on("/predictions")})

        assert wait_until(lambda: received() >= count, 60 + count / 500), (received(), count)
        preds = col.on("/predictions")
        firsts: dict[int, dict[str, Any]] = {}
        for p in preds:
            firsts.setdefault(p["seq"], p)
        seqs = list(firsts)
        assert seqs == sorted(seqs), "order per device broken"
        ids = [p["source"]["id"] for p in firsts.values()]
        assert ids == [f"m{i}" for i in range(count)], "a prediction is missing or reordered"
        assert wait_until(lambda: agent.outbox.depth() == 0, 30)
        assert agent.outbox.dropped() == 0
        if count >= 50_000:  # slow run: memory does not grow with the backlog
            assert max(rss) - rss[len(rss) // 4] < 30, rss
    finally:
        agent.stop(timeout=3)
        col.close()


def test_outage_at_capacity_drops_exactly_the_oldest_and_counts_them(
    tmp_path: Path, broker: Any
) -> None:
    broker.restart(persistence=True)
    cap = 65_536
    cfg = _config(tmp_path, broker.port, cap)
    col = Collector(broker.port, f"{ROOT}/devices/gw-1/predictions", client_id="cap-consumer")
    agent = _start(cfg)
    assert wait_until(lambda: agent.link.connected, 20)
    broker.stop(sig=signal.SIGKILL)
    assert wait_until(lambda: not agent.link.connected, 20)
    count = 2_000  # about 10x the cap
    for start in range(0, count, 250):
        _produce(agent, start, 250)
        assert agent.outbox.bytes() <= cap
    dropped = agent.outbox.dropped()
    kept = agent.outbox.depth()
    assert dropped > 0 and dropped + kept >= count
    snapshot = agent.telemetry_snapshot(1.0)
    assert snapshot["outbox"]["dropped"] == dropped and snapshot["outbox"]["bytes"] <= cap
    broker.start()
    try:
        assert wait_until(lambda: agent.outbox.depth() == 0, 60)
        time.sleep(0.5)
        ids = [int(p["source"]["id"][1:]) for p in col.on("/predictions")]
        unique = list(dict.fromkeys(ids))
        # drop-oldest: what survives is the newest contiguous run, in order
        assert unique == list(range(unique[0], count)), unique[:5]
        assert unique[0] > 0
    finally:
        agent.stop(timeout=3)
        col.close()
