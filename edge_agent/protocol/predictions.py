"""Reading predictions messages (docs/protocol.md section 8.4), for consumers.

A message is either one prediction (flat) or, when the agent answered several input
messages in one micro-batch, an envelope whose ``batch`` lists them: the envelope's
members (device, model, version, variant, sha256, ts, latency_ms) apply to every entry,
and each entry carries its own ``seq``, ``source``, ``rows`` and ``outputs``.
``iter_predictions`` turns either form into flat predictions, so a consumer handles one
shape. Pure Python, no dependencies.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["iter_predictions"]


def iter_predictions(body: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """The flat predictions in one decoded predictions message, in ``seq`` order."""
    batch = body.get("batch")
    if not isinstance(batch, list):
        yield dict(body)
        return
    envelope = {k: v for k, v in body.items() if k != "batch"}
    for entry in batch:
        if isinstance(entry, Mapping):
            yield {**envelope, **entry}
