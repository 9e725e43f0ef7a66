"""`ConnectionGuard`: the thread that watches every TCP connection of a transport and cuts the ones
that break a bound, before they cost this peer more than the bound.

Why a thread of its own, and why TCP counters
--------------------------------------------
libzmq gives no per-connection hooks. What it does give, through the socket monitors, is the file
descriptor of every connection (`ACCEPTED`, `CONNECTED`) and its end (`DISCONNECTED`). With a dup
of that descriptor the guard reads the kernel's TCP counters (`TCP_INFO`) and can shut the
connection down (`shutdown(SHUT_RDWR)` acts on the connection; closing the dup leaves libzmq's
descriptor alone, and libzmq then closes it and reports `DISCONNECTED`). Before acting on a
descriptor the guard checks, on the dup itself, that its address pair is the one recorded at
`ACCEPTED`: a descriptor libzmq closed and reused for another connection is never touched.

The bounds it keeps (each a `limits.*` setting; SECURITY.md, "Bounds"):
- Outsiders (no key needed): connections that have not authenticated are at most
  `max_unauthenticated`, and `max_unauthenticated_per_source` per source address. At a cap, the
  oldest one that has waited more than `PENDING_GRACE_S` is closed to admit the new one (a few
  idle connections cannot hold the slots); if all are younger (a fast flood), the new one is
  closed at once. libzmq closes one that has not authenticated within the handshake interval
  (`ZMQ_HANDSHAKE_IVL`). A connection counts as authenticated once this side has sent its CURVE
  READY, and only then: the kernel's count of bytes we sent on it passes what an unauthenticated
  connection can ever get from us (greeting, WELCOME, ERROR).
- Inbound connections of all kinds are at most `max_connections`; new ones beyond are closed.
- Listed peers: libzmq hands over a multipart message only when all its frames arrived, and its
  size limit applies per frame, so one message of 40 frames of 16 MiB is 640 MiB held before
  anyone could look at it. The guard compares the bytes the kernel received on each connection
  with the bytes of the messages delivered from it (`Transport.recv` reports them, by
  `ZMQ_SRCFD`): more than `max_backlog_bytes` received and not delivered can only be a message
  larger than any allowed (or a flood past the queue bound), and the connection is cut.
- At most `connections_per_peer` inbound connections per peer name (learned from the messages a
  connection delivered); the oldest beyond are cut.
- Our outbound connections receive nothing legitimate but handshake and heartbeat commands; one
  that receives more than `max_outbound_backlog_bytes` is cut (zmq reconnects).

Every cut is recorded as a `connection_cut` event. The guard also turns monitor events into the
transport's `connected` / `disconnected` / `handshake_failed` events and its connection state.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq
from zmq.utils.monitor import recv_monitor_message

from secure_split.transport import monitor
from secure_split.transport.events import EventLog
from secure_split.transport.tcp import AUTHENTICATED_MIN_SENT, FRAME_OVERHEAD, ConnectionHandle, host_of

# Handshake and heartbeat traffic a connection may carry that is never delivered as a message.
HANDSHAKE_SLACK = 16 * 1024
HEARTBEAT_BYTES = 160  # PING + PONG, both directions folded, per heartbeat interval
# A CURVE handshake takes milliseconds; a connection still unauthenticated after this long may be
# closed to make room for a new one when a cap is reached.
PENDING_GRACE_S = 1.0
# How often connections are inspected: often while bytes flow (a cut comes at most one busy tick,
# about 10 MB at loopback speed, past the bound), rarely while they do not.
TICK_BUSY_S = 0.01
TICK_IDLE_S = 0.05
BUSY_BYTES = 256 * 1024  # received between two ticks on some connection: the next tick is soon

CutReason = str


@dataclass
class _Connection:
    fd: int
    pair: tuple[object, object]  # (local address, remote address) as the kernel reports them
    source: str
    opened: float
    outbound_peer: str | None  # our DEALER to this peer; None for inbound
    authenticated: bool = False
    peer: str | None = None  # inbound: the sender named by the messages it delivered
    delivered: int = 0  # wire bytes of delivered messages (an upper bound)
    received: int = 0  # TCP bytes received, at the last look


@dataclass
class GuardStats:
    """What the guard saw (counts since start; `inbound` and `unauthenticated` are current)."""

    inbound: int = 0
    unauthenticated: int = 0
    outbound: int = 0
    accepted: int = 0
    cut: dict[str, int] = field(default_factory=dict)


class ConnectionGuard:
    """Watches a transport's connections from its own thread (see the module docstring).

    Args:
        monitors: monitor socket -> None for the ROUTER's, or the peer name of a DEALER's. The
            guard's thread is the only user of these sockets once `start` ran.
        events: the transport's event log (thread-safe).
        max_unauthenticated: connections not yet authenticated, at most.
        max_unauthenticated_per_source: the same, per source address.
        max_connections: inbound connections, at most.
        connections_per_peer: inbound connections per peer name, at most.
        max_backlog_bytes: bytes an inbound connection may have received but not delivered,
            beyond its kernel receive buffer.
        max_outbound_backlog_bytes: the same for our outbound connections (nothing is delivered).
        heartbeat_s: the heartbeat interval (heartbeats are bytes that are never delivered).
        clock: monotonic seconds.
    """

    def __init__(
        self,
        monitors: dict[zmq.Socket[bytes], str | None],
        events: EventLog,
        *,
        max_unauthenticated: int,
        max_unauthenticated_per_source: int,
        max_connections: int,
        connections_per_peer: int,
        max_backlog_bytes: int,
        max_outbound_backlog_bytes: int,
        heartbeat_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._monitors = dict(monitors)
        self._events = events
        self._max_unauth = max_unauthenticated
        self._max_unauth_source = max_unauthenticated_per_source
        self._max_connections = max_connections
        self._per_peer = connections_per_peer
        self._max_backlog = max_backlog_bytes
        self._max_outbound_backlog = max_outbound_backlog_bytes
        self._heartbeat_s = heartbeat_s
        self._clock = clock
        self._lock = threading.Condition()
        self._conns: dict[int, _Connection] = {}
        # Messages delivered from a connection whose ACCEPTED the thread has not read yet, by
        # address pair: credited when it does (a lag of the thread must not look like a backlog).
        self._early: dict[tuple[object, object], tuple[int, str]] = {}
        self._connected: set[str] = set()
        self._refused_by: set[str] = set()
        self._stats = GuardStats()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Wakes the thread from its poll (stop, settle): a socketpair, which zmq's poller takes.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._cycles = 0

    # ---- called from the transport's thread ----------------------------------------------------

    def start(self) -> None:
        """Start the guard thread (it owns the monitor sockets from now on)."""
        self._thread = threading.Thread(target=self._run, name="secure-split-connection-guard", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and wait for it (at most a few ticks). The caller then closes the monitors."""
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
        self._wake_r.close()
        self._wake_w.close()

    def settle(self, timeout_s: float = 1.0) -> None:
        """Wait until the thread has read every monitor event queued before this call."""
        if self._thread is None:
            return
        with self._lock:
            target = self._cycles + 2  # the cycle under way may have read its events already
        self._wake()
        deadline = self._clock() + timeout_s
        with self._lock:
            while self._cycles < target and self._clock() < deadline and self._thread is not None:
                self._lock.wait(max(0.0, deadline - self._clock()))

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass  # closed, or its buffer is full of wake-ups already

    def delivered(self, fd: int, nbytes: int, frames: int, peer: str) -> None:
        """Account a message `Transport.recv` took from the connection `fd` (its `ZMQ_SRCFD`).

        A connection the thread knows is credited at once (each later message names its peer
        again, so a descriptor reused between libzmq's read and this call misnames a connection
        for one message at most). One it does not know yet is looked up by address pair, through
        a dup, and credited when the thread reads its ACCEPTED.

        Args:
            fd: the descriptor libzmq read the message from.
            nbytes: payload bytes of all its frames.
            frames: how many frames it had (the routing-id frame not counted).
            peer: its authenticated sender.
        """
        if fd < 0:
            return
        wire = nbytes + FRAME_OVERHEAD * (frames + 1)
        with self._lock:
            conn = self._conns.get(fd)
            if conn is not None and conn.outbound_peer is None:
                conn.delivered += wire
                conn.peer = peer
                return
        handle = ConnectionHandle(fd)
        try:
            pair = handle.pair()
        finally:
            handle.close()
        if pair is None:
            return
        with self._lock:
            conn = self._conns.get(fd)
            if conn is not None and conn.pair == pair and conn.outbound_peer is None:
                conn.delivered += wire  # the thread read its ACCEPTED meanwhile
                conn.peer = peer
                return
            before, _ = self._early.pop(pair, (0, peer))
            self._early[pair] = (before + wire, peer)
            while len(self._early) > 4 * self._max_connections:
                del self._early[next(iter(self._early))]  # the oldest: its connection is long gone

    def connected(self) -> set[str]:
        """Peers whose outbound channel is up right now (as of the last event the thread read)."""
        with self._lock:
            return set(self._connected)

    def refused_by(self) -> set[str]:
        """Peers whose allowlist refused our key (libzmq does not retry those)."""
        with self._lock:
            return set(self._refused_by)

    def wait_for(self, done: Callable[[set[str], set[str]], bool], timeout_s: float) -> None:
        """Block until `done(connected, refused_by)` holds or `timeout_s` passes."""
        deadline = self._clock() + timeout_s
        with self._lock:
            while not done(self._connected, self._refused_by):
                remaining = deadline - self._clock()
                if remaining <= 0:
                    return
                self._lock.wait(remaining)

    def stats(self) -> GuardStats:
        """A copy of the guard's counts."""
        with self._lock:
            inbound = [c for c in self._conns.values() if c.outbound_peer is None]
            return GuardStats(
                inbound=len(inbound),
                unauthenticated=sum(1 for c in inbound if not c.authenticated),
                outbound=len(self._conns) - len(inbound),
                accepted=self._stats.accepted,
                cut=dict(self._stats.cut),
            )

    # ---- the guard thread ---------------------------------------------------------------------

    def _run(self) -> None:
        poller = zmq.Poller()
        for mon in self._monitors:
            poller.register(mon, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        next_tick = self._clock()
        while not self._stop.is_set():
            timeout_ms = max(0, round((next_tick - self._clock()) * 1000))
            try:
                ready = dict(poller.poll(timeout_ms))
            except zmq.ZMQError:
                return  # the context is going away
            if self._wake_r.fileno() in ready:
                try:
                    self._wake_r.recv(4096)
                except OSError:
                    pass
            for mon, peer in self._monitors.items():
                if mon in ready:
                    self._drain(mon, peer)
            if self._clock() >= next_tick:
                busy = self._inspect()
                next_tick = self._clock() + (TICK_BUSY_S if busy else TICK_IDLE_S)
            with self._lock:
                self._cycles += 1
                self._lock.notify_all()

    def _drain(self, mon: zmq.Socket[bytes], peer: str | None) -> None:
        while True:
            try:
                message = recv_monitor_message(mon, zmq.NOBLOCK)
            except (zmq.Again, zmq.ZMQError):
                return
            event, value = int(message["event"]), int(message["value"])
            with self._lock:
                if peer is None:
                    self._on_inbound(event, value)
                else:
                    self._on_outbound(peer, event, value)
                self._lock.notify_all()

    def _on_inbound(self, event: int, value: int) -> None:
        if event == zmq.EVENT_ACCEPTED:
            self._accept(value)
        elif event in (zmq.EVENT_DISCONNECTED, zmq.EVENT_CLOSED):
            conn = self._conns.pop(value, None)
            if event == zmq.EVENT_DISCONNECTED and conn is not None and conn.authenticated:
                self._events.record(None, "disconnected", "an inbound connection closed")
        elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._events.record(None, "connected", "an allowed client completed its handshake with us")
        elif event & monitor.HANDSHAKE_FAILURES:
            self._events.record(None, "handshake_failed", monitor.inbound_failure(event, value))

    def _on_outbound(self, peer: str, event: int, value: int) -> None:
        if event == zmq.EVENT_CONNECTED:
            dup = ConnectionHandle(value)
            try:
                pair = dup.pair()
                if pair is not None:
                    self._conns[value] = _Connection(value, pair, host_of(pair[1]), self._clock(), peer)
            finally:
                dup.close()
        elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._connected.add(peer)
            self._events.record(peer, "connected", f"channel to '{peer}' is up", fold_repeats=False)
        elif event in (zmq.EVENT_DISCONNECTED, zmq.EVENT_CLOSED):
            conn = self._conns.get(value)
            if conn is not None and conn.outbound_peer == peer:
                del self._conns[value]
            # libzmq also reports a disconnect after every failed handshake; only the loss of an
            # established channel is news (the failure itself was reported already).
            if event == zmq.EVENT_DISCONNECTED and peer in self._connected:
                self._connected.discard(peer)
                self._events.record(
                    peer,
                    "disconnected",
                    f"channel to '{peer}' lost: '{peer}' closed it, crashed, or sent no heartbeat "
                    f"for {3 * self._heartbeat_s:g} s; reconnecting",
                    fold_repeats=False,
                )
        elif event & monitor.HANDSHAKE_FAILURES:
            if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self._refused_by.add(peer)
            self._events.record(peer, "handshake_failed", monitor.outbound_failure(peer, event, value))

    def _accept(self, fd: int) -> None:
        self._stats.accepted += 1
        dup = ConnectionHandle(fd)
        try:
            pair = dup.pair()
            if pair is None:
                return  # gone already (its DISCONNECTED follows)
            source = host_of(pair[1])
            reason = self._make_room(source)
            if reason is not None:
                dup.cut()
                self._count_cut("unauthenticated")
                self._events.record(None, "connection_cut", f"closed a new connection from {source}: {reason}")
                return
            conn = self._conns[fd] = _Connection(fd, pair, source, self._clock(), None)
            if pair in self._early:
                conn.delivered, conn.peer = self._early.pop(pair)
        finally:
            dup.close()

    def _make_room(self, source: str) -> str | None:
        """Admit one more connection from `source`, or say why not.

        At a cap, a connection that has waited longer than PENDING_GRACE_S without authenticating
        (a legitimate CURVE handshake takes milliseconds) is closed to make room, the oldest
        first: an outsider cannot hold the slots with a few idle connections. Only when every
        waiting one is younger (a fast flood) is the new connection refused.
        """
        inbound = [c for c in self._conns.values() if c.outbound_peer is None]
        if len(inbound) >= self._max_connections:
            return f"this peer already holds {len(inbound)} inbound connections, its bound"
        for scope, cap, setting in (
            (source, self._max_unauth_source, "limits.max_unauthenticated_per_source"),
            (None, self._max_unauth, "limits.max_unauthenticated"),
        ):
            waiting = [c for c in inbound if not c.authenticated and scope in (None, c.source)]
            if len(waiting) < cap:
                continue
            for conn in waiting:  # some may have authenticated since we last looked
                self._look(conn, cut_over=None)
            waiting = [c for c in waiting if not c.authenticated and self._conns.get(c.fd) is c]
            if len(waiting) < cap:
                continue
            oldest = min(waiting, key=lambda c: c.opened)
            if self._clock() - oldest.opened < PENDING_GRACE_S:
                where = f"from {source}" if scope is not None else "in all"
                return f"{len(waiting)} connections {where} were already waiting to authenticate ({setting})"
            self._cut(oldest, "unauthenticated")
            self._events.record(
                None, "connection_cut",
                f"closed a connection from {oldest.source} that had not authenticated in {PENDING_GRACE_S:g} s, "
                f"to admit a new one ({setting})",
            )  # fmt: skip
            inbound.remove(oldest)
        return None

    def _cut(self, conn: _Connection, reason: CutReason) -> None:
        dup = ConnectionHandle(conn.fd)
        try:
            if dup.pair() == conn.pair:
                dup.cut()
        finally:
            dup.close()
        self._conns.pop(conn.fd, None)
        self._count_cut(reason)

    def _inspect(self) -> bool:
        """Look at every connection; True when bytes are flowing on one of them."""
        busy = False
        with self._lock:
            for conn in list(self._conns.values()):
                before = conn.received
                self._look(conn, cut_over=self._allowance(conn))
                busy = busy or conn.received - before > BUSY_BYTES
            self._enforce_per_peer()
        return busy

    def _allowance(self, conn: _Connection) -> int:
        heartbeats = (self._clock() - conn.opened) / max(self._heartbeat_s, 0.01) + 1
        base = self._max_outbound_backlog if conn.outbound_peer is not None else self._max_backlog
        return base + HANDSHAKE_SLACK + int(heartbeats * HEARTBEAT_BYTES)

    def _look(self, conn: _Connection, *, cut_over: int | None) -> None:
        """Read one connection's TCP counters; drop it if it is gone, cut it if over `cut_over`."""
        dup = ConnectionHandle(conn.fd)
        try:
            if dup.pair() != conn.pair:
                # Closed, and perhaps reused for another connection: never act on it; forget it.
                if self._conns.get(conn.fd) is conn:
                    del self._conns[conn.fd]
                return
            try:
                sent, received, rcvbuf = dup.counters()
            except OSError:
                return
            conn.received = received
            if sent >= AUTHENTICATED_MIN_SENT:
                conn.authenticated = True
            if cut_over is None:
                return
            backlog = received - conn.delivered - rcvbuf
            if backlog > cut_over:
                dup.cut()
                del self._conns[conn.fd]
                self._count_cut("backlog")
                self._events.record(conn.outbound_peer or conn.peer, "connection_cut", _backlog_text(conn, backlog))
        finally:
            dup.close()

    def _enforce_per_peer(self) -> None:
        by_peer: dict[str, list[_Connection]] = {}
        for conn in self._conns.values():
            if conn.outbound_peer is None and conn.peer is not None and conn.authenticated:
                by_peer.setdefault(conn.peer, []).append(conn)
        for peer, conns in by_peer.items():
            excess = len(conns) - self._per_peer
            for conn in sorted(conns, key=lambda c: c.opened)[: max(0, excess)]:
                self._cut(conn, "per_peer")
                self._events.record(
                    peer,
                    "connection_cut",
                    f"closed the oldest connection of '{peer}': it held more than {self._per_peer} "
                    "(limits.connections_per_peer)",
                )

    def _count_cut(self, reason: CutReason) -> None:
        self._stats.cut[reason] = self._stats.cut.get(reason, 0) + 1


def _backlog_text(conn: _Connection, backlog: int) -> str:
    if conn.outbound_peer is not None:
        return (
            f"closed our connection to '{conn.outbound_peer}': it pushed {backlog} bytes to us, where "
            "nothing but heartbeats is ever sent on it; zmq reconnects"
        )
    who = f"'{conn.peer}'" if conn.peer else f"an authenticated client at {conn.source}"
    return (
        f"closed the connection of {who}: {backlog} bytes arrived that did not form a message this "
        "peer may accept (a message larger than limits.max_message_bytes, or more queued than "
        "limits.inbound_queue_messages allows)"
    )


def monitored_events(inbound: bool) -> int:
    """The monitor events the guard needs on a ROUTER (inbound) or a DEALER (outbound) socket."""
    common = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED | monitor.HANDSHAKE_FAILURES
    return common | (zmq.EVENT_ACCEPTED if inbound else zmq.EVENT_CONNECTED)

