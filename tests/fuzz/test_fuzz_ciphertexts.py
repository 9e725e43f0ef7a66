"""Fuzz the decoders of opaque blobs a listed peer sends: CKKS encrypted tensors and PSI point sets.

TenSEAL can crash the process on some malformed ciphertexts, so `EncryptedTensor.from_bytes`
checks the layout first; here mutated ciphertexts (bit flips, header fields, shape dimensions up
to 2**64 - 1, chunk tables, truncations) must load, or be refused with `CryptoError`, and nothing
else. 2,000 of each by default; 200,000 with SECURE_SPLIT_SLOW=1.
"""

from __future__ import annotations

import os
import random
import struct

import numpy as np
import pytest

from secure_split.crypto.he import EncryptedTensor, KeyHolderContext, decrypt_packed, encrypt_packed
from secure_split.crypto.psi import POINT_BYTES, MultiPartyPsi, decode_points
from secure_split.errors import CryptoError

COUNT = 200_000 if os.environ.get("SECURE_SPLIT_SLOW") == "1" else 2_000
_HEADER = struct.Struct("<4sBBHII")  # the encrypted tensor header: magic, version, ndim, reserved, count, chunks
_VALUES = [0, 1, 2, 7, 8, 9, 255, 1201, 2**16 - 1, 2**31, 2**32 - 1, 2**40, 2**63, 2**64 - 1]


def _mutate(rng: random.Random, blob: bytes) -> bytes:
    data = bytearray(blob)
    choice = rng.randrange(5)
    if choice == 0:
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif choice == 1:
        magic, version, ndim, reserved, count, chunks = _HEADER.unpack_from(data)
        field = rng.randrange(3)
        value = rng.choice([v for v in _VALUES if v < 2**32])
        if field == 0:
            ndim = value % 256
        elif field == 1:
            count = value
        else:
            chunks = value
        _HEADER.pack_into(data, 0, magic, version, ndim, reserved, count, chunks)
    elif choice == 2:  # a shape dimension
        struct.pack_into("<Q", data, _HEADER.size + 8 * rng.randrange(2), rng.choice(_VALUES))
    elif choice == 3:  # the chunk length table
        struct.pack_into("<Q", data, _HEADER.size + 16 + 8 * rng.randrange(2), rng.choice(_VALUES))
    else:
        cut = rng.randrange(_HEADER.size, len(data))
        data = data[:cut] + bytes(rng.randrange(0, 64))
    return bytes(data)


@pytest.mark.slow
def test_mutated_ciphertexts_load_or_raise_crypto_error_only() -> None:
    keys = KeyHolderContext.create()
    public = keys.public()
    blob = encrypt_packed(public, np.ones((4, 600))).serialize()  # two ciphertexts at N = 4096
    rng = random.Random(20260102)
    loaded = refused = 0
    for _ in range(COUNT):
        try:
            tensor = EncryptedTensor.from_bytes(public, _mutate(rng, blob), max_bytes=1 << 24)
        except CryptoError:
            refused += 1
            continue
        loaded += 1
        assert tensor.size <= tensor.chunks * tensor.slots  # what decryption allocates is what was sent
        try:
            decrypt_packed(keys, tensor)
        except CryptoError:
            pass
    assert loaded and refused  # both paths were exercised


@pytest.mark.slow
def test_mutated_psi_sets_decode_or_raise_crypto_error_only() -> None:
    (step,) = MultiPartyPsi("a", ["lh", "a"], list(range(50)), salt=b"s" * 16, max_points=64).start()
    blob = step.payload[-50 * POINT_BYTES :]  # the set's points, after the ring's header
    rng = random.Random(20260103)
    decoded = 0
    for _ in range(COUNT):
        if rng.random() < 0.2:  # a shorter set of valid points: it must decode
            data = bytearray(blob[: POINT_BYTES * rng.randrange(0, len(blob) // POINT_BYTES + 1)])
        else:
            data = bytearray(blob[: rng.randrange(0, len(blob) + 1)] + bytes(rng.randrange(0, 3 * POINT_BYTES)))
        for _ in range(0 if rng.random() < 0.2 else rng.randint(1, 4)):
            if data:
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        try:
            points = decode_points(bytes(data), what="a fuzzed set", max_points=64)
        except CryptoError:
            continue
        decoded += 1
        assert len(points) <= 64
    assert decoded
