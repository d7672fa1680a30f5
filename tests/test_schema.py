"""MLflow signature rules, one by one, and payload parsing; fuzzed with Hypothesis."""

from __future__ import annotations

import contextlib
import json
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.errors import InputError, RuntimeLoadError
from edge_agent.inputs import FieldMapping, Row, parse_payload
from edge_agent.schema import Signature

SIGNATURE = {
    "inputs": [
        {"type": "double", "name": "a", "required": True},
        {"type": "long", "name": "b", "required": True},
        {"type": "integer", "name": "c", "required": True},
        {"type": "float", "name": "d", "required": True},
        {"type": "boolean", "name": "e", "required": True},
    ],
    "outputs": None,
    "params": None,
}
GOOD = {"a": 1.5, "b": 2, "c": 3, "d": 0.25, "e": True}


def one(row: dict[str, Any], signature: dict[str, Any] = SIGNATURE, **kw: Any) -> np.ndarray:
    result = Signature.from_dict(signature, **kw).enforce([row])
    if result.errors:
        raise result.errors[0][1]
    return result.x[0]


def test_inputs_matched_by_name_in_signature_order_extra_ignored() -> None:
    row = {"e": False, "d": 4.0, "zz": "ignored", "c": 3, "b": 2, "a": 1.0}
    assert one(row).tolist() == [1.0, 2.0, 3.0, 4.0, 0.0]
    assert Signature.from_dict(SIGNATURE).feature_names == ("a", "b", "c", "d", "e")


def test_missing_required_input_is_an_error() -> None:
    with pytest.raises(InputError, match=r"Model is missing inputs \['b'\]") as info:
        one({k: v for k, v in GOOD.items() if k != "b"})
    assert info.value.kind == "missing_input" and info.value.field == "b"
    with pytest.raises(InputError, match="missing inputs"):
        one({**GOOD, "b": None})


def test_optional_input_may_be_missing() -> None:
    sig = {
        "inputs": [
            {"type": "double", "name": "a"},
            {"type": "double", "name": "opt", "required": False},
        ]
    }
    x = one({"a": 1}, sig)
    assert x[0] == 1.0 and math.isnan(x[1])


@pytest.mark.parametrize(
    ("column", "value", "expected"),
    [
        ("a", 1, 1.0),  # int -> double
        ("d", 7, 7.0),  # int -> float
        ("b", 2**40, float(2**40)),  # int -> long
        ("b", 5.0, 5.0),  # an integral float -> long
        ("c", -(2**31), float(-(2**31))),  # int32 bounds
        ("c", 2**31 - 1, float(2**31 - 1)),
        ("e", False, 0.0),
    ],
)
def test_safe_casts_are_accepted(column: str, value: Any, expected: float) -> None:
    x = one({**GOOD, column: value})
    assert x[list(GOOD).index(column)] == np.float32(expected)


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("b", 2.5, "Can not safely convert float64 to int64"),
        ("c", 2.5, "Can not safely convert float64 to int32"),
        ("c", 2**31, "does not fit int32"),
        ("b", 2**63, "does not fit int64"),
        ("a", True, "Can not safely convert bool to float64"),
        ("b", False, "Can not safely convert bool to int64"),
        ("e", 1, "Can not safely convert int64 to bool"),
        ("e", "true", "Can not safely convert str to bool"),
        ("a", "1.5", "Can not safely convert str to float64"),
        ("d", 1e300, "does not fit float32"),
        ("a", 10**400, "does not fit float32"),
    ],
)
def test_unsafe_conversions_are_refused(column: str, value: Any, message: str) -> None:
    with pytest.raises(InputError, match=message) as info:
        one({**GOOD, column: value})
    assert info.value.field == column


def test_non_finite_rejected_unless_allowed() -> None:
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(InputError) as info:
            one({**GOOD, "a": bad})
        assert info.value.kind == "non_finite"
    assert math.isnan(one({**GOOD, "a": math.nan}, allow_non_finite=True)[0])
    with pytest.raises(InputError, match="float64 to int64"):
        one({**GOOD, "b": math.nan}, allow_non_finite=True)


