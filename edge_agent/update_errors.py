"""Why an update was refused: ``UpdateRejected`` subclasses with stable codes.

    UpdateRejected                      (edge_agent.errors)
    ├── MalformedManifest               "malformed_manifest"  not JSON, wrong shape or type
    ├── UnsupportedManifestVersion      "unsupported_version" unknown schema major version
    ├── TooLarge                        "too_large"           a size cap was exceeded
    ├── UnknownKey                      "unknown_key"         no signature by a trusted key
    ├── BadSignature                    "bad_signature"       a trusted key's signature fails
    ├── ReplayedSequence                "replayed_sequence"   sequence <= last accepted
    ├── ManifestExpired                 "expired"             expires_at is in the past
    ├── WrongTarget                     "wrong_target"        not for this device's groups/class
    ├── KnownBadModel                   "known_bad"           model marked bad on this device
    ├── UnsafeModel                     "unsafe_model"        path outside bundle, symlink,
    │                                                         external data
    ├── ChunkHashMismatch               "chunk_hash"          chunk bytes do not hash to the id
    ├── UnexpectedChunk                 "unexpected_chunk"    chunk not part of this file
    │   └── DuplicateChunk              "duplicate_chunk"     chunk already received
    ├── FileHashMismatch                "file_hash"           assembled file size/sha256 differ
    ├── DownloadTimeout                 "download_timeout"    chunks missing at the deadline
    ├── UpdateStalled                   "update_stalled"      one updater step ran past
    │                                                         limits.step_deadline_s
    ├── ModelLoadFailed                 "load_failed"         the runtime cannot load the model
    ├── GoldenMismatch                  "golden_mismatch"     golden inputs give other outputs
    └── InputsMismatch                  "schema_mismatch"     the model's inputs do not fit the
                                                              configured field mapping

``code`` values are part of the event protocol (docs/protocol.md): never rename one.
"""

from __future__ import annotations

from edge_agent.errors import UpdateRejected

__all__ = [
    "BadSignature",
    "ChunkHashMismatch",
    "DownloadTimeout",
    "DuplicateChunk",
    "FileHashMismatch",
    "GoldenMismatch",
    "InputsMismatch",
    "KnownBadModel",
    "MalformedManifest",
    "ManifestExpired",
    "ModelLoadFailed",
    "ReplayedSequence",
    "TooLarge",
    "UnexpectedChunk",
    "UnknownKey",
    "UnsafeModel",
    "UnsupportedManifestVersion",
    "UpdateRejected",
    "UpdateStalled",
    "WrongTarget",
]


class MalformedManifest(UpdateRejected):
    """The manifest is not valid JSON or does not have the documented shape."""

    code = "malformed_manifest"


class UnsupportedManifestVersion(UpdateRejected):
    """The manifest's schema major version is not one this agent understands."""

    code = "unsupported_version"


class TooLarge(UpdateRejected):
    """A manifest, file list, chunk or model exceeds a configured cap."""

    code = "too_large"


class UnknownKey(UpdateRejected):
    """No signature on the manifest was made by a key this device trusts."""

    code = "unknown_key"


class BadSignature(UpdateRejected):
    """A signature by a trusted key does not verify over the signed payload."""

    code = "bad_signature"


class ReplayedSequence(UpdateRejected):
    """The manifest's sequence is not above the last accepted one (replay/rollback)."""

    code = "replayed_sequence"

    def __init__(self, message: str, *, sequence: int, accepted: int) -> None:
        super().__init__(message)
        self.sequence = sequence
        self.accepted = accepted


class ManifestExpired(UpdateRejected):
    """The manifest's ``expires_at`` is before the device's clock (freeze attack)."""

    code = "expired"


class WrongTarget(UpdateRejected):
    """The manifest does not target this device's group or device class."""

    code = "wrong_target"


class KnownBadModel(UpdateRejected):
    """The model was marked bad on this device and no newer manifest clears it."""

    code = "known_bad"


class UnsafeModel(UpdateRejected):
    """A file path leaves the bundle, a symlink is present, or the model uses external data."""

    code = "unsafe_model"


class ChunkHashMismatch(UpdateRejected):
    """A chunk's bytes do not hash to the sha256 it was announced under."""

    code = "chunk_hash"


class UnexpectedChunk(UpdateRejected):
    """A chunk whose hash is not in the file's chunk list."""

    code = "unexpected_chunk"


class DuplicateChunk(UnexpectedChunk):
    """A chunk that was already received (QoS 1 redelivery; callers may ignore it)."""

    code = "duplicate_chunk"


class FileHashMismatch(UpdateRejected):
    """The assembled file's size or sha256 differs from the manifest."""

    code = "file_hash"


class DownloadTimeout(UpdateRejected):
    """Chunks were still missing when the update deadline passed."""

    code = "download_timeout"


class UpdateStalled(UpdateRejected):
    """One step of the updater (a call in verify, install, load, smoke test, activate, a
    chunk write, the manifest check or the health check) ran past ``limits.step_deadline_s``.
    The update is abandoned and its version not retried until a newer manifest."""

    code = "update_stalled"


class ModelLoadFailed(UpdateRejected):
    """The runtime refused to load a verified model file."""

    code = "load_failed"


class GoldenMismatch(UpdateRejected):
    """The golden inputs did not reproduce the golden outputs (a valid but bad model)."""

    code = "golden_mismatch"


class InputsMismatch(UpdateRejected):
    """The model's inputs cannot be fed from this device's configured field mapping."""

    code = "schema_mismatch"
