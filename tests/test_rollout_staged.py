"""Staged rollout: canary first, the next group only once the gate holds; a rollback event
on the canary halts the rollout and reverts the canary. Devices are simulated by
publishing the protocol's state and events payloads (docs/protocol.md section 8)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from edge_agent.mqtt import LinkOptions, MqttLink
from lineside.cli import cli
from registry_sync.config import RolloutSettings, load_sync_config
from registry_sync.fleet import DeviceRecord, FleetView
from registry_sync.rollout import advance, evaluate_gate, start_rollout
from registry_sync.service import SyncService
from tests.support.broker import MosquittoBroker
from tests.support.device_sim import (
    SHARED_MODEL,
    Collector,
    log_versions,
    read_retained,
    shared_cache_dir,
    write_world,
)
from tests.support.registry import Registry

ROOT = "lineside/v1"
PLAN = 'groups = ["canary", "line-1"]\nmin_devices = 1\nhealthy_for_s = 0\nmax_error_rate = 0.05'


@pytest.fixture
def staged(tmp_path: Path, broker: MosquittoBroker, registry: Registry) -> Iterator[Any]:
    name = log_versions(registry, SHARED_MODEL)
    path, _keys = write_world(
        tmp_path / "sync",
        broker_url=broker.url,
        tracking_uri=registry.tracking_uri,
        model=name,
        groups=("canary", "line-1"),
        rollout=PLAN,
        cache_dir=shared_cache_dir(),
    )
    service = SyncService(load_sync_config(path))
    service.connect()
    fake = MqttLink(LinkOptions(url=broker.url, client_id="fake-devices"))
    fake.start(wait=10.0)
    yield service, name, fake, path
    fake.stop()
    service.close()


def publish(link: MqttLink, device: str, channel: str, body: dict[str, Any]) -> None:
    body = {"ts": time.time(), "device": device, **body}
    link.publish(
        f"{ROOT}/devices/{device}/{channel}", json.dumps(body), qos=1, retain=channel == "state"
    ).wait(5.0)


def seen(service: SyncService, device: str, check: Any) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        rec = service.view.snapshot().get(device)
        if rec is not None and check(rec):
            return True
        time.sleep(0.02)
    return False


def groups_with(broker: MosquittoBroker, model: str) -> dict[str, int]:
    out = {}
    for topic, payload in read_retained(broker.url, f"{ROOT}/manifests/#").items():
        signed = json.loads(payload)["signed"]
        if signed["model"] == model:
            out[topic.split("/")[-2]] = signed["version"]
    return out


def report_active(
    service: SyncService, fake: MqttLink, device: str, model: str, group: str, version: int
) -> None:
    publish(
        fake,
        device,
        "events",
        {"kind": "update", "code": "activated", "model": model, "group": group},
    )
    publish(
        fake,
        device,
        "state",
        {
            "online": True,
            "models": {
                model: {
                    "version": version,
                    "variant": "onnx-fp32",
                    "sha256": "0" * 64,
                    "sequence": 0,
                }
            },
        },
    )
    publish(
        fake,
        device,
        "telemetry",
        {
            "interval_s": 10.0,
            "models": {
                model: {
                    "version": version,
                    "rows": 100,
                    "errors": 0,
                    "latency_ms": {"p50": 0.4, "p99": 1.2},
                    "psi": {"vibration": 0.01},
                }
            },
        },
    )
    assert seen(
        service,
        device,
        lambda r: (
            r.models.get(model, {}).get("version") == version
            and r.telemetry.get(model) is not None
            and r.telemetry[model].version == version
        ),
    )


def test_rollout_advances_on_healthy_canary_then_halts_on_rollback(
    staged: Any, broker: MosquittoBroker, registry: Registry
) -> None:
    service, name, fake, path = staged
    events = Collector(broker.url, f"{ROOT}/sync/events", "rollout-events")
    try:
        registry.set_alias(name, "production", 1)
        service.reconcile()
        assert groups_with(broker, name) == {"canary": 1}  # line-1 waits for the gate
        service.reconcile()
        assert groups_with(broker, name) == {"canary": 1}  # no device reported yet: hold

        report_active(service, fake, "canary-1", name, "canary", 1)
        service.reconcile()
        assert groups_with(broker, name) == {"canary": 1, "line-1": 1}
        report_active(service, fake, "line-1-a", name, "line-1", 1)
        service.reconcile()
        status = json.loads(
            CliRunner().invoke(cli, ["rollout", "status", "--config", str(path), "--json"]).output
        )
        assert status[name]["status"] == "complete" and status[name]["version"] == 1

        # v2: the canary gets it, then reports a rollback -> halted, canary reverted to v1.
        registry.set_alias(name, "production", 2)
        service.reconcile()
        assert groups_with(broker, name) == {"canary": 2, "line-1": 1}
        canary_v2_seq = json.loads(
            read_retained(broker.url, f"{ROOT}/manifests/canary/{name}")[
                f"{ROOT}/manifests/canary/{name}"
            ]
        )["signed"]["sequence"]
        report_active(service, fake, "canary-1", name, "canary", 2)
        publish(
            fake,
            "canary-1",
            "events",
            {
                "kind": "update",
                "code": "rolled_back",
                "model": name,
                "group": "canary",
                "message": "golden check failed",
            },
        )
        assert seen(
            service, "canary-1", lambda r: any(e.get("code") == "rolled_back" for e in r.events)
        )
        service.reconcile()
        reverted = json.loads(
            read_retained(broker.url, f"{ROOT}/manifests/canary/{name}")[
                f"{ROOT}/manifests/canary/{name}"
            ]
        )["signed"]
        assert reverted["version"] == 1 and reverted["sequence"] > canary_v2_seq
        assert groups_with(broker, name) == {"canary": 1, "line-1": 1}  # line-1 never got v2
        status = json.loads(
            CliRunner().invoke(cli, ["rollout", "status", "--config", str(path), "--json"]).output
        )
        assert status[name]["status"] == "halted" and "rolled back" in status[name]["reason"]
        assert events.wait_for(lambda c: any(e.get("code") == "halted" for e in c.json()))
        assert service.reconcile().published == []  # halted stays halted, nothing re-sent
        text = CliRunner().invoke(cli, ["rollout", "status", "--config", str(path)]).output
        assert "halted" in text
    finally:
        events.stop()


# ---- the pure gate ------------------------------------------------------------------------


def _view(now: float, **devices: dict[str, Any]) -> dict[str, DeviceRecord]:
    view = FleetView()
    for dev, spec in devices.items():
        view.apply(
            dev,
            "events",
            {
                "kind": "update",
                "code": "activated",
                "model": "m",
                "group": spec.get("group", "canary"),
            },
            now - 100,
        )
        view.apply(
            dev,
            "state",
            {
                "online": spec.get("online", True),
                "models": {"m": {"version": spec.get("version", 2)}},
            },
            spec.get("since", now - 100),
        )
        if "rows" in spec:
            view.apply(
                dev,
                "telemetry",
                {  # the agent's telemetry shape (docs/protocol.md section 8.3)
                    "interval_s": 10,
                    "models": {
                        "m": {
                            "rows_total": spec["rows"],
                            "errors_total": {"inference": spec.get("errors", 0)},
                        }
                    },
                    "active": {"m": {"model": "m", "version": 2}},
                },
                now,
            )
    return view.snapshot()


def test_gate_rules() -> None:
    settings = RolloutSettings(
        groups=("canary", "all"), min_devices=2, healthy_for_s=60, max_error_rate=0.01
    )
    now = 10_000.0
    r = start_rollout(settings, "m", 2, now - 200, at_once=False, previous={})
    gate = evaluate_gate(
        settings, r, _view(now, a={}, b={"since": now - 10}), now, group_sequence=None
    )
    assert gate.verdict == "hold"  # b is not healthy for 60 s yet
    gate = evaluate_gate(settings, r, _view(now, a={}, b={}), now, group_sequence=None)
    assert gate.verdict == "pass"
    gate = evaluate_gate(
        settings, r, _view(now, a={"rows": 100, "errors": 5}, b={}), now, group_sequence=None
    )
    assert gate.verdict == "fail" and "error rate" in gate.reason
    gate = evaluate_gate(
        settings, r, _view(now, a={}, b={"group": "other"}), now, group_sequence=None
    )
    assert gate.verdict == "hold" and gate.members == ("a",)
    assert advance(
        settings,
        r,
        evaluate_gate(settings, r, _view(now, a={}, b={}), now, group_sequence=None),
        now,
    )
    assert r.stage == 1 and r.live_groups() == ["canary", "all"]
    rollback = start_rollout(settings, "m", 1, now, at_once=True, previous={})
    assert rollback.status == "complete"


@pytest.mark.parametrize(
    ("code", "words"),
    [
        ("rolled_back", "rolled back"),
        ("update_stalled", "stalled updating"),
        ("rollback_unavailable", "failed its health window (no previous version) on"),
    ],
)
def test_gate_fails_on_a_condemning_update_event(code: str, words: str) -> None:
    settings = RolloutSettings(groups=("canary", "all"), min_devices=1, healthy_for_s=0)
    now = 10_000.0
    r = start_rollout(settings, "m", 2, now - 200, at_once=False, previous={})
    view = _view(now, a={}, b={})
    assert evaluate_gate(settings, r, view, now, group_sequence=None).verdict == "pass"
    # the same event from before the stage began, or about another model, does not count
    view["b"].events.append({"code": code, "model": "m", "received": now - 300})
    view["b"].events.append({"code": code, "model": "other", "received": now - 1})
    assert evaluate_gate(settings, r, view, now, group_sequence=None).verdict == "pass"
    view["b"].events.append({"code": code, "model": "m", "received": now - 1, "message": "x"})
    gate = evaluate_gate(settings, r, view, now, group_sequence=None)
    assert gate.verdict == "fail" and f"device b {words} m (x)" in gate.reason
