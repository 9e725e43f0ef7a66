"""PeerSession: handshake, bindings and sequence numbers between two sessions over a fake link."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest

from secure_split import PROTOCOL_VERSION
from secure_split.errors import (
    HandshakeRefused,
    LocalProtocolError,
    RemoteProtocolError,
    ReplayError,
)
from secure_split.protocol import (
    ZERO_SESSION,
    Binding,
    Kind,
    Message,
    PeerSession,
    SessionState,
    WireTensor,
    decode_header,
    encode,
)
from secure_split.protocol.session import RECEIVABLE, SENDABLE, TRANSITIONS, SessionEvent

from .fake_link import (
    DEPLOYMENT,
    MAX_MESSAGE_BYTES,
    OTHER_DEPLOYMENT,
    POLICY,
    FakeLink,
    deliver_frames,
    make_link,
)

ACT = WireTensor("float32", (2, 3), bytes(24))


def activation(session: PeerSession, step: int = 1) -> Message:
    return session.bind(Kind.ACTIVATION, step=step, edge="bottom->top", tensors=(ACT,))


def rebound(message: Message, **changes: object) -> list[bytes | memoryview]:
    """The frames of `message` with its binding changed: what a confused or hostile peer sends."""
    return encode(dataclasses.replace(message, binding=dataclasses.replace(message.binding, **changes)))


def test_handshake_establishes_the_same_session_id_on_both_sides(link: FakeLink) -> None:
    link.handshake()
    assert link.a.state is link.b.state is SessionState.ESTABLISHED
    assert link.a.session_id == link.b.session_id
    assert link.a.session_id is not None and len(link.a.session_id) == 16


def test_session_id_is_sha256_of_the_sorted_nonces() -> None:
    low, high = bytes([1] * 16), bytes([2] * 16)
    a = PeerSession("hospital_a", "bank", DEPLOYMENT, POLICY, nonce=high)
    b = PeerSession("bank", "hospital_a", DEPLOYMENT, POLICY, nonce=low)
    pair = FakeLink(a, b)
    pair.handshake()
    assert a.session_id == hashlib.sha256(low + high).digest()[:16] == b.session_id


def test_handshake_completes_whichever_hello_arrives_first(link: FakeLink) -> None:
    link.send("a->b", link.a.hello())
    link.deliver("a->b")
    assert link.b.state is SessionState.HELLO_RECEIVED
    link.send("b->a", link.b.hello())
    assert link.b.state is SessionState.ESTABLISHED
    assert link.a.state is SessionState.HELLO_SENT
    link.deliver("b->a")
    assert link.a.state is SessionState.ESTABLISHED


def test_hello_carries_version_hashes_nonce_and_hello_meta() -> None:
    session = PeerSession("a", "b", DEPLOYMENT, POLICY, hello_meta={"checkpoints": [3, 9]}, nonce=bytes(16))
    hello = session.hello()
    assert hello.binding == Binding(DEPLOYMENT, ZERO_SESSION, 0, 0, "a", "b")
    assert dict(hello.meta) == {
        "protocol": PROTOCOL_VERSION, "deployment": DEPLOYMENT, "policy": POLICY, "nonce": bytes(16),
        "checkpoints": [3, 9],
    }  # fmt: skip


def test_remote_hello_meta_is_what_the_peer_announced() -> None:
    pair = make_link(hello_meta={"checkpoints": [5], "software": "secure_split 0.1"})
    pair.handshake()
    assert pair.a.remote_hello_meta is not None
    assert pair.a.remote_hello_meta["checkpoints"] == [5]
    assert pair.a.remote_hello_meta["software"] == "secure_split 0.1"


def test_fresh_sessions_draw_fresh_nonces() -> None:
    nonces = {PeerSession("a", "b", DEPLOYMENT, POLICY).hello().meta["nonce"] for _ in range(4)}
    assert len(nonces) == 4


def test_data_flows_both_ways_with_independent_seq_counters(established: FakeLink) -> None:
    for step in (1, 2, 3):
        link_msg = activation(established.a, step)
        established.send("a->b", link_msg)
        assert established.deliver("a->b") == link_msg
    grad = established.b.bind(Kind.GRADIENT, step=3, edge="bottom->top", tensors=(ACT,))
    established.send("b->a", grad)
    assert established.deliver("b->a").binding.seq == 1
    assert established.a.next_send_seq == 4 and established.b.last_received_seq == 3
    assert established.b.next_send_seq == 2 and established.a.last_received_seq == 1


def test_first_data_message_carries_seq_one_and_the_session_binding(established: FakeLink) -> None:
    message = activation(established.a, step=7)
    assert message.binding == Binding(DEPLOYMENT, established.a.session_id or b"", 7, 1, "hospital_a", "bank")


def test_a_replayed_message_is_refused(established: FakeLink) -> None:
    frames = established.send("a->b", activation(established.a))
    established.deliver("a->b")
    with pytest.raises(ReplayError, match="seq 1, expected seq 2"):
        deliver_frames(frames, established.b)
    assert established.b.last_received_seq == 1


def test_an_out_of_order_message_is_refused_and_changes_nothing(established: FakeLink) -> None:
    first = encode(activation(established.a, 1))
    second = encode(activation(established.a, 2))
    with pytest.raises(ReplayError, match="seq 2, expected seq 1"):
        deliver_frames(second, established.b)
    assert deliver_frames(first, established.b).binding.seq == 1
    assert deliver_frames(second, established.b).binding.seq == 2


def test_a_message_bound_to_another_deployment_is_refused(established: FakeLink) -> None:
    frames = rebound(activation(established.a), deployment=OTHER_DEPLOYMENT)
    with pytest.raises(RemoteProtocolError, match=f"deployment {OTHER_DEPLOYMENT}.*{DEPLOYMENT}"):
        deliver_frames(frames, established.b)


def test_a_message_bound_to_another_session_is_refused(established: FakeLink) -> None:
    frames = rebound(activation(established.a), session=bytes(range(16)))
    with pytest.raises(ReplayError, match="another session"):
        deliver_frames(frames, established.b)


def test_a_message_for_another_receiver_is_refused(established: FakeLink) -> None:
    frames = rebound(activation(established.a), receiver="lab")
    with pytest.raises(RemoteProtocolError, match="to 'lab'"):
        deliver_frames(frames, established.b)
    assert established.b.last_received_seq == 0


def test_a_message_from_another_sender_is_refused(established: FakeLink) -> None:
    frames = rebound(activation(established.a), sender="mallory")
    with pytest.raises(RemoteProtocolError, match="from 'mallory'"):
        deliver_frames(frames, established.b)


def test_hello_with_another_deployment_is_refused_naming_both_hashes() -> None:
    pair = make_link(deployment_hash=OTHER_DEPLOYMENT)
    pair.send("b->a", pair.b.hello())
    with pytest.raises(HandshakeRefused) as caught:
        pair.deliver("b->a")
    text = str(caught.value)
    assert OTHER_DEPLOYMENT in text and DEPLOYMENT in text and "deployment.yaml" in text
    assert pair.a.state is SessionState.REFUSED


def test_hello_with_another_policy_is_refused_naming_both_hashes() -> None:
    pair = make_link(policy_hash="other-policy")
    pair.send("b->a", pair.b.hello())
    with pytest.raises(HandshakeRefused, match=f"policy other-policy, we enforce {POLICY}"):
        pair.deliver("b->a")


def test_hello_with_another_protocol_version_is_refused(link: FakeLink) -> None:
    hello = link.b.hello()
    meta = {**hello.meta, "protocol": PROTOCOL_VERSION + 1}
    with pytest.raises(HandshakeRefused, match=f"protocol version {PROTOCOL_VERSION + 1}"):
        deliver_frames(encode(dataclasses.replace(hello, meta=meta)), link.a)


def test_a_second_hello_in_an_established_session_is_a_protocol_error(established: FakeLink) -> None:
    again = PeerSession("bank", "hospital_a", DEPLOYMENT, POLICY).hello()
    with pytest.raises(RemoteProtocolError, match="second HELLO"):
        deliver_frames(encode(again), established.a)
    assert established.a.state is SessionState.ESTABLISHED


def test_a_reflected_hello_is_refused(link: FakeLink) -> None:
    ours = link.a.hello()
    reflected = dataclasses.replace(
        ours, binding=Binding(DEPLOYMENT, ZERO_SESSION, 0, 0, "bank", "hospital_a")
    )
    with pytest.raises(RemoteProtocolError, match="our own HELLO nonce"):
        deliver_frames(encode(reflected), link.a)


def test_hello_bound_to_a_session_or_seq_is_refused(link: FakeLink) -> None:
    with pytest.raises(RemoteProtocolError, match="zero session, step 0 and seq 0"):
        deliver_frames(rebound(link.b.hello(), seq=1), link.a)


def test_bind_before_the_handshake_completes_is_our_error(link: FakeLink) -> None:
    with pytest.raises(LocalProtocolError, match="handshake has not completed"):
        activation(link.a)
    link.a.hello()
    with pytest.raises(LocalProtocolError, match="state HELLO_SENT"):
        link.a.bind(Kind.BARRIER, meta={"epoch": 0})


def test_hello_goes_out_once(link: FakeLink) -> None:
    link.a.hello()
    with pytest.raises(LocalProtocolError, match="goes out once"):
        link.a.hello()
    with pytest.raises(LocalProtocolError, match=r"use PeerSession\.hello\(\)"):
        link.a.bind(Kind.HELLO)


def test_data_before_the_handshake_is_refused_from_the_peer(link: FakeLink) -> None:
    link.handshake()
    early = PeerSession("bank", "hospital_a", DEPLOYMENT, POLICY)
    with pytest.raises(RemoteProtocolError, match="handshake has not completed"):
        early.receive(decode_header(encode(activation(link.a))[0], max_message_bytes=MAX_MESSAGE_BYTES))


def test_refuse_before_the_handshake_is_bound_pre_session_and_ends_both_sides(link: FakeLink) -> None:
    refuse = link.a.bind(Kind.REFUSE, meta={"reason": "unknown peer", "code": "denied"})
    assert refuse.binding.session == ZERO_SESSION and refuse.binding.seq == 0
    assert link.a.state is SessionState.REFUSED
    link.send("a->b", refuse)
    with pytest.raises(HandshakeRefused, match="peer 'hospital_a' refused: unknown peer"):
        link.deliver("a->b")
    assert link.b.state is SessionState.REFUSED
    with pytest.raises(LocalProtocolError, match="refused"):
        link.b.hello()


def test_refuse_in_an_established_session_uses_the_next_seq(established: FakeLink) -> None:
    established.send("a->b", activation(established.a))
    established.deliver("a->b")
    refuse = established.a.bind(Kind.REFUSE, meta={"reason": "policy", "code": "denied", "ref_seq": 1})
    assert refuse.binding.seq == 2 and refuse.binding.session == established.a.session_id
    established.send("a->b", refuse)
    with pytest.raises(HandshakeRefused, match="refused: policy"):
        established.deliver("a->b")
    assert established.b.state is SessionState.REFUSED


def test_error_is_accepted_in_any_state_and_changes_nothing(link: FakeLink) -> None:
    early = link.b.bind(Kind.ERROR, meta={"reason": "disk full", "code": "local"})
    deliver_frames(encode(early), link.a)
    assert link.a.state is SessionState.NEW
    link.handshake()
    late = link.b.bind(Kind.ERROR, meta={"reason": "bad frame", "code": "codec", "ref_seq": 3})
    assert late.binding.seq == 1
    deliver_frames(encode(late), link.a)
    assert link.a.state is SessionState.ESTABLISHED and link.a.last_received_seq == 1


def test_shutdown_closes_one_direction_then_both(established: FakeLink) -> None:
    established.send("a->b", established.a.bind(Kind.SHUTDOWN, meta={"reason": "done", "status": "ok"}))
    assert established.a.state is SessionState.SHUTDOWN_SENT
    with pytest.raises(LocalProtocolError, match="shut down"):
        activation(established.a)
    established.deliver("a->b")
    assert established.b.state is SessionState.SHUTDOWN_RECEIVED
    # The peer may still send, and countersign our final checkpoint after we shut down.
    receipt = established.b.bind(
        Kind.AUDIT_RECEIPT, meta={"peer": "hospital_a", "seq": 9, "head": "ab" * 32, "signature": "00"}
    )
    established.send("b->a", receipt)
    established.deliver("b->a")
    established.send("b->a", established.b.bind(Kind.SHUTDOWN, meta={"reason": "done", "status": "ok"}))
    established.deliver("b->a")
    assert established.a.state is established.b.state is SessionState.CLOSED


def test_data_after_the_peer_shut_down_is_refused(established: FakeLink) -> None:
    established.send("a->b", established.a.bind(Kind.SHUTDOWN, meta={"reason": "done", "status": "ok"}))
    established.deliver("a->b")
    late = dataclasses.replace(activation(established.b), binding=Binding(
        DEPLOYMENT, established.b.session_id or b"", 0, 2, "hospital_a", "bank",
    ))  # fmt: skip
    with pytest.raises(RemoteProtocolError, match="shut down"):
        deliver_frames(encode(late), established.b)


def test_a_message_that_breaks_the_kind_rule_uses_no_seq(established: FakeLink) -> None:
    with pytest.raises(LocalProtocolError, match="an edge is required"):
        established.a.bind(Kind.ACTIVATION, tensors=(ACT,))
    assert established.a.next_send_seq == 1
    assert activation(established.a).binding.seq == 1


@pytest.mark.parametrize(
    ("args", "kwargs", "needle"),
    [
        (("a", "a", DEPLOYMENT, POLICY), {}, "with itself"),
        (("A", "b", DEPLOYMENT, POLICY), {}, "local peer name"),
        (("a", "b", "ab", POLICY), {}, "64 lowercase hex"),
        (("a", "b", DEPLOYMENT, ""), {}, "policy_hash"),
        (("a", "b", DEPLOYMENT, POLICY), {"nonce": b"short"}, "nonce"),
        (("a", "b", DEPLOYMENT, POLICY), {"hello_meta": {"nonce": bytes(16)}}, "may not set"),
        (("a", "b", DEPLOYMENT, POLICY), {"hello_meta": {"colour": "red"}}, "not allowed"),
    ],
)
def test_session_refuses_bad_arguments(args: tuple[str, ...], kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(LocalProtocolError, match=needle):
        PeerSession(*args, **kwargs)  # type: ignore[arg-type]


def test_state_tables_agree_on_every_kind_that_moves_the_state() -> None:
    moves_out = {Kind.HELLO: SessionEvent.SEND_HELLO, Kind.SHUTDOWN: SessionEvent.SEND_SHUTDOWN}
    moves_in = {Kind.HELLO: SessionEvent.RECEIVE_HELLO, Kind.SHUTDOWN: SessionEvent.RECEIVE_SHUTDOWN}
    for state in SessionState:
        assert set(SENDABLE[state]) >= {Kind.REFUSE, Kind.ERROR}
        assert set(RECEIVABLE[state]) >= {Kind.REFUSE, Kind.ERROR}
        assert SessionEvent.REFUSAL in TRANSITIONS[state]
        for kind, event in moves_out.items():
            assert (kind in SENDABLE[state]) == (event in TRANSITIONS[state]), (state, kind)
        for kind, event in moves_in.items():
            assert (kind in RECEIVABLE[state]) == (event in TRANSITIONS[state]), (state, kind)


def test_receive_accepts_a_decoded_message_as_well_as_a_header(established: FakeLink) -> None:
    message = activation(established.a)
    established.b.receive(message)
    assert established.b.last_received_seq == 1
