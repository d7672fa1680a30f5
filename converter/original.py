"""The original model as MLflow saved it: flavor, signature, input example, reference outputs.

scikit-learn models load from skops (MLflow's default, with the trusted types MLflow
recorded) and from pickle/cloudpickle. Loading a pickle runs code: this happens only on
the trusted conversion host; nothing pickled is ever written to a bundle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from converter.errors import InputSpecError, ModelLoadError, UnsupportedModelError
from converter.reference import output_specs, reference_outputs, task_of

NUMERIC_TYPES = {"double", "float", "long", "integer", "boolean"}
SUPPORTED_FLAVORS = ("sklearn", "onnx", "keras", "tensorflow")


@dataclass
class OriginalModel:
    """A loaded source model and everything conversion needs to know about it."""

    path: Path
    flavor: str  # sklearn | onnx | keras
    model: Any
    feature_names: list[str]
    signature: dict[str, Any] | None
    input_example: np.ndarray | None
    mlmodel: Any = field(repr=False)

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    @cached_property
    def task(self) -> str:
        if self.flavor == "sklearn":
            return task_of(self.model)
        if self.flavor == "keras":
            return _keras_task(self.model)
        return "tensor"  # an ONNX source keeps its own outputs

    @property
    def estimator_names(self) -> list[str]:
        """Class names of every step, outermost first (for errors and the report)."""
        if self.flavor != "sklearn":
            return [self.flavor]
        return _step_names(self.model)

    @property
    def classes(self) -> list[Any] | None:
        if self.flavor == "sklearn" and self.task == "classifier":
            from converter.reference import final_estimator

            return [_plain(c) for c in final_estimator(self.model).classes_]
        return None

    @cached_property
    def pyfunc(self) -> Any:
        import mlflow.pyfunc

        return mlflow.pyfunc.load_model(str(self.path))

    def reference(self, X: np.ndarray) -> dict[str, np.ndarray]:
        """The canonical outputs of the original on float64 rows ``X``."""
        if self.flavor == "sklearn":
            return reference_outputs(self.model, X)
        if self.flavor == "keras":
            raw = np.asarray(self.model.predict(X.astype(np.float32), verbose=0))
            if self.task == "classifier":
                return {"label": raw.argmax(axis=1).astype(np.int64), "probabilities": raw}
            return {
                "prediction": raw.reshape(len(X), -1).squeeze(axis=1)
                if raw.ndim == 2 and raw.shape[1] == 1
                else raw
            }
        return _run_onnx_proto(self.model, X)

    def pyfunc_labels(self, X: np.ndarray) -> np.ndarray | None:
        """Labels as MLflow's pyfunc predicts them (for the label-agreement figure)."""
        if self.flavor != "sklearn" or self.task == "regressor":
            return None
        import pandas as pd

        frame = pd.DataFrame(X, columns=self.feature_names)
        if self.signature and _is_tensor_signature(self.signature):
            predicted = np.asarray(self.pyfunc.predict(X))
        else:
            frame = frame.astype(_column_dtypes(self.signature, self.feature_names))
            predicted = np.asarray(self.pyfunc.predict(frame))
        if self.task == "classifier":
            classes = self.classes or []
            return np.array([classes.index(_plain(v)) for v in predicted], dtype=np.int64)
        return predicted.astype(np.int64)

    def output_spec_dicts(self) -> list[dict[str, Any]]:
        if self.flavor == "sklearn":
            return [
                {"name": s.name, "dtype": s.dtype, "shape": list(s.shape)}
                for s in output_specs(self.model)
            ]
        return []


def load_original(path: Path) -> OriginalModel:
    from mlflow.models import Model

    try:
        mlmodel = Model.load(str(path))
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot read MLmodel: {exc}") from exc
    flavor = next((f for f in SUPPORTED_FLAVORS if f in mlmodel.flavors), None)
    if flavor is None:
        found = ", ".join(sorted(mlmodel.flavors)) or "none"
        raise UnsupportedModelError(
            f"flavor(s) {found} not supported; lineside converts sklearn, onnx and keras/"
            "tensorflow models (see `lineside convert --capabilities`)"
        )
    model = _load_flavor(path, flavor)
    flavor = "keras" if flavor == "tensorflow" else flavor
    signature = _signature_dict(mlmodel)
    example = _input_example(mlmodel, path)
    names = _feature_names(signature, example, model, flavor)
    example_array = _example_array(example, names) if example is not None else None
    return OriginalModel(
        path=path,
        flavor=flavor,
        model=model,
        feature_names=names,
        signature=signature,
        input_example=example_array,
        mlmodel=mlmodel,
    )


