"""TFLite variants: real TF converter, real LiteRT interpreter, parity with scikit-learn.

Every supported estimator/pipeline is converted to tflite-fp32/fp16/int8, run through
``edge_agent.runtime.load_session`` (what the parity gate and the device use) on held-out
rows drawn like the training rows, and compared with ``converter.reference``.
Models are fitted once per module; a conversion takes ~0.1 s, TF's import a few seconds.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np
import pytest

# find_spec, not importorskip: the builder imports TensorFlow itself (and hushes it).
if find_spec("tensorflow") is None or find_spec("ai_edge_litert") is None:
    pytest.skip("needs tensorflow and ai-edge-litert", allow_module_level=True)

from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs, make_classification, make_regression
from sklearn.decomposition import PCA
from sklearn.ensemble import IsolationForest, RandomForestClassifier
from sklearn.linear_model import ElasticNet, Lasso, LinearRegression, LogisticRegression, Ridge
from sklearn.naive_bayes import GaussianNB
from sklearn.neighbors import LocalOutlierFactor
from sklearn.neural_network import MLPClassifier, MLPRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import MinMaxScaler, RobustScaler, StandardScaler
from sklearn.svm import SVC

import converter.tflite_build as tflite_build
from converter.errors import (
    CalibrationDataError,
    InputSpecError,
    UnsupportedModelError,
    VariantNotApplicable,
)
from converter.reference import reference_outputs
from converter.tflite_build import (
    TFLITE_VARIANTS,
    build_sklearn,
    keras_to_tflite,
    sklearn_to_tflite,
    unsupported_reason,
)
from edge_agent.runtime import load_session

pytestmark = pytest.mark.tflite

N_FEATURES = 8
N_TRAIN = 1500
N_HELD_OUT = 2000
N_REPRESENTATIVE = 500


@dataclass
class Case:
    model: Any
    train: np.ndarray
    held_out: np.ndarray


def _split(rows: np.ndarray, y: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, Any]:
    return rows[:N_TRAIN], rows[N_TRAIN:], None if y is None else y[:N_TRAIN]


def _classification(n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray, Any]:
    X, y = make_classification(
        N_TRAIN + N_HELD_OUT,
        n_features=N_FEATURES,
        n_informative=5,
        n_redundant=1,
        n_classes=n_classes,
        random_state=seed,
    )
    return _split(X, y)


def _regression(n_targets: int, seed: int) -> tuple[np.ndarray, np.ndarray, Any]:
    X, y = make_regression(
        N_TRAIN + N_HELD_OUT,
        n_features=N_FEATURES,
        n_informative=6,
        n_targets=n_targets,
        noise=5.0,
        random_state=seed,
    )
    return _split(X, y)


def _fit(pipeline: Any, data: tuple[np.ndarray, np.ndarray, Any]) -> Case:
    train, held_out, y = data
    model = pipeline.fit(train) if y is None else pipeline.fit(train, y)
    return Case(model, train, held_out)


MLP = {"max_iter": 400, "random_state": 0}
BUILDERS: dict[str, Callable[[], Case]] = {
    "logreg-binary": lambda: _fit(
        make_pipeline(StandardScaler(), LogisticRegression()), _classification(2, 1)
    ),
    "logreg-multiclass-robust-pca": lambda: _fit(
        make_pipeline(RobustScaler(), PCA(6, whiten=True), LogisticRegression()),
        _classification(3, 2),
    ),
    "linear-minmax-clip": lambda: _fit(
        make_pipeline(MinMaxScaler(clip=True), LinearRegression()), _regression(1, 3)
    ),
    "ridge-two-targets": lambda: _fit(Ridge(alpha=0.5), _regression(2, 4)),
    "lasso": lambda: _fit(make_pipeline(StandardScaler(), Lasso(alpha=0.1)), _regression(1, 5)),
    "elasticnet-pca": lambda: _fit(
        make_pipeline(StandardScaler(), PCA(7), ElasticNet(alpha=0.05)), _regression(1, 6)
    ),
    "mlp-classifier-relu": lambda: _fit(
        make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(32, 16), **MLP)),
        _classification(3, 7),
    ),
    "mlp-classifier-tanh-binary": lambda: _fit(
        make_pipeline(
            StandardScaler(), MLPClassifier(hidden_layer_sizes=(16,), activation="tanh", **MLP)
        ),
        _classification(2, 8),
    ),
    "mlp-regressor-logistic": lambda: _fit(
        make_pipeline(
            StandardScaler(), MLPRegressor(hidden_layer_sizes=(16,), activation="logistic", **MLP)
        ),
        _regression(1, 9),
    ),
    "mlp-regressor-identity-two-targets": lambda: _fit(
        make_pipeline(
            StandardScaler(), MLPRegressor(hidden_layer_sizes=(16,), activation="identity", **MLP)
        ),
        _regression(2, 10),
    ),
    # Gaussian blobs, where a linear model is the right model (held-out accuracy 0.97).
    "logreg-scaler-options": lambda: _fit(
        make_pipeline(
            StandardScaler(with_mean=False),
            RobustScaler(with_centering=False),
            PCA(5),
            LogisticRegression(),
        ),
        _split(
            *make_blobs(
                N_TRAIN + N_HELD_OUT, N_FEATURES, centers=4, cluster_std=4.0, random_state=12
            )
        ),
    ),
    "kmeans-bare": lambda: _fit(
        KMeans(3, n_init=3, random_state=0),
        _split(make_blobs(N_TRAIN + N_HELD_OUT, N_FEATURES, centers=3, random_state=13)[0], None),
    ),
    "kmeans": lambda: _fit(
        make_pipeline(StandardScaler(), KMeans(4, n_init=3, random_state=0)),
        _split(make_blobs(N_TRAIN + N_HELD_OUT, N_FEATURES, centers=4, random_state=11)[0], None),
    ),
}


@pytest.fixture(scope="module")
def cases() -> dict[str, Case]:
    return {name: build() for name, build in BUILDERS.items()}


@pytest.fixture
def any_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """Build fp16/int8 even where they do not shrink (most models here are tiny), so that
    their numerics stay tested; the size rule has its own tests."""
    monkeypatch.setattr(tflite_build, "FP16_SIZE_LIMIT", float("inf"))
    monkeypatch.setattr(tflite_build, "INT8_SIZE_LIMIT", float("inf"))


def _run(data: bytes, rows: np.ndarray, tmp_path: Path) -> dict[str, np.ndarray]:
    path = tmp_path / "model.tflite"
    path.write_bytes(data)
    session = load_session(path)
    assert session.input_name == "X"
    assert session.n_features == rows.shape[1]
    return session.run(rows.astype(np.float32))


# Per variant: minimum label agreement, and the largest error allowed on float outputs as
# a fraction of the reference's spread (max |ref|): on the worst row, the 99th percentile
# row and on average. int8 saturates on rows beyond the calibrated range, so its worst row
# is bounded loosely and its 99th percentile tightly.
TOLERANCES = {
    "tflite-fp32": {"labels": 0.999, "max": 1e-5, "p99": 1e-5, "mean": 1e-6},
    "tflite-fp16": {"labels": 0.99, "max": 1e-2, "p99": 5e-3, "mean": 1e-3},
    "tflite-int8": {"labels": 0.99, "max": 0.5, "p99": 0.1, "mean": 0.02},
}


def parity(out: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> dict[str, float]:
    """Label agreement and relative errors of the float outputs (also used by the report)."""
    figures: dict[str, float] = {}
    for name, expected in ref.items():
        got = out[name]
        assert got.shape == expected.shape, name
        if name == "label":
            assert got.dtype == np.int64
            figures["labels"] = float(np.mean(got == expected))
        else:
            assert got.dtype == np.float32
            spread = float(np.max(np.abs(expected)))
            error = np.abs(got.astype(np.float64) - expected) / spread
            figures[f"{name}.max"] = float(error.max())
            figures[f"{name}.p99"] = float(np.quantile(error, 0.99))
            figures[f"{name}.mean"] = float(error.mean())
    return figures


@pytest.mark.parametrize("variant", TFLITE_VARIANTS)
@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.usefixtures("any_size")
def test_variant_matches_scikit_learn(
    cases: dict[str, Case], name: str, variant: str, tmp_path: Path
) -> None:
    case = cases[name]
    representative = case.train[:N_REPRESENTATIVE].astype(np.float32)
    data = sklearn_to_tflite(case.model, N_FEATURES, variant, representative)
    ref = reference_outputs(case.model, case.held_out)
    out = _run(data, case.held_out, tmp_path)
    assert sorted(out) == sorted(ref)
    figures = parity(out, ref)
    limits = TOLERANCES[variant]
    if "labels" in figures:
        assert figures["labels"] >= limits["labels"], figures
    for key, value in figures.items():
        if key != "labels":
            assert value <= limits[key.rsplit(".", 1)[1]], (key, figures)


class _OneVsRestLogisticRegression(LogisticRegression):  # type: ignore[misc]
    """What multi_class="ovr" (or liblinear) computed before scikit-learn 1.8."""

    def predict_proba(self, X: Any) -> Any:  # X: scikit-learn's name
        return self._predict_proba_lr(X)


# The real class name, as a model pickled by an older scikit-learn would carry.
_OneVsRestLogisticRegression.__name__ = "LogisticRegression"


def test_one_vs_rest_logistic_regression(tmp_path: Path) -> None:
    X, y = make_blobs(2000, N_FEATURES, centers=3, cluster_std=3.0, random_state=5)
    model = _OneVsRestLogisticRegression().fit(X[:1000], y[:1000])
    out = _run(sklearn_to_tflite(model, N_FEATURES, "tflite-fp32", X), X[1000:], tmp_path)
    figures = parity(out, reference_outputs(model, X[1000:]))
    assert figures["labels"] >= 0.999
    assert figures["probabilities.max"] <= 1e-5


def test_one_session_runs_any_batch_size(cases: dict[str, Case], tmp_path: Path) -> None:
    case = cases["mlp-classifier-relu"]
    data = sklearn_to_tflite(case.model, N_FEATURES, "tflite-fp32", case.train[:10])
    path = tmp_path / "model.tflite"
    path.write_bytes(data)
    session = load_session(path)
    for n in (1, 7, 1000, 3):
        rows = case.held_out[:n]
        out = session.run(rows.astype(np.float32))
        assert np.array_equal(out["label"], reference_outputs(case.model, rows)["label"])


def _mlp_sizes(hidden: tuple[int, ...], n_features: int) -> dict[str, Any]:
    X, y = make_classification(600, n_features=n_features, n_informative=6, random_state=0)
    # Size depends on the weights, not on convergence: a few iterations are enough.
    model = MLPClassifier(hidden_layer_sizes=hidden, max_iter=5, random_state=0).fit(X, y)
    n_weights = sum(w.size for w in model.coefs_)
    rep = X[:200].astype(np.float32)
    built = {v: build_sklearn(model, n_features, v, rep) for v in TFLITE_VARIANTS}
    size = {v: len(b.data) for v, b in built.items()}
    return {
        "weights": n_weights,
        "fp16": size["tflite-fp16"] / size["tflite-fp32"],
        "int8": size["tflite-int8"] / size["tflite-fp32"],
        "int8_settings": built["tflite-int8"].settings,
    }


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_quantized_variants_shrink_an_mlp() -> None:
    wide = _mlp_sizes((256, 256, 256), 64)
    assert wide["weights"] >= 10_000
    assert wide["int8"] <= 0.27, wide  # measured 0.258
    assert 0.45 <= wide["fp16"] <= 0.55, wide
    # ~10k weights: one scale per weight tensor (per-channel stored a float32 scale and an
    # int64 zero point per output channel, twice, and left this at 0.43x). What remains
    # above 0.25x is the int32 biases and ~50 bytes of quantization parameters per tensor,
    # against an fp32 file that is compacted the same way. Measured 0.311 (plain int8 here;
    # the 0.30 is reached at ~10k weights in 16x8: test_int8_size_at_10k_weights).
    narrow = _mlp_sizes((128, 64), 12)
    assert narrow["weights"] >= 9_000
    assert narrow["int8"] <= 0.33, narrow
    assert narrow["fp16"] <= 0.56, narrow
    settings = narrow["int8_settings"]
    assert settings["per_channel"] is False
    assert settings["size_ratio"] == pytest.approx(narrow["int8"], abs=1e-3)


# --- int8 on features of different scales (the benchmark's data) ------------------------


def _mixed_scales(n_features: int, n: int, seed: int) -> np.ndarray:
    """Feature stds 0.5..5 and means -3..3, as benchmarks/bench_converter.py draws them."""
    rng = np.random.default_rng(seed)
    scale = np.linspace(0.5, 5.0, n_features)
    x = rng.normal(size=(n, n_features)) * scale + np.linspace(-3.0, 3.0, n_features)
    return x.astype(np.float32).astype(np.float64)


def _mixed_target(x: np.ndarray, task: str) -> np.ndarray:
    z = (x - x.mean(axis=0)) / x.std(axis=0)
    signal = z[:, 0] - 0.8 * z[:, 1] + 0.5 * np.sin(2 * z[:, 2]) + 0.3 * z[:, 3] * z[:, 4]
    if task == "classifier":
        return np.asarray(np.digitize(signal, np.quantile(signal, [1 / 3, 2 / 3])), np.int64)
    return np.asarray(10.0 * signal, np.float64)


MIXED: dict[str, tuple[int, str, Callable[[], Any]]] = {
    # 8*96 + 96*96 + 96*3 = 10,272 weights: the benchmark's MLPClassifier.
    "mlp-classifier-10k": (
        8,
        "classifier",
        lambda: make_pipeline(
            StandardScaler(),
            MLPClassifier(hidden_layer_sizes=(96, 96), max_iter=300, random_state=0),
        ),
    ),
    # 16*128 + 128*64 + 64 = 10,304 weights: the benchmark's MLPRegressor.
    "mlp-regressor-10k": (
        16,
        "regressor",
        lambda: make_pipeline(
            StandardScaler(),
            MLPRegressor(hidden_layer_sizes=(128, 64), max_iter=300, random_state=0),
        ),
    ),
    "logreg-32-features": (
        32,
        "classifier",
        lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)),
    ),
}


@pytest.fixture(scope="module")
def mixed_cases() -> dict[str, tuple[Any, np.ndarray, np.ndarray]]:
    fitted = {}
    for name, (n_features, task, build) in MIXED.items():
        train = _mixed_scales(n_features, 4000, seed=1)
        model = build().fit(train, _mixed_target(train, task))
        fitted[name] = (model, train, _mixed_scales(n_features, 2048, seed=2))
    return fitted


@pytest.mark.parametrize("name", list(MIXED))
@pytest.mark.usefixtures("any_size")
def test_int8_holds_the_parity_gate_on_features_of_different_scales(
    mixed_cases: dict[str, tuple[Any, np.ndarray, np.ndarray]], name: str, tmp_path: Path
) -> None:
    # Before: one int8 scale for the raw input and a scaler folded into int8 weights gave
    # 96.5% / 94.4% label agreement and 0.19 of the prediction spread on these rows. The
    # int8 candidate still fails the self-check here, so 16x8 is picked and recorded: the
    # MLP classifier holds with the scaler folded into its first layer (99.5% held out),
    # the others need the input scaled per feature by its own op (folded: 0.096 of the
    # prediction spread, 97.3% agreement; scaled: 0.021, 99.8%).
    model, train, held_out = mixed_cases[name]
    n_features = train.shape[1]
    built = build_sklearn(model, n_features, "tflite-int8", train[:512].astype(np.float32))
    tried = ["full-integer", "full-integer-16x8-folded", "full-integer-16x8"]
    picked = 2 if name != "mlp-classifier-10k" else 1
    assert built.settings["mode"] == tried[picked], built.settings
    assert built.settings["modes_tried"] == tried[: picked + 1]
    assert built.settings["input_normalization"] is (picked == 2)
    assert built.settings["weights"] == "int8" and built.settings["activations"] == "int16"
    assert built.settings["bias_correction"] is True
    assert built.settings["calibration_stretch"] == tflite_build.INT16_CALIBRATION_STRETCH
    ref = reference_outputs(model, held_out)
    out = _run(built.data, held_out, tmp_path)
    if "label" in ref:
        assert built.settings["float_ops"] == ["ARG_MAX"]  # no 16x8 kernel for it
        assert np.mean(out["label"] == ref["label"]) >= 0.99
    else:
        spread = float(ref["prediction"].std())
        assert np.max(np.abs(out["prediction"] - ref["prediction"])) / spread <= 5e-2


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_int8_size_at_10k_weights(
    mixed_cases: dict[str, tuple[Any, np.ndarray, np.ndarray]],
) -> None:
    # The target, 0.30x, for both 10k-weight MLPs of the benchmark. Measured 0.299x
    # (classifier: 16x8 with the scaler folded, 12,928 of 43,216 bytes) and 0.2996x
    # (regressor: 16x8 with the input scaled by one MUL, 12,904 of 43,072 bytes). Before:
    # 0.310x for the regressor, whose input standardization was SUB, MUL and a MAXIMUM
    # that only kept TF from folding the MUL (now dropped after conversion), with the
    # RESHAPE's shape as a constant tensor in every variant; 0.331x / 0.327x when every
    # 16x8 file also carried calibrated min/max and one copy of each equal vector;
    # per-channel quantization had 0.42x.
    for name in ("mlp-classifier-10k", "mlp-regressor-10k"):
        model, train, _ = mixed_cases[name]
        rows = train[:512].astype(np.float32)
        fp32 = build_sklearn(model, train.shape[1], "tflite-fp32", rows).data
        int8 = build_sklearn(model, train.shape[1], "tflite-int8", rows)
        assert len(int8.data) / len(fp32) <= 0.30, (name, int8.settings)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_int8_regressor_at_10k_weights_passes_the_parity_gate(
    mixed_cases: dict[str, tuple[Any, np.ndarray, np.ndarray]], tmp_path: Path
) -> None:
    # The benchmark's MLPRegressor: the int8 file that is <= 0.30x of fp32 passes the gate
    # with its default thresholds (5e-2 of the prediction spread) on held-out rows, and
    # the self-check (2.5e-2 on the representative rows) without falling back.
    from tensorflow.lite.tools import flatbuffer_utils

    from converter.parity import ParityThresholds, check_parity

    model, train, held_out = mixed_cases["mlp-regressor-10k"]
    rows = train[:512].astype(np.float32)
    built = build_sklearn(model, train.shape[1], "tflite-int8", rows)
    assert built.settings["mode"] == "full-integer-16x8"
    check = built.settings["self_check"]["regression_rel_error"]
    assert check <= tflite_build.INT8_SELF_CHECK["regression_rel_error"], built.settings
    example, validation = held_out[:5], held_out[5:]
    report = check_parity(
        "tflite-int8",
        "regressor",
        reference_example=reference_outputs(model, example),
        candidate_example=_run(built.data, example, tmp_path),
        reference_validation=reference_outputs(model, validation),
        candidate_validation=_run(built.data, validation, tmp_path),
        thresholds=ParityThresholds(),
    )
    assert report.passed, report.failures
    assert report.regression_rel_error is not None
    assert report.regression_rel_error <= 0.035, report  # measured 0.021; before 0.048
    # One MUL scales the input (no SUB, no MAXIMUM), the RESHAPE has no shape tensor.
    model_fb = flatbuffer_utils.read_model_from_bytearray(bytearray(built.data))
    ops = [
        flatbuffer_utils.opcode_to_name(model_fb, op.opcodeIndex)
        for op in model_fb.subgraphs[0].operators
    ]
    assert ops == [
        "QUANTIZE",
        "MUL",
        "FULLY_CONNECTED",
        "FULLY_CONNECTED",
        "FULLY_CONNECTED",
        "RESHAPE",
        "DEQUANTIZE",
    ]


def test_int8_weights_are_rounded_with_bias_correction() -> None:
    # The rounded kernel is on the grid TF uses (max|k| / 127), and the mean of the
    # layer's output over the rows is what it was before rounding.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6)) * np.linspace(0.5, 5, 6) + np.linspace(-3, 3, 6)
    layers = (
        tflite_build.Affine(rng.normal(size=(6, 5)), rng.normal(size=5)),
        tflite_build.Activation("relu"),
        tflite_build.Affine(rng.normal(size=(5, 2)), rng.normal(size=2)),
    )
    rounded = tflite_build.rounded_for_int8(layers, x)
    first = rounded[0]
    assert isinstance(first, tflite_build.Affine) and isinstance(layers[0], tflite_build.Affine)
    step = np.abs(layers[0].kernel).max() / 127
    np.testing.assert_allclose(first.kernel / step, np.round(first.kernel / step), atol=1e-9)
    assert np.abs(first.kernel).max() == pytest.approx(127 * step)
    before = x @ layers[0].kernel + layers[0].bias
    after = x @ first.kernel + first.bias
    np.testing.assert_allclose(after.mean(axis=0), before.mean(axis=0), atol=1e-9)
    assert isinstance(rounded[1], tflite_build.Activation)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_compact_rewrites_keep_the_outputs(
    mixed_cases: dict[str, tuple[Any, np.ndarray, np.ndarray]], tmp_path: Path
) -> None:
    # The RESHAPE's constant shape moves into its options in every variant (the fp32 file
    # the ratios divide by loses the same tensor); outputs are bit-identical, any batch.
    import tensorflow as tf

    model, train, held_out = mixed_cases["mlp-regressor-10k"]
    plan = tflite_build.plan_for(model, train.shape[1])
    forward = tflite_build._plan_forward(tf, plan)
    module = tf.Module()
    spec = tf.TensorSpec([None, train.shape[1]], tf.float32, name="X")
    module.serving_default = tf.function(forward, input_signature=[spec], autograph=False)
    function = module.serving_default.get_concrete_function()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([function], module)
    raw = bytes(converter.convert())
    compacted = tflite_build.compact(raw)
    assert len(compacted) < len(raw)
    from tensorflow.lite.tools import flatbuffer_utils

    fb = flatbuffer_utils.read_model_from_bytearray(bytearray(compacted))
    reshapes = [
        op
        for op in fb.subgraphs[0].operators
        if flatbuffer_utils.opcode_to_name(fb, op.opcodeIndex) == "RESHAPE"
    ]
    assert len(reshapes) == 1 and len(reshapes[0].inputs) == 1
    assert list(reshapes[0].builtinOptions.newShape) == [-1]
    for n in (1, 7, 256):
        rows = held_out[:n]
        a = _run(raw, rows, tmp_path)["prediction"]
        b = _run(compacted, rows, tmp_path)["prediction"]
        assert a.shape == b.shape == (n,)
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["logreg-binary", "kmeans-bare"])
@pytest.mark.parametrize("variant", ["tflite-fp16", "tflite-int8"])
def test_tiny_models_are_skipped_not_grown(cases: dict[str, Case], name: str, variant: str) -> None:
    # Before: LogisticRegression fp16 1.07x, KMeans fp16 1.09x and int8 1.24x were shipped.
    case = cases[name]
    rows = case.train[:N_REPRESENTATIVE].astype(np.float32)
    precision = variant.split("-")[1]
    with pytest.raises(
        VariantNotApplicable, match=rf"{precision}: the converted file is \d+\.\d\dx the fp32 file"
    ):
        sklearn_to_tflite(case.model, N_FEATURES, variant, rows)


def test_files_carry_no_names_or_conversion_metadata(
    cases: dict[str, Case], tmp_path: Path
) -> None:
    from tensorflow.lite.tools import flatbuffer_utils

    case = cases["mlp-classifier-relu"]
    data = sklearn_to_tflite(case.model, N_FEATURES, "tflite-fp32", case.train)
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(data))
    assert not model.metadata
    assert all(not t.name for g in model.subgraphs for t in g.tensors)
    # ...while the SignatureDef keeps the contract's names.
    session_out = _run(data, case.held_out[:3], tmp_path)
    assert sorted(session_out) == ["label", "probabilities"]


# --- Keras -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keras_data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # 1600 held-out rows: on 400 the int8 agreement swings by a point with the sample.
    X, y = make_classification(2400, n_features=6, n_informative=4, n_classes=3, random_state=3)
    return X[:800].astype(np.float32), y[:800], X[800:].astype(np.float32)


def _keras_model(units: int, activation: str, loss: Any, rows: np.ndarray, y: np.ndarray) -> Any:
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((rows.shape[1],)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(units, activation=activation),
        ]
    )
    model.compile(optimizer="adam", loss=loss)
    model.fit(rows, y, epochs=20, batch_size=64, verbose=0)
    return model


@pytest.fixture(scope="module")
def keras_classifier(keras_data: tuple[np.ndarray, np.ndarray, np.ndarray]) -> Any:
    X, y, _ = keras_data
    return _keras_model(3, "softmax", "sparse_categorical_crossentropy", X, y)


@pytest.mark.parametrize("variant", TFLITE_VARIANTS)
@pytest.mark.usefixtures("any_size")
def test_keras_softmax_classifier(
    keras_data: tuple[np.ndarray, np.ndarray, np.ndarray],
    keras_classifier: Any,
    variant: str,
    tmp_path: Path,
) -> None:
    X, _, held_out = keras_data
    model = keras_classifier
    out = _run(keras_to_tflite(model, variant, X[:500]), held_out, tmp_path)
    expected = np.asarray(model.predict(held_out, verbose=0))
    assert sorted(out) == ["label", "probabilities"]
    assert out["label"].dtype == np.int64
    agreement = np.mean(out["label"] == expected.argmax(axis=1))
    assert agreement >= (0.999 if variant == "tflite-fp32" else 0.99)
    atol = {"tflite-fp32": 1e-5, "tflite-fp16": 1e-2, "tflite-int8": 0.1}[variant]
    assert np.mean(np.abs(out["probabilities"] - expected)) <= atol


def test_keras_sigmoid_with_binary_loss_is_a_binary_classifier(
    keras_data: tuple[np.ndarray, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    X, y, held_out = keras_data
    model = _keras_model(1, "sigmoid", "binary_crossentropy", X, (y == 1).astype(np.float32))
    out = _run(keras_to_tflite(model, "tflite-fp32", X[:300]), held_out, tmp_path)
    p = np.asarray(model.predict(held_out, verbose=0))[:, 0]
    np.testing.assert_allclose(out["probabilities"], np.stack([1 - p, p], axis=1), atol=1e-5)
    assert np.mean(out["label"] == (p > 0.5)) >= 0.999


@pytest.mark.usefixtures("any_size")
def test_keras_linear_output_is_a_regressor(
    keras_data: tuple[np.ndarray, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    X, y, held_out = keras_data
    model = _keras_model(1, "linear", "mse", X, X[:, 0] * 2.0 + y)
    out = _run(keras_to_tflite(model, "tflite-int8", X[:300]), held_out, tmp_path)
    expected = np.asarray(model.predict(held_out, verbose=0))[:, 0]
    assert sorted(out) == ["prediction"]
    assert out["prediction"].shape == (len(held_out),)
    spread = np.max(np.abs(expected))
    assert np.mean(np.abs(out["prediction"] - expected)) <= 0.03 * spread


def test_keras_logits_with_task_classifier_get_a_softmax(
    keras_data: tuple[np.ndarray, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    import keras

    X, y, held_out = keras_data
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model = _keras_model(3, "linear", loss, X, y)
    out = _run(keras_to_tflite(model, "tflite-fp32", X, task="classifier"), held_out, tmp_path)
    logits = np.asarray(model.predict(held_out, verbose=0))
    softmax = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(out["probabilities"], softmax, atol=1e-5)
    assert np.mean(out["label"] == logits.argmax(axis=1)) >= 0.999
    # Without the hint the same model is a regressor with three targets.
    plain = _run(keras_to_tflite(model, "tflite-fp32", X), held_out, tmp_path)
    assert plain["prediction"].shape == (len(held_out), 3)


def test_keras_op_without_a_tflite_kernel_is_named(
    keras_data: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    import keras

    X, _, _ = keras_data
    model = keras.Sequential(
        [keras.Input((X.shape[1],)), keras.layers.Lambda(keras.ops.erf), keras.layers.Dense(1)]
    )
    with pytest.raises(UnsupportedModelError, match=r"tf\.Erf.*no TFLite builtin op"):
        keras_to_tflite(model, "tflite-fp32", X)


def test_keras_builder_refuses_what_is_not_a_keras_model(cases: dict[str, Case]) -> None:
    with pytest.raises(UnsupportedModelError, match="not a Keras model"):
        keras_to_tflite(cases["lasso"].model, "tflite-fp32", cases["lasso"].train)


# --- what is refused, and why ----------------------------------------------------------


@pytest.mark.parametrize(
    ("estimator", "words"),
    [
        (
            RandomForestClassifier(n_estimators=3, random_state=0),
            "tree ensembles have no TFLite op",
        ),
        (IsolationForest(n_estimators=3, random_state=0), "tree"),
        (SVC(), "SVM"),
        (LocalOutlierFactor(novelty=True), "neighbour search"),
        (GaussianNB(), "not rebuilt as TF ops"),
    ],
)
def test_estimators_without_tflite_ops_do_not_apply(estimator: Any, words: str) -> None:
    X, _, y = _classification(2, 0)
    model = make_pipeline(StandardScaler(), estimator).fit(X, y)
    with pytest.raises(VariantNotApplicable, match=words):
        sklearn_to_tflite(model, N_FEATURES, "tflite-fp32", X)
    assert unsupported_reason(type(estimator).__name__, "tflite-int8") is not None


def test_an_unsupported_step_before_a_supported_estimator_does_not_apply() -> None:
    from sklearn.preprocessing import PolynomialFeatures

    X, _, y = _regression(1, 0)
    model = make_pipeline(PolynomialFeatures(2), Ridge()).fit(X, y)
    with pytest.raises(VariantNotApplicable, match="PolynomialFeatures"):
        sklearn_to_tflite(model, N_FEATURES, "tflite-fp32", X)


def test_multilabel_mlp_is_refused() -> None:
    X, _, y = _classification(2, 0)
    model = MLPClassifier(hidden_layer_sizes=(4,), max_iter=5).fit(X, np.stack([y, 1 - y], axis=1))
    with pytest.raises(UnsupportedModelError, match="multilabel"):
        sklearn_to_tflite(model, N_FEATURES, "tflite-fp32", X)


def test_transformer_only_and_unfitted_models_are_refused() -> None:
    X, _, _ = _classification(2, 0)
    with pytest.raises(UnsupportedModelError, match="task"):
        sklearn_to_tflite(StandardScaler().fit(X), N_FEATURES, "tflite-fp32", X)
    with pytest.raises(UnsupportedModelError, match="not fitted"):
        sklearn_to_tflite(make_pipeline(StandardScaler(), Ridge()), N_FEATURES, "tflite-fp32", X)


def test_int8_needs_fitting_representative_rows(cases: dict[str, Case]) -> None:
    model = cases["logreg-binary"].model
    with pytest.raises(CalibrationDataError):
        sklearn_to_tflite(model, N_FEATURES, "tflite-int8", np.empty((0, N_FEATURES)))
    with pytest.raises(CalibrationDataError):
        sklearn_to_tflite(model, N_FEATURES, "tflite-int8", np.ones((20, N_FEATURES - 1)))
    with pytest.raises(CalibrationDataError, match="NaN"):
        sklearn_to_tflite(model, N_FEATURES, "tflite-int8", np.full((20, N_FEATURES), np.nan))


def test_feature_count_must_match_the_model(cases: dict[str, Case]) -> None:
    with pytest.raises(InputSpecError):
        sklearn_to_tflite(cases["ridge-two-targets"].model, N_FEATURES + 1, "tflite-fp32", None)  # type: ignore[arg-type]


def test_capability_matrix() -> None:
    for name in ("StandardScaler", "PCA", "LogisticRegression", "MLPRegressor", "KMeans"):
        for variant in TFLITE_VARIANTS:
            assert unsupported_reason(name, variant) is None
    assert "tree ensembles have no TFLite op" in str(
        unsupported_reason("HistGradientBoostingClassifier", "tflite-fp16")
    )
    assert "SVM" in str(unsupported_reason("OneClassSVM", "tflite-fp32"))
    assert "not a TFLite variant" in str(unsupported_reason("Ridge", "onnx-fp32"))


def test_module_imports_without_tensorflow() -> None:
    # A fresh interpreter where `import tensorflow` fails, as on a device or a slim server.
    script = """
