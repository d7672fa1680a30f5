"""Pure-Python Ed25519 verification against RFC 8032 vectors and ``cryptography``."""

from __future__ import annotations

import hashlib
import time

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.protocol import ed25519
from edge_agent.protocol.ed25519 import L, P, PublicKey, key_id, verify

# RFC 8032 section 7.1: (secret key, public key, message, signature), hex.
RFC8032 = [
    (
        "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        "",
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bac"
        "c61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
    ),
    (
        "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
        "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
        "72",
        "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e"
        "458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
    ),
    (
        "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
        "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
        "af82",
        "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290"
        "ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a",
    ),
    (  # TEST SHA(abc): the message is SHA-512("abc")
        "833fe62409237b9d62ec77587520911e9a759cec1d19755b7da901b96dca3d42",
        "ec172b93ad5e563bf4932c70e1245034c35467ef2efd4d64ebf819683467e2bf",
        hashlib.sha512(b"abc").hexdigest(),
        "dc2a4459e7369633a52b1bf277839a00201009a3efbf3ecb69bea2186c26b58909351fc9ac90b3ec"
        "fdfbc7c66431e0303dca179c138ac17ad9bef1177331a704",
    ),
]

# The eight points of order dividing 8, as encodings (plus non-canonical twins).
SMALL_ORDER = [
    "0100000000000000000000000000000000000000000000000000000000000000",  # identity
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # order 2
    "0000000000000000000000000000000000000000000000000000000000000000",  # order 4
    "0000000000000000000000000000000000000000000000000000000000000080",  # order 4
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",  # order 8
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",  # order 8
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",  # order 8
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",  # order 8
]


def _raw_public(sk: Ed25519PrivateKey) -> bytes:
    return sk.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@pytest.mark.parametrize(("secret", "public", "message", "signature"), RFC8032)
def test_rfc8032_vectors_verify(secret: str, public: str, message: str, signature: str) -> None:
    # The vectors are also re-derived with `cryptography`, so a typo here cannot pass.
    sk = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(secret))
    assert _raw_public(sk).hex() == public
    assert sk.sign(bytes.fromhex(message)).hex() == signature
    assert verify(bytes.fromhex(public), bytes.fromhex(signature), bytes.fromhex(message))


@pytest.mark.parametrize(("secret", "public", "message", "signature"), RFC8032)
def test_rfc8032_vectors_fail_on_other_message(
    secret: str, public: str, message: str, signature: str
) -> None:
    assert not verify(
        bytes.fromhex(public), bytes.fromhex(signature), bytes.fromhex(message) + b"\0"
    )


def test_signatures_made_by_cryptography_verify() -> None:
    for n in range(20):
        sk = Ed25519PrivateKey.generate()
        msg = bytes(range(n)) * n
        key = PublicKey(_raw_public(sk))
        sig = sk.sign(msg)
        assert key.verify(sig, msg)
        assert not key.verify(sig, msg + b"x")
        other = PublicKey(_raw_public(Ed25519PrivateKey.generate()))
        assert not other.verify(sig, msg)


def test_non_canonical_s_is_rejected() -> None:
    _secret, public, message, signature = RFC8032[1]
    sig = bytes.fromhex(signature)
    s = int.from_bytes(sig[32:], "little")
    malleable = sig[:32] + (s + L).to_bytes(32, "little")
    # [S + L]B == [S]B, so only the S < L check stops this second valid-looking signature.
    assert ed25519._encode(ed25519._base_mul(s + L)) == ed25519._encode(ed25519._base_mul(s))
    assert not verify(bytes.fromhex(public), malleable, bytes.fromhex(message))


def test_s_of_all_ones_is_rejected() -> None:
    public, message = RFC8032[0][1], b""
    assert not verify(bytes.fromhex(public), bytes(32) + b"\xff" * 32, message)


@pytest.mark.parametrize("encoding", SMALL_ORDER)
def test_small_order_public_keys_are_rejected(encoding: str) -> None:
    raw = bytes.fromhex(encoding)
    with pytest.raises(ValueError, match="small order"):
        PublicKey(raw)
    # The classic forgery: A small-order, R = identity, S = 0 "verifies" for any
    # message under the bare cofactored equation.
    identity = bytes.fromhex(SMALL_ORDER[0])
    assert not verify(raw, identity + bytes(32), b"any message")


