"""The parity gate's thresholds, on outputs built to sit just either side of them."""

from __future__ import annotations

import numpy as np

from converter.parity import ParityThresholds, check_parity


def _labels(n: int, flips: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    ref = np.arange(n) % 3
    got = ref.copy()
    got[:flips] = (got[:flips] + 1) % 3
    return {"label": ref}, {"label": got}


def _check(variant: str, example_flips: int, validation_flips: int) -> list[str]:
    ref_ex, got_ex = _labels(5, example_flips)
    ref_va, got_va = _labels(1000, validation_flips)
    report = check_parity(
        variant,
        "classifier",
        reference_example=ref_ex,
        candidate_example=got_ex,
        reference_validation=ref_va,
        candidate_validation=got_va,
        thresholds=ParityThresholds(),
    )
    assert report.passed == (not report.failures)
    return report.failures


def test_fp32_must_reproduce_every_example_label() -> None:
    assert _check("onnx-fp32", 0, 0) == []
    failures = _check("onnx-fp32", 1, 0)
    assert failures == ["label agreement on the input example 80.00% is below 100.00%"]


def test_fp32_validation_threshold() -> None:
    assert _check("onnx-fp32", 0, 1) == []
    assert "validation rows" in _check("onnx-fp32", 0, 2)[0]


def test_reduced_variant_pools_example_with_validation() -> None:
    # one boundary flip among five example rows is noise for int8, not a verdict
    assert _check("tflite-int8", 1, 0) == []
    assert _check("onnx-fp16", 1, 9) == []  # 10 of 1005 wrong: 99.005%
    failures = _check("onnx-int8", 1, 10)  # 11 of 1005 wrong: 98.9%
    assert failures == ["label agreement on example and validation rows 98.91% is below 99.00%"]


def test_reduced_regressor_relative_error() -> None:
    ref = {"prediction": np.linspace(0.0, 10.0, 200)}
    spread = float(ref["prediction"].std())
    near = {"prediction": ref["prediction"] + 0.049 * spread}
    far = {"prediction": ref["prediction"] + 0.051 * spread}
    kwargs = {"reference_example": ref, "reference_validation": ref}
    ok = check_parity(
        "tflite-int8",
        "regressor",
        candidate_example=near,
        candidate_validation=near,
        thresholds=ParityThresholds(),
        **kwargs,
    )
    bad = check_parity(
        "tflite-int8",
        "regressor",
        candidate_example=far,
        candidate_validation=far,
        thresholds=ParityThresholds(),
        **kwargs,
    )
    assert ok.passed
    assert not bad.passed and bad.failures[0].startswith("regression error 5.10e-02")