def test_one_bad_row_does_not_spoil_the_batch() -> None:
    rows = [GOOD, {**GOOD, "a": "x"}, {**GOOD, "b": 1}, "not a row", {**GOOD, "c": 9.5}]
    result = Signature.from_dict(SIGNATURE).enforce(rows)  # type: ignore[arg-type]
    assert result.rows.tolist() == [0, 2]
    assert result.x.dtype == np.float32 and result.x.shape == (2, 5)
    assert result.x[1, 1] == 1.0
    assert [i for i, _e in result.errors] == [1, 3, 4]
    assert all(isinstance(e, InputError) for _i, e in result.errors)


def test_unsupported_signatures_fail_to_load() -> None:
    with pytest.raises(RuntimeLoadError, match="string"):
        Signature.from_dict({"inputs": [{"type": "string", "name": "s"}]})
    with pytest.raises(RuntimeLoadError):
        Signature.from_dict({"inputs": []})
    with pytest.raises(RuntimeLoadError, match="feature names"):
        Signature.from_dict(
            {"inputs": [{"type": "tensor", "tensor-spec": {"dtype": "float64", "shape": [-1, 4]}}]}
        )


TENSOR = {
    "inputs": [{"type": "tensor", "tensor-spec": {"dtype": "float64", "shape": [-1, 3]}}],
    "outputs": None,
    "params": None,
}


def test_tensor_signature_dtype_and_shape() -> None:
    sig = Signature.from_dict(TENSOR, feature_names=["x", "y", "z"])
    x = sig.enforce_tensor([[1, 2.5, 3], [4, 5, 6]])
    assert x.dtype == np.float32 and x.shape == (2, 3)
    with pytest.raises(InputError, match="does not match expected shape"):
        sig.enforce_tensor([[1, 2]])
    with pytest.raises(InputError, match="does not match expected shape"):
        sig.enforce_tensor([1, 2, 3])
    with pytest.raises(InputError, match="str to float64"):
        sig.enforce_tensor([[1, 2, "3"]])
    # Rows of named values work for a tensor signature through the bundle's names.
    assert sig.enforce([{"z": 3, "y": 2, "x": 1}]).x.tolist() == [[1.0, 2.0, 3.0]]
    ints = Signature.from_dict(
        {"inputs": [{"type": "tensor", "tensor-spec": {"dtype": "int32", "shape": [-1, 2]}}]},
        feature_names=["p", "q"],
    )
    assert ints.enforce_tensor([[1, 2.0]]).tolist() == [[1.0, 2.0]]
    with pytest.raises(InputError, match="float64 to int32"):
        ints.enforce_tensor([[1, 2.5]])


def test_vectorised_path_agrees_with_the_scalar_path() -> None:
    rng = np.random.default_rng(0)
    pool: list[Any] = [0, 1, -3, 2.0, 2.5, 1e300, True, "s", None, 2**31, math.nan, 10**400]
    sig = Signature.from_dict(SIGNATURE)
    rows = [
        {k: (pool[rng.integers(len(pool))] if rng.random() < 0.3 else v) for k, v in GOOD.items()}
        for _ in range(300)
    ]
    batch = sig.enforce(rows)
    singles = [sig.enforce([r]) for r in rows]
    assert batch.rows.tolist() == [i for i, s in enumerate(singles) if not s.errors]
    assert np.array_equal(batch.x, np.concatenate([s.x for s in singles]))
    assert [str(e) for _i, e in batch.errors] == [str(s.errors[0][1]) for s in singles if s.errors]


# ---- payloads ----------------------------------------------------------------------


def test_payload_shapes() -> None:
    single = parse_payload(b'{"id": "m1", "ts": 1.5, "press": {"vibration": 0.1}}', max_bytes=999)
    assert single == [Row({"id": "m1", "ts": 1.5, "press": {"vibration": 0.1}}, "m1", 1.5)]
    listed = parse_payload(b'[{"v": 1}, {"v": 2, "id": 7}]', max_bytes=999)
    assert [r.id for r in listed] == [None, 7]
    batch = parse_payload(
        b'{"id": "b", "ts": 9, "rows": [{"v": 1}, {"v": 2, "ts": 3}]}', max_bytes=999
    )
    assert [(r.id, r.ts) for r in batch] == [("b", 9), ("b", 3)]


