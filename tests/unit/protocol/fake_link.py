"""Fixtures of the protocol tests: the link itself is `secure_split.testing.FakeLink`."""

from __future__ import annotations

from secure_split.protocol import PeerSession
from secure_split.testing import MAX_MESSAGE_BYTES, FakeLink, deliver_frames

__all__ = ["DEPLOYMENT", "MAX_MESSAGE_BYTES", "OTHER_DEPLOYMENT", "POLICY", "FakeLink", "deliver_frames", "make_link"]
DEPLOYMENT = "3f2a" + "0" * 60
OTHER_DEPLOYMENT = "9c1d" + "f" * 60
POLICY = "policy-" + "ab" * 16


def make_link(**b_overrides: object) -> FakeLink:
    """A link between 'hospital_a' and 'bank'; keyword arguments change bank's session."""
    a = PeerSession("hospital_a", "bank", DEPLOYMENT, POLICY)
    options: dict[str, object] = {"deployment_hash": DEPLOYMENT, "policy_hash": POLICY}
    options.update(b_overrides)
    b = PeerSession("bank", "hospital_a", **options)  # type: ignore[arg-type]
    return FakeLink(a, b)
