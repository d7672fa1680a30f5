"""Telemetry: PSI against a baseline, latency percentiles, /proc stats, the snapshot."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from edge_agent.errors import RuntimeLoadError
from edge_agent.telemetry import (
    DriftMonitor,
    LatencyReservoir,
    ProcessStats,
    Telemetry,
    psi,
)


def make_baseline(sample: np.ndarray, names: list[str], bins: int = 10) -> dict[str, object]:
    """The baseline shape of docs/internals.md: quantile edges, fractions per bin."""
    features = []
    for j, name in enumerate(names):
        col = sample[:, j]
        interior = np.quantile(col, np.linspace(0, 1, bins + 1)[1:-1])
        edges = [-math.inf, *interior.tolist(), math.inf]
        counts, _ = np.histogram(col, bins=np.array(edges))
        features.append(
            {
                "name": name,
                "edges": edges,
                "fractions": (counts / counts.sum()).tolist(),
                "mean": float(col.mean()),
                "std": float(col.std()),
                "min": float(col.min()),
                "max": float(col.max()),
            }
        )
    return {
        "features": features,
        "outputs": {
            "label": {"values": [-1, 1], "fractions": [0.05, 0.95]},
            "score": {"edges": ["-inf", 0.0, "inf"], "fractions": [0.1, 0.9]},
        },
    }


@pytest.fixture
def baseline() -> dict[str, object]:
    rng = np.random.default_rng(1)
    train = rng.normal(size=(5000, 2))
    # Through JSON, as it arrives in a manifest: -Infinity/Infinity or "-inf"/"inf".
    return json.loads(json.dumps(make_baseline(train, ["vibration", "temperature"])))  # type: ignore[no-any-return]


def test_psi_formula() -> None:
    assert psi(np.array([0.5, 0.5]), np.array([0.5, 0.5])) == 0.0
    expected = (0.9 - 0.5) * math.log(0.9 / 0.5) + (0.1 - 0.5) * math.log(0.1 / 0.5)
    assert psi(np.array([0.9, 0.1]), np.array([0.5, 0.5])) == pytest.approx(expected)
    assert math.isfinite(psi(np.array([1.0, 0.0]), np.array([0.0, 1.0])))  # floored


def test_psi_is_near_zero_on_baseline_like_data_and_large_when_shifted(
    baseline: dict[str, object],
) -> None:
    rng = np.random.default_rng(2)
    same = DriftMonitor(baseline, ["vibration", "temperature"])
    for _ in range(20):
        same.observe(rng.normal(size=(200, 2)).astype(np.float32))
    report = same.report()["features"]
    assert report["vibration"]["psi"] < 0.02 and report["temperature"]["psi"] < 0.02

    shifted = DriftMonitor(baseline, ["vibration", "temperature"])
    x = rng.normal(size=(4000, 2))
    x[:, 0] += 1.5  # vibration drifts, temperature does not
    shifted.observe(x)
    report = shifted.report()["features"]
    assert report["vibration"]["psi"] > 0.5
    assert report["temperature"]["psi"] < 0.02


def test_psi_needs_enough_rows_and_follows_the_recent_past(baseline: dict[str, object]) -> None:
    rng = np.random.default_rng(3)
    monitor = DriftMonitor(
        baseline, ["temperature", "vibration", "unbaselined"], max_count=2000, min_rows=50
    )
    monitor.observe(rng.normal(size=(10, 3)))
    assert monitor.report()["features"]["vibration"]["psi"] is None
    assert "unbaselined" not in monitor.report()["features"]
    shifted = rng.normal(size=(3000, 3)) + 2.0
    monitor.observe(shifted)
    assert monitor.report()["features"]["vibration"]["psi"] > 0.5
    for _ in range(20):  # back to normal: the halving forgets the shift
        monitor.observe(rng.normal(size=(500, 3)))
    assert monitor.report()["features"]["vibration"]["psi"] < 0.05
    assert monitor.report()["features"]["vibration"]["rows"] <= 2000


def test_output_distribution_and_psi(baseline: dict[str, object]) -> None:
    monitor = DriftMonitor(baseline, ["vibration"], min_rows=10)
    monitor.observe_outputs(
        {"label": np.array([1] * 95 + [-1] * 5), "score": np.array([0.5] * 90 + [-0.5] * 10)}
    )
    outputs = monitor.report()["outputs"]
    assert outputs["label"]["fractions"] == [0.05, 0.95, 0.0]
    assert outputs["label"]["psi"] == pytest.approx(0.0, abs=1e-9)
    assert outputs["score"]["psi"] == pytest.approx(0.0, abs=1e-9)
    monitor.observe_outputs({"label": np.array([7] * 100)})  # a label never seen in training
    assert monitor.report()["outputs"]["label"]["psi"] > 1.0


@pytest.mark.parametrize(
    "bad",
    [
        {"features": [{"name": "v", "edges": [0, 1, 2], "fractions": [0.5, 0.5]}]},
        {"features": [{"name": "v", "edges": ["-inf", 1, "inf"], "fractions": [1.0]}]},
        {"features": [{"name": "v", "edges": ["-inf", 2, 1, "inf"], "fractions": [0.3] * 3}]},
        {"features": [{"name": "v", "edges": ["-inf", "x", "inf"], "fractions": [0.5, 0.5]}]},
    ],
)
def test_invalid_baselines_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(RuntimeLoadError):
        DriftMonitor(bad, ["v"])


def test_latency_percentiles_over_the_window() -> None:
    now = [0.0]
    reservoir = LatencyReservoir(capacity=1000, clock=lambda: now[0])
    for ms in range(1, 101):
        reservoir.record(float(ms))
    stats = reservoir.percentiles(window_s=60)
    assert stats["count"] == 100 and stats["max"] == 100.0
    assert stats["p50"] == pytest.approx(50.5) and stats["p99"] == pytest.approx(99.01)
    now[0] = 120.0
    reservoir.record(5.0)
    assert reservoir.percentiles(window_s=60) == {
        "count": 1,
        "p50": 5.0,
        "p90": 5.0,
        "p99": 5.0,
        "max": 5.0,
    }
    for _ in range(2000):  # bounded: the oldest samples fall out
        reservoir.record(1.0)
    assert reservoir.percentiles(window_s=60)["count"] == 1000


def test_process_stats_from_proc_and_graceful_absence(tmp_path: Path) -> None:
    stats = ProcessStats(tmp_path)
    first = stats.sample()
    sum(i * i for i in range(200_000))  # burn a little CPU between samples
    second = stats.sample()
    if Path("/proc/self/stat").exists():
        assert first["cpu_percent"] is None and second["cpu_percent"] is not None
        assert second["rss_mb"] is not None and second["rss_mb"] > 1
    assert second["disk_free_mb"] is not None and second["disk_free_mb"] > 0
    thermal = tmp_path / "thermal"
    (thermal / "thermal_zone0").mkdir(parents=True)
    (thermal / "thermal_zone0" / "temp").write_text("48312\n")
    (thermal / "thermal_zone1").mkdir()
    (thermal / "thermal_zone1" / "temp").write_text("garbage")
    absent = ProcessStats(tmp_path / "nope", proc=tmp_path / "noproc", thermal=thermal)
    sample = absent.sample()
    assert sample == {
        "cpu_percent": None,
        "rss_mb": None,
        "disk_free_mb": None,
        "temperature_c": 48.312,
    }


def test_snapshot_is_json_and_has_rates(tmp_path: Path, baseline: dict[str, object]) -> None:
    now = [100.0]
    telemetry = Telemetry(window_s=60, state_dir=tmp_path, clock=lambda: now[0])
    model = telemetry.model("press", DriftMonitor(baseline, ["vibration", "temperature"]))
    rng = np.random.default_rng(4)
    for _ in range(10):
        x = rng.normal(size=(10, 2)).astype(np.float32)
        model.record_batch(10, 2.0, x, {"label": np.ones(10)})
    model.record_error("missing_field", 3)
    model.record_error("non_finite")
    now[0] = 110.0
    snap = json.loads(json.dumps(telemetry.snapshot()))
    press = snap["models"]["press"]
    assert press["rows_total"] == 100 and press["rows_per_s"] == 10.0
    assert press["errors_total"] == {"missing_field": 3, "non_finite": 1}
    assert press["error_rate"] == pytest.approx(4 / 104, abs=1e-6)
    assert press["latency_ms"]["p50"] == 2.0
    assert press["drift"]["features"]["vibration"]["psi"] is not None
    assert set(snap["process"]) == {"cpu_percent", "rss_mb", "disk_free_mb", "temperature_c"}
    now[0] = 120.0
    again = telemetry.snapshot()["models"]["press"]
    assert again["rows_per_s"] == 0.0 and again["error_rate"] == 0.0
