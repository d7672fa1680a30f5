"""Pure staged-rollout logic: which groups carry the new version, and the gate between them.

A rollout is per model and target version. Groups get the manifest in the configured
order; group ``k+1`` gets it only when the gate on group ``k`` holds:

- at least ``min_devices`` devices of group ``k`` are *healthy* on the new version: online,
  their retained ``state`` (docs/protocol.md section 8.1) shows the version serving and
  not ``degraded``, continuously for ``healthy_for_s`` seconds, and the agent's own health
  window is over: a device whose last word about the version since the stage began is
  ``activated`` (no ``healthy`` event yet, section 8.2) is still being watched and does not
  count. Set ``healthy_for_s`` at least to the agents' ``[health] window_s``: the events
  ring of the fleet view is bounded, the state is what always remains;
- no member device condemned the version since the stage began (``FAILING_EVENTS``): it
  rolled it back, failed its health window with nothing to fall back to, stalled its
  updater, or *refused* it (``REFUSALS``: a valid-but-bad model, ``load_failed``,
  ``golden_mismatch``, ``schema_mismatch``; or a manifest the device will never run:
  bad signature, unknown key, wrong target, known bad...). A device refusing the version
  has failed the gate as surely as one rolling it back; without this a version every
  canary refuses would hold the gate until the stage timeout (or forever). Transient
  download failures (``chunk_hash``, ``file_hash``, ``download_timeout``, retried on the
  next delivery) and device-local faults (``store_error``, ``internal_error``) do not
  condemn the version: the stage timeout bounds them;
- the error rate of the group on the new version, from the agents' telemetry (section
  8.3: ``rows_total`` answered rows and ``errors_total`` per kind, folded by
  ``registry_sync.fleet``), ``errors / (rows + errors)`` -- the share of attempted rows
  that failed, as the agent computes its own ``error_rate``, so a version failing every
  row has a rate of 100%, not an undefined one -- is at most ``max_error_rate``.

The gate *fails* (the rollout halts, and with ``revert_on_failure`` the group gets its
previous manifest back) on such an event, on an error rate above the threshold, or when
``stage_timeout_s`` passes without the gate holding. ``stage_timeout_s = 0`` means no
timeout: an explicit choice to wait for the gate forever (a canary group with no device
online then holds the rollout indefinitely). Without the key the loader uses
max(7200, 2 x ``healthy_for_s``); a value not above ``healthy_for_s`` is refused (the gate
could never hold in time). A device belongs to group ``k`` when its update events named
that group for the model; a device whose events named no group for it (the service saw
none of them) belongs to it when its state carries the sequence we published on that
group's topic.

Moving the selector back to an older version (a registry rollback) and undeploys are not
staged: every group gets them at once, since they are the way out of trouble.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from registry_sync.config import RolloutSettings
from registry_sync.fleet import DeviceRecord

__all__ = [
    "FAILING_EVENTS",
    "REFUSALS",
    "GateResult",
    "Rollout",
    "advance",
    "evaluate_gate",
    "start_rollout",
]

IN_PROGRESS, COMPLETE, HALTED = "in_progress", "complete", "halted"


@dataclass
class Rollout:
    model: str
    version: int
    groups: list[str]
    status: str = IN_PROGRESS
    stage: int = 0  # groups[: stage + 1] carry the version
    started_at: float = 0.0
    stage_started_at: float = 0.0
    reason: str = ""
    reverted: bool = False
    # group -> the manifest content that group carried before this rollout (for reverts)
    previous: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Rollout:
        return cls(**dict(doc))

    def live_groups(self) -> list[str]:
        """Groups that should carry ``version`` now."""
        if self.status == COMPLETE:
            return list(self.groups)
        upto = self.stage + 1
        if self.status == HALTED and self.reverted:
            upto = self.stage
        return self.groups[:upto]

    @property
    def current_group(self) -> str:
        return self.groups[min(self.stage, len(self.groups) - 1)]


@dataclass(frozen=True)
class GateResult:
    verdict: str  # "pass" | "hold" | "fail"
    reason: str
    healthy: tuple[str, ...] = ()
    members: tuple[str, ...] = ()
    error_rate: float | None = None


def start_rollout(
    settings: RolloutSettings,
    model: str,
    version: int,
    now: float,
    *,
    at_once: bool,
    previous: Mapping[str, Any],
) -> Rollout:
    groups = list(settings.groups)
    r = Rollout(
        model, version, groups, started_at=now, stage_started_at=now, previous=dict(previous)
    )
    if at_once or not settings.staged or len(groups) == 1:
        r.status, r.stage = COMPLETE, len(groups) - 1
        r.history.append({"ts": now, "event": "deployed to every group at once"})
    else:
        r.history.append({"ts": now, "event": f"stage 0: {groups[0]}"})
    return r


# Update events after which the device will not run the version being rolled out
# (docs/protocol.md section 8.2; codes from edge_agent.updater and edge_agent.update_errors).
FAILING_EVENTS = {
    "rolled_back": "rolled back",
    "update_stalled": "stalled updating",
    "rollback_unavailable": "failed its health window (no previous version) on",
}
# Refusals: the manifest or the model it names is rejected for good on that device (marked
# bad, or a manifest the device's trust checks will never accept). Not here: the transient
# download failures (chunk_hash, file_hash, download_timeout: retried on the next delivery),
# replayed_sequence and duplicate/unexpected chunks (about a stale copy, not this version),
# store_error and internal_error (the device's own fault; the stage timeout bounds them).
REFUSALS = frozenset(
    {
        "load_failed",  # the runtime refuses the verified file
        "golden_mismatch",  # smoke test: golden inputs give other outputs
        "schema_mismatch",  # smoke test: inputs cannot be fed from the device's field mapping
        "known_bad",  # the device marked this model file bad before
        "unsafe_model",
        "malformed_manifest",
        "unsupported_version",
        "too_large",
        "unknown_key",
        "bad_signature",
        "expired",
        "wrong_target",  # not this device's class or variant/runtime
    }
)
# The agent's last word on a version: activated, then healthy once its window passed.
_WINDOW_OPEN, _WINDOW_PASSED = "activated", "healthy"


def _is_member(rec: DeviceRecord, model: str, group: str, sequence: int | None) -> bool:
    named = rec.groups.get(model)
    if named:
        # The device's update events name the groups it took this model from. Its state's
        # sequence would be ambiguous: every (group, model) stream counts from 0, so a
        # canary on sequence 0 would look like a member of every group at sequence 0.
        return group in named
    info = rec.models.get(model) or {}
    return sequence is not None and info.get("sequence") == sequence


def _about(ev: Mapping[str, Any], rollout: Rollout, group: str) -> bool:
    """The event is about this stage: this model, received since the stage began, and
    (when it says) this version and this group."""
    if ev.get("model") != rollout.model:
        return False
    if _float(ev.get("received")) < rollout.stage_started_at:
        return False
    version = ev.get("version")
    if version is not None and version != rollout.version:
        return False  # e.g. a late event about the version it replaced
    where = ev.get("group")
    return where is None or where == group


def _condemned(rec: DeviceRecord, rollout: Rollout, group: str) -> str | None:
    """Why the device failed the gate, or None."""
    for ev in rec.update_events:
        code = str(ev.get("code"))
        if code not in FAILING_EVENTS and code not in REFUSALS:
            continue
        if not _about(ev, rollout, group):
            continue
        detail = str(ev.get("message", ""))
        if code in FAILING_EVENTS:
            return f"device {rec.device} {FAILING_EVENTS[code]} {rollout.model} ({detail})"
        return (
            f"device {rec.device} refused {rollout.model} v{rollout.version} "
            f"({code}: {detail})"
        )
    return None


def _window_open(rec: DeviceRecord, rollout: Rollout, group: str) -> bool:
    """The agent activated the version this stage and has not reported its health window
    passed yet."""
    last = None
    for ev in rec.update_events:
        code = ev.get("code")
        if code in (_WINDOW_OPEN, _WINDOW_PASSED) and _about(ev, rollout, group):
            last = code
    return last == _WINDOW_OPEN


def _serving(rec: DeviceRecord, model: str, version: int) -> bool:
    info = rec.models.get(model) or {}
    return (
        info.get("version") == version
        and info.get("serving", True) is not False  # older agents do not report it
        and not info.get("degraded")
        and info.get("desired", True) is not False
    )


def evaluate_gate(
    settings: RolloutSettings,
    rollout: Rollout,
    devices: Mapping[str, DeviceRecord],
    now: float,
    *,
    group_sequence: int | None,
) -> GateResult:
    model, version, group = rollout.model, rollout.version, rollout.current_group
    members = sorted(
        d for d, rec in devices.items() if _is_member(rec, model, group, group_sequence)
    )
    for name in members:
        why = _condemned(devices[name], rollout, group)
        if why is not None:
            return GateResult("fail", why, members=tuple(members))
    rows = errors = 0
    healthy = []
    for name in members:
        rec = devices[name]
        tel = rec.telemetry.get(model)
        if tel is not None and tel.version == version:
            rows += tel.rows
            errors += tel.errors
        since = rec.active_since.get(model)
        if not rec.online or since is None or since[0] != version:
            continue
        if not _serving(rec, model, version) or _window_open(rec, rollout, group):
            continue
        if now - float(since[1]) >= settings.healthy_for_s:
            healthy.append(name)
    attempted = rows + errors
    rate = errors / attempted if attempted else None
    if rate is not None and rate > settings.max_error_rate:
        return GateResult(
            "fail",
            f"error rate {rate:.2%} ({errors} of {attempted} rows) on {group} is above "
            f"{settings.max_error_rate:.2%}",
            tuple(healthy),
            tuple(members),
            rate,
        )
    if len(healthy) >= settings.min_devices:
        return GateResult(
            "pass",
            f"{len(healthy)} healthy device(s) on {group}",
            tuple(healthy),
            tuple(members),
            rate,
        )
    if settings.stage_timeout_s and now - rollout.stage_started_at > settings.stage_timeout_s:
        return GateResult(
            "fail",
            f"gate on {group} did not hold within "
            f"{settings.stage_timeout_s:g}s ({len(healthy)} of "
            f"{settings.min_devices} healthy, {len(members)} device(s) in the group)",
            tuple(healthy),
            tuple(members),
            rate,
        )
    return GateResult(
        "hold",
        f"waiting: {len(healthy)} of {settings.min_devices} device(s) "
        f"healthy on {group} for {settings.healthy_for_s:g}s",
        tuple(healthy),
        tuple(members),
        rate,
    )


def advance(settings: RolloutSettings, rollout: Rollout, gate: GateResult, now: float) -> bool:
    """Apply a gate verdict to ``rollout`` in place; True when its status or stage changed."""
    if rollout.status != IN_PROGRESS:
        return False
    if gate.verdict == "hold":
        rollout.reason = gate.reason
        return False
    if gate.verdict == "fail":
        rollout.status = HALTED
        rollout.reason = gate.reason
        rollout.reverted = settings.revert_on_failure
        rollout.history.append(
            {
                "ts": now,
                "event": f"halted on {rollout.current_group}: "
                f"{gate.reason}" + ("; group reverted" if rollout.reverted else ""),
            }
        )
        return True
    rollout.history.append(
        {"ts": now, "event": f"gate passed on {rollout.current_group}: {gate.reason}"}
    )
    if rollout.stage + 1 >= len(rollout.groups):
        rollout.status = COMPLETE
        rollout.reason = "every group carries the version"
    else:
        rollout.stage += 1
        rollout.stage_started_at = now
        rollout.reason = f"stage {rollout.stage}: {rollout.current_group}"
        rollout.history.append({"ts": now, "event": rollout.reason})
    return True


def _float(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return 0.0
