"""Read a peer's data source into checked columns (`SiteData`): CSV, Parquet, .npy, safetensors.

The one home of pyarrow (CSV and Parquet are read with it). A data file is input like any other:
each bound is checked before what it bounds is allocated: the file size before it is opened; the
column count from the CSV header, the Parquet footer or the .npy header; the Parquet row count
and uncompressed size from its footer; CSV rows and text-cell lengths block by block while
streaming. Every problem is reported at once (up to `MAX_PROBLEMS`), each naming the file, the
column and the rows. Rows are counted from 1 without the header: a CSV's row R is on line R + 1.

A missing value is an empty cell or one of `MISSING_MARKERS` (CSV), a null (Parquet) or NaN
(.npy, safetensors). A missing id or label is always refused; a missing feature value only where
the peer config chooses an imputation for its column.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from secure_split.data_source import WILDCARD, DataSource
from secure_split.engine.data.peer_data import read_safetensors_tensors
from secure_split.errors import ConfigError, ConfigProblem, TrainingError

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["MAX_PROBLEMS", "MISSING_MARKERS", "SiteData", "load_site_data", "site_from_arrays"]

MAX_PROBLEMS = 50
SHOWN_ROWS = 5
MISSING_MARKERS = ("", "NA", "N/A", "NaN", "nan", "null", "NULL")
_CSV_BLOCK = 1 << 20  # bytes per streamed CSV block: what one step of the reader allocates
_INT_RE = r"^[+-]?[0-9]{1,18}$"
_FLOAT_RE = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]{1,4})?$"
_SAFE_INT = 2**53


@dataclass(frozen=True, eq=False)
class SiteData:
    """One peer's rows as read from its data source and checked, before preprocessing.

    Attributes:
        source: where they came from (file, columns, preprocessing choices).
        ids: int64 [N] unique sample ids.
        file_rows: int64 [N] row of each sample in the file (from 1), for messages.
        numbers: numeric feature column -> float64 [N] (NaN where missing and imputed later).
        texts: categorical feature column -> object [N] of str (None where missing).
        feature_order: the feature columns in the order the model sees them.
        categories: categorical column -> its categories, sorted (from the config or the file).
        labels: label task -> int64 [N] class indices.
        block: safetensors features of more than two dimensions (images), taken as they are.
    """

    source: DataSource
    ids: np.ndarray
    file_rows: np.ndarray
    numbers: Mapping[str, np.ndarray] = field(default_factory=dict)
    texts: Mapping[str, np.ndarray] = field(default_factory=dict)
    feature_order: tuple[str, ...] = ()
    categories: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    labels: Mapping[str, np.ndarray] = field(default_factory=dict)
    block: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def width(self) -> int:
        """Feature values per sample after one-hot encoding (0: this peer holds no features)."""
        if self.block is not None:
            return int(np.prod(self.block.shape[1:]))
        return sum(len(self.categories[c]) if c in self.texts else 1 for c in self.feature_order)

    @property
    def has_features(self) -> bool:
        return self.block is not None or bool(self.feature_order)

    def row_positions(self, ids: object) -> np.ndarray:
        """Positions of `ids` in these rows, in the order given.

        Raises:
            TrainingError: some ids are not here (names up to five).
        """
        want = np.asarray(ids, dtype=np.int64).reshape(-1)
        order = np.argsort(self.ids, kind="stable")
        sorted_ids = self.ids[order]
        pos = np.minimum(np.searchsorted(sorted_ids, want), max(len(sorted_ids) - 1, 0))
        found = sorted_ids[pos] == want if len(sorted_ids) else np.zeros(want.shape, dtype=bool)
        if not bool(found.all()):
            shown = ", ".join(str(int(x)) for x in want[~found][:SHOWN_ROWS])
            raise TrainingError(f"{int((~found).sum())} sample id(s) are not in {self.source.path} (e.g. {shown})")
        return np.asarray(order[pos], dtype=np.int64)

    def subset(self, ids: object) -> SiteData:
        """These rows restricted to `ids`, in that order (e.g. the PSI intersection).

        Raises:
            TrainingError: some ids are not in this peer's data.
        """
        idx = self.row_positions(ids)
        return SiteData(
            source=self.source, ids=self.ids[idx], file_rows=self.file_rows[idx],
            numbers={k: v[idx] for k, v in self.numbers.items()}, texts={k: v[idx] for k, v in self.texts.items()},
            feature_order=self.feature_order, categories=self.categories,
            labels={k: v[idx] for k, v in self.labels.items()},
            block=None if self.block is None else self.block[torch.from_numpy(idx)],
        )

    def rows_text(self, mask: np.ndarray) -> str:
        """'rows 3, 17, ... (N rows)' for the rows where `mask` is true, as numbered in the file."""
        return _rows_text(self.file_rows[mask], self.source.format)


def _rows_text(rows: np.ndarray, fmt: str) -> str:
    n = int(rows.shape[0])
    shown = [int(r) for r in rows[:SHOWN_ROWS]]
    more = f", ... ({n} rows)" if n > SHOWN_ROWS else ""
    # A CSV's row R (counted from 1, without the header) is on line R + 1 of the file.
    lines = f" (line{'s' if n != 1 else ''} {', '.join(str(r + 1) for r in shown)}{', ...' if more else ''})" \
        if fmt == "csv" else ""
    return f"row{'s' if n != 1 else ''} {', '.join(map(str, shown))}{more}{lines}"


class _Problems:
    """Every problem with one data file, capped at MAX_PROBLEMS."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.items: list[ConfigProblem] = []
        self.dropped = 0

    def add(self, key: str, message: str) -> None:
        if len(self.items) < MAX_PROBLEMS:
            self.items.append(ConfigProblem(self.path, key, message))
        else:
            self.dropped += 1

    def raise_if_any(self) -> None:
        if self.items:
            if self.dropped:
                self.items.append(ConfigProblem(self.path, "-", f"... and {self.dropped} more problem(s)"))
            raise ConfigError(self.items)


