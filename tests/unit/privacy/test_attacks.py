"""The attacks and their metrics: SSIM, the Li et al. label attacks, the reconstruction decoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from secure_split.analysis.attacks import (
    cosine_attack_auc,
    mean_batch_auc,
    norm_attack_auc,
    reconstruction_metrics,
    ssim,
    train_decoder,
)
from secure_split.engine.data import digits


def digit_images(n: int = 64) -> torch.Tensor:
    _, x, _ = digits()
    return x[:n]


def test_ssim_of_an_image_with_itself_is_one() -> None:
    x = digit_images()
    assert torch.allclose(ssim(x, x), torch.ones(len(x), dtype=torch.float64))


def test_ssim_falls_as_noise_grows() -> None:
    x = digit_images()
    gen = torch.Generator().manual_seed(0)
    scores = [
        float(ssim(x, (x + s * torch.randn(x.shape, generator=gen)).clamp(0, 1)).mean())
        for s in (0.05, 0.1, 0.2, 0.4, 0.8)
    ]
    assert scores == sorted(scores, reverse=True)
    assert scores[0] < 1.0 and scores[-1] < 0.6


def test_ssim_is_symmetric_and_accepts_images_without_a_channel_axis() -> None:
    x = digit_images(8)
    y = x.flip(0)
    assert torch.allclose(ssim(x, y), ssim(y, x))
    assert torch.allclose(ssim(x[:, 0], y[:, 0]), ssim(x, y))


def test_ssim_refuses_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="one shape"):
        ssim(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 7))


def test_norm_attack_scores_by_gradient_norm() -> None:
    labels = torch.tensor([0, 0, 1, 0, 1, 0])
    grads = torch.tensor([[0.1], [0.2], [2.0], [0.3], [1.0], [0.05]])
    assert norm_attack_auc(grads, labels) == 1.0
    assert norm_attack_auc(-grads, labels) == 1.0  # the sign does not matter, the norm does
    assert norm_attack_auc(grads, 1 - labels) == 0.0


def test_cosine_attack_scores_by_direction_to_a_known_positive() -> None:
    labels = np.array([1, 0, 1, 0, 0, 1])
    grads = torch.tensor([[1.0, 0.1], [-1.0, 0.2], [2.0, -0.1], [-0.5, 0.0], [-3.0, 0.3], [0.5, 0.05]])
    assert cosine_attack_auc(grads, labels) == 1.0
    # Same norms for everyone: the norm attack is blind, the direction still tells.
    unit = grads / grads.norm(dim=1, keepdim=True)
    assert norm_attack_auc(unit + 0.0, labels) == pytest.approx(0.5, abs=0.35)
    assert cosine_attack_auc(unit, labels) == 1.0
    with pytest.raises(ValueError, match="not a positive"):
        cosine_attack_auc(grads, labels, reference=1)


def test_attacks_refuse_non_binary_or_one_class_labels() -> None:
    grads = torch.randn(4, 3)
    with pytest.raises(ValueError, match="binary"):
        norm_attack_auc(grads, torch.tensor([0, 1, 2, 1]))
    with pytest.raises(ValueError, match="both classes"):
        norm_attack_auc(grads, torch.zeros(4, dtype=torch.int64))


def test_mean_batch_auc_skips_batches_where_the_attack_is_undefined() -> None:
    good = (torch.tensor([[3.0], [0.1], [0.2]]), torch.tensor([1, 0, 0]))
    one_class = (torch.randn(3, 1), torch.zeros(3, dtype=torch.int64))
    assert mean_batch_auc(norm_attack_auc, [good[0], one_class[0]], [good[1], one_class[1]]) == 1.0
    assert np.isnan(mean_batch_auc(norm_attack_auc, [one_class[0]], [one_class[1]]))


def test_decoder_inverts_an_informative_encoding_and_not_a_scrambled_one() -> None:
    x = digit_images(400)
    gen = torch.Generator().manual_seed(0)
    encoder = torch.randn(64, 48, generator=gen)
    informative = x.reshape(len(x), -1) @ encoder
    scrambled = torch.randn(informative.shape, generator=gen)
    train, test = slice(0, 300), slice(300, 400)
    good = reconstruction_metrics(
        train_decoder(informative[train], x[train], epochs=40, seed=0), informative[test], x[test]
    )
    bad = reconstruction_metrics(
        train_decoder(scrambled[train], x[train], epochs=40, seed=0), scrambled[test], x[test]
    )
    assert good["mse"] < 0.5 * bad["mse"]
    assert good["ssim"] > bad["ssim"] + 0.2


def test_decoder_training_is_reproducible_under_a_seed() -> None:
    x = digit_images(100)
    acts = x.reshape(100, -1)[:, :32]
    a = train_decoder(acts, x, epochs=3, seed=5)
    b = train_decoder(acts, x, epochs=3, seed=5)
    with torch.no_grad():
        out = a(acts)
        assert torch.equal(out, b(acts))
    assert out.shape == x.shape and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
