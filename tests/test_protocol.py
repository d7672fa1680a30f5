"""Topics, canonical JSON and the signed manifest (parse, caps, signatures).

Also holds the small manifest builders that test_trust and test_store import.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.protocol.canonical import CanonicalError, canonical_bytes
from edge_agent.protocol.chunks import describe
from edge_agent.protocol.ed25519 import PublicKey
from edge_agent.protocol.manifest import (
    Limits,
    decode_envelope,
    load_manifest,
    parse_signed,
    verify_envelope,
)
from edge_agent.protocol.onnx_scan import check_no_external_data
from edge_agent.protocol.topics import DEFAULT_ROOT, TopicError, Topics, validate_id
from edge_agent.update_errors import (
    BadSignature,
    MalformedManifest,
    TooLarge,
    UnknownKey,
    UnsafeModel,
    UnsupportedManifestVersion,
    UpdateRejected,
)
from registry_sync.signing import public_key_bytes, sign_manifest

# Deterministic keys (RFC 8032 test secrets) so golden bytes are stable.
KEY = Ed25519PrivateKey.from_private_bytes(
    bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
)
OTHER_KEY = Ed25519PrivateKey.from_private_bytes(
    bytes.fromhex("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb")
)
ISSUED = 1_764_000_000
MODEL_BYTES = b"\x08\x07onnx-model-bytes" * 300  # 5,400 bytes: 6 chunks of 1 KiB


def trusted(*keys: Ed25519PrivateKey) -> dict[str, PublicKey]:
    out = {}
    for k in keys or (KEY,):
        pub = PublicKey(public_key_bytes(k))
        out[pub.key_id] = pub
    return out


def make_signed(model_bytes: bytes = MODEL_BYTES, **overrides: Any) -> dict[str, Any]:
    """A valid ``signed`` object; keyword arguments replace top-level fields."""
    entry = describe("model.onnx", model_bytes, chunk_size=1024)
    signed: dict[str, Any] = {
        "type": "lineside.manifest",
        "schema_version": "1.0",
        "model": "pump",
        "version": 3,
        "selector": {"alias": "champion"},
        "variant": "fp32",
        "runtime": "onnxruntime",
        "model_file": "model.onnx",
        "files": [entry.to_json()],
        "feature_names": ["vibration", "temperature"],
        "outputs": ["label", "score"],
        "classes": None,
        "targets": {"groups": ["line-3"], "device_classes": []},
        "sequence": 1,
        "issued_at": ISSUED,
        "expires_at": None,
        "signature": {"inputs": [{"type": "double", "name": "vibration", "required": True}]},
        "golden": {"inputs": [[0.5, 21.0]], "outputs": {"label": [1]}, "atol": 1e-4, "rtol": 1e-3},
        "baseline": {"features": [{"name": "vibration", "edges": ["-inf", 0.1, "inf"]}]},
    }
    signed.update(overrides)
    return signed


def wire(signed: dict[str, Any] | None = None, key: Ed25519PrivateKey = KEY) -> bytes:
    return sign_manifest(signed if signed is not None else make_signed(), key)


def resign_raw(signed: dict[str, Any], key: Ed25519PrivateKey = KEY) -> bytes:
    """Sign without the server's schema check, to build manifests the server would refuse."""
    payload = canonical_bytes(signed)
    sigs = [{"keyid": PublicKey(public_key_bytes(key)).key_id, "sig": key.sign(payload).hex()}]
    return canonical_bytes({"signed": signed, "signatures": sigs})


# --- topics ---------------------------------------------------------------------


def test_topics_build_and_parse_round_trip() -> None:
    t = Topics()
    assert t.manifest("line-3", "pump") == f"{DEFAULT_ROOT}/manifests/line-3/pump"
    sha = "ab" * 32
    assert t.chunk(sha) == f"{DEFAULT_ROOT}/chunks/{sha}"
    assert t.state("pi-7") == f"{DEFAULT_ROOT}/devices/pi-7/state"
    parsed = t.parse(t.manifest("line-3", "pump"))
    assert (parsed.kind, parsed.group, parsed.model) == ("manifest", "line-3", "pump")
    assert t.parse(t.chunk(sha)).sha256 == sha
    for channel in ("state", "telemetry", "predictions", "events", "cmd"):
        p = t.parse(t.device("pi-7", channel))
        assert (p.kind, p.device) == (channel, "pi-7")
    assert t.manifests_filter() == f"{DEFAULT_ROOT}/manifests/+/+"


