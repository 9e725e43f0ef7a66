"""Gradient-side label defences: each changes gradient norms as designed, and hides the labels."""

from __future__ import annotations

import pytest
import torch

from secure_split.analysis.attacks import cosine_attack_auc, norm_attack_auc
from secure_split.engine.label_defences import (
    LABEL_DEFENCE_HOOKS,
    apply_label_defence,
    clip_and_noise,
    label_defence,
    marvell_defence,
    marvell_noise_plan,
    max_norm_defence,
)
from secure_split.errors import TrainingError


def leaky_batch(n: int = 400, d: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut-layer gradients as an imbalanced binary task makes them: positives (10 %) are rarer,
    larger and point the other way, which is what the norm and cosine attacks exploit."""
    gen = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, generator=gen) < 0.1).to(torch.int64)
    labels[:2] = 1
    direction = torch.randn(d, generator=gen)
    direction /= direction.norm()
    scale = torch.where(labels == 1, 1.0, -0.1)[:, None]
    grads = scale * direction + 0.02 * torch.randn(n, d, generator=gen)
    return grads, labels


def gen(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_clip_and_noise_bounds_every_row_then_adds_noise() -> None:
    grads, _ = leaky_batch()
    clipped = clip_and_noise(grads, 0.05, 0.0, gen())
    assert float(clipped.norm(dim=1).max()) <= 0.05 + 1e-6
    small = grads.norm(dim=1) <= 0.05
    assert torch.allclose(clipped[small], grads[small])
    noisy = clip_and_noise(grads, 0.05, 0.01, gen())
    assert not torch.allclose(noisy, clipped)
    # Per-entry noise std 0.01 over 32 entries: the added vector's norm is about 0.01 * sqrt(32).
    assert float((noisy - clipped).norm(dim=1).mean()) == pytest.approx(0.01 * 32**0.5, rel=0.1)
    assert clip_and_noise(grads, None, 0.0, gen()) is grads


def test_clip_and_noise_refuses_bad_parameters() -> None:
    grads, _ = leaky_batch()
    with pytest.raises(ValueError, match="clip_norm"):
        clip_and_noise(grads, 0.0, 0.1, gen())
    with pytest.raises(ValueError, match="noise_std"):
        clip_and_noise(grads, 1.0, -0.1, gen())


def test_max_norm_tops_every_rows_expected_squared_norm_up_to_the_batch_max() -> None:
    grads, _ = leaky_batch(n=64)
    sq = grads.pow(2).sum(dim=1)
    top = int(sq.argmax())
    draws = torch.stack([max_norm_defence(grads, gen(s)) for s in range(300)])
    mean_sq = draws.pow(2).sum(dim=2).mean(dim=0)
    assert torch.allclose(mean_sq, sq.max().expand_as(mean_sq), rtol=0.1)
    assert torch.equal(draws[0, top], grads[top])  # the largest row gets no noise
    assert draws.shape[1:] == grads.shape


def test_max_norm_keeps_the_shape_of_image_shaped_gradients() -> None:
    g = torch.randn(8, 4, 2, 2, generator=gen())
    assert max_norm_defence(g, gen()).shape == g.shape


def test_marvell_noise_respects_its_power_budget() -> None:
    grads, labels = leaky_batch()
    plan, u = marvell_noise_plan(grads, labels, power=2.0)
    delta2 = float((grads[labels == 1].mean(0) - grads[labels == 0].mean(0)).pow(2).sum())
    p = float(labels.float().mean())
    d = grads.shape[1]
    used = p * (plan.along_pos + (d - 1) * plan.ortho_pos) + (1 - p) * (
        plan.along_neg + (d - 1) * plan.ortho_neg
    )
    assert used <= 2.0 * delta2 * 1.001
    assert used >= 0.5 * 2.0 * delta2  # it spends the budget: noise hides the labels
    assert float(u.norm()) == pytest.approx(1.0, abs=1e-5)
    noisy = torch.stack([marvell_defence(grads, labels, power=2.0, generator=gen(s)) for s in range(50)])
    measured = ((noisy - grads) ** 2).sum(dim=2).mean(dim=0)
    spent = p * float(measured[labels == 1].mean()) + (1 - p) * float(measured[labels == 0].mean())
    assert spent == pytest.approx(used, rel=0.15)


def test_unprotected_leaky_gradients_give_both_attacks_an_auc_near_one() -> None:
    grads, labels = leaky_batch()
    assert norm_attack_auc(grads, labels) > 0.99
    assert cosine_attack_auc(grads, labels) > 0.99


@pytest.mark.parametrize("defence", ["max_norm", "marvell"])
def test_label_defences_bring_the_norm_attack_near_chance(defence: str) -> None:
    grads, labels = leaky_batch()
    protected = apply_label_defence(defence, grads, labels, gen())
    assert abs(norm_attack_auc(protected, labels) - 0.5) < 0.15


def test_marvell_also_hides_the_direction_that_max_norm_leaves() -> None:
    grads, labels = leaky_batch()
    marvell = marvell_defence(grads, labels, power=4.0, generator=gen())
    max_norm = max_norm_defence(grads, gen())
    assert abs(cosine_attack_auc(marvell, labels) - 0.5) < abs(cosine_attack_auc(max_norm, labels) - 0.5)
    assert abs(cosine_attack_auc(marvell, labels) - 0.5) < 0.2


def test_marvell_with_more_power_adds_more_noise() -> None:
    grads, labels = leaky_batch()
    weak = marvell_defence(grads, labels, power=0.5, generator=gen())
    strong = marvell_defence(grads, labels, power=8.0, generator=gen())
    assert float((strong - grads).norm()) > float((weak - grads).norm())


def test_marvell_handles_a_batch_with_one_class_only() -> None:
    grads, _ = leaky_batch(n=16)
    out = marvell_defence(grads, torch.zeros(16, dtype=torch.int64), power=1.0, generator=gen())
    assert out.shape == grads.shape and not torch.allclose(out, grads)


def test_marvell_refuses_non_binary_labels_and_mismatched_rows() -> None:
    grads, labels = leaky_batch(n=16)
    with pytest.raises(ValueError, match="binary"):
        marvell_defence(grads, labels * 3, power=1.0, generator=gen())
    with pytest.raises(ValueError, match="one label per"):
        marvell_defence(grads, labels[:5], power=1.0, generator=gen())
    with pytest.raises(ValueError, match="power"):
        marvell_defence(grads, labels, power=0.0, generator=gen())


def test_dispatcher_names_the_schema_values_and_refuses_others() -> None:
    grads, labels = leaky_batch(n=16)
    assert apply_label_defence("none", grads, labels, gen()) is grads
    with pytest.raises(ValueError, match="unknown label_defence"):
        apply_label_defence("laplace", grads, labels, gen())
    with pytest.raises(ValueError, match="needs the batch's labels"):
        apply_label_defence("marvell", grads, None, gen())


def test_executor_hooks_take_the_label_columns_and_are_registered_by_name() -> None:
    grads, labels = leaky_batch(n=32)
    assert label_defence("none")(grads, {"labels": labels}, gen()) is grads
    for name, hook in LABEL_DEFENCE_HOOKS.items():
        assert label_defence(name) is hook
        if name == "none":
            continue
        out = hook(grads, {"labels": labels}, gen())
        assert out.shape == grads.shape and not torch.allclose(out, grads)
    with pytest.raises(TrainingError, match="one label column"):
        LABEL_DEFENCE_HOOKS["marvell"](grads, {"a": labels, "b": labels}, gen())
    with pytest.raises(TrainingError, match="binary"):
        LABEL_DEFENCE_HOOKS["marvell"](grads, {"labels": labels + 2}, gen())
