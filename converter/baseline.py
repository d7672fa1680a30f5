"""Per-feature reference statistics for drift detection on the device (PSI).

Shape: docs/internals.md section 2. Edges are quantiles of the reference rows, the
outer edges open (-inf, +inf), so every future value falls in a bin.
"""

from __future__ import annotations

from typing import Any

import numpy as np

BINS = 10


def feature_baseline(rows: np.ndarray, names: list[str], bins: int = BINS) -> list[dict[str, Any]]:
    return [_continuous(rows[:, i], bins) | {"name": name} for i, name in enumerate(names)]


def output_baseline(outputs: dict[str, np.ndarray], bins: int = BINS) -> dict[str, Any]:
    """Label distributions as value fractions; 1-D scores as quantile bins."""
    result: dict[str, Any] = {}
    for name, values in outputs.items():
        array = np.asarray(values)
        if name == "label":
            uniques, counts = np.unique(array, return_counts=True)
            result[name] = {
                "values": [v.item() for v in uniques],
                "fractions": [float(c) / len(array) for c in counts],
            }
        elif array.ndim == 1:
            result[name] = _continuous(array.astype(np.float64), bins)
    return result


def _continuous(values: np.ndarray, bins: int) -> dict[str, Any]:
    interior = np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]))
    edges = np.concatenate([[-np.inf], interior, [np.inf]])
    counts, _ = np.histogram(values, bins=edges)
    return {
        "edges": [_json_float(e) for e in edges],
        "fractions": [float(c) / len(values) for c in counts],
        "mean": float(values.mean()),
        "std": float(values.std()),
        "min": float(values.min()),
        "max": float(values.max()),
    }


def _json_float(value: float) -> float | str:
    # JSON has no infinities; docs/internals.md allows the strings "-inf" and "inf".
    if np.isinf(value):
        return "inf" if value > 0 else "-inf"
    return float(value)
