"""Build one variant's model bytes from an original model.

Dispatches to the format builders (``onnx_build``/``onnx_variants`` for ONNX,
``tflite_build`` for TFLite). A variant that does not apply raises
``VariantNotApplicable`` with the reason; it is never replaced by another variant.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from converter.errors import VariantNotApplicable
from converter.original import OriginalModel

VARIANTS = ("onnx-fp32", "onnx-fp16", "onnx-int8", "tflite-fp32", "tflite-fp16", "tflite-int8")


def runtime_of(variant: str) -> str:
    return "tflite" if variant.startswith("tflite") else "onnxruntime"


@dataclass
class BuiltVariant:
    variant: str
    model_bytes: bytes
    settings: dict[str, Any] = field(default_factory=dict)


class VariantBuilder:
    """Builds variants of one original model, reusing its fp32 ONNX graph."""

    def __init__(
        self, original: OriginalModel, calibration: np.ndarray | None, representative: np.ndarray
    ) -> None:
        self.original = original
        self.calibration = calibration  # given by the user: static int8 quantization
        self.representative = representative  # always available: TFLite int8 needs rows
        self._onnx_fp32: Any = None

    def build(self, variant: str) -> BuiltVariant:
        if variant not in VARIANTS:
            raise VariantNotApplicable(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
        if variant.startswith("onnx"):
            return self._build_onnx(variant)
        return self._build_tflite(variant)

    def onnx_fp32(self) -> Any:
        if self._onnx_fp32 is None:
            from converter import onnx_build

            if self.original.flavor == "sklearn":
                self._onnx_fp32 = onnx_build.sklearn_to_onnx(
                    self.original.model, self.original.n_features
                )
            elif self.original.flavor == "onnx":
                self._onnx_fp32 = onnx_build.onnx_source_model(self.original.model)
            else:
                raise VariantNotApplicable(
                    "Keras models are converted to TFLite; ONNX export of Keras needs tf2onnx, "
                    "which lineside does not bundle"
                )
        return self._onnx_fp32

    def _build_onnx(self, variant: str) -> BuiltVariant:
        fp32 = self.onnx_fp32()
        if variant == "onnx-fp32":
            return BuiltVariant(variant, fp32.SerializeToString(), {"precision": "fp32"})
        from converter import onnx_variants

        if variant == "onnx-fp16":
            model = onnx_variants.to_fp16(fp32)
            return BuiltVariant(
                variant, model.SerializeToString(), {"precision": "fp16", "io": "fp32"}
            )
        model, settings = onnx_variants.to_int8(fp32, self.calibration)
        return BuiltVariant(variant, model.SerializeToString(), {"precision": "int8", **settings})

    def _build_tflite(self, variant: str) -> BuiltVariant:
        from converter import tflite_build

        if self.original.flavor == "onnx":
            raise VariantNotApplicable(
                "ONNX source models are not converted to TFLite (no maintained ONNX->TFLite path)"
            )
        rows = (self.calibration if self.calibration is not None else self.representative)
        rows = rows.astype(np.float32)
        if self.original.flavor == "keras":
            built = tflite_build.build_keras(self.original.model, variant, rows)
        else:
            built = tflite_build.build_sklearn(
                self.original.model, self.original.n_features, variant, rows
            )
        # The builder says which mode it used (e.g. int8 or 16x8 after its self-check).
        settings: dict[str, Any] = {"precision": variant.split("-")[1], **built.settings}
        return BuiltVariant(variant, built.data, settings)