def test_topics_custom_root() -> None:
    t = Topics("plant/a")
    assert t.events("d1") == "plant/a/devices/d1/events"
    with pytest.raises(TopicError):
        Topics().parse("plant/a/devices/d1/events")
    for bad_root in ("", "/x", "x/", "a/+/b"):
        with pytest.raises(TopicError):
            Topics(bad_root)


@pytest.mark.parametrize("bad", ["", "a+b", "a#", "a/b", "a\x00b", "tab\t", "$SYS", "x" * 65])
def test_ids_with_wildcards_separators_or_control_chars_are_refused(bad: str) -> None:
    with pytest.raises(TopicError):
        validate_id(bad)
    with pytest.raises(TopicError):
        Topics().manifest(bad, "pump")


def test_parse_refuses_foreign_or_malformed_topics() -> None:
    t = Topics()
    for topic in (
        f"{DEFAULT_ROOT}/chunks/XYZ",
        f"{DEFAULT_ROOT}/chunks/{'AB' * 32}",
        f"{DEFAULT_ROOT}/manifests/g",
        f"{DEFAULT_ROOT}/devices/d/unknown",
        f"{DEFAULT_ROOT}/devices/d/state/extra",
        "other/v1/manifests/g/m",
    ):
        with pytest.raises(TopicError):
            t.parse(topic)
    with pytest.raises(TopicError):
        t.chunk("not-a-hash")


# --- canonical JSON -------------------------------------------------------------


def test_canonical_sorts_keys_without_whitespace_in_utf8() -> None:
    value = {"b": [1, 2.5, "é\n"], "a": {"z": None, "y": True}, "c": False}
    assert (
        canonical_bytes(value) == '{"a":{"y":true,"z":null},"b":[1,2.5,"é\\n"],"c":false}'.encode()
    )


def test_canonical_floats_are_shortest_round_trip() -> None:
    assert canonical_bytes([1.0, 0.1, 1e-5, 1e16, 123456789012345.6, -0.0, 10**20]) == (
        b"[1.0,0.1,1e-05,1e+16,123456789012345.6,-0.0,100000000000000000000]"
    )


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), {1: "x"}, b"x", {1, 2}])
def test_canonical_rejects_values_without_encoding(bad: object) -> None:
    with pytest.raises(CanonicalError):
        canonical_bytes({"v": bad})


def test_canonical_rejects_lone_surrogates() -> None:
    with pytest.raises(CanonicalError):
        canonical_bytes("\ud800")


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None)
@given(json_values)
def test_canonical_is_stable_through_parse(value: object) -> None:
    encoded = canonical_bytes(value)
    assert canonical_bytes(json.loads(encoded)) == encoded


# --- manifest: happy path and wire format ---------------------------------------


def test_signed_manifest_loads_with_all_fields() -> None:
    m = load_manifest(wire(), trusted())
    assert (m.model, m.version, m.variant, m.runtime) == ("pump", 3, "fp32", "onnxruntime")
    assert (m.selector.kind, m.selector.value) == ("alias", "champion")
    assert m.model_file == "model.onnx" and m.model_entry.size == len(MODEL_BYTES)
    assert len(m.model_entry.chunks) == 6 and m.model_entry.chunk_size == 1024
    assert m.target_groups == ("line-3",) and m.target_device_classes == ()
    assert m.sequence == 1 and m.issued_at == ISSUED and m.expires_at is None
    assert m.key_id == PublicKey(public_key_bytes(KEY)).key_id
    assert m.golden is not None and m.golden["atol"] == 1e-4
    assert len(m.digest) == 64


def test_wire_format_is_canonical_envelope() -> None:
    raw = wire()
    doc = json.loads(raw)
    assert set(doc) == {"signed", "signatures"}
    assert canonical_bytes(doc) == raw
    (sig,) = doc["signatures"]
    assert set(sig) == {"keyid", "sig"} and len(sig["sig"]) == 128


