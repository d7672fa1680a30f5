"""The fleet monitor: device state, telemetry and events into the fleet view, MLflow
deployment history (tags + a run per (model version, device)), drift alerts, and
``lineside fleet status --json``."""

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
from registry_sync.history import EXPERIMENT
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
        service.reconcile()  # writes live_on and flushes metrics

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

        assert events.wait_for(
            lambda c: any(e.get("code") == "psi_above_threshold" for e in c.json())
        )
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
