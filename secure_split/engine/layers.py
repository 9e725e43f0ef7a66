"""The torch modules behind the layer types that torch.nn has no one-to-one match for.

`engine.models.LAYER_TYPES` builds these from a deployment's layer list: a residual block (a
sub-list with a skip), embeddings of token ids or of a table's categorical columns, a learned
positional embedding, LSTM/GRU wrappers that return a tensor (not a tuple), and pooling over a
sequence. Integer inputs (tokens, categories) arrive as floating-point features or activations;
the embeddings check they are whole numbers in range and say which column and value are not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

__all__ = [
    "ColumnEmbedding",
    "PositionalEmbedding",
    "Recurrent",
    "Reshape",
    "Residual",
    "SequencePool",
    "TokenEmbedding",
]


class Reshape(nn.Module):
    """Reshape every sample to `shape` (the batch dimension is kept)."""

    def __init__(self, shape: Sequence[int]) -> None:
        super().__init__()
        self.shape = tuple(int(d) for d in shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


class Residual(nn.Module):
    """y = body(x) + shortcut(x): a block of layers with a skip connection.

    Args:
        body: the block's layers.
        shortcut: what the skip applies (a projection such as a 1x1 convolution), or None for
            the identity.
    """

    def __init__(self, body: nn.Module, shortcut: nn.Module | None = None) -> None:
        super().__init__()
        self.body = body
        self.shortcut = shortcut if shortcut is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.body(x)
        skip: torch.Tensor = self.shortcut(x)
        if y.shape != skip.shape:
            raise ValueError(f"residual: the block outputs {list(y.shape)} but the skip {list(skip.shape)}; "
                             "give a shortcut that maps one onto the other")
        return y + skip


def _indices(x: torch.Tensor, size: int, what: str) -> torch.Tensor:
    """Whole numbers in 0..size-1 as int64, or a ValueError naming the first bad value."""
    idx = x.long()
    bad = (idx != x) | (idx < 0) | (idx >= size)
    if bool(bad.any()):
        value = float(x[bad].reshape(-1)[0])
        raise ValueError(f"{what} holds {value!r}; expected whole numbers from 0 to {size - 1}")
    return idx


class TokenEmbedding(nn.Module):
    """Token ids [batch, ...] (whole numbers, as floats) -> vectors [batch, ..., dim]."""

    def __init__(self, num: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.embedding(_indices(x, self.embedding.num_embeddings, "embedding: a token id"))
        return out


class ColumnEmbedding(nn.Module):
    """A table's categorical columns replaced by learned vectors.

    Input [batch, F]: F columns, of which `columns` hold category codes (whole numbers from 0 to
    that column's cardinality - 1). Output [batch, F - k + k * dim]: the other columns in their
    order, then each categorical column's vector, in the order of `columns`.
    """

    def __init__(self, columns: Sequence[int], cardinalities: Sequence[int], dim: int) -> None:
        super().__init__()
        self.columns = tuple(int(c) for c in columns)
        self.tables = nn.ModuleList(nn.Embedding(int(n), dim) for n in cardinalities)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] <= max(self.columns):
            raise ValueError(f"embedding: expected [batch, columns] with column {max(self.columns)}, "
                             f"got {list(x.shape)}")
        keep = [c for c in range(x.shape[1]) if c not in self.columns]
        parts = [x[:, keep]] if keep else []
        for col, table in zip(self.columns, self.tables, strict=True):
            assert isinstance(table, nn.Embedding)
            parts.append(table(_indices(x[:, col], table.num_embeddings, f"embedding: column {col}")))
        return torch.cat(parts, dim=1)

    def extra_repr(self) -> str:
        return f"columns={list(self.columns)}"


class PositionalEmbedding(nn.Module):
    """Adds a learned vector per position to [batch, length, dim] (length up to `length`)."""

    def __init__(self, length: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(length, dim))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[1] > self.weight.shape[0] or x.shape[2] != self.weight.shape[1]:
            raise ValueError(f"positional_embedding: expected [batch, <= {self.weight.shape[0]}, "
                             f"{self.weight.shape[1]}], got {list(x.shape)}")
        return x + self.weight[: x.shape[1]]


class Recurrent(nn.Module):
    """An LSTM or GRU over [batch, length, in] (batch first) returning one tensor.

    Args:
        kind: "lstm" or "gru".
        output: "sequence" ([batch, length, hidden * directions]) or "last" (the last layer's
            final hidden state, [batch, hidden * directions]).
    """

    def __init__(self, kind: Literal["lstm", "gru"], in_features: int, hidden: int, *, layers: int,
                 bidirectional: bool, dropout: float, output: Literal["sequence", "last"]) -> None:
        super().__init__()
        cls = nn.LSTM if kind == "lstm" else nn.GRU
        self.rnn = cls(in_features, hidden, num_layers=layers, batch_first=True,
                       bidirectional=bidirectional, dropout=dropout if layers > 1 else 0.0)
        self.output = output
        self.directions = 2 if bidirectional else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, state = self.rnn(x)
        if self.output == "sequence":
            return out  # type: ignore[no-any-return]  # nn.LSTM/GRU are untyped
        h = state[0] if isinstance(state, tuple) else state  # LSTM: (h, c); GRU: h
        return torch.cat(list(h[-self.directions:]), dim=1)


class SequencePool(nn.Module):
    """[batch, length, dim] -> [batch, dim] by mean, max, or the first or last position."""

    def __init__(self, how: Literal["mean", "max", "first", "last"]) -> None:
        super().__init__()
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(f"pool_sequence: expected [batch, length, dim], got {list(x.shape)}")
        if self.how == "mean":
            return x.mean(dim=1)
        if self.how == "max":
            return x.amax(dim=1)
        return x[:, 0] if self.how == "first" else x[:, -1]

    def extra_repr(self) -> str:
        return f"how={self.how}"
