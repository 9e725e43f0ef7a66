"""Model sources in the two config files: public models and commitments in the deployment, private
models, salts, weights and the device in the peer config; a policy that requires public models."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from secure_split.architecture import segment_sources
from secure_split.config import load_deployment, load_peer_config
from secure_split.errors import ConfigError
from secure_split.policy import check_deployment, policy_from_mapping

KEY = "a" * 64
TK = "x" * 40
COMMITMENT = "sha256:" + "ab" * 32
SALT = "5a17" * 8


def deployment(tmp_path: Path, bottom: dict[str, Any], edge: dict[str, Any] | None = None,
               top: dict[str, Any] | None = None) -> Path:
    doc = {
        "version": 1, "name": "t", "coordinator": "lab", "policy": "policy.yaml",
        "peers": {"bank": {"endpoint": "tcp://127.0.0.1:5601", "sign_key": KEY, "transport_key": TK},
                  "lab": {"endpoint": "tcp://127.0.0.1:5602", "sign_key": "b" * 64, "transport_key": "y" * 40}},
        "segments": {"bottom": {"peer": "bank", "input": "features", **bottom},
                     "top": {"peer": "lab", "loss": "cross_entropy", **(top or {"model": [{"linear": {"in": 8, "out": 2}}]})}},
        "edges": [{"from": "bottom", "to": "top", **(edge or {})}],
    }
    path = tmp_path / "deployment.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_deployment(path)
    return [f"{p.key}: {p.message}" for p in info.value.problems]


def test_a_deployment_that_names_code_is_refused(tmp_path: Path) -> None:
    (problem,) = problems_of(deployment(tmp_path, {"model": {"module": "bank_models:tabular_bottom"}}))
    assert problem.startswith("segments.bottom.model: module: names code to import, and the shared deployment may "
                              "not name code")
    assert "put only its commitment here" in problem


def test_a_private_segment_publishes_its_commitment_and_its_edges_interface(tmp_path: Path) -> None:
    interface = {"interface": {"shape": [8], "dtype": "float16", "bounds": [-1, 1]}}
    dep = load_deployment(deployment(tmp_path, {"commitment": COMMITMENT, "parameters": 120}, interface))
    assert dep.spec.segments["bottom"].model is None
    edge = dep.spec.edges[0]
    assert edge.interface is not None and edge.interface.shape == [8] and edge.interface.bounds == (-1.0, 1.0)
    assert problems_of(deployment(tmp_path, {"commitment": COMMITMENT, "parameters": 120})) == [
        "edges.0: edge bottom->top touches the private segment(s) ['bottom']: give its interface ({shape: [...], "
        "dtype: float32}), which both sides check"]


@pytest.mark.parametrize(("bottom", "edge", "expected"), [
    ({}, None, "segments.bottom: give the segment's model, or (for a private model) its commitment and parameters"),
    ({"model": [{"relu": {}}], "commitment": COMMITMENT, "parameters": 3}, None,
     "segments.bottom.commitment: a segment has a public model or a commitment, not both"),
    ({"commitment": COMMITMENT}, {"interface": {"shape": [8]}},
     "segments.bottom.parameters: a commitment needs the parameter count"),
    ({"commitment": "ab" * 32, "parameters": 3}, {"interface": {"shape": [8]}},
     "segments.bottom.commitment: expected sha256: and 64 hex digits"),
    ({"model": [{"relu": {}}], "parameters": 3}, None, "segments.bottom.parameters: parameters goes with a commitment"),
    ({"model": {"torchvision": "resnet19"}}, None, "segments.bottom.model: torchvision: 'resnet19' is not a supported"),
    ({"model": {"torchvision": "resnet18", "cut_after": "layer9"}}, None,
     "segments.bottom.model: cut_after: resnet18 has no stage 'layer9'; its stages are conv1, bn1"),
    ({"model": {"torchvision": "resnet18", "weights": "r.safetensors"}}, None,
     "segments.bottom.model: unknown key 'weights' in a torchvision preset"),
    ({"model": {"torchvision": "vgg11", "stem": "cifar"}}, None, "stem: cifar (3x3 first convolution, no max-pool) is for"),
    ({"model": {"keras": "x"}}, None, "segments.bottom.model: expected a layer list, a torchvision preset"),
    ({"model": []}, None, "segments.bottom.model: a segment's model needs at least one layer"),
    ({"model": [{"relu": {}}]}, {"interface": {"shape": [8], "bounds": [1, -1]}}, "expected [low, high], finite, low < high"),
    ({"model": [{"relu": {}}]}, {"interface": {"shape": [0]}}, "expected sizes from 1 to 16777216"),
])
def test_bad_model_entries_are_reported_with_their_key(
    tmp_path: Path, bottom: dict[str, Any], edge: dict[str, Any] | None, expected: str
) -> None:
    assert any(expected in p for p in problems_of(deployment(tmp_path, bottom, edge))), problems_of(
        deployment(tmp_path, bottom, edge))


def test_a_public_torchvision_preset_loads(tmp_path: Path) -> None:
    dep = load_deployment(deployment(tmp_path, {"model": {"torchvision": "resnet18", "cut_after": "layer1"}},
                                     top={"model": {"torchvision": "resnet18", "start_after": "layer1"}}))
    assert dep.spec.segments["bottom"].model == {"torchvision": "resnet18", "cut_after": "layer1"}


# --- the peer config -----------------------------------------------------------------------------


def peer_config(tmp_path: Path, **extra: Any) -> Path:
    (tmp_path / "bank.key").write_text("x")
    if not (tmp_path / "deployment.yaml").exists():
        (tmp_path / "deployment.yaml").write_text("x")
    path = tmp_path / "bank.yaml"
    path.write_text(yaml.safe_dump({"peer": "bank", "deployment": "deployment.yaml", "secret_key": "bank.key", **extra}))
    return path


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1", "auto"])
def test_peer_config_devices(tmp_path: Path, device: str) -> None:
    assert load_peer_config(peer_config(tmp_path, device=device)).spec.device == device


@pytest.mark.parametrize(("extra", "expected"), [
    ({"device": "gpu"}, "device: Value error, expected cpu, cuda, cuda:N or auto"),
    ({"segments": {"bottom": {"salt": "xyz"}}}, "segments.bottom.salt: Value error, expected 32 to 128 lowercase hex"),
    ({"segments": {"bottom": {"weights": "missing.safetensors"}}}, "segments.bottom.weights: weights file"),
    ({"segments": {"bottom": {"model": {"module": "not a module path"}}}},
     "segments.bottom.model: module: expected \"package.module:factory\""),
    ({"segments": {"bottom": {"model": {"module": "m:f", "arguments": {"x": {"y": {"z": {"w": {"v": [1]}}}}}}}}},
     "arguments are nested more than 4 deep"),
    ({"segments": {"Bottom": {}}}, "segments.Bottom: segment names are lowercase"),
])
def test_bad_peer_config_entries_are_reported(tmp_path: Path, extra: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_peer_config(peer_config(tmp_path, **extra))
    assert any(expected in f"{p.key}: {p.message}" for p in info.value.problems), str(info.value)


def _sources_problems(tmp_path: Path, bottom: dict[str, Any], segments: dict[str, Any]) -> list[str]:
    edge = {"interface": {"shape": [8]}}
    dep = load_deployment(deployment(tmp_path, bottom, edge))
    cfg = load_peer_config(peer_config(tmp_path, segments=segments))
    with pytest.raises(ConfigError) as info:
        segment_sources(dep, cfg)
    return [f"{p.key}: {p.message}" for p in info.value.problems]


def test_a_private_segment_needs_its_model_and_a_salt_in_the_owners_config(tmp_path: Path) -> None:
    private = {"commitment": COMMITMENT, "parameters": 3}
    (missing,) = _sources_problems(tmp_path, private, {})
    assert missing.startswith("segments.bottom.model: the deployment holds only a commitment for segment 'bottom'")
    (unsalted,) = _sources_problems(tmp_path, private, {"bottom": {"model": [{"relu": {}}]}})
    assert unsalted.startswith("segments.bottom.salt: a private model needs a salt (32 to 128 hex digits, e.g. ")


def test_a_peer_config_cannot_override_a_public_model_or_claim_another_segment(tmp_path: Path) -> None:
    problems = _sources_problems(tmp_path, {"model": [{"linear": {"in": 5, "out": 8}}]},
                                 {"bottom": {"model": [{"relu": {}}], "salt": SALT}, "top": {}})
    assert problems == [
        "segments.top: 'top' is not a segment of peer 'bank' in deployment deployment.yaml (its segments: ['bottom'])",
        "segments.bottom.model: the deployment publishes this segment's model; remove it here, or replace it in the "
        "deployment by its commitment to keep it private",
        "segments.bottom.salt: a salt is for a private model; this segment's model is public",
    ]


def test_the_auditors_side_imports_no_torch() -> None:
    code = ("import sys, secure_split.architecture, secure_split.config, secure_split.cli.model; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], check=False, timeout=120).returncode == 0


# --- policy: require.public_architecture ----------------------------------------------------------


def _policy(require: dict[str, Any]) -> Any:
    fp = {"bank": "sha256:" + "1" * 32, "lab": "sha256:" + "2" * 32}
    return policy_from_mapping({"name": "p", "version": 1,
                                "parties": {n: {"fingerprint": f} for n, f in fp.items()}, "require": require})


@pytest.mark.parametrize("wanted", [["bottom"], "*"])
def test_a_policy_can_require_a_public_architecture(tmp_path: Path, wanted: Any) -> None:
    private = load_deployment(deployment(tmp_path, {"commitment": COMMITMENT, "parameters": 3},
                                         {"interface": {"shape": [8]}}))
    found = [f for f in check_deployment(_policy({"public_architecture": wanted}), private)
             if f.rule == "require:public_architecture"]
    assert [f.message for f in found] == [
        "the policy requires a public architecture for segment 'bottom', but the deployment holds only its "
        "commitment: publish its model in the deployment (segments.bottom.model), or change the policy"]
    assert all(f.severity == "error" for f in found)
    public = load_deployment(deployment(tmp_path, {"model": [{"linear": {"in": 5, "out": 8}}]}))
    assert not [f for f in check_deployment(_policy({"public_architecture": wanted}), public)
                if f.rule == "require:public_architecture"]


def test_a_public_architecture_requirement_names_unknown_segments(tmp_path: Path) -> None:
    public = load_deployment(deployment(tmp_path, {"model": [{"linear": {"in": 5, "out": 8}}]}))
    (found,) = [f for f in check_deployment(_policy({"public_architecture": ["middle"]}), public)
                if f.rule == "require:public_architecture"]
    assert "'middle', which is not a segment of the deployment" in found.message
    with pytest.raises(ConfigError, match="'Mid' is not a segment name"):
        _policy({"public_architecture": ["Mid"]})


def test_an_interface_cannot_choose_a_dtype_the_egress_guards_cannot_read(tmp_path: Path) -> None:
    # numpy has no bfloat16: the owner's leakage guards would skip such a tensor.
    problems = problems_of(deployment(tmp_path, {"model": [{"relu": {}}]}, {"interface": {"shape": [8], "dtype": "bfloat16"}}))
    assert any(p.startswith("edges.0.interface.dtype:") for p in problems), problems
