"""Local state in the state dir: small JSON documents written atomically.

``streams.json``  per (group, model): last sequence, the exact wire manifest we published
                  and its content key; the ledger of chunk ids we published.
``rollouts.json`` per model: where the staged rollout stands (read by ``rollout status``).
``fleet.json``    the fleet monitor's last snapshot (read by ``fleet status``).
``live.json``     which version each device runs since when, the live intervals per
                  (model, version, device) and the MLflow writes still owed for them
                  (``history.LiveLedger``).

Losing these files is survivable: sequences are re-derived from the retained manifests
on the broker (``max(local, retained) + 1``), and rollouts restart from the first group.
Without ``streams.json`` a manifest the broker lost as well cannot be republished byte
for byte; the next promotion publishes afresh.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from registry_sync.errors import StateError

__all__ = ["read_json", "write_json_atomic"]


def read_json(path: Path, default: Any) -> Any:
    """The parsed document, or ``default`` when it does not exist."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return default
    except (OSError, ValueError) as exc:
        raise StateError(f"cannot read state file {path}: {exc}") from exc


def write_json_atomic(path: Path, value: Any) -> None:
    """Write to a temp file in the same dir, fsync, rename: readers see old or new, never half."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(value, fh, indent=1, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            Path(tmp).replace(path)
        except BaseException:
            with contextlib.suppress(OSError):
                Path(tmp).unlink()
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise StateError(f"cannot write state file {path}: {exc}") from exc
