"""What the agent reports about itself: latency, throughput, errors, drift, the process.

- Latency percentiles come from a bounded reservoir (a ring of the latest samples with
  their times), restricted to the window: exact for the most recent ``capacity`` samples,
  constant memory, no per-sample allocation.
- Drift is PSI per feature against the bundle's baseline (docs/internals.md section 2),
  computed from a streaming histogram with the baseline's own edges. Counts are halved
  when they pass ``max_count`` so the histogram follows the recent past (an exponential
  window measured in rows, not seconds: a slow line and a fast line both get a stable
  estimate). PSI is reported once ``min_rows`` rows were seen, else None.
- Process stats read /proc and /sys directly (psutil is not on the device); anything
  absent (no thermal zone in a container, no /proc on another OS) is reported as None.

``Telemetry.snapshot()`` returns a JSON-able dict; the agent publishes it every
``telemetry.interval_s`` through the outbox.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.errors import RuntimeLoadError

__all__ = [
    "DriftMonitor",
    "LatencyReservoir",
    "ModelTelemetry",
    "ProcessStats",
    "Telemetry",
    "psi",
]

PSI_FLOOR = 1e-4  # fractions are floored before the log (docs/internals.md)


def psi(actual: np.ndarray, expected: np.ndarray) -> float:
    """Population stability index between two fraction vectors (floored at 1e-4)."""
    a = np.maximum(np.asarray(actual, dtype=np.float64), PSI_FLOOR)
    e = np.maximum(np.asarray(expected, dtype=np.float64), PSI_FLOOR)
    return float(np.sum((a - e) * np.log(a / e)))


class LatencyReservoir:
    """The latest ``capacity`` latencies (ms) with their times; percentiles over a window."""

    def __init__(
        self, capacity: int = 4096, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._values = np.zeros(capacity, dtype=np.float64)
        self._times = np.full(capacity, -math.inf)
        self._next = 0
        self._clock = clock
        self._lock = threading.Lock()

    def record(self, latency_ms: float) -> None:
        with self._lock:
            i = self._next % len(self._values)
            self._values[i] = latency_ms
            self._times[i] = self._clock()
            self._next += 1

    def percentiles(self, window_s: float, qs: Sequence[float] = (50, 90, 99)) -> dict[str, Any]:
        with self._lock:
            recent = self._values[self._times >= self._clock() - window_s]
        if not len(recent):
            return {"count": 0, **{f"p{q:g}": None for q in qs}, "max": None}
        values = np.percentile(recent, qs)
        return {"count": len(recent), **{f"p{q:g}": round(float(v), 4)
                                         for q, v in zip(qs, values, strict=True)},
                "max": round(float(recent.max()), 4)}


def _edges(raw: Any, where: str) -> np.ndarray:
    """Baseline edges: numbers, or "-inf"/"inf" strings; first -inf, last +inf."""
    if not isinstance(raw, list) or len(raw) < 2:
        raise RuntimeLoadError(f"baseline {where}: edges must be a list of 2+ numbers")
    try:
        edges = np.array([float(e) for e in raw], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise RuntimeLoadError(f"baseline {where}: bad edge: {exc}") from exc
    if edges[0] != -math.inf or edges[-1] != math.inf or np.any(np.diff(edges) <= 0):
        raise RuntimeLoadError(f"baseline {where}: edges must rise from -inf to inf")
    return edges


def _fractions(raw: Any, size: int, where: str) -> np.ndarray:
    try:
        fractions = np.array(raw, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise RuntimeLoadError(f"baseline {where}: bad fractions: {exc}") from exc
    if fractions.shape != (size,) or np.any(fractions < 0):
        raise RuntimeLoadError(f"baseline {where}: expected {size} fractions >= 0")
    return fractions


class _Histogram:
    """Counts over fixed bins with a bounded total (halved past ``max_count``)."""

    def __init__(self, expected: np.ndarray, max_count: float) -> None:
        self.expected = expected
        self.counts = np.zeros(len(expected), dtype=np.float64)
        self.max_count = max_count

    def add(self, bin_counts: np.ndarray) -> None:
        self.counts += bin_counts
        while self.counts.sum() > self.max_count:
            self.counts *= 0.5

    @property
    def total(self) -> float:
        return float(self.counts.sum())

    def fractions(self) -> np.ndarray:
        total = self.total
        return self.counts / total if total else self.counts


class DriftMonitor:
    """PSI per feature (and per baselined output) against a bundle's baseline."""

    def __init__(
        self,
        baseline: Mapping[str, Any],
        feature_names: Sequence[str],
        *,
        max_count: float = 10_000,
        min_rows: int = 50,
    ) -> None:
        self.min_rows = min_rows
        by_name = {f.get("name"): f for f in baseline.get("features", []) if isinstance(f, dict)}
        # (column index in X, name, interior edges, histogram)
        self._features: list[tuple[int, str, np.ndarray, _Histogram]] = []
        for column, name in enumerate(feature_names):
            spec = by_name.get(name)
            if spec is None:
                continue  # no baseline for this feature: no drift figure
            edges = _edges(spec.get("edges"), name)
            expected = _fractions(spec.get("fractions"), len(edges) - 1, name)
            self._features.append((column, name, edges[1:-1], _Histogram(expected, max_count)))
        self._outputs: dict[str, tuple[np.ndarray, bool, _Histogram]] = {}
        for name, spec in (baseline.get("outputs") or {}).items():
            if not isinstance(spec, dict):
                continue
            if "values" in spec:  # categorical: one bin per value + one for "other"
                values = np.array(spec["values"], dtype=np.float64)
                expected = np.append(_fractions(spec.get("fractions"), len(values), name), 0.0)
                self._outputs[name] = (values, True, _Histogram(expected, max_count))
            else:
                edges = _edges(spec.get("edges"), name)
                expected = _fractions(spec.get("fractions"), len(edges) - 1, name)
                self._outputs[name] = (edges[1:-1], False, _Histogram(expected, max_count))

    def observe(self, x: np.ndarray) -> None:
        """Add a batch of model inputs, float [N, F] in signature order."""
        for column, _name, interior, hist in self._features:
            bins = np.searchsorted(interior, x[:, column], side="right")
            hist.add(np.bincount(bins, minlength=len(hist.counts)))

    def observe_outputs(self, outputs: Mapping[str, np.ndarray]) -> None:
        for name, (points, categorical, hist) in self._outputs.items():
            value = outputs.get(name)
            if value is None:
                continue
            flat = np.asarray(value, dtype=np.float64)
            if flat.ndim != 1:
                continue  # e.g. probabilities [N, C]: no 1-D baseline to compare with
            if categorical:
                index = np.searchsorted(points, flat)
                index = np.minimum(index, len(points) - 1)
                known = points[index] == flat
                bins = np.where(known, index, len(points))
            else:
                bins = np.searchsorted(points, flat, side="right")
            hist.add(np.bincount(bins, minlength=len(hist.counts)))

    def report(self) -> dict[str, Any]:
        features = {name: self._entry(hist) for _c, name, _i, hist in self._features}
        outputs = {name: self._entry(hist) | {"fractions": _rounded(hist.fractions())}
                   for name, (_p, _c, hist) in self._outputs.items()}
        return {"features": features, "outputs": outputs}

    def _entry(self, hist: _Histogram) -> dict[str, Any]:
        enough = hist.total >= self.min_rows
        value = round(psi(hist.fractions(), hist.expected), 6) if enough else None
        return {"psi": value, "rows": round(hist.total)}


