"""sklearn_to_onnx: every covered estimator, behind every scaler, run as the device runs it.

Each case fits on small synthetic data, converts, saves, loads with
``edge_agent.runtime.load_session`` and compares with ``converter.reference`` on held-out
rows. Rows are float32-representable, as sensor values reaching the device are, so the
comparison measures the graph, not the float64 -> float32 rounding of the inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.ensemble import (
    ExtraTreesClassifier,
    ExtraTreesRegressor,
    GradientBoostingClassifier,
    GradientBoostingRegressor,
    HistGradientBoostingClassifier,
    HistGradientBoostingRegressor,
    IsolationForest,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.linear_model import ElasticNet, Lasso, LinearRegression, LogisticRegression, Ridge
from sklearn.neighbors import KNeighborsClassifier, LocalOutlierFactor
from sklearn.neural_network import MLPClassifier, MLPRegressor
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import MinMaxScaler, RobustScaler, StandardScaler
from sklearn.svm import SVC, SVR, OneClassSVM

from converter.errors import InputSpecError, ModelLoadError, UnsupportedModelError
from converter.onnx_build import (
    ONNX_VARIANTS,
    SUPPORTED_ESTIMATORS,
    onnx_source_model,
    sklearn_to_onnx,
    unsupported_reason,
)
from converter.reference import output_specs, reference_outputs, task_of
from edge_agent.runtime import load_session

N_FEATURES = 6
SCALERS: list[Callable[[], Any]] = [
    StandardScaler,
    MinMaxScaler,
    RobustScaler,
    lambda: PCA(n_components=4, random_state=0),
]

ESTIMATORS: dict[str, Callable[[], Any]] = {
    "IsolationForest": lambda: IsolationForest(n_estimators=20, random_state=0),
    "OneClassSVM": lambda: OneClassSVM(nu=0.1),
    "LocalOutlierFactor": lambda: LocalOutlierFactor(novelty=True, n_neighbors=10),
    "RandomForestClassifier": lambda: RandomForestClassifier(n_estimators=10, random_state=0),
    "ExtraTreesClassifier": lambda: ExtraTreesClassifier(n_estimators=10, random_state=0),
    "GradientBoostingClassifier": lambda: GradientBoostingClassifier(
        n_estimators=10, random_state=0
    ),
    "HistGradientBoostingClassifier": lambda: HistGradientBoostingClassifier(
        max_iter=10, random_state=0
    ),
    "LogisticRegression": LogisticRegression,
    "SVC": lambda: SVC(random_state=0),
    "SVC-probability": lambda: SVC(probability=True, random_state=0),
    "MLPClassifier": lambda: MLPClassifier(hidden_layer_sizes=(16,), max_iter=300, random_state=0),
    "RandomForestRegressor": lambda: RandomForestRegressor(n_estimators=10, random_state=0),
    "ExtraTreesRegressor": lambda: ExtraTreesRegressor(n_estimators=10, random_state=0),
    "GradientBoostingRegressor": lambda: GradientBoostingRegressor(n_estimators=10, random_state=0),
    "HistGradientBoostingRegressor": lambda: HistGradientBoostingRegressor(
        max_iter=10, random_state=0
    ),
    "LinearRegression": LinearRegression,
    "Ridge": Ridge,
    "Lasso": lambda: Lasso(alpha=0.01),
    "ElasticNet": lambda: ElasticNet(alpha=0.01),
    "SVR": SVR,
    "MLPRegressor": lambda: MLPRegressor(hidden_layer_sizes=(16,), max_iter=300, random_state=0),
    "KMeans": lambda: KMeans(n_clusters=4, n_init=2, random_state=0),
}


def rows(n: int, seed: int) -> np.ndarray:
    """float32-representable rows with some scale and offset differences per feature."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, N_FEATURES)) * np.arange(1, N_FEATURES + 1) + np.arange(N_FEATURES)
    return x.astype(np.float32).astype(np.float64)


def targets(task: str, x: np.ndarray, n_classes: int) -> np.ndarray | None:
    score = x[:, 0] / 1.0 - x[:, 1] / 2.0 + np.sin(x[:, 2])
    if task == "regressor":
        return score + 0.1 * x[:, 3]
    if task != "classifier":
        return None
    if n_classes == 2:
        return np.where(score > np.median(score), "ok", "scrap")
    # String classes on purpose: ``label`` must be the index into classes_, not the class.
    return np.array(["a", "b", "c"])[np.digitize(score, np.quantile(score, [1 / 3, 2 / 3]))]


