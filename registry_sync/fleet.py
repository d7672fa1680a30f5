"""The fleet view: device state, telemetry and events folded into one snapshot.

``FleetView`` is pure (messages in, records out; the clock is passed in), so the gate
logic and the CLI tables are tested without a broker. ``FleetMonitor`` subscribes an
``MqttLink`` to ``devices/+/state``, ``+/telemetry`` and ``+/events`` and feeds the view.
Payloads are docs/protocol.md section 8; unknown members are ignored, malformed
messages are counted and dropped (a device must not be able to crash the service).

Liveness: ``last_seen`` is when the device was last heard from. A live message counts
at its receive time; a *retained* state only at its own ``ts`` (the broker may hand out a
days-old "online" it kept because it lost the will), so ``with_offline_after`` can show a
device offline whose last message is older than ``[fleet].offline_after_s``.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from edge_agent.mqtt import Message, MqttLink
from edge_agent.protocol.topics import TopicError, Topics

__all__ = [
    "MAX_EVENTS",
    "MAX_UPDATE_EVENTS",
    "UPDATE_KINDS",
    "DeviceRecord",
    "FleetMonitor",
    "FleetView",
    "ModelTelemetry",
    "with_offline_after",
]

log = logging.getLogger(__name__)
MAX_EVENTS = 50  # per device, newest kept, every kind
# Update and health events (activated, healthy, rolled_back, refusals: what the rollout
# gate reads), per device, newest kept, in their own list.
UPDATE_KINDS = frozenset({"update", "health"})
MAX_UPDATE_EVENTS = 200


@dataclass
class ModelTelemetry:
    version: int | None = None
    rows: int = 0  # since the monitor started or this version became active, for it
    errors: int = 0
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    throughput: float | None = None  # rows per second over the last interval
    psi: dict[str, float] = field(default_factory=dict)
    ts: float = 0.0
    rows_total: int = 0  # the agent's running totals, to derive per-interval figures
    errors_total: int = 0
    last_rows: int = 0  # rows and errors in the last telemetry interval
    last_errors: int = 0
    error_kinds_total: dict[str, int] = field(default_factory=dict)  # the agent's, per kind
    last_error_kinds: dict[str, int] = field(default_factory=dict)  # per kind, last interval


@dataclass
class DeviceRecord:
    device: str
    online: bool = False
    last_seen: float = 0.0
    state_ts: float = 0.0
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    # model -> [version, since]: when that version was first seen active while online
    active_since: dict[str, list[Any]] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=dict)  # model -> groups seen in events
    events: list[dict[str, Any]] = field(default_factory=list)  # every kind, newest
    update_events: list[dict[str, Any]] = field(default_factory=list)  # update/health only
    telemetry: dict[str, ModelTelemetry] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> DeviceRecord:
        rec = cls(**{k: v for k, v in doc.items() if k != "telemetry"})
        rec.telemetry = {m: ModelTelemetry(**t) for m, t in doc.get("telemetry", {}).items()}
        if "update_events" not in doc:  # a snapshot from before the lists were split
            rec.update_events = [e for e in rec.events if e.get("kind") in UPDATE_KINDS]
        return rec


Listener = Callable[[str, str, Mapping[str, Any]], None]  # (device, channel, payload)


class FleetView:
    """Thread-safe fold of device messages. ``now`` is the receive time, in unix seconds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.devices: dict[str, DeviceRecord] = {}
        self.malformed = 0

    def load(self, doc: Mapping[str, Any]) -> None:
        with self._lock:
            for name, rec in doc.get("devices", {}).items():
                self.devices.setdefault(name, DeviceRecord.from_json(rec))

    def to_json(self) -> dict[str, Any]:
        with self._lock:
            return {"devices": {n: r.to_json() for n, r in sorted(self.devices.items())}}

    def snapshot(self) -> dict[str, DeviceRecord]:
        with self._lock:
            return {n: DeviceRecord.from_json(r.to_json()) for n, r in self.devices.items()}

    def apply(
        self,
        device: str,
        channel: str,
        payload: Mapping[str, Any],
        now: float,
        *,
        retained: bool = False,
    ) -> None:
        with self._lock:
            rec = self.devices.setdefault(device, DeviceRecord(device))
            if channel != "state":
                rec.last_seen = now
            if channel == "state":
                self._state(rec, payload, now, retained)
            elif channel == "telemetry":
                self._telemetry(rec, payload, now)
            elif channel == "events":
                self._event(rec, payload, now)

    def _state(self, rec: DeviceRecord, p: Mapping[str, Any], now: float, retained: bool) -> None:
        rec.online = bool(p.get("online"))
        rec.state_ts = float(p.get("ts") or now)
        if rec.online and not retained:
            rec.last_seen = now
        else:
            # A retained state (the will, or an "online" the broker kept) arrives "now" but
            # only says the device was alive when it published it.
            rec.last_seen = max(rec.last_seen, min(rec.state_ts, now))
        models = p.get("models")
        if isinstance(models, dict):
            rec.models = {str(m): dict(v) for m, v in models.items() if isinstance(v, dict)}
        for model, info in rec.models.items():
            version = info.get("version")
            current = rec.active_since.get(model)
            if current is None or current[0] != version:
                rec.active_since[model] = [version, now]
        for model in list(rec.active_since):
            if model not in rec.models:
                del rec.active_since[model]
        if not rec.online:
            rec.active_since.clear()  # "healthy for T seconds" restarts after an outage

    def _telemetry(self, rec: DeviceRecord, p: Mapping[str, Any], now: float) -> None:
        """Fold one telemetry message (docs/protocol.md section 8.3) into the record."""
        interval = float(p.get("interval_s") or 0.0)
        raw_active = p.get("active")
        active: Mapping[str, Any] = raw_active if isinstance(raw_active, dict) else {}
        for model, m in (p.get("models") or {}).items():
            if not isinstance(m, dict):
                continue
            raw_info = active.get(model)
            info: Mapping[str, Any] = raw_info if isinstance(raw_info, dict) else {}
            version = info.get("version", m.get("version"))
            # The agent's totals are per process, not per version: after a version change
            # they still hold the old version's rows, so the new record counts from the
            # previous record's totals (``base``), not from zero.
            base = rec.telemetry.get(model)
            t = base
            if t is None or t.version != version:
                t = rec.telemetry[model] = ModelTelemetry(version=version)
            rows_total = _int(m.get("rows_total"))
            errors_total = _error_total(m.get("errors_total"))
            # The interval's share is the difference from the last totals (all of it the
            # first time; a restarted agent starts its totals again).
            seen = (
                base is not None
                and base.ts > 0
                and rows_total >= base.rows_total
                and errors_total >= base.errors_total
            )
            before = base if base is not None and seen else None
            t.last_rows = rows_total - before.rows_total if before else rows_total
            t.last_errors = errors_total - before.errors_total if before else errors_total
            t.rows_total, t.errors_total = rows_total, errors_total
            t.rows += t.last_rows
            t.errors += t.last_errors
            kinds = _error_kinds(m.get("errors_total"))
            kinds_before = before.error_kinds_total if before else {}
            t.last_error_kinds = {
                k: v - kinds_before.get(k, 0) if v >= kinds_before.get(k, 0) else v
                for k, v in kinds.items()
            }
            t.error_kinds_total = kinds
            raw_lat = m.get("latency_ms")
            lat: Mapping[str, Any] = raw_lat if isinstance(raw_lat, dict) else {}
            t.p50_ms = _num(lat.get("p50"))
            t.p90_ms = _num(lat.get("p90"))
            t.p99_ms = _num(lat.get("p99"))
            t.max_ms = _num(lat.get("max"))
            rate = _num(m.get("rows_per_s"))
            t.throughput = rate if rate is not None else (
                t.last_rows / interval if interval > 0 else None
            )
            t.psi = _psi(m.get("drift"))
            t.ts = now

    def _event(self, rec: DeviceRecord, p: Mapping[str, Any], now: float) -> None:
        event = {
            k: p[k]
            for k in ("ts", "kind", "code", "model", "group", "message", "version")
            if k in p
        }
        event["received"] = now
        rec.events.append(event)
        del rec.events[:-MAX_EVENTS]
        if p.get("kind") in UPDATE_KINDS:
            # Kept apart: input-error events (up to 5 per second per code from a device
            # with a bad sensor) would otherwise push these out of ``events`` before the
            # rollout gate reads them.
            rec.update_events.append(event)
            del rec.update_events[:-MAX_UPDATE_EVENTS]
        model, group = p.get("model"), p.get("group")
        if p.get("kind") == "update" and isinstance(model, str) and isinstance(group, str):
            seen = rec.groups.setdefault(model, [])
            if group not in seen:
                seen.append(group)


