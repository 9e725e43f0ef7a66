"""The worked example's files (peers/, policies/hospitals_lab*): its CSV files are what
scripts/run_example.py generates from scikit-learn's bundled data, each organisation's data
passes `data check` against the deployment, and its example-only keys are the deployment's."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

from secure_split.config import load_deployment, load_peer_config
from secure_split.engine.data import check_peer_data
from secure_split.policy import load_policy, signature_problems

REPO = Path(__file__).resolve().parents[2]
PEERS = ("hospital_a", "hospital_b", "lab")


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("run_example", REPO / "scripts" / "run_example.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_example_csv_files_are_the_generated_ones() -> None:
    for name, text in _script().example_data().items():
        assert (REPO / "peers" / "data" / f"{name}.csv").read_text() == text, "regenerate: scripts/run_example.py data"


@pytest.mark.parametrize("peer", PEERS)
def test_each_organisation_s_data_fits_the_deployment(peer: str) -> None:
    cfg = load_peer_config(REPO / "peers" / f"{peer}.yaml")
    assert check_peer_data(cfg, load_deployment(cfg.deployment_path)) == []


def test_the_example_keys_are_the_deployment_s_and_signed_the_policy() -> None:
    dep = load_deployment(REPO / "policies" / "deployments" / "hospitals_lab.deployment.yaml")
    for peer in PEERS:
        public = json.loads((REPO / "peers" / "keys" / f"{peer}.pub").read_text())
        assert (public["sign_key"], public["transport_key"]) == (dep.spec.peers[peer].sign_key,
                                                                   dep.spec.peers[peer].transport_key)
    assert signature_problems(load_policy(dep.policy_path), dep) == []
    assert "EXAMPLE ONLY" in (REPO / "peers" / "keys" / "README.md").read_text()
