"""The converter's exception tree.

    ConverterError                      every error the converter raises
    ├── SourceError                     the model could not be found or read
    │   ├── ModelNotFoundError          unknown URI, registered model, version, alias, stage
    │   ├── TrackingServerError         the tracking server did not answer
    │   └── ModelLoadError              the artifact exists but cannot be loaded
    ├── UnsupportedModelError           estimator, flavor or input type not convertible
    ├── VariantNotApplicable            this variant does not apply to this model (a skip)
    ├── InputSpecError                  no signature and no input example, string inputs...
    ├── CalibrationDataError            the calibration file is unreadable or does not fit
    ├── ConversionFailed                a converter or quantizer failed on a supported model
    └── ParityError                     a variant failed the parity gate

MLflow, skl2onnx, onnxruntime and TensorFlow errors are translated into these at the
boundary where they are called; they never reach the CLI raw.
"""

from __future__ import annotations


class ConverterError(Exception):
    """Base class of every error the converter raises."""


class SourceError(ConverterError):
    """The source model could not be resolved or read."""


class ModelNotFoundError(SourceError):
    """The URI, registered model, version, alias or stage does not exist."""


class TrackingServerError(SourceError):
    """The tracking server could not be reached."""


class ModelLoadError(SourceError):
    """The model artifact exists but could not be loaded."""


class UnsupportedModelError(ConverterError):
    """The model (estimator, flavor, input types) cannot be converted."""


class VariantNotApplicable(ConverterError):  # noqa: N818 - it is a skip, not a failure
    """The variant does not apply to this model; the message says why."""


class InputSpecError(ConverterError):
    """The model's inputs cannot be determined or are not numeric."""


class CalibrationDataError(ConverterError):
    """The calibration/validation data file is unreadable or does not fit the model."""


class ConversionFailed(ConverterError):  # noqa: N818 - reads better at call sites
    """A converter or quantizer failed on a model it claims to support."""


class ParityError(ConverterError):
    """A converted variant disagrees with the original model beyond the thresholds."""
