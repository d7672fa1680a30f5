"""Staged rollout: canary first, the next group only once the gate holds; a rollback event
on the canary halts the rollout and reverts the canary (or, with ``revert_on_failure =
false``, leaves it); a too-high error rate or a stage timeout halts it too. Devices are
simulated by publishing what the real agent publishes (docs/protocol.md section 8, the
shapes of ``edge_agent.agent``/``edge_agent.telemetry``/``edge_agent.updater``); the same
flows against real agents are tests/test_sync_agents.py."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from edge_agent.mqtt import LinkOptions, MqttLink
from lineside.cli import cli
from registry_sync.config import RolloutSettings, load_sync_config
from registry_sync.fleet import MAX_EVENTS, DeviceRecord, FleetView
from registry_sync.rollout import REFUSALS, advance, evaluate_gate, start_rollout
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

Staged = tuple[SyncService, str, MqttLink, Path]


@pytest.fixture
def make_staged(
    tmp_path: Path, broker: MosquittoBroker, registry: Registry
) -> Iterator[Callable[..., Staged]]:
    """A sync service on a two-group plan (``extra`` rollout keys appended) and a client
    that publishes as the devices."""
    opened: list[tuple[SyncService, MqttLink]] = []

    def make(extra: str = "", clock: Callable[[], float] | None = None) -> Staged:
        name = log_versions(registry, SHARED_MODEL)
        path, _keys = write_world(
            tmp_path / "sync",
            broker_url=broker.url,
            tracking_uri=registry.tracking_uri,
            model=name,
            groups=("canary", "line-1"),
            rollout=PLAN + ("\n" + extra if extra else ""),
            cache_dir=shared_cache_dir(),
        )
        service = SyncService(load_sync_config(path), **({"clock": clock} if clock else {}))
        service.connect()
        fake = MqttLink(LinkOptions(url=broker.url, client_id="fake-devices"))
        fake.start(wait=10.0)
        opened.append((service, fake))
        return service, name, fake, path

    yield make
    for service, fake in opened:
        fake.stop()
        service.close()


@pytest.fixture
def staged(make_staged: Callable[..., Staged]) -> Staged:
    return make_staged()


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


def retained_signed(broker: MosquittoBroker, group: str, model: str) -> dict[str, Any]:
    topic = f"{ROOT}/manifests/{group}/{model}"
    return dict(json.loads(read_retained(broker.url, topic)[topic])["signed"])


def agent_telemetry(model: str, version: int, rows: int, errors: dict[str, int]) -> dict[str, Any]:
    """A telemetry message as ``edge_agent.agent.Agent.telemetry_snapshot`` builds it."""
    return {
        "interval_s": 10.0,
        "models": {
            model: {
                "rows_total": rows,
                "batches_total": rows,
                "rows_per_s": rows / 10.0,
                "latency_ms": {"count": rows, "p50": 0.4, "p90": 0.9, "p99": 1.2, "max": 2.0},
                "errors_total": errors,
                "error_rate": 0.0,
                "drift": {"features": {"vibration": {"psi": 0.01, "rows": rows}}, "outputs": {}},
            }
        },
        "process": {"cpu_percent": 1.0, "rss_mb": 70.0, "disk_free_mb": 5000.0,
                    "temperature_c": None},
        "active": {model: {"model": model, "version": version, "variant": "onnx-fp32",
                           "sha256": "0" * 64}},
        "input_errors": {},
        "outbox": {"depth": 0, "bytes": 0, "dropped": 0},
        "update": {"state": "idle", "watching": []},
    }


def report_active(
    service: SyncService,
    fake: MqttLink,
    device: str,
    model: str,
    group: str,
    version: int,
    *,
    rows: int = 100,
    errors: dict[str, int] | None = None,
) -> None:
    """What an agent publishes after activating ``version`` and passing its health window:
    the update events, its state, a health event and a telemetry interval."""
    context = {"model": model, "version": version, "sequence": 0, "sha256": "0" * 64}
    for code in ("accepted", "installed", "activated"):
        publish(
            fake,
            device,
            "events",
            {"kind": "update", "code": code, "message": code, "group": group,
             "state": "idle", **context},
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
                    "desired": True,
                    "serving": True,
                }
            },
            "update": {"state": "idle", "watching": []},
        },
    )
    publish(
        fake,
        device,
        "events",
        {"kind": "health", "code": "healthy", "message": f"{model} passed its health window",
         "state": "idle", **context},
    )
    publish(fake, device, "telemetry", agent_telemetry(model, version, rows, errors or {}))
    assert seen(
        service,
        device,
        lambda r: (
            r.models.get(model, {}).get("version") == version
            and any(e.get("code") == "healthy" and e.get("version") == version for e in r.events)
            and r.telemetry.get(model) is not None
            and r.telemetry[model].version == version
        ),
    )


def report_rolled_back(fake: MqttLink, device: str, model: str, version: int, to: int) -> None:
    """The agent's event and state after its health window rolled ``version`` back."""
    publish(
        fake,
        device,
        "events",
        {
            "kind": "update",
            "code": "rolled_back",
            "model": model,
            "version": version,
            "sequence": 0,
            "sha256": "0" * 64,
            "state": "idle",
            "message": f"{model}: 25 of 25 rows gave NaN or infinite outputs",
            "reason": "25 of 25 rows gave NaN or infinite outputs",
            "to": {"model": model, "version": to},
        },
    )
    publish(
        fake,
        device,
        "state",
        {"online": True, "models": {model: {"version": to, "variant": "onnx-fp32",
                                            "sha256": "1" * 64, "sequence": 0}}},
    )


