"""Issue 6.4: a generated corpus of tampered artifacts against the real agent (in-process).

Every case starts from a gateway serving v1 (sequence 5) and delivers one tampered update
the way the broker would (retained manifest, then chunks). Pass for each case:

- refused with its specific ``code`` (exactly one event with that code);
- no byte reached a runtime: a spy replaces ``onnxruntime.InferenceSession`` and the LiteRT
  interpreter class, and records any call;
- the active model is unchanged (the serving session and the store's pointer are v1's);
- nothing was installed or activated, and no partial file is left behind.

Delivery faults that are not tampering (the same genuine chunk twice: QoS 1 redelivery;
chunks in another order: retained messages arrive as the broker likes) must instead install
exactly the signed bytes: they are checked separately.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import edge_agent.runtime as runtime_mod
from edge_agent.protocol.chunks import describe
from edge_agent.protocol.ed25519 import PublicKey
from registry_sync.signing import public_key_bytes, sign_manifest
from tests.support.faults import (
    GROUP,
    KEY,
    OTHER_KEY,
    Gateway,
    Release,
    copy_tree,
    leftovers,
    onnx_model,
    release,
    signed_object,
)
from tests.test_protocol import resign_raw

V1 = release(1, sequence=5)
V2 = release(2, sequence=6)
V3 = release(3, sequence=7)


# ---- building tampered inputs -----------------------------------------------------------


def _perturb(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return [*value, value[0]] if value else ["x"]
    if isinstance(value, dict):
        return {**value, "x": 1}
    return 0  # None


def _mutate_after_signing(wire: bytes, mutate: Callable[[dict[str, Any]], None]) -> bytes:
    doc = json.loads(wire)
    mutate(doc)
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def _set_signed(field: str) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        doc["signed"][field] = _perturb(doc["signed"][field])

    return mutate


def _flip_sig(index: int) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        sig = bytearray(bytes.fromhex(doc["signatures"][0]["sig"]))
        sig[index] ^= 0x01
        doc["signatures"][0]["sig"] = sig.hex()

    return mutate


def _signed(files: dict[str, bytes], *, raw: bool = False, key: Any = KEY, **kw: Any) -> bytes:
    kw.setdefault("version", 2)
    kw.setdefault("sequence", 6)
    signed = signed_object(files, **kw)
    return resign_raw(signed, key) if raw else sign_manifest(signed, key)


def _onnx_matmul(w: Any) -> bytes:
    """input[N, 4] x W -> score: a valid graph around an initializer that is not."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 4])
    y = helper.make_tensor_value_info("score", TensorProto.FLOAT, [None, 1])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "W"], ["score"])], "g", [x], [y], [w]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def _onnx_external_data() -> bytes:
    import onnx
    from onnx import TensorProto

    w = onnx.TensorProto()
    w.name, w.data_type = "W", TensorProto.FLOAT
    w.dims.extend([4, 1])
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "../../../../etc/shadow"), ("offset", "0"), ("length", "16")):
        entry = w.external_data.add()
        entry.key, entry.value = k, v
    return _onnx_matmul(w)


def _onnx_absurd_dimension() -> bytes:
    import onnx
    from onnx import TensorProto

    w = onnx.TensorProto()
    w.name, w.data_type = "W", TensorProto.FLOAT
    w.dims.extend([1 << 40, 1 << 20])
    w.raw_data = b"\0" * 16
    return _onnx_matmul(w)


# ---- the corpus -------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    code: str
    run: Callable[[Gateway], None]


def _deliver(
    wire: bytes, files: dict[str, bytes] | None = None, **kw: Any
) -> Callable[[Gateway], None]:
    rel = Release(2, 6, wire, files or V2.files)
    return lambda gw: gw.deliver(rel, **kw)


def _with_chunks(chunks: Callable[[], list[tuple[str, bytes]]]) -> Callable[[Gateway], None]:
    return lambda gw: gw.deliver(V2, chunks=chunks())


