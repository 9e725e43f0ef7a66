"""The session with one remote peer: handshake, bindings and sequence numbers, as a state machine.

Rules of this file
------------------
1. Everything that decides whether a message may be sent or accepted lives here, and as much of
   it as possible in the tables below (`TRANSITIONS`, `SENDABLE`, `RECEIVABLE`). What does not
   fit a table (the HELLO checks, the binding checks) is code in this file, nowhere else.
2. No I/O, no clocks, no threads. `PeerSession` sees headers and hands out messages; the caller
   moves the frames. One `PeerSession` per remote peer, used from one thread.
3. The same rules bind both parties: what we may not send (`LocalProtocolError`, our bug) is
   exactly what we refuse to receive (`RemoteProtocolError` and its subclasses, the peer's fault).
4. A message that fails a check changes nothing, except a refusal: a REFUSE received or sent, or
   a HELLO we refuse (`HandshakeRefused`), ends the session in REFUSED for good.

Theory of operation
-------------------
Both parties send HELLO first, in any order: binding with 16 zero bytes as session, step 0 and
seq 0; meta with the protocol version, the deployment hash, the policy hash, a fresh 16-byte
nonce, and optional `hello_meta` (checkpoints, software). A HELLO whose version or hashes differ
from ours is refused with `HandshakeRefused`, whose text names both values. Once we have sent
ours and accepted theirs the session is ESTABLISHED and both sides hold the same session id::

    session_id = sha256(min(our_nonce, their_nonce) + max(our_nonce, their_nonce))[:16]

From then on every message is bound to (deployment hash, session id, step, seq, sender,
receiver). Each direction has its own seq: the first message after HELLO is seq 1 and each next
one is exactly one more. An inbound seq that is not last + 1 (a duplicate, a gap, a reorder) is a
`ReplayError`. Steps are the caller's business and are not checked here.

SHUTDOWN closes one direction: after sending it we send only ERROR, REFUSE and AUDIT_RECEIPT (to
countersign the peer's final checkpoint); after receiving it we accept only those from the peer.
Both directions closed is CLOSED.

REFUSE and ERROR may be sent in any state. Before the session is established they are bound
"pre-session": zero session id and seq 0, consuming no seq; after, like any other message. Such
a pre-session REFUSE or ERROR is accepted in any state with only the sender and receiver checked
(there is nothing else to check it against). A REFUSE received always raises `HandshakeRefused`;
an ERROR received is accepted and changes no state (the caller logs it).

A peer that restarts sends a new HELLO, which an established session refuses as a protocol
error: the caller decides whether to start a fresh `PeerSession` for it.
"""

from __future__ import annotations

import enum
import hashlib
import re
import secrets
from collections.abc import Callable, Mapping
from types import MappingProxyType

from secure_split import PROTOCOL_VERSION
from secure_split.errors import HandshakeRefused, LocalProtocolError, RemoteProtocolError, ReplayError
from secure_split.protocol.codec import Header
from secure_split.protocol.messages import (
    NAME_PATTERN,
    Binding,
    Kind,
    Message,
    MetaValue,
    WireTensor,
)

__all__ = [
    "NONCE_BYTES",
    "RECEIVABLE",
    "SENDABLE",
    "TRANSITIONS",
    "ZERO_SESSION",
    "PeerSession",
    "SessionEvent",
    "SessionState",
    "session_id_from_nonces",
]

NONCE_BYTES = 16
ZERO_SESSION = bytes(16)
"""The session id of HELLO and of pre-session REFUSE/ERROR messages."""

_HEX64 = re.compile(r"[0-9a-f]{64}")
_SEQ_LIMIT = 2**63
_HELLO_KEYS = ("protocol", "deployment", "policy", "nonce")


class SessionState(enum.Enum):
    """Where the session with one remote peer stands."""

    NEW = "new"  # nothing sent, nothing received
    HELLO_SENT = "hello_sent"  # our HELLO is out, theirs has not arrived
    HELLO_RECEIVED = "hello_received"  # theirs arrived and was accepted, ours is not out yet
    ESTABLISHED = "established"  # both HELLOs exchanged: messages flow both ways
    SHUTDOWN_SENT = "shutdown_sent"  # we closed our direction; the peer may still send
    SHUTDOWN_RECEIVED = "shutdown_received"  # the peer closed its direction; we may still send
    CLOSED = "closed"  # both directions closed
    REFUSED = "refused"  # a refusal, either way, ended the session


