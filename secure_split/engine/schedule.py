"""The batch schedule, shared by the coordinator and the centralised baseline.

Both call these functions with the deployment's `training.seed`, so the split run and the
baseline see the same train/test split and the same batches in the same order. Everything is a
pure function of its arguments (numpy's seeded PCG64 generator; no global RNG).
"""

from __future__ import annotations

import numpy as np

from secure_split.errors import ConfigError

__all__ = ["epoch_batches", "eval_batches", "split_train_test"]

# Fixed stream tags so the split and each epoch draw from independent, stable streams.
_SPLIT_STREAM = 0
_EPOCH_STREAM = 1


def _id_array(ids: object) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise ValueError(f"sample ids must be a 1-D integer array, got shape {arr.shape} dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def split_train_test(ids: object, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split sample ids into train and test sets, deterministically.

    The ids are sorted first, so the split depends on the set of ids, not their order.

    Args:
        ids: the sample ids every party holds (after alignment).
        test_fraction: share of ids for the test set, in (0, 1).
        seed: `training.seed`.

    Returns:
        (train_ids, test_ids), each a sorted int64 array; both non-empty.

    Raises:
        ConfigError: if there are fewer than 2 ids or the fraction leaves a set empty.
    """
    arr = np.sort(_id_array(ids))
    n = len(arr)
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"training.test_fraction must be in (0, 1), got {test_fraction}")
    n_test = round(n * test_fraction)
    if n < 2 or not 0 < n_test < n:
        raise ConfigError(
            f"cannot split {n} samples with test_fraction {test_fraction} into two non-empty sets"
        )
    perm = np.random.default_rng([int(seed), _SPLIT_STREAM]).permutation(n)
    return np.sort(arr[perm[n_test:]]), np.sort(arr[perm[:n_test]])


def epoch_batches(
    train_ids: object, batch_size: int, seed: int, epoch: int, max_steps: int | None = None
) -> list[np.ndarray]:
    """The training batches of one epoch: a fresh deterministic permutation per epoch.

    Args:
        train_ids: the training ids (from `split_train_test`).
        batch_size: samples per batch; the last batch may be smaller.
        seed: `training.seed`.
        epoch: the epoch number (0-based).
        max_steps: keep only the first this many batches (`training.max_steps_per_epoch`).

    Returns:
        A list of int64 arrays of sample ids.

    Raises:
        ValueError: if batch_size < 1 or max_steps < 1.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    arr = _id_array(train_ids)
    perm = np.random.default_rng([int(seed), _EPOCH_STREAM, int(epoch)]).permutation(len(arr))
    shuffled = arr[perm]
    batches = _chunks(shuffled, batch_size)
    return batches if max_steps is None else batches[:max_steps]


MIN_BATCH = 8
"""A last partial batch smaller than this is merged into the one before it: a batch of one
patient leaks that patient, and shipped policies refuse batches under 8 (`min_batch`)."""


def _chunks(arr: np.ndarray, batch_size: int) -> list[np.ndarray]:
    batches = [arr[i : i + batch_size] for i in range(0, len(arr), batch_size)]
    if len(batches) > 1 and len(batches[-1]) < min(MIN_BATCH, batch_size):
        last = batches.pop()
        batches[-1] = np.concatenate([batches[-1], last])
    return batches


def eval_batches(test_ids: object, batch_size: int) -> list[np.ndarray]:
    """The evaluation batches: the test ids in order, in chunks of `batch_size`.

    Raises:
        ValueError: if batch_size < 1.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    arr = _id_array(test_ids)
    return _chunks(arr, batch_size)
