"""A test-side registry_sync stand-in: sign a manifest for a converter bundle and publish it.

It reads a bundle written by ``converter.pipeline.convert`` (the model file and the
``metadata.lineside`` block of its MLmodel), builds the ``signed`` object of
docs/protocol.md section 3.2, signs it with ``registry_sync.signing`` and publishes the
chunks and then the manifest, retained, QoS 1, on a real broker. Every field can be
overridden and the wire bytes or chunks tampered with, which the attack tests need.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.protocol.chunks import describe, split
from edge_agent.protocol.predictions import iter_predictions
from edge_agent.protocol.topics import Topics
from registry_sync.signing import sign_manifest

ROOT = "lineside"


@dataclass
class Bundle:
    """A converter bundle on disk: its files and lineside metadata."""

    path: Path
    meta: dict[str, Any]
    files: dict[str, bytes] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Bundle:
        mlmodel = yaml.safe_load((path / "MLmodel").read_text())
        meta = mlmodel["metadata"]["lineside"]
        model_file = meta["model_file"]
        return cls(path, meta, {model_file: (path / model_file).read_bytes()})


def signed_for(
    bundle: Bundle,
    *,
    model: str,
    version: int,
    sequence: int,
    groups: list[str],
    chunk_size: int = 65536,
    issued_at: int | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """The ``signed`` object for ``bundle``; ``overrides`` replace any field."""
    meta = bundle.meta
    issued = int(time.time()) if issued_at is None else issued_at
    signed: dict[str, Any] = {
        "type": "lineside.manifest",
        "schema_version": "1.0",
        "model": model,
        "version": version,
        "selector": {"alias": "champion"},
        "variant": meta["variant"],
        "runtime": meta["runtime"],
        "model_file": meta["model_file"],
        "files": [describe(p, data, chunk_size).to_json() for p, data in bundle.files.items()],
        "feature_names": list(meta["feature_names"]),
        "outputs": [o["name"] for o in meta["outputs"]],
        "classes": meta.get("classes"),
        "signature": meta.get("input_signature"),
        "golden": meta.get("golden"),
        "baseline": meta.get("baseline"),
        "targets": {"groups": groups, "device_classes": []},
        "sequence": sequence,
        "issued_at": issued,
        "expires_at": issued + 86400,
    }
    signed.update(overrides)
    return signed


class Publisher:
    """A paho client that publishes retained manifests and chunks (registry_sync's side)."""

    def __init__(self, port: int, root: str = ROOT) -> None:
        self.topics = Topics(root)
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{time.time_ns()}")
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes, *, retain: bool = True, qos: int = 1) -> None:
        assert wait_until(self.client.is_connected, 20), "publisher not connected"
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(timeout=10)

    def chunks(
        self,
        files: Mapping[str, bytes],
        chunk_size: int = 65536,
        tamper: Callable[[str, bytes], bytes] | None = None,
    ) -> None:
        for data in files.values():
            for chunk in split(data, chunk_size):
                entry = describe("x", chunk, max(1, len(chunk)))
                cid = entry.sha256
                body = tamper(cid, chunk) if tamper else chunk
                self.publish(self.topics.chunk(cid), body)

    def manifest(self, group: str, model: str, wire: bytes) -> None:
        self.publish(self.topics.manifest(group, model), wire)

    def deploy(
        self,
        bundle: Bundle,
        key: Any,
        *,
        group: str,
        model: str,
        version: int,
        sequence: int,
        chunk_size: int = 65536,
        files: Mapping[str, bytes] | None = None,
        **overrides: Any,
    ) -> bytes:
        """Chunks first, then the signed manifest (docs/protocol.md section 6)."""
        signed = signed_for(
            bundle,
            model=model,
            version=version,
            sequence=sequence,
            groups=[group],
            chunk_size=chunk_size,
            **overrides,
        )
        wire = sign_manifest(signed, key)
        self.chunks(files if files is not None else bundle.files, chunk_size)
        self.manifest(group, model, wire)
        return wire

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def resign(wire: bytes, key: Any, mutate: Callable[[dict[str, Any]], None]) -> bytes:
    """Decode a wire manifest, change its ``signed`` object and sign it again."""
    signed = json.loads(wire)["signed"]
    mutate(signed)
    return sign_manifest(signed, key)


