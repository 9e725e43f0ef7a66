"""The bounds of SECURITY.md's table that a listed peer reaches from inside its session: messages
kept for steps not yet running (`limits.max_queued_messages`), HE merge rounds open at once
(`limits.max_pending_he_rounds`), restarts of one peer per run (`limits.max_rejoins`).

Each is exercised on the real code that enforces it (the node's keep-for-later and restart paths,
the merge holder), with the node's collaborators replaced by recorders: what is refused, what is
kept, what the refusal says.
"""

from __future__ import annotations

from collections import deque
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from secure_split.config import LimitsSpec
from secure_split.crypto.he import KeyHolderContext, encrypt_packed
from secure_split.errors import RemoteProtocolError
from secure_split.peer.node import PeerNode
from secure_split.peer.rounds.he_merge import HeMergeHolder
from secure_split.protocol import Binding, Kind, Message, WireTensor

DEPLOYMENT = "ab" * 32


def _activation(sender: str, step: int, seq: int, nbytes: int = 64) -> Message:
    binding = Binding(DEPLOYMENT, b"\x01" * 16, step, seq, sender, "victim")
    return Message(Kind.ACTIVATION, binding, edge="a->b", tensors=(WireTensor("float32", (1, nbytes // 4), bytes(nbytes)),))


class _NodeStub:
    """The parts of a PeerNode that `_keep_for_later` and `_restarted_session` touch."""

    def __init__(self, **limits: Any) -> None:
        self._later: deque[Message] = deque()
        self._restarts: dict[str, int] = {}
        self.ctx = SimpleNamespace(deployment=SimpleNamespace(spec=SimpleNamespace(limits=LimitsSpec(**limits))))
        self.refused: list[tuple[Message, RemoteProtocolError]] = []
        self.sessions: list[str] = []

    def refuse_message(self, msg: Message, exc: RemoteProtocolError) -> None:
        self.refused.append((msg, exc))

    def new_session(self, peer: str) -> str:
        self.sessions.append(peer)
        return f"session-{peer}-{len(self.sessions)}"


def test_messages_kept_for_later_steps_are_bounded_per_sender() -> None:
    node = _NodeStub(max_queued_messages=8)
    for seq in range(20):
        PeerNode._keep_for_later(node, _activation("mallory", 7, seq))  # type: ignore[arg-type]
    # Another peer's share is its own: mallory's flood does not crowd it out.
    PeerNode._keep_for_later(node, _activation("honest", 7, 0))  # type: ignore[arg-type]
    kept = [m.binding.sender for m in node._later]
    assert kept.count("mallory") == 8 and kept.count("honest") == 1
    assert len(node.refused) == 12
    msg, exc = node.refused[0]
    assert msg.binding.sender == "mallory" and exc.code == "busy"
    assert "limits.max_queued_messages = 8" in str(exc) and "'mallory'" in str(exc)


def test_messages_kept_for_later_steps_are_bounded_in_bytes_too() -> None:
    node = _NodeStub(max_queued_messages=64, max_message_bytes=1 << 20)
    for seq in range(6):  # 6 x 1 MiB against 4 x max_message_bytes
        PeerNode._keep_for_later(node, _activation("mallory", 7, seq, nbytes=1 << 20))  # type: ignore[arg-type]
    assert len(node._later) == 4 and len(node.refused) == 2


def test_restarts_of_one_peer_beyond_max_rejoins_are_refused() -> None:
    node = _NodeStub(max_rejoins=3)
    for _ in range(3):
        PeerNode._restarted_session(node, "flapper")  # type: ignore[arg-type]
    PeerNode._restarted_session(node, "steady")  # type: ignore[arg-type]
    with pytest.raises(RemoteProtocolError, match=r"'flapper' restarted 4 times.*limits.max_rejoins = 3"):
        PeerNode._restarted_session(node, "flapper")  # type: ignore[arg-type]
    assert node.sessions == ["flapper"] * 3 + ["steady"], "a refused restart opens no session"


@pytest.fixture(scope="module")
def ckks() -> KeyHolderContext:
    return KeyHolderContext.create()


def test_he_merge_rounds_open_at_once_are_bounded(ckks: KeyHolderContext) -> None:
    public = ckks.public()
    holder = HeMergeHolder("merge", {"a->m": "a", "b->m": "b"}, "a", public, max_bytes=1 << 24, max_pending=2)
    blob = encrypt_packed(public, np.ones((2, 3), dtype=np.float32)).serialize()
    assert holder.on_encrypted(10, "b->m", "b", blob) == []
    assert holder.on_encrypted(11, "b->m", "b", blob) == []
    with pytest.raises(RemoteProtocolError, match="opened HE step 12 while 2 steps"):
        holder.on_encrypted(12, "b->m", "b", blob)
    # The open rounds still complete; once one does, a new one may open.
    sends = holder.on_encrypted(10, "a->m", "a", blob)
    assert [s.kind for s in sends] == [Kind.MASKED_AGGREGATE]
    assert holder.on_encrypted(12, "b->m", "b", blob) == []
