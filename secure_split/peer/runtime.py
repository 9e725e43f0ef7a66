"""One peer process: load its files, shake hands, then train as coordinator or follower.

The coordinator (named in the deployment, normally the label holder) drives the schedule: it
starts each step by sending the batch's sample ids to every peer, and ends each epoch with a
barrier at which every peer saves its checkpoint, signs its audit head and exchanges signed
heads with its counterparties. Followers react to what arrives. Every message goes through the
gate; the engine computes, the runtime only moves tensors between the two.

Step ordering: a peer works on one step at a time. Messages for a later step (the coordinator's
next `step_begin` can overtake the previous step's gradients on another link) wait in a queue
until the current step is complete; a message for an earlier step is a protocol error. The one
exception is `training.overlap`: a peer without a loss whose inputs come from such peers (a data
owner, the hops of a chain) begins the next training step while the current one waits for its
gradients, and runs that step's forward as soon as its activations arrive; gradients for it
still wait in the queue until it is the current one.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import secure_split
from secure_split.audit import AuditLog, SignedHead
from secure_split.config import Deployment, PeerConfig, load_deployment, load_peer_config
from secure_split.crypto.keys import Identity, load_identity
from secure_split.engine.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from secure_split.engine.data import PeerData, load_peer_data
from secure_split.engine.executor import Outgoing, PeerExecutor
from secure_split.engine.schedule import epoch_batches, eval_batches, split_train_test
from secure_split.engine.tensors import from_wire, to_wire
from secure_split.errors import (
    ConfigError,
    ConfigProblem,
    ExitCode,
    HandshakeRefused,
    PeerTimeout,
    RemoteProtocolError,
    SecureSplitError,
    TrainingError,
)
from secure_split.peer.gate import Gate
from secure_split.policy import Policy, check_startup, he_key_holder, load_policy, psi_parties, required_flows
from secure_split.protocol import Kind, Message, PeerSession, WireTensor
from secure_split.transport import Transport, TransportPeer

ProgressFn = Callable[[dict[str, Any]], None]

# Tensors of the current step, processed in step order (the key holder's decryption requests are
# not: `_dispatch` serves them at once, whatever step the key holder itself is in).
_STEP_TENSOR_KINDS = frozenset(
    {Kind.ACTIVATION, Kind.GRADIENT, Kind.ENCRYPTED_ACTIVATION, Kind.AGGREGATE_GRADIENT, Kind.MASKED_AGGREGATE}
)
# How long a disconnected counterparty may stay away before we name it as lost.
_RECONNECT_GRACE_S = 3.0
# Refusal codes (see gate.Gate.receive) for frames our own gate cannot have produced: a counterparty's
# `error` with one of these is a notice, not a reason to stop.
_NOT_SENT_BY_US_CODES = frozenset({"bad_frame", "spoofed"})


class _ShutdownDuringSetup(Exception):
    """The coordinator ended the run while this peer was still setting up (PSI, CKKS context)."""


@dataclass
class PeerResult:
    """What a peer reports when it exits (the demo's table and summary read these)."""

    name: str
    pid: int
    status: str = "failed"
    error: str | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0
    messages_received: int = 0
    refused: int = 0
    epochs_done: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0
    # The ExitCode of the error that stopped this peer (0 when it did not stop on an error of its own).
    exit_code: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _EpochMetrics:
    """Running sums for one epoch, per task."""

    train_loss_sum: dict[str, float] = field(default_factory=dict)
    train_count: dict[str, int] = field(default_factory=dict)
    eval_correct: dict[str, int] = field(default_factory=dict)
    eval_count: dict[str, int] = field(default_factory=dict)
    eval_loss_sum: dict[str, float] = field(default_factory=dict)

    def add(self, phase: str, step_metrics: Any) -> None:
        for task, m in step_metrics.tasks.items():
            if phase == "train":
                self.train_loss_sum[task] = self.train_loss_sum.get(task, 0.0) + float(m.loss_sum)
                self.train_count[task] = self.train_count.get(task, 0) + int(m.count)
            elif phase == "eval":
                self.eval_correct[task] = self.eval_correct.get(task, 0) + int(m.correct)
                self.eval_count[task] = self.eval_count.get(task, 0) + int(m.count)
                self.eval_loss_sum[task] = self.eval_loss_sum.get(task, 0.0) + float(m.loss_sum)

    def values(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for task, s in self.train_loss_sum.items():
            out[f"train_loss/{task}"] = s / max(1, self.train_count.get(task, 0))
        for task, c in self.eval_correct.items():
            n = max(1, self.eval_count.get(task, 0))
            out[f"accuracy/{task}"] = c / n
            out[f"eval_loss/{task}"] = self.eval_loss_sum.get(task, 0.0) / n
        return out


def _counterparties(deployment: Deployment, policy: Policy, me: str) -> list[str]:
    """Every peer this one exchanges messages with: those the topology's required flows name."""
    peers: set[str] = set()
    for flow in required_flows(deployment, policy=policy):
        if flow.sender == me:
            peers.add(flow.receiver)
        elif flow.receiver == me:
            peers.add(flow.sender)
    peers.discard(me)
    return sorted(peers)


class PeerRuntime:
    """Runs one peer from its private peer config to a clean exit.

    Args:
        config_path: `peers/NAME.yaml`.
        resume: continue from the last checkpoint all peers share, and continue the audit chain.
        progress: called with progress events (coordinator only).
    """

    def __init__(self, config_path: str | Path, *, resume: bool = False, progress: ProgressFn | None = None) -> None:
        self.started = time.monotonic()
        self.resume = resume
        self.progress = progress or (lambda event: None)
        self.cfg: PeerConfig = load_peer_config(config_path)
        self.deployment: Deployment = load_deployment(self.cfg.deployment_path)
        self.me = self.cfg.name
        spec = self.deployment.spec
        problems: list[ConfigProblem] = []
        if self.me not in spec.peers:
            raise ConfigError(ConfigProblem(str(self.cfg.path), "peer", f"'{self.me}' is not a peer of deployment {self.deployment.path}"))
        self.identity: Identity = load_identity(self.cfg.secret_key_path)
        mine = spec.peers[self.me]
        if self.identity.sign_key_hex != mine.sign_key or self.identity.transport_public_z85 != mine.transport_key:
            problems.append(
                ConfigProblem(
                    str(self.cfg.secret_key_path), "-",
                    f"this secret key does not match the public keys of peer '{self.me}' in {self.deployment.path}; "
                    "use the key file generated for this peer or update the deployment",
                )
            )
        if self.identity.name != self.me:
            problems.append(ConfigProblem(str(self.cfg.secret_key_path), "peer", f"key file is for '{self.identity.name}', not '{self.me}'"))
        if problems:
            raise ConfigError(problems)
        self.policy: Policy = load_policy(self.deployment.policy_path)
        check_startup(self.policy, self.deployment)
        self.data: PeerData | None = load_peer_data(self.cfg.data_path) if self.cfg.data_path else None
        self.executor = PeerExecutor(self.deployment, self.me, self.data, defer_update=True,
                                     overlap=self.deployment.spec.training.overlap)
        self.counterparties = _counterparties(self.deployment, self.policy, self.me)
        # HE merge state: contexts per merge segment, pending encrypted contributions and masks.
        self.he_segments = sorted(s for s, seg in spec.segments.items() if seg.he)
        self.he_key_holders = {s: he_key_holder(self.deployment, s, self.policy) for s in self.he_segments}
        self.he_ctx: dict[str, Any] = {}
        self.he_pending: dict[tuple[int, str], dict[str, Any]] = {}
        self.he_masks: dict[tuple[int, str], Any] = {}
        self.is_coordinator = spec.coordinator == self.me
        self.result = PeerResult(name=self.me, pid=os.getpid())
        self.checkpoint_dir = self.cfg.checkpoints_dir
        self.available_checkpoints = list_checkpoints(self.checkpoint_dir) if resume else []
        if resume and (why := _resume_problem(self.cfg.audit_dir / f"{self.me}.jsonl", self.deployment)):
            raise ConfigError(ConfigProblem(str(self.deployment.path), "-", why))
        # Mutable run state
        self.queue: deque[Message] = deque()
        self.setup_inbox: deque[Message] = deque()
        self.current_step: int | None = None
        self.current_phase: str = "train"
        self.shutdown_status: str | None = None
        self.shutdown_reason: str = ""
        self.lost_since: dict[str, float] = {}
        self.receipts: dict[int, set[str]] = {}
        self.acks: dict[int, dict[str, dict[str, float]]] = {}
        self.epoch_metrics = _EpochMetrics()
        self.history: list[dict[str, Any]] = []

    # -- setup and teardown ---------------------------------------------------------------

    def _open(self) -> None:
        spec = self.deployment.spec
        self.cfg.audit_dir.mkdir(parents=True, exist_ok=True)
        self.audit = AuditLog.open(
            self.cfg.audit_dir / f"{self.me}.jsonl",
            peer=self.me,
            identity=self.identity,
            deployment_hash=self.deployment.hash,
            policy_hash=self.policy.hash,
            resume=self.resume,
        )
        self.audit.record(
            "run_start",
            deployment_hash=self.deployment.hash,
            policy_hash=self.policy.hash,
            versions={"secure_split": secure_split.__version__, "protocol": secure_split.PROTOCOL_VERSION},
            resumed=self.resume,
            resume_epoch=None,
        )
        peers = {
            name: TransportPeer(name=name, endpoint=p.endpoint, transport_key=p.transport_key)
            for name, p in spec.peers.items()
            if name in self.counterparties
        }
        self.transport = Transport(
            self.me,
            spec.peers[self.me].endpoint,
            self.identity.transport_secret_z85,
            self.identity.transport_public_z85,
            peers,
            max_message_bytes=spec.limits.max_message_bytes,
            heartbeat_s=spec.limits.heartbeat_s,
            handshake_timeout_s=spec.limits.handshake_timeout_s,
        )
        self.transport.start()
        sessions = {name: self._new_session(name) for name in self.counterparties}
        self.gate = Gate(
            me=self.me,
            deployment_hash=self.deployment.hash,
            policy=self.policy,
            audit=self.audit,
            transport=self.transport,
            sessions=sessions,
            max_message_bytes=spec.limits.max_message_bytes,
            session_factory=self._new_session if self.accepts_restarted_peers else None,
        )

    # A restarted counterparty may open a new session (horizontal schedules: an owner rejoins).
    accepts_restarted_peers = False

    def _hello_meta(self) -> dict[str, Any]:
        return {"checkpoints": list(self.available_checkpoints), "software": secure_split.__version__}

    def _new_session(self, peer: str) -> PeerSession:
        return PeerSession(self.me, peer, self.deployment.hash, self.policy.hash, hello_meta=self._hello_meta())

    def run(self) -> PeerResult:
        """Run the peer to completion. Never raises for expected failures: see `result.status`.

        Raises:
            ConfigError: only from the constructor; `run` reports other failures in the result.
        """
        self._open()
        status, reason = "failed", ""
        try:
            status, reason = self._main()
            self.result.error = None if status == "ok" else (reason or "coordinator ended the run as failed")
        except SecureSplitError as exc:
            reason = f"{type(exc).__name__}: {exc}"
            self.result.error = reason
            self.result.exit_code = int(exc.exit_code)
            self.audit.record("error", reason=_clip(reason), error=type(exc).__name__)
            self._tell_others_we_stopped(reason)
        except KeyboardInterrupt:
            reason = "interrupted by the operator"
            self.result.error = reason
            self.result.exit_code = int(ExitCode.INTERRUPTED)
            self.audit.record("error", reason=reason, error="KeyboardInterrupt")
            # Tell the others at once rather than let them wait for a timeout.
            self._tell_others_we_stopped(reason)
        finally:
            self.result.status = status
            self.result.bytes_sent = self.transport.bytes_sent
            self.result.bytes_received = self.transport.bytes_received
            self.result.messages_sent = self.gate.stats.sent
            self.result.messages_received = self.gate.stats.received
            self.result.refused = self.gate.stats.refused_in + self.gate.stats.refused_out
            self.result.wall_s = time.monotonic() - self.started
            self.audit.close(status, _clip(reason), metrics=self._scalar_metrics())
            # Linger briefly so our last messages leave before the sockets close.
            self.transport.close()
        return self.result

    def _main(self) -> tuple[str, str]:
        """The run between opening and closing: handshake, setup, schedule. Returns (status, reason)."""
        self._handshake()
        try:
            self._setup_he()
            self._align_ids()
        except _ShutdownDuringSetup:  # the coordinator ended the run before we were set up
            return self.shutdown_status or "failed", self.shutdown_reason
        if self.is_coordinator:
            self._coordinate()
            return "ok", ""
        self._follow()
        return self.shutdown_status or "failed", self.shutdown_reason

    def _tell_others_we_stopped(self, reason: str) -> None:
        """This peer stopped on an error: the coordinator ends the run, a follower tells it why."""
        if self.is_coordinator:
            self._broadcast_shutdown("failed", f"'{self.me}' stopped: {reason}")
        else:
            self._notify_coordinator_of_failure(reason)

    def _scalar_metrics(self) -> dict[str, float]:
        last = self.history[-1]["values"] if self.history else {}
        return {k: float(v) for k, v in last.items()}

    # -- messaging ---------------------------------------------------------------------------

    def _send_outgoing(self, outs: list[Outgoing]) -> None:
        for o in outs:
            target = o.edge.split("->", 1)[1]
            if target in self.he_segments:
                self._send_he(o, target)
                continue
            kind = Kind.ACTIVATION if o.kind == "activation" else Kind.GRADIENT
            raw = o.raw.detach().reshape(o.raw.shape[0], -1).numpy() if o.raw is not None else None
            self.gate.send(
                o.to_peer,
                kind,
                step=o.step,
                edge=o.edge,
                meta={"phase": o.phase},
                tensors=(to_wire(o.tensor),),
                raw=raw,
            )

    def _poll_events(self) -> None:
        now = time.monotonic()
        for ev in self.transport.events():
            if ev.peer is None or ev.peer not in self.counterparties:
                continue
            if ev.kind == "disconnected":
                if ev.peer not in self.lost_since:
                    self.lost_since[ev.peer] = now
            elif ev.kind == "connected":
                if ev.peer in self.lost_since:
                    del self.lost_since[ev.peer]
                    self.audit.record("peer_joined", counterparty=ev.peer, reason="reconnected")
            elif ev.kind == "handshake_failed":
                self.audit.record("error", reason=f"transport handshake with '{ev.peer}' failed: {ev.detail}", error="TransportError")
        grace = max(_RECONNECT_GRACE_S, 3 * self.deployment.spec.limits.heartbeat_s)
        for peer, since in list(self.lost_since.items()):
            if now - since > grace:
                del self.lost_since[peer]
                self._connection_lost(peer, now - since)

    def _connection_lost(self, peer: str, down_s: float) -> None:
        """`peer`'s connection stayed down past the grace period: stop (subclasses may instead
        carry on without it, and return)."""
        self.audit.record("peer_lost", counterparty=peer, reason="connection lost (heartbeat timeout)")
        raise PeerTimeout(peer, down_s, "the connection dropped (stalled or stopped peer)")

    def _receive_one(self, timeout_s: float) -> Message | None:
        """One gated receive. Refusals are audited by the gate; we keep serving."""
        # A refused handshake and our policy's refusal of an inbound flow end the run (they
        # propagate); any other bad frame was audited and answered by the gate: keep serving.
        try:
            return self.gate.receive(timeout_s)
        except HandshakeRefused:
            raise
        except RemoteProtocolError:
            return None

    def _wait(self, done: Callable[[], bool], what: Callable[[], str], waiting_on: Callable[[], list[str]]) -> None:
        """Serve messages until `done()`; time out naming the peers we wait on."""
        limit = self.deployment.spec.limits.peer_timeout_s
        last_progress = time.monotonic()
        while not done():
            self._drain_queue()
            if done():
                return
            self._poll_events()
            msg = self._receive_one(0.2)
            if msg is None:
                if time.monotonic() - last_progress > limit:
                    self._timed_out(waiting_on() or ["(unknown)"], what(), limit)
                    last_progress = time.monotonic()
                continue
            last_progress = time.monotonic()
            self._dispatch(msg)

    def _timed_out(self, names: list[str], what: str, limit: float) -> None:
        """Nothing arrived for `limit` seconds while waiting on `names`: stop (subclasses may
        instead carry on without them, and return)."""
        for n in names:
            self.audit.record("peer_lost", counterparty=n, reason=f"no answer within {limit:.0f} s while {what}")
        raise PeerTimeout(", ".join(names), limit, what)

    def _dispatch(self, msg: Message) -> None:
        kind = msg.kind
        sender = msg.binding.sender
        if kind in (Kind.ERROR, Kind.REFUSE):
            reason = str(msg.meta.get("reason", ""))
            code = str(msg.meta.get("code", ""))
            if kind == Kind.ERROR and code in _NOT_SENT_BY_US_CODES:
                # Our gate never sends an undecodable or misaddressed frame: another holder of our key
                # did. The counterparty refused it and keeps serving; so do we, with the notice on record.
                self.audit.record("error", error="RemoteProtocolError", reason=_clip(
                    f"'{sender}' refused a frame that arrived under our key but was not sent by us ({code}): {reason}"
                ))
                return
            err = TrainingError(f"peer '{sender}' reported {code or 'an error'}: {reason}")
            if code.startswith("peer_failed:") and code[len("peer_failed:"):].isdigit():
                cause = int(code[len("peer_failed:"):])
                if cause in {int(c) for c in ExitCode} and cause != 0:
                    err.exit_code = ExitCode(cause)
            raise err
        if kind == Kind.AUDIT_RECEIPT:
            head = SignedHead.from_meta(dict(msg.meta))
            if head.peer != sender:
                raise RemoteProtocolError(f"'{sender}' sent an audit receipt for '{head.peer}'")
            self.audit.record_counterparty_head(head, self.deployment.spec.peers[sender].sign_key)
            epoch = int(msg.binding.step)
            self.receipts.setdefault(epoch, set()).add(sender)
            return
        if kind == Kind.BARRIER_ACK and self.is_coordinator:
            epoch = _meta_int(msg, "epoch", -1)
            values = msg.meta.get("values")
            if not isinstance(values, dict):
                values = {}
            self.acks.setdefault(epoch, {})[sender] = {
                str(k): float(v) for k, v in values.items() if isinstance(v, int | float)
            }
            return
        if kind == Kind.HEARTBEAT:
            return
        if kind == Kind.MASKED_AGGREGATE and self._is_key_holder_for(str(msg.meta.get("segment", ""))):
            self._decrypt_for_holder(msg)
            return
        if kind in (Kind.PSI, Kind.HE_CONTEXT):
            self.setup_inbox.append(msg)
            return
        # Everything else belongs to the schedule and is processed in order.
        self.queue.append(msg)

    def _drain_queue(self) -> None:
        """Process queued schedule messages that can be processed now, in arrival order."""
        progressed = True
        while progressed and self.queue:
            progressed = False
            for _ in range(len(self.queue)):
                msg = self.queue.popleft()
                if self._try_process(msg):
                    progressed = True
                    break
                self.queue.append(msg)

    def _try_process(self, msg: Message) -> bool:
        kind = msg.kind
        step = msg.binding.step
        if kind == Kind.STEP_BEGIN:
            phase = str(msg.meta.get("phase", "train"))
            if self.current_step is not None:
                # training.overlap: a data owner begins the next training step while the active
                # one waits for its gradients; its tensors wait in the queue until it is active.
                if step > self.current_step and self.executor.can_begin_ahead(phase):
                    self._send_outgoing(self.executor.begin_step(step, phase, _ids_from_wire(msg.tensors[0])))  # type: ignore[arg-type]
                    return True
                return False
            ids = _ids_from_wire(msg.tensors[0])
            self._begin(step, phase, ids)
            return True
        if kind in _STEP_TENSOR_KINDS:
            if kind == Kind.ACTIVATION and step == self.executor.ahead_step:
                # overlap: the input of the step begun ahead; its forward runs now
                self._send_outgoing(self.executor.on_activation(msg.edge, from_wire(msg.tensors[0]), step=step))
                return True
            if self.current_step is None or step > self.current_step:
                return False
            if step < self.current_step:
                raise RemoteProtocolError(f"'{msg.binding.sender}' sent {kind.value} for finished step {step}")
            if kind == Kind.ACTIVATION:
                self._send_outgoing(self.executor.on_activation(msg.edge, from_wire(msg.tensors[0])))
            elif kind == Kind.GRADIENT:
                self._send_outgoing(self.executor.on_gradient(msg.edge, from_wire(msg.tensors[0])))
            else:
                self._on_he_message(msg)  # checks that this peer holds the merge it names
            self._maybe_finish_step()
            return True
        if kind == Kind.BARRIER:
            if self.current_step is not None:
                return False
            self._on_barrier(msg)
            return True
        if kind == Kind.SHUTDOWN:
            if self.current_step is not None and msg.meta.get("status") == "ok":
                return False
            self.shutdown_status = str(msg.meta.get("status", "failed"))
            self.shutdown_reason = str(msg.meta.get("reason", ""))
            return True
        raise RemoteProtocolError(f"'{msg.binding.sender}' sent {kind.value}, which '{self.me}' does not expect")

    def _begin(self, step: int, phase: str, ids: Any) -> None:
        self.current_step = step
        self.current_phase = phase
        outs = self.executor.begin_step(step, phase, ids)  # type: ignore[arg-type]
        self._send_outgoing(outs)
        self._maybe_finish_step()

    def _maybe_finish_step(self) -> None:
        if self.current_step is not None and self.executor.step_complete():
            metrics = self.executor.finish_step()
            self.epoch_metrics.add(self.current_phase, metrics)
            self.last_step_metrics = metrics
            # A step begun ahead (training.overlap) is now the active one.
            self.current_step = self.executor.active_step
            self.current_phase = self.executor.active_phase or self.current_phase

    # -- vertical: private ID alignment ------------------------------------------------------------

    def _setup_message(self, kinds: tuple[Kind, ...], what: str, from_peers: list[str]) -> Message:
        """The next PSI / HE-context message, serving everything else meanwhile.

        Raises:
            _ShutdownDuringSetup: the coordinator ended the run first (e.g. it finished while a
                restarted owner was still setting up).
        """
        def ready() -> bool:
            return self.shutdown_status is not None or any(m.kind in kinds for m in self.setup_inbox)

        self._wait(ready, lambda: what, lambda: from_peers)
        if self.shutdown_status is not None:
            raise _ShutdownDuringSetup
        for m in list(self.setup_inbox):
            if m.kind in kinds:
                self.setup_inbox.remove(m)
                return m
        raise TrainingError(f"internal: no {what} message")  # pragma: no cover

    def _align_ids(self) -> None:
        """Vertical training: align sample ids with the other parties by multi-party PSI.

        Only blinded points cross the wire; every party learns the intersection (and set sizes).
        Afterwards this peer's data holds exactly the intersection, in sorted order.
        """
        parties = psi_parties(self.deployment)
        if self.me not in parties:
            return
        if self.data is None:
            raise ConfigError(ConfigProblem(str(self.cfg.path), "data", "vertical training needs this peer's data file (ids) for PSI"))
        from secure_split.crypto.psi import MultiPartyPsi

        own_ids = [int(x) for x in self.data.ids.tolist()]
        salt = b"secure-split-psi-v1:" + bytes.fromhex(self.deployment.hash)
        psi = MultiPartyPsi(self.me, parties, own_ids, salt=salt,
                            max_points=max(1, self.deployment.spec.limits.max_message_bytes // 32))
        others = [p for p in parties if p != self.me]

        def send(steps: Any) -> None:
            for st in steps:
                self.gate.send(st.receiver, Kind.PSI, blob=st.payload)

        send(psi.start())
        while not psi.done:
            msg = self._setup_message((Kind.PSI,), "aligning sample ids by PSI", others)
            send(psi.receive(msg.binding.sender, bytes(msg.blob)))
        result = psi.result()
        inter = sorted(int(x) for x in result.ids)
        if len(inter) < 2:
            raise TrainingError(f"PSI: the parties share only {len(inter)} sample id(s); nothing to train on")
        self.data = self.data.subset(np.asarray(inter, dtype=np.int64))
        self.executor = PeerExecutor(self.deployment, self.me, self.data, defer_update=True,
                                     overlap=self.deployment.spec.training.overlap)
        self.audit.record("ids_aligned", parties=list(parties), own_size=len(own_ids), intersection_size=len(inter))

    # -- HE merges ---------------------------------------------------------------------------------

    def _is_key_holder_for(self, segment: str) -> bool:
        return self.he_key_holders.get(segment) == self.me

    def _setup_he(self) -> None:
        """Distribute CKKS contexts: the key holder keeps the secret context, seals it to the other
        feature owners, and gives the merge holder a public context (which cannot decrypt)."""
        if not self.he_segments:
            return
        from secure_split.crypto.he import KeyHolderContext, PublicContext
        from secure_split.crypto.seal import open_from, seal_to

        spec = self.deployment.spec
        limit = spec.limits.max_message_bytes
        params = self.policy.requirements.ckks.params()  # exactly the policy's: every party checks them
        for seg in self.he_segments:
            kh = self.he_key_holders[seg]
            holder = spec.segments[seg].peer
            owners = sorted({spec.segments[e.from_].peer for e in spec.edges if e.to == seg})
            if kh is None:
                raise ConfigError(ConfigProblem(str(self.deployment.path), f"segments.{seg}.he", "no key holder for this HE merge"))
            if self.me == kh:
                ctx = KeyHolderContext.create(params)
                self.he_ctx[seg] = ctx
                self.gate.send(holder, Kind.HE_CONTEXT, meta={"segment": seg, "part": "public"},
                               blob=ctx.public_context_bytes())
                secret = ctx.serialize_secret()
                for o in owners:
                    if o in (kh, holder):
                        continue
                    sealed = seal_to(spec.peers[o].transport_key, self.identity, secret)
                    self.gate.send(o, Kind.HE_CONTEXT, meta={"segment": seg, "part": "secret"}, blob=sealed)
            elif self.me == holder:
                msg = self._setup_message((Kind.HE_CONTEXT,), f"receiving the CKKS public context for '{seg}'", [kh])
                self._check_he_context(msg, seg, kh, "public")
                pub = PublicContext.from_bytes(bytes(msg.blob), params=params, max_bytes=limit)
                if pub.is_private():  # the merge holder must never be able to decrypt
                    raise RemoteProtocolError(f"'{kh}' sent a context with a secret key to the merge holder")
                self.he_ctx[seg] = pub
            elif self.me in owners:
                msg = self._setup_message((Kind.HE_CONTEXT,), f"receiving the CKKS context for '{seg}'", [kh])
                self._check_he_context(msg, seg, kh, "secret")
                secret = open_from(self.identity, spec.peers[kh].transport_key, bytes(msg.blob))
                self.he_ctx[seg] = KeyHolderContext.from_secret_bytes(secret, params=params, max_bytes=limit)

    @staticmethod
    def _check_he_context(msg: Message, seg: str, kh: str, part: str) -> None:
        if msg.binding.sender != kh or msg.meta.get("segment") != seg or msg.meta.get("part") != part:
            raise RemoteProtocolError(
                f"unexpected CKKS context from '{msg.binding.sender}' (segment {msg.meta.get('segment')!r}, "
                f"part {msg.meta.get('part')!r}); expected the {part} context for '{seg}' from '{kh}'"
            )

    def _send_he(self, o: Outgoing, segment: str) -> None:
        """Owner: encrypt a cut tensor for an HE merge. Merge holder: return the aggregate's gradient."""
        from secure_split.crypto.he import encrypt_packed

        if o.kind == "activation":
            arr = o.tensor.detach().reshape(o.tensor.shape[0], -1).numpy()
            enc = encrypt_packed(self.he_ctx[segment], arr)
            self.gate.send(o.to_peer, Kind.ENCRYPTED_ACTIVATION, step=o.step, edge=o.edge,
                           meta={"segment": segment, "phase": o.phase}, blob=enc.serialize())
        else:
            self.gate.send(o.to_peer, Kind.AGGREGATE_GRADIENT, step=o.step, edge=o.edge,
                           meta={"phase": o.phase}, tensors=(to_wire(o.tensor),))

    def _on_he_message(self, msg: Message) -> None:
        from secure_split.crypto.he import EncryptedTensor, mask_aggregate, unmask

        spec = self.deployment.spec
        step = msg.binding.step
        limit = spec.limits.max_message_bytes
        if msg.kind == Kind.AGGREGATE_GRADIENT:
            self._send_outgoing(self.executor.on_gradient(msg.edge, from_wire(msg.tensors[0])))
            return
        segment = str(msg.meta.get("segment", ""))
        if segment not in self.he_segments or spec.segments[segment].peer != self.me:
            raise RemoteProtocolError(f"'{msg.binding.sender}' sent {msg.kind.value} for '{segment}', which '{self.me}' does not hold")
        key = (step, segment)
        if msg.kind == Kind.ENCRYPTED_ACTIVATION:
            in_edges = [e.name for e in spec.edges if e.to == segment]
            if msg.edge not in in_edges or spec.segments[msg.edge.split("->")[0]].peer != msg.binding.sender:
                raise RemoteProtocolError(f"'{msg.binding.sender}' sent an encrypted activation on edge {msg.edge}")
            got = self.he_pending.setdefault(key, {})
            if msg.edge in got:
                raise RemoteProtocolError(f"duplicate encrypted activation on {msg.edge} for step {step}")
            got[msg.edge] = EncryptedTensor.from_bytes(self.he_ctx[segment], bytes(msg.blob), max_bytes=limit)
            if len(got) == len(in_edges):
                contributions = [got[e] for e in in_edges]
                masked, mask = mask_aggregate(self.he_ctx[segment], contributions)
                self.he_masks[key] = mask
                del self.he_pending[key]
                kh = self.he_key_holders[segment]
                assert kh is not None
                self.gate.send(kh, Kind.MASKED_AGGREGATE, step=step, meta={"segment": segment},
                               blob=masked.serialize())
            return
        # The key holder's rounded decryption of sum + mask.
        if msg.binding.sender != self.he_key_holders[segment] or key not in self.he_masks:
            raise RemoteProtocolError(f"unexpected masked aggregate from '{msg.binding.sender}' for step {step}")
        mask = self.he_masks.pop(key)
        rounded = np.frombuffer(bytes(msg.blob), dtype="<f8")
        if rounded.size != int(np.prod(mask.shape)):
            raise RemoteProtocolError(f"masked aggregate from '{msg.binding.sender}' has {rounded.size} values, expected {int(np.prod(mask.shape))}")
        total = unmask(mask, rounded.reshape(mask.shape)).astype("<f4")
        tensor = from_wire(WireTensor("float32", tuple(int(x) for x in total.shape), total.tobytes()))
        self._send_outgoing(self.executor.on_aggregate(segment, tensor, step=step))

    def _decrypt_for_holder(self, msg: Message) -> None:
        """Key holder: decrypt the merge holder's masked sum, rounded, and send it back."""
        from secure_split.crypto.he import EncryptedTensor, decrypt_rounded

        segment = str(msg.meta.get("segment", ""))
        holder = self.deployment.spec.segments[segment].peer
        if msg.binding.sender != holder:
            raise RemoteProtocolError(f"'{msg.binding.sender}' asked for a decryption at '{segment}', held by '{holder}'")
        ctx = self.he_ctx[segment]
        enc = EncryptedTensor.from_bytes(ctx, bytes(msg.blob), max_bytes=self.deployment.spec.limits.max_message_bytes)
        rounded = np.ascontiguousarray(decrypt_rounded(ctx, enc), dtype="<f8")
        self.gate.send(holder, Kind.MASKED_AGGREGATE, step=msg.binding.step, meta={"segment": segment},
                       blob=rounded.tobytes())

    # -- handshake ----------------------------------------------------------------------------

    def _handshake(self) -> None:
        limits = self.deployment.spec.limits
        for peer in self.counterparties:
            self.gate.send_hello(peer)
        deadline = time.monotonic() + limits.handshake_timeout_s
        while True:
            pending = [p for p in self.counterparties if self.gate.sessions[p].state.name != "ESTABLISHED"]
            if not pending:
                break
            if time.monotonic() > deadline:
                for p in pending:
                    self.audit.record("peer_lost", counterparty=p, reason="no handshake within the deadline")
                raise PeerTimeout(", ".join(pending), limits.handshake_timeout_s, "waiting for the handshake")
            msg = self._receive_one(0.2)
            if msg is not None and msg.kind != Kind.HELLO:
                self._dispatch(msg)
        for p in self.counterparties:
            self.audit.record("peer_joined", counterparty=p, reason="handshake complete")

    # -- coordinator ----------------------------------------------------------------------------

    def _broadcast(self, kind: Kind, *, step: int = 0, meta: dict[str, Any] | None = None,
                   tensors: tuple[WireTensor, ...] = ()) -> None:
        for peer in self.counterparties:
            self.gate.send(peer, kind, step=step, meta=meta, tensors=tensors)

    def _broadcast_shutdown(self, status: str, reason: str) -> None:
        for peer in self.counterparties:
            if not self._reachable(peer):
                continue
            try:
                self.gate.send(peer, Kind.SHUTDOWN, meta={"status": status, "reason": _clip(reason)})
            except SecureSplitError as exc:
                self.audit.record("error", reason=f"could not tell '{peer}' to shut down: {exc}", error=type(exc).__name__)

    def _reachable(self, peer: str) -> bool:
        """Whether to send `peer` anything still (subclasses leave out peers they carry on without)."""
        return True

    def _notify_coordinator_of_failure(self, reason: str) -> None:
        coordinator = self.deployment.spec.coordinator
        session = self.gate.sessions.get(coordinator)
        if session is not None and session.state.name == "ESTABLISHED":
            # The code carries our exit code, so the coordinator can exit with the same cause.
            self.gate.refuse(coordinator, f"'{self.me}' stopped: {reason}", f"peer_failed:{int(self.result.exit_code)}")

    def _announce(self, step: int, phase: str, ids: np.ndarray, epoch: int) -> None:
        self._broadcast(Kind.STEP_BEGIN, step=step, meta={"epoch": epoch, "phase": phase}, tensors=(_ids_wire(ids),))

    def _run_step(self, step: int, phase: str, ids: np.ndarray, epoch: int, *, announced: bool = False,
                  then: tuple[int, str, np.ndarray] | None = None) -> None:
        """Run one step here and wait until it is complete.

        `then` (the next step of the same epoch) is announced to the followers as soon as this
        step has begun here: they receive and check its step_begin while they wait on this step
        (it stays in their queue until this step is complete), instead of after it.
        """
        if not announced:
            self._announce(step, phase, ids, epoch)
        self._begin(step, phase, ids)
        if then is not None:
            self._announce(*then, epoch)
        self._wait(
            lambda: self.current_step is None,
            lambda: f"running {phase} step {step}",
            lambda: self.counterparties,
        )

    def _coordinate(self) -> None:
        spec = self.deployment.spec
        training = spec.training
        if self.data is None:
            raise ConfigError(ConfigProblem(str(self.cfg.path), "data", "the coordinator needs a data file with the sample ids"))
        ids = self.data.ids.numpy() if hasattr(self.data.ids, "numpy") else np.asarray(self.data.ids)
        train_ids, test_ids = split_train_test(ids, training.test_fraction, training.seed)
        resume_epoch = self._resume_epoch()
        start_epoch = resume_epoch + 1
        self._barrier(resume_epoch, "start")
        step = 0
        n_epochs = training.epochs
        timing: list[dict[str, float]] = []  # wall seconds per epoch, for benchmarks (bench/split_vs_local.py)
        for epoch in range(start_epoch, n_epochs):
            self.epoch_metrics = _EpochMetrics()
            batches = epoch_batches(train_ids, training.batch_size, training.seed, epoch, training.max_steps_per_epoch)
            step = max(step, epoch * 1_000_000)  # steps are unique across epochs and resumes
            plan = [("train", b) for b in batches] + [("eval", b) for b in eval_batches(test_ids, training.batch_size)]
            first = step + 1
            marks = [time.perf_counter()]  # epoch start, train end, eval end, barrier end
            for i, (phase, batch) in enumerate(plan):
                if i == len(batches):
                    marks.append(time.perf_counter())
                step += 1
                nxt = (step + 1, *plan[i + 1]) if i + 1 < len(plan) else None
                self._run_step(step, phase, batch, epoch, announced=step > first, then=nxt)
                if phase != "train":
                    continue
                tasks = getattr(self.last_step_metrics, "tasks", {})
                loss = next(iter(tasks.values())).loss_sum / max(1, next(iter(tasks.values())).count) if tasks else None
                self.progress({"event": "step", "epoch": epoch, "epochs": n_epochs, "step": i + 1,
                               "steps": len(batches), "loss": loss})
            marks += [time.perf_counter()] * (3 - len(marks))
            values = self._barrier(epoch, "epoch_end")
            marks.append(time.perf_counter())
            timing.append({"epoch": epoch, "train_steps": len(batches), "eval_steps": len(plan) - len(batches),
                           **{k: b - a for k, a, b in zip(("train_s", "eval_s", "barrier_s"), marks, marks[1:], strict=False)}})
            self.history.append({"epoch": epoch, "values": values})
            self.result.epochs_done = epoch + 1
            self.progress({"event": "epoch", "epoch": epoch, "epochs": n_epochs, "values": values})
        self.result.metrics = {"history": self.history, "final": self._scalar_metrics(), "timing": timing}
        self._broadcast_shutdown("ok", "training finished")

    def _resume_epoch(self) -> int:
        """Coordinator: the newest checkpoint every peer has (-1: none, or not resuming)."""
        if not self.resume:
            return -1
        common = set(self.available_checkpoints)
        for p in self.counterparties:
            theirs = (self.gate.sessions[p].remote_hello_meta or {}).get("checkpoints")
            common &= {int(x) for x in theirs if isinstance(x, int)} if isinstance(theirs, list) else set()
        return max(common) if common else -1

    def _barrier(self, epoch: int, reason: str) -> dict[str, float]:
        """Coordinator side of a barrier. Returns the merged metrics of every peer."""
        self._broadcast(Kind.BARRIER, step=epoch + 1, meta={"epoch": epoch, "reason": reason})
        own = self._barrier_local(epoch, reason)
        self._wait(
            lambda: len(self.acks.get(epoch, {})) == len(self.counterparties),
            lambda: f"waiting for every peer at the {reason} barrier of epoch {epoch}",
            lambda: sorted(set(self.counterparties) - set(self.acks.get(epoch, {}))),
        )
        merged = dict(own)
        for values in self.acks.get(epoch, {}).values():
            merged.update(values)
        return merged

    # -- both roles ---------------------------------------------------------------------------

    def _barrier_local(self, epoch: int, reason: str) -> dict[str, float]:
        """What every peer does at a barrier: checkpoint, sign, exchange heads, report metrics."""
        if reason == "start":
            if epoch >= 0:
                load_checkpoint(self.checkpoint_dir, epoch, self.executor)
                self.audit.record("checkpoint_resumed", epoch=epoch, digest=_checkpoint_digest(self.checkpoint_dir, epoch))
        elif reason == "epoch_end":
            path = save_checkpoint(
                self.checkpoint_dir, epoch=epoch, executor=self.executor,
                meta={"deployment": self.deployment.hash, "peer": self.me, "policy": self.policy.hash},
            )
            self.audit.record("checkpoint_saved", epoch=epoch, digest=_checkpoint_digest(self.checkpoint_dir, epoch))
            del path
        head = self.audit.checkpoint(f"{reason} barrier, epoch {epoch}")
        meta = head.to_meta()
        # Receipts are keyed by barrier id (= epoch + 1; the start barrier of a fresh run is 0).
        key = epoch + 1
        for peer in self._receipt_peers():
            self.gate.send(peer, Kind.AUDIT_RECEIPT, step=key, meta=meta)
        self._wait(
            lambda: self.receipts.get(key, set()) >= set(self._receipt_peers()),
            lambda: f"exchanging signed audit heads at epoch {epoch}",
            lambda: sorted(set(self._receipt_peers()) - self.receipts.get(key, set())),
        )
        values = self.epoch_metrics.values() if reason == "epoch_end" else {}
        return values

    def _receipt_peers(self) -> list[str]:
        """The peers this one exchanges signed audit heads with at a barrier."""
        return self.counterparties

    def _on_barrier(self, msg: Message) -> None:
        epoch = _meta_int(msg, "epoch", -1)
        reason = str(msg.meta.get("reason", "epoch_end"))
        values = self._barrier_local(epoch, reason)
        if reason == "epoch_end":
            self.history.append({"epoch": epoch, "values": values})
            self.result.epochs_done = epoch + 1
            self.epoch_metrics = _EpochMetrics()
        self.gate.send(
            self.deployment.spec.coordinator, Kind.BARRIER_ACK, step=epoch + 1,
            meta={"epoch": epoch, "values": values},
        )

    # -- follower ----------------------------------------------------------------------------------

    def _follow(self) -> None:
        coordinator = self.deployment.spec.coordinator
        self._wait(
            lambda: self.shutdown_status is not None,
            lambda: "waiting for the coordinator's schedule",
            lambda: [coordinator] if self.current_step is None else self.counterparties,
        )
        self.result.metrics = {"history": self.history, "final": self._scalar_metrics()}


def _clip(text: str, limit: int = 3000) -> str:
    """Cut text to at most `limit` UTF-8 bytes (the audit log refuses strings over 4 KiB)."""
    data = text.encode("utf-8")
    return text if len(data) <= limit else data[:limit].decode("utf-8", errors="ignore")


def _meta_int(msg: Message, key: str, default: int) -> int:
    """An int from a message's meta (the codec already checked the type per kind)."""
    value = msg.meta.get(key, default)
    return value if isinstance(value, int) else default


def _ids_wire(ids: Any) -> WireTensor:
    """Sample ids travel as a 1-D little-endian int64 tensor."""
    arr = np.ascontiguousarray(np.asarray(ids), dtype="<i8")
    return WireTensor("int64", (int(arr.shape[0]),), arr.tobytes())


def _ids_from_wire(w: WireTensor) -> np.ndarray:
    if w.dtype != "int64" or len(w.shape) != 1:
        raise RemoteProtocolError(f"step_begin ids must be a 1-D int64 tensor, got {w.dtype}{list(w.shape)}")
    return np.frombuffer(w.data, dtype="<i8").copy()


def _resume_problem(log_path: Path, deployment: Deployment) -> str | None:
    """Why `--resume` cannot continue this peer's audit log under `deployment`, or None."""
    import json

    try:
        with open(log_path, "rb") as fh:
            theirs = json.loads(fh.readline(1 << 20))["data"]["deployment_hash"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no log yet, or one the audit layer judges when it opens it
    if not isinstance(theirs, str) or theirs == deployment.hash:
        return None
    return (
        f"cannot resume: audit log {log_path} was written under deployment {theirs}, but {deployment.path} "
        f"now hashes to {deployment.hash}; --resume needs the same deployment.yaml (training settings included) "
        "at every peer; to change it, start a new run with fresh audit and checkpoint folders"
    )


def _checkpoint_digest(directory: Path, epoch: int) -> str:
    """Digest of a checkpoint's metadata file (which itself pins the weights' SHA-256)."""
    from secure_split.canonical import sha256_hex

    meta = directory / f"epoch-{epoch:04d}.json"
    return sha256_hex(meta.read_bytes()) if meta.is_file() else ""


def make_runtime(config_path: str | Path, *, resume: bool = False, progress: ProgressFn | None = None) -> PeerRuntime:
    """The runtime for a peer config: `PeerRuntime`, or `HorizontalRuntime` for the sequential
    and splitfed schedules."""
    cfg = load_peer_config(config_path)
    if load_deployment(cfg.deployment_path).spec.training.schedule in ("sequential", "splitfed"):
        from secure_split.peer.horizontal import HorizontalRuntime

        return HorizontalRuntime(config_path, resume=resume, progress=progress)
    return PeerRuntime(config_path, resume=resume, progress=progress)


def run_peer(config_path: str | Path, *, resume: bool = False, progress: ProgressFn | None = None) -> PeerResult:
    """Load a peer config and run the peer (see `make_runtime`)."""
    return make_runtime(config_path, resume=resume, progress=progress).run()
