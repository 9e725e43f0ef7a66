"""Per-site preprocessing: imputation, scaling and one-hot encoding, private to one organisation.

`fit_preprocessing(site, train_ids)` learns, from this peer's own *training* rows only, the value
that fills each column's missing cells (mean, median, most frequent, or a constant) and each
numeric column's scaling (standard: mean and population standard deviation; min-max: range).
Categories of a categorical column come from the peer config or from the whole file (so the
feature width, which the deployment's first layer fixes, does not depend on the split); they are
not statistics of any row's value. `Preprocessing.apply(site)` turns rows into the float32
features the segments read, the same way at training, evaluation and inference.

The fitted values never leave the site: they are saved only in this peer's own checkpoint
manifest (`Preprocessing.to_json`, plain JSON: no pickle), and read back for inference.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from secure_split.data_source import WILDCARD, Constant, Scale
from secure_split.engine.data.peer_data import PeerData
from secure_split.engine.data.tables import SiteData
from secure_split.errors import ConfigError, ConfigProblem

__all__ = ["FORMAT", "ColumnFit", "Preprocessing", "fit_preprocessing"]

FORMAT = 1
_MAX_JSON_COLUMNS = 1_000_000
_MAX_JSON_CATEGORIES = 100_000
_MAX_TEXT = 1024**2


@dataclass(frozen=True)
class ColumnFit:
    """What was learnt for one feature column.

    Attributes:
        name: the column.
        kind: "number" (one feature value) or "category" (one value per category, one-hot).
        fill: the value that replaces a missing cell, or None (a missing cell is refused).
        scale: "none", "standard" or "minmax".
        offset, factor: a number becomes (x - offset) * factor (0 and 1 without scaling).
        categories: a categorical column's categories, in feature order.
    """

    name: str
    kind: Literal["number", "category"]
    fill: float | str | None = None
    scale: Scale = "none"
    offset: float = 0.0
    factor: float = 1.0
    categories: tuple[str, ...] = ()


@dataclass(frozen=True)
class Preprocessing:
    """A fitted per-site transform from checked rows (`SiteData`) to the segments' features.

    Attributes:
        columns: one `ColumnFit` per feature column, in feature order (empty: no features, or a
            block of features taken as they are).
        block: the features are a safetensors block (images) passed through unchanged.
        train_rows: how many training rows the statistics were fitted on (0: nothing fitted).
    """

    columns: tuple[ColumnFit, ...] = ()
    block: bool = False
    train_rows: int = 0

    @property
    def width(self) -> int:
        """Feature values per sample this transform produces (0 for a block or no features)."""
        return sum(len(c.categories) if c.kind == "category" else 1 for c in self.columns)

    def apply(self, site: SiteData) -> PeerData:
        """Turn checked rows into `PeerData` with float32 features [N, width].

        Args:
            site: rows from `load_site_data` with the same feature columns as those fitted (the
                training file, or a file of rows to predict).

        Returns:
            The peer's data for the executor (ids, features, labels).

        Raises:
            ConfigError: other feature columns than fitted, a missing value with no fill, or a
                category the model was not trained with (each with file, column and rows).
        """
        where = str(site.source.path)
        fitted = tuple(c.name for c in self.columns)
        if self.block != (site.block is not None) or (not self.block and fitted != site.feature_order):
            raise ConfigError(ConfigProblem(where, "features", (
                f"the file's feature columns {list(site.feature_order) or '(a block)'} are not the ones the "
                f"preprocessing was fitted on {list(fitted) or '(a block)'}; use the columns of the training data")))
        labels = {k: torch.from_numpy(np.array(v, dtype=np.int64)) for k, v in site.labels.items()}
        ids = torch.from_numpy(np.array(site.ids, dtype=np.int64))
        if self.block:
            return PeerData(ids=ids, features=site.block, labels=labels, source=where)
        if not self.columns:
            return PeerData(ids=ids, labels=labels, source=where)
        problems: list[ConfigProblem] = []
        parts = [self._column(c, site, problems) for c in self.columns]
        if problems:
            raise ConfigError(problems)
        x = np.concatenate(parts, axis=1).astype(np.float32)
        return PeerData(ids=ids, features=torch.from_numpy(x), labels=labels, source=where)

    def _column(self, c: ColumnFit, site: SiteData, problems: list[ConfigProblem]) -> np.ndarray:
        where = str(site.source.path)
        n = len(site)
        if c.kind == "number":
            x = site.numbers[c.name].copy()
            missing = np.isnan(x)
            if missing.any():
                if c.fill is None:
                    problems.append(ConfigProblem(where, f"column {c.name}", f"missing value(s) in "
                                    f"{site.rows_text(missing)}, and no imputation was fitted for this column"))
                x[missing] = float(c.fill or 0.0)
            return ((x - c.offset) * c.factor).reshape(n, 1)
        values = site.texts[c.name].copy()
        missing = np.asarray([v is None for v in values], dtype=bool)
        if missing.any():
            if c.fill is None:
                problems.append(ConfigProblem(where, f"column {c.name}", f"missing value(s) in "
                                f"{site.rows_text(missing)}, and no imputation was fitted for this column"))
            values[missing] = str(c.fill)
        index = {cat: i for i, cat in enumerate(c.categories)}
        codes = np.asarray([index.get(str(v), -1) for v in values], dtype=np.int64)
        unknown = (codes < 0) & ~missing
        if unknown.any():
            problems.append(ConfigProblem(where, f"column {c.name}", (
                f"category {values[unknown][0]!r} in {site.rows_text(unknown)} is not one the model was trained "
                f"with ({list(c.categories)[:10]}); list every category under data.categorical.{c.name} and retrain")))
        out = np.zeros((n, len(c.categories)), dtype=np.float64)
        ok = codes >= 0
        out[np.flatnonzero(ok), codes[ok]] = 1.0
        return out

    # -- JSON, for the checkpoint manifest -----------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-able form (floats exact: Python's repr round-trips float64)."""
        return {
            "format": FORMAT,
            "block": self.block,
            "train_rows": self.train_rows,
            "columns": [
                {"name": c.name, "kind": c.kind, "fill": c.fill, "scale": c.scale, "offset": c.offset,
                 "factor": c.factor, "categories": list(c.categories)}
                for c in self.columns
            ],
        }

    @classmethod
    def from_json(cls, obj: object, *, where: str) -> Preprocessing:
        """Rebuild from `to_json`'s form, checking every field and bound.

        Args:
            obj: the parsed JSON.
            where: the file it came from, for messages.

        Raises:
            ConfigError: a field is missing, mistyped, not finite or out of bounds.
        """
        def bad(msg: str) -> ConfigError:
            return ConfigError(ConfigProblem(where, "preprocessing", msg))

        if not isinstance(obj, Mapping) or obj.get("format") != FORMAT:
            raise bad(f"expected an object with format {FORMAT}")
        cols, block, rows = obj.get("columns"), obj.get("block"), obj.get("train_rows")
        if not isinstance(cols, list) or len(cols) > _MAX_JSON_COLUMNS or not isinstance(block, bool) \
                or not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
            raise bad("columns, block or train_rows are missing or mistyped")
        out = []
        for i, c in enumerate(cols):
            if not isinstance(c, Mapping):
                raise bad(f"column {i} is not an object")
            name, kind, fill, scale = c.get("name"), c.get("kind"), c.get("fill"), c.get("scale")
            offset, factor, cats = c.get("offset"), c.get("factor"), c.get("categories")
            numbers_ok = all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                             for v in (offset, factor))
            if not (isinstance(name, str) and len(name) <= _MAX_TEXT and kind in ("number", "category")
                    and scale in ("none", "standard", "minmax") and numbers_ok and factor != 0
                    and isinstance(cats, list) and len(cats) <= _MAX_JSON_CATEGORIES
                    and all(isinstance(x, str) and len(x) <= _MAX_TEXT for x in cats)):
                raise bad(f"column {i} ({str(name)[:40]!r}) is malformed")
            if kind == "number" and not (fill is None or (isinstance(fill, int | float) and not isinstance(fill, bool)
                                                          and math.isfinite(fill))):
                raise bad(f"column {name!r}: fill must be a finite number or null")
            if kind == "category" and not (fill is None or (isinstance(fill, str) and fill in cats)):
                raise bad(f"column {name!r}: fill must be one of its categories or null")
            assert isinstance(offset, int | float) and isinstance(factor, int | float)
            out.append(ColumnFit(name=name, kind=kind, fill=fill, scale=scale, offset=float(offset),
                                 factor=float(factor), categories=tuple(cats)))
        return cls(columns=tuple(out), block=block, train_rows=rows)


