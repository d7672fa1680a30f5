"""What a converted model must compute: the canonical outputs, from scikit-learn itself.

Every converted variant, whatever its format, has one float32 input ``X`` of shape
``[N, F]`` (features in the order of the MLflow signature's columns) and the outputs of
its task, named as below. The parity gate compares a variant's outputs with
``reference_outputs`` on the original estimator; the agent publishes them.

    task          outputs
    classifier    label int64 [N] (index into ``classes``), and
                  probabilities float32 [N, C] when the estimator has predict_proba,
                  else scores float32 [N] (binary) or [N, C] (decision_function)
    regressor     prediction float32 [N] (or [N, T] for multi-output)
    outlier       label int64 [N] (+1 inlier, -1 outlier, as ``predict``),
                  score float32 [N] (``decision_function``; below 0 is an outlier)
    cluster       label int64 [N] (cluster index), distances float32 [N, K] (``transform``)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

TASKS = ("classifier", "regressor", "outlier", "cluster")


@dataclass(frozen=True)
class OutputSpec:
    name: str
    dtype: str  # numpy dtype name: "int64" or "float32"
    shape: tuple[int, ...]  # -1 for the batch axis


def final_estimator(model: Any) -> Any:
    """The last step of a Pipeline (recursively), or the model itself."""
    steps = getattr(model, "steps", None)
    if steps:
        return final_estimator(steps[-1][1])
    return model


def task_of(model: Any) -> str:
    """classifier, regressor, outlier or cluster, from scikit-learn's own tags."""
    est = final_estimator(model)
    estimator_type = getattr(est, "_estimator_type", None)
    if estimator_type is None:
        try:
            from sklearn.utils import get_tags

            estimator_type = get_tags(est).estimator_type
        except (ImportError, AttributeError):
            estimator_type = None
    if estimator_type in ("classifier", "regressor"):
        return str(estimator_type)
    if estimator_type == "outlier_detector" or hasattr(est, "offset_"):
        return "outlier"
    if estimator_type == "clusterer" or hasattr(est, "cluster_centers_"):
        return "cluster"
    raise ValueError(f"cannot tell the task of {type(est).__name__}")


def output_specs(model: Any) -> list[OutputSpec]:
    task = task_of(model)
    est = final_estimator(model)
    if task == "classifier":
        n_classes = len(est.classes_)
        if hasattr(model, "predict_proba") and _has_proba(est):
            return [
                OutputSpec("label", "int64", (-1,)),
                OutputSpec("probabilities", "float32", (-1, n_classes)),
            ]
        shape: tuple[int, ...] = (-1,) if n_classes == 2 else (-1, n_classes)
        return [OutputSpec("label", "int64", (-1,)), OutputSpec("scores", "float32", shape)]
    if task == "regressor":
        n_targets = int(getattr(est, "n_outputs_", 1) or 1)
        coef = getattr(est, "coef_", None)
        if coef is not None and np.ndim(coef) == 2 and np.shape(coef)[0] > 1:
            n_targets = int(np.shape(coef)[0])
        shape = (-1,) if n_targets == 1 else (-1, n_targets)
        return [OutputSpec("prediction", "float32", shape)]
    if task == "outlier":
        return [OutputSpec("label", "int64", (-1,)), OutputSpec("score", "float32", (-1,))]
    n_clusters = int(est.cluster_centers_.shape[0])
    return [
        OutputSpec("label", "int64", (-1,)),
        OutputSpec("distances", "float32", (-1, n_clusters)),
    ]


def _has_proba(est: Any) -> bool:
    # SVC exposes predict_proba only when trained with probability=True.
    try:
        getattr(est, "predict_proba")  # noqa: B009 - the property raises when unavailable
    except AttributeError:
        return False
    return True


def reference_outputs(model: Any, X: np.ndarray) -> dict[str, np.ndarray]:
    """The canonical outputs computed by scikit-learn on float64 ``X``."""
    task = task_of(model)
    X = _with_feature_names(model, np.asarray(X, dtype=np.float64))
    if task == "classifier":
        classes = list(final_estimator(model).classes_)
        labels = model.predict(X)
        index = np.array([classes.index(v) for v in labels], dtype=np.int64)
        names = [spec.name for spec in output_specs(model)]
        if "probabilities" in names:
            return {"label": index, "probabilities": np.asarray(model.predict_proba(X))}
        return {"label": index, "scores": np.asarray(model.decision_function(X))}
    if task == "regressor":
        return {"prediction": np.asarray(model.predict(X), dtype=np.float64)}
    if task == "outlier":
        return {
            "label": np.asarray(model.predict(X), dtype=np.int64),
            "score": np.asarray(model.decision_function(X), dtype=np.float64),
        }
    return {
        "label": np.asarray(model.predict(X), dtype=np.int64),
        "distances": np.asarray(model.transform(X), dtype=np.float64),
    }


def _with_feature_names(model: Any, X: np.ndarray) -> Any:
    """A DataFrame with the training column names when the model was fitted on one.

    scikit-learn warns on every call otherwise; the values are the same either way.
    """
    names = getattr(model, "feature_names_in_", None)
    if names is None or len(names) != X.shape[1]:
        return X
    import pandas as pd

    return pd.DataFrame(X, columns=list(names))
