"""The demo's live view and final summary, rendered from a realistic device snapshot.

The snapshot is what the demo's monitor receives over MQTT during a run: the agent's
state, telemetry, events and predictions (flat and grouped) in the wire format of
docs/protocol.md section 8, fed through ``Monitor.handle`` as the MQTT callback does.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from lineside.demo.command import SUMMARY_FILE, Demo, Steps
from lineside.demo.files import DEVICE_ID
from lineside.demo.monitor import Monitor
from lineside.demo.view import LiveView

ROOT = f"lineside/devices/{DEVICE_ID}"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _send(monitor: Monitor, channel: str, body: dict[str, Any]) -> None:
    monitor.handle(f"{ROOT}/{channel}", json.dumps(body).encode())


def _state(anomaly: int, quality: int = 1) -> dict[str, Any]:
    return {
        "device": DEVICE_ID,
        "online": True,
        "ts": 1764000123.5,
        "models": {
            "press-anomaly": {"version": anomaly, "variant": "onnx-int8", "sha256": "ab" * 32,
                              "sequence": anomaly},
            "press-quality": {"version": quality, "variant": "onnx-int8", "sha256": "cd" * 32,
                              "sequence": quality},
        },
    }


def _grouped(model: str, version: int, first: int, n: int, anomalous: set[int]) -> dict[str, Any]:
    """One grouped predictions message answering sensor messages first..first+n-1."""
    batch = []
    for i in range(first, first + n):
        press = f"press-{i % 3 + 1}"
        label = -1 if i in anomalous else 1
        batch.append({
            "seq": i,
            "source": {"topic": f"plant/line1/press/{press}/sensors", "id": f"m-{i}"},
            "rows": 1,
            "outputs": {"label": [label]} if model == "press-anomaly"
            else {"label": [0], "probabilities": [[0.9, 0.1]]},
        })
    return {"ts": 1764000123.5, "device": DEVICE_ID, "model": model, "version": version,
            "variant": "onnx-int8", "sha256": "ab" * 32, "latency_ms": 0.4 + version / 10,
            "batch": batch}


def _telemetry() -> dict[str, Any]:
    def model(rows: int, p50: float, p99: float, psi: float) -> dict[str, Any]:
        return {"rows_total": rows, "batches_total": rows // 2, "rows_per_s": 20.0,
                "latency_ms": {"count": rows // 2, "p50": p50, "p90": p99 / 2, "p99": p99,
                               "max": p99 * 2},
                "errors_total": {}, "error_rate": 0.0,
                "drift": {"features": {"vibration": {"psi": psi, "rows": rows},
                                       "temperature": {"psi": psi / 4, "rows": rows}},
                          "outputs": {"label": {"psi": 0.01, "rows": rows,
                                                "fractions": [0.1, 0.9, 0.0]}}}}

    return {"ts": 1764000123.5, "device": DEVICE_ID, "interval_s": 2.0,
            "models": {"press-anomaly": model(900, 0.21, 0.93, 0.31),
                       "press-quality": model(900, 0.12, 0.47, 0.05)},
            "process": {"cpu_percent": 12.5, "rss_mb": 71.2, "disk_free_mb": 5120.0,
                        "temperature_c": None},
            "active": {}, "input_errors": {},
            "outbox": {"depth": 7, "bytes": 5120, "dropped": 0},
            "update": {"state": "idle", "watching": []}}


def _event(code: str, version: int, message: str, kind: str = "update") -> dict[str, Any]:
    return {"ts": 1764000123.5, "device": DEVICE_ID, "kind": kind, "code": code,
            "message": message, "model": "press-anomaly", "version": version,
            "group": "line-1"}


def _snapshot(clock: Clock) -> Monitor:
    """A run: v1 of both deployed at 10 s, anomaly v2 swapped in at 30 s, v3 refused at
    40 s; the last 5 s carried 100 anomaly and 50 quality predictions."""
    monitor = Monitor("mqtt://127.0.0.1:1", started=990.0, clock=clock)  # never connected
    clock.now = 1000.0
    _send(monitor, "state", _state(1))
    _send(monitor, "events", _event("activated", 1, "press-anomaly v1 activated"))
    clock.now = 1010.0
    # v1 answered messages 0-59, v2 messages 60-159
    _send(monitor, "predictions", _grouped("press-anomaly", 1, 0, 60, {3, 4}))
    clock.now = 1020.0
    _send(monitor, "state", _state(2))
    _send(monitor, "events", _event("activated", 2, "press-anomaly v2 activated"))
    clock.now = 1030.0
    _send(monitor, "events", _event("golden_mismatch", 3, "golden outputs do not match"))
    _send(monitor, "state", _state(2))  # republished after the refusal: no change
    _send(monitor, "telemetry", _telemetry())
    _send(monitor, "predictions", _grouped("press-quality", 1, 0, 100, set()))
    clock.now = 1036.0
    _send(monitor, "predictions", _grouped("press-anomaly", 2, 60, 99, {61, 62, 64, 65, 67}))
    flat = _grouped("press-anomaly", 2, 159, 1, set())
    flat |= flat.pop("batch")[0]  # the flat form of a lone prediction
    _send(monitor, "predictions", flat)
    _send(monitor, "predictions", _grouped("press-quality", 1, 100, 50, set()))
    clock.now = 1040.0
    return monitor


class FakeDemo:
    """What the view reads from the running demo: ``monitor`` and ``steps``."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor
        self.steps = Steps(headless=False)
        self.steps.say("ok", "MQTT broker: mosquitto on mqtt://127.0.0.1:1883")
        self.steps.say("ok", "agent hot-swapped to press-anomaly v2")


