"""The honest-but-curious attacks the leakage report measures, and their metrics.

Input reconstruction (the receiving peer reads raw inputs off cut activations): the attacker holds
an auxiliary set of (input, activation) pairs, trains a decoder from activations to inputs
(`train_decoder`) and applies it to the activations it receives; we score it with MSE and SSIM
(`reconstruction_metrics`, `ssim`) on held-out samples.

Label leakage (the peer that receives gradients from the label holder reads labels off them): the
norm attack and the cosine (direction) attack of Li et al., "Label Leakage and Protection in
Two-party Split Learning" (ICLR 2022). Both give a score per sample; their success is the ROC AUC of
that score against the true binary labels (`norm_attack_auc`, `cosine_attack_auc`). An AUC of 1
means the score ranks every positive above every negative; 0.5 is a coin flip. The attacks are
one-sided, as in the paper (positives are the rare class; larger norm / closer direction means
positive), so an AUC well below 0.5 means the defence flipped the ranking and an attacker that
knew this would still learn the labels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

__all__ = [
    "ActivationDecoder",
    "cosine_attack_auc",
    "mean_batch_auc",
    "norm_attack_auc",
    "reconstruction_metrics",
    "ssim",
    "train_decoder",
]


class ActivationDecoder(nn.Module):
    """An MLP from a flattened cut activation to an input-shaped reconstruction.

    The activations are standardised with the mean and standard deviation of the attacker's
    auxiliary activations (stored as buffers), so the same decoder copes with any activation scale,
    noise included. With `bounded=True` the output goes through a sigmoid (inputs in [0, 1]).
    """

    def __init__(
        self, in_features: int, out_shape: Sequence[int], *, hidden: int = 256, bounded: bool = True
    ) -> None:
        super().__init__()
        self.out_shape = tuple(int(s) for s in out_shape)
        self.bounded = bounded
        self.act_mean: torch.Tensor
        self.act_std: torch.Tensor
        self.register_buffer("act_mean", torch.zeros(in_features))
        self.register_buffer("act_std", torch.ones(in_features))
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, math.prod(self.out_shape)),
        )

    def forward(self, activations: torch.Tensor) -> torch.Tensor:
        """Reconstruct inputs [n, *out_shape] from activations [n, ...]."""
        z = (activations.reshape(activations.shape[0], -1) - self.act_mean) / self.act_std
        out: torch.Tensor = self.net(z)
        if self.bounded:
            out = torch.sigmoid(out)
        return out.reshape(activations.shape[0], *self.out_shape)


def train_decoder(
    activations: torch.Tensor,
    inputs: torch.Tensor,
    *,
    epochs: int = 150,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
) -> ActivationDecoder:
    """Train the attacker's decoder on its auxiliary (activation, input) pairs, minimising MSE.

    Args:
        activations: [n, ...] cut activations of the auxiliary samples, as the attacker saw them.
        inputs: [n, ...] the matching raw inputs the attacker holds.
        epochs: passes over the auxiliary set.
        seed: seeds the decoder's initialisation and batch order (the global RNG is untouched).
        batch_size: samples per step.
        lr: Adam learning rate.
        weight_decay: Adam weight decay (the auxiliary set is small).

    Returns:
        The trained decoder, in eval mode. Its output is bounded to [0, 1] when the inputs are.

    Raises:
        ValueError: if the two tensors have different numbers of rows or fewer than 2 rows.
    """
    if activations.shape[0] != inputs.shape[0] or activations.shape[0] < 2:
        raise ValueError(
            "need the same number (>= 2) of activations and inputs, "
            f"got {activations.shape[0]} and {inputs.shape[0]}"
        )
    acts = activations.detach().reshape(activations.shape[0], -1).float()
    target = inputs.detach().float()
    bounded = bool(target.min() >= 0.0 and target.max() <= 1.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        decoder = ActivationDecoder(acts.shape[1], target.shape[1:], bounded=bounded)
    decoder.act_mean.copy_(acts.mean(dim=0))
    decoder.act_std.copy_(acts.std(dim=0).clamp(min=1e-6))
    opt = torch.optim.Adam(decoder.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    n = acts.shape[0]
    decoder.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            loss = nn.functional.mse_loss(decoder(acts[idx]), target[idx])
            opt.zero_grad()
            torch.autograd.backward([loss])
            opt.step()
    decoder.eval()
    return decoder


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-(coords**2) / (2.0 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(
    x: torch.Tensor, y: torch.Tensor, *, data_range: float = 1.0, window: int = 5, sigma: float = 1.0
) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) per image, with a Gaussian window, for small images.

    Local means, variances and covariance are Gaussian-weighted over a `window`×`window` patch
    (valid positions only, no padding; the window shrinks to the image if the image is smaller),
    with the usual constants C1 = (0.01·L)², C2 = (0.03·L)², L = `data_range`. On 8×8 digits the
    default 5×5 window (σ = 1) gives a 4×4 SSIM map per channel, averaged.

    Args:
        x: [n, C, H, W] (or [n, H, W]) images.
        y: same shape.
        data_range: L, the span of pixel values (1.0 for images in [0, 1]).
        window: side of the Gaussian window.
        sigma: its standard deviation in pixels.

    Returns:
        [n] float64 SSIM per image: 1 for identical images, lower as they differ (it can go
        slightly below 0 for anti-correlated images).

    Raises:
        ValueError: if the shapes differ or are not 3- or 4-dimensional.
    """
    if x.shape != y.shape or x.dim() not in (3, 4):
        raise ValueError(
            f"ssim needs two [n, C, H, W] tensors of one shape, got {list(x.shape)} and {list(y.shape)}"
        )
    if x.dim() == 3:
        x, y = x[:, None], y[:, None]
    x, y = x.detach().to(torch.float64), y.detach().to(torch.float64)
    channels, h, w = x.shape[1], x.shape[2], x.shape[3]
    size = min(window, h, w)
    kernel = _gaussian_window(size, sigma).expand(channels, 1, size, size).contiguous()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return nn.functional.conv2d(t, kernel, groups=channels)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    smap = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return smap.reshape(smap.shape[0], -1).mean(dim=1)