def fit_preprocessing(site: SiteData, train_ids: object | None) -> Preprocessing:
    """Fit the peer config's imputation and scaling on this peer's own training rows.

    Call it after the ids are aligned (PSI), with the training ids of the run's split (the rows the
    coordinator's `split_train_test` puts in training; see docs/data.md, "Which rows are training
    rows"). Test rows must not be passed: their values would leak into the statistics.

    Args:
        site: this peer's checked rows (`load_site_data`), possibly restricted to the intersection.
        train_ids: the training sample ids; None only when nothing is fitted (no imputation, no
            scaling), e.g. to apply a one-hot encoding with listed or file-wide categories.

    Returns:
        The fitted `Preprocessing` (save it with the checkpoint; apply it at train, eval, inference).

    Raises:
        ConfigError: train_ids is None or empty while something must be fitted, a column's
            training rows are all missing, or a constant fill has the wrong type.
        TrainingError: some training ids are not in this peer's data.
    """
    where = str(site.source.path)
    if site.block is not None:
        return Preprocessing(block=True)
    needs_fit = any(_scale_of(site, c) != "none" or _strategy_of(site, c) is not None for c in site.feature_order)
    if needs_fit and (train_ids is None or np.asarray(train_ids).size == 0):
        raise ConfigError(ConfigProblem(where, "preprocess", "scaling or imputation is fitted on training rows; "
                                        "pass the training ids of the run's split"))
    rows = site.row_positions(train_ids) if needs_fit else np.zeros(0, dtype=np.int64)
    problems: list[ConfigProblem] = []
    cols = []
    for name in site.feature_order:
        strategy = _strategy_of(site, name)
        if name in site.texts:
            values = site.texts[name][rows]
            fill: float | str | None = None
            if isinstance(strategy, Constant):
                fill = str(strategy.constant)
            elif strategy in ("mean", "median"):
                problems.append(ConfigProblem(where, f"column {name}", f"'{strategy}' cannot fill a categorical "
                                              f"column; set data.impute.{name}: most_frequent or {{constant: CATEGORY}}"))
                continue
            elif strategy == "most_frequent":
                seen = [str(v) for v in values if v is not None]
                if not seen:
                    problems.append(ConfigProblem(where, f"column {name}", "every training row is missing; nothing to impute from"))
                    continue
                uniq, counts = np.unique(np.asarray(seen, dtype=str), return_counts=True)
                fill = str(uniq[int(np.argmax(counts))])  # ties: the first in sorted order
            cols.append(ColumnFit(name, "category", fill=fill, categories=tuple(site.categories[name])))
            continue
        x = site.numbers[name][rows]
        known = x[~np.isnan(x)]
        num_fill: float | None = None
        if strategy is not None:
            if isinstance(strategy, Constant):
                if isinstance(strategy.constant, str):
                    problems.append(ConfigProblem(where, f"column {name}", f"data.impute.{name}: the constant for a "
                                                  f"numeric column is a number, got {strategy.constant!r}"))
                    continue
                num_fill = float(strategy.constant)
            elif known.size == 0:
                problems.append(ConfigProblem(where, f"column {name}", "every training row is missing; nothing to impute from"))
                continue
            elif strategy == "mean":
                num_fill = float(known.mean())
            elif strategy == "median":
                num_fill = float(np.median(known))
            else:
                uniq, counts = np.unique(known, return_counts=True)
                num_fill = float(uniq[int(np.argmax(counts))])
            x = np.where(np.isnan(x), num_fill, x)
        scale = _scale_of(site, name)
        offset, factor = 0.0, 1.0
        if scale != "none" and x.size:
            if scale == "standard":
                offset, spread = float(x.mean()), float(x.std())
            else:
                offset, spread = float(x.min()), float(x.max() - x.min())
            # A constant training column keeps factor 1: it becomes 0 (standard) or 0 (min-max).
            factor = 1.0 / spread if spread > 0 and math.isfinite(1.0 / spread) else 1.0
        cols.append(ColumnFit(name, "number", fill=num_fill, scale=scale, offset=offset, factor=factor))
    if problems:
        raise ConfigError(problems)
    return Preprocessing(columns=tuple(cols), train_rows=int(rows.shape[0]))


def _strategy_of(site: SiteData, name: str) -> Any:
    impute = site.source.spec.impute
    return impute.get(name, impute.get(WILDCARD))


def _scale_of(site: SiteData, name: str) -> Scale:
    if name in site.texts:
        return "none"
    pre = site.source.spec.preprocess
    return pre.columns.get(name, pre.scale)
