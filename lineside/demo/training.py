"""Train the demo's models on the press line's history and register them with MLflow's APIs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from lineside.demo.pressline import FEATURES, training_data

ANOMALY_MODEL = "press-anomaly"
QUALITY_MODEL = "press-quality"


@dataclass(frozen=True)
class Registered:
    name: str
    version: str
    run_id: str


def train_anomaly(seed: int, n_estimators: int = 100) -> tuple[Any, Any]:
    import pandas as pd
    from sklearn.ensemble import IsolationForest
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, _ = training_data(rows=3000, seed=seed)
    frame = pd.DataFrame(X, columns=list(FEATURES))
    model = make_pipeline(
        StandardScaler(),
        IsolationForest(n_estimators=n_estimators, contamination=0.03, random_state=seed),
    ).fit(frame)
    return model, frame


def train_quality(seed: int) -> tuple[Any, Any]:
    import pandas as pd
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = training_data(rows=3000, seed=seed)
    frame = pd.DataFrame(X, columns=list(FEATURES))
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(frame, y)
    return model, frame


def log_and_register(
    model: Any, frame: Any, name: str, *, experiment: str, params: dict[str, Any]
) -> Registered:
    """Log with ``mlflow.sklearn.log_model`` (skops format, MLflow's default) and register."""
    import mlflow
    import mlflow.sklearn
    import sklearn
    import skops.io
    from mlflow.models import infer_signature

    mlflow.set_experiment(experiment)
    trusted = sorted(set(skops.io.get_untrusted_types(data=skops.io.dumps(model))))
    with mlflow.start_run(run_name=f"{name}-train") as run:
        mlflow.log_params(params)
        predictions = model.predict(frame)
        mlflow.log_metric(
            "train_positive_rate",
            float(np.mean(predictions == (-1 if name == ANOMALY_MODEL else 1))),
        )
        info = mlflow.sklearn.log_model(
            model,
            name="model",
            registered_model_name=name,
            signature=infer_signature(frame, predictions),
            input_example=frame.iloc[:5],
            skops_trusted_types=trusted,
            # Naming the requirements skips MLflow's inference of them (a subprocess that
            # re-imports the model's modules: seconds per model).
            pip_requirements=[f"scikit-learn=={sklearn.__version__}", "skops"],
        )
    version = str(info.registered_model_version)
    return Registered(name=name, version=version, run_id=run.info.run_id)
