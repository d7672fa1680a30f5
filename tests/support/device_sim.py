"""A lightweight simulated device that uses the agent's real acceptance and download code.

One ``SimDevice`` = one ``MqttLink`` (one paho client, one connection), subscribed to
``manifests/{group}/+`` for its groups. A manifest goes through
``edge_agent.update.trust.check_manifest``; the model file is rebuilt from retained
chunks with ``ChunkAssembler`` (each chunk topic subscribed individually while
downloading, as docs/protocol.md section 6 says), verified with ``finish()`` and
"activated": the trusted state advances and, if asked, the device publishes its
protocol ``state`` and ``events``. No runtime is loaded: the tests care about what
arrives on the wire, not about inference.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.errors import UpdateRejected
from edge_agent.fsio import FileSystem
from edge_agent.mqtt import LinkOptions, Message, MqttLink
from edge_agent.protocol.chunks import ChunkAssembler
from edge_agent.protocol.manifest import Manifest
from edge_agent.protocol.topics import Topics
from edge_agent.update.trust import Accepted, Device, TrustedState, check_manifest, trusted_keys
from edge_agent.update_errors import DuplicateChunk


@dataclass
class Active:
    manifest: Manifest
    group: str
    data: bytes
    raw: bytes


@dataclass
class _Download:
    accepted: Accepted
    raw: bytes
    assembler: ChunkAssembler
    topics: set[str] = field(default_factory=set)


class SimDevice:
    def __init__(
        self,
        url: str,
        device_id: str,
        *,
        groups: tuple[str, ...],
        device_class: str,
        keys: dict[str, bytes],
        root: str,
        workdir: Path,
        report: bool = False,
        keep_bytes: bool = True,
        loop_timeout: float = 0.2,
    ) -> None:
        self.device = Device(device_id, frozenset(groups), device_class)
        self.topics = Topics(root)
        self.state = TrustedState(keys=trusted_keys(keys))
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.report = report
        self.keep_bytes = keep_bytes
        self.fs = FileSystem()
        self.lock = threading.RLock()
        self.active: dict[str, Active] = {}
        self.accepted: list[Manifest] = []  # every manifest accepted, in order
        self.rejected: list[tuple[str, str]] = []  # (code, message)
        self.undeployed: dict[str, bool] = {}
        self.changed = threading.Condition(self.lock)
        self._downloads: dict[str, _Download] = {}
        state_topic = self.topics.state(device_id) if report else None
        self.link = MqttLink(
            # stall_timeout: MqttLink's watchdog starts a second network loop when one has
            # not beaten for that long, while the first is still alive; with hundreds of
            # links per process on 2 cores a loop can be starved that long, and two loops
            # on one paho client corrupt its stream (seen: "Protocol error" disconnects).
            LinkOptions(
                url=url,
                client_id=device_id,
                backoff_initial=0.1,
                backoff_max=1.0,
                state_topic=None,
                stall_timeout=120.0,
                loop_timeout=loop_timeout,
                watchdog_interval=max(0.5, loop_timeout * 5),
            )
        )
        self._state_topic = state_topic

    # ---- lifecycle ---------------------------------------------------------------------

    def start(self, wait: float = 10.0) -> None:
        for group in sorted(self.device.groups):
            self.link.subscribe(self.topics.manifests_filter(group), self._on_manifest)
        self.link.start(wait=wait)
        if self.report:
            self.publish_state()

    def stop(self) -> None:
        self.link.stop(timeout=2.0)

    def wait_for(self, predicate: Any, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        with self.changed:
            while not predicate(self):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.changed.wait(min(remaining, 0.2))
        return True

    def version(self, model: str) -> int | None:
        with self.lock:
            a = self.active.get(model)
            return a.manifest.version if a else None

    # ---- protocol messages -------------------------------------------------------------

    def publish_state(self) -> None:
        with self.lock:
            models = {
                m: {
                    "version": a.manifest.version,
                    "variant": a.manifest.variant,
                    "sha256": a.manifest.model_sha256,
                    "sequence": a.manifest.sequence,
                }
                for m, a in self.active.items()
            }
        body = {
            "device": self.device.device_id,
            "online": True,
            "ts": time.time(),
            "models": models,
        }
        self.link.publish(self.topics.state(self.device.device_id), json.dumps(body), 1, True)

    def _event(self, code: str, model: str, group: str, message: str = "") -> None:
        if not self.report:
            return
        body = {
            "ts": time.time(),
            "device": self.device.device_id,
            "kind": "update",
            "code": code,
            "model": model,
            "group": group,
            "message": message,
        }
        self.link.publish(self.topics.events(self.device.device_id), json.dumps(body), 1)

    # ---- update path -------------------------------------------------------------------

    def _on_manifest(self, msg: Message) -> None:
        if not msg.payload:
            return
        parsed = self.topics.parse(msg.topic)
        assert parsed.group is not None and parsed.model is not None
        with self.lock:
            current = self.active.get(parsed.model)
            if current is not None and current.raw == msg.payload:
                return  # the retained copy of what we run: skipped silently
            try:
                accepted = check_manifest(
                    msg.payload,
                    group=parsed.group,
                    model=parsed.model,
                    state=self.state,
                    device=self.device,
                    now=time.time(),
                )
            except UpdateRejected as exc:
                code = getattr(exc, "code", type(exc).__name__)
                self.rejected.append((str(code), str(exc)))
                self.changed.notify_all()
                return
            manifest = accepted.manifest
            self.accepted.append(manifest)
            self.undeployed[manifest.model] = bool(manifest.extra.get("undeployed"))
            if current is not None and current.manifest.model_sha256 == manifest.model_sha256:
                self._activate(accepted, msg.payload, current.data)
                return
            entry = manifest.model_entry
            partial = self.workdir / f"{manifest.model}.{manifest.model_sha256[:12]}.partial"
            self.fs.unlink(partial)
            download = _Download(accepted, msg.payload, ChunkAssembler(entry, partial, self.fs))
            old = self._downloads.pop(manifest.model, None)
            if old is not None:
                for topic in old.topics:
                    self.link.unsubscribe(topic)
            self._downloads[manifest.model] = download
            if entry.size == 0:
                self._complete(manifest.model)
                return
            for cid in sorted(download.assembler.missing):
                topic = self.topics.chunk(cid)
                download.topics.add(topic)
                self.link.subscribe(topic, self._chunk_handler(manifest.model, cid))

    def _chunk_handler(self, model: str, cid: str) -> Any:
        def handle(msg: Message) -> None:
            if not msg.payload:
                return
            with self.lock:
                download = self._downloads.get(model)
                if download is None:
                    return
                try:
                    download.assembler.add(msg.payload, announced=cid)
                except DuplicateChunk:
                    return
                except UpdateRejected as exc:
                    self.rejected.append((type(exc).__name__, str(exc)))
                    return
                topic = self.topics.chunk(cid)
                download.topics.discard(topic)
                self.link.unsubscribe(topic)
                if download.assembler.complete:
                    self._complete(model)

        return handle

    def _complete(self, model: str) -> None:
        download = self._downloads.pop(model)
        download.assembler.finish()
        partial = download.assembler.partial
        data = partial.read_bytes() if self.keep_bytes else b""
        self.fs.unlink(partial)
        self._activate(download.accepted, download.raw, data)

    def _activate(self, accepted: Accepted, raw: bytes, data: bytes) -> None:
        self.state = self.state.after(accepted)
        self.active[accepted.manifest.model] = Active(accepted.manifest, accepted.group, data, raw)
        self.changed.notify_all()
        if self.report:
            self._event("activated", accepted.manifest.model, accepted.group)
            self.publish_state()


# ---- helpers for the registry_sync tests -------------------------------------------------


class Collector:
    """A plain subscriber (its own MqttLink) that records what arrives on a filter."""

    def __init__(self, url: str, topic_filter: str, client_id: str) -> None:
        self.messages: list[Message] = []
        self.cond = threading.Condition()
        self.link = MqttLink(LinkOptions(url=url, client_id=client_id))
        self.link.subscribe(topic_filter, self._on)
        self.link.start(wait=10.0)

    def _on(self, msg: Message) -> None:
        with self.cond:
            self.messages.append(msg)
            self.cond.notify_all()

    def json(self) -> list[dict[str, Any]]:
        with self.cond:
            return [json.loads(m.payload) for m in self.messages if m.payload]

    def wait_for(self, predicate: Any, timeout: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate(self):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.cond.wait(min(remaining, 0.2))
        return True

    def stop(self) -> None:
        self.link.stop(timeout=2.0)


def read_retained(
    url: str, topic_filter: str, client_id: str = "retained-reader"
) -> dict[str, bytes]:
    """Every retained message under ``topic_filter`` (complete: bounded by a probe message)."""
    import uuid

    found: dict[str, bytes] = {}
    done = threading.Event()
    nonce = uuid.uuid4().hex.encode()
    probe = f"probe/{client_id}/{nonce.decode()}"
    link = MqttLink(LinkOptions(url=url, client_id=f"{client_id}-{nonce.decode()[:8]}"))

    def on_msg(msg: Message) -> None:
        if msg.retain and msg.payload:
            found[msg.topic] = msg.payload

    link.subscribe(topic_filter, on_msg)
    link.subscribe(probe, lambda m: done.set())
    link.start(wait=10.0)
    try:
        link.publish(probe, nonce, qos=1)
        assert done.wait(10.0), "probe never came back"
    finally:
        link.stop(timeout=2.0)
    return found


def write_world(
    tmp: Path,
    *,
    broker_url: str,
    tracking_uri: str,
    model: str,
    selector: str = 'alias = "production"',
    groups: tuple[str, ...] = ("line-1",),
    rollout: str = "",
    parity: str = "",
    fleet: str = "",
    cache_dir: Path | None = None,
    root: str = "lineside/v1",
    extra: str = "",
) -> tuple[Path, dict[str, bytes]]:
    """A signing key, one device class config and a sync.toml; returns (config, trusted keys)."""
    from registry_sync import signing

    tmp.mkdir(parents=True, exist_ok=True)
    keydir = tmp / "keys"
    keydir.mkdir(exist_ok=True)
    key_path = keydir / "release.pem"
    if not key_path.exists():
        signing.save_private_key(signing.generate_private_key(), key_path)
    key = signing.load_private_key(key_path)
    keys = {signing.key_id(key): signing.public_key_bytes(key)}
    (tmp / "sim-class.toml").write_text(
        f'[device]\nid = "sim"\nclass = "sim-class"\ngroups = {list(groups)!r}\n'.replace("'", '"')
        + f'topic_root = "{root}"\n'
        '[runtime]\nvariants = ["onnx-int8", "onnx-fp32"]\n'
    )
    cache = f'cache_dir = "{cache_dir}"\n' if cache_dir else ""
    text = f"""
