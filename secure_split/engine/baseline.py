"""The centralised baseline: the whole network in one process, as if no one had split it.

It is the reference the split run is measured against. It builds every segment with the same
seeds (`derive_seed`), wires them per the same topology and merges, uses the same optimizer
settings and the same schedule (`schedule.py` with the same seed, batch size, test fraction and
step cap). Without protections, a split run and this baseline compute the same function with
the same updates: their weights and accuracies agree to float rounding. With
`protections=True` it applies the edges' protections too (NoPeek, noise, clipping), which shows
their cost in accuracy; it is then no longer bit-comparable (noise is random).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from secure_split.architecture import SegmentSource
from secure_split.config import Deployment
from secure_split.engine.data import PeerData, as_id_tensor
from secure_split.engine.executor import build_optimizer, merge_inputs
from secure_split.engine.label_defences import label_defence
from secure_split.engine.metrics import StepMetrics, TaskMetrics, evaluate, sum_task_metrics
from secure_split.engine.privacy import (
    add_gaussian_noise,
    clip_per_sample,
    distance_correlation,
)
from secure_split.engine.schedule import epoch_batches, split_train_test
from secure_split.engine.sources import build_segments
from secure_split.errors import ConfigError
from secure_split.topology import Topology

__all__ = ["evaluate", "train_centralized"]


class _Network:
    """Every segment of the topology, run in one process."""

    def __init__(
        self,
        dep: Deployment,
        features: Mapping[str, torch.Tensor],
        labels: Mapping[str, torch.Tensor],
        ids: torch.Tensor,
        protections: bool,
        noise_seed: int | None,
        sources: Mapping[str, SegmentSource] | None = None,
    ) -> None:
        self.topo = Topology.from_deployment(dep)
        self.modules: dict[str, nn.Module] = build_segments(dep, sources, self.topo.order)
        params = [p for s in self.topo.order for p in self.modules[s].parameters()]
        self.optimizer = build_optimizer(params, dep)
        self.features = dict(features)
        self.labels = dict(labels)
        self.index = PeerData(ids=ids)
        self.protections = protections
        self.generator = torch.Generator()
        self.generator.manual_seed(secrets.randbits(63) if noise_seed is None else noise_seed)

    def run(self, batch: np.ndarray, train: bool) -> tuple[torch.Tensor | None, dict[str, TaskMetrics]]:
        """Forward one batch; return (summed loss to backpropagate in train, task metrics)."""
        topo = self.topo
        rows = self.index.rows(batch)
        for m in self.modules.values():
            m.train(train)
        consumed: dict[str, torch.Tensor] = {}  # edge -> what its `to` segment consumes
        terms: list[torch.Tensor] = []
        tasks: dict[str, TaskMetrics] = {}
        with torch.set_grad_enabled(train):
            for seg in topo.order:
                spec = topo.segments[seg]
                raw = self.features[seg][rows] if spec.input == "features" else None
                if raw is not None:
                    x = raw
                else:
                    x = merge_inputs([consumed[e] for e in topo.in_edges[seg]], spec.merge)
                y = self.modules[seg](x)
                for e in topo.out_edges[seg]:
                    consumed[e] = self._edge(e, y, raw, rows, train, terms)
                if spec.loss is not None:
                    target = self.labels[seg][rows]
                    loss = F.cross_entropy(y, target)
                    n = int(target.shape[0])
                    correct = int((y.detach().argmax(dim=1) == target).sum())
                    tasks[topo.task_of(seg)] = TaskMetrics(float(loss.detach()) * n, correct, n)
                    terms.append(loss)
        total = torch.stack(terms).sum() if train and terms else None
        return total, tasks

    def _edge(
        self, edge: str, y: torch.Tensor, raw: torch.Tensor | None, rows: torch.Tensor, train: bool,
        terms: list[torch.Tensor],
    ) -> torch.Tensor:
        if not (self.protections and train):
            return y
        prot = self.topo.edges[edge].protections
        if prot.nopeek_alpha > 0 and raw is not None:
            terms.append(prot.nopeek_alpha * distance_correlation(raw, y))
        v = add_gaussian_noise(y, prot.activation_noise_std, self.generator)
        v = v.view_as(v)  # its own node, so the hook sees only this edge's gradient
        to_seg = self.topo.edges[edge].to
        to_peer = self.topo.peer_of(to_seg)
        defence = label_defence(prot.label_defence, edge=edge)
        batch_labels = {
            self.topo.segments[s].labels: self.labels[s][rows]
            for s in self.topo.loss_segments
            if self.topo.peer_of(s) == to_peer and s in self.labels
        }

        def protect(g: torch.Tensor) -> torch.Tensor:
            if prot.gradient_clip_norm is not None:
                g = clip_per_sample(g, prot.gradient_clip_norm)
            if prot.label_defence != "none":
                g = defence(g, batch_labels, self.generator)
            return add_gaussian_noise(g, prot.gradient_noise_std, self.generator)

        v.register_hook(protect)  # type: ignore[no-untyped-call]  # torch leaves it untyped
        return v


def _check_inputs(topo: Topology, features: Mapping[str, Any], labels: Mapping[str, Any], n: int) -> None:
    problems = []
    for s in topo.input_segments:
        f = features.get(s)
        if not isinstance(f, torch.Tensor) or f.shape[0] != n:
            problems.append(f"features['{s}'] must be a tensor with {n} rows (aligned with ids)")
    for s in topo.loss_segments:
        y = labels.get(s)
        if not isinstance(y, torch.Tensor) or y.shape != (n,):
            problems.append(f"labels['{s}'] must be an int64 tensor of {n} labels (aligned with ids)")
    if problems:
        raise ConfigError("; ".join(problems))


def train_centralized(
    deployment: Deployment,
    *,
    features: Mapping[str, torch.Tensor],
    labels: Mapping[str, torch.Tensor],
    ids: Any,
    epochs: int | None = None,
    protections: bool = False,
    noise_seed: int | None = None,
    split: tuple[Any, Any] | None = None,
    sources: Mapping[str, SegmentSource] | None = None,
) -> dict[str, Any]:
    """Train the deployment's whole network in one process, on the split run's schedule.

    Args:
        deployment: the deployment (segments, edges, training settings).
        features: input segment name -> its peer's full feature tensor, rows aligned with `ids`.
        labels: loss segment name -> its full label tensor (int64), aligned with `ids`.
        ids: the sample ids of those rows.
        epochs: override `training.epochs`.
        protections: apply the edges' protections (default: the unprotected reference).
        noise_seed: seed for protection noise (None: from the OS).
        split: (train ids, test ids) to use instead of splitting `ids` with `training.seed`; a
            horizontal run splits each owner's rows on its own, so its baseline trains on the
            union of the owners' training rows and is tested on the union of their test rows.
        sources: segment -> model source for the private segments (and initial weights), as the
            owners' `architecture.segment_sources` give them; the split run builds the same
            modules from them. None: the deployment's public models.

    Returns:
        {"accuracy": {task: test accuracy}, "test_loss": {task: mean test loss},
         "loss": [mean training loss per epoch, summed over tasks],
         "task_loss": [{task: mean training loss} per epoch],
         "test": {task: TaskMetrics}, "segments": {segment: trained module},
         "train_ids": ndarray, "test_ids": ndarray}.

    Raises:
        ConfigError: if an input or loss segment has no (aligned) tensor, or `split` is not two
            disjoint, non-empty sets of `ids`; a private segment without its source.
    """
    training = deployment.spec.training
    id_t = as_id_tensor(ids)
    net = _Network(deployment, features, labels, id_t, protections, noise_seed, sources)
    _check_inputs(net.topo, features, labels, int(id_t.shape[0]))
    if split is None:
        train_ids, test_ids = split_train_test(id_t.numpy(), training.test_fraction, training.seed)
    else:
        train_ids, test_ids = (np.sort(as_id_tensor(part).numpy()) for part in split)
        known = id_t.numpy()
        if (not len(train_ids) or not len(test_ids) or np.intersect1d(train_ids, test_ids).size
                or not np.isin(train_ids, known).all() or not np.isin(test_ids, known).all()):
            raise ConfigError("split must be two disjoint, non-empty sets of the given ids (train, test)")
    n_epochs = training.epochs if epochs is None else epochs
    losses: list[float] = []
    task_losses: list[dict[str, float]] = []
    for epoch in range(n_epochs):
        seen: list[dict[str, TaskMetrics]] = []
        for batch in epoch_batches(train_ids, training.batch_size, training.seed, epoch,
                                   training.max_steps_per_epoch):
            if net.optimizer is not None:
                net.optimizer.zero_grad(set_to_none=True)
            total, tasks = net.run(batch, train=True)
            if total is not None and total.requires_grad:
                torch.autograd.backward([total])
            if net.optimizer is not None:
                net.optimizer.step()
            seen.append(tasks)
        summed = sum_task_metrics(seen)
        task_losses.append({t: m.mean_loss for t, m in summed.items()})
        losses.append(sum(task_losses[-1].values()))

    def run_eval(batch: np.ndarray) -> StepMetrics:
        return StepMetrics(step=0, phase="eval", tasks=net.run(batch, train=False)[1])

    test = evaluate(run_eval, test_ids, training.batch_size)
    return {
        "accuracy": {t: m.accuracy for t, m in test.items()},
        "test_loss": {t: m.mean_loss for t, m in test.items()},
        "loss": losses,
        "task_loss": task_losses,
        "test": test,
        "segments": net.modules,
        "train_ids": train_ids,
        "test_ids": test_ids,
    }
