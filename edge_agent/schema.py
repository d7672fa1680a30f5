"""MLflow signature enforcement on the device, without importing MLflow.

The signature is MLflow's ``ModelSignature.to_dict()`` with its JSON strings decoded
(docs/internals.md section 3). The rules are MLflow's (``mlflow.models.utils``
``_enforce_schema``), applied to JSON-decoded rows:

- column-based: inputs are matched by name and put in the signature's order; a missing
  required input is an error ("Model is missing inputs [...]"), extra inputs are ignored;
  only safe casts: int -> long -> float -> double widening, bool only for boolean
  columns, a float for an integer column only when it is integral and in range
  ("Can not safely convert float64 to int32" otherwise), strings never for numbers;
- tensor-based: the dtype's kind decides what is accepted (same safe-cast rules per
  element), the shape must match with -1 as a variable axis.

Why per value and not per column dtype: MLflow applies these rules to pandas dtypes, so
an int64 column is refused for an ``integer`` (int32) input even when every value fits,
while its JSON scoring path casts first with ``astype`` and silently turns 2.5 into 2 for
a ``long``, 2**40 into 0 for an ``integer`` and "1.5" into 1.5 (checked against MLflow
3.17). lineside keeps MLflow's rule -- never a conversion that alters a value -- and
applies it to each JSON value, which is the only type a sensor message has.

On top of MLflow: NaN and +-inf are rejected unless ``allow_non_finite`` (JSON has no
NaN; Python's json module accepts it), and values must fit float32, the model's input.
Output: a float32 array [N, F] of the good rows in signature order, plus one
``InputError`` per bad row; one bad row never spoils the batch.

Speed: this runs on every message. Per column, the values are gathered with one list
comprehension, their Python types checked as a set, converted with one ``np.array`` and
checked vectorised; only a column holding something unusual goes element by element.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_agent.errors import InputError, RuntimeLoadError

__all__ = ["F32_MAX", "Column", "Enforced", "Signature", "TensorSpec"]

_MISSING: Any = object()
_F32_MAX = float(np.finfo(np.float32).max)
F32_MAX = _F32_MAX
_SMALL_BATCH = 4  # up to this many rows, scalar Python beats per-column numpy calls


@dataclass(frozen=True)
class _Rule:
    """How one MLflow type accepts JSON scalars."""

    numpy_name: str  # the name MLflow's messages use
    kind: str  # "b" bool, "i" signed, "u" unsigned, "f" float
    low: float = -math.inf
    high: float = math.inf

    @property
    def fast_types(self) -> frozenset[type]:
        if self.kind == "b":
            return frozenset({bool})
        if self.kind in "iu":
            return frozenset({int})  # floats take the checked path below
        return frozenset({int, float})


def _int_rule(name: str, bits: int, *, signed: bool = True) -> _Rule:
    # Exact integer bounds: 2**63 - 1 is not representable as a float.
    if signed:
        return _Rule(name, "i", -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return _Rule(name, "u", 0, 2**bits - 1)


# MLflow column types usable as float32 model features.
_COLUMN_RULES = {
    "boolean": _Rule("bool", "b"),
    "integer": _int_rule("int32", 32),
    "long": _int_rule("int64", 64),
    "float": _Rule("float32", "f"),
    "double": _Rule("float64", "f"),
}
_TENSOR_RULES = {
    "bool": _Rule("bool", "b"),
    **{f"int{b}": _int_rule(f"int{b}", b) for b in (8, 16, 32, 64)},
    **{f"uint{b}": _int_rule(f"uint{b}", b, signed=False) for b in (8, 16, 32, 64)},
    **{f"float{b}": _Rule(f"float{b}", "f") for b in (16, 32, 64)},
}
_JSON_NAMES = {bool: "bool", int: "int64", float: "float64", str: "str", type(None): "None"}


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    required: bool = True


@dataclass(frozen=True)
class TensorSpec:
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Enforced:
    x: np.ndarray  # float32 [M, F], the good rows in signature order
    rows: np.ndarray  # int64 [M], index of each good row in the input
    errors: tuple[tuple[int, InputError], ...]  # (input row index, error), one per bad row


@dataclass
class _Problems:
    errors: dict[int, InputError] = field(default_factory=dict)  # row -> first error
    missing: dict[int, list[str]] = field(default_factory=dict)  # row -> missing inputs


class Signature:
    """A parsed MLflow signature that turns rows into the model's float32 input."""

    def __init__(
        self,
        columns: Sequence[Column],
        *,
        tensor: TensorSpec | None = None,
        allow_non_finite: bool = False,
    ) -> None:
        self.columns = tuple(columns)
        self.tensor = tensor
        self.allow_non_finite = allow_non_finite
        self.feature_names = tuple(c.name for c in self.columns)
        rules = _TENSOR_RULES if tensor else _COLUMN_RULES
        self._rules = [rules[tensor.dtype if tensor else c.type] for c in self.columns]
        # Every column a float: a row of finite JSON floats in float32 range needs no
        # per-value check (the common sensor message), see _rows_scalar.
        self._all_float = all(r.kind == "f" for r in self._rules)

    @property
    def plain_floats(self) -> bool:
        """Every column a required float: a row of finite JSON floats in float32 range is
        the model's input as it is (the ``_rows_scalar`` fast check, ``infer``'s fast
        path)."""
        return self._all_float and all(c.required for c in self.columns)

    @classmethod
    def from_dict(
        cls,
        signature: Mapping[str, Any],
        *,
        feature_names: Sequence[str] | None = None,
        allow_non_finite: bool = False,
    ) -> Signature:
        """Parse ``{"inputs": [...], ...}``. A tensor signature has no names: rows are
        keyed by ``feature_names`` (the bundle's), whose count must fit the shape."""
        inputs = signature.get("inputs") if isinstance(signature, Mapping) else None
        if not isinstance(inputs, list) or not inputs:
            raise RuntimeLoadError("signature: 'inputs' must be a non-empty list")
        if all(isinstance(i, Mapping) and i.get("type") == "tensor" for i in inputs):
            return cls._from_tensor(inputs, feature_names, allow_non_finite)
        columns = []
        for index, spec in enumerate(inputs):
            if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
                raise RuntimeLoadError(f"signature: input {index} needs a name and a type")
            kind = spec.get("type")
            if kind not in _COLUMN_RULES:
                raise RuntimeLoadError(
                    f"signature: input {spec['name']!r} has type {kind!r}; lineside feeds "
                    f"numeric features only ({', '.join(_COLUMN_RULES)})"
                )
            columns.append(Column(spec["name"], kind, bool(spec.get("required", True))))
        if len({c.name for c in columns}) != len(columns):
            raise RuntimeLoadError("signature: duplicate input names")
        return cls(columns, allow_non_finite=allow_non_finite)

    @classmethod
    def _from_tensor(
        cls, inputs: list[Any], feature_names: Sequence[str] | None, allow_non_finite: bool
    ) -> Signature:
        if len(inputs) != 1:
            raise RuntimeLoadError("signature: lineside feeds one input tensor")
        spec = inputs[0].get("tensor-spec")
        if not isinstance(spec, Mapping):
            raise RuntimeLoadError("signature: tensor input without 'tensor-spec'")
        dtype, shape = spec.get("dtype"), spec.get("shape")
        if dtype not in _TENSOR_RULES:
            raise RuntimeLoadError(f"signature: unsupported tensor dtype {dtype!r}")
        if not isinstance(shape, list) or not shape or not all(
            isinstance(d, int) and (d > 0 or d == -1) for d in shape
        ):
            raise RuntimeLoadError(f"signature: invalid tensor shape {shape!r}")
        width = math.prod(shape[1:])
        if feature_names is None or (width > 0 and len(feature_names) != width):
            raise RuntimeLoadError(
                f"signature: tensor shape {shape} needs {width} feature names, "
                f"got {None if feature_names is None else len(feature_names)}"
            )
        columns = [Column(name, dtype) for name in feature_names]
        return cls(columns, tensor=TensorSpec(dtype, tuple(shape)),
                   allow_non_finite=allow_non_finite)

    # ---- rows of named fields ----------------------------------------------------

    def enforce(self, rows: Sequence[Mapping[str, Any]]) -> Enforced:
        """Rows of named values -> float32 [M, F] of the good rows + per-row errors."""
        n = len(rows)
        problems = _Problems()
        errors = problems.errors
        for i, row in enumerate(rows):
            if not isinstance(row, Mapping):
                errors[i] = InputError(f"expected an object, got {type(row).__name__}")
        safe_rows = [r if isinstance(r, Mapping) else {} for r in rows] if errors else rows
        if n <= _SMALL_BATCH:
            x = self._rows_scalar(safe_rows, problems)
        else:
            x = np.empty((n, len(self.columns)), dtype=np.float32)
            for j, (column, rule) in enumerate(zip(self.columns, self._rules, strict=True)):
                values = [r.get(column.name, _MISSING) for r in safe_rows]
                x[:, j] = self._column(column, rule, values, problems)
        for i, names in problems.missing.items():
            errors.setdefault(i, InputError(f"Model is missing inputs {names}.",
                                            field=names[0], kind="missing_input"))
        if not errors:
            return Enforced(x, np.arange(n, dtype=np.int64), ())
        good = np.array([i for i in range(n) if i not in errors], dtype=np.int64)
        return Enforced(x[good], good, tuple(sorted(errors.items())))

    def _rows_scalar(self, rows: Sequence[Mapping[str, Any]], problems: _Problems) -> np.ndarray:
        # A few rows: numpy's per-call overhead (~5 us per column) would dominate, so the
        # values are checked one by one in Python and converted with a single np.array.
        pairs = list(zip(self.columns, self._rules, strict=True))
        names = self.feature_names
        table = []
        for i, row in enumerate(rows):
            if self._all_float:
                values = [row.get(name) for name in names]
                # NaN fails both comparisons, so it takes the checked path below.
                if all(type(v) is float and -_F32_MAX <= v <= _F32_MAX for v in values):
                    table.append(values)
                    continue
            table.append([self._scalar(column, rule, row.get(column.name, _MISSING), i, problems)
                          for column, rule in pairs])
        return np.array(table, dtype=np.float32).reshape(len(rows), len(pairs))

    def _column(
        self,
        column: Column,
        rule: _Rule,
        values: list[Any],
        problems: _Problems,
    ) -> np.ndarray:
        if set(map(type, values)) <= rule.fast_types:
            try:
                out = np.array(values, dtype=np.float64)
            except OverflowError:  # an int beyond float64: the slow path names it
                pass
            else:
                bad = self._vector_bad(out, rule)
                if not bad.any():
                    return out
                for i in np.flatnonzero(bad):
                    out[i] = self._scalar(column, rule, values[i], int(i), problems)
                return out
        return np.array(
            [self._scalar(column, rule, v, i, problems) for i, v in enumerate(values)],
            dtype=np.float64,
        )

    def _vector_bad(self, out: np.ndarray, rule: _Rule) -> np.ndarray:
        bad = ~np.isfinite(out) if not self.allow_non_finite else np.zeros(out.shape, bool)
        if rule.kind in "iu":
            # high + 1 is a power of two, exact in float64, unlike high itself.
            bad |= (out < rule.low) | (out >= float(rule.high + 1))
        elif rule.kind == "f":
            bad |= np.isfinite(out) & (np.abs(out) > _F32_MAX)
        return bad

    def _scalar(
        self,
        column: Column,
        rule: _Rule,
        value: Any,
        row: int,
        problems: _Problems,
    ) -> float:
        """Check one value the slow way; record an error and return NaN if it is bad."""
        if value is _MISSING or value is None:
            if column.required:
                problems.missing.setdefault(row, []).append(column.name)
            return math.nan  # an optional input left out: the model sees NaN
        try:
            return _convert(value, rule, self.allow_non_finite)
        except _Unsafe as exc:
            if row not in problems.errors:
                problems.errors[row] = InputError(exc.reason(column.name), field=column.name,
                                         kind=exc.kind)
            return math.nan

    # ---- a raw tensor --------------------------------------------------------------

    def enforce_tensor(self, batch: Any) -> np.ndarray:
        """A nested list for a tensor signature -> float32 [N, F]; raises InputError."""
        if self.tensor is None:
            raise InputError("this model has a column-based signature; send named fields",
                             kind="schema")
        rule = self._rules[0]
        try:
            array = np.asarray(batch, dtype=object)
        except ValueError as exc:  # ragged nesting
            raise InputError(f"not a rectangular array: {exc}", kind="shape") from exc
        expected = self.tensor.shape
        if array.ndim != len(expected) or any(
            e not in (-1, a) for e, a in zip(expected, array.shape, strict=True)
        ):
            raise InputError(f"Shape of input {list(array.shape)} does not match expected "
                             f"shape {list(expected)}.", kind="shape")
        flat = [_checked(v, rule, self.allow_non_finite) for v in array.ravel().tolist()]
        out = np.array(flat, dtype=np.float64).astype(np.float32)
        return out.reshape(array.shape[0], -1) if array.shape[0] else out.reshape(0, -1)


