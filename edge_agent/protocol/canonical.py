"""Canonical JSON: the exact bytes a manifest signature covers.

Rules (docs/protocol.md, "Canonical encoding"):

- objects: keys must be strings, sorted by Unicode code point, no duplicates;
- no whitespace: separators ``,`` and ``:``;
- strings: UTF-8, not ASCII-escaped; only ``"``, ``\\`` and control characters
  U+0000..U+001F are escaped (``\\" \\\\ \\b \\f \\n \\r \\t``, others ``\\u00XX``
  lower-case hex); lone surrogates are rejected;
- ``true``, ``false``, ``null``;
- integers (Python ``int``, not ``bool``) in plain decimal, any size;
- floats as Python ``repr``: the shortest decimal that round-trips to the same
  IEEE-754 double; positional when ``1e-4 <= |x| < 1e16`` (always with a ``.``,
  e.g. ``1.0``), else ``d[.ddd]e±XX`` with at least two exponent digits
  (``1e-05``, ``1.5e+16``); ``-0.0`` stays ``-0.0``;
- NaN and ±Infinity are rejected (infinite histogram edges travel as the strings
  ``"-inf"``/``"inf"``, docs/internals.md section 2).

Floats are allowed because golden outputs and drift baselines are signed; a
verifier parses the signed object and re-encodes it, and the shortest
round-trip form is stable across parse/encode cycles.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["CanonicalError", "canonical_bytes"]


class CanonicalError(ValueError):
    """A value that has no canonical encoding (NaN, a non-string key, a set...)."""


def canonical_bytes(value: Any) -> bytes:
    """Encode ``value`` canonically; raise ``CanonicalError`` if it cannot be."""
    parts: list[str] = []
    _encode(value, parts)
    try:
        return "".join(parts).encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates
        raise CanonicalError("string is not valid Unicode") from exc


def _encode(value: Any, out: list[str]) -> None:
    # bool before int: bool is a subclass of int.
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, int):
        out.append(int.__repr__(value))
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise CanonicalError(f"{value!r} has no JSON encoding")
        out.append(float.__repr__(value))
    elif isinstance(value, str):
        # json.dumps(ensure_ascii=False) escapes exactly ", \\ and U+0000..U+001F.
        out.append(json.dumps(value, ensure_ascii=False))
    elif isinstance(value, Mapping):
        _encode_object(value, out)
    elif isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _encode(item, out)
        out.append("]")
    else:
        raise CanonicalError(f"{type(value).__name__} has no canonical JSON encoding")


def _encode_object(value: Mapping[Any, Any], out: list[str]) -> None:
    for key in value:
        if not isinstance(key, str):
            raise CanonicalError(f"object key {key!r} is not a string")
    out.append("{")
    for i, key in enumerate(sorted(value)):
        if i:
            out.append(",")
        out.append(json.dumps(key, ensure_ascii=False))
        out.append(":")
        _encode(value[key], out)
    out.append("}")
