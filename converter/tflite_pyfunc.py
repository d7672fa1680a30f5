"""MLflow pyfunc loader for a TFLite bundle: ``mlflow.pyfunc.load_model`` runs LiteRT.

The bundle writer registers this module with
``mlflow.pyfunc.add_to_model(model, loader_module="converter.tflite_pyfunc",
data="model.tflite")``; MLflow then calls ``_load_pyfunc(<bundle>/model.tflite)``.

The model runs through ``edge_agent.runtime.load_session``, the same session the parity
gate and the device use, so a prediction through MLflow is the device's prediction.
Column order is the caller's (MLflow reorders DataFrame columns to the signature's
inputs before ``predict`` is called, which is the order ``X`` expects).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.runtime import Session, load_session

MODEL_FILE = "model.tflite"


class TflitePyfuncModel:
    """What MLflow's ``PyFuncModel`` wraps: ``predict`` on a DataFrame or an array."""

    def __init__(self, session: Session) -> None:
        self._session = session

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> Any:
        """The canonical outputs for ``model_input`` rows.

        Returns a pandas DataFrame (one column per output) when every output has one value
        per row (regressor, outlier), else a dict of numpy arrays (``probabilities`` and
        ``distances`` are ``[N, C]``, which a flat DataFrame cannot hold without renaming).
        ``params`` is accepted for MLflow's interface; the model has none.
        """
        outputs = self._session.run(_as_float32_rows(model_input))
        if all(value.ndim == 1 for value in outputs.values()):
            import pandas as pd

            return pd.DataFrame(outputs)
        return outputs


def _as_float32_rows(model_input: Any) -> np.ndarray:
    # A DataFrame, a dict of columns (MLflow's tensor input), a list of rows or an array.
    if hasattr(model_input, "to_numpy"):
        rows = model_input.to_numpy(dtype=np.float32)
    elif isinstance(model_input, dict):
        rows = np.column_stack([np.asarray(v, dtype=np.float32) for v in model_input.values()])
    else:
        rows = np.asarray(model_input, dtype=np.float32)
    if rows.ndim == 1:
        rows = rows.reshape(1, -1)  # one row given as a flat vector
    return np.ascontiguousarray(rows)


def _load_pyfunc(data_path: str, model_config: dict[str, Any] | None = None) -> TflitePyfuncModel:
    """MLflow's entry point: ``data_path`` is the bundle's ``model.tflite`` (or its dir)."""
    path = Path(data_path)
    if path.is_dir():
        path = path / MODEL_FILE
    return TflitePyfuncModel(load_session(path, "tflite"))
