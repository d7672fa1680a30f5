"""Shared fixtures: a real MLflow registry and a real Mosquitto broker per test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.broker import MosquittoBroker, running_broker
from tests.support.registry import Registry, safe_name


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """One sqlite-backed MLflow store for the session; tests use unique model names."""
    import mlflow

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    # Artifacts go under the temp dir, not ./mlruns.
    exp_id = mlflow.create_experiment(
        "lineside-tests", artifact_location=(root / "artifacts").as_uri()
    )
    mlflow.set_experiment(experiment_id=exp_id)
    yield Registry(tracking_uri=uri, root=root)
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


@pytest.fixture
def model_name(request: pytest.FixtureRequest) -> str:
    """A registered-model name derived from the test name, so tests never collide."""
    return safe_name(request.node.name)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    with running_broker(tmp_path / "broker") as b:
        yield b