class _Unsafe(Exception):  # noqa: N818 - internal signal, never escapes this module
    def __init__(self, source: str, target: str, kind: str = "type") -> None:
        super().__init__(source)
        self.source, self.target, self.kind = source, target, kind

    def reason(self, name: str) -> str:
        if self.kind == "non_finite":
            return f"{self.source} is not allowed for column {name}"
        if self.kind == "range":
            return f"value {self.source} for column {name} does not fit {self.target}"
        return (f"Incompatible input types for column {name}. "
                f"Can not safely convert {self.source} to {self.target}.")


def _convert(value: Any, rule: _Rule, allow_non_finite: bool) -> float:
    kind = type(value)
    if kind is float and rule.kind == "f" and -_F32_MAX <= value <= _F32_MAX:
        return value  # type: ignore[no-any-return]  # the common case, checked first
    if rule.kind == "b":
        if kind is bool:
            return 1.0 if value else 0.0
        raise _Unsafe(_JSON_NAMES.get(kind, kind.__name__), "bool")
    if kind is bool or kind not in (int, float):  # bool is an int in Python, not in MLflow
        raise _Unsafe(_JSON_NAMES.get(kind, kind.__name__), rule.numpy_name)
    if kind is float and not math.isfinite(value):
        if not allow_non_finite:
            raise _Unsafe(repr(value), rule.numpy_name, "non_finite")
        if rule.kind == "f":
            return float(value)
        raise _Unsafe("float64", rule.numpy_name)
    if rule.kind in "iu":
        if kind is float and not value.is_integer():
            raise _Unsafe("float64", rule.numpy_name)
        if not rule.low <= value <= rule.high:
            raise _Unsafe(repr(value), rule.numpy_name, "range")
        return float(value)
    try:
        result = float(value)
    except OverflowError as exc:
        raise _Unsafe(repr(value), "float32", "range") from exc
    if abs(result) > _F32_MAX:
        raise _Unsafe(repr(value), "float32", "range")
    return result


def _checked(value: Any, rule: _Rule, allow_non_finite: bool) -> float:
    try:
        return _convert(value, rule, allow_non_finite)
    except _Unsafe as exc:
        raise InputError(exc.reason("tensor"), kind=exc.kind) from None
