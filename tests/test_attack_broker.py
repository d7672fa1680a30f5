"""Issue 6.8 (the part tests/test_broker_configs.py does not already prove): with the
broker's ACLs deliberately off (an anonymous Mosquitto anyone may write to), a rogue client
injects manifests on the real retained topics; the real agent, connected over MQTT, refuses
each by signature or sequence, reports it, and keeps serving the genuine model.

Already proven elsewhere, not duplicated: anonymous and plaintext clients refused, TLS, a
device can neither publish manifests nor read another device's topics
(tests/test_broker_configs.py, shipped plant config with per-device ACLs).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.faults import OTHER_KEY, ROOT, Gateway, release
from tests.support.publisher import Collector, Publisher, wait_until


@pytest.fixture
def agent_on_broker(tmp_path: Path, broker: Any) -> Iterator[tuple[Any, Publisher, Collector]]:
    gw = Gateway(tmp_path, port=broker.port)  # writes the config; the Agent below runs it
    gw.close()
    from edge_agent.agent import Agent
    from edge_agent.config import load_config

    agent = Agent(load_config(tmp_path / "agent.toml"))
    agent.start()
    sync = Publisher(broker.port)  # registry_sync's client
    col = Collector(broker.port, f"{ROOT}/devices/gw-1/#")
    yield agent, sync, col
    agent.stop(timeout=3)
    sync.close()
    col.close()


def _deploy(pub: Publisher, rel: Any) -> None:
    for cid, data in rel.chunks():
        pub.publish(pub.topics.chunk(cid), data)
    pub.manifest("line-1", "pump", rel.wire)


def _wait_code(col: Collector, code: str, count: int = 1) -> dict[str, Any]:
    assert wait_until(lambda: len(col.events(code)) >= count, 20), [
        e.get("code") for e in col.events()
    ]
    return col.events(code)[count - 1]


def test_rogue_manifests_with_acls_off_are_refused_by_signature_and_sequence(
    agent_on_broker: tuple[Any, Publisher, Collector], broker: Any
) -> None:
    agent, sync, col = agent_on_broker
    v1, v2 = release(1), release(2)
    _deploy(sync, v1)
    _wait_code(col, "activated")
    _deploy(sync, v2)
    _wait_code(col, "activated", 2)
    assert agent.engine.current("pump").sha256 == v2.sha256

    rogue = Publisher(broker.port)  # anonymous, no ACL stops it
    try:
        # 1. its own key, a huge sequence, its own chunks
        _deploy(rogue, release(9, sequence=10**6, key=OTHER_KEY))
        _wait_code(col, "unknown_key")
        # 2. the genuine v2 manifest with the version changed after signing
        doc = json.loads(v2.wire)
        doc["signed"]["sequence"] = 10**6
        rogue.manifest("line-1", "pump", json.dumps(doc).encode())
        _wait_code(col, "bad_signature")
        # 3. replays of genuine, correctly signed manifests (downgrades): one this device
        # never saw (sequence 1, an old deployment of another version), one with an equal
        # sequence, and v1 itself (already settled in this process: skipped silently)
        rogue.manifest("line-1", "pump", release(5, sequence=1).wire)
        _wait_code(col, "replayed_sequence")
        rogue.manifest("line-1", "pump", release(6, sequence=2).wire)
        _wait_code(col, "replayed_sequence", 2)
        rogue.manifest("line-1", "pump", v1.wire)
        # 4. the retained manifest deleted (empty retained payload): ignored
        rogue.publish(rogue.topics.manifest("line-1", "pump"), b"")
        # 5. garbage
        rogue.manifest("line-1", "pump", b"\x00not json")
        _wait_code(col, "malformed_manifest")
    finally:
        rogue.close()
    assert agent.engine.current("pump").sha256 == v2.sha256
    assert agent.store.accepted_sequence("line-1", "pump") == 2
    assert [e["code"] for e in col.events()].count("activated") == 2
