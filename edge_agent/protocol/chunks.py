"""Content-addressed chunks: split a file, and reassemble it safely on the device.

A chunk's id is the sha256 of its bytes; the manifest lists, per file, the ids
in order (``FileEntry.chunks``). The ``ChunkAssembler`` accepts chunks in any
order (retained messages arrive as the broker likes), checks each one against
its id before touching the disk, refuses chunks that are not part of the file or
already received, writes verified chunks at their offsets in a partial file via
the filesystem seam, and reports what is still missing so a reconnecting agent
subscribes only to those. ``finish`` re-reads the partial file from disk and
checks its size and sha256: the file is verified where it will be used.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

from edge_agent.fsio import FileSystem
from edge_agent.protocol.manifest import FileEntry
from edge_agent.update_errors import (
    ChunkHashMismatch,
    DuplicateChunk,
    FileHashMismatch,
    TooLarge,
    UnexpectedChunk,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "MAX_CHUNK_SIZE",
    "ChunkAssembler",
    "chunk_id",
    "describe",
    "hash_file",
    "split",
]

DEFAULT_CHUNK_SIZE = 64 * 1024
MAX_CHUNK_SIZE = 128 * 1024  # AWS IoT Core caps payloads at 128 KB
_READ_BLOCK = 1024 * 1024


def chunk_id(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def split(data: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE) -> list[bytes]:
    """Cut ``data`` into ``chunk_size`` pieces (the last may be shorter)."""
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size must be in 1..{MAX_CHUNK_SIZE}")
    return [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)]


def describe(path: str, data: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE) -> FileEntry:
    """The manifest entry for a file (used by registry_sync when publishing)."""
    chunks = tuple(chunk_id(c) for c in split(data, chunk_size))
    return FileEntry(path, len(data), hashlib.sha256(data).hexdigest(), chunk_size, chunks)


class ChunkAssembler:
    """Rebuilds one ``FileEntry`` into ``partial`` from chunks arriving in any order."""

    def __init__(self, entry: FileEntry, partial: Path, fs: FileSystem) -> None:
        self.entry = entry
        self.partial = partial
        self._fs = fs
        # The same bytes can occur at several offsets (e.g. zero padding).
        self._offsets: dict[str, list[int]] = {}
        for index, cid in enumerate(entry.chunks):
            self._offsets.setdefault(cid, []).append(index * entry.chunk_size)
        self._received: set[str] = set()

    @property
    def missing(self) -> frozenset[str]:
        """Chunk ids not yet received: what to (re)subscribe to after a reconnect."""
        return frozenset(self._offsets) - self._received

    @property
    def complete(self) -> bool:
        return not self.missing

    @property
    def received_bytes(self) -> int:
        return sum(
            min(self.entry.chunk_size, self.entry.size - off)
            for cid in self._received
            for off in self._offsets[cid]
        )

    def add(self, data: bytes, announced: str | None = None) -> None:
        """Verify and store one chunk; ``announced`` is the id from its topic, if any."""
        if len(data) > min(self.entry.chunk_size, MAX_CHUNK_SIZE):
            raise TooLarge(f"chunk of {len(data)} bytes, chunk_size {self.entry.chunk_size}")
        actual = chunk_id(data)
        if announced is not None and actual != announced:
            raise ChunkHashMismatch(f"chunk announced as {announced[:12]} hashes to {actual[:12]}")
        if actual not in self._offsets:
            raise UnexpectedChunk(f"chunk {actual[:12]} is not part of {self.entry.path!r}")
        if actual in self._received:
            raise DuplicateChunk(f"chunk {actual[:12]} already received")
        for offset in self._offsets[actual]:
            self._fs.write_at(self.partial, offset, data)
        self._received.add(actual)

    def finish(self) -> None:
        """fsync the partial file and verify its size and sha256 as read back from disk."""
        if not self.complete:
            raise FileHashMismatch(f"{self.entry.path!r}: {len(self.missing)} chunks missing")
        if self.entry.size == 0:
            self._fs.write_bytes(self.partial, b"")
        self._fs.fsync(self.partial)
        size, digest = hash_file(self.partial)
        if size != self.entry.size:
            raise FileHashMismatch(f"{self.entry.path!r}: {size} bytes, expected {self.entry.size}")
        if digest != self.entry.sha256:
            raise FileHashMismatch(f"{self.entry.path!r}: sha256 differs from the manifest")


def _blocks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as fh:
        while block := fh.read(_READ_BLOCK):
            yield block


def hash_file(path: Path) -> tuple[int, str]:
    """(size, sha256 hex) of a file, read in blocks."""
    h = hashlib.sha256()
    size = 0
    for block in _blocks(path):
        h.update(block)
        size += len(block)
    return size, h.hexdigest()
