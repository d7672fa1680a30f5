"""Resolve a model URI into a local MLflow model directory and what the registry knows.

Accepted: ``models:/NAME@ALIAS``, ``models:/NAME/STAGE`` (legacy stages),
``models:/NAME/VERSION``, ``models:/NAME/latest``, ``models:/m-<id>`` (MLflow 3 logged
models), ``runs:/RUN_ID/PATH``, and a local directory holding an ``MLmodel`` file.
MLflow errors are translated into ``converter.errors`` here and nowhere else.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from converter.errors import (
    ModelLoadError,
    ModelNotFoundError,
    SourceError,
    TrackingServerError,
)

LEGACY_STAGES = {
    "production": "Production",
    "staging": "Staging",
    "archived": "Archived",
    "none": "None",
}
_ALIAS = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/]+)$")
_NAMED = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<ref>[^/]+)$")
_LOGGED = re.compile(r"^models:/(?P<id>m-[0-9a-f]+)$")
_RUN = re.compile(r"^runs:/(?P<run>[^/]+)/(?P<path>.+)$")


@dataclass(frozen=True)
class ResolvedModel:
    """A model made local, with its provenance."""

    uri: str
    local_path: Path
    registered_name: str | None = None
    version: str | None = None
    selector: str | None = None  # "@alias", "stage:Production", or None
    run_id: str | None = None
    model_id: str | None = None
    note: str | None = None  # e.g. "two versions in Production; chose the highest"


def tracking_uri_from(flag: str | None) -> str:
    """The flag, else MLFLOW_TRACKING_URI, else MLflow's own default (a local sqlite file)."""
    import mlflow

    if flag:
        return flag
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return str(mlflow.get_tracking_uri())


def resolve(uri: str, *, tracking_uri: str | None, dst: Path) -> ResolvedModel:
    """Find ``uri`` in the registry (or on disk) and download it under ``dst``."""
    local = Path(uri).expanduser()
    if "://" not in uri and not uri.startswith(("models:", "runs:")):
        if (local / "MLmodel").is_file():
            return ResolvedModel(uri=uri, local_path=local.resolve())
        raise ModelNotFoundError(
            f"{uri}: not a model URI and not a directory with an MLmodel file "
            "(expected models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN/PATH or a path)"
        )
    client = _client(tracking_uri)
    with translate_mlflow_errors(uri):
        meta = _lookup(client, uri)
        path = _download(uri, tracking_uri, dst)
    return ResolvedModel(local_path=path, **meta)


def _client(tracking_uri: str | None) -> Any:
    from mlflow import MlflowClient

    uri = tracking_uri_from(tracking_uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _lookup(client: Any, uri: str) -> dict[str, Any]:
    if m := _ALIAS.match(uri):
        mv = client.get_model_version_by_alias(m["name"], m["alias"])
        return _from_version(uri, mv, selector=f"@{m['alias']}")
    if m := _LOGGED.match(uri):
        logged = client.get_logged_model(m["id"])
        return {"uri": uri, "run_id": logged.source_run_id, "model_id": logged.model_id}
    if m := _NAMED.match(uri):
        name, ref = m["name"], m["ref"]
        if ref.isdigit():
            return _from_version(uri, client.get_model_version(name, ref), selector=None)
        if ref.lower() == "latest":
            versions = client.search_model_versions(f"name='{_quote(name)}'")
            if not versions:
                raise ModelNotFoundError(f"{uri}: registered model {name!r} has no versions")
            latest = max(versions, key=lambda v: int(v.version))
            return _from_version(uri, latest, selector=None)
        stage = LEGACY_STAGES.get(ref.lower())
        if stage is None:
            raise ModelNotFoundError(
                f"{uri}: {ref!r} is neither a version number, 'latest', nor a stage "
                f"({', '.join(LEGACY_STAGES.values())}); for an alias write models:/{name}@{ref}"
            )
        return _from_stage(client, uri, name, stage)
    if m := _RUN.match(uri):
        client.get_run(m["run"])  # raises RESOURCE_DOES_NOT_EXIST for an unknown run
        return {"uri": uri, "run_id": m["run"]}
    raise ModelNotFoundError(
        f"{uri}: unsupported URI form (expected models:/NAME@ALIAS, models:/NAME/STAGE, "
        "models:/NAME/VERSION, models:/m-ID, runs:/RUN_ID/PATH or a local directory)"
    )


def _from_stage(client: Any, uri: str, name: str, stage: str) -> dict[str, Any]:
    versions = [
        v
        for v in client.search_model_versions(f"name='{_quote(name)}'")
        if v.current_stage == stage
    ]
    if not versions:
        client.get_registered_model(name)  # raises if the model itself is unknown
        raise ModelNotFoundError(f"{uri}: no version of {name!r} is in stage {stage}")
    chosen = max(versions, key=lambda v: int(v.version))
    meta = _from_version(uri, chosen, selector=f"stage:{stage}")
    if len(versions) > 1:
        others = ", ".join(str(v.version) for v in versions)
        meta["note"] = f"versions {others} are all in {stage}; chose the highest, {chosen.version}"
    return meta


def _from_version(uri: str, mv: Any, *, selector: str | None) -> dict[str, Any]:
    return {
        "uri": uri,
        "registered_name": mv.name,
        "version": str(mv.version),
        "selector": selector,
        "run_id": mv.run_id,
        "model_id": getattr(mv, "model_id", None),
    }


def _download(uri: str, tracking_uri: str | None, dst: Path) -> Path:
    import mlflow
    import mlflow.artifacts

    dst.mkdir(parents=True, exist_ok=True)
    # MLflow's tqdm bars would interleave with our own progress display and --json output.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    resolved = tracking_uri_from(tracking_uri)
    # download_artifacts resolves models:/ URIs through MLflow's process-wide *registry*
    # URI, not the tracking URI it is given: point it at the same server for the call.
    previous = mlflow.get_registry_uri()
    mlflow.set_registry_uri(resolved)
    try:
        path = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=str(dst), tracking_uri=resolved
            )
        )
    finally:
        mlflow.set_registry_uri(previous)
    if not (path / "MLmodel").is_file():
        raise ModelLoadError(f"{uri}: the artifact has no MLmodel file; is the path a model?")
    return path


def _quote(name: str) -> str:
    return name.replace("'", "\\'")


class translate_mlflow_errors:  # noqa: N801 - used as a context manager, reads as a phrase
    """Turn MLflow and transport exceptions into ``SourceError`` subclasses."""

    def __init__(self, uri: str) -> None:
        self.uri = uri

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None or isinstance(exc, SourceError):
            return
        error = _translate(self.uri, exc)
        if error is not None:
            raise error from exc


def _translate(uri: str, exc: BaseException) -> SourceError | None:  # noqa: PLR0911
    from mlflow.exceptions import MlflowException

    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, MlflowException):
        code = getattr(exc, "error_code", "")
        if code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND") or "not found" in text.lower():
            return ModelNotFoundError(f"{uri}: {text}")
        if "API request" in text or "Max retries" in text or "Connection" in text:
            return TrackingServerError(f"{uri}: tracking server unreachable: {text}")
        if code == "INVALID_PARAMETER_VALUE":
            return ModelNotFoundError(f"{uri}: {text}")
        return ModelLoadError(f"{uri}: {text}")
    if isinstance(exc, (ConnectionError, TimeoutError, OSError)):
        return TrackingServerError(f"{uri}: tracking server unreachable: {text}")
    name = type(exc).__module__
    if name.startswith(("requests", "urllib3")):
        return TrackingServerError(f"{uri}: tracking server unreachable: {text}")
    return None
