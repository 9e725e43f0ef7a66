"""`ServeSchedule` (`secure-split serve peers/NAME.yaml`): a trained peer takes part in the
prediction requests of the parties that may ask (`secure_split.inference_routes`), from its newest
checkpoint (or a given epoch).

The node continues the training run's audit chain. At start the server says HELLO to the other
servers it may work with (a hop to the next hop, a hospital to the other hospital and the lab),
so that a restarted server renews those sessions; a requester's `predict` process says HELLO
itself and gets a fresh session each run.

A request opens with the requester's `barrier` (reason `request`, its number in the step, the
epoch, the parties): the server checks that the requester may ask it (it is a party of that
requester's routes), that both use the same epoch, and that the policy lets this server send
everything the request needs from it (else `policy_denied`, audited, before anything is sent);
then it runs its set-up rounds (`peer/requests.py`: CKKS contexts, PSI of the requested ids
against its own rows) and answers `barrier_ack`. Then it serves the request's batches: with its
own rows for the ids a `step_begin` names (a vertical hospital), or on the tensors it receives
(batch positions, never ids: a hop, a label holder's top); the holder of an output returns a
`prediction` (int64 argmax per sample) to the requester. A request ends with the requester's
signed audit head, which the server answers with its own, sending it too to every other server
it exchanged messages with in that request.

Several requests may be open at once (their messages are told apart by their steps); the
executor runs one step at a time. Gradients, train-phase tensors, control messages of training
and anything malformed are refused, audited and answered with an `error`; the server keeps
serving. A request with no message for `limits.peer_timeout_s`, or whose party is lost, is
dropped and its requester told. The server stops after `max_requests` finished requests, after
`idle_exit_s` without a message and no request open, or on SIGTERM (exit 0) / SIGINT (exit 130),
closing its audit log.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from secure_split.engine.checkpoint import checkpoint_preprocessing
from secure_split.engine.data import PeerData, fit_preprocessing
from secure_split.errors import (
    ConfigError,
    ConfigProblem,
    ExitCode,
    PolicyDenied,
    RemoteProtocolError,
    SecureSplitError,
)
from secure_split.inference_routes import RequestRoutes, requesters
from secure_split.peer.checkpoints import checkpoint_digest, chosen_epoch, load_trained
from secure_split.peer.context import PeerContext, clip
from secure_split.peer.effects import Effect, Record
from secure_split.peer.requests import MAX_BATCHES, REQUEST_KINDS, InferenceRequest, request_number
from secure_split.peer.rounds.barrier import CLOSE_KEY
from secure_split.peer.steps import STEP_TENSOR_KINDS
from secure_split.policy import he_key_holder
from secure_split.protocol import Kind, Message

if TYPE_CHECKING:
    from secure_split.peer.node import PeerNode

__all__ = ["ServeSchedule", "served_rows"]

# Request numbers of finished requests remembered (a late message of one is refused, not kept).
_CLOSED_REMEMBERED = 1024
# Requests open at once; a requester has at most one (its new request replaces the old).
_MAX_OPEN = 16


@dataclass
class _Open:
    """A request this server takes part in."""

    request: InferenceRequest
    started: bool = False
    acked: bool = False
    closing: bool = False  # the requester's closing head arrived; waiting for the other servers'
    last_activity: float = field(default_factory=time.monotonic)


def served_rows(ctx: PeerContext, epoch: int) -> PeerData | None:
    """A server's own rows, transformed by the preprocessing of its checkpoint of `epoch` (the
    transform its input segment was trained on); None for a peer without data."""
    if ctx.site is None:
        return None
    prep = checkpoint_preprocessing(ctx.cfg.checkpoints_dir, epoch) or fit_preprocessing(ctx.site, None)
    return prep.apply(ctx.site)


class ServeSchedule:
    """`secure-split serve` (module docstring).

    Args:
        ctx: this peer's loaded files.
        epoch: the checkpoint to serve (default: the newest).
        max_requests: stop after this many finished requests (None: no limit).
        idle_exit_s: stop after this many seconds without a message (None: never).

    Raises:
        ConfigError: this peer serves nobody's requests, or has no such checkpoint.
    """

    def __init__(self, ctx: PeerContext, *, epoch: int | None = None, max_requests: int | None = None,
                 idle_exit_s: float | None = None) -> None:
        self.ctx = ctx
        self.me = ctx.me
        dep = ctx.deployment
        key_holders = {s: he_key_holder(dep, s, ctx.policy) for s in ctx.topology.he_segments}
        every = requesters(dep, key_holders)
        self.routes: dict[str, RequestRoutes] = {r: routes for r, routes in every.items() if self.me in routes.servers}
        if not self.routes:
            raise ConfigError(ConfigProblem(str(dep.path), "segments", (
                f"peer '{self.me}' takes part in no party's prediction request, so it has nothing to serve "
                "(see `secure-split predict --help` for who asks and who serves)")))
        co_servers: set[str] = set()
        for routes in self.routes.values():
            co_servers |= set(routes.links(self.me)) & set(routes.servers)
        self.clients = sorted(self.routes)
        # Whoever may connect to this endpoint while it serves: every party of a request this peer
        # takes part in (a server of another party's request connects to all its links at start).
        self.counterparties = sorted({p for r in every.values() if self.me in r.peers for p in r.peers} - {self.me})
        self.co_servers = sorted(co_servers)
        self.epoch = chosen_epoch(ctx, epoch)
        reads_rows = any(self.me in r.row_holders for r in self.routes.values())
        self.rows = served_rows(ctx, self.epoch) if reads_rows else None
        self.executor = ctx.executor(self.rows)
        load_trained(ctx, self.executor, self.epoch)
        self.max_requests = max_requests
        self.idle_exit_s = idle_exit_s
        self.requests_done = 0
        self.batches_served = 0
        self.stop_signal: int | None = None
        self.last_message = time.monotonic()
        self.open: dict[int, _Open] = {}
        self.closed: deque[int] = deque(maxlen=_CLOSED_REMEMBERED)
        self.why_stopped = ""

    # -- the Schedule protocol ------------------------------------------------------------------

    def attach(self, node: PeerNode) -> None:
        """The node this schedule sends through."""
        self.node = node

    def start_records(self) -> list[Record]:
        """What serves here: one `segment_commitment` entry per local segment."""
        return [Record("segment_commitment", r) for r in self.executor.segment_records()]

    def working_state(self) -> str:
        """The state this peer reports while it runs (`peer.metrics.PEER_STATES`)."""
        return "serving"

    def close_peers(self) -> list[str]:
        """A server closes after its clients left: each request ended with heads exchanged, and
        each requester's close head was answered with ours (`on_receipt`)."""
        return []

    def hello_meta(self) -> dict[str, Any]:
        """The epoch served (the requester must use the same)."""
        return {"checkpoints": [self.epoch]}

    def prepare(self) -> None:
        """Nothing to check before serving."""

    def set_up(self) -> None:
        """Record which trained weights are served; say HELLO to the other servers (a restarted
        server renews its sessions with them before any request needs one)."""
        self.node.record("checkpoint_resumed", epoch=self.epoch,
                         digest=checkpoint_digest(self.ctx.cfg.checkpoints_dir, self.epoch))
        for peer in self.co_servers:
            try:
                self.node.gate.send_hello(peer)
            except PolicyDenied:
                continue  # audited; the requests that need this session cannot be served

    def run(self) -> tuple[str, str]:
        """Serve until a stop condition; returns ("ok", why it stopped)."""
        self.last_message = time.monotonic()
        with self._stop_on_signals():
            self.node.wait(self._should_stop, lambda: "serving prediction requests", self._waiting_on)
        if self.stop_signal == signal.SIGINT:
            self.node.result.exit_code = int(ExitCode.INTERRUPTED)
        return "ok", self.why_stopped

    def on_message(self, msg: Message) -> bool:
        """A request's messages (module docstring); anything else is refused."""
        self.last_message = time.monotonic()
        kind = msg.kind
        if kind == Kind.HELLO:
            self.node.record("peer_joined", counterparty=msg.binding.sender, reason="session for prediction requests")
            self._advance()
            return True
        if kind == Kind.BARRIER:
            self._open_request(msg)
            self._advance()
            return True
        if kind not in (Kind.PSI, Kind.HE_CONTEXT) and kind not in REQUEST_KINDS:
            raise RemoteProtocolError(f"'{self.me}' serves predictions only and does not take '{kind.value}' "
                                      "messages here; training runs under `secure-split peer run`", code="not_served")
        number = request_number(msg.binding.step)
        entry = self.open.get(number)
        if entry is None:
            if number in self.closed or number == 0 or kind in REQUEST_KINDS:
                # Batches begin only after every server acknowledged the request's barrier.
                raise RemoteProtocolError(f"'{msg.binding.sender}' sent {kind.value} for request {number}, which is "
                                          f"not open at '{self.me}'", code="not_served")
            return False  # another server's set-up, ahead of the requester's barrier to us
        if not entry.started or (kind in REQUEST_KINDS and not entry.request.ready):
            return False
        entry.last_activity = time.monotonic()
        req = entry.request
        try:
            if kind in (Kind.PSI, Kind.HE_CONTEXT):
                self.node.apply(req.on_setup(msg))
            else:
                effects = req.offer(msg, executor_free=self.executor.active_step is None)
                if effects is None:
                    return False
                self.node.apply(effects)
                self._finish_steps(entry)
        except PolicyDenied as exc:  # one of our own sends: audited by the gate
            self._drop(number, f"the policy refused what '{self.me}' would send: {exc}", code="policy_denied")
            return True
        except SecureSplitError as exc:
            # Refused (the node audits it and tells the sender); nothing changed here. Without
            # another server's message the request cannot complete: its requester learns why now.
            sender = msg.binding.sender
            if sender != req.requester:
                self._drop(number, f"'{sender}' sent {kind.value} that was refused: {exc}")
            code = exc.code if isinstance(exc, RemoteProtocolError) else "protocol"
            if code == "protocol" and kind in STEP_TENSOR_KINDS:
                code = "bad_tensor"
            raise RemoteProtocolError(f"'{self.me}' could not serve step {msg.binding.step} of request {number}: "
                                      f"{exc}", code=code) from None
        self._advance()
        return True

    def on_peer_lost(self, peer: str, reason: str, *, timed_out: bool) -> bool:
        """A party that goes away ends only the requests it takes part in."""
        for number, entry in list(self.open.items()):
            if peer in entry.request.routes.peers:
                self._drop(number, f"'{peer}' was lost: {reason}")
        return True

    def on_peer_restarted(self, peer: str) -> None:
        """A restarted party (a new `predict` run): its requests can never complete."""
        self.node.record("peer_joined", counterparty=peer, reason="session for prediction requests (restarted)")
        self.on_peer_lost(peer, "it restarted", timed_out=False)
        self._advance()

    def on_remote_error(self, msg: Message) -> bool:
        """A party's error ends the requests it takes part in; the server goes on."""
        sender = msg.binding.sender
        self.node.record("error", error="RemoteError", reason=clip(
            f"'{sender}' reported {msg.meta.get('code', '')!s}: {msg.meta.get('reason', '')!s}"))
        for number, entry in list(self.open.items()):
            if sender in entry.request.routes.peers:
                self._drop(number, f"'{sender}' reported an error", tell=sender != entry.request.requester)
        return True

    def on_receipt(self, sender: str, key: int) -> None:
        """The requester's closing signed head: answer it and send ours to the other servers of
        the request too. The request is done once every party this server exchanged messages
        with in it sent its head (so none of them stops before ours arrived)."""
        if key == CLOSE_KEY:
            # A requester's close round (its run ends): countersign it with our signed head.
            own = self.node.signed_head(f"close of {sender}'s prediction run")
            self.node.send(sender, Kind.AUDIT_RECEIPT, step=key, meta=own.to_meta())
            return
        number = request_number(key)
        entry = self.open.get(number)
        if entry is None or key != entry.request.base:
            return  # a head of a request closed here already: recorded by the node
        req = entry.request
        if sender == req.requester and not entry.closing:
            entry.closing = True
            entry.last_activity = time.monotonic()
            own = self.node.signed_head(f"prediction request {number} of {sender} done: {req.batches_done} batches")
            for peer in req.routes.links(self.me):
                if self.node.established(peer):
                    self.node.send(peer, Kind.AUDIT_RECEIPT, step=key, meta=own.to_meta())
        if not entry.closing or not set(req.routes.links(self.me)) <= self.node.receipts.get(key, set()):
            return
        del self.open[number]
        self.closed.append(number)
        self.node.receipts.pop(key, None)
        self.requests_done += 1
        self.node.progress({"event": "request", "owner": req.requester, "requests": self.requests_done,
                            "batches": self.batches_served})

    def reachable(self, peer: str) -> bool:
        """Nobody is sent a shutdown."""
        return False

    def tell_others_we_stopped(self, reason: str) -> None:
        """Each open request's requester learns why it will get no answer."""
        for entry in self.open.values():
            if self.node.established(entry.request.requester):
                self.node.refuse(entry.request.requester, f"'{self.me}' stopped: {reason}", "server_stopped")

    def final_metrics(self) -> dict[str, float]:
        """Requests and batches served."""
        return {"requests": float(self.requests_done), "batches": float(self.batches_served)}

    # -- serving ----------------------------------------------------------------------------------

    @contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """SIGINT and SIGTERM end the loop between two messages (so the audit log closes cleanly)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def stop(signum: int, _frame: Any) -> None:
            self.stop_signal = signum

        old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)

    def _should_stop(self) -> bool:
        """The serving loop's test (the node polls between two tests); expires stale requests."""
        if self.stop_signal is not None:
            self.why_stopped = f"stopped by {signal.Signals(self.stop_signal).name}"
            return True
        if self.max_requests is not None and self.requests_done >= self.max_requests:
            self.why_stopped = f"served {self.requests_done} request(s)"
            return True
        now = time.monotonic()
        limits = self.ctx.deployment.spec.limits
        for number, entry in list(self.open.items()):
            links = entry.request.routes.links(self.me)
            down = [p for p in links if not self.node.established(p)]
            if not entry.started and down and now - entry.last_activity > limits.handshake_timeout_s:
                self._drop(number, f"no session with {', '.join(down)} within {limits.handshake_timeout_s:.0f} s: "
                           f"`secure-split serve` must run there too", code="timeout")
            elif now - entry.last_activity > limits.peer_timeout_s:
                self._drop(number, f"no message of request {number} within {limits.peer_timeout_s:.0f} s",
                           code="timeout")
        if self.idle_exit_s is not None and not self.open and now - self.last_message > self.idle_exit_s:
            self.why_stopped = f"no request for {self.idle_exit_s:g} s"
            return True
        return False

    def _waiting_on(self) -> list[str]:
        return sorted({p for e in self.open.values() for p in e.request.routes.peers} - {self.me})

    def _open_request(self, msg: Message) -> None:
        """The requester's `barrier` that opens a request (module docstring).

        Raises:
            RemoteProtocolError: not a request this server serves (audited and answered).
        """
        sender, step = msg.binding.sender, msg.binding.step
        routes = self.routes.get(sender)
        number = request_number(step)
        if routes is None:
            raise RemoteProtocolError(f"'{sender}' may not open a prediction request at '{self.me}': it is not a "
                                      f"party that asks for predictions '{self.me}' helps compute", code="not_served")
        if msg.meta.get("reason") != "request" or step & MAX_BATCHES or number == 0:
            raise RemoteProtocolError(f"'{sender}' sent a barrier that opens no prediction request (reason "
                                      f"{msg.meta.get('reason')!r}, step {step}); training runs under `secure-split "
                                      "peer run`", code="not_served")
        if msg.meta.get("epoch") != self.epoch:
            raise RemoteProtocolError(f"'{sender}' asks with the checkpoint of epoch {msg.meta.get('epoch')!r}, "
                                      f"'{self.me}' serves epoch {self.epoch}: both must use the same training epoch",
                                      code="epoch")
        members = msg.meta.get("members")
        if not isinstance(members, list) or members != list(routes.peers):
            raise RemoteProtocolError(f"'{sender}' names the parties {msg.meta.get('members')!r} for its request; "
                                      f"this deployment's routes give {list(routes.peers)}")
        if number in self.open or number in self.closed:
            raise RemoteProtocolError(f"request number {number} is in use at '{self.me}'; ask again", code="busy")
        for old, entry in list(self.open.items()):
            if entry.request.requester == sender:
                self._drop(old, f"'{sender}' opened request {number}", tell=False)
        if len(self.open) >= _MAX_OPEN:
            raise RemoteProtocolError(f"'{self.me}' has {len(self.open)} prediction requests open; ask again when "
                                      "one has finished", code="busy")
        for f in routes.flows():
            if f.sender != self.me:
                continue
            try:
                self.node.gate.check_route(self.me, f.receiver, Kind(f.kind), edge=f.edge or "")
            except PolicyDenied as exc:  # audited by the gate
                self.node.refuse(sender, f"'{self.me}' may not take part in this request: {exc}", "policy_denied")
                return
        own = self.ctx.site.ids if self.ctx.site is not None and self.me in routes.psi_parties else None
        req = InferenceRequest(self.ctx, routes, number, self.executor, own_ids=own)
        self.open[number] = _Open(req)
        self.node.record("peer_joined", counterparty=sender, reason=clip(
            f"prediction request {number} of {sender} (parties {', '.join(routes.peers)}; epoch {self.epoch})"))

    def _advance(self) -> None:
        """Start the set-up of requests whose sessions are up; acknowledge those that are set up."""
        for number, entry in list(self.open.items()):
            req = entry.request
            try:
                if not entry.started:
                    if not all(self.node.established(p) for p in req.routes.links(self.me)):
                        continue
                    entry.started = True
                    self.node.apply(req.start())
                if not entry.acked and req.ready:
                    entry.acked = True
                    self.node.send(req.requester, Kind.BARRIER_ACK, step=req.base,
                                   meta={"epoch": self.epoch, "reason": "request"})
            except PolicyDenied as exc:
                self._drop(number, f"the policy refused what '{self.me}' would send: {exc}", code="policy_denied")

    def _finish_steps(self, entry: _Open) -> None:
        req = entry.request
        done = req.finish()
        if done is None:
            return
        step, predictions = done
        self.batches_served += 1
        effects: list[Effect] = req.prediction_sends(step, predictions) if self.me != req.requester else []
        self.node.apply(effects)

    def _drop(self, number: int, reason: str, *, code: str = "request_failed", tell: bool = True) -> None:
        """Give up request `number` (its step aborted); tell its requester why."""
        entry = self.open.pop(number, None)
        if entry is None:
            return
        self.closed.append(number)
        req = entry.request
        if req.steps is not None and req.steps.current_step is not None:
            req.abort()
        self.node.record("error", error="RequestDropped", reason=clip(
            f"prediction request {number} of {req.requester} dropped: {reason}"))
        if tell and self.node.established(req.requester):
            self.node.refuse(req.requester, f"'{self.me}' dropped prediction request {number}: {reason}", code)
