"""Policy.decide: default deny, deny overrides allow, constraints, validity, the asset guard."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

import pytest

from secure_split.policy import Flow, Policy, policy_from_mapping

FP = {
    n: "sha256:" + c * 32 for n, c in (("hospital_a", "a"), ("bank", "b"), ("hospital_b", "c"), ("agg", "d"))
}
EDGE = "a_bottom->top"


def mapping(**extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "hospitals-v1",
        "version": 1,
        "parties": {
            "hospital_a": {
                "fingerprint": FP["hospital_a"],
                "assets": {"features": True, "weights": ["a_bottom"]},
            },
            "bank": {"fingerprint": FP["bank"], "assets": {"labels": True, "weights": ["top"]}},
        },
        "allow": [
            {
                "id": "fwd",
                "from": "hospital_a",
                "to": "bank",
                "kinds": "activation",
                "edges": EDGE,
                "max_bytes": 1000,
                "min_batch": 8,
                "dtype": "float32",
                "shape": [None, 16],
            },
            {"id": "ctl", "from": ["hospital_a", "bank"], "to": ["hospital_a", "bank"], "kinds": "control"},
        ],
    }
    data.update(extra)
    return data


def act(**kw: Any) -> Flow:
    base: dict[str, Any] = {
        "sender": "hospital_a",
        "receiver": "bank",
        "kind": "activation",
        "edge": EDGE,
        "direction": "send",
        "nbytes": 512,
        "dtype": "float32",
        "shape": (32, 16),
        "batch_size": 32,
    }
    base.update(kw)
    return Flow(**base)


@pytest.fixture
def policy() -> Policy:
    return policy_from_mapping(mapping())


def test_matching_allow_rule_allows_and_names_itself(policy: Policy) -> None:
    d = policy.decide(act())
    assert d.allowed and d.rule_id == "fwd" and d.policy_hash == policy.hash
    assert d.reason == (
        "hospital_a -> bank: kind 'activation' on edge a_bottom->top is allowed by policy 'hospitals-v1' v1 "
        "(rule: fwd)"
    )


def test_no_matching_rule_is_default_deny_with_a_readable_reason(policy: Policy) -> None:
    d = policy.decide(act(edge="b_bottom->top"))
    assert not d.allowed and d.rule_id == "default-deny"
    assert d.reason == (
        "hospital_a -> bank: kind 'activation' on edge b_bottom->top is not allowed by policy "
        "'hospitals-v1' v1 (rule: default deny)"
    )
    assert not policy.decide(act(sender="bank", receiver="hospital_a")).allowed


@pytest.mark.parametrize("deny_first", [True, False])
def test_deny_rule_overrides_allow_whatever_the_order(deny_first: bool) -> None:
    data = mapping(deny=[{"id": "block", "from": "*", "to": "bank", "kinds": ["activation"]}])
    if not deny_first:
        data = {k: data[k] for k in ("name", "version", "parties", "deny", "allow")}
    d = policy_from_mapping(data).decide(act())
    assert not d.allowed and d.rule_id == "block" and "(rule: block)" in d.reason


@pytest.mark.parametrize(
    ("flow_changes", "fragment"),
    [
        ({"nbytes": 1001}, "exceeds max_bytes 1000"),
        ({"batch_size": 4, "shape": (4, 16)}, "below min_batch 8"),
        ({"batch_size": None, "shape": (4, 16)}, "below min_batch 8"),
        ({"batch_size": None, "shape": None}, "no tensor"),
        ({"dtype": "float64"}, "dtype float64"),
        ({"dtype": None}, "carries no tensor"),
        ({"shape": (32, 17)}, "does not match [*, 16]"),
        ({"shape": (32, 16, 1)}, "does not match"),
        ({"compressed": True}, "compressed"),
    ],
)
def test_constraints_of_the_allow_rule_are_enforced(
    policy: Policy, flow_changes: dict[str, Any], fragment: str
) -> None:
    d = policy.decide(act(**flow_changes))
    assert not d.allowed and d.rule_id == "fwd"
    assert fragment in d.reason


def test_batch_size_unknown_but_min_batch_from_shape_passes(policy: Policy) -> None:
    assert policy.decide(act(batch_size=None)).allowed


def test_a_later_allow_rule_can_admit_what_an_earlier_ones_constraints_refuse() -> None:
    data = mapping()
    data["allow"].append(
        {
            "id": "big",
            "from": "hospital_a",
            "to": "bank",
            "kinds": "activation",
            "max_bytes": 10_000,
            "min_batch": 8,
        }
    )
    p = policy_from_mapping(data)
    d = p.decide(act(nbytes=5000))
    assert d.allowed and d.rule_id == "big"


def test_decide_route_ignores_per_message_constraints(policy: Policy) -> None:
    assert policy.decide_route("hospital_a", "bank", "activation", EDGE).allowed
    assert not policy.decide_route("bank", "hospital_a", "activation", EDGE).allowed


def test_outside_the_validity_window_everything_is_denied() -> None:
    p = policy_from_mapping(mapping(valid={"not_before": "2026-01-01", "not_after": "2026-06-30"}))
    inside = datetime(2026, 3, 1, tzinfo=UTC)
    assert p.decide(act(), now=inside).allowed
    for t in (datetime(2025, 12, 31, tzinfo=UTC), datetime(2026, 7, 1, tzinfo=UTC)):
        d = p.decide(act(), now=t)
        assert not d.allowed and d.rule_id == "validity" and "not valid" in d.reason
    naive = datetime(2026, 3, 1)  # naive times count as UTC
    assert p.decide(act(), now=naive).allowed


def test_unknown_parties_and_kinds_are_denied(policy: Policy) -> None:
    assert policy.decide(act(sender="mallory")).rule_id == "unknown-party"
    assert policy.decide(act(receiver="mallory")).rule_id == "unknown-party"
    assert policy.decide(act(kind="raw_features")).rule_id == "unknown-kind"


def test_enum_kinds_and_empty_edges_are_understood() -> None:
    class Kind(str, enum.Enum):  # noqa: UP042 - the protocol's Kind may be a (str, Enum); test that form
        ACTIVATION = "activation"
        HELLO = "hello"

    p = policy_from_mapping(mapping())
    assert p.decide(act(kind=Kind.ACTIVATION)).allowed
    hello = Flow("bank", "hospital_a", Kind.HELLO, "", "receive", 100)
    assert p.decide(hello).allowed


def test_rule_with_edges_does_not_match_messages_without_edge(policy: Policy) -> None:
    assert policy.decide(act(edge=None)).rule_id == "default-deny"


def test_decisions_have_unique_ids_and_a_record(policy: Policy) -> None:
    ids = {policy.decide(act()).decision_id for _ in range(50)}
    assert len(ids) == 50 and all(i.startswith("d-") for i in ids)
    rec = policy.decide(act()).to_record()
    assert set(rec) == {"allowed", "decision_id", "rule_id", "policy_hash", "reason"}


def test_a_strict_receiver_refuses_what_a_permissive_sender_allows() -> None:
    permissive = policy_from_mapping(mapping())
    strict_data = mapping()
    strict_data["allow"][0]["min_batch"] = 64
    strict = policy_from_mapping(strict_data)
    flow = act(batch_size=32)
    assert permissive.decide(flow).allowed
    received = Flow(**{**flow.__dict__, "direction": "receive"})
    d = strict.decide(received)
    assert not d.allowed and "below min_batch 64" in d.reason


# ---- the asset guard on encrypted_weights -------------------------------------------------


def weights_policy(**party_extra: dict[str, Any]) -> Policy:
    parties: dict[str, Any] = {
        "hospital_a": {"fingerprint": FP["hospital_a"], "assets": {"features": True, "weights": ["bottom"]}},
        "hospital_b": {"fingerprint": FP["hospital_b"], "assets": {"features": True, "weights": ["bottom"]}},
        "bank": {"fingerprint": FP["bank"], "assets": {"labels": True, "weights": ["top"]}},
        "agg": {"fingerprint": FP["agg"], "aggregates": ["bottom"]},
    }
    for name, extra in party_extra.items():
        parties[name] = {**parties[name], **extra}
    return policy_from_mapping(
        {
            "name": "weights",
            "version": 1,
            "parties": parties,
            # Deliberately permissive: the asset guard must hold whatever the rules say.
            "allow": [{"id": "all", "from": "*", "to": "*", "kinds": "*"}],
        }
    )


def ew(sender: str, receiver: str) -> Flow:
    return Flow(sender, receiver, "encrypted_weights", None, "send", 100)


def test_weights_move_between_co_owners_only() -> None:
    p = weights_policy()
    assert p.decide(ew("hospital_a", "hospital_b")).allowed
    d = p.decide(ew("hospital_a", "bank"))
    assert not d.allowed and d.rule_id == "asset:weights" and "never leave their owners" in d.reason
    assert not p.decide(ew("bank", "hospital_a")).allowed


def test_aggregator_gets_weights_only_if_it_cannot_decrypt() -> None:
    # No owner holds a CKKS key: the aggregator would see plain weights.
    assert weights_policy().decide(ew("hospital_a", "agg")).rule_id == "asset:weights"
    keyed = weights_policy(
        hospital_a={"assets": {"features": True, "weights": ["bottom"], "ckks_secret_key": True}}
    )
    assert keyed.decide(ew("hospital_a", "agg")).allowed
    assert keyed.decide(ew("agg", "hospital_b")).allowed
    both = weights_policy(
        hospital_a={"assets": {"features": True, "weights": ["bottom"], "ckks_secret_key": True}},
        agg={"assets": {"ckks_secret_key": True}},
    )
    d = both.decide(ew("hospital_a", "agg"))
    assert not d.allowed and "could decrypt" in d.reason