def _rows(text: str) -> dict[str, list[str]]:
    """Table rows of the rendered text by their first cell."""
    rows = {}
    for raw in text.splitlines():
        line = raw.replace("┃", "│").strip()  # header cells use the heavy bar
        if not line.startswith("│"):
            continue
        cells = [c.strip() for c in line.strip("│").split("│")]
        if cells and cells[0]:
            rows[cells[0]] = cells
    return rows


def test_live_view_shows_each_model_and_press(tmp_path: Path) -> None:
    clock = Clock()
    monitor = _snapshot(clock)
    view = LiveView(FakeDemo(monitor))
    console = Console(record=True, width=200, file=io.StringIO(), color_system=None)
    console.print(view.render())
    text = console.export_text()

    rows = _rows(text)
    header = rows["model"]
    assert header == ["model", "version", "variant", "pred/s", "p50 ms", "p99 ms", "max PSI",
                      "outbox", "dropped"]
    anomaly = dict(zip(header, rows["press-anomaly"], strict=True))
    quality = dict(zip(header, rows["press-quality"], strict=True))
    assert anomaly["version"] == "2" and quality["version"] == "1"
    assert anomaly["variant"] == "onnx-int8"
    # each model's own rate over the last 5 s (100 and 50 predictions), not the total
    # divided by the number of models (30/s for both)
    assert anomaly["pred/s"] == "20.0"
    assert quality["pred/s"] == "10.0"
    assert (anomaly["p50 ms"], anomaly["p99 ms"]) == ("0.21", "0.93")
    assert (quality["p50 ms"], quality["p99 ms"]) == ("0.12", "0.47")
    assert anomaly["max PSI"] == "0.31" and quality["max PSI"] == "0.05"
    assert anomaly["outbox"] == "7" and anomaly["dropped"] == "0"

    # 160 anomaly rows over 3 presses; anomalies at messages 3, 4, 61, 62, 64, 65, 67
    # (message i comes from press i % 3 + 1)
    assert rows["press"] == ["press", "rows", "anomalies", "rate"]
    assert rows["press-1"] == ["press-1", "54", "1", "1.9%"]  # message 3
    assert rows["press-2"] == ["press-2", "53", "4", "7.5%"]  # 4, 61, 64, 67
    assert rows["press-3"] == ["press-3", "53", "2", "3.8%"]  # 62, 65

    assert "agent hot-swapped to press-anomaly v2" in text
    assert "event update/golden_mismatch: golden outputs do not match" in text
    assert "event update/activated: press-anomaly v2 activated" in text


def test_live_view_before_the_device_reports(tmp_path: Path) -> None:
    demo = FakeDemo(Monitor("mqtt://127.0.0.1:1"))
    console = Console(record=True, width=200, file=io.StringIO(), color_system=None)
    console.print(LiveView(demo).render())
    rows = _rows(console.export_text())
    assert rows["press-anomaly"][1:4] == ["-", "-", "0.0"]


def test_monitor_records_which_version_answered_when() -> None:
    clock = Clock()
    monitor = _snapshot(clock)
    seen = monitor.versions_seen["press-anomaly"]
    assert sorted(seen) == [1, 2]  # v3 was refused: it answered nothing
    assert (seen[1].answered, seen[2].answered) == (60, 100)
    assert seen[1].first_at == 20.0 and seen[2].first_at == 46.0
    assert monitor.answered["press-anomaly"]["m-59"] == 1
    assert monitor.answered["press-anomaly"]["m-60"] == 2
    assert set(monitor.versions_seen["press-quality"]) == {1}
    # the state timeline: each change once, the refusal's republished state is no change
    assert monitor.timeline == [
        (10.0, "press-anomaly", 1), (10.0, "press-quality", 1), (30.0, "press-anomaly", 2)
    ]


@pytest.mark.parametrize("ok", [True, False])
def test_summary_prints_the_version_timeline(
    tmp_path: Path, ok: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    clock = Clock()
    demo = Demo(tmp_path, 30.0, True, "auto")
    demo.steps.started = 990.0
    demo.monitor = _snapshot(clock)
    demo.versions = {"v1": {"press-anomaly": 1, "press-quality": 1},
                     "v2": {"press-anomaly": 2}, "v3": {"press-anomaly": 3}}
    if not ok:
        demo._fail("step 'history': overran its time budget (10s; 110s into the run's 107s)")
    demo._summary()
    out, err = capsys.readouterr()

    assert ("every step happened" if ok else "FAILED") in out
    lines = [line.strip() for line in out.splitlines()]
    assert "v1: served 10.0s-30.0s, answered 60 messages, inference p50 0.50 ms p99 0.50 ms" \
        in lines
    v2 = next(line for line in lines if line.startswith("v2: served 30.0s-"))
    assert "answered 100 messages, inference p50 0.60 ms" in v2
    assert "v3: golden_mismatch at 40.0s, answered 0 messages" in lines
    assert "anomaly rate per press: press-1 1.9% of 54, press-2 7.5% of 53, press-3 3.8% of 53" \
        in lines
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path / 'mlflow.db'}" in lines

    data = json.loads((tmp_path / SUMMARY_FILE).read_text())
    assert data["ok"] is ok
    anomaly = data["models"]["press-anomaly"]
    assert [s["version"] for s in anomaly["served"]] == [1, 2]
    assert anomaly["refused"] == [{"version": 3, "code": "golden_mismatch", "at_s": 40.0}]
    assert set(anomaly["answered_by_version"]) == {"1", "2"}
    if ok:
        assert err == ""
    else:
        assert err.strip().splitlines() == [
            "lineside demo: error: step 'history': overran its time budget "
            "(10s; 110s into the run's 107s)"
        ]
