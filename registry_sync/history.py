"""MLflow writes: deployment history on model versions, telemetry as runs.

Model-version tags (so the registry page answers "where and since when"):

- ``lineside.deployed.<group>``   ISO time the manifest went out to that group
- ``lineside.undeployed.<group>`` ISO time it was withdrawn from that group
- ``lineside.live_on``            comma-separated devices reporting it active now
- ``lineside.parity_failed``      why a deployment was blocked (also ``lineside.blocked``)
- ``lineside.rollout``            the rollout status line
- ``lineside.drift.<device>``     the last drift alert for a device

Experiment ``lineside-deployments``: one run per (model, version, device), tagged with
model, version, device and variant, whose metrics are the device telemetry (latency
percentiles, throughput, rows, errors, error rate, ``psi.<feature>``). Metrics are
buffered and written in batches on ``flush()`` (once per pass), not per message.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from registry_sync.errors import RegistryUnavailableError
from registry_sync.fleet import ModelTelemetry
from registry_sync.registry import RegistryClient, mlflow_errors

__all__ = ["EXPERIMENT", "History", "iso"]

log = logging.getLogger(__name__)
EXPERIMENT = "lineside-deployments"
_METRIC_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")


def iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="seconds")


class History:
    def __init__(self, registry: RegistryClient, *, enabled: bool = True) -> None:
        self.registry = registry
        self.enabled = enabled
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, int, str], list[tuple[str, float, int]]] = {}
        self._variants: dict[tuple[str, int, str], str] = {}
        self._runs: dict[tuple[str, int, str], str] = {}
        self._experiment: str | None = None
        self._live_on: dict[tuple[str, int], str] = {}
        self._step = 0

    # ---- model-version tags ----------------------------------------------------------

    def tag(self, model: str, version: int, key: str, value: str) -> None:
        if self.enabled:
            self.registry.set_version_tag(model, version, key, value)

    def deployed(self, model: str, version: int, group: str, ts: float) -> None:
        self.tag(model, version, f"lineside.deployed.{group}", iso(ts))

    def undeployed(self, model: str, version: int, group: str, ts: float) -> None:
        self.tag(model, version, f"lineside.undeployed.{group}", iso(ts))

    def live_on(self, live: Mapping[tuple[str, int], Iterable[str]]) -> None:
        """Set ``lineside.live_on`` where it changed (also to "" when no device runs it)."""
        keys = set(live) | set(self._live_on)
        for key in sorted(keys):
            value = ",".join(sorted(live.get(key, ())))
            if self._live_on.get(key) != value:
                self.tag(key[0], key[1], "lineside.live_on", value)
                self._live_on[key] = value

    # ---- telemetry runs --------------------------------------------------------------

    def record_telemetry(
        self, model: str, device: str, t: ModelTelemetry, raw: Mapping[str, Any], ts: float
    ) -> None:
        """Buffer one telemetry message's metrics for (model, version, device)."""
        if not self.enabled or not isinstance(t.version, int):
            return
        rows, errors = t.last_rows, t.last_errors
        metrics: dict[str, float | None] = {
            "latency_p50_ms": t.p50_ms,
            "latency_p99_ms": t.p99_ms,
            "throughput_rows_per_s": t.throughput,
            "rows": float(rows),
            "errors": float(errors),
            "error_rate": errors / rows if rows else 0.0,
        }
        for feature, psi in t.psi.items():
            metrics[f"psi.{_METRIC_CHARS.sub('_', feature)}"] = psi
        with self._lock:
            self._step += 1
            step = self._step
            items = self._pending.setdefault((model, t.version, device), [])
            items += [(k, float(v), step) for k, v in metrics.items() if v is not None]

    def note_variant(self, model: str, version: int, device: str, variant: str) -> None:
        self._variants[(model, version, device)] = variant

    def flush(self, now: float) -> None:
        if not self.enabled:
            return
        with self._lock:
            pending, self._pending = self._pending, {}
        for key, items in pending.items():
            try:
                run_id = self._run_for(*key)
                self._log(run_id, items, now)
            except RegistryUnavailableError as exc:
                log.warning("telemetry for %s not written to MLflow: %s", key, exc)
                with self._lock:  # keep it for the next pass
                    self._pending.setdefault(key, [])[:0] = items

    def _log(self, run_id: str, items: list[tuple[str, float, int]], now: float) -> None:
        from mlflow.entities import Metric

        ts_ms = int(now * 1000)
        metrics = [Metric(k, v, ts_ms, step) for k, v, step in items]
        with mlflow_errors("logging telemetry metrics"):
            for i in range(0, len(metrics), 900):  # log_batch caps at 1000 metrics
                self.registry.client.log_batch(run_id, metrics=metrics[i : i + 900])

    def _experiment_id(self) -> str:
        if self._experiment is None:
            client = self.registry.client
            with mlflow_errors(f"finding experiment {EXPERIMENT}"):
                exp = client.get_experiment_by_name(EXPERIMENT)
                self._experiment = (
                    exp.experiment_id if exp else client.create_experiment(EXPERIMENT)
                )
        return self._experiment

    def _run_for(self, model: str, version: int, device: str) -> str:
        key = (model, version, device)
        if key in self._runs:
            return self._runs[key]
        client = self.registry.client
        exp = self._experiment_id()
        with mlflow_errors("finding the deployment run"):
            found = client.search_runs(
                [exp],
                filter_string=(
                    f"tags.`lineside.model` = '{model}' and "
                    f"tags.`lineside.version` = '{version}' and "
                    f"tags.`lineside.device` = '{device}'"
                ),
                max_results=1,
            )
            if found:
                run_id = str(found[0].info.run_id)
            else:
                tags = {
                    "lineside.model": model,
                    "lineside.version": str(version),
                    "lineside.device": device,
                    "mlflow.note.content": f"{model} v{version} running on {device}",
                }
                variant = self._variants.get(key)
                if variant:
                    tags["lineside.variant"] = variant
                run = client.create_run(exp, tags=tags, run_name=f"{model}-v{version}@{device}")
                run_id = str(run.info.run_id)
        self._runs[key] = run_id
        return run_id
