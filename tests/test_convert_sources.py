"""Every MLflow URI form resolves to the right version and converts (real sqlite registry)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from converter.errors import ModelNotFoundError
from converter.pipeline import convert
from tests.support.registry import Registry

NAME = "uri-forms"


def _data(seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = pd.DataFrame(rng.normal(size=(200, 4)), columns=["vibration", "temp", "current", "cycle"])
    y = (X["vibration"] + 0.5 * X["temp"] > 0).astype(int).to_numpy()
    return X, y


@pytest.fixture(scope="module")
def versions(registry: Registry) -> dict[str, Any]:
    """v1 saved with skops (MLflow's default), v2 with cloudpickle.

    v2 holds @production; v1 is in the legacy Production stage.
    """
    X, y = _data(1)
    m1 = make_pipeline(StandardScaler(), LogisticRegression()).fit(X, y)
    info1 = registry.log_sklearn(m1, X, name="model", registered_name=NAME)
    X2, y2 = _data(2)
    m2 = make_pipeline(StandardScaler(), LogisticRegression(C=0.1)).fit(X2, y2)
    info2 = registry.log_sklearn(
        m2, X2, name="model", registered_name=NAME, serialization_format="cloudpickle"
    )
    registry.set_alias(NAME, "production", 2)
    registry.transition(NAME, 1, "Production")
    return {"v1": info1, "v2": info2}


@pytest.mark.parametrize(
    ("uri", "version", "selector"),
    [
        (f"models:/{NAME}@production", "2", "@production"),
        (f"models:/{NAME}/Production", "1", "stage:Production"),
        (f"models:/{NAME}/production", "1", "stage:Production"),
        (f"models:/{NAME}/1", "1", None),
        (f"models:/{NAME}/latest", "2", None),
    ],
)
def test_registry_uri_forms_resolve_to_the_right_version(
    versions: dict[str, Any], tmp_path: Path, uri: str, version: str, selector: str | None
) -> None:
    result = convert(uri, tmp_path, variants=["onnx-fp32"])
    assert result.ok
    assert result.source.registered_name == NAME
    assert result.source.version == version
    assert result.source.selector == selector
    meta = _metadata(tmp_path / "onnx-fp32")
    assert meta["source"]["version"] == version
    assert meta["source"]["run_id"] == result.source.run_id


def test_run_logged_model_and_local_directory_forms(
    versions: dict[str, Any], tmp_path: Path, registry: Registry
) -> None:
    info = versions["v1"]
    run_uri = f"runs:/{info.run_id}/model"
    logged_uri = f"models:/{info.model_id}"
    for i, uri in enumerate([run_uri, logged_uri]):
        result = convert(uri, tmp_path / str(i), variants=["onnx-fp32"])
        assert result.ok, result.as_dict()
        assert result.source.run_id == info.run_id
    import mlflow.artifacts

    local = mlflow.artifacts.download_artifacts(run_uri, dst_path=str(tmp_path / "local"))
    result = convert(local, tmp_path / "2", variants=["onnx-fp32"])
    assert result.ok
    assert result.source.registered_name is None


def test_two_versions_in_production_picks_the_highest_and_says_so(
    versions: dict[str, Any], registry: Registry, tmp_path: Path
) -> None:
    registry.transition(NAME, 2, "Production")
    try:
        result = convert(f"models:/{NAME}/Production", tmp_path, variants=["onnx-fp32"])
    finally:
        registry.transition(NAME, 2, "None")
    assert result.source.version == "2"
    assert result.source.note is not None and "chose the highest, 2" in result.source.note


def test_skops_and_cloudpickle_models_both_load_and_agree_with_sklearn(
    versions: dict[str, Any], tmp_path: Path
) -> None:
    for version in ("1", "2"):
        result = convert(f"models:/{NAME}/{version}", tmp_path / version, variants=["onnx-fp32"])
        report = result.variants[0].parity
        assert report is not None and report.label_agreement_validation == 1.0
        assert max(report.max_abs_error.values()) < 1e-5


@pytest.mark.parametrize(
    ("uri", "needle"),
    [
        (f"models:/{NAME}@no-such-alias", "no-such-alias"),
        ("models:/no-such-model/1", "no-such-model"),
        (f"models:/{NAME}/99", "99"),
        (f"models:/{NAME}/Staging", "no version"),
        (f"models:/{NAME}/bogus", "neither a version number"),
        ("runs:/0123456789abcdef/model", "0123456789abcdef"),
        ("/no/such/dir", "not a model URI"),
    ],
)
def test_unknown_models_raise_model_not_found(
    versions: dict[str, Any], tmp_path: Path, uri: str, needle: str
) -> None:
    with pytest.raises(ModelNotFoundError, match=needle):
        convert(uri, tmp_path, variants=["onnx-fp32"])
    assert not (tmp_path / "onnx-fp32").exists()


def _metadata(bundle: Path) -> dict[str, Any]:
    from mlflow.models import Model

    meta = Model.load(str(bundle)).metadata["lineside"]
    json.dumps(meta)  # must be plain JSON
    return dict(meta)
