"""Sensor payloads: JSON bytes -> rows of named fields -> the model's named features.

Accepted payload shapes (UTF-8 JSON, at most ``max_bytes``):

- one object of named fields: ``{"press": {"vibration": 0.1}, "id": "m1", "ts": 17e8}``
- a list of such objects: ``[{...}, {...}]``
- a batch: ``{"rows": [{...}, ...], "id": "batch-7", "ts": 17e8}``; a message-level
  ``id``/``ts`` applies to rows that carry none of their own.

Everything wrong is an ``InputError`` with a ``kind`` (for telemetry counters), a
``field`` when one is to blame, and a reason: malformed JSON, a wrong shape or type,
a missing field, NaN/Infinity (also ``1e999``, which Python parses as inf), oversize.
Whether a value fits its column (int, float, bool) is the signature's job
(``edge_agent.schema``); this module only guarantees scalars.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from edge_agent.errors import InputError

__all__ = ["FieldMapping", "Row", "decode_json", "parse_payload"]

@dataclass(frozen=True)
class Row:
    fields: Mapping[str, Any]
    id: str | int | None = None
    ts: float | str | None = None


def _no_constants(name: str) -> Any:
    raise InputError(f"{name} is not allowed in sensor data", kind="non_finite")


_decoder = json.JSONDecoder(parse_constant=_no_constants)
# The decoder's scanner (C when available): set by JSONDecoder.__init__, not in typeshed.
_scan: Callable[[str, int], tuple[Any, int]] = _decoder.scan_once  # type: ignore[attr-defined]


def decode_json(payload: bytes) -> Any:
    """UTF-8 JSON without NaN/Infinity; raises ``UnicodeDecodeError``,
    ``json.JSONDecodeError``, ``RecursionError`` or ``InputError`` (a constant)."""
    text = payload.decode("utf-8")
    # The decoder's C scanner alone when the document fills the text (the usual sensor
    # message); ``decode`` adds two regex scans for surrounding whitespace, and its
    # error messages: anything else goes through it.
    try:
        value, end = _scan(text, 0)
    except StopIteration:
        return _decoder.decode(text)
    return value if end == len(text) else _decoder.decode(text)


def parse_payload(payload: bytes, *, max_bytes: int) -> list[Row]:
    """Decode one MQTT payload into rows; raises ``InputError``."""
    if len(payload) > max_bytes:
        raise InputError(f"payload of {len(payload)} bytes exceeds the limit of {max_bytes}",
                         kind="oversized")
    try:
        data = decode_json(payload)
    except UnicodeDecodeError as exc:
        raise InputError(f"payload is not UTF-8: {exc.reason}", kind="malformed") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"malformed JSON: {exc.msg} at position {exc.pos}",
                         kind="malformed") from None
    except RecursionError:
        raise InputError("JSON nested too deeply", kind="malformed") from None
    if isinstance(data, list):
        return _rows(data, "", None, None)
    if not isinstance(data, dict):
        raise InputError(f"expected a JSON object or list, got {_json_type(data)}", kind="type")
    msg_id, msg_ts = _meta(data, "")
    if "rows" in data:
        rows = data["rows"]
        if not isinstance(rows, list):
            raise InputError(f"expected a list, got {_json_type(rows)}", field="rows",
                             kind="type")
        return _rows(rows, "rows", msg_id, msg_ts)
    return [Row(data, msg_id, msg_ts)]


def _rows(items: list[Any], where: str, msg_id: Any, msg_ts: Any) -> list[Row]:
    if not items:
        raise InputError("no rows in the message", field=where or None, kind="empty")
    rows = []
    for index, item in enumerate(items):
        field = f"{where}[{index}]" if where else f"[{index}]"
        if not isinstance(item, dict):
            raise InputError(f"expected an object, got {_json_type(item)}", field=field,
                             kind="type")
        row_id, row_ts = _meta(item, field + ".")
        rows.append(Row(item, msg_id if row_id is None else row_id,
                        msg_ts if row_ts is None else row_ts))
    return rows


def _meta(obj: dict[str, Any], prefix: str) -> tuple[str | int | None, float | str | None]:
    row_id, ts = obj.get("id"), obj.get("ts")
    if row_id is not None and (isinstance(row_id, bool) or not isinstance(row_id, str | int)):
        raise InputError(f"expected a string or integer, got {_json_type(row_id)}",
                         field=prefix + "id", kind="type")
    if ts is not None:
        if isinstance(ts, bool) or not isinstance(ts, int | float | str):
            raise InputError(f"expected a number or string, got {_json_type(ts)}",
                             field=prefix + "ts", kind="type")
        if isinstance(ts, float) and not math.isfinite(ts):
            raise InputError("not a finite number", field=prefix + "ts", kind="non_finite")
    return row_id, ts


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean",
             int: "number", float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


class FieldMapping:
    """feature name <- JSON field path (dots walk into objects: ``"press.vibration"``).

    A key that itself contains dots is found too: the whole path is tried as one key
    first. Features listed in ``optional`` may be absent (the signature decides)."""

    def __init__(self, mapping: Mapping[str, str], *, optional: Sequence[str] = ()) -> None:
        self.features = tuple(mapping)
        self._paths = [(feature, path, tuple(path.split("."))) for feature, path in
                       mapping.items()]
        self._optional = frozenset(optional)

    def path_of(self, feature: str) -> str | None:
        """The JSON field path feature ``feature`` is read from (None: not mapped)."""
        return next((path for f, path, _k in self._paths if f == feature), None)

    def extract(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        """The features of one row, by feature name; raises ``InputError``."""
        out: dict[str, Any] = {}
        for feature, path, keys in self._paths:
            value = fields.get(path, _ABSENT)  # a plain key, or a dotted key as one key
            if value is _ABSENT and len(keys) > 1:
                value = _walk(fields, path, keys)
            if value is _ABSENT:
                if feature in self._optional:
                    continue
                raise InputError("missing field", field=path, kind="missing_field")
            kind = type(value)
            if kind is float and -_MAX_FLOAT <= value <= _MAX_FLOAT:  # the common case
                out[feature] = value
                continue
            if kind is dict or kind is list:
                raise InputError(f"expected a scalar, got {_json_type(value)}", field=path,
                                 kind="type")
            if kind is float and not math.isfinite(value):
                raise InputError("not a finite number", field=path, kind="non_finite")
            out[feature] = value
        return out

    def extract_rows(
        self, rows: Sequence[Row]
    ) -> tuple[list[dict[str, Any]], list[int], list[tuple[int, InputError]]]:
        """Features of each row: (good feature dicts, their row indices, per-row errors)."""
        good: list[dict[str, Any]] = []
        indices: list[int] = []
        errors: list[tuple[int, InputError]] = []
        for index, row in enumerate(rows):
            try:
                good.append(self.extract(row.fields))
            except InputError as exc:
                errors.append((index, exc))
            else:
                indices.append(index)
        return good, indices, errors


_ABSENT: Any = object()
_MAX_FLOAT = sys.float_info.max  # finite floats compare within it; NaN and inf do not


def _walk(fields: Mapping[str, Any], path: str, keys: tuple[str, ...]) -> Any:
    node: Any = fields
    for depth, key in enumerate(keys):
        if not isinstance(node, dict):
            where = ".".join(keys[:depth])
            raise InputError(f"{where!r} is {_json_type(node)}, not an object", field=path,
                             kind="type")
        node = node.get(key, _ABSENT)
        if node is _ABSENT:
            return _ABSENT
    return node
