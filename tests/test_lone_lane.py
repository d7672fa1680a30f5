"""The lone-message lane (edge_agent/lone.py) against the general path, on a real model.

The lane answers only the plain case and must write exactly what the general path
writes for it; everything else it declines with no side effect, and the general path
answers or reports it."""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.fsio import FileSystem
from edge_agent.inference import InferenceEngine, SeqCounter, _Item
from edge_agent.lone import encode_prediction
from edge_agent.telemetry import Telemetry
from tests.support.publisher import FEATURES, World, wait_until

TOPIC = "plant/line1/a/sensors"
VARIABLE = ("ts", "latency_ms", "seq")  # differ between two answers of one message


@pytest.fixture
def world(tmp_path: Path, broker: Any, registry: Any) -> Iterator[World]:
    w = World(tmp_path, broker, registry)
    yield w
    w.close()


class _Bench:
    """A second engine on the agent's own loaded model, writing to lists."""

    def __init__(self, world: World, tmp: Path) -> None:
        agent = world.start_agent()
        world.deploy("v1", version=1, sequence=1)
        world.wait_event("activated")
        self.stored: list[tuple[str, bytes]] = []
        self.errors: list[tuple[str, dict[str, Any]]] = []
        self.seq = SeqCounter(tmp / "seq", fs=FileSystem())
        self.engine = InferenceEngine(
            agent.config,
            store_predictions=self._store,
            seq=self.seq,
            telemetry=Telemetry(window_s=60, state_dir=tmp),
            on_error=lambda kind, fields: self.errors.append((kind, fields)),
            prediction_topic="predictions",
        )
        loaded = agent.engine.current("pump")
        assert loaded is not None
        self.engine.install(loaded)

    def _store(self, items: list[tuple[str, bytes]], _on_sent: Any = None,
               committed: Any = None, defer: bool = False) -> None:
        self.stored.extend(items)
        self.deferred = defer
        if committed is not None:
            committed()

    def lone(self, payload: bytes) -> bytes | None:
        before = (len(self.stored), len(self.errors), self.seq.take())
        done: list[bool] = []
        self.deferred = False
        item = _Item(TOPIC, payload, time.monotonic())
        if not self.engine._answer_lone(item, lambda: done.append(True)):
            # declined: nothing stored, reported or numbered
            assert (len(self.stored), len(self.errors)) == before[:2]
            assert self.seq.take() == before[2] + 1
            return None
        assert len(self.stored) == before[0] + 1 and len(self.errors) == before[1]
        assert done == [True] and self.deferred  # acknowledged once stored, stored late
        return self.stored[-1][1]

    def general(self, payload: bytes) -> tuple[list[bytes], list[str]]:
        stored, errors = len(self.stored), len(self.errors)
        done: list[bool] = []
        self.engine._answer_batch([_Item(TOPIC, payload, time.monotonic())],
                                  lambda: done.append(True))
        assert done == [True]  # answered or refused, the input is done with
        return ([p for _t, p in self.stored[stored:]],
                [kind for kind, _f in self.errors[errors:]])


def _payloads() -> Iterator[tuple[bytes, bool]]:
    """(payload, plain): plain ones must take the lane."""
    rng = random.Random(3)
    for i in range(60):
        body: dict[str, Any] = {f: rng.gauss(0, 2) for f in FEATURES}
        body |= {"id": rng.choice([f"m{i}", i, None]), "ts": rng.choice([time.time(), 17, "t"])}
        if body["id"] is None:
            del body["id"]
        body["extra"] = rng.choice([1, "x", [1, 2], {"a": None}])  # extras are ignored
        yield json.dumps(body).encode(), True
    plain = dict.fromkeys(FEATURES, 0.5)
    odd: list[Any] = [
        plain | {"vibration": 1},  # an int for a double: the general rules cast it
        plain | {"vibration": 1e39},  # beyond float32
        plain | {"vibration": "0.5"},
        plain | {"vibration": None},
        dict.fromkeys(FEATURES[1:], 0.5),  # missing
        plain | {"id": True}, plain | {"id": 1.5}, plain | {"ts": [1]}, plain | {"ts": True},
        {"rows": [plain, plain]}, [plain], [plain, plain | {"vibration": "x"}],
    ]
    for body in odd:
        yield json.dumps(body).encode(), False
    yield b'{"vibration": NaN, "temperature": 0.5}', False
    yield json.dumps(plain).encode()[:-1], False  # truncated
    yield json.dumps(plain | {"ts": 1e999}).encode().replace(b"Infinity", b"1e999"), False
    yield b"\xff" + json.dumps(plain).encode(), False
    yield json.dumps(plain | {"pad": "x" * 300_000}).encode(), False  # over 256 KiB


def test_the_lane_writes_the_general_paths_bytes_and_declines_the_rest(
    world: World, tmp_path: Path
) -> None:
    bench = _Bench(world, tmp_path)
    answered = 0
    for payload, plain in _payloads():
        lane = bench.lone(payload)
        general, errors = bench.general(payload)
        if lane is None:
            assert not plain, f"a plain message was declined: {payload[:80]!r}"
            continue
        answered += 1
        assert errors == [] and len(general) == 1
        ours, theirs = json.loads(lane), json.loads(general[0])
        assert list(ours) == list(theirs)  # the same fields in the same order
        assert {k: v for k, v in ours.items() if k not in VARIABLE} == {
            k: v for k, v in theirs.items() if k not in VARIABLE
        }
        assert lane == encode_prediction(ours)  # compact JSON, as the general path's
        assert theirs["outputs"]["label"][0] in ("fault", "ok")  # classes mapped
        assert all(math.isfinite(p) for p in theirs["outputs"]["probabilities"][0])
    assert answered == 60


def test_encode_prediction_is_json_dumps_compact() -> None:
    body = {"a": [1, 2.5, None, True, "é\n\u2028"], "b": {"c": -0.0, "d": 1e300, "e": 10**20}}
    assert encode_prediction(body) == json.dumps(body, separators=(",", ":")).encode()


def test_a_real_agent_answers_paced_messages_through_the_lane(world: World) -> None:
    agent = world.start_agent()
    world.deploy("v1", version=1, sequence=1)
    world.wait_event("activated")
    before = agent.engine.lone
    for i in range(10):
        world.send(i)
        time.sleep(0.05)
    assert wait_until(lambda: len(world.predictions()) >= 10, 10)
    got = {p["source"]["id"] for p in world.predictions()}
    assert got == {f"m{i}" for i in range(10)}
    assert agent.engine.lone - before >= 5  # most of them; a slow turn may hand one off


@pytest.mark.parametrize(
    "text",
    [b'{"a": 1.5}', b' {"a": 1} ', b'{"a": 1}\n', b'{"a": 1} x', b"", b"   ", b"[1, 2]",
     b'"s"', b"{", b'{"a": NaN}', b'{"a": -Infinity}', b'{"a": 1}{"b": 2}', b"1e999"],
)
def test_decode_json_is_the_full_decoder(text: bytes) -> None:
    """The scanner shortcut gives the full decoder's value, or its very error."""
    from edge_agent.errors import InputError
    from edge_agent.inputs import _decoder, decode_json

    def outcome(decode: Any) -> Any:
        try:
            return ("value", decode())
        except (ValueError, InputError) as exc:
            return ("error", type(exc), str(exc))

    assert outcome(lambda: decode_json(text)) == outcome(lambda: _decoder.decode(text.decode()))
