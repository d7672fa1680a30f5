"""Issue 6.10 and 3.11 through the broker: generated sensor payloads against a running agent.

tests/test_fuzz_inputs.py enters at ``engine.submit``; this one goes the whole way. A real
``edge_agent.agent.Agent`` (its ``MqttLink``, outbox pump, updater, batching and telemetry
threads) runs against a real Mosquitto; its model (a real ONNX graph from
tests/support/faults.py) arrives over MQTT as retained chunks and a signed manifest. A
plain paho client then publishes a Hypothesis-generated corpus on the agent's input filter
``plant/line1/+/sensors``, one topic per payload (``plant/line1/c<N>/sensors``), so that
every outcome seen on the broker names the payload it answers.

The corpus mixes good messages (one object, a list of rows, ``{"rows": [...]}``; ints for
doubles; extra fields of any JSON type, which must be ignored; non-ASCII keys; a payload of
exactly the configured limit) with bad ones of every family the input layer knows: bad
UTF-8, truncated JSON, deep nesting (top level and inside a field), NaN/Infinity literals,
1e999 in a feature and in ``ts``, values beyond float32, wrong types (string, boolean,
array, object), null, missing fields, scalars, empty lists and rows, ``rows`` not a list,
a non-object row, a bad ``id``, payloads over ``[limits].max_payload_bytes``; and
batches with one bad row among good ones. Messages on topics no model reads are published
too (the agent does not subscribe to them: nothing may come back for them).

Checked from what arrives on MQTT only (a collector on ``lineside/devices/gw-1/#``):

- each bad payload: exactly one ``error`` event on the device's events topic whose
  ``code`` is the expected kind and whose ``field`` is the expected field (absent when no
  field is to blame); no prediction;
- each good payload: exactly one prediction, with the right row count and finite outputs;
  predictions arrive in publish order with increasing ``seq``;
- a partial batch: one prediction (``rows`` good, ``rejected_rows`` 1) and one event;
- the per-kind error counters in telemetry (``input_errors`` and the model's
  ``errors_total``) equal the corpus's counts;
- afterwards the link is healthy and a good message is still answered.

The event rate limiter is lifted (``Agent(error_events_per_s=...)``) so that every event is
visible; ``test_rate_limited_error_events_account_for_every_bad_payload`` keeps the default
limiter and checks its accounting exactly: published events plus their ``suppressed``
counts equal the bad payloads sent, per kind.

Counts: 600 payloads by default (about 10 s here), 5,000 under ``-m slow`` (about 90 s).
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.agent import Agent
from edge_agent.config import load_config
from registry_sync.signing import key_id, public_key_bytes
from tests.support.broker import MosquittoBroker
from tests.support.faults import CHUNK, FEATURES, GROUP, KEY, MODEL, release
from tests.support.publisher import ROOT, Collector, Publisher, wait_until, write_config

DEVICE = "gw-1"
LIMIT = 65_536  # [limits].max_payload_bytes of the test device
# Deeper than any recursion limit in force: Python's default is 1,000, and Hypothesis
# raises it (process-wide, the agent's threads too) to about 2,000 while a test runs.
DEEP = (5_000, 10_000)
PER_EXAMPLE = 20
RESERVED = {*FEATURES, "id", "ts", "rows"}


# ---- the corpus -----------------------------------------------------------------------


class Case:
    """One payload and what must come back for it: ``kind``, the error event's code (None:
    no error), ``field``, the event's field (None: the event names none), ``rows``, the rows
    the prediction answers (0: no prediction)."""

    __slots__ = ("field", "kind", "payload", "rows")

    def __init__(
        self, payload: bytes, kind: str | None = None, field: str | None = None, rows: int = 0
    ) -> None:
        self.payload, self.kind, self.field, self.rows = payload, kind, field, rows

    @property
    def label(self) -> str:
        return "good" if self.kind is None else self.kind

    def __repr__(self) -> str:  # failure reports: the start of the payload, not 200 KB
        head = self.payload[:80] + (b"..." if len(self.payload) > 80 else b"")
        return f"Case({self.label}, {self.field}, rows={self.rows}, {len(self.payload)}B {head!r})"


_value = st.one_of(
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False),
    st.integers(min_value=-(10**6), max_value=10**6),  # an int is a safe cast to double
)
_json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
_json_any = st.recursive(
    _json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
_extra_key = st.text(min_size=1, max_size=8).filter(lambda k: k not in RESERVED)
_extras = st.dictionaries(_extra_key, _json_any, max_size=3)


def _dumps(body: Any, ascii_only: bool = True) -> bytes:
    return json.dumps(body, ensure_ascii=ascii_only).encode()


def _splice(body: dict[str, Any], key: str, raw_value: bytes) -> bytes:
    """``body`` as JSON with ``key`` set to ``raw_value``, bytes JSON cannot write itself
    (``NaN``, ``1e999``, broken UTF-8), placed last."""
    rest = _dumps({k: v for k, v in body.items() if k != key})
    return rest[:-1] + b", " + _dumps(key) + b": " + raw_value + b"}"


def _padded(body: dict[str, Any], size: int) -> bytes:
    """``body`` with a ``pad`` string making the payload exactly ``size`` bytes."""
    bare = len(_splice(body, "pad", b'""'))
    assert size >= bare
    return _splice(body, "pad", b'"' + b"x" * (size - bare) + b'"')


@st.composite
def _row(draw: st.DrawFn, extras: bool = True) -> dict[str, Any]:
    row: dict[str, Any] = {f: draw(_value) for f in FEATURES}
    if extras:
        row.update(draw(_extras))
    return row


@st.composite
def good_case(draw: st.DrawFn) -> Case:
    shape = draw(st.sampled_from(["object", "list", "rows", "padded"]))
    ascii_only = draw(st.booleans())  # raw UTF-8 keys and strings, or \u escapes
    ts = draw(st.one_of(st.none(), st.integers(0, 2**40), st.floats(0, 2e9), st.text(max_size=8)))
    if shape == "object":
        body = draw(_row())
        body["id"] = draw(st.one_of(st.integers(-(2**53), 2**53), st.text(max_size=8)))
        if ts is not None:
            body["ts"] = ts
        return Case(_dumps(body, ascii_only), rows=1)
    if shape == "padded":  # exactly the configured limit: still accepted
        padded = _padded(draw(_row(extras=False)), LIMIT)
        assert len(padded) == LIMIT
        return Case(padded, rows=1)
    rows = draw(st.lists(_row(), min_size=1, max_size=5))
    if shape == "list":
        return Case(_dumps(rows, ascii_only), rows=len(rows))
    return Case(_dumps({"rows": rows, "id": "batch", "ts": ts}, ascii_only), rows=len(rows))


BAD_KINDS = [
    "bad-utf8",
    "bad-utf8-in-string",
    "truncated",
    "deep",
    "deep-in-field",
    "nested-in-field",
    "nan-literal",
    "1e999",
    "1e999-ts",
    "beyond-float32",
    "huge-int",
    "string",
    "boolean",
    "null",
    "missing",
    "scalar",
    "empty-list",
    "empty-rows",
    "rows-not-list",
    "row-not-object",
    "bad-id",
    "oversize",
    "partial",
]


@st.composite
def bad_case(draw: st.DrawFn, kind: str | None = None) -> Case:
    kind = kind or draw(st.sampled_from(BAD_KINDS))
    row = draw(_row())
    field = draw(st.sampled_from(FEATURES))
    if kind == "bad-utf8":
        return Case(b"\xff" + draw(st.binary(max_size=64)), "malformed")
    if kind == "bad-utf8-in-string":  # valid JSON around a broken sequence
        bad = draw(st.sampled_from([b"\xc3\x28", b"\xe2\x82", b"\xed\xa0\x80", b"\x80"]))
        return Case(
            _splice(row, draw(st.sampled_from([field, "note"])), b'"' + bad + b'"'), "malformed"
        )
    if kind == "truncated":
        raw = _dumps(row)
        return Case(raw[: draw(st.integers(1, len(raw) - 1))], "malformed")
    if kind == "deep":  # past Python's recursion limit, within the payload limit
        depth = draw(st.integers(*DEEP))
        opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
        return Case(opener * depth + b"0" + closer * depth, "malformed")
    if kind == "deep-in-field":
        depth = draw(st.integers(*DEEP))
        return Case(_splice(row, field, b"[" * depth + b"]" * depth), "malformed")
    if kind == "nested-in-field":  # shallow nesting: a type error naming the field
        row[field] = draw(
            st.one_of(
                st.lists(_value, max_size=3),
                st.dictionaries(st.text(max_size=3), _value, max_size=2),
            )
        )
        return Case(_dumps(row), "type", field)
    if kind == "nan-literal":  # anywhere in the message, even a field no model reads
        literal = draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity"]))
        where = draw(st.sampled_from([field, "extra"]))
        return Case(_splice(row, where, literal), "non_finite")
    if kind in ("1e999", "1e999-ts"):  # json parses it as inf
        literal = draw(st.sampled_from([b"1e999", b"-1e999", b"1E400"]))
        where = "ts" if kind == "1e999-ts" else field
        return Case(_splice(row, where, literal), "non_finite", where)
    if kind == "beyond-float32":  # finite double, but the model runs float32
        row[field] = draw(st.sampled_from([1e300, -3.5e38, 3.41e38]))
        return Case(_dumps(row), "range", field)
    if kind == "huge-int":  # beyond float64 altogether
        return Case(_splice(row, field, b"1" + b"0" * 400), "range", field)
    if kind == "string":
        row[field] = draw(st.sampled_from(["high", "1.5", "", "NaN"]))
        return Case(_dumps(row), "type", field)
    if kind == "boolean":
        row[field] = draw(st.booleans())
        return Case(_dumps(row), "type", field)
    if kind == "null":
        row[field] = None
        return Case(_dumps(row), "missing_input", field)
    if kind == "missing":
        del row[field]
        return Case(_dumps(row), "missing_field", field)
    if kind == "scalar":
        value = draw(st.one_of(st.integers(), st.text(max_size=5), st.booleans(), st.none()))
        return Case(_dumps(value), "type")
    if kind == "empty-list":
        return Case(b"[]", "empty")
    if kind == "empty-rows":
        return Case(b'{"rows": []}', "empty", "rows")
    if kind == "rows-not-list":
        rows_value = draw(st.one_of(_json_leaf, st.dictionaries(st.text(max_size=3), _json_leaf)))
        return Case(_dumps({"rows": rows_value}), "type", "rows")
    if kind == "row-not-object":
        rows: list[Any] = [row, draw(_json_leaf)]
        if draw(st.booleans()):
            return Case(_dumps(rows), "type", "[1]")
        return Case(_dumps({"rows": rows}), "type", "rows[1]")
    if kind == "bad-id":
        row["id"] = draw(
            st.one_of(
                st.booleans(),
                st.floats(allow_nan=False, allow_infinity=False),
                st.lists(st.integers(), max_size=2),
            )
        )
        return Case(_dumps(row), "type", "id")
    if kind == "oversize":  # one byte over the limit, or far over
        extra = draw(st.one_of(st.just(1), st.integers(2, 200_000)))
        return Case(_padded(row, LIMIT + extra), "oversized")
    assert kind == "partial", kind  # one bad row among good ones: answered in part
    good = draw(st.lists(_row(), min_size=1, max_size=4))
    broken = dict(draw(_row()))
    del broken[field]
    at = draw(st.integers(0, len(good)))
    return Case(
        _dumps({"rows": [*good[:at], broken, *good[at:]]}), "missing_field", field, rows=len(good)
    )


@st.composite
def batches(draw: st.DrawFn) -> list[Case]:
    return [draw(st.one_of(good_case(), bad_case())) for _ in range(PER_EXAMPLE)]


# Every bad family once, and a good message.
every_kind = st.tuples(*[bad_case(k) for k in BAD_KINDS], good_case()).map(list)


# ---- the running agent ------------------------------------------------------------------


class Line:
    """A running agent, a sensor client and a collector on the device's topics."""

    def __init__(self, tmp: Path, broker: MosquittoBroker, error_events_per_s: int) -> None:
        config = write_config(
            tmp / "agent.toml",
            device=DEVICE,
            port=broker.port,
            state_dir=tmp / "state",
            keys={key_id(KEY): public_key_bytes(KEY)},
            telemetry_s=0.3,
        )
        # The payload limit under test; commits without an fsync each (durability is
        # tests/test_fault_power_loss.py's subject, not this one's).
        limits = f'[limits]\nmax_payload_bytes = {LIMIT}\noutbox_sync = "normal"\n'
        text = config.read_text().replace("[limits]\n", limits)
        config.write_text(text)
        self.col = Collector(broker.port, f"{ROOT}/devices/{DEVICE}/#")
        rel = release(1)
        self.pub = Publisher(broker.port)
        self.pub.chunks(rel.files, CHUNK)
        self.pub.manifest(GROUP, MODEL, rel.wire)
        self.agent = Agent(load_config(config), error_events_per_s=error_events_per_s)
        assert self.agent.config.limits.max_payload_bytes == LIMIT
        self.agent.start()
        assert wait_until(lambda: self.col.events("activated"), 20), self.col.events()
        self.sensor = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"sensor-{time.time_ns()}")
        self.sensor.max_inflight_messages_set(100)
        self.sensor.connect("127.0.0.1", broker.port)
        self.sensor.loop_start()
        assert wait_until(self.sensor.is_connected, 10)
        self.n = 0

    def send(self, payload: bytes, topic: str | None = None) -> str:
        self.n += 1
        topic = topic or f"plant/line1/c{self.n}/sensors"
        self.sensor.publish(topic, payload, qos=1)
        return topic

    def telemetry(self) -> dict[str, Any]:
        """The latest telemetry message ({} before the first)."""
        sent = self.col.on("/telemetry")
        return dict(sent[-1]) if sent else {}

    def predictions(self) -> list[dict[str, Any]]:
        """Flat predictions in arrival order: a message is one prediction or an envelope
        whose ``batch`` lists several (docs/protocol.md section 8.4)."""
        flat: list[dict[str, Any]] = []
        for body in self.col.on("/predictions"):
            batch = body.get("batch")
            if not isinstance(batch, list):
                flat.append(body)
                continue
            envelope = {k: v for k, v in body.items() if k != "batch"}
            flat.extend({**envelope, **entry} for entry in batch)
        return flat

    def errors(self) -> list[dict[str, Any]]:
        return [e for e in self.col.events() if e.get("kind") == "error"]

    def close(self) -> None:
        self.agent.stop(timeout=3)
        self.sensor.disconnect()
        self.sensor.loop_stop()
        self.pub.close()
        self.col.close()


