"""A small typed wrapper over paho-mqtt: the only module of the agent that touches paho.

``MqttLink`` owns one paho client and one network thread of its own. It exists to close
paho's known traps (docs: /work/shared/reference/field-notes.md section 3):

- every callback paho calls is wrapped: an exception is logged and counted, it never
  reaches paho (where it would silently stop the network thread, paho #636/#894);
- no wait without a timeout: ``PublishHandle.wait(timeout)`` replaces
  ``wait_for_publish()`` (paho #613), ``start()`` and ``stop()`` are bounded;
- ``publish()`` while disconnected raises ``BrokerError`` instead of filling paho's
  unbounded in-memory queue; the on-disk outbox (``edge_agent.outbox``) is the
  store-and-forward, paho only holds the bounded set of messages in flight;
- reconnects use exponential backoff with jitter (bounded), so a plant of gateways does
  not reconnect in lockstep after a broker restart;
- TCP_NODELAY on the socket (Nagle costs ~88 ms per QoS 1 round trip);
- a watchdog restarts the network thread when it has died or stopped beating;
- MQTT 3.1.1 with ``clean_session=False`` and a stable client id: the broker queues QoS 1
  messages for our subscriptions while we are away; the last will is a retained
  "offline" state so the plant sees a dead gateway;
- inputs are acknowledged when they are done with, not when they arrive: paho runs with
  ``manual_ack``; a subscription made with ``ack="manual"`` leaves the PUBACK to its
  owner (``MqttLink.ack``, once the result is on disk), every other one is acknowledged
  as soon as its handler returned. The broker redelivers what was not acknowledged
  after a reconnect, so a crash between receipt and the outbox commit loses nothing.

paho return codes and connection refusals are translated into ``BrokerError`` here.
QoS 2 is refused on purpose (paho #382/#893; the outbox gives at-least-once anyway).
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import select
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from edge_agent.errors import BrokerError

__all__ = [
    "Backoff",
    "LinkOptions",
    "Message",
    "MqttLink",
    "PublishHandle",
    "parse_broker_url",
]

log = logging.getLogger(__name__)

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
_ROUTE_CACHE = 4096  # topics whose matching handlers are remembered
_READ_AHEAD = 64 * 1024  # bytes asked of the socket at once (see _Client._sock_recv)


def parse_broker_url(url: str) -> tuple[bool, str, int]:
    """``mqtt://host:port`` or ``mqtts://host:port`` -> (tls, host, port); ValueError if not."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in DEFAULT_PORTS or not rest or "/" in rest.rstrip("/"):
        raise ValueError(f"expected mqtt://host:port or mqtts://host:port, got {url!r}")
    rest = rest.rstrip("/")
    if rest.startswith("["):  # an IPv6 literal: [::1]:8883
        host, _, tail = rest[1:].partition("]")
        port_text = tail[1:] if tail.startswith(":") else ""
    else:
        host, _, port_text = rest.rpartition(":") if ":" in rest else (rest, "", "")
    if not host:
        raise ValueError(f"expected mqtt://host:port or mqtts://host:port, got {url!r}")
    if not port_text:
        return scheme == "mqtts", host, DEFAULT_PORTS[scheme]
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"port must be 1..65535 in {url!r}")
    return scheme == "mqtts", host, int(port_text)


@dataclass(frozen=True)
class LinkOptions:
    """How to reach the broker. Times are in seconds."""

    url: str
    client_id: str
    username: str | None = None
    password: str | None = None
    ca: Path | None = None  # CA bundle for mqtts://; None means the system store
    cert: Path | None = None  # client certificate (mutual TLS)
    key: Path | None = None
    keepalive: int = 30
    # Retained state topic: "online" on connect, "offline" as the last will and on stop.
    state_topic: str | None = None
    # Builds the state payload (online=True/False); None: the link's own small payload.
    # The agent supplies docs/protocol.md section 8.1's message here.
    state_payload: Callable[[bool], bytes] | None = None
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    max_inflight: int = 100  # QoS 1 messages paho keeps unacknowledged at once
    max_queued: int = 10_000  # hard cap on paho's in-memory queue (outbox bounds it first)
    loop_timeout: float = 0.2  # select() timeout of one network-loop iteration
    stall_timeout: float = 10.0  # a loop that has not beaten for this long is restarted
    watchdog_interval: float = 0.5


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int = 0  # the broker's packet id (QoS 1), for MqttLink.ack
    session: int = 0  # the connection that delivered it: an ack belongs to that one


