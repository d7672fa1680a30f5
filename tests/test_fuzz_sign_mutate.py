"""Issue 6.5: sign-then-mutate properties over random manifests and file sets, and golden
signed manifests kept in the repo (tests/golden/).

``verify(wire, files)`` is everything a device checks before a model may be installed: the
manifest's signature and schema (``load_manifest``), then every named file present with the
signed size, sha256 and chunk list, reassembled through the real ``ChunkAssembler`` from the
chunks the file set yields. Hypothesis generates the manifest (fields, floats, unicode),
the file set (1-4 files, nested paths, empty files, chunk sizes) and one mutation; after
any mutation verification must fail (or, for a change outside the signed bytes, yield the
very same signed manifest).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.errors import UpdateRejected
from edge_agent.fsio import FileSystem
from edge_agent.protocol.canonical import canonical_bytes
from edge_agent.protocol.chunks import ChunkAssembler, describe, split
from edge_agent.protocol.manifest import decode_envelope, load_manifest
from registry_sync.signing import sign_manifest
from tests.test_protocol import KEY, OTHER_KEY, trusted

GOLDEN = Path(__file__).parent / "golden"

# ---- generating manifests and file sets ---------------------------------------------------

_segment = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-é", min_size=1, max_size=8
).filter(lambda s: s not in (".", ".."))
_path = st.lists(_segment, min_size=1, max_size=3).map("/".join)
_finite = st.floats(allow_nan=False, allow_infinity=False, width=64)


@st.composite
def file_sets(draw: st.DrawFn) -> tuple[dict[str, bytes], int]:
    paths = draw(st.lists(_path, min_size=1, max_size=4, unique=True))
    # no path may be a directory prefix of another
    paths = [p for p in paths if not any(q != p and q.startswith(p + "/") for q in paths)]
    chunk = draw(st.sampled_from([1, 7, 64, 1000, 4096]))
    files = {p: draw(st.binary(min_size=0, max_size=3000)) for p in paths}
    return files, chunk


@st.composite
def signed_sets(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, bytes]]:
    files, chunk = draw(file_sets())
    model_file = draw(st.sampled_from(sorted(files)))
    signed: dict[str, Any] = {
        "type": "lineside.manifest",
        "schema_version": draw(st.sampled_from(["1.0", "1.7"])),
        "model": draw(st.sampled_from(["pump", "press-3", "ünit"])),
        "version": draw(st.integers(1, 10**6)),
        "selector": draw(st.sampled_from([{"alias": "champion"}, {"stage": "Production"}])),
        "variant": draw(st.sampled_from(["fp32", "int8-dynamic"])),
        "runtime": "onnxruntime",
        "model_file": model_file,
        "files": [describe(p, d, chunk).to_json() for p, d in files.items()],
        "feature_names": draw(st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=4)),
        "outputs": ["label"],
        "classes": None,
        "signature": None,
        "golden": {
            "inputs": [draw(st.lists(_finite, min_size=1, max_size=3))],
            "outputs": {"label": [draw(st.integers(-5, 5))]},
        },
        "baseline": None,
        "targets": {"groups": ["line-3"], "device_classes": []},
        "sequence": draw(st.integers(0, 2**53)),
        "issued_at": 1_764_000_000,
        "expires_at": None,
    }
    return signed, files


def verify(wire: bytes, files: dict[str, bytes], tmp: Path) -> str:
    """Everything the device checks; returns the manifest digest or raises UpdateRejected."""
    manifest = load_manifest(wire, trusted())
    for i, entry in enumerate(manifest.files):
        if entry.path not in files:
            raise UpdateRejected(f"{entry.path} missing")
        asm = ChunkAssembler(entry, tmp / f"{i}.partial", FileSystem())
        seen = set()
        for c in split(files[entry.path], entry.chunk_size):
            cid = hashlib.sha256(c).hexdigest()
            if cid not in seen:
                seen.add(cid)
                asm.add(c, announced=cid)
        asm.finish()
    return manifest.digest


_MUTATIONS = [
    "file-byte",
    "file-append",
    "file-truncate",
    "file-rename",
    "file-drop",
    "file-swap",
    "file-add-to-manifest",
    "path-in-manifest",
    "wire-byte",
]


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    data=signed_sets(),
    mutation=st.sampled_from(_MUTATIONS),
    where=st.integers(0, 2**32),
    byte=st.integers(1, 255),
)
def test_sign_then_mutate_always_fails(
    tmp_path_factory: pytest.TempPathFactory,
    data: tuple[dict[str, Any], dict[str, bytes]],
    mutation: str,
    where: int,
    byte: int,
) -> None:
    signed, files = data
    wire = sign_manifest(signed, KEY)
    tmp = tmp_path_factory.mktemp("v")
    original = verify(wire, files, tmp)  # the unmutated pair verifies
    paths = sorted(files)
    target = paths[where % len(paths)]
    files = dict(files)
    if mutation == "file-byte":
        if not files[target]:
            return
        b = bytearray(files[target])
        b[where % len(b)] ^= byte
        files[target] = bytes(b)
    elif mutation == "file-append":
        files[target] += bytes([byte])
    elif mutation == "file-truncate":
        if not files[target]:
            return
        files[target] = files[target][:-1]
    elif mutation == "file-rename":
        files[target + "x"] = files.pop(target)
    elif mutation == "file-drop":
        del files[target]
    elif mutation == "file-swap":
        other = paths[(where + 1) % len(paths)]
        if files[other] == files[target]:
            return
        files[target], files[other] = files[other], files[target]
    elif mutation in ("file-add-to-manifest", "path-in-manifest"):
        doc = json.loads(wire)
        if mutation == "file-add-to-manifest":
            doc["signed"]["files"].append(describe("extra.bin", bytes([byte]), 64).to_json())
        else:
            entry = doc["signed"]["files"][where % len(doc["signed"]["files"])]
            entry["path"] = entry["path"] + "x"
        wire = json.dumps(doc).encode()
    elif mutation == "wire-byte":
        raw = bytearray(wire)
        i = where % len(raw)
        raw[i] = (raw[i] + byte) % 256
        wire = bytes(raw)
    try:
        digest = verify(wire, files, tmp_path_factory.mktemp("m"))
    except (UpdateRejected, ValueError):
        return
    # Only a change outside the signed bytes (e.g. the case of the keyid's hex) can pass,
    # and then it must be the very same signed manifest.
    assert mutation == "wire-byte" and digest == original, mutation


@settings(max_examples=200, deadline=None)
@given(data=signed_sets())
def test_canonical_form_is_stable_and_signature_covers_it(
    data: tuple[dict[str, Any], dict[str, bytes]],
) -> None:
    signed, _ = data
    wire = sign_manifest(signed, KEY)
    env = decode_envelope(wire)
    assert canonical_bytes(json.loads(env.signed_bytes)) == env.signed_bytes
    # Re-encoding what a device parsed reproduces the signed bytes (and the signature).
    assert sign_manifest(load_manifest(wire, trusted()).to_signed(), KEY) == wire


# ---- golden signed manifests ---------------------------------------------------------------

INDEX = json.loads((GOLDEN / "index.json").read_text())


@pytest.mark.parametrize("name", sorted(INDEX))
def test_golden_manifest_still_verifies_byte_for_byte(name: str, tmp_path: Path) -> None:
    wire = (GOLDEN / f"{name}.wire").read_bytes()
    expected = INDEX[name]
    assert hashlib.sha256(wire).hexdigest() == expected["sha256_wire"], "golden file was edited"
    files = {
        str(p.relative_to(GOLDEN / "files")): p.read_bytes()
        for p in (GOLDEN / "files").rglob("*")
        if p.is_file()
    }
    digest = verify(wire, files, tmp_path)
    m = load_manifest(wire, trusted())
    assert (digest, m.sequence, m.model_sha256) == (
        expected["digest"],
        expected["sequence"],
        expected["model_sha256"],
    )
    env = decode_envelope(wire)
    assert canonical_bytes(json.loads(env.signed_bytes)) == env.signed_bytes
    if name == "two-signatures-rotation":
        # verifiable by a device that trusts only the new key, or only the old one
        assert load_manifest(wire, trusted(OTHER_KEY)).digest == digest
    else:
        # deterministic Ed25519 over the canonical bytes: re-signing today is identical
        assert sign_manifest(m.to_signed(), KEY) == wire


def test_golden_vectors_cover_the_encoding_corners() -> None:
    m = load_manifest((GOLDEN / "minor-1.3-unknown-field.wire").read_bytes(), trusted())
    assert m.extra == {"future_field": {"nested": [1, 2.5, None, True, "ü"]}}
    g = load_manifest((GOLDEN / "multi-file-v1.0.wire").read_bytes(), trusted())
    assert len(g.files) == 3 and any(f.size == 0 for f in g.files)
    assert "température" in g.feature_names and "pressure\tstage" in g.feature_names
    raw = (GOLDEN / "multi-file-v1.0.wire").read_bytes()
    assert b"1e-05" in raw and b"1.5e+16" in raw and b"-0.0" in raw and b'"-inf"' in raw
    u = load_manifest((GOLDEN / "undeploy-keep.wire").read_bytes(), trusted())
    assert u.extra == {"undeployed": True, "on_undeploy": "keep"}
