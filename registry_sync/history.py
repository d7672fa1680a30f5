"""MLflow writes: deployment history on model versions, telemetry as runs.

Model-version tags (so the registry page answers "which version ran where, when, and how
did it do"):

- ``lineside.deployed.<group>``   ISO time the manifest *first* went out to that group (a
  republish, re-sign or revert of the same version does not move it)
- ``lineside.undeployed.<group>`` ISO time it was last withdrawn from that group
- ``lineside.live.<device>``      when the device ran it: ``<from>..<to>`` intervals, ISO
  times, comma-separated, oldest first (the last 10); ``<to>`` is ``now`` while it still
  runs it. ``from`` is when the device first reported the version active (the ``ts`` of
  its state), ``to`` when it reported another version or none (a rollback, an update, a
  removal). An offline device keeps its interval open: nothing says it stopped.
- ``lineside.live_on``            comma-separated devices reporting it active now
- ``lineside.parity_failed``      why a deployment was blocked (also ``lineside.blocked``)
- ``lineside.rollout``            the rollout status line
- ``lineside.drift.<device>``     the last drift alert for a device

Experiment ``lineside-deployments``: one run per (model, version, device), tagged with
model, version, device and variant, whose metrics are the device telemetry (latency
p50/p90/p99/max, throughput, rows, errors, error rate, ``errors.<kind>`` per interval,
``psi.<feature>``). The run is terminated (FINISHED, end time = ``to``) when the device
leaves that version, and set running again if it comes back to it. Metrics are buffered
and written in batches on ``flush()`` (once per pass), not per message.

Threads: the fleet monitor calls ``record_telemetry``, ``observe_live`` and ``defer`` on
the MQTT network thread; they only touch memory. Every MLflow call happens in the
service's pass (``flush``, ``drain``, ``write_live``), so a hung MLflow never stalls the
MQTT link.
"""

from __future__ import annotations

import collections
import datetime as dt
import logging
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from registry_sync.errors import RegistryUnavailableError, SyncError
from registry_sync.fleet import ModelTelemetry
from registry_sync.registry import RegistryClient, mlflow_errors
from registry_sync.state import read_json, write_json_atomic

__all__ = ["EXPERIMENT", "History", "LiveLedger", "iso"]

log = logging.getLogger(__name__)
EXPERIMENT = "lineside-deployments"
_METRIC_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")
MAX_INTERVALS = 10  # per (model version, device) in the lineside.live.<device> tag
MAX_DEFERRED = 1000  # queued MLflow writes from the network thread; oldest dropped beyond


def iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="seconds")


LiveKey = tuple[str, int, str]  # (model, version, device)


def _key(model: Any, version: Any, device: Any) -> LiveKey:
    return (str(model), int(version), str(device))