def test_to_signed_round_trips() -> None:
    m = load_manifest(wire(), trusted())
    assert parse_signed(m.to_signed()) == parse_signed(make_signed())
    assert canonical_bytes(m.to_signed()) == canonical_bytes(make_signed())


GOLDEN_WIRE = (
    b'{"signatures":[{"keyid":"21fe31dfa154a261","sig":"f60698ae17455b224756f3c27dc2ce7bade8ce'
    b"f17cb8832cbaea3ffe72f11e09e9fee599d613d17055696cd47348c91f7257babcca12c180656209d0c253fc"
    b'05"}],"signed":{"baseline":null,"classes":null,"expires_at":null,"feature_names":["vibra'
    b'tion","temperature"],"files":[{"chunk_size":1024,"chunks":["dd56de4137951d9c92681b03416e'
    b'c15f886b4482a27e3a517d32f085244cbe5d"],"path":"model.onnx","sha256":"dd56de4137951d9c926'
    b'81b03416ec15f886b4482a27e3a517d32f085244cbe5d","size":6}],"golden":{"atol":0.0001,"input'
    b's":[[0.5,21.0]],"outputs":{"label":[1]},"rtol":0.001},"issued_at":1764000000,"model":"pu'
    b'mp","model_file":"model.onnx","outputs":["label","score"],"runtime":"onnxruntime","schem'
    b'a_version":"1.0","selector":{"alias":"champion"},"sequence":7,"signature":null,"targets"'
    b':{"device_classes":[],"groups":["line-3"]},"type":"lineside.manifest","variant":"fp32","'
    b'version":3}}'
)


def test_golden_manifest_from_earlier_release_keeps_verifying() -> None:
    # Signed once with KEY (sha256 prefix 21fe31df...). If canonical encoding or
    # parsing changes, manifests retained on brokers would stop verifying.
    m = load_manifest(GOLDEN_WIRE, trusted())
    assert (m.sequence, m.model_entry.size, m.golden) == (
        7,
        6,
        {"atol": 0.0001, "inputs": [[0.5, 21.0]], "outputs": {"label": [1]}, "rtol": 0.001},
    )
    # Deterministic Ed25519 + canonical JSON: re-signing today gives the same bytes.
    assert wire(m.to_signed()) == GOLDEN_WIRE


def test_unknown_fields_are_ignored_but_signed() -> None:
    signed = make_signed(future_field={"x": 1})
    m = load_manifest(wire(signed), trusted())
    assert m.extra == {"future_field": {"x": 1}}
    assert m.to_signed()["future_field"] == {"x": 1}


def test_minor_version_bump_is_accepted() -> None:
    assert load_manifest(resign_raw(make_signed(schema_version="1.7")), trusted())


# --- manifest: attacks ----------------------------------------------------------


def test_malformed_json_is_refused() -> None:
    with pytest.raises(MalformedManifest) as info:
        load_manifest(b'{"signed": {', trusted())
    assert info.value.code == "malformed_manifest"


@pytest.mark.parametrize(
    "raw",
    [
        b"[]",
        b"\xff\xfe",
        b'{"signed": {}, "signatures": []}',
        b'{"signed": [], "signatures": [{"keyid": "00", "sig": "00"}]}',
        b'{"signed": {"a": NaN}, "signatures": [{"keyid": "0000000000000000", "sig": "0"}]}',
        b"[" * 100_000,
        b'{"a": 1' + b"0" * 5000 + b"}",
    ],
)
def test_malformed_envelopes_are_refused(raw: bytes) -> None:
    with pytest.raises(MalformedManifest):
        load_manifest(raw, trusted())


def test_duplicate_keys_are_refused() -> None:
    # A parser that keeps the first "sequence" and one that keeps the last would
    # disagree about what was signed.
    raw = wire()
    doctored = raw.replace(b'"sequence":1', b'"sequence":1,"sequence":99')
    assert doctored != raw
    with pytest.raises(MalformedManifest, match="duplicate"):
        load_manifest(doctored, trusted())


