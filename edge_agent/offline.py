"""Offline use of the device's model store: ``agent predict`` and ``agent status``.

Both read the store without changing it: ``ModelStore.open`` cleans leftovers (partial
downloads), which would break a running agent's download, so this module reads
``state.json`` and the active model's ``manifest.json`` itself and re-hashes the model
file before loading it. No broker, no registry.

``predict`` reads CSV (a header row of field names; one message per row) or JSON lines
(each line one sensor payload in any shape ``inputs.parse_payload`` accepts) and writes
one JSON line per input message: the prediction, or the errors that stopped it.
"""

from __future__ import annotations

import csv
import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from edge_agent.config import AgentConfig, ModelConfig
from edge_agent.errors import AgentError, InputError
from edge_agent.inference import LoadedModel, infer, load_model
from edge_agent.inputs import Row, parse_payload
from edge_agent.protocol.chunks import hash_file
from edge_agent.protocol.manifest import decode_envelope, parse_signed
from edge_agent.store import ActiveModel

__all__ = ["PredictSummary", "predict_file", "read_active", "read_status"]


class NoModelError(AgentError):
    """No intact active version of the model is on this device."""


def _read_state(state_dir: Path) -> dict[str, Any]:
    path = state_dir / "state.json"
    if not path.exists():
        return {"active": {}, "accepted": {}, "bad": {}}
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise AgentError(f"{path} is unreadable: {exc}") from exc
    if not isinstance(data, dict):
        raise AgentError(f"{path} is not a state file")
    return data


def _manifest_at(state_dir: Path, sha: str) -> ActiveModel:
    directory = state_dir / "models" / sha
    envelope = decode_envelope((directory / "manifest.json").read_bytes())
    manifest = parse_signed(envelope.signed, key_id="", digest=envelope.digest)
    return ActiveModel(sha, directory, manifest)


def read_active(state_dir: Path, model: str) -> ActiveModel:
    """The active, intact version of ``model``, read-only; ``NoModelError`` if none."""
    chain = _read_state(state_dir).get("active", {}).get(model) or []
    for sha in chain:
        try:
            active = _manifest_at(state_dir, sha)
            entry = active.manifest.model_entry
            if hash_file(active.model_path) == (entry.size, entry.sha256):
                return active
        except (OSError, AgentError):
            continue
    raise NoModelError(f"no installed version of model {model!r} in {state_dir}")


def read_status(config: AgentConfig) -> dict[str, Any]:
    """Active models, versions, sequences, bad marks and outbox depth."""
    state = _read_state(config.state_dir)
    models: dict[str, Any] = {}
    for model in config.models:
        chain = state.get("active", {}).get(model.name) or []
        entry: dict[str, Any] = {"active": None, "history": chain[1:]}
        if chain:
            try:
                m = _manifest_at(config.state_dir, chain[0]).manifest
                entry["active"] = {
                    "version": m.version,
                    "variant": m.variant,
                    "sha256": chain[0],
                    "sequence": m.sequence,
                    "issued_at": m.issued_at,
                }
            except (OSError, AgentError) as exc:
                entry["error"] = str(exc)
        models[model.name] = entry
    return {
        "device": config.device_id,
        "state_dir": str(config.state_dir),
        "models": models,
        "accepted_sequences": state.get("accepted", {}),
        "bad": state.get("bad", {}),
        "outbox": _outbox_status(config.state_dir / "outbox.db"),
    }


def _outbox_status(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"depth": 0, "bytes": 0, "dropped": 0}
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            depth, size = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM entries"
            ).fetchone()
            row = db.execute("SELECT value FROM counters WHERE name = 'dropped'").fetchone()
        finally:
            db.close()
    except sqlite3.Error as exc:
        return {"error": str(exc)}
    return {"depth": int(depth), "bytes": int(size), "dropped": int(row[0]) if row else 0}


@dataclass
class PredictSummary:
    messages: int = 0
    answered: int = 0
    rejected: int = 0


def _number(text: str) -> Any:
    """CSV cells are text: ints stay ints (the signature's safe casts need to know)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _read_messages(path: Path, max_bytes: int) -> Iterator[tuple[int, list[Row] | InputError]]:
    with path.open(encoding="utf-8", newline="") as fh:
        if path.suffix.lower() == ".csv":
            for line, record in enumerate(csv.DictReader(fh), start=2):
                fields = {k: _number(v) for k, v in record.items() if k and v not in ("", None)}
                yield line, [Row(fields)]
            return
        for line, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            try:
                yield line, parse_payload(text.encode(), max_bytes=max_bytes)
            except InputError as exc:
                yield line, exc


def _error_json(exc: InputError) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": exc.kind, "reason": exc.reason}
    if exc.field is not None:
        out["field"] = exc.field
    return out


def predict_file(
    config: AgentConfig, model: ModelConfig, source: Path, out: TextIO, *, batch: int = 256
) -> PredictSummary:
    """Answer every message of ``source`` with the active version of ``model``."""
    active = read_active(config.state_dir, model.name)
    loaded = load_model(active, model, threads=config.runtime_threads)
    summary = PredictSummary()
    pending: list[tuple[int, list[Row] | InputError]] = []
    for line, item in _read_messages(source, config.limits.max_payload_bytes):
        summary.messages += 1
        pending.append((line, item))
        if len(pending) >= batch:
            _flush(loaded, pending, out, summary)
    _flush(loaded, pending, out, summary)
    return summary


def _flush(
    loaded: LoadedModel,
    pending: list[tuple[int, list[Row] | InputError]],
    out: TextIO,
    summary: PredictSummary,
) -> None:
    """Answer the parsed messages in one session call; write every line in input order."""
    parsed = [(line, rows) for line, rows in pending if not isinstance(rows, InputError)]
    answers = iter(
        infer(loaded, [(str(line), rows) for line, rows in parsed]).answers if parsed else []
    )
    for line, item in pending:
        record: dict[str, Any] = {"line": line}
        if isinstance(item, InputError):
            summary.rejected += 1
            record["errors"] = [_error_json(item)]
            out.write(json.dumps(record) + "\n")
            continue
        answer = next(answers)
        if answer.outputs is not None:
            summary.answered += 1
            record |= {
                **loaded.describe(),
                "source": answer.meta,
                "rows": len(answer.rows),
                "outputs": answer.outputs,
            }
        else:
            summary.rejected += 1
        if answer.errors:
            record["errors"] = [_error_json(e) for e in answer.errors]
        out.write(json.dumps(record, default=str) + "\n")
    pending.clear()
