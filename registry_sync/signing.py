"""Manifest signing on the server: Ed25519 keys and the signed wire manifest.

The agent verifies with the pure-Python code in ``edge_agent.protocol.ed25519``;
this side uses ``cryptography``. Key ids are defined once
(``edge_agent.protocol.ed25519.key_id``: first 16 hex characters of sha256 over
the raw 32-byte public key) and shared by both sides.

Private keys are PKCS#8 PEM files created with mode 0600; loading one that the
group or others can read is refused, as ssh does.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.protocol.canonical import canonical_bytes
from edge_agent.protocol.ed25519 import key_id as _key_id
from edge_agent.protocol.manifest import Limits, parse_signed

__all__ = [
    "KeyPermissionError",
    "SigningError",
    "generate_private_key",
    "key_id",
    "load_private_key",
    "public_key_bytes",
    "save_private_key",
    "sign_manifest",
]


class SigningError(Exception):
    """A key cannot be created, loaded or used."""


class KeyPermissionError(SigningError):
    """A private key file is readable by group or others."""


def generate_private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def public_key_bytes(private_key: Ed25519PrivateKey) -> bytes:
    """The raw 32-byte public key (what devices list as trusted, in hex)."""
    return private_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def key_id(private_key: Ed25519PrivateKey) -> str:
    return _key_id(public_key_bytes(private_key))


def save_private_key(private_key: Ed25519PrivateKey, path: Path) -> None:
    """Write a new PKCS#8 PEM file with mode 0600; never overwrites an existing file."""
    pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        # O_EXCL with the mode at creation: the key is never briefly world-readable.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise SigningError(f"{path} exists; refusing to overwrite a signing key") from exc
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
        fh.flush()
        os.fsync(fh.fileno())


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Load a PEM Ed25519 key, refusing files that group or others can access."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyPermissionError(
            f"private key {path} has mode {stat.S_IMODE(mode):04o}; "
            f"it must not be accessible by group or others (chmod 600 {path})"
        )
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise SigningError(f"{path} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"{path} is not an Ed25519 key")
    return key


def sign_manifest(
    signed: Mapping[str, Any],
    private_key: Ed25519PrivateKey,
    *,
    extra_keys: Sequence[Ed25519PrivateKey] = (),
) -> bytes:
    """Validate ``signed`` as the agent would, sign its canonical bytes, return the wire form.

    The wire form is ``{"signatures": [{"keyid", "sig"}], "signed": {...}}`` in
    canonical JSON (docs/protocol.md, "Manifest"). ``extra_keys`` add signatures (key
    rotation: sign with the old and the new key while devices move over).
    """
    parse_signed(signed)  # never sign something every agent will refuse
    payload = canonical_bytes(signed)
    envelope = {
        "signed": json.loads(payload),
        "signatures": [
            {"keyid": key_id(k), "sig": k.sign(payload).hex()} for k in (private_key, *extra_keys)
        ],
    }
    wire = canonical_bytes(envelope)
    if len(wire) > Limits().max_manifest_bytes:
        raise SigningError(f"signed manifest is {len(wire)} bytes, above the agents' cap")
    return wire