def rollout_status(path: Path) -> dict[str, Any]:
    result = CliRunner().invoke(cli, ["rollout", "status", "--config", str(path), "--json"])
    return dict(json.loads(result.output))


def roll_out_v1(service: SyncService, name: str, fake: MqttLink, path: Path) -> None:
    service.reconcile()
    report_active(service, fake, "canary-1", name, "canary", 1)
    service.reconcile()
    report_active(service, fake, "line-1-a", name, "line-1", 1)
    service.reconcile()
    status = rollout_status(path)
    assert status[name]["status"] == "complete" and status[name]["version"] == 1


def test_rollout_advances_on_healthy_canary_then_halts_on_rollback(
    staged: Staged, broker: MosquittoBroker, registry: Registry
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
        status = rollout_status(path)
        assert status[name]["status"] == "complete" and status[name]["version"] == 1

        # v2: the canary gets it, then reports a rollback -> halted, canary reverted to v1.
        registry.set_alias(name, "production", 2)
        service.reconcile()
        assert groups_with(broker, name) == {"canary": 2, "line-1": 1}
        canary_v2_seq = retained_signed(broker, "canary", name)["sequence"]
        report_active(service, fake, "canary-1", name, "canary", 2)
        report_rolled_back(fake, "canary-1", name, 2, to=1)
        assert seen(
            service, "canary-1", lambda r: any(e.get("code") == "rolled_back" for e in r.events)
        )
        service.reconcile()
        reverted = retained_signed(broker, "canary", name)
        assert reverted["version"] == 1 and reverted["sequence"] > canary_v2_seq
        assert groups_with(broker, name) == {"canary": 1, "line-1": 1}  # line-1 never got v2
        status = rollout_status(path)
        assert status[name]["status"] == "halted" and "rolled back" in status[name]["reason"]
        assert events.wait_for(lambda c: any(e.get("code") == "halted" for e in c.json()))
        assert service.reconcile().published == []  # halted stays halted, nothing re-sent
        text = CliRunner().invoke(cli, ["rollout", "status", "--config", str(path)]).output
        assert "halted" in text
    finally:
        events.stop()


def test_a_rollback_is_not_lost_among_a_flood_of_input_error_events(
    staged: Staged, broker: MosquittoBroker, registry: Registry
) -> None:
    """A canary with a bad sensor sends input-error events (up to 5 per second per code)
    after its rollback event: the gate still sees the rollback and halts the rollout."""
    service, name, fake, path = staged
    registry.set_alias(name, "production", 1)
    roll_out_v1(service, name, fake, path)
    registry.set_alias(name, "production", 2)
    service.reconcile()
    assert groups_with(broker, name) == {"canary": 2, "line-1": 1}
    report_active(service, fake, "canary-1", name, "canary", 2)
    report_rolled_back(fake, "canary-1", name, 2, to=1)
    flood = 3 * MAX_EVENTS
    for i in range(flood):
        publish(
            fake,
            "canary-1",
            "events",
            {"kind": "error", "code": "missing_field", "model": name,
             "message": f"message {i}: vibration: missing field", "reason": "missing field",
             "topic": "lineside/v1/plant/press-7", "field": "vibration"},
        )
    assert seen(
        service,
        "canary-1",
        lambda r: bool(r.events)
        and str(r.events[-1].get("message")).startswith(f"message {flood - 1}:"),
    )
    rec = service.view.snapshot()["canary-1"]
    assert all(e.get("code") == "missing_field" for e in rec.events)  # the rollback is gone
    service.reconcile()
    status = rollout_status(path)[name]
    assert status["status"] == "halted" and "rolled back" in status["reason"]
    assert retained_signed(broker, "canary", name)["version"] == 1  # the canary reverted
    assert groups_with(broker, name) == {"canary": 1, "line-1": 1}  # line-1 never got v2


def test_without_revert_on_failure_the_canary_keeps_the_halted_version(
    make_staged: Callable[..., Staged], broker: MosquittoBroker, registry: Registry
) -> None:
    service, name, fake, path = make_staged("revert_on_failure = false")
    registry.set_alias(name, "production", 1)
    roll_out_v1(service, name, fake, path)
    registry.set_alias(name, "production", 2)
    service.reconcile()
    canary_v2 = retained_signed(broker, "canary", name)
    assert canary_v2["version"] == 2
    report_active(service, fake, "canary-1", name, "canary", 2)
    report_rolled_back(fake, "canary-1", name, 2, to=1)
    assert seen(
        service, "canary-1", lambda r: any(e.get("code") == "rolled_back" for e in r.events)
    )
    report = service.reconcile()
    status = rollout_status(path)[name]
    assert status["status"] == "halted" and status["reverted"] is False
    assert "rolled back" in status["reason"]
    assert "group reverted" not in status["history"][-1]["event"]
    assert report.published == []  # nothing reverted, nothing advanced
    assert retained_signed(broker, "canary", name) == canary_v2  # the same manifest stays
    assert groups_with(broker, name) == {"canary": 2, "line-1": 1}
    assert service.reconcile().published == []


def test_error_rate_from_agent_telemetry_above_the_threshold_halts(
    staged: Staged, broker: MosquittoBroker, registry: Registry
) -> None:
    service, name, fake, path = staged
    registry.set_alias(name, "production", 1)
    roll_out_v1(service, name, fake, path)
    registry.set_alias(name, "production", 2)
    service.reconcile()
    # Active, serving and past its window, but 6 of 106 attempted rows failed (5.7% > 5%).
    # The agent's totals run on from v1's 100 rows (one process): v2's share is the rest.
    report_active(
        service, fake, "canary-1", name, "canary", 2, rows=200,
        errors={"inference": 4, "missing_field": 2},
    )
    service.reconcile()
    status = rollout_status(path)[name]
    assert status["status"] == "halted"
    assert "error rate 5.66% (6 of 106 rows) on canary is above 5.00%" in status["reason"]
    assert groups_with(broker, name) == {"canary": 1, "line-1": 1}  # reverted, line-1 kept v1


def test_a_stage_the_gate_never_holds_on_halts_at_the_stage_timeout(
    make_staged: Callable[..., Staged], broker: MosquittoBroker, registry: Registry
) -> None:
    skew = [0.0]
    service, name, _fake, path = make_staged(
        "stage_timeout_s = 60", clock=lambda: time.time() + skew[0]
    )
    registry.set_alias(name, "production", 1)
    service.reconcile()
    assert groups_with(broker, name) == {"canary": 1}
    skew[0] += 50
    service.reconcile()
    assert rollout_status(path)[name]["status"] == "in_progress"  # no device yet: hold
    skew[0] += 20
    service.reconcile()
    status = rollout_status(path)[name]
    assert status["status"] == "halted"
    assert "gate on canary did not hold within 60s (0 of 1 healthy" in status["reason"]
    # the canary carried nothing of this model before: the revert is a signed undeploy
    assert retained_signed(broker, "canary", name)["undeployed"] is True
    assert groups_with(broker, name) == {"canary": 1}  # and line-1 never got a manifest
    skew[0] += 600
    assert service.reconcile().published == []


# ---- the pure gate ------------------------------------------------------------------------


def _view(now: float, **devices: dict[str, Any]) -> dict[str, DeviceRecord]:
    """Devices of model ``m`` in the agent's message shapes. Per device: ``group``,
    ``online``, ``version`` (2), ``since`` (state received), ``rows``/``errors`` (telemetry
    totals), ``window_open`` (activated, no ``healthy`` event yet), ``degraded``."""
    view = FleetView()
    for dev, spec in devices.items():
        version = spec.get("version", 2)
        context = {"model": "m", "version": version, "sequence": 3, "sha256": "0" * 64}
        view.apply(
            dev,
            "events",
            {"kind": "update", "code": "activated", "group": spec.get("group", "canary"),
             **context},
            now - 100,
        )
        if not spec.get("window_open"):
            view.apply(dev, "events", {"kind": "health", "code": "healthy", **context}, now - 90)
        model: dict[str, Any] = {"version": version, "sequence": 3, "serving": True}
        if spec.get("degraded"):
            model["degraded"] = "3 of 20 rows gave NaN or infinite outputs"
        view.apply(
            dev,
            "state",
            {"online": spec.get("online", True), "models": {"m": model}},
            spec.get("since", now - 100),
        )
        if "rows" in spec:
            view.apply(
                dev,
                "telemetry",
                agent_telemetry("m", version, spec["rows"], {"inference": spec.get("errors", 0)}),
                now,
            )
    return view.snapshot()


SETTINGS = RolloutSettings(
    groups=("canary", "all"), min_devices=2, healthy_for_s=60, max_error_rate=0.01
)
NOW = 10_000.0


def _gate(view: dict[str, DeviceRecord], settings: RolloutSettings = SETTINGS) -> Any:
    r = start_rollout(settings, "m", 2, NOW - 200, at_once=False, previous={})
    return evaluate_gate(settings, r, view, NOW, group_sequence=None)


def test_gate_rules() -> None:
    settings, now = SETTINGS, NOW
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


def test_a_device_still_in_its_health_window_or_degraded_is_not_healthy() -> None:
    assert _gate(_view(NOW, a={}, b={})).verdict == "pass"
    gate = _gate(_view(NOW, a={}, b={"window_open": True}))
    assert gate.verdict == "hold" and gate.healthy == ("a",)
    gate = _gate(_view(NOW, a={}, b={"degraded": True}))
    assert gate.verdict == "hold" and gate.healthy == ("a",)
    gate = _gate(_view(NOW, a={}, b={"online": False}))
    assert gate.verdict == "hold" and gate.healthy == ("a",)
    gate = _gate(_view(NOW, a={}, b={"version": 1}))  # still on the old version
    assert gate.verdict == "hold" and gate.healthy == ("a",)


def test_error_rate_counts_failed_rows_among_attempted_ones() -> None:
    # 100 rows answered and 1 failed: 1 of 101 is under 1%, passes
    assert _gate(_view(NOW, a={"rows": 100, "errors": 1}, b={})).verdict == "pass"
    gate = _gate(_view(NOW, a={"rows": 100, "errors": 2}, b={}))
    assert gate.verdict == "fail" and "(2 of 102 rows)" in gate.reason
    # a version failing every row has no answered rows at all: 100%, not "no data"
    gate = _gate(_view(NOW, a={"rows": 0, "errors": 40}, b={}))
    assert gate.verdict == "fail" and gate.error_rate == 1.0
    # telemetry of another version does not count against this one
    gate = _gate(_view(NOW, a={"rows": 10, "errors": 10, "version": 1}, b={}, c={}))
    assert gate.verdict == "pass" and gate.error_rate is None


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
    view["b"].update_events.append({"code": code, "model": "m", "received": now - 300})
    view["b"].update_events.append({"code": code, "model": "other", "received": now - 1})
    assert evaluate_gate(settings, r, view, now, group_sequence=None).verdict == "pass"
    view["b"].update_events.append(
        {"code": code, "model": "m", "received": now - 1, "message": "x"}
    )
    gate = evaluate_gate(settings, r, view, now, group_sequence=None)
    assert gate.verdict == "fail" and f"device b {words} m (x)" in gate.reason


@pytest.mark.parametrize("code", sorted(REFUSALS))
def test_a_device_refusing_the_version_fails_the_gate(code: str) -> None:
    settings = RolloutSettings(groups=("canary", "all"), min_devices=1, healthy_for_s=0)
    # Every member refuses: without this the gate would wait forever (no timeout set).
    view = _view(NOW, a={"version": 1}, b={"version": 1})
    assert _gate(view, settings).verdict == "hold"
    refusal = {"kind": "update", "code": code, "model": "m", "group": "canary",
               "message": "golden inputs give other outputs", "received": NOW - 1}
    # about another version (a late word on the one this rollout replaces) or another
    # group's stream: not this stage's business
    view["a"].update_events.append({**refusal, "version": 1})
    view["a"].update_events.append({**refusal, "group": "all"})
    assert _gate(view, settings).verdict == "hold"
    view["a"].update_events.append({**refusal, "version": 2})
    gate = _gate(view, settings)
    assert gate.verdict == "fail"
    assert gate.reason == f"device a refused m v2 ({code}: golden inputs give other outputs)"


@pytest.mark.parametrize(
    "code", ["download_timeout", "chunk_hash", "file_hash", "store_error", "replayed_sequence"]
)
def test_transient_or_device_local_failures_leave_the_gate_to_the_timeout(code: str) -> None:
    settings = RolloutSettings(
        groups=("canary", "all"), min_devices=1, healthy_for_s=0, stage_timeout_s=300
    )
    view = _view(NOW, a={"version": 1})
    view["a"].update_events.append(
        {"kind": "update", "code": code, "model": "m", "group": "canary", "version": 2,
         "received": NOW - 1}
    )
    assert _gate(view, settings).verdict == "hold"  # the device may still get it right
    r = start_rollout(settings, "m", 2, NOW - 400, at_once=False, previous={})
    gate = evaluate_gate(settings, r, view, NOW, group_sequence=None)
    assert gate.verdict == "fail" and "did not hold within 300s" in gate.reason


def test_membership_by_the_groups_a_device_named_before_its_state_sequence() -> None:
    settings = RolloutSettings(groups=("canary", "all"), min_devices=1, healthy_for_s=0)
    r = start_rollout(settings, "m", 2, NOW - 200, at_once=False, previous={})
    r.stage = 1  # the gate on "all", whose stream is at sequence 3, like the canary's
    view = _view(NOW, canary={"group": "canary"})
    gate = evaluate_gate(settings, r, view, NOW, group_sequence=3)
    assert gate.members == () and gate.verdict == "hold"  # same number, another stream
    # a device the service never heard an update event from: its state's sequence decides
    silent = FleetView()
    silent.apply("quiet", "state", {"online": True, "models": {"m": {"version": 2,
                                                                     "sequence": 3}}}, NOW - 100)
    gate = evaluate_gate(settings, r, silent.snapshot(), NOW, group_sequence=3)
    assert gate.members == ("quiet",) and gate.verdict == "pass"
    assert evaluate_gate(settings, r, silent.snapshot(), NOW, group_sequence=4).members == ()