class LiveLedger:
    """Pure and thread-safe: which version each device runs since when, and the intervals
    of every (model, version, device); what changed and still has to reach MLflow.

    Persisted as ``live.json`` in the state dir, so a restarted service neither forgets
    when a version went live nor reopens an interval from a re-delivered retained state.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.running: dict[str, dict[str, list[Any]]] = {}  # model -> device -> [version, since]
        self.intervals: dict[LiveKey, list[list[float | None]]] = {}
        self.dirty: set[LiveKey] = set()  # the live tag must be rewritten
        self.ended: dict[LiveKey, float] = {}  # the run must be terminated at that time
        self.started: set[LiveKey] = set()  # the run (if any) must be running

    def observe(self, model: str, device: str, version: int | None, ts: float) -> bool:
        """The device reports ``version`` of ``model`` active (None: none) at ``ts``."""
        with self._lock:
            devices = self.running.setdefault(model, {})
            current = devices.get(device)
            if current is not None and current[0] == version:
                return False
            if current is None and version is None:
                return False
            if current is not None:
                old: LiveKey = (model, int(current[0]), device)
                spans = self.intervals.setdefault(old, [[float(current[1]), None]])
                if spans[-1][1] is None:
                    spans[-1][1] = max(ts, float(spans[-1][0] or 0.0))
                self.dirty.add(old)
                self.ended[old] = ts
                self.started.discard(old)
            if version is None:
                del devices[device]
            else:
                devices[device] = [version, ts]
                new: LiveKey = (model, version, device)
                spans = self.intervals.setdefault(new, [])
                spans.append([ts, None])
                del spans[:-MAX_INTERVALS]
                self.dirty.add(new)
                self.started.add(new)
                self.ended.pop(new, None)
            return True

    def ended_at(self, key: LiveKey) -> float | None:
        """When the device left that version, if it did and runs another one (or none) now."""
        model, version, device = key
        with self._lock:
            current = self.running.get(model, {}).get(device)
            spans = self.intervals.get(key)
            if not spans or (current is not None and current[0] == version):
                return None
            end = spans[-1][1]
            return float(end) if end is not None else None

    def value(self, key: LiveKey) -> str:
        with self._lock:
            spans = list(self.intervals.get(key, []))
        return ", ".join(
            f"{iso(float(a or 0.0))}..{'now' if b is None else iso(float(b))}" for a, b in spans
        )

    def to_json(self) -> dict[str, Any]:
        with self._lock:
            return {
                "running": {m: dict(d) for m, d in self.running.items()},
                "intervals": [[*k, v] for k, v in sorted(self.intervals.items())],
                "dirty": sorted([*k] for k in self.dirty),
                "ended": [[*k, t] for k, t in sorted(self.ended.items())],
                "started": sorted([*k] for k in self.started),
            }

    def load(self, doc: Mapping[str, Any]) -> None:
        with self._lock:
            self.running = {str(m): dict(d) for m, d in (doc.get("running") or {}).items()}
            self.intervals = {_key(m, v, d): s for m, v, d, s in doc.get("intervals", [])}
            self.dirty = {_key(*k) for k in doc.get("dirty", [])}
            self.ended = {_key(m, v, d): float(t) for m, v, d, t in doc.get("ended", [])}
            self.started = {_key(*k) for k in doc.get("started", [])}

    def take(self) -> tuple[set[LiveKey], dict[LiveKey, float], set[LiveKey]]:
        """What has to be written now (the caller gives back what it could not write)."""
        with self._lock:
            out = (set(self.dirty), dict(self.ended), set(self.started))
            self.dirty, self.ended, self.started = set(), {}, set()
            return out

    def give_back(
        self, dirty: set[LiveKey], ended: Mapping[LiveKey, float], started: set[LiveKey]
    ) -> None:
        with self._lock:
            self.dirty |= dirty
            for key, ts in ended.items():
                if key not in self.started:  # not superseded by a newer start
                    self.ended.setdefault(key, ts)
            self.started |= {k for k in started if k not in self.ended}


class History:
    def __init__(
        self, registry: RegistryClient, *, enabled: bool = True, state: Path | None = None
    ) -> None:
        self.registry = registry
        self.enabled = enabled
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, int, str], list[tuple[str, float, int]]] = {}
        self._variants: dict[tuple[str, int, str], str] = {}
        self._runs: dict[tuple[str, int, str], str] = {}
        self._experiment: str | None = None
        self._live_on: dict[tuple[str, int], str] = {}
        self._step = 0
        self._first: set[tuple[str, int, str]] = set()  # deployed tags known to be set
        self._deferred: collections.deque[tuple[str, Callable[[], None]]] = collections.deque(
            maxlen=MAX_DEFERRED
        )
        self.ledger = LiveLedger()
        self._state = state
        if state is not None:
            self.ledger.load(read_json(state, {}))

    # ---- model-version tags ----------------------------------------------------------

    def tag(self, model: str, version: int, key: str, value: str) -> None:
        if self.enabled:
            self.registry.set_version_tag(model, version, key, value)

    def deployed(self, model: str, version: int, group: str, ts: float) -> None:
        """Record the first publish of ``version`` to ``group``; later ones keep it."""
        key = f"lineside.deployed.{group}"
        if not self.enabled or (model, version, key) in self._first:
            return
        if key not in self.registry.version_tags(model, version):
            self.tag(model, version, key, iso(ts))
        self._first.add((model, version, key))

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

    # ---- writes asked for on the network thread ------------------------------------

    def defer(self, what: str, write: Callable[[], None]) -> None:
        """Queue an MLflow write for the next ``drain`` (any thread; never blocks on MLflow)."""
        if self.enabled:
            with self._lock:
                self._deferred.append((what, write))

    def drain(self) -> None:
        """Run the queued writes; one MLflow failure keeps it and the rest for the next pass."""
        while True:
            with self._lock:
                if not self._deferred:
                    return
                what, write = self._deferred.popleft()
            try:
                write()
            except SyncError as exc:
                log.warning("%s not written to MLflow (retried next pass): %s", what, exc)
                with self._lock:
                    self._deferred.appendleft((what, write))
                return

    def observe_live(self, model: str, device: str, version: int | None, ts: float) -> None:
        if self.enabled:
            self.ledger.observe(model, device, version, ts)

    def write_live(self) -> None:
        """Write the live intervals that changed, end the runs of versions devices left."""
        if not self.enabled:
            return
        dirty, ended, started = self.ledger.take()
        try:
            for key in sorted(dirty):
                model, version, device = key
                device_key = _METRIC_CHARS.sub("_", device)
                self.tag(model, version, f"lineside.live.{device_key}", self.ledger.value(key))
                dirty.discard(key)
            for key, ts in sorted(ended.items()):
                run_id = self._find_run(*key)
                if run_id is not None:
                    with mlflow_errors("ending the deployment run"):
                        self.registry.client.set_terminated(
                            run_id, status="FINISHED", end_time=int(ts * 1000)
                        )
                del ended[key]
            for key in sorted(started):
                run_id = self._find_run(*key)
                if run_id is not None:
                    with mlflow_errors("reopening the deployment run"):
                        run = self.registry.client.get_run(run_id)
                        if run.info.status != "RUNNING":
                            self.registry.client.update_run(run_id, status="RUNNING")
                started.discard(key)
        finally:
            self.ledger.give_back(dirty, ended, started)
            self.save()

    def save(self) -> None:
        if self._state is not None:
            write_json_atomic(self._state, self.ledger.to_json())

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
            "latency_p90_ms": t.p90_ms,
            "latency_p99_ms": t.p99_ms,
            "latency_max_ms": t.max_ms,
            "throughput_rows_per_s": t.throughput,
            "rows": float(rows),
            "errors": float(errors),
            "error_rate": errors / rows if rows else 0.0,
        }
        for kind, count in t.last_error_kinds.items():
            metrics[f"errors.{_METRIC_CHARS.sub('_', kind)}"] = float(count)
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

    def _find_run(self, model: str, version: int, device: str) -> str | None:
        """The deployment run of (model, version, device), or None when there is none yet."""
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
        if not found:
            return None
        self._runs[key] = str(found[0].info.run_id)
        return self._runs[key]

    def _run_for(self, model: str, version: int, device: str) -> str:
        key = (model, version, device)
        run_id = self._find_run(model, version, device)
        if run_id is None:
            client = self.registry.client
            exp = self._experiment_id()
            with mlflow_errors("creating the deployment run"):
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
                ended = self.ledger.ended_at(key)
                if ended is not None:  # late telemetry of a version the device already left
                    client.set_terminated(run_id, status="FINISHED", end_time=int(ended * 1000))
        self._runs[key] = run_id
        return run_id
