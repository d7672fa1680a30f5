"""The running edge agent: the building blocks wired together.

Start order matters: the store is opened and every active model is loaded from disk
*before* the network is touched, so a gateway serves predictions the moment a broker is
reachable (and ``lineside agent predict`` works with none). Then the inference worker,
the outbox pump, the MQTT link, the updater thread and the telemetry thread start.

Threads: paho's network thread (``MqttLink``) only enqueues; the micro-batch worker
parses, infers, stores predictions and hands them to the link during the commit's fsync
(``OutboxPump.put_and_send``); the updater owns the store and the downloads;
the outbox pump publishes and deletes on PUBACK; the telemetry thread publishes QoS 0.
``run`` watches ``MqttLink.healthy()`` and ``Updater.healthy()`` and pings systemd's
watchdog; a link that stays unhealthy, or an updater step stuck past twice
``limits.step_deadline_s``, ends the agent with a non-zero exit so systemd restarts it.

Everything published goes through the on-disk outbox (QoS 1), except telemetry (QoS 0,
dropped while offline) and the online/offline state that ``MqttLink`` sends itself.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from edge_agent.config import AgentConfig
from edge_agent.errors import BrokerError, ConfigError
from edge_agent.fsio import FileSystem
from edge_agent.inference import InferenceEngine, SeqCounter
from edge_agent.mqtt import LinkOptions, Message, MqttLink
from edge_agent.outbox import Outbox, OutboxPump
from edge_agent.protocol.ed25519 import PublicKey
from edge_agent.protocol.topics import Topics
from edge_agent.store import ModelStore
from edge_agent.telemetry import Telemetry
from edge_agent.updater import Updater

__all__ = ["Agent", "RateLimiter", "device_keys", "sd_notify"]

log = logging.getLogger(__name__)

EXIT_UNHEALTHY = 3
_KEY_ID = re.compile(r"[0-9a-f]{16}")


def device_keys(raw: dict[str, bytes] | Any) -> dict[str, PublicKey]:
    """Trusted keys by key id. A configured name that looks like a key id must be the
    key's id (docs/protocol.md section 5); other names are labels."""
    keys: dict[str, PublicKey] = {}
    for name, value in dict(raw).items():
        try:
            key = PublicKey(bytes(value))
        except ValueError as exc:
            raise ConfigError(f"[trusted_keys].{name}: not a valid Ed25519 key: {exc}") from exc
        if _KEY_ID.fullmatch(name) and name != key.key_id:
            raise ConfigError(f"[trusted_keys].{name}: the key's id is {key.key_id}")
        keys[key.key_id] = key
    return keys


