"""Per-peer checkpoints: safetensors weights plus a JSON manifest that pins their SHA-256.

A checkpoint of epoch N is two files in the peer's checkpoint folder:
- `epoch-NNNN.safetensors`: `PeerExecutor.state_tensors()` (segments and optimizer state);
- `epoch-NNNN.json`: canonical JSON with the epoch, peer, deployment hash, the weights' SHA-256,
  the tensor names, `optimizer_meta()`, the caller's meta and, where the peer preprocesses its
  data, the fitted `Preprocessing` (imputation values, scaling statistics, categories): part of
  the trained model at this peer, read back for inference by `checkpoint_preprocessing`.
The weights are written first and the manifest last (each to a temporary file, then renamed), so
a checkpoint exists exactly when its manifest does, and a crash leaves no half checkpoint. Files
are created mode 0600: weights trained on private data are private too.

Loading reads the weights once, checks the SHA-256 of those very bytes, and parses them with
safetensors (no pickle, no torch.load).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from secure_split.canonical import canonical_json, sha256_hex
from secure_split.engine.data.preprocess import Preprocessing
from secure_split.engine.executor import PeerExecutor
from secure_split.errors import ConfigError, TrainingError

__all__ = ["MAX_CHECKPOINT_BYTES", "checkpoint_preprocessing", "list_checkpoints", "load_checkpoint",
           "save_checkpoint"]

MAX_CHECKPOINT_BYTES = 8 * 1024**3
_MAX_MANIFEST_BYTES = 16 * 1024**2
_MANIFEST_RE = re.compile(r"^epoch-(\d{4,9})\.json$")
FORMAT = 1


def _paths(directory: Path, epoch: int) -> tuple[Path, Path]:
    stem = f"epoch-{epoch:04d}"
    return directory / f"{stem}.safetensors", directory / f"{stem}.json"


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    directory: str | Path, *, epoch: int, executor: PeerExecutor, meta: Mapping[str, Any],
    preprocessing: Preprocessing | None = None,
) -> Path:
    """Write the checkpoint of `epoch` for `executor`'s peer.

    Args:
        directory: the peer's checkpoint folder (created if missing).
        epoch: the epoch just completed (>= 0).
        executor: the executor whose state is saved (between steps).
        meta: JSON-able extras to keep (e.g. {"deployment_hash": ..., "step": ..., "metrics": ...});
            "deployment_hash" overrides the executor's deployment hash in the manifest.
        preprocessing: the transform this peer's data went through (`fit_preprocessing`), kept
            in the manifest so that inference applies the same one; None for data read as is.

    Returns:
        The manifest path (`epoch-NNNN.json`); the weights lie next to it.

    Raises:
        ValueError: for a negative epoch; TypeError/ValueError if meta is not JSON-able.
    """
    if not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    weights_path, manifest_path = _paths(d, epoch)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in executor.state_tensors().items()}
    blob = save_safetensors(tensors)
    manifest = {
        "format": FORMAT,
        "epoch": epoch,
        "peer": executor.peer,
        "deployment_hash": str(meta.get("deployment_hash", executor.deployment.hash)),
        "weights": weights_path.name,
        "sha256": sha256_hex(blob),
        "tensors": sorted(tensors),
        "optimizer": executor.optimizer_meta(),
        "meta": dict(meta),
    }
    if preprocessing is not None:
        manifest["preprocessing"] = preprocessing.to_json()
    encoded = canonical_json(manifest)  # fails before anything is written if meta is not JSON-able
    _write_private(weights_path, blob)
    _write_private(manifest_path, encoded)
    return manifest_path


def _read_manifest(path: Path) -> dict[str, Any]:
    if path.stat().st_size > _MAX_MANIFEST_BYTES:
        raise TrainingError(f"checkpoint manifest {path} is larger than {_MAX_MANIFEST_BYTES} bytes")
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise TrainingError(f"checkpoint manifest {path} is not valid JSON: {exc}") from None
    required = {"format": int, "epoch": int, "peer": str, "deployment_hash": str, "weights": str,
                "sha256": str, "tensors": list, "optimizer": dict}
    if not isinstance(data, dict):
        raise TrainingError(f"checkpoint manifest {path} is not a JSON object")
    bad = [k for k, t in required.items() if not isinstance(data.get(k), t)]
    if bad:
        raise TrainingError(f"checkpoint manifest {path} lacks or mistypes: {', '.join(bad)}")
    return data


def _file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def list_checkpoints(directory: str | Path) -> list[int]:
    """Epochs with a complete, intact checkpoint in `directory`, ascending.

    A checkpoint counts when its manifest parses, names its own epoch, its weights file exists
    and the weights' SHA-256 matches the manifest. Anything else is skipped (not an error).
    """
    d = Path(directory)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = _MANIFEST_RE.match(p.name)
        if not m:
            continue
        epoch = int(m.group(1))
        weights_path, manifest_path = _paths(d, epoch)
        if manifest_path != p:  # epoch-00001.json and epoch-0001.json: only the canonical name
            continue
        try:
            manifest = _read_manifest(p)
            if manifest["epoch"] != epoch or manifest["weights"] != weights_path.name:
                continue
            if weights_path.is_file() and _file_sha256(weights_path) == manifest["sha256"]:
                found.append(epoch)
        except (TrainingError, OSError):
            continue
    return sorted(found)


def load_checkpoint(
    directory: str | Path, epoch: int, executor: PeerExecutor, *, max_bytes: int = MAX_CHECKPOINT_BYTES,
    preprocessing: Preprocessing | None = None,
) -> dict[str, Any]:
    """Verify and load the checkpoint of `epoch` into `executor`.

    Args:
        directory: the peer's checkpoint folder.
        epoch: which checkpoint.
        executor: receives the state (between steps).
        max_bytes: refuse a larger weights file.
        preprocessing: on resume, the transform this peer fitted again at start-up; it must be
            the one saved (else the data or its split changed since, and the weights would see
            other inputs than they were trained on).

    Returns:
        The manifest (with the caller's `meta` under "meta").

    Raises:
        TrainingError: the checkpoint is missing, belongs to another peer or deployment, is too
            big, its SHA-256 does not match (modified or torn), its tensors do not fit the
            executor, or its preprocessing differs from `preprocessing`. Nothing is loaded in
            any of these cases.
    """
    d = Path(directory)
    weights_path, manifest_path = _paths(d, epoch)
    saved = checkpoint_preprocessing(d, epoch)
    if preprocessing is not None and (saved is None or saved.to_json() != preprocessing.to_json()):
        raise TrainingError(
            f"checkpoint {manifest_path} was trained on data preprocessed otherwise than this peer's data is now "
            "(its file, columns, preprocessing or the split changed); resume with the data it was trained on, "
            "or start a new run"
        )
    if not manifest_path.is_file() or not weights_path.is_file():
        raise TrainingError(f"no checkpoint of epoch {epoch} in {d} (expected {manifest_path.name} and "
                            f"{weights_path.name})")
    manifest = _read_manifest(manifest_path)
    if manifest["epoch"] != epoch or manifest["weights"] != weights_path.name:
        raise TrainingError(f"checkpoint manifest {manifest_path} describes another epoch or file")
    if manifest["peer"] != executor.peer:
        raise TrainingError(
            f"checkpoint {manifest_path} belongs to peer '{manifest['peer']}', not '{executor.peer}'"
        )
    if manifest["deployment_hash"] != executor.deployment.hash:
        raise TrainingError(
            f"checkpoint {manifest_path} was made for deployment {manifest['deployment_hash'][:16]}…, "
            f"this deployment is {executor.deployment.hash[:16]}…; it cannot be resumed here"
        )
    size = weights_path.stat().st_size
    if size > max_bytes:
        raise TrainingError(f"checkpoint weights {weights_path} are {size} bytes, more than {max_bytes}")
    blob = weights_path.read_bytes()
    digest = sha256_hex(blob)
    if digest != manifest["sha256"]:
        raise TrainingError(
            f"checkpoint weights {weights_path} do not match their manifest (sha256 {digest[:16]}…, "
            f"expected {manifest['sha256'][:16]}…): the file was modified or torn; refusing to load it"
        )
    try:
        tensors: dict[str, torch.Tensor] = load_safetensors(blob)
    except Exception as exc:  # safetensors raises its own error type on a malformed file
        raise TrainingError(f"checkpoint weights {weights_path} are not valid safetensors: {exc}") from None
    if sorted(tensors) != manifest["tensors"]:
        raise TrainingError(f"checkpoint weights {weights_path} hold other tensors than the manifest lists")
    executor.load_state_tensors(tensors, manifest["optimizer"])
    return manifest


def checkpoint_preprocessing(directory: str | Path, epoch: int) -> Preprocessing | None:
    """The preprocessing saved with the checkpoint of `epoch` (None where the data was read as is).

    Read this before building the executor for inference, and apply it to the rows to predict
    (`load_rows_to_predict`): the model's first layer was trained on exactly that transform.

    Raises:
        TrainingError: no such checkpoint, or a manifest that is not valid or whose
            preprocessing is malformed.
    """
    _, manifest_path = _paths(Path(directory), epoch)
    if not manifest_path.is_file():
        raise TrainingError(f"no checkpoint of epoch {epoch} in {directory} (expected {manifest_path.name})")
    manifest = _read_manifest(manifest_path)
    if "preprocessing" not in manifest:
        return None
    try:
        return Preprocessing.from_json(manifest["preprocessing"], where=str(manifest_path))
    except ConfigError as exc:
        raise TrainingError(f"checkpoint {manifest_path}: {exc.problems[0].message}") from None
