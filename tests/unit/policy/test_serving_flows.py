"""Serving flows: the routes split inference uses that training does not (predictions, a requester's
sessions with the hops of a chain, the PSI of a label holder's request), required only to serve."""

from __future__ import annotations

import yaml
from policy_fixtures import POLICIES, WriteSetup, horizontal_spec

from secure_split.config import load_deployment
from secure_split.crypto.keys import Identity
from secure_split.policy import (
    Flow,
    check_deployment,
    load_policy,
    policy_for_deployment,
    policy_from_mapping,
    required_flows,
)


def serving(name: str) -> set[tuple[str, str, str, str | None]]:
    dep = load_deployment(POLICIES / "deployments" / f"{name}.deployment.yaml")
    return {(f.sender, f.receiver, f.kind, f.edge) for f in required_flows(dep) if f.serving}


def test_the_label_holder_returns_predictions_on_the_owners_edge_and_may_ask_itself_after_psi() -> None:
    assert serving("vanilla") == {
        ("label_holder", "owner", "prediction", "bottom->top"),  # the owner asks
        ("label_holder", "owner", "psi", None), ("owner", "label_holder", "psi", None),  # the label holder asks
    }


def test_no_prediction_crosses_the_wire_where_the_requester_computes_the_output() -> None:
    assert serving("u_shaped") == set()  # the owner's own tail predicts
    # A merge of two owners' inputs at the bank: the bank asks with its own rows, the hospital's are
    # aligned by the PSI training uses too; only a hospital's request needs a prediction back.
    assert serving("bank_hospital") == {("bank", "hospital", "prediction", None)}


def test_a_chain_s_requester_needs_sessions_with_every_hop_which_training_does_not() -> None:
    flows = serving("multi_hop")
    dep = load_deployment(POLICIES / "deployments" / "multi_hop.deployment.yaml")
    training = {(f.sender, f.receiver) for f in required_flows(dep) if not f.serving}
    assert {(a, b) for a, b, _, _ in flows} - training == {("owner", "hop2"), ("hop2", "owner")}
    assert ("owner", "hop2", "barrier", None) in flows and ("hop2", "owner", "barrier_ack", None) in flows
    assert ("label_holder", "owner", "prediction", None) in flows  # the top's prediction travels on no edge


def test_serving_flows_do_not_change_whom_a_training_run_talks_to() -> None:
    from secure_split.peer.context import counterparties

    dep = load_deployment(POLICIES / "deployments" / "multi_hop.deployment.yaml")
    policy = load_policy(POLICIES / "multi_hop.yaml")
    assert counterparties(dep, policy, "owner") == sorted(dep_neighbours(dep, "owner"))


def dep_neighbours(dep: object, peer: str) -> set[str]:
    from secure_split.topology import Topology

    topo = Topology.from_deployment(dep)  # type: ignore[arg-type]
    coordinator = dep.spec.coordinator  # type: ignore[attr-defined]
    return topo.neighbours(peer) | ({coordinator} - {peer})


def test_horizontal_owners_each_get_their_predictions(identities: dict[str, Identity], write_setup: WriteSetup) -> None:
    dep, _ = write_setup(horizontal_spec(identities, "sequential"))
    flows = {(f.sender, f.receiver, f.kind) for f in required_flows(dep) if f.serving}
    owners = sorted({seg["peer"] for seg in horizontal_spec(identities, "sequential")["segments"].values()
                     if seg.get("input") == "features"})
    assert len(owners) == 2
    assert {r for _, r, _ in flows} == set(owners) and {k for _, _, k in flows} == {"prediction"}


def test_a_training_only_policy_that_denies_predictions_still_passes_the_startup_check() -> None:
    dep = load_deployment(POLICIES / "deployments" / "vanilla.deployment.yaml")
    policy = load_policy(POLICIES / "vanilla.yaml")
    assert not policy.decide_route("label_holder", "owner", "prediction", "bottom->top").allowed
    assert [f for f in check_deployment(policy, dep) if f.severity == "error"] == []


def test_generated_policies_allow_predictions_as_int64_classes_only() -> None:
    dep = load_deployment(POLICIES / "deployments" / "vanilla.deployment.yaml")
    data = policy_for_deployment(dep, name="gen-vanilla", not_after="2099-01-01")
    (rule,) = [r for r in data["allow"] if r["kinds"] == ["prediction"]]
    assert (rule["from"], rule["to"], rule["edges"], rule["dtype"]) == ("label_holder", "owner", ["bottom->top"], "int64")
    policy = policy_from_mapping(yaml.safe_load(yaml.safe_dump(data)), path=dep.policy_path)

    def flow(dtype: str) -> Flow:
        return Flow("label_holder", "owner", "prediction", "bottom->top", "send", 512, dtype, (64,), 64)

    assert policy.decide(flow("int64")).allowed
    assert not policy.decide(flow("float32")).allowed  # no logits, scores or activations
    assert not policy.decide_route("owner", "label_holder", "prediction", "bottom->top").allowed
