"""The leakage report: how much a curious peer learns, and what each defence costs in accuracy.

`leakage_report(target, out_dir=...)` trains the target's topology locally, many times, once per
setting of a sweep, and measures on held-out data what an honest-but-curious peer learns.

How a run is simulated: one `PeerExecutor` per peer, the very executor a peer process runs,
driven in this process by a small router that hands each `Outgoing` tensor to its recipient (no
sockets, no policy, no audit: none of them changes a tensor). The schedule, split, seeds and
protections are those of the deployment, so the numbers are what the deployed system computes.

What is measured, per setting:
- input reconstruction, across the **first cut edge from the data owner** (the edge leaving the
  segment that reads raw features): the receiving peer is the attacker. It holds an auxiliary
  set of (input, activation) pairs (`AUX_FRACTION` of all samples, drawn from the training ids,
  disjoint from the test ids), trains a decoder (`attacks.train_decoder`) and reconstructs the
  test images from their activations. Activations are taken from the trained model with the
  edge's activation noise added, i.e. as they cross the wire in a training step (the executor
  adds noise only in training; eval and inference traffic is noise-free, see docs/privacy.md).
  Reported: MSE per pixel and SSIM (`attacks.reconstruction_metrics`).
- distance correlation DCOR(raw test inputs, their activations as sent), over the whole test set.
- accuracy on the test set (eval phase: no noise, as the executor does it).
- label leakage, on an imbalanced binary version of the task (digits: "is it a 1" by default,
  about 10 % positives; the loss segment's last linear layer gets 2 outputs): the peer that
  receives the gradients the label holder returns on its remote in-edge runs the norm and cosine
  attacks of Li et al. 2022 on every training batch; reported as the mean AUC over batches (the
  paper's one-sided attacks) and as the direction-free AUC (`direction_free_auc`), per defence.
  Which digit is "positive" matters: the full report also scans all ten without a defence.

Which targets: a demo scenario name ("vanilla", "u-shaped", "multi-hop"; the digits CNN of the
zoo) or a deployment file whose raw features are digits-shaped. Supported deployments: one segment
reads raw features, its input fits a digits image (1×8×8) or a flat 64-vector, it sends on at least
one edge to another peer (the first such edge is measured), and exactly one segment computes a
loss; the bundled digits data stands in for the owner's data (a deployment names no data files;
peer configs do, privately). Vertical (several owners) and multi-task deployments are refused with
a `ConfigError`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from secure_split.analysis.attacks import (
    cosine_attack_auc,
    mean_batch_auc,
    norm_attack_auc,
    reconstruction_metrics,
    train_decoder,
)
from secure_split.canonical import digest_of
from secure_split.config import Deployment, DeploymentSpec, ProtectionSpec, load_deployment
from secure_split.engine.data import PeerData, digits
from secure_split.engine.executor import Outgoing, PeerExecutor
from secure_split.engine.label_defences import (
    MARVELL_DEFAULT_POWER,
    marvell_defence,
    max_norm_defence,
)
from secure_split.engine.local import Intercept, LocalRouter
from secure_split.engine.metrics import StepMetrics, TaskMetrics, evaluate, sum_task_metrics
from secure_split.engine.models import derive_seed, input_shape
from secure_split.engine.privacy import distance_correlation
from secure_split.engine.schedule import epoch_batches, split_train_test
from secure_split.errors import ConfigError, ConfigProblem
from secure_split.topology import Topology

__all__ = [
    "AUX_FRACTION",
    "DEMO_TARGETS",
    "FULL_ALPHAS",
    "FULL_NOISE_LEVELS",
    "QUICK_ALPHAS",
    "QUICK_NOISE_LEVELS",
    "LabelSetting",
    "LeakageTarget",
    "LocalRun",
    "PrivacySetting",
    "binary_target",
    "dcor_cost",
    "demo_target",
    "direction_free_auc",
    "label_settings",
    "leakage_report",
    "load_target",
    "measure_label_leakage",
    "measure_reconstruction",
    "with_protections",
]

DEMO_TARGETS = ("vanilla", "u-shaped", "multi-hop")
"""The demo scenarios the report accepts by name."""

AUX_FRACTION = 0.2
"""Share of all samples the reconstruction attacker holds as (input, activation) pairs."""

FULL_ALPHAS: tuple[float, ...] = (0.0, 1.0, 3.0, 5.0, 8.0, 12.0)
"""NoPeek α swept at σ = 0. On the zoo's digits CNN the owner's bottom is one convolution; from
about α = 15 it switches its activations off (accuracy falls to chance)."""
FULL_NOISE_LEVELS: tuple[float, ...] = (0.3, 1.0, 3.0)
"""Activation noise σ swept at α = 0 (the cut activation's RMS is about 0.75 without noise)."""
FULL_COMBINED: tuple[tuple[float, float], ...] = ((5.0, 0.3), (3.0, 1.0))
"""(α, σ) pairs: NoPeek and noise together."""
QUICK_ALPHAS: tuple[float, ...] = (0.0, 8.0)
QUICK_NOISE_LEVELS: tuple[float, ...] = (1.0,)

FULL_EPOCHS = 20
QUICK_EPOCHS = 10
FULL_LABEL_EPOCHS = 5
QUICK_LABEL_EPOCHS = 3
FULL_DECODER_EPOCHS = 150
QUICK_DECODER_EPOCHS = 60
GRID_IMAGES = 10
SMOOTHING_EPOCHS = 3
"""`accuracy_smoothed` is the mean test accuracy after each of the last this many epochs: at the
zoo's learning rate the test accuracy moves by 1-2 points between neighbouring epochs, as much as
a moderate defence costs."""


# --- targets ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LeakageTarget:
    """A deployment to measure, with the data each peer would hold and the edges under attack.

    Attributes:
        name: demo name or deployment file name.
        deployment: the (validated) deployment.
        data: peer -> its `PeerData` (only its own part).
        ids, features, labels: the whole dataset (for the measurements; never given to a peer).
        recon_edge: the first cut edge from the data owner (leaves the input segment, remote).
        label_edge: the remote edge on which the label holder returns gradients.
    """

    name: str
    deployment: Deployment
    data: Mapping[str, PeerData]
    ids: torch.Tensor
    features: torch.Tensor
    labels: torch.Tensor
    recon_edge: str
    label_edge: str

    @property
    def topology(self) -> Topology:
        """The target's topology."""
        return Topology.from_deployment(self.deployment)


def _dummy_peer(i: int) -> dict[str, str]:
    # Keys are never used: nothing is sent. Valid-looking values pass the schema.
    return {"endpoint": f"tcp://127.0.0.1:{47000 + i}", "sign_key": f"{i:064x}", "transport_key": f"{i:040d}"}


def _deployment_from_dict(raw: dict[str, Any], path: Path) -> Deployment:
    spec = DeploymentSpec.model_validate(raw)
    return Deployment(spec=spec, path=path, hash=digest_of(raw), raw=raw)


def demo_target(name: str, *, epochs: int = FULL_EPOCHS) -> LeakageTarget:
    """The deployment of a demo scenario (`secure_split.scenarios`, as `secure-split demo` builds
    it), on digits; two hops for multi-hop.

    Args:
        name: "vanilla", "u-shaped" or "multi-hop".
        epochs: training epochs written into the deployment.

    Returns:
        The target.

    Raises:
        ConfigError: for an unknown name.
    """
    from secure_split.scenarios import SCENARIOS

    if name not in DEMO_TARGETS:
        raise ConfigError(ConfigProblem(
            "TARGET", "target", f"unknown demo {name!r}; give a deployment file or one of {', '.join(DEMO_TARGETS)}"))
    plan = SCENARIOS[name](epochs)
    raw: dict[str, Any] = {
        "version": 1,
        "name": f"leakage-{name}",
        "coordinator": plan.coordinator,
        "policy": "policy.yaml",
        "peers": {p.name: _dummy_peer(i) for i, p in enumerate(plan.peers)},
        "segments": copy.deepcopy(plan.segments),
        "edges": copy.deepcopy(plan.edges),
        "training": copy.deepcopy(plan.training),
    }
    return _target_from(name, _deployment_from_dict(raw, Path(f"<demo {name}>")))


def load_target(target: str | Path, *, epochs: int | None = None) -> LeakageTarget:
    """Resolve the report's TARGET: a demo name or a deployment file.

    Args:
        target: "vanilla", "u-shaped", "multi-hop", or a path to a deployment.yaml.
        epochs: override the training epochs (None: the demo default or the deployment's).

    Returns:
        The target.

    Raises:
        ConfigError: unknown demo, unreadable deployment, or a topology the report cannot measure.
    """
    if str(target) in DEMO_TARGETS:
        return demo_target(str(target), epochs=FULL_EPOCHS if epochs is None else epochs)
    path = Path(target)
    if not path.is_file():
        raise ConfigError(
            [
                ConfigProblem(
                    str(target), "target", f"neither a demo ({', '.join(DEMO_TARGETS)}) nor a deployment file"
                )
            ]
        )
    dep = load_deployment(path)
    if epochs is not None:
        dep = _with_training(dep, epochs=epochs)
    return _target_from(path.name, dep)


def _with_training(dep: Deployment, **changes: Any) -> Deployment:
    training = dep.spec.training.model_copy(update=changes)
    return dataclasses.replace(dep, spec=dep.spec.model_copy(update={"training": training}))


def _target_from(name: str, dep: Deployment) -> LeakageTarget:
    topo = Topology.from_deployment(dep)
    file = str(dep.path)
    problems: list[ConfigProblem] = []
    if len(topo.input_segments) != 1:
        problems.append(
            ConfigProblem(
                file,
                "segments",
                (
                    f"the leakage report measures deployments with one segment reading raw features; found "
                    f"{list(topo.input_segments)} (vertical deployments are not supported yet)"
                ),
            )
        )
    if len(topo.loss_segments) != 1:
        problems.append(
            ConfigProblem(
                file,
                "segments",
                (
                    "the leakage report measures deployments with one loss segment; "
                    f"found {list(topo.loss_segments)}"
                ),
            )
        )
    if problems:
        raise ConfigError(problems)
    source = topo.input_segments[0]
    loss_seg = topo.loss_segments[0]
    ids, x, y = digits()
    need = input_shape(topo.segments[source].model)
    if need.problem(tuple(x.shape[1:])) is None:
        features = x
    elif need.problem((64,)) is None:
        features = x.reshape(len(x), 64)
    else:
        raise ConfigError(
            [
                ConfigProblem(
                    file,
                    f"segments.{source}.model",
                    (
                        "the leakage report runs on the bundled digits (1×8×8 images in [0, 1], or 64 flat "
                        f"values); this segment's input does not fit: {need.problem(tuple(x.shape[1:]))}"
                    ),
                )
            ]
        )
    remote_out = [e for e in topo.out_edges[source] if topo.is_remote(e)]
    if not remote_out:
        raise ConfigError(
            [
                ConfigProblem(
                    file,
                    f"segments.{source}",
                    (
                        "the segment reading raw features sends on no edge to another peer; "
                        "the report measures the first cut edge leaving it"
                    ),
                )
            ]
        )
    label_peer = topo.peer_of(loss_seg)
    into_label_peer = _remote_edges_into(topo, label_peer)
    if not into_label_peer:
        raise ConfigError([ConfigProblem(file, "edges", "no edge from another peer enters the label holder")])
    column = topo.segments[loss_seg].labels
    data = {}
    for peer in topo.peers:
        owns = topo.local_segments(peer)
        data[peer] = PeerData(
            ids=ids,
            features=features if source in owns else None,
            labels={column: y} if loss_seg in owns else {},
        )
    return LeakageTarget(
        name=name,
        deployment=dep,
        data=data,
        ids=ids,
        features=features,
        labels=y,
        recon_edge=remote_out[0],
        label_edge=into_label_peer[-1],
    )


def _remote_edges_into(topo: Topology, peer: str) -> list[str]:
    """Remote edges whose receiving segment `peer` owns, in topological order of that segment."""
    out = []
    for seg in topo.order:
        for e in topo.in_edges[seg]:
            if topo.is_remote(e) and topo.peer_of(seg) == peer:
                out.append(e)
    return out


DEFAULT_POSITIVE_CLASS = 1
"""The digit that is "positive" in the label-leakage task. The norm attack rests on the model being
less sure of the rare positives than of the negatives; for 1 (often confused with 7) that holds
through training, for an easy digit like 0 only in the first epoch (see `direction_free_auc`)."""


def binary_target(target: LeakageTarget, positive_class: int = DEFAULT_POSITIVE_CLASS) -> LeakageTarget:
    """The imbalanced binary version of a digits target: label 1 = "is it `positive_class`".

    The loss segment's last linear layer gets 2 outputs; everything else is unchanged.

    Raises:
        ConfigError: if the loss segment has no linear layer to resize.
    """
    dep = target.deployment
    topo = target.topology
    loss_seg = topo.loss_segments[0]
    model = topo.segments[loss_seg].model
    layers: list[dict[str, Any]] = copy.deepcopy(model) if isinstance(model, list) else []
    last = [i for i, layer in enumerate(layers) if "linear" in layer]
    if not last:
        raise ConfigError(
            [
                ConfigProblem(
                    str(dep.path),
                    f"segments.{loss_seg}.model",
                    "the binary label task needs a public layer list with a linear last layer to resize",
                )
            ]
        )
    layers[last[-1]] = {"linear": {**layers[last[-1]]["linear"], "out": 2}}
    seg = dep.spec.segments[loss_seg].model_copy(update={"model": layers})
    spec = dep.spec.model_copy(update={"segments": {**dep.spec.segments, loss_seg: seg}})
    binary = (target.labels == positive_class).to(torch.int64)
    column = seg.labels
    data = {
        peer: PeerData(ids=d.ids, features=d.features, labels={column: binary} if d.labels else {})
        for peer, d in target.data.items()
    }
    return dataclasses.replace(
        target,
        name=f"{target.name} (binary: is it a {positive_class})",
        deployment=dataclasses.replace(dep, spec=spec),
        data=data,
        labels=binary,
    )


def with_protections(dep: Deployment, edge: str, **protections: Any) -> Deployment:
    """A copy of `dep` whose `edge` has the given protections (the others keep theirs).

    Args:
        dep: the deployment.
        edge: edge id "FROM->TO".
        **protections: `ProtectionSpec` fields, e.g. nopeek_alpha=1.0, activation_noise_std=0.5.

    Returns:
        The modified deployment (validated by pydantic).
    """
    edges = []
    for e in dep.spec.edges:
        if e.name == edge:
            prot = ProtectionSpec.model_validate({**e.protections.model_dump(), **protections})
            e = e.model_copy(update={"protections": prot})
        edges.append(e)
    return dataclasses.replace(dep, spec=dep.spec.model_copy(update={"edges": edges}))


# --- a local run of the real executors -------------------------------------------------------


@dataclass
class LocalRun:
    """Every peer's `PeerExecutor` in one process, over the in-memory router (`engine.local`).

    Attributes:
        target: what is trained.
        executors: peer -> its executor.
        train_ids, test_ids: the deployment's split (`schedule.split_train_test`).
    """

    target: LeakageTarget
    deployment: Deployment
    executors: dict[str, PeerExecutor] = field(default_factory=dict)
    train_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    test_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    step_no: int = 0

    @classmethod
    def start(cls, target: LeakageTarget, deployment: Deployment | None = None) -> LocalRun:
        """Build one executor per peer (noise seeds derived from the training seed)."""
        dep = deployment or target.deployment
        seed = dep.spec.training.seed
        run = cls(target=target, deployment=dep)
        topo = Topology.from_deployment(dep)
        for peer in topo.peers:
            run.executors[peer] = PeerExecutor(
                dep, peer, target.data.get(peer), noise_seed=derive_seed(seed, f"noise:{peer}")
            )
        run.train_ids, run.test_ids = split_train_test(
            target.ids.numpy(), dep.spec.training.test_fraction, seed
        )
        return run

    def step(self, phase: str, ids: np.ndarray, intercept: Intercept | None = None) -> list[StepMetrics]:
        """Run one step across every executor, routing tensors until each is complete."""
        step = self.step_no
        self.step_no += 1
        router = LocalRouter(self.executors, wire=False)
        return list(router.run_step(step, phase, ids, intercept=intercept).values())  # type: ignore[arg-type]

    def train(self, epochs: int | None = None, intercept: Intercept | None = None) -> list[StepMetrics]:
        """Train for `epochs` (default: the deployment's) on the deployment's schedule."""
        metrics: list[StepMetrics] = []
        for epoch in range(self.deployment.spec.training.epochs if epochs is None else epochs):
            metrics.extend(self.train_epoch(epoch, intercept))
        return metrics

    def train_epoch(self, epoch: int, intercept: Intercept | None = None) -> list[StepMetrics]:
        """Train one epoch (number `epoch`, 0-based) on the deployment's schedule."""
        spec = self.deployment.spec.training
        metrics: list[StepMetrics] = []
        for batch in epoch_batches(
            self.train_ids, spec.batch_size, spec.seed, epoch, spec.max_steps_per_epoch
        ):
            metrics.extend(self.step("train", batch, intercept))
        return metrics

    def accuracy(self) -> float:
        """Test accuracy of the (single) task, in the eval phase."""
        spec = self.deployment.spec.training

        def run_batch(ids: np.ndarray) -> dict[str, TaskMetrics]:
            return sum_task_metrics(self.step("eval", ids))

        tasks = evaluate(run_batch, self.test_ids, spec.batch_size)
        return next(iter(tasks.values())).accuracy

    def edge_activations(self, edge: str, ids: np.ndarray) -> torch.Tensor:
        """What the sender of `edge` sends on it for `ids` with the current weights (eval mode, no noise)."""
        topo = Topology.from_deployment(self.deployment)
        sender = self.executors[topo.peer_of(topo.endpoints(edge)[0])]
        chunks: list[torch.Tensor] = []
        for i in range(0, len(ids), 256):
            outs = sender.begin_step(self.step_no, "eval", ids[i : i + 256])
            self.step_no += 1
            sender.abort_step()
            chunks.extend(o.tensor.clone() for o in outs if o.edge == edge)
        return torch.cat(chunks)


# --- measurements -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrivacySetting:
    """One point of the input-side sweep on the first cut edge."""

    alpha: float = 0.0
    noise_std: float = 0.0

    @property
    def label(self) -> str:
        """Short name for tables and plots."""
        parts = [f"α={self.alpha:g}"] if self.alpha or not self.noise_std else []
        if self.noise_std:
            parts.append(f"σ={self.noise_std:g}")
        return " ".join(parts)


def _rows_of(target: LeakageTarget, ids: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.searchsorted(target.ids.numpy(), ids))


def measure_reconstruction(
    target: LeakageTarget,
    setting: PrivacySetting,
    *,
    epochs: int,
    decoder_epochs: int,
    seed: int = 0,
    grid_images: int = GRID_IMAGES,
) -> dict[str, Any]:
    """Train `target` with `setting` on its first cut edge and attack that edge.

    Args:
        target: from `load_target`.
        setting: NoPeek α and activation noise σ for the first cut edge.
        epochs: training epochs.
        decoder_epochs: the attacker's decoder epochs.
        seed: seeds the attacker (auxiliary split, decoder, measurement noise).
        grid_images: how many test reconstructions to keep for the PNG grid.

    Returns:
        {"alpha", "noise_std", "accuracy" (final), "accuracy_smoothed" (mean of the last
         `SMOOTHING_EPOCHS` epochs), "dcor", "mse", "ssim", "activation_rms",
         "train_dcor" (mean over steps of the executor's NoPeek term; None at α=0),
         "seconds", "recon" (first `grid_images` test reconstructions, a tensor; not JSON)}.
    """
    started = time.perf_counter()
    dep = with_protections(
        target.deployment,
        target.recon_edge,
        nopeek_alpha=setting.alpha,
        activation_noise_std=setting.noise_std,
    )
    run = LocalRun.start(target, dep)
    metrics: list[StepMetrics] = []
    last: list[float] = []
    for epoch in range(epochs):
        metrics.extend(run.train_epoch(epoch))
        if epoch >= epochs - SMOOTHING_EPOCHS:
            last.append(run.accuracy())
    dcors = [m.dcor[target.recon_edge] for m in metrics if target.recon_edge in m.dcor]
    accuracy = last[-1]
    rng = np.random.default_rng([seed, 1])
    n_aux = round(AUX_FRACTION * len(target.ids))
    aux_ids = np.sort(rng.choice(run.train_ids, size=min(n_aux, len(run.train_ids)), replace=False))
    test_ids = run.test_ids
    gen = torch.Generator().manual_seed(seed)

    def as_sent(ids: np.ndarray) -> torch.Tensor:
        act = run.edge_activations(target.recon_edge, ids)
        if setting.noise_std > 0:
            act = act + setting.noise_std * torch.randn(act.shape, generator=gen)
        return act

    aux_act, test_act = as_sent(aux_ids), as_sent(test_ids)
    x_aux = target.features[_rows_of(target, aux_ids)]
    x_test = target.features[_rows_of(target, test_ids)]
    with torch.no_grad():
        dcor = float(distance_correlation(x_test, test_act))
    decoder = train_decoder(aux_act, x_aux, epochs=decoder_epochs, seed=seed)
    scores = reconstruction_metrics(
        decoder, test_act, x_test.reshape(len(x_test), 1, 8, 8) if x_test.dim() == 2 else x_test
    )
    with torch.no_grad():
        recon = decoder(test_act[:grid_images]).reshape(-1, 8, 8)
    return {
        "alpha": setting.alpha,
        "noise_std": setting.noise_std,
        "label": setting.label,
        "accuracy": accuracy,
        "accuracy_smoothed": float(np.mean(last)),
        "dcor": dcor,
        "mse": scores["mse"],
        "ssim": scores["ssim"],
        "activation_rms": float(test_act.pow(2).mean().sqrt()),
        "train_dcor": float(np.mean(dcors)) if dcors else None,
        "seconds": round(time.perf_counter() - started, 2),
        "recon": recon,
    }


@dataclass(frozen=True)
class LabelSetting:
    """One gradient-side defence at the label holder.

    Attributes:
        name: "none", "clip_noise", "max_norm" or "marvell".
        clip_norm, noise_std: for "clip_noise" (absolute, in the gradient's units).
        power: Marvell's budget multiple s.
    """

    name: str
    clip_norm: float | None = None
    noise_std: float = 0.0
    power: float = MARVELL_DEFAULT_POWER

    @property
    def label(self) -> str:
        """Short name for tables and plots."""
        if self.name == "clip_noise":
            noise = f"noise σ={self.noise_std:.2g}"
            return noise if self.clip_norm is None else f"clip {self.clip_norm:.2g} + {noise}"
        if self.name == "marvell":
            return f"marvell s={self.power:g}"
        return self.name


def direction_free_auc(epoch_aucs: Sequence[float]) -> float:
    """Leakage whichever way the score points: the mean over epochs of max(AUC_e, 1 − AUC_e).

    Li et al.'s attacks are one-sided (a larger norm means positive). On an easy class the model
    soon becomes more confident on the positives than on the negatives and the norm ranking flips:
    the one-sided AUC drops below 0.5 while the gradients still tell the labels apart. An attacker
    who knows one positive per epoch (as the cosine attack assumes) can orient the score; this is
    that attacker's AUC. Orienting per epoch (about 20 batches) rather than per batch keeps the bias
    small when nothing leaks (about +0.02).

    Args:
        epoch_aucs: the mean per-batch AUC of each epoch (NaN epochs are skipped).

    Returns:
        A value in [0.5, 1] (NaN if no epoch has one).
    """
    vals = [max(a, 1.0 - a) for a in epoch_aucs if not math.isnan(a)]
    return float(np.mean(vals)) if vals else float("nan")


def measure_label_leakage(
    target: LeakageTarget, setting: LabelSetting, *, epochs: int, seed: int = 0
) -> dict[str, Any]:
    """Train the binary `target` with a label defence and run the norm and cosine attacks.

    clip_noise is configured on the edge (`gradient_clip_norm`, `gradient_noise_std`) and applied
    by the executor; max_norm and marvell are applied to the gradient the label holder returns, at
    the point where the executor calls its label defence (its other protections are off here).

    Args:
        target: from `binary_target`.
        setting: the defence.
        epochs: training epochs.
        seed: seeds the defence's noise.

    Returns:
        {"defence", "label", "accuracy", "norm_auc", "cosine_auc", "grad_norm_median",
         "positives", "seconds", parameters of the defence}.
    """
    started = time.perf_counter()
    dep = target.deployment
    if setting.name == "clip_noise":
        dep = with_protections(
            dep, target.label_edge, gradient_clip_norm=setting.clip_norm, gradient_noise_std=setting.noise_std
        )
    run = LocalRun.start(target, dep)
    gen = torch.Generator().manual_seed(seed)
    seen: list[torch.Tensor] = []
    seen_labels: list[torch.Tensor] = []

    def intercept(out: Outgoing, ids: np.ndarray) -> Outgoing:
        if out.kind != "gradient" or out.edge != target.label_edge:
            return out
        labels = target.labels[_rows_of(target, ids)]
        g = out.tensor
        if setting.name == "max_norm":
            g = max_norm_defence(g, gen)
        elif setting.name == "marvell":
            g = marvell_defence(g, labels, power=setting.power, generator=gen)
        seen.append(g.detach().clone())
        seen_labels.append(labels)
        return dataclasses.replace(out, tensor=g.contiguous())

    medians: list[float] = []
    by_epoch: dict[str, list[float]] = {"norm": [], "cosine": []}
    for epoch in range(epochs):
        first = len(seen)
        run.train_epoch(epoch, intercept)
        medians.append(float(torch.cat([g.reshape(len(g), -1).norm(dim=1) for g in seen[first:]]).median()))
        for name, attack in (("norm", norm_attack_auc), ("cosine", cosine_attack_auc)):
            by_epoch[name].append(mean_batch_auc(attack, seen[first:], seen_labels[first:]))
    accuracy = run.accuracy()
    return {
        "defence": setting.name,
        "label": setting.label,
        "clip_norm": setting.clip_norm,
        "noise_std": setting.noise_std,
        "power": setting.power if setting.name == "marvell" else None,
        "accuracy": accuracy,
        "norm_auc": mean_batch_auc(norm_attack_auc, seen, seen_labels),
        "cosine_auc": mean_batch_auc(cosine_attack_auc, seen, seen_labels),
        "norm_auc_by_epoch": by_epoch["norm"],
        "cosine_auc_by_epoch": by_epoch["cosine"],
        "norm_leak_auc": direction_free_auc(by_epoch["norm"]),
        "cosine_leak_auc": direction_free_auc(by_epoch["cosine"]),
        "grad_norm_median_by_epoch": medians,
        "grad_dim": int(seen[0][0].numel()),
        "positives": float(target.labels.float().mean()),
        "seconds": round(time.perf_counter() - started, 2),
    }


def dcor_cost(
    batch_sizes: Sequence[int] = (64, 256, 1024), *, dims: tuple[int, int] = (64, 64), repeats: int = 3
) -> list[dict[str, float]]:
    """Measure exact DCOR's cost (forward + backward, one thread as set by the caller) per batch size.

    Args:
        batch_sizes: B values.
        dims: feature widths of the two inputs (raw digits: 64; the CNN's cut activation: 64).
        repeats: timing repetitions (the best is kept).

    Returns:
        Per B: {"batch", "ms" (best forward + backward time), "matrix_mib" (one B×B float32
        matrix), "saved_mib" (memory autograd keeps for the backward pass, measured with
        saved-tensor hooks: the B×B matrices dominate it)}.
    """
    out = []
    gen = torch.Generator().manual_seed(0)
    for b in batch_sizes:
        x = torch.rand(b, dims[0], generator=gen)
        y = torch.rand(b, dims[1], generator=gen, requires_grad=True)
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.autograd.backward([distance_correlation(x, y)])
            best = min(best, time.perf_counter() - t0)
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor, storages: dict[int, int] = storages) -> torch.Tensor:
            st = t.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            distance_correlation(x, y)
        out.append(
            {
                "batch": b,
                "ms": round(best * 1e3, 3),
                "matrix_mib": round(4 * b * b / 2**20, 3),
                "saved_mib": round(sum(storages.values()) / 2**20, 3),
            }
        )
    return out


