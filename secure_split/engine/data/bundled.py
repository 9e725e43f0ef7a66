"""Demo datasets from scikit-learn's bundled files: nothing is downloaded."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["breast_cancer", "breast_cancer_columns", "digits"]


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8×8 digits (1,797 images, 10 classes).

    Returns:
        (ids int64 [1797] = 0..1796, X float32 [1797, 1, 8, 8] scaled to [0, 1], y int64 [1797]).
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(np.asarray(bunch.data, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    return torch.arange(len(y), dtype=torch.int64), x.contiguous(), y


def breast_cancer(*, raw: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled Wisconsin breast cancer data (569 patients, 30 features, 2 classes).

    Args:
        raw: the clinical values as measured. Default: standardised with the mean and
            (population) standard deviation of all 569 rows, a convenience for benchmarks and
            unit tests; a deployment standardises at each owner on its own training rows
            (`preprocess: {scale: standard}` in its peer config), as the demos do.

    Returns:
        (ids int64 [569] = 0..568, X float32 [569, 30], y int64 [569]: 0 malignant, 1 benign).
    """
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    x = np.asarray(bunch.data, dtype=np.float64)
    if not raw:
        x = (x - x.mean(axis=0)) / x.std(axis=0)
    y = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    return torch.arange(len(y), dtype=torch.int64), torch.from_numpy(x.astype(np.float32)), y


def breast_cancer_columns() -> list[str]:
    """The 30 feature names of `breast_cancer`, as column names: lowercase, `_` for spaces."""
    from sklearn.datasets import load_breast_cancer

    return [str(n).replace(" ", "_") for n in load_breast_cancer().feature_names]