Handler = Callable[[Message], None]


class Backoff:
    """Exponential backoff with "equal jitter": a delay in [d/2, d], d doubling to a cap."""

    def __init__(self, initial: float, maximum: float, rng: random.Random | None = None) -> None:
        self.initial = initial
        self.maximum = maximum
        self._attempt = 0
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography

    def next(self) -> float:
        ceiling = min(self.maximum, self.initial * (2.0 ** min(self._attempt, 30)))
        self._attempt += 1
        return self._rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self._attempt = 0


class PublishHandle:
    """The fate of one publish: ``acked`` once the broker's PUBACK arrived (QoS 1) or the
    message was written to the socket (QoS 0)."""

    def __init__(self, mid: int, topic: str) -> None:
        self.mid = mid
        self.topic = topic
        # The Event exists only once someone waits: one handle is made per publish on
        # the latency path, and building an Event (a Condition and its lock) costs more
        # there than the rest of the handle; most handles are only ever called back.
        self._event: threading.Event | None = None
        self._acked = False
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[PublishHandle], None]] = []

    @property
    def acked(self) -> bool:
        return self._acked

    def wait(self, timeout: float) -> bool:
        """Wait at most ``timeout`` seconds; True when acknowledged."""
        with self._lock:
            if self._acked:
                return True
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        return event.wait(timeout)

    def on_ack(self, callback: Callable[[PublishHandle], None]) -> None:
        """Call ``callback(handle)`` once acknowledged (now, if it already is). It runs on
        the network thread: keep it short; exceptions are logged, never propagated."""
        with self._lock:
            if not self._acked:
                self._callbacks.append(callback)
                return
        _run_guarded("on_ack", callback, self)

    def _resolve(self) -> None:
        with self._lock:
            self._acked = True
            event = self._event
            callbacks, self._callbacks = self._callbacks, []
        if event is not None:
            event.set()
        for callback in callbacks:
            _run_guarded("on_ack", callback, self)


def _run_guarded(name: str, func: Callable[..., None], *args: Any) -> bool:
    try:
        func(*args)
    except Exception:
        log.exception("exception in MQTT callback %s (ignored, the loop keeps running)", name)
        return False
    return True


