"""The signed model manifest: wire format, size caps, parsing and verification.

Wire format (docs/protocol.md, "Manifest")::

    {"signed": {...the fields of Manifest...},
     "signatures": [{"keyid": "<16 hex>", "sig": "<128 hex>"}]}

Each ``sig`` is Ed25519 over ``canonical_bytes(signed)``. Processing order, so
that untrusted bytes reach as little code as possible:

1. size cap on the raw bytes, then strict JSON (no duplicate keys, no NaN);
2. envelope shape; canonical re-encoding of ``signed``;
3. signatures: at least one by a trusted key must verify (``verify_envelope``);
4. only then the schema: major version, fields, types, path safety, caps.

Unknown fields inside ``signed`` are ignored (they are still covered by the
signature); an unknown major ``schema_version`` is refused.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edge_agent.protocol.canonical import CanonicalError, canonical_bytes
from edge_agent.protocol.ed25519 import PublicKey
from edge_agent.protocol.topics import TopicError, validate_id
from edge_agent.update_errors import (
    BadSignature,
    MalformedManifest,
    TooLarge,
    UnknownKey,
    UnsafeModel,
    UnsupportedManifestVersion,
)

__all__ = [
    "MANIFEST_TYPE",
    "RUNTIMES",
    "SCHEMA_MAJOR",
    "SCHEMA_VERSION",
    "Envelope",
    "FileEntry",
    "Limits",
    "Manifest",
    "Selector",
    "Signature",
    "decode_envelope",
    "load_manifest",
    "parse_signed",
    "verify_envelope",
]

SCHEMA_VERSION = "1.0"
SCHEMA_MAJOR = 1
MANIFEST_TYPE = "lineside.manifest"
RUNTIMES = ("onnxruntime", "tflite")
RESERVED_NAMES = frozenset({"manifest.json"})  # the store writes it next to the files

_HEX64 = re.compile(r"[0-9a-f]{64}")
_KEYID = re.compile(r"[0-9a-f]{16}")
_SIG = re.compile(r"[0-9a-f]{128}")
_VERSION = re.compile(r"(0|[1-9][0-9]{0,5})\.(0|[1-9][0-9]{0,5})")


@dataclass(frozen=True)
class Limits:
    """Parsing caps; all sizes in bytes."""

    max_manifest_bytes: int = 1024 * 1024
    max_files: int = 32
    max_chunk_size: int = 128 * 1024
    max_signatures: int = 8
    max_path_length: int = 255


@dataclass(frozen=True)
class Signature:
    keyid: str
    sig: bytes


@dataclass(frozen=True)
class Envelope:
    """A decoded but not yet trusted manifest."""

    signed: Mapping[str, Any]
    signatures: tuple[Signature, ...]
    signed_bytes: bytes  # canonical encoding: what the signatures cover

    @property
    def digest(self) -> str:
        """sha256 of the signed bytes: identifies this exact manifest."""
        return hashlib.sha256(self.signed_bytes).hexdigest()


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str
    chunk_size: int
    chunks: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "size": self.size,
            "sha256": self.sha256,
            "chunk_size": self.chunk_size,
            "chunks": list(self.chunks),
        }


@dataclass(frozen=True)
class Selector:
    """How registry_sync chose the version: an MLflow alias or a legacy stage."""

    kind: str  # "alias" | "stage"
    value: str


@dataclass(frozen=True)
class Manifest:
    """A verified manifest. Mapping-valued fields are shared, treat them as read-only."""

    schema_version: str
    model: str
    version: int
    selector: Selector
    variant: str
    runtime: str
    model_file: str
    files: tuple[FileEntry, ...]
    feature_names: tuple[str, ...]
    outputs: tuple[str, ...]
    classes: tuple[str | int, ...] | None
    target_groups: tuple[str, ...]
    target_device_classes: tuple[str, ...]  # empty: any device class
    sequence: int
    issued_at: int
    expires_at: int | None
    signature: Mapping[str, Any] | None = None
    golden: Mapping[str, Any] | None = None
    baseline: Mapping[str, Any] | None = None
    key_id: str = ""  # the trusted key whose signature verified
    digest: str = ""  # sha256 of the canonical signed bytes
    extra: Mapping[str, Any] = field(default_factory=dict)  # unknown fields, ignored

    @property
    def model_entry(self) -> FileEntry:
        return next(f for f in self.files if f.path == self.model_file)

    @property
    def model_sha256(self) -> str:
        """The model file's sha256: the id of this model in the device store."""
        return self.model_entry.sha256

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def to_signed(self) -> dict[str, Any]:
        """The ``signed`` object (for registry_sync to sign); round-trips via parse_signed."""
        out: dict[str, Any] = dict(self.extra)
        out.update(
            {
                "type": MANIFEST_TYPE,
                "schema_version": self.schema_version,
                "model": self.model,
                "version": self.version,
                "selector": {self.selector.kind: self.selector.value},
                "variant": self.variant,
                "runtime": self.runtime,
                "model_file": self.model_file,
                "files": [f.to_json() for f in self.files],
                "feature_names": list(self.feature_names),
                "outputs": list(self.outputs),
                "classes": None if self.classes is None else list(self.classes),
                "targets": {
                    "groups": list(self.target_groups),
                    "device_classes": list(self.target_device_classes),
                },
                "sequence": self.sequence,
                "issued_at": self.issued_at,
                "expires_at": self.expires_at,
                "signature": self.signature,
                "golden": self.golden,
                "baseline": self.baseline,
            }
        )
        return out


