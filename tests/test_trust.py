"""The pure trust core, one test per attack (python-tuf style).

Each attack asserts the specific error and code, and that trusted local state
(the store's files: active pointer, sequences, bad marks, models) did not change.
"""

from __future__ import annotations

import json
from dataclasses import FrozenInstanceError
from pathlib import Path
from typing import Any

import pytest

from edge_agent.errors import UpdateRejected
from edge_agent.fsio import FileSystem
from edge_agent.protocol.canonical import canonical_bytes
from edge_agent.store import ModelStore
from edge_agent.update.trust import Accepted, Device, Policy, TrustedState, check_manifest
from edge_agent.update_errors import (
    BadSignature,
    KnownBadModel,
    MalformedManifest,
    ManifestExpired,
    ReplayedSequence,
    TooLarge,
    UnknownKey,
    UnsupportedManifestVersion,
    WrongTarget,
)
from tests.test_protocol import ISSUED, OTHER_KEY, make_signed, resign_raw, trusted, wire
from tests.test_store import deploy, download, model_bytes, snapshot

DEVICE = Device("pi-7", frozenset({"line-3", "line-4"}), "rpi4")
NOW = ISSUED + 3600


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    """A device already running model version 5, accepted at sequence 5 on line-3."""
    s = ModelStore.open(tmp_path)
    deploy(s, 5)
    return s


def manifest(n: int = 6, **fields: Any) -> bytes:
    fields.setdefault("sequence", n)
    fields.setdefault("issued_at", ISSUED + n)
    return wire(make_signed(model_bytes(n), version=n, **fields))


def check(store: ModelStore, raw: bytes, **kw: Any) -> Accepted:
    return check_manifest(
        raw,
        group=kw.pop("group", "line-3"),
        model=kw.pop("model", "pump"),
        state=store.trusted_state(trusted()),
        device=kw.pop("device", DEVICE),
        now=kw.pop("now", NOW),
        policy=kw.pop("policy", None),
    )


def refused(
    store: ModelStore, raw: bytes, error: type[UpdateRejected], code: str, **kw: Any
) -> None:
    """Assert the specific refusal, and that nothing the device trusts changed."""
    before = snapshot(store.state_dir)
    active_before = store.active_models()
    with pytest.raises(error) as info:
        check(store, raw, **kw)
    assert type(info.value) is error and info.value.code == code
    assert snapshot(store.state_dir) == before
    reopened = ModelStore.open(store.state_dir)
    assert reopened.active_models() == active_before
    assert reopened.accepted_sequence("line-3", "pump") == 5


# --- acceptance -----------------------------------------------------------------


def test_newer_signed_manifest_is_accepted_and_committed(store: ModelStore) -> None:
    raw = manifest(6)
    accepted = check(store, raw)
    assert accepted.stream == ("line-3", "pump") and accepted.manifest.sequence == 6
    download(store, raw, accepted, FileSystem())
    store.activate(accepted)
    assert ModelStore.open(store.state_dir).accepted_sequence("line-3", "pump") == 6


def test_check_is_pure(store: ModelStore) -> None:
    state = store.trusted_state(trusted())
    before = (dict(state.accepted), dict(state.bad), state.clock_floor)
    check_manifest(manifest(6), group="line-3", model="pump", state=state, device=DEVICE, now=NOW)
    assert (dict(state.accepted), dict(state.bad), state.clock_floor) == before
    with pytest.raises(FrozenInstanceError):
        state.clock_floor = 0  # type: ignore[misc]


def test_after_advances_sequence_and_clock_floor(store: ModelStore) -> None:
    state = store.trusted_state(trusted())
    accepted = check(store, manifest(6))
    new = state.after(accepted)
    assert new.accepted[("line-3", "pump")] == 6 and new.clock_floor == ISSUED + 6
    assert state.accepted[("line-3", "pump")] == 5


def test_first_manifest_for_a_stream_takes_any_sequence(tmp_path: Path) -> None:
    empty = ModelStore.open(tmp_path / "fresh")
    assert check(empty, manifest(6, sequence=0)).manifest.sequence == 0


def test_device_class_listed_is_accepted(store: ModelStore) -> None:
    raw = manifest(6, targets={"groups": ["line-3"], "device_classes": ["rpi4", "ipc"]})
    assert check(store, raw)


# --- one test per attack --------------------------------------------------------


def test_attack_bad_signature(store: ModelStore) -> None:
    doc = json.loads(manifest(6))
    doc["signed"]["variant"] = "int8"  # changed after signing
    refused(store, canonical_bytes(doc), BadSignature, "bad_signature")


def test_attack_unknown_key(store: ModelStore) -> None:
    raw = wire(make_signed(model_bytes(6), version=6, sequence=6), key=OTHER_KEY)
    refused(store, raw, UnknownKey, "unknown_key")


def test_attack_replay_lower_sequence(store: ModelStore) -> None:
    refused(store, manifest(4), ReplayedSequence, "replayed_sequence")


