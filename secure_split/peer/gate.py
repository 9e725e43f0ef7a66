"""The gate: the one choke point every message of a peer passes, both ways.

Outbound: policy decision → egress leakage guards → bind (session, seq) → encode → audit entry
→ transport. Inbound: transport (sender authenticated by its CURVE key) → header decode (sizes
bounded, nothing allocated yet) → sender check → session check (binding, replay) → policy
decision → payload decode → audit entry.

A refusal on either side is written to the audit log with its reason, answered with an `error`
message to the counterparty where one can be sent, and raised to the caller; the gate itself
keeps serving. Nothing else in a peer talks to the transport.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from secure_split.canonical import sha256_frames
from secure_split.errors import (
    CodecError,
    HandshakeRefused,
    PolicyDenied,
    RemoteProtocolError,
)
from secure_split.policy import Decision, Flow, Policy, check_egress
from secure_split.protocol import (
    ZERO_SESSION,
    Header,
    Kind,
    Message,
    PeerSession,
    WireTensor,
    decode_body,
    decode_header,
    encode,
)
from secure_split.protocol.bounds import RefusalThrottle

# Kinds never answered with an `error` message: answering them could start a ping-pong.
_NO_REPLY_KINDS = frozenset({Kind.ERROR, Kind.REFUSE})


class AuditSink(Protocol):
    """What the gate needs from the audit log."""

    def record(self, event: str, **fields: Any) -> int: ...


class FrameTransport(Protocol):
    """What the gate needs from the transport."""

    def send(self, peer: str, frames: Sequence[bytes | memoryview]) -> int: ...

    def recv(self, timeout_s: float) -> tuple[str, list[memoryview]] | None: ...


class GateObserver(Protocol):
    """What the gate reports for the operator's metrics (`peer.metrics.PeerMetrics` fits)."""

    def on_message(self, counterparty: str, direction: Any, kind: str, nbytes: int) -> None: ...

    def on_refusal(self, direction: Any, reason: str) -> None: ...


@dataclass
class GateStats:
    """Counters a peer reports at the end of a run (bytes are the transport's own counters)."""

    sent: int = 0
    received: int = 0
    refused_out: int = 0
    refused_in: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)


def _tensor_facts(tensors: Sequence[WireTensor]) -> tuple[str | None, tuple[int, ...] | None, int | None]:
    if not tensors:
        return None, None, None
    t = tensors[0]
    shape = tuple(int(x) for x in t.shape)
    return t.dtype, shape, (shape[0] if shape else None)


