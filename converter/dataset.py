"""Validation and calibration rows for the parity gate, quantization and the drift baseline.

With ``--calibration-data FILE`` (CSV with a header naming the features, JSON Lines of
objects, or a ``.npy`` float matrix) those rows are used. Without it lineside draws a
documented sample: ``SAMPLE_ROWS`` rows from a normal distribution per feature, centred
on the training mean and scaled by the training standard deviation when the pipeline
carries them (a leading StandardScaler), otherwise on the input example's mean and
spread (its standard deviation, or 10% of its magnitude for a single row), plus the
input example rows themselves. The seed is fixed, so a conversion is reproducible.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from converter.errors import CalibrationDataError, InputSpecError

SAMPLE_ROWS = 512
SEED = 20261126


def load_calibration(path: Path, feature_names: list[str]) -> np.ndarray:
    """Rows from ``path`` as float64 ``[N, F]`` in ``feature_names`` order."""
    if not path.is_file():
        raise CalibrationDataError(f"{path}: no such file")
    try:
        if path.suffix == ".npy":
            rows = np.load(path, allow_pickle=False)
        elif path.suffix in (".jsonl", ".ndjson"):
            rows = _jsonl_rows(path, feature_names)
        else:
            rows = _csv_rows(path, feature_names)
    except CalibrationDataError:
        raise
    except (OSError, ValueError) as exc:
        raise CalibrationDataError(f"{path}: cannot read calibration data: {exc}") from exc
    rows = np.asarray(rows, dtype=np.float64)
    if rows.ndim != 2 or rows.shape[1] != len(feature_names):
        raise CalibrationDataError(
            f"{path}: has shape {rows.shape}; expected [rows, {len(feature_names)}] "
            f"for features {', '.join(feature_names)}"
        )
    if len(rows) < 10:
        raise CalibrationDataError(f"{path}: {len(rows)} rows; give at least 10 (100-500 is best)")
    if not np.isfinite(rows).all():
        raise CalibrationDataError(f"{path}: contains NaN or infinite values")
    return rows


def _csv_rows(path: Path, names: list[str]) -> list[list[float]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        missing = [n for n in names if n not in header]
        if missing:
            raise CalibrationDataError(
                f"{path}: the CSV header lacks column(s) {', '.join(missing)}"
            )
        out = []
        for line, record in enumerate(reader, start=2):
            try:
                out.append([float(record[n]) for n in names])
            except (TypeError, ValueError) as exc:
                raise CalibrationDataError(f"{path}:{line}: not a number: {exc}") from exc
        return out


def _jsonl_rows(path: Path, names: list[str]) -> list[list[float]]:
    out = []
    for line, text in enumerate(path.read_text().splitlines(), start=1):
        if not text.strip():
            continue
        try:
            record: Any = json.loads(text)
            out.append([float(record[n]) for n in names])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise CalibrationDataError(f"{path}:{line}: {type(exc).__name__}: {exc}") from exc
    return out


def sample_rows(model: Any, example: np.ndarray | None, n_features: int) -> np.ndarray:
    """The documented validation sample (see the module docstring)."""
    mean, std = _training_stats(model, n_features)
    if mean is None:
        if example is None:
            raise InputSpecError(
                "no calibration data and no input example to draw a validation sample from; "
                "pass --calibration-data FILE"
            )
        mean = example.mean(axis=0)
        std = example.std(axis=0) if len(example) > 1 else np.zeros(n_features)
        fallback = np.maximum(np.abs(mean) * 0.1, 1e-3)
        std = np.where(std > 0, std, fallback)
    rng = np.random.default_rng(SEED)
    drawn = rng.normal(mean, std, size=(SAMPLE_ROWS, n_features))
    return drawn if example is None else np.vstack([example, drawn])


def _training_stats(model: Any, n_features: int) -> tuple[np.ndarray | None, np.ndarray]:
    steps = getattr(model, "steps", None)
    first = steps[0][1] if steps else None
    mean = getattr(first, "mean_", None)
    scale = getattr(first, "scale_", None)
    if mean is not None and scale is not None and len(mean) == n_features:
        return np.asarray(mean, dtype=np.float64), np.asarray(scale, dtype=np.float64)
    return None, np.ones(n_features)
