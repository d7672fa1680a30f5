"""Pure-Python Ed25519 signature verification (RFC 8032, section 5.1.7).

The device has no ``cryptography`` package, so verification is done here with
Python integers. Points are kept in extended twisted Edwards coordinates
(X:Y:Z:T, x = X/Z, y = Y/Z, xy = T/Z) so no field inversion is needed until the
final encoding. ``[S]B`` uses a fixed-base table of ``j * 16**i * B``; ``[k]A``
uses a 4-bit window over a per-key table, cached on ``PublicKey``.

Strictness (what is rejected, beyond the bare equation):

- ``S >= L`` (non-canonical scalar, RFC 8032 5.1.7 step 1);
- point encodings with ``y >= p``, or ``x = 0`` with the sign bit set, or no
  square root (RFC 8032 5.1.3);
- a public key ``A`` or commitment ``R`` of small order (``[8]P`` is the
  identity), as libsodium does: such keys make signatures that verify for many
  messages;
- the check is ``encode([S]B - [k]A) == R`` byte for byte (the RFC's
  "sufficient" cofactorless form, as libsodium), so ``R`` must be the canonical
  encoding of the point.

Verification is variable-time; it only handles public data.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

__all__ = ["PublicKey", "key_id", "verify"]

P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493
D = (-121665 * pow(121666, P - 2, P)) % P
D2 = (2 * D) % P
SQRT_M1 = pow(2, (P - 1) // 4, P)

Point = tuple[int, int, int, int]  # extended coordinates (X, Y, Z, T)

IDENTITY: Point = (0, 1, 1, 0)
_BY = (4 * pow(5, P - 2, P)) % P
_BX = 15112221349535400772501151409588531511454012693041857206046113283949847762202
BASE: Point = (_BX, _BY, 1, (_BX * _BY) % P)


def _add(p: Point, q: Point) -> Point:
    # RFC 8032 5.1.4, "add-2008-hwcd-3" for a = -1.
    x1, y1, z1, t1 = p
    x2, y2, z2, t2 = q
    a = (y1 - x1) * (y2 - x2) % P
    b = (y1 + x1) * (y2 + x2) % P
    c = t1 * D2 * t2 % P
    d = 2 * z1 * z2 % P
    e, f, g, h = b - a, d - c, d + c, b + a
    return (e * f % P, g * h % P, f * g % P, e * h % P)


def _double(p: Point) -> Point:
    # RFC 8032 5.1.4, "dbl-2008-hwcd".
    x1, y1, z1, _ = p
    a = x1 * x1 % P
    b = y1 * y1 % P
    c = 2 * z1 * z1 % P
    h = a + b
    e = h - (x1 + y1) * (x1 + y1) % P
    g = a - b
    f = c + g
    return (e * f % P, g * h % P, f * g % P, e * h % P)


def _neg(p: Point) -> Point:
    x, y, z, t = p
    return ((-x) % P, y, z, (-t) % P)


def _is_identity(p: Point) -> bool:
    x, y, z, _ = p
    return x % P == 0 and (y - z) % P == 0


def _has_small_order(p: Point) -> bool:
    return _is_identity(_double(_double(_double(p))))


def _encode(p: Point) -> bytes:
    x, y, z, _ = p
    zi = pow(z, P - 2, P)
    x, y = x * zi % P, y * zi % P
    return (y | ((x & 1) << 255)).to_bytes(32, "little")


def _decode(s: bytes) -> Point | None:
    """Decode a 32-byte point (RFC 8032 5.1.3); ``None`` when decoding fails."""
    if len(s) != 32:
        return None
    n = int.from_bytes(s, "little")
    sign = n >> 255
    y = n & ((1 << 255) - 1)
    if y >= P:
        return None
    u = (y * y - 1) % P
    v = (D * y * y + 1) % P
    x = u * pow(v, 3, P) * pow(u * pow(v, 7, P), (P - 5) // 8, P) % P
    vxx = v * x * x % P
    if vxx == u:
        pass
    elif vxx == (-u) % P:
        x = x * SQRT_M1 % P
    else:
        return None
    if x == 0 and sign == 1:
        return None
    if x & 1 != sign:
        x = P - x
    return (x, y, 1, x * y % P)


def _window_table(p: Point) -> list[Point]:
    """[0]P .. [15]P for a 4-bit window."""
    table = [IDENTITY, p]
    for _ in range(14):
        table.append(_add(table[-1], p))
    return table


@lru_cache(maxsize=1)
def _base_table() -> list[list[Point]]:
    # rows[i][j] = j * 16**i * B: [S]B becomes at most 64 additions, no doublings.
    rows = []
    q = BASE
    for _ in range(64):
        row = _window_table(q)
        rows.append(row)
        q = _double(_double(_double(_double(q))))
    return rows


def _base_mul(s: int) -> Point:
    acc = IDENTITY
    for row in _base_table():
        nib = s & 15
        if nib:
            acc = _add(acc, row[nib])
        s >>= 4
    return acc


def _window_mul(table: list[Point], k: int) -> Point:
    acc = IDENTITY
    for shift in range(252, -1, -4):
        acc = _double(_double(_double(_double(acc))))
        nib = (k >> shift) & 15
        if nib:
            acc = _add(acc, table[nib])
    return acc


def key_id(raw_public_key: bytes) -> str:
    """First 16 hex characters of sha256 over the raw 32-byte public key."""
    if len(raw_public_key) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return hashlib.sha256(raw_public_key).hexdigest()[:16]


class PublicKey:
    """A validated Ed25519 public key; construction fails on invalid or small-order keys."""

    __slots__ = ("_neg_table", "key_id", "raw")

    def __init__(self, raw: bytes) -> None:
        point = _decode(bytes(raw))
        if point is None:
            raise ValueError("not a valid Ed25519 public key encoding")
        if _has_small_order(point):
            raise ValueError("Ed25519 public key has small order")
        self.raw = bytes(raw)
        self.key_id = key_id(self.raw)
        # Verification subtracts [k]A, so cache multiples of -A.
        self._neg_table = _window_table(_neg(point))

    @classmethod
    def from_hex(cls, text: str) -> PublicKey:
        return cls(bytes.fromhex(text))

    def verify(self, signature: bytes, message: bytes) -> bool:
        """True when ``signature`` is a valid strict Ed25519 signature of ``message``."""
        if len(signature) != 64:
            return False
        r_bytes, s_bytes = signature[:32], signature[32:]
        s = int.from_bytes(s_bytes, "little")
        if s >= L:
            return False
        r_point = _decode(r_bytes)
        if r_point is None or _has_small_order(r_point):
            return False
        k = int.from_bytes(hashlib.sha512(r_bytes + self.raw + message).digest(), "little") % L
        check = _add(_base_mul(s), _window_mul(self._neg_table, k))
        return _encode(check) == r_bytes

    def __repr__(self) -> str:
        return f"PublicKey(key_id={self.key_id!r})"


def verify(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """Verify one signature; ``False`` for any invalid key, signature or mismatch."""
    try:
        key = PublicKey(public_key)
    except ValueError:
        return False
    return key.verify(signature, message)