import sys
import converter.tflite_build as tb
import converter.tflite_pyfunc
assert not {"tensorflow", "keras"} & set(sys.modules), "imported TF eagerly"
sys.modules["tensorflow"] = None
import numpy as np
from sklearn.linear_model import Ridge
from converter.errors import UnsupportedModelError
model = Ridge().fit(np.eye(3), [0.0, 1.0, 2.0])
try:
    tb.sklearn_to_tflite(model, 3, "tflite-fp32", np.eye(3))
except UnsupportedModelError as exc:
    print(exc)
"""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "pip install 'lineside[tflite]'" in done.stdout, done.stderr


# --- the TFLite bundle as an MLflow model ----------------------------------------------


@pytest.mark.usefixtures("any_size")
def test_tflite_bundle_loads_as_mlflow_pyfunc(cases: dict[str, Case], tmp_path: Path) -> None:
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.models import Model, infer_signature

    case = cases["logreg-multiclass-robust-pca"]
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    data = sklearn_to_tflite(case.model, N_FEATURES, "tflite-int8", case.train[:300])
    (bundle / "model.tflite").write_bytes(data)
    columns = [f"f{i}" for i in range(N_FEATURES)]
    frame = pd.DataFrame(case.held_out[:50], columns=columns)
    model = Model(signature=infer_signature(frame))
    model.add_flavor("tflite", data="model.tflite", runtime="ai-edge-litert")
    mlflow.pyfunc.add_to_model(model, loader_module="converter.tflite_pyfunc", data="model.tflite")
    model.save(str(bundle / "MLmodel"))

    loaded = mlflow.pyfunc.load_model(str(bundle))
    got = loaded.predict(frame)
    expected = load_session(bundle / "model.tflite").run(frame.to_numpy(np.float32))
    assert sorted(got) == ["label", "probabilities"]
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value)


def test_pyfunc_returns_a_dataframe_for_one_value_per_row(
    cases: dict[str, Case], tmp_path: Path
) -> None:
    from converter.tflite_pyfunc import _load_pyfunc

    case = cases["lasso"]
    path = tmp_path / "model.tflite"
    path.write_bytes(sklearn_to_tflite(case.model, N_FEATURES, "tflite-fp32", case.train))
    frame = _load_pyfunc(str(tmp_path)).predict(case.held_out[:20])  # float64 ndarray in
    assert list(frame.columns) == ["prediction"]
    np.testing.assert_allclose(
        frame["prediction"], case.model.predict(case.held_out[:20]), rtol=1e-4, atol=1e-3
    )