@pytest.mark.parametrize("encoding", SMALL_ORDER[:2] + SMALL_ORDER[4:6])
def test_small_order_r_is_rejected(encoding: str) -> None:
    _secret, public, message, signature = RFC8032[0]
    forged = bytes.fromhex(encoding) + bytes.fromhex(signature)[32:]
    assert not verify(bytes.fromhex(public), forged, bytes.fromhex(message))


def test_small_order_detection_matches_the_torsion_points() -> None:
    for encoding in SMALL_ORDER:
        point = ed25519._decode(bytes.fromhex(encoding))
        assert point is not None and ed25519._has_small_order(point)
    base = ed25519.BASE
    assert not ed25519._has_small_order(base)


def test_non_canonical_point_encodings_fail_to_decode() -> None:
    # y = p (that is, y = 0 mod p) and y = p + 1 are >= p: RFC 8032 5.1.3 step 1.
    assert ed25519._decode(P.to_bytes(32, "little")) is None
    assert ed25519._decode((P + 1).to_bytes(32, "little")) is None
    # x = 0 with the sign bit set (y = 1 is the identity, whose x is 0).
    assert ed25519._decode((1 | 1 << 255).to_bytes(32, "little")) is None
    assert ed25519._decode(b"\x01" * 31) is None


def test_points_off_the_curve_are_rejected() -> None:
    off_curve = next(
        y.to_bytes(32, "little")
        for y in range(2, 100)
        if ed25519._decode(y.to_bytes(32, "little")) is None
    )
    with pytest.raises(ValueError, match="valid"):
        PublicKey(off_curve)
    _secret, public, _message, signature = RFC8032[0]
    assert not verify(bytes.fromhex(public), off_curve + bytes.fromhex(signature)[32:], b"")


def test_wrong_lengths_are_rejected() -> None:
    _secret, public, _message, signature = RFC8032[0]
    assert not verify(bytes.fromhex(public)[:31], bytes.fromhex(signature), b"")
    assert not verify(bytes.fromhex(public), bytes.fromhex(signature)[:63], b"")
    assert not verify(bytes.fromhex(public), bytes.fromhex(signature) + b"\0", b"")


def test_key_id_is_sha256_prefix_of_raw_key() -> None:
    raw = bytes.fromhex(RFC8032[0][1])
    assert key_id(raw) == hashlib.sha256(raw).hexdigest()[:16]
    assert PublicKey(raw).key_id == key_id(raw)
    with pytest.raises(ValueError):
        key_id(raw[:31])


def test_key_id_matches_registry_side() -> None:
    from registry_sync.signing import key_id as server_key_id

    sk = Ed25519PrivateKey.generate()
    assert server_key_id(sk) == key_id(_raw_public(sk))


def test_verification_is_fast_enough() -> None:
    sk = Ed25519PrivateKey.generate()
    raw, msg = _raw_public(sk), b"m" * 4096
    sig = sk.sign(msg)
    verify(raw, sig, msg)  # builds the base-point table once
    runs = []
    for _ in range(15):
        start = time.perf_counter()
        assert verify(raw, sig, msg)
        runs.append(time.perf_counter() - start)
    assert sorted(runs)[len(runs) // 2] < 0.020


@settings(max_examples=60, deadline=None)
@given(msg=st.binary(max_size=300), index=st.integers(min_value=0), bit=st.integers(0, 7))
def test_flipping_any_bit_of_message_or_signature_fails(msg: bytes, index: int, bit: int) -> None:
    sk = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(RFC8032[2][0]))
    key = PublicKey(_raw_public(sk))
    sig = sk.sign(msg)
    assert key.verify(sig, msg)
    blob = bytearray(sig + msg)
    i = index % len(blob)
    blob[i] ^= 1 << bit
    assert not key.verify(bytes(blob[:64]), bytes(blob[64:]))
