"""The lone-message lane: the common sensor message answered with the least work.

At low load -- the latency a line sees -- nearly every message is one JSON object of
finite floats for one model, answered alone on the MQTT thread. The general path
(``inference.infer``) builds rows, per-message answer records and an envelope dict for
the batch case; for one message that bookkeeping costs about as much as the model call.
``LoneLane`` takes exactly the plain case: decode, the input row
(``LoadedModel.fast_x``), one session call, outputs all finite, and a predictions
message whose constant part (device and model fields) is serialised once per model.

Anything else is declined (``None``) *before* any side effect -- a bad or unusual
payload, an inference error, a non-finite output -- so the caller hands the message to
the general path, which answers it or explains what is wrong (it runs the model again
in the rare declined-after-run cases; models are deterministic). The bytes it writes
are the general path's, byte for byte (``tests/test_lone_lane.py``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_agent.errors import InferenceError, InputError
from edge_agent.inputs import decode_json

if TYPE_CHECKING:
    from edge_agent.inference import LoadedModel

__all__ = ["LoneLane", "encode_prediction"]


def _compact_encoder() -> Callable[[Any], str]:
    """``json.dumps(o, separators=(",", ":"))`` without its per-call set-up: the json
    module's C encoder built once (json.dumps builds a JSONEncoder and a C encoder on
    every call, about 10 us of a lone message's path on a gateway). It is used only if
    it reproduces JSONEncoder on a probe; otherwise the plain encoder serves."""
    encoder = json.JSONEncoder(separators=(",", ":"))
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is not None:
        probe = {"a": [1, 2.5, None, True, "\u00e9\n"], "b": {"c": -0.0, "d": 1e300}}
        try:
            # markers=None: no cycle check (predictions are trees); the other arguments
            # are JSONEncoder's own for these separators.
            fast = make(None, encoder.default, json.encoder.encode_basestring_ascii, None,
                        ":", ",", False, False, True)
            if "".join(fast(probe, 0)) == encoder.encode(probe):
                return lambda body: "".join(fast(body, 0))
        except (TypeError, ValueError):
            pass
    return encoder.encode


_encode = _compact_encoder()


def encode_prediction(body: Mapping[str, Any]) -> bytes:
    """The predictions wire encoding: compact JSON, keys in insertion order, the same
    bytes as ``json.dumps(body, separators=(",", ":")).encode()``."""
    return _encode(body).encode()


class LoneLane:
    """One model's lane for lone plain messages (built per installed model)."""

    def __init__(self, loaded: LoadedModel, *, device: str, max_bytes: int) -> None:
        self.loaded = loaded
        self._max_bytes = max_bytes
        self._classes = loaded.manifest.classes
        # Everything between "ts" and "latency_ms" (docs/protocol.md section 8.4 order).
        self._fixed = encode_prediction({"device": device, **loaded.wire_fields})[1:-1]

    def inputs(self, payload: bytes) -> tuple[np.ndarray, dict[str, Any]] | None:
        """(the model's input row, the source id/ts) of a plain message; None otherwise.
        Declines exactly what ``parse_payload`` or ``fast_x`` would not pass as is."""
        data = self._object(payload)
        if data is None:
            return None
        x = self.loaded.fast_x(data)
        source = _source(data) if x is not None else None
        return None if x is None or source is None else (x, source)

    def _object(self, payload: bytes) -> dict[str, Any] | None:
        """The payload as one JSON object of fields (not a list, not ``{"rows": ...}``)."""
        if len(payload) > self._max_bytes:
            return None
        try:
            data = decode_json(payload)
        except (ValueError, InputError, RecursionError):
            return None
        return data if type(data) is dict and "rows" not in data else None

    def run(self, x: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, Any], float] | None:
        """(raw outputs, JSON-ready outputs, latency ms) of one row; None on an inference
        error or an output that is not finite (the general path reports those)."""
        started = time.perf_counter()
        try:
            raw = self.loaded.session.run(x)
        except InferenceError:
            return None
        latency_ms = (time.perf_counter() - started) * 1000.0
        out: dict[str, Any] = {}
        classes = self._classes
        for name, value in raw.items():
            if type(value) is not np.ndarray or value.ndim == 0 or len(value) != 1:
                return None
            values = value.tolist()
            # On a few values Python's check is cheaper than numpy's isfinite (whose
            # dispatch, run cold once per message, costs ~10 us on a gateway).
            if value.dtype.kind == "f" and not _all_finite(values):
                return None
            if name == "label" and classes is not None:
                values = [
                    classes[i] if 0 <= i < len(classes) else i
                    for i in value.astype(np.int64).tolist()
                ]
            out[name] = values
        return raw, out, latency_ms

    def encode(
        self, *, ts: float, latency_ms: float, seq: int, topic: str,
        source: dict[str, Any], outputs: dict[str, Any],
    ) -> bytes:
        """The predictions message (docs/protocol.md section 8.4) of one answered row."""
        tail = encode_prediction(
            {"seq": seq, "source": {"topic": topic, **source}, "rows": 1, "outputs": outputs}
        )
        latency = round(latency_ms, 4)
        return b'{"ts":%b,%b,"latency_ms":%b,%b' % (
            _number(ts), self._fixed, _number(latency), tail[1:]
        )


def _source(data: dict[str, Any]) -> dict[str, Any] | None:
    """The message's id/ts as the predictions' ``source`` fields; None where
    ``inputs._meta`` would refuse them (an id not a string or integer, a ts not a
    number or string, a non-finite ts)."""
    source: dict[str, Any] = {}
    row_id, ts = data.get("id"), data.get("ts")
    if row_id is not None:
        if type(row_id) is not str and type(row_id) is not int:
            return None
        source["id"] = row_id
    if ts is not None:
        kind = type(ts)
        if not (kind is int or kind is str or (kind is float and math.isfinite(ts))):
            return None
        source["ts"] = ts
    return source


def _all_finite(values: list[Any]) -> bool:
    for value in values:
        if type(value) is list:
            if not _all_finite(value):
                return False
        elif not math.isfinite(value):
            return False
    return True


def _number(value: float) -> bytes:
    # json.dumps writes a finite float as float.__repr__ (and an int as int.__repr__).
    return repr(value).encode()
