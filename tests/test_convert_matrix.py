"""Every estimator factories use, logged with MLflow, through every variant with the gate.

Each (estimator, variant) either writes a bundle that passed the parity gate, or is
skipped with the same reason `lineside convert --capabilities` prints. Nothing fails
and nothing is silently replaced.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
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
from sklearn.neighbors import LocalOutlierFactor
from sklearn.neural_network import MLPClassifier, MLPRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import MinMaxScaler, RobustScaler, StandardScaler
from sklearn.svm import SVC, SVR, OneClassSVM

from converter.capabilities import matrix
from converter.pipeline import convert
from converter.variants import VARIANTS
from tests.support.registry import Registry

FEATURES = [f"s{i}" for i in range(6)]


def _data(task: str) -> tuple[pd.DataFrame, np.ndarray | None]:
    rng = np.random.default_rng(5)
    X = pd.DataFrame(rng.normal(size=(400, 6)), columns=FEATURES)
    if task == "clf":
        return X, (X["s0"] + X["s1"] ** 2 > 1).astype(int).to_numpy()
    if task == "multi":
        return X, np.digitize(X["s0"] + X["s2"], [-0.7, 0.7])
    if task == "reg":
        return X, (2 * X["s0"] - X["s3"] + 0.1 * rng.normal(size=400)).to_numpy()
    return X, None


CASES: list[tuple[str, str, Any]] = [
    (
        "IsolationForest",
        "none",
        lambda: make_pipeline(StandardScaler(), IsolationForest(n_estimators=20, random_state=0)),
    ),
    ("OneClassSVM", "none", lambda: make_pipeline(StandardScaler(), OneClassSVM(nu=0.05))),
    (
        "LocalOutlierFactor",
        "none",
        lambda: make_pipeline(RobustScaler(), LocalOutlierFactor(novelty=True)),
    ),
    (
        "RandomForestClassifier",
        "clf",
        lambda: RandomForestClassifier(n_estimators=10, max_depth=6, random_state=0),
    ),
    (
        "RandomForestRegressor",
        "reg",
        lambda: RandomForestRegressor(n_estimators=10, max_depth=6, random_state=0),
    ),
    (
        "ExtraTreesClassifier",
        "clf",
        lambda: ExtraTreesClassifier(n_estimators=10, max_depth=6, random_state=0),
    ),
    (
        "ExtraTreesRegressor",
        "reg",
        lambda: ExtraTreesRegressor(n_estimators=10, max_depth=6, random_state=0),
    ),
    (
        "GradientBoostingClassifier",
        "clf",
        lambda: GradientBoostingClassifier(n_estimators=20, random_state=0),
    ),
    (
        "GradientBoostingRegressor",
        "reg",
        lambda: GradientBoostingRegressor(n_estimators=20, random_state=0),
    ),
    ("HistGradientBoostingClassifier", "clf", lambda: HistGradientBoostingClassifier(max_iter=20)),
    ("HistGradientBoostingRegressor", "reg", lambda: HistGradientBoostingRegressor(max_iter=20)),
    ("LogisticRegression", "multi", lambda: make_pipeline(MinMaxScaler(), LogisticRegression())),
    ("LinearRegression", "reg", lambda: make_pipeline(StandardScaler(), LinearRegression())),
    ("Ridge", "reg", lambda: make_pipeline(PCA(n_components=4), Ridge())),
    ("Lasso", "reg", lambda: Lasso(alpha=0.01)),
    ("ElasticNet", "reg", lambda: ElasticNet(alpha=0.01)),
    ("SVC", "clf", lambda: make_pipeline(StandardScaler(), SVC(probability=True, random_state=0))),
    ("SVR", "reg", lambda: make_pipeline(StandardScaler(), SVR())),
    (
        "MLPClassifier",
        "clf",
        lambda: make_pipeline(
            StandardScaler(),
            MLPClassifier(hidden_layer_sizes=(96, 96), max_iter=200, random_state=0),
        ),
    ),
    (
        "MLPRegressor",
        "reg",
        lambda: make_pipeline(
            StandardScaler(),
            MLPRegressor(hidden_layer_sizes=(96, 96), max_iter=200, random_state=0),
        ),
    ),
    (
        "KMeans",
        "none",
        lambda: make_pipeline(StandardScaler(), KMeans(4, n_init=3, random_state=0)),
    ),
]


# Models in CASES big enough that every supported variant must be written.
ALWAYS_SHRINK = {"MLPClassifier", "MLPRegressor"}


@pytest.fixture(scope="module")
def capabilities() -> dict[str, dict[str, str | None]]:
    return matrix()


@pytest.mark.parametrize(("estimator", "task", "factory"), CASES, ids=[c[0] for c in CASES])
def test_estimator_through_every_variant(
    registry: Registry,
    tmp_path: Path,
    capabilities: dict[str, dict[str, str | None]],
    estimator: str,
    task: str,
    factory: Any,
) -> None:
    X, y = _data(task)
    model = factory().fit(X, y) if y is not None else factory().fit(X)
    name = f"matrix-{estimator}"
    registry.log_sklearn(model, X, name="model", registered_name=name)
    # Calibration rows make int8 static (QDQ), which covers Gemm-based graphs (KMeans)
    # that dynamic quantization has no kernel for; they are also the parity rows.
    calibration = tmp_path / "calibration.csv"
    X.iloc[:300].to_csv(calibration, index=False)
    result = convert(
        f"models:/{name}/latest", tmp_path / "out", variants=VARIANTS, calibration_data=calibration
    )
    by_variant = {v.variant: v for v in result.variants}
    for variant in VARIANTS:
        outcome = by_variant[variant]
        expected_reason = capabilities[estimator][variant]
        assert outcome.status != "failed", f"{variant}: {outcome.reason}"
        if expected_reason is None and outcome.status == "skipped":
            # Supported, but this model is too small for fp16/int8 to shrink it: lineside
            # says so instead of shipping a bigger "compressed" file.
            assert variant.endswith(("fp16", "int8")) and "x the fp32" in (outcome.reason or "")
            assert estimator not in ALWAYS_SHRINK, f"{variant}: {outcome.reason}"
        elif expected_reason is None:
            assert outcome.status == "written", f"{variant}: {outcome.reason}"
            assert (tmp_path / "out" / variant / "MLmodel").is_file()
            assert outcome.parity is not None and outcome.parity.passed
        else:
            assert outcome.status == "skipped"
            assert outcome.reason
            assert not (tmp_path / "out" / variant).exists()
    assert result.ok
