"""One peer's samples as the executor uses them (`PeerData`), and the safetensors data file.

A safetensors data file holds exactly the tensors "ids" (int64 [N], unique), optionally
"features" (float32 [N, ...], finite) and any number of "labels.TASK" (int64 [N]), where TASK is
the `labels:` value of a loss segment (default "labels"). Each peer process opens only its own
file; these tensors never leave the peer (the protocol has no message kind for them).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from secure_split.errors import ConfigError, ConfigProblem, TrainingError

__all__ = [
    "DEFAULT_MAX_DATA_BYTES",
    "PeerData",
    "as_id_tensor",
    "read_safetensors_data",
    "read_safetensors_tensors",
    "write_peer_data",
]

DEFAULT_MAX_DATA_BYTES = 2 * 1024**3
LABEL_NAME_RE = re.compile(r"^[A-Za-z0-9_]{1,64}$")
_LABEL_PREFIX = "labels."


def as_id_tensor(ids: object) -> torch.Tensor:
    """Turn sample ids (numpy array, tensor or sequence of ints) into a 1-D int64 CPU tensor.

    Raises:
        TypeError: if the ids are not integers or not one-dimensional.
    """
    if isinstance(ids, torch.Tensor):
        t = ids.detach().to("cpu")
    else:
        arr = np.asarray(ids)
        if arr.size == 0:
            arr = arr.astype(np.int64)
        if arr.dtype.kind not in "iu":
            raise TypeError(f"sample ids must be integers, got dtype {arr.dtype}")
        t = torch.from_numpy(arr.astype(np.int64, copy=False))
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"sample ids must be integers, got dtype {t.dtype}")
    if t.dim() != 1:
        raise TypeError(f"sample ids must be one-dimensional, got shape {list(t.shape)}")
    return t.to(torch.int64)


@dataclass(frozen=True, eq=False)
class PeerData:
    """One peer's samples, checked when built.

    Attributes:
        ids: int64 [N], unique sample ids (the join key agreed between parties).
        features: float32 [N, ...] raw features, or None for a peer that only holds labels.
        labels: label task -> int64 [N] class indices.
        source: the file the rows came from, for messages ("" when built in code).

    Raises:
        ValueError: if dtypes, shapes or id uniqueness are wrong.
    """

    ids: torch.Tensor
    features: torch.Tensor | None = None
    labels: Mapping[str, torch.Tensor] = field(default_factory=dict)
    source: str = ""
    # Sorted ids and their positions: rows() is a binary search, O(B log N) per batch.
    _sorted_ids: np.ndarray = field(init=False, repr=False)
    _order: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        problems = _data_problems(self.ids, self.features, self.labels)
        if problems:
            raise ValueError("; ".join(problems))
        order = torch.argsort(self.ids)
        object.__setattr__(self, "_sorted_ids", self.ids[order].contiguous().numpy())
        object.__setattr__(self, "_order", order.numpy())
        object.__setattr__(self, "labels", dict(self.labels))

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def rows(self, ids: object) -> torch.Tensor:
        """Positions in this data of the given sample ids.

        Args:
            ids: sample ids (numpy array, tensor or sequence of ints).

        Returns:
            int64 tensor of row indices, in the order of `ids`.

        Raises:
            TrainingError: if some ids are not in this peer's data (names up to five of them).
        """
        want = as_id_tensor(ids).numpy()  # numpy: half the per-step cost of the torch calls
        sorted_ids, order = self._sorted_ids, self._order
        if len(sorted_ids) == 0:
            pos = np.zeros_like(want)
            found = np.zeros(want.shape, dtype=bool)
        else:
            pos = np.minimum(np.searchsorted(sorted_ids, want), len(sorted_ids) - 1)
            found = sorted_ids[pos] == want
        if not bool(found.all()):
            missing = want[~found]
            shown = ", ".join(str(int(x)) for x in missing[:5])
            raise TrainingError(
                f"{len(missing)} sample id(s) are not in this peer's data (e.g. {shown}); "
                "the coordinator's ids and this peer's data file disagree: align the ids (PSI) "
                "or regenerate the data files"
            )
        return torch.from_numpy(order[pos])


    def subset(self, ids: object) -> PeerData:
        """This data restricted to `ids`, in that order (e.g. the PSI intersection).

        Raises:
            TrainingError: if some ids are not in this peer's data.
        """
        idx = self.rows(ids)
        return PeerData(
            ids=self.ids[idx].contiguous(),
            features=self.features[idx].contiguous() if self.features is not None else None,
            labels={k: v[idx].contiguous() for k, v in self.labels.items()},
            source=self.source,
        )


def _data_problems(ids: object, features: object, labels: object) -> list[str]:
    problems: list[str] = []
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64 or ids.dim() != 1:
        return ["ids must be an int64 tensor with one dimension"]
    n = int(ids.shape[0])
    if torch.unique(ids).numel() != n:
        problems.append("ids must be unique")
    if features is not None:
        if not isinstance(features, torch.Tensor) or features.dtype != torch.float32:
            problems.append("features must be a float32 tensor")
        elif features.dim() < 2 or features.shape[0] != n:
            problems.append(f"features must have shape [N={n}, ...], got {list(features.shape)}")
        elif n and not bool(torch.isfinite(features).all()):
            bad = (~torch.isfinite(features)).reshape(n, -1).any(dim=1).nonzero().flatten()
            shown = ", ".join(str(int(r)) for r in bad[:5])
            problems.append(f"features hold NaN or infinite values in {len(bad)} row(s) (rows, from 0: {shown}). "
                            "Fill them before writing the file, or use the long form of data: with impute:")
    if not isinstance(labels, Mapping):
        problems.append("labels must be a mapping of column name -> int64 tensor")
        return problems
    for name, col in labels.items():
        if not isinstance(name, str) or not LABEL_NAME_RE.match(name):
            problems.append(f"label column name {name!r} must be 1-64 letters, digits or _")
        if not isinstance(col, torch.Tensor) or col.dtype != torch.int64 or col.dim() != 1:
            problems.append(f"labels {name!r} must be an int64 tensor with one dimension")
        elif col.shape[0] != n:
            problems.append(f"labels {name!r} has {col.shape[0]} rows, ids have {n}")
        elif n and int(col.min()) < 0:
            problems.append(f"labels {name!r} must be class indices >= 0")
    return problems


def write_peer_data(
    path: str | Path,
    *,
    ids: object,
    features: torch.Tensor | np.ndarray | None = None,
    labels: Mapping[str, object] | None = None,
) -> Path:
    """Write one peer's data file (safetensors; keys "ids", "features", "labels.NAME").

    Args:
        path: the file to write (parent folders are created).
        ids: unique integer sample ids [N].
        features: float32-convertible features [N, ...], or None.
        labels: column name -> integer class indices [N].

    Returns:
        The path written.

    Raises:
        ValueError: if the tensors are inconsistent (see `PeerData`).
    """
    id_t = as_id_tensor(ids).contiguous()
    feat = None if features is None else torch.as_tensor(features).to(torch.float32).contiguous()
    cols = {k: as_id_tensor(v).contiguous() for k, v in (labels or {}).items()}
    PeerData(ids=id_t, features=feat, labels=cols)  # validates
    tensors = {"ids": id_t}
    if feat is not None:
        tensors["features"] = feat
    tensors.update({_LABEL_PREFIX + k: v for k, v in cols.items()})
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out))
    return out


def read_safetensors_tensors(
    path: str | Path, *, max_bytes: int = DEFAULT_MAX_DATA_BYTES
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
    """Read a safetensors data file's tensors, checking size, names and dtypes before loading any.

    Args:
        path: the safetensors file.
        max_bytes: refuse a larger file.

    Returns:
        (ids, features or None, labels: TASK -> tensor), not yet checked against each other.

    Raises:
        ConfigError: the file is missing, too big, not safetensors, or holds other tensor names
            or dtypes (every problem at once, each naming the file and the tensor).
    """
    p = Path(path)

    def fail(problems: Sequence[tuple[str, str]]) -> ConfigError:
        return ConfigError([ConfigProblem(file=str(p), key=k, message=m) for k, m in problems])

    if not p.is_file():
        raise fail([("data", f"data file {p} not found")])
    size = p.stat().st_size
    if size > max_bytes:
        raise fail([("data", f"data file is {size} bytes, more than the limit of {max_bytes}")])
    try:
        with safe_open(str(p), framework="pt") as f:
            keys = list(f.keys())
            problems: list[tuple[str, str]] = [
                (k, f"unexpected tensor {k!r}; a data file holds only 'ids', 'features' and 'labels.TASK', "
                    "where TASK is the `labels:` value of a loss segment in the deployment (default 'labels'), "
                    "e.g. 'labels.labels'")
                for k in keys
                if k not in ("ids", "features") and not k.startswith(_LABEL_PREFIX)
            ]
            if "ids" not in keys:
                problems.append(("ids", "the file has no 'ids' tensor (int64 sample ids)"))
            want = {"ids": "I64", "features": "F32"}
            for k in keys:
                dtype = f.get_slice(k).get_dtype()
                expect = want.get(k, "I64")
                if dtype != expect:
                    problems.append((k, f"tensor {k!r} has dtype {dtype}, expected {expect}"))
            if problems:
                raise fail(problems)
            tensors: dict[str, Any] = {k: f.get_tensor(k) for k in keys}
    except ConfigError:
        raise
    except Exception as exc:  # safetensors raises its own errors for a malformed header
        raise fail([("data", f"not a readable safetensors file ({exc}); a CSV, Parquet or .npy file needs the "
                             "long form of the peer config's data: {path, format, id_column, labels} "
                             "(docs/data.md)")]) from None
    labels = {k[len(_LABEL_PREFIX):]: v for k, v in tensors.items() if k.startswith(_LABEL_PREFIX)}
    return tensors["ids"], tensors.get("features"), labels


def read_safetensors_data(path: str | Path, *, max_bytes: int = DEFAULT_MAX_DATA_BYTES) -> PeerData:
    """Load one peer's safetensors data file, checking it fully (see `read_safetensors_tensors`).

    Returns:
        The checked `PeerData` (features finite, ids unique, labels class indices >= 0).

    Raises:
        ConfigError: as `read_safetensors_tensors`, or tensors that do not agree with each other.
    """
    ids, features, labels = read_safetensors_tensors(path, max_bytes=max_bytes)
    try:
        return PeerData(ids=ids, features=features, labels=labels, source=str(path))
    except ValueError as exc:
        raise ConfigError([ConfigProblem(file=str(path), key="data", message=m)
                           for m in str(exc).split("; ")]) from None