# -- reading each format into pyarrow columns --------------------------------------------------


def _pa() -> Any:
    import pyarrow

    return pyarrow


def _check_size(source: DataSource, problems: _Problems) -> None:
    p = source.path
    if not p.is_file():
        problems.add("data", f"data file {p} not found")
    elif p.stat().st_size > source.spec.limits.max_bytes:
        problems.add("data", f"the file is {p.stat().st_size} bytes, more than data.limits.max_bytes "
                             f"({source.spec.limits.max_bytes}); raise the limit in the peer config if it is right")
    problems.raise_if_any()


def _read_csv(source: DataSource, pick: Callable[[list[str]], list[str]], problems: _Problems) -> dict[str, pa.Array]:
    pa = _pa()
    from pyarrow import csv as pacsv

    lim = source.spec.limits
    parse = pacsv.ParseOptions(delimiter=source.spec.delimiter)
    read = pacsv.ReadOptions(block_size=_CSV_BLOCK)
    try:
        with pacsv.open_csv(source.path, read_options=read, parse_options=parse) as probe:
            names = list(probe.schema.names)
    except (pa.ArrowInvalid, OSError) as exc:
        problems.add("data", f"not a readable CSV file: {exc}")
        problems.raise_if_any()
    if len(names) > lim.max_columns:
        problems.add("data", f"{len(names)} columns, more than data.limits.max_columns ({lim.max_columns})")
        problems.raise_if_any()
    _header_problems(names, problems)
    wanted = pick(names)
    problems.raise_if_any()
    convert = pacsv.ConvertOptions(column_types={n: pa.string() for n in wanted}, include_columns=wanted,
                                   null_values=list(MISSING_MARKERS), strings_can_be_null=True)
    chunks: dict[str, list[Any]] = {n: [] for n in wanted}
    rows = 0
    try:
        with pacsv.open_csv(source.path, read_options=read, parse_options=parse, convert_options=convert) as reader:
            for batch in reader:
                for n in wanted:
                    col = batch.column(n)
                    _check_text_lengths(n, col, rows, lim.max_string_bytes, problems)
                    chunks[n].append(col)
                rows += batch.num_rows
                if rows > lim.max_rows:
                    problems.add("data", f"more than data.limits.max_rows ({lim.max_rows}) rows; raise the limit "
                                         "in the peer config if the file is right")
                if problems.items:
                    break
    except (pa.ArrowInvalid, OSError) as exc:
        problems.add("data", f"not a readable CSV file after row {rows}: {exc}")
    problems.raise_if_any()
    return {n: pa.concat_arrays(c) if c else pa.array([], pa.string()) for n, c in chunks.items()}