[registry]
tracking_uri = "{tracking_uri}"
poll_interval_s = 0.5
retry_max_s = 2

[broker]
url = "{broker_url}"
client_id = "sync-{model[:40]}"
publish_timeout_s = 10

[signing]
key = "keys/release.pem"

[topics]
root = "{root}"

[state]
dir = "state"

[build]
device_configs = ["sim-class.toml"]
{cache}
[build.parity]
{parity}

[[models]]
name = "{model}"
{selector}

[rollout]
{rollout}

[fleet]
{fleet}
{extra}
"""
    path = tmp / "sync.toml"
    path.write_text(text)
    return path, keys


_SHARED: dict[str, Any] = {}


def log_versions(registry: Any, name: str, count: int = 2) -> str:
    """Register ``count`` versions of a small classifier under ``name`` (once per session
    and registry: the registry fixture is session-scoped, so tests share them)."""
    key = f"{registry.tracking_uri}|{name}"
    if key in _SHARED:
        assert _SHARED[key] >= count
        return name
    import numpy as np
    import pandas as pd
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(3)
    for i in range(count):
        X = pd.DataFrame(rng.normal(size=(200, 3)), columns=["vibration", "temp", "current"])
        y = (X["vibration"] + (i + 1) * X["temp"] > 0).astype(int)
        registry.log_sklearn(LogisticRegression().fit(X, y), X, name="model", registered_name=name)
    _SHARED[key] = count
    return name


def shared_cache_dir() -> Path:
    """One converted-bundle cache for the test session (conversions are the slow part)."""
    import tempfile

    if "cache" not in _SHARED:
        _SHARED["cache"] = Path(tempfile.mkdtemp(prefix="lineside-sync-cache-"))
    return Path(_SHARED["cache"])


SHARED_MODEL = "sync-shared-model"
