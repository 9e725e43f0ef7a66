"""The `kit` fixture for transport tests: CURVE identities, free loopback ports, started transports.

Every test opens real sockets on 127.0.0.1. Ports come from the OS (bind to port 0, read it back,
release it); another process may take one before our ROUTER binds it, so starting retries with new
ports on EADDRINUSE. The machine is small and shared: waits are deadlines on poll loops, never
fixed sleeps, and never assertions on speed.
"""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import pytest
import zmq

from secure_split.errors import TransportError
from secure_split.transport import Transport, TransportEvent, TransportPeer

START_ATTEMPTS = 6


@dataclass(frozen=True)
class CurveIdentity:
    """A test peer's name and a fresh Curve25519 keypair (Z85 text)."""

    name: str
    public: str
    secret: str


class TransportKit:
    """Builds and starts transports on fresh loopback ports; closes every one at teardown."""

    # Generous on purpose: two shared cores, parallel test runs, CURVE handshakes.
    CONNECT_TIMEOUT_S = 20.0
    DEFAULT_OPTIONS: dict[str, object] = {  # noqa: RUF012 (read-only defaults)
        "max_message_bytes": 8 * 1024 * 1024,
        "heartbeat_s": 1.0,
        "handshake_timeout_s": 10.0,
        "linger_ms": 0,  # no test relies on delivery after close; teardown must not wait
    }

    def __init__(self) -> None:
        self._opened: list[Transport] = []

    @staticmethod
    def identity(name: str) -> CurveIdentity:
        public, secret = zmq.curve_keypair()
        return CurveIdentity(name=name, public=public.decode("ascii"), secret=secret.decode("ascii"))

    @staticmethod
    def endpoints(count: int) -> list[str]:
        """`count` distinct tcp://127.0.0.1:PORT endpoints that were free a moment ago."""
        holders: list[socket.socket] = []
        try:
            for _ in range(count):
                holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                holder.bind(("127.0.0.1", 0))  # held until all are picked, so the ports differ
                holders.append(holder)
            return [f"tcp://127.0.0.1:{holder.getsockname()[1]}" for holder in holders]
        finally:
            for holder in holders:
                holder.close()

    @staticmethod
    def peer(identity: CurveIdentity, endpoint: str) -> TransportPeer:
        return TransportPeer(name=identity.name, endpoint=endpoint, transport_key=identity.public)

    @staticmethod
    def is_address_in_use(error: BaseException) -> bool:
        cause = error.__cause__
        return isinstance(cause, zmq.ZMQError) and cause.errno == errno.EADDRINUSE

    def transport(
        self, identity: CurveIdentity, endpoint: str, peers: dict[str, TransportPeer], **options: object
    ) -> Transport:
        """Construct (not start) a transport with the test defaults; it is closed at teardown."""
        merged = {**self.DEFAULT_OPTIONS, **options}
        transport = Transport(identity.name, endpoint, identity.secret, identity.public, peers, **merged)  # type: ignore[arg-type]
        self._opened.append(transport)
        return transport

    def start(
        self, endpoint_count: int, build: Callable[[Sequence[str]], Sequence[Transport]]
    ) -> list[Transport]:
        """Call ``build(endpoints)`` and start every transport it returns, retrying on EADDRINUSE."""
        for attempt in range(START_ATTEMPTS):
            built = list(build(self.endpoints(endpoint_count)))
            try:
                for transport in built:
                    transport.start()
            except TransportError as error:
                for transport in built:
                    transport.close()
                if self.is_address_in_use(error) and attempt + 1 < START_ATTEMPTS:
                    continue
                raise
            return built
        raise AssertionError("unreachable")

    def mesh(self, identities: Sequence[CurveIdentity], **options: object) -> list[Transport]:
        """Start one transport per identity, each listing every identity (itself included) as a peer."""

        def build(endpoints: Sequence[str]) -> list[Transport]:
            pairs = list(zip(identities, endpoints, strict=True))
            directory = {i.name: self.peer(i, ep) for i, ep in pairs}
            return [self.transport(i, ep, directory, **options) for i, ep in pairs]

        return self.start(len(identities), build)

    @staticmethod
    def wait_for_event(
        transport: Transport,
        matches: Callable[[TransportEvent], bool],
        timeout_s: float,
        seen: list[TransportEvent] | None = None,
    ) -> TransportEvent | None:
        """Drain `transport.events()` until one matches or the deadline passes (all drained go to `seen`)."""
        deadline = time.monotonic() + timeout_s
        while True:
            for event in transport.events():
                if seen is not None:
                    seen.append(event)
                if matches(event):
                    return event
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.02)  # poll step inside a deadline loop, not a wait for an outcome

    def close_all(self) -> None:
        for transport in self._opened:
            transport.close()


@pytest.fixture
def kit() -> Iterator[TransportKit]:
    """A `TransportKit`; every transport it built is closed after the test."""
    tools = TransportKit()
    try:
        yield tools
    finally:
        tools.close_all()
