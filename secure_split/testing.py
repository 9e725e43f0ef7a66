"""Test helpers shipped as a public module (as structlog ships `structlog.testing`).

- `fixed_identity(name)`: a deterministic peer identity, for fixtures and known-answer tests.
- `FakeLink` / `deliver_frames`: two protocol sessions joined by an in-memory link (no sockets),
  like h11's test helpers: deliver, drop, reorder or replay the frames the transport would carry.
- `generate_logs` / `SyntheticRun`: signed, hash-chained audit logs of a synthetic three-peer
  run, for verifier tests and benchmarks.
- `demo_plan` / `generate_deployment`: the demos' generated deployments (keys, data, signed
  policy, peer configs) for a local chain harness.
- `run_peers_in_threads`: every peer of a generated deployment in one process (real sockets).
- `DeliverySimulator`: the parties of a sans-IO round (`secure_split.peer.rounds`) joined by a
  deterministic, seeded delivery order that permutes (and delays) their messages.
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
    "DeliverySimulator",
    "FakeLink",
    "SyntheticRun",
    "deliver_frames",
    "demo_plan",
    "fixed_identity",
    "generate_deployment",
    "generate_logs",
    "run_peers_in_threads",
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
    """The ScenarioPlan of a demo scenario (see `secure_split.scenarios.SCENARIOS`)."""
    from secure_split.scenarios import SCENARIOS

    return SCENARIOS[scenario](options.pop("epochs", 1), **options)


def generate_deployment(scenario: str, workdir: str | Path, **options: Any) -> Any:
    """Generate a demo deployment in `workdir` without starting peers; returns its paths."""
    from secure_split.scenarios import generate

    return generate(demo_plan(scenario, **options), Path(workdir))


# -- a deterministic delivery simulator for sans-IO rounds ------------------------------------------


class DeliverySimulator:
    """Delivers the `Send`s of several sans-IO parties in a seeded random order.

    Each party is a function `(message) -> effects` (a round's `on_message`, wrapped); the
    simulator turns every `Send` into a `Message` bound to its sender and receiver, keeps it in
    flight, and delivers one at a time, picked at random among the links that have something in
    flight. With `fifo_links` (the default, what one ZeroMQ connection per pair gives) the
    messages of one sender to one receiver arrive in the order sent; without it any message in
    flight may overtake any other. Parties that are "busy" may be given a delay: a delivery to
    them is postponed by up to `max_delay` other deliveries.

    Args:
        parties: name -> handler returning the effects of taking one message.
        seed: the order of delivery.
        fifo_links: keep each link's order.
        max_delay: how many other deliveries one may be postponed by.
    """

    def __init__(self, parties: dict[str, Any], *, seed: int, fifo_links: bool = True, max_delay: int = 0) -> None:
        import random

        self.parties = dict(parties)
        self.random = random.Random(seed)  # noqa: S311  (a reproducible delivery order, not a secret)
        self.fifo_links = fifo_links
        self.max_delay = max_delay
        self.in_flight: list[tuple[int, Any]] = []  # (not before this tick, message)
        self.records: dict[str, list[Any]] = {name: [] for name in parties}
        self.delivered: list[Any] = []
        self.tick = 0
        self._seq: dict[tuple[str, str], int] = {}

    def post(self, sender: str, effects: list[Any]) -> None:
        """Put `sender`'s effects in flight (Sends) or on record (Records)."""
        from secure_split.peer.effects import Record, Send
        from secure_split.protocol import Binding

        for e in effects:
            if isinstance(e, Record):
                self.records[sender].append(e)
                continue
            assert isinstance(e, Send)
            link = (sender, e.to)
            seq = self._seq[link] = self._seq.get(link, 0) + 1
            binding = Binding("0" * 64, bytes(16), e.step, seq, sender, e.to)
            msg = Message(e.kind, binding, edge=e.edge, meta=dict(e.meta), tensors=e.tensors, blob=e.blob)
            delay = self.random.randint(0, self.max_delay) if self.max_delay else 0
            self.in_flight.append((self.tick + delay, msg))

    def _candidates(self) -> list[int]:
        ready = [i for i, (t, _) in enumerate(self.in_flight) if t <= self.tick] or list(range(len(self.in_flight)))
        if not self.fifo_links:
            return ready
        first: dict[tuple[str, str], int] = {}
        for i, (_, m) in enumerate(self.in_flight):
            first.setdefault((m.binding.sender, m.binding.receiver), i)
        return [i for i in ready if first[(self.in_flight[i][1].binding.sender, self.in_flight[i][1].binding.receiver)] == i]

    def step(self) -> bool:
        """Deliver one message; False when nothing is in flight."""
        if not self.in_flight:
            return False
        candidates = self._candidates() or [0]
        _, msg = self.in_flight.pop(self.random.choice(candidates))
        self.tick += 1
        self.delivered.append(msg)
        self.post(msg.binding.receiver, self.parties[msg.binding.receiver](msg))
        return True

    def run(self, limit: int = 100_000) -> int:
        """Deliver until nothing is in flight; returns the number delivered.

        Raises:
            AssertionError: more than `limit` deliveries (a livelock).
        """
        n = 0
        while self.step():
            n += 1
            assert n <= limit, f"still delivering after {limit} messages"
        return n


def run_peers_in_threads(peer_configs: dict[str, Path], *, timeout_s: float = 600.0) -> dict[str, Any]:
    """Run every peer of a generated deployment as a thread of this process (real sockets, real
    audit logs, one process: no interpreter start-up per peer). For tests that need the trained
    result, not process isolation.

    Returns:
        peer -> its `PeerResult`.

    Raises:
        TimeoutError: a peer still runs after `timeout_s`.
    """
    import threading

    from secure_split.peer.launch import training_node

    results: dict[str, Any] = {}
    nodes = {name: training_node(cfg) for name, cfg in peer_configs.items()}

    def run(name: str) -> None:
        results[name] = nodes[name].run()

    threads = [threading.Thread(target=run, args=(n,), name=f"peer-{n}", daemon=True) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
        if t.is_alive():
            raise TimeoutError(f"{t.name} still runs after {timeout_s:.0f} s")
    return results
