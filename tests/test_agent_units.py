"""Pure pieces of the agent: topic matching, sequence numbers, rate limits, states."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.agent import RateLimiter, device_keys
from edge_agent.errors import ConfigError
from edge_agent.fsio import FileSystem
from edge_agent.inference import SeqCounter, topic_matches
from edge_agent.updater import TRANSITIONS, State


@pytest.mark.parametrize(
    "pattern, topic, expected",
    [
        ("plant/+/sensors", "plant/a/sensors", True),
        ("plant/+/sensors", "plant/a/b/sensors", False),
        ("plant/#", "plant/a/b", True),
        ("plant/a", "plant/a/b", False),
        ("plant/a/b", "plant/a", False),
    ],
)
def test_topic_matches(pattern: str, topic: str, expected: bool) -> None:
    assert topic_matches(pattern, topic) is expected


def test_seq_counter_never_repeats_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "seq"
    first = SeqCounter(path, fs=FileSystem(), block=10)
    taken = [first.take() for _ in range(25)] + [first.take(5)]
    second = SeqCounter(path, fs=FileSystem(), block=10)  # a restart (or a kill -9)
    after = second.take()
    assert taken == sorted(set(taken)) and after > taken[-1] + 4


def test_rate_limiter_counts_what_it_suppresses() -> None:
    limiter = RateLimiter(per_second=2)
    results = [limiter.allow("malformed", 100.1) for _ in range(5)]
    assert [r[0] for r in results] == [True, True, False, False, False]
    assert limiter.allow("type", 100.2) == (True, 0)  # kinds are limited separately
    assert limiter.allow("malformed", 101.0) == (True, 3)  # next second: carries the count


def test_every_state_can_return_to_idle_and_idle_only_starts_checking() -> None:
    assert TRANSITIONS[State.IDLE] == {State.CHECKING}
    for state in State:
        if state is not State.IDLE:
            assert State.IDLE in TRANSITIONS[state]


def test_configured_key_id_must_match_its_key() -> None:
    from registry_sync.signing import generate_private_key, key_id, public_key_bytes

    key = generate_private_key()
    raw = public_key_bytes(key)
    assert set(device_keys({key_id(key): raw})) == {key_id(key)}
    assert set(device_keys({"release-2026": raw})) == {key_id(key)}  # a label, not an id
    with pytest.raises(ConfigError, match="key's id"):
        device_keys({"0123456789abcdef": raw})


class _DeadLink:
    connected = False

    def healthy(self) -> bool:
        return False

    def stop(self, timeout: float = 5.0) -> None:
        pass


def test_a_link_that_stays_unhealthy_ends_run_with_non_zero(tmp_path: Path) -> None:
    from edge_agent.agent import EXIT_UNHEALTHY, Agent
    from edge_agent.config import load_config
    from registry_sync.signing import generate_private_key, key_id, public_key_bytes
    from tests.support.broker import free_port
    from tests.support.publisher import write_config

    key = generate_private_key()
    config = write_config(
        tmp_path / "a.toml",
        device="gw-u",
        port=free_port(),
        state_dir=tmp_path / "state",
        keys={key_id(key): public_key_bytes(key)},
    )
    agent = Agent(load_config(config))
    agent.link = _DeadLink()  # type: ignore[assignment]
    assert agent.run(unhealthy_after_s=0.2, tick_s=0.02) == EXIT_UNHEALTHY
    assert agent.outbox.path.exists()


def test_sd_notify_writes_to_notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from edge_agent.agent import sd_notify

    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert sd_notify("WATCHDOG=1")
        assert server.recv(64) == b"WATCHDOG=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert sd_notify("WATCHDOG=1") is False


@pytest.mark.parametrize("value, ok", [("full", True), ("normal", True), ("fast", False)])
def test_outbox_sync_config(tmp_path: Path, value: str, ok: bool) -> None:
    from edge_agent.config import load_config
    from registry_sync.signing import generate_private_key, key_id, public_key_bytes
    from tests.support.publisher import write_config

    key = generate_private_key()
    path = write_config(
        tmp_path / "a.toml",
        device="gw-s",
        port=1883,
        state_dir=tmp_path / "s",
        keys={key_id(key): public_key_bytes(key)},
    )
    path.write_text(path.read_text().replace("[limits]\n", f'[limits]\noutbox_sync = "{value}"\n'))
    if ok:
        assert load_config(path).limits.outbox_sync == value
    else:
        with pytest.raises(ConfigError, match=r"\[limits\]\.outbox_sync"):
            load_config(path)


def test_output_helpers_fast_paths_match_the_general_ones() -> None:
    import numpy as np

    from edge_agent.inference import _non_finite_rows, _source_meta
    from edge_agent.inputs import Row

    assert _source_meta([Row({}, "m1", 1.5)]) == {"id": "m1", "ts": 1.5}
    assert _source_meta([Row({})]) == {}
    assert _source_meta([Row({}, 7), Row({}, 7)]) == {"id": 7}
    assert _source_meta([Row({}, 1, 2.0), Row({}, 2, 2.0)]) == {"id": [1, 2], "ts": 2.0}
    finite = {"p": np.array([[0.1, 0.9], [0.5, 0.5]], dtype=np.float32), "label": np.array([0, 1])}
    assert _non_finite_rows(finite) == 0
    bad = {"p": np.array([[0.1, np.nan], [0.5, 0.5], [np.inf, 0.0]], dtype=np.float32)}
    assert _non_finite_rows(bad) == 2


def _loaded_for(signature: dict[str, Any], fields: dict[str, str]) -> Any:
    """A LoadedModel for its input rules only (no session is run here)."""
    from types import SimpleNamespace

    from edge_agent.inference import LoadedModel
    from edge_agent.inputs import FieldMapping
    from edge_agent.schema import Signature

    sig = Signature.from_dict(signature, feature_names=list(fields))
    manifest = SimpleNamespace(model="m", version=1, variant="onnx-fp32", classes=None)
    optional = [c.name for c in sig.columns if not c.required]
    return LoadedModel(
        name="m", sha256="0" * 64, manifest=cast(Any, manifest), session=cast(Any, None),
        signature=sig, fields=FieldMapping(fields, optional=optional), drift=None,
    )


_FAST_FIELDS = {"a": "a", "b": "press.b", "c": "c"}
_FAST_SIGNATURE = {"inputs": [{"name": n, "type": "double"} for n in _FAST_FIELDS]}
_VALUE = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-1e6, max_value=1e6),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.booleans(), st.none(), st.text(max_size=3),
    st.dictionaries(st.sampled_from(["b", "x"]), st.floats(-10, 10), max_size=2),
)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(["a", "press.b", "press", "c", "d"]), _VALUE))
def test_infer_fast_path_gives_what_the_general_rules_give(row: dict[str, Any]) -> None:
    """For any row, fast_x is None (the general path decides) or exactly the array the
    field mapping and the signature rules build; every all-float row takes it."""
    from edge_agent.errors import InputError

    loaded = _loaded_for(_FAST_SIGNATURE, _FAST_FIELDS)
    fast = loaded.fast_x(row)
    try:
        enforced = loaded.signature.enforce([loaded.fields.extract(row)])
    except InputError:
        assert fast is None
        return
    if enforced.errors:
        assert fast is None
        return
    if fast is not None:
        assert fast.dtype == enforced.x.dtype and np.array_equal(fast, enforced.x)
    plain = [row.get(k) for k in ("a", "press.b", "c")]
    if all(type(v) is float and abs(v) < 3e38 for v in plain):
        assert fast is not None


def test_infer_fast_path_is_off_for_optional_or_non_float_inputs() -> None:
    optional = {"inputs": [{"name": "a", "type": "double"},
                           {"name": "b", "type": "double", "required": False}]}
    assert _loaded_for(optional, {"a": "a", "b": "b"}).fast_keys is None
    ints = {"inputs": [{"name": "a", "type": "double"}, {"name": "b", "type": "long"}]}
    assert _loaded_for(ints, {"a": "a", "b": "b"}).fast_keys is None
    assert _loaded_for(_FAST_SIGNATURE, _FAST_FIELDS).fast_keys == ("a", "press.b", "c")
