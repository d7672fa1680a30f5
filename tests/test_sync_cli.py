"""`lineside sync run` and `lineside fleet watch` as an operator runs them: real
subprocesses against a real MLflow store and a real Mosquitto."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from edge_agent.mqtt import LinkOptions, MqttLink
from tests.support.broker import MosquittoBroker
from tests.support.device_sim import log_versions, read_retained, shared_cache_dir, write_world
from tests.support.registry import Registry

ROOT = "lineside/v1"


def _lineside(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "lineside.cli", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_sync_run_deploys_a_promotion_and_stops_cleanly_on_sigterm(
    tmp_path: Path, broker: MosquittoBroker, registry: Registry, model_name: str
) -> None:
    log_versions(registry, model_name, count=1)
    path, _keys = write_world(
        tmp_path,
        broker_url=broker.url,
        tracking_uri=registry.tracking_uri,
        model=model_name,
        cache_dir=shared_cache_dir(),
    )
    registry.set_alias(model_name, "production", 1)
    env = dict(os.environ, MLFLOW_TRACKING_URI=registry.tracking_uri)
    proc = _lineside("sync", "run", "--config", str(path), cwd=tmp_path, env=env)
    try:
        deadline = time.monotonic() + 90
        manifest = None
        while time.monotonic() < deadline and manifest is None:
            retained = read_retained(broker.url, f"{ROOT}/manifests/#", client_id="t-sync-run")
            manifest = retained.get(f"{ROOT}/manifests/line-1/{model_name}")
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.3)
        assert manifest is not None, "sync run never published the manifest"
        signed = json.loads(manifest)["signed"]
        assert signed["model"] == model_name and signed["version"] == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out[-2000:]


def test_fleet_watch_shows_a_live_table_until_interrupted(
    tmp_path: Path, broker: MosquittoBroker, registry: Registry, model_name: str
) -> None:
    path, _keys = write_world(
        tmp_path, broker_url=broker.url, tracking_uri=registry.tracking_uri, model=model_name
    )
    # one device's retained state, as an agent publishes it (docs/protocol.md section 8.1)
    state = {
        "device": "press-9",
        "online": True,
        "ts": time.time(),
        "models": {
            model_name: {"version": 4, "variant": "onnx-fp32", "sha256": "ab" * 32, "sequence": 7}
        },
    }
    link = MqttLink(LinkOptions(url=broker.url, client_id="press-9-state"))
    link.start(wait=10)
    try:
        topic = f"{ROOT}/devices/press-9/state"
        assert link.publish(topic, json.dumps(state).encode(), qos=1, retain=True).wait(5)
    finally:
        link.stop()
    env = dict(os.environ, COLUMNS="160")
    proc = _lineside(
        "fleet", "watch", "--config", str(path), "--interval", "0.3", cwd=tmp_path, env=env
    )
    time.sleep(6)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert "press-9" in out, out[-2000:]
    assert model_name[:12] in out
    assert proc.returncode in (0, 130), out[-2000:]


def test_fleet_status_shows_a_silent_device_offline_after_offline_after_s(
    tmp_path: Path, broker: MosquittoBroker, registry: Registry, model_name: str
) -> None:
    """A broker that lost a gateway's will keeps its last retained "online": with
    ``[fleet].offline_after_s`` the CLI shows it offline once it has been silent that long."""
    from click.testing import CliRunner

    from lineside.cli import cli

    now = time.time()
    link = MqttLink(LinkOptions(url=broker.url, client_id="silent-states"))
    link.start(wait=10)
    try:
        for device, ts in (("press-gone", now - 3600), ("press-here", now - 5)):
            state = {"device": device, "online": True, "ts": ts, "models": {}}
            topic = f"{ROOT}/devices/{device}/state"
            assert link.publish(topic, json.dumps(state).encode(), qos=1, retain=True).wait(5)
    finally:
        link.stop()

    def rows(where: str, fleet: str) -> dict[str, dict[str, object]]:
        path, _keys = write_world(
            tmp_path / where,
            broker_url=broker.url,
            tracking_uri=registry.tracking_uri,
            model=model_name,
            fleet=fleet,
        )
        args = ["fleet", "status", "--config", str(path), "--json", "--wait", "0.5"]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
        return {r["device"]: r for r in json.loads(result.output)["devices"]}

    trusting = rows("trusting", "")  # default 0: the retained state is all there is to go by
    assert trusting["press-gone"]["online"] is True and trusting["press-here"]["online"] is True
    strict = rows("strict", "offline_after_s = 60")
    assert strict["press-gone"]["online"] is False and strict["press-gone"]["stale"] is True
    assert strict["press-here"]["online"] is True and strict["press-here"]["stale"] is False
    table = CliRunner().invoke(
        cli,
        ["fleet", "status", "--config", str(tmp_path / "strict" / "sync.toml"), "--wait", "0.3"],
        env={"COLUMNS": "200"},
    )
    assert "no (silent)" in table.output, table.output
