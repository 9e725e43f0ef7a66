"""A trained network's predictions computed in one process: the reference for split inference.

`secure-split predict` runs a trained topology across peers; this module runs the same segments,
wired by the same topology and merges, in one process. Tests compare the two, and
`bench/predict_throughput.py` times this as the local baseline.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from secure_split.architecture import segment_sources
from secure_split.config import Deployment, PeerConfig
from secure_split.engine.checkpoint import checkpoint_preprocessing, load_checkpoint
from secure_split.engine.data import load_rows_to_predict
from secure_split.engine.executor import PeerExecutor, merge_inputs
from secure_split.errors import ConfigError, ConfigProblem
from secure_split.topology import Topology

__all__ = ["predict_locally", "trained_segments"]


def trained_segments(deployment: Deployment, peers: Mapping[str, PeerConfig], epoch: int) -> dict[str, nn.Module]:
    """Every segment of the given peers, with the weights of their checkpoints of `epoch`.

    Args:
        deployment: the trained deployment.
        peers: peer name -> its loaded peer config (checkpoint folder; data file, which an input
            segment's executor needs to check its shapes; private models and their sources).
        epoch: which checkpoint.

    Returns:
        segment -> module with the trained weights, on the CPU.

    Raises:
        TrainingError: a checkpoint is missing, modified or does not fit (see `load_checkpoint`).
        ConfigError: a peer's data does not fit its segments, or its private models do not
            match the deployment's commitments.
    """
    out: dict[str, nn.Module] = {}
    for name, cfg in peers.items():
        # The peer's own rows, transformed as in training (the checkpoint keeps the transform).
        data = (load_rows_to_predict(cfg, cfg.data_source.path, checkpoint_preprocessing(cfg.checkpoints_dir, epoch))
                if cfg.data_source is not None else None)
        executor = PeerExecutor(deployment, name, data, sources=segment_sources(deployment, cfg))
        load_checkpoint(cfg.checkpoints_dir, epoch, executor)
        out.update(executor.segments)
    return out


def predict_locally(
    deployment: Deployment,
    segments: Mapping[str, nn.Module],
    features: Mapping[str, torch.Tensor],
    *,
    batch_size: int = 256,
) -> dict[str, torch.Tensor]:
    """Argmax predictions of the network's output segments, every segment in this process.

    Only the segments reachable from the input segments named in `features` run, so one
    horizontal owner's bottom feeding a shared top works (a segment's other in-edges are
    alternatives then).

    Args:
        deployment: the trained deployment.
        segments: segment name -> trained module (e.g. `PeerExecutor.segments` of every peer,
            after `load_checkpoint`); every segment that runs must be here.
        features: input segment name -> raw features [N, ...] (all the same N).
        batch_size: samples per forward pass.

    Returns:
        Output segment (no out-edges) -> int64 [N] predicted classes.

    Raises:
        ConfigError: no features, an unknown or missing segment, features of different lengths,
            or a merge segment with some inputs not computed here.
    """
    topo = Topology.from_deployment(deployment)
    where = str(deployment.path)
    problems = [ConfigProblem(where, f"segments.{s}", f"'{s}' is not an input segment of this deployment")
                for s in features if s not in topo.segments or topo.segments[s].input != "features"]
    lengths = {int(x.shape[0]) for x in features.values()}
    if not features or len(lengths) != 1:
        problems.append(ConfigProblem(where, "-", "give features of one length for at least one input segment"))
    if problems:
        raise ConfigError(problems)
    plan: list[tuple[str, tuple[str, ...]]] = []
    reached = set(features)
    for seg in topo.order:
        ins = tuple(e for e in topo.in_edges[seg] if topo.edges[e].from_ in reached)
        if seg in features or not ins:
            continue
        if topo.segments[seg].merge is not None and len(ins) != len(topo.in_edges[seg]):
            problems.append(ConfigProblem(where, f"segments.{seg}.merge", f"'{seg}' merges inputs that are not all given"))
        if len(ins) > 1 and topo.segments[seg].merge is None:
            problems.append(ConfigProblem(where, f"segments.{seg}", f"'{seg}' has alternative inputs: give one owner's features"))
        reached.add(seg)
        plan.append((seg, ins))
    problems += [ConfigProblem(where, f"segments.{s}", f"no module given for segment '{s}'")
                 for s in sorted(reached) if s not in segments]
    if problems:
        raise ConfigError(problems)
    outputs = [s for s in topo.order if s in reached and not topo.out_edges[s]]
    chunks: dict[str, list[torch.Tensor]] = {s: [] for s in outputs}
    n = lengths.pop()
    for m in segments.values():
        m.eval()
    with torch.no_grad():
        for start in range(0, n, batch_size):
            y: dict[str, torch.Tensor] = {s: segments[s](x[start:start + batch_size]) for s, x in features.items()}
            for seg, ins in plan:
                y[seg] = segments[seg](merge_inputs([y[topo.edges[e].from_] for e in ins], topo.segments[seg].merge))
            for s in outputs:
                chunks[s].append(y[s].argmax(dim=1))
    return {s: torch.cat(v) if v else torch.zeros(0, dtype=torch.int64) for s, v in chunks.items()}
