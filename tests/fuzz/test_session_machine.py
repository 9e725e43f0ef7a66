"""Hypothesis stateful test of two sessions joined by a hostile link: codec + session together.

The link may deliver in order, reorder, replay, drop, corrupt bytes, inject garbage or frames of
the other direction. Whatever it does: only refusals (`RemoteProtocolError` and its subclasses)
come out of the receiving side, a message refused at its header or by the session changes
nothing, and the sequence numbers taken are the sender's stream in order, each once.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from secure_split.errors import RemoteProtocolError
from secure_split.protocol import Kind, PeerSession, WireTensor, decode_body, decode_header, encode
from secure_split.testing import MAX_MESSAGE_BYTES, deliver_frames

DEPLOYMENT = "5e" * 32
POLICY = "policy-stateful"
DIRECTIONS = ("a->b", "b->a")
SLOW = os.environ.get("SECURE_SPLIT_SLOW") == "1"

_SENDABLE = [
    (Kind.BARRIER, {"meta": {"epoch": 0}}),
    (Kind.BARRIER_ACK, {"meta": {"epoch": 1, "train": {"labels": {"loss_sum": 0.25, "correct": 0, "count": 1}}}}),
    (Kind.ACTIVATION, {"edge": "x->y", "meta": {"phase": "train"},
                       "tensors": (WireTensor("float32", (2, 3), bytes(24)),)}),
    (Kind.PSI, {"meta": {"round": 2}, "blob": b"\x01" * 64}),
    (Kind.ERROR, {"meta": {"reason": "test", "code": "test"}}),
]  # fmt: skip


class HostileLink(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        a = PeerSession("alpha", "beta", DEPLOYMENT, POLICY)
        b = PeerSession("beta", "alpha", DEPLOYMENT, POLICY)
        self.sessions = {"a->b": (a, b), "b->a": (b, a)}
        for sender, receiver in self.sessions.values():
            deliver_frames(encode(sender.hello()), receiver)
        self.sent: dict[str, list[list[bytes]]] = {d: [] for d in DIRECTIONS}
        self.accepted: dict[str, list[int]] = {d: [] for d in DIRECTIONS}

    def _deliver(self, direction: str, frames: list[bytes | memoryview], *, corrupted: bool = False) -> None:
        """What the gate does: header, session, body. A header or session refusal changes nothing;
        a body refused after the session took the header still uses up its seq (the sender counted
        it, and the stream must go on), and is answered like any refusal."""
        _, receiver = self.sessions[direction]
        before = (receiver.state, receiver.last_received_seq)
        try:
            header = decode_header(frames[0], max_message_bytes=MAX_MESSAGE_BYTES)
            receiver.receive(header)
        except RemoteProtocolError:
            assert (receiver.state, receiver.last_received_seq) == before, "a refusal changed the session"
            return
        seq = header.binding.seq
        assert seq == before[1] + 1, f"accepted seq {seq} after {before[1]}"
        self.accepted[direction].append(seq)
        try:
            message = decode_body(header, frames)
        except RemoteProtocolError:
            return
        if not corrupted:  # the codec does not detect flipped bytes (CURVE does, on the wire)
            assert [bytes(f) for f in encode(message)] == [bytes(f) for f in self.sent[direction][seq - 1]], (
                "the accepted message differs from the one sent with that seq"
            )

    @rule(direction=st.sampled_from(DIRECTIONS), choice=st.integers(0, len(_SENDABLE) - 1))
    def send(self, direction: str, choice: int) -> None:
        sender, _ = self.sessions[direction]
        kind, parts = _SENDABLE[choice]
        self.sent[direction].append([bytes(f) for f in encode(sender.bind(kind, step=choice, **parts))])

    @precondition(lambda self: any(self.sent.values()))
    @rule(direction=st.sampled_from(DIRECTIONS), data=st.data())
    def deliver_any(self, direction: str, data: st.DataObject) -> None:
        # In order, reordered, replayed or skipped ahead: the session sorts it out.
        if self.sent[direction]:
            index = data.draw(st.integers(0, len(self.sent[direction]) - 1))
            self._deliver(direction, list(self.sent[direction][index]))

    @precondition(lambda self: any(self.sent.values()))
    @rule(direction=st.sampled_from(DIRECTIONS), data=st.data())
    def deliver_corrupted(self, direction: str, data: st.DataObject) -> None:
        if not self.sent[direction]:
            return
        frames = [bytearray(f) for f in data.draw(st.sampled_from(self.sent[direction]))]
        index = data.draw(st.integers(0, len(frames) - 1))
        if frames[index]:
            at = data.draw(st.integers(0, len(frames[index]) - 1))
            frames[index][at] ^= data.draw(st.integers(1, 255))
        cut = data.draw(st.none() | st.integers(0, max(0, len(frames) - 1)))
        out: list[bytes | memoryview] = [bytes(f) for f in (frames if cut is None else frames[:cut] or frames[:1])]
        self._deliver(direction, out, corrupted=True)

    @rule(direction=st.sampled_from(DIRECTIONS), frames=st.lists(st.binary(max_size=200), min_size=1, max_size=4))
    def deliver_garbage(self, direction: str, frames: list[bytes]) -> None:
        self._deliver(direction, list(frames), corrupted=True)

    @precondition(lambda self: any(self.sent.values()))
    @rule(data=st.data())
    def deliver_to_the_wrong_side(self, data: st.DataObject) -> None:
        # A message alpha sent to beta, handed back to alpha (a reflection).
        direction = data.draw(st.sampled_from([d for d in DIRECTIONS if self.sent[d]]))
        other = "b->a" if direction == "a->b" else "a->b"
        frames = list(data.draw(st.sampled_from(self.sent[direction])))
        _, receiver = self.sessions[other]
        before = receiver.last_received_seq
        try:
            deliver_frames(frames, receiver)
        except RemoteProtocolError:
            assert receiver.last_received_seq == before
            return
        raise AssertionError("a reflected message was accepted")

    @invariant()
    def accepted_is_the_sent_stream_in_order_each_once(self) -> None:
        for direction in DIRECTIONS:
            seqs = self.accepted[direction]
            assert seqs == list(range(1, len(seqs) + 1))
            assert self.sessions[direction][1].last_received_seq == len(seqs)


HostileLink.TestCase.settings = settings(
    max_examples=2000 if SLOW else 40,
    stateful_step_count=60 if SLOW else 25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_a_hostile_link_yields_refusals_only_and_the_stream_in_order = HostileLink.TestCase
