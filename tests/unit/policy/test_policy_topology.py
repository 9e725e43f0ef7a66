"""required_flows: what each topology needs on the wire."""

from __future__ import annotations

import yaml
from policy_fixtures import POLICIES, WriteSetup, horizontal_spec, vanilla_spec, vertical_he_spec

from secure_split.config import Deployment, load_deployment
from secure_split.crypto.keys import Identity
from secure_split.policy import (
    CONTROL_KINDS,
    SESSION_KINDS,
    he_key_holder,
    policy_from_mapping,
    required_flows,
)


def data_flows(dep: Deployment) -> set[tuple[str, str, str, str | None]]:
    return {
        (f.sender, f.receiver, f.kind, f.edge)
        for f in required_flows(dep)
        if f.kind not in CONTROL_KINDS and f.kind not in SESSION_KINDS and not f.serving
    }


def test_vanilla_needs_activation_forward_gradient_back_and_control(
    identities: dict[str, Identity], write_setup: WriteSetup
) -> None:
    dep, _ = write_setup(vanilla_spec(identities))
    assert data_flows(dep) == {
        ("owner", "label_holder", "activation", "bottom->top"),
        ("label_holder", "owner", "gradient", "bottom->top"),
    }
    routes = {(f.sender, f.receiver, f.kind) for f in required_flows(dep)}
    for kind in CONTROL_KINDS | set(SESSION_KINDS):
        assert ("label_holder", "owner", kind) in routes
        assert ("owner", "label_holder", kind) in routes
    assert all(f.why for f in required_flows(dep))


def test_same_peer_edges_need_no_flow() -> None:
    dep = load_deployment(POLICIES / "deployments" / "bank_hospital.deployment.yaml")
    edges = {f.edge for f in required_flows(dep)}
    assert "hospital_bottom->merge" in edges
    assert "bank_bottom->merge" not in edges and "merge->top" not in edges
    # vertical: two feature owners, so PSI with the coordinator
    assert ("bank", "hospital", "psi", None) in data_flows(dep)


def test_u_shape_sends_both_ways_on_both_edges() -> None:
    dep = load_deployment(POLICIES / "deployments" / "u_shaped.deployment.yaml")
    assert data_flows(dep) == {
        ("owner", "server", "activation", "head->middle"),
        ("server", "owner", "gradient", "head->middle"),
        ("server", "owner", "activation", "middle->tail"),
        ("owner", "server", "gradient", "middle->tail"),
    }


def test_multi_task_heads_never_talk_to_each_other() -> None:
    dep = load_deployment(POLICIES / "deployments" / "multi_task.deployment.yaml")
    pairs = {frozenset((f.sender, f.receiver)) for f in required_flows(dep)}
    assert frozenset(("cardiology", "oncology")) not in pairs


def test_he_merge_uses_encrypted_kinds_and_a_key_holder(
    identities: dict[str, Identity], write_setup: WriteSetup
) -> None:
    dep, _ = write_setup(vertical_he_spec(identities))
    flows = data_flows(dep)
    assert ("hospital_a", "label_holder", "encrypted_activation", "bottom_a->merge") in flows
    assert ("label_holder", "hospital_b", "aggregate_gradient", "bottom_b->merge") in flows
    assert not any(k == "activation" and e in ("bottom_a->merge", "bottom_b->merge") for _, _, k, e in flows)
    assert he_key_holder(dep, "merge") == "hospital_a"
    assert ("hospital_a", "hospital_b", "he_context", None) in flows
    assert ("hospital_a", "label_holder", "he_context", None) in flows
    assert ("label_holder", "hospital_a", "masked_aggregate", None) in flows
    assert ("hospital_a", "label_holder", "masked_aggregate", None) in flows
    assert ("label_holder", "hospital_a", "psi", None) in flows
    # the key holders' peers hold a session even though they share no edge
    routes = {(f.sender, f.receiver, f.kind) for f in required_flows(dep)}
    assert ("hospital_b", "hospital_a", "hello") in routes


def test_policy_chooses_the_he_key_holder(identities: dict[str, Identity], write_setup: WriteSetup) -> None:
    dep, path = write_setup(vertical_he_spec(identities))
    data = yaml.safe_load(path.read_text())
    data["parties"]["hospital_a"]["assets"]["ckks_secret_key"] = False
    data["parties"]["hospital_b"]["assets"]["ckks_secret_key"] = True
    policy = policy_from_mapping(data)
    assert he_key_holder(dep, "merge", policy) == "hospital_b"
    flows = {(f.sender, f.receiver, f.kind) for f in required_flows(dep, policy=policy)}
    assert ("hospital_b", "hospital_a", "he_context") in flows
    assert ("label_holder", "hospital_b", "masked_aggregate") in flows


def test_sequential_schedule_hands_weights_between_owners(
    identities: dict[str, Identity], write_setup: WriteSetup
) -> None:
    dep, _ = write_setup(horizontal_spec(identities, "sequential"))
    flows = data_flows(dep)
    assert ("hospital_a", "hospital_b", "encrypted_weights", None) in flows
    assert ("hospital_b", "hospital_a", "encrypted_weights", None) in flows
    # PSI only between the label-holding coordinator and each owner, never between owners.
    assert {(s, r) for s, r, k, _ in flows if k == "psi"} == {
        ("server", "hospital_a"), ("hospital_a", "server"), ("server", "hospital_b"), ("hospital_b", "server"),
    }
    assert not any(k == "encrypted_weights" and "server" in (s, r) for s, r, k, _ in flows)


def test_splitfed_schedule_averages_at_the_coordinator(
    identities: dict[str, Identity], write_setup: WriteSetup
) -> None:
    dep, _ = write_setup(horizontal_spec(identities, "splitfed"))
    flows = data_flows(dep)
    assert ("hospital_a", "server", "encrypted_weights", None) in flows
    assert ("server", "hospital_b", "encrypted_weights", None) in flows
    assert ("hospital_a", "hospital_b", "encrypted_weights", None) not in flows