class SessionEvent(enum.Enum):
    """What moves the state machine."""

    SEND_HELLO = "send_hello"
    RECEIVE_HELLO = "receive_hello"
    SEND_SHUTDOWN = "send_shutdown"
    RECEIVE_SHUTDOWN = "receive_shutdown"
    REFUSAL = "refusal"  # REFUSE sent or received, or a HELLO refused


S, E = SessionState, SessionEvent

TRANSITIONS: Mapping[SessionState, Mapping[SessionEvent, SessionState]] = MappingProxyType(
    {
        S.NEW: {E.SEND_HELLO: S.HELLO_SENT, E.RECEIVE_HELLO: S.HELLO_RECEIVED, E.REFUSAL: S.REFUSED},
        S.HELLO_SENT: {E.RECEIVE_HELLO: S.ESTABLISHED, E.REFUSAL: S.REFUSED},
        S.HELLO_RECEIVED: {E.SEND_HELLO: S.ESTABLISHED, E.REFUSAL: S.REFUSED},
        S.ESTABLISHED: {
            E.SEND_SHUTDOWN: S.SHUTDOWN_SENT,
            E.RECEIVE_SHUTDOWN: S.SHUTDOWN_RECEIVED,
            E.REFUSAL: S.REFUSED,
        },
        S.SHUTDOWN_SENT: {E.RECEIVE_SHUTDOWN: S.CLOSED, E.REFUSAL: S.REFUSED},
        S.SHUTDOWN_RECEIVED: {E.SEND_SHUTDOWN: S.CLOSED, E.REFUSAL: S.REFUSED},
        S.CLOSED: {E.REFUSAL: S.REFUSED},
        S.REFUSED: {E.REFUSAL: S.REFUSED},
    }
)
"""state -> event -> next state. An event missing from a state's row is illegal in that state."""

_ANY_TIME = frozenset({Kind.REFUSE, Kind.ERROR})
_AFTER_SHUTDOWN = _ANY_TIME | {Kind.AUDIT_RECEIPT}
_FLOWING = frozenset(Kind) - {Kind.HELLO}

SENDABLE: Mapping[SessionState, frozenset[Kind]] = MappingProxyType(
    {
        S.NEW: _ANY_TIME | {Kind.HELLO},
        S.HELLO_SENT: _ANY_TIME,
        S.HELLO_RECEIVED: _ANY_TIME | {Kind.HELLO},
        S.ESTABLISHED: _FLOWING,
        S.SHUTDOWN_SENT: _AFTER_SHUTDOWN,
        S.SHUTDOWN_RECEIVED: _FLOWING,
        S.CLOSED: _AFTER_SHUTDOWN,
        S.REFUSED: _ANY_TIME,
    }
)
"""state -> kinds we may send in it."""

RECEIVABLE: Mapping[SessionState, frozenset[Kind]] = MappingProxyType(
    {
        S.NEW: _ANY_TIME | {Kind.HELLO},
        S.HELLO_SENT: _ANY_TIME | {Kind.HELLO},
        S.HELLO_RECEIVED: _ANY_TIME,
        S.ESTABLISHED: _FLOWING,
        S.SHUTDOWN_SENT: _FLOWING,
        S.SHUTDOWN_RECEIVED: _AFTER_SHUTDOWN,
        S.CLOSED: _AFTER_SHUTDOWN,
        S.REFUSED: _ANY_TIME,
    }
)
"""state -> kinds we accept from the peer in it."""

del S, E


def session_id_from_nonces(a: bytes, b: bytes) -> bytes:
    """The session id both parties derive from the two HELLO nonces, whatever their order.

    Args:
        a: one party's 16-byte nonce.
        b: the other party's 16-byte nonce.

    Returns:
        sha256(min(a, b) + max(a, b))[:16].
    """
    return hashlib.sha256(min(a, b) + max(a, b)).digest()[:16]


def _text(value: object) -> str:
    """A meta value as it should read in an error message (str as is, anything else as repr)."""
    return value if isinstance(value, str) else repr(value)


