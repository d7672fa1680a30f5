"""Issue 6.10: generated sensor payloads against the running agent's inference path.

The gateway serves a real ONNX model; its ``InferenceEngine`` runs with its own batching
thread, and every payload goes in through ``engine.submit`` (what the MQTT callback calls)
and comes out in the outbox (predictions, error events). Hypothesis generates batches of
payloads mixing well-formed messages with malformed ones of every kind the input layer
knows (bad UTF-8, truncated or deeply nested JSON, NaN/Infinity/1e999, wrong types, missing
fields, empty rows, oversize). Pass: no crash (the engine thread survives and answers
afterwards), each bad payload gets exactly one error event (the per-kind event rate limiter
is lifted so that each is visible), every good one gets its prediction, none is answered
twice, and predictions keep the submission order.

Counts: 2,000 payloads by default, 10,000 under ``-m slow`` (same code).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.agent import RateLimiter
from edge_agent.protocol.predictions import iter_predictions
from tests.support.faults import FEATURES, Gateway, release, wait_for

TOPIC = "plant/line1/a/sensors"
PER_EXAMPLE = 50
_num = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)


def _good(i: int, values: list[float]) -> bytes:
    body: dict[str, Any] = dict(zip(FEATURES, values, strict=True))
    body["id"] = f"g{i}"
    return json.dumps(body).encode()


_junk_value = st.one_of(
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.text(alphabet="abcxyz", min_size=1, max_size=5),
)


@st.composite
def bad_payload(draw: st.DrawFn) -> bytes:
    values = draw(st.lists(_num, min_size=4, max_size=4))
    body: dict[str, Any] = dict(zip(FEATURES, values, strict=True))
    kind = draw(
        st.sampled_from(
            [
                "binary",
                "truncated",
                "missing",
                "junk-type",
                "nan",
                "inf-literal",
                "1e999",
                "scalar",
                "empty-list",
                "empty-rows",
                "deep",
                "oversize",
                "rows-not-list",
            ]
        )
    )
    field = draw(st.sampled_from(FEATURES))
    if kind == "binary":
        return b"\xff" + draw(st.binary(max_size=64))
    if kind == "truncated":
        raw = json.dumps(body).encode()
        return raw[: draw(st.integers(1, len(raw) - 1))]
    if kind == "missing":
        del body[field]
        body.update(draw(st.dictionaries(st.sampled_from(["x", "y", "z"]), _num, max_size=2)))
        return json.dumps(body).encode()
    if kind == "junk-type":
        body[field] = draw(_junk_value)
        return json.dumps(body).encode()
    if kind in ("nan", "inf-literal", "1e999"):
        literal = {"nan": "NaN", "inf-literal": "-Infinity", "1e999": "1e999"}[kind]
        raw = json.dumps(body).replace(json.dumps(body[field]), literal, 1)
        return raw.encode()
    if kind == "scalar":
        return json.dumps(
            draw(st.one_of(st.integers(), st.text(max_size=5), st.booleans(), st.none()))
        ).encode()
    if kind == "empty-list":
        return b"[]"
    if kind == "empty-rows":
        return b'{"rows": []}'
    if kind == "deep":
        depth = draw(st.integers(5_000, 100_000))
        return b"[" * depth + b"]" * depth
    if kind == "oversize":
        return json.dumps({**body, "pad": "x" * 300_000}).encode()
    return json.dumps({"rows": draw(_junk_value)}).encode()  # rows-not-list


@st.composite
def batches(draw: st.DrawFn) -> list[tuple[bool, bytes | list[float]]]:
    out: list[tuple[bool, bytes | list[float]]] = []
    for _ in range(PER_EXAMPLE):
        if draw(st.booleans()):
            out.append((True, draw(st.lists(_num, min_size=4, max_size=4))))
        else:
            out.append((False, draw(bad_payload())))
    return out


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Gateway]:
    gw = Gateway(tmp_path)
    gw.deliver(release(1))
    gw.agent._limiter = RateLimiter(10**9)
    gw.engine.start()
    yield gw
    gw.engine.stop()
    gw.close()


def _drain(gw: Gateway, after: int) -> tuple[int, list[dict[str, Any]], list[dict[str, Any]]]:
    preds, errors = [], []
    last = after
    for e in gw.agent.outbox.oldest(after, 1_000_000):
        last = e.id
        body = json.loads(e.payload)
        if e.topic.endswith("/predictions"):
            preds.extend(iter_predictions(body))
        elif e.topic.endswith("/events") and body.get("kind") == "error":
            errors.append(body)
    return last, preds, errors


@pytest.mark.parametrize(
    "total",
    [pytest.param(2_000, id="2000"), pytest.param(10_000, id="10000", marks=pytest.mark.slow)],
)
def test_generated_payloads_against_the_running_agent(running: Gateway, total: int) -> None:
    gw = running
    state = {"after": gw.agent.outbox.oldest(0, 1_000_000)[-1].id, "i": 0, "bad": 0, "good": 0}
    kinds: dict[str, int] = {}

    @settings(
        max_examples=total // PER_EXAMPLE,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(batch=batches())
    def run(batch: list[tuple[bool, bytes | list[float]]]) -> None:
        expected_ids = []
        bad = 0
        for good, item in batch:
            if good:
                state["i"] += 1
                assert isinstance(item, list)
                expected_ids.append(f"g{state['i']}")
                gw.engine.submit(TOPIC, _good(state["i"], item))
            else:
                assert isinstance(item, bytes)
                bad += 1
                gw.engine.submit(TOPIC, item)
        preds: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []

        def arrived() -> bool:
            last, p, e = _drain(gw, state["after"])
            preds.extend(p)
            errors.extend(e)
            state["after"] = last
            return len(preds) >= len(expected_ids) and len(errors) >= bad

        assert wait_for(arrived, 30), (len(preds), len(expected_ids), len(errors), bad)
        assert gw.engine.pending() == 0
        arrived()  # nothing more arrives than expected
        assert [p["source"]["id"] for p in preds] == expected_ids  # all, once, in order
        assert len(errors) == bad
        for p in preds:
            assert all(math.isfinite(v) for row in p["outputs"]["score"] for v in row)
        for e in errors:
            kinds[e["code"]] = kinds.get(e["code"], 0) + 1
        state["bad"] += bad
        state["good"] += len(expected_ids)

    run()
    assert state["bad"] + state["good"] == total
    # Every family of bad input was exercised and classified.
    assert {"malformed", "non_finite", "missing_field", "type", "empty", "oversized"} <= set(kinds)
    gw.engine.submit(TOPIC, _good(10**9, [0.1, 0.2, 0.3, 0.4]))
    assert wait_for(lambda: bool(_drain(gw, state["after"])[1]), 10), "engine died"
