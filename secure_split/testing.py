"""Test helpers shipped as a public module (as structlog ships `structlog.testing`).

- `fixed_identity(name)`: a deterministic peer identity, for fixtures and known-answer tests.
- `FakeLink` / `deliver_frames`: two protocol sessions joined by an in-memory link (no sockets),
  like h11's test helpers: deliver, drop, reorder or replay the frames the transport would carry.
- `generate_logs` / `SyntheticRun`: signed, hash-chained audit logs of a synthetic three-peer
  run, for verifier tests and benchmarks.
- `demo_plan` / `generate_deployment`: the demos' generated deployments (keys, data, signed
  policy, peer configs) for a local chain harness.
"""

from __future__ import annotations

import hashlib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secure_split.audit.synthetic import SyntheticRun, generate_logs
from secure_split.crypto.keys import Identity, identity_from_seed
from secure_split.protocol import Message, PeerSession, decode_body, decode_header, encode

__all__ = [
    "MAX_MESSAGE_BYTES",
    "FakeLink",
    "SyntheticRun",
    "deliver_frames",
    "demo_plan",
    "fixed_identity",
    "generate_deployment",
    "generate_logs",
]


def fixed_identity(name: str) -> Identity:
    """The same identity for the same name, every time (never use it for a real peer)."""
    return identity_from_seed(name, hashlib.sha256(b"secure-split-test-identity:" + name.encode()).digest())


MAX_MESSAGE_BYTES = 1 << 20
"""The bound `deliver_frames` decodes under (small, so oversize tests stay fast)."""


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
        """Encode `message` and queue its frames in `direction` ('a->b' or 'b->a')."""
        frames = encode(message)
        self.in_flight[direction].append(frames)
        return frames

    def deliver(self, direction: str) -> Message:
        """Deliver the oldest frames in `direction` as the gate would."""
        frames = self.in_flight[direction].popleft()
        return deliver_frames(frames, self.b if direction == "a->b" else self.a)

    def handshake(self) -> None:
        """Both HELLOs, both delivered: the sessions are established."""
        self.send("a->b", self.a.hello())
        self.send("b->a", self.b.hello())
        self.deliver("a->b")
        self.deliver("b->a")


def demo_plan(scenario: str, **options: Any) -> Any:
    """The ScenarioPlan of a demo scenario (see `secure_split.cli.demo.SCENARIOS`)."""
    from secure_split.cli.demo import SCENARIOS

    return SCENARIOS[scenario](options.pop("epochs", 1), **options)


def generate_deployment(scenario: str, workdir: str | Path, **options: Any) -> Any:
    """Generate a demo deployment in `workdir` without starting peers; returns its paths."""
    from secure_split.cli.demo import generate

    return generate(demo_plan(scenario, **options), Path(workdir))
