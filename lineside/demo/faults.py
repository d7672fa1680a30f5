"""Fault injection for the demo's "bad version" step.

The demo promotes a version whose signed manifest carries golden outputs its model does
not reproduce: what a device sees when the conversion host's runtime differs from its
own, or when a build cache was corrupted. The sync service signs it like any other
build; only the device's golden check (``edge_agent.smoke``) can catch it.
"""

from __future__ import annotations

from pathlib import Path

from lineside.demo.errors import DemoFailedError
from registry_sync.builder import Builder
from registry_sync.config import load_sync_config
from registry_sync.state import read_json, write_json_atomic


def poison_cached_build(sync_config: Path, model: str, version: int) -> None:
    """Build ``model`` v``version`` into the sync cache, then shift its golden scores."""
    config = load_sync_config(sync_config)
    builder = Builder(
        config.build.cache_dir or config.state_dir / "cache", config.tracking_uri, config.build
    )
    bundle = builder.bundle_for(model, version, config.build.device_classes)
    result_path = bundle.path.parent / "result.json"
    result = read_json(result_path, None)
    if result is None:
        raise DemoFailedError(f"no cached build at {result_path}")
    golden = result["metadata"]["golden"]["outputs"]
    golden["label"] = [-int(v) for v in golden["label"]]  # every golden label flipped
    if "score" in golden:
        golden["score"] = [-float(v) for v in golden["score"]]
    write_json_atomic(result_path, result)
