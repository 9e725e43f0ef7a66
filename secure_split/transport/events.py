"""The transport's value types: `TransportPeer` (whom we talk to), `TransportEvent` (what happened
to a connection), and `EventLog` (where events wait until the peer layer drains them).

Connection trouble (a peer went away, a key was refused) is not an exception: the transport keeps
serving and records a `TransportEvent`; the peer layer drains them with `Transport.events()` and
turns them into audit entries (`peer_joined`, `peer_lost`, `refused`).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

EventKind = Literal[
    "connected", "disconnected", "handshake_failed", "auth_refused", "message_dropped", "connection_cut"
]
"""What happened on a connection.

- ``connected``: a CURVE handshake completed. With a peer name: our outbound channel to that peer
  is up (we can send to it). With ``peer=None``: some allowed client completed a handshake with
  our ROUTER.
- ``disconnected``: an established connection was lost (peer closed it, crashed, or sent no
  heartbeat within the timeout). zmq reconnects on its own; a later ``connected`` says it is back.
- ``handshake_failed``: a connection was opened but the CURVE handshake did not complete (wrong
  server key, peer refused us, protocol mismatch, handshake timeout).
- ``auth_refused``: a client presented a transport key that is not in our allowlist.
- ``message_dropped``: an inbound message was discarded before delivery (unknown sender, too big).
- ``connection_cut``: the connection guard closed a connection that broke a bound: a new one over
  the caps on unauthenticated connections (``peer=None``; the detail names the source address),
  one whose undelivered bytes passed what any allowed message could hold (the peer named when its
  messages named it), or the oldest of a peer's connections beyond ``connections_per_peer``.
"""

# A refused or misconfigured client retries every reconnect interval; fold repeats of one
# (peer, kind, detail) inside this window so the log shows the problem, not thousands of copies.
REPEAT_WINDOW_S = 5.0
# Events nobody drains must not grow without bound; the oldest are dropped first.
MAX_QUEUED_EVENTS = 1000


@dataclass(frozen=True)
class TransportPeer:
    """A remote peer as the transport sees it (public data from the deployment).

    Attributes:
        name: the peer's name in the deployment; becomes the ZAP User-Id of its messages.
        endpoint: where its ROUTER listens, ``"tcp://HOST:PORT"``.
        transport_key: its Curve25519 public key, Z85 text (40 characters).
    """

    name: str
    endpoint: str
    transport_key: str


@dataclass(frozen=True)
class TransportEvent:
    """One thing that happened to a connection.

    Attributes:
        peer: the remote peer's name, or None when the transport cannot tell who it was
            (inbound connections before authentication, refused keys).
        kind: see `EventKind`.
        detail: a sentence for operators: what happened and what to check.
        time: `time.monotonic()` when the transport noticed it.
    """

    peer: str | None
    kind: EventKind
    detail: str
    time: float


class EventLog:
    """A bounded, thread-safe queue of `TransportEvent`s that folds rapid repeats.

    The ZAP handler records from its own thread, the transport from the caller's; hence the lock.

    Args:
        repeat_window_s: repeats of one (peer, kind, detail) within this window are only counted.
        maxlen: events kept until drained; the oldest are dropped first.
        clock: monotonic seconds (replaceable in tests).
    """

    def __init__(
        self,
        *,
        repeat_window_s: float = REPEAT_WINDOW_S,
        maxlen: int = MAX_QUEUED_EVENTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._queue: deque[TransportEvent] = deque(maxlen=maxlen)
        self._window = repeat_window_s
        # (peer, kind, detail) -> (time last reported, repeats folded since)
        self._recent: dict[tuple[str | None, str, str], tuple[float, int]] = {}

    def record(self, peer: str | None, kind: EventKind, detail: str, *, fold_repeats: bool = True) -> None:
        """Queue an event; a repeat of a recently reported one is counted instead of queued.

        Args:
            peer: remote peer name or None.
            kind: the event kind.
            detail: operator-facing sentence. Must never contain a secret.
            fold_repeats: False for state changes (connected/disconnected), which always count.
        """
        now = self._clock()
        with self._lock:
            if fold_repeats:
                key = (peer, kind, detail)
                last = self._recent.get(key)
                if last is not None and now - last[0] < self._window:
                    self._recent[key] = (last[0], last[1] + 1)
                    return
                if last is not None and last[1]:
                    detail = f"{detail} (repeated {last[1]} more times in the previous {now - last[0]:.0f} s)"
                self._recent[key] = (now, 0)
                if len(self._recent) > 4 * MAX_QUEUED_EVENTS:
                    # Keys are bounded in practice (peers x kinds); this only guards a flood of
                    # distinct refused keys.
                    self._recent.clear()
            self._queue.append(TransportEvent(peer=peer, kind=kind, detail=detail, time=now))

    def drain(self) -> list[TransportEvent]:
        """Return every queued event, oldest first, and empty the queue."""
        with self._lock:
            events = sorted(self._queue, key=lambda e: e.time)
            self._queue.clear()
        return events
