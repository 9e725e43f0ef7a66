"""Test helpers shipped as a public module (as structlog ships `structlog.testing`).

- `fixed_identity(name)`: a deterministic peer identity, for fixtures and known-answer tests.
- `SessionPair`: two protocol sessions joined by an in-memory link (no sockets), like h11's
  test helpers: deliver, drop, reorder or replay the frames the transport would carry.
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
    "SessionPair",
    "SyntheticRun",
    "demo_plan",
    "fixed_identity",
    "generate_deployment",
    "generate_logs",
]


def fixed_identity(name: str) -> Identity:
    """The same identity for the same name, every time (never use it for a real peer)."""
    return identity_from_seed(name, hashlib.sha256(b"secure-split-test-identity:" + name.encode()).digest())


@dataclass
class SessionPair:
    """Two established-or-not sessions and one in-flight queue per direction."""

    a: PeerSession
    b: PeerSession
    max_message_bytes: int = 1 << 24
    in_flight: dict[str, deque[list[bytes | memoryview]]] = field(
        default_factory=lambda: {"a->b": deque(), "b->a": deque()}
    )

    @classmethod
    def create(cls, deployment_hash: str = "0" * 64, policy_hash: str = "1" * 64) -> SessionPair:
        """Sessions 'alice' <-> 'bob' on the same deployment and policy, handshake done."""
        pair = cls(PeerSession("alice", "bob", deployment_hash, policy_hash),
                   PeerSession("bob", "alice", deployment_hash, policy_hash))
        pair.send("a->b", pair.a.hello())
        pair.send("b->a", pair.b.hello())
        pair.deliver("a->b")
        pair.deliver("b->a")
        return pair

    def send(self, direction: str, message: Message) -> list[bytes | memoryview]:
        """Encode `message` and queue its frames in `direction` ('a->b' or 'b->a')."""
        frames = encode(message)
        self.in_flight[direction].append(frames)
        return frames

    def deliver(self, direction: str) -> Message:
        """Deliver the oldest frames in `direction` as the gate would: header, session, body."""
        frames = self.in_flight[direction].popleft()
        to = self.b if direction == "a->b" else self.a
        header = decode_header(frames[0], max_message_bytes=self.max_message_bytes)
        to.receive(header)
        return decode_body(header, frames)


def demo_plan(scenario: str, **options: Any) -> Any:
    """The ScenarioPlan of a demo scenario (see `secure_split.cli.demo.SCENARIOS`)."""
    from secure_split.cli.demo import SCENARIOS

    return SCENARIOS[scenario](options.pop("epochs", 1), **options)


def generate_deployment(scenario: str, workdir: str | Path, **options: Any) -> Any:
    """Generate a demo deployment in `workdir` without starting peers; returns its paths."""
    from secure_split.cli.demo import generate

    return generate(demo_plan(scenario, **options), Path(workdir))
