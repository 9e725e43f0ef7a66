"""The gate's order, as README.md and docs/internals.md state it, pinned by recording every step.

Send: policy → egress guards → bind (session, seq) → encode → audit → transport; a denial stops
before the bind, so nothing is numbered, encoded or sent. Receive: transport → header (bounded)
→ sender → session (replay) → policy → payload → audit; a denied flow's payload is never decoded.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from secure_split.errors import PolicyDenied
from secure_split.peer import gate as gate_module
from secure_split.peer.gate import Gate
from secure_split.policy import Policy, policy_from_mapping
from secure_split.protocol import Kind, Message, PeerSession, WireTensor, encode
from secure_split.testing import FakeLink

DEPLOYMENT = "ab" * 32
EDGE = "bottom->top"


def _policy(*, activation_dtype: str = "float32") -> Policy:
    control = [
        "hello",
        "refuse",
        "error",
        "step_begin",
        "barrier",
        "barrier_ack",
        "audit_receipt",
        "shutdown",
    ]
    return policy_from_mapping(
        {
            "language": 1,
            "name": "gate-order",
            "version": 1,
            "parties": {
                "owner": {
                    "fingerprint": "sha256:" + "0" * 32,
                    "assets": {"features": True, "labels": False, "weights": ["bottom"]},
                },
                "label_holder": {
                    "fingerprint": "sha256:" + "1" * 32,
                    "assets": {"features": False, "labels": True, "weights": ["top"]},
                },
            },
            "allow": [
                {
                    "id": "act",
                    "from": "owner",
                    "to": "label_holder",
                    "kinds": ["activation"],
                    "edges": [EDGE],
                    "max_bytes": 1 << 20,
                    "min_batch": 8,
                    "dtype": activation_dtype,
                },
                {
                    "id": "ctl-ol",
                    "from": "owner",
                    "to": "label_holder",
                    "kinds": control,
                    "max_bytes": 1 << 20,
                },
                {
                    "id": "ctl-lo",
                    "from": "label_holder",
                    "to": "owner",
                    "kinds": control,
                    "max_bytes": 1 << 20,
                },
            ],
        }
    )


class _Recorder:
    """One log of every step the gate takes, from the fakes and wrappers around it."""

    def __init__(self) -> None:
        self.steps: list[str] = []
        self.inbound: list[tuple[str, list[Any]]] = []

    # the audit sink
    def record(self, event: str, **fields: Any) -> int:
        self.steps.append(f"audit:{event}")
        return len(self.steps)

    # the transport
    def send(self, peer: str, frames: Any) -> int:
        self.steps.append("transport")
        return 0

    def recv(self, timeout_s: float) -> tuple[str, list[Any]] | None:
        self.steps.append("transport")
        return self.inbound.pop(0) if self.inbound else None


class _RecordingPolicy:
    def __init__(self, policy: Policy, log: _Recorder) -> None:
        self._policy, self._log = policy, log

    def decide(self, flow: Any, **kw: Any) -> Any:
        self._log.steps.append("policy")
        return self._policy.decide(flow, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._policy, name)


class _RecordingSession:
    def __init__(self, session: PeerSession, log: _Recorder) -> None:
        self._session, self._log = session, log

    def bind(self, *args: Any, **kw: Any) -> Message:
        self._log.steps.append("bind")
        return self._session.bind(*args, **kw)

    def receive(self, header: Any) -> Any:
        self._log.steps.append("session")
        return self._session.receive(header)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


def _wrap(monkeypatch: pytest.MonkeyPatch, log: _Recorder, name: str, step: str) -> None:
    real = getattr(gate_module, name)

    def recorded(*args: Any, **kw: Any) -> Any:
        log.steps.append(step)
        return real(*args, **kw)

    monkeypatch.setattr(gate_module, name, recorded)


def _pair(policy: Policy) -> FakeLink:
    link = FakeLink(
        PeerSession("owner", "label_holder", DEPLOYMENT, policy.hash),
        PeerSession("label_holder", "owner", DEPLOYMENT, policy.hash),
    )
    link.handshake()
    return link


def _gate(me: str, session: PeerSession, peer: str, policy: Policy, log: _Recorder) -> Gate:
    return Gate(
        me=me,
        deployment_hash=DEPLOYMENT,
        policy=_RecordingPolicy(policy, log),  # type: ignore[arg-type]
        audit=log,
        transport=log,
        sessions={peer: _RecordingSession(session, log)},  # type: ignore[dict-item]
        max_message_bytes=1 << 20,
    )


def _cut(batch: int = 8, dtype: str = "float32") -> WireTensor:
    arr = np.random.default_rng(0).standard_normal((batch, 4)).astype(dtype)
    return WireTensor(dtype, (batch, 4), arr.tobytes())


@pytest.fixture
def log(monkeypatch: pytest.MonkeyPatch) -> _Recorder:
    log = _Recorder()
    _wrap(monkeypatch, log, "check_egress", "egress guards")
    _wrap(monkeypatch, log, "encode", "encode")
    _wrap(monkeypatch, log, "decode_header", "header")
    _wrap(monkeypatch, log, "decode_body", "payload")
    return log


def test_a_send_goes_policy_egress_guards_bind_encode_audit_transport(log: _Recorder) -> None:
    policy = _policy()
    link = _pair(policy)
    raw = np.random.default_rng(1).standard_normal((8, 30))
    msg = _gate("owner", link.a, "label_holder", policy, log).send(
        "label_holder", Kind.ACTIVATION, step=1, edge=EDGE, tensors=(_cut(),), raw=raw
    )
    assert log.steps == ["policy", "egress guards", "bind", "encode", "audit:message_sent", "transport"]
    assert msg.binding.seq == 1  # the first message after the HELLO


@pytest.mark.parametrize("why", ["policy", "egress guard"])
def test_a_denied_send_is_audited_and_never_bound_encoded_or_sent(log: _Recorder, why: str) -> None:
    policy = _policy(activation_dtype="float16" if why == "policy" else "float32")
    link = _pair(policy)
    seq_before = link.a.next_send_seq
    cut = _cut()
    # an egress guard refuses a tensor that carries a raw row of the batch
    raw = np.frombuffer(cut.data, dtype="<f4").reshape(8, 4).astype(np.float64) if why != "policy" else None
    with pytest.raises(PolicyDenied):
        _gate("owner", link.a, "label_holder", policy, log).send(
            "label_holder", Kind.ACTIVATION, step=1, edge=EDGE, tensors=(cut,), raw=raw
        )
    expected = ["policy"] if why == "policy" else ["policy", "egress guards"]
    assert log.steps == [*expected, "audit:policy_denied"]
    assert link.a.next_send_seq == seq_before


def test_a_receive_goes_transport_header_session_policy_payload_audit(log: _Recorder) -> None:
    policy = _policy()
    link = _pair(policy)
    frames = encode(link.a.bind(Kind.ACTIVATION, step=1, edge=EDGE, tensors=(_cut(),)))
    log.inbound.append(("owner", [bytes(f) for f in frames]))
    msg = _gate("label_holder", link.b, "owner", policy, log).receive(0.0)
    assert msg is not None and msg.kind is Kind.ACTIVATION
    assert log.steps == ["transport", "header", "session", "policy", "payload", "audit:message_received"]


def test_an_inbound_flow_the_policy_denies_is_never_decoded(log: _Recorder) -> None:
    sender_policy, receiver_policy = _policy(), _policy(activation_dtype="float16")
    link = _pair(sender_policy)
    frames = encode(link.a.bind(Kind.ACTIVATION, step=1, edge=EDGE, tensors=(_cut(),)))
    log.inbound.append(("owner", [bytes(f) for f in frames]))
    with pytest.raises(PolicyDenied):  # the receiver's own, stricter copy of the policy
        _gate("label_holder", link.b, "owner", receiver_policy, log).receive(0.0)
    assert "payload" not in log.steps
    assert log.steps[:4] == ["transport", "header", "session", "policy"]
    assert "audit:policy_denied" in log.steps