@pytest.mark.parametrize(
    ("payload", "kind", "field"),
    [
        (b'{"v": 1', "malformed", None),
        (b"\xff\xfe", "malformed", None),
        (b"3", "type", None),
        (b"[]", "empty", None),
        (b"[1]", "type", "[0]"),
        (b'{"rows": 5}', "type", "rows"),
        (b'{"rows": [{"v": 1}, "x"]}', "type", "rows[1]"),
        (b'{"v": NaN}', "non_finite", None),
        (b'{"v": 1, "id": true}', "type", "id"),
        (b'{"v": 1, "ts": [1]}', "type", "ts"),
        (b'{"rows": [{"v": 1, "ts": 1e999}]}', "non_finite", "rows[0].ts"),
        (b"[" * 100_000, "malformed", None),
        (b'{"v": "' + b"x" * 2000 + b'"}', "oversized", None),
    ],
)
def test_bad_payloads(payload: bytes, kind: str, field: str | None) -> None:
    with pytest.raises(InputError) as info:
        parse_payload(payload, max_bytes=200_000 if payload.startswith(b"[[") else 1000)
    assert info.value.kind == kind
    assert info.value.field == field


def test_field_mapping() -> None:
    mapping = FieldMapping({"vib": "press.vibration", "t": "temp", "dotted": "a.b"}, optional=["t"])
    assert mapping.extract({"press": {"vibration": 0.5}, "a.b": 1}) == {"vib": 0.5, "dotted": 1}
    for fields, kind, field in [
        ({"a.b": 1}, "missing_field", "press.vibration"),
        ({"press": 3, "a.b": 1}, "type", "press.vibration"),
        ({"press": {"vibration": [1]}, "a.b": 1}, "type", "press.vibration"),
        ({"press": {"vibration": 1e999}, "a.b": 1}, "non_finite", "press.vibration"),
    ]:
        with pytest.raises(InputError) as info:
            mapping.extract(fields)
        assert (info.value.kind, info.value.field) == (kind, field)
    good, indices, errors = mapping.extract_rows(
        [Row({"press": {"vibration": 1}, "a": {"b": 2}}), Row({})]
    )
    assert good == [{"vib": 1, "dotted": 2}] and indices == [0] and errors[0][0] == 1


def test_field_mapping_plain_keys_keep_every_check() -> None:
    # Plain keys take the fast path (float within range); everything else the full one.
    mapping = FieldMapping({"x": "x"})
    big = 1.7976931348623157e308
    assert mapping.extract({"x": big}) == {"x": big}
    assert mapping.extract({"x": -0.0}) == {"x": -0.0}
    assert mapping.extract({"x": 3}) == {"x": 3} and mapping.extract({"x": True}) == {"x": True}
    for value, kind in [
        (float("nan"), "non_finite"), (float("inf"), "non_finite"), (-float("inf"), "non_finite"),
        ({"a": 1}, "type"), ([1.0], "type"),
    ]:
        with pytest.raises(InputError) as info:
            mapping.extract({"x": value})
        assert (info.value.kind, info.value.field) == (kind, "x")


# ---- fuzz: whatever arrives, only InputError comes out -------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=20,
)
field_names = st.sampled_from(["a", "b", "c", "d", "e", "rows", "id", "ts", "x"])
row_like = st.dictionaries(field_names, json_values, max_size=6)
payloads = (
    json_values
    | row_like
    | st.lists(row_like, max_size=4)
    | st.fixed_dictionaries(
        {"rows": st.lists(row_like, max_size=4)}, optional={"id": json_values, "ts": json_values}
    )
)


def pipeline(payload: bytes) -> None:
    rows = parse_payload(payload, max_bytes=4096)
    mapping = FieldMapping({name: name for name in GOOD}, optional=["e"])
    features, _indices, _errors = mapping.extract_rows(rows)
    result = Signature.from_dict(SIGNATURE).enforce(features)
    assert result.x.shape == (len(result.rows), 5)
    assert np.isfinite(result.x).all()


@settings(max_examples=400, deadline=None)
@given(payloads)
def test_fuzz_json_payloads_only_raise_input_error(value: Any) -> None:
    payload = json.dumps(value).encode()  # NaN/Infinity included: json.dumps allows them
    with contextlib.suppress(InputError):
        pipeline(payload)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_fuzz_raw_bytes_only_raise_input_error(payload: bytes) -> None:
    with contextlib.suppress(InputError):
        pipeline(payload)