def sd_notify(message: str) -> bool:
    """Send ``message`` to systemd's $NOTIFY_SOCKET if there is one (no dependency)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), address)
    except OSError:
        return False
    return True


class RateLimiter:
    """At most ``per_second`` events per kind per second; the rest are counted and the
    count rides on the next event that passes."""

    def __init__(self, per_second: int = 5) -> None:
        self.per_second = per_second
        self._window: dict[str, tuple[int, int]] = {}  # kind -> (second, sent in it)
        self._suppressed: Counter[str] = Counter()
        self._lock = threading.Lock()

    def allow(self, kind: str, now: float) -> tuple[bool, int]:
        """(send it?, how many of this kind were suppressed before it)."""
        second = int(now)
        with self._lock:
            start, sent = self._window.get(kind, (second, 0))
            if start != second:
                sent = 0
            if sent >= self.per_second:
                self._window[kind] = (second, sent)
                self._suppressed[kind] += 1
                return False, 0
            self._window[kind] = (second, sent + 1)
            return True, self._suppressed.pop(kind, 0)


class Agent:
    """One device's agent. ``start()`` then ``run()`` (blocks) or ``stop()``."""

    def __init__(
        self, config: AgentConfig, *, fs: FileSystem | None = None, error_events_per_s: int = 5
    ) -> None:
        self.config = config
        self.topics = Topics(config.topic_root)
        self.fs = fs or FileSystem()
        self.keys = device_keys(config.trusted_keys)
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = ModelStore.open(config.state_dir, fs=self.fs)
        self.outbox = Outbox(
            config.state_dir / "outbox.db",
            max_bytes=config.limits.outbox_max_bytes,
            synchronous=config.limits.outbox_sync.upper(),
        )
        self.telemetry = Telemetry(window_s=config.telemetry_interval_s, state_dir=config.state_dir)
        self.input_errors: Counter[str] = Counter()
        self._limiter = RateLimiter(error_events_per_s)
        device = config.device_id
        self.engine = InferenceEngine(
            config,
            store_predictions=self._store_predictions,
            seq=SeqCounter(config.state_dir / "prediction-seq", fs=self.fs),
            telemetry=self.telemetry,
            on_error=self._input_error,
            prediction_topic=self.topics.predictions(device),
            acknowledge=self._ack_inputs,
        )
        self.updater = Updater(
            config,
            store=self.store,
            fs=self.fs,
            keys=self.keys,
            engine=self.engine,
            topics=self.topics,
            emit=self.emit,
            on_state_change=self.publish_state,
        )
        self.link: MqttLink | None = None
        self.pump: OutboxPump | None = None
        self._stop = threading.Event()
        self._telemetry_thread: threading.Thread | None = None
        self._connected_at = time.time()

    # ---- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        self.updater.load_active()  # from disk, before any network
        self.engine.start()
        self.link = self._make_link()
        for topic_filter in self.engine.input_filters():
            # Acknowledged only once answered and on disk (``_ack_inputs``).
            self.link.subscribe(topic_filter, self._on_sensor, ack="manual")
        self.updater.attach(self.link)
        self.pump = OutboxPump(self.outbox, self.link)
        self.pump.start()
        self.link.start(wait=None)  # keeps trying in the background: offline is normal
        self.updater.start()
        self._telemetry_thread = threading.Thread(
            target=self._telemetry_loop, name="telemetry", daemon=True
        )
        self._telemetry_thread.start()
        sd_notify("READY=1")

    def _make_link(self) -> MqttLink:
        b = self.config.broker
        return MqttLink(
            LinkOptions(
                url=b.url,
                client_id=b.client_id,
                username=b.username,
                password=b.password,
                ca=b.tls.ca,
                cert=b.tls.cert,
                key=b.tls.key,
                keepalive=b.keepalive_s,
                state_topic=self.topics.state(self.config.device_id),
                state_payload=self._state_payload,
            )
        )

    def run(self, *, unhealthy_after_s: float = 60.0, tick_s: float = 1.0) -> int:
        """Block until ``stop()``; returns the exit code (non-zero: restart me)."""
        unhealthy_since: float | None = None
        while not self._stop.wait(tick_s):
            if not self.updater.healthy():
                # A step stuck past STALL_RESTART_FACTOR step deadlines (its update was
                # abandoned and recorded in stalled.json at the first deadline): no more
                # WATCHDOG=1, exit for a restart; if stop() hangs too, systemd's watchdog
                # kills the process. The next start serves the old version.
                log.critical("updater thread stuck; exiting for a restart")
                self.stop()
                return EXIT_UNHEALTHY
            link = self.link
            if link is None or link.healthy():
                unhealthy_since = None
                sd_notify("WATCHDOG=1")
                continue
            now = time.monotonic()
            if unhealthy_since is None:
                unhealthy_since = now
                log.error("MQTT link unhealthy (network loop dead or stalled)")
                self.emit("health", "link_unhealthy", "MQTT network loop dead or stalled")
            elif now - unhealthy_since > unhealthy_after_s:
                log.critical(
                    "MQTT link unhealthy for %.0fs; exiting for a restart", now - unhealthy_since
                )
                self.stop()
                return EXIT_UNHEALTHY
        return 0

    def request_stop(self) -> None:
        """Ask ``run`` to return (signal handlers call this)."""
        self._stop.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        sd_notify("STOPPING=1")
        self.updater.stop(timeout)
        self.engine.stop(timeout)  # answers what is queued, into the outbox
        if self.pump is not None:
            # Give queued messages a moment to go out before the offline state.
            deadline = time.monotonic() + min(2.0, timeout)
            while (
                self.outbox.depth()
                and self.link is not None
                and self.link.connected
                and time.monotonic() < deadline
            ):
                time.sleep(0.02)
            self.pump.stop(timeout)
        if self.link is not None:
            self.link.stop(timeout)
        if self._telemetry_thread is not None:
            self._telemetry_thread.join(timeout)
        self.outbox.close()

    # ---- messages in ------------------------------------------------------------------

    def _on_sensor(self, message: Message) -> None:
        # On the network thread. A lone message with nothing behind it on the socket is
        # answered right here (no thread hand-off); under load it is queued for the
        # micro-batch worker.
        link = self.link
        if (
            link is not None
            and not link.input_waiting()
            and self.engine.run_now(message.topic, message.payload, message)
        ):
            return
        self.engine.submit(message.topic, message.payload, message)

    def _ack_inputs(self, messages: list[Any]) -> None:
        link = self.link
        if link is None:
            return
        link.ack_many([m for m in messages if isinstance(m, Message)])

    # ---- messages out -----------------------------------------------------------------

    def _store_predictions(
        self,
        items: list[tuple[str, bytes]],
        on_sent: Callable[[], None] | None = None,
        committed: Callable[[], None] | None = None,
        defer: bool = False,
    ) -> None:
        rows = [(topic, payload, 1, False) for topic, payload in items]
        pump = self.pump
        if pump is None:
            self.outbox.put_many(rows)
            if committed is not None:
                committed()
            return
        # One transaction for the micro-batch; its predictions are handed to the link
        # from this thread while the commit's fsync runs (no pump-thread wake-up on the
        # latency path). Deleted only after commit and PUBACK, as always. A lone
        # answer's commit is deferred (``defer``) off the moments it is delivered in.
        pump.put_and_send(rows, on_sent, committed=committed, defer=defer)

    def emit(self, kind: str, code: str, message: str, **context: Any) -> None:
        """One event (docs/protocol.md section 8.2), through the outbox."""
        body = {
            "ts": time.time(),
            "device": self.config.device_id,
            "kind": kind,
            "code": code,
            "message": message,
            **context,
        }
        log.info("event %s/%s: %s", kind, code, message)
        self.outbox.put(self.topics.events(self.config.device_id), _json(body), 1, False)

    def _input_error(self, kind: str, fields: dict[str, Any]) -> None:
        self.input_errors[kind] += 1
        send, suppressed = self._limiter.allow(kind, time.time())
        if not send:
            return
        where = f"{fields['field']}: " if "field" in fields else ""
        extra = {"suppressed": suppressed} if suppressed else {}
        self.emit("error", kind, where + str(fields.get("reason", kind)), **fields, **extra)

    def publish_state(self) -> None:
        """The retained state now (after an update or on ``report``)."""
        self.outbox.put(
            self.topics.state(self.config.device_id), self._state_payload(True), 1, True
        )

    def _state_payload(self, online: bool) -> bytes:
        body: dict[str, Any] = {
            "device": self.config.device_id,
            "online": online,
            "ts": time.time(),
            "models": {},
        }
        if online:
            body["models"] = self.updater.snapshot
            body["update"] = self.updater.status()
            # Public key ids (digests of public keys): lets an operator see that a key
            # rotation has reached every device before switching keys (operations.md §9).
            body["trusted_keys"] = sorted(self.config.trusted_keys)
        return _json(body)

    def _telemetry_loop(self) -> None:
        interval = self.config.telemetry_interval_s
        while not self._stop.wait(interval):
            try:
                self._publish_telemetry(interval)
            except Exception:  # telemetry must never take the agent down
                log.exception("telemetry failed")

    def telemetry_snapshot(self, interval: float) -> dict[str, Any]:
        snap = self.telemetry.snapshot()
        serving = self.engine.serving()
        snap.pop("timestamp", None)
        return {
            "ts": time.time(),
            "device": self.config.device_id,
            "interval_s": interval,
            **snap,
            "active": {name: m.describe() for name, m in serving.items()},
            "input_errors": dict(self.input_errors),
            "outbox": {
                "depth": self.outbox.depth(),
                "bytes": self.outbox.bytes(),
                "dropped": self.outbox.dropped(),
            },
            "update": self.updater.status(),
        }

    def _publish_telemetry(self, interval: float) -> None:
        link = self.link
        if link is None or not link.connected:
            return  # QoS 0: telemetry is not stored while offline
        payload = _json(self.telemetry_snapshot(interval))
        with contextlib.suppress(BrokerError):
            link.publish(self.topics.telemetry(self.config.device_id), payload, 0, False)


def _json(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":"), default=str).encode()