class MqttLink:
    """One connection to one broker, kept up in the background.

    ``start()`` begins connecting (and keeps reconnecting); ``publish()`` and
    ``subscribe()`` may be called from any thread; ``stop()`` publishes the offline
    state, disconnects and joins the threads, all within a timeout.
    """

    def __init__(self, options: LinkOptions) -> None:
        try:
            self._tls, self._host, self._port = parse_broker_url(options.url)
        except ValueError as exc:
            raise BrokerError(str(exc)) from exc
        self.options = options
        self.stats: Counter[str] = Counter()
        self._handlers: dict[str, tuple[int, Handler, bool]] = {}  # qos, handler, manual
        # topic -> its handlers: the filters are matched once per topic, not per message
        # (bounded: cleared when it grows past _ROUTE_CACHE or a subscription changes).
        self._routes: dict[str, tuple[list[Handler], bool]] = {}  # handlers, manual ack
        self._lock = threading.Lock()
        self._pending: dict[int, PublishHandle] = {}
        self._early_acks: set[int] = set()  # PUBACKs that beat publish() to the handle
        self._connected = threading.Event()
        self._refused = threading.Event()  # the broker said no (CONNACK) or TLS failed
        self._want_connected = False
        self._last_refusal: str | None = None
        self._backoff = Backoff(options.backoff_initial, options.backoff_max)
        self._stop = threading.Event()
        self._generation = 0
        self._session = 0  # counts successful connections (Message.session)
        self._stall_reported = False
        self._beat = time.monotonic()
        self._retry_at = 0.0  # monotonic time of the next connect attempt
        self._thread: threading.Thread | None = None
        self._watchdog: threading.Thread | None = None
        self._client = self._make_client()

    # ---- construction -------------------------------------------------------------

    def _make_client(self) -> paho.Client:
        o = self.options
        client = _Client(
            CallbackAPIVersion.VERSION2,
            client_id=o.client_id,
            clean_session=False,
            protocol=paho.MQTTv311,
            manual_ack=True,  # see the module docstring: acks follow the work, not receipt
        )
        if o.username is not None:
            client.username_pw_set(o.username, o.password)
        if self._tls:
            client.tls_set_context(self._ssl_context())
        if o.state_topic:
            client.will_set(o.state_topic, self._state_payload(online=False), qos=1, retain=True)
        client.max_inflight_messages_set(o.max_inflight)
        client.max_queued_messages_set(o.max_queued)
        client.on_connect = self._guard("on_connect", self._on_connect)
        client.on_disconnect = self._guard("on_disconnect", self._on_disconnect)
        client.on_message = self._guard("on_message", self._on_message)
        client.on_publish = self._guard("on_publish", self._on_publish)
        client.on_socket_open = self._guard("on_socket_open", self._on_socket_open)
        # With a register-write callback set, publish() from another thread only queues
        # and wakes our select(); without it paho would write to the socket from the
        # caller's thread, racing our network thread.
        client.on_socket_register_write = self._guard("register_write", _ignore_socket)
        return client

    def _ssl_context(self) -> ssl.SSLContext:
        o = self.options
        try:
            context = ssl.create_default_context(cafile=str(o.ca) if o.ca else None)
            if o.cert is not None:
                context.load_cert_chain(str(o.cert), str(o.key) if o.key else None)
        except (OSError, ssl.SSLError) as exc:
            raise BrokerError(f"cannot load TLS files: {exc}") from exc
        return context

    def _state_payload(self, *, online: bool) -> bytes:
        if self.options.state_payload is not None:
            return self.options.state_payload(online)
        body = {"online": online, "client_id": self.options.client_id,
                "timestamp": int(time.time() * 1000)}
        return json.dumps(body, separators=(",", ":")).encode()

    def _guard(self, name: str, func: Callable[..., None]) -> Callable[..., None]:
        def guarded(*args: Any) -> None:
            if not _run_guarded(name, func, *args):
                self.stats[f"callback_errors.{name}"] += 1

        return guarded

    # ---- public surface -----------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self, wait: float | None = 10.0) -> None:
        """Start connecting in the background. With ``wait``, block at most that long for
        the first connection and raise ``BrokerError`` (and stop) if it did not happen."""
        if self._thread is not None:
            raise BrokerError("MqttLink.start() called twice; make a new link instead")
        self._want_connected = True
        self._client.connect_async(self._host, self._port, self.options.keepalive)
        self._start_network_thread()
        self._watchdog = threading.Thread(target=self._watch, name="mqtt-watchdog", daemon=True)
        self._watchdog.start()
        if wait is None or self._wait_first_connection(wait):
            return
        reason = self._last_refusal or "no connection"
        self.stop(timeout=1.0)
        raise BrokerError(f"cannot connect to {self.options.url} within {wait:g}s: {reason}")

    def _wait_first_connection(self, timeout: float) -> bool:
        # A definite refusal ends the wait early; a broker not up yet does not.
        deadline = time.monotonic() + timeout
        while not self._refused.is_set():
            if self._connected.wait(min(0.05, max(0.0, deadline - time.monotonic()))):
                return True
            if time.monotonic() >= deadline:
                return False
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def subscribe(
        self, topic_filter: str, handler: Handler, qos: int = 1, *, ack: str = "auto"
    ) -> None:
        """Route messages matching ``topic_filter`` to ``handler`` (on the network thread;
        its exceptions are logged and counted). Subscriptions are renewed on every
        connect, so they survive a broker that lost our session.

        ``ack="auto"``: a QoS 1 message is acknowledged once its handler returned.
        ``ack="manual"``: the owner calls ``ack(message)`` when it is done with it (a
        handler that raises gets its message acknowledged: it is counted as handled)."""
        _check_qos(qos)
        if ack not in ("auto", "manual"):
            raise ValueError(f"ack must be 'auto' or 'manual', not {ack!r}")
        with self._lock:
            self._handlers[topic_filter] = (qos, handler, ack == "manual")
            self._routes.clear()
        if self.connected:
            result, _mid = self._client.subscribe(topic_filter, qos)
            if result != MQTTErrorCode.MQTT_ERR_SUCCESS and self.connected:
                raise BrokerError(f"subscribe {topic_filter!r}: {paho.error_string(result)}")

    def publish(
        self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False
    ) -> PublishHandle:
        """Send one message. Raises ``BrokerError`` while disconnected (store it in the
        outbox instead) or when paho refuses it; returns a handle to await the ack."""
        _check_qos(qos)
        if not self.connected:
            raise BrokerError(f"not connected to {self.options.url}")
        try:
            info = self._client.publish(topic, payload, qos=qos, retain=retain)
        except ValueError as exc:  # invalid topic, payload too large
            raise BrokerError(f"publish to {topic!r} refused: {exc}") from exc
        # NO_CONN here means we lost the socket after the check above: paho keeps the
        # message and sends it on reconnect, so the handle stays valid (and its mid must
        # be registered, or its late ack would be taken for a future message's).
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            self._forget_mid(info.mid)
            self.stats["publish_errors"] += 1
            raise BrokerError(f"publish to {topic!r}: {paho.error_string(info.rc)}")
        handle = PublishHandle(info.mid, topic)
        with self._lock:
            early = info.mid in self._early_acks
            if early:
                self._early_acks.discard(info.mid)
            else:
                self._pending[info.mid] = handle
        if early:
            handle._resolve()
        self.stats["published"] += 1
        return handle

    def ack_many(self, messages: list[Message]) -> int:
        """Acknowledge several ``manual`` messages (any thread) and push the PUBACKs out:
        one write for all of them, from the calling thread when it can (plain TCP),
        otherwise one wake-up of the network thread. Returns how many were acknowledged;
        the rules of ``ack`` apply to each."""
        client = self._client
        mids: list[int] = []
        for message in messages:
            if message.qos == 0 or message.mid == 0:
                continue
            if message.session != self._session or not self.connected:
                self.stats["stale_acks"] += 1
                continue
            mids.append(message.mid)
        if not mids:
            return 0
        if isinstance(client, _Client):
            client.queue_pubacks(mids)
            if not self.flush():
                client.wake()
        else:
            for mid in mids:  # QoS 1: subscriptions never ask for 2
                client.ack(mid, 1)
        return len(mids)

    def ack(self, message: Message) -> bool:
        """Acknowledge a message received on a ``manual`` subscription (any thread).

        An ack for a message of an earlier connection is dropped: the broker redelivers
        that message on the new one, where it is acknowledged in turn. True if sent (or
        queued for the network thread)."""
        return self.ack_many([message]) == 1

    def input_waiting(self) -> bool:
        """More bytes from the broker are already waiting on the socket (evidence of
        load: the caller should queue work rather than hold the network thread)."""
        sock = self._client.socket()
        if sock is None:
            return False
        client = self._client
        if isinstance(client, _Client) and client.buffered():
            return True
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        try:
            readable, _w, _x = select.select([sock], [], [], 0)
        except (OSError, ValueError):  # closed under us: the network thread sorts it out
            return False
        return bool(readable)

    def flush(self) -> bool:
        """Write what ``publish`` queued from the calling thread, now, instead of waking
        the network thread to do it (one thread hand-off less on the latency path).

        Only on plain TCP: a kernel socket takes a send and a receive from two threads at
        once, an SSL object does not (there the network thread writes, as always). Writes
        are serialised by the client's write lock and the socket is non-blocking, so the
        network thread never waits longer than one ``send()``; a write error is left in
        place for the network thread, which owns reconnects. True if it wrote."""
        client = self._client
        if self._tls or not self.connected or not isinstance(client, _Client):
            return False
        return client.write_now()

    def unsubscribe(self, topic_filter: str) -> None:
        with self._lock:
            self._handlers.pop(topic_filter, None)
            self._routes.clear()
        if self.connected:
            self._client.unsubscribe(topic_filter)

    def in_flight(self) -> int:
        with self._lock:
            return len(self._pending)

    def healthy(self) -> bool:
        """The network thread is alive and beating (connected or trying to)."""
        thread = self._thread
        stale = time.monotonic() - self._beat > self.options.stall_timeout
        return thread is not None and thread.is_alive() and not stale

    def stop(self, timeout: float = 5.0) -> None:
        """Publish the offline state, disconnect cleanly and join the threads (bounded)."""
        if self._stop.is_set():
            return  # already stopped
        deadline = time.monotonic() + timeout
        if self.connected and self.options.state_topic:
            with contextlib.suppress(BrokerError):
                handle = self.publish(
                    self.options.state_topic, self._state_payload(online=False), 1, True
                )
                handle.wait(max(0.0, (deadline - time.monotonic()) / 2))
        self._want_connected = False
        self._client.disconnect()
        # The network thread sends DISCONNECT and closes the socket; give it a moment.
        while self._client.socket() is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        self._stop.set()
        for thread in (self._thread, self._watchdog):
            if thread is not None and thread is not threading.current_thread():
                thread.join(max(0.1, deadline - time.monotonic()))
        self._connected.clear()
        sock = self._client.socket()
        if sock is not None:  # the broker never answered our DISCONNECT: just close
            with contextlib.suppress(OSError):
                sock.close()

    # ---- network thread and watchdog ---------------------------------------------

    def _start_network_thread(self) -> None:
        self._stall_reported = False
        self._generation += 1
        self._beat = time.monotonic()
        self._thread = threading.Thread(
            target=self._run, args=(self._generation,), name="mqtt-network", daemon=True
        )
        self._thread.start()

    def _run(self, generation: int) -> None:
        if isinstance(self._client, _Client):
            self._client.loop_thread = threading.get_ident()
        while not self._stop.is_set() and generation == self._generation:
            self._beat = time.monotonic()
            try:
                self._step()
            except Exception:  # never let the thread die; the watchdog is the backstop
                self.stats["loop_errors"] += 1
                log.exception("MQTT network loop iteration failed")
                self._stop.wait(self._backoff.next())

    def _step(self) -> None:
        if self._client.socket() is None:
            if not self._want_connected:
                self._stop.wait(self.options.loop_timeout)
                return
            self._connect_once()
            return
        rc = self._client.loop(timeout=self.options.loop_timeout)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS and self._client.socket() is None:
            self._connected.clear()

    def _connect_once(self) -> None:
        # Wait in short slices so the thread keeps beating for the watchdog.
        remaining = self._retry_at - time.monotonic()
        if remaining > 0:
            self._stop.wait(min(remaining, self.options.loop_timeout))
            return
        self.stats["connect_attempts"] += 1
        if isinstance(self._client, _Client):
            self._client.tls_alert = None
        try:
            self._client.reconnect()
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            self._last_refusal = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, ssl.SSLError):
                self._refused.set()
            delay = self._schedule_retry()
            log.info("MQTT connect to %s failed (%s); retry in %.1fs", self.options.url,
                     self._last_refusal, delay)

    def _schedule_retry(self) -> float:
        delay = self._backoff.next()
        self._retry_at = time.monotonic() + delay
        return delay

    def _watch(self) -> None:
        while not self._stop.wait(self.options.watchdog_interval):
            thread = self._thread
            if thread is None or not thread.is_alive():
                self.stats["loop_restarts"] += 1
                log.error("MQTT network loop died; starting a new one")
                self._start_network_thread()
                continue
            stalled = time.monotonic() - self._beat > self.options.stall_timeout
            if stalled and not self._stall_reported:
                # A second loop must never run while this one lives: two threads reading
                # one paho socket corrupt the stream. A loop stuck inside paho or a
                # handler is reported by healthy(); the agent exits so systemd restarts it.
                self._stall_reported = True
                self.stats["loop_stalls"] += 1
                log.error("MQTT network loop has not beaten for %.1f s", self.options.stall_timeout)
            elif not stalled:
                self._stall_reported = False

    # ---- paho callbacks (all guarded) ---------------------------------------------

    def _on_socket_open(self, _client: paho.Client, _userdata: object, sock: Any) -> None:
        # paho's socket may be a TLS wrapper; setsockopt reaches the TCP socket below it.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_connect(
        self, client: paho.Client, _userdata: object, flags: Any, reason: Any, _props: Any
    ) -> None:
        if reason.is_failure:
            self._last_refusal = f"broker refused the connection: {reason}"
            self.stats["connect_refused"] += 1
            self._refused.set()
            # paho closes the socket and calls on_disconnect next, which schedules the
            # retry: a refusal (bad credentials) is retried with the growing backoff.
            return
        self._backoff.reset()
        self._session += 1
        self._last_refusal = None
        self._refused.clear()
        self.stats["connects"] += 1
        with self._lock:
            subscriptions = [(f, q) for f, (q, _h, _m) in self._handlers.items()]
        if subscriptions:
            client.subscribe(subscriptions)
        if self.options.state_topic:
            client.publish(self.options.state_topic, self._state_payload(online=True), 1, True)
        log.info("MQTT connected to %s (session present: %s)", self.options.url,
                 flags.session_present)
        self._connected.set()

    def _on_disconnect(
        self, _client: paho.Client, _userdata: object, _flags: Any, reason: Any, _props: Any
    ) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        # Back off before the next attempt, also after a connection that never got its
        # CONNACK (else a broker that drops us at once is hammered in a tight loop), and
        # jitter even the first retry: after a broker restart every gateway of the plant
        # loses its connection at the same instant.
        self._schedule_retry()
        alert = getattr(self._client, "tls_alert", None)
        if alert is not None and not was_connected:
            self._last_refusal = f"TLS alert from the broker: {alert}"
            self._client.tls_alert = None  # type: ignore[attr-defined]
            self._refused.set()
        if was_connected:
            self.stats["disconnects"] += 1
            level = logging.WARNING if self._want_connected else logging.INFO
            log.log(level, "MQTT disconnected from %s: %s", self.options.url, reason)

    def _on_message(self, _client: paho.Client, _userdata: object, msg: Any) -> None:
        message = Message(msg.topic, bytes(msg.payload), int(msg.qos), bool(msg.retain),
                          int(msg.mid), self._session)
        route = self._routes.get(message.topic)
        if route is None:
            with self._lock:
                matching = [(h, m) for f, (_q, h, m) in self._handlers.items()
                            if paho.topic_matches_sub(f, message.topic)]
                route = ([h for h, _m in matching], any(m for _h, m in matching))
                if len(self._routes) >= _ROUTE_CACHE:
                    self._routes.clear()
                self._routes[message.topic] = route
        handlers, manual = route
        failed = False
        for handler in handlers:
            if not _run_guarded("handler", handler, message):
                self.stats["handler_errors"] += 1
                failed = True
        if message.qos and (failed or not manual):
            self._client.ack(message.mid, message.qos)

    def _on_publish(
        self, _client: paho.Client, _userdata: object, mid: int, _reason: Any, _props: Any
    ) -> None:
        with self._lock:
            handle = self._pending.pop(mid, None)
            if handle is None:
                self._early_acks.add(mid)
        if handle is not None:
            handle._resolve()

    def _forget_mid(self, mid: int) -> None:
        with self._lock:
            self._early_acks.discard(mid)