# --- the report ---------------------------------------------------------------------------------


@contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Callable[[str], None]]:
    if not enabled:
        yield lambda _desc: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=False,
    ) as prog:
        task = prog.add_task("leakage sweep", total=total)
        first = True

        def advance(desc: str) -> None:
            nonlocal first
            if not first:
                prog.advance(task)
            first = False
            prog.update(task, description=desc)

        yield advance
        prog.update(task, completed=total, description="leakage sweep done")


def label_settings(quick: bool, first_epoch_median: float, width: int) -> list[LabelSetting]:
    """The label-side defences of the sweep, scaled from the undefended run.

    Gradient noise and clipping need absolute numbers; they are set from the median per-sample
    gradient norm m of the first epoch of the undefended run (per-entry noise σ = k·m/√width gives
    a noise vector of norm about k·m), and reported as numbers.

    Args:
        quick: the short list.
        first_epoch_median: m.
        width: entries per sample of the cut-layer gradient.

    Returns:
        The settings after "none" (which is always run first).
    """
    unit = first_epoch_median / math.sqrt(width)
    m, sigma = float(f"{first_epoch_median:.2g}"), float(f"{unit:.2g}")
    settings = [LabelSetting("clip_noise", noise_std=sigma)]
    if not quick:
        settings.append(LabelSetting("clip_noise", noise_std=float(f"{8 * unit:.2g}")))
    settings += [LabelSetting("clip_noise", clip_norm=m, noise_std=sigma), LabelSetting("max_norm")]
    if not quick:
        settings.append(LabelSetting("marvell", power=1.0))
    settings.append(LabelSetting("marvell", power=MARVELL_DEFAULT_POWER))
    return settings