# --- step 1-2: bytes -> envelope -------------------------------------------------


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two parsers picking different duplicates is a classic signature bypass.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise MalformedManifest(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constants(name: str) -> Any:
    raise MalformedManifest(f"{name} is not allowed in a manifest")


def decode_envelope(raw: bytes, limits: Limits = Limits()) -> Envelope:
    """Parse the wire bytes into an untrusted ``Envelope`` (size and shape only)."""
    if len(raw) > limits.max_manifest_bytes:
        raise TooLarge(f"manifest is {len(raw)} bytes, cap {limits.max_manifest_bytes}")
    try:
        doc = json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constants,
        )
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, huge ints
        raise MalformedManifest(f"manifest is not valid UTF-8 JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise MalformedManifest("manifest must be a JSON object")
    signed, sigs = doc.get("signed"), doc.get("signatures")
    if not isinstance(signed, dict):
        raise MalformedManifest("'signed' must be an object")
    if not isinstance(sigs, list) or not sigs:
        raise MalformedManifest("'signatures' must be a non-empty list")
    if len(sigs) > limits.max_signatures:
        raise TooLarge(f"{len(sigs)} signatures, cap {limits.max_signatures}")
    try:
        signed_bytes = canonical_bytes(signed)
    except (CanonicalError, RecursionError) as exc:
        raise MalformedManifest(f"'signed' has no canonical encoding: {exc}") from exc
    return Envelope(signed, tuple(_signature(s) for s in sigs), signed_bytes)


def _signature(entry: Any) -> Signature:
    if not isinstance(entry, dict):
        raise MalformedManifest("a signature entry must be an object")
    keyid, sig = entry.get("keyid"), entry.get("sig")
    if not isinstance(keyid, str) or not _KEYID.fullmatch(keyid):
        raise MalformedManifest("signature 'keyid' must be 16 lower-case hex characters")
    if not isinstance(sig, str) or not _SIG.fullmatch(sig):
        raise MalformedManifest("signature 'sig' must be 128 lower-case hex characters")
    return Signature(keyid, bytes.fromhex(sig))


# --- step 3: signatures ----------------------------------------------------------


def verify_envelope(envelope: Envelope, trusted: Mapping[str, PublicKey]) -> str:
    """Return the id of a trusted key whose signature verifies.

    ``UnknownKey`` when no signature names a trusted key; ``BadSignature`` when
    some do but none of them verifies.
    """
    candidates = [s for s in envelope.signatures if s.keyid in trusted]
    if not candidates:
        names = ", ".join(s.keyid for s in envelope.signatures)
        raise UnknownKey(f"no signature by a trusted key (signed by: {names})")
    for sig in candidates:
        key = trusted[sig.keyid]
        if key.key_id == sig.keyid and key.verify(sig.sig, envelope.signed_bytes):
            return sig.keyid
    raise BadSignature(f"signature by key {candidates[0].keyid} does not verify")


# --- step 4: schema --------------------------------------------------------------


def _get(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise MalformedManifest(f"{where}: missing field {key!r}")
    value = obj[key]
    # bool is an int subclass; a manifest "version": true is malformed.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise MalformedManifest(f"{where}: field {key!r} has the wrong type")
    if not isinstance(value, kind):
        raise MalformedManifest(f"{where}: field {key!r} has the wrong type")
    return value


def _opt(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if obj.get(key) is None:
        return None
    return _get(obj, key, kind, where)


def _ident(value: Any, what: str) -> str:
    try:
        return validate_id(value, what)
    except TopicError as exc:
        raise MalformedManifest(str(exc)) from exc


def _str_list(value: Any, what: str, *, ids: bool = False) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise MalformedManifest(f"{what} must be a list of strings")
    return tuple(_ident(v, what) for v in value) if ids else tuple(value)


def _check_version(signed: Mapping[str, Any]) -> str:
    version = signed.get("schema_version")
    if not isinstance(version, str):
        raise MalformedManifest("'schema_version' must be a string like \"1.0\"")
    match = _VERSION.fullmatch(version)
    if match is None:
        raise MalformedManifest(f"'schema_version' {version!r} is not MAJOR.MINOR")
    if int(match.group(1)) != SCHEMA_MAJOR:
        raise UnsupportedManifestVersion(
            f"schema_version {version} is not supported (this agent reads {SCHEMA_MAJOR}.x)"
        )
    return version


def _safe_path(path: Any, limits: Limits) -> str:
    if not isinstance(path, str) or not path:
        raise MalformedManifest("file 'path' must be a non-empty string")
    if len(path) > limits.max_path_length:
        raise TooLarge(f"file path longer than {limits.max_path_length}")
    if path.startswith("/") or "\\" in path or ":" in path:
        raise UnsafeModel(f"file path {path!r} is not a relative POSIX path")
    for part in path.split("/"):
        if part in ("", ".", "..") or any(ord(c) < 0x20 or ord(c) == 0x7F for c in part):
            raise UnsafeModel(f"file path {path!r} leaves the bundle or is not normalised")
    if path in RESERVED_NAMES:
        raise UnsafeModel(f"file path {path!r} is reserved")
    return path


def _file_entry(obj: Any, limits: Limits) -> FileEntry:
    if not isinstance(obj, dict):
        raise MalformedManifest("a file entry must be an object")
    path = _safe_path(obj.get("path"), limits)
    where = f"file {path!r}"
    size = _get(obj, "size", int, where)
    sha = _get(obj, "sha256", str, where)
    chunk_size = _get(obj, "chunk_size", int, where)
    chunks = _get(obj, "chunks", list, where)
    if size < 0 or not _HEX64.fullmatch(sha):
        raise MalformedManifest(f"{where}: bad size or sha256")
    if chunk_size > limits.max_chunk_size:
        raise TooLarge(f"{where}: chunk_size {chunk_size} above {limits.max_chunk_size}")
    if chunk_size < 1:
        raise MalformedManifest(f"{where}: chunk_size must be positive")
    if len(chunks) != -(-size // chunk_size):
        raise MalformedManifest(f"{where}: {len(chunks)} chunks do not cover {size} bytes")
    if not all(isinstance(c, str) and _HEX64.fullmatch(c) for c in chunks):
        raise MalformedManifest(f"{where}: chunk ids must be sha256 hex")
    return FileEntry(path, size, sha, chunk_size, tuple(chunks))


def _files(value: Any, limits: Limits) -> tuple[FileEntry, ...]:
    if not isinstance(value, list) or not value:
        raise MalformedManifest("'files' must be a non-empty list")
    if len(value) > limits.max_files:
        raise TooLarge(f"{len(value)} files, cap {limits.max_files}")
    files = tuple(_file_entry(v, limits) for v in value)
    paths = {f.path for f in files}
    if len(paths) != len(files):
        raise MalformedManifest("duplicate file paths")
    for f in files:  # "a" and "a/b" cannot both be files
        parts = f.path.split("/")
        if any("/".join(parts[:i]) in paths for i in range(1, len(parts))):
            raise UnsafeModel(f"file path {f.path!r} is below another file")
    return files


def _selector(value: Any) -> Selector:
    if not isinstance(value, dict) or len(value) != 1:
        raise MalformedManifest('\'selector\' must be {"alias": ...} or {"stage": ...}')
    ((kind, name),) = value.items()
    if kind not in ("alias", "stage") or not isinstance(name, str) or not name:
        raise MalformedManifest('\'selector\' must be {"alias": ...} or {"stage": ...}')
    return Selector(kind, name)


def _classes(value: Any) -> tuple[str | int, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(
        isinstance(c, (str, int)) and not isinstance(c, bool) for c in value
    ):
        raise MalformedManifest("'classes' must be a list of strings or integers")
    return tuple(value)


_KNOWN = frozenset(
    {
        "type", "schema_version", "model", "version", "selector", "variant", "runtime",
        "model_file", "files", "feature_names", "outputs", "classes", "targets",
        "sequence", "issued_at", "expires_at", "signature", "golden", "baseline",
    }
)  # fmt: skip


def parse_signed(
    signed: Mapping[str, Any],
    limits: Limits = Limits(),
    *,
    key_id: str = "",
    digest: str = "",
) -> Manifest:
    """Validate the ``signed`` object's schema and build a ``Manifest``."""
    version = _check_version(signed)
    w = "manifest"
    if signed.get("type") != MANIFEST_TYPE:
        raise MalformedManifest(f"'type' must be {MANIFEST_TYPE!r}")
    runtime = _get(signed, "runtime", str, w)
    if runtime not in RUNTIMES:
        raise MalformedManifest(f"'runtime' must be one of {RUNTIMES}")
    files = _files(signed.get("files"), limits)
    model_file = _get(signed, "model_file", str, w)
    if model_file not in {f.path for f in files}:
        raise MalformedManifest("'model_file' is not one of 'files'")
    targets = _get(signed, "targets", dict, w)
    groups = _str_list(targets.get("groups"), "targets.groups", ids=True)
    if not groups:
        raise MalformedManifest("'targets.groups' must not be empty")
    classes = _str_list(targets.get("device_classes", []), "targets.device_classes", ids=True)
    sequence = _get(signed, "sequence", int, w)
    issued_at = _get(signed, "issued_at", int, w)
    expires_at = _opt(signed, "expires_at", int, w)
    if sequence < 0 or issued_at < 0 or (expires_at is not None and expires_at < issued_at):
        raise MalformedManifest("sequence/issued_at/expires_at out of range")
    version_no = _get(signed, "version", int, w)
    if version_no < 1:
        raise MalformedManifest("'version' must be >= 1")
    return Manifest(
        schema_version=version,
        model=_ident(signed.get("model"), "model"),
        version=version_no,
        selector=_selector(signed.get("selector")),
        variant=_ident(signed.get("variant"), "variant"),
        runtime=runtime,
        model_file=model_file,
        files=files,
        feature_names=_str_list(signed.get("feature_names"), "feature_names"),
        outputs=_str_list(signed.get("outputs"), "outputs"),
        classes=_classes(signed.get("classes")),
        target_groups=groups,
        target_device_classes=classes,
        sequence=sequence,
        issued_at=issued_at,
        expires_at=expires_at,
        signature=_opt(signed, "signature", dict, w),
        golden=_opt(signed, "golden", dict, w),
        baseline=_opt(signed, "baseline", dict, w),
        key_id=key_id,
        digest=digest,
        extra={k: v for k, v in signed.items() if k not in _KNOWN},
    )


def load_manifest(
    raw: bytes,
    trusted: Mapping[str, PublicKey],
    limits: Limits = Limits(),
) -> Manifest:
    """Bytes off the wire to a verified ``Manifest``, or a specific ``UpdateRejected``."""
    envelope = decode_envelope(raw, limits)
    key_id = verify_envelope(envelope, trusted)
    return parse_signed(envelope.signed, limits, key_id=key_id, digest=envelope.digest)