def _check_text_lengths(name: str, col: Any, first_row: int, limit: int, problems: _Problems) -> None:
    import pyarrow.compute as pc

    if not _pa().types.is_string(col.type):
        return
    lengths = pc.binary_length(col)
    longest = pc.max(lengths).as_py()
    if longest is not None and longest > limit:
        over = np.flatnonzero(np.asarray(pc.fill_null(pc.greater(lengths, limit), False)))
        problems.add(f"column {name}", f"a cell of {longest} bytes, more than data.limits.max_string_bytes ({limit}), "
                                       f"in {_rows_text(over + first_row + 1, 'csv')}")


def _read_parquet(source: DataSource, pick: Callable[[list[str]], list[str]], problems: _Problems) -> dict[str, pa.Array]:
    pa = _pa()
    import pyarrow.parquet as pq

    lim = source.spec.limits
    try:
        pf = pq.ParquetFile(source.path)
        meta = pf.metadata
        names = list(pf.schema_arrow.names)
    except (pa.ArrowInvalid, OSError) as exc:
        problems.add("data", f"not a readable Parquet file: {exc}")
        problems.raise_if_any()
    if len(names) > lim.max_columns:
        problems.add("data", f"{len(names)} columns, more than data.limits.max_columns ({lim.max_columns})")
    if meta.num_rows > lim.max_rows:
        problems.add("data", f"{meta.num_rows} rows, more than data.limits.max_rows ({lim.max_rows})")
    unpacked = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    if unpacked > lim.max_bytes:
        problems.add("data", f"{unpacked} bytes uncompressed, more than data.limits.max_bytes ({lim.max_bytes})")
    problems.raise_if_any()
    _header_problems(names, problems)
    wanted = pick(names)
    problems.raise_if_any()
    try:
        table = pf.read(columns=wanted)
    except (pa.ArrowInvalid, OSError) as exc:
        problems.add("data", f"not a readable Parquet file: {exc}")
        problems.raise_if_any()
    out = {}
    for n in wanted:
        col = table.column(n).combine_chunks()
        if pa.types.is_dictionary(col.type):
            col = col.dictionary_decode()
        if pa.types.is_large_string(col.type):
            col = col.cast(pa.string())
        _check_text_lengths(n, col, 0, lim.max_string_bytes, problems)
        out[n] = col
    problems.raise_if_any()
    return out


