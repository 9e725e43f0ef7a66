"""Cross-check the engine's distance correlation against independent implementations.

The engine's own tests pin known values; this one recomputes dCor two other ways, in exact
rational arithmetic and in plain numpy, and checks the engine agrees (the report's DCOR column
and NoPeek's penalty are this function).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import torch

from secure_split.engine.privacy import distance_correlation


def exact_dcor(x: list[int], y: list[int]) -> float:
    """Székely's V-statistic dCor of two 1-D integer samples, in exact fractions until the last sqrt."""
    n = len(x)

    def centred(v: list[int]) -> list[list[Fraction]]:
        d = [[Fraction(abs(a - b)) for b in v] for a in v]
        row = [sum(r) / n for r in d]
        col = [sum(d[i][j] for i in range(n)) / n for j in range(n)]
        grand = sum(row) / n
        return [[d[i][j] - row[i] - col[j] + grand for j in range(n)] for i in range(n)]

    a, b = centred(x), centred(y)

    def dcov2(p: list[list[Fraction]], q: list[list[Fraction]]) -> Fraction:
        return sum(p[i][j] * q[i][j] for i in range(n) for j in range(n)) / (n * n)

    return math.sqrt(float(dcov2(a, b)) / math.sqrt(float(dcov2(a, a) * dcov2(b, b))))


def numpy_dcor(x: np.ndarray, y: np.ndarray) -> float:
    """The same statistic written directly in numpy, for multivariate samples (rows)."""

    def centred(z: np.ndarray) -> np.ndarray:
        d = np.sqrt(((z[:, None, :] - z[None, :, :]) ** 2).sum(-1))
        return d - d.mean(0, keepdims=True) - d.mean(1, keepdims=True) + d.mean()

    a, b = centred(x.reshape(len(x), -1)), centred(y.reshape(len(y), -1))
    return float(np.sqrt((a * b).mean() / np.sqrt((a * a).mean() * (b * b).mean())))


def test_dcor_matches_exact_arithmetic_on_a_small_integer_example() -> None:
    x, y = [0, 1, 2, 3, 4, 5], [0, 1, 4, 9, 16, 25]
    expected = exact_dcor(x, y)
    got = float(
        distance_correlation(
            torch.tensor(x, dtype=torch.float64)[:, None], torch.tensor(y, dtype=torch.float64)[:, None]
        )
    )
    assert abs(got - expected) < 1e-12
    assert abs(expected - numpy_dcor(np.array(x, float)[:, None], np.array(y, float)[:, None])) < 1e-12
    # y = x² on 0..5 is monotone but not linear: dependent, yet dCor < 1.
    assert 0.9 < expected < 1.0


def test_dcor_matches_numpy_on_images_and_activations() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((50, 1, 8, 8))
    act = np.maximum(x.reshape(50, -1) @ rng.standard_normal((64, 16)), 0.0)
    got = float(distance_correlation(torch.from_numpy(x), torch.from_numpy(act)))
    assert abs(got - numpy_dcor(x, act)) < 1e-9
