"""Z85 (ZeroMQ RFC 32) encoding of 32-byte Curve25519 keys.

Kept here so that crypto does not import zmq; the format is the one ZeroMQ's CURVE expects.
"""

from __future__ import annotations

import struct

_ALPHABET = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"
_DECODE = {c: i for i, c in enumerate(_ALPHABET)}


def z85_encode(data: bytes) -> str:
    """Encode bytes whose length is a multiple of 4."""
    if len(data) % 4:
        raise ValueError("Z85 encodes multiples of 4 bytes")
    out = bytearray()
    for (word,) in struct.iter_unpack(">I", data):
        chunk = bytearray(5)
        for i in range(4, -1, -1):
            word, rem = divmod(word, 85)
            chunk[i] = _ALPHABET[rem]
        out += chunk
    return out.decode("ascii")


def z85_decode(text: str) -> bytes:
    """Decode Z85 text whose length is a multiple of 5.

    Raises:
        ValueError: wrong length or a character outside the alphabet.
    """
    raw = text.encode("ascii")
    if len(raw) % 5:
        raise ValueError("Z85 text length must be a multiple of 5")
    out = bytearray()
    for i in range(0, len(raw), 5):
        word = 0
        for c in raw[i : i + 5]:
            if c not in _DECODE:
                raise ValueError("character outside the Z85 alphabet")
            word = word * 85 + _DECODE[c]
        if word > 0xFFFFFFFF:
            raise ValueError("Z85 group out of range")
        out += struct.pack(">I", word)
    return bytes(out)
