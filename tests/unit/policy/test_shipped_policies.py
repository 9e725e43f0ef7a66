"""The shipped policies: each passes `policy check` against its example deployment, and an
exhaustive sweep over asset × owner × receiver × kind × edge shows no asset leaves its owner."""

from __future__ import annotations

import pytest
from policy_fixtures import POLICIES, SHIPPED
from typer.testing import CliRunner

from secure_split.cli.policy import app
from secure_split.config import Deployment, load_deployment
from secure_split.policy import (
    ASSET_CARRIERS,
    ASSETS,
    KINDS,
    Policy,
    check_deployment,
    check_policy,
    load_policy,
    required_flows,
)
from secure_split.policy.schema import ASSET_KIND_NAMES

TENSOR_KINDS = ("activation", "gradient", "encrypted_activation", "aggregate_gradient")


def load(name: str) -> tuple[Policy, Deployment]:
    return load_policy(POLICIES / f"{name}.yaml"), load_deployment(
        POLICIES / "deployments" / f"{name}.deployment.yaml"
    )


def owns(policy: Policy, party: str, asset: str) -> bool:
    a = policy.parties[party].assets
    return bool(
        {
            "features": a.features,
            "labels": a.labels,
            "weights": a.weights,
            "ckks_secret_key": a.ckks_secret_key,
        }[asset]
    )


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_policy_passes_policy_check_with_its_deployment(name: str) -> None:
    result = CliRunner().invoke(
        app,
        [
            "check",
            str(POLICIES / f"{name}.yaml"),
            "--deployment",
            str(POLICIES / "deployments" / f"{name}.deployment.yaml"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "OK: 0 errors" in result.output
    policy, deployment = load(name)
    assert [f for f in check_policy(policy) if f.severity == "error"] == []
    assert [f for f in check_deployment(policy, deployment) if f.severity == "error"] == []
    assert deployment.policy_path == policy.path


@pytest.mark.parametrize("name", SHIPPED)
def test_no_asset_can_leave_its_owner(name: str) -> None:
    policy, deployment = load(name)
    parties = sorted(policy.parties)
    edges: list[str | None] = [e.name for e in deployment.spec.edges] + [None]
    asset_kinds = sorted(ASSET_KIND_NAMES)
    checked = 0
    for asset in ASSETS:
        for owner in (p for p in parties if owns(policy, p, asset)):
            for receiver in (p for p in parties if p != owner):
                # kinds that could carry the asset, plus the names someone might invent for it
                for kind in [*ASSET_CARRIERS[asset], *asset_kinds]:
                    for edge in edges:
                        d = policy.decide_route(owner, receiver, kind, edge)
                        checked += 1
                        if kind == "encrypted_weights" and d.allowed:
                            assert policy.weights_transfer_problem(owner, receiver) is None
                        else:
                            assert not d.allowed, (asset, owner, receiver, kind, edge, d.reason)
    assert checked > 0


@pytest.mark.parametrize("name", SHIPPED)
def test_tensors_move_only_along_the_deployments_cut_edges(name: str) -> None:
    policy, deployment = load(name)
    required = {(f.sender, f.receiver, f.kind, f.edge) for f in required_flows(deployment, policy=policy)}
    edges: list[str | None] = [e.name for e in deployment.spec.edges] + [None, "other->edge"]
    parties = sorted(policy.parties)
    for s in parties:
        for r in parties:
            for kind in KINDS:
                for edge in edges:
                    d = policy.decide_route(s, r, kind, edge)
                    if kind in TENSOR_KINDS and d.allowed:
                        assert (s, r, kind, edge) in required, (s, r, kind, edge, d.rule_id)
                    if s == r:
                        continue
                    again = policy.decide_route(s, r, kind, edge)
                    assert (again.allowed, again.rule_id) == (d.allowed, d.rule_id)


@pytest.mark.parametrize("name", SHIPPED)
def test_non_parties_are_refused_everything(name: str) -> None:
    policy, _ = load(name)
    someone = sorted(policy.parties)[0]
    for kind in KINDS:
        assert policy.decide_route("mallory", someone, kind).rule_id == "unknown-party"
        assert policy.decide_route(someone, "mallory", kind).rule_id == "unknown-party"