# ---- the rest of a test world: models, keys, device config, a collector --------------

FEATURES = ["vibration", "temperature", "pressure", "current"]
SENSOR_FILTER = "plant/line1/+/sensors"
_BUNDLES: dict[str, dict[str, Bundle]] = {}


def bundles(registry: Any, out_dir: Path) -> dict[str, Bundle]:
    """Two real versions of one classifier, logged with MLflow and converted (cached for
    the session: conversion is the slow part)."""
    key = str(registry.root)
    if key in _BUNDLES:
        return _BUNDLES[key]
    import numpy as np
    import pandas as pd
    from sklearn.linear_model import LogisticRegression

    from converter.pipeline import convert

    rng = np.random.default_rng(7)
    X = pd.DataFrame(rng.normal(size=(300, 4)), columns=FEATURES)
    y = np.where(X.vibration + 0.5 * X.temperature > 0, "fault", "ok")
    out: dict[str, Bundle] = {}
    for version, c in (("v1", 1.0), ("v2", 0.05)):
        name = f"agent-model-{version}-{time.time_ns()}"
        registry.log_sklearn(LogisticRegression(C=c).fit(X, y), X, name="m", registered_name=name)
        result = convert(f"models:/{name}/1", out_dir / version, variants=["onnx-fp32"])
        assert result.ok, result.as_dict()
        out[version] = Bundle.load(out_dir / version / "onnx-fp32")
    _BUNDLES[key] = out
    return out


