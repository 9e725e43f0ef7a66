"""Hypothesis properties of the policy engine and its parser.

Engine: deny overrides allow; no matching rule means deny; an allowed flow has an allow rule
whose constraints hold; decisions are deterministic in (allowed, rule_id) and independent of the
order of deny rules. Parser: any mapping gives a Policy or a ConfigError, never anything else.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from secure_split.errors import ConfigError
from secure_split.policy import KINDS, Flow, Policy, constraint_failure, load_policy, policy_from_mapping

PARTIES = ["alpha", "beta", "gamma"]
EDGES = ["a->b", "b->c", "c->d"]
DTYPES = ["float32", "float64", "int8"]
FINGERPRINTS = {p: "sha256:" + f"{i:x}" * 32 for i, p in enumerate(PARTIES, start=1)}
TENSOR_KINDS = [
    k
    for k in KINDS
    if k
    not in {
        "hello",
        "refuse",
        "error",
        "heartbeat",
        "step_begin",
        "metrics",
        "barrier",
        "barrier_ack",
        "shutdown",
        "audit_receipt",
    }
]

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

parties_sel = st.one_of(st.just("*"), st.lists(st.sampled_from(PARTIES), min_size=1, max_size=3, unique=True))
edges_sel = st.one_of(
    st.none(), st.just("*"), st.lists(st.sampled_from(EDGES), min_size=1, max_size=2, unique=True)
)


@st.composite
def rules(draw: st.DrawFn, prefix: str, allow: bool) -> list[dict[str, Any]]:
    out = []
    for i in range(draw(st.integers(0, 4))):
        tensor_only = allow and draw(st.booleans())
        kinds_pool = TENSOR_KINDS if tensor_only else [*KINDS, "control", "he"]
        rule: dict[str, Any] = {
            "id": f"{prefix}{i}",
            "from": draw(parties_sel),
            "to": draw(parties_sel),
            "kinds": draw(st.lists(st.sampled_from(kinds_pool), min_size=1, max_size=4, unique=True)),
        }
        edges = draw(edges_sel)
        if edges is not None:
            rule["edges"] = edges
        if allow:
            rule["max_bytes"] = draw(st.one_of(st.none(), st.integers(1, 4096)))
            if tensor_only:
                rule["min_batch"] = draw(st.one_of(st.none(), st.integers(1, 64)))
                rule["dtype"] = draw(st.one_of(st.none(), st.sampled_from(DTYPES)))
                rule["shape"] = draw(st.one_of(st.none(), st.just([None, 16])))
            rule["compression"] = draw(st.booleans())
            rule = {k: v for k, v in rule.items() if v is not None}
        out.append(rule)
    return out


@st.composite
def policies(draw: st.DrawFn) -> dict[str, Any]:
    weights = st.lists(st.sampled_from(["m1", "m2"]), max_size=2, unique=True)
    return {
        "name": "prop",
        "version": 1,
        "parties": {
            p: {
                "fingerprint": FINGERPRINTS[p],
                "assets": {"weights": draw(weights), "ckks_secret_key": draw(st.booleans())},
            }
            for p in PARTIES
        },
        "allow": draw(rules("allow", True)),
        "deny": draw(rules("deny", False)),
    }


flows = st.builds(
    Flow,
    sender=st.sampled_from([*PARTIES, "mallory"]),
    receiver=st.sampled_from([*PARTIES, "mallory"]),
    kind=st.sampled_from([*KINDS, "labels"]),
    edge=st.one_of(st.none(), st.sampled_from(EDGES)),
    direction=st.sampled_from(["send", "receive"]),
    nbytes=st.integers(0, 8192),
    dtype=st.one_of(st.none(), st.sampled_from(DTYPES)),
    shape=st.one_of(st.none(), st.tuples(st.integers(1, 64), st.sampled_from([8, 16]))),
    batch_size=st.one_of(st.none(), st.integers(1, 64)),
    compressed=st.booleans(),
)


def build(data: dict[str, Any]) -> Policy:
    try:
        return policy_from_mapping(data)
    except ConfigError:
        assume(False)  # e.g. a rule from one party to itself; the parser's own property covers it
        raise


def plain_kind(flow: Flow) -> str:
    return str(flow.kind)


@SETTINGS
@given(policies(), flows)
def test_deny_overrides_allow(data: dict[str, Any], flow: Flow) -> None:
    policy = build(data)
    d = policy.decide(flow)
    if any(r.matches(flow.sender, flow.receiver, plain_kind(flow), flow.edge) for r in policy.deny):
        assert not d.allowed


@SETTINGS
@given(policies(), flows)
def test_no_matching_allow_rule_means_deny(data: dict[str, Any], flow: Flow) -> None:
    policy = build(data)
    d = policy.decide(flow)
    matching = [r for r in policy.allow if r.matches(flow.sender, flow.receiver, plain_kind(flow), flow.edge)]
    if not matching:
        assert not d.allowed
        known = flow.sender in policy.parties and flow.receiver in policy.parties and flow.kind in KINDS
        denied_by_rule = any(
            r.matches(flow.sender, flow.receiver, plain_kind(flow), flow.edge) for r in policy.deny
        )
        if known and not denied_by_rule and flow.kind != "encrypted_weights":
            assert d.rule_id == "default-deny"


@SETTINGS
@given(policies(), flows)
def test_allowed_means_first_satisfied_allow_rule_and_no_deny(data: dict[str, Any], flow: Flow) -> None:
    policy = build(data)
    d = policy.decide(flow)
    if d.allowed:
        route = (flow.sender, flow.receiver, plain_kind(flow), flow.edge)
        assert not any(r.matches(*route) for r in policy.deny)
        first = next(
            r for r in policy.allow if r.matches(*route) and constraint_failure(r.constraints, flow) is None
        )
        assert d.rule_id == first.id
        if flow.kind == "encrypted_weights":
            assert policy.weights_transfer_problem(flow.sender, flow.receiver) is None


@SETTINGS
@given(policies(), flows, st.randoms(use_true_random=False))
def test_decisions_are_deterministic(data: dict[str, Any], flow: Flow, rnd: Any) -> None:
    policy = build(data)
    first = policy.decide(flow)
    again = policy.decide(flow)
    rebuilt = policy_from_mapping(copy.deepcopy(data))
    assert rebuilt.hash == policy.hash
    third = rebuilt.decide(flow)
    assert (first.allowed, first.rule_id) == (again.allowed, again.rule_id) == (third.allowed, third.rule_id)
    assert first.decision_id != again.decision_id
    shuffled = copy.deepcopy(data)
    rnd.shuffle(shuffled["deny"])
    assert policy_from_mapping(shuffled).decide(flow).allowed == first.allowed


# ---- the parser -------------------------------------------------------------------------

VOCAB = [
    "language",
    "name",
    "version",
    "description",
    "valid",
    "not_before",
    "not_after",
    "parties",
    "fingerprint",
    "assets",
    "features",
    "labels",
    "weights",
    "ckks_secret_key",
    "aggregates",
    "allow",
    "deny",
    "id",
    "from",
    "to",
    "kinds",
    "edges",
    "max_bytes",
    "min_batch",
    "dtype",
    "shape",
    "compression",
    "max_distance_correlation",
    "require",
    "he_merge",
    "ckks",
    "egress",
    "alpha",
    "*",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from([*VOCAB, *KINDS, "sha256:" + "a" * 32, "a->b", "2030-01-01"]),
    st.dates(),
    st.datetimes(),
)
keys = st.one_of(st.sampled_from(VOCAB), st.text(max_size=8), st.integers(-3, 3))
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(keys, values, max_size=8))
def test_arbitrary_mappings_give_a_policy_or_a_config_error(data: dict[Any, Any]) -> None:
    try:
        policy = policy_from_mapping(data)
    except ConfigError as exc:
        assert exc.problems
    else:
        assert len(policy.hash) == 64


@settings(max_examples=300, deadline=None)
@given(policies(), st.data())
def test_mutated_valid_policies_give_a_policy_or_a_config_error(
    data: dict[str, Any], draw: st.DataObject
) -> None:
    mutated = copy.deepcopy(data)
    node: Any = mutated
    for _ in range(draw.draw(st.integers(0, 4))):
        if isinstance(node, dict) and node:
            key = draw.draw(st.sampled_from(sorted(node, key=str)))
            if isinstance(node[key], dict | list) and draw.draw(st.booleans()):
                node = node[key]
                continue
            node[key] = draw.draw(values)
            break
        if isinstance(node, list) and node:
            i = draw.draw(st.integers(0, len(node) - 1))
            node[i] = draw.draw(values)
            break
    try:
        policy_from_mapping(mutated)
    except ConfigError as exc:
        assert exc.problems


@settings(max_examples=60, deadline=None)
@given(st.one_of(policies(), st.dictionaries(keys, values, max_size=6)))
def test_files_on_disk_give_a_policy_or_a_config_error(data: dict[Any, Any]) -> None:
    try:
        text = yaml.safe_dump(data)
    except yaml.YAMLError:
        assume(False)
        raise
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "policy.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            load_policy(path)
        except ConfigError as exc:
            assert exc.problems