def _read_npy(source: DataSource, pick: Callable[[list[str]], list[str]], problems: _Problems) -> dict[str, pa.Array]:
    pa = _pa()
    lim = source.spec.limits
    names = list(source.spec.columns or [])
    try:
        with source.path.open("rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            header = read_header(f)
            offset = f.tell()
    except (ValueError, OSError, SyntaxError) as exc:
        problems.add("data", f"not a readable .npy file: {exc}")
        problems.raise_if_any()
    shape, fortran, dtype = header
    if len(shape) != 2:
        problems.add("data", f"a .npy data file holds one 2-D array [rows, columns], got shape {list(shape)}")
    elif dtype.kind not in "biuf" or dtype.hasobject:
        problems.add("data", f"a .npy data file holds numbers (int, uint, float, bool), got dtype {dtype}")
    else:
        if shape[0] > lim.max_rows:
            problems.add("data", f"{shape[0]} rows, more than data.limits.max_rows ({lim.max_rows})")
        if shape[1] > lim.max_columns:
            problems.add("data", f"{shape[1]} columns, more than data.limits.max_columns ({lim.max_columns})")
        if shape[1] != len(names):
            problems.add("columns", f"the array has {shape[1]} columns; data.columns names {len(names)}")
        if offset + int(np.prod(shape)) * dtype.itemsize != source.path.stat().st_size:
            problems.add("data", "the file's size does not match its header (truncated or padded)")
    problems.raise_if_any()
    wanted = pick(names)
    problems.raise_if_any()
    # Read from the checked header's numeric dtype and shape: no np.load, nothing that can unpickle.
    arr = np.memmap(source.path, dtype=dtype, mode="r", offset=offset, shape=tuple(shape),
                    order="F" if fortran else "C")
    return {n: pa.array(np.ascontiguousarray(arr[:, names.index(n)])) for n in wanted}


def _header_problems(names: Sequence[str], problems: _Problems) -> None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            problems.add(f"column {n}", "the header names this column twice; rename one")
        seen.add(n)


# -- columns to values ---------------------------------------------------------------------------


def _trimmed(col: Any) -> Any:
    import pyarrow.compute as pc

    return pc.utf8_trim_whitespace(col)


def _as_ints(col: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values int64, missing, bad) of an id or label column."""
    pa = _pa()
    import pyarrow.compute as pc

    t = col.type
    n = len(col)
    missing = np.asarray(pc.is_null(col, nan_is_null=True)) if n else np.zeros(0, dtype=bool)
    if pa.types.is_integer(t) or pa.types.is_boolean(t):
        vals = np.asarray(pc.fill_null(col.cast(pa.int64()), 0))
        return vals.astype(np.int64), missing, np.zeros(n, dtype=bool)
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        x = np.array(pc.fill_null(col.cast(pa.float64()), 0.0), dtype=np.float64)
        x = np.where(missing, 0.0, x)
        bad = ~missing & ~(np.isfinite(x) & (np.floor(x) == x) & (np.abs(x) < _SAFE_INT))
        return np.where(bad, 0, x).astype(np.int64), missing, bad
    if pa.types.is_string(t):
        s = _trimmed(col)
        ok = np.asarray(pc.fill_null(pc.match_substring_regex(s, _INT_RE), False))
        bad = ~missing & ~ok
        vals = pc.cast(pc.if_else(pa.array(ok), s, "0"), pa.int64())
        return np.asarray(vals, dtype=np.int64), missing, bad
    return np.zeros(n, dtype=np.int64), missing, ~missing


def _as_floats(col: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values float64 with NaN where missing, missing, bad) of a numeric feature column."""
    pa = _pa()
    import pyarrow.compute as pc

    t = col.type
    n = len(col)
    missing = np.asarray(pc.is_null(col, nan_is_null=True)) if n else np.zeros(0, dtype=bool)
    if pa.types.is_integer(t) or pa.types.is_boolean(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        x = np.array(pc.fill_null(col.cast(pa.float64()), np.nan), dtype=np.float64)
    elif pa.types.is_string(t):
        s = _trimmed(col)
        ok = np.asarray(pc.fill_null(pc.match_substring_regex(s, _FLOAT_RE), False))
        x = np.array(pc.cast(pc.if_else(pa.array(ok), s, "nan"), pa.float64()), dtype=np.float64)
        bad = ~missing & ~ok
        x[bad] = np.nan
        return x, missing, bad | (~missing & ~np.isfinite(x) & ok)
    else:
        return np.full(n, np.nan), missing, ~missing
    bad = ~missing & ~np.isfinite(x)
    x[missing] = np.nan
    return x, missing, bad


def _as_texts(col: Any) -> tuple[np.ndarray, np.ndarray]:
    """(object array of str with None where missing, missing) of a categorical column."""
    pa = _pa()
    import pyarrow.compute as pc

    t = col.type
    if pa.types.is_floating(t):
        ints, missing, bad = _as_ints(col)
        # 1.0 and 1 are the same category; 1.5 keeps its own text.
        text = np.asarray(col.cast(pa.string()).to_pylist(), dtype=object)
        text[~bad] = ints[~bad].astype(str)
        text[missing] = None
        return text, missing
    if pa.types.is_string(t):
        col = _trimmed(col)
    col = col.cast(pa.string())
    missing = np.asarray(pc.is_null(col)) if len(col) else np.zeros(0, dtype=bool)
    return np.asarray(col.to_pylist(), dtype=object), missing


# -- the source as a whole ------------------------------------------------------------------------


def load_site_data(source: DataSource, *, inference: bool = False) -> SiteData:
    """Read and check one peer's data source.

    Args:
        source: the peer config's `data:` section (see `secure_split.data_source`).
        inference: rows to predict: label columns are not required; those the file has are read
            (the requester compares its predictions with them locally).

    Returns:
        The checked rows, not yet preprocessed (`fit_preprocessing`, `Preprocessing.apply`).

    Raises:
        ConfigError: with every problem found, each naming the file, the column and the rows:
            bounds, unreadable files, columns the config names that the file lacks, values that
            are not numbers (or integers, for ids and labels), negative labels, missing values
            with no imputation chosen, duplicate ids, categories outside a listed set.
    """
    problems = _Problems(source.path)
    _check_size(source, problems)
    if source.format == "safetensors":
        return _from_safetensors(source, problems, inference)
    spec = source.spec
    categorical = list(spec.categorical)
    label_cols = {} if inference else dict(spec.labels)
    roles: dict[str, list[str]] = {}

    def pick(names: list[str]) -> list[str]:
        if inference:
            label_cols.update({t: c for t, c in spec.labels.items() if c in names})
        missing_cols = [c for c in [spec.id_column or "", *label_cols.values(), *(spec.features or [])]
                        if c not in names]
        for c in dict.fromkeys(missing_cols):
            problems.add(f"column {c}", f"named in the peer config's data: section but not in the file; its columns "
                                        f"are {_names(names)}")
        features = spec.features if spec.features is not None else [
            n for n in names if n != spec.id_column and n not in set(spec.labels.values())]
        for c in categorical:
            if c not in features:
                problems.add(f"column {c}", f"data.categorical names '{c}', which is not a feature column")
        roles["features"] = [c for c in features if c in names]
        return list(dict.fromkeys([spec.id_column or "", *label_cols.values(), *roles["features"]]))

    readers = {"csv": _read_csv, "parquet": _read_parquet, "npy": _read_npy}
    cols = readers[source.format](source, pick, problems)
    file_rows = np.arange(1, len(cols[spec.id_column or ""]) + 1, dtype=np.int64)
    ids = _int_column(spec.id_column or "", cols[spec.id_column or ""], file_rows, source, problems, "id")
    labels = {task: _int_column(c, cols[c], file_rows, source, problems, "label") for task, c in label_cols.items()}
    numbers: dict[str, np.ndarray] = {}
    texts: dict[str, np.ndarray] = {}
    categories: dict[str, tuple[str, ...]] = {}
    for c in roles["features"]:
        strategy = spec.impute.get(c, spec.impute.get(WILDCARD))
        imputed = strategy is not None and not (c in categorical and strategy in ("mean", "median"))
        if c in categorical:
            values, missing = _as_texts(cols[c])
            texts[c] = values
            categories[c] = _categories(c, values, missing, source, file_rows, problems)
        else:
            x, missing, bad = _as_floats(cols[c])
            if bad.any():
                problems.add(f"column {c}", f"not a finite number in {_rows_text(file_rows[bad], source.format)}"
                                            + (f" (e.g. {_first_text(cols[c], bad)!r}); if the column holds "
                                               "categories, list it under data.categorical"))
            numbers[c] = x
        if missing.any() and not imputed:
            problems.add(f"column {c}", f"missing value(s) in {_rows_text(file_rows[missing], source.format)}; fill "
                                        f"them in the file, or choose an imputation: data.impute.{c}: mean | median | "
                                        "most_frequent | {constant: VALUE}")
    site = SiteData(source=source, ids=ids, file_rows=file_rows, numbers=numbers, texts=texts,
                    feature_order=tuple(roles["features"]), categories=categories, labels=labels)
    _duplicate_ids(site, problems)
    problems.raise_if_any()
    return site


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(names[:12])
    return shown + (f", ... ({len(names)} in all)" if len(names) > 12 else "")


def _first_text(col: Any, mask: np.ndarray) -> str:
    return str(col[int(np.flatnonzero(mask)[0])].as_py())[:40]


def _int_column(name: str, col: Any, file_rows: np.ndarray, source: DataSource, problems: _Problems,
                role: str) -> np.ndarray:
    vals, missing, bad = _as_ints(col)
    if missing.any():
        problems.add(f"column {name}", f"missing {role}(s) in {_rows_text(file_rows[missing], source.format)}; every "
                                       f"row needs its {role} (imputation applies to features only)")
    if bad.any():
        what = "sample ids are integers" if role == "id" else "labels are class indices 0, 1, 2, ..."
        problems.add(f"column {name}", f"not an integer in {_rows_text(file_rows[bad], source.format)}"
                                       f" (e.g. {_first_text(col, bad)!r}); {what}")
    if role == "label" and (neg := (vals < 0) & ~missing & ~bad).any():
        problems.add(f"column {name}", f"negative class in {_rows_text(file_rows[neg], source.format)}; labels are "
                                       "class indices 0, 1, 2, ...")
    return vals


def _categories(name: str, values: np.ndarray, missing: np.ndarray, source: DataSource, file_rows: np.ndarray,
                problems: _Problems) -> tuple[str, ...]:
    spec = source.spec
    listed = spec.categorical.get(name) if isinstance(spec.categorical, dict) else None
    seen = sorted({str(v) for v in values[~missing]})
    fill = spec.impute.get(name, spec.impute.get(WILDCARD))
    constant = getattr(fill, "constant", None)
    if listed is not None:
        cats = tuple(sorted(str(c) for c in listed))
        outside = ~missing & ~np.isin(values.astype(str), np.asarray(cats, dtype=str))
        if outside.any():
            problems.add(f"column {name}", f"value {values[outside][0]!r} in {_rows_text(file_rows[outside], source.format)} "
                                           f"is not one of the categories {list(cats)} listed in data.categorical.{name}")
    else:
        cats = tuple(seen)
    if constant is not None and str(constant) not in cats:
        cats = tuple(sorted((*cats, str(constant))))
    if len(cats) > spec.limits.max_categories:
        problems.add(f"column {name}", f"{len(cats)} categories, more than data.limits.max_categories "
                                       f"({spec.limits.max_categories}); is it really categorical?")
    return cats


def _duplicate_ids(site: SiteData, problems: _Problems) -> None:
    order = np.argsort(site.ids, kind="stable")
    s = site.ids[order]
    dup = np.flatnonzero(s[1:] == s[:-1])
    if not len(dup):
        return
    values = np.unique(s[dup])
    key = f"column {site.source.spec.id_column}" if site.source.spec.id_column else "ids"
    for v in values[:SHOWN_ROWS]:
        rows = np.sort(site.file_rows[site.ids == v])
        problems.add(key, f"id {int(v)} appears in {len(rows)} rows: {_rows_text(rows, site.source.format)}; "
                          "ids must be unique")
    if len(values) > SHOWN_ROWS:
        problems.add(key, f"... {len(values)} ids appear more than once in all")


def _from_safetensors(source: DataSource, problems: _Problems, inference: bool) -> SiteData:
    spec = source.spec
    ids_t, features, file_labels = read_safetensors_tensors(source.path, max_bytes=spec.limits.max_bytes)
    n = int(ids_t.shape[0])
    if ids_t.dim() != 1:
        problems.add("ids", f"ids must have one dimension, got shape {list(ids_t.shape)}")
        problems.raise_if_any()
    file_rows = np.arange(1, n + 1, dtype=np.int64)
    labels: dict[str, np.ndarray] = {}
    wanted = spec.labels or {k: k for k in file_labels}
    if inference:  # rows to predict: the labels the file has, none required
        wanted = {t: name for t, name in wanted.items() if name.removeprefix("labels.") in file_labels}
    for task, name in wanted.items():
        key = name.removeprefix("labels.")
        if key not in file_labels:
            problems.add(f"labels.{key}", f"data.labels.{task} names tensor 'labels.{key}', which the file lacks; "
                                          f"it has {sorted('labels.' + k for k in file_labels) or 'no labels'}")
            continue
        col = file_labels[key]
        if col.dim() != 1 or col.shape[0] != n:
            problems.add(f"labels.{key}", f"shape {list(col.shape)}; expected [{n}] like ids")
            continue
        labels[task] = col.numpy().astype(np.int64)
        if (neg := labels[task] < 0).any():
            problems.add(f"labels.{key}", f"negative class in {_rows_text(file_rows[neg], 'safetensors')}")
    numbers: dict[str, np.ndarray] = {}
    block = None
    imputed = bool(spec.impute)
    if features is not None:
        if features.dim() < 2 or features.shape[0] != n:
            problems.add("features", f"shape {list(features.shape)}; expected [{n}, ...] like ids")
        elif features.dim() == 2 and not source.legacy:
            x = features.numpy().astype(np.float64)
            numbers = {f"features[{j}]": x[:, j].copy() for j in range(x.shape[1])}
        else:
            block = features
    site = SiteData(source=source, ids=ids_t.numpy().astype(np.int64), file_rows=file_rows, numbers=numbers,
                    feature_order=tuple(numbers), labels=labels, block=block)
    finite_values = [torch.isfinite(block).reshape(n, -1).all(dim=1).numpy()] if block is not None else []
    finite_values += [~np.isnan(v) & np.isfinite(v) for v in numbers.values()]
    for ok in finite_values:
        infinite = ~ok
        if infinite.any() and (block is not None or not imputed):
            problems.add("features", f"NaN or infinite values in {_rows_text(file_rows[infinite], 'safetensors')}; "
                                     "fill them, or choose an imputation: data.impute: {'*': mean}")
            break
    for name, v in numbers.items():
        if (np.isinf(v)).any():
            problems.add(name, f"infinite values in {_rows_text(file_rows[np.isinf(v)], 'safetensors')}")
            break
    _duplicate_ids(site, problems)
    problems.raise_if_any()
    return site


def site_from_arrays(ids: object, features: object, *, labels: Mapping[str, object] | None = None,
                     **section: Any) -> SiteData:
    """Rows built in code, with a data section's preprocessing choices (demos, baselines, tests).

    Feature column j is named "features[j]", as for a safetensors file's 2-D features.

    Args:
        ids: unique integer sample ids [N].
        features: numbers [N, d] (NaN where missing).
        labels: task -> class indices [N].
        section: keys of the long form of `data:` that apply to unnamed columns (`preprocess`,
            `impute`), e.g. `preprocess={"scale": "standard"}`.

    Raises:
        ValueError: the arrays do not agree, or the section is not valid.
    """
    x = np.asarray(features, dtype=np.float64)
    id_arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    if x.ndim != 2 or x.shape[0] != id_arr.shape[0] or len(np.unique(id_arr)) != len(id_arr):
        raise ValueError(f"need unique ids [N] and features [N, d], got {list(id_arr.shape)} and {list(x.shape)}")
    source = DataSource.of("(in memory).safetensors", **section)
    numbers = {f"features[{j}]": x[:, j].copy() for j in range(x.shape[1])}
    return SiteData(source=source, ids=id_arr, file_rows=np.arange(1, len(id_arr) + 1, dtype=np.int64),
                    numbers=numbers, feature_order=tuple(numbers),
                    labels={k: np.asarray(v, dtype=np.int64) for k, v in (labels or {}).items()})
