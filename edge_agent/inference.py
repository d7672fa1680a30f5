"""Sensor messages in, predictions out: the agent's inference path.

Paho's network thread calls ``InferenceEngine.run_now`` when nothing else is waiting
(a lone message is answered on that thread, with no hand-off) or ``submit`` (an enqueue);
the ``MicroBatcher`` worker does the rest for every batch: parse each payload
(``inputs.parse_payload``), pick the model fields (``FieldMapping``), apply the MLflow
signature (``Signature.enforce``: by name, missing rejected, extras ignored, safe casts
only), run all good rows of one model in ONE ``session.run``, split the outputs back per
message and store the predictions in the outbox with ONE ``put_many`` (one fsync per
micro-batch, not per message), then acknowledge the input messages (``acknowledge``):
an input is acknowledged to the broker only once its answer is on disk.

The model a batch runs on is read once, under the lock, at the start of the batch: a
swap (``install``) between two batches is atomic, so no message is dropped or answered
by a half-loaded model. The new ``LoadedModel`` is fully built (session, signature,
drift monitor) before it is installed.

Prediction payload (docs/protocol.md section 8.4): device, model, version, variant,
sha256, a per-device ``seq`` (``SeqCounter``, monotonic across restarts), the source
message's topic/id/ts, ``latency_ms`` (the inference call) and ``outputs`` (one entry
per good row; ``label`` mapped to ``classes`` when the manifest has them). With
``group_predictions`` the answers of one micro-batch share one message (a ``batch``
list under one envelope): one outbox row, one MQTT publish and one PUBACK instead of
one per input, which is where micro-batching's throughput comes from.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edge_agent.batching import MicroBatcher
from edge_agent.config import AgentConfig, ModelConfig
from edge_agent.errors import InferenceError, InputError, RuntimeLoadError
from edge_agent.fsio import FileSystem
from edge_agent.health import HealthWindow
from edge_agent.inputs import FieldMapping, Row, parse_payload
from edge_agent.lone import LoneLane, encode_prediction
from edge_agent.protocol.manifest import Manifest
from edge_agent.runtime import Session, load_session
from edge_agent.schema import F32_MAX, Enforced, Signature
from edge_agent.store import ActiveModel
from edge_agent.telemetry import DriftMonitor, Telemetry
from edge_agent.update_errors import InputsMismatch, ModelLoadFailed

__all__ = [
    "Answer",
    "InferenceEngine",
    "Inferred",
    "LoadedModel",
    "SeqCounter",
    "infer",
    "load_model",
    "topic_matches",
]

log = logging.getLogger(__name__)

_ROUTE_CACHE = 4096  # distinct input topics remembered with their models
_ONE_ROW = np.zeros(1, dtype=np.int64)  # the row positions of a one-row input
_ONE_ROW.flags.writeable = False

# Error sink: (kind, message fields) -> None; the agent rate-limits and publishes.
ErrorSink = Callable[[str, dict[str, Any]], None]


def topic_matches(pattern: str, topic: str) -> bool:
    """MQTT filter matching (``+`` one level, ``#`` the rest), without importing paho."""
    p_levels, t_levels = pattern.split("/"), topic.split("/")
    for i, level in enumerate(p_levels):
        if level == "#":
            return True
        if i >= len(t_levels) or (level not in ("+", t_levels[i])):
            return False
    return len(p_levels) == len(t_levels)


@dataclass
class LoadedModel:
    """Everything needed to answer messages with one model version, built before use."""

    name: str
    sha256: str
    manifest: Manifest
    session: Session
    signature: Signature
    fields: FieldMapping
    drift: DriftMonitor | None
    health: HealthWindow | None = None
    health_lock: threading.Lock = field(default_factory=threading.Lock)

    # The model fields of every predictions message, built once (read per message).
    wire_fields: dict[str, Any] = field(init=False, repr=False, compare=False)
    # The JSON keys of the model's inputs in signature order, when every input is a
    # required float read from a plain key: see fast_x.
    fast_keys: tuple[str, ...] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.wire_fields = self.describe()
        paths = [self.fields.path_of(name) for name in self.signature.feature_names]
        plain = self.signature.plain_floats and all(p is not None for p in paths)
        self.fast_keys = tuple(p for p in paths if p is not None) if plain else None

    def fast_x(self, fields: Mapping[str, Any]) -> np.ndarray | None:
        """The input row of the common sensor message -- every input a finite JSON float
        in float32 range under its own key -- without the general extraction and
        signature rules, which give the same array for such a row; None otherwise (the
        caller takes the general path, which also explains what is wrong)."""
        keys = self.fast_keys
        if keys is None:
            return None
        values = [fields.get(key) for key in keys]
        for value in values:
            if type(value) is not float or not -F32_MAX <= value <= F32_MAX:
                return None
        return np.array([values], dtype=np.float32)

    def describe(self) -> dict[str, Any]:
        m = self.manifest
        return {"model": m.model, "version": m.version, "variant": m.variant, "sha256": self.sha256}


def load_model(active: ActiveModel, config: ModelConfig, *, threads: int) -> LoadedModel:
    """Load a session and its signature and drift state (``ModelLoadFailed`` /
    ``InputsMismatch`` when the model cannot serve this device)."""
    manifest = active.manifest
    try:
        session = load_session(active.model_path, manifest.runtime, threads=threads)
    except RuntimeLoadError as exc:
        raise ModelLoadFailed(str(exc)) from exc
    signature = _signature(manifest)
    drift = None
    if manifest.baseline:
        try:
            drift = DriftMonitor(manifest.baseline, manifest.feature_names)
        except RuntimeLoadError as exc:  # a bad baseline loses drift figures, not serving
            log.warning("model %s: no drift monitoring: %s", manifest.model, exc)
    optional = [c.name for c in signature.columns if not c.required]
    return LoadedModel(
        name=manifest.model,
        sha256=active.sha256,
        manifest=manifest,
        session=session,
        signature=signature,
        fields=FieldMapping(config.fields, optional=optional),
        drift=drift,
    )


def _signature(manifest: Manifest) -> Signature:
    names = list(manifest.feature_names)
    raw = manifest.signature or {
        "inputs": [{"name": n, "type": "double", "required": True} for n in names]
    }
    try:
        signature = Signature.from_dict(raw, feature_names=names)
    except RuntimeLoadError as exc:
        raise InputsMismatch(str(exc)) from exc
    if list(signature.feature_names) != names:
        # X is built in signature order; the model takes feature_names order.
        raise InputsMismatch(
            f"signature inputs {list(signature.feature_names)} differ from the model's "
            f"feature order {names}"
        )
    return signature


class SeqCounter:
    """A per-device prediction sequence number, monotonic across restarts.

    Blocks of ``block`` numbers are reserved on disk (one atomic write per block, not
    per prediction); after a restart counting resumes above the last reservation, so
    numbers can skip but never repeat or go back.
    """

    def __init__(self, path: Path, *, fs: FileSystem, block: int = 10_000) -> None:
        self.path = path
        self._fs = fs
        self._block = block
        try:
            start = int(path.read_text().strip()) if path.exists() else 0
        except ValueError:
            start = 0  # a torn file cannot happen with atomic_write; be safe anyway
        self._next = start
        self._reserved = start
        self._lock = threading.Lock()

    def take(self, count: int = 1) -> int:
        """Reserve ``count`` consecutive numbers; returns the first."""
        with self._lock:
            first = self._next
            self._next += count
            if self._next > self._reserved:
                self._reserved = self._next + self._block
                self._fs.atomic_write(self.path, f"{self._reserved}\n".encode())
            return first


@dataclass
class Answer:
    """The outcome for one input message."""

    topic: str
    meta: dict[str, Any]  # source id / ts
    outputs: dict[str, list[Any]] | None  # None: every row was bad
    rows: list[int]  # indices of the answered rows in the message
    errors: list[InputError]
    latency_ms: float


@dataclass
class Inferred:
    """One session call over several messages."""

    answers: list[Answer]
    nan_rows: int  # rows whose outputs hold NaN or infinity
    failed: int  # rows lost to an inference error
    x: np.ndarray
    outputs: dict[str, np.ndarray]


@dataclass
class _Item:
    topic: str
    payload: bytes
    received: float  # monotonic
    token: Any = None  # handed back through ``acknowledge`` once the item is done with


def _source_meta(rows: Sequence[Row]) -> dict[str, Any]:
    if len(rows) == 1:  # one row: its own id/ts, no set building
        row = rows[0]
        single: dict[str, Any] = {}
        if row.id is not None:
            single["id"] = row.id
        if row.ts is not None:
            single["ts"] = row.ts
        return single
    ids = [r.id for r in rows]
    tss = [r.ts for r in rows]
    meta: dict[str, Any] = {}
    if any(i is not None for i in ids):
        meta["id"] = ids[0] if len(set(map(str, ids))) == 1 else ids
    if any(t is not None for t in tss):
        meta["ts"] = tss[0] if len(set(map(str, tss))) == 1 else tss
    return meta


def infer(loaded: LoadedModel, messages: Sequence[tuple[str, Sequence[Row]]]) -> Inferred:
    """Run the rows of several messages in one session call; one Answer per message."""
    owner: list[tuple[int, int]] = []  # (message index, row index in message)
    errors: list[list[InputError]] = [[] for _ in messages]
    x = None
    if len(messages) == 1 and len(messages[0][1]) == 1:  # one message of one row
        x = loaded.fast_x(messages[0][1][0].fields)
    if x is not None:
        enforced = Enforced(x, _ONE_ROW, ())
        owner.append((0, 0))
    else:
        feature_rows: list[dict[str, Any]] = []
        for m, (_topic, rows) in enumerate(messages):
            good, indices, bad = loaded.fields.extract_rows(rows)
            feature_rows.extend(good)
            owner.extend((m, i) for i in indices)
            errors[m].extend(e for _i, e in bad)
        enforced = loaded.signature.enforce(feature_rows)
        for position, exc in enforced.errors:
            errors[owner[position][0]].append(exc)
    outputs: dict[str, np.ndarray] = {}
    latency_ms = 0.0
    failed = 0
    nan_rows = 0
    if len(enforced.x):
        started = time.perf_counter()
        try:
            outputs = loaded.session.run(np.ascontiguousarray(enforced.x, dtype=np.float32))
        except InferenceError as exc:
            failed = len(enforced.x)
            for position in enforced.rows.tolist():
                errors[owner[position][0]].append(InputError(str(exc), kind="inference"))
            outputs = {}
        latency_ms = (time.perf_counter() - started) * 1000.0
        nan_rows = _non_finite_rows(outputs)
    per_message: list[list[int]] = [[] for _ in messages]  # positions in x
    for x_index, position in enumerate(enforced.rows.tolist()):
        per_message[owner[position][0]].append(x_index)
    answers = []
    for m, (topic, rows) in enumerate(messages):
        picks = per_message[m] if outputs else []
        out = _slice(loaded, outputs, picks, finite=not nan_rows) if picks else None
        answered = [owner[enforced.rows[i]][1] for i in picks]
        answers.append(Answer(topic, _source_meta(rows), out, answered, errors[m], latency_ms))
    return Inferred(answers, nan_rows, failed, enforced.x, outputs)


def _non_finite_rows(outputs: Mapping[str, np.ndarray]) -> int:
    bad: np.ndarray | None = None
    for value in outputs.values():
        arr = np.asarray(value)
        if arr.dtype.kind != "f" or arr.ndim == 0 or np.isfinite(arr).all():
            continue  # the common case costs one check per output
        rows = ~np.isfinite(arr).reshape(arr.shape[0], -1).all(axis=1)
        bad = rows if bad is None else bad | rows
    return int(bad.sum()) if bad is not None else 0


def _slice(
    loaded: LoadedModel, outputs: Mapping[str, np.ndarray], picks: list[int], *, finite: bool
) -> dict[str, list[Any]]:
    """The outputs of rows ``picks`` as JSON-ready lists (``finite``: every output value
    is already known to be finite, no second check)."""
    classes = loaded.manifest.classes
    out: dict[str, list[Any]] = {}
    for name, value in outputs.items():
        arr = np.asarray(value)
        # One message owning every row (the low-load case): no fancy-index copy.
        whole = len(picks) == len(arr) and picks[-1] == len(picks) - 1 and picks[0] == 0
        part = arr if whole else arr[picks]
        if name == "label" and classes is not None:
            out[name] = [
                classes[i] if 0 <= i < len(classes) else i for i in part.astype(np.int64).tolist()
            ]
        elif not finite and part.dtype.kind == "f" and not np.isfinite(part).all():
            out[name] = _finite_or_none(part.tolist())  # JSON has no NaN
        else:
            out[name] = part.tolist()
    return out


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value if not isinstance(value, float) or math.isfinite(value) else None


class StorePredictions(Protocol):
    """Where predictions go (the agent's outbox). ``on_sent()`` runs once they are on
    the wire (or queued behind older messages), before they are written to the outbox;
    ``committed()`` once they are durable -- the inputs they answer are acknowledged
    there, never before. ``defer``: the write may wait for a later moment (a lone
    answer's commit kept off the moments it is delivered in)."""

    def __call__(
        self,
        items: list[tuple[str, bytes]],
        on_sent: Callable[[], None] | None = None,
        committed: Callable[[], None] | None = None,
        defer: bool = False,
    ) -> None: ...


class InferenceEngine:
    """Routes sensor messages to models, micro-batches them and stores predictions."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        store_predictions: StorePredictions,
        seq: SeqCounter,
        telemetry: Telemetry,
        on_error: ErrorSink,
        prediction_topic: str,
        acknowledge: Callable[[list[Any]], None] | None = None,
    ) -> None:
        self.config = config
        self._acknowledge = acknowledge
        # How long a lone message recently took from receipt to its prediction on the
        # wire (ms, smoothed): run_now's bound. The commit's fsync that follows on the
        # same thread is not counted: it delays no answer (a message arriving meanwhile
        # waits on the socket, is seen by ``input_waiting`` and goes to the worker), and
        # counting it sent lone messages to the worker on every slow fsync.
        self._lone_ms = 0.0
        self._sent_at = 0.0
        self._store = store_predictions
        self._seq = seq
        self._telemetry = telemetry
        self._on_error = on_error
        self._prediction_topic = prediction_topic
        self._models: dict[str, LoadedModel] = {}
        # The lone-message lane of each installed model (None: its inputs are not plain
        # floats), swapped together with the model under the same lock.
        self._lanes: dict[str, LoneLane | None] = {}
        self._lock = threading.Lock()
        self._routes = [(t, m.name) for m in config.models for t in m.input_topics]
        # topic -> models reading it: matched once per topic, not per message (bounded
        # like the MQTT link's own cache: topics come from the broker).
        self._route_cache: dict[str, list[str]] = {}
        self._output_topics = {m.name: m.output_topic or prediction_topic for m in config.models}
        self.unrouted = 0
        self._drift = _DriftBuffer(telemetry)
        self.answered = 0
        self.lone = 0  # of which answered by a LoneLane
        self._batcher: MicroBatcher[_Item] = MicroBatcher(
            self._run_batch,
            window_ms=config.batching.window_ms,
            max_rows=config.batching.max_rows,
            max_queue=config.batching.max_queue,
        )
        self._queue_wait_s = config.batching.queue_wait_ms / 1000.0

    # ---- models -----------------------------------------------------------------

    def install(self, loaded: LoadedModel) -> LoadedModel | None:
        """Swap the serving model of ``loaded.name``; returns the previous one."""
        self._telemetry.model(loaded.name, drift=loaded.drift)
        lane = None
        if loaded.fast_keys is not None:
            lane = LoneLane(loaded, device=self.config.device_id,
                            max_bytes=self.config.limits.max_payload_bytes)
        with self._lock:
            previous = self._models.get(loaded.name)
            self._models[loaded.name] = loaded
            self._lanes[loaded.name] = lane
        return previous

    def remove(self, name: str) -> None:
        with self._lock:
            self._models.pop(name, None)
            self._lanes.pop(name, None)

    def current(self, name: str) -> LoadedModel | None:
        with self._lock:
            return self._models.get(name)

    def serving(self) -> dict[str, LoadedModel]:
        with self._lock:
            return dict(self._models)

    # ---- input ------------------------------------------------------------------

    def input_filters(self) -> list[str]:
        return sorted({t for t, _m in self._routes})

    def submit(self, topic: str, payload: bytes, token: Any = None) -> None:
        """Enqueue one message for the batch worker. A full queue makes the caller (the
        MQTT thread) wait for room up to ``batching.queue_wait_ms``: it stops reading the
        socket, so TCP back-pressure holds the broker's stream (a broker does not always
        keep to its in-flight window). A message still refused is reported and NOT
        acknowledged: the broker keeps it (and redelivers it on the next connection)."""
        item = _Item(topic, payload, time.monotonic(), token)
        if not self._batcher.submit(item, wait_s=self._queue_wait_s):
            self._on_error("overload", {"topic": topic, "reason": "input queue is full"})

    def run_now(self, topic: str, payload: bytes, token: Any = None) -> bool:
        """Answer one message on the calling thread if nothing is queued or running and
        the recent lone messages took under ``batching.inline_max_ms`` (the bound on how
        long the MQTT thread may be kept from its socket); False: ``submit`` it."""
        limit = self.config.batching.inline_max_ms
        if limit <= 0 or self._lone_ms > limit:
            return False
        return self._batcher.run_now(_Item(topic, payload, time.monotonic(), token))

    def idle(self) -> bool:
        return self._batcher.idle()

    def start(self) -> None:
        self._batcher.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._batcher.stop(timeout)

    def pending(self) -> int:
        return self._batcher.pending()

    # ---- the batch worker -------------------------------------------------------

    def _run_batch(self, items: list[_Item]) -> None:
        started = time.perf_counter()
        self._sent_at = 0.0
        tokens = [i.token for i in items if i.token is not None]
        acknowledge = self._acknowledge
        # The inputs are acknowledged once their answers are durable (``committed``);
        # an exception leaves them unacknowledged: the broker redelivers them.
        committed = (lambda: acknowledge(tokens)) if acknowledge and tokens else _nothing
        if len(items) != 1 or not self._answer_lone(items[0], committed):
            self._answer_batch(items, committed)
        if len(items) == 1:
            took = ((self._sent_at or time.perf_counter()) - started) * 1000.0
            # Smoothed, but a slow call counts at once: the network thread is not kept
            # waiting twice in a row by a model that has become slow.
            self._lone_ms = max(took, 0.8 * self._lone_ms + 0.2 * took)

    def _answer_batch(self, items: list[_Item], committed: Callable[[], None]) -> None:
        by_model: dict[str, list[tuple[_Item, list[Row]]]] = {}
        limit = self.config.limits.max_payload_bytes
        for item in items:
            names = self._models_for(item.topic)
            if not names:
                self.unrouted += 1
                self._on_error(
                    "unknown_topic", {"topic": item.topic, "reason": "no model reads this topic"}
                )
                continue
            try:
                rows = parse_payload(item.payload, max_bytes=limit)
            except InputError as exc:
                for name in names:
                    self._telemetry.model(name).record_error(exc.kind)
                self._on_error(exc.kind, _error_fields(exc, item.topic, names[0]))
                continue
            for name in names:
                by_model.setdefault(name, []).append((item, rows))
        out: list[tuple[str, bytes]] = []
        after: list[Callable[[], None]] = []
        try:
            for name, messages in by_model.items():
                out.extend(self._answer(name, messages, after))
            if out:
                self._store(out, self._mark_sent, committed)
                self.answered += len(out)
            else:
                committed()  # nothing to store: every input was refused and reported
        finally:
            for step in after:  # bookkeeping (stats, health, drift) off the latency path
                step()

    def _answer_lone(self, item: _Item, committed: Callable[[], None]) -> bool:
        """Answer a lone plain message through its model's ``LoneLane``; False (nothing
        done) when the lane declines it: the general path takes it."""
        names = self._models_for(item.topic)
        if len(names) != 1:
            return False
        name = names[0]
        with self._lock:
            lane = self._lanes.get(name)
        if lane is None:
            return False
        given = lane.inputs(item.payload)
        if given is None:
            return False
        x, source = given
        ran = lane.run(x)
        if ran is None:
            return False
        raw, outputs, latency = ran
        payload = lane.encode(ts=time.time(), latency_ms=latency, seq=self._seq.take(1),
                              topic=item.topic, source=source, outputs=outputs)
        self._store([(self._output_topics[name], payload)], self._mark_sent, committed,
                    defer=True)
        self.answered += 1
        self.lone += 1
        # The general path's bookkeeping for one good row, after the answer is out.
        self._telemetry.model(name).record_batch(1, latency)
        self._drift.add(name, x, raw)
        _record_health(lane.loaded, rows=1, failed=0, nan_rows=0, latency=latency)
        return True

    def _models_for(self, topic: str) -> list[str]:
        names = self._route_cache.get(topic)
        if names is None:
            names = [m for t, m in self._routes if topic_matches(t, topic)]
            if len(self._route_cache) >= _ROUTE_CACHE:
                self._route_cache.clear()
            self._route_cache[topic] = names
        return names

    def _mark_sent(self) -> None:
        self._sent_at = time.perf_counter()

    def _answer(
        self, name: str, messages: list[tuple[_Item, list[Row]]], after: list[Callable[[], None]]
    ) -> list[tuple[str, bytes]]:
        loaded = self.current(name)  # read once: a swap cannot split a batch
        stats = self._telemetry.model(name)
        if loaded is None:
            stats.record_error("no_model", len(messages))
            self._on_error(
                "no_model",
                {
                    "model": name,
                    "topic": messages[0][0].topic,
                    "reason": "no model version is installed yet",
                },
            )
            return []
        result = infer(loaded, [(i.topic, r) for i, r in messages])
        answers = result.answers
        good_rows = sum(len(a.rows) for a in answers)
        latency = answers[0].latency_ms if answers else 0.0
        # Bookkeeping runs after the predictions were handed to the link (``after``):
        # once per micro-batch, off the latency path.
        if good_rows:
            after.append(lambda: stats.record_batch(good_rows, latency))
            after.append(lambda: self._drift.add(name, result.x, result.outputs))
        if loaded.health is not None and (good_rows or result.failed):
            after.append(lambda: _record_health(
                loaded, rows=good_rows, failed=result.failed, nan_rows=result.nan_rows,
                latency=latency,
            ))
        topic = self._output_topics[name]
        answered = [a for a in answers if a.outputs is not None]
        first = self._seq.take(len(answered)) if answered else 0
        entries = []
        for answer in answers:
            for exc in answer.errors:
                stats.record_error(exc.kind)
                self._on_error(exc.kind, _error_fields(exc, answer.topic, name))
            if answer.outputs is None:
                continue
            entry: dict[str, Any] = {
                "seq": first,
                "source": {"topic": answer.topic, **answer.meta},
                "rows": len(answer.rows),
                "outputs": answer.outputs,
            }
            if answer.errors:
                entry["rejected_rows"] = len(answer.errors)
            first += 1
            entries.append(entry)
        if not entries:
            return []
        envelope = {
            "ts": time.time(),
            "device": self.config.device_id,
            **loaded.wire_fields,
            "latency_ms": round(latency, 4),
        }
        if len(entries) == 1 or not self.config.batching.group_predictions:
            return [(topic, encode_prediction({**envelope, **e})) for e in entries]
        return [(topic, payload) for payload in _grouped(envelope, entries)]


# A grouped predictions message stays well under the 128 KB payload cap of managed
# brokers (docs/protocol.md section 2); a bigger micro-batch is split.
GROUP_MAX_BYTES = 64 * 1024




def _grouped(envelope: dict[str, Any], entries: list[dict[str, Any]]) -> list[bytes]:
    """``{...envelope, "batch": [entries]}`` messages of at most GROUP_MAX_BYTES each
    (an entry larger than that alone still goes, alone)."""
    head = encode_prediction(envelope)[:-1] + b',"batch":['
    messages: list[bytes] = []
    part: list[bytes] = []
    size = len(head)
    for entry in entries:
        encoded = encode_prediction(entry)
        if part and size + len(encoded) + 3 > GROUP_MAX_BYTES:
            messages.append(head + b",".join(part) + b"]}")
            part, size = [], len(head)
        part.append(encoded)
        size += len(encoded) + 1
    messages.append(head + b",".join(part) + b"]}")
    return messages


def _nothing() -> None:
    pass


def _record_health(
    loaded: LoadedModel, *, rows: int, failed: int, nan_rows: int, latency: float
) -> None:
    health = loaded.health
    if health is None:
        return
    with loaded.health_lock:
        health.record(rows=rows, errors=failed, nan_rows=nan_rows, latency_ms=latency)


class _DriftBuffer:
    """Collects inputs/outputs of small inference calls and feeds the drift histograms in
    bulk: one histogram update costs about the same for 1 row as for 500."""

    def __init__(self, telemetry: Telemetry, *, max_rows: int = 512, max_age_s: float = 1.0):
        self._telemetry = telemetry
        self._max_rows = max_rows
        self._max_age_s = max_age_s
        self._parts: dict[str, list[tuple[np.ndarray, Mapping[str, np.ndarray]]]] = {}
        self._rows = 0
        self._since = time.monotonic()

    def add(self, name: str, x: np.ndarray, outputs: Mapping[str, np.ndarray]) -> None:
        self._parts.setdefault(name, []).append((x, outputs))
        self._rows += len(x)
        if self._rows >= self._max_rows or time.monotonic() - self._since > self._max_age_s:
            self.flush()

    def flush(self) -> None:
        parts, self._parts = self._parts, {}
        self._rows, self._since = 0, time.monotonic()
        for name, batches in parts.items():
            x = np.concatenate([b[0] for b in batches])
            names = set.intersection(*(set(b[1]) for b in batches))
            outputs = {n: np.concatenate([np.asarray(b[1][n]) for b in batches]) for n in names}
            self._telemetry.model(name).observe(x, outputs)


def _error_fields(exc: InputError, topic: str, model: str) -> dict[str, Any]:
    fields: dict[str, Any] = {"model": model, "topic": topic, "reason": exc.reason}
    if exc.field is not None:
        fields["field"] = exc.field
    return fields
