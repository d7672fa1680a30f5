"""Pure: turn a bundle (or an undeploy decision) into the ``signed`` manifest object.

A manifest's *content* is everything but ``sequence``, ``issued_at`` and ``expires_at``;
its ``content_key`` (sha256 of the canonical content) is how a pass decides that the
retained manifest already says what the registry wants, so an unchanged deployment is
never re-signed.

Undeploy (docs/protocol.md section 10): a normal, fully valid signed manifest for the
model the group last had, with a higher sequence and two extra signed fields,
``"undeployed": true`` and ``"on_undeploy": "keep" | "stop"``. Agents that predate the
field see an update to the model they already run (same sha256: nothing to download).
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

from edge_agent.protocol.canonical import canonical_bytes
from edge_agent.protocol.chunks import describe, split
from edge_agent.protocol.manifest import MANIFEST_TYPE, SCHEMA_VERSION, FileEntry
from registry_sync.builder import Bundle

__all__ = [
    "VOLATILE",
    "content_key",
    "deploy_content",
    "finalize",
    "model_chunks",
    "undeploy_content",
]

VOLATILE = ("sequence", "issued_at", "expires_at")


def model_chunks(data: bytes, chunk_size: int) -> dict[str, bytes]:
    """chunk id -> bytes (identical chunks collapse to one id: one retained message)."""
    return {hashlib.sha256(c).hexdigest(): c for c in split(data, chunk_size)}


def deploy_content(
    bundle: Bundle,
    data: bytes,
    *,
    selector: Mapping[str, str],
    groups: Sequence[str],
    device_classes: Sequence[str],
    chunk_size: int,
) -> dict[str, Any]:
    meta = bundle.metadata
    entry: FileEntry = describe(bundle.model_file, data, chunk_size)
    return {
        "type": MANIFEST_TYPE,
        "schema_version": SCHEMA_VERSION,
        "model": bundle.model,
        "version": bundle.version,
        "selector": dict(selector),
        "variant": bundle.variant,
        "runtime": bundle.runtime,
        "model_file": bundle.model_file,
        "files": [entry.to_json()],
        "feature_names": list(meta.get("feature_names") or []),
        "outputs": [
            o["name"] if isinstance(o, dict) else str(o) for o in meta.get("outputs") or []
        ],
        "classes": meta.get("classes"),
        "signature": meta.get("input_signature"),
        "golden": meta.get("golden"),
        "baseline": meta.get("baseline"),
        "targets": {"groups": list(groups), "device_classes": sorted(device_classes)},
    }


def undeploy_content(previous_signed: Mapping[str, Any], *, on_undeploy: str) -> dict[str, Any]:
    """The undeploy form of the last deployed manifest content (same files, flagged)."""
    content = {k: copy.deepcopy(v) for k, v in previous_signed.items() if k not in VOLATILE}
    content["undeployed"] = True
    content["on_undeploy"] = on_undeploy
    return content


def content_key(signed: Mapping[str, Any]) -> str:
    return hashlib.sha256(
        canonical_bytes({k: v for k, v in signed.items() if k not in VOLATILE})
    ).hexdigest()


def finalize(
    content: Mapping[str, Any], *, sequence: int, issued_at: int, expires_after_s: int
) -> dict[str, Any]:
    signed = dict(content)
    signed["sequence"] = sequence
    signed["issued_at"] = issued_at
    signed["expires_at"] = issued_at + expires_after_s if expires_after_s else None
    return signed


def chunk_ids(signed: Mapping[str, Any]) -> set[str]:
    return {c for f in signed.get("files", []) for c in f.get("chunks", [])}
