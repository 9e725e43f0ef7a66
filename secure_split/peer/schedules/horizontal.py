"""`HorizontalSchedule`: many data owners, the `sequential` and `splitfed` schedules.

Roles: one coordinator (the label holder in vanilla, or the server of a U-shaped topology, whose
owners keep their labels) and N owners (`config.horizontal_owners`), each holding the same models
and its own rows. The coordinator runs one shared top (or middle) and serves the owners one step
at a time, in the order their activations arrive; each step uses only the edges of the owner
whose batch it is (`PeerExecutor.begin_step(peers=[owner])`).

Set-up, after the handshake:
- Ids. Where the coordinator holds labels it runs a two-party PSI with each owner
  (`rounds.psi`): the intersection is that owner's trainable rows and neither side learns the
  other's other ids. Where it holds none (U-shaped), each owner announces only its row count
  (`rows` in its HELLO) and steps name row positions, which the owner maps to its own ids: the
  server never sees an id.
- CKKS (splitfed with `average: he`): the first owner creates the context, gives the coordinator
  a public context (it cannot decrypt) and seals the secret context to every other owner,
  directly or relayed by the coordinator (`rounds.contexts`).

Per epoch (= round), weights move by the rounds of `rounds.averaging`:
- `sequential`: owners take turns in name order. Before an owner's turn the owner holding the
  latest weights seals them to it (hand-off), peer to peer or relayed by the coordinator, which
  cannot open them. After the last turn the latest weights go to every other owner, so all
  evaluate the same model.
- `splitfed`: every owner trains its batches at once; the coordinator serves their steps as they
  arrive. At round end the owners average their weights (sealed among them, or under CKKS at the
  coordinator). The coordinator never sees an owner's weights.
- Evaluation: every owner's test rows, in parallel, then the epoch-end barrier (checkpoints,
  signed audit heads exchanged between each owner and the coordinator, each owner's own metric
  sums reported).

Drop-out and rejoin: an owner whose connection stays down past the grace period, or that does
not answer within `peer_timeout_s`, is named (audit `peer_lost`, a progress event) and left out:
its pending steps are dropped, the round finishes with the others (splitfed) or the turn passes
to the next owner (sequential). A restarted owner (`peer run --resume`) opens a new session (its
HELLO is accepted as a restart), redoes its set-up (PSI, or the CKKS context the coordinator
relays again), receives the current weights sealed from a live owner at the next round start,
and takes part from then on.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from secure_split.config import horizontal_owners
from secure_split.engine.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from secure_split.engine.metrics import (
    StepMetrics,
    TaskMetrics,
    epoch_values,
    sum_task_metrics,
    task_metrics_from_meta,
    task_metrics_to_meta,
)
from secure_split.engine.schedule import epoch_batches, eval_batches, split_train_test
from secure_split.engine.tensors import from_wire
from secure_split.errors import (
    ConfigError,
    ConfigProblem,
    RemoteProtocolError,
    SecureSplitError,
    TrainingError,
)
from secure_split.peer.checkpoints import checkpoint_digest
from secure_split.peer.context import PeerContext, clip
from secure_split.peer.effects import Record
from secure_split.peer.rounds.averaging import (
    AVERAGED,
    LOADED,
    HeWeightSum,
    OwnerWeights,
    WeightRelay,
    WeightsUpdate,
)
from secure_split.peer.rounds.barrier import BarrierRound
from secure_split.peer.rounds.contexts import ContextPlan, ContextRound
from secure_split.peer.rounds.psi import PsiRound
from secure_split.peer.steps import StepRunner, ids_from_wire, ids_to_wire
from secure_split.protocol import Kind, Message

if TYPE_CHECKING:
    from secure_split.peer.node import PeerNode

__all__ = ["HorizontalSchedule"]

# Steps announced to one owner ahead of the one it works on (hides the step_begin round trip).
_WINDOW = 2
# Barrier reasons of the horizontal schedules (the epoch barriers keep theirs: start, epoch_end).
_HANDOFF, _AVERAGE, _LOST = "handoff", "average", "lost"
# A new run segment: an owner rejoined with a new process (its new run nonce joins the run id).
_RUN = "run"


@dataclass
class _Pending:
    owner: str
    phase: str
    ids: np.ndarray


class HorizontalSchedule:
    """A peer of a `sequential` or `splitfed` deployment (see the module docstring)."""

    def __init__(self, ctx: PeerContext, *, resume: bool = False) -> None:
        self.ctx = ctx
        self.me = ctx.me
        spec = ctx.deployment.spec
        # Where the coordinator holds no labels, steps name row positions rather than ids.
        self.ordinal = not any(seg.loss and seg.peer == spec.coordinator for seg in spec.segments.values())
        self.data, self.preprocessing = ctx.training_data(positions=self.ordinal)
        self.executor = ctx.executor(self.data, defer_update=True)
        self.checkpoint_dir = ctx.cfg.checkpoints_dir
        self.available_checkpoints = list_checkpoints(self.checkpoint_dir) if resume else []
        self.resume = resume
        self.owners = list(horizontal_owners(spec))
        self.coordinator = spec.coordinator
        self.is_coordinator = ctx.is_coordinator
        self.is_owner = self.me in self.owners
        self.schedule = spec.training.schedule
        self.relay = spec.training.handoff == "relay"
        self.he_average = self.schedule == "splitfed" and spec.training.average == "he"
        # Sealed weights go through the coordinator when relayed, and always under HE averaging
        # (the policy then allows weights only to and from the coordinator).
        self.via_coordinator = self.relay or self.he_average
        self.training_started = False
        self.lost: set[str] = set()
        self.joining: dict[str, bool] = {}  # restarted owner -> set-up finished
        self.round_id = 0
        self.epoch = 0
        self.shutdown: tuple[str, str] | None = None
        self.steps = StepRunner(self.executor, ctx.topology, self.me, limits=self.ctx.deployment.spec.limits)
        self.train_steps: list[StepMetrics] = []
        self.eval_steps: list[StepMetrics] = []
        self.history: list[dict[str, Any]] = []  # everyone's values, for display
        self.own_history: list[dict[str, Any]] = []  # what this peer computed itself (run_end)
        self.statement: dict[str, Any] = {}
        self.barrier: BarrierRound | None = None
        self.context: ContextRound | None = None
        # coordinator state
        self.owner_ids: dict[str, np.ndarray] = {}
        self.pending: dict[int, _Pending] = {}
        self.plans: dict[str, deque[tuple[int, str, np.ndarray]]] = {}
        self.next_step = 0
        self.steps_total = 0
        self.steps_done = 0
        self.hacks: dict[tuple[str, str], set[str]] = {}
        self.turns: list[str] = []  # sequential: owners in the order they last completed a turn
        self.psi: dict[str, PsiRound] = {}
        self._psi_taken: set[PsiRound] = set()
        self.he_sum: HeWeightSum | None = None
        self.weight_relay = WeightRelay(self.owners, enabled=self.via_coordinator)
        # owner state
        self.positions: np.ndarray | None = None
        self.weights: OwnerWeights | None = None

    # -- the Schedule protocol ------------------------------------------------------------------

    def attach(self, node: PeerNode) -> None:
        """The node this schedule sends through."""
        self.node = node

    def start_records(self) -> list[Record]:
        """What trains here: one `segment_commitment` entry per local segment."""
        return [Record("segment_commitment", r) for r in self.executor.segment_records()]

    def hello_meta(self) -> dict[str, Any]:
        """Checkpoints held, and an owner's row count where steps name row positions."""
        meta: dict[str, Any] = {"checkpoints": list(self.available_checkpoints)}
        if self.ordinal and self.is_owner and self.data is not None:
            meta["rows"] = len(self.data)
        return meta

    def prepare(self) -> None:
        """Nothing to check before the handshake."""

    def set_up(self) -> None:
        """CKKS context for HE averaging, then ids (PSI or row counts)."""
        try:
            self._set_up_he()
            self._align_ids()
        except _Shutdown:
            return
        if self.is_owner:
            keys = {n: p.transport_key for n, p in self.ctx.deployment.spec.peers.items()}
            self.weights = OwnerWeights(
                self.me, self.owners, self.coordinator, via_coordinator=self.via_coordinator,
                identity=self.ctx.identity, transport_keys=keys,
                he_context=self.context.context if self.context is not None else None,
                max_bytes=self.ctx.deployment.spec.limits.max_message_bytes)

    def run(self) -> tuple[str, str]:
        """Coordinate the rounds, or follow them; returns (status, reason)."""
        if self.shutdown is not None:
            return self.shutdown
        if self.is_coordinator:
            self._coordinate()
            return "ok", ""
        self.node.wait(lambda: self.shutdown is not None, lambda: "waiting for the coordinator's schedule",
                       lambda: [self.coordinator] if self.steps.idle else self.node.counterparties)
        last = self.history[-1]["values"] if self.history else {}
        self.node.result.metrics = {"history": self.history, "final": dict(last), "own": self.final_metrics()}
        return self.shutdown or ("failed", "")

    def on_message(self, msg: Message) -> bool:
        """Steps, weight rounds, set-up rounds, barriers (see the module docstring)."""
        kind = msg.kind
        if kind == Kind.HELLO:
            return True
        if kind == Kind.PSI:
            return self._on_psi(msg)
        if kind == Kind.HE_CONTEXT:
            return self._on_context(msg)
        if self.is_coordinator:
            return self._coordinator_message(msg)
        if kind == Kind.BARRIER and msg.meta.get("reason") == _LOST:
            gone = str(msg.meta.get("to", ""))
            self._lose(gone, f"the coordinator reported '{gone}' dropped")
            return True
        return self._owner_message(msg)

    def on_peer_lost(self, peer: str, reason: str, *, timed_out: bool) -> bool:
        """A dropped connection: the coordinator carries on without an owner, an owner without
        another owner; nobody without the coordinator. Silence past the timeout: the coordinator
        carries on without silent owners once training runs; during set-up every owner must be
        there, and an owner stops."""
        if peer == self.coordinator or peer not in self.owners or peer == self.me:
            return False
        if timed_out and not (self.is_coordinator and self.training_started):
            return False
        self._lose(peer, reason)
        return True

    def on_peer_restarted(self, peer: str) -> None:
        """A restarted owner: bring it up to date (or refuse a restarted CKKS key holder)."""
        if self.is_coordinator and peer == self.owners[0] and self.he_average:
            # A restarted key holder would bring a new CKKS key: its ciphertexts would not add up
            # with the others'. The others keep averaging under the old key without it.
            if peer not in self.lost:
                self._lose(peer, "the CKKS key holder restarted")
            self.node.refuse(peer, f"'{peer}' holds the CKKS key of this run and cannot rejoin it after a restart "
                                   "(it would bring a new key); the others go on without it; restart the whole run "
                                   "to bring it back", "rejoin_refused", kind=Kind.REFUSE)
            return
        if self.is_coordinator and peer in self.owners:
            if peer not in self.lost and self.training_started:
                # Restarted before we noticed it was gone: what it had scheduled died with it.
                self._lose(peer, "restarted with a new session")
            self.lost.discard(peer)
            self.joining[peer] = False
            self.node.progress({"event": "owner_joined", "owner": peer})
            if self.he_average and self.relay and self.context is not None:
                self.node.apply(self.context.forward_again(peer))
            if self.ordinal:
                self._set_rows(peer)
                self.joining[peer] = True
            else:
                self._start_psi(peer)
        elif self.is_owner and peer in self.owners:
            self.lost.discard(peer)
            if self.he_average and not self.relay and self.context is not None:
                self.node.apply(self.context.send_secret(peer))

    def on_remote_error(self, msg: Message) -> bool:
        """One owner's failure costs the run that owner, as a drop-out does (coordinator)."""
        sender = msg.binding.sender
        if self.is_coordinator and self.training_started and sender in self.owners:
            self._lose(sender, f"'{sender}' reported {msg.meta.get('code', 'an error')!s}: {msg.meta.get('reason', '')!s}")
            return True
        return False

    def on_receipt(self, sender: str, key: int) -> None:
        """Receipts are waited on by `node.exchange_heads`."""

    def reachable(self, peer: str) -> bool:
        """Lost owners are not told anything more."""
        return peer not in self.lost

    def working_state(self) -> str:
        """The state this peer reports while it runs (`peer.metrics.PEER_STATES`)."""
        return "training"

    def close_peers(self) -> list[str]:
        """Owners close with the coordinator; the coordinator with every owner still taking part."""
        return [o for o in self.owners if o not in self.lost] if self.is_coordinator else [self.coordinator]

    def tell_others_we_stopped(self, reason: str) -> None:
        """The coordinator ends the run for everyone; an owner tells the coordinator why."""
        if self.is_coordinator:
            self.node.broadcast_shutdown("failed", f"'{self.me}' stopped: {reason}")
        else:
            self.node.notify_failure(self.coordinator, reason)

    def final_metrics(self) -> dict[str, float]:
        """The last epoch's metrics this peer computed itself."""
        last = self.own_history[-1]["values"] if self.own_history else {}
        return {k: float(v) for k, v in last.items()}

    # -- liveness ---------------------------------------------------------------------------------

    def _live(self) -> list[str]:
        """Owners taking part now (not lost, not still joining)."""
        return [o for o in self.owners if o not in self.lost and o not in self.joining]

    def _lose(self, peer: str, reason: str) -> None:
        """Carry on without `peer` (an owner)."""
        if peer in self.lost:
            return
        self.lost.add(peer)
        self.joining.pop(peer, None)
        self.node.record("peer_lost", counterparty=peer, reason=clip(reason))
        if not self.is_coordinator:
            if self.weights is not None:
                self._load(self.weights.member_lost(peer, self.executor.weights_vector()))
            return
        self.node.progress({"event": "owner_lost", "owner": peer, "reason": reason})
        self._forget_steps(peer)
        for o in self._live():
            try:
                self.node.send(o, Kind.BARRIER, step=self.epoch + 1, meta={"epoch": self.epoch, "reason": _LOST, "to": peer})
            except SecureSplitError as exc:  # pragma: no cover - another owner going down too
                self.node.record("error", reason=f"could not tell '{o}' that '{peer}' dropped: {exc}", error=type(exc).__name__)

    def _forget_steps(self, peer: str) -> None:
        """Coordinator: drop everything scheduled for `peer` (lost or restarted)."""
        self.psi.pop(peer, None)
        self.plans.pop(peer, None)
        for step in [s for s, p in self.pending.items() if p.owner == peer]:
            del self.pending[step]
            self.steps_done += 1
            if step == self.steps.current_step:
                self.steps.abort()
        self.node.forget_later(peer)

    # -- set-up -------------------------------------------------------------------------------------

    def _wait_setup(self, ready: Any, what: str, from_peers: list[str]) -> None:
        self.node.wait(lambda: self.shutdown is not None or ready(), lambda: what, lambda: from_peers)
        if self.shutdown is not None:
            raise _Shutdown

    def _set_up_he(self) -> None:
        if not self.he_average:
            return
        kh = self.owners[0]
        spec = self.ctx.deployment.spec
        plan = ContextPlan("", kh, (self.coordinator,), tuple(self.owners[1:]), self.coordinator if self.relay else None)
        keys = {n: p.transport_key for n, p in spec.peers.items()}
        self.context = ContextRound(self.me, plan, params=self.ctx.policy.requirements.ckks.params(),
                                    identity=self.ctx.identity, transport_keys=keys,
                                    max_bytes=spec.limits.max_message_bytes)
        self.node.apply(self.context.start())
        via = self.coordinator if self.relay and self.me != self.coordinator else kh
        self._wait_setup(lambda: self.context is not None and self.context.context is not None,
                         f"receiving the CKKS context from '{kh}'", [via])

    def _on_context(self, msg: Message) -> bool:
        if self.context is None:
            return False  # our own set-up has not reached it yet
        self.node.apply(self.context.on_message(msg))
        return True

    def _own_ids(self) -> list[int]:
        assert self.ctx.site is not None
        return [int(x) for x in self.ctx.site.ids.tolist()]

    def _start_psi(self, owner: str) -> None:
        rnd = PsiRound(self.me, [self.me, owner], self._own_ids(), deployment_hash=self.ctx.deployment.hash,
                       max_points=self.ctx.deployment.spec.limits.max_psi_points)
        self.psi[owner] = rnd
        self.node.apply(rnd.start())

    def _on_psi(self, msg: Message) -> bool:
        sender = msg.binding.sender
        if self.is_coordinator:
            rnd = self.psi.get(sender)
            if rnd is None:
                if sender in self.owner_ids:
                    raise RemoteProtocolError(f"'{sender}' sent a PSI message outside its set-up")
                return False  # our own set-up has not started this owner's PSI yet
            self.node.apply(rnd.on_message(sender, bytes(msg.blob)))
            result = rnd.result
            if result is not None and rnd not in self._psi_taken:
                self._psi_taken.add(rnd)
                self.owner_ids[sender] = result.ids
                if sender in self.joining:
                    self.joining[sender] = True
            if rnd.finished:
                del self.psi[sender]
            return True
        rnd = self.psi.get(self.coordinator)
        if rnd is None:
            return False
        self.node.apply(rnd.on_message(sender, bytes(msg.blob)))
        return True

    def _set_rows(self, owner: str) -> None:
        rows = self.node.hello_meta_of(owner).get("rows")
        if not isinstance(rows, int) or rows < 2:
            raise RemoteProtocolError(f"owner '{owner}' announced {rows!r} rows in its HELLO; it needs at least 2")
        self.owner_ids[owner] = np.arange(rows, dtype=np.int64)

    def _align_ids(self) -> None:
        if self.is_coordinator:
            if self.ordinal:
                for o in self.owners:
                    self._set_rows(o)
                return
            if self.data is None:
                raise ConfigError(ConfigProblem(str(self.ctx.cfg.path), "data", "the coordinator holds the labels, so it needs its data file (ids, labels)"))
            for o in self.owners:
                self._start_psi(o)
            self._wait_setup(lambda: all(o in self.owner_ids for o in self.owners),
                             "aligning sample ids with each owner by PSI",
                             [o for o in self.owners if o not in self.owner_ids])
            for o, ids in self.owner_ids.items():
                if ids.shape[0] < 2:
                    self._lose(o, f"PSI: '{o}' holds only {ids.shape[0]} labelled sample(s)")
            return
        if self.data is None:
            raise ConfigError(ConfigProblem(str(self.ctx.cfg.path), "data", "an owner needs its data file (ids, features)"))
        if self.ordinal:
            self.positions = np.asarray(sorted(self._own_ids()), dtype=np.int64)
            return
        own = self._own_ids()
        rnd = PsiRound(self.me, [self.coordinator, self.me], own, deployment_hash=self.ctx.deployment.hash,
                       max_points=self.ctx.deployment.spec.limits.max_psi_points)
        self.psi[self.coordinator] = rnd
        self.node.apply(rnd.start())
        self._wait_setup(lambda: rnd.result is not None, "aligning sample ids with the coordinator by PSI",
                         [self.coordinator])
        result = rnd.result
        assert result is not None
        if result.ids.shape[0] < 2:
            raise TrainingError(f"PSI: the coordinator labels only {result.ids.shape[0]} of this owner's samples; nothing to train on")
        self.data, self.preprocessing = self.ctx.training_data(result.ids)
        self.executor = self.ctx.executor(self.data, defer_update=True)
        self.steps = StepRunner(self.executor, self.ctx.topology, self.me,
                                limits=self.ctx.deployment.spec.limits)

    # -- an owner's messages ------------------------------------------------------------------------

    def _owner_message(self, msg: Message) -> bool:
        kind = msg.kind
        if kind == Kind.STEP_BEGIN:
            if not self.steps.idle:
                return False
            self.epoch = _meta_int(msg, "epoch", self.epoch)
            ids = ids_from_wire(msg.tensors[0])
            if self.positions is not None:
                if ids.size == 0 or ids.min() < 0 or ids.max() >= self.positions.shape[0]:
                    raise RemoteProtocolError(f"step {msg.binding.step} names row positions outside this owner's {self.positions.shape[0]} rows")
                ids = self.positions[ids]
            self._begin(msg.binding.step, str(msg.meta.get("phase", "train")), ids)
            return True
        if kind == Kind.BARRIER and msg.meta.get("reason") in (_HANDOFF, _AVERAGE):
            if not self.steps.idle:
                return False
            self._on_round_barrier(msg)
            return True
        if kind == Kind.ENCRYPTED_WEIGHTS:
            if not self.steps.idle:
                return False
            assert self.weights is not None
            effects, update = self.weights.on_weights(msg, self.executor.weights_vector)
            self.node.apply(effects)
            self._load(update)
            return True
        if kind in (Kind.ACTIVATION, Kind.GRADIENT):
            if not self.steps.verdict(msg):
                return False
            self.node.apply(self.steps.take(msg))
            self._finish_if_complete()
            return True
        if kind == Kind.BARRIER:
            if not self.steps.idle:
                return False
            self._on_epoch_barrier(msg)
            return True
        if kind == Kind.SHUTDOWN:
            if not self.steps.idle and msg.meta.get("status") == "ok":
                return False
            self.shutdown = (str(msg.meta.get("status", "failed")), str(msg.meta.get("reason", "")))
            return True
        raise RemoteProtocolError(f"'{msg.binding.sender}' sent {kind.value}, which '{self.me}' does not expect")

    def _on_round_barrier(self, msg: Message) -> None:
        assert self.weights is not None
        reason, phase = str(msg.meta.get("reason", "")), str(msg.meta.get("phase", ""))
        self.epoch = _meta_int(msg, "epoch", self.epoch)
        if reason == _HANDOFF:
            self.node.apply(self.weights.hand_to(str(msg.meta.get("to", "")), phase, self.executor.weights_vector()))
            return
        members = msg.meta.get("members")
        effects, update = self.weights.open_average(phase, [str(m) for m in members] if isinstance(members, list) else [],
                                                    self.executor.weights_vector())
        self.node.apply(effects)
        self._load(update)

    def _load(self, update: WeightsUpdate | None) -> None:
        if update is None:
            return
        self.executor.load_weights_vector(update.weights)
        self.node.apply([update.record])
        reason, phase = update.ack
        self.node.send(self.coordinator, Kind.BARRIER_ACK, step=self.epoch + 1,
                       meta={"epoch": self.epoch, "reason": reason, "phase": phase})

    def _begin(self, step: int, phase: str, ids: np.ndarray, *, peers: list[str] | None = None) -> None:
        self.node.apply(self.steps.begin(step, phase, ids, peers=peers))
        self._finish_if_complete()

    def _finish_if_complete(self) -> StepMetrics | None:
        phase = self.steps.current_phase
        step = self.steps.current_step
        metrics = self.steps.finish_if_complete()
        if metrics is None:
            return None
        (self.train_steps if phase == "train" else self.eval_steps).append(metrics)
        if self.is_coordinator and step is not None:
            self._step_done(step)
        return metrics

    # -- the coordinator's messages -------------------------------------------------------------------

    def _coordinator_message(self, msg: Message) -> bool:
        kind, sender = msg.kind, msg.binding.sender
        if kind == Kind.ENCRYPTED_WEIGHTS and "to" in msg.meta:
            self.node.apply(self.weight_relay.relay(msg, lambda o: o in self.lost))
            return True
        if kind == Kind.ENCRYPTED_WEIGHTS:
            if self.he_sum is None:
                raise RemoteProtocolError(f"'{sender}' sent encrypted weights outside an averaging round")
            self.he_sum.on_part(msg)
            return True
        if kind == Kind.BARRIER_ACK and msg.meta.get("reason") in (LOADED, AVERAGED):
            self.hacks.setdefault((str(msg.meta["reason"]), str(msg.meta.get("phase", ""))), set()).add(sender)
            return True
        if kind == Kind.BARRIER_ACK:
            if self.barrier is None or not self.barrier.on_ack(msg):
                raise RemoteProtocolError(f"'{sender}' acknowledged a barrier that is not open")
            self.node.record_reported_metrics(msg)
            return True
        if kind == Kind.ACTIVATION:
            return self._coordinator_activation(msg)
        if kind == Kind.GRADIENT:
            if not self.steps.verdict(msg):
                return False
            self.node.apply(self.steps.take(msg))
            self._finish_if_complete()
            return True
        raise RemoteProtocolError(f"'{sender}' sent {kind.value}, which '{self.me}' does not expect")

    def _coordinator_activation(self, msg: Message) -> bool:
        step, sender = msg.binding.step, msg.binding.sender
        info = self.pending.get(step)
        if info is None or info.owner != sender:
            if sender in self.lost:
                return True  # a lost owner's late step
            raise RemoteProtocolError(f"'{sender}' sent an activation for step {step}, which is not one of its steps")
        if self.steps.current_step is not None and self.steps.current_step != step:
            return False  # another owner's step is running here; serve this one next
        try:
            if self.steps.idle:
                self.node.apply(self.steps.begin(step, info.phase, info.ids, peers=[sender]))
            self.node.apply(self.steps.sends(self.executor.on_activation(msg.edge, from_wire(msg.tensors[0]))))
        except RemoteProtocolError as exc:
            # One owner's bad tensor costs that owner its step, not the run.
            self.steps.abort()
            self.node.record("error", error="RemoteProtocolError", reason=clip(f"step {step} of '{sender}' dropped: {exc}"))
            self.node.refuse(sender, f"refused by {self.me}: {exc}", "protocol")
            self._step_done(step)
            return True
        self._finish_if_complete()
        return True

    def _step_done(self, step: int) -> None:
        info = self.pending.pop(step, None)
        if info is None:
            return
        self.steps_done += 1
        if info.phase == "train":
            last = self.steps.last_metrics
            m = next(iter(last.tasks.values()), None) if last is not None else None
            loss = m.loss_sum / max(1, m.count) if m is not None else None
            self.node.progress({"event": "step", "epoch": self.epoch, "epochs": self.ctx.deployment.spec.training.epochs,
                                "step": self.steps_done, "steps": self.steps_total, "loss": loss, "owner": info.owner})
        self._feed(info.owner)

    def _feed(self, owner: str) -> None:
        plan = self.plans.get(owner)
        while plan and sum(p.owner == owner for p in self.pending.values()) < _WINDOW:
            step, phase, ids = plan.popleft()
            self.pending[step] = _Pending(owner, phase, ids)
            self.node.send(owner, Kind.STEP_BEGIN, step=step, meta={"epoch": self.epoch, "phase": phase},
                           tensors=(ids_to_wire(ids),))
        if plan is not None and not plan:
            del self.plans[owner]

    # -- the coordinator's rounds ---------------------------------------------------------------------

    def _run_steps(self, phase: str, batches: dict[str, list[np.ndarray]]) -> None:
        """Run every owner's batches, each owner in order, owners in parallel."""
        self.plans = {}
        for owner, bs in batches.items():
            if owner in self._live() and bs:
                q: deque[tuple[int, str, np.ndarray]] = deque()
                for b in bs:
                    self.next_step += 1
                    q.append((self.next_step, phase, np.asarray(b, dtype=np.int64)))
                self.plans[owner] = q
        if phase == "train":
            self.steps_total, self.steps_done = sum(len(q) for q in self.plans.values()), 0
        for owner in list(self.plans):
            self._feed(owner)
        self.node.wait(
            lambda: not self.plans and not self.pending and self.steps.idle,
            lambda: f"running {phase} steps of {', '.join(sorted({p.owner for p in self.pending.values()})) or 'the owners'}",
            lambda: sorted({p.owner for p in self.pending.values()}),
        )

    def _wait_acks(self, reason: str, phase: str, expect: list[str], what: str, *, source: str | None = None) -> None:
        """Wait for `reason` acks of round `phase` from the live owners among `expect` (from none
        once `source`, the owner whose weights they wait for, is lost)."""
        def missing() -> list[str]:
            if source is not None and source in self.lost:
                return []
            return sorted((set(expect) & set(self._live())) - self.hacks.get((reason, phase), set()))

        self.node.wait(lambda: not missing(), lambda: what, missing)
        self.hacks.pop((reason, phase), None)

    def _handoff(self, src: str, dsts: list[str]) -> bool:
        """Have owner `src` seal its weights to each of `dsts`; wait until they loaded them.

        Returns:
            False if `src` was lost before every live receiver had its weights.
        """
        dsts = [d for d in dsts if d != src and d not in self.lost]
        if src in self.lost:
            return False
        if not dsts:
            return True
        self.round_id += 1
        phase = f"h{self.round_id}"
        for d in dsts:
            self.node.send(src, Kind.BARRIER, step=self.epoch + 1,
                           meta={"epoch": self.epoch, "reason": _HANDOFF, "to": d, "phase": phase})
        self._wait_acks(LOADED, phase, dsts, f"'{src}' handing its weights to {', '.join(dsts)}", source=src)
        return src not in self.lost

    def _hand_latest(self, dsts: list[str]) -> None:
        """Sequential: give `dsts` the weights of the owner that completed the latest turn and is
        still live (if it drops while handing them over, the one before it)."""
        while True:
            src = next((h for h in reversed(self.turns) if h in self._live()), None)
            if src is None or self._handoff(src, dsts):
                return

    def _average(self) -> None:
        """SplitFed round end: the live owners average their weights (sealed, or under CKKS here)."""
        members = self._live()
        if len(members) < 2:
            return
        self.round_id += 1
        phase = f"a{self.round_id}"
        if self.he_average:
            assert self.context is not None and self.context.context is not None
            self.he_sum = HeWeightSum(phase, members, self.context.context,
                                      max_bytes=self.ctx.deployment.spec.limits.max_message_bytes)
        for o in members:
            self.node.send(o, Kind.BARRIER, step=self.epoch + 1,
                           meta={"epoch": self.epoch, "reason": _AVERAGE, "phase": phase, "members": members})
        if self.he_sum is not None:
            he_sum = self.he_sum

            def live(o: str) -> bool:
                return o not in self.lost

            self.node.wait(lambda: not he_sum.missing(live), lambda: "collecting the owners' encrypted weights",
                           lambda: he_sum.missing(live))
            self.he_sum = None
            self.node.apply(he_sum.total(live))
            members = list(he_sum.parts)
        self._wait_acks(AVERAGED, phase, members, "waiting for the owners to average their weights")

    def _admit_joiners(self) -> None:
        """Round start: restarted owners whose set-up is done get the current weights."""
        ready = [o for o, done in self.joining.items() if done]
        if not ready:
            return
        live = self._live()
        for o in ready:
            del self.joining[o]
        # A new process took part: a new run segment, its nonce in the run id.
        meta = self.node.announce_run()
        for o in [*live, *ready]:
            self.node.send(o, Kind.BARRIER, step=self.epoch + 1, meta={**meta, "epoch": self.epoch, "reason": _RUN})
        if self.schedule == "sequential":
            self._hand_latest(ready)
        elif live:
            self._handoff(live[0], ready)
        for o in ready:
            self.node.progress({"event": "owner_joined", "owner": o, "epoch": self.epoch})

    def _coordinate(self) -> None:
        training = self.ctx.deployment.spec.training
        splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # owner -> train, test ids (joiners added later)
        resume_epoch = self._resume_epoch()
        self.training_started = True
        self._barrier(resume_epoch, "start")
        timing: list[dict[str, float]] = []
        for epoch in range(resume_epoch + 1, training.epochs):
            self.epoch = epoch
            self.next_step = max(self.next_step, epoch * 1_000_000)
            t0 = time.perf_counter()
            self._admit_joiners()
            self._require_owners()
            for o in self.owner_ids:
                if o not in splits:
                    splits[o] = split_train_test(self.owner_ids[o], training.test_fraction, training.seed)

            def train_batches(o: str, epoch: int = epoch) -> list[np.ndarray]:
                return epoch_batches(splits[o][0], training.batch_size, training.seed, epoch, training.max_steps_per_epoch)

            if self.schedule == "sequential":
                for o in self.owners:
                    if o not in self._live():
                        continue
                    self._hand_latest([o])
                    self._run_steps("train", {o: train_batches(o)})
                    if o not in self.lost:
                        self.turns = [t for t in self.turns if t != o] + [o]
                self._hand_latest(self._live())
            else:
                self._run_steps("train", {o: train_batches(o) for o in self._live()})
                self._average()
            t1 = time.perf_counter()
            self._require_owners()
            self._run_steps("eval", {o: eval_batches(splits[o][1], training.batch_size) for o in self._live()})
            t2 = time.perf_counter()
            values = self._barrier(epoch, "epoch_end")
            t3 = time.perf_counter()
            timing.append({"epoch": epoch, "train_s": t1 - t0, "eval_s": t2 - t1, "barrier_s": t3 - t2,
                           "owners": len(self._live())})
            self.history.append({"epoch": epoch, "values": values})
            self.node.result.epochs_done = epoch + 1
            self.node.progress({"event": "epoch", "epoch": epoch, "epochs": training.epochs, "values": values,
                                "owners": len(self._live()), "lost": sorted(self.lost)})
        last = self.history[-1]["values"] if self.history else {}
        self.node.result.metrics = {"history": self.history, "final": dict(last), "own": self.final_metrics(), "timing": timing,
                                    "lost": sorted(self.lost)}
        self.node.broadcast_shutdown("ok", "training finished")

    def _require_owners(self) -> None:
        if not self._live():
            raise TrainingError(
                f"every owner dropped out ({', '.join(sorted(self.lost)) or 'none joined'}); nothing left to train "
                "with: see their logs, then restart the run"
            )

    def _resume_epoch(self) -> int:
        """The newest checkpoint every peer has (-1: none, or not resuming)."""
        if not self.resume:
            return -1
        common = set(self.available_checkpoints)
        for p in self.node.counterparties:
            theirs = self.node.hello_meta_of(p).get("checkpoints")
            common &= {int(x) for x in theirs if isinstance(x, int)} if isinstance(theirs, list) else set()
        return max(common) if common else -1

    def _barrier(self, epoch: int, reason: str) -> dict[str, float]:
        """An epoch barrier with the live owners; adds up everyone's metric sums (for display:
        each owner's own values are signed and recorded as that owner's). The start barrier
        announces the run (run id and every peer's run nonce)."""
        meta = self.node.announce_run() if reason == "start" else {}
        barrier = self.barrier = BarrierRound(epoch, reason, self._live(), meta=meta)
        self.node.apply(barrier.open())
        own_train, own_eval = self._barrier_local(epoch, reason)

        def live(o: str) -> bool:
            return o in self._live()

        self.node.wait(lambda: barrier.done(live), lambda: f"waiting for every owner at the {reason} barrier of epoch {epoch}",
                       lambda: barrier.missing(live))
        self.barrier = None
        reports = list(barrier.reports.values())
        train = sum_task_metrics([own_train, *(task_metrics_from_meta(r.train) for r in reports)])
        evaluation = sum_task_metrics([own_eval, *(task_metrics_from_meta(r.eval) for r in reports)])
        return epoch_values(train, evaluation)

    # -- both roles -----------------------------------------------------------------------------------

    def _barrier_local(self, epoch: int, reason: str) -> tuple[dict[str, TaskMetrics], dict[str, TaskMetrics]]:
        """Checkpoint, sign, exchange heads (owners with the coordinator only); own metric sums."""
        ckpt = self.checkpoint_dir
        if reason == "start":
            if epoch >= 0:
                load_checkpoint(ckpt, epoch, self.executor, preprocessing=self.preprocessing)
                self.node.record("checkpoint_resumed", epoch=epoch, digest=checkpoint_digest(ckpt, epoch))
        elif reason == "epoch_end":
            save_checkpoint(ckpt, epoch=epoch, executor=self.executor, preprocessing=self.preprocessing, meta={
                "deployment": self.ctx.deployment.hash, "peer": self.me, "policy": self.ctx.policy.hash})
            self.node.record("checkpoint_saved", epoch=epoch, digest=checkpoint_digest(ckpt, epoch))
        if self.is_coordinator:  # an owner lost (or restarted) meanwhile is not waited for
            self.node.exchange_heads(epoch + 1, self._live(), f"{reason} barrier, epoch {epoch}",
                                     live=lambda o: o in self._live())
        else:
            self.node.exchange_heads(epoch + 1, [self.coordinator], f"{reason} barrier, epoch {epoch}")
        if reason != "epoch_end":
            return {}, {}
        train, evaluation = sum_task_metrics(self.train_steps), sum_task_metrics(self.eval_steps)
        self.train_steps, self.eval_steps = [], []
        own = epoch_values(train, evaluation)
        self.own_history.append({"epoch": epoch, "values": own})
        self.statement = self.node.state_metrics(epoch, own)
        return train, evaluation

    def _on_epoch_barrier(self, msg: Message) -> None:
        epoch = _meta_int(msg, "epoch", -1)
        reason = str(msg.meta.get("reason", "epoch_end"))
        self.epoch = max(self.epoch, epoch)
        if reason in ("start", _RUN):
            self.node.bind_announced_run(msg)
            if reason == _RUN:
                return
        train, evaluation = self._barrier_local(epoch, reason)
        if reason == "epoch_end":
            values = epoch_values(train, evaluation)
            self.history.append({"epoch": epoch, "values": values})
            self.node.result.epochs_done = epoch + 1
            self.node.progress({"event": "epoch", "epoch": epoch, "epochs": self.ctx.deployment.spec.training.epochs,
                                "values": values})
        statement = self.statement if reason == "epoch_end" else {}
        self.node.send(self.coordinator, Kind.BARRIER_ACK, step=epoch + 1, meta={
            **statement, "epoch": epoch, "train": task_metrics_to_meta(train), "eval": task_metrics_to_meta(evaluation)})


class _Shutdown(Exception):
    """The coordinator ended the run while this peer was still setting up."""


def _meta_int(msg: Message, key: str, default: int) -> int:
    value = msg.meta.get(key, default)
    return value if isinstance(value, int) else default
