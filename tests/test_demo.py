"""The README's first promise: `lineside demo` runs the whole loop and exits 0."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("broker", ["mosquitto", "amqtt"])
def test_demo_runs_every_step_headless(tmp_path: Path, broker: str) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lineside.cli",
            "demo",
            "--headless",
            "--duration",
            "20",
            "--workdir",
            str(tmp_path / "demo"),
            "--broker",
            broker,
        ],
        capture_output=True,
        text=True,
        timeout=420,
        check=False,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert f"MQTT broker: {broker}" in out
    for step in (
        "agent pulled, verified and activated press-anomaly v1",
        "agent hot-swapped to press-anomaly v2",
        "agent refused the broken v3",
        "device still serving press-anomaly v2",
        "none dropped",
        "recorded in MLflow",
        "every step happened",
    ):
        assert step in out, out[-3000:]
    assert "FAIL" not in out
    assert "mlflow ui --backend-store-uri sqlite:///" in out
    # every process the demo started (broker, agent, sync) is gone
    workdir = str(tmp_path / "demo")
    leftovers = [
        cmd for cmd in _command_lines() if workdir in cmd and "pytest" not in cmd
    ]
    assert leftovers == []


def _command_lines() -> list[str]:
    lines = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            raw = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        lines.append(raw.replace(b"\0", b" ").decode(errors="replace"))
    return lines