class Gate:
    """Policy, audit and session checks around one peer's transport.

    Args:
        me: this peer's name.
        deployment_hash: the agreed deployment hash (bound into every message).
        policy: this peer's copy of the signed policy.
        audit: the peer's audit log.
        transport: the peer's transport.
        sessions: one protocol session per remote peer this peer may talk to.
        max_message_bytes: the deployment's bound on one message.
    """

    def __init__(
        self,
        *,
        me: str,
        deployment_hash: str,
        policy: Policy,
        audit: AuditSink,
        transport: FrameTransport,
        sessions: Mapping[str, PeerSession],
        max_message_bytes: int,
        session_factory: Callable[[str], PeerSession] | None = None,
        observer: GateObserver | None = None,
        refusal_audit: tuple[float, int] = (2.0, 20),
    ) -> None:
        self.me = me
        self.deployment_hash = deployment_hash
        self.policy = policy
        self.audit = audit
        self.transport = transport
        self.sessions = dict(sessions)
        self.max_message_bytes = max_message_bytes
        self.session_factory = session_factory
        self.observer = observer
        self.stats = GateStats()
        # Refusals of one counterparty get audit entries of their own at a bounded rate; the
        # others are counted and reported with the next entry (limits.refusal_audit_*).
        self._refusal_audit = refusal_audit
        self._throttles: dict[str, RefusalThrottle] = {}
        # Peers that started a fresh session since the last call of `take_rejoined()`.
        self._rejoined: list[str] = []

    # -- outbound ---------------------------------------------------------------------------

    def send(
        self,
        to: str,
        kind: Kind,
        *,
        step: int = 0,
        edge: str = "",
        meta: Mapping[str, Any] | None = None,
        tensors: Sequence[WireTensor] = (),
        blob: bytes = b"",
        raw: np.ndarray | None = None,
    ) -> Message:
        """Send one message to `to` after the policy allowed it.

        Args:
            raw: the raw feature batch this tensor was computed from, at a data owner's egress;
                the policy's leakage guards compare the outgoing tensor against it.

        Raises:
            PolicyDenied: the policy (or a leakage guard) refuses the flow; nothing was sent.
            LocalProtocolError: the session to `to` is not established.
        """
        session = self._session(to)
        dtype, shape, batch = _tensor_facts(tensors)
        nbytes = sum(t.nbytes for t in tensors) + len(blob)
        flow = Flow(
            sender=self.me,
            receiver=to,
            kind=kind.value,
            edge=edge or None,
            direction="send",
            nbytes=nbytes,
            dtype=dtype,
            shape=shape,
            batch_size=batch,
        )
        decision = self.policy.decide(flow)
        # numpy has no bfloat16: such a cut tensor is judged by the policy's shape and dtype rules only.
        if decision.allowed and raw is not None and tensors and tensors[0].dtype != "bfloat16":
            t = tensors[0]
            out = np.frombuffer(t.data, dtype=np.dtype(t.dtype).newbyteorder("<")).reshape(t.shape)
            decision = check_egress(self.policy, flow, out, raw, decision=decision) or decision
        if not decision.allowed:
            self.stats.refused_out += 1
            self._record_denied(flow, step, decision)
            raise PolicyDenied(decision.reason, decision)
        msg = session.bind(kind, step=step, edge=edge, meta=dict(meta or {}), tensors=tuple(tensors), blob=blob)
        frames = encode(msg)
        self._record_message("message_sent", msg, flow, frames, decision)
        self.transport.send(to, frames)
        self.stats.sent += 1
        self.stats.by_kind[kind.value] = self.stats.by_kind.get(kind.value, 0) + 1
        if self.observer is not None:
            self.observer.on_message(to, "sent", kind.value, nbytes)
        return msg

    def send_hello(self, to: str) -> None:
        """Send our handshake message to `to` (first message of the session)."""
        session = self._session(to)
        msg = session.hello()
        self._send_prebound(to, msg)

    def _send_prebound(self, to: str, msg: Message) -> None:
        flow = Flow(self.me, to, msg.kind.value, None, "send", 0, None, None, None)
        decision = self.policy.decide(flow)
        if not decision.allowed:
            self._record_denied(flow, msg.binding.step, decision)
            raise PolicyDenied(decision.reason, decision)
        frames = encode(msg)
        self._record_message("message_sent", msg, flow, frames, decision)
        self.transport.send(to, frames)
        self.stats.sent += 1
        if self.observer is not None:
            self.observer.on_message(to, "sent", msg.kind.value, 0)

    def refuse(self, to: str, reason: str, code: str, *, kind: Kind = Kind.ERROR) -> None:
        """Tell `to` that we refused something it sent. Best effort: never raises."""
        session = self.sessions.get(to)
        if session is None:
            return
        try:
            msg = session.bind(kind, meta={"reason": reason[:4000], "code": code})
            self._send_prebound(to, msg)
        except Exception as exc:  # a failed courtesy reply must not stop the peer
            self.audit.record("error", reason=f"could not send {kind.value} to {to}: {exc}", error=type(exc).__name__)

    # -- inbound ----------------------------------------------------------------------------

    def receive(self, timeout_s: float) -> Message | None:
        """Receive, check and decode the next inbound message.

        Returns:
            The message, or None when nothing arrived within `timeout_s`.

        Raises:
            RemoteProtocolError: the frames were malformed, spoofed, replayed or out of order
                (already audited and answered; the gate keeps serving).
            HandshakeRefused: the peer refused us or runs another deployment/policy.
            PolicyDenied: our policy refuses the inbound flow (audited and answered).
        """
        item = self.transport.recv(timeout_s)
        if item is None:
            return None
        sender, frames = item
        try:
            if not frames:
                raise CodecError("empty message")
            header = decode_header(frames[0], max_message_bytes=self.max_message_bytes)
        except CodecError as exc:
            self._refuse_inbound(sender, None, exc, code="bad_frame")
            exc.peer = sender
            raise
        if header.binding.sender != sender or header.binding.receiver != self.me:
            exc2 = RemoteProtocolError(
                f"message claims to be from '{header.binding.sender}' to '{header.binding.receiver}' "
                f"but arrived from authenticated peer '{sender}' at '{self.me}'"
            )
            self._refuse_inbound(sender, header, exc2, code="spoofed")
            exc2.peer = sender
            raise exc2
        session = self.sessions.get(sender)
        if (
            session is not None
            and header.kind is Kind.HELLO
            and self.session_factory is not None
            and session.remote_hello_meta is not None
        ):
            # A restarted counterparty (its key authenticated it) opens a new session; messages
            # still in flight from its old one fail the session binding and are refused.
            try:
                session = self.sessions[sender] = self.session_factory(sender)
            except RemoteProtocolError as exc:
                self._refuse_inbound(sender, header, exc, code="rejoin_refused")
                exc.peer = sender
                raise
            self.audit.record("peer_joined", counterparty=sender, reason="restarted: new session")
            self._rejoined.append(sender)
        if session is None:
            exc3 = RemoteProtocolError(f"peer '{sender}' is not a counterparty of '{self.me}' in this deployment")
            self._refuse_inbound(sender, header, exc3, code="not_a_counterparty")
            raise exc3
        if header.binding.session != ZERO_SESSION and session.session_id is None:
            # Bound to a session we never had: left over from a counterparty's previous session
            # with our previous process (zmq delivers what it queued once we are back). Nothing we
            # sent can be its cause, so it gets no reply; audited and dropped.
            exc4 = RemoteProtocolError(
                f"'{sender}' sent {header.kind.value} bound to session {header.binding.session.hex()} "
                "before our handshake: a message of an earlier session, dropped"
            )
            self.stats.refused_in += 1
            self.audit.record("refused", direction="receive", counterparty=sender, reason=str(exc4)[:2000],
                              error="RemoteProtocolError", kind=header.kind.value)
            raise exc4
        try:
            session.receive(header)
        except HandshakeRefused as exc:
            self.audit.record(
                "refused", direction="receive", counterparty=sender, reason=str(exc),
                error=type(exc).__name__, kind=header.kind.value,
            )
            if header.kind not in _NO_REPLY_KINDS:
                self.refuse(sender, str(exc), "handshake_refused", kind=Kind.REFUSE)
            raise
        except RemoteProtocolError as exc:
            self._refuse_inbound(sender, header, exc, code="protocol", frames=frames)
            exc.peer = sender
            raise
        dtype = header.tensor_specs[0].dtype if header.tensor_specs else None
        shape = tuple(header.tensor_specs[0].shape) if header.tensor_specs else None
        batch = shape[0] if shape else None
        # Payload bytes, as the sender computed them (the header is not counted on either side).
        nbytes = sum(spec.nbytes for spec in header.tensor_specs) + header.blob_len
        flow = Flow(
            sender=sender,
            receiver=self.me,
            kind=header.kind.value,
            edge=header.edge or None,
            direction="receive",
            nbytes=nbytes,
            dtype=dtype,
            shape=shape,
            batch_size=batch,
        )
        decision = self.policy.decide(flow)
        if not decision.allowed:
            self.stats.refused_in += 1
            self._record_denied(flow, header.binding.step, decision, header=header, frames=frames)
            if header.kind not in _NO_REPLY_KINDS:
                self.refuse(sender, f"refused by {self.me}: {decision.reason}", "policy_denied")
            denied = PolicyDenied(decision.reason, decision)
            denied.peer = sender
            raise denied
        try:
            msg = decode_body(header, frames)
        except CodecError as exc:
            self._refuse_inbound(sender, header, exc, code="bad_frame", frames=frames, consumed=True)
            exc.peer = sender
            raise
        self._record_message("message_received", msg, flow, frames, decision)
        self.stats.received += 1
        self.stats.by_kind[header.kind.value] = self.stats.by_kind.get(header.kind.value, 0) + 1
        if self.observer is not None:
            self.observer.on_message(sender, "received", header.kind.value, nbytes)
        return msg

    def check_route(self, sender: str, receiver: str, kind: Kind, *, edge: str = "") -> Decision:
        """Ask the policy now whether `kind` may ever flow `sender` -> `receiver` on `edge`: a route
        this peer is about to depend on, so that it sends nothing for a run the policy would stop
        halfway (a split prediction whose result could not come back).

        Returns:
            The decision (allowed).

        Raises:
            PolicyDenied: the policy denies the route; the denial is audited like a refused message.
        """
        decision = self.policy.decide_route(sender, receiver, kind.value, edge or None)
        if not decision.allowed:
            flow = Flow(sender, receiver, kind.value, edge or None, "receive" if receiver == self.me else "send", 0)
            self._record_denied(flow, 0, decision)
            raise PolicyDenied(decision.reason, decision)
        return decision

    def take_rejoined(self) -> list[str]:
        """Peers that opened a new session (restarted) since the last call; answer each with
        `send_hello` (only with a `session_factory`: otherwise a second HELLO is refused)."""
        out, self._rejoined = self._rejoined, []
        return out

    def _record_denied(self, flow: Flow, step: int, decision: Decision, *, header: Header | None = None,
                       frames: Sequence[bytes | memoryview] | None = None) -> None:
        if self.observer is not None:
            self.observer.on_refusal("out" if flow.direction == "send" else "in", "policy_denied")
        if header is not None:  # inbound: at a bounded rate per sender, naming the refused message
            throttle = self._throttles.get(flow.sender)
            if throttle is None:
                throttle = self._throttles[flow.sender] = RefusalThrottle(*self._refusal_audit)
            if throttle.admit(time.monotonic()) is None:
                return
        binding = header.binding if header is not None else None
        self.audit.record(
            "policy_denied",
            direction=flow.direction,
            sender=flow.sender,
            receiver=flow.receiver,
            kind=flow.kind,
            edge=flow.edge or "",
            step=step,
            nbytes=flow.nbytes,
            decision_id=decision.decision_id,
            rule_id=decision.rule_id,
            reason=decision.reason,
            session=binding.session.hex() if binding is not None else None,
            seq=binding.seq if binding is not None else None,
            digest=sha256_frames(frames) if binding is not None and frames is not None else None,
        )

    def _record_message(
        self, event: str, msg: Message, flow: Flow, frames: Sequence[bytes | memoryview], decision: Decision
    ) -> None:
        """One audit entry per message, written alike by sender and receiver (same digest)."""
        counterparty = flow.receiver if flow.direction == "send" else flow.sender
        self.audit.record(
            event,
            kind=msg.kind.value,
            edge=msg.edge,
            step=msg.binding.step,
            seq=msg.binding.seq,
            session=msg.binding.session.hex(),
            sender=flow.sender,
            receiver=flow.receiver,
            counterparty=counterparty,
            nbytes=flow.nbytes,
            dtype=flow.dtype,
            shape=list(flow.shape) if flow.shape is not None else None,
            batch_size=flow.batch_size,
            digest=sha256_frames(frames),
            decision_id=decision.decision_id,
            rule_id=decision.rule_id,
        )

    def _refuse_inbound(self, sender: str, header: Header | None, exc: Exception, *, code: str,
                        frames: Sequence[bytes | memoryview] | None = None, consumed: bool = False) -> None:
        """Audit (at a bounded rate) and answer an inbound message we refuse.

        Args:
            consumed: the session accepted the message's binding (its seq is used up): the entry
                names the refused message's session, seq and frame digest.
        """
        self.stats.refused_in += 1
        if self.observer is not None:
            self.observer.on_refusal("in", code)
        binding = header.binding if header is not None and consumed else None
        self._audit_refusal(
            sender, str(exc), error=type(exc).__name__, kind=header.kind.value if header is not None else None,
            session=binding.session.hex() if binding is not None else None,
            seq=binding.seq if binding is not None else None,
            digest=sha256_frames(frames) if binding is not None and frames is not None else None,
        )
        if header is None or header.kind not in _NO_REPLY_KINDS:
            self.refuse(sender, f"refused by {self.me}: {exc}", code)

    def refused_after_decoding(self, msg: Message, exc: Exception) -> None:
        """A message that passed the gate and was refused above it (by the schedule): counted and
        audited like the gate's own refusals, naming the message. The caller answers it."""
        self.stats.refused_in += 1
        if self.observer is not None:
            self.observer.on_refusal("in", getattr(exc, "code", "protocol"))
        self._audit_refusal(msg.binding.sender, str(exc), error=type(exc).__name__, kind=msg.kind.value,
                            session=msg.binding.session.hex(), seq=msg.binding.seq, digest=sha256_frames(encode(msg)))

    def _audit_refusal(self, sender: str, reason: str, **fields: Any) -> None:
        throttle = self._throttles.get(sender)
        if throttle is None:
            throttle = self._throttles[sender] = RefusalThrottle(*self._refusal_audit)
        left_out = throttle.admit(time.monotonic())
        if left_out is None:
            return  # counted; the next entry says how many were left out
        if left_out:
            reason = f"{reason} ({left_out} earlier refusal(s) of '{sender}' counted, not recorded one by one)"
        self.audit.record("refused", direction="receive", counterparty=sender, reason=reason[:2000], **fields)

    def _session(self, peer: str) -> PeerSession:
        try:
            return self.sessions[peer]
        except KeyError:
            raise RemoteProtocolError(
                f"'{peer}' is not a counterparty of '{self.me}' in this deployment"
            ) from None