def _int(value: Any) -> int:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


def _error_total(value: Any) -> int:
    if isinstance(value, dict):
        return sum(_int(v) for v in value.values())
    return _int(value)


def _error_kinds(value: Any) -> dict[str, int]:
    """The agent's running error totals by kind (``{"missing_field": 2}``); {} otherwise."""
    if not isinstance(value, dict):
        return {}
    return {str(k): _int(v) for k, v in value.items()}


def with_offline_after(
    devices: Mapping[str, DeviceRecord], now: float, offline_after_s: float
) -> dict[str, DeviceRecord]:
    """``devices`` with every device not heard from for ``offline_after_s`` marked offline,
    whatever its retained state says (0 disables the rule). ``devices`` is not changed."""
    out = dict(devices)
    if offline_after_s <= 0:
        return out
    for name, rec in devices.items():
        if rec.online and now - rec.last_seen > offline_after_s:
            out[name] = silent = DeviceRecord.from_json(rec.to_json())
            silent.online = False
    return out


def _psi(drift: Any) -> dict[str, float]:
    """PSI per feature and per output: ``{"vibration": 0.02, "label": 0.01}``."""
    out: dict[str, float] = {}
    if not isinstance(drift, dict):
        return out
    for section in ("features", "outputs"):
        entries = drift.get(section)
        if not isinstance(entries, dict):
            continue
        for name, entry in entries.items():
            psi = entry.get("psi") if isinstance(entry, dict) else None
            if isinstance(psi, (int, float)) and not isinstance(psi, bool):
                out[str(name)] = float(psi)
    return out


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class FleetMonitor:
    """Feeds a ``FleetView`` from the broker; ``listeners`` see every decoded message."""

    def __init__(
        self, link: MqttLink, topics: Topics, view: FleetView, clock: Callable[[], float]
    ) -> None:
        self.link = link
        self.topics = topics
        self.view = view
        self.clock = clock
        self.listeners: list[Listener] = []

    def start(self) -> None:
        base = f"{self.topics.root}/devices/+"
        self.link.subscribe(f"{base}/state", self._on_message, qos=1)
        self.link.subscribe(f"{base}/events", self._on_message, qos=1)
        self.link.subscribe(f"{base}/telemetry", self._on_message, qos=0)

    def _on_message(self, msg: Message) -> None:
        try:
            parsed = self.topics.parse(msg.topic)
        except TopicError:
            return
        if parsed.device is None or not msg.payload:
            return
        try:
            payload = json.loads(msg.payload)
            if not isinstance(payload, dict):
                raise ValueError("not an object")
            self.view.apply(
                parsed.device, parsed.kind, payload, self.clock(), retained=msg.retain
            )
        except (ValueError, TypeError, AttributeError) as exc:
            self.view.malformed += 1
            log.debug("dropping malformed %s from %s: %s", parsed.kind, parsed.device, exc)
            return
        for listener in self.listeners:
            listener(parsed.device, parsed.kind, payload)
