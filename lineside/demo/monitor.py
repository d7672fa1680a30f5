"""What the demo watches: the device's state, events, telemetry and predictions over MQTT,
and the sensor feed it publishes itself."""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.protocol.predictions import iter_predictions
from lineside.demo.files import SENSOR_TOPIC, TOPIC_ROOT
from lineside.demo.pressline import make_line


def _client(url: str, client_id: str) -> paho.Client:
    host, port = url.removeprefix("mqtt://").rsplit(":", 1)
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
    client.connect(host, int(port))
    return client


@dataclass
class Monitor:
    """Collects everything the device publishes; thread-safe reads via ``lock``."""

    url: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    state: dict[str, Any] = field(default_factory=dict)
    telemetry: dict[str, Any] = field(default_factory=dict)
    events: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=200))
    event_codes: Counter[str] = field(default_factory=Counter)
    predictions: Counter[str] = field(default_factory=Counter)  # per model
    answered: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    anomalies: Counter[str] = field(default_factory=Counter)  # per press
    rows_per_press: Counter[str] = field(default_factory=Counter)
    versions_seen: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=2000))
    _client: paho.Client | None = None

    def start(self) -> None:
        self._client = _client(self.url, "lineside-demo-monitor")
        self._client.on_message = self._on_message
        self._client.subscribe(f"{TOPIC_ROOT}/devices/#", qos=1)
        self._client.loop_start()

    def stop(self) -> None:
        if self._client is not None:
            self._client.loop_stop()
            self._client.disconnect()

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        try:
            payload = json.loads(msg.payload)
        except ValueError:
            return
        channel = msg.topic.rsplit("/", 1)[-1]
        parts = msg.topic.split("/")
        if "predictions" in parts:
            for prediction in iter_predictions(payload):
                self._prediction(prediction)
            return
        with self.lock:
            if channel == "state":
                self.state = payload
            elif channel == "telemetry":
                self.telemetry = payload
            elif channel == "events":
                self.events.append(payload)
                self.event_codes[str(payload.get("code"))] += 1

    def _prediction(self, payload: dict[str, Any]) -> None:
        model = str(payload.get("model"))
        source = payload.get("source") or {}
        ident = source.get("id")
        press = str(source.get("topic", "")).split("/")[-2:-1] or [""]
        labels = (payload.get("outputs") or {}).get("label")
        with self.lock:
            self.predictions[model] += 1
            version = payload.get("version")
            if isinstance(version, int):
                self.versions_seen[model].add(version)
            if ident is not None:
                self.answered[model].add(str(ident))
            latency = payload.get("latency_ms")
            if isinstance(latency, (int, float)):
                self.latencies_ms.append(float(latency))
            if model == "press-anomaly" and isinstance(labels, list):
                for label in labels:
                    self.rows_per_press[press[0]] += 1
                    if label in (-1, "-1"):
                        self.anomalies[press[0]] += 1

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
