"""The public test helpers do what they promise."""

from __future__ import annotations

from pathlib import Path

import pytest

from secure_split.errors import ReplayError
from secure_split.protocol import Kind, PeerSession
from secure_split.testing import FakeLink, fixed_identity, generate_deployment


def test_fixed_identity_is_deterministic_per_name() -> None:
    assert fixed_identity("alice").public == fixed_identity("alice").public
    assert fixed_identity("alice").public != fixed_identity("bob").public


def test_fake_link_delivers_and_refuses_a_replay() -> None:
    pair = FakeLink(PeerSession("alice", "bob", "0" * 64, "1" * 64), PeerSession("bob", "alice", "0" * 64, "1" * 64))
    pair.handshake()
    frames = pair.send("a->b", pair.a.bind(Kind.BARRIER, step=1, meta={"epoch": 0}))
    assert pair.deliver("a->b").kind == Kind.BARRIER
    pair.in_flight["a->b"].append(frames)
    with pytest.raises(ReplayError):
        pair.deliver("a->b")


def test_generate_deployment_writes_every_file(tmp_path: Path) -> None:
    gen = generate_deployment("vanilla", tmp_path)
    assert gen.deployment.is_file() and gen.policy.is_file()
    assert set(gen.peer_configs) == {"owner", "label_holder"}
    assert (tmp_path / "keys" / "owner.key").stat().st_mode & 0o077 == 0
