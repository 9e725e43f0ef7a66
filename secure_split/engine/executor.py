"""The sans-IO executor of one peer: its segments, forward and backward over the topology.

Like h11's connection, it does no I/O. The peer runtime calls `begin_step` when a step starts and
`on_activation` / `on_gradient` for each tensor a neighbour sent; each call returns the
`Outgoing` tensors to send now. The runtime polls `step_complete()` and then `finish_step()`.

Rules of a step (one active at a time):
- A segment runs forward when all its inputs are present: its peer's raw features (input:
  features) or a tensor on every in-edge, merged per `merge` (concat along dim 1 in the order the
  deployment lists the edges, sum, or mean). Edges between two local segments are passed in
  memory; no Outgoing is made for them.
- Every segment's inputs are leaves of its own graph (train phase), so a segment's backward is a
  step of its own: it runs once gradients for *all* its out-edges are present (summed: fan-out)
  and its loss (if any) is computed, and then hands the gradient of each in-edge back to the
  producer (in memory for a local edge, an Outgoing "gradient" for a remote one). This is the
  distributed rule applied inside a peer too, so any DAG runs without deadlock.
- A loss segment computes cross-entropy (mean over the batch) against its label column and
  records sums (loss, correct, count). When every local segment has run backward, the optimizer
  steps (gradients were zeroed in `begin_step`). With `defer_update=True` (the peer runtime), a
  call that returns gradients to send leaves that step to the next `step_complete()`, so the
  gradients leave first and the producer's backward overlaps this peer's update (same result).
- eval: forward only, under no_grad, loss segments record metrics. infer: forward only, no
  labels read; segments without out-edges record argmax predictions (`predictions()`).

Protections of an edge (`EdgeSpec.protections`), train phase only:
- sender (owner of the `from` segment): activation_noise_std adds N(0, std²) to what is sent;
  nopeek_alpha adds alpha * dCor(raw batch, activation) to the segment's backward (the segment
  must read raw features; the noise-free activation is used).
- receiver (owner of the `to` segment), on the gradient it returns: gradient_clip_norm (per-sample
  L2 clip), then the label defence (`label_defences.label_defence`), then gradient_noise_std noise.
Protections are properties of the edge, so they apply on local edges too (the baseline with
protections=True matches).

Inbound tensors are checked before they touch any state: the edge must enter (activation) or
leave (gradient) a local segment from/to a remote one, the step must be active and in the right
phase, nothing may arrive twice, the dtype must be floating, the batch dimension must be the
step's, values finite, and the shape what the segment expects where that is known (the exact
sent shape for a gradient; the first layer's needs and the other merge inputs for an
activation). A refusal raises `RemoteProtocolError` and leaves the executor as it was.
Received tensors are never modified in place (they may share a read-only receive buffer).
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from secure_split.architecture import SegmentSource, public_sources
from secure_split.config import Deployment
from secure_split.engine.data import PeerData, as_id_tensor
from secure_split.engine.interface import inbound_problem, interface_sample, outbound, trial_outputs
from secure_split.engine.label_defences import label_defence
from secure_split.engine.metrics import Phase, StepMetrics, TaskMetrics
from secure_split.engine.models import (
    InputShape,
    horizontal_seed_names,
    input_shape,
    validate_layers,
)
from secure_split.engine.optim import Adam, Sgd, StepOptimizer
from secure_split.engine.pipeline import WeightVersions
from secure_split.engine.privacy import (
    LabelDefence,
    add_gaussian_noise,
    clip_per_sample,
    distance_correlation,
)
from secure_split.engine.sources import build_segments, layers_of, resolve_device, segment_record
from secure_split.errors import (
    ConfigError,
    ConfigProblem,
    LocalProtocolError,
    RemoteProtocolError,
    SecureSplitError,
    TrainingError,
)
from secure_split.topology import Topology

__all__ = ["Outgoing", "PeerExecutor", "build_optimizer", "merge_inputs"]

PHASES: tuple[Phase, ...] = ("train", "eval", "infer")
# Inbound dtypes we accept and compute in float32 (half precision may be used to save bandwidth).
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass(frozen=True, eq=False)
class Outgoing:
    """A tensor the runtime must send now.

    Attributes:
        kind: "activation" (forward, on an out-edge) or "gradient" (backward, on an in-edge).
        edge: the edge id "FROM->TO".
        to_peer: the peer to send it to.
        tensor: contiguous, detached CPU tensor (do not modify it: it may share memory with the
            executor's state; `tensors.to_wire` views it without a copy).
        raw: for an activation of a segment that reads raw features, the raw feature batch it
            was computed from (for the policy's egress leakage guards; never sent); else None.
        step: the step number.
        phase: "train", "eval" or "infer".
    """

    kind: Literal["activation", "gradient"]
    edge: str
    to_peer: str
    tensor: torch.Tensor
    raw: torch.Tensor | None
    step: int
    phase: Phase

    def __repr__(self) -> str:
        return (
            f"Outgoing({self.kind} {self.edge} -> {self.to_peer}, step {self.step} {self.phase}, "
            f"{list(self.tensor.shape)} {self.tensor.dtype})"
        )


def merge_inputs(tensors: Sequence[torch.Tensor], how: str | None) -> torch.Tensor:
    """Combine the tensors entering a segment (shared with the baseline so both merge alike).

    Args:
        tensors: one per in-edge, in the deployment's edge order.
        how: None (exactly one input), "concat" (along dim 1), "sum" or "mean".

    Returns:
        The segment's input.

    Raises:
        ValueError: for an unknown merge or several inputs without one.
    """
    if len(tensors) == 1 and how is None:
        return tensors[0]
    if how == "concat":
        return torch.cat(list(tensors), dim=1)
    if how == "sum":
        return torch.stack(list(tensors)).sum(dim=0)
    if how == "mean":
        return torch.stack(list(tensors)).mean(dim=0)
    raise ValueError(f"cannot merge {len(tensors)} inputs with merge={how!r}")


def build_optimizer(params: Sequence[nn.Parameter], dep: Deployment) -> StepOptimizer | None:
    """The optimizer of `training.optimizer` over `params` (None when there are none).

    Shared with the baseline: Adam and SGD act per parameter, so one optimizer per peer and
    one over the whole network take identical steps. `engine.optim`, not `torch.optim`: the same
    arithmetic without the `torch._dynamo` import that costs every peer start 1.9 s (see there).
    """
    if not params:
        return None
    spec = dep.spec.training.optimizer
    if spec.type == "sgd":
        return Sgd(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    return Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)


@dataclass
class _Step:
    """Mutable state of the active step. `copy()` is cheap (containers only, not tensors)."""

    step: int
    phase: Phase
    ids: torch.Tensor
    rows: torch.Tensor | None
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # in-edge -> tensor (leaf in train)
    aggregates: dict[str, torch.Tensor] = field(default_factory=dict)  # he segment -> summed input (leaf)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)  # segment -> output (with graph)
    raw: dict[str, torch.Tensor] = field(default_factory=dict)  # input segment -> raw batch
    sent: dict[str, tuple[int, ...]] = field(default_factory=dict)  # remote out-edge -> shape sent
    grads: dict[str, torch.Tensor] = field(default_factory=dict)  # out-edge -> gradient received
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # segment -> loss + penalties
    forwarded: set[str] = field(default_factory=set)
    backwarded: set[str] = field(default_factory=set)
    tasks: dict[str, TaskMetrics] = field(default_factory=dict)
    dcor: dict[str, float] = field(default_factory=dict)
    predictions: dict[str, torch.Tensor] = field(default_factory=dict)
    stepped: bool = False
    peers: frozenset[str] | None = None  # remote peers taking part (horizontal schedules); None: all
    # pipelining: a step begun ahead runs its forward on copies of the weights (segment -> name ->
    # leaf, `pipeline.WeightVersions`), so earlier steps' in-place updates do not touch what its
    # backward needs.
    stash: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return int(self.ids.shape[0])

    def copy(self) -> _Step:
        return dataclasses.replace(
            self,
            **{
                f.name: type(getattr(self, f.name))(getattr(self, f.name))
                for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), dict | set)
            },
        )


class PeerExecutor:
    """Runs one peer's segments of a deployment; sans-IO (see the module docstring).

    Args:
        deployment: the loaded deployment.
        peer_name: this peer.
        data: this peer's data (needed if it owns a segment that reads features or computes a
            loss; labels are read only in the train and eval phases).
        device: where the segments compute: "cpu", "cuda", "cuda:N", "auto" or a torch.device
            (`sources.resolve_device`). Inbound tensors are moved there; outbound tensors and
            checkpoints are on the host.
        noise_seed: seed of the private generator for protection noise. Leave None in real
            runs: it is then drawn from the OS (`secrets`), because noise that the others could
            regenerate from the public deployment would protect nothing. Tests pass a number.
        defer_update: when the last backward of a step produces gradients to send, take the
            optimizer step in the next `step_complete()` instead of before returning them, so the
            caller can send them first. The weights after `step_complete()` are the same.
        overlap: `training.overlap`: the same as `pipeline_depth=2`.
        pipeline_depth: `training.pipeline_depth`, the training steps a peer of
            `Topology.overlap_peers` may have in flight (1 elsewhere; `engine.pipeline`).
        sources: segment -> where its model comes from (`architecture.segment_sources(deployment,
            peer_config)`: private models, `module:` factories and initial weights of the peer
            config). None: the deployment's public models only.

    Raises:
        ConfigError: listing every problem (unknown peer, bad layer lists, a private segment
            without its source or not matching its commitment, code that cannot be imported, data
            missing or not fitting the input segments, a segment that cannot produce its edge's
            interface, nopeek on an edge whose segment reads no raw features, an HE-merged
            segment fed by a local edge, CUDA asked for where there is none).
        NotImplementedError: when a local in-edge asks for a label defence not implemented yet.
    """

    def __init__(
        self,
        deployment: Deployment,
        peer_name: str,
        data: PeerData | None,
        *,
        device: str | torch.device = "cpu",
        noise_seed: int | None = None,
        defer_update: bool = False,
        overlap: bool = False,
        pipeline_depth: int = 1,
        sources: Mapping[str, SegmentSource] | None = None,
    ) -> None:
        self.deployment = deployment
        self.defer_update = defer_update
        self.peer = peer_name
        self.data = data
        self.device = resolve_device(device)
        self.topology = Topology.from_deployment(deployment)
        topo = self.topology
        self.local = topo.local_segments(peer_name)
        self.sources: Mapping[str, SegmentSource] = MappingProxyType(
            dict(public_sources(deployment) if sources is None else sources)
        )
        self._check_config()
        modules = self._build_modules()
        self._modules: dict[str, nn.Module] = dict(modules)
        self._input_shapes: dict[str, InputShape] = {
            s: input_shape(layers_of(self.sources, s)) for s in self.local
        }
        self._records = [segment_record(self.sources[s], modules[s]) for s in self.local]
        self._check_trial_run()
        self._param_names: list[str] = []
        params: list[nn.Parameter] = []
        for s in self.local:
            for pname, p in modules[s].named_parameters():
                self._param_names.append(f"{s}.{pname}")
                params.append(p)
        self._params = params
        self._optimizer = build_optimizer(params, deployment)
        self._defences: dict[str, LabelDefence] = {
            e: label_defence(topo.edges[e].protections.label_defence, edge=e)
            for s in self.local
            for e in topo.in_edges[s]
        }
        self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(secrets.randbits(63) if noise_seed is None else int(noise_seed))
        self._state: _Step | None = None
        self._ahead: list[_Step] = []  # steps begun ahead of the active one, in step order
        self._predictions: dict[str, torch.Tensor] = {}
        # Pipelining (training.pipeline_depth, overlap = depth 2) applies to a peer without a loss
        # whose inputs come from peers that pipeline too (a data owner, the hops of a chain):
        # see Topology.overlap_peers. Elsewhere the depth is 1: one step at a time.
        depth = max(pipeline_depth, 2 if overlap else 1)
        self.pipeline_depth = depth if peer_name in topo.overlap_peers() else 1
        self.overlap = self.pipeline_depth > 1
        self._versions = WeightVersions(self.pipeline_depth)

    # --- construction checks ------------------------------------------------------------------

    def _build_modules(self) -> dict[str, nn.Module]:
        """Every local segment's module on this peer's device (`sources.build_segments`)."""
        modules = build_segments(self.deployment, self.sources, self.local,
                                 seed_names=horizontal_seed_names(self.deployment))
        return {s: m.to(self.device) for s, m in modules.items()}

    def _trial_input(self, seg: str, outputs: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        topo = self.topology
        if topo.segments[seg].input == "features":
            assert self.data is not None and self.data.features is not None  # _check_config
            return self.data.features[:2]
        parts = []
        for e in topo.in_edges[seg]:
            src = topo.edges[e].from_
            part = outputs.get(src) if src in self.local else interface_sample(topo.edges[e])
            if part is None:
                return None
            parts.append(part)
        if len(parts) > 1 and topo.segments[seg].merge is None:
            parts = parts[:1]  # a horizontal schedule's alternative inputs: one owner per step
        return merge_inputs(parts, topo.segments[seg].merge if len(parts) > 1 else None)

    def _check_trial_run(self) -> None:
        """Run each segment whose model is not a layer list, or that has an interface, once on a
        sample input, so that a model that cannot run on its input or produce its interface is a
        configuration error before the first step."""
        topo = self.topology

        def wanted(s: str) -> bool:
            edges = [topo.edges[e] for e in (*topo.in_edges[s], *topo.out_edges[s])]
            return self.sources[s].kind != "layers" or any(e.interface is not None for e in edges)

        if not any(wanted(s) for s in self.local):
            return
        found = trial_outputs(
            self.local, self._modules, self._trial_input,
            {s: [topo.edges[e] for e in topo.out_edges[s]] for s in self.local},
        )
        if found:
            raise ConfigError([ConfigProblem(str(self.sources[s].origin), f"segments.{s}.model",
                                             f"segment '{s}' {msg}") for s, msg in found.items()])

    def _check_config(self) -> None:
        topo, dep = self.topology, self.deployment
        file = str(dep.path)
        problems: list[ConfigProblem] = []
        if self.peer not in dep.spec.peers:
            problems.append(ConfigProblem(file, "peers", f"'{self.peer}' is not a peer of this deployment"))
        valid = set()
        for s in self.local:
            if s not in self.sources:
                problems.append(ConfigProblem(file, f"segments.{s}", f"segment '{s}' is private: its model is in peer "
                                              f"'{self.peer}''s config; pass its sources (architecture.segment_sources)"))
                continue
            layers = layers_of(self.sources, s)
            if layers is None:
                continue
            layer_problems = validate_layers(layers)
            where = str(self.sources[s].origin)  # the deployment, or the peer config of a private model
            problems.extend(ConfigProblem(where, f"segments.{s}.model", msg) for msg in layer_problems)
            if not layer_problems:
                valid.add(s)
        for eid, e in topo.edges.items():
            src_spec = topo.segments[e.from_]
            if e.to in self.local and topo.segments[e.to].he and not topo.is_remote(eid):
                problems.append(ConfigProblem(
                    file, f"segments.{e.to}.he",
                    f"edge {eid} is local, but an HE merge takes every input from another peer's ciphertext",
                ))
            if e.protections.nopeek_alpha > 0 and src_spec.input != "features":
                problems.append(ConfigProblem(
                    file, f"edges.{eid}.protections.nopeek_alpha",
                    f"segment '{e.from_}' reads no raw features, so NoPeek has nothing to decorrelate; "
                    "set it on an edge leaving an input segment",
                ))
        inputs = [s for s in self.local if topo.segments[s].input == "features"]
        if inputs and (self.data is None or self.data.features is None):
            problems.append(ConfigProblem(
                file, f"segments.{inputs[0]}.input",
                f"peer '{self.peer}' owns input segment(s) {inputs} but its data has no features",
            ))
        elif inputs and self.data is not None and self.data.features is not None:
            sample = tuple(self.data.features.shape[1:])
            for s in (s for s in inputs if s in valid):
                misfit = input_shape(layers_of(self.sources, s)).problem(sample)
                if misfit:
                    problems.append(ConfigProblem(
                        file, f"segments.{s}.model",
                        f"does not fit this peer's features {list(sample)}: {misfit}",
                    ))
        if problems:
            raise ConfigError(problems)

    # --- public API -------------------------------------------------------------------------

    @property
    def segments(self) -> Mapping[str, nn.Module]:
        """This peer's segment modules by name (read-only mapping)."""
        return MappingProxyType(self._modules)

    def segment_records(self) -> list[dict[str, Any]]:
        """One record per local segment for the audit log at run start (`sources.segment_record`):
        segment, source kind, public, parameters, commitment."""
        return [dict(r) for r in self._records]

    @property
    def active_step(self) -> int | None:
        """The step being executed, or None between steps."""
        return None if self._state is None else self._state.step

    @property
    def active_phase(self) -> Phase | None:
        """The phase of the active step, or None between steps."""
        return None if self._state is None else self._state.phase

    def can_begin_ahead(self, phase: str) -> bool:
        """With pipelining, whether a training step may begin now although one is active: the
        active step is a training step whose forward passes are all done and whose update has not
        been taken (it waits only for gradients), every step begun ahead has done its forward
        passes too, and fewer than `pipeline_depth` steps are in flight."""
        s = self._state
        return (
            self.overlap
            and phase == "train"
            and s is not None
            and s.phase == "train"
            and not s.stepped
            and len(self._ahead) < self.pipeline_depth - 1
            and all(len(x.forwarded) == len(self.local) for x in (s, *self._ahead))
        )

    @property
    def ahead_step(self) -> int | None:
        """The first step begun ahead of the active one (pipelining), or None."""
        return self._ahead[0].step if self._ahead else None

    @property
    def ahead_steps(self) -> tuple[int, ...]:
        """Every step begun ahead of the active one, in step order (at most `pipeline_depth` - 1)."""
        return tuple(x.step for x in self._ahead)

    def begin_step(
        self,
        step: int,
        phase: Phase,
        ids: np.ndarray | torch.Tensor | Sequence[int],
        *,
        peers: Sequence[str] | None = None,
    ) -> list[Outgoing]:
        """Start a step: run every local segment whose inputs are ready.

        Args:
            step: the step number (from the coordinator).
            phase: "train", "eval" or "infer".
            ids: the batch's sample ids (one dimension, unique, at least one).
            peers: the remote peers taking part in this step (horizontal schedules: the one owner
                whose batch it is). Edges to or from any other remote peer are idle in this step:
                several edges from different owners into one segment are alternatives, not a
                merge. None (the default): every edge takes part.

        Returns:
            The activations to send now.

        Raises:
            LocalProtocolError: a step is already active (call finish_step or abort_step first).
            RemoteProtocolError: malformed ids or phase (they come from the coordinator).
            TrainingError: ids not in this peer's data, or a local segment failed.
            ConfigError: a loss segment's label column is missing from this peer's data.
        """
        active = self._state
        ahead = active is not None
        if active is not None and not self.can_begin_ahead(phase):
            raise LocalProtocolError(
                f"step {active.step} is still active; call finish_step() or abort_step() first"
            )
        if phase not in PHASES:
            raise RemoteProtocolError(f"unknown phase {phase!r}; expected one of {', '.join(PHASES)}")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise RemoteProtocolError(f"step must be an int >= 0, got {step!r}")
        try:
            id_t = as_id_tensor(ids)
        except TypeError as exc:
            raise RemoteProtocolError(f"step {step}: bad sample ids: {exc}") from None
        if id_t.numel() == 0:
            raise RemoteProtocolError(f"step {step}: the batch has no sample ids")
        ordered = np.sort(id_t.numpy())  # numpy: a third of torch.unique's per-step cost
        if bool((ordered[1:] == ordered[:-1]).any()):
            raise RemoteProtocolError(f"step {step}: the batch repeats sample ids")
        topo = self.topology
        needs_rows = any(
            topo.segments[s].input == "features" or (topo.segments[s].loss and phase != "infer")
            for s in self.local
        )
        rows = None
        if needs_rows:
            if self.data is None:
                raise ConfigError(f"peer '{self.peer}' needs its data (features or labels), got none")
            if phase != "infer":
                self._check_labels()
            rows = self.data.rows(id_t)
        training = phase == "train"
        state = _Step(step=step, phase=phase, ids=id_t, rows=rows, peers=None if peers is None else frozenset(peers))
        if ahead:
            # The active step's backward and update are still to come: leave the gradients and
            # the weights alone, and run this forward on the version of the weights it is due.
            last = self._ahead[-1] if self._ahead else active
            if last is not None and step <= last.step:
                raise RemoteProtocolError(f"step {step} cannot begin ahead of step {last.step}")
            state.stash = self._versions.begin(self._modules, in_flight=True) or {}
            self._ahead.append(state)
        else:
            if self.overlap:
                # The same weights whether or not this step began ahead (engine.pipeline): a
                # training step runs on the weights from before the last depth - 1 updates of
                # its run of training steps; a step of another phase starts a new run.
                if training:
                    state.stash = self._versions.begin(self._modules, in_flight=False) or {}
                else:
                    self._versions.reset()
            for m in self._modules.values():
                if m.training != training:  # Module.train() walks every submodule: only on a change
                    m.train(training)
            if training:
                for p in self._params:  # = optimizer.zero_grad(set_to_none=True), without its profiler hooks
                    p.grad = None
            self._predictions = {}
            self._state = state
        try:
            return self._advance(state)
        except Exception as exc:
            if ahead:
                self._ahead = [x for x in self._ahead if x is not state]
            else:
                self._state = None
            if isinstance(exc, SecureSplitError):
                raise
            raise TrainingError(f"step {step} ({phase}) failed on peer '{self.peer}': {exc}") from exc

    def on_activation(self, edge: str, tensor: torch.Tensor, *, step: int | None = None) -> list[Outgoing]:
        """Feed an activation received on `edge`; run what became ready.

        Args:
            edge: the edge id; it must enter a local segment from a remote one.
            tensor: the activation [batch, ...] (floating; computed in float32). It is not
                modified, so it may share a read-only receive buffer.
            step: the step the message is bound to, checked against the active step if given.

        Returns:
            The tensors to send now (activations of segments that could run, gradients too when
            a loss segment completed its backward).

        Raises:
            RemoteProtocolError: the tensor or its edge/step/phase is not acceptable; nothing
                changed and the executor keeps serving.
            TrainingError, ConfigError: a local problem surfaced while running (state restored).
        """
        state = self._require_step(step, "activation", edge)
        topo = self.topology
        if edge not in topo.edges:
            raise RemoteProtocolError(f"activation on unknown edge {edge!r}")
        src, dst = topo.endpoints(edge)
        if topo.peer_of(dst) != self.peer or topo.peer_of(src) == self.peer:
            raise RemoteProtocolError(
                f"activation on edge {edge}: this peer ('{self.peer}') does not receive activations on it"
            )
        if topo.segments[dst].he:
            raise RemoteProtocolError(
                f"plaintext activation on edge {edge} refused: segment '{dst}' merges its inputs under "
                "HE (he: true), so it takes only their encrypted sum (on_aggregate)"
            )
        if not self._active(edge, state):
            raise RemoteProtocolError(
                f"activation on edge {edge}: '{topo.peer_of(src)}' takes no part in step {state.step}"
            )
        if edge in state.inputs:
            raise RemoteProtocolError(f"activation on edge {edge} arrived twice in step {state.step}")
        t = self._check_tensor(tensor, "activation", edge, state)
        broken = inbound_problem(topo.edges[edge], t, "activation")
        if broken:
            raise RemoteProtocolError(broken)
        self._check_activation_shape(edge, dst, t, state)
        leaf = t.to(self.device, torch.float32).detach()
        if state.phase == "train":
            leaf.requires_grad_(True)
        return self._advance_guarded(state, "activation", edge, lambda s: s.inputs.__setitem__(edge, leaf))

    def on_aggregate(self, segment: str, tensor: torch.Tensor, *, step: int | None = None) -> list[Outgoing]:
        """Feed the decrypted *sum* of all activations entering an HE-merged segment (he: true).

        The runtime adds the owners' encrypted activations under CKKS and has the sum decrypted;
        this executor never sees any single owner's activation. For merge: mean it divides by the
        number of in-edges itself. In backward, every in-edge gets d(loss)/d(sum) (which is the
        gradient of each input, for sum and for mean), after that edge's protections.

        Args:
            segment: a local segment with `he: true`.
            tensor: the sum [batch, ...] (floating; not modified).
            step: the step the message is bound to, checked against the active step if given.

        Returns:
            The tensors to send now.

        Raises:
            RemoteProtocolError: not an HE segment of this peer, already given, or a bad tensor;
                nothing changed.
        """
        state = self._require_step(step, "aggregate", segment)
        topo = self.topology
        if segment not in self.local or not topo.segments[segment].he:
            raise RemoteProtocolError(
                f"aggregate for {segment!r}, which is not an HE-merged segment of '{self.peer}'"
            )
        if segment in state.aggregates:
            raise RemoteProtocolError(f"aggregate for segment {segment} arrived twice in step {state.step}")
        t = self._check_tensor(tensor, "aggregate", segment, state)
        msg = self._input_shapes[segment].problem(tuple(t.shape[1:]))
        if msg:
            raise RemoteProtocolError(f"aggregate for segment {segment} does not fit it: {msg}")
        leaf = t.to(self.device, torch.float32).detach()
        if state.phase == "train":
            leaf.requires_grad_(True)
        return self._advance_guarded(
            state, "aggregate", segment, lambda s: s.aggregates.__setitem__(segment, leaf)
        )

    def on_gradient(self, edge: str, tensor: torch.Tensor, *, step: int | None = None) -> list[Outgoing]:
        """Feed the gradient received for an activation this peer sent on `edge`.

        Args:
            edge: the edge id; it must leave a local segment to a remote one.
            tensor: the gradient, exactly the shape of the activation sent (not modified).
            step: the step the message is bound to, checked against the active step if given.

        Returns:
            The gradients to send now (and nothing else).

        Raises:
            RemoteProtocolError: wrong phase, edge or shape, duplicate, or no activation sent on
                the edge in this step; nothing changed.
            TrainingError: a local problem surfaced while running backward.
        """
        state = self._require_step(step, "gradient", edge)
        if state.phase != "train":
            raise RemoteProtocolError(
                f"gradient on edge {edge} in a {state.phase} step; gradients exist only in train"
            )
        topo = self.topology
        if edge not in topo.edges:
            raise RemoteProtocolError(f"gradient on unknown edge {edge!r}")
        src, dst = topo.endpoints(edge)
        if topo.peer_of(src) != self.peer or topo.peer_of(dst) == self.peer:
            raise RemoteProtocolError(
                f"gradient on edge {edge}: this peer ('{self.peer}') does not receive gradients on it"
            )
        if edge not in state.sent:
            raise RemoteProtocolError(
                f"gradient on edge {edge} before this peer sent its activation in step {state.step}"
            )
        if edge in state.grads:
            raise RemoteProtocolError(f"gradient on edge {edge} arrived twice in step {state.step}")
        t = self._check_tensor(tensor, "gradient", edge, state)
        broken = inbound_problem(topo.edges[edge], t, "gradient")
        if broken:
            raise RemoteProtocolError(broken)
        if tuple(t.shape) != state.sent[edge]:
            raise RemoteProtocolError(
                f"gradient on edge {edge} has shape {list(t.shape)}, "
                f"the activation sent had {list(state.sent[edge])}"
            )
        g = t.to(self.device, torch.float32)
        return self._advance_guarded(state, "gradient", edge, lambda s: s.grads.__setitem__(edge, g))

    def step_complete(self) -> bool:
        """True when this peer has done all its work for the active step (False with none active).

        With `defer_update`, takes the optimizer step that waited for the gradients to be sent.
        """
        s = self._state
        if s is None:
            return False
        if len(s.forwarded) != len(self.local):
            return False
        if s.phase != "train":
            return True
        if len(s.backwarded) != len(self.local):
            return False
        if not s.stepped:
            self._optimizer_step(s)  # deferred by _advance until the gradients were sent
        return True

    def waiting_for(self) -> list[tuple[str, str]]:
        """What the active step still needs from other peers: ("activation"|"gradient", edge), or
        ("aggregate", segment) for an HE-merged segment.

        For timeouts and error messages; empty when nothing is active or nothing is awaited.
        """
        s = self._state
        if s is None:
            return []
        topo, out = self.topology, []
        for seg in self.local:
            if topo.segments[seg].he:
                if seg not in s.aggregates:
                    out.append(("aggregate", seg))
            else:
                out.extend(
                    ("activation", e) for e in self._ins(seg, s) if topo.is_remote(e) and e not in s.inputs
                )
            if s.phase == "train":
                for e in self._outs(seg, s):
                    if topo.is_remote(e) and e not in s.grads:
                        out.append(("gradient", e))
        return out

    def finish_step(self) -> StepMetrics:
        """End the completed step and return its metrics; the executor is ready for the next.

        Raises:
            LocalProtocolError: no step is active, or it is not complete yet.
        """
        s = self._state
        if s is None:
            raise LocalProtocolError("finish_step() without an active step")
        if not self.step_complete():
            raise LocalProtocolError(
                f"step {s.step} is not complete; still waiting for {self.waiting_for() or 'local work'}"
            )
        self._state = self._ahead.pop(0) if self._ahead else None  # a step begun ahead becomes the active one
        self._predictions = dict(s.predictions)
        return StepMetrics(step=s.step, phase=s.phase, tasks=dict(s.tasks), dcor=dict(s.dcor))

    def abort_step(self) -> None:
        """Drop the active step, and one begun ahead (a peer failed or refused): no optimizer step,
        gradients cleared."""
        self._state = None
        self._ahead = []
        self._versions.reset()
        if self._optimizer is not None:
            self._optimizer.zero_grad(set_to_none=True)

    def predictions(self) -> dict[str, torch.Tensor]:
        """Argmax predictions (int64 [batch]) of local segments without out-edges, by segment,
        from the last infer step (cleared when the next step begins)."""
        s = self._state
        return dict(s.predictions) if s is not None and s.predictions else dict(self._predictions)

    # --- weights of horizontal owners ------------------------------------------------------

    def _float_state(self) -> list[torch.Tensor]:
        return [
            v for s in self.local for v in self._modules[s].state_dict().values() if v.is_floating_point()
        ]

    def weights_vector(self) -> np.ndarray:
        """Every floating-point state entry of this peer's segments, flattened into one float32
        vector (segments in topology order, entries in `state_dict` order). Owners of a
        horizontal schedule hold the same models, so position i means the same weight at each."""
        parts = [v.detach().to("cpu", torch.float32).reshape(-1) for v in self._float_state()]
        return torch.cat(parts).numpy().copy() if parts else np.zeros(0, dtype=np.float32)

    def load_weights_vector(self, vector: np.ndarray) -> None:
        """Replace this peer's weights with a vector from `weights_vector()` (another owner's, or
        an average). The optimizer state is kept.

        Raises:
            LocalProtocolError: during an active step.
            RemoteProtocolError: wrong length or non-finite values (it came from another peer).
        """
        if self._state is not None:
            raise LocalProtocolError("cannot load weights during an active step")
        values = np.asarray(vector)
        entries = self._float_state()
        total = sum(int(v.numel()) for v in entries)
        if values.ndim != 1 or values.shape[0] != total:
            raise RemoteProtocolError(
                f"weights vector has shape {list(values.shape)}; this peer's segments have {total} weights"
            )
        if not np.isfinite(values).all():
            raise RemoteProtocolError("weights vector holds NaN or infinite values")
        flat = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
        self._versions.reset()  # weights from elsewhere: a new run of training steps
        offset = 0
        with torch.no_grad():
            for v in entries:
                n = int(v.numel())
                v.copy_(flat[offset:offset + n].reshape(v.shape).to(v.dtype))
                offset += n

    # --- state for checkpoints -----------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every segment parameter and buffer and the optimizer state, as named tensors.

        Names: "segments.SEG.NAME" (state_dict entries) and "optimizer.SEG.PARAM.KEY" (e.g.
        "optimizer.top.0.weight.exp_avg"). Python numbers in the optimizer state become 0-d
        float64 tensors, listed in `optimizer_meta()["scalars"]`. The tensors are detached views
        of live state: save them before the next step and do not modify them.
        """
        out: dict[str, torch.Tensor] = {}
        for s in self.local:
            for k, v in self._modules[s].state_dict().items():
                out[f"segments.{s}.{k}"] = v.detach()
        for name, key, value in self._optimizer_entries():
            out[f"optimizer.{name}.{key}"] = value
        return out

    def optimizer_meta(self) -> dict[str, Any]:
        """JSON-able description of the optimizer: type, hyperparameters, parameter names, scalars."""
        groups = []
        if self._optimizer is not None:
            for g in self._optimizer.state_dict()["param_groups"]:
                groups.append({
                    k: list(v) if isinstance(v, tuple) else v
                    for k, v in g.items()
                    if k != "params" and (v is None or isinstance(v, bool | int | float | str | tuple))
                })
        scalars = [
            f"optimizer.{name}.{key}" for name, key, value in self._optimizer_entries(raw=True)
            if not isinstance(value, torch.Tensor)
        ]
        return {
            "type": self.deployment.spec.training.optimizer.type,
            "param_groups": groups,
            "params": list(self._param_names),
            "scalars": scalars,
        }

    def _optimizer_entries(self, raw: bool = False) -> list[tuple[str, str, Any]]:
        if self._optimizer is None:
            return []
        out = []
        for idx, entry in self._optimizer.state_dict()["state"].items():
            for key, value in entry.items():
                if value is None:
                    continue
                if not raw and not isinstance(value, torch.Tensor):
                    value = torch.tensor(float(value), dtype=torch.float64)
                elif isinstance(value, torch.Tensor):
                    value = value.detach()
                out.append((self._param_names[idx], key, value))
        return out

    def load_state_tensors(
        self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None
    ) -> None:
        """Restore segments and optimizer from `state_tensors()` output (e.g. a checkpoint).

        Everything is checked before anything is changed: exactly the segment entries this peer
        has, with the same shapes and dtypes, and optimizer entries only for known parameters.

        Args:
            tensors: name -> tensor, as produced by `state_tensors()`.
            meta: `optimizer_meta()` of the saved executor (for the scalar entries); optional.

        Raises:
            LocalProtocolError: during an active step.
            TrainingError: listing every mismatch.
        """
        if self._state is not None:
            raise LocalProtocolError("cannot load state during an active step")
        problems: list[str] = []
        expected = {
            f"segments.{s}.{k}": v for s in self.local for k, v in self._modules[s].state_dict().items()
        }
        for name, ref in expected.items():
            got = tensors.get(name)
            if got is None:
                problems.append(f"missing {name}")
            elif tuple(got.shape) != tuple(ref.shape) or got.dtype != ref.dtype:
                problems.append(
                    f"{name}: expected {ref.dtype}{list(ref.shape)}, got {got.dtype}{list(got.shape)}"
                )
        saved_type = (meta or {}).get("type")
        own_type = self.deployment.spec.training.optimizer.type
        if saved_type is not None and saved_type != own_type:
            problems.append(f"optimizer state is for {saved_type!r}, this peer uses {own_type!r}")
        index = {n: i for i, n in enumerate(self._param_names)}
        opt_state: dict[int, dict[str, Any]] = {}
        raw_scalars = (meta or {}).get("scalars", [])
        if not isinstance(raw_scalars, list) or not all(isinstance(x, str) for x in raw_scalars):
            problems.append("the optimizer's list of scalar entries is not a list of names")
            raw_scalars = []
        scalars = set(raw_scalars)
        for name, value in tensors.items():
            if name in expected:
                continue
            if not name.startswith("optimizer."):
                problems.append(f"unexpected entry {name}")
                continue
            pname, _, key = name[len("optimizer."):].rpartition(".")
            if pname not in index or not key.isidentifier():
                problems.append(f"optimizer entry {name} names no parameter of this peer")
                continue
            if name in scalars and value.numel() != 1:
                problems.append(f"optimizer entry {name} is listed as a number but holds {value.numel()} values")
                continue
            opt_state.setdefault(index[pname], {})[key] = (
                value.item() if name in scalars else value.detach().clone().to(self.device)
            )
        if opt_state and self._optimizer is None:
            problems.append("optimizer entries given, but this peer has no parameters")
        checked: dict[int, dict[str, Any]] = {}
        if self._optimizer is not None and not problems:
            # Checked before anything is loaded: a refused checkpoint leaves the peer as it was.
            groups = self._optimizer.state_dict()["param_groups"]
            try:
                checked = self._optimizer.checked_state({"state": opt_state, "param_groups": groups})
            except (ValueError, RuntimeError, TypeError) as exc:
                problems.append(f"optimizer state: {exc}")
        if problems:
            raise TrainingError(f"state does not fit peer '{self.peer}': " + "; ".join(problems[:20]))
        self._versions.reset()
        for s in self.local:
            prefix = f"segments.{s}."
            own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            self._modules[s].load_state_dict(own)
        if self._optimizer is not None:
            self._optimizer.state = checked

    # --- internals -------------------------------------------------------------------------

    def _check_labels(self) -> None:
        topo = self.topology
        assert self.data is not None
        for s in self.local:
            col = topo.segments[s].labels
            if topo.segments[s].loss and col not in self.data.labels:
                raise ConfigError(ConfigProblem(
                    self.data.source or "(this peer's data)", f"labels.{col}",
                    f"segment '{s}' computes its loss on label column '{col}', which this peer's data "
                    f"does not have (it has: {sorted(self.data.labels) or 'none'}); run `secure-split data check` "
                    "on this peer's config",
                ))

    def _require_step(self, step: int | None, kind: str, edge: str) -> _Step:
        if kind == "activation":
            for ahead in self._ahead:
                if step == ahead.step:
                    return ahead  # pipelining: a later step's input, while this one waits for gradients
        s = self._state
        if s is None:
            raise RemoteProtocolError(f"{kind} on edge {edge!r} while no step is active")
        if step is not None and step != s.step:
            raise RemoteProtocolError(
                f"{kind} on edge {edge!r} is for step {step}, the active step is {s.step}"
            )
        return s

    def _check_tensor(self, t: torch.Tensor, kind: str, edge: str, state: _Step) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{kind} on edge {edge}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise RemoteProtocolError(
                f"{kind} on edge {edge} has dtype {t.dtype}; a floating dtype is required"
            )
        if t.dim() < 1 or t.shape[0] != state.batch:
            raise RemoteProtocolError(
                f"{kind} on edge {edge} has shape {list(t.shape)}; its batch dimension must be "
                f"{state.batch} (the samples of step {state.step})"
            )
        # A finite sum implies finite values (inf or NaN anywhere makes the sum inf or NaN) and costs
        # ~4 us against ~55 us for isfinite().all() on a 64x256 batch; only a non-finite sum (or an
        # overflow of huge finite values) takes the exact check.
        if t.numel() and not math.isfinite(float(t.sum())) and not bool(torch.isfinite(t).all()):
            raise RemoteProtocolError(f"{kind} on edge {edge} holds NaN or infinite values")
        return t

    def _check_activation_shape(self, edge: str, seg: str, t: torch.Tensor, state: _Step) -> None:
        topo = self.topology
        spec = topo.segments[seg]
        sample = tuple(t.shape[1:])
        if spec.merge is None:
            msg = self._input_shapes[seg].problem(sample)
            if msg:
                raise RemoteProtocolError(f"activation on edge {edge} does not fit segment '{seg}': {msg}")
            return
        for other in self._ins(seg, state):
            if other == edge or other not in state.inputs:
                continue
            got = tuple(state.inputs[other].shape[1:])
            same = got == sample if spec.merge != "concat" else (
                len(got) == len(sample) and len(got) >= 1 and got[1:] == sample[1:]
            )
            if not same:
                raise RemoteProtocolError(
                    f"activation on edge {edge} has per-sample shape {list(sample)}, which cannot be "
                    f"merged ({spec.merge}) with {list(got)} from edge {other}"
                )

    def _advance_guarded(
        self, state: _Step, kind: str, edge: str, apply: Callable[[_Step], None]
    ) -> list[Outgoing]:
        """Apply an inbound tensor and run; on failure restore the step as it was."""
        before = state.copy()
        apply(state)

        def restore() -> None:
            at = [i for i, x in enumerate(self._ahead) if x is state]
            if at:
                self._ahead[at[0]] = before
            else:
                self._state = before

        try:
            return self._advance(state)
        except SecureSplitError:
            restore()
            raise
        except (RuntimeError, ValueError, IndexError, TypeError) as exc:
            restore()
            raise RemoteProtocolError(
                f"{kind} on edge {edge} could not be used by peer '{self.peer}': {exc}"
            ) from exc

    def _advance(self, state: _Step | None = None) -> list[Outgoing]:
        """Run every forward and backward that has become possible (in the active step, or in
        `state`); return what to send."""
        s = self._state if state is None else state
        assert s is not None
        out: list[Outgoing] = []
        progress = True
        while progress:
            progress = False
            for seg in self.local:
                if seg not in s.forwarded and (
                    seg in s.aggregates or all(e in s.inputs for e in self._ins(seg, s))
                ):
                    out.extend(self._forward(seg, s))
                    progress = True
            if s.phase == "train":
                for seg in reversed(self.local):
                    if (
                        seg in s.forwarded
                        and seg not in s.backwarded
                        and all(e in s.grads for e in self._outs(seg, s))
                    ):
                        out.extend(self._backward(seg, s))
                        progress = True
        if s.phase == "train" and len(s.backwarded) == len(self.local) and not s.stepped:
            # defer_update: with gradients to return, the update waits for the next step_complete()
            # (called right after sending them), so the producer's backward overlaps it.
            if not (self.defer_update and any(o.kind == "gradient" for o in out)):
                self._optimizer_step(s)
        return out

    def _active(self, edge: str, s: _Step) -> bool:
        """Whether `edge` takes part in step `s` (see `begin_step(peers=...)`)."""
        if s.peers is None:
            return True
        topo = self.topology
        src, dst = topo.endpoints(edge)
        a, b = topo.peer_of(src), topo.peer_of(dst)
        other = b if a == self.peer else a
        return other == self.peer or other in s.peers

    def _ins(self, seg: str, s: _Step) -> list[str]:
        edges = self.topology.in_edges[seg]
        return list(edges) if s.peers is None else [e for e in edges if self._active(e, s)]

    def _outs(self, seg: str, s: _Step) -> list[str]:
        edges = self.topology.out_edges[seg]
        return list(edges) if s.peers is None else [e for e in edges if self._active(e, s)]

    def _optimizer_step(self, s: _Step) -> None:
        for seg, copies in s.stash.items():  # its forward ran on copies: the gradients are there
            for name, p in self._modules[seg].named_parameters():
                p.grad = copies[name].grad
        if self.overlap:
            # Only a step that begins after this update, not ahead of it, needs these weights; a
            # step that already began ahead holds its own version, and no copy is made for it.
            self._versions.before_update(self._modules)
        if self._optimizer is not None:
            self._optimizer.step()
        s.stepped = True

    def _forward(self, seg: str, s: _Step) -> list[Outgoing]:
        topo = self.topology
        spec = topo.segments[seg]
        train = s.phase == "train"
        raw = None
        if spec.input == "features":
            assert self.data is not None and self.data.features is not None and s.rows is not None
            raw = self.data.features[s.rows]
            s.raw[seg] = raw
            x = raw.to(self.device)
        elif seg in s.aggregates:
            n_in = len(topo.in_edges[seg])
            x = s.aggregates[seg] / n_in if spec.merge == "mean" else s.aggregates[seg]
        else:
            x = merge_inputs([s.inputs[e] for e in self._ins(seg, s)], spec.merge)
            if spec.merge is not None:
                msg = self._input_shapes[seg].problem(tuple(x.shape[1:]))
                if msg:
                    remote = [e for e in topo.in_edges[seg] if topo.is_remote(e)]
                    err = RemoteProtocolError if remote else TrainingError
                    raise err(f"the merged input of segment '{seg}' does not fit it: {msg}")
        with torch.set_grad_enabled(train):
            if seg in s.stash:
                y = functional_call(self._modules[seg], s.stash[seg], (x,))
            else:
                y = self._modules[seg](x)
        s.outputs[seg] = y
        s.forwarded.add(seg)
        terms: list[torch.Tensor] = []
        if spec.loss is not None and s.phase != "infer":
            terms.append(self._loss(seg, y, s))
        if s.phase == "infer" and not topo.out_edges[seg]:
            s.predictions[seg] = y.detach().argmax(dim=1).to("cpu")
        out: list[Outgoing] = []
        for e in self._outs(seg, s):
            prot = topo.edges[e].protections
            act = y.detach()
            if train and prot.nopeek_alpha > 0 and raw is not None:
                d = distance_correlation(raw.to(self.device), y)
                s.dcor[e] = float(d.detach())
                terms.append(prot.nopeek_alpha * d)
            if train:
                act = add_gaussian_noise(act, prot.activation_noise_std, self._generator)
            dst = topo.edges[e].to
            if topo.peer_of(dst) == self.peer:
                # A local edge is a cut too: its own leaf, so its gradient comes back separately.
                leaf = act.detach()
                if train:
                    leaf.requires_grad_(True)
                s.inputs[e] = leaf
            else:
                tensor = outbound(topo.edges[e], act.to("cpu"), "activation").contiguous()
                if train:
                    s.sent[e] = tuple(tensor.shape)
                out.append(Outgoing(
                    kind="activation", edge=e, to_peer=topo.peer_of(dst), tensor=tensor,
                    raw=None if raw is None else raw.to("cpu"), step=s.step, phase=s.phase,
                ))
        if train and terms:
            s.losses[seg] = terms[0] if len(terms) == 1 else torch.stack(terms).sum()
        return out

    def _loss(self, seg: str, logits: torch.Tensor, s: _Step) -> torch.Tensor:
        spec = self.topology.segments[seg]
        assert self.data is not None and s.rows is not None
        y = self.data.labels[spec.labels][s.rows].to(self.device)
        if logits.dim() != 2:
            raise TrainingError(
                f"loss segment '{seg}' must output [batch, classes], got {list(logits.shape)}"
            )
        if int(y.max()) >= logits.shape[1]:
            raise TrainingError(
                f"label column '{spec.labels}' has class {int(y.max())}, but segment '{seg}' outputs "
                f"{logits.shape[1]} classes"
            )
        loss = F.cross_entropy(logits, y)
        n = int(y.shape[0])
        correct = int((logits.detach().argmax(dim=1) == y).sum())
        task = self.topology.task_of(seg)
        s.tasks[task] = s.tasks.get(task, TaskMetrics()) + TaskMetrics(float(loss.detach()) * n, correct, n)
        return loss

    def _backward(self, seg: str, s: _Step) -> list[Outgoing]:
        topo = self.topology
        roots: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        y = s.outputs.pop(seg)
        out_edges = self._outs(seg, s)
        if out_edges:
            g = s.grads[out_edges[0]]
            for e in out_edges[1:]:
                g = g + s.grads[e]  # fan-out: the output's gradient is the sum over its consumers
            roots.append(y)
            grads.append(g)
        loss = s.losses.pop(seg, None)
        if loss is not None:
            roots.append(loss)
            grads.append(torch.ones_like(loss))
        pairs = [(r, g) for r, g in zip(roots, grads, strict=True) if r.requires_grad]
        if len(pairs) == 1:
            # One root, the common case: backward from the scalar sum(r * g), whose gradient at r
            # is exactly g (1.0 * g), as torch.autograd.backward([r], [g]) gives. That call
            # imports torch.fx.experimental.symbolic_shapes and sympy on first use (0.6 s of
            # every owner's start-up); a scalar root does not. It would broadcast, so the shape
            # check that call makes is made here.
            r, g = pairs[0]
            if r.shape != g.shape:
                raise RuntimeError(f"gradient of shape {list(g.shape)} for an output of shape {list(r.shape)}")
            (r * g).sum().backward()  # type: ignore[no-untyped-call]  # torch leaves it untyped
        elif pairs:
            torch.autograd.backward([r for r, _ in pairs], [g for _, g in pairs])
        s.backwarded.add(seg)
        out: list[Outgoing] = []
        for e in self._ins(seg, s):
            # An HE merge has one leaf, the sum S of all inputs, and dS/d(input_i) = 1, so dL/dS
            # is every input's gradient (for mean, the 1/n is already in the graph: x = S / n).
            leaf = s.aggregates[seg] if seg in s.aggregates else s.inputs[e]
            g = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
            g = self._protect_gradient(e, g, s)
            src = topo.edges[e].from_
            if topo.peer_of(src) == self.peer:
                s.grads[e] = g
            else:
                out.append(Outgoing(
                    kind="gradient", edge=e, to_peer=topo.peer_of(src),
                    tensor=outbound(topo.edges[e], g.detach().to("cpu"), "gradient").contiguous(), raw=None,
                    step=s.step, phase=s.phase,
                ))
        return out

    def _protect_gradient(self, edge: str, g: torch.Tensor, s: _Step) -> torch.Tensor:
        prot = self.topology.edges[edge].protections
        if prot.gradient_clip_norm is not None:
            g = clip_per_sample(g, prot.gradient_clip_norm)
        if prot.label_defence != "none":
            labels = {}
            if self.data is not None and s.rows is not None:
                labels = {k: v[s.rows] for k, v in self.data.labels.items()}
            g = self._defences[edge](g, labels, self._generator)
        return add_gaussian_noise(g, prot.gradient_noise_std, self._generator)
