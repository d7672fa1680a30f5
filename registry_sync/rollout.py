"""Pure staged-rollout logic: which groups carry the new version, and the gate between them.

A rollout is per model and target version. Groups get the manifest in the configured
order; group ``k+1`` gets it only when the gate on group ``k`` holds:

- at least ``min_devices`` devices of group ``k`` report the new version active and
  online, each continuously for ``healthy_for_s`` seconds;
- no failing update event (``rolled_back``, ``update_stalled``, ``rollback_unavailable``:
  the version was rolled back, hung a device's updater, or failed its health window
  with nothing to fall back to) for the model from a device of the group since the
  stage began;
- their error rate (telemetry ``errors / rows`` on the new version) is at most
  ``max_error_rate``.

The gate *fails* (the rollout halts) on such an event, on an error rate above the
threshold, or when ``stage_timeout_s`` passes without the gate holding. A device belongs
to group ``k`` when it reported an update event naming that group for the model, or its
state carries the sequence we published on that group's topic.

Moving the selector back to an older version (a registry rollback) and undeploys are not
staged: every group gets them at once, since they are the way out of trouble.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from registry_sync.config import RolloutSettings
from registry_sync.fleet import DeviceRecord

__all__ = ["GateResult", "Rollout", "advance", "evaluate_gate", "start_rollout"]

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


# Update events that condemn the version being rolled out (docs/protocol.md section 8.2).
FAILING_EVENTS = {
    "rolled_back": "rolled back",
    "update_stalled": "stalled updating",
    "rollback_unavailable": "failed its health window (no previous version) on",
}


def _is_member(rec: DeviceRecord, model: str, group: str, sequence: int | None) -> bool:
    if group in rec.groups.get(model, []):
        return True
    info = rec.models.get(model) or {}
    return sequence is not None and info.get("sequence") == sequence


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
        for ev in devices[name].events:
            code = str(ev.get("code"))
            if (
                code in FAILING_EVENTS
                and ev.get("model") == model
                and float(ev.get("received", 0)) >= rollout.stage_started_at
            ):
                return GateResult(
                    "fail",
                    f"device {name} {FAILING_EVENTS[code]} {model} ({ev.get('message', '')})",
                    members=tuple(members),
                )
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
        if now - float(since[1]) >= settings.healthy_for_s:
            healthy.append(name)
    rate = errors / rows if rows else None
    if rate is not None and rate > settings.max_error_rate:
        return GateResult(
            "fail",
            f"error rate {rate:.2%} on {group} is above {settings.max_error_rate:.2%}",
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
            f"{settings.min_devices} healthy)",
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
