"""The `data:` section of a peer config: where one organisation's data lies and how it is read.

Two forms. The short one is a path to a safetensors file with the tensors `ids`, `features` and
`labels.TASK` (what `write_peer_data` writes). The long one is a mapping:

    data:
      path: ../data/hospital_a.csv     # relative to the peer config
      format: csv                      # csv | parquet | safetensors | npy (default: from the suffix)
      id_column: patient_id            # the join key; integers
      features: [age, bmi, smoker]     # default: every column but the id and label columns
      labels: {labels: diagnosis}      # TASK -> column; TASK is a loss segment's `labels:` value
      categorical: [smoker]            # one-hot encoded (or {smoker: [no, yes]} to fix the categories)
      impute: {bmi: median}            # fill missing values; without it a missing value is refused
      preprocess: {scale: standard}    # standard | minmax | none, fitted on this peer's training rows
      limits: {max_rows: 1000000}      # bounds checked before anything is allocated

Everything here stays at the organisation: the deployment never sees it, and the statistics the
preprocessing fits (means, deviations, ranges, categories) are saved only in this peer's own
checkpoints. This module only validates the section; `secure_split.engine.data` reads the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from secure_split.yamlfile import KeyPath

__all__ = [
    "FORMATS",
    "DataLimits",
    "DataSource",
    "DataSourceSpec",
    "PreprocessSpec",
    "data_source_problems",
    "resolve_data_source",
]

FORMATS = ("csv", "parquet", "safetensors", "npy")
_SUFFIXES = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".pq": "parquet",
             ".safetensors": "safetensors", ".npy": "npy"}
Scale = Literal["none", "standard", "minmax"]
Strategy = Literal["mean", "median", "most_frequent"]
WILDCARD = "*"
"""An `impute:` key that applies to every feature column without an entry of its own."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class DataLimits(_Strict):
    """Bounds on a data file, checked before the rows they bound are allocated."""

    max_bytes: int = Field(2 * 1024**3, ge=1, le=64 * 1024**3, description="largest file read")
    max_rows: int = Field(10_000_000, ge=1, le=1_000_000_000, description="most rows")
    max_columns: int = Field(10_000, ge=1, le=1_000_000, description="most columns in the file")
    max_string_bytes: int = Field(1024, ge=1, le=1024**2, description="longest text cell, in UTF-8 bytes")
    max_categories: int = Field(1000, ge=1, le=100_000, description="most categories of one categorical column")


class Constant(_Strict):
    """Fill missing values of a column with this value (a number, or a category's text)."""

    constant: float | str


class PreprocessSpec(_Strict):
    """Per-column scaling, fitted on this peer's own training rows only."""

    scale: Scale = Field("none", description="scaling of every numeric feature column")
    columns: dict[str, Scale] = Field(default_factory=dict, description="per-column scaling, overriding `scale`")


class DataSourceSpec(_Strict):
    """The long form of a peer config's `data:` section, as written."""

    path: str = Field(description="the data file, relative to the peer config")
    format: Literal["csv", "parquet", "safetensors", "npy"] | None = Field(
        None, description="default: from the file's suffix (.csv .tsv .parquet .pq .safetensors .npy)")
    id_column: str | None = Field(None, description="column of integer sample ids (csv, parquet, npy)")
    columns: list[str] | None = Field(None, description="npy only: the names of the array's columns, in order")
    features: list[str] | None = Field(None, description="feature columns in order; default all other columns")
    labels: dict[str, str] = Field(default_factory=dict, description="label task -> column of class indices")
    categorical: list[str] | dict[str, list[str] | None] = Field(
        default_factory=list, description="feature columns to one-hot encode (optionally with their categories)")
    impute: dict[str, Strategy | Constant] = Field(
        default_factory=dict, description="column (or '*') -> mean | median | most_frequent | {constant: V}")
    preprocess: PreprocessSpec = PreprocessSpec()
    delimiter: str = Field(",", min_length=1, max_length=1, description="csv only: the field separator")
    limits: DataLimits = DataLimits()


def _fmt(path: str, given: str | None) -> str | None:
    return given or _SUFFIXES.get(Path(path).suffix.lower())


