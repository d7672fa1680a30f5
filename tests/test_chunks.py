"""Chunked transfer: split, and reassemble in any order with every chunk verified."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.fsio import CrashingFS, FileSystem
from edge_agent.protocol.chunks import (
    DEFAULT_CHUNK_SIZE,
    MAX_CHUNK_SIZE,
    ChunkAssembler,
    chunk_id,
    describe,
    split,
)
from edge_agent.update_errors import (
    ChunkHashMismatch,
    DuplicateChunk,
    FileHashMismatch,
    TooLarge,
    UnexpectedChunk,
)

DATA = bytes(random.Random(7).randbytes(10_000))


def _assembler(tmp_path: Path, data: bytes = DATA, size: int = 1024) -> ChunkAssembler:
    return ChunkAssembler(describe("model.onnx", data, size), tmp_path / "m.partial", FileSystem())


def test_split_sizes() -> None:
    chunks = split(DATA, 4096)
    assert [len(c) for c in chunks] == [4096, 4096, 1808]
    assert b"".join(chunks) == DATA
    assert split(b"") == []
    assert len(split(b"x" * DEFAULT_CHUNK_SIZE)) == 1
    for bad in (0, MAX_CHUNK_SIZE + 1):
        with pytest.raises(ValueError):
            split(DATA, bad)


def test_describe_matches_hashes() -> None:
    entry = describe("model.onnx", DATA, 4096)
    assert entry.size == len(DATA) and entry.sha256 == hashlib.sha256(DATA).hexdigest()
    assert entry.chunks == tuple(chunk_id(c) for c in split(DATA, 4096))


def test_reassembles_in_any_order(tmp_path: Path) -> None:
    asm = _assembler(tmp_path)
    chunks = split(DATA, 1024)
    random.Random(1).shuffle(chunks)
    for c in chunks:
        asm.add(c, chunk_id(c))
    asm.finish()
    assert asm.partial.read_bytes() == DATA and asm.complete


def test_tracks_missing_for_resume_after_reconnect(tmp_path: Path) -> None:
    asm = _assembler(tmp_path)
    chunks = split(DATA, 1024)
    for c in chunks[::2]:
        asm.add(c)
    assert asm.missing == {chunk_id(c) for c in chunks[1::2]}
    assert asm.received_bytes == sum(len(c) for c in chunks[::2])
    # "Reconnect": the broker re-sends retained chunks we already have, then the rest.
    for c in chunks[::2]:
        with pytest.raises(DuplicateChunk):
            asm.add(c)
    for c in chunks[1::2]:
        asm.add(c)
    asm.finish()
    assert asm.partial.read_bytes() == DATA


def test_corrupt_chunk_is_refused_and_nothing_written(tmp_path: Path) -> None:
    asm = _assembler(tmp_path)
    good = split(DATA, 1024)[3]
    bad = bytes([good[0] ^ 1]) + good[1:]
    with pytest.raises(ChunkHashMismatch) as info:
        asm.add(bad, chunk_id(good))
    assert info.value.code == "chunk_hash"
    assert not asm.partial.exists() and chunk_id(good) in asm.missing


def test_unknown_chunk_is_refused(tmp_path: Path) -> None:
    asm = _assembler(tmp_path)
    stray = b"a chunk of some other model"
    with pytest.raises(UnexpectedChunk) as info:
        asm.add(stray, chunk_id(stray))
    assert info.value.code == "unexpected_chunk"
    assert not asm.partial.exists() and len(asm.missing) == 10


def test_chunk_from_another_version_is_refused(tmp_path: Path) -> None:
    # Mix-and-match: a chunk of v2 at the same index as v1's.
    v2 = DATA[:2048] + b"\0" * 1024 + DATA[3072:]
    asm = _assembler(tmp_path)
    with pytest.raises(UnexpectedChunk):
        asm.add(split(v2, 1024)[2])


def test_duplicate_chunk_is_refused_without_rewrite(tmp_path: Path) -> None:
    fs = CrashingFS()
    asm = ChunkAssembler(describe("m", DATA, 1024), tmp_path / "m.partial", fs)
    c = split(DATA, 1024)[0]
    asm.add(c)
    writes = fs.calls
    with pytest.raises(DuplicateChunk) as info:
        asm.add(c)
    assert info.value.code == "duplicate_chunk" and isinstance(info.value, UnexpectedChunk)
    assert fs.calls == writes


def test_oversize_chunk_is_refused_before_hashing(tmp_path: Path) -> None:
    asm = _assembler(tmp_path)
    with pytest.raises(TooLarge):
        asm.add(b"x" * 1025)


def test_repeated_content_fills_every_offset(tmp_path: Path) -> None:
    data = b"\0" * 3000 + b"tail"
    asm = _assembler(tmp_path, data)
    assert len(asm.missing) == 2  # three zero chunks share one id
    for c in {chunk_id(c): c for c in split(data, 1024)}.values():
        asm.add(c)
    asm.finish()
    assert asm.partial.read_bytes() == data


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    asm = _assembler(tmp_path)
    for c in split(DATA, 1024):
        asm.add(c)
    with asm.partial.open("r+b") as fh:  # the disk lost the tail
        fh.truncate(len(DATA) - 100)
    with pytest.raises(FileHashMismatch) as info:
        asm.finish()
    assert info.value.code == "file_hash"


def test_bit_rot_on_disk_is_caught_at_finish(tmp_path: Path) -> None:
    asm = _assembler(tmp_path)
    for c in split(DATA, 1024):
        asm.add(c)
    raw = bytearray(asm.partial.read_bytes())
    raw[5000] ^= 0x40
    asm.partial.write_bytes(bytes(raw))
    with pytest.raises(FileHashMismatch, match="sha256"):
        asm.finish()


def test_finish_with_missing_chunks_is_refused(tmp_path: Path) -> None:
    asm = _assembler(tmp_path)
    asm.add(split(DATA, 1024)[0])
    with pytest.raises(FileHashMismatch, match="missing"):
        asm.finish()


def test_empty_file(tmp_path: Path) -> None:
    asm = _assembler(tmp_path, b"")
    assert asm.complete
    asm.finish()
    assert asm.partial.read_bytes() == b""


def test_writes_go_through_the_seam(tmp_path: Path) -> None:
    fs = CrashingFS()
    asm = ChunkAssembler(describe("m", DATA, 1024), tmp_path / "m.partial", fs)
    for c in split(DATA, 1024):
        asm.add(c)
    asm.finish()
    assert [op for op, _ in fs.log] == ["write_at"] * 10 + ["fsync"]


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    data=st.binary(max_size=6000),
    size=st.integers(1, 2048),
    seed=st.integers(0, 2**32),
)
def test_any_order_any_size_round_trips(tmp_path: Path, data: bytes, size: int, seed: int) -> None:
    partial = tmp_path / f"{seed}-{size}.partial"
    partial.unlink(missing_ok=True)
    asm = ChunkAssembler(describe("m", data, size), partial, FileSystem())
    unique = list({chunk_id(c): c for c in split(data, size)}.values())
    random.Random(seed).shuffle(unique)
    for c in unique:
        asm.add(c)
    asm.finish()
    assert partial.read_bytes() == data