def write_config(
    path: Path,
    *,
    device: str,
    port: int,
    state_dir: Path,
    keys: Mapping[str, bytes],
    groups: tuple[str, ...] = ("line-1",),
    variants: tuple[str, ...] = ("onnx-fp32",),
    model: str = "pump",
    window_s: float = 1.0,
    latency_budget_ms: float = 1000.0,
    deadline_s: float = 30.0,
    max_model_bytes: int = 64 * 1024 * 1024,
    telemetry_s: float = 0.5,
    fields: Mapping[str, str] | None = None,
) -> Path:
    mapping = fields or {f: f for f in FEATURES}
    lines = [
        "[device]",
        f'id = "{device}"',
        'class = "test-gw"',
        f"groups = {json.dumps(list(groups))}",
        f'state_dir = "{state_dir}"',
        f'topic_root = "{ROOT}"',
        "[runtime]",
        f"variants = {json.dumps(list(variants))}",
        "[broker]",
        f'url = "mqtt://127.0.0.1:{port}"',
        "keepalive_s = 5",
        "[trusted_keys]",
        *[f'{kid} = "{raw.hex()}"' for kid, raw in keys.items()],
        "[limits]",
        f"max_model_bytes = {max_model_bytes}",
        f"update_deadline_s = {deadline_s}",
        "[health]",
        f"window_s = {window_s}",
        "max_error_rate = 0.5",
        f"latency_budget_ms = {latency_budget_ms}",
        "[telemetry]",
        f"interval_s = {telemetry_s}",
        "[[models]]",
        f'name = "{model}"',
        f'input_topics = ["{SENSOR_FILTER}"]',
        "[models.fields]",
        *[f'{k} = "{v}"' for k, v in mapping.items()],
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


class Collector:
    """Subscribes to topic filters and keeps every message (decoded JSON when it is)."""

    def __init__(self, port: int, *filters: str, client_id: str | None = None) -> None:
        self.messages: list[tuple[str, Any]] = []
        self._lock = threading.Lock()
        self._filters = filters
        persistent = client_id is not None
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"col-{time.time_ns()}",
            clean_session=not persistent,
        )
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.1, 0.5)
        self._subscribed = threading.Event()
        self.client.on_subscribe = lambda *_a: self._subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self._subscribed.wait(10), "collector did not subscribe"

    def _on_connect(self, client: Any, *_args: Any) -> None:
        client.subscribe([(f, 1) for f in self._filters])

    def _on_message(self, _client: Any, _userdata: Any, msg: Any) -> None:
        try:
            body = json.loads(msg.payload)
        except ValueError:
            body = msg.payload
        with self._lock:
            if "/predictions" in msg.topic and isinstance(body, dict):
                # a grouped message holds several predictions: keep them one by one
                self.messages.extend((msg.topic, p) for p in iter_predictions(body))
            else:
                self.messages.append((msg.topic, body))

    def on(self, suffix: str) -> list[Any]:
        with self._lock:
            return [b for t, b in self.messages if t.endswith(suffix)]

    def events(self, code: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.on("/events") if code is None or e.get("code") == code]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def wait_until(predicate: Callable[[], Any], timeout: float = 15.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def sensor_payload(i: int, rng_seed: int | None = None) -> bytes:
    import random

    r = random.Random(rng_seed if rng_seed is not None else i)
    body = {f: round(r.gauss(0, 1), 4) for f in FEATURES}
    body |= {"id": f"m{i}", "ts": time.time()}
    return json.dumps(body).encode()


class World:
    """A broker, two converted model versions, a signing key, a registry-side publisher,
    a collector on the device's topics and a device config: one test's setting."""

    def __init__(
        self,
        tmp: Path,
        broker: Any,
        registry: Any,
        *,
        device: str = "gw-1",
        collector_id: str | None = None,
        **config: Any,
    ) -> None:
        from registry_sync.signing import generate_private_key, key_id, public_key_bytes

        self.tmp = tmp
        self.broker = broker
        self.key = generate_private_key()
        self.key_id = key_id(self.key)
        self.public = public_key_bytes(self.key)
        self.bundles = bundles(registry, registry.root / "agent-bundles")
        self.device = device
        self.state_dir = tmp / "state"
        self.config_path = tmp / "agent.toml"
        self.write_config(**config)
        self.pub = Publisher(broker.port)
        self.col = Collector(broker.port, f"{ROOT}/devices/{device}/#", client_id=collector_id)
        self.agents: list[Any] = []
        self.sensor = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"sensor-{device}")
        self.sensor.reconnect_delay_set(0.1, 0.5)
        self.sensor.connect("127.0.0.1", broker.port)
        self.sensor.loop_start()

    def write_config(self, **config: Any) -> Path:
        return write_config(
            self.config_path,
            device=self.device,
            port=self.broker.port,
            state_dir=self.state_dir,
            keys={self.key_id: self.public},
            **config,
        )

    def start_agent(self) -> Any:
        from edge_agent.agent import Agent
        from edge_agent.config import load_config

        agent = Agent(load_config(self.config_path))
        agent.start()
        self.agents.append(agent)
        assert agent.link is not None
        return agent

    def deploy(
        self,
        which: str,
        *,
        version: int,
        sequence: int,
        key: Any = None,
        group: str = "line-1",
        model: str = "pump",
        **kw: Any,
    ) -> bytes:
        return self.pub.deploy(
            self.bundles[which],
            key or self.key,
            group=group,
            model=model,
            version=version,
            sequence=sequence,
            **kw,
        )

    def send(self, i: int, payload: bytes | None = None, line: str = "a") -> None:
        self.sensor.publish(
            f"plant/line1/{line}/sensors",
            payload if payload is not None else sensor_payload(i),
            qos=1,
        )

    def predictions(self) -> list[dict[str, Any]]:
        return self.col.on("/predictions")

    def wait_event(self, code: str, count: int = 1, timeout: float = 20.0) -> dict[str, Any]:
        assert wait_until(lambda: len(self.col.events(code)) >= count, timeout), (
            f"no {code!r} event; events: {[e.get('code') for e in self.col.events()]}"
        )
        return self.col.events(code)[count - 1]

    def close(self) -> None:
        for agent in self.agents:
            agent.stop(timeout=3)
        self.sensor.disconnect()
        self.sensor.loop_stop()
        self.pub.close()
        self.col.close()