@pytest.fixture
def line(tmp_path: Path, broker: MosquittoBroker) -> Iterator[Line]:
    ln = Line(tmp_path, broker, error_events_per_s=10**9)  # every event visible
    yield ln
    ln.close()


@pytest.fixture
def limited_line(tmp_path: Path, broker: MosquittoBroker) -> Iterator[Line]:
    ln = Line(tmp_path, broker, error_events_per_s=5)  # the agent's default
    yield ln
    ln.close()


def _by_topic(items: list[dict[str, Any]], key: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for item in items:
        topic = item["source"]["topic"] if key == "source" else item.get("topic")
        out.setdefault(str(topic), []).append(item)
    return out


def _check(case: Case, topic: str, preds: list[dict[str, Any]], errs: list[dict[str, Any]]) -> None:
    where = (case.label, topic, case.payload[:120])
    if case.kind is None:
        assert errs == [], (where, errs)
    else:
        assert len(errs) == 1, (where, errs)
        event = errs[0]
        assert event["code"] == case.kind, (where, event)
        assert event["model"] == MODEL and event["device"] == DEVICE, (where, event)
        if case.field is None:
            assert "field" not in event, (where, event)
        else:
            assert event.get("field") == case.field, (where, event)
            assert event["message"].startswith(f"{case.field}: "), (where, event)
    if case.rows == 0:
        assert preds == [], (where, preds)
        return
    assert len(preds) == 1, (where, preds)
    pred = preds[0]
    assert pred["rows"] == case.rows and pred["model"] == MODEL, (where, pred)
    assert pred.get("rejected_rows", 0) == (1 if case.kind else 0), (where, pred)
    scores = pred["outputs"]["score"]
    assert len(scores) == case.rows, (where, pred)
    assert all(isinstance(v, float) and math.isfinite(v) for row in scores for v in row), pred


@pytest.mark.parametrize(
    "total",
    [pytest.param(600, id="600"), pytest.param(5_000, id="5000", marks=pytest.mark.slow)],
)
def test_generated_payloads_through_the_broker(line: Line, total: int) -> None:
    expected: Counter[str] = Counter()  # error kind -> count over the whole run
    seen_preds = 0
    seen_errors = 0
    unrouted: list[str] = []

    def run_batch(batch: list[Case]) -> None:
        nonlocal seen_preds, seen_errors
        topics = []
        for case in batch:
            topics.append(line.send(case.payload))
            if case.kind is not None:
                expected[case.kind] += 1
        # Topics no model reads (the agent does not subscribe to them).
        tag = f"u{line.n}"
        for topic in (
            f"plant/line1/{tag}/other",
            f"plant/line2/{tag}/sensors",
            f"plant/line1/{tag}/sensors/extra",
            f"plant/{tag}/sensors",
        ):
            line.send(b'{"vibration": 1}', topic)
            unrouted.append(topic)
        want_preds = seen_preds + sum(1 for c in batch if c.rows)
        want_errors = seen_errors + sum(1 for c in batch if c.kind)
        assert wait_until(
            lambda: len(line.predictions()) >= want_preds and len(line.errors()) >= want_errors,
            30,
        ), (len(line.predictions()), want_preds, len(line.errors()), want_errors)
        preds = line.predictions()[seen_preds:]
        errs = line.errors()[seen_errors:]
        seen_preds, seen_errors = want_preds, want_errors
        by_pred = _by_topic(preds, "source")
        by_err = _by_topic(errs, "topic")
        for case, topic in zip(batch, topics, strict=True):
            _check(case, topic, by_pred.pop(topic, []), by_err.pop(topic, []))
        assert not by_pred and not by_err, (by_pred, by_err)  # nothing for anything else
        # All, once, in publish order, with increasing per-device sequence numbers.
        assert [p["source"]["topic"] for p in preds] == [
            t for c, t in zip(batch, topics, strict=True) if c.rows
        ]
        seqs = [p["seq"] for p in preds]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)

    live = settings(
        deadline=None,
        database=None,
        phases=[Phase.generate],  # no shrinking: each example is a live round trip
        suppress_health_check=list(HealthCheck),
    )

    @settings(live, max_examples=1)
    @given(batch=every_kind)
    def every_family(batch: list[Case]) -> None:
        run_batch(batch)

    @settings(live, max_examples=max(1, total // PER_EXAMPLE))
    @given(batch=batches())
    def generated(batch: list[Case]) -> None:
        run_batch(batch)

    every_family()
    generated()
    assert line.n >= total
    time.sleep(0.3)  # anything extra (a duplicate, an answer to an unrouted topic) shows now
    assert len(line.predictions()) == seen_preds
    assert len(line.errors()) == seen_errors
    mentioned = {str(e.get("topic")) for e in line.errors()} | {
        p["source"]["topic"] for p in line.predictions()
    }
    assert not mentioned & set(unrouted)

    # The counters in telemetry match the corpus, kind by kind.
    def counted() -> bool:
        latest = line.telemetry()
        return bool(
            latest.get("input_errors") == dict(expected)
            and latest["models"][MODEL]["errors_total"] == dict(expected)
        )

    assert wait_until(counted, 10), (line.telemetry(), dict(expected))
    assert {
        "malformed",
        "non_finite",
        "missing_field",
        "type",
        "empty",
        "oversized",
        "range",
        "missing_input",
    } <= set(expected)

    # Still serving.
    assert line.agent.link is not None and line.agent.link.healthy()
    topic = line.send(json.dumps(dict.fromkeys(FEATURES, 0.25)).encode())
    assert wait_until(lambda: any(p["source"]["topic"] == topic for p in line.predictions()), 10)


def test_rate_limited_error_events_account_for_every_bad_payload(limited_line: Line) -> None:
    line = limited_line
    kinds = ["malformed", "missing_field", "type", "oversized"]
    payloads = {
        "malformed": b"{broken",
        "missing_field": b'{"vibration": 1, "temperature": 2, "pressure": 3}',
        "type": b"42",
        "oversized": b'"' + b"z" * LIMIT + b'"',
    }
    sent: Counter[str] = Counter()
    for i in range(120):  # a burst: far more than 5 per kind per second
        kind = kinds[i % len(kinds)]
        line.send(payloads[kind])
        sent[kind] += 1
    assert wait_until(lambda: dict(line.agent.input_errors) == dict(sent), 10)
    events = Counter(e["code"] for e in line.errors())
    assert all(events[k] < sent[k] for k in kinds), events  # the limiter did hold some back
    # A suppressed count rides on the next event of its kind that passes: one more of each
    # kind in a new second carries the rest.
    time.sleep(1.05)
    for kind in kinds:
        line.send(payloads[kind])
        sent[kind] += 1

    def accounted() -> bool:
        published: Counter[str] = Counter()
        for e in line.errors():
            published[e["code"]] += 1 + int(e.get("suppressed", 0))
        return dict(published) == dict(sent)

    assert wait_until(accounted, 10), (Counter(e["code"] for e in line.errors()), sent)
    assert wait_until(lambda: line.telemetry().get("input_errors") == dict(sent), 5)
