"""A peer's checkpoints as its schedules use them: which trained weights to serve, the digest its
audit log records for a checkpoint (which pins the weights' SHA-256 through its manifest), and
the PSI result kept beside them for a restarted process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from secure_split.canonical import canonical_json, sha256_hex
from secure_split.engine.checkpoint import checkpoint_preprocessing, list_checkpoints, load_checkpoint
from secure_split.engine.executor import PeerExecutor
from secure_split.errors import ConfigError, ConfigProblem
from secure_split.peer.context import PeerContext

__all__ = ["checkpoint_digest", "chosen_epoch", "load_alignment", "load_trained", "save_alignment"]


def checkpoint_digest(directory: str | Path, epoch: int) -> str:
    """Digest of a checkpoint's manifest ("" when there is none)."""
    meta = Path(directory) / f"epoch-{epoch:04d}.json"
    return sha256_hex(meta.read_bytes()) if meta.is_file() else ""


def chosen_epoch(ctx: PeerContext, epoch: int | None) -> int:
    """The checkpoint to use: `epoch`, or the newest intact one.

    Raises:
        ConfigError: no checkpoint, or none of that epoch.
    """
    directory = ctx.cfg.checkpoints_dir
    have = list_checkpoints(directory)
    if epoch is None and not have:
        raise ConfigError(ConfigProblem(str(ctx.cfg.path), "checkpoints", (
            f"no checkpoint in {directory}: train the deployment first (`secure-split peer run` "
            "at every peer); split inference serves trained weights only")))
    chosen = have[-1] if epoch is None else epoch
    if chosen not in have:
        raise ConfigError(ConfigProblem(str(ctx.cfg.path), "checkpoints", (
            f"no intact checkpoint of epoch {chosen} in {directory} (there are: {have or 'none'})")))
    return chosen


def load_trained(ctx: PeerContext, executor: PeerExecutor, epoch: int) -> None:
    """Load the checkpoint of `epoch` into `executor` (with the preprocessing it was trained with).

    Raises:
        TrainingError: the checkpoint does not verify or does not fit.
    """
    directory = ctx.cfg.checkpoints_dir
    load_checkpoint(directory, epoch, executor, preprocessing=checkpoint_preprocessing(directory, epoch))


_ALIGNMENT = "aligned-ids.json"
_MAX_ALIGNMENT_BYTES = 256 * 1024 * 1024


def save_alignment(directory: str | Path, deployment_hash: str, parties: list[str], ids: np.ndarray) -> None:
    """Keep this peer's PSI result (its own ids of the intersection) next to its checkpoints, so a
    restarted process rejoins a running deployment without a new PSI. Private to the peer (0600),
    like its checkpoints: it holds nothing the peer did not hold before."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    body = canonical_json({"deployment": deployment_hash, "parties": list(parties),
                           "ids": [int(x) for x in np.asarray(ids).tolist()]})
    tmp = d / (_ALIGNMENT + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(body)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, d / _ALIGNMENT)


def load_alignment(directory: str | Path, deployment_hash: str, parties: list[str]) -> np.ndarray | None:
    """The PSI result `save_alignment` kept for this deployment and these parties, or None (none
    kept, another deployment or ring, or an unreadable file: then PSI runs again)."""
    path = Path(directory) / _ALIGNMENT
    try:
        if path.stat().st_size > _MAX_ALIGNMENT_BYTES:
            return None
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("deployment") != deployment_hash or data.get("parties") != list(parties):
        return None
    ids = data.get("ids")
    if not isinstance(ids, list) or not all(type(x) is int for x in ids):
        return None
    return np.asarray(ids, dtype=np.int64)