def _rounded(values: np.ndarray) -> list[float]:
    return [round(float(v), 6) for v in values]


class ProcessStats:
    """CPU %, RSS, free disk and temperature from /proc and /sys; None when absent."""

    def __init__(
        self,
        disk_path: Path,
        *,
        proc: Path = Path("/proc"),
        thermal: Path = Path("/sys/class/thermal"),
    ) -> None:
        self.disk_path = disk_path
        self.proc = proc
        self.thermal = thermal
        self._last: tuple[float, float] | None = None  # (wall monotonic, cpu seconds)

    def sample(self) -> dict[str, float | None]:
        return {
            "cpu_percent": self._cpu_percent(),
            "rss_mb": self._rss_mb(),
            "disk_free_mb": self._disk_free_mb(),
            "temperature_c": self._temperature_c(),
        }

    def _cpu_percent(self) -> float | None:
        try:
            stat = (self.proc / "self" / "stat").read_text()
            # The command name may hold spaces and parentheses: split after the last ')'.
            fields = stat[stat.rindex(")") + 2 :].split()
            cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None
        now = time.monotonic()
        last, self._last = self._last, (now, cpu)
        if last is None or now <= last[0]:
            return None
        return round(100.0 * (cpu - last[1]) / (now - last[0]), 2)

    def _rss_mb(self) -> float | None:
        try:
            pages = int((self.proc / "self" / "statm").read_text().split()[1])
        except (OSError, ValueError, IndexError):
            return None
        return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 2)

    def _disk_free_mb(self) -> float | None:
        try:
            st = os.statvfs(self.disk_path)
        except OSError:
            return None
        return round(st.f_bavail * st.f_frsize / 2**20, 1)

    def _temperature_c(self) -> float | None:
        readings = []
        for zone in sorted(self.thermal.glob("thermal_zone*")):
            try:
                readings.append(int((zone / "temp").read_text().strip()) / 1000.0)
            except (OSError, ValueError):
                continue
        return max(readings) if readings else None


