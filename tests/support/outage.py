"""Issue 6.6: the agent process the outage test kills, and the test's view of its files.

Run as a script, this is one *incarnation* of a gateway::

    python -m tests.support.outage produce CONFIG JOURNAL --incarnation K --start N --rate R
    python -m tests.support.outage drain CONFIG JOURNAL --incarnation K

It is the real ``edge_agent.agent.Agent`` (store, engine, SQLite outbox, pump, ``MqttLink``)
started on the config's state directory. ``produce`` submits sensor messages at a steady
``R`` per second through ``engine.submit`` (what paho's callback calls; the broker is down,
so nothing comes in over MQTT), message ``i`` being ``sensor_body(i)`` for ``i = N, N+1,
...``: a deterministic input generator. ``drain`` produces nothing (the last incarnation,
once the broker is back). The test SIGKILLs the process at random moments.

The journal (one JSON object per line, appended and flushed: a SIGKILL keeps the page
cache) records, for every micro-batch of predictions the engine hands to the outbox:

- ``{"k": "intent", ...}`` just *before* ``Outbox.put_many`` (through the pump);
- ``{"k": "ok", ...}`` once the outbox committed them (the store's ``committed``
  callback): the predictions are durably accepted.

Both carry ``items``: one list per outbox entry (a message; with
``batching.group_predictions`` it holds a micro-batch's predictions), of ``[seq, i]`` per
prediction (its sequence number and the index of the sensor message it answers). A kill
between the two leaves an intent without its ok; the test then looks at the newest
prediction in the outbox file (the process is dead) to tell whether that transaction
committed. ``{"k": "event"}`` / ``{"k": "state"}`` lines record the other entries the agent
puts in its outbox (none are expected during the outage). Status lines (``{"k":
"status", ...}``) carry the telemetry snapshot's ``outbox`` block, the link state and how
many messages were submitted: every 0.5 s, once right after ``start()``, and every 0.1 s
while ``--after-disconnect`` waits for the outage.

Each incarnation has its own journal file: a line torn by the SIGKILL is its last one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

FEATURES = ["vibration", "temperature", "pressure", "current"]
TOPIC = "plant/line1/a/sensors"


def sensor_body(i: int) -> bytes:
    """Sensor message ``i``: a pure function of ``i`` (no clock, no randomness)."""
    body: dict[str, Any] = {
        f: round(((i * 37 + k * 11) % 1000) / 100.0 - 5.0, 2) for k, f in enumerate(FEATURES)
    }
    body["id"] = f"m{i}"
    return json.dumps(body).encode()


def index_of(prediction: dict[str, Any]) -> int:
    return int(prediction["source"]["id"][1:])


def predictions_in(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The predictions of one message: itself, or each entry of a grouped message
    (``batching.group_predictions``: ``{...envelope, "batch": [entries]}``)."""
    if "batch" not in body:
        return [body]
    envelope = {k: v for k, v in body.items() if k != "batch"}
    return [{**envelope, **entry} for entry in body["batch"]]


# ---- the child --------------------------------------------------------------------------


class _Journal:
    def __init__(self, path: Path, incarnation: int) -> None:
        self._file: IO[str] = path.open("a", encoding="utf-8")
        self._lock = threading.Lock()
        self.incarnation = incarnation

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps({**record, "inc": self.incarnation}, separators=(",", ":")) + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()  # into the page cache: survives SIGKILL (not a power cut)


def _make_agent(config_path: Path, journal: _Journal) -> Any:
    from edge_agent.agent import Agent
    from edge_agent.config import load_config

    class JournalingAgent(Agent):
        """The real agent; only the hand-off of predictions to the outbox is observed."""

        def _store_predictions(
            self,
            items: list[tuple[str, bytes]],
            on_sent: Callable[[], None] | None = None,
            committed: Callable[[], None] | None = None,
            defer: bool = False,
        ) -> None:
            got = [  # per outbox entry (message): [seq, index] per prediction in it
                [[int(p["seq"]), index_of(p)] for p in predictions_in(json.loads(payload))]
                for _topic, payload in items
            ]
            journal.write({"k": "intent", "items": got})

            def done() -> None:  # durable: the outbox committed them (deferred or not)
                journal.write({"k": "ok", "items": got})
                if committed is not None:
                    committed()

            super()._store_predictions(items, on_sent, done, defer)

        def emit(self, kind: str, code: str, message: str, **context: Any) -> None:
            super().emit(kind, code, message, **context)
            journal.write({"k": "event", "kind": kind, "code": code, "message": message})

        def publish_state(self) -> None:
            super().publish_state()
            journal.write({"k": "state"})

    return JournalingAgent(load_config(config_path))


def _status(agent: Any, journal: _Journal, submitted: int) -> None:
    link = agent.link
    journal.write(
        {
            "k": "status",
            "t": time.time(),
            "pid": os.getpid(),
            "connected": bool(link is not None and link.connected),
            "submitted": submitted,
            "pending": agent.engine.pending(),
            "input_errors": dict(agent.input_errors),
            "outbox": agent.telemetry_snapshot(1.0)["outbox"],
        }
    )


def _die_with_parent() -> None:
    """SIGKILL this process when the test process dies (a failed or timed-out test
    leaves no agent running). Linux only; elsewhere a no-op."""
    with contextlib.suppress(Exception):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent was already gone
            os._exit(1)


