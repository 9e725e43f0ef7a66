"""Claims of SECURITY.md about PSI and the CKKS mask that no other test pins.

- "Each id is hashed to the group with a per-deployment salt; each party blinds with a fresh
  random scalar per run" (Private set intersection).
- "adds a fresh mask uniform in ±2^24 on a 2^-20 grid" (Homomorphic aggregation at a merge).
"""

from __future__ import annotations

import numpy as np
import pytest

from secure_split.crypto.he import KeyHolderContext, PublicContext, encrypt_packed, mask_aggregate
from secure_split.crypto.psi import POINT_BYTES, MultiPartyPsi, hash_ids

SALT_A = b"secure-split-psi-v1:" + bytes(32)
SALT_B = b"secure-split-psi-v1:" + bytes([1]) * 32


def _points(payload: bytes) -> set[bytes]:
    return {payload[i : i + POINT_BYTES] for i in range(0, len(payload), POINT_BYTES)}


def test_psi_ids_hash_to_unrelated_points_under_another_deployment_salt() -> None:
    ids = list(range(200))
    under_a, under_b = hash_ids(ids, salt=SALT_A), hash_ids(ids, salt=SALT_B)
    assert under_a == hash_ids(ids, salt=SALT_A)  # same salt, same points: parties agree
    assert not set(under_a) & set(under_b)


@pytest.mark.parametrize("me", ["label_holder", "hospital_a"])
def test_psi_each_run_blinds_with_a_fresh_scalar(me: str) -> None:
    ring = ["label_holder", "hospital_a"]

    def sent() -> set[bytes]:
        party = MultiPartyPsi(me, ring, list(range(200)), salt=SALT_A)
        return {p for step in party.start() for p in _points(step.payload[-200 * POINT_BYTES :])}

    first, second = sent(), sent()
    assert len(first) == len(second) == 200
    assert not first & second


@pytest.fixture(scope="module")
def public() -> PublicContext:
    return PublicContext.from_bytes(KeyHolderContext.create().public_context_bytes())


def test_ckks_mask_is_uniform_over_plus_minus_2_24_on_the_2_20_grid(public: PublicContext) -> None:
    encs = [encrypt_packed(public, np.zeros(4096)) for _ in range(2)]
    _, mask = mask_aggregate(public, encs)
    values = mask.values.reshape(-1)
    assert values.min() >= -(2.0**24) and values.max() < 2.0**24
    assert np.array_equal(values * 2.0**20, np.round(values * 2.0**20))
    # uniform: 8 equal bins of the range each hold about 1/8 (512 ± ~21 expected; 150 is > 7 sigma)
    counts, _ = np.histogram(values, bins=8, range=(-(2.0**24), 2.0**24))
    assert np.all(np.abs(counts - values.size / 8) < 150), counts
    # and not on a coarser grid: the low bits vary
    assert len({int(v * 2.0**20) % 1024 for v in values}) > 900