def test_oversize_manifest_is_refused_before_parsing() -> None:
    raw = wire()
    limits = Limits(max_manifest_bytes=len(raw) - 1)
    with pytest.raises(TooLarge) as info:
        load_manifest(raw, trusted(), limits)
    assert info.value.code == "too_large"
    with pytest.raises(TooLarge):
        load_manifest(b" " * (Limits().max_manifest_bytes + 1), trusted())


def test_bad_signature_is_refused() -> None:
    doc = json.loads(wire())
    doc["signed"]["sequence"] = 2  # content changed after signing
    with pytest.raises(BadSignature) as info:
        load_manifest(canonical_bytes(doc), trusted())
    assert info.value.code == "bad_signature"


def test_unknown_key_is_refused() -> None:
    with pytest.raises(UnknownKey) as info:
        load_manifest(wire(key=OTHER_KEY), trusted(KEY))
    assert info.value.code == "unknown_key"


def test_keyid_claiming_trusted_key_with_foreign_signature_is_bad_signature() -> None:
    doc = json.loads(wire(key=OTHER_KEY))
    doc["signatures"][0]["keyid"] = PublicKey(public_key_bytes(KEY)).key_id
    with pytest.raises(BadSignature):
        load_manifest(canonical_bytes(doc), trusted(KEY))


def test_one_good_signature_among_several_is_enough() -> None:
    doc = json.loads(wire(key=KEY))
    other = json.loads(wire(key=OTHER_KEY))["signatures"][0]
    doc["signatures"].insert(0, other)
    assert load_manifest(canonical_bytes(doc), trusted(KEY)).key_id == doc["signatures"][1]["keyid"]


def test_unknown_major_version_is_refused() -> None:
    raw = resign_raw(make_signed(schema_version="2.0"))
    with pytest.raises(UnsupportedManifestVersion) as info:
        load_manifest(raw, trusted())
    assert info.value.code == "unsupported_version"


def test_signature_is_checked_before_the_schema() -> None:
    # Untrusted garbage never reaches the schema parser.
    raw = resign_raw(make_signed(schema_version="2.0"), key=OTHER_KEY)
    with pytest.raises(UnknownKey):
        load_manifest(raw, trusted(KEY))


@pytest.mark.parametrize(
    "path",
    [
        "../evil.onnx",
        "/etc/passwd",
        "a/../../b",
        "a\\b",
        "./m.onnx",
        "a//b",
        "C:x",
        "manifest.json",
    ],
)
def test_paths_leaving_the_bundle_are_unsafe(path: str) -> None:
    signed = make_signed()
    signed["files"][0]["path"] = path
    signed["model_file"] = path
    with pytest.raises(UnsafeModel) as info:
        load_manifest(resign_raw(signed), trusted())
    assert info.value.code == "unsafe_model"


def test_file_below_another_file_is_unsafe() -> None:
    signed = make_signed()
    extra = describe("model.onnx/x", b"data", 1024).to_json()
    signed["files"].append(extra)
    with pytest.raises(UnsafeModel):
        load_manifest(resign_raw(signed), trusted())


def test_too_many_files_is_refused() -> None:
    signed = make_signed()
    signed["files"] += [describe(f"f{i}.bin", b"x", 1024).to_json() for i in range(40)]
    with pytest.raises(TooLarge):
        load_manifest(resign_raw(signed), trusted())


def test_chunk_size_above_128_kib_is_refused() -> None:
    data = b"x" * 200_000
    signed = make_signed(model_bytes=data)
    entry = describe("model.onnx", data, 128 * 1024).to_json()
    entry["chunk_size"] = 128 * 1024 + 1
    signed["files"] = [entry]
    with pytest.raises(TooLarge):
        load_manifest(resign_raw(signed), trusted())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("runtime", "pytorch"),
        ("model_file", "other.onnx"),
        ("sequence", -1),
        ("sequence", True),
        ("version", "3"),
        ("issued_at", 1.5),
        ("expires_at", ISSUED - 1),
        ("targets", {"groups": []}),
        ("targets", {"groups": ["a/b"]}),
        ("selector", {"alias": "a", "stage": "b"}),
        ("model", "pu+mp"),
        ("classes", [True]),
        ("type", "something-else"),
        ("schema_version", 1),
        ("schema_version", "1"),
    ],
)
def test_invalid_fields_are_malformed(field: str, value: object) -> None:
    signed = make_signed()
    signed[field] = value
    with pytest.raises(MalformedManifest):
        load_manifest(resign_raw(signed), trusted())


