"""A scripted MQTT 3.1.1 broker for network fault tests: it cuts connections at exact packets.

Just enough of MQTT 3.1.1 for paho and the agent: CONNECT/CONNACK, SUBSCRIBE/SUBACK (with
retained messages delivered on subscribe), UNSUBSCRIBE/UNSUBACK, PUBLISH QoS 0/1 both ways
with PUBACK, PINGREQ/PINGRESP, DISCONNECT. Retained messages are kept; sessions are not (the
agent re-subscribes on every connection, which is what is under test).

Faults are scripted on the broker object, each consumed once when it fires:

- ``cut_after_connect = n``: the next n CONNECTs are read, then the socket is closed with no
  CONNACK;
- ``cut_before_puback``: a set of topic suffixes; the next client PUBLISH on such a topic is
  stored (the broker got it) but the socket is closed before the PUBACK;
- ``cut_mid_publish``: a set of topic substrings; the next outgoing PUBLISH whose topic
  matches is sent 0.5 s later, cut after half of its bytes;
- ``trickle``: (topic substring, seconds): that outgoing PUBLISH is sent in small pieces
  spread over ``seconds``.

Everything is logged in ``log`` as (event, detail) for assertions.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from dataclasses import dataclass, field


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _packet(kind: int, flags: int, body: bytes) -> bytes:
    return bytes([kind << 4 | flags]) + _remaining_length(len(body)) + body


def _string(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("!H", len(raw)) + raw


def matches(pattern: str, topic: str) -> bool:
    p, t = pattern.split("/"), topic.split("/")
    for i, part in enumerate(p):
        if part == "#":
            return True
        if i >= len(t) or (part != "+" and part != t[i]):
            return False
    return len(p) == len(t)


class _ClosedError(Exception):
    pass


@dataclass
class _Conn:
    sock: socket.socket
    subs: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    next_mid: int = 0


class ScriptedBroker:
    def __init__(self) -> None:
        self.server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(16)
        self.port = self.server.getsockname()[1]
        self.retained: dict[str, bytes] = {}
        self.received: list[tuple[str, bytes]] = []  # client PUBLISHes the broker accepted
        self.log: list[tuple[str, str]] = []
        self.cut_after_connect = 0
        self.cut_before_puback: set[str] = set()
        self.cut_mid_publish: set[str] = set()
        self.trickle: tuple[str, float] | None = None
        self._conns: list[_Conn] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True, name="scripted-broker")
        self._thread.start()

    # ---- plumbing ---------------------------------------------------------------------

    def _accept(self) -> None:
        self.server.settimeout(0.2)
        while not self._stop.is_set():
            try:
                sock, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(sock)
            with self._lock:
                self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self.server.close()
        with self._lock:
            for c in self._conns:
                with contextlib.suppress(OSError):
                    c.sock.close()

    def connections(self) -> int:
        return sum(1 for e, _ in self.log if e == "connack")

    @staticmethod
    def _read_exact(sock: socket.socket, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise _ClosedError
            buf += chunk
        return buf

    def _read_packet(self, sock: socket.socket) -> tuple[int, int, bytes]:
        first = self._read_exact(sock, 1)[0]
        mult, length = 1, 0
        while True:
            b = self._read_exact(sock, 1)[0]
            length += (b & 0x7F) * mult
            if not b & 0x80:
                break
            mult *= 128
        return first >> 4, first & 0x0F, self._read_exact(sock, length)

    def _cut(self, conn: _Conn, why: str) -> None:
        self.log.append(("cut", why))
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_RDWR)
        conn.sock.close()
        raise _ClosedError

    def _send(self, conn: _Conn, data: bytes) -> None:
        with conn.lock:
            conn.sock.sendall(data)

    def _deliver(self, conn: _Conn, topic: str, payload: bytes, retain: bool) -> None:
        conn.next_mid = conn.next_mid % 65535 + 1
        body = _string(topic) + struct.pack("!H", conn.next_mid) + payload
        data = _packet(3, 0x02 | (1 if retain else 0), body)
        mid_cut = next((s for s in self.cut_mid_publish if s in topic), None)
        if mid_cut is not None:
            self.cut_mid_publish.discard(mid_cut)
            # after a pause, on its own thread: the client meanwhile handles what it got
            threading.Thread(target=self._cut_mid, args=(conn, data, topic), daemon=True).start()
            return
        if self.trickle is not None and self.trickle[0] in topic:
            _, seconds = self.trickle
            self.trickle = None
            self.log.append(("trickle", topic))
            # on its own thread: the connection keeps answering PINGREQs meanwhile
            threading.Thread(
                target=self._trickle, args=(conn, data, seconds, topic), daemon=True
            ).start()
            return
        self._send(conn, data)
        self.log.append(("sent", topic))

    def _cut_mid(self, conn: _Conn, data: bytes, topic: str) -> None:
        time.sleep(0.5)
        with contextlib.suppress(OSError, _ClosedError), conn.lock:
            conn.sock.sendall(data[: len(data) // 2])
            self._cut(conn, f"mid-publish {topic}")

    def _trickle(self, conn: _Conn, data: bytes, seconds: float, topic: str) -> None:
        pieces = 20
        step = max(1, len(data) // pieces)
        with contextlib.suppress(OSError), conn.lock:
            for i in range(0, len(data), step):
                conn.sock.sendall(data[i : i + step])
                time.sleep(seconds / pieces)
            self.log.append(("trickled", topic))

    # ---- the protocol -----------------------------------------------------------------

    def _serve(self, conn: _Conn) -> None:
        try:
            while not self._stop.is_set():
                kind, flags, body = self._read_packet(conn.sock)
                self._handle(conn, kind, flags, body)
        except (_ClosedError, OSError):
            pass
        finally:
            with self._lock:
                if conn in self._conns:
                    self._conns.remove(conn)
            with contextlib.suppress(OSError):
                conn.sock.close()

    def _handle(self, conn: _Conn, kind: int, flags: int, body: bytes) -> None:
        if kind == 1:  # CONNECT
            self.log.append(("connect", ""))
            if self.cut_after_connect > 0:
                self.cut_after_connect -= 1
                self._cut(conn, "after CONNECT")
            self._send(conn, _packet(2, 0, b"\x00\x00"))
            self.log.append(("connack", ""))
        elif kind == 3:  # PUBLISH from the client
            qos, retain = (flags >> 1) & 3, flags & 1
            n = struct.unpack("!H", body[:2])[0]
            topic = body[2 : 2 + n].decode()
            pos = 2 + n
            mid = None
            if qos:
                mid = struct.unpack("!H", body[pos : pos + 2])[0]
                pos += 2
            payload = body[pos:]
            self.received.append((topic, payload))
            if retain:
                if payload:
                    self.retained[topic] = payload
                else:
                    self.retained.pop(topic, None)
            with self._lock:
                others = [c for c in self._conns if c is not conn]
            for other in [conn, *others]:
                if any(matches(s, topic) for s in other.subs):
                    with contextlib.suppress(OSError, _ClosedError):
                        self._deliver(other, topic, payload, False)
            suffix = next((s for s in self.cut_before_puback if topic.endswith(s)), None)
            if suffix is not None:
                self.cut_before_puback.discard(suffix)
                self._cut(conn, f"before PUBACK {topic}")
            if mid is not None:
                self._send(conn, _packet(4, 0, struct.pack("!H", mid)))
        elif kind == 8:  # SUBSCRIBE
            mid = body[:2]
            pos, granted, filters = 2, b"", []
            while pos < len(body):
                n = struct.unpack("!H", body[pos : pos + 2])[0]
                f = body[pos + 2 : pos + 2 + n].decode()
                pos += 2 + n + 1
                granted += b"\x01"
                filters.append(f)
                conn.subs.add(f)
                self.log.append(("subscribe", f))
            self._send(conn, _packet(9, 0, mid + granted))
            for f in filters:
                for topic, payload in list(self.retained.items()):
                    if matches(f, topic):
                        self._deliver(conn, topic, payload, True)
        elif kind == 10:  # UNSUBSCRIBE
            mid, pos = body[:2], 2
            while pos < len(body):
                n = struct.unpack("!H", body[pos : pos + 2])[0]
                f = body[pos + 2 : pos + 2 + n].decode()
                conn.subs.discard(f)
                self.log.append(("unsubscribe", f))
                pos += 2 + n
            self._send(conn, _packet(11, 0, mid))
        elif kind == 12:  # PINGREQ
            self._send(conn, _packet(13, 0, b""))
        elif kind == 14:  # DISCONNECT
            raise _ClosedError
        # PUBACK (4) from the client for our deliveries: nothing to do
