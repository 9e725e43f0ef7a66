"""`SyncSchedule`: every topology of one run (vanilla, U-shaped, multi-hop, multi-task, vertical,
vertical-HE), at the coordinator and at every follower.

Set-up, after the handshake: CKKS contexts for each HE merge (`rounds.contexts`), then the ids of
a vertical deployment aligned by PSI (`rounds.psi`); every party then holds exactly the
intersection.

The coordinator drives: a start barrier (every peer loads the checkpoint all share, when
resuming), then per epoch every training step and every evaluation step, then an epoch-end
barrier at which every peer saves its checkpoint, signs its audit head, exchanges signed heads
with its counterparties and reports its own metric sums. Every peer learns each step's batch (its
sample ids) from a `step_begin` of the coordinator, sent ahead (`peer.plan`: training steps in
chunks of up to `PLAN_CHUNK_STEPS` per message, evaluation steps one by one); a follower keeps
them (`StepPlan`) and begins each step when it can. Followers react to what arrives.

Step order: one step at a time (`StepRunner`); a message for a later step waits in the node's
bounded queue; `training.pipeline_depth` (k; `training.overlap` is k = 2) lets a peer without a
loss have up to k training steps in flight (`engine.pipeline`). The coordinator runs one step at
a time.
The key holder of an HE merge answers decryption requests at once, whatever step it is in.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np

from secure_split.crypto.he import CkksContext
from secure_split.engine.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from secure_split.engine.executor import PeerExecutor
from secure_split.engine.metrics import (
    StepMetrics,
    TaskMetrics,
    epoch_values,
    sum_task_metrics,
    task_metrics_from_meta,
    task_metrics_to_meta,
)
from secure_split.engine.schedule import epoch_batches, eval_batches, split_train_test
from secure_split.errors import ConfigError, ConfigProblem, PeerTimeout, RemoteProtocolError, TrainingError
from secure_split.peer.checkpoints import checkpoint_digest, load_alignment, save_alignment
from secure_split.peer.context import PeerContext, clip
from secure_split.peer.effects import Record
from secure_split.peer.plan import PLAN_CHUNK_STEPS, Announcement, Announcer, StepPlan
from secure_split.peer.rounds.barrier import BarrierRound
from secure_split.peer.rounds.contexts import ContextPlan, ContextRound
from secure_split.peer.rounds.he_merge import HeKeyHolder
from secure_split.peer.rounds.psi import PsiRound
from secure_split.peer.schedule import Rollback
from secure_split.peer.steps import STEP_TENSOR_KINDS, StepRunner, ids_to_wire
from secure_split.policy import he_key_holder, psi_parties
from secure_split.protocol import Kind, Message

if TYPE_CHECKING:
    from secure_split.peer.node import PeerNode

__all__ = ["SyncSchedule"]


class _ShutdownDuringSetup(Exception):
    """The coordinator ended the run while this peer was still setting up (PSI, CKKS context)."""


class SyncSchedule:
    """A peer of a `sync` deployment (see the module docstring).

    Args:
        ctx: the peer's loaded files.
        resume: continue from the last checkpoint all peers share.
    """

    def __init__(self, ctx: PeerContext, *, resume: bool = False) -> None:
        self.ctx = ctx
        self.me = ctx.me
        spec = ctx.deployment.spec
        self.data, self.preprocessing = ctx.training_data()
        self.executor = self._new_executor()
        self.checkpoint_dir = ctx.cfg.checkpoints_dir
        self.available_checkpoints = list_checkpoints(self.checkpoint_dir) if resume else []
        self.resume = resume
        self.he_key_holders = {s: he_key_holder(ctx.deployment, s, ctx.policy) for s in ctx.topology.he_segments}
        self.contexts: list[ContextRound] = []
        self.key_holder: HeKeyHolder | None = None
        self.psi: PsiRound | None = None
        self.steps: StepRunner | None = None
        self.shutdown: tuple[str, str] | None = None
        self.barrier: BarrierRound | None = None
        self.train_steps: list[StepMetrics] = []
        self.eval_steps: list[StepMetrics] = []
        self.history: list[dict[str, Any]] = []  # every peer's values, for display
        self.own_history: list[dict[str, Any]] = []  # what this peer computed itself (run_end)
        self.statement: dict[str, Any] = {}
        self.epochs_done = 0
        self.epoch = 0
        # Rejoin after a crash (limits.rejoin_grace_s): who is gone since when, who came back.
        self.training = False
        self.lost: dict[str, float] = {}
        self.restarted: set[str] = set()
        self.completed_epoch = -1
        self.last_step_seen = 0
        # the steps announced to this follower and not begun yet (peer.plan)
        self.plan = StepPlan(PLAN_CHUNK_STEPS + spec.limits.step_window + 1, coordinator=spec.coordinator, me=self.me)
        del spec

    def _new_executor(self) -> PeerExecutor:
        spec = self.ctx.deployment.spec
        return self.ctx.executor(self.data, defer_update=True, pipeline_depth=spec.training.depth)

    # -- the Schedule protocol ------------------------------------------------------------------

    def attach(self, node: PeerNode) -> None:
        """The node this schedule sends through."""
        self.node = node

    def start_records(self) -> list[Record]:
        """What trains here: one `segment_commitment` entry per local segment."""
        return [Record("segment_commitment", r) for r in self.executor.segment_records()]

    def hello_meta(self) -> dict[str, Any]:
        """The checkpoints this peer holds (the coordinator resumes, or rolls back, to the newest
        all share) and the highest step it has seen (a new segment's steps go above it)."""
        held = list_checkpoints(self.checkpoint_dir) if (self.resume or self.training) else []
        return {"checkpoints": held, "last_step": self.last_step_seen}

    def prepare(self) -> None:
        """Nothing to check before the handshake."""

    def set_up(self) -> None:
        """CKKS contexts for the HE merges, then PSI id alignment (vertical)."""
        try:
            self._set_up_he()
            self._align_ids()
        except _ShutdownDuringSetup:
            return
        self._new_steps()

    def _new_steps(self) -> None:
        contexts: dict[str, CkksContext] = {r.plan.scope: r.context for r in self.contexts if r.context is not None}
        self.steps = StepRunner(self.executor, self.ctx.topology, self.me, he_contexts=contexts,
                                he_key_holders=self.he_key_holders, limits=self.ctx.deployment.spec.limits)
        if self.key_holder is not None:
            mine = {r.plan.scope: r.context for r in self.contexts if r.plan.key_holder == self.me and r.context}
            self.key_holder = HeKeyHolder(dict(self.key_holder.holders), mine,
                                          max_bytes=self.ctx.deployment.spec.limits.max_message_bytes)

    def run(self) -> tuple[str, str]:
        """Coordinate the run, or follow the coordinator; returns (status, reason)."""
        if self.shutdown is not None:  # the coordinator ended the run before we were set up
            return self.shutdown
        if self.ctx.is_coordinator:
            self._coordinate()
            return "ok", ""
        coordinator = self.ctx.deployment.spec.coordinator
        while True:
            try:
                self.node.wait(
                    lambda: self.shutdown is not None,
                    lambda: "waiting for the coordinator's schedule",
                    lambda: [coordinator] if self._steps.idle else self.node.counterparties,
                )
                break
            except Rollback as rb:
                # A start barrier during the run: whatever this peer waited for inside (a step, a
                # barrier's heads) is over; the barrier is taken here, outside those waits.
                assert rb.barrier is not None
                self._drop_run_state()
                self._on_barrier(rb.barrier)
        shown = self.history[-1]["values"] if self.history else {}
        self.node.result.metrics = {"history": self.history, "final": dict(shown), "own": self.final_metrics()}
        return self.shutdown or ("failed", "")

    def on_message(self, msg: Message) -> bool:
        """Steps, barriers, set-up rounds and the shutdown (see the module docstring)."""
        kind = msg.kind
        if msg.binding.sender in self.lost and self.node.connected(msg.binding.sender):
            self._came_back(msg.binding.sender)
        if kind == Kind.HELLO:
            return True  # a counterparty's HELLO after the handshake: nothing to do for one run
        if kind == Kind.PSI:
            return self._on_psi(msg)
        if kind == Kind.HE_CONTEXT:
            return self._on_context(msg)
        if kind == Kind.MASKED_AGGREGATE and self.key_holder is not None \
                and self.key_holder.keys(str(msg.meta.get("segment", ""))):
            self.node.apply(self.key_holder.on_masked(msg.binding.sender, msg.binding.step,
                                                      str(msg.meta.get("segment", "")), bytes(msg.blob)))
            return True
        if kind == Kind.BARRIER_ACK and self.ctx.is_coordinator:
            if self.barrier is None or not self.barrier.on_ack(msg):
                raise RemoteProtocolError(f"'{msg.binding.sender}' acknowledged a barrier that is not open")
            self.node.record_reported_metrics(msg)
            return True
        if self.steps is None:
            return False  # set-up is not finished here yet
        if (kind == Kind.STEP_BEGIN or kind in STEP_TENSOR_KINDS) and any(r.awaiting for r in self.contexts):
            return False  # a restarted key holder's new context comes first
        if kind == Kind.STEP_BEGIN:
            return self._on_step_begin(msg)
        if kind in STEP_TENSOR_KINDS:
            if not self.steps.verdict(msg):
                return False
            self.node.apply(self.steps.take(msg))
            self._finish_if_complete()
            self._advance_plan()
            return True
        if kind == Kind.BARRIER:
            if msg.meta.get("reason") == "start" and self.training and not self.ctx.is_coordinator:
                raise Rollback("the coordinator rolls the run back to a checkpoint", barrier=msg)
            if not self.steps.idle or len(self.plan):
                return False
            self._on_barrier(msg)
            return True
        if kind == Kind.SHUTDOWN:
            if (not self.steps.idle or len(self.plan)) and msg.meta.get("status") == "ok":
                return False
            self.shutdown = (str(msg.meta.get("status", "failed")), str(msg.meta.get("reason", "")))
            return True
        raise RemoteProtocolError(f"'{msg.binding.sender}' sent {kind.value}, which '{self.me}' does not expect")

    def on_peer_lost(self, peer: str, reason: str, *, timed_out: bool) -> bool:
        """Once training runs, the survivors wait for a peer that went away to come back (a
        restarted process), for up to `limits.rejoin_grace_s`; then (or before training, or with
        no grace) the run stops. Silence alone is waited out only while a rejoin is awaited."""
        grace = self.ctx.deployment.spec.limits.rejoin_grace_s
        now = time.monotonic()
        if not self.training or grace <= 0:
            return False
        for gone, since in self.lost.items():
            if now - since > grace:
                raise PeerTimeout(gone, now - since, f"waiting for '{gone}' to restart and rejoin (limits.rejoin_grace_s "
                                  f"= {grace:g} s): restart it with `secure-split peer run`, then restart this peer")
        if timed_out:
            return bool(self.lost)
        if peer not in self.lost:
            self.lost[peer] = now
            self.node.record("peer_lost", counterparty=peer, reason=clip(reason))
            self.node.record("rejoin_wait", counterparty=peer, reason=f"waiting up to {grace:g} s for '{peer}' to restart")
            self.node.metrics.on_rejoin_wait(peer, True, time.time())
            self.node.progress({"event": "waiting", "for": peer, "since": time.time(), "grace_s": grace})
        return True

    def on_peer_restarted(self, peer: str) -> None:
        """A counterparty's new process said HELLO: bring it its CKKS context; the coordinator
        rolls everyone back to the newest checkpoint all hold (`Rollback`); a follower whose
        coordinator restarted drops its step and waits for the new start barrier.

        Raises:
            Rollback: at the coordinator, once every lost peer is back.
        """
        self.lost.pop(peer, None)
        self.node.metrics.on_rejoin_wait(peer, False)
        self.node.progress({"event": "rejoined", "peer": peer})
        for rnd in self.contexts:
            if rnd.plan.key_holder == peer:
                rnd.expect_replacement()  # a new process brings a new key
            elif rnd.context is not None:
                self.node.apply(rnd.resend(peer))
        self.restarted.add(peer)
        if self.ctx.is_coordinator:
            if self.training and not self.lost:
                raise Rollback(f"'{peer}' restarted; every peer goes back to the newest checkpoint all hold")
        elif peer == self.ctx.deployment.spec.coordinator:
            self._drop_run_state()

    def on_remote_error(self, msg: Message) -> bool:
        """A counterparty's error stops the run, except at the coordinator the notice of a peer
        it counts as gone (it stopped, as asked, to be restarted): the wait goes on."""
        sender = msg.binding.sender
        if self.ctx.is_coordinator and sender in self.lost:
            self.node.record("error", error="RemoteError", reason=clip(
                f"'{sender}', counted as gone, reported: {msg.meta.get('reason', '')!s}; still waiting for it to restart"))
            return True
        return False

    def _came_back(self, peer: str) -> None:
        """A message from a peer counted as gone, in its old session: the session's strict
        sequence (`protocol.session`) proves nothing was lost on the way here, so the old process
        (stopped, then continued; or cut off, then reconnected) simply goes on. Had messages been
        lost, the gate would have refused this one as out of sequence. Only while its connection
        is up: a message it sent before it went away, kept for later, proves nothing."""
        del self.lost[peer]
        self.node.record("peer_joined", counterparty=peer, reason="came back in its session (no message lost)")
        self.node.metrics.on_rejoin_wait(peer, False)
        self.node.progress({"event": "rejoined", "peer": peer})

    def on_receipt(self, sender: str, key: int) -> None:
        """Receipts are waited on by `node.exchange_heads`."""

    def reachable(self, peer: str) -> bool:
        """Every counterparty is told when the run ends."""
        return True

    def tell_others_we_stopped(self, reason: str) -> None:
        """The coordinator ends the run for everyone; a follower tells the coordinator why."""
        if self.ctx.is_coordinator:
            self.node.broadcast_shutdown("failed", f"'{self.me}' stopped: {reason}")
        else:
            self.node.notify_failure(self.ctx.deployment.spec.coordinator, reason)

    def final_metrics(self) -> dict[str, float]:
        """The last epoch's metrics this peer computed itself (another peer's are its own
        statement, recorded as such; never adopted into ours)."""
        last = self.own_history[-1]["values"] if self.own_history else {}
        return {k: float(v) for k, v in last.items()}

    def working_state(self) -> str:
        """The state this peer reports while it runs (`peer.metrics.PEER_STATES`)."""
        return "training"

    def close_peers(self) -> list[str]:
        """Every counterparty countersigns our close."""
        return list(self.node.counterparties)

    # -- set-up ------------------------------------------------------------------------------------

    @property
    def _steps(self) -> StepRunner:
        if self.steps is None:
            raise TrainingError(f"internal: '{self.me}' is not set up")  # pragma: no cover
        return self.steps

    def _set_up_he(self) -> None:
        """Distribute CKKS contexts: the key holder keeps the secret context, seals it to the other
        feature owners, and gives the merge holder a public context (which cannot decrypt)."""
        topo, deployment = self.ctx.topology, self.ctx.deployment
        if not topo.he_segments:
            return
        limit = deployment.spec.limits.max_message_bytes
        keys = {name: p.transport_key for name, p in deployment.spec.peers.items()}
        params = self.ctx.policy.requirements.ckks.params()  # exactly the policy's: every party checks them
        mine: dict[str, CkksContext] = {}
        for seg in topo.he_segments:
            kh = self.he_key_holders[seg]
            if kh is None:
                raise ConfigError(ConfigProblem(str(deployment.path), f"segments.{seg}.he", "no key holder for this HE merge"))
            holder = topo.peer_of(seg)
            plan = ContextPlan(seg, kh, (holder,), tuple(o for o in topo.he_feeders(seg) if o not in (kh, holder)))
            if plan.role(self.me) == "none":
                continue
            rnd = ContextRound(self.me, plan, params=params, identity=self.ctx.identity, transport_keys=keys,
                               max_bytes=limit)
            self.contexts.append(rnd)
            self.node.apply(rnd.start())
            if rnd.context is None:
                self._wait_setup(lambda r=rnd: r.done, f"receiving the CKKS context for '{seg}'", [kh])
            if self.me == kh and rnd.context is not None:
                mine[seg] = rnd.context
        if mine:
            self.key_holder = HeKeyHolder({s: topo.peer_of(s) for s in mine}, mine, max_bytes=limit)

    def _align_ids(self) -> None:
        """Vertical training: align sample ids with the other parties by multi-party PSI.

        Only blinded points cross the wire; every party learns the intersection (and set sizes).
        Afterwards this peer's data holds exactly the intersection, in sorted order.
        """
        parties = psi_parties(self.ctx.deployment)
        if self.me not in parties:
            return
        site = self.ctx.site
        if site is None:
            raise ConfigError(ConfigProblem(str(self.ctx.cfg.path), "data", "vertical training needs this peer's data file (ids) for PSI"))
        spec = self.ctx.deployment.spec
        kept = load_alignment(self.checkpoint_dir, self.ctx.deployment.hash, list(parties)) if self.resume else None
        if kept is not None:
            # A restarted process of a running deployment: the others aligned with it already.
            self.node.record("ids_aligned", parties=list(parties), own_size=len(site.ids),
                             intersection_size=int(kept.shape[0]))
            ids = kept
        else:
            self.psi = PsiRound(self.me, parties, [int(x) for x in site.ids.tolist()],
                                deployment_hash=self.ctx.deployment.hash, max_points=spec.limits.max_psi_points)
            self.node.apply(self.psi.start())
            others = [p for p in parties if p != self.me]
            self._wait_setup(lambda: self.psi is not None and self.psi.result is not None,
                             "aligning sample ids by PSI", others)
            result = self.psi.result
            assert result is not None
            ids = result.ids
            save_alignment(self.checkpoint_dir, self.ctx.deployment.hash, list(parties), ids)
        if ids.shape[0] < 2:
            raise TrainingError(f"PSI: the parties share only {ids.shape[0]} sample id(s); nothing to train on")
        self.data, self.preprocessing = self.ctx.training_data(ids)
        self.executor = self._new_executor()

    def _wait_setup(self, ready: Any, what: str, from_peers: list[str]) -> None:
        self.node.wait(lambda: self.shutdown is not None or ready(), lambda: what, lambda: from_peers)
        if self.shutdown is not None:
            raise _ShutdownDuringSetup

    def _on_psi(self, msg: Message) -> bool:
        if self.psi is None:
            return False  # our own set-up has not reached PSI yet
        self.node.apply(self.psi.on_message(msg.binding.sender, bytes(msg.blob)))
        return True

    def _on_context(self, msg: Message) -> bool:
        for rnd in self.contexts:
            if rnd.concerns(msg):
                replacing = rnd.awaiting
                self.node.apply(rnd.on_message(msg))
                if replacing and self.steps is not None:
                    self._new_steps()  # the restarted key holder's new key from now on
                return True
        if self.ctx.topology.he_segments and str(msg.meta.get("segment", "")) in self.ctx.topology.he_segments \
                and not self.contexts:
            return False  # our own set-up has not reached that merge yet
        raise RemoteProtocolError(f"'{msg.binding.sender}' sent a CKKS context '{self.me}' does not take part in")

    # -- steps ------------------------------------------------------------------------------------

    def _on_step_begin(self, msg: Message) -> bool:
        if not self.plan.offer(msg):
            return False  # more steps announced than this peer holds: it waits for some to begin
        self.last_step_seen = max(self.last_step_seen, self.plan.last_step)
        self._advance_plan()
        return True

    def _advance_plan(self) -> None:
        """Begin the announced steps that can begin: the next one when no step is active; with
        `training.pipeline_depth`, later training steps while the active one waits for its
        gradients (their tensors wait in the queue until each is active)."""
        steps = self._steps
        while (nxt := self.plan.next()) is not None:
            if steps.idle:
                self.plan.pop()
                self.epoch = nxt.epoch
                self._begin(nxt.step, nxt.phase, nxt.ids)
            elif steps.can_begin_ahead(nxt.step, nxt.phase):
                self.plan.pop()
                self.node.apply(steps.begin_ahead(nxt.step, nxt.phase, nxt.ids))
            else:
                return

    def _begin(self, step: int, phase: str, ids: np.ndarray) -> None:
        self.node.apply(self._steps.begin(step, phase, ids))
        self._finish_if_complete()

    def _finish_if_complete(self) -> None:
        steps = self._steps
        phase = steps.current_phase
        metrics = steps.finish_if_complete()
        if metrics is None:
            return
        (self.train_steps if phase == "train" else self.eval_steps).append(metrics)
        if phase == "train" and not self.ctx.is_coordinator:
            # Every peer reports progress: what it computed itself (its loss, where it has one).
            m = next(iter(metrics.tasks.values()), None)
            self.node.progress({"event": "step", "epoch": self.epoch, "step": len(self.train_steps),
                                "loss": m.mean_loss if m is not None else None})

    # -- coordinator ----------------------------------------------------------------------------

    def _announce(self, announcements: list[Announcement], epoch: int) -> None:
        for a in announcements:
            for peer in self.node.counterparties:
                self.node.send(peer, Kind.STEP_BEGIN, step=a.step, meta=a.meta(epoch), tensors=(ids_to_wire(a.ids),))
            self.last_step_seen = max(self.last_step_seen, a.last_step)

    def _run_step(self, step: int, phase: str, ids: np.ndarray, epoch: int, *, index: int,
                  announcer: Announcer) -> None:
        """Run one step (the epoch's `index`-th) here and wait until it is complete; once it has
        begun here, announce the steps up to `announcer.lookahead` ahead, so every follower knows
        its next steps before it can begin them."""
        self._announce(announcer.through(index), epoch)
        self._begin(step, phase, ids)
        self._announce(announcer.through(index + announcer.lookahead), epoch)
        self.node.wait(
            lambda: self._steps.idle,
            lambda: f"running {phase} step {step}",
            lambda: self.node.counterparties,
        )

    def _coordinate(self) -> None:
        training = self.ctx.deployment.spec.training
        if self.data is None:
            raise ConfigError(ConfigProblem(str(self.ctx.cfg.path), "data", "the coordinator needs a data file with the sample ids"))
        ids = self.data.ids.numpy() if hasattr(self.data.ids, "numpy") else np.asarray(self.data.ids)
        train_ids, test_ids = split_train_test(ids, training.test_fraction, training.seed)
        start = self._resume_epoch()
        # Steps are unique across epochs, resumes and rollbacks: above every step any peer saw.
        step = max([self.last_step_seen, *(self._their_last_step(p) for p in self.node.counterparties)])
        timing: list[dict[str, float]] = []  # wall seconds per epoch, for benchmarks (bench/split_vs_local.py)
        while True:
            try:
                self._barrier(start, "start")
                self.training = True
                step = self._epochs(start + 1, train_ids, test_ids, step, timing)
                break
            except Rollback as rb:
                start = self._rollback_epoch()
                step = max(step, self.last_step_seen)
                self.node.record("rollback", epoch=start, reason=clip(str(rb), 1000))
                self.node.progress({"event": "rollback", "epoch": start, "reason": str(rb)})
        shown = self.history[-1]["values"] if self.history else {}
        self.node.result.metrics = {"history": self.history, "final": dict(shown), "own": self.final_metrics(),
                                    "timing": timing}
        self.node.broadcast_shutdown("ok", "training finished")

    def _epochs(self, first_epoch: int, train_ids: np.ndarray, test_ids: np.ndarray, step: int,
                timing: list[dict[str, float]]) -> int:
        """Run the epochs from `first_epoch` to the end; returns the last step number used."""
        training = self.ctx.deployment.spec.training
        n_epochs = training.epochs
        for epoch in range(first_epoch, n_epochs):
            batches = epoch_batches(train_ids, training.batch_size, training.seed, epoch, training.max_steps_per_epoch)
            step = max(step, epoch * 1_000_000)
            plan = [("train", b) for b in batches] + [("eval", b) for b in eval_batches(test_ids, training.batch_size)]
            announcer = Announcer(plan, step + 1, lookahead=max(1, training.depth - 1),
                                  max_ids=max(1, self.ctx.deployment.spec.limits.max_message_bytes // 16))
            marks = [time.perf_counter()]  # epoch start, train end, eval end, barrier end
            for i, (phase, batch) in enumerate(plan):
                if i == len(batches):
                    marks.append(time.perf_counter())
                step += 1
                self.last_step_seen = max(self.last_step_seen, step + 1)
                self._run_step(step, phase, batch, epoch, index=i, announcer=announcer)
                if phase != "train":
                    continue
                last = self._steps.last_metrics
                m = next(iter(last.tasks.values()), None) if last is not None else None
                self.node.progress({"event": "step", "epoch": epoch, "epochs": n_epochs, "step": i + 1,
                                    "steps": len(batches), "loss": m.mean_loss if m is not None else None})
            marks += [time.perf_counter()] * (3 - len(marks))
            values = self._barrier(epoch, "epoch_end")
            self.completed_epoch = epoch
            marks.append(time.perf_counter())
            timing.append({"epoch": epoch, "train_steps": len(batches), "eval_steps": len(plan) - len(batches),
                           **{k: b - a for k, a, b in zip(("train_s", "eval_s", "barrier_s"), marks, marks[1:], strict=False)}})
            self.history.append({"epoch": epoch, "values": values})
            self.epochs_done = self.node.result.epochs_done = epoch + 1
            self.node.progress({"event": "epoch", "epoch": epoch, "epochs": n_epochs, "values": values})
        return step

    def _their_last_step(self, peer: str) -> int:
        value = self.node.hello_meta_of(peer).get("last_step")
        return value if isinstance(value, int) else 0

    def _rollback_epoch(self) -> int:
        """After a rejoin: the newest epoch every peer holds a checkpoint of (-1: start over).

        The survivors hold every epoch whose barrier completed (they saved it before they
        acknowledged); a restarted peer says in its new HELLO which checkpoints it holds."""
        common = set(range(self.completed_epoch + 1))
        for p in self.restarted:
            theirs = self.node.hello_meta_of(p).get("checkpoints")
            common &= {int(x) for x in theirs if isinstance(x, int)} if isinstance(theirs, list) else set()
        self.restarted.clear()
        return max(common) if common else -1

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
        """Coordinator side of a barrier. Returns the metrics of every peer for display (each
        peer's own values are signed and recorded as that peer's; ours alone go into run_end).

        The start barrier announces the run: its id and every peer's run nonce."""
        meta = self.node.announce_run() if reason == "start" else {}
        barrier = self.barrier = BarrierRound(epoch, reason, self.node.counterparties, meta=meta)
        self.node.apply(barrier.open())
        train, evaluation = self._barrier_local(epoch, reason, rollback=reason == "start" and self.training)
        self.node.wait(lambda: barrier.done(), lambda: f"waiting for every peer at the {reason} barrier of epoch {epoch}",
                       barrier.missing)
        self.barrier = None
        merged = epoch_values(train, evaluation)
        for report in barrier.reports.values():
            merged.update(epoch_values(task_metrics_from_meta(report.train), task_metrics_from_meta(report.eval)))
        return merged

    # -- both roles ---------------------------------------------------------------------------

    def _barrier_local(self, epoch: int, reason: str, *, rollback: bool = False
                       ) -> tuple[dict[str, TaskMetrics], dict[str, TaskMetrics]]:
        """What every peer does at a barrier: checkpoint, sign, exchange heads; returns its own
        metric sums of the epoch (train, eval) and starts the next epoch's."""
        ckpt = self.checkpoint_dir
        if reason == "start":
            if rollback:  # fresh state (and the CKKS contexts as they are now)
                self.executor = self._new_executor()
                self._new_steps()
                self.train_steps, self.eval_steps = [], []
            if epoch >= 0:
                load_checkpoint(ckpt, epoch, self.executor, preprocessing=self.preprocessing)
                self.node.record("checkpoint_resumed", epoch=epoch, digest=checkpoint_digest(ckpt, epoch))
        elif reason == "epoch_end":
            save_checkpoint(ckpt, epoch=epoch, executor=self.executor, preprocessing=self.preprocessing, meta={
                "deployment": self.ctx.deployment.hash, "peer": self.me, "policy": self.ctx.policy.hash})
            self.node.record("checkpoint_saved", epoch=epoch, digest=checkpoint_digest(ckpt, epoch))
        # Receipts are keyed by barrier id (= epoch + 1; the start barrier of a fresh run is 0).
        self.node.exchange_heads(epoch + 1, self.node.counterparties, f"{reason} barrier, epoch {epoch}")
        if reason != "epoch_end":
            return {}, {}
        train, evaluation = sum_task_metrics(self.train_steps), sum_task_metrics(self.eval_steps)
        self.train_steps, self.eval_steps = [], []
        own = epoch_values(train, evaluation)
        self.own_history.append({"epoch": epoch, "values": own})
        self.statement = self.node.state_metrics(epoch, own)
        return train, evaluation

    def _drop_run_state(self) -> None:
        """Forget the open step, the queued messages and the epoch's sums (a rollback follows)."""
        if self.steps is not None:
            self.steps.abort()
        self.plan.clear()
        self.node.take_later()
        self.train_steps, self.eval_steps = [], []

    def _on_barrier(self, msg: Message) -> None:
        epoch = _meta_int(msg, "epoch", -1)
        reason = str(msg.meta.get("reason", "epoch_end"))
        rollback = reason == "start" and self.training
        if reason == "start":
            self.node.bind_announced_run(msg)
            self.training = True
            if rollback:
                self.node.record("rollback", epoch=epoch, reason="the coordinator rolled the run back to this checkpoint")
                self.node.progress({"event": "rollback", "epoch": epoch})
        train, evaluation = self._barrier_local(epoch, reason, rollback=rollback)
        if reason == "epoch_end":
            values = epoch_values(train, evaluation)
            self.history.append({"epoch": epoch, "values": values})
            self.epochs_done = self.node.result.epochs_done = epoch + 1
            self.node.progress({"event": "epoch", "epoch": epoch, "epochs": self.ctx.deployment.spec.training.epochs,
                                "values": values})
        statement = self.statement if reason == "epoch_end" else {}
        self.node.send(self.ctx.deployment.spec.coordinator, Kind.BARRIER_ACK, step=epoch + 1, meta={
            **statement, "epoch": epoch, "train": task_metrics_to_meta(train), "eval": task_metrics_to_meta(evaluation)})


def _meta_int(msg: Message, key: str, default: int) -> int:
    """An int from a message's meta (the codec already checked the type per kind)."""
    value = msg.meta.get(key, default)
    return value if isinstance(value, int) else default
