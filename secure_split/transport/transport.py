"""`Transport`: authenticated, encrypted frame delivery between the peers of one deployment.

Shape of the sockets (one direction per socket pair, no REQ/REP lockstep)::

    this peer                                   remote peer P
    DEALER to P (CURVE client) ───────────────▶ ROUTER (CURVE server, ZAP allowlist)
    ROUTER (CURVE server, ZAP)  ◀─────────────── DEALER to us (CURVE client)

We send to P only on our DEALER for P and receive from everyone only on our ROUTER. The sender of
an inbound message is the ZAP User-Id libzmq attached to it after authenticating the client's
key; nothing inside the frames is trusted for identity.

The transport moves frames; it knows nothing of tensors, policy or sessions. Connection trouble
is reported as `TransportEvent`s (see `events.py`), not raised, so a peer keeps serving.

A `ConnectionGuard` thread (`guard.py`) reads every socket monitor: it keeps the connection state
and cuts connections that break a bound (unauthenticated ones over their caps, a connection whose
undelivered bytes exceed what any allowed message and queue could hold, extra connections of one
peer). Each cut is a `connection_cut` event.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Literal, cast

import zmq
from zmq.utils import z85

from secure_split.errors import ConfigError, ConfigProblem, PeerTimeout, TransportError
from secure_split.transport.allowlist import PeerAllowlist, key_prefix
from secure_split.transport.events import EventLog, TransportEvent, TransportPeer
from secure_split.transport.guard import ConnectionGuard, GuardStats, monitored_events

# The codec's header frame and per-frame CURVE overhead ride on top of the tensor payload;
# MAXMSGSIZE and the total-size check allow this much beyond max_message_bytes.
HEADER_ALLOWANCE_BYTES = 64 * 1024
# Messages queued per outbound peer (SNDHWM). Split learning keeps a few tensors in flight per
# edge; a deeper queue only hides a stalled peer and pins memory (this many times
# max_message_bytes per peer). Inbound, `inbound_queue_messages` (RCVHWM) bounds each connection.
QUEUE_MESSAGES = 16
# Our DEALERs receive only handshake and heartbeat commands: a larger frame from a server is hostile.
OUTBOUND_MAX_FRAME_BYTES = 64 * 1024
# First reconnect after 100 ms (zmq's default), backing off to this while a peer stays unreachable.
RECONNECT_IVL_MAX_MS = 2000

_ENDPOINT = re.compile(r"^tcp://(?P<host>\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):(?P<port>[0-9]{1,5})$")
_State = Literal["new", "started", "closed"]


def _endpoint_problem(endpoint: str, *, bind: bool) -> str | None:
    match = _ENDPOINT.match(endpoint)
    if match is None or not 0 < int(match["port"]) < 65536:
        return f"{endpoint!r} is not 'tcp://HOST:PORT' with a port in 1..65535"
    if not bind and match["host"] == "*":
        return f"{endpoint!r}: '*' can only be bound, not connected to; give the peer's host"
    return None


def _key_problem(key_z85: str) -> str | None:
    # Never echo the key in the message: this check also runs on the secret key.
    if not isinstance(key_z85, str) or len(key_z85) != 40:
        return "a transport key is 40 characters of Z85 text (a Curve25519 key)"
    try:
        if len(z85.decode(key_z85.encode("ascii"))) == 32:
            return None
    except (UnicodeEncodeError, ValueError, KeyError, IndexError):
        pass
    return "not valid Z85 text"


def _readable(sock: zmq.Socket[bytes]) -> bool:
    """Whether a message is waiting, without building a poller (much cheaper than sock.poll(0))."""
    return bool(cast(int, sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN)


class Transport:
    """CURVE-encrypted, ZAP-authenticated multipart messaging with a fixed set of named peers.

    Create it, `start()` it, then `send`, `recv` and drain `events()`; `close()` (or use ``with``)
    when done. Not thread-safe: use one transport from one thread (the ZAP handler runs in its own
    thread and only touches the event log).

    Args:
        name: this peer's name.
        bind_endpoint: where our ROUTER listens, ``"tcp://HOST:PORT"`` (HOST may be ``*``).
        secret_key_z85: our Curve25519 secret key (Z85). Held only until `start()`, never shown.
        public_key_z85: our Curve25519 public key (Z85); must match the secret key.
        peers: the deployment's peers by name. An entry for ``name`` itself is ignored (its key
            must be ours). Exactly these keys may connect to our ROUTER.
        max_message_bytes: largest payload (sum of frames) we accept or send; a larger inbound
            frame makes libzmq drop the connection, a larger total is dropped before delivery.
        heartbeat_s: ZMTP heartbeat interval; a peer silent for 3 intervals counts as disconnected.
        handshake_timeout_s: a CURVE handshake not completed in this time is abandoned.
        linger_ms: how long `close()` keeps trying to deliver queued messages.
        zap_domain: the ZAP domain our ROUTER enforces.
        send_timeout_s: how long `send` waits when a peer's outbound queue is full.
        retired_keys: transport keys (Z85) that peers used before a rotation -> whose they were,
            e.g. "hospital_a's key, retired at 2026-12-01T00:00:00Z". The allowlist refuses them
            like any unknown key; the refusal event says whose retired key knocked.
        max_unauthenticated: inbound connections not yet authenticated, at most (more are closed).
        max_unauthenticated_per_source: the same, per source address.
        connections_per_peer: inbound connections one peer's key may hold.
        inbound_queue_messages: complete messages queued per inbound connection (RCVHWM); with
            the message in transit, a connection's undelivered bytes are bounded by
            (inbound_queue_messages + 2) * (max_message_bytes + header allowance).

    Raises:
        ConfigError: listing every invalid argument at once.
    """

    def __init__(
        self,
        name: str,
        bind_endpoint: str,
        secret_key_z85: str,
        public_key_z85: str,
        peers: Mapping[str, TransportPeer],
        *,
        max_message_bytes: int,
        heartbeat_s: float = 1.0,
        handshake_timeout_s: float = 10.0,
        linger_ms: int = 2000,
        zap_domain: str = "secure-split",
        send_timeout_s: float = 30.0,
        retired_keys: Mapping[str, str] | None = None,
        max_unauthenticated: int = 16,
        max_unauthenticated_per_source: int = 4,
        connections_per_peer: int = 2,
        inbound_queue_messages: int = 4,
    ) -> None:
        problems = self._check_arguments(
            name, bind_endpoint, secret_key_z85, public_key_z85, peers,
            max_message_bytes, heartbeat_s, handshake_timeout_s, linger_ms, zap_domain, send_timeout_s,
        )  # fmt: skip
        self._retired = dict(retired_keys or {})
        for peer_name, peer in peers.items():
            if peer.transport_key in self._retired:
                problems.append(ConfigProblem(
                    f"transport '{name}'", f"peers.{peer_name}.transport_key",
                    f"is a retired key ({self._retired[peer.transport_key]}); a retired key is never admitted",
                ))
        for key, value in (
            ("max_unauthenticated", max_unauthenticated),
            ("max_unauthenticated_per_source", max_unauthenticated_per_source),
            ("connections_per_peer", connections_per_peer),
            ("inbound_queue_messages", inbound_queue_messages),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(ConfigProblem(f"transport '{name}'", key, "must be a positive integer"))
        if problems:
            raise ConfigError(problems)
        self._name = name
        self._bind_endpoint = bind_endpoint
        self._secret_key: bytes | None = secret_key_z85.encode("ascii")
        self._public_key = public_key_z85.encode("ascii")
        self._peers = {peer_name: peer for peer_name, peer in peers.items() if peer_name != name}
        self._max_message_bytes = max_message_bytes
        self._max_total_bytes = max_message_bytes + HEADER_ALLOWANCE_BYTES
        self._heartbeat_ms = max(1, round(heartbeat_s * 1000))
        self._handshake_ms = max(1, round(handshake_timeout_s * 1000))
        self._linger_ms = linger_ms
        self._zap_domain = zap_domain
        self._send_timeout_s = send_timeout_s
        self._max_unauthenticated = max_unauthenticated
        self._max_unauthenticated_per_source = max_unauthenticated_per_source
        self._connections_per_peer = connections_per_peer
        self._inbound_queue = inbound_queue_messages

        self._state: _State = "new"
        self._events = EventLog()
        self._guard: ConnectionGuard | None = None
        self._context: zmq.Context[zmq.Socket[bytes]] | None = None
        self._allowlist: PeerAllowlist | None = None
        self._router: zmq.Socket[bytes] | None = None
        self._dealers: dict[str, zmq.Socket[bytes]] = {}
        # monitor PAIR socket -> peer name (None for our ROUTER); read only by the guard thread
        self._monitors: dict[zmq.Socket[bytes], str | None] = {}
        self._bytes_sent = 0
        self._bytes_received = 0
        self._messages_sent = 0
        self._messages_received = 0

    @staticmethod
    def _check_arguments(
        name: str,
        bind_endpoint: str,
        secret_key_z85: str,
        public_key_z85: str,
        peers: Mapping[str, TransportPeer],
        max_message_bytes: int,
        heartbeat_s: float,
        handshake_timeout_s: float,
        linger_ms: int,
        zap_domain: str,
        send_timeout_s: float,
    ) -> list[ConfigProblem]:
        problems: list[ConfigProblem] = []

        def problem(key: str, message: str) -> None:
            problems.append(ConfigProblem(file=f"transport '{name}'", key=key, message=message))

        if not name:
            problem("name", "must not be empty")
        if (why := _endpoint_problem(bind_endpoint, bind=True)) is not None:
            problem("bind_endpoint", why)
        secret_ok = (why := _key_problem(secret_key_z85)) is None
        if not secret_ok:
            problem("secret_key", f"{why}; regenerate the key file with `secure-split keys`")
        if (why := _key_problem(public_key_z85)) is not None:
            problem("public_key", why)
        elif secret_ok and zmq.curve_public(secret_key_z85.encode("ascii")) != public_key_z85.encode("ascii"):
            problem("public_key", "does not belong to the secret key; load both from the same identity")
        names_by_key: dict[str, str] = {}
        for peer_name, peer in peers.items():
            where = f"peers.{peer_name}"
            if peer.name != peer_name:
                problem(where, f"is keyed '{peer_name}' but names itself '{peer.name}'")
            if (why := _key_problem(peer.transport_key)) is not None:
                problem(f"{where}.transport_key", why)
                continue
            if peer_name == name:
                if peer.transport_key != public_key_z85:
                    problem(
                        where, "this transport's own entry lists a different public key than its key file"
                    )
                continue
            if (why := _endpoint_problem(peer.endpoint, bind=False)) is not None:
                problem(f"{where}.endpoint", why)
            if peer.transport_key == public_key_z85:
                problem(f"{where}.transport_key", f"is this transport's own key ('{name}')")
            other = names_by_key.setdefault(peer.transport_key, peer_name)
            if other != peer_name:
                problem(
                    f"{where}.transport_key", f"is also the key of '{other}'; each peer needs its own key"
                )
        if not isinstance(max_message_bytes, int) or max_message_bytes <= 0:
            problem("max_message_bytes", "must be a positive integer")
        # TTL travels in deciseconds in a 16-bit field: 3 intervals must stay under 6553 s.
        if not 0.01 <= heartbeat_s <= 2000:
            problem("heartbeat_s", "must be between 0.01 and 2000 seconds")
        if not 0.01 <= handshake_timeout_s <= 3600:
            problem("handshake_timeout_s", "must be between 0.01 and 3600 seconds")
        if not isinstance(linger_ms, int) or linger_ms < 0:
            problem("linger_ms", "must be a non-negative integer (milliseconds)")
        if not zap_domain or len(zap_domain) > 254:
            problem("zap_domain", "must be 1..254 characters")
        if not 0.001 <= send_timeout_s <= 3600:
            problem("send_timeout_s", "must be between 0.001 and 3600 seconds")
        return problems

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the ZAP allowlist, bind the ROUTER, and connect one DEALER per remote peer.

        Connecting does not wait for the peers: zmq connects (and reconnects) in the background and
        queues what we send meanwhile. Use `wait_connected` to wait for them.

        Raises:
            TransportError: already started or closed, the bind failed (its ``__cause__`` is the
                `zmq.ZMQError`; ``errno`` EADDRINUSE when the port is taken), or a peer endpoint
                cannot be used (e.g. its host does not resolve). The transport is closed after a
                failed start.
        """
        if self._state != "new":
            raise TransportError(f"transport '{self._name}' is {self._state}; start() runs once")
        self._state = "started"
        try:
            self._start_sockets()
        except zmq.ZMQError as error:
            self.close()
            raise TransportError(f"transport '{self._name}' could not start: {error.strerror}") from error
        except BaseException:
            self.close()
            raise
        finally:
            # zmq keeps its own copy inside the sockets; ours is no longer needed.
            self._secret_key = None

    def _start_sockets(self) -> None:
        assert self._secret_key is not None  # start() runs once, before the key is dropped
        # Our own context: libzmq allows one ZAP handler per context.
        self._context = zmq.Context()
        self._allowlist = PeerAllowlist(
            self._context,
            {peer.transport_key.encode("ascii"): name for name, peer in self._peers.items()},
            self._zap_domain,
            self._on_refused,
        )
        # The allowlist must answer before the first client can arrive, so it starts before bind.
        self._allowlist.start()

        router = self._router = self._new_socket(zmq.ROUTER, peer=None)
        router.setsockopt(zmq.CURVE_SERVER, 1)
        router.setsockopt(zmq.CURVE_SECRETKEY, self._secret_key)
        router.setsockopt(zmq.CURVE_PUBLICKEY, self._public_key)
        router.setsockopt(zmq.ZAP_DOMAIN, self._zap_domain.encode("utf-8"))
        # Without it, libzmq 4.3 admits any CURVE client unauthenticated whenever no ZAP handler
        # is bound (e.g. if the allowlist thread died): encryption without authentication.
        router.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        router.setsockopt(zmq.RCVHWM, self._inbound_queue)
        router.setsockopt(zmq.SNDHWM, 1)  # the ROUTER never sends
        try:
            router.bind(self._bind_endpoint)
        except zmq.ZMQError as error:
            raise TransportError(
                f"transport '{self._name}' could not bind {self._bind_endpoint}: {error.strerror}; "
                f"check that no other process uses this endpoint and that the host is this machine's"
            ) from error

        for name, peer in self._peers.items():
            dealer = self._dealers[name] = self._new_socket(zmq.DEALER, peer=name)
            dealer.setsockopt(zmq.CURVE_SERVERKEY, peer.transport_key.encode("ascii"))
            dealer.setsockopt(zmq.CURVE_SECRETKEY, self._secret_key)
            dealer.setsockopt(zmq.CURVE_PUBLICKEY, self._public_key)
            dealer.setsockopt(zmq.SNDHWM, QUEUE_MESSAGES)
            # Nothing legitimate arrives on a DEALER; keep what a hostile server could push tiny
            # (the guard cuts a connection that pushes more than a few such frames).
            dealer.setsockopt(zmq.RCVHWM, 1)
            dealer.setsockopt(zmq.MAXMSGSIZE, OUTBOUND_MAX_FRAME_BYTES)
            dealer.setsockopt(zmq.SNDTIMEO, max(1, round(self._send_timeout_s * 1000)))
            # IMMEDIATE stays 0: messages queue until the peer is reachable (bounded by SNDHWM).
            dealer.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
            try:
                dealer.connect(peer.endpoint)
            except zmq.ZMQError as error:
                raise TransportError(
                    f"transport '{self._name}' cannot connect to '{name}' at {peer.endpoint}: "
                    f"{error.strerror}; check the endpoint of '{name}' in the deployment"
                ) from error
        message_bound = self._max_total_bytes
        self._guard = ConnectionGuard(
            self._monitors,
            self._events,
            max_unauthenticated=self._max_unauthenticated,
            max_unauthenticated_per_source=self._max_unauthenticated_per_source,
            max_connections=len(self._peers) * self._connections_per_peer + self._max_unauthenticated,
            connections_per_peer=self._connections_per_peer,
            # Queued complete messages, the one the engine holds when the queue is full, the one
            # being decoded: nothing an honest peer sends can leave more than this undelivered.
            max_backlog_bytes=(self._inbound_queue + 2) * message_bound,
            max_outbound_backlog_bytes=3 * OUTBOUND_MAX_FRAME_BYTES,
            heartbeat_s=self._heartbeat_ms / 1000,
        )
        self._guard.start()

    def _new_socket(self, socket_type: int, *, peer: str | None) -> zmq.Socket[bytes]:
        assert self._context is not None
        sock = self._context.socket(socket_type)
        sock.setsockopt(zmq.LINGER, self._linger_ms)
        # libzmq checks MAXMSGSIZE per frame, before allocating it; the guard bounds what a
        # connection holds across frames, `recv` checks the total of a delivered message.
        sock.setsockopt(zmq.MAXMSGSIZE, self._max_total_bytes)
        sock.setsockopt(zmq.HEARTBEAT_IVL, self._heartbeat_ms)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * self._heartbeat_ms)
        # TTL tells the other side to drop us if it hears nothing from us for this long.
        sock.setsockopt(zmq.HEARTBEAT_TTL, 3 * self._heartbeat_ms)
        sock.setsockopt(zmq.HANDSHAKE_IVL, self._handshake_ms)
        mon = sock.get_monitor_socket(events=monitored_events(inbound=peer is None))
        mon.setsockopt(zmq.LINGER, 0)
        self._monitors[mon] = peer
        return sock

    def close(self) -> None:
        """Stop the allowlist, close every socket and the context. Safe to call more than once.

        Blocks up to ``linger_ms`` while queued messages are still being delivered.
        """
        if self._state == "closed":
            return
        self._state = "closed"
        self._secret_key = None
        if self._guard is not None:
            self._guard.stop()  # it owns the monitor sockets: stop it before closing them
        sockets = [*self._dealers.values(), *([self._router] if self._router is not None else [])]
        for sock in sockets:
            try:
                sock.disable_monitor()
            except zmq.ZMQError:
                pass  # never monitored (start failed half-way) or already gone
        for mon in self._monitors:
            mon.close()
        self._monitors.clear()
        for sock in sockets:
            sock.close()
        self._dealers.clear()
        self._router = None
        if self._allowlist is not None:
            self._allowlist.stop()
            self._allowlist = None
        if self._context is not None:
            # destroy, not term: it also closes any socket a failed start left behind, where term
            # would wait for it forever.
            self._context.destroy(linger=self._linger_ms)
            self._context = None

    def __enter__(self) -> Transport:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        # Deliberately no keys: a repr ends up in logs and tracebacks.
        return (
            f"Transport(name={self._name!r}, bind_endpoint={self._bind_endpoint!r}, "
            f"peers={sorted(self._peers)!r}, state={self._state!r})"
        )

    # ---- data --------------------------------------------------------------------------------

    def send(self, peer: str, frames: Sequence[bytes | memoryview]) -> int:
        """Queue one multipart message for `peer`, without copying the frames.

        Returns as soon as the message is queued, also while `peer` is not (yet) connected: the
        queue holds up to 16 messages per peer and zmq delivers them once the channel is up.
        Messages in flight when a connection drops can be lost (zmq does not retransmit); the
        protocol's sequence numbers tell the receiver. zmq reads the buffers later, from its I/O
        thread: do not modify them after this call (hand over a copy if you must).

        Args:
            peer: a remote peer's name.
            frames: the message parts; each a contiguous bytes-like buffer.

        Returns:
            The payload size in bytes (sum of frame sizes).

        Raises:
            TransportError: unknown peer, transport not started or closed, no frames, a
                non-contiguous buffer, a payload above ``max_message_bytes`` plus header allowance,
                or the peer refused our key (zmq does not retry a refused connection).
            PeerTimeout: the peer's queue stayed full for ``send_timeout_s`` (peer stalled or gone).
        """
        self._require_started("send")
        dealer = self._dealers.get(peer)
        if dealer is None:
            raise TransportError(
                f"transport '{self._name}' cannot send to unknown peer '{peer}'; "
                f"known peers: {', '.join(sorted(self._peers)) or '(none)'}"
            )
        if not frames:
            raise TransportError(f"refusing to send an empty message to '{peer}': give at least one frame")
        total = 0
        for frame in frames:
            view = memoryview(frame)
            if not view.contiguous:
                raise TransportError(f"frame for '{peer}' is not a contiguous buffer; copy it first")
            total += view.nbytes
        if total > self._max_total_bytes:
            raise TransportError(
                f"message of {total} bytes for '{peer}' exceeds max_message_bytes "
                f"({self._max_message_bytes}) plus {HEADER_ALLOWANCE_BYTES} header bytes; "
                f"'{peer}' would drop it"
            )
        if self._guard is not None and peer in self._guard.refused_by():
            raise TransportError(
                f"'{peer}' refused this peer's transport key, so nothing can be sent to it: its deployment "
                f"does not list '{self._name}' with this key; restart after the deployments agree"
            )
        try:
            dealer.send_multipart(frames, copy=False)
        except zmq.Again:
            raise PeerTimeout(peer, self._send_timeout_s, "sending") from None
        except zmq.ZMQError as error:
            raise TransportError(f"sending to '{peer}' failed: {error.strerror}") from error
        self._bytes_sent += total
        self._messages_sent += 1
        return total

    def recv(self, timeout_s: float) -> tuple[str, list[memoryview]] | None:
        """Wait up to `timeout_s` for the next message from any peer.

        Args:
            timeout_s: seconds to wait; 0 polls once.

        Returns:
            ``(sender, frames)``: the sender's peer name as authenticated by its CURVE key, and the
            payload frames as zero-copy memoryviews (each keeps its zmq frame alive). None when
            nothing arrived in time. Messages from an unknown User-Id or above the size bound are
            dropped (recorded as ``message_dropped`` events) and the wait goes on.

        Raises:
            TransportError: transport not started or closed.
        """
        router = self._require_started("receive")
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            # EVENTS is a cheap check; poll() builds a poller, so only call it to actually wait.
            if not _readable(router):
                remaining_ms = max(0, round((deadline - time.monotonic()) * 1000))
                if not router.poll(remaining_ms, zmq.POLLIN):
                    return None
            delivered = self._take_message(router)
            if delivered is not None:
                return delivered

    def _take_message(self, router: zmq.Socket[bytes]) -> tuple[str, list[memoryview]] | None:
        parts = router.recv_multipart(copy=False)
        payload = parts[1:]  # parts[0] is the ROUTER's routing id of the connection
        if not payload:
            self._events.record(None, "message_dropped", "an inbound message had no payload frames")
            return None
        try:
            user_id = payload[0].get("User-Id")
        except zmq.ZMQError:
            user_id = None
        sender = user_id if isinstance(user_id, str) and user_id in self._peers else None
        total = sum(len(frame) for frame in payload)
        if self._guard is not None and sender is not None:
            # Every message taken off the socket, kept or dropped, is no longer held by libzmq.
            try:
                fd = int(payload[0].get(zmq.SRCFD))
            except zmq.ZMQError:
                fd = -1
            self._guard.delivered(fd, total, len(payload), sender)
        if sender is None:
            # Unreachable while the allowlist holds; kept so a ZAP slip can never name a sender.
            self._events.record(
                None,
                "message_dropped",
                f"dropped a message whose ZAP User-Id {user_id!r} is not a known peer",
            )
            return None
        if total > self._max_total_bytes:
            self._events.record(
                sender,
                "message_dropped",
                f"dropped a {total}-byte message from '{sender}': above max_message_bytes "
                f"({self._max_message_bytes}) plus {HEADER_ALLOWANCE_BYTES} header bytes",
            )
            return None
        self._bytes_received += total
        self._messages_received += 1
        return sender, [frame.buffer for frame in payload]

    # ---- connection state --------------------------------------------------------------------

    def events(self) -> list[TransportEvent]:
        """Return (and forget) every connection event since the last call, oldest first."""
        return self._events.drain()

    def connected_peers(self) -> set[str]:
        """Names of the peers whose outbound channel (our DEALER to them) is up right now."""
        if self._guard is None:
            return set()
        self._guard.settle()
        return self._guard.connected()

    def connection_stats(self) -> GuardStats:
        """The connection guard's counts: connections held, unauthenticated ones, cuts by reason."""
        return self._guard.stats() if self._guard is not None else GuardStats()

    def wait_connected(self, peers: Iterable[str], timeout_s: float) -> set[str]:
        """Wait until our outbound channels to `peers` are up, at most `timeout_s` seconds.

        Args:
            peers: remote peer names.
            timeout_s: the deadline for all of them together.

        Returns:
            The peers that did NOT connect in time (empty when all did), so the caller can name them.
            Returns early when every missing peer has refused our key (see `events()`).

        Raises:
            TransportError: transport not started or closed, or an unknown peer name.
        """
        self._require_started("wait for peers")
        wanted = set(peers)
        unknown = wanted - set(self._peers)
        if unknown:
            raise TransportError(
                f"transport '{self._name}' cannot wait for unknown peer(s) {', '.join(sorted(unknown))}; "
                f"known peers: {', '.join(sorted(self._peers)) or '(none)'}"
            )
        guard = self._guard
        assert guard is not None  # started
        # A peer that refused our key will not connect however long we wait.
        guard.wait_for(lambda connected, refused: not (wanted - connected - refused), max(0.0, timeout_s))
        return wanted - guard.connected()

    def _on_refused(self, key_z85: str) -> None:
        # Runs on the ZAP thread; EventLog is thread-safe.
        whose = self._retired.get(key_z85)
        self._events.record(
            None,
            "auth_refused",
            f"refused a client with transport key {key_prefix(key_z85)}: not a peer of this deployment"
            if whose is None
            else f"refused a client with a retired transport key ({whose}): a peer not yet restarted with its "
            "new key, or someone holding the old secret",
        )

    def _require_started(self, doing: str) -> zmq.Socket[bytes]:
        if self._state != "started" or self._router is None:
            hint = "call start() first" if self._state == "new" else "it was closed"
            raise TransportError(f"transport '{self._name}' cannot {doing}: {hint}")
        return self._router

    # ---- counters ----------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """This peer's name."""
        return self._name

    @property
    def bytes_sent(self) -> int:
        """Payload bytes handed to zmq by `send` (sum of frame sizes)."""
        return self._bytes_sent

    @property
    def bytes_received(self) -> int:
        """Payload bytes delivered by `recv` (sum of frame sizes)."""
        return self._bytes_received

    @property
    def messages_sent(self) -> int:
        """Messages handed to zmq by `send`."""
        return self._messages_sent

    @property
    def messages_received(self) -> int:
        """Messages delivered by `recv`."""
        return self._messages_received