def _load_flavor(path: Path, flavor: str) -> Any:
    try:
        if flavor == "sklearn":
            import mlflow.sklearn

            return mlflow.sklearn.load_model(str(path))
        if flavor == "onnx":
            import mlflow.onnx

            return mlflow.onnx.load_model(str(path))
        if flavor == "keras":
            import mlflow.keras

            return mlflow.keras.load_model(str(path))
        import mlflow.tensorflow

        return mlflow.tensorflow.load_model(str(path))
    except ImportError as exc:
        raise UnsupportedModelError(
            f"loading a {flavor} model needs {exc.name}; for Keras install 'lineside[tflite]'"
        ) from exc
    except Exception as exc:
        raise ModelLoadError(f"cannot load the {flavor} model at {path}: {exc}") from exc


def _signature_dict(mlmodel: Any) -> dict[str, Any] | None:
    import json

    if mlmodel.signature is None:
        return None
    raw = mlmodel.signature.to_dict()
    return {
        key: (json.loads(value) if isinstance(value, str) else value) for key, value in raw.items()
    }


def _is_tensor_signature(signature: dict[str, Any]) -> bool:
    inputs = signature.get("inputs") or []
    return bool(inputs) and inputs[0].get("type") == "tensor"


def _input_example(mlmodel: Any, path: Path) -> Any:
    try:
        return mlmodel.load_input_example(str(path))
    except Exception:  # a broken example is treated like a missing one; the error names both
        return None


def _feature_names(
    signature: dict[str, Any] | None, example: Any, model: Any, flavor: str
) -> list[str]:
    if signature is not None:
        inputs = signature.get("inputs") or []
        if inputs and inputs[0].get("type") == "tensor":
            shape = inputs[0]["tensor-spec"]["shape"]
            if len(inputs) != 1 or len(shape) != 2 or shape[-1] in (-1, None):
                raise InputSpecError(
                    f"tensor signature {shape} is not a 2-D [rows, features] input with a fixed "
                    "feature count; lineside feeds one float matrix"
                )
            return [f"x{i}" for i in range(int(shape[-1]))]
        bad = [
            f"{c.get('name')} ({c.get('type')})"
            for c in inputs
            if c.get("type") not in NUMERIC_TYPES
        ]
        if bad:
            raise InputSpecError(
                f"input column(s) {', '.join(bad)} are not numeric; edge variants take numeric "
                "features only: encode categoricals/strings upstream or inside the pipeline"
            )
        return [str(c["name"]) for c in inputs]
    if example is not None:
        columns = getattr(example, "columns", None)
        if columns is not None:
            return [str(c) for c in columns]
        array = np.asarray(example)
        if array.ndim == 2:
            return [f"x{i}" for i in range(array.shape[1])]
    n = getattr(model, "n_features_in_", None)
    if flavor == "sklearn" and isinstance(n, int):
        names = getattr(model, "feature_names_in_", None)
        return [str(x) for x in names] if names is not None else [f"x{i}" for i in range(n)]
    raise InputSpecError(
        "the model has no signature and no input example, so its inputs are unknown: "
        "log it with signature=infer_signature(X, y) or input_example=X[:5]"
    )


def _example_array(example: Any, names: list[str]) -> np.ndarray:
    columns = getattr(example, "columns", None)
    try:
        if columns is not None and all(n in columns for n in names):
            array = np.asarray(example[names], dtype=np.float64)
        else:
            array = np.asarray(example, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputSpecError(f"the input example is not numeric: {exc}") from exc
    if array.ndim == 1:
        array = array.reshape(1, -1)
    if array.ndim != 2 or array.shape[1] != len(names):
        raise InputSpecError(
            f"the input example has shape {array.shape}; expected [rows, {len(names)}]"
        )
    return array


def _column_dtypes(signature: dict[str, Any] | None, names: list[str]) -> dict[str, str]:
    mapping = {
        "double": "float64",
        "float": "float32",
        "long": "int64",
        "integer": "int32",
        "boolean": "bool",
    }
    if not signature:
        return dict.fromkeys(names, "float64")
    types = {
        c["name"]: mapping.get(c.get("type", "double"), "float64") for c in signature["inputs"]
    }
    return {n: types.get(n, "float64") for n in names}


def _step_names(model: Any) -> list[str]:
    steps = getattr(model, "steps", None)
    if steps:
        names: list[str] = []
        for _, step in steps:
            names.extend(_step_names(step))
        return names
    return [type(model).__name__]


def _keras_task(model: Any) -> str:
    last = model.layers[-1] if getattr(model, "layers", None) else None
    activation = getattr(getattr(last, "activation", None), "__name__", "")
    return "classifier" if activation == "softmax" else "regressor"


def _run_onnx_proto(proto: Any, X: np.ndarray) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    values = session.run(None, {name: X.astype(np.float32)})
    return {o.name: v for o, v in zip(session.get_outputs(), values, strict=True)}


def _plain(value: Any) -> Any:
    """numpy scalars to Python scalars, so classes serialise to JSON."""
    return value.item() if hasattr(value, "item") else value