def leakage_report(
    deployment_or_demo: str | Path,
    *,
    out_dir: str | Path,
    alphas: Sequence[float] | None = None,
    noise_levels: Sequence[float] | None = None,
    combined: Sequence[tuple[float, float]] | None = None,
    quick: bool = False,
    epochs: int | None = None,
    label_leakage: bool = True,
    positive_class: int = DEFAULT_POSITIVE_CLASS,
    progress: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the sweep; write `leakage.json`, `reconstruction_grid.png`, `tradeoff.png`, `label_leakage.png`.

    Args:
        deployment_or_demo: a demo name ("vanilla", "u-shaped", "multi-hop") or a deployment file.
        out_dir: where to write (created).
        alphas: NoPeek α values swept at σ = 0 (default `FULL_ALPHAS`, or `QUICK_ALPHAS` when quick).
        noise_levels: activation noise σ values swept at α = 0 (default `FULL_NOISE_LEVELS` /
            `QUICK_NOISE_LEVELS`).
        combined: (α, σ) pairs run as well (default `FULL_COMBINED`; none when quick).
        quick: fewer epochs, decoder epochs and settings (tests, a first look).
        epochs: training epochs per input-side setting (default 20, quick 10).
        label_leakage: also run the label-leakage part (binary task; 5 epochs, quick 3).
        positive_class: the digit that is label 1 in the binary task.
        progress: show a rich progress bar on stderr.
        seed: seeds the attacker and the label defences' noise (training uses the deployment's seed).

    Returns:
        Everything written to leakage.json (a JSON-able dict), with "files" naming the outputs.

    Raises:
        ConfigError: see `load_target`.
    """
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    epochs = epochs if epochs is not None else (QUICK_EPOCHS if quick else FULL_EPOCHS)
    label_epochs = QUICK_LABEL_EPOCHS if quick else FULL_LABEL_EPOCHS
    decoder_epochs = QUICK_DECODER_EPOCHS if quick else FULL_DECODER_EPOCHS
    alphas = tuple(alphas) if alphas is not None else (QUICK_ALPHAS if quick else FULL_ALPHAS)
    noise_levels = (
        tuple(noise_levels)
        if noise_levels is not None
        else (QUICK_NOISE_LEVELS if quick else FULL_NOISE_LEVELS)
    )
    combined = tuple(combined) if combined is not None else (() if quick else FULL_COMBINED)
    target = load_target(deployment_or_demo, epochs=epochs)
    settings = [PrivacySetting(alpha=a) for a in alphas]
    settings += [PrivacySetting(noise_std=s) for s in noise_levels if s > 0]
    settings += [PrivacySetting(alpha=a, noise_std=s) for a, s in combined]
    configured = target.deployment.edge(target.recon_edge).protections
    if (configured.nopeek_alpha or configured.activation_noise_std) and not any(
        s.alpha == configured.nopeek_alpha and s.noise_std == configured.activation_noise_std
        for s in settings
    ):
        settings.append(PrivacySetting(configured.nopeek_alpha, configured.activation_noise_std))
    n_label = 1 + len(label_settings(quick, 1.0, 1)) if label_leakage else 0
    scan = label_leakage and not quick

    rows: list[dict[str, Any]] = []
    label_rows: list[dict[str, Any]] = []
    class_scan: list[dict[str, Any]] = []
    with _progress(progress, len(settings) + n_label + (10 if scan else 0) + 1) as advance:
        for s in settings:
            advance(f"train + attack {s.label}")
            rows.append(
                measure_reconstruction(target, s, epochs=epochs, decoder_epochs=decoder_epochs, seed=seed)
            )
        if label_leakage:
            binary = binary_target(target, positive_class)
            advance("label leakage: none")
            label_rows.append(
                measure_label_leakage(binary, LabelSetting("none"), epochs=label_epochs, seed=seed)
            )
            first = label_rows[0]
            for ls in label_settings(quick, first["grad_norm_median_by_epoch"][0], first["grad_dim"]):
                advance(f"label leakage: {ls.label}")
                label_rows.append(measure_label_leakage(binary, ls, epochs=label_epochs, seed=seed))
        if scan:
            for digit in range(10):
                advance(f"label leakage without defence: is it a {digit}")
                r = measure_label_leakage(
                    binary_target(target, digit), LabelSetting("none"), epochs=label_epochs, seed=seed
                )
                class_scan.append(
                    {
                        "positive_class": digit,
                        **{
                            k: r[k]
                            for k in (
                                "positives",
                                "accuracy",
                                "norm_auc",
                                "norm_leak_auc",
                                "cosine_auc",
                                "cosine_leak_auc",
                                "norm_auc_by_epoch",
                            )
                        },
                    }
                )
        advance("DCOR cost")
        cost = dcor_cost()

    files = {
        "json": str(out / "leakage.json"),
        "reconstruction_grid": str(out / "reconstruction_grid.png"),
        "tradeoff": str(out / "tradeoff.png"),
    }
    spec = target.deployment.spec.training
    _, test_ids = split_train_test(target.ids.numpy(), spec.test_fraction, spec.seed)
    grid_ids = test_ids[:GRID_IMAGES]
    originals = target.features[_rows_of(target, grid_ids)].reshape(-1, 8, 8)
    _plot_grid(originals, _grid_choice(rows), Path(files["reconstruction_grid"]))
    _plot_tradeoff(rows, Path(files["tradeoff"]))
    if label_rows:
        files["label_leakage"] = str(out / "label_leakage.png")
        _plot_label(label_rows, Path(files["label_leakage"]), f"digits: is it a {positive_class}?")
    report: dict[str, Any] = {
        "target": target.name,
        "recon_edge": target.recon_edge,
        "label_edge": target.label_edge,
        "quick": quick,
        "parameters": {
            "epochs": epochs,
            "label_epochs": label_epochs,
            "batch_size": spec.batch_size,
            "optimizer": spec.optimizer.model_dump(),
            "training_seed": spec.seed,
            "attack_seed": seed,
            "test_fraction": spec.test_fraction,
            "test_samples": len(test_ids),
            "aux_fraction": AUX_FRACTION,
            "decoder_epochs": decoder_epochs,
            "decoder": "MLP flattened activation -> 256 -> 256 -> 64, ReLU, sigmoid output; Adam lr 2e-3, "
            "weight decay 1e-4, batch 64; inputs standardised on the auxiliary activations",
            "ssim": "Gaussian window 5x5, sigma 1, valid positions, C1=(0.01 L)^2, C2=(0.03 L)^2, L=1",
            "dcor": "exact V-statistic dCor over the whole test set: raw pixels vs activations as sent",
            "label_task": f"digits, label 1 = 'is it a {positive_class}'; last linear layer -> 2 outputs",
            "positive_class": positive_class,
            "label_auc": "mean over training batches of the per-batch ROC AUC (Li et al. 2022 attacks)",
            "alphas": list(alphas),
            "noise_levels": list(noise_levels),
            "combined": [list(c) for c in combined],
        },
        "sweep": [{k: v for k, v in r.items() if k != "recon"} for r in rows],
        "label_leakage": label_rows,
        "label_class_scan": class_scan,
        "dcor_cost": cost,
        "files": files,
        "seconds": round(time.perf_counter() - started, 1),
    }
    Path(files["json"]).write_text(json.dumps(report, indent=1, sort_keys=True))
    return report


def _grid_choice(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, torch.Tensor]]:
    """Reconstructions shown in the grid: α = 0; the strongest α that costs at most 3 points of
    (smoothed) accuracy; the strongest α; the strongest σ; the strongest (α, σ) pair."""
    plain = [r for r in rows if r["alpha"] == 0 and r["noise_std"] == 0]
    alpha_only = sorted((r for r in rows if r["alpha"] > 0 and r["noise_std"] == 0), key=lambda r: r["alpha"])
    noise_only = sorted(
        (r for r in rows if r["alpha"] == 0 and r["noise_std"] > 0), key=lambda r: r["noise_std"]
    )
    pairs = sorted(
        (r for r in rows if r["alpha"] > 0 and r["noise_std"] > 0), key=lambda r: (r["alpha"], r["noise_std"])
    )
    picked: list[Mapping[str, Any]] = plain[:1]
    if plain:
        cheap = [r for r in alpha_only if r["accuracy_smoothed"] >= plain[0]["accuracy_smoothed"] - 0.03]
        picked += cheap[-1:]
    picked += [group[-1] for group in (alpha_only, noise_only, pairs) if group]
    chosen: list[tuple[str, torch.Tensor]] = []
    for r in picked:
        title = f"{r['label']}: SSIM {r['ssim']:.2f}\nacc {100 * r['accuracy_smoothed']:.1f} %"
        if all(t != title for t, _ in chosen):
            chosen.append((title, r["recon"]))
    return chosen


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_grid(originals: torch.Tensor, rows: Sequence[tuple[str, torch.Tensor]], path: Path) -> None:
    plt = _pyplot()
    n = originals.shape[0]
    fig, axes = plt.subplots(1 + len(rows), n, figsize=(1.1 * n, 1.25 * (1 + len(rows))), squeeze=False)
    for r, (title, images) in enumerate([("original (held out)", originals), *rows]):
        for c in range(n):
            ax = axes[r][c]
            ax.imshow(images[c].numpy(), cmap="gray_r", vmin=0.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(title, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle("Reconstruction from cut-layer activations by the receiving peer", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_tradeoff(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Accuracy (mean of the last epochs) against DCOR, MSE and SSIM. Settings whose accuracy fell
    far below the rest (a collapsed model) are drawn on the lower edge with their accuracy written,
    so they do not squash the region where the trade-off is decided."""
    plt = _pyplot()
    measures = [
        ("dcor", "DCOR(raw, activation) ↓ better"),
        ("mse", "reconstruction MSE ↑ better"),
        ("ssim", "reconstruction SSIM ↓ better"),
    ]
    series: list[tuple[str, str, list[Mapping[str, Any]]]] = [
        ("NoPeek α", "o", [r for r in rows if r["noise_std"] == 0]),
        ("noise σ", "s", sorted((r for r in rows if r["alpha"] == 0), key=lambda r: r["noise_std"])),
        ("α and σ", "^", [r for r in rows if r["alpha"] > 0 and r["noise_std"] > 0]),
    ]
    accs = sorted(100 * r["accuracy_smoothed"] for r in rows)
    floor = max(0.0, min(a for a in accs if a >= accs[-1] - 20) - 3)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (key, xlabel) in zip(axes, measures, strict=True):
        for kind, marker, pts in series:
            if not pts:
                continue
            ys = [max(floor, 100 * r["accuracy_smoothed"]) for r in pts]
            ax.plot([r[key] for r in pts], ys, marker=marker, label=kind)
            for r, y in zip(pts, ys, strict=True):
                clipped = 100 * r["accuracy_smoothed"] < floor
                text = f"{r['label']} (acc {100 * r['accuracy_smoothed']:.0f} %)" if clipped else r["label"]
                ax.annotate(text, (r[key], y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_ylim(floor - 0.5, accs[-1] + 1.0)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (%, last 3 epochs)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Accuracy against input leakage across the sweep (digits CNN, held-out data)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_label(rows: Sequence[Mapping[str, Any]], path: Path, title: str) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 3.8))
    panels = ((axes[0], "norm", "norm attack AUC"), (axes[1], "cosine", "cosine attack AUC"))
    for ax, key, name in panels:
        for i, r in enumerate(rows):
            line = ax.plot(
                [r[f"{key}_auc"], r[f"{key}_leak_auc"]], [100 * r["accuracy"]] * 2, lw=0.8, alpha=0.5
            )
            ax.scatter(
                r[f"{key}_auc"],
                100 * r["accuracy"],
                marker="osD^vP*X"[i % 8],
                s=45,
                color=line[0].get_color(),
                label=r["label"],
            )
            ax.scatter(
                r[f"{key}_leak_auc"],
                100 * r["accuracy"],
                marker="osD^vP*X"[i % 8],
                s=45,
                facecolors="none",
                edgecolors=line[0].get_color(),
            )
        ax.axvline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_xlim(0.0, 1.05)
        ax.set_xlabel(f"{name} (filled: one-sided, hollow: direction-free; 0.5 = none)", fontsize=8)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(f"Label leakage from returned gradients ({title}) per defence", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
