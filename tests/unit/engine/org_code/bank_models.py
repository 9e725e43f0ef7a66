"""An organisation's own model code, as a bank would keep it next to its peer config.

The tests name it only in a peer config: `model: {module: "bank_models:tabular_bottom", path: ...}`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class TabularBottom(nn.Module):
    """Categorical columns through embeddings, the rest as they are, then an MLP with a tanh cut."""

    def __init__(self, features: int, columns: Sequence[int], cardinalities: Sequence[int], dim: int, out: int) -> None:
        super().__init__()
        self.columns = list(columns)
        self.embeddings = nn.ModuleList(nn.Embedding(n, dim) for n in cardinalities)
        width = features - len(self.columns) + dim * len(self.columns)
        self.mlp = nn.Sequential(nn.Linear(width, 32), nn.ReLU(), nn.Linear(32, out), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = [c for c in range(x.shape[1]) if c not in self.columns]
        parts = [x[:, keep]] + [e(x[:, c].long()) for c, e in zip(self.columns, self.embeddings, strict=True)]
        return self.mlp(torch.cat(parts, dim=1))  # type: ignore[no-any-return]


def tabular_bottom(features: int, columns: list[int], cardinalities: list[int], dim: int = 4,
                   out: int = 8) -> nn.Module:
    """The factory a peer config names."""
    return TabularBottom(features, columns, cardinalities, dim, out)


def wide_bottom(features: int) -> nn.Module:
    """Another architecture: 16 outputs instead of 8."""
    return nn.Sequential(nn.Linear(features, 16), nn.Tanh())


def not_a_module() -> int:
    return 3


def broken(**_: object) -> nn.Module:
    raise RuntimeError("the bank's factory failed")