def fit(factory: Callable[[], Any], scaler: Callable[[], Any], n_classes: int = 3) -> Any:
    model = make_pipeline(scaler(), factory())
    x = rows(400, seed=1)
    model.fit(x, targets(task_of(model), x, n_classes))
    return model


def run_saved(onx: onnx.ModelProto, tmp_path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    path = tmp_path / "model.onnx"
    onnx.save_model(onx, path)
    return load_session(path).run(x.astype(np.float32))


def assert_parity(model: Any, got: dict[str, np.ndarray], x: np.ndarray, atol: float) -> None:
    expected = reference_outputs(model, x)
    specs = output_specs(model)
    assert list(got) == [spec.name for spec in specs]
    for spec in specs:
        value = got[spec.name]
        assert value.dtype == np.dtype(spec.dtype), spec.name
        assert value.shape[1:] == spec.shape[1:] and value.shape[0] == len(x), spec.name
        if spec.name == "label":
            assert np.mean(value == expected["label"]) >= 0.999
        else:
            # Per row: a tree row flipping at a threshold moves its probability a lot, which
            # is what the label-agreement bound already allows for 0.1% of the rows.
            close = np.isclose(value, expected[spec.name], atol=atol, rtol=1e-3)
            close_rows = close.reshape(len(x), -1).all(axis=1)
            assert np.mean(close_rows) >= 0.999, (
                spec.name,
                np.abs(value - expected[spec.name]).max(),
            )


SCALER_IDS = ["standard", "minmax", "robust", "pca"]
CASES = [
    pytest.param(name, scaler, id=f"{name}-{scaler_id}")
    for name in ESTIMATORS
    for scaler, scaler_id in zip(SCALERS, SCALER_IDS, strict=True)
]


@pytest.mark.parametrize(("name", "scaler"), CASES)
def test_estimator_converts_to_the_canonical_graph(
    name: str, scaler: Callable[[], Any], tmp_path: Path
) -> None:
    model = fit(ESTIMATORS[name], scaler)
    onx = sklearn_to_onnx(model, N_FEATURES)
    assert_contract_header(onx)
    x = rows(2000, seed=2)
    # SVMs: onnxruntime computes the kernels in float32 (onnxruntime#4130, sklearn-onnx#1192).
    atol = 1e-3 if "SV" in name else 1e-4
    assert_parity(model, run_saved(onx, tmp_path, x), x, atol)


@pytest.mark.parametrize(
    "name",
    [
        "RandomForestClassifier",
        "HistGradientBoostingClassifier",
        "LogisticRegression",
        "SVC",
        "SVC-probability",
        "MLPClassifier",
        "GradientBoostingClassifier",
    ],
)
def test_binary_classifiers_keep_the_contract_shapes(name: str, tmp_path: Path) -> None:
    model = fit(ESTIMATORS[name], StandardScaler, n_classes=2)
    x = rows(1000, seed=3)
    got = run_saved(sklearn_to_onnx(model, N_FEATURES), tmp_path, x)
    # SVC without probabilities: scores is [N] (sklearn's decision_function), not [N, 2].
    assert_parity(model, got, x, atol=1e-3 if name.startswith("SVC") else 1e-4)


def test_every_scaler_works_in_front_of_an_estimator(tmp_path: Path) -> None:
    x = rows(500, seed=4)
    for scaler in SCALERS:
        model = fit(ESTIMATORS["LogisticRegression"], scaler)
        assert_parity(model, run_saved(sklearn_to_onnx(model, N_FEATURES), tmp_path, x), x, 1e-4)


def test_nested_pipelines_and_bare_estimators_convert(tmp_path: Path) -> None:
    x = rows(400, seed=5)
    y = targets("regressor", x, 0)
    nested = Pipeline(
        [("pre", make_pipeline(StandardScaler(), PCA(n_components=5))), ("reg", Ridge())]
    ).fit(x, y)
    bare = KMeans(n_clusters=3, n_init=2, random_state=0).fit(x)
    for model in (nested, bare):
        assert_parity(model, run_saved(sklearn_to_onnx(model, N_FEATURES), tmp_path, x), x, 1e-3)


def test_opset_imports_are_deduplicated() -> None:
    model = fit(ESTIMATORS["RandomForestClassifier"], StandardScaler)
    raw = to_onnx(
        model,
        rows(1, 0).astype(np.float32),
        target_opset={"": 21, "ai.onnx.ml": 3},
        options={id(model[-1]): {"zipmap": False}},
    )
    # skl2onnx itself lists the default domain twice for this model: the bug we fix.
    assert len(raw.opset_import) > len({o.domain for o in raw.opset_import})
    assert_contract_header(sklearn_to_onnx(model, N_FEATURES))


def assert_contract_header(onx: onnx.ModelProto) -> None:
    domains = [o.domain for o in onx.opset_import]
    assert len(domains) == len(set(domains))
    versions = {o.domain: o.version for o in onx.opset_import}
    assert 17 <= versions[""] <= 21 and versions["ai.onnx.ml"] == 3
    (graph_input,) = onx.graph.input
    assert graph_input.name == "X"
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = graph_input.type.tensor_type.shape.dim
    assert len(dims) == 2 and dims[1].dim_value == N_FEATURES and not dims[0].HasField("dim_value")


def test_unsupported_estimators_and_wrong_widths_are_refused() -> None:
    x = rows(100, seed=6)
    knn = make_pipeline(StandardScaler(), KNeighborsClassifier()).fit(
        x, targets("classifier", x, 3)
    )
    with pytest.raises(UnsupportedModelError, match="KNeighborsClassifier"):
        sklearn_to_onnx(knn, N_FEATURES)
    model = fit(ESTIMATORS["Ridge"], StandardScaler)
    with pytest.raises(InputSpecError, match="6 features"):
        sklearn_to_onnx(model, N_FEATURES + 1)


def test_onnx_source_model_renames_the_input_and_checks_it(tmp_path: Path) -> None:
    model = fit(ESTIMATORS["Ridge"], StandardScaler)
    foreign = to_onnx(
        model, initial_types=[("float_input", FloatTensorType([None, N_FEATURES]))], target_opset=17
    )
    assert foreign.graph.input[0].name != "X"
    passed = onnx_source_model(foreign)
    assert [i.name for i in passed.graph.input] == ["X"]
    x = rows(200, seed=7)
    got = run_saved(passed, tmp_path, x)["variable"].ravel()
    np.testing.assert_allclose(got, model.predict(x), atol=1e-4, rtol=1e-4)

    double = to_onnx(model, rows(1, 0), target_opset=17)  # float64 input
    with pytest.raises(UnsupportedModelError, match="float32"):
        onnx_source_model(double)

    two_inputs = onnx.ModelProto()
    two_inputs.CopyFrom(foreign)
    two_inputs.graph.input.append(onnx.helper.make_tensor_value_info("Y", 1, [None, 2]))
    with pytest.raises(UnsupportedModelError, match="one input"):
        onnx_source_model(two_inputs)

    with pytest.raises(ModelLoadError):
        onnx_source_model(onnx.ModelProto())


def test_onnx_source_model_refuses_external_data(tmp_path: Path) -> None:
    weights = onnx.numpy_helper.from_array(np.eye(N_FEATURES, dtype=np.float32), "W")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["X", "W"], ["Y"])],
        "external",
        [onnx.helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, [None, N_FEATURES])],
        [onnx.helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [None, N_FEATURES])],
        [weights],
    )
    path = tmp_path / "external.onnx"
    onnx.save_model(
        onnx.helper.make_model(graph), path, save_as_external_data=True, size_threshold=0
    )
    with pytest.raises(UnsupportedModelError, match="external data"):
        onnx_source_model(onnx.load_model(path, load_external_data=False))


def test_unsupported_reason_covers_every_estimator_and_variant() -> None:
    for name in SUPPORTED_ESTIMATORS:
        assert unsupported_reason(name, "onnx-fp32") is None
        for variant in ONNX_VARIANTS:
            reason = unsupported_reason(name, variant)
            assert reason is None or reason.startswith(variant.removeprefix("onnx-") + ":")
    assert unsupported_reason("RandomForestClassifier", "onnx-int8") is not None
    assert "TreeEnsemble" in str(unsupported_reason("IsolationForest", "onnx-fp16"))
    assert unsupported_reason("MLPClassifier", "onnx-int8") is None
    assert "coverage" in str(unsupported_reason("KNeighborsClassifier", "onnx-fp32"))
    assert "not an ONNX variant" in str(unsupported_reason("SVC", "tflite-fp32"))
    for step in ("StandardScaler", "MinMaxScaler", "RobustScaler", "PCA"):
        assert all(unsupported_reason(step, variant) is None for variant in ONNX_VARIANTS)
