"""The fleet monitor: device state, telemetry and events into the fleet view, MLflow
deployment history (tags + a run per (model version, device): first publish per group,
when each device ran which version, runs ended when a device leaves a version, latency
percentiles and errors by kind), drift alerts, and ``lineside fleet status --json``."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from edge_agent.mqtt import LinkOptions, MqttLink
from lineside.cli import cli
from registry_sync.config import load_sync_config
from registry_sync.history import EXPERIMENT, iso
from registry_sync.service import SyncService
from tests.support.broker import MosquittoBroker
from tests.support.device_sim import (
    SHARED_MODEL,
    Collector,
    SimDevice,
    log_versions,
    shared_cache_dir,
    write_world,
)
from tests.support.registry import Registry

ROOT = "lineside/v1"


def test_fleet_monitor_writes_history_metrics_and_drift(
    tmp_path: Path, broker: MosquittoBroker, registry: Registry
) -> None:
    name = log_versions(registry, SHARED_MODEL)
    marker = tmp_path / "drift-alert.json"
    command = [
        sys.executable,
        "-c",
        f"import sys; open({str(marker)!r}, 'w').write(sys.stdin.read())",
    ]
    path, keys = write_world(
        tmp_path / "sync",
        broker_url=broker.url,
        tracking_uri=registry.tracking_uri,
        model=name,
        cache_dir=shared_cache_dir(),
        fleet=f"drift_psi_threshold = 0.25\ndrift_command = {json.dumps(command)}",
    )
    service = SyncService(load_sync_config(path))
    service.connect()
    events = Collector(broker.url, f"{ROOT}/sync/events", "fleet-events")
    dev = SimDevice(
        broker.url,
        "press-7",
        groups=("line-1",),
        device_class="sim-class",
        keys=keys,
        root=ROOT,
        workdir=tmp_path / "dev",
        report=True,
    )
    telemetry = MqttLink(LinkOptions(url=broker.url, client_id="press-7-telemetry"))
    telemetry.start(wait=10.0)
    try:
        registry.set_alias(name, "production", 1)
        service.reconcile()
        dev.start()
        assert dev.wait_for(lambda d: d.version(name) == 1), dev.rejected

        for i, psi in enumerate((0.05, 0.4)):  # the second one crosses the threshold
            # the agent's telemetry shape, docs/protocol.md section 8.3 (running totals)
            body = {
                "ts": time.time(),
                "device": "press-7",
                "interval_s": 10.0,
                "models": {
                    name: {
                        "rows_total": 500 * (i + 1),
                        "rows_per_s": 50.0,
                        "errors_total": {"missing_field": i + 1},
                        "latency_ms": {"count": 500, "p50": 0.4, "p99": 2.5},
                        "drift": {
                            "features": {"vibration": {"psi": psi, "rows": 500}},
                            "outputs": {"label": {"psi": 0.01, "rows": 500}},
                        },
                    }
                },
                "active": {name: {"model": name, "version": 1, "variant": "onnx-fp32"}},
                "process": {"rss_mb": 70.0, "cpu_percent": 10.0},
            }
            telemetry.publish(f"{ROOT}/devices/press-7/telemetry", json.dumps(body), 1).wait(5)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            rec = service.view.snapshot().get("press-7")
            if (
                rec
                and rec.online
                and rec.telemetry.get(name)
                and rec.telemetry[name].psi.get("vibration") == 0.4
            ):
                break
            time.sleep(0.05)
        # The drift tag is queued before the alert event goes out; the pass writes it
        # (an MLflow call on the MQTT network thread could stall the link).
        assert events.wait_for(
            lambda c: any(e.get("code") == "psi_above_threshold" for e in c.json())
        )
        service.reconcile()  # writes live_on, the queued drift tag, and flushes metrics

        client = registry.client()
        tags = client.get_model_version(name, "1").tags
        assert tags["lineside.deployed.line-1"].startswith("20")  # ISO time
        assert tags["lineside.live_on"] == "press-7"
        assert "vibration psi=0.400" in tags["lineside.drift.press-7"]
        exp = client.get_experiment_by_name(EXPERIMENT)
        (run,) = client.search_runs(
            [exp.experiment_id], filter_string="tags.`lineside.device` = 'press-7'"
        )
        assert run.data.tags["lineside.model"] == name and run.data.tags["lineside.version"] == "1"
        assert run.data.tags["lineside.variant"] == "onnx-fp32"
        assert run.data.metrics["latency_p99_ms"] == 2.5
        assert run.data.metrics["throughput_rows_per_s"] == 50.0
        assert run.data.metrics["psi.vibration"] == 0.4
        assert run.data.metrics["error_rate"] == 0.002
        history = client.get_metric_history(run.info.run_id, "psi.vibration")
        assert [m.value for m in history] == [0.05, 0.4]

        deadline = time.monotonic() + 10
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert json.loads(marker.read_text())["feature"] == "vibration"
    finally:
        telemetry.stop()
        dev.stop()
        events.stop()
        service.close()

    result = CliRunner().invoke(
        cli, ["fleet", "status", "--config", str(path), "--json", "--wait", "0.5"]
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["devices"]
    (row,) = [r for r in rows if r["device"] == "press-7"]
    assert row["model"] == name and row["version"] == 1 and row["variant"] == "onnx-fp32"
    assert row["p99_ms"] == 2.5 and row["drift_max_psi"] == 0.4
    table = CliRunner().invoke(cli, ["fleet", "status", "--config", str(path), "--wait", "0.2"])
    assert "fleet (1 devices)" in table.output and "press" in table.output


def test_malformed_device_messages_are_dropped() -> None:
    from registry_sync.fleet import FleetView

    view = FleetView()
    view.apply("d", "telemetry", {"models": {"m": "nope"}}, 1.0)
    view.apply("d", "state", {"online": True, "models": {"m": {"version": 3}}}, 2.0)
    rec: Any = view.snapshot()["d"]
    assert rec.models == {"m": {"version": 3}} and rec.active_since["m"] == [3, 2.0]


def _publish(link: MqttLink, device: str, channel: str, body: dict[str, Any]) -> None:
    topic = f"{ROOT}/devices/{device}/{channel}"
    assert link.publish(topic, json.dumps(body), 1, channel == "state").wait(5)


def _wait(service: SyncService, device: str, check: Any) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        rec = service.view.snapshot().get(device)
        if rec is not None and check(rec):
            return
        time.sleep(0.02)
    raise AssertionError(f"the service never saw the expected message from {device}")


def test_history_says_which_version_ran_where_from_when_to_when(
    tmp_path: Path, broker: MosquittoBroker, registry: Registry
) -> None:
    name = log_versions(registry, SHARED_MODEL)
    group, device = "hist-line", "hist-press-1"  # used by no other test: tags start empty
    path, _keys = write_world(
        tmp_path / "sync",
        broker_url=broker.url,
        tracking_uri=registry.tracking_uri,
        model=name,
        groups=(group,),
        cache_dir=shared_cache_dir(),
    )
    now = [time.time() + 1000.0]  # the service's clock; devices stamp their own times
    service = SyncService(load_sync_config(path), clock=lambda: now[0])
    service.connect()
    agent = MqttLink(LinkOptions(url=broker.url, client_id="hist-agent"))
    agent.start(wait=10.0)
    client = registry.client()

    def tags(version: int) -> dict[str, str]:
        return dict(client.get_model_version(name, str(version)).tags)

    def run_of(version: int) -> Any:
        exp = client.get_experiment_by_name(EXPERIMENT)
        (run,) = client.search_runs(
            [exp.experiment_id],
            filter_string=(
                f"tags.`lineside.device` = '{device}' and tags.`lineside.version` = '{version}'"
            ),
        )
        return run

    def runs(version: int, ts: float) -> None:
        _publish(
            agent,
            device,
            "state",
            {"device": device, "online": True, "ts": ts, "models": {name: {"version": version}}},
        )
        _wait(service, device, lambda r: r.models.get(name, {}).get("version") == version)

    live = f"lineside.live.{device}"
    try:
        registry.set_alias(name, "production", 1)
        first_publish = now[0]
        service.reconcile()
        assert tags(1)[f"lineside.deployed.{group}"] == iso(first_publish)

        t1 = time.time() - 60
        runs(1, t1)
        body = {  # the agent's telemetry (edge_agent.telemetry, docs/protocol.md 8.3)
            "ts": t1 + 10,
            "device": device,
            "interval_s": 10.0,
            "models": {
                name: {
                    "rows_total": 400,
                    "rows_per_s": 40.0,
                    "latency_ms": {"count": 90, "p50": 0.4, "p90": 0.9, "p99": 1.9, "max": 3.1},
                    "errors_total": {"missing_field": 3, "schema": 1},
                    "drift": None,
                }
            },
            "active": {name: {"model": name, "version": 1, "variant": "onnx-fp32"}},
        }
        _publish(agent, device, "telemetry", body)
        _wait(service, device, lambda r: name in r.telemetry and r.telemetry[name].max_ms == 3.1)
        now[0] += 100
        service.reconcile()
        assert tags(1)[live] == f"{iso(t1)}..now"
        run1 = run_of(1)
        assert run1.info.status == "RUNNING"
        metrics = run1.data.metrics
        assert metrics["latency_p90_ms"] == 0.9 and metrics["latency_max_ms"] == 3.1
        assert metrics["errors.missing_field"] == 3 and metrics["errors.schema"] == 1
        assert metrics["errors"] == 4 and metrics["error_rate"] == 0.01

        # v2 goes out; the device runs it from t2: v1's interval and run end at t2.
        registry.set_alias(name, "production", 2)
        now[0] += 100
        v2_publish = now[0]
        service.reconcile()
        t2 = time.time() - 30
        runs(2, t2)
        service.reconcile()
        assert tags(1)[live] == f"{iso(t1)}..{iso(t2)}"
        assert tags(2)[live] == f"{iso(t2)}..now"
        run1 = run_of(1)
        assert run1.info.status == "FINISHED" and run1.info.end_time == int(t2 * 1000)

        # Rolled back to v1: re-published, but v1 first went live on the group earlier.
        registry.set_alias(name, "production", 1)
        now[0] += 100
        assert [p["version"] for p in service.reconcile().published] == [1]
        assert tags(1)[f"lineside.deployed.{group}"] == iso(first_publish)
        assert tags(2)[f"lineside.deployed.{group}"] == iso(v2_publish)
        t3 = time.time() - 5
        runs(1, t3)
        service.reconcile()
        assert tags(1)[live] == f"{iso(t1)}..{iso(t2)}, {iso(t3)}..now"
        assert tags(2)[live] == f"{iso(t2)}..{iso(t3)}"
        assert run_of(1).info.status == "RUNNING"  # it runs v1 again
        assert service.reconcile().published == []
        assert tags(1)[live] == f"{iso(t1)}..{iso(t2)}, {iso(t3)}..now"
    finally:
        agent.stop()
        service.close()
        registry.set_alias(name, "production", 1)

    # A restarted service keeps the intervals (live.json): the retained state it reads
    # again does not reopen or move anything.
    service = SyncService(load_sync_config(path), clock=lambda: now[0])
    assert service.history.ledger.running[name][device] == [1, t3]
    service.connect()
    try:
        time.sleep(0.5)  # let the retained state arrive (it must change nothing)
        service.reconcile()
        assert service.history.ledger.running[name][device] == [1, t3]
        assert tags(1)[live] == f"{iso(t1)}..{iso(t2)}, {iso(t3)}..now"
    finally:
        service.close()


def test_live_ledger_intervals_and_retained_liveness() -> None:
    from registry_sync.fleet import FleetView, with_offline_after
    from registry_sync.history import LiveLedger

    ledger = LiveLedger()
    assert ledger.observe("m", "d", 1, 100.0)
    assert not ledger.observe("m", "d", 1, 150.0)  # the same version again: no change
    assert ledger.observe("m", "d", 2, 200.0)
    assert ledger.value(("m", 1, "d")) == f"{iso(100.0)}..{iso(200.0)}"
    assert ledger.value(("m", 2, "d")) == f"{iso(200.0)}..now"
    dirty, ended, started = ledger.take()
    assert dirty == {("m", 1, "d"), ("m", 2, "d")}
    assert ended == {("m", 1, "d"): 200.0} and started == {("m", 2, "d")}
    ledger.give_back(set(), {}, started)  # the reopen could not be written: kept
    assert ledger.observe("m", "d", None, 300.0)  # the model left the device entirely
    copy = LiveLedger()
    copy.load(json.loads(json.dumps(ledger.to_json())))
    assert copy.value(("m", 2, "d")) == f"{iso(200.0)}..{iso(300.0)}"
    assert copy.ended == {("m", 2, "d"): 300.0} and copy.started == set()
    assert copy.running == {"m": {}}

    view = FleetView()
    # A retained "online" handed out at 5000 was published at 1000: heard from at 1000.
    view.apply("old", "state", {"online": True, "ts": 1000.0}, 5000.0, retained=True)
    view.apply("new", "state", {"online": True, "ts": 4990.0}, 5000.0)
    devices = with_offline_after(view.snapshot(), 5000.0, 60.0)
    assert devices["old"].online is False and devices["new"].online is True
    assert with_offline_after(view.snapshot(), 5000.0, 0.0)["old"].online is True
    view.apply("old", "telemetry", {"models": {}}, 5001.0)  # it speaks again
    assert with_offline_after(view.snapshot(), 5001.0, 60.0)["old"].online is True


def test_a_new_version_counts_only_the_rows_and_errors_since_it_became_active(
    tmp_path: Path, broker: MosquittoBroker, registry: Registry
) -> None:
    """The agent's totals are per process: after it switches versions they still hold the
    old version's rows and errors, which must not be charged to the new version."""
    name = log_versions(registry, SHARED_MODEL)
    device = "delta-press-1"
    path, _keys = write_world(
        tmp_path / "sync",
        broker_url=broker.url,
        tracking_uri=registry.tracking_uri,
        model=name,
        cache_dir=shared_cache_dir(),
    )
    service = SyncService(load_sync_config(path))
    service.connect()
    agent = MqttLink(LinkOptions(url=broker.url, client_id="delta-agent"))
    agent.start(wait=10.0)

    def interval(version: int, rows: int, errors: dict[str, int]) -> None:
        body = {  # the agent's telemetry (edge_agent.telemetry, docs/protocol.md 8.3)
            "ts": time.time(),
            "device": device,
            "interval_s": 10.0,
            "models": {
                name: {
                    "rows_total": rows,
                    "latency_ms": {"count": rows, "p50": 0.4, "p99": 1.0, "max": float(rows)},
                    "errors_total": errors,
                }
            },
            "active": {name: {"model": name, "version": version, "variant": "onnx-fp32"}},
        }
        _publish(agent, device, "telemetry", body)
        _wait(service, device, lambda r: r.telemetry.get(name, None) is not None
              and r.telemetry[name].max_ms == float(rows))

    try:
        interval(1, 400, {"missing_field": 3})
        interval(1, 600, {"missing_field": 4, "schema": 1})
        v1 = service.view.snapshot()[device].telemetry[name]
        assert (v1.version, v1.rows, v1.errors) == (1, 600, 5)
        # The same process activates v2: its totals go on from 600 rows and 5 errors.
        interval(2, 650, {"missing_field": 6, "schema": 1})
        v2 = service.view.snapshot()[device].telemetry[name]
        assert (v2.version, v2.rows, v2.errors) == (2, 50, 2)
        assert (v2.last_rows, v2.last_errors) == (50, 2)
        assert v2.last_error_kinds == {"missing_field": 2, "schema": 0}
        interval(2, 750, {"missing_field": 6, "schema": 2})
        v2 = service.view.snapshot()[device].telemetry[name]
        assert (v2.rows, v2.errors, v2.last_rows) == (150, 3, 100)
        # A restarted agent (totals back near zero) on v1 again: all of it is v1's.
        interval(1, 30, {"missing_field": 1})
        v1 = service.view.snapshot()[device].telemetry[name]
        assert (v1.version, v1.rows, v1.errors) == (1, 30, 1)
    finally:
        agent.stop()
        service.close()


def test_input_error_floods_do_not_push_out_update_and_health_events() -> None:
    from registry_sync.fleet import MAX_EVENTS, DeviceRecord, FleetView

    view = FleetView()
    context = {"model": "m", "version": 2, "group": "canary"}
    view.apply("d", "events", {"kind": "update", "code": "activated", **context}, 1.0)
    view.apply("d", "events", {"kind": "health", "code": "healthy", **context}, 2.0)
    for i in range(3 * MAX_EVENTS):  # a bad sensor: 5 per second per code, for a while
        view.apply("d", "events", {"kind": "error", "code": "missing_field", "model": "m"},
                   3.0 + i / 5)
    rec = view.snapshot()["d"]
    assert len(rec.events) == MAX_EVENTS
    assert {e["code"] for e in rec.events} == {"missing_field"}
    assert [e["code"] for e in rec.update_events] == ["activated", "healthy"]
    # A fleet snapshot saved before the lists were split still gives the gate its events.
    old = rec.to_json()
    del old["update_events"]
    old["events"] = [{"kind": "update", "code": "rolled_back"}, *old["events"][-3:]]
    assert [e["code"] for e in DeviceRecord.from_json(old).update_events] == ["rolled_back"]