def child_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.support.outage")
    parser.add_argument("mode", choices=["produce", "drain"])
    parser.add_argument("config", type=Path)
    parser.add_argument("journal", type=Path)
    parser.add_argument("--incarnation", type=int, required=True)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument(
        "--after-disconnect",
        action="store_true",
        help="produce only once the link has been connected and then lost (the outage)",
    )
    args = parser.parse_args(argv)
    _die_with_parent()
    journal = _Journal(args.journal, args.incarnation)
    agent = _make_agent(args.config, journal)
    agent.start()
    _status(agent, journal, 0)
    if args.after_disconnect:  # online first (the test waits for an empty outbox)
        online = False
        while not online or agent.link.connected:
            online = online or agent.link.connected
            _status(agent, journal, 0)
            time.sleep(0.1)
        _status(agent, journal, 0)
    submitted = 0
    t0 = last_status = time.monotonic()
    while True:
        now = time.monotonic()
        if args.mode == "produce":
            due = int((now - t0) * args.rate)
            while submitted < due:
                agent.engine.submit(TOPIC, sensor_body(args.start + submitted))
                submitted += 1
        if now - last_status >= 0.5:
            last_status = now
            _status(agent, journal, submitted)
        time.sleep(0.005)


# ---- the test's side ----------------------------------------------------------------------


class Consumer:
    """A persistent-session (clean_session=False) QoS 1 subscriber that keeps every message
    as it came (one grouped predictions message stays one: drop-oldest works on outbox
    entries, so the capacity case compares messages, not predictions)."""

    def __init__(self, port: int, client_id: str, *filters: str) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.messages: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False
        )
        self.client.on_connect = lambda c, *_a: c.subscribe([(f, 1) for f in filters])
        self.client.on_subscribe = lambda *_a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(1, 1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self._subscribed.wait(10), "consumer did not subscribe"

    def _on_message(self, _client: Any, _userdata: Any, msg: Any) -> None:
        body = json.loads(msg.payload)
        with self._lock:
            self.messages.append((msg.topic, body))

    def on(self, suffix: str) -> list[dict[str, Any]]:
        with self._lock:
            return [b for t, b in self.messages if t.endswith(suffix)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class Incarnation:
    number: int
    start: int  # index of its first sensor message
    pid: int = 0
    rss_kb: list[int] = field(default_factory=list)
    statuses: list[dict[str, Any]] = field(default_factory=list)
    # Outbox entries (messages), each a list of (seq, index): journaled ok, or committed
    # and killed before its ok line (recovered from the outbox file).
    accepted: list[list[tuple[int, int]]] = field(default_factory=list)
    recovered: list[list[tuple[int, int]]] = field(default_factory=list)
    submitted: int = 0
    others: list[dict[str, Any]] = field(default_factory=list)  # events, state: other entries

    @property
    def messages(self) -> list[list[tuple[int, int]]]:
        return self.accepted + self.recovered

    @property
    def stored(self) -> list[tuple[int, int]]:
        """Every prediction stored, (seq, index)."""
        return [p for message in self.messages for p in message]


def read_journal(path: Path) -> list[dict[str, Any]]:
    """Every complete line; a line torn by SIGKILL (no newline, bad JSON) is skipped."""
    out: list[dict[str, Any]] = []
    if not path.exists():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def rss_kb(pid: int) -> int | None:
    """VmRSS of ``pid`` from /proc, in kB (None once it is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None


def outbox_files_bytes(state_dir: Path) -> int:
    """Bytes on disk of the outbox: the database, its WAL and shared-memory index."""
    total = 0
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(OSError):
            total += (state_dir / f"outbox.db{suffix}").stat().st_size
    return total


def outbox_on_disk(db: Path, prediction_topic: str) -> dict[str, Any]:
    """What the (dead) agent left in its outbox file, read read-only: the persisted
    dropped counter, depth, logical bytes and the newest prediction's ``seq``.

    Read-only so that closing this connection does not checkpoint or delete the WAL:
    the next incarnation finds the files exactly as the SIGKILL left them."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        dropped = conn.execute("SELECT value FROM counters WHERE name = 'dropped'").fetchone()
        depth, size = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM entries"
        ).fetchone()
        newest = conn.execute(
            "SELECT payload FROM entries WHERE topic = ? ORDER BY id DESC LIMIT 1",
            (prediction_topic,),
        ).fetchone()
    finally:
        conn.close()
    return {
        "dropped": int(dropped[0]),
        "depth": int(depth),
        "bytes": int(size),
        "newest_seq": None
        if newest is None
        else max(int(p["seq"]) for p in predictions_in(json.loads(newest[0]))),
    }


def settle(inc: Incarnation, records: list[dict[str, Any]], newest_seq: int | None) -> None:
    """Fill ``inc`` from its journal records once the process is dead.

    An ``intent`` without its ``ok`` was cut by the kill: it counts as stored when the
    outbox's newest prediction belongs to it (one transaction: all or none)."""
    pending: list[list[tuple[int, int]]] | None = None
    for rec in records:
        if rec.get("inc") != inc.number:
            continue
        kind = rec["k"]
        if kind == "status":
            inc.statuses.append(rec)
            inc.submitted = max(inc.submitted, int(rec["submitted"]))
        elif kind in ("event", "state"):
            inc.others.append(rec)
        elif kind == "intent":
            assert pending is None, "two intents without an ok: batches overlap"
            pending = [[(int(s), int(i)) for s, i in m] for m in rec["items"]]
        elif kind == "ok":
            items = [[(int(s), int(i)) for s, i in m] for m in rec["items"]]
            assert items == pending, "an ok that does not match its intent"
            inc.accepted += items
            pending = None
    if pending and newest_seq is not None and newest_seq in {s for m in pending for s, _ in m}:
        inc.recovered = pending


if __name__ == "__main__":
    child_main(sys.argv[1:])
