"""A peer's checkpoints as its schedules use them: which trained weights to serve, and the digest
its audit log records for a checkpoint (which pins the weights' SHA-256 through its manifest)."""

from __future__ import annotations

from pathlib import Path

from secure_split.canonical import sha256_hex
from secure_split.engine.checkpoint import checkpoint_preprocessing, list_checkpoints, load_checkpoint
from secure_split.engine.executor import PeerExecutor
from secure_split.errors import ConfigError, ConfigProblem
from secure_split.peer.context import PeerContext

__all__ = ["checkpoint_digest", "chosen_epoch", "load_trained"]


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