def reconstruction_metrics(
    decoder: nn.Module, activations: torch.Tensor, inputs: torch.Tensor, *, data_range: float = 1.0
) -> dict[str, float]:
    """Score the attacker's decoder on held-out samples.

    Args:
        decoder: from `train_decoder`.
        activations: [n, ...] held-out activations (as they crossed the wire).
        inputs: [n, C, H, W] the true inputs.
        data_range: pixel span for SSIM.

    Returns:
        {"mse": mean squared error per pixel, "ssim": mean SSIM per image}. For image inputs
        (3 or 4 dims); for other inputs "ssim" is NaN.
    """
    with torch.no_grad():
        recon = decoder(activations).reshape(inputs.shape).to(torch.float64)
    target = inputs.detach().to(torch.float64)
    mse = float(((recon - target) ** 2).mean())
    s = float(ssim(recon, target, data_range=data_range).mean()) if inputs.dim() in (3, 4) else float("nan")
    return {"mse": mse, "ssim": s}


def _binary(labels: torch.Tensor | np.ndarray, n: int) -> np.ndarray:
    lab = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
    if lab.shape[0] != n:
        raise ValueError(f"need one label per gradient row: {lab.shape[0]} labels, {n} rows")
    if not np.isin(lab, (0, 1)).all():
        raise ValueError("the label-leakage attacks are for binary 0/1 labels")
    if lab.min() == lab.max():
        raise ValueError("AUC needs both classes among the rows")
    return lab.astype(np.int64)


def norm_attack_auc(grads: torch.Tensor, labels: torch.Tensor | np.ndarray) -> float:
    """Li et al.'s norm attack: score each sample by its gradient's L2 norm; return the ROC AUC.

    Args:
        grads: [n, ...] per-sample gradients as the attacker received them.
        labels: [n] true 0/1 labels (1 = the rare positive class).

    Returns:
        The AUC of ||g_i|| for telling positives from negatives.

    Raises:
        ValueError: if the labels are not binary, not one per row, or one class is missing.
    """
    flat = grads.detach().reshape(grads.shape[0], -1).to(torch.float64)
    lab = _binary(labels, flat.shape[0])
    return float(roc_auc_score(lab, flat.norm(dim=1).numpy()))


def cosine_attack_auc(
    grads: torch.Tensor, labels: torch.Tensor | np.ndarray, *, reference: int | None = None
) -> float:
    """Li et al.'s cosine (direction) attack: score = cosine similarity to one known positive's gradient.

    The attacker is assumed to know the label of one positive sample (the reference); every other
    sample is scored by the cosine similarity of its gradient with the reference's, and the AUC is
    over those other samples.

    Args:
        grads: [n, ...] per-sample gradients.
        labels: [n] true 0/1 labels.
        reference: row of the known positive (default: the first positive row).

    Returns:
        The AUC of the cosine score over the rows other than the reference.

    Raises:
        ValueError: if the labels are not binary, the reference is not a positive, or the other
            rows lack one class.
    """
    flat = grads.detach().reshape(grads.shape[0], -1).to(torch.float64)
    lab = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
    positives = np.flatnonzero(lab == 1)
    if reference is None:
        if len(positives) == 0:
            raise ValueError("the cosine attack needs one known positive row")
        reference = int(positives[0])
    if lab[reference] != 1:
        raise ValueError(f"the reference row {reference} is not a positive")
    keep = np.arange(flat.shape[0]) != reference
    others = flat[torch.from_numpy(keep)]
    ref = flat[reference]
    score = (others @ ref) / (others.norm(dim=1) * ref.norm()).clamp(min=1e-300)
    return float(roc_auc_score(_binary(lab[keep], others.shape[0]), score.numpy()))


def mean_batch_auc(
    attack: Callable[[torch.Tensor, torch.Tensor], float],
    grad_batches: Sequence[torch.Tensor],
    label_batches: Sequence[torch.Tensor],
) -> float:
    """Run an attack on every observed batch and average its AUC, as Li et al. report it.

    Batches in which the attack is undefined (one class only, or a single positive for the cosine
    attack) are skipped.

    Args:
        attack: `norm_attack_auc` or `cosine_attack_auc`.
        grad_batches: the gradients the attacker received, one tensor per step.
        label_batches: the matching true labels.

    Returns:
        The mean AUC over the batches where it is defined (NaN if none).
    """
    aucs = []
    for g, y in zip(grad_batches, label_batches, strict=True):
        try:
            aucs.append(attack(g, y))
        except ValueError:
            continue
    return float(np.mean(aucs)) if aucs else float("nan")
