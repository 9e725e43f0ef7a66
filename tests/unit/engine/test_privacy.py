"""Distance correlation (NoPeek's penalty), per-sample clipping and noise, pinned to known values."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from secure_split.engine.privacy import add_gaussian_noise, clip_per_sample, distance_correlation


def _dcor_by_the_book(x: np.ndarray, y: np.ndarray) -> float:
    """Székely, Rizzo & Bakirov (2007), eq. 2.8-2.10, written out with loops."""
    n = len(x)

    def centred(z: np.ndarray) -> list[list[float]]:
        a = [[float(np.linalg.norm(z[k] - z[l])) for l in range(n)] for k in range(n)]  # noqa: E741
        row = [sum(a[k]) / n for k in range(n)]
        col = [sum(a[k][l] for k in range(n)) / n for l in range(n)]  # noqa: E741
        grand = sum(row) / n
        return [[a[k][l] - row[k] - col[l] + grand for l in range(n)] for k in range(n)]  # noqa: E741

    a, b = centred(x), centred(y)

    def v2(p: list[list[float]], q: list[list[float]]) -> float:
        return sum(p[k][l] * q[k][l] for k in range(n) for l in range(n)) / n**2  # noqa: E741

    return math.sqrt(v2(a, b) / math.sqrt(v2(a, a) * v2(b, b)))


def test_dcor_of_a_variable_with_itself_or_an_affine_copy_is_one() -> None:
    x = torch.randn(50, 7, dtype=torch.float64)
    assert float(distance_correlation(x, x)) == pytest.approx(1.0, abs=1e-12)
    assert float(distance_correlation(x, 3.0 * x - 2.0)) == pytest.approx(1.0, abs=1e-12)
    q, _ = torch.linalg.qr(torch.randn(7, 7, dtype=torch.float64))
    assert float(distance_correlation(x, x @ q)) == pytest.approx(1.0, abs=1e-12)  # rotation invariant


def test_dcor_of_independent_samples_is_near_zero_and_dependence_is_not() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 3, generator=g)
    y = torch.randn(1000, 2, generator=g)
    assert float(distance_correlation(x, y)) < 0.12  # the V-statistic's bias is O(1/sqrt(n))
    assert float(distance_correlation(x, x[:, :1] ** 2)) > 0.3  # nonlinear dependence, zero correlation


def test_dcor_matches_szekelys_formula_on_a_small_example() -> None:
    x = np.array([[0.0], [1.0], [2.0], [4.0]])
    y = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [0.5, 1.0]])
    expected = _dcor_by_the_book(x, y)
    got = float(distance_correlation(torch.tensor(x), torch.tensor(y)))
    assert got == pytest.approx(expected, abs=1e-12)


def test_dcor_hand_computed_value() -> None:
    # x = (0, 1, 2), y = (0, 1, 0). Distances a = [[0,1,2],[1,0,1],[2,1,0]], b = [[0,1,0],[1,0,1],[0,1,0]].
    # Double centred (row/column means 1, 2/3, 1 and 1/3, 2/3, 1/3; grand means 8/9 and 4/9):
    #   A = [[-10, 2, 8], [2, -4, 2], [8, 2, -10]] / 9,   B = [[-2, 4, -2], [4, -8, 4], [-2, 4, -2]] / 9.
    # dCov² = mean of products: (x,y) 72/729 = 8/81, (x,x) 360/729 = 40/81, (y,y) 144/729 = 16/81.
    # dCor² = (8/81) / sqrt(40/81 * 16/81) = 8 / sqrt(640) = 1 / sqrt(10), so dCor = 10^(-1/4).
    xs, ys = [0, 1, 2], [0, 1, 0]

    def centred(v: list[int]) -> list[list[Fraction]]:
        a = [[Fraction(abs(p - q)) for q in v] for p in v]
        n = len(v)
        row = [sum(r) / n for r in a]
        col = [sum(a[k][j] for k in range(n)) / n for j in range(n)]
        grand = sum(row) / n
        return [[a[k][j] - row[k] - col[j] + grand for j in range(n)] for k in range(n)]

    a, b = centred(xs), centred(ys)
    assert a == [[Fraction(n, 9) for n in r] for r in ([-10, 2, 8], [2, -4, 2], [8, 2, -10])]
    pairs = ((a, b), (a, a), (b, b))
    v = [sum(p[i][j] * q[i][j] for i, j in itertools.product(range(3), range(3))) / 9 for p, q in pairs]
    assert v == [Fraction(8, 81), Fraction(40, 81), Fraction(16, 81)]
    x = torch.tensor(xs, dtype=torch.float64)[:, None]
    y = torch.tensor(ys, dtype=torch.float64)[:, None]
    assert float(distance_correlation(x, y)) == pytest.approx(10**-0.25, abs=1e-12)


def test_dcor_is_differentiable_and_zero_for_constant_input() -> None:
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: distance_correlation(x, t), (y,))
    const = distance_correlation(torch.ones(5, 2), torch.randn(5, 3, requires_grad=True))
    assert float(const.detach()) == 0.0
    const.backward()  # a penalty with no gradient, not an error
    assert float(distance_correlation(torch.randn(1, 2), torch.randn(1, 2))) == 0.0
    with pytest.raises(ValueError):
        distance_correlation(torch.randn(3, 2), torch.randn(4, 2))


def test_clip_per_sample_bounds_each_row_and_keeps_small_rows() -> None:
    g = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])
    clipped = clip_per_sample(g, 1.0)
    assert clipped[0].tolist() == pytest.approx([0.6, 0.8])
    assert torch.equal(clipped[1:], g[1:])
    big = torch.randn(4, 2, 3, 3) * 10
    assert bool((clip_per_sample(big, 0.5).reshape(4, -1).norm(dim=1) <= 0.5 + 1e-6).all())


def test_gaussian_noise_is_reproducible_only_with_the_same_generator_seed() -> None:
    t = torch.zeros(1000)
    a = add_gaussian_noise(t, 2.0, torch.Generator().manual_seed(1))
    b = add_gaussian_noise(t, 2.0, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and float(a.std()) == pytest.approx(2.0, rel=0.1)
    assert add_gaussian_noise(t, 0.0, None) is t
    assert float(t.abs().sum()) == 0.0  # the input is not modified
