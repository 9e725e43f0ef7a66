"""What a peer calls to read its data: checked against the deployment before any network.

- `load_checked_site_data(cfg, deployment)`: at start-up, before the transport opens. Reads the
  peer config's data source and checks it against the segments this peer runs (feature width
  after one-hot against the first layer, label tasks, classes against the loss segment's outputs).
- `check_peer_data(cfg, deployment)`: the same, returning the problems (`secure-split data check`).
- `load_peer_data(source)`: `PeerData` straight from a file where nothing needs fitting.
- `load_rows_to_predict(cfg, path, preprocessing)`: rows to predict, transformed as in training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from secure_split.config import Deployment, PeerConfig
from secure_split.data_source import DataSource
from secure_split.engine.data.peer_data import DEFAULT_MAX_DATA_BYTES, PeerData, read_safetensors_data
from secure_split.engine.data.preprocess import Preprocessing, fit_preprocessing
from secure_split.engine.data.tables import SiteData, load_site_data
from secure_split.engine.models import input_shape, validate_layers
from secure_split.errors import ConfigError, ConfigProblem
from secure_split.yamlfile import read_yaml

__all__ = ["check_peer_data", "load_checked_site_data", "load_peer_data", "load_rows_to_predict", "needs_data"]


def load_peer_data(source: str | Path | DataSource, *, max_bytes: int = DEFAULT_MAX_DATA_BYTES) -> PeerData:
    """One peer's data as the executor reads it, where nothing needs fitting.

    Args:
        source: a safetensors data file (the short form of a peer config's `data:`), or a
            `DataSource` (the peer config's `data_source`) without imputation or scaling.
        max_bytes: for a path: refuse a larger file (a `DataSource` carries its own limits).

    Returns:
        The checked `PeerData`.

    Raises:
        ConfigError: any problem with the file (see `read_safetensors_tensors`, `load_site_data`),
            or a source that scales or imputes: those are fitted on the training rows, after
            the ids are aligned (`fit_preprocessing`).
    """
    if not isinstance(source, DataSource):
        return read_safetensors_data(source, max_bytes=max_bytes)
    if source.legacy:
        return read_safetensors_data(source.path, max_bytes=source.spec.limits.max_bytes)
    site = load_site_data(source)
    return fit_preprocessing(site, None).apply(site)


def needs_data(deployment: Deployment, peer: str) -> bool:
    """Whether `peer` needs a data file: it reads raw features, computes a loss, or coordinates
    a `sync` schedule (the coordinator draws the batches from its ids)."""
    spec = deployment.spec
    mine = [seg for seg in spec.segments.values() if seg.peer == peer]
    return any(seg.input == "features" or seg.loss for seg in mine) or (
        spec.coordinator == peer and spec.training.schedule == "sync")


def load_checked_site_data(cfg: PeerConfig, deployment: Deployment) -> SiteData | None:
    """Read this peer's data source and check it against the deployment, before any network.

    Call it first in `peer run` (before the transport opens), so that a file with 14 columns
    where the first layer takes 15 fails at once, naming the file.

    Args:
        cfg: this peer's config (its `data_source`).
        deployment: the shared deployment.

    Returns:
        The checked rows, or None for a peer that holds no data and needs none.

    Raises:
        ConfigError: every problem at once: the file (bounds, columns, values, missing values,
            duplicate ids) and its fit with this peer's segments (feature width, label tasks,
            classes).
    """
    where = str(cfg.path)
    spec = deployment.spec
    if cfg.name not in spec.peers:
        raise ConfigError(ConfigProblem(where, "peer", f"'{cfg.name}' is not a peer of deployment {deployment.path}"))
    source = cfg.data_source
    if source is None:
        if needs_data(deployment, cfg.name):
            raise ConfigError(ConfigProblem(where, "data", (
                f"peer '{cfg.name}' reads raw features, computes a loss or coordinates in {deployment.path}, so it "
                "needs its data: set data: in this peer config (docs/data.md)")))
        return None
    site = load_site_data(source)
    problems = _fit_problems(site, cfg, deployment)
    if problems:
        raise ConfigError(problems)
    return site


def check_peer_data(cfg: PeerConfig, deployment: Deployment) -> list[ConfigProblem]:
    """`load_checked_site_data`'s problems as a list (empty: the data fits the deployment)."""
    try:
        load_checked_site_data(cfg, deployment)
    except ConfigError as exc:
        return list(exc.problems)
    return []


def load_rows_to_predict(cfg: PeerConfig, path: str | Path, preprocessing: Preprocessing | None) -> PeerData:
    """Rows to predict, read like the training data and transformed as in training.

    Args:
        cfg: the peer config the model was trained with (its `data:` says the format and columns).
        path: the file of rows to predict (same format and feature columns; labels not needed).
        preprocessing: from the checkpoint (`checkpoint_preprocessing`); None for a short-form
            safetensors source, which is read as it is.

    Raises:
        ConfigError: the file does not read, or its columns or values do not fit the transform.
    """
    source = cfg.data_source
    if source is None or (source.legacy and preprocessing is None):
        return read_safetensors_data(path)
    site = load_site_data(source.with_path(path), inference=True)
    if preprocessing is None:
        preprocessing = fit_preprocessing(site, None)
    return preprocessing.apply(site)


def _classes(model: Any) -> int | None:
    """The output width of a layer list, where its last linear layer fixes it (None for a preset
    or a private model: their output is checked when the executor builds them)."""
    if not isinstance(model, list):
        return None
    for layer in reversed(model):
        spec = layer.get("linear") if isinstance(layer, dict) else None
        if isinstance(spec, dict) and isinstance(spec.get("out"), int):
            return int(spec["out"])
    return None


def _fit_problems(site: SiteData, cfg: PeerConfig, deployment: Deployment) -> list[ConfigProblem]:
    spec = deployment.spec
    data_file = str(site.source.path)
    doc = read_yaml(cfg.path, "peer config")  # for the line numbers of its keys
    dep = str(deployment.path)
    long_form = not site.source.legacy
    problems: list[ConfigProblem] = []
    mine = {name: seg for name, seg in spec.segments.items() if seg.peer == cfg.name}
    for name, seg in mine.items():
        if seg.input != "features":
            continue
        if not site.has_features:
            problems.append(ConfigProblem(data_file, "features", (
                f"segment '{name}' in {dep} reads this peer's raw features, but the data has none"
                + ("; list them under data.features" if long_form else ""))))
            continue
        if validate_layers(seg.model):
            continue  # the deployment check reports the model itself
        sample = tuple(site.block.shape[1:]) if site.block is not None else (site.width,)
        misfit = input_shape(seg.model).problem(sample)
        if misfit:
            what = (f"{site.width} feature values per row ({len(site.feature_order)} column(s)"
                    + (f", {len(site.texts)} one-hot encoded" if site.texts else "") + ")"
                    if site.block is None else f"features of shape {list(sample)}")
            problems.append(ConfigProblem(data_file, "features", (
                f"{what}, but segment '{name}' in {dep} expects otherwise: {misfit}; give it the columns it "
                "was designed for, or change its first layer in the deployment (all parties must agree)")))
    tasks = {seg.labels: name for name, seg in mine.items() if seg.loss}
    accepted = ", ".join(repr(t) for t in sorted(tasks)) or "none: this peer computes no loss"
    for task, name in tasks.items():
        if task not in site.labels:
            have = sorted(site.labels)
            fix = (f"map it to a column: data.labels: {{{task}: COLUMN}}" if long_form
                   else f"name the tensor 'labels.{task}'")
            message = (f"segment '{name}' in {dep} computes its loss on label task '{task}' (its `labels:` value), "
                       f"which this data does not provide (it has {have or 'no labels'}); {fix}")
            problems.append(doc.problem(("data", "labels"), message) if long_form
                            else ConfigProblem(data_file, "labels", message))
            continue
        out = _classes(mine[name].model)
        y = site.labels[task]
        if out is not None and y.size and int(y.max()) >= out:
            over = y >= out
            problems.append(ConfigProblem(data_file, f"labels {task}", (
                f"class {int(y.max())} in {site.rows_text(over)}, but segment '{name}' outputs {out} classes "
                f"(0..{out - 1})")))
    if long_form:
        for task in site.source.spec.labels:
            if task not in tasks:
                problems.append(doc.problem(("data", "labels", task), (
                    f"'{task}' is not the label task of any loss segment of peer '{cfg.name}' in {dep}; accepted: "
                    f"{accepted} (a loss segment's `labels:` value, default 'labels')")))
    return problems
