"""A fake link between two PeerSessions: encode on one side, decode and receive on the other.

Like h11's test helpers: no sockets, just the frames the transport would carry, kept in a queue
per direction so tests can deliver, drop, reorder or replay them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from secure_split.protocol import Message, PeerSession, decode_body, decode_header, encode

MAX_MESSAGE_BYTES = 1 << 20
DEPLOYMENT = "3f2a" + "0" * 60
OTHER_DEPLOYMENT = "9c1d" + "f" * 60
POLICY = "policy-" + "ab" * 16


def deliver_frames(frames: list[bytes | memoryview], to: PeerSession) -> Message:
    """What the gate does with inbound frames: header, session check, then the body."""
    header = decode_header(frames[0], max_message_bytes=MAX_MESSAGE_BYTES)
    to.receive(header)
    return decode_body(header, frames)


@dataclass
class FakeLink:
    """Two sessions and one in-flight queue per direction (frames as the transport moves them)."""

    a: PeerSession
    b: PeerSession
    in_flight: dict[str, deque[list[bytes | memoryview]]] = field(
        default_factory=lambda: {"a->b": deque(), "b->a": deque()}
    )

    def send(self, direction: str, message: Message) -> list[bytes | memoryview]:
        frames = encode(message)
        self.in_flight[direction].append(frames)
        return frames

    def deliver(self, direction: str) -> Message:
        frames = self.in_flight[direction].popleft()
        return deliver_frames(frames, self.b if direction == "a->b" else self.a)

    def handshake(self) -> None:
        self.send("a->b", self.a.hello())
        self.send("b->a", self.b.hello())
        self.deliver("a->b")
        self.deliver("b->a")


def make_link(**b_overrides: object) -> FakeLink:
    """A link between 'hospital_a' and 'bank'; keyword arguments change bank's session."""
    a = PeerSession("hospital_a", "bank", DEPLOYMENT, POLICY)
    options: dict[str, object] = {"deployment_hash": DEPLOYMENT, "policy_hash": POLICY}
    options.update(b_overrides)
    b = PeerSession("bank", "hospital_a", **options)  # type: ignore[arg-type]
    return FakeLink(a, b)