class ModelTelemetry:
    """Counters of one model; methods are cheap and thread-safe."""

    def __init__(self, *, window_s: float, clock: Callable[[], float] = time.monotonic,
                 drift: DriftMonitor | None = None) -> None:
        self.window_s = window_s
        self.latency = LatencyReservoir(clock=clock)
        self.drift = drift
        self.errors: Counter[str] = Counter()
        self.rows = 0
        self.batches = 0
        self._lock = threading.Lock()

    def record_batch(self, rows: int, latency_ms: float, x: np.ndarray | None = None,
                     outputs: Mapping[str, np.ndarray] | None = None) -> None:
        self.latency.record(latency_ms)
        with self._lock:
            self.rows += rows
            self.batches += 1
            if self.drift is not None and x is not None:
                self.drift.observe(x)
            if self.drift is not None and outputs is not None:
                self.drift.observe_outputs(outputs)

    def observe(self, x: np.ndarray, outputs: Mapping[str, np.ndarray]) -> None:
        """Feed drift only (rows and latency recorded elsewhere): lets a caller batch the
        histogram updates of many small inference calls into one."""
        with self._lock:
            if self.drift is not None:
                self.drift.observe(x)
                self.drift.observe_outputs(outputs)

    def record_error(self, kind: str, count: int = 1) -> None:
        with self._lock:
            self.errors[kind] += count

    def drift_report(self) -> dict[str, Any] | None:
        with self._lock:
            return self.drift.report() if self.drift is not None else None

    def totals(self) -> tuple[int, int, dict[str, int]]:
        with self._lock:
            return self.rows, self.batches, dict(self.errors)


class Telemetry:
    """All models plus the process; ``snapshot()`` gives rates since the last snapshot."""

    def __init__(self, *, window_s: float, state_dir: Path,
                 clock: Callable[[], float] = time.monotonic,
                 process: ProcessStats | None = None) -> None:
        self.window_s = window_s
        self.models: dict[str, ModelTelemetry] = {}
        self.process = process or ProcessStats(state_dir)
        self._clock = clock
        self._last_time = clock()
        self._last_totals: dict[str, tuple[int, int]] = {}

    def model(self, name: str, drift: DriftMonitor | None = None) -> ModelTelemetry:
        if name not in self.models or drift is not None:
            self.models[name] = ModelTelemetry(window_s=self.window_s, clock=self._clock,
                                               drift=drift)
        return self.models[name]

    def snapshot(self) -> dict[str, Any]:
        now = self._clock()
        elapsed = max(now - self._last_time, 1e-9)
        self._last_time = now
        models = {}
        for name, model in self.models.items():
            rows, batches, errors = model.totals()
            last_rows, last_errors = self._last_totals.get(name, (0, 0))
            errors_total = sum(errors.values())
            self._last_totals[name] = (rows, errors_total)
            new_rows, new_errors = rows - last_rows, errors_total - last_errors
            attempted = new_rows + new_errors
            models[name] = {
                "rows_total": rows,
                "batches_total": batches,
                "rows_per_s": round(new_rows / elapsed, 2),
                "latency_ms": model.latency.percentiles(self.window_s),
                "errors_total": errors,
                "error_rate": round(new_errors / attempted, 6) if attempted else 0.0,
                "drift": model.drift_report(),
            }
        return {
            "timestamp": int(time.time() * 1000),
            "interval_s": round(elapsed, 3),
            "models": models,
            "process": self.process.sample(),
        }
