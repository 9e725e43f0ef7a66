"""Gradient-side label protection: what the label holder does to the gradients it returns.

A peer that receives cut-layer gradients from the label holder can read labels off them: on an
imbalanced binary task the (rare) positives get larger gradients (the norm attack of Li et al.,
"Label Leakage and Protection in Two-party Split Learning", ICLR 2022) and point the other way
from the negatives (their cosine attack). Each row of the cut-layer gradient is one sample's
gradient, so every defence here works per row:

- `clip_and_noise`: per-sample L2 clipping, then isotropic Gaussian noise (the DP-SGD recipe).
  Clipping caps the norms but leaves the ranking of the small ones; the noise blurs it.
- `max_norm_defence`: Li et al.'s "max norm" heuristic. Every row gets isotropic Gaussian noise
  whose variance tops its expected squared norm up to the batch's largest squared norm, so all
  rows look alike in norm. No parameter; it does not hide directions.
- `marvell_defence`: optimised noise in the spirit of Marvell (same paper, section 4); see its
  docstring for what it simplifies.

`apply_label_defence` dispatches on the `ProtectionSpec.label_defence` name. `LABEL_DEFENCE_HOOKS`
wraps the defences in the `secure_split.engine.privacy.LabelDefence` signature the executor calls;
`label_defence(name)` is how the executor and the baseline look one up.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from secure_split.engine.privacy import LabelDefence, add_gaussian_noise, clip_per_sample
from secure_split.errors import TrainingError

__all__ = [
    "LABEL_DEFENCE_HOOKS",
    "LABEL_DEFENCE_NAMES",
    "MARVELL_DEFAULT_POWER",
    "MarvellNoise",
    "apply_label_defence",
    "clip_and_noise",
    "label_defence",
    "marvell_defence",
    "marvell_noise_plan",
    "max_norm_defence",
]

LABEL_DEFENCE_NAMES = ("none", "max_norm", "marvell")
"""The names `ProtectionSpec.label_defence` allows."""

MARVELL_DEFAULT_POWER = 4.0
"""Marvell's power bound as a multiple of ||mean positive grad - mean negative grad||² (the paper's
`s`); the paper's Criteo/Avazu runs reach an AUC near 0.5 around s = 4. The deployment schema has no
field for it yet, so the executor hook uses this value."""


def _rows(grads: torch.Tensor) -> torch.Tensor:
    if grads.dim() < 1 or grads.shape[0] == 0:
        raise ValueError(f"expected a gradient batch [n, ...] with n >= 1, got shape {list(grads.shape)}")
    return grads.reshape(grads.shape[0], -1)


def clip_and_noise(
    grads: torch.Tensor, clip_norm: float | None, noise_std: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Clip each sample's gradient to L2 norm `clip_norm`, then add N(0, noise_std²) per entry.

    Args:
        grads: [n, ...] cut-layer gradient; row i is sample i's gradient.
        clip_norm: the per-sample bound (> 0), or None for no clipping.
        noise_std: standard deviation of the added noise per entry (0 for none).
        generator: the label holder's private random source.

    Returns:
        A new tensor of the same shape (or `grads` itself when both are off).

    Raises:
        ValueError: if clip_norm <= 0 or noise_std < 0.
    """
    if clip_norm is not None and clip_norm <= 0.0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    if noise_std < 0.0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    out = grads if clip_norm is None else clip_per_sample(grads, clip_norm)
    return add_gaussian_noise(out, noise_std, generator)


