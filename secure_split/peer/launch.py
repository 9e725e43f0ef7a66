"""Build the node for a peer config: the training run (`peer run`) with the schedule its
deployment names, a server of predictions (`serve`) or one prediction request (`predict`)."""

from __future__ import annotations

from pathlib import Path

from secure_split.errors import ConfigError, ConfigProblem
from secure_split.peer.context import PeerContext
from secure_split.peer.node import PeerNode
from secure_split.peer.schedule import ProgressFn
from secure_split.peer.schedules.horizontal import HorizontalSchedule
from secure_split.peer.schedules.predict import PredictSchedule
from secure_split.peer.schedules.serve import ServeSchedule
from secure_split.peer.schedules.sync import SyncSchedule

__all__ = ["predict_node", "serve_node", "set_aside_checkpoints", "training_node"]


def training_node(config_path: str | Path, *, resume: bool = False, progress: ProgressFn | None = None) -> PeerNode:
    """The node of `peer run CONFIG`: `SyncSchedule`, or `HorizontalSchedule` for the sequential
    and splitfed schedules.

    Raises:
        ConfigError: unreadable or inconsistent files; `--resume` under another deployment.
    """
    ctx = PeerContext.load(config_path)
    if resume and (why := ctx.resume_problem()):
        raise ConfigError(ConfigProblem(str(ctx.deployment.path), "-", why))
    if ctx.deployment.spec.training.schedule in ("sequential", "splitfed"):
        return PeerNode(ctx, HorizontalSchedule(ctx, resume=resume), resume=resume, progress=progress,
                        accepts_restarted_peers=True)
    # A counterparty that crashed and restarts during the run opens a new session (rejoin).
    return PeerNode(ctx, SyncSchedule(ctx, resume=resume), resume=resume, progress=progress,
                    accepts_restarted_peers=True)


def serve_node(config_path: str | Path, *, epoch: int | None = None, max_requests: int | None = None,
               idle_exit_s: float | None = None, progress: ProgressFn | None = None) -> PeerNode:
    """The node of `secure-split serve CONFIG`: answers prediction requests (`ServeSchedule`);
    its audit log continues the training run's chain.

    Raises:
        ConfigError: unreadable files, nothing to serve, no such checkpoint.
    """
    ctx = _inference_context(config_path)
    schedule = ServeSchedule(ctx, epoch=epoch, max_requests=max_requests, idle_exit_s=idle_exit_s)
    return PeerNode(ctx, schedule, resume=True, progress=progress, accepts_restarted_peers=True,
                    counterparties=schedule.counterparties, handshake=False, serving=True)


def predict_node(config_path: str | Path, input_path: str | Path, *, epoch: int | None = None,
                 batch_size: int | None = None, progress: ProgressFn | None = None) -> tuple[PeerNode, PredictSchedule]:
    """The node of `secure-split predict CONFIG --input F`: one prediction request
    (`PredictSchedule`, returned too: it holds the predictions); its audit log continues the
    training run's chain.

    Raises:
        ConfigError: unreadable files or input, a party that cannot ask, no checkpoint.
    """
    ctx = _inference_context(config_path)
    schedule = PredictSchedule(ctx, input_path, epoch=epoch, batch_size=batch_size)
    return PeerNode(ctx, schedule, resume=True, progress=progress, counterparties=schedule.servers), schedule


def _inference_context(config_path: str | Path) -> PeerContext:
    ctx = PeerContext.load(config_path)
    if why := ctx.resume_problem():
        raise ConfigError(ConfigProblem(str(ctx.deployment.path), "-", why))
    return ctx


def set_aside_checkpoints(directory: Path) -> Path:
    """`peer run --fresh`: move a peer's earlier checkpoints (and its kept PSI result) into
    `superseded-TIME/` in the same folder, so that neither a resume nor a rollback of the new run
    can pick them up. Nothing is deleted.

    Returns:
        The folder they went to.
    """
    import time

    target = directory / time.strftime("superseded-%Y%m%dT%H%M%SZ", time.gmtime())
    target.mkdir(parents=True, exist_ok=True)
    for f in directory.iterdir():
        if f.is_file() and (f.name.startswith("epoch-") or f.name.startswith("aligned-ids")):
            f.rename(target / f.name)
    return target
