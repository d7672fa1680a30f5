"""What the demo watches: the device's state, events, telemetry and predictions over MQTT,
and the sensor feed it publishes itself."""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.protocol.predictions import iter_predictions
from lineside.demo.files import SENSOR_TOPIC, TOPIC_ROOT
from lineside.demo.pressline import make_line

RATE_WINDOW_S = 5.0  # predictions per second are counted over this trailing window


def _client(url: str, client_id: str) -> paho.Client:
    host, port = url.removeprefix("mqtt://").rsplit(":", 1)
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
    client.connect(host, int(port))
    return client


@dataclass
class VersionSeen:
    """One model version as seen in the device's predictions (times: demo seconds)."""

    answered: int = 0  # predictions (one per answered input message)
    first_at: float = 0.0
    last_at: float = 0.0
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=5000))


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


@dataclass
class Monitor:
    """Collects everything the device publishes; thread-safe reads via ``lock``.

    Times are seconds since ``started`` on ``clock`` (the demo's step clock), so the
    version timeline lines up with the step log.
    """

    url: str
    started: float = field(default_factory=time.monotonic)
    clock: Callable[[], float] = time.monotonic
    lock: threading.Lock = field(default_factory=threading.Lock)
    state: dict[str, Any] = field(default_factory=dict)
    telemetry: dict[str, Any] = field(default_factory=dict)
    events: deque[tuple[float, dict[str, Any]]] = field(default_factory=lambda: deque(maxlen=500))
    event_codes: Counter[str] = field(default_factory=Counter)
    predictions: Counter[str] = field(default_factory=Counter)  # per model
    # model -> sensor message id -> the version whose answer arrived first
    answered: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(dict))
    anomalies: Counter[str] = field(default_factory=Counter)  # per press
    rows_per_press: Counter[str] = field(default_factory=Counter)
    # model -> version -> what that version answered and when
    versions_seen: dict[str, dict[int, VersionSeen]] = field(
        default_factory=lambda: defaultdict(dict)
    )
    # (at, model, version or None): every change of the active version in ``state``
    timeline: list[tuple[float, str, int | None]] = field(default_factory=list)
    _arrivals: dict[str, deque[float]] = field(
        default_factory=lambda: defaultdict(lambda: deque(maxlen=20_000))
    )
    _client: paho.Client | None = None

    def now(self) -> float:
        return self.clock() - self.started

    def start(self) -> None:
        self._client = _client(self.url, "lineside-demo-monitor")
        self._client.on_message = self._on_message
        self._client.subscribe(f"{TOPIC_ROOT}/devices/#", qos=1)
        self._client.loop_start()

    def stop(self) -> None:
        if self._client is not None:
            self._client.loop_stop()
            self._client.disconnect()
            self._client = None

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        self.handle(msg.topic, msg.payload)

    def handle(self, topic: str, raw: bytes | bytearray) -> None:
        """One message from ``{root}/devices/{device}/{channel}`` (docs/protocol.md 8)."""
        try:
            payload = json.loads(raw)
        except ValueError:
            return
        if not isinstance(payload, dict):
            return
        channel = topic.rsplit("/", 1)[-1]
        if channel == "predictions":
            for prediction in iter_predictions(payload):
                self._prediction(prediction)
            return
        with self.lock:
            at = self.now()
            if channel == "state":
                self._state(at, payload)
            elif channel == "telemetry":
                self.telemetry = payload
            elif channel == "events":
                self.events.append((at, payload))
                self.event_codes[str(payload.get("code"))] += 1

    def _state(self, at: float, payload: dict[str, Any]) -> None:
        self.state = payload
        if not payload.get("online"):
            return  # the will or a clean shutdown: no statement about versions
        models = payload.get("models") or {}
        for name, entry in models.items():
            version = entry.get("version") if isinstance(entry, dict) else None
            version = version if isinstance(version, int) else None
            known = [v for _, m, v in self.timeline if m == name]
            if not known or known[-1] != version:
                self.timeline.append((at, name, version))

    def _prediction(self, payload: dict[str, Any]) -> None:
        model = str(payload.get("model"))
        source = payload.get("source") or {}
        ident = source.get("id") if isinstance(source, dict) else None
        topic = str(source.get("topic", "")) if isinstance(source, dict) else ""
        press = (topic.split("/")[-2:-1] or [""])[0]
        labels = (payload.get("outputs") or {}).get("label")
        version = payload.get("version")
        latency = payload.get("latency_ms")
        with self.lock:
            at = self.now()
            self.predictions[model] += 1
            self._arrivals[model].append(self.clock())
            if isinstance(version, int):
                seen = self.versions_seen[model].get(version)
                if seen is None:
                    seen = self.versions_seen[model][version] = VersionSeen(first_at=at)
                seen.answered += 1
                seen.last_at = at
                if isinstance(latency, (int, float)):
                    seen.latencies_ms.append(float(latency))
                if ident is not None:
                    self.answered[model].setdefault(str(ident), version)
            if model == "press-anomaly" and isinstance(labels, list):
                for label in labels:
                    self.rows_per_press[press] += 1
                    if label in (-1, "-1"):
                        self.anomalies[press] += 1

    def rate(self, model: str, window_s: float = RATE_WINDOW_S) -> float:
        """Predictions per second of ``model`` over the trailing ``window_s``."""
        with self.lock:
            arrivals = self._arrivals.get(model)
            if not arrivals:
                return 0.0
            since = self.clock() - window_s
            recent = sum(1 for t in reversed(arrivals) if t >= since)
        return recent / window_s

    def active_version(self, model: str) -> int | None:
        with self.lock:
            entry = (self.state.get("models") or {}).get(model) or {}
        version = entry.get("version")
        return int(version) if isinstance(version, int) else None

    def count(self, code: str) -> int:
        with self.lock:
            return self.event_codes[code]


@dataclass
class Feeder:
    """Publishes the press line's sensor messages at ``rate`` per second."""

    url: str
    rate: float = 40.0
    sent_ids: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="demo-feeder", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        client = _client(self.url, "lineside-demo-pressline")
        client.loop_start()
        line = make_line(3)
        interval = 1.0 / self.rate
        next_at = time.monotonic()
        for n in itertools.count():
            if self._stop.is_set():
                break
            press = line[n % len(line)]
            reading = press.reading()
            ident = f"{press.press_id}-{reading['cycle']}"
            message = dict(reading, id=ident, ts=time.time())
            client.publish(SENSOR_TOPIC.format(press=press.press_id), json.dumps(message), qos=1)
            self.sent_ids.append(ident)
            next_at += interval
            time.sleep(max(0.0, next_at - time.monotonic()))
        time.sleep(0.5)
        client.loop_stop()
        client.disconnect()