def test_attack_replay_equal_sequence(store: ModelStore) -> None:
    # Same sequence, different content: a second manifest for a used number.
    refused(store, manifest(7, sequence=5), ReplayedSequence, "replayed_sequence")


def test_attack_replay_of_the_exact_accepted_manifest(store: ModelStore) -> None:
    raw = wire(make_signed(model_bytes(5), version=5, sequence=5, issued_at=ISSUED + 5))
    with pytest.raises(ReplayedSequence) as info:
        check(store, raw)
    assert (info.value.sequence, info.value.accepted) == (5, 5)


def test_attack_expired_manifest(store: ModelStore) -> None:
    raw = manifest(6, expires_at=ISSUED + 60)
    refused(store, raw, ManifestExpired, "expired", now=ISSUED + 61)


def test_attack_expired_manifest_on_a_device_whose_clock_reset(store: ModelStore) -> None:
    # A Pi without RTC boots in 1970; the floor (issued_at of what it accepted) still holds.
    raw = manifest(6, issued_at=ISSUED, expires_at=ISSUED + 3)
    refused(store, raw, ManifestExpired, "expired", now=0)


def test_attack_manifest_replayed_under_another_group_topic(store: ModelStore) -> None:
    # Signed for line-3 only, re-published on line-4 (the device is in both).
    refused(store, manifest(6), WrongTarget, "wrong_target", group="line-4")


def test_attack_manifest_replayed_under_another_model_topic(store: ModelStore) -> None:
    refused(store, manifest(6), WrongTarget, "wrong_target", model="press")


def test_attack_group_the_device_is_not_in(store: ModelStore) -> None:
    raw = manifest(6, targets={"groups": ["line-9"], "device_classes": []})
    refused(store, raw, WrongTarget, "wrong_target", group="line-9")


def test_attack_wrong_device_class(store: ModelStore) -> None:
    raw = manifest(6, targets={"groups": ["line-3"], "device_classes": ["jetson"]})
    refused(store, raw, WrongTarget, "wrong_target")


def test_attack_oversize_model(store: ModelStore) -> None:
    policy = Policy(max_model_bytes=len(model_bytes(6)) - 1)
    refused(store, manifest(6), TooLarge, "too_large", policy=policy)


def test_attack_oversize_manifest(store: ModelStore) -> None:
    padded = make_signed(model_bytes(6), version=6, sequence=6, padding="x" * (1024 * 1024))
    refused(store, resign_raw(padded), TooLarge, "too_large")


def test_attack_unknown_major_version(store: ModelStore) -> None:
    raw = resign_raw(make_signed(model_bytes(6), schema_version="2.0", sequence=6))
    refused(store, raw, UnsupportedManifestVersion, "unsupported_version")


def test_attack_malformed_json(store: ModelStore) -> None:
    refused(store, manifest(6)[:-2], MalformedManifest, "malformed_manifest")


def test_attack_model_marked_bad_is_not_reinstalled_by_an_old_manifest(store: ModelStore) -> None:
    raw6 = manifest(6)
    accepted = check(store, raw6)
    download(store, raw6, accepted, FileSystem())
    store.activate(accepted)
    store.rollback("pump")  # v6 failed on the device
    # A manifest for the same bytes issued no later than the bad one is refused...
    again = manifest(6, sequence=7, issued_at=ISSUED + 6)
    before = snapshot(store.state_dir)
    with pytest.raises(KnownBadModel) as info:
        check(store, again)
    assert info.value.code == "known_bad" and snapshot(store.state_dir) == before
    # ... a newer one clears it.
    assert check(store, manifest(6, sequence=8, issued_at=ISSUED + 100))


def test_rules_apply_in_documented_order(store: ModelStore) -> None:
    # Untrusted and wrong target: the signature rule (2) comes before targets (4).
    raw = wire(make_signed(model_bytes(6), version=6, sequence=1), key=OTHER_KEY)
    with pytest.raises(UnknownKey):
        check(store, raw, group="line-4")
    # Expired and replayed: freshness (6) before sequence (7).
    with pytest.raises(ManifestExpired):
        check(store, manifest(4, expires_at=ISSUED + 4), now=ISSUED + 10)


def test_state_snapshot_type(store: ModelStore) -> None:
    state = store.trusted_state(trusted())
    assert isinstance(state, TrustedState) and state.accepted == {("line-3", "pump"): 5}


def test_trusted_keys_checks_ids() -> None:
    from edge_agent.update.trust import trusted_keys
    from registry_sync.signing import public_key_bytes
    from tests.test_protocol import KEY

    raw = public_key_bytes(KEY)
    (kid,) = trusted(KEY)
    assert set(trusted_keys({kid: raw})) == {kid}
    with pytest.raises(ValueError, match="key id"):
        trusted_keys({"0" * 16: raw})
    with pytest.raises(ValueError, match="small order"):
        trusted_keys({kid: bytes.fromhex("01" + "00" * 31)})