class _Client(paho.Client):
    """paho's client with its socket writes under a lock, so that a thread other than
    the network thread may push queued packets out (``MqttLink.flush``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._write_lock = threading.RLock()
        # paho holds this (a plain Lock) around every callback, and takes it again to
        # call on_publish when a QoS 0 message has been written. A handler that writes
        # (the agent answers a lone message on the network thread, then flushes) would
        # wait on itself forever; re-entrant, it runs the nested on_publish instead.
        self._in_callback_mutex = threading.RLock()  # type: ignore[assignment]
        # Read-ahead: paho asks the socket for 1 byte (command), 1-4 (length), then the
        # rest, one packet per select(): four system calls per message. One large recv
        # fills this buffer and paho's small reads are served from it.
        self._rbuf = b""
        self._rpos = 0
        # The thread that runs loop() (MqttLink's network thread), see _packet_queue.
        self.loop_thread: int | None = None
        # The TLS alert that ended the last connection (a broker refusing a missing or
        # untrusted client certificate alerts after the handshake, on the first read;
        # paho only logs it), so that a failed first connection can say why.
        self.tls_alert: ssl.SSLError | None = None

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._rpos >= len(self._rbuf):
            try:
                data = super()._sock_recv(max(bufsize, _READ_AHEAD))
            except ssl.SSLError as exc:
                if not isinstance(exc, ssl.SSLWantReadError | ssl.SSLWantWriteError):
                    self.tls_alert = exc
                raise
            if len(data) <= bufsize:
                return data
            self._rbuf, self._rpos = data, 0
        end = self._rpos + bufsize
        chunk = self._rbuf[self._rpos : end]
        self._rpos = min(end, len(self._rbuf))
        return chunk

    def buffered(self) -> int:
        """Bytes read ahead from the socket and not parsed yet."""
        return len(self._rbuf) - self._rpos

    def _drop_read_ahead(self) -> None:
        self._rbuf, self._rpos = b"", 0

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        rc = super().loop_read(max_packets)
        # select() cannot see what is already in the buffer: parse it now. Each turn
        # consumes at least one buffered byte, or empties the buffer and stops.
        while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and self.buffered() and self._sock:
            rc = super().loop_read(1)
        return rc

    def _packet_queue(
        self,
        command: int,
        packet: bytes | bytearray,
        mid: int,
        qos: int,
        info: paho.MQTTMessageInfo | None = None,
    ) -> MQTTErrorCode:
        if threading.get_ident() != self.loop_thread:
            return super()._packet_queue(command, packet, mid, qos, info)
        # Queued by the network thread itself (a lone message answered inline, the ack of
        # an input): it is not waiting in select(), so paho's wake-up byte on its socket
        # pair would cost a send() before the packet's own and an idle select()+recv()
        # turn afterwards. Another thread queuing meanwhile needs no wake-up either: the
        # network thread is awake and sees the queued packet when it returns to select().
        wake, self._sockpairW = self._sockpairW, None
        try:
            return super()._packet_queue(command, packet, mid, qos, info)
        finally:
            if self._sockpairW is None and wake is not None and wake.fileno() != -1:
                self._sockpairW = wake

    def queue_pubacks(self, mids: list[int]) -> None:
        """Queue the PUBACKs of ``mids`` as ONE packet write (MQTT 3.1.1's PUBACK is fixed:
        0x40, length 2, the message id; paho keeps no state for inbound QoS 1). paho's
        ``ack()`` queues each on its own -- a send() per ack and, from a thread other than
        the network thread, a wake-up byte per ack -- which under load costs more than
        answering the message. The caller writes it (``write_now``) or ``wake``s."""
        packet = b"".join([_PUBACK.pack(paho.PUBACK, 2, mid) for mid in mids])
        self._out_packet.append({
            "command": paho.PUBACK, "mid": 0, "qos": 0, "pos": 0,
            "to_process": len(packet), "packet": packet, "info": None,
        })

    def wake(self) -> None:
        """Make the network thread leave select() to write what is queued (unless the
        caller is that thread: it will see the queue when it gets back to select())."""
        pair = self._sockpairW
        if pair is None or threading.get_ident() == self.loop_thread:
            return
        with contextlib.suppress(OSError):  # full (a wake-up is pending anyway) or closed
            pair.send(b"0")

    # Everything that writes to, closes or replaces the socket holds the write lock, so
    # a flush can never write to a closed socket, a reused descriptor or a new
    # connection before its CONNECT.
    def _packet_write(self) -> MQTTErrorCode:
        with self._write_lock:
            return super()._packet_write()

    def _sock_close(self) -> None:
        with self._write_lock:
            super()._sock_close()
            self._drop_read_ahead()  # never parse a dead connection's bytes on a new one

    def reconnect(self) -> MQTTErrorCode:
        with self._write_lock:
            self._drop_read_ahead()
            return super().reconnect()

    def write_now(self) -> bool:
        if self._sock is None or not self._out_packet:
            return False
        # Never wait, for either lock. The callback lock first, as paho's own publish
        # does before it writes: writing a QoS 0 PUBLISH makes paho take it to report
        # on_publish, so a writer from another thread waited for the network thread's
        # current callback to end -- while holding what that callback may need (the
        # outbox lock: both threads hung for good under a burst). Busy in a callback,
        # the network thread writes what is queued as soon as it is back in its loop
        # (paho selects for writing while packets wait); holding the write lock, it is
        # writing (or reconnecting) itself.
        if not self._in_callback_mutex.acquire(blocking=False):
            return False
        try:
            if not self._write_lock.acquire(blocking=False):
                return False
            try:
                if self._sock is None:
                    return False
                # Errors (AGAIN, a lost connection) leave the packet queued: the network
                # thread's next loop_write sees the same condition and handles it.
                self._packet_write()
            finally:
                self._write_lock.release()
        finally:
            self._in_callback_mutex.release()
        return True


_PUBACK = struct.Struct("!BBH")  # fixed header, remaining length 2, message id


def _ignore_socket(_client: paho.Client, _userdata: object, _sock: Any) -> None:
    """paho's select() is woken through its socket pair; nothing else to register."""


def _check_qos(qos: int) -> None:
    if qos not in (0, 1):
        raise BrokerError(f"QoS {qos} is not supported; use 0 or 1 (QoS 2 is avoided)")