def test_chunk_list_must_cover_the_size() -> None:
    signed = make_signed()
    signed["files"][0]["chunks"] = signed["files"][0]["chunks"][:-1]
    with pytest.raises(MalformedManifest, match="cover"):
        load_manifest(resign_raw(signed), trusted())


def test_verify_envelope_reports_the_key_used() -> None:
    env = decode_envelope(wire())
    assert verify_envelope(env, trusted()) == PublicKey(public_key_bytes(KEY)).key_id


# --- sign-then-mutate -----------------------------------------------------------

_SIGNED = wire()
_ENVELOPE = decode_envelope(_SIGNED)


@settings(max_examples=200, deadline=None)
@given(index=st.integers(min_value=0), bit=st.integers(0, 7), target=st.sampled_from(["p", "s"]))
def test_mutating_one_byte_of_payload_or_signature_fails(index: int, bit: int, target: str) -> None:
    payload = bytearray(_ENVELOPE.signed_bytes)
    sig = bytearray(_ENVELOPE.signatures[0].sig)
    blob = payload if target == "p" else sig
    blob[index % len(blob)] ^= 1 << bit
    key = next(iter(trusted().values()))
    assert not key.verify(bytes(sig), bytes(payload))


@settings(max_examples=100, deadline=None)
@given(index=st.integers(min_value=0), byte=st.integers(0, 255))
def test_mutating_one_byte_of_the_wire_manifest_never_yields_a_different_manifest(
    index: int, byte: int
) -> None:
    raw = bytearray(_SIGNED)
    i = index % len(raw)
    if raw[i] == byte:
        return
    raw[i] = byte
    try:
        m = load_manifest(bytes(raw), trusted())
    except UpdateRejected:
        return
    # Only changes outside the signed content (e.g. in the keyid's case) could
    # survive; the accepted manifest must be the original one.
    assert m.digest == _ENVELOPE.digest


def test_make_signed_is_not_shared_state() -> None:
    a = make_signed()
    b = copy.deepcopy(a)
    a["files"][0]["path"] = "x"
    assert make_signed() == b


# --- ONNX external data ---------------------------------------------------------


def _pb_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _pb(field: int, payload: bytes | int) -> bytes:
    if isinstance(payload, int):
        return _pb_varint(field << 3) + _pb_varint(payload)
    return _pb_varint(field << 3 | 2) + _pb_varint(len(payload)) + payload


def _tensor(*, external: bool, location_field: bool = False) -> bytes:
    t = _pb(1, 4) + _pb(2, 1) + _pb(8, b"W") + _pb(9, b"\0" * 16)
    if external:
        t += _pb(14, 1)
    if location_field:
        t += _pb(13, _pb(1, b"location") + _pb(2, b"../../etc/shadow"))
    return t


def _scan(tmp_path: Path, model: bytes) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(model)
    check_no_external_data(path)


def test_onnx_without_external_data_passes(tmp_path: Path) -> None:
    graph = _pb(1, _pb(4, b"MatMul")) + _pb(5, _tensor(external=False))
    _scan(tmp_path, _pb(1, 8) + _pb(7, graph) + _pb(8, _pb(2, 17)))


@pytest.mark.parametrize(
    "model",
    [
        # initializer with data_location = EXTERNAL
        _pb(7, _pb(5, _tensor(external=True))),
        # initializer carrying only external_data entries
        _pb(7, _pb(5, _tensor(external=False, location_field=True))),
        # a Constant node's tensor attribute
        _pb(7, _pb(1, _pb(5, _pb(1, b"value") + _pb(5, _tensor(external=True))))),
        # inside an If branch subgraph
        _pb(7, _pb(1, _pb(5, _pb(6, _pb(5, _tensor(external=True)))))),
        # a sparse initializer's values
        _pb(7, _pb(15, _pb(1, _tensor(external=True)))),
        # inside a model-local function
        _pb(25, _pb(7, _pb(5, _pb(5, _tensor(external=True))))),
    ],
)
def test_onnx_external_data_anywhere_is_unsafe(tmp_path: Path, model: bytes) -> None:
    with pytest.raises(UnsafeModel, match="external data") as info:
        _scan(tmp_path, _pb(1, 8) + model)
    assert info.value.code == "unsafe_model"


