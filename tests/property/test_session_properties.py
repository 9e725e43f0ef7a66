"""Hypothesis properties of PeerSession over random interleavings of sends and deliveries.

Two sessions exchange frames through in-flight queues (what the transport carries). Whatever the
interleaving: every in-order delivery is accepted and decodes to what was sent, and any replayed
or reordered delivery is refused with ReplayError without changing either session.
"""

from __future__ import annotations

import itertools
from collections import deque
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from secure_split.errors import ReplayError
from secure_split.protocol import (
    Kind,
    Message,
    PeerSession,
    SessionState,
    WireTensor,
    decode_body,
    decode_header,
    encode,
)

DEPLOYMENT = "5e" * 32
POLICY = "policy-v1"
BOUND = 1 << 16
DIRECTIONS = ("a->b", "b->a")
Frames = list[bytes | memoryview]

PAYLOADS: dict[Kind, dict[str, Any]] = {
    Kind.BARRIER: {"meta": {"epoch": 0}},
    Kind.ACTIVATION: {"edge": "bottom->top", "tensors": (WireTensor("float32", (1, 2), bytes(8)),)},
    Kind.GRADIENT: {"edge": "bottom->top", "tensors": (WireTensor("float32", (1, 2), bytes(8)),)},
    Kind.BARRIER_ACK: {"meta": {"epoch": 0, "train": {"t": {"loss_sum": 0.5, "correct": 1, "count": 2}}}},
    Kind.PSI: {"blob": b"blinded ids"},
    Kind.ERROR: {"meta": {"reason": "slow", "code": "warn"}},
    Kind.AUDIT_RECEIPT: {"meta": {"peer": "p", "seq": 1, "head": "h", "signature": "s"}},
}


def receive(frames: Frames, session: PeerSession) -> Message:
    header = decode_header(frames[0], max_message_bytes=BOUND)
    session.receive(header)
    return decode_body(header, frames)


def snapshot(session: PeerSession) -> tuple[object, ...]:
    return (session.state, session.session_id, session.next_send_seq, session.last_received_seq)


HANDSHAKE_EVENTS = ("a sends", "b sends", "a's arrives", "b's arrives")
# A HELLO can only arrive after it was sent: these are all the orders the wire allows.
CAUSAL_ORDERS = [
    order
    for order in itertools.permutations(HANDSHAKE_EVENTS)
    if order.index("a sends") < order.index("a's arrives")
    and order.index("b sends") < order.index("b's arrives")
]


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(CAUSAL_ORDERS), st.binary(min_size=16, max_size=16))
def test_handshake_in_any_causal_order_agrees_on_one_session_id(order: tuple[str, ...], nonce: bytes) -> None:
    a = PeerSession("org_a", "org_b", DEPLOYMENT, POLICY, nonce=nonce)
    b = PeerSession("org_b", "org_a", DEPLOYMENT, POLICY)
    wire: dict[str, Frames] = {}
    for event in order:
        if event == "a sends":
            wire["a"] = encode(a.hello())
        elif event == "b sends":
            wire["b"] = encode(b.hello())
        elif event == "a's arrives":
            receive(wire["a"], b)
        else:
            receive(wire["b"], a)
    assert a.state is b.state is SessionState.ESTABLISHED
    assert a.session_id == b.session_id is not None


class TwoPeers(RuleBasedStateMachine):
    """Random sends both ways, in-order deliveries, replays and reorderings."""

    def __init__(self) -> None:
        super().__init__()
        self.sessions = {
            "a": PeerSession("org_a", "org_b", DEPLOYMENT, POLICY),
            "b": PeerSession("org_b", "org_a", DEPLOYMENT, POLICY),
        }
        self.in_flight: dict[str, deque[tuple[Frames, Message]]] = {d: deque() for d in DIRECTIONS}
        self.delivered: dict[str, list[Frames]] = {d: [] for d in DIRECTIONS}
        self.sent = dict.fromkeys(DIRECTIONS, 0)

    @initialize(a_first=st.booleans())
    def handshake(self, a_first: bool) -> None:
        a, b = self.sessions["a"], self.sessions["b"]
        first, second = (a, b) if a_first else (b, a)
        hello = encode(first.hello())
        receive(hello, second)
        receive(encode(second.hello()), first)

    def ends(self, direction: str) -> tuple[PeerSession, PeerSession]:
        sender, receiver = direction.split("->")
        return self.sessions[sender], self.sessions[receiver]

    @rule(
        direction=st.sampled_from(DIRECTIONS), kind=st.sampled_from(sorted(PAYLOADS)), step=st.integers(0, 9)
    )
    def send(self, direction: str, kind: Kind, step: int) -> None:
        sender, _ = self.ends(direction)
        message = sender.bind(kind, step=step, **PAYLOADS[kind])
        self.sent[direction] += 1
        assert message.binding.seq == self.sent[direction]
        self.in_flight[direction].append((encode(message), message))

    @precondition(lambda self: any(self.in_flight.values()))
    @rule(data=st.data())
    def deliver_next_in_order(self, data: st.DataObject) -> None:
        direction = data.draw(st.sampled_from([d for d in DIRECTIONS if self.in_flight[d]]))
        frames, message = self.in_flight[direction].popleft()
        _, receiver = self.ends(direction)
        assert receive(frames, receiver) == message
        self.delivered[direction].append(frames)

    @precondition(lambda self: any(self.delivered.values()))
    @rule(data=st.data())
    def replay_a_delivered_message(self, data: st.DataObject) -> None:
        direction = data.draw(st.sampled_from([d for d in DIRECTIONS if self.delivered[d]]))
        frames = data.draw(st.sampled_from(self.delivered[direction]))
        self.expect_refusal(direction, frames)

    @precondition(lambda self: any(len(q) > 1 for q in self.in_flight.values()))
    @rule(data=st.data())
    def deliver_one_too_early(self, data: st.DataObject) -> None:
        direction = data.draw(st.sampled_from([d for d in DIRECTIONS if len(self.in_flight[d]) > 1]))
        index = data.draw(st.integers(1, len(self.in_flight[direction]) - 1))
        self.expect_refusal(direction, self.in_flight[direction][index][0])

    def expect_refusal(self, direction: str, frames: Frames) -> None:
        _, receiver = self.ends(direction)
        before = snapshot(receiver)
        try:
            receive(frames, receiver)
        except ReplayError:
            pass
        else:
            raise AssertionError(f"{direction}: a replayed or early message was accepted")
        assert snapshot(receiver) == before

    @invariant()
    def both_sides_agree_on_session_and_counters(self) -> None:
        a, b = self.sessions["a"], self.sessions["b"]
        assert a.session_id == b.session_id is not None
        assert a.state is b.state is SessionState.ESTABLISHED
        for direction in DIRECTIONS:
            sender, receiver = self.ends(direction)
            assert sender.next_send_seq == self.sent[direction] + 1
            assert receiver.last_received_seq == len(self.delivered[direction])


TwoPeers.TestCase.settings = settings(
    max_examples=40, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_random_interleavings_accept_in_order_and_refuse_duplicates = TwoPeers.TestCase
