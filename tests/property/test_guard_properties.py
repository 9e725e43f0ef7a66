"""The raw-row guard against a brute-force search: same verdict on random and planted cases.

`find_raw_row` ranks anchors on a sample of the output and filters candidates in bulk; neither
may change whether a copy is found. The reference below checks every raw row at every offset of
every output row with the documented rule: ||window - raw|| <= rtol * ||raw|| + 1e-9, constant
or non-finite raw rows skipped, slices only for raw rows of at least MIN_SLICE_FEATURES values.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from secure_split.policy import find_raw_row
from secure_split.policy.guards import MIN_SLICE_FEATURES


def brute_force(out: np.ndarray, raw: np.ndarray, rtol: float) -> set[tuple[int, int]]:
    o = out.reshape(out.shape[0], -1).astype(np.float64)
    r = raw.reshape(raw.shape[0], -1).astype(np.float64)
    n, dt = o.shape
    m, dr = r.shape
    if dt < dr or (dt > dr and dr < MIN_SLICE_FEATURES):
        return set()
    hits = set()
    for j in range(m):
        row = r[j]
        if not np.isfinite(row).all() or np.ptp(row) == 0:
            continue
        tol = rtol * np.linalg.norm(row) + 1e-9
        for i in range(n):
            for p in range(dt - dr + 1):
                if np.linalg.norm(o[i, p : p + dr] - row) <= tol:
                    hits.add((i, j))
    return hits


@st.composite
def cases(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, float]:
    n = draw(st.integers(1, 12))
    m = draw(st.integers(1, 12))
    dr = draw(st.integers(1, 12))
    dt = draw(st.integers(dr, 40))
    levels = draw(st.sampled_from([0, 4, 17]))  # 0: continuous values; else quantised like pixels
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if levels:
        raw = rng.integers(0, levels, (m, dr)) / (levels - 1)
        out = np.maximum(rng.normal(0.3, 0.5, (n, dt)), 0.0)  # ReLU-like: many exact zeros
        out[rng.random((n, dt)) < 0.3] = rng.integers(0, levels, 1) / (levels - 1)
    else:
        raw = rng.normal(0, 1, (m, dr))
        out = rng.normal(0, 1, (n, dt))
    rtol = draw(st.sampled_from([1e-3, 1e-2, 0.1]))
    for _ in range(draw(st.integers(0, 2))):  # plant copies, exact or within the tolerance
        i, j, p = rng.integers(n), rng.integers(m), rng.integers(dt - dr + 1)
        noise = rng.normal(0, 1, dr)
        scale = draw(st.sampled_from([0.0, 0.3, 0.99, 1.5])) * rtol * np.linalg.norm(raw[j])
        out[i, p : p + dr] = raw[j] + noise / (np.linalg.norm(noise) + 1e-12) * scale
    return out.astype(dtype), raw.astype(dtype), rtol


@settings(max_examples=300, deadline=None)
@given(cases())
def test_find_raw_row_agrees_with_brute_force(case: tuple[np.ndarray, np.ndarray, float]) -> None:
    out, raw, rtol = case
    expected = brute_force(out, raw, rtol)
    found = find_raw_row(out, raw, rtol=rtol)
    if found is None:
        # no match missed, except at the tolerance boundary where float rounding decides
        o, r = out.astype(np.float64), raw.astype(np.float64)
        for i, j in expected:
            tol = rtol * np.linalg.norm(r[j]) + 1e-9
            dt, dr = o.shape[1], r.shape[1]
            best = min(np.linalg.norm(o[i, p : p + dr] - r[j]) for p in range(dt - dr + 1))
            assert best > tol * (1 - 1e-6), (i, j, best, tol)
    else:
        assert found in expected or _on_boundary(out, raw, rtol, found)


def _on_boundary(out: np.ndarray, raw: np.ndarray, rtol: float, pair: tuple[int, int]) -> bool:
    i, j = pair
    o, r = out.astype(np.float64), raw.astype(np.float64)
    tol = rtol * np.linalg.norm(r[j]) + 1e-9
    dr = r.shape[1]
    best = min(np.linalg.norm(o[i, p : p + dr] - r[j]) for p in range(o.shape[1] - dr + 1))
    return bool(best <= tol * (1 + 1e-6))
