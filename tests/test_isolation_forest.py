"""lineside's IsolationForest graph against scikit-learn and against skl2onnx's graph."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from skl2onnx import to_onnx
from sklearn.decomposition import PCA
from sklearn.ensemble import IsolationForest
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import MinMaxScaler, RobustScaler, StandardScaler

from converter.errors import UnsupportedModelError
from converter.isolation_forest import average_path_length, isolation_forest_to_onnx
from converter.onnx_build import sklearn_to_onnx
from converter.reference import reference_outputs
from edge_agent.runtime import load_session

N_FEATURES = 8


def rows(n: int, seed: int, outliers: float = 0.05) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, N_FEATURES)) * np.linspace(0.5, 3.0, N_FEATURES)
    spread = rng.random(n) < outliers
    x[spread] *= 4.0
    return x.astype(np.float32).astype(np.float64)


def run(onx: onnx.ModelProto, tmp_path: Path, x: np.ndarray, name: str = "m") -> dict[str, Any]:
    path = tmp_path / f"{name}.onnx"
    onnx.save_model(onx, path)
    return load_session(path).run(x.astype(np.float32))


def skl2onnx_graph(model: Any) -> onnx.ModelProto:
    sample = rows(1, 0).astype(np.float32)
    # The field notes: ai.onnx.ml 4 (skl2onnx's default) fails for IsolationForest.
    return to_onnx(model, sample, target_opset={"": 21, "ai.onnx.ml": 3})


FORESTS = {
    "default": lambda: IsolationForest(n_estimators=20, random_state=0),
    "contamination": lambda: IsolationForest(n_estimators=20, contamination=0.1, random_state=0),
    "small-max-samples": lambda: IsolationForest(n_estimators=20, max_samples=32, random_state=0),
    "feature-subsets": lambda: IsolationForest(n_estimators=20, max_features=0.5, random_state=0),
    "bootstrap": lambda: IsolationForest(n_estimators=15, bootstrap=True, random_state=0),
}


@pytest.mark.parametrize("name", list(FORESTS))
def test_matches_sklearn_at_least_as_closely_as_skl2onnx(name: str, tmp_path: Path) -> None:
    model = FORESTS[name]().fit(rows(600, seed=1))
    x = rows(3000, seed=2)
    expected = reference_outputs(model, x)
    ours = run(isolation_forest_to_onnx(model, N_FEATURES), tmp_path, x)
    assert list(ours) == ["label", "score"]
    assert ours["label"].dtype == np.int64 and ours["score"].dtype == np.float32
    our_error = np.abs(ours["score"] - expected["score"]).max()
    assert np.array_equal(ours["label"], expected["label"])
    assert our_error < 1e-6
    if name == "feature-subsets":
        # skl2onnx refuses max_features < 1.0 outright ("does not support the case when
        # _max_features=4 != number of given features 8"); lineside remaps the subsets.
        with pytest.raises(RuntimeError, match="_max_features"):
            skl2onnx_graph(model)
        return
    theirs = run(skl2onnx_graph(model), tmp_path, x, "skl2onnx")
    their_error = np.abs(theirs["scores"].ravel() - expected["score"]).max()
    their_agreement = np.mean(theirs["label"].ravel() == expected["label"])
    assert our_error <= max(their_error, 1e-7)
    assert np.mean(ours["label"] == expected["label"]) >= their_agreement


def test_graph_is_a_handful_of_nodes_whatever_the_tree_count() -> None:
    x = rows(400, seed=3)
    small = isolation_forest_to_onnx(IsolationForest(n_estimators=3, random_state=0).fit(x), 8)
    large = isolation_forest_to_onnx(IsolationForest(n_estimators=20, random_state=0).fit(x), 8)
    reference = skl2onnx_graph(IsolationForest(n_estimators=20, random_state=0).fit(x))
    assert len(small.graph.node) == len(large.graph.node) <= 10
    ensembles = [n for n in large.graph.node if n.op_type == "TreeEnsembleRegressor"]
    assert len(ensembles) == 1 and ensembles[0].domain == "ai.onnx.ml"
    assert len(reference.graph.node) > 20 * len(large.graph.node)


@pytest.mark.parametrize(
    "scalers",
    [
        [StandardScaler()],
        [MinMaxScaler()],
        [RobustScaler()],
        [StandardScaler(), PCA(n_components=5)],
    ],
    ids=["standard", "minmax", "robust", "standard+pca"],
)
def test_works_behind_preprocessing(scalers: list[Any], tmp_path: Path) -> None:
    model = make_pipeline(*scalers, IsolationForest(n_estimators=20, random_state=0))
    model.fit(rows(600, seed=4))
    x = rows(3000, seed=5)
    expected = reference_outputs(model, x)
    got = run(sklearn_to_onnx(model, N_FEATURES), tmp_path, x)
    # The scaler runs in float32 in the graph and float64 in sklearn: a row sitting on a
    # threshold can go the other way, hence agreement rather than equality.
    assert np.mean(got["label"] == expected["label"]) >= 0.999
    close = np.isclose(got["score"], expected["score"], atol=1e-4)
    assert np.mean(close) >= 0.999


def near_threshold_rows(model: IsolationForest, seed: int) -> np.ndarray:
    """Rows whose split feature equals float32(threshold) where that rounds *up*.

    sklearn compares float32(x) <= float64 threshold: such a row goes right. A graph that
    stores thresholds rounded to nearest float32 sends it left.
    """
    rng = np.random.default_rng(seed)
    found = []
    for estimator, features in zip(model.estimators_, model.estimators_features_, strict=True):
        tree = estimator.tree_
        for node in np.flatnonzero(tree.children_left != -1):
            rounded = np.float32(tree.threshold[node])
            if float(rounded) > tree.threshold[node]:
                row = rng.normal(size=N_FEATURES).astype(np.float32)
                row[features[tree.feature[node]]] = rounded
                found.append(row)
    return np.array(found).astype(np.float64)


def test_threshold_rounding_keeps_near_threshold_rows_exact(tmp_path: Path) -> None:
    model = IsolationForest(n_estimators=20, random_state=0).fit(rows(600, seed=6))
    x = near_threshold_rows(model, seed=7)
    assert len(x) > 300
    expected = reference_outputs(model, x)
    errors = {}
    for mode in ("float64", "float32", "float32-nearest"):
        got = run(isolation_forest_to_onnx(model, N_FEATURES, thresholds=mode), tmp_path, x, mode)
        errors[mode] = np.abs(got["score"] - expected["score"]).max()
        if mode != "float32-nearest":
            assert np.array_equal(got["label"], expected["label"]), mode
    # Doubles are exact up to the final float32 cast; float32 weights sum to ~1e-7.
    assert errors["float64"] < 1e-7 and errors["float32"] < 1e-6
    # Round-to-nearest sends these rows down the wrong branch: whole path lengths change.
    assert errors["float32-nearest"] > 1e-4


def test_nan_follows_sklearn_missing_value_routing(tmp_path: Path) -> None:
    model = IsolationForest(n_estimators=20, random_state=0).fit(rows(600, seed=8))
    x = rows(500, seed=9)
    x[::3, 2] = np.nan
    x[::5, 0] = np.nan
    expected = reference_outputs(model, x)
    got = run(isolation_forest_to_onnx(model, N_FEATURES), tmp_path, x)
    assert np.array_equal(got["label"], expected["label"])
    np.testing.assert_allclose(got["score"], expected["score"], atol=1e-6)


def test_average_path_length_matches_sklearn() -> None:
    from sklearn.ensemble._iforest import _average_path_length

    n = np.array([0, 1, 2, 3, 10, 256, 10_000])
    np.testing.assert_allclose(average_path_length(n), _average_path_length(n))


def test_refuses_other_final_estimators() -> None:
    model = make_pipeline(StandardScaler(), PCA(n_components=2)).fit(rows(50, seed=10))
    with pytest.raises(UnsupportedModelError, match="IsolationForest"):
        isolation_forest_to_onnx(model, N_FEATURES)
    with pytest.raises(UnsupportedModelError, match="not fitted"):
        isolation_forest_to_onnx(IsolationForest(), N_FEATURES)
