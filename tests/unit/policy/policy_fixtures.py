"""Shared helpers and fixtures for the policy tests: fixed identities, small deployments in tmp_path."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from secure_split.config import Deployment, load_deployment
from secure_split.crypto.keys import Identity, generate_identity
from secure_split.policy import Policy, load_policy, policy_for_deployment, sign_policy

REPO = Path(__file__).resolve().parents[3]
POLICIES = REPO / "policies"
SHIPPED = ["vanilla", "u_shaped", "multi_hop", "multi_task", "two_hospitals", "bank_hospital", "hospitals_lab"]


@pytest.fixture(scope="session")
def identities() -> dict[str, Identity]:
    """One identity per peer name the tests use (generated once per session)."""
    names = ["owner", "label_holder", "server", "hospital_a", "hospital_b", "clinic_c", "mallory"]
    return {n: generate_identity(n) for n in names}


def peer_entry(ident: Identity, port: int) -> dict[str, Any]:
    """The deployment's `peers.NAME` entry for an identity."""
    return {
        "endpoint": f"tcp://127.0.0.1:{port}",
        "sign_key": ident.sign_key_hex,
        "transport_key": ident.transport_public_z85,
    }


def vanilla_spec(ids: dict[str, Identity], **training: Any) -> dict[str, Any]:
    """A vanilla deployment mapping: owner.bottom (features) -> label_holder.top (loss)."""
    return {
        "version": 1,
        "name": "test-vanilla",
        "coordinator": "label_holder",
        "policy": "policy.yaml",
        "peers": {
            "owner": peer_entry(ids["owner"], 7001),
            "label_holder": peer_entry(ids["label_holder"], 7002),
        },
        "segments": {
            "bottom": {"peer": "owner", "input": "features", "model": [{"linear": {"in": 8, "out": 4}}]},
            "top": {
                "peer": "label_holder",
                "loss": "cross_entropy",
                "model": [{"linear": {"in": 4, "out": 2}}],
            },
        },
        "edges": [{"from": "bottom", "to": "top"}],
        "training": {"batch_size": 32, **training},
    }


def vertical_he_spec(ids: dict[str, Identity]) -> dict[str, Any]:
    """Two hospitals feed an HE sum merge at the label holder."""
    return {
        "version": 1,
        "name": "test-vertical",
        "coordinator": "label_holder",
        "policy": "policy.yaml",
        "peers": {
            "hospital_a": peer_entry(ids["hospital_a"], 7011),
            "hospital_b": peer_entry(ids["hospital_b"], 7012),
            "label_holder": peer_entry(ids["label_holder"], 7013),
        },
        "segments": {
            "bottom_a": {
                "peer": "hospital_a",
                "input": "features",
                "model": [{"linear": {"in": 5, "out": 4}}],
            },
            "bottom_b": {
                "peer": "hospital_b",
                "input": "features",
                "model": [{"linear": {"in": 6, "out": 4}}],
            },
            "merge": {"peer": "label_holder", "merge": "sum", "he": True, "model": [{"identity": {}}]},
            "top": {
                "peer": "label_holder",
                "loss": "cross_entropy",
                "model": [{"linear": {"in": 4, "out": 2}}],
            },
        },
        "edges": [
            {"from": "bottom_a", "to": "merge"},
            {"from": "bottom_b", "to": "merge"},
            {"from": "merge", "to": "top"},
        ],
        "training": {"batch_size": 32},
    }


def horizontal_spec(
    ids: dict[str, Identity], schedule: str, *, handoff: str = "direct", average: str = "he"
) -> dict[str, Any]:
    """Two owners with the same bottom model take turns feeding a server's top (sequential or splitfed)."""
    model = [{"linear": {"in": 6, "out": 4}}]
    return {
        "version": 1,
        "name": f"test-{schedule}",
        "coordinator": "server",
        "policy": "policy.yaml",
        "peers": {
            "hospital_a": peer_entry(ids["hospital_a"], 7021),
            "hospital_b": peer_entry(ids["hospital_b"], 7022),
            "server": peer_entry(ids["server"], 7023),
        },
        "segments": {
            "bottom_a": {"peer": "hospital_a", "input": "features", "model": model},
            "bottom_b": {"peer": "hospital_b", "input": "features", "model": model},
            "top": {
                "peer": "server",
                "loss": "cross_entropy",
                "model": [{"linear": {"in": 4, "out": 2}}],
            },
        },
        "edges": [{"from": "bottom_a", "to": "top"}, {"from": "bottom_b", "to": "top"}],
        "training": {
            "batch_size": 32,
            "schedule": schedule,
            "handoff": handoff,
            **({"average": average} if schedule == "splitfed" else {}),
        },
    }


WriteSetup = Callable[..., tuple[Deployment, Path]]


@pytest.fixture
def write_setup(tmp_path: Path) -> WriteSetup:
    """Write a deployment mapping and a policy mapping (default: generated) into tmp_path.

    Returns a function (deployment_mapping, policy_mapping=None, **gen_kwargs) -> (Deployment, policy path).
    """

    def write(dep: dict[str, Any], pol: dict[str, Any] | None = None, **gen: Any) -> tuple[Deployment, Path]:
        dep_path = tmp_path / "deployment.yaml"
        dep_path.write_text(yaml.safe_dump(dep, sort_keys=False), encoding="utf-8")
        deployment = load_deployment(dep_path)
        if pol is None:
            gen.setdefault("name", "test-policy")
            gen.setdefault("not_after", "2099-12-31")
            pol = policy_for_deployment(deployment, **gen)
        policy_path = tmp_path / "policy.yaml"
        policy_path.write_text(yaml.safe_dump(pol, sort_keys=False), encoding="utf-8")
        return deployment, policy_path

    return write


def sign_all(policy_path: Path, ids: dict[str, Identity], names: list[str]) -> Policy:
    """Sign the policy as each named party; return the loaded policy."""
    policy = load_policy(policy_path)
    for n in names:
        sign_policy(policy_path, ids[n])
    return policy
