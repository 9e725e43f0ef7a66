"""Privacy defences applied on edges: NoPeek, noise, per-sample clipping, label defences.

Where each one applies (the executor and the baseline call these functions):
- `distance_correlation` is NoPeek's penalty: the owner of a segment that reads raw features adds
  alpha * dCor(raw batch, activation) to that segment's backward, so the activation it sends
  carries less about the raw input (Vepakomma et al., "NoPeek", 2020).
- `add_gaussian_noise`: activation noise by the sender; gradient noise by the receiver.
- `clip_per_sample`: the receiver clips each sample's gradient before returning it.
- `LabelDefence`: the signature of what the label side does to the gradients it returns, so they
  reveal less about the labels; the defences themselves ("none", "max_norm", "marvell") live in
  `label_defences`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

__all__ = [
    "LabelDefence",
    "add_gaussian_noise",
    "clip_per_sample",
    "distance_correlation",
]


def _centred_distances(z: torch.Tensor) -> torch.Tensor:
    """Double-centred pairwise Euclidean distance matrix of the rows of z [n, p]."""
    # cdist's backward gives 0 (not NaN) on the zero diagonal, so this stays differentiable.
    # The direct (not matmul) mode is exact: no cancellation error for near-equal rows.
    d = torch.cdist(z, z, p=2.0, compute_mode="donot_use_mm_for_euclid_dist")
    return d - d.mean(dim=0, keepdim=True) - d.mean(dim=1, keepdim=True) + d.mean()


def distance_correlation(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sample distance correlation dCor(x, y) of Székely, Rizzo & Bakirov (2007), differentiable.

    Each sample (row) is flattened; with A, B the double-centred distance matrices of x and y,
    dCov²(x, y) = mean(A * B) (the V-statistic) and dCor = sqrt(dCov²(x, y) / sqrt(dCov²(x, x) *
    dCov²(y, y))). Exact, O(n²) memory and time in the batch size n.

    Args:
        x: [n, ...] tensor (e.g. the raw feature batch).
        y: [n, ...] tensor (e.g. the activations), same n.

    Returns:
        A scalar tensor in [0, 1], with gradient to both inputs; 0 when either input is constant
        over the batch or n < 2 (dCor is undefined there, and 0 is what NoPeek needs: a penalty
        with no gradient).

    Raises:
        ValueError: if the batch sizes differ.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"distance_correlation needs the same batch size, got {x.shape[0]} and {y.shape[0]}")
    n = x.shape[0]
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    a = _centred_distances(x.reshape(n, -1).to(dtype))
    b = _centred_distances(y.reshape(n, -1).to(dtype))
    dcov_xy = (a * b).mean()
    dcov_xx = (a * a).mean()
    dcov_yy = (b * b).mean()
    denom = torch.sqrt(dcov_xx * dcov_yy)
    tiny = torch.finfo(dtype).tiny
    if float(denom.detach()) <= tiny:
        return (dcov_xy * 0.0).reshape(())
    # Rounding can make dCov² a hair below 0 for independent data, where sqrt would give NaN;
    # clamping at `tiny` (not 0) also keeps sqrt's derivative finite.
    return torch.sqrt(torch.clamp(dcov_xy / denom, min=tiny))


def clip_per_sample(grad: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scale each sample's gradient (row) to L2 norm at most `max_norm`, as in DP-SGD.

    Args:
        grad: [n, ...] gradient.
        max_norm: the bound, > 0.

    Returns:
        A new tensor of the same shape: row i times min(1, max_norm / ||row i||).
    """
    n = grad.shape[0]
    norms = grad.reshape(n, -1).norm(dim=1)
    scale = torch.clamp(max_norm / (norms + 1e-12), max=1.0)
    return grad * scale.reshape((n,) + (1,) * (grad.dim() - 1))


def add_gaussian_noise(t: torch.Tensor, std: float, generator: torch.Generator | None) -> torch.Tensor:
    """Return t + N(0, std²) noise (a new tensor; `t` is not modified).

    Args:
        t: the tensor.
        std: standard deviation; 0 returns `t` itself.
        generator: the random source (the executor's private, secretly seeded generator).
    """
    if std <= 0.0:
        return t
    noise = torch.randn(t.shape, generator=generator, dtype=t.dtype, device=t.device)
    return t + std * noise


LabelDefence = Callable[[torch.Tensor, Mapping[str, torch.Tensor], torch.Generator | None], torch.Tensor]
"""A label defence: (gradient about to be returned [n, ...], this peer's label columns for the
batch rows, the executor's private generator) -> the gradient to return instead (same shape).
Called by the label-holding side for every gradient it returns on an edge that sets it, after
clipping and before gradient noise."""