class PeerSession:
    """The protocol state for one remote peer, both directions, with no I/O.

    Args:
        local: our peer name.
        remote: the remote peer's name.
        deployment_hash: our deployment hash (64 lowercase hex digits).
        policy_hash: our policy hash (at most 128 characters).
        hello_meta: extra HELLO meta (`checkpoints`: list of ints, `software`: str); it may not
            set protocol, deployment, policy or nonce.
        nonce: our 16-byte HELLO nonce; a fresh one from `secrets` when None (pass one only in tests).

    Raises:
        LocalProtocolError: on a bad name, hash, nonce or hello_meta.
    """

    def __init__(
        self,
        local: str,
        remote: str,
        deployment_hash: str,
        policy_hash: str,
        *,
        hello_meta: Mapping[str, MetaValue] | None = None,
        nonce: bytes | None = None,
        describe_mismatch: Callable[[Mapping[str, MetaValue]], str] | None = None,
    ) -> None:
        for what, name in (("local", local), ("remote", remote)):
            if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
                raise LocalProtocolError(f"{what} peer name must match {NAME_PATTERN.pattern}, got {name!r}")
        if local == remote:
            raise LocalProtocolError(f"a peer cannot hold a session with itself ({local!r})")
        if not isinstance(deployment_hash, str) or not _HEX64.fullmatch(deployment_hash):
            raise LocalProtocolError(
                f"deployment_hash must be 64 lowercase hex digits, got {deployment_hash!r}"
            )
        if not isinstance(policy_hash, str) or not 0 < len(policy_hash) <= 128:
            raise LocalProtocolError(f"policy_hash must be a str of 1 to 128 characters, got {policy_hash!r}")
        if nonce is None:
            nonce = secrets.token_bytes(NONCE_BYTES)
        if not isinstance(nonce, bytes) or len(nonce) != NONCE_BYTES:
            raise LocalProtocolError(f"nonce must be exactly {NONCE_BYTES} bytes")
        extra = dict(hello_meta or {})
        reserved = sorted(set(extra) & set(_HELLO_KEYS))
        if reserved:
            raise LocalProtocolError(f"hello_meta may not set {reserved}: the session sets them")
        self._local = local
        self._remote = remote
        self._deployment = deployment_hash
        self._policy = policy_hash
        self._nonce = nonce
        self._state = SessionState.NEW
        self._session_id: bytes | None = None
        self._remote_nonce: bytes | None = None
        # Pure: from the remote HELLO's meta, the words that say which part of the deployment differs.
        self._describe_mismatch = describe_mismatch
        self._remote_hello_meta: Mapping[str, MetaValue] | None = None
        self._next_send_seq = 1
        self._last_received_seq = 0
        # Built now so that a bad hello_meta fails at construction, not mid-handshake.
        self._hello = Message(
            kind=Kind.HELLO,
            binding=Binding(deployment_hash, ZERO_SESSION, 0, 0, local, remote),
            meta={
                "protocol": PROTOCOL_VERSION,
                "deployment": deployment_hash,
                "policy": policy_hash,
                "nonce": nonce,
                **extra,
            },
        )

    # ------------------------------------------------------------------ read-only views
    @property
    def state(self) -> SessionState:
        """The current `SessionState`."""
        return self._state

    @property
    def local(self) -> str:
        """Our peer name."""
        return self._local

    @property
    def remote(self) -> str:
        """The remote peer's name."""
        return self._remote

    @property
    def session_id(self) -> bytes | None:
        """The 16-byte session id once established (it stays set after shutdown); None before."""
        return self._session_id

    @property
    def remote_hello_meta(self) -> Mapping[str, MetaValue] | None:
        """The meta of the peer's accepted HELLO (read-only), or None before it arrived."""
        return self._remote_hello_meta

    @property
    def next_send_seq(self) -> int:
        """The seq the next session-bound message from us will carry (1 for the first)."""
        return self._next_send_seq

    @property
    def last_received_seq(self) -> int:
        """The seq of the last session-bound message accepted from the peer (0: none yet)."""
        return self._last_received_seq

    def __repr__(self) -> str:
        return (
            f"PeerSession({self._local!r} -> {self._remote!r}, state={self._state.name}, "
            f"next_send_seq={self._next_send_seq}, last_received_seq={self._last_received_seq})"
        )

    # ------------------------------------------------------------------ transitions
    def _fire(self, event: SessionEvent) -> None:
        try:
            new_state = TRANSITIONS[self._state][event]
        except KeyError:  # the send/receive tables should have stopped us before
            raise LocalProtocolError(f"event {event.value} is illegal in state {self._state.name}") from None
        if new_state is SessionState.ESTABLISHED and self._remote_nonce is not None:
            # Both HELLOs are through: the remote nonce was stored by the one we accepted.
            self._session_id = session_id_from_nonces(self._nonce, self._remote_nonce)
        self._state = new_state

    def _refuse(self, message: str) -> HandshakeRefused:
        self._fire(SessionEvent.REFUSAL)
        return HandshakeRefused(message)

    # ------------------------------------------------------------------ outbound
    def hello(self) -> Message:
        """Our HELLO, to be sent first. Moves NEW -> HELLO_SENT or HELLO_RECEIVED -> ESTABLISHED.

        Returns:
            The HELLO `Message` (zero session, seq 0).

        Raises:
            LocalProtocolError: if our HELLO was already sent or the session was refused.
        """
        if Kind.HELLO not in SENDABLE[self._state]:
            why = (
                "the session was refused"
                if self._state is SessionState.REFUSED
                else "it goes out once, first"
            )
            raise LocalProtocolError(
                f"cannot send HELLO to '{self._remote}' in state {self._state.name}: {why}"
            )
        self._fire(SessionEvent.SEND_HELLO)
        return self._hello

    def bind(
        self,
        kind: Kind,
        *,
        step: int = 0,
        edge: str = "",
        meta: Mapping[str, MetaValue] | None = None,
        tensors: tuple[WireTensor, ...] = (),
        blob: bytes = b"",
    ) -> Message:
        """Build the next outbound message to the peer, bound to this session and the next seq.

        REFUSE and ERROR may be bound in any state; before the session is established they are
        bound pre-session (zero session id, seq 0) and consume no seq. Everything else needs an
        established session. Binding SHUTDOWN or REFUSE moves the state.

        Args:
            kind: the message kind (not HELLO: use `hello()`).
            step: the step the message belongs to.
            edge: "" or "FROM->TO".
            meta: the kind's meta values.
            tensors: the tensors (not copied).
            blob: the blob for the kinds that carry one.

        Returns:
            The `Message`, ready for `encode`. The seq is used up only when this returns.

        Raises:
            LocalProtocolError: if the kind may not be sent in this state, or the message breaks
                the kind's rule.
        """
        try:
            kind = Kind(kind)
        except ValueError:
            raise LocalProtocolError(f"unknown message kind {kind!r}") from None
        if kind is Kind.HELLO:
            raise LocalProtocolError("use PeerSession.hello() for HELLO")
        if kind not in SENDABLE[self._state]:
            raise LocalProtocolError(
                f"cannot send {kind} to '{self._remote}' in state {self._state.name}"
                + self._why_not(self._state, outbound=True)
            )
        if self._session_id is None:  # only REFUSE/ERROR get past the table before establishment
            session, seq = ZERO_SESSION, 0
        else:
            session, seq = self._session_id, self._next_send_seq
            if seq >= _SEQ_LIMIT:
                raise LocalProtocolError(f"seq to '{self._remote}' exhausted; start a new session")
        message = Message(
            kind=kind,
            binding=Binding(self._deployment, session, step, seq, self._local, self._remote),
            edge=edge,
            meta=meta or {},
            tensors=tensors,
            blob=blob,
        )
        if seq:
            self._next_send_seq = seq + 1
        if kind is Kind.SHUTDOWN:
            self._fire(SessionEvent.SEND_SHUTDOWN)
        elif kind is Kind.REFUSE:
            self._fire(SessionEvent.REFUSAL)
        return message

    # ------------------------------------------------------------------ inbound
    def receive(self, header: Header | Message) -> None:
        """Check an inbound message's header against the session and advance it.

        Call it with the `Header` from `decode_header` before decoding the payload (a decoded
        `Message` works too). On success the seq is used up and the state moves if the kind
        moves it; on any error nothing changes, except that a refusal ends the session.

        Args:
            header: the inbound header.

        Raises:
            RemoteProtocolError: wrong sender/receiver, a kind not allowed in this state (such
                as a second HELLO or data before the handshake), a binding to another deployment.
            ReplayError: a seq that is not exactly last + 1, or a binding to another session.
            HandshakeRefused: a HELLO with another protocol version, deployment hash or policy
                hash, or any REFUSE from the peer. The session is then REFUSED.
        """
        kind, b = header.kind, header.binding
        if b.sender != self._remote or b.receiver != self._local:
            raise RemoteProtocolError(
                f"{kind} from '{b.sender}' to '{b.receiver}' arrived on the session "
                f"'{self._remote}' -> '{self._local}': sender and receiver must match it"
            )
        if kind not in RECEIVABLE[self._state]:
            raise RemoteProtocolError(
                f"peer '{self._remote}' sent {kind} in state {self._state.name}"
                + self._why_not(self._state, outbound=False, kind=kind)
            )
        if kind is Kind.HELLO:
            self._receive_hello(header)
            return
        pre_session = kind in _ANY_TIME and b.session == ZERO_SESSION and b.seq == 0
        if not pre_session:
            self._check_bound(kind, b)
            self._last_received_seq = b.seq
        if kind is Kind.REFUSE:
            raise self._refuse(f"peer '{self._remote}' refused: {_text(header.meta.get('reason'))}")
        if kind is Kind.SHUTDOWN:
            self._fire(SessionEvent.RECEIVE_SHUTDOWN)

    def _check_bound(self, kind: Kind, b: Binding) -> None:
        if self._session_id is None:
            raise RemoteProtocolError(
                f"peer '{self._remote}' sent a session-bound {kind} before the handshake completed"
            )
        if b.deployment != self._deployment:
            raise RemoteProtocolError(
                f"peer '{self._remote}' sent {kind} bound to deployment {b.deployment}, "
                f"this session runs deployment {self._deployment}"
            )
        if b.session != self._session_id:
            raise ReplayError(
                f"peer '{self._remote}' sent {kind} bound to session {b.session.hex()}, "
                f"this session is {self._session_id.hex()} (a message from another session)"
            )
        expected = self._last_received_seq + 1
        if b.seq != expected:
            what = "a replay or duplicate" if b.seq < expected else "messages missing or reordered"
            raise ReplayError(
                f"peer '{self._remote}' sent {kind} with seq {b.seq}, expected seq {expected} ({what})"
            )

    def _receive_hello(self, header: Header | Message) -> None:
        b, meta = header.binding, header.meta
        if b.session != ZERO_SESSION or b.seq != 0 or b.step != 0:
            raise RemoteProtocolError(
                f"peer '{self._remote}' sent a HELLO bound to session {b.session.hex()}, step {b.step}, "
                f"seq {b.seq}: a HELLO carries a zero session, step 0 and seq 0"
            )
        theirs = _text(meta["protocol"])
        if meta["protocol"] != PROTOCOL_VERSION:
            raise self._refuse(
                f"peer '{self._remote}' speaks protocol version {theirs}, we speak {PROTOCOL_VERSION}: "
                "both parties must run compatible secure_split releases"
            )
        theirs = _text(meta["deployment"])
        if theirs != self._deployment:
            if self._describe_mismatch is not None:
                raise self._refuse(self._describe_mismatch(meta))
            raise self._refuse(
                f"peer '{self._remote}' runs deployment {theirs}, we run {self._deployment}: "
                "both parties must load the same deployment.yaml"
            )
        theirs = _text(meta["policy"])
        if theirs != self._policy:
            raise self._refuse(
                f"peer '{self._remote}' enforces policy {theirs}, we enforce {self._policy}: "
                "both parties must load the same signed-off policy file"
            )
        if b.deployment != self._deployment:
            raise RemoteProtocolError(
                f"peer '{self._remote}' sent a HELLO bound to deployment {b.deployment} "
                f"but announcing deployment {self._deployment}"
            )
        nonce = meta["nonce"]
        if not isinstance(nonce, bytes) or nonce == self._nonce:
            # The HELLO rule already made it 16 bytes; equal to ours means our HELLO came back.
            raise RemoteProtocolError(
                f"peer '{self._remote}' sent back our own HELLO nonce: a reflected HELLO is refused"
            )
        self._remote_nonce = nonce
        self._remote_hello_meta = MappingProxyType(dict(meta))
        self._fire(SessionEvent.RECEIVE_HELLO)

    @staticmethod
    def _why_not(state: SessionState, *, outbound: bool, kind: Kind | None = None) -> str:
        if kind is Kind.HELLO:
            return ": a second HELLO in one session is refused (a restarted peer needs a new session)"
        if state in (SessionState.NEW, SessionState.HELLO_SENT, SessionState.HELLO_RECEIVED):
            return ": the handshake has not completed (only REFUSE and ERROR before it)"
        if state is SessionState.REFUSED:
            return ": the session was refused (only REFUSE and ERROR after that)"
        closed = SessionState.SHUTDOWN_SENT if outbound else SessionState.SHUTDOWN_RECEIVED
        if state in (closed, SessionState.CLOSED):
            return ": the direction is shut down (only ERROR, REFUSE and AUDIT_RECEIPT after SHUTDOWN)"
        return ""
