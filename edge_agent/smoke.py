"""Checks a verified model must pass before it may serve: golden pairs and input fit.

Both run on the candidate session before the active pointer moves, so a valid but bad
model (wrong outputs, inputs this device cannot feed) never answers a sensor message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from edge_agent.protocol.manifest import Manifest
from edge_agent.runtime import Session
from edge_agent.update_errors import GoldenMismatch, InputsMismatch


def check_golden(session: Session, manifest: Manifest) -> None:
    """Run the manifest's golden inputs; every output must match within its tolerance."""
    golden = manifest.golden
    if not golden:
        return
    inputs = np.asarray(golden.get("inputs", []), dtype=np.float32)
    if inputs.size == 0:
        return
    try:
        got = session.run(inputs)
    except Exception as exc:  # the runtime's own errors are translated by Session
        raise GoldenMismatch(f"golden inputs fail at inference: {exc}") from exc
    atol = float(golden.get("atol", 1e-4))
    rtol = float(golden.get("rtol", 1e-3))
    for name, expected_list in dict(golden.get("outputs", {})).items():
        if name not in got:
            raise GoldenMismatch(f"output {name!r} is missing from the model")
        expected = np.asarray(expected_list)
        actual = np.asarray(got[name])
        if actual.shape != expected.shape:
            raise GoldenMismatch(
                f"output {name!r} has shape {actual.shape}, expected {expected.shape}"
            )
        if not np.all(np.isfinite(actual.astype(np.float64))):
            raise GoldenMismatch(f"output {name!r} has NaN or infinite values on golden inputs")
        if name == "label":
            mismatches = int(np.sum(actual.astype(np.int64) != expected.astype(np.int64)))
            if mismatches:
                raise GoldenMismatch(f"{mismatches} of {len(expected)} golden labels differ")
        elif not np.allclose(
            actual.astype(np.float64), expected.astype(np.float64), atol=atol, rtol=rtol
        ):
            worst = float(np.max(np.abs(actual.astype(np.float64) - expected)))
            raise GoldenMismatch(
                f"output {name!r} differs from the golden values by up to {worst:.3g} "
                f"(atol {atol}, rtol {rtol})"
            )


def check_inputs_fit(session: Session, manifest: Manifest, fields: Mapping[str, str]) -> None:
    """The model's inputs must be fed by this device's field mapping (or by name)."""
    names = list(manifest.feature_names)
    if session.n_features is not None and session.n_features != len(names):
        raise InputsMismatch(
            f"the model takes {session.n_features} features but the manifest names {len(names)}"
        )
    if fields:
        unmapped = [n for n in _required_inputs(manifest) if n not in fields]
        if unmapped:
            raise InputsMismatch(
                f"model input(s) {', '.join(unmapped)} have no entry in this device's "
                "[models.fields] mapping"
            )


def _required_inputs(manifest: Manifest) -> list[str]:
    signature: Mapping[str, Any] | None = manifest.signature
    columns = (signature or {}).get("inputs") or []
    if columns and all(isinstance(c, Mapping) and c.get("type") != "tensor" for c in columns):
        return [str(c["name"]) for c in columns if c.get("required", True)]
    return list(manifest.feature_names)
