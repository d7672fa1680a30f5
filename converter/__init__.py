"""The converter: an MLflow model becomes verified, compact edge bundles.

Public surface::

    from converter import convert, ConversionResult, ParityThresholds, VARIANTS
    from converter.errors import ConverterError  # and its subclasses

Heavy dependencies (mlflow, onnx, skl2onnx, tensorflow) are imported inside functions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from converter.parity import ParityThresholds
    from converter.pipeline import ConversionResult, convert

from converter.variants import VARIANTS

__all__ = ["VARIANTS", "ConversionResult", "ParityThresholds", "convert"]


def __getattr__(name: str) -> Any:
    if name in ("convert", "ConversionResult"):
        from converter import pipeline

        return getattr(pipeline, name)
    if name == "ParityThresholds":
        from converter.parity import ParityThresholds

        return ParityThresholds
    raise AttributeError(name)
