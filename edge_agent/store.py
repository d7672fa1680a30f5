"""The device's local model store: installed versions, the active pointer, trust state.

Layout under ``state_dir``::

    models/<sha256>/<files...>     one directory per model, named by the model file's sha256
    models/<sha256>/manifest.json  the wire manifest as received; written last, so a
                                   directory without it is an unfinished install
    models/<sha256>/<path>.partial a file being assembled from chunks
    state.json                     active pointers, rollback history, accepted
                                   sequences, bad marks, clock floor

``state.json`` holds both the active pointers and the accepted sequences so that
activating a version and advancing its sequence are one atomic rename (temp
file, fsync, rename, fsync dir): two files could be torn by a power cut into
"new sequence, old model" (the retained manifest is then refused as a replay
and the device is stuck) or "new model, old sequence" (a downgrade window).

On open: leftovers (``*.partial``, temp files, unfinished installs, models no
pointer references) are removed; each active model's files are re-hashed and a
broken one falls back to the newest intact entry of its history.

Every mutating call goes through the ``FileSystem`` seam (``edge_agent.fsio``).
The store is not thread-safe: one update worker owns it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.errors import AgentError
from edge_agent.fsio import FileSystem
from edge_agent.protocol.chunks import hash_file
from edge_agent.protocol.ed25519 import PublicKey
from edge_agent.protocol.manifest import FileEntry, Manifest, decode_envelope, parse_signed
from edge_agent.protocol.onnx_scan import check_no_external_data
from edge_agent.update.trust import Accepted, TrustedState
from edge_agent.update_errors import UnsafeModel, UpdateRejected

__all__ = ["ActiveModel", "ModelStore", "StoreError", "describe_state"]

STATE_FORMAT = 1
_SHA = re.compile(r"[0-9a-f]{64}")


class StoreError(AgentError):
    """The store cannot be used: unreadable state, or an operation out of order."""


@dataclass(frozen=True)
class ActiveModel:
    """The model a device runs for one model name."""

    sha256: str
    directory: Path
    manifest: Manifest

    @property
    def model_path(self) -> Path:
        return self.directory / self.manifest.model_file


@dataclass
class _State:
    active: dict[str, list[str]]  # model -> [current, previous, older...] (sha256s)
    accepted: dict[str, int]  # "group/model" -> sequence
    bad: dict[str, int]  # sha256 -> issued_at of the manifest it came with
    clock_floor: int

    def to_json(self) -> bytes:
        doc = {
            "format": STATE_FORMAT,
            "active": self.active,
            "accepted": self.accepted,
            "bad": self.bad,
            "clock_floor": self.clock_floor,
        }
        return json.dumps(doc, sort_keys=True, indent=1).encode()

    def copy(self) -> _State:
        return _State(
            {m: list(c) for m, c in self.active.items()},
            dict(self.accepted),
            dict(self.bad),
            self.clock_floor,
        )

    @classmethod
    def from_json(cls, raw: bytes) -> _State:
        doc = json.loads(raw)
        if doc.get("format") != STATE_FORMAT:
            raise ValueError(f"unknown state format {doc.get('format')!r}")
        return cls(
            active={str(k): [str(s) for s in v] for k, v in doc["active"].items()},
            accepted={str(k): int(v) for k, v in doc["accepted"].items()},
            bad={str(k): int(v) for k, v in doc["bad"].items()},
            clock_floor=int(doc["clock_floor"]),
        )


class ModelStore:
    """Installed models and trusted state under ``state_dir``; use ``ModelStore.open``."""

    def __init__(self, state_dir: Path, *, fs: FileSystem, keep: int, state: _State) -> None:
        self.state_dir = state_dir
        self.models_dir = state_dir / "models"
        self._fs = fs
        self._keep = keep
        self._state = state
        self._pending: set[str] = set()  # installed this session, not yet activated

    # --- opening -----------------------------------------------------------------

    @classmethod
    def open(cls, state_dir: Path, *, fs: FileSystem | None = None, keep: int = 3) -> ModelStore:
        """Open (creating if needed), clean leftovers and re-verify active models."""
        if keep < 1:
            raise ValueError("keep must be at least 1")
        fs = fs or FileSystem()
        if not (state_dir / "models").is_dir():
            fs.mkdir(state_dir / "models")
            fs.fsync_dir(state_dir)
        state_file = state_dir / "state.json"
        try:
            state = (
                _State.from_json(state_file.read_bytes())
                if state_file.exists()
                else _State({}, {}, {}, 0)
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            # Starting empty would forget accepted sequences and allow a downgrade.
            raise StoreError(f"{state_file} is unreadable: {exc}") from exc
        store = cls(state_dir, fs=fs, keep=keep, state=state)
        store._remove_leftovers()
        store._repair_active()
        store._collect_garbage()
        return store

    def _remove_leftovers(self) -> None:
        for tmp in self.state_dir.glob(".*.tmp"):
            self._fs.unlink(tmp)
        for entry in self.models_dir.iterdir():
            if entry.is_symlink() or not entry.is_dir() or not _SHA.fullmatch(entry.name):
                self._fs.rmtree(entry)
            elif not (entry / "manifest.json").is_file():
                self._fs.rmtree(entry)  # an install that never finished
            else:
                for junk in [*entry.rglob("*.partial"), *entry.rglob(".*.tmp")]:
                    self._fs.unlink(junk)

    def _repair_active(self) -> None:
        new = self._state.copy()
        for model, chain in self._state.active.items():
            intact = [s for s in chain if s not in new.bad and self._verify(s)]
            for broken in set(chain) - set(intact):
                if (self.models_dir / broken).exists():
                    self._fs.rmtree(self.models_dir / broken)
            if intact:
                new.active[model] = intact
            else:
                del new.active[model]
        if new != self._state:
            self._save(new)

    def _verify(self, sha: str) -> bool:
        """True when model ``sha``'s directory is complete and every file hashes right."""
        try:
            manifest = self._read_manifest(sha)
            intact = all(self._intact(self._file_path(sha, e), e) for e in manifest.files)
        except (OSError, UpdateRejected):
            return False
        return intact and manifest.model_sha256 == sha

    @staticmethod
    def _intact(path: Path, entry: FileEntry) -> bool:
        if path.is_symlink() or not path.is_file():
            return False
        return hash_file(path) == (entry.size, entry.sha256)

    # --- reading -----------------------------------------------------------------

    def trusted_state(self, keys: Mapping[str, PublicKey]) -> TrustedState:
        """The snapshot the trust core decides on."""
        accepted: dict[tuple[str, str], int] = {}
        for stream, seq in self._state.accepted.items():
            group, model = stream.split("/", 1)
            accepted[(group, model)] = seq
        return TrustedState(
            keys=keys,
            accepted=accepted,
            bad=dict(self._state.bad),
            clock_floor=self._state.clock_floor,
        )

    def accepted_sequence(self, group: str, model: str) -> int | None:
        return self._state.accepted.get(f"{group}/{model}")

    def active(self, model: str) -> ActiveModel | None:
        chain = self._state.active.get(model)
        if not chain:
            return None
        return ActiveModel(chain[0], self.models_dir / chain[0], self._read_manifest(chain[0]))

    def active_models(self) -> dict[str, str]:
        """model name -> active sha256 (for the device state message)."""
        return {m: chain[0] for m, chain in self._state.active.items() if chain}

    def history(self, model: str) -> list[str]:
        """Rollback candidates, newest first (the active one excluded)."""
        return list(self._state.active.get(model, [])[1:])

    def has_previous(self, model: str) -> bool:
        """Whether ``rollback`` would find an intact version of ``model`` to go back to."""
        chain = self._state.active.get(model, [])
        return any(s not in self._state.bad and self._verify(s) for s in chain[1:])

    def is_bad(self, sha: str) -> bool:
        return sha in self._state.bad

    def is_installed(self, sha: str) -> bool:
        return (self.models_dir / sha / "manifest.json").is_file()

    # --- installing --------------------------------------------------------------

    def partial_path(self, manifest: Manifest, entry: FileEntry) -> Path:
        """Where the chunk assembler writes ``entry``; creates its directory."""
        path = self._file_path(manifest.model_sha256, entry)
        model_dir = self.models_dir / manifest.model_sha256
        if not model_dir.exists():
            self._fs.mkdir(model_dir)
            self._fs.fsync_dir(self.models_dir)
        self._mkdirs(model_dir, path.parent)
        return path.with_name(path.name + ".partial")

    def install(self, raw_manifest: bytes, manifest: Manifest) -> Path:
        """Move verified partial files into place and commit with ``manifest.json``.

        Every file must have been assembled and verified (``ChunkAssembler.finish``).
        An ONNX model that uses external data is refused (``UnsafeModel``) here,
        before it can ever be loaded.
        """
        sha = manifest.model_sha256
        model_dir = self.models_dir / sha
        staged: dict[str, Path] = {}  # entry path -> partial file to move into place
        for entry in manifest.files:
            final = self._file_path(sha, entry)
            partial = final.with_name(final.name + ".partial")
            if partial.is_file() and not partial.is_symlink():
                staged[entry.path] = partial
            elif not self._intact(final, entry):
                raise StoreError(f"{entry.path!r} was not assembled")
            # else: already installed (same model re-published); only the manifest changes
        if manifest.runtime == "onnxruntime":
            model_file = manifest.model_file
            check_no_external_data(
                staged.get(model_file) or self._file_path(sha, manifest.model_entry)
            )
        for entry in manifest.files:
            if entry.path in staged:
                final = self._file_path(sha, entry)
                self._fs.replace(staged[entry.path], final)
                self._fs.fsync_dir(final.parent)
        self._fs.atomic_write(model_dir / "manifest.json", raw_manifest)
        self._pending.add(sha)
        return model_dir

    def _mkdirs(self, model_dir: Path, target: Path) -> None:
        # Each new directory's entry is durable only once its parent is fsynced.
        missing: list[Path] = []
        d = target
        while d != model_dir and not d.exists():
            missing.append(d)
            d = d.parent
        for d in reversed(missing):
            self._fs.mkdir(d)
            self._fs.fsync_dir(d.parent)

    def _file_path(self, sha: str, entry: FileEntry) -> Path:
        model_dir = self.models_dir / sha
        path = model_dir / entry.path
        # Manifest parsing already refuses "..", absolute paths and backslashes;
        # this also catches a symlinked directory planted inside the store.
        if not path.resolve().is_relative_to(model_dir.resolve()):
            raise UnsafeModel(f"{entry.path!r} resolves outside the model directory")
        return path

    def _read_manifest(self, sha: str) -> Manifest:
        # Local disk is trusted: the signature was checked before install.
        envelope = decode_envelope((self.models_dir / sha / "manifest.json").read_bytes())
        return parse_signed(envelope.signed, key_id="", digest=envelope.digest)

    # --- committing --------------------------------------------------------------

    def activate(self, accepted: Accepted) -> ActiveModel:
        """Make an installed model active and advance its sequence, in one atomic write."""
        manifest = accepted.manifest
        sha = manifest.model_sha256
        if not self.is_installed(sha):
            raise StoreError(f"model {sha[:12]} is not installed")
        stream = f"{accepted.group}/{manifest.model}"
        old = self._state.accepted.get(stream)
        if old is not None and manifest.sequence < old:
            raise StoreError(f"sequence {manifest.sequence} is below accepted {old}")
        new = self._state.copy()
        chain = [sha, *(s for s in new.active.get(manifest.model, []) if s != sha)]
        new.active[manifest.model] = chain[: self._keep]
        new.accepted[stream] = manifest.sequence
        new.clock_floor = max(new.clock_floor, manifest.issued_at)
        new.bad.pop(sha, None)  # a newer manifest clears the mark (trust rule 9)
        self._save(new)
        self._pending.discard(sha)
        self._collect_garbage()
        active = self.active(manifest.model)
        if active is None:  # unreachable: just written
            raise StoreError(f"activation of {sha[:12]} did not stick")
        return active

    def record_sequence(self, group: str, model: str, sequence: int, issued_at: int) -> None:
        """Advance a stream's sequence without activating (e.g. a refused bad model)."""
        stream = f"{group}/{model}"
        old = self._state.accepted.get(stream)
        if old is not None and sequence < old:
            raise StoreError(f"sequence {sequence} is below accepted {old}")
        new = self._state.copy()
        new.accepted[stream] = sequence
        new.clock_floor = max(new.clock_floor, issued_at)
        self._save(new)

    def mark_bad(self, sha: str, issued_at: int) -> None:
        """Refuse ``sha`` until a manifest issued after ``issued_at`` names it again."""
        new = self._state.copy()
        new.bad[sha] = max(issued_at, new.bad.get(sha, issued_at))
        self._save(new)

    def rollback(self, model: str, *, mark_bad: bool = True) -> ActiveModel | None:
        """Go back to the previous intact version of ``model``; ``None`` if there is none.

        With ``mark_bad`` the abandoned version is refused until a newer manifest.
        """
        chain = self._state.active.get(model)
        if not chain:
            raise StoreError(f"no active version of {model!r}")
        current, new = chain[0], self._state.copy()
        if mark_bad:
            issued = self._read_manifest(current).issued_at
            new.bad[current] = max(issued, new.bad.get(current, issued))
        rest = [s for s in chain[1:] if s not in new.bad and self._verify(s)]
        if rest:
            new.active[model] = rest
        else:
            del new.active[model]
        self._save(new)
        self._collect_garbage()
        return self.active(model)

    def discard(self, sha: str) -> None:
        """Forget an installed version that will not be activated (an abandoned update);
        its directory goes unless a pointer still references it."""
        self._pending.discard(sha)
        if not any(sha in chain for chain in self._state.active.values()):
            model_dir = self.models_dir / sha
            if model_dir.is_dir() and not model_dir.is_symlink():
                self._fs.rmtree(model_dir)

    def _save(self, new: _State) -> None:
        # Copy-on-write: memory changes only after the atomic write succeeded.
        self._fs.atomic_write(self.state_dir / "state.json", new.to_json())
        self._state = new

    def _collect_garbage(self) -> None:
        keep = {s for chain in self._state.active.values() for s in chain} | self._pending
        for entry in self.models_dir.iterdir():
            if entry.name not in keep and (entry / "manifest.json").is_file():
                self._fs.rmtree(entry)


def describe_state(store: ModelStore) -> dict[str, Any]:
    """The ``models`` member of the device state message (docs/protocol.md)."""
    out: dict[str, Any] = {}
    for model, sha in store.active_models().items():
        active = store.active(model)
        if active is not None:
            m = active.manifest
            out[model] = {
                "version": m.version,
                "variant": m.variant,
                "sha256": sha,
                "sequence": m.sequence,
            }
    return out