def data_source_problems(spec: DataSourceSpec, where: KeyPath = ("data",)) -> list[tuple[KeyPath, str]]:
    """What is wrong inside a `data:` mapping, before the file is opened.

    Args:
        spec: the parsed section.
        where: the key path of the section.

    Returns:
        (key path, message) for every problem found; empty when the section is consistent.
    """
    out: list[tuple[KeyPath, str]] = []
    fmt = _fmt(spec.path, spec.format)
    if fmt is None:
        out.append(((*where, "format"), f"cannot tell the format from the suffix of '{spec.path}'; "
                                        f"set format: {' | '.join(FORMATS)}"))
    tabular = fmt in ("csv", "parquet", "npy")
    if tabular and not spec.id_column:
        out.append(((*where, "id_column"), f"a {fmt} file needs id_column: the column of integer sample ids "
                                           "that every party joins on"))
    if fmt == "safetensors":
        for key in ("id_column", "columns", "features"):
            if getattr(spec, key):
                out.append(((*where, key), "a safetensors data file has fixed tensors (ids, features, "
                                           "labels.NAME); remove this key"))
        if spec.categorical:
            out.append(((*where, "categorical"), "a safetensors file holds numbers only; nothing to one-hot encode"))
        out.extend(((*where, "preprocess", "columns", c), "a safetensors file's feature columns have no names; "
                                                          "use preprocess.scale for all of them")
                   for c in spec.preprocess.columns)
        out.extend(((*where, "impute", c), "a safetensors file's feature columns have no names; "
                                           "use impute: {'*': STRATEGY}")
                   for c in spec.impute if c != WILDCARD)
    if fmt == "npy":
        if not spec.columns:
            out.append(((*where, "columns"), "a .npy array has no column names; list them under columns: "
                                             "(one per column of the 2-D array)"))
        elif len(set(spec.columns)) != len(spec.columns):
            out.append(((*where, "columns"), "column names must be unique"))
    elif spec.columns is not None:
        out.append(((*where, "columns"), "columns: names the columns of a .npy array; a "
                                         f"{fmt} file names its own"))
    if fmt != "csv" and spec.delimiter != ",":
        out.append(((*where, "delimiter"), "delimiter applies to csv files only"))
    if spec.features is not None and len(set(spec.features)) != len(spec.features):
        out.append(((*where, "features"), "a feature column is listed twice"))
    label_cols = set(spec.labels.values())
    for task, col in spec.labels.items():
        if not task.replace("_", "a").isalnum() or len(task) > 64:
            out.append(((*where, "labels", task), "task names are 1-64 letters, digits or _ (the `labels:` "
                                                  "value of a loss segment in the deployment)"))
        if col == spec.id_column:
            out.append(((*where, "labels", task), f"'{col}' is the id column"))
        if spec.features is not None and col in spec.features:
            out.append(((*where, "labels", task), f"'{col}' is also listed as a feature; labels never feed a model"))
    if spec.id_column and spec.features is not None and spec.id_column in spec.features:
        out.append(((*where, "features"), f"'{spec.id_column}' is the id column; ids are a join key, not a feature"))
    categorical = list(spec.categorical)
    for c in categorical:
        if spec.features is not None and c not in spec.features:
            out.append(((*where, "categorical", c), f"'{c}' is not one of the features {spec.features}"))
        if c in label_cols or c == spec.id_column:
            out.append(((*where, "categorical", c), f"'{c}' is the id or a label column, not a feature"))
    if isinstance(spec.categorical, dict):
        for c, cats in spec.categorical.items():
            if cats is not None and (not cats or len(set(cats)) != len(cats)):
                out.append(((*where, "categorical", c), "list each category once (or give none to read them "
                                                        "from the file)"))
    for c, strategy in spec.impute.items():
        if c != WILDCARD and spec.features is not None and c not in spec.features:
            out.append(((*where, "impute", c), f"'{c}' is not one of the features {spec.features}; only feature "
                                               "values may be filled (a missing id or label is always refused)"))
        if c in categorical and strategy in ("mean", "median"):
            out.append(((*where, "impute", c), f"'{c}' is categorical: use most_frequent or {{constant: CATEGORY}}"))
    wild = spec.impute.get(WILDCARD)
    if wild in ("mean", "median"):
        out.extend(((*where, "impute", WILDCARD), f"'{WILDCARD}': {wild} cannot fill categorical column '{c}'; give "
                                                  "it an entry of its own (most_frequent or {constant: CATEGORY})")
                   for c in categorical if c not in spec.impute)
    for c, scale in spec.preprocess.columns.items():
        if spec.features is not None and c not in spec.features:
            out.append(((*where, "preprocess", "columns", c), f"'{c}' is not one of the features {spec.features}"))
        if c in categorical and scale != "none":
            out.append(((*where, "preprocess", "columns", c), f"'{c}' is categorical (one-hot); it is not scaled"))
    return out


@dataclass(frozen=True)
class DataSource:
    """A validated `data:` section with its file path resolved.

    Attributes:
        path: the data file (absolute).
        spec: the section as written (the short form becomes a spec with only `path`).
        config: the peer config it came from (for messages), or None when built in code.

    Raises:
        ValueError: if the format cannot be told from the spec or the file's suffix.
    """

    path: Path
    spec: DataSourceSpec
    config: Path | None = None

    def __post_init__(self) -> None:
        if _fmt(str(self.path), self.spec.format) is None:
            raise ValueError(f"cannot tell the format of {self.path}; set format: {' | '.join(FORMATS)}")

    @property
    def format(self) -> str:
        """csv, parquet, safetensors or npy."""
        fmt = _fmt(str(self.path), self.spec.format)
        assert fmt is not None  # checked when built
        return fmt

    @property
    def legacy(self) -> bool:
        """True for a safetensors file read exactly as written: no renamed labels, no preprocessing."""
        s = self.spec
        return self.format == "safetensors" and not s.labels and not s.impute and s.preprocess.scale == "none"

    def with_path(self, path: str | Path) -> DataSource:
        """The same columns, format and preprocessing, for another file (e.g. rows to predict)."""
        p = Path(path)
        spec = self.spec.model_copy(update={"path": str(p), "format": self.format})
        return DataSource(p.resolve(), spec, self.config)

    @classmethod
    def of(cls, path: str | Path, **section: Any) -> DataSource:
        """Build a source in code, e.g. `DataSource.of("a.csv", id_column="id", labels={"labels": "y"})`.

        Raises:
            pydantic.ValidationError: unknown keys or wrong types.
            ValueError: keys that contradict each other (see `data_source_problems`).
        """
        spec = DataSourceSpec.model_validate({"path": str(path), **section})
        problems = data_source_problems(spec)
        if problems:
            raise ValueError("; ".join(f"{'.'.join(map(str, k))}: {m}" for k, m in problems))
        return cls(Path(path).resolve(), spec)


def resolve_data_source(value: str | DataSourceSpec, base: Path, config: Path | None = None) -> DataSource:
    """The `DataSource` of a peer config's `data:` value, its path resolved against `base`.

    The short form is a safetensors file whatever its suffix (as it always was).

    Raises:
        ValueError: a long form whose format cannot be told (`data_source_problems` reports it first).
    """
    spec = DataSourceSpec(path=value, format="safetensors") if isinstance(value, str) else value
    return DataSource((base / spec.path).resolve(), spec, config)
