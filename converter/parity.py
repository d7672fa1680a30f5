"""The parity gate: a variant ships only if it agrees with the original model.

Figures per output: label agreement (classifier, outlier, cluster), max abs error of
scores/probabilities/distances, and for regressors the max abs error relative to the
spread (std) of the reference predictions. Default thresholds (all configurable):

    fp32 variants       label agreement 100% on the input example, >= 99.9% on validation
                        regressor relative error <= 1e-3
    fp16/int8 variants  label agreement >= 99% over the example and validation rows together
                        regressor relative error <= 5e-2

A percentage gate on the handful of input-example rows alone is meaningless for a reduced
variant (one flipped boundary row of five is 80%), so for those the example rows are pooled
with the validation rows; fp32 variants must still reproduce every example label.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ParityThresholds:
    fp32_example_agreement: float = 1.0
    fp32_validation_agreement: float = 0.999
    reduced_agreement: float = 0.99
    fp32_regression_rel_error: float = 1e-3
    reduced_regression_rel_error: float = 5e-2


@dataclass
class ParityReport:
    variant: str
    passed: bool
    rows_example: int
    rows_validation: int
    label_agreement_example: float | None = None
    label_agreement_validation: float | None = None
    max_abs_error: dict[str, float] = field(default_factory=dict)
    regression_rel_error: float | None = None
    failures: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_reduced(variant: str) -> bool:
    return variant.endswith(("fp16", "int8"))


def check_parity(
    variant: str,
    task: str,
    *,
    reference_example: dict[str, np.ndarray],
    candidate_example: dict[str, np.ndarray],
    reference_validation: dict[str, np.ndarray],
    candidate_validation: dict[str, np.ndarray],
    thresholds: ParityThresholds,
) -> ParityReport:
    """Compare a variant's outputs with the original's and apply the thresholds."""
    report = ParityReport(
        variant=variant,
        passed=True,
        rows_example=_rows(reference_example),
        rows_validation=_rows(reference_validation),
    )
    reduced = is_reduced(variant)
    for name, ref in reference_validation.items():
        if name not in candidate_validation:
            report.failures.append(f"output {name!r} missing from the variant")
            continue
        if name != "label":
            report.max_abs_error[name] = _max_abs(ref, candidate_validation[name])
    if "label" in reference_validation and "label" in candidate_validation:
        report.label_agreement_example = _agreement(
            reference_example.get("label"), candidate_example.get("label")
        )
        report.label_agreement_validation = _agreement(
            reference_validation["label"], candidate_validation["label"]
        )
        if reduced:
            _gate(
                report,
                "label agreement on example and validation rows",
                _pooled_agreement(
                    (reference_example.get("label"), candidate_example.get("label")),
                    (reference_validation["label"], candidate_validation["label"]),
                ),
                thresholds.reduced_agreement,
            )
        else:
            _gate(
                report,
                "label agreement on the input example",
                report.label_agreement_example,
                thresholds.fp32_example_agreement,
            )
            _gate(
                report,
                "label agreement on validation rows",
                report.label_agreement_validation,
                thresholds.fp32_validation_agreement,
            )
    if task == "regressor" and "prediction" in candidate_validation:
        ref = np.asarray(reference_validation["prediction"], dtype=np.float64)
        err = _max_abs(ref, candidate_validation["prediction"])
        report.regression_rel_error = err / max(float(ref.std()), 1e-12)
        limit = (
            thresholds.reduced_regression_rel_error
            if reduced
            else thresholds.fp32_regression_rel_error
        )
        if report.regression_rel_error > limit:
            report.failures.append(
                f"regression error {report.regression_rel_error:.2e} of the prediction spread "
                f"exceeds {limit:.0e}"
            )
    report.passed = not report.failures
    return report


def _gate(report: ParityReport, what: str, value: float | None, need: float) -> None:
    if value is not None and value < need:
        report.failures.append(f"{what} {value:.2%} is below {need:.2%}")


def _rows(outputs: dict[str, np.ndarray]) -> int:
    first = next(iter(outputs.values()), None)
    return 0 if first is None else len(first)


def _agreement(ref: np.ndarray | None, got: np.ndarray | None) -> float | None:
    if ref is None or got is None or len(ref) == 0:
        return None
    return float(np.mean(np.asarray(ref).reshape(-1) == np.asarray(got).reshape(-1)))


def _pooled_agreement(
    *pairs: tuple[np.ndarray | None, np.ndarray | None],
) -> float | None:
    same = total = 0
    for ref, got in pairs:
        if ref is None or got is None:
            continue
        a = np.asarray(ref).reshape(-1)
        b = np.asarray(got).reshape(-1)
        same += int(np.sum(a == b))
        total += len(a)
    return same / total if total else None


def _max_abs(ref: np.ndarray, got: np.ndarray) -> float:
    a = np.asarray(ref, dtype=np.float64)
    b = np.asarray(got, dtype=np.float64)
    if a.size != b.size:
        return float("inf")
    return float(np.max(np.abs(a.reshape(-1) - b.reshape(-1)))) if a.size else 0.0
