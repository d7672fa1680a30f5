"""A real MLflow tracking server store and Model Registry in a temp dir (sqlite).

Tests log models with MLflow's own APIs and register them; helpers here only
shorten the repeated calls.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Registry:
    tracking_uri: str
    root: Path

    def client(self) -> Any:
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def log_sklearn(
        self,
        model: Any,
        X: Any,
        *,
        name: str,
        registered_name: str | None = None,
        serialization_format: str | None = None,
        signature: bool = True,
        input_example: bool = True,
    ) -> Any:
        """Log ``model`` with ``mlflow.sklearn.log_model`` and return the ModelInfo."""
        import mlflow
        import mlflow.sklearn
        from mlflow.models import infer_signature

        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.tracking_uri)
        kwargs: dict[str, Any] = {}
        if signature:
            kwargs["signature"] = infer_signature(X, _predict_for_signature(model, X))
        if input_example:
            kwargs["input_example"] = X[:5] if not hasattr(X, "iloc") else X.iloc[:5]
        if serialization_format is not None:
            kwargs["serialization_format"] = serialization_format
        if serialization_format in (None, "skops"):
            kwargs["skops_trusted_types"] = _skops_trusted_types(model)
        # Stated, so MLflow does not start a subprocess to infer them (~2 s a call, most
        # of a log call's time); the same list MLflow's inference settles on.
        kwargs["pip_requirements"] = mlflow.sklearn.get_default_pip_requirements(
            include_cloudpickle=serialization_format == "cloudpickle",
            include_skops=serialization_format in (None, "skops"),
        )
        with mlflow.start_run():
            return mlflow.sklearn.log_model(
                model, name=name, registered_model_name=registered_name, **kwargs
            )

    def set_alias(self, name: str, alias: str, version: int | str) -> None:
        self.client().set_registered_model_alias(name, alias, str(version))

    def transition(self, name: str, version: int | str, stage: str) -> None:
        self.client().transition_model_version_stage(
            name, str(version), stage, archive_existing_versions=False
        )


def _predict_for_signature(model: Any, X: Any) -> Any:
    return model.predict(X[:5] if not hasattr(X, "iloc") else X.iloc[:5])


def _skops_trusted_types(model: Any) -> list[str]:
    """Every non-default type skops finds in the model, as MLflow asks for them."""
    import skops.io

    blob = skops.io.dumps(model)
    return sorted(set(skops.io.get_untrusted_types(data=blob)))


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text)[:60]
