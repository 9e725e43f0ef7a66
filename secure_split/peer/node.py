"""One peer process: open, shake hands, run a schedule over one inbound path, close.

`PeerNode` decides *how* a peer runs; a `Schedule` (`peer/schedule.py`) decides *what* it does.

Lifecycle (`run`): open the audit log (continued on resume), the transport and the gate; send
HELLO to every counterparty and wait until each session is established; `schedule.set_up()`;
`schedule.run()`; write `run_end` and close. An expected failure (a `SecureSplitError`, Ctrl-C)
ends the run with its exit code and a reason the others are told; nothing escapes as a traceback.

The inbound path (`wait`): every message of this peer arrives through `_pump`: transport events
first (a connection down past the grace period is a lost peer), then one `gate.receive` (sender
authenticated by its CURVE key, header bounded, session binding and replay window, policy,
payload, audit entry), then the node's own kinds, then the schedule:

- `hello` after the handshake: a restarted counterparty (new session) or, for a server, a new client;
- `error` / `refuse`: a notice about a frame we never sent is recorded; anything else is the
  schedule's to judge (`on_remote_error`), else the run stops with the sender's reason;
- `audit_receipt`: a counterparty's signed head, verified and recorded (`exchange_heads` waits on them);
- everything else: `schedule.on_message`; a message it leaves for later waits in a bounded queue
  and is offered again after the next message the schedule took.

A message the gate or the schedule refuses is audited, answered with an `error` and counted
against its sender's violation budget; the run goes on until the sender's refusals exceed
`limits.max_violations` within `limits.violation_window_s` (exit 4 when all were policy denials,
else 5). A refused handshake stops it at once.
"""

from __future__ import annotations

import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

import secure_split
from secure_split.audit import AuditLog, MetricsStatement, SignedHead, compute_run_id
from secure_split.config import retired_transport_keys
from secure_split.deployment_diff import deployment_section_digests, explain_deployment_mismatch
from secure_split.errors import (
    AuditError,
    CryptoError,
    ExitCode,
    HandshakeRefused,
    PeerTimeout,
    PolicyDenied,
    RemoteProtocolError,
    SecureSplitError,
    TrainingError,
)
from secure_split.peer.context import PeerContext, PeerResult, clip
from secure_split.peer.effects import Effect, Record, Send
from secure_split.peer.gate import Gate
from secure_split.peer.metrics import PeerMetrics
from secure_split.peer.rounds.barrier import CLOSE_KEY, HeadExchange
from secure_split.peer.schedule import ProgressFn, Schedule
from secure_split.peer.status import OpsLog
from secure_split.protocol import Kind, Message, PeerSession, SessionState, WireTensor
from secure_split.protocol.bounds import ViolationBudget
from secure_split.transport import Transport, TransportPeer
from secure_split.transport.resources import ensure_open_file_limit, open_files_needed

__all__ = ["PeerNode"]

# How long a disconnected counterparty may stay away before we name it as lost.
_RECONNECT_GRACE_S = 3.0
# Refusal codes (see gate.Gate.receive) for frames our own gate cannot have produced: a counterparty's
# `error` with one of these is a notice, not a reason to stop.
_NOT_SENT_BY_US_CODES = frozenset({"bad_frame", "spoofed"})
_POLL_S = 0.2


