"""Convert one MLflow model into verified edge bundles: resolve, load, build, gate, write.

This is the converter's public entry point (``converter.convert``); the CLI and
registry_sync both call it.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from converter import baseline, dataset, parity
from converter.bundle import MODEL_FILES, write_bundle
from converter.errors import (
    ConverterError,
    ParityError,
    UnsupportedModelError,
    VariantNotApplicable,
)
from converter.original import OriginalModel, load_original
from converter.source import ResolvedModel, resolve
from converter.variants import VARIANTS, BuiltVariant, VariantBuilder, runtime_of

GOLDEN_ROWS = 8


@dataclass
class VariantResult:
    variant: str
    status: str  # written | skipped | failed
    reason: str | None = None
    path: Path | None = None
    size: int | None = None
    sha256: str | None = None
    parity: parity.ParityReport | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "status": self.status,
            "reason": self.reason,
            "path": str(self.path) if self.path else None,
            "size": self.size,
            "sha256": self.sha256,
            "parity": self.parity.as_dict() if self.parity else None,
            "settings": self.settings,
        }


@dataclass
class ConversionResult:
    source: ResolvedModel
    variants: list[VariantResult]
    fp32_size: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        written = any(v.status == "written" for v in self.variants)
        return written and not any(v.status == "failed" for v in self.variants)

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": {
                "uri": self.source.uri,
                "registered_name": self.source.registered_name,
                "version": self.source.version,
                "selector": self.source.selector,
                "run_id": self.source.run_id,
                "note": self.source.note,
            },
            "ok": self.ok,
            "variants": [v.as_dict() for v in self.variants],
        }


ProgressHook = Callable[[str, str], None]  # (variant, stage) -> None


def convert(
    model_uri: str,
    out_dir: Path,
    *,
    variants: Sequence[str] = VARIANTS,
    calibration_data: Path | None = None,
    tracking_uri: str | None = None,
    thresholds: parity.ParityThresholds | None = None,
    progress: ProgressHook | None = None,
) -> ConversionResult:
    """Convert ``model_uri`` into ``out_dir/<variant>/`` bundles; see the module docstring."""
    thresholds = thresholds or parity.ParityThresholds()
    notify = progress or (lambda _v, _s: None)
    with tempfile.TemporaryDirectory(prefix="lineside-src-") as tmp:
        source = resolve(model_uri, tracking_uri=tracking_uri, dst=Path(tmp))
        original = load_original(source.local_path)
        check_supported(original)
        job = _Job(source, original, out_dir, calibration_data, thresholds)
        results = []
        for variant in variants:
            notify(variant, "building")
            results.append(job.run(variant))
            notify(variant, results[-1].status)
    return ConversionResult(source=source, variants=results)


class _Job:
    def __init__(
        self,
        source: ResolvedModel,
        original: OriginalModel,
        out_dir: Path,
        calibration_path: Path | None,
        thresholds: parity.ParityThresholds,
    ) -> None:
        self.source = source
        self.original = original
        self.out_dir = out_dir
        self.thresholds = thresholds
        names = original.feature_names
        self.calibration = (
            dataset.load_calibration(calibration_path, names) if calibration_path else None
        )
        self.validation = (
            self.calibration
            if self.calibration is not None
            else dataset.sample_rows(original.model, original.input_example, len(names))
        )
        self.example = (
            original.input_example if original.input_example is not None else self.validation[:5]
        )
        self.builder = VariantBuilder(original, self.calibration, self.validation)
        self.ref_example = original.reference(self.example)
        self.ref_validation = original.reference(self.validation)
        self._pyfunc_checked = False

    def run(self, variant: str) -> VariantResult:
        try:
            built = self.builder.build(variant)
        except VariantNotApplicable as exc:
            return VariantResult(variant, "skipped", reason=str(exc))
        except ConverterError as exc:
            return VariantResult(variant, "failed", reason=str(exc))
        try:
            return self._gate_and_write(built)
        except ParityError as exc:
            return VariantResult(variant, "failed", reason=str(exc))
        except ConverterError as exc:
            return VariantResult(variant, "failed", reason=str(exc))

    def _gate_and_write(self, built: BuiltVariant) -> VariantResult:
        runtime = runtime_of(built.variant)
        session = _session_for(built.model_bytes, runtime)
        got_example = _run(session, self.example)
        got_validation = _run(session, self.validation)
        self._check_pyfunc_agrees()
        report = parity.check_parity(
            built.variant,
            self.original.task,
            reference_example=self.ref_example,
            candidate_example=got_example,
            reference_validation=self.ref_validation,
            candidate_validation=got_validation,
            thresholds=self.thresholds,
        )
        if not report.passed:
            result = VariantResult(built.variant, "failed", parity=report, settings=built.settings)
            result.reason = "parity gate failed: " + "; ".join(report.failures)
            return result
        metadata = self._metadata(built, runtime, report, got_validation)
        path = write_bundle(
            self.out_dir,
            built.variant,
            built.model_bytes,
            runtime=runtime,
            signature=self._bundle_signature(),
            input_example=self._example_frame(),
            metadata=metadata,
        )
        return VariantResult(
            built.variant,
            "written",
            path=path,
            size=len(built.model_bytes),
            sha256=hashlib.sha256(built.model_bytes).hexdigest(),
            parity=report,
            settings=built.settings,
        )

    def _check_pyfunc_agrees(self) -> None:
        # The reference is computed natively (scores need predict_proba etc.); confirm once
        # that MLflow's pyfunc, which is what serving runs, predicts the same labels.
        if self._pyfunc_checked:
            return
        self._pyfunc_checked = True
        labels = self.original.pyfunc_labels(self.validation)
        if labels is not None and "label" in self.ref_validation:
            agreement = float(np.mean(labels == self.ref_validation["label"]))
            if agreement < 1.0:
                raise ParityError(
                    f"the original's MLflow pyfunc disagrees with the estimator on "
                    f"{1 - agreement:.2%} of rows; check the signature's column types"
                )

    def _metadata(
        self,
        built: BuiltVariant,
        runtime: str,
        report: parity.ParityReport,
        got_validation: dict[str, np.ndarray],
    ) -> dict[str, Any]:
        golden_rows = np.vstack(
            [self.example[: GOLDEN_ROWS // 2], self.validation[: GOLDEN_ROWS // 2]]
        )
        session = _session_for(built.model_bytes, runtime)
        golden_out = _run(session, golden_rows)
        return {
            "format": 1,
            "source": {
                "uri": self.source.uri,
                "registered_name": self.source.registered_name,
                "version": self.source.version,
                "selector": self.source.selector,
                "run_id": self.source.run_id,
                "model_id": self.source.model_id,
                "flavor": self.original.flavor,
                "estimators": self.original.estimator_names,
            },
            "variant": built.variant,
            "runtime": runtime,
            "model_file": MODEL_FILES[runtime],
            "task": self.original.task,
            "feature_names": self.original.feature_names,
            "input_signature": self.original.signature
            or _columns_signature(self.original.feature_names),
            "classes": self.original.classes,
            "outputs": self.original.output_spec_dicts(),
            "quantization": built.settings,
            "parity": report.as_dict(),
            "golden": {
                "inputs": golden_rows.astype(np.float32).tolist(),
                "outputs": {k: np.asarray(v).tolist() for k, v in golden_out.items()},
                "atol": 1e-4,
                "rtol": 1e-3,
            },
            "baseline": {
                "rows": len(self.validation),
                "source": "calibration-data" if self.calibration is not None else "sample",
                "features": baseline.feature_baseline(self.validation, self.original.feature_names),
                "outputs": baseline.output_baseline(got_validation),
            },
            "tools": _tool_versions(),
        }

    def _bundle_signature(self) -> Any:
        """What the variant itself takes and gives: float32 ``X`` [-1, F] and named outputs.

        The original's column signature (names and MLflow types) travels in the metadata
        as ``input_signature``; the agent enforces it on each message before building X.
        A tensor signature also keeps MLflow's ONNX pyfunc usable: with a column signature
        it flattens 2-D outputs such as probabilities and fails.
        """
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        # Unnamed, so that a DataFrame of float32 columns also passes MLflow's enforcement.
        inputs = Schema([TensorSpec(np.dtype("float32"), (-1, self.original.n_features))])
        outputs: list[Any] = [
            TensorSpec(np.dtype(spec["dtype"]), tuple(spec["shape"]), spec["name"])
            for spec in self.original.output_spec_dicts()
        ]
        return ModelSignature(inputs=inputs, outputs=Schema(outputs) if outputs else None)

    def _example_frame(self) -> np.ndarray:
        return np.ascontiguousarray(self.example[:5], dtype=np.float32)


def check_supported(original: OriginalModel) -> None:
    """Refuse up front a scikit-learn step no format covers, naming it."""
    if original.flavor != "sklearn":
        return
    from converter import onnx_build

    covered = set(onnx_build.SUPPORTED_ESTIMATORS) | set(onnx_build.SUPPORTED_PREPROCESSING)
    unknown = [name for name in original.estimator_names if name not in covered]
    if unknown:
        raise UnsupportedModelError(
            f"{', '.join(unknown)} cannot be converted by lineside; "
            "`lineside convert --capabilities` lists what can"
        )


def _session_for(model_bytes: bytes, runtime: str) -> Any:
    from edge_agent.errors import RuntimeLoadError
    from edge_agent.runtime import load_session

    suffix = ".tflite" if runtime == "tflite" else ".onnx"
    with tempfile.NamedTemporaryFile(suffix=suffix) as handle:
        handle.write(model_bytes)
        handle.flush()
        try:
            return load_session(Path(handle.name), runtime)
        except RuntimeLoadError as exc:
            raise ParityError(f"the variant does not load in its runtime: {exc}") from exc


def _run(session: Any, X: np.ndarray) -> dict[str, np.ndarray]:
    from edge_agent.errors import InferenceError

    try:
        return dict(session.run(np.ascontiguousarray(X, dtype=np.float32)))
    except InferenceError as exc:
        raise ParityError(f"the variant fails at inference: {exc}") from exc


def _tool_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in (
        "lineside",
        "mlflow",
        "onnx",
        "onnxruntime",
        "skl2onnx",
        "scikit-learn",
        "tensorflow-cpu",
        "tensorflow",
        "ai-edge-litert",
    ):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return out


def _columns_signature(names: list[str]) -> dict[str, Any]:
    """A column signature for a model logged without one (doubles, all required)."""
    return {
        "inputs": [{"type": "double", "name": n, "required": True} for n in names],
        "outputs": None,
        "params": None,
    }