def _missing_chunk(gw: Gateway) -> None:
    gw.deliver(V2, chunks=V2.chunks()[1:])
    job = gw.updater._job
    assert job is not None and gw.updater.state.value == "downloading"
    job.deadline = time.monotonic() - 1  # the update deadline passes
    gw.step("tick", None)


def _planted_symlink(gw: Gateway) -> None:
    manifest_obj = json.loads(V2.wire)["signed"]
    sha = manifest_obj["files"][0]["sha256"]
    target = gw.root / "outside.bin"
    target.write_bytes(b"precious")
    d = gw.state_dir / "models" / sha
    d.mkdir(parents=True)
    (d / "model.onnx.partial").symlink_to(target)
    gw.deliver(V2)
    assert target.read_bytes() == b"precious", "the write followed the planted symlink"


def corpus() -> Iterator[Case]:
    signed_fields = sorted(json.loads(V2.wire)["signed"])
    for f in signed_fields:  # one field changed after signing (bit flip in the manifest)
        yield Case(
            f"manifest-{f}-changed",
            "bad_signature",
            _deliver(_mutate_after_signing(V2.wire, _set_signed(f))),
        )
    for i in (0, 17, 31, 32, 50, 63):  # bit flips in R and in S
        yield Case(
            f"signature-bit-{i}",
            "bad_signature",
            _deliver(_mutate_after_signing(V2.wire, _flip_sig(i))),
        )
    for i, (cid, data) in enumerate(V2.chunks()):  # a bit flip in each chunk

        def flipped(i: int = i, cid: str = cid, data: bytes = data) -> list[tuple[str, bytes]]:
            chunks = V2.chunks()
            bad = bytearray(data)
            bad[len(bad) // 2] ^= 0x10
            chunks[i] = (cid, bytes(bad))
            return chunks

        yield Case(f"chunk-{i}-bit-flip", "chunk_hash", _with_chunks(flipped))
    first_id, first = V2.chunks()[0]
    yield Case(
        "chunk-truncated",
        "chunk_hash",
        _with_chunks(lambda: [(first_id, first[:-1]), *V2.chunks()[1:]]),
    )
    yield Case(
        "chunk-extra-bytes",
        "too_large",
        _with_chunks(lambda: [(first_id, first + b"\0"), *V2.chunks()[1:]]),
    )
    yield Case(
        "chunk-from-another-version",
        "chunk_hash",
        _with_chunks(lambda: [(first_id, V3.chunks()[0][1]), *V2.chunks()[1:]]),
    )
    yield Case("chunk-missing", "download_timeout", _missing_chunk)

    def relist(change: Callable[[list[str]], list[str]]) -> bytes:
        signed = json.loads(V2.wire)["signed"]
        signed["files"][0]["chunks"] = change(list(signed["files"][0]["chunks"]))
        return resign_raw(signed)

    yield Case(
        "signed-list-chunks-reordered",
        "file_hash",
        _deliver(relist(lambda c: [c[1], c[0], *c[2:]])),
    )
    yield Case(
        "signed-list-chunk-duplicated",
        "file_hash",
        _deliver(relist(lambda c: [c[0], c[0], *c[2:]])),
    )
    foreign = relist(lambda c: [V3.chunks()[0][0], *c[1:]])
    yield Case(
        "signed-list-chunk-from-another-version",
        "file_hash",  # the broker retains v3's chunk too: it is delivered, hashes fine
        lambda gw: gw.deliver(
            Release(2, 6, foreign, V2.files), chunks=[V3.chunks()[0], *V2.chunks()[1:]]
        ),
    )
    yield Case(
        "signed-list-extra-chunk", "malformed_manifest", _deliver(relist(lambda c: [*c, c[0]]))
    )
    yield Case(
        "signed-list-missing-chunk", "malformed_manifest", _deliver(relist(lambda c: c[:-1]))
    )

    # keys
    wrong = json.loads(sign_manifest(json.loads(V2.wire)["signed"], OTHER_KEY))
    wrong["signatures"][0]["keyid"] = PublicKey(public_key_bytes(KEY)).key_id
    yield Case("wrong-key-claims-trusted-id", "bad_signature", _deliver(json.dumps(wrong).encode()))
    yield Case("unknown-key", "unknown_key", _deliver(_signed(V2.files, key=OTHER_KEY)))
    yield Case(
        "keyid-bit-flip",
        "unknown_key",
        _deliver(
            _mutate_after_signing(
                V2.wire, lambda d: d["signatures"][0].__setitem__("keyid", "0" * 16)
            )
        ),
    )
    # freshness, sequence
    yield Case(
        "expired",
        "expired",
        _deliver(_signed(V2.files, issued_at=1_764_000_000, expires_at=1_764_000_010)),
    )
    yield Case("lower-sequence", "replayed_sequence", _deliver(_signed(V2.files, sequence=4)))
    yield Case("equal-sequence", "replayed_sequence", _deliver(_signed(V2.files, sequence=5)))
    yield Case(
        "same-version-other-hash",
        "replayed_sequence",
        _deliver(_signed(V2.files, version=1, sequence=5)),
    )
    # caps and targets
    huge = 65 * 1024 * 1024

    def over_cap(doc: dict[str, Any]) -> None:
        entry = doc["files"][0]
        entry.update(size=huge, chunk_size=131072, chunks=[entry["chunks"][0]] * (huge // 131072))

    signed = json.loads(V2.wire)["signed"]
    over_cap(signed)
    yield Case("declared-length-over-cap", "too_large", _deliver(resign_raw(signed)))
    yield Case(
        "other-group-on-our-topic",
        "wrong_target",
        _deliver(_signed(V2.files, targets={"groups": ["line-9"], "device_classes": []})),
    )
    other = _signed(V2.files, targets={"groups": ["line-9"], "device_classes": []})
    yield Case(
        "other-group-topic",
        "wrong_target",
        lambda gw: gw.deliver(Release(2, 6, other, V2.files), group="line-9"),
    )
    yield Case(
        "other-device-class",
        "wrong_target",
        _deliver(_signed(V2.files, targets={"groups": [GROUP], "device_classes": ["plc-x"]})),
    )
    # hostile model files (properly signed)
    ext = {"model.onnx": _onnx_external_data()}
    yield Case(
        "onnx-external-data-outside-bundle",
        "unsafe_model",
        _deliver(_signed(ext, golden=None), ext),
    )
    absurd = {"model.onnx": _onnx_absurd_dimension()}
    yield Case(
        "onnx-absurd-tensor-dimension",
        "unsafe_model",
        _deliver(_signed(absurd, golden=None), absurd),
    )
    yield Case(
        "manifest-path-escapes-bundle",
        "unsafe_model",
        _deliver(
            resign_raw(
                signed_object(
                    {"../model.onnx": V2.files["model.onnx"]},
                    version=2,
                    sequence=6,
                    model_file="../model.onnx",
                )
            )
        ),
    )
    yield Case("planted-symlink-at-partial-file", "unsafe_model", _planted_symlink)
    tfl = {"model.tflite": b"\x1c\x00\x00\x00TFL3" + bytes(range(256)) * 8}
    tfl_wire = _signed(
        tfl, model_file="model.tflite", runtime="tflite", variant="tflite-fp32", golden=None
    )

    def corrupt_tflite(gw: Gateway) -> None:
        rel = Release(2, 6, tfl_wire, tfl)
        chunks = [(cid, b"\xff" + data[1:]) for cid, data in rel.chunks()]
        gw.deliver(rel, chunks=chunks)

    yield Case("tflite-buffer-corrupted", "chunk_hash", corrupt_tflite)


CASES = list(corpus())


# ---- running a case ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("attack-template")
    gw = Gateway(root, variants=("onnx-fp32", "tflite-fp32"))
    gw.deliver(V1)
    assert gw.active_sha() == V1.sha256
    gw.close()
    return root


class RuntimeSpy:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import onnxruntime

        self.calls: list[str] = []
        real = onnxruntime.InferenceSession

        def session(path: Any, *a: Any, **kw: Any) -> Any:
            self.calls.append(f"onnxruntime:{path}")
            return real(path, *a, **kw)

        class Interpreter:
            def __init__(inner, model_path: str = "", **kw: Any) -> None:  # noqa: N805
                self.calls.append(f"tflite:{model_path}")
                raise ValueError("spy: the interpreter must never be reached")

        monkeypatch.setattr(onnxruntime, "InferenceSession", session)
        monkeypatch.setattr(runtime_mod, "_tflite_interpreter_class", lambda: Interpreter)


def _run(case: Case, template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Gateway:
    gw = Gateway(copy_tree(template, tmp_path / "gw"), variants=("onnx-fp32", "tflite-fp32"))
    before = len(gw.events())
    spy = RuntimeSpy(monkeypatch)
    case.run(gw)
    gw.spy_calls = spy.calls  # type: ignore[attr-defined]
    gw.new_events = gw.events()[before:]  # type: ignore[attr-defined]
    return gw


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_tampered_artifact_is_refused_before_any_runtime(
    case: Case, template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = _run(case, template, tmp_path, monkeypatch)
    try:
        codes = [e["code"] for e in gw.new_events]  # type: ignore[attr-defined]
        assert codes.count(case.code) == 1, codes
        assert not {"installed", "activated"} & set(codes), codes
        assert gw.spy_calls == [], gw.spy_calls  # type: ignore[attr-defined]
        assert gw.active_sha() == V1.sha256
        active = gw.store.active("pump")
        assert active is not None and active.sha256 == V1.sha256
        assert gw.store.accepted_sequence(GROUP, "pump") == 5
        assert gw.updater.state.value == "idle"
        assert not leftovers(gw.state_dir), leftovers(gw.state_dir)
        gw.predict()  # still serving
    finally:
        gw.close()


def test_corpus_covers_every_refusal_kind_of_the_issue() -> None:
    codes = {c.code for c in CASES}
    assert {
        "bad_signature",
        "unknown_key",
        "chunk_hash",
        "too_large",
        "download_timeout",
        "file_hash",
        "malformed_manifest",
        "expired",
        "replayed_sequence",
        "wrong_target",
        "unsafe_model",
    } <= codes
    assert len(CASES) >= 50


@pytest.mark.parametrize("order", ["reversed", "each-twice", "duplicates-interleaved"])
def test_benign_delivery_faults_install_exactly_the_signed_bytes(
    order: str, template: Path, tmp_path: Path
) -> None:
    chunks = V2.chunks()
    delivery = {
        "reversed": chunks[::-1],
        "each-twice": [c for c in chunks for _ in (0, 1)],
        "duplicates-interleaved": chunks + chunks[:3],
    }[order]
    gw = Gateway(copy_tree(template, tmp_path / "gw"), variants=("onnx-fp32", "tflite-fp32"))
    try:
        gw.deliver(V2, chunks=delivery)
        assert gw.active_sha() == V2.sha256
        active = gw.store.active("pump")
        assert active is not None and active.model_path.read_bytes() == V2.files["model.onnx"]
        assert [e["code"] for e in gw.events()].count("activated") == 2
        np.testing.assert_allclose(
            gw.predict([0.5, 21.0, 1.5, 3.0]),
            np.asarray(json.loads(V2.wire)["signed"]["golden"]["outputs"]["score"][:1]),
            rtol=1e-4,
        )
    finally:
        gw.close()


def test_describe_matches_chunks_used_by_corpus() -> None:
    entry = describe("model.onnx", onnx_model(2), 4096)
    assert [c for c, _ in V2.chunks()] == list(dict.fromkeys(entry.chunks))