@pytest.mark.parametrize(
    "junk", [b"", b"\x0a\xff\xff\xff\xff\x0f", b"\x08", b"\x0b\x00", b"\x3a\x05ab"]
)
def test_unparseable_onnx_is_unsafe(tmp_path: Path, junk: bytes) -> None:
    with pytest.raises(UnsafeModel):
        _scan(tmp_path, junk)


def test_real_onnx_files_with_and_without_external_data(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.ones((4, 4), np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 4])],
        [weights],
    )
    model = helper.make_model(graph)
    inline = tmp_path / "inline.onnx"
    onnx.save_model(model, str(inline))
    check_no_external_data(inline)
    external = tmp_path / "external.onnx"
    onnx.save_model(
        model, str(external), save_as_external_data=True, location="w.bin", size_threshold=0
    )
    with pytest.raises(UnsafeModel):
        check_no_external_data(external)


# --- server-side signing ----------------------------------------------------------


def test_private_key_is_saved_0600_and_loads(tmp_path: Path) -> None:
    from registry_sync.signing import (
        generate_private_key,
        key_id,
        load_private_key,
        save_private_key,
    )

    key = generate_private_key()
    path = tmp_path / "signing.pem"
    save_private_key(key, path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert key_id(load_private_key(path)) == key_id(key)


def test_private_key_is_not_overwritten(tmp_path: Path) -> None:
    from registry_sync.signing import SigningError, generate_private_key, save_private_key

    path = tmp_path / "signing.pem"
    save_private_key(generate_private_key(), path)
    before = path.read_bytes()
    with pytest.raises(SigningError, match="exists"):
        save_private_key(generate_private_key(), path)
    assert path.read_bytes() == before


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o610])
def test_private_key_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    from registry_sync.signing import (
        KeyPermissionError,
        generate_private_key,
        load_private_key,
        save_private_key,
    )

    path = tmp_path / "signing.pem"
    save_private_key(generate_private_key(), path)
    path.chmod(mode)
    with pytest.raises(KeyPermissionError, match="chmod 600"):
        load_private_key(path)


def test_non_ed25519_or_garbage_key_is_refused(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from registry_sync.signing import SigningError, load_private_key

    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"not a key")
    garbage.chmod(0o600)
    with pytest.raises(SigningError):
        load_private_key(garbage)
    ecdsa = tmp_path / "ec.pem"
    ecdsa.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    ecdsa.chmod(0o600)
    with pytest.raises(SigningError, match="Ed25519"):
        load_private_key(ecdsa)


def test_server_refuses_to_sign_what_agents_would_refuse() -> None:
    with pytest.raises(MalformedManifest):
        sign_manifest(make_signed(runtime="pytorch"), KEY)
    with pytest.raises(UnsafeModel):
        signed = make_signed()
        signed["files"][0]["path"] = signed["model_file"] = "../x.onnx"
        sign_manifest(signed, KEY)


def test_agent_modules_import_without_server_packages() -> None:
    # The device has only numpy, paho-mqtt, click and a runtime installed.
    import subprocess
    import sys

    code = """
import sys
BLOCKED = {"cryptography", "mlflow", "onnx", "pandas", "yaml", "sklearn", "skl2onnx"}
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not on the device")
sys.meta_path.insert(0, Block())
import edge_agent.protocol.topics, edge_agent.protocol.canonical, edge_agent.protocol.ed25519
import edge_agent.protocol.manifest, edge_agent.protocol.chunks, edge_agent.protocol.onnx_scan
import edge_agent.update.trust, edge_agent.store, edge_agent.fsio, edge_agent.update_errors
"""
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
