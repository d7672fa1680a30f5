"""Pure: a registry snapshot and the configured selectors -> the desired deployment per model.

Rules (docs/protocol.md section 10):

- alias selector: the version the alias points at; no alias, or an alias on an
  ``Archived`` version, means "undeploy";
- legacy stage selector: the highest version in that stage (MLflow lets several versions
  sit in Production at once when ``archive_existing_versions=False``; the highest wins and
  the note says so); none means "undeploy";
- a registered model that does not exist means "undeploy".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from registry_sync.config import ModelSpec

__all__ = ["Desired", "ModelSnapshot", "VersionInfo", "desired_state"]


@dataclass(frozen=True)
class VersionInfo:
    version: int
    stage: str = "None"
    run_id: str | None = None


@dataclass(frozen=True)
class ModelSnapshot:
    """What the registry says about one registered model at one moment."""

    name: str
    exists: bool
    aliases: Mapping[str, int] = field(default_factory=dict)
    versions: Mapping[int, VersionInfo] = field(default_factory=dict)


@dataclass(frozen=True)
class Desired:
    """``version`` None means: not desired any more (undeploy what is out there)."""

    model: str
    selector: Mapping[str, str]
    version: int | None
    note: str = ""

    @property
    def undeploy(self) -> bool:
        return self.version is None


def desired_state(
    specs: Iterable[ModelSpec], snapshots: Mapping[str, ModelSnapshot]
) -> dict[str, Desired]:
    return {spec.name: _one(spec, snapshots.get(spec.name)) for spec in specs}


def _one(spec: ModelSpec, snap: ModelSnapshot | None) -> Desired:
    if snap is None or not snap.exists:
        return Desired(spec.name, spec.selector, None, "registered model does not exist")
    if spec.selector_kind == "alias":
        version = snap.aliases.get(spec.selector_value)
        if version is None:
            return Desired(
                spec.name, spec.selector, None, f"alias @{spec.selector_value} is not set"
            )
        info = snap.versions.get(version)
        if info is not None and info.stage == "Archived":
            return Desired(spec.name, spec.selector, None, f"version {version} is archived")
        return Desired(spec.name, spec.selector, version)
    in_stage = sorted(v for v, info in snap.versions.items() if info.stage == spec.selector_value)
    if not in_stage:
        return Desired(spec.name, spec.selector, None, f"no version in stage {spec.selector_value}")
    note = ""
    if len(in_stage) > 1:
        note = (
            f"versions {in_stage} are all in {spec.selector_value}; "
            f"deploying the highest, {in_stage[-1]}"
        )
    return Desired(spec.name, spec.selector, in_stage[-1], note)