class PeerNode:
    """Runs one peer from its loaded context to a clean exit (see the module docstring).

    Args:
        ctx: the peer's loaded and checked files.
        schedule: what the peer does.
        resume: continue this peer's audit chain (a resumed run, a server after training).
        progress: receives progress events.
        accepts_restarted_peers: a counterparty's second HELLO opens a new session (a restarted
            process, a new prediction request) instead of being refused.
        counterparties: the peers to talk to (default: those the deployment's flows name).
        handshake: say HELLO to every counterparty first (a server waits for its clients instead).
        serving: a server: a refused handshake or a policy-denied message from a client ends
            nothing but that client's attempt.
    """

    def __init__(self, ctx: PeerContext, schedule: Schedule, *, resume: bool = False,
                 progress: ProgressFn | None = None, accepts_restarted_peers: bool = False,
                 counterparties: Sequence[str] | None = None, handshake: bool = True, serving: bool = False) -> None:
        self.ctx = ctx
        self.schedule = schedule
        self.resume = resume
        self.accepts_restarted_peers = accepts_restarted_peers
        self.does_handshake = handshake
        self.serving = serving
        self._progress = progress or (lambda event: None)
        self.result: PeerResult = ctx.new_result()
        role = "coordinator" if ctx.is_coordinator else "peer"
        self.metrics = PeerMetrics(ctx.me, list(ctx.counterparties if counterparties is None else counterparties),
                                   deployment_hash=ctx.deployment.hash, policy_hash=ctx.policy.hash,
                                   version=secure_split.__version__, role=role)
        self.ops: OpsLog | None = None
        self.counterparties: list[str] = list(ctx.counterparties if counterparties is None else counterparties)
        self.receipts: dict[int, set[str]] = {}
        self.handshaking = True
        self._later: deque[Message] = deque()
        self._lost_since: dict[str, float] = {}
        self._budgets: dict[str, ViolationBudget] = {}
        self._restarts: dict[str, int] = {}
        self._early_receipts: list[Message] = []  # heads of a run announced to others before to us
        self._sections = deployment_section_digests(ctx.deployment)
        self._dirty = False
        schedule.attach(self)

    # -- the pieces schedules use -----------------------------------------------------------

    @property
    def me(self) -> str:
        """This peer's name."""
        return self.ctx.me

    def progress(self, event: dict[str, Any]) -> None:
        """Report progress to the operator's display, the metrics endpoint and the ops log."""
        name = event.get("event")
        if name == "step":
            self.metrics.on_step(int(event.get("step", 0)), int(event.get("epoch", 0)), event.get("loss"))
        elif name == "epoch" and self.ops is not None:
            self.ops.event("epoch", epoch=event.get("epoch"), epochs=event.get("epochs"), values=event.get("values", {}))
        elif name in ("owner_lost", "owner_joined", "waiting", "rejoined", "rollback") and self.ops is not None:
            self.ops.event(str(name), **{k: v for k, v in event.items() if k != "event"})
        self._progress({"peer": self.me, **event})

    def state(self, state: str, detail: str = "") -> None:
        """What this peer is doing now (handshake, setup, training, waiting, closing, ...)."""
        self.metrics.set_state(state)
        if self.ops is not None:
            self.ops.event("state", state=state, detail=detail)

    def record(self, event: str, **fields: Any) -> int:
        """Write one audit entry."""
        return self.audit.record(event, **fields)

    def send(self, to: str, kind: Kind, *, step: int = 0, edge: str = "", meta: Mapping[str, Any] | None = None,
             tensors: Sequence[WireTensor] = (), blob: bytes = b"", raw: np.ndarray | None = None) -> Message:
        """Send one message through the gate (policy, egress guards, audit, transport).

        Raises:
            PolicyDenied: the policy refused it (audited; nothing was sent).
        """
        return self.gate.send(to, kind, step=step, edge=edge, meta=meta, tensors=tensors, blob=blob, raw=raw)

    def apply(self, effects: Iterable[Effect]) -> None:
        """Carry out a sans-IO part's effects in order."""
        for e in effects:
            if isinstance(e, Send):
                self.send(e.to, e.kind, step=e.step, edge=e.edge, meta=e.meta, tensors=e.tensors, blob=e.blob,
                          raw=e.raw)
            elif isinstance(e, Record):
                self.audit.record(e.event, **dict(e.fields))

    def refuse(self, to: str, reason: str, code: str, *, kind: Kind = Kind.ERROR) -> None:
        """Tell `to` we refused something (best effort, never raises)."""
        self.gate.refuse(to, reason, code, kind=kind)

    def session(self, peer: str) -> PeerSession | None:
        """The protocol session with `peer` (None if it is not a counterparty)."""
        return self.gate.sessions.get(peer)

    def hello_meta_of(self, peer: str) -> dict[str, Any]:
        """What `peer` said in its HELLO (empty before its HELLO arrived)."""
        session = self.gate.sessions.get(peer)
        return dict(session.remote_hello_meta or {}) if session is not None else {}

    def _can_close_with(self, peer: str) -> bool:
        """Whether the session with `peer` still carries an audit receipt (it may be shut down)."""
        session = self.gate.sessions.get(peer)
        return session is not None and session.state in (
            SessionState.ESTABLISHED, SessionState.SHUTDOWN_SENT, SessionState.SHUTDOWN_RECEIVED, SessionState.CLOSED)

    def connected(self, peer: str) -> bool:
        """Whether a transport connection with `peer` is up now (whatever its session)."""
        return peer in self.transport.connected_peers()

    def established(self, peer: str) -> bool:
        """Whether the session with `peer` is established (we may send it anything)."""
        session = self.gate.sessions.get(peer)
        return session is not None and session.state is SessionState.ESTABLISHED

    def new_session(self, peer: str) -> PeerSession:
        """A fresh protocol session with `peer` carrying the schedule's HELLO meta and this
        deployment's section digests (so a peer that runs another deployment is told which
        sections differ)."""
        meta = {"software": secure_split.__version__, "sections": self._sections, "run_nonce": self.audit.run_nonce,
                **self.schedule.hello_meta()}
        deployment = self.ctx.deployment

        def describe(theirs: Mapping[str, Any]) -> str:
            return explain_deployment_mismatch(deployment, theirs.get("sections"), peer,
                                               their_hash=str(theirs.get("deployment", "")))

        return PeerSession(self.me, peer, deployment.hash, self.ctx.policy.hash, hello_meta=meta,
                           describe_mismatch=describe)

    def reset_session(self, peer: str) -> None:
        """Replace the session with `peer` by a fresh one (after it refused our handshake)."""
        self.gate.sessions[peer] = self.new_session(peer)

    def wait(self, done: Callable[[], bool], what: Callable[[], str], waiting_on: Callable[[], list[str]]) -> None:
        """Serve messages until `done()`; stop (or let the schedule carry on) when nothing arrives
        for `limits.peer_timeout_s`, naming the peers we wait on."""
        limit = self.ctx.deployment.spec.limits.peer_timeout_s
        last_progress = time.monotonic()
        self._dirty = True  # the schedule moved on since it last waited: kept messages may fit now
        while not done():
            if self._dirty and self._later:
                self._dirty = False
                self._offer_later()
                if done():
                    return
            if self._pump(_POLL_S):
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > limit:
                self._timed_out(waiting_on() or ["(unknown)"], what(), limit)
                last_progress = time.monotonic()

    def poll(self, timeout_s: float) -> bool:
        """Serve at most one inbound message (a server's loop). True if one was taken."""
        return self._pump(timeout_s)

    def signed_head(self, reason: str) -> SignedHead:
        """Sign our audit head now (a checkpoint entry) and return it."""
        head = self.audit.checkpoint(reason)
        self.metrics.on_audit_head(head.seq)
        if self.ops is not None:
            self.ops.event("audit_head", seq=head.seq)
        return head

    def exchange_heads(self, key: int, peers: Sequence[str], reason: str, *,
                       live: Callable[[str], bool] | None = None) -> SignedHead:
        """Sign our audit head, send it to `peers` and wait until each sent us theirs for `key`
        (a barrier id, a request number); theirs are verified and recorded as they arrive. With
        `live`, a peer that stops taking part meanwhile is no longer waited for."""
        head = self.signed_head(reason)
        exchange = HeadExchange(key, peers, self.receipts, live)
        self.apply(exchange.send(head.to_meta()))
        self.wait(lambda: exchange.done, lambda: f"exchanging signed audit heads ({reason})", exchange.missing)
        return head

    def broadcast_shutdown(self, status: str, reason: str) -> None:
        """Tell every reachable counterparty the run ends (best effort)."""
        for peer in self.counterparties:
            if not self.schedule.reachable(peer) or not self.established(peer):
                continue
            try:
                self.send(peer, Kind.SHUTDOWN, meta={"status": status, "reason": clip(reason)})
            except SecureSplitError as exc:
                self.audit.record("error", reason=f"could not tell '{peer}' to shut down: {exc}", error=type(exc).__name__)

    def notify_failure(self, to: str, reason: str) -> None:
        """Tell `to` (normally the coordinator) that we stopped; the code carries our exit code."""
        if self.established(to):
            self.refuse(to, f"'{self.me}' stopped: {reason}", f"peer_failed:{int(self.result.exit_code)}")

    # -- the run's identity and what each party states (audit format 2) ------------------------

    def announce_run(self) -> dict[str, Any]:
        """Coordinator: the run id of every peer's run nonce (ours and the one in each counterparty's
        HELLO), bound into our log; returns the start barrier's meta that announces it.

        Raises:
            RemoteProtocolError: a counterparty's HELLO carried no run nonce.
        """
        nonces = {self.me: self.audit.run_nonce}
        for peer in self.counterparties:
            nonce = self.hello_meta_of(peer).get("run_nonce")
            if not isinstance(nonce, str):
                raise RemoteProtocolError(f"'{peer}' announced no run nonce in its HELLO; it runs an older release")
            nonces[peer] = nonce
        run_id = compute_run_id(self.ctx.deployment.hash, self.ctx.policy.hash, nonces)
        self._bind(run_id, nonces)
        return {"run_id": run_id, "nonces": nonces}

    def bind_announced_run(self, msg: Message) -> None:
        """Follower: record the run the coordinator's start barrier announces, after checking it
        names the nonce the coordinator's own HELLO carried (and ours: `AuditLog.bind_run`).

        Raises:
            RemoteProtocolError: no run announced, another coordinator nonce, or a run id that is
                not the hash of the nonces (audited and refused by the caller's path).
        """
        run_id, nonces = msg.meta.get("run_id"), msg.meta.get("nonces")
        sender = msg.binding.sender
        if not isinstance(run_id, str) or not isinstance(nonces, dict):
            raise RemoteProtocolError(f"'{sender}' opened the run without announcing it (run_id, nonces)")
        if nonces.get(sender) != self.hello_meta_of(sender).get("run_nonce"):
            raise RemoteProtocolError(f"'{sender}' announced a run whose nonce for '{sender}' is not the one its "
                                      "HELLO carried: a start barrier of another process")
        self._bind(run_id, {str(k): str(v) for k, v in nonces.items()})

    def _bind(self, run_id: str, nonces: dict[str, str]) -> None:
        previous = {"run_id": self.audit.run_id} if self.audit.run_id else None
        try:
            self.audit.bind_run(run_id, nonces, previous=previous)
        except AuditError as exc:
            raise RemoteProtocolError(str(exc)) from None
        # Heads of this run that came before we learnt it (a faster neighbour's barrier).
        early, self._early_receipts = self._early_receipts, []
        for msg in early:
            self._on_receipt(msg)

    def state_metrics(self, epoch: int, values: Mapping[str, float]) -> dict[str, Any]:
        """Record what this peer measured itself in `epoch`, signed; returns the barrier_ack meta
        that carries the signed statement to the coordinator."""
        if not self.audit.run_id:
            return {}
        return self.audit.record_epoch_metrics(epoch, dict(values)).to_meta()

    def record_reported_metrics(self, msg: Message) -> None:
        """Coordinator: a counterparty's signed metrics from its barrier_ack, recorded as its own
        statement (never as ours). An ack without them (a start barrier) records nothing.

        Raises:
            RemoteProtocolError: the statement does not verify or names another run.
        """
        if "metrics_sig" not in msg.meta:
            return
        sender = msg.binding.sender
        try:
            statement = MetricsStatement.from_meta(sender, dict(msg.meta), self.audit.run_id)
            self.audit.record_counterparty_metrics(statement, self.ctx.deployment.spec.peers[sender].sign_key)
        except (CryptoError, AuditError) as exc:
            raise RemoteProtocolError(f"metrics of '{sender}' refused: {exc}") from None

    def _close_round(self, status: str, reason: str) -> None:
        """Write run_end with our own metrics, send our signed close head to every counterparty
        the schedule closes with that is still there, record theirs for at most
        `limits.close_timeout_s`, then sign the final head. Never raises: whoever did not answer
        is named in `close_incomplete`."""
        expected = self.schedule.close_peers()
        try:
            head = self.audit.begin_close(status, reason, metrics=self.schedule.final_metrics())
        except SecureSplitError as exc:
            self.audit.finish_close(expected, reason=clip(f"run_end could not be written: {exc}", 500))
            return
        if not expected:
            # A server ends after its clients (each request ended with a close round of its own):
            # nobody is left to countersign its close, and the log says so.
            self.audit.finish_close(list(self.counterparties), reason="nobody is left to countersign this close: "
                                    "every client ended its request (and countersigned it) before")
            return
        there = [p for p in expected if hasattr(self, "gate") and self._can_close_with(p) and p not in self._lost_since]
        note = ""
        try:
            for peer in there:
                self.send(peer, Kind.AUDIT_RECEIPT, step=CLOSE_KEY, meta=head.to_meta())
            deadline = time.monotonic() + self.ctx.deployment.spec.limits.close_timeout_s
            while time.monotonic() < deadline and set(there) - self.receipts.get(CLOSE_KEY, set()):
                self._pump(0.05)
        except (SecureSplitError, OSError) as exc:
            note = clip(f"; the close round stopped: {exc}", 500)
        missing = sorted(set(expected) - self.receipts.get(CLOSE_KEY, set()))
        why = (f"no signed close head within {self.ctx.deployment.spec.limits.close_timeout_s:g} s, or no "
               f"session at the end{note}") if missing else ""
        self.audit.finish_close(missing, reason=why)

    # -- lifecycle ----------------------------------------------------------------------------

    def run(self) -> PeerResult:
        """Run the peer to completion. Never raises for expected failures: see `result.status`."""
        self._open()
        status, reason = "failed", ""
        try:
            status, reason = self._main()
            self.result.error = None if status == "ok" else (reason or "coordinator ended the run as failed")
        except SecureSplitError as exc:
            reason = f"{type(exc).__name__}: {exc}"
            self.result.error = reason
            self.result.exit_code = int(exc.exit_code)
            self.audit.record("error", reason=clip(reason), error=type(exc).__name__)
            self.schedule.tell_others_we_stopped(reason)
        except Exception as exc:  # a bug of ours: one line for the operator, the trace in the ops log
            reason = f"internal error ({type(exc).__name__}: {exc}); this is a bug in secure_split, please report it"
            self.result.error = reason
            self.result.exit_code = int(ExitCode.FAILED)
            self.audit.record("error", reason=clip(reason), error=type(exc).__name__)
            if self.ops is not None:
                self.ops.event("internal_error", error=type(exc).__name__, trace=clip(traceback.format_exc(), 7000))
            self.schedule.tell_others_we_stopped(reason)
        except KeyboardInterrupt:
            reason = "interrupted by the operator"
            self.result.error = reason
            self.result.exit_code = int(ExitCode.INTERRUPTED)
            self.audit.record("error", reason=reason, error="KeyboardInterrupt")
            # Tell the others at once rather than let them wait for a timeout.
            self.schedule.tell_others_we_stopped(reason)
        finally:
            self.state("closing")
            self.result.status = status
            self.result.bytes_sent = self.transport.bytes_sent
            self.result.bytes_received = self.transport.bytes_received
            self.result.messages_sent = self.gate.stats.sent
            self.result.messages_received = self.gate.stats.received
            self.result.refused = self.gate.stats.refused_in + self.gate.stats.refused_out
            self.result.wall_s = time.monotonic() - self.ctx.started
            self._close_round(status, clip(reason))
            # Linger briefly so our last messages leave before the sockets close.
            self.transport.close()
            self.state("finished" if status == "ok" else "failed", clip(self.result.error or "", 500))
            if self.ops is not None:
                self.ops.event("peer_end", status=status, exit_code=self.result.exit_code, error=self.result.error)
                self.ops.close()
            self.metrics.stop()
        return self.result

    def _main(self) -> tuple[str, str]:
        self.schedule.prepare()
        if self.does_handshake:
            self.state("handshake")
            self.handshake()
        else:
            self.handshaking = False
        self.state("setup")
        self.schedule.set_up()
        self.state(self.schedule.working_state())
        return self.schedule.run()

    def _open(self) -> None:
        ctx = self.ctx
        spec = ctx.deployment.spec
        limits = spec.limits
        # Enough open files for every connection our caps admit, or a clear refusal now (not an
        # EMFILE traceback at the next checkpoint save while outsiders hold connections).
        ensure_open_file_limit(open_files_needed(len(self.counterparties), max_unauthenticated=limits.max_unauthenticated,
                                                 connections_per_peer=limits.connections_per_peer))
        ctx.cfg.audit_dir.mkdir(parents=True, exist_ok=True)
        if ctx.cfg.spec.metrics is not None:
            self.metrics.start_http(ctx.cfg.spec.metrics.host, ctx.cfg.spec.metrics.port)
        if ctx.cfg.ops_log_path is not None:
            self.ops = OpsLog(ctx.cfg.ops_log_path, self.me, secrets=ctx.identity.secret_text_forms())
            self.ops.start(deployment=ctx.deployment.hash, policy=ctx.policy.hash, version=secure_split.__version__,
                           resume=self.resume, metrics_url=ctx.cfg.metrics_url)
        self.audit = AuditLog.open(
            ctx.audit_path, peer=self.me, identity=ctx.identity, deployment_hash=ctx.deployment.hash,
            policy_hash=ctx.policy.hash, resume=self.resume,
            versions={"secure_split": secure_split.__version__, "protocol": secure_split.PROTOCOL_VERSION},
        )
        self.apply(self.schedule.start_records())
        peers = {
            name: TransportPeer(name=name, endpoint=p.endpoint, transport_key=p.transport_key)
            for name, p in spec.peers.items()
            if name in self.counterparties
        }
        self.transport = Transport(
            self.me, spec.peers[self.me].endpoint, ctx.identity.transport_secret_z85, ctx.identity.transport_public_z85,
            peers, max_message_bytes=limits.max_message_bytes, heartbeat_s=limits.heartbeat_s,
            handshake_timeout_s=limits.unauthenticated_timeout_s, retired_keys=retired_transport_keys(spec),
            max_unauthenticated=limits.max_unauthenticated,
            max_unauthenticated_per_source=limits.max_unauthenticated_per_source,
            connections_per_peer=limits.connections_per_peer, inbound_queue_messages=limits.inbound_queue_messages,
        )
        self.transport.start()
        self.gate = Gate(
            me=self.me, deployment_hash=ctx.deployment.hash, policy=ctx.policy, audit=self.audit,
            transport=self.transport, sessions={name: self.new_session(name) for name in self.counterparties},
            max_message_bytes=limits.max_message_bytes,
            session_factory=self._restarted_session if self.accepts_restarted_peers else None,
            observer=self.metrics,
            refusal_audit=(limits.refusal_audit_per_s, limits.refusal_audit_burst),
        )

    def _restarted_session(self, peer: str) -> PeerSession:
        """A counterparty's new process opens a new session, at most `limits.max_rejoins` times.

        Raises:
            RemoteProtocolError: it restarted more often than that (the HELLO is refused).
        """
        count = self._restarts[peer] = self._restarts.get(peer, 0) + 1
        limit = self.ctx.deployment.spec.limits.max_rejoins
        if count > limit:
            raise RemoteProtocolError(f"'{peer}' restarted {count} times in this run (limits.max_rejoins = {limit}); "
                                      "its new session is refused")
        return self.new_session(peer)

    def handshake(self) -> None:
        """HELLO to every counterparty; wait until every session is established."""
        limits = self.ctx.deployment.spec.limits
        for peer in self.counterparties:
            self.gate.send_hello(peer)
        deadline = time.monotonic() + limits.handshake_timeout_s
        while True:
            pending = [p for p in self.counterparties if not self.established(p)]
            if not pending:
                break
            if time.monotonic() > deadline:
                for p in pending:
                    self.audit.record("peer_lost", counterparty=p, reason="no handshake within the deadline")
                raise PeerTimeout(", ".join(pending), limits.handshake_timeout_s, "waiting for the handshake")
            self._pump(_POLL_S)
        self.handshaking = False
        for p in self.counterparties:
            self.audit.record("peer_joined", counterparty=p, reason="handshake complete")

    # -- the inbound path -------------------------------------------------------------------------

    def _pump(self, timeout_s: float) -> bool:
        """Poll transport events and take at most one message. True if a message was taken."""
        self._poll_events()
        msg = self._receive(timeout_s)
        if msg is None:
            return False
        self._dispatch(msg)
        return True

    def _receive(self, timeout_s: float) -> Message | None:
        # A refused handshake ends a run (a server only forgets that client's attempt). Any other
        # refusal was audited and answered by the gate: it counts against the sender's budget.
        try:
            return self.gate.receive(timeout_s)
        except HandshakeRefused:
            if not self.serving:
                raise
            for name, session in list(self.gate.sessions.items()):
                if session.state is SessionState.REFUSED:
                    self.reset_session(name)
            return None
        except RemoteProtocolError as exc:
            if exc.peer is not None and not self.serving:
                self._count_violation(exc.peer, str(exc))
            return None
        except PolicyDenied as exc:
            if self.serving:
                return None
            if exc.peer is None:
                raise
            self._count_violation(exc.peer, str(exc), policy=True)
            return None

    def _poll_events(self) -> None:
        now = time.monotonic()
        for ev in self.transport.events():
            if ev.kind in ("auth_refused", "connection_cut", "message_dropped"):
                # Evidence of what outsiders (or a listed peer's connection) tried; rate-limited
                # by the log, so a flood cannot fill the disk.
                self.audit.record_refusal(ev.peer or "(unauthenticated)", clip(f"{ev.kind}: {ev.detail}", 1500))
                continue
            if ev.peer is None or ev.peer not in self.counterparties:
                continue
            if ev.kind == "disconnected":
                self._lost_since.setdefault(ev.peer, now)
                self.metrics.on_connectivity(ev.peer, False)
            elif ev.kind == "connected":
                self.metrics.on_connectivity(ev.peer, True)
                if self._lost_since.pop(ev.peer, None) is not None:
                    self.audit.record("peer_joined", counterparty=ev.peer, reason="reconnected")
            elif ev.kind == "handshake_failed":
                self.audit.record("error", reason=clip(f"transport handshake with '{ev.peer}' failed: {ev.detail}"),
                                  error="TransportError")
        grace = max(_RECONNECT_GRACE_S, 3 * self.ctx.deployment.spec.limits.heartbeat_s)
        for peer, since in list(self._lost_since.items()):
            if now - since > grace:
                del self._lost_since[peer]
                reason = "connection lost (heartbeat timeout)"
                if not self.schedule.on_peer_lost(peer, reason, timed_out=False):
                    self.audit.record("peer_lost", counterparty=peer, reason=reason)
                    raise PeerTimeout(peer, now - since, "the connection dropped (stalled or stopped peer)")

    def _timed_out(self, names: list[str], what: str, limit: float) -> None:
        down = [n for n in names if n in self._lost_since or n not in self.transport.connected_peers()]
        for n in down:  # silent because gone: its connection is down
            self._lost_since.pop(n, None)
            if not self.schedule.on_peer_lost(n, "connection lost (no answer, no connection)", timed_out=False):
                self.audit.record("peer_lost", counterparty=n, reason="connection lost")
                raise PeerTimeout(n, limit, what)
        if down:
            return
        reason = f"no answer within {limit:.0f} s while {what}"
        if names and all(self.schedule.on_peer_lost(n, reason, timed_out=True) for n in names):
            return
        for n in names:
            self.audit.record("peer_lost", counterparty=n, reason=reason)
        raise PeerTimeout(", ".join(names), limit, what)

    def _dispatch(self, msg: Message) -> None:
        kind = msg.kind
        if kind == Kind.HELLO:
            self._on_hello(msg)
            return
        if kind in (Kind.ERROR, Kind.REFUSE):
            self._on_error(msg)
            return
        if kind == Kind.AUDIT_RECEIPT:
            self._on_receipt(msg)
            return
        self._offer(msg)

    def _offer(self, msg: Message) -> None:
        """Give `msg` to the schedule; keep it for later if it is not taken now."""
        try:
            taken = self.schedule.on_message(msg)
        except RemoteProtocolError as exc:
            self.refuse_message(msg, exc)
            return
        if not taken:
            self._keep_for_later(msg)
            return
        self._dirty = True

    def _offer_later(self) -> None:
        """Offer the kept messages again, in arrival order, until none is taken."""
        progressed = True
        while progressed and self._later:
            progressed = False
            for _ in range(len(self._later)):
                msg = self._later.popleft()
                try:
                    taken = self.schedule.on_message(msg)
                except RemoteProtocolError as exc:
                    self.refuse_message(msg, exc)
                    progressed = True
                    break
                if taken:
                    progressed = True
                    break
                self._later.append(msg)

    def _keep_for_later(self, msg: Message) -> None:
        """Keep a message the schedule cannot take yet, within the sender's bounds: at most
        `limits.max_queued_messages` messages and 4 x `limits.max_message_bytes` of payload."""
        sender = msg.binding.sender
        limits = self.ctx.deployment.spec.limits
        mine = [m for m in self._later if m.binding.sender == sender]
        held = sum(_payload_bytes(m) for m in mine) + _payload_bytes(msg)
        if len(mine) >= limits.max_queued_messages or held > 4 * limits.max_message_bytes:
            self.refuse_message(msg, RemoteProtocolError(
                f"'{sender}' has {len(mine)} messages ({held} bytes) waiting for a later step already "
                f"(limits.max_queued_messages = {limits.max_queued_messages}); {msg.kind.value} for step "
                f"{msg.binding.step} refused", code="busy"))
            return
        self._later.append(msg)

    def forget_later(self, peer: str) -> None:
        """Drop the kept messages of `peer` (it restarted or was lost: they will never fit)."""
        self._later = deque(m for m in self._later if m.binding.sender != peer)

    def take_later(self) -> list[Message]:
        """Remove and return every kept message (a server restarts its queue)."""
        out = list(self._later)
        self._later.clear()
        return out

    def refuse_message(self, msg: Message, exc: RemoteProtocolError) -> None:
        """A message the schedule refused: audited, answered, counted; this peer goes on until
        the sender's violations exceed the budget (`_count_violation`)."""
        sender = msg.binding.sender
        self.gate.refused_after_decoding(msg, exc)
        if msg.kind not in (Kind.ERROR, Kind.REFUSE):
            self.refuse(sender, f"refused by {self.me}: {exc}", exc.code)
        self._count_violation(sender, str(exc))

    def _count_violation(self, peer: str, reason: str, *, policy: bool = False) -> None:
        """Count one refused message of `peer`; past `limits.max_violations` within
        `limits.violation_window_s`, stop naming it (exit 4 where every refusal was the policy's,
        else 5).

        Raises:
            ViolationLimit: the budget is exhausted.
        """
        limits = self.ctx.deployment.spec.limits
        budget = self._budgets.get(peer)
        if budget is None:
            budget = self._budgets[peer] = ViolationBudget(peer, limits.max_violations, limits.violation_window_s)
        if budget.record(time.monotonic(), reason, policy_denied=policy):
            raise budget.stop_error()

    def _on_hello(self, msg: Message) -> None:
        sender = msg.binding.sender
        restarted = sender in self.gate.take_rejoined()
        session = self.gate.sessions[sender]
        if session.state is SessionState.HELLO_RECEIVED:
            self.gate.send_hello(sender)
        if restarted:
            self._lost_since.pop(sender, None)
            self.forget_later(sender)
            self.schedule.on_peer_restarted(sender)
        elif not self.handshaking:
            self._offer(msg)

    def _on_error(self, msg: Message) -> None:
        sender = msg.binding.sender
        reason = str(msg.meta.get("reason", ""))
        code = str(msg.meta.get("code", ""))
        if msg.kind == Kind.ERROR and code in _NOT_SENT_BY_US_CODES:
            # Our gate never sends an undecodable or misaddressed frame: another holder of our key
            # did. The counterparty refused it and keeps serving; so do we, with the notice on record.
            self.audit.record("error", error="RemoteProtocolError", reason=clip(
                f"'{sender}' refused a frame that arrived under our key but was not sent by us ({code}): {reason}"
            ))
            return
        if self.schedule.on_remote_error(msg):
            return
        err = TrainingError(f"peer '{sender}' reported {code or 'an error'}: {reason}")
        if code.startswith("peer_failed:") and code[len("peer_failed:"):].isdigit():
            cause = int(code[len("peer_failed:"):])
            if cause in {int(c) for c in ExitCode} and cause != 0:
                err.exit_code = ExitCode(cause)
        raise err

    def _on_receipt(self, msg: Message) -> None:
        sender = msg.binding.sender
        try:
            head = SignedHead.from_meta(dict(msg.meta))
            if head.peer != sender:
                raise RemoteProtocolError(f"'{sender}' sent an audit receipt for '{head.peer}'")
            if head.run and head.run != self.audit.run_id and len(self._early_receipts) < 4 * len(self.counterparties):
                # A counterparty that got the start barrier before us: its head binds a run we have
                # not been told of yet. Kept (bounded) until we are; never recorded otherwise.
                self._early_receipts.append(msg)
                return
            self.audit.record_counterparty_head(head, self.ctx.deployment.spec.peers[sender].sign_key)
        except CryptoError as exc:
            self.refuse_message(msg, RemoteProtocolError(str(exc)))
            return
        except RemoteProtocolError as exc:
            self.refuse_message(msg, exc)
            return
        key = int(msg.binding.step)
        self.receipts.setdefault(key, set()).add(sender)
        self.schedule.on_receipt(sender, key)


def _payload_bytes(msg: Message) -> int:
    """What a kept message holds in memory: its tensors and blob."""
    return sum(t.nbytes for t in msg.tensors) + len(msg.blob)
