"""policy_for_deployment: the tightest policy a deployment runs under."""

from __future__ import annotations

import pytest
import yaml
from policy_fixtures import POLICIES, SHIPPED, WriteSetup, horizontal_spec, vanilla_spec, vertical_he_spec

from secure_split.config import load_deployment, peer_fingerprint
from secure_split.crypto.keys import Identity
from secure_split.policy import (
    KINDS,
    check_deployment,
    policy_for_deployment,
    policy_from_mapping,
    required_flows,
)


@pytest.mark.parametrize("name", SHIPPED)
def test_generated_policy_allows_exactly_the_required_routes(name: str) -> None:
    deployment = load_deployment(POLICIES / "deployments" / f"{name}.deployment.yaml")
    data = policy_for_deployment(deployment, name=f"gen-{name.replace('_', '-')}", not_after="2099-01-01")
    policy = policy_from_mapping(yaml.safe_load(yaml.safe_dump(data)), path=deployment.policy_path)
    assert [f for f in check_deployment(policy, deployment) if f.severity == "error"] == []
    required = {(f.sender, f.receiver, f.kind, f.edge) for f in required_flows(deployment)}
    edges: list[str | None] = [e.name for e in deployment.spec.edges] + [None]
    peers = sorted(deployment.spec.peers)
    for s in peers:
        for r in peers:
            for kind in KINDS:
                for edge in edges:
                    allowed = policy.decide_route(s, r, kind, edge).allowed
                    # Rules for edgeless kinds (control, PSI, HE context) name no edge, so match any.
                    needed = (s, r, kind, edge) in required or (s, r, kind, None) in required
                    assert allowed == needed, (s, r, kind, edge)
    for peer, spec in deployment.spec.peers.items():
        assert policy.parties[peer].fingerprint == peer_fingerprint(spec.sign_key, spec.transport_key)


def test_generated_assets_follow_the_deployment(
    identities: dict[str, Identity], write_setup: WriteSetup
) -> None:
    deployment, path = write_setup(vertical_he_spec(identities))
    data = yaml.safe_load(path.read_text())
    assert data["valid"] == {"not_after": "2099-12-31"}
    parties = data["parties"]
    assert parties["hospital_a"]["assets"] == {
        "features": True,
        "labels": False,
        "weights": ["bottom_a"],
        "ckks_secret_key": True,
    }
    assert parties["label_holder"]["assets"]["labels"] is True
    assert parties["label_holder"]["assets"]["ckks_secret_key"] is False
    assert data["require"]["he_merge"] == ["merge"]
    act = [r for r in data["allow"] if r["kinds"] == ["aggregate_gradient"]]
    assert act and all(r["dtype"] == "float32" and r["min_batch"] == 8 for r in act)
    assert all(r["max_bytes"] == deployment.spec.limits.max_message_bytes for r in act)


@pytest.mark.parametrize(
    ("schedule", "handoff", "average", "route"),
    [
        ("sequential", "direct", "sealed", "owners"),
        ("sequential", "relay", "sealed", "relay"),
        ("splitfed", "direct", "sealed", "owners"),
        ("splitfed", "relay", "sealed", "relay"),
        ("splitfed", "relay", "he", "aggregate"),
        ("splitfed", "direct", "he", "aggregate"),
    ],
)
def test_horizontal_weight_hand_off_is_allowed_only_as_generated(
    schedule: str, handoff: str, average: str, route: str,
    identities: dict[str, Identity], write_setup: WriteSetup,
) -> None:
    deployment, path = write_setup(horizontal_spec(identities, schedule, handoff=handoff, average=average))
    policy = policy_from_mapping(yaml.safe_load(path.read_text()))
    assert [f for f in check_deployment(policy, deployment) if f.severity == "error"] == []
    a_to_b = policy.decide_route("hospital_a", "hospital_b", "encrypted_weights").allowed
    a_to_server = policy.decide_route("hospital_a", "server", "encrypted_weights").allowed
    assert (a_to_b, a_to_server) == (route == "owners", route != "owners")
    server = policy.parties["server"]
    assert not server.assets.ckks_secret_key
    assert server.aggregates == (("shared_bottom_a",) if route == "aggregate" else ())
    assert server.relays == (("shared_bottom_a",) if route == "relay" else ())
    # The label holder learns each owner's labelled ids by two-party PSI, never the owners' others.
    assert policy.decide_route("hospital_a", "server", "psi").allowed
    assert not policy.decide_route("hospital_a", "hospital_b", "psi").allowed
    assert policy.parties["hospital_a"].assets.ckks_secret_key == (average == "he" and schedule == "splitfed")


def test_min_batch_never_exceeds_the_batch(
    identities: dict[str, Identity], write_setup: WriteSetup
) -> None:
    _, path = write_setup(vanilla_spec(identities, batch_size=4))
    data = yaml.safe_load(path.read_text())
    assert {r.get("min_batch") for r in data["allow"] if "min_batch" in r} == {4}