def max_norm_defence(grads: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Li et al.'s max-norm heuristic: equalise every row's expected squared norm to the batch max.

    Row j (dimension d) gets noise N(0, σ_j² I) with σ_j² = (max_i ||g_i||² − ||g_j||²) / d, so
    E||g_j + noise||² = max_i ||g_i||². The row with the largest norm is unchanged.

    Args:
        grads: [n, ...] cut-layer gradient.
        generator: the label holder's private random source.

    Returns:
        A new tensor of the same shape.

    Raises:
        ValueError: for an empty batch.
    """
    flat = _rows(grads)
    sq = flat.pow(2).sum(dim=1)
    d = flat.shape[1]
    std = torch.sqrt(torch.clamp(sq.max() - sq, min=0.0) / d)
    noise = torch.randn(flat.shape, generator=generator, dtype=flat.dtype, device=flat.device)
    return (flat + std[:, None] * noise).reshape(grads.shape)


@dataclass(frozen=True)
class MarvellNoise:
    """The noise Marvell chose for one batch (variances per dimension, in the gradient's units).

    Attributes:
        along_neg, along_pos: extra variance along u = (mean positive − mean negative) / ||·||,
            for negative and positive rows.
        ortho_neg, ortho_pos: extra variance per dimension orthogonal to u.
        power: the bound P = power × ||Δ||² on p·tr(Σ_pos) + (1 − p)·tr(Σ_neg).
        objective: the symmetric KL bound reached (lower is harder to tell apart).
    """

    along_neg: float
    along_pos: float
    ortho_neg: float
    ortho_pos: float
    power: float
    objective: float


def marvell_noise_plan(
    flat: torch.Tensor, labels: torch.Tensor, power: float
) -> tuple[MarvellNoise, torch.Tensor]:
    """Solve the simplified Marvell problem for one batch (see `marvell_defence`).

    Args:
        flat: [n, d] per-sample gradients with both classes present.
        labels: [n] 0/1 labels.
        power: the multiple s of ||Δ||² allowed as noise power.

    Returns:
        (the chosen variances, the unit direction u [d]).
    """
    from scipy.optimize import minimize

    x = flat.detach().to(torch.float64)
    pos, neg = x[labels == 1], x[labels == 0]
    delta = pos.mean(dim=0) - neg.mean(dim=0)
    dist2 = float(delta.pow(2).sum())
    d = x.shape[1]
    p = pos.shape[0] / x.shape[0]
    u = delta / max(dist2, 1e-300) ** 0.5
    # Work in units of ||Δ||² so the problem is scale-free: the bound becomes p·trΣ1+(1-p)·trΣ0 <= s.
    floor = 1e-6
    s_pos = max(float((pos - pos.mean(dim=0)).pow(2).sum()) / (pos.shape[0] * d) / dist2, floor)
    s_neg = max(float((neg - neg.mean(dim=0)).pow(2).sum()) / (neg.shape[0] * d) / dist2, floor)
    m = d - 1

    def objective(v: np.ndarray) -> float:
        a0, a1, b0, b1 = v
        v0, v1, w0, w1 = s_neg + a0, s_pos + a1, s_neg + b0, s_pos + b1
        return float((v1 / v0 + v0 / v1 - 2.0) + m * (w1 / w0 + w0 / w1 - 2.0) + (1.0 / v0 + 1.0 / v1))

    def budget(v: np.ndarray) -> float:
        a0, a1, b0, b1 = v
        return float(power - p * (a1 + m * b1) - (1.0 - p) * (a0 + m * b0))

    # Start from "all power along u, shared equally", a feasible point near the optimum when the
    # within-class spread is small.
    start = np.array([power, power, 0.0, 0.0])
    res = minimize(
        objective,
        start,
        method="SLSQP",
        bounds=[(0.0, None)] * 4,
        constraints=[{"type": "ineq", "fun": budget}],
        options={"maxiter": 200, "ftol": 1e-10},
    )
    best = res.x if res.success and budget(res.x) >= -1e-6 else start
    best = np.clip(best, 0.0, None)
    a0, a1, b0, b1 = (float(v) * dist2 for v in best)
    plan = MarvellNoise(a0, a1, b0, b1, power=power, objective=objective(best))
    return plan, u.to(flat.dtype)


def marvell_defence(
    grads: torch.Tensor,
    labels: torch.Tensor,
    *,
    power: float = MARVELL_DEFAULT_POWER,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Optimised label-dependent noise in the spirit of Marvell (Li et al. 2022), binary labels.

    Marvell adds zero-mean Gaussian noise N(0, Σ_y) that depends on the row's label y and picks
    Σ_0, Σ_1 to minimise the symmetric KL divergence between the perturbed positive and negative
    gradient distributions, under a power budget p·tr(Σ_1) + (1 − p)·tr(Σ_0) ≤ P. As in the paper,
    the class-conditional gradients are modelled as Gaussians N(ḡ_y, s_y I) around the class means,
    the budget is P = power × ||ḡ_1 − ḡ_0||², and the optimum lies in the family
    Σ_y = a_y uu^T + b_y (I − uu^T), u = (ḡ_1 − ḡ_0)/||ḡ_1 − ḡ_0||: four scalars, solved here with
    SLSQP.

    What this simplifies: the class means and the isotropic within-class variances s_y are
    estimated from the current batch alone (no running estimates across steps); the 4-scalar
    problem is solved numerically from a fixed start rather than in the paper's closed form; a
    batch with only one class present (Δ undefined) gets isotropic noise whose expected squared
    norm is `power` × the batch's mean squared norm.

    Args:
        grads: [n, ...] cut-layer gradient; row i belongs to sample i.
        labels: [n] binary labels (0/1) of the rows; 1 is the (rare) positive class.
        power: the budget multiple s above (> 0); larger hides more and costs more accuracy.
        generator: the label holder's private random source.

    Returns:
        A new tensor of the same shape.

    Raises:
        ValueError: if power <= 0, the labels are not 0/1, or their count differs from the rows.
    """
    if power <= 0.0:
        raise ValueError(f"marvell power must be > 0, got {power}")
    flat = _rows(grads)
    lab = labels.reshape(-1).to(torch.int64)
    if lab.shape[0] != flat.shape[0]:
        raise ValueError(
            f"marvell needs one label per gradient row: {lab.shape[0]} labels, {flat.shape[0]} rows"
        )
    if bool(((lab != 0) & (lab != 1)).any()):
        raise ValueError("marvell is a defence for binary labels; got labels other than 0 and 1")
    n, d = flat.shape
    z = torch.randn(flat.shape, generator=generator, dtype=flat.dtype, device=flat.device)
    n_pos = int(lab.sum())
    if n_pos in (0, n):
        var = power * float(flat.detach().pow(2).sum(dim=1).mean()) / d
        noised: torch.Tensor = flat + var**0.5 * z
        return noised.reshape(grads.shape)
    plan, u = marvell_noise_plan(flat, lab, power)
    along = torch.where(lab == 1, plan.along_pos, plan.along_neg).to(flat.dtype).sqrt()
    ortho = torch.where(lab == 1, plan.ortho_pos, plan.ortho_neg).to(flat.dtype).sqrt()
    zu = z @ u
    noise = ortho[:, None] * (z - zu[:, None] * u[None, :]) + (along * zu)[:, None] * u[None, :]
    return (flat + noise).reshape(grads.shape)


def apply_label_defence(
    name: str,
    grads: torch.Tensor,
    labels: torch.Tensor | None,
    generator: torch.Generator | None,
    *,
    power: float = MARVELL_DEFAULT_POWER,
) -> torch.Tensor:
    """Apply the label defence named in the deployment to a gradient the label holder returns.

    Args:
        name: "none", "max_norm" or "marvell" (`ProtectionSpec.label_defence`).
        grads: [n, ...] the cut-layer gradient about to be returned (row i = sample i).
        labels: [n] the rows' labels (needed by "marvell" only; binary 0/1).
        generator: the label holder's private random source.
        power: Marvell's budget multiple.

    Returns:
        The gradient to return instead (same shape).

    Raises:
        ValueError: for an unknown name, or "marvell" without binary labels.
    """
    if name == "none":
        return grads
    if name == "max_norm":
        return max_norm_defence(grads, generator)
    if name == "marvell":
        if labels is None:
            raise ValueError("label_defence 'marvell' needs the batch's labels")
        return marvell_defence(grads, labels, power=power, generator=generator)
    raise ValueError(f"unknown label_defence {name!r}; expected one of {', '.join(LABEL_DEFENCE_NAMES)}")


def _single_column(labels: Mapping[str, torch.Tensor], defence: str) -> torch.Tensor:
    if len(labels) == 1:
        return next(iter(labels.values()))
    if "labels" in labels:
        return labels["labels"]
    raise TrainingError(
        f"label_defence {defence!r} needs one label column, this peer holds {sorted(labels)}; "
        "name the task's column 'labels' or use max_norm, which needs no labels"
    )


def _max_norm_hook(
    grad: torch.Tensor, labels: Mapping[str, torch.Tensor], generator: torch.Generator | None
) -> torch.Tensor:
    return max_norm_defence(grad, generator)


def _marvell_hook(
    grad: torch.Tensor, labels: Mapping[str, torch.Tensor], generator: torch.Generator | None
) -> torch.Tensor:
    column = _single_column(labels, "marvell")
    try:
        return marvell_defence(grad, column, power=MARVELL_DEFAULT_POWER, generator=generator)
    except ValueError as exc:
        raise TrainingError(f"label_defence 'marvell': {exc}") from None


def _no_defence(
    grad: torch.Tensor, labels: Mapping[str, torch.Tensor], generator: torch.Generator | None
) -> torch.Tensor:
    return grad


LABEL_DEFENCE_HOOKS: dict[str, LabelDefence] = {"none": _no_defence, "max_norm": _max_norm_hook,
                                                "marvell": _marvell_hook}
"""Every label defence in the executor's `privacy.LabelDefence` signature (gradient, label columns,
generator), by `ProtectionSpec.label_defence` name."""


def label_defence(name: str, *, edge: str = "") -> LabelDefence:
    """The label defence called `name` (`ProtectionSpec.label_defence`).

    Args:
        name: the defence's name.
        edge: the edge id, for the error message.

    Raises:
        ValueError: an unknown name (the policy and deployment schemas allow only these).
    """
    try:
        return LABEL_DEFENCE_HOOKS[name]
    except KeyError:
        where = f" on edge {edge}" if edge else ""
        raise ValueError(f"unknown label_defence {name!r}{where}; expected one of {', '.join(LABEL_DEFENCE_NAMES)}") from None
