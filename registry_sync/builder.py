"""Build the variant a group of device classes needs, with the converter, cached on disk.

Cache key: (model, version, variant, converter settings). Settings are the parity
overrides, the calibration file's content hash and lineside's version, so changing the
thresholds rebuilds, and an unchanged registry never converts twice. A cache entry is
complete only once its ``result.json`` exists (written last, atomically), so a crash
mid-conversion just rebuilds.

Only deterministic outcomes are cached: written, skipped, and failures that the same
model and settings would repeat (parity gate, unsupported estimator or flavor, inputs that
cannot be described, calibration data that does not fit, a converter failing on a supported
model). Transient ones (the model cannot be found, downloaded or loaded, the tracking
server or the disk failed, or anything unexpected) are not cached: they raise
``BuildRetryError`` and the conversion is tried again on a later pass, after an
exponential backoff per (model, version, variant) so a broken artifact store is not
hammered every poll interval.

Variant choice for a group: the device classes that will receive the group's manifest
must all run it (one retained manifest per (group, model) on the wire), so the candidates
are the first class's preferences that every other class also lists, in that order. The
first *written* candidate wins; a *skipped* one (not applicable to this model) falls
through to the next; a *failed* one (parity gate) blocks the deployment: falling back
silently to another variant would ship something the class did not ask for first.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from registry_sync.config import BuildSettings, DeviceClass
from registry_sync.errors import (
    BuildBlockedError,
    BuildRetryError,
    ParityBlockedError,
    SyncError,
)
from registry_sync.state import read_json, write_json_atomic

__all__ = ["Builder", "Bundle", "candidate_variants"]

log = logging.getLogger(__name__)

ConvertFn = Callable[..., Any]


@dataclass
class _Failure:
    attempts: int
    retry_at: float
    reason: str


def _deterministic(exc: Exception) -> bool:
    """Would converting the same artifact with the same settings fail the same way?"""
    from converter import errors

    return isinstance(
        exc,
        (
            errors.CalibrationDataError,
            errors.ConversionFailed,
            errors.InputSpecError,
            errors.ParityError,
            errors.UnsupportedModelError,
            errors.VariantNotApplicable,
        ),
    )


@dataclass(frozen=True)
class Bundle:
    """One converted, parity-checked variant ready to be described in a manifest."""

    model: str
    version: int
    variant: str
    path: Path
    metadata: dict[str, Any]  # the bundle's metadata.lineside

    @property
    def runtime(self) -> str:
        return str(self.metadata["runtime"])

    @property
    def model_file(self) -> str:
        return str(self.metadata["model_file"])

    def read_model(self) -> bytes:
        return (self.path / self.model_file).read_bytes()


def candidate_variants(classes: Sequence[DeviceClass]) -> list[str]:
    if not classes:
        return []
    first, rest = classes[0], classes[1:]
    return [v for v in first.variants if all(v in c.variants for c in rest)]


@contextlib.contextmanager
def _registry_uri(uri: str) -> Iterator[None]:
    """Point MLflow's process-wide registry URI at ``uri`` for the conversion.

    Workaround: the converter downloads ``models:/name/version`` with
    ``mlflow.artifacts.download_artifacts(tracking_uri=...)``, which resolves the model
    through the *global* registry URI, not the tracking URI it is given; against a
    remote server it looks in the wrong registry.
    """
    import mlflow

    previous = mlflow.get_registry_uri()
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_registry_uri(previous)


class Builder:
    def __init__(
        self,
        cache_dir: Path,
        tracking_uri: str,
        settings: BuildSettings,
        convert: ConvertFn | None = None,
        *,
        clock: Callable[[], float] = time.time,
        retry_initial_s: float = 5.0,
        retry_max_s: float = 300.0,
    ) -> None:
        self.cache_dir = cache_dir
        self.tracking_uri = tracking_uri
        self.settings = settings
        self._convert = convert
        self.settings_key = self._settings_key()
        self.clock = clock
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = max(retry_max_s, retry_initial_s)
        # (model, version, variant) -> the last transient failure; in memory only: a
        # restarted service simply tries again at once.
        self._failures: dict[tuple[str, int, str], _Failure] = {}

    def _settings_key(self) -> str:
        from lineside import __version__

        calib = self.settings.calibration_data
        doc = {
            "parity": dict(sorted(self.settings.parity.items())),
            "calibration": hashlib.sha256(calib.read_bytes()).hexdigest() if calib else None,
            "lineside": __version__,
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:12]

    def bundle_for(self, model: str, version: int, classes: Sequence[DeviceClass]) -> Bundle:
        """The bundle to ship to these classes, or ``BuildBlockedError``/``ParityBlockedError``."""
        candidates = candidate_variants(classes)
        names = ", ".join(c.name for c in classes)
        if not candidates:
            raise BuildBlockedError(f"{model} v{version}: device classes {names} share no variant")
        reasons = []
        for variant in candidates:
            result = self.result(model, version, variant)
            status = result["status"]
            if status == "written":
                entry = self._entry(model, version, variant)
                meta = result["metadata"]
                return Bundle(model, version, variant, entry / variant, meta)
            if status == "failed":
                error = ParityBlockedError if result.get("parity") else BuildBlockedError
                raise error(f"{model} v{version} {variant} (for {names}): {result['reason']}")
            reasons.append(f"{variant}: {result['reason']}")
        raise BuildBlockedError(
            f"{model} v{version}: no applicable variant for {names} ({'; '.join(reasons)})"
        )

    def _entry(self, model: str, version: int, variant: str) -> Path:
        return self.cache_dir / model / f"v{version}" / f"{variant}.{self.settings_key}"

    def result(self, model: str, version: int, variant: str) -> dict[str, Any]:
        """The cached outcome of converting (model, version, variant), converting if needed.

        Raises ``BuildRetryError`` for a transient failure (this pass's, or an earlier one
        whose backoff has not run out yet)."""
        entry = self._entry(model, version, variant)
        cached = read_json(entry / "result.json", None)
        if cached is not None and (cached["status"] != "written" or (entry / variant).is_dir()):
            return dict(cached)
        key = (model, version, variant)
        now = self.clock()
        failure = self._failures.get(key)
        if failure is not None and now < failure.retry_at:
            raise BuildRetryError(
                f"{model} v{version} {variant}: {failure.reason}; next attempt in "
                f"{failure.retry_at - now:.1f}s",
                retry_at=failure.retry_at,
                attempted=False,
            )
        try:
            shutil.rmtree(entry, ignore_errors=True)
            entry.mkdir(parents=True, exist_ok=True)
            outcome = self._run_converter(model, version, variant, entry)
            write_json_atomic(entry / "result.json", outcome)
        except Exception as exc:  # every non-deterministic failure is retried
            attempts = failure.attempts + 1 if failure is not None else 1
            delay = min(self.retry_max_s, self.retry_initial_s * 2.0 ** min(attempts - 1, 30))
            reason = f"{type(exc).__name__}: {_first_line(exc)}"
            self._failures[key] = _Failure(attempts, now + delay, reason)
            log.warning(
                "converting %s v%s to %s failed (attempt %d, retrying in %.1fs): %s",
                model, version, variant, attempts, delay, reason,
                exc_info=not isinstance(exc, SyncError | OSError),
            )
            raise BuildRetryError(
                f"{model} v{version} {variant}: {reason}; attempt {attempts} failed, "
                f"next in {delay:.1f}s",
                retry_at=now + delay,
                attempted=True,
            ) from exc
        self._failures.pop(key, None)
        return outcome

    def _run_converter(self, model: str, version: int, variant: str, entry: Path) -> dict[str, Any]:
        from converter.errors import ConverterError
        from converter.parity import ParityThresholds

        convert = self._convert
        if convert is None:
            from converter.pipeline import convert as default_convert

            convert = default_convert
        uri = f"models:/{model}/{version}"
        log.info("converting %s to %s", uri, variant)
        try:
            with _registry_uri(self.tracking_uri):
                result = convert(
                    uri,
                    entry,
                    variants=[variant],
                    tracking_uri=self.tracking_uri,
                    thresholds=ParityThresholds(**self.settings.parity),
                    calibration_data=self.settings.calibration_data,
                )
        except ConverterError as exc:
            if not _deterministic(exc):
                raise  # the source could not be read: transient, never cached
            return {"status": "failed", "reason": f"{type(exc).__name__}: {exc}", "parity": None}
        (vr,) = result.variants
        out: dict[str, Any] = {
            "status": vr.status,
            "reason": vr.reason,
            "parity": vr.parity.as_dict() if vr.parity else None,
            "sha256": vr.sha256,
        }
        if vr.status == "written" and vr.path is not None:
            from mlflow.models import Model

            metadata = Model.load(str(vr.path)).metadata or {}
            out["metadata"] = metadata["lineside"]
        return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""
