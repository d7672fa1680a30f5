"""Non-scikit-learn sources: an ONNX model and a Keras model, logged with MLflow's APIs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from converter.pipeline import convert
from tests.support.registry import Registry


def test_onnx_flavor_model_converts_to_onnx_variants(
    registry: Registry, model_name: str, tmp_path: Path
) -> None:
    import mlflow
    import mlflow.onnx
    from mlflow.models import infer_signature
    from skl2onnx import to_onnx
    from sklearn.neural_network import MLPClassifier

    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 8)).astype(np.float32)
    y = (X[:, 0] * X[:, 1] > 0).astype(int)
    mlp = MLPClassifier(hidden_layer_sizes=(128, 64), max_iter=200, random_state=0).fit(X, y)
    proto = to_onnx(mlp, X[:1], options={"zipmap": False}, target_opset=17)
    with mlflow.start_run():
        mlflow.onnx.log_model(
            proto,
            name="m",
            registered_model_name=model_name,
            signature=infer_signature(X, y),
            input_example=X[:3],
            pip_requirements=mlflow.onnx.get_default_pip_requirements(),  # no inference run
        )
    result = convert(
        f"models:/{model_name}/1",
        tmp_path,
        variants=["onnx-fp32", "onnx-fp16", "onnx-int8", "tflite-fp32"],
    )
    by = {v.variant: v for v in result.variants}
    assert by["onnx-fp32"].status == "written"
    assert by["onnx-fp16"].status == "written", by["onnx-fp16"].reason
    assert by["onnx-int8"].status == "written", by["onnx-int8"].reason
    assert by["tflite-fp32"].status == "skipped"
    assert "ONNX source" in (by["tflite-fp32"].reason or "")
    # an ONNX source keeps its own outputs; the gate compares every one of them
    assert by["onnx-fp32"].parity is not None and by["onnx-fp32"].parity.passed
    assert by["onnx-int8"].size is not None and by["onnx-fp32"].size is not None
    assert by["onnx-int8"].size < 0.5 * by["onnx-fp32"].size


@pytest.mark.tflite
def test_keras_model_converts_to_every_tflite_variant(
    registry: Registry, model_name: str, tmp_path: Path
) -> None:
    import keras
    import mlflow
    from mlflow.models import infer_signature

    keras.utils.set_random_seed(1)  # reproducible weights; the gate itself is tested elsewhere
    rng = np.random.default_rng(1)
    X = rng.normal(size=(600, 6)).astype(np.float32)
    y = np.digitize(X[:, 0] + 0.5 * X[:, 1], [-0.5, 0.5])
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(X, y, epochs=10, verbose=0)
    with mlflow.start_run():
        # (MLflow 3.17's keras flavor fails to save an input_example; the signature suffices.)
        mlflow.keras.log_model(
            model,
            name="m",
            registered_model_name=model_name,
            signature=infer_signature(X, model.predict(X[:5], verbose=0)),
            pip_requirements=["tensorflow"],  # stated: no inference subprocess
        )
    calibration = tmp_path / "calibration.npy"
    np.save(calibration, X[:300])
    result = convert(
        f"models:/{model_name}/1",
        tmp_path / "out",
        calibration_data=calibration,
        variants=["tflite-fp32", "tflite-fp16", "tflite-int8", "onnx-fp32"],
    )
    by = {v.variant: v for v in result.variants}
    for variant in ("tflite-fp32", "tflite-fp16", "tflite-int8"):
        assert by[variant].status == "written", by[variant].reason
        assert (tmp_path / "out" / variant / "model.tflite").is_file()
    assert by["onnx-fp32"].status == "skipped"
    import mlflow.pyfunc

    loaded = mlflow.pyfunc.load_model(str(tmp_path / "out" / "tflite-fp32"))
    out = loaded.predict(X[:4])
    probabilities = (
        out["probabilities"] if isinstance(out, dict) else np.stack(out["probabilities"])
    )
    np.testing.assert_allclose(
        np.asarray(probabilities), model.predict(X[:4], verbose=0), atol=1e-5
    )
