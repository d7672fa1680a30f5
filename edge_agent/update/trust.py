"""The pure trust core: accept or refuse a manifest before any chunk is fetched.

Like python-tuf's TrustedMetadataSet, this module does no I/O: the caller passes
the raw manifest bytes, the topic it came from, a snapshot of trusted local
state (``TrustedState``, loaded from the store), the device identity and the
clock. ``check_manifest`` returns an ``Accepted`` or raises the specific
``UpdateRejected``; it never changes its inputs. The caller persists the new
state (``TrustedState.after``) only once the update is committed.

Rules, in the order they are applied (the first failing one is reported):

1. The raw manifest is at most ``limits.max_manifest_bytes`` (TooLarge) and is
   strict JSON with the ``{"signed", "signatures"}`` shape (MalformedManifest).
2. At least one signature names a trusted key id (UnknownKey) and one of those
   verifies over the canonical ``signed`` bytes (BadSignature).
3. The schema major version is 1 (UnsupportedManifestVersion); fields, types,
   caps and paths are valid (MalformedManifest, TooLarge, UnsafeModel).
4. The signed ``model`` equals the topic's model and the topic's group is in
   ``targets.groups`` (WrongTarget): a signed manifest cannot be replayed under
   another retained topic.
5. The topic's group is one of the device's groups and ``targets.device_classes``
   is empty or names the device's class (WrongTarget).
6. ``expires_at`` is absent or later than the effective clock
   ``max(now, clock_floor)`` (ManifestExpired); ``clock_floor`` is the highest
   ``issued_at`` ever accepted, so a device booting without a real-time clock
   cannot go back before what it has already seen.
7. ``sequence`` is strictly greater than the last accepted sequence for
   (group, model) (ReplayedSequence); with none accepted, any sequence is.
8. The sum of file sizes is at most ``max_model_bytes`` (TooLarge).
9. The model file's sha256 is not marked bad, or the manifest was issued after
   the mark (KnownBadModel): a newer manifest clears a bad mark.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from edge_agent.protocol.ed25519 import PublicKey
from edge_agent.protocol.manifest import Limits, Manifest, load_manifest
from edge_agent.update_errors import (
    KnownBadModel,
    ManifestExpired,
    ReplayedSequence,
    TooLarge,
    WrongTarget,
)

__all__ = ["Accepted", "Device", "Policy", "TrustedState", "check_manifest", "trusted_keys"]

StreamKey = tuple[str, str]  # (group, model): the unit of sequence numbering


@dataclass(frozen=True)
class Device:
    """Who this device is, from its config."""

    device_id: str
    groups: frozenset[str]
    device_class: str


@dataclass(frozen=True)
class Policy:
    """Caps applied before download; sizes in bytes."""

    max_model_bytes: int = 64 * 1024 * 1024  # sum of a manifest's file sizes
    limits: Limits = field(default_factory=Limits)


@dataclass(frozen=True)
class TrustedState:
    """A snapshot of what the device trusts; persisted by the store."""

    keys: Mapping[str, PublicKey]
    accepted: Mapping[StreamKey, int] = field(default_factory=dict)
    bad: Mapping[str, int] = field(default_factory=dict)  # model sha256 -> issued_at at mark
    clock_floor: int = 0  # highest issued_at accepted, unix seconds

    def after(self, accepted: Accepted) -> TrustedState:
        """The state once ``accepted`` is committed (sequence and clock floor advance)."""
        seq = dict(self.accepted)
        seq[accepted.stream] = accepted.manifest.sequence
        floor = max(self.clock_floor, accepted.manifest.issued_at)
        return replace(self, accepted=seq, clock_floor=floor)


@dataclass(frozen=True)
class Accepted:
    """A manifest that passed every rule, with the stream it was accepted for."""

    manifest: Manifest
    group: str

    @property
    def stream(self) -> StreamKey:
        return (self.group, self.manifest.model)


def trusted_keys(raw_keys: Mapping[str, bytes]) -> dict[str, PublicKey]:
    """Validate configured keys ({key id: raw 32-byte key}); the id must match the key."""
    keys: dict[str, PublicKey] = {}
    for kid, raw in raw_keys.items():
        key = PublicKey(raw)  # ValueError for an invalid or small-order key
        if key.key_id != kid:
            raise ValueError(f"trusted key {kid!r} has key id {key.key_id!r}")
        keys[kid] = key
    return keys


def check_manifest(
    raw: bytes,
    *,
    group: str,
    model: str,
    state: TrustedState,
    device: Device,
    now: float,
    policy: Policy | None = None,
) -> Accepted:
    """Apply the module's rules 1-9 to a manifest received on ``manifests/{group}/{model}``."""
    policy = policy or Policy()
    manifest = load_manifest(raw, state.keys, policy.limits)  # rules 1-3
    _check_target(manifest, group=group, model=model, device=device)
    _check_fresh(manifest, now=now, floor=state.clock_floor)
    _check_sequence(manifest, state.accepted.get((group, manifest.model)))
    _check_size(manifest, policy.max_model_bytes)
    _check_not_bad(manifest, state.bad)
    return Accepted(manifest, group)


def _check_target(manifest: Manifest, *, group: str, model: str, device: Device) -> None:
    if manifest.model != model:
        raise WrongTarget(f"manifest for model {manifest.model!r} arrived on topic {model!r}")
    if group not in manifest.target_groups:
        raise WrongTarget(f"manifest does not target group {group!r}")
    if group not in device.groups:
        raise WrongTarget(f"device is not in group {group!r}")
    classes = manifest.target_device_classes
    if classes and device.device_class not in classes:
        raise WrongTarget(f"manifest does not target device class {device.device_class!r}")


def _check_fresh(manifest: Manifest, *, now: float, floor: int) -> None:
    effective = max(now, floor)
    if manifest.expires_at is not None and manifest.expires_at <= effective:
        raise ManifestExpired(f"manifest expired at {manifest.expires_at}, clock is {effective}")


def _check_sequence(manifest: Manifest, accepted: int | None) -> None:
    if accepted is not None and manifest.sequence <= accepted:
        raise ReplayedSequence(
            f"sequence {manifest.sequence} is not above accepted {accepted}",
            sequence=manifest.sequence,
            accepted=accepted,
        )


def _check_size(manifest: Manifest, cap: int) -> None:
    if manifest.total_size > cap:
        raise TooLarge(f"model is {manifest.total_size} bytes, cap {cap}")


def _check_not_bad(manifest: Manifest, bad: Mapping[str, int]) -> None:
    marked = bad.get(manifest.model_sha256)
    if marked is not None and manifest.issued_at <= marked:
        raise KnownBadModel(f"model {manifest.model_sha256[:12]} is marked bad on this device")
