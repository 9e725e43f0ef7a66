"""check_policy / check_deployment: assets, parties, required flows, protections, constraints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from policy_fixtures import WriteSetup, vanilla_spec, vertical_he_spec

from secure_split.config import Deployment
from secure_split.crypto.keys import Identity
from secure_split.policy import (
    Finding,
    check_deployment,
    check_policy,
    load_policy,
    policy_for_deployment,
    policy_from_mapping,
)


def setup(
    write_setup: WriteSetup, dep: dict[str, Any], edit: Any = None
) -> tuple[Deployment, Path, list[Finding]]:
    """Write dep + its generated policy, apply `edit(policy_mapping)`, return the findings."""
    deployment, path = write_setup(dep)
    data = yaml.safe_load(path.read_text())
    if edit is not None:
        edit(data)
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    return deployment, path, check_deployment(load_policy(path), deployment)


def errors(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity == "error"]


def test_generated_policy_fits_its_deployment(
    identities: dict[str, Identity], write_setup: WriteSetup
) -> None:
    _, _, findings = setup(write_setup, vanilla_spec(identities))
    assert errors(findings) == []


def test_denied_required_flow_names_edge_and_default_deny(
    identities: dict[str, Identity], write_setup: WriteSetup
) -> None:
    def drop_gradients(d: dict[str, Any]) -> None:
        d["allow"] = [r for r in d["allow"] if r["kinds"] != ["gradient"]]

    _, _, findings = setup(write_setup, vanilla_spec(identities), drop_gradients)
    [f] = errors(findings)
    assert f.rule == "default-deny" and f.edge == "bottom->top"
    assert "label_holder -> owner kind 'gradient'" in f.message and "(rule: default deny)" in f.message


def test_denied_required_flow_names_the_deny_rule_and_its_line(
    identities: dict[str, Identity], write_setup: WriteSetup
) -> None:
    def deny_activations(d: dict[str, Any]) -> None:
        d["deny"] = [{"id": "no-cut", "from": "owner", "to": "*", "kinds": "activation"}]

    _, _, findings = setup(write_setup, vanilla_spec(identities), deny_activations)
    [f] = errors(findings)
    assert f.rule == "no-cut" and f.edge == "bottom->top" and f.line is not None
    assert any(w.severity == "warning" and "never applies" in w.message for w in findings)


def test_control_denials_are_grouped_per_route(
    identities: dict[str, Identity], write_setup: WriteSetup
) -> None:
    def drop_control(d: dict[str, Any]) -> None:
        d["allow"] = [r for r in d["allow"] if not r["id"].startswith("control:")]

    _, _, findings = setup(write_setup, vanilla_spec(identities), drop_control)
    errs = errors(findings)
    assert len(errs) == 2
    assert all("'hello'" in f.message and "'shutdown'" in f.message for f in errs)


def test_loss_at_a_peer_without_labels_means_labels_would_leave(
    identities: dict[str, Identity], write_setup: WriteSetup
) -> None:
    def labels_at_owner(d: dict[str, Any]) -> None:
        d["parties"]["owner"]["assets"]["labels"] = True
        d["parties"]["label_holder"]["assets"]["labels"] = False

    _, _, findings = setup(write_setup, vanilla_spec(identities), labels_at_owner)
    rules = {f.rule for f in errors(findings)}
    assert rules == {"asset:labels"}
    [f] = errors(findings)
    assert "segment 'top'" in f.message and "labels never leave their owner" in f.message


def test_features_read_at_an_undeclared_peer_are_an_error(
    identities: dict[str, Identity], write_setup: WriteSetup
) -> None:
    def no_features(d: dict[str, Any]) -> None:
        d["parties"]["owner"]["assets"]["features"] = False

    _, _, findings = setup(write_setup, vanilla_spec(identities), no_features)
    assert [f.rule for f in errors(findings)] == ["asset:features"]


def test_wildcard_and_asset_kinds_and_weights_to_non_owners_are_asset_errors(
    identities: dict[str, Identity], write_setup: WriteSetup
) -> None:
    def leaky(d: dict[str, Any]) -> None:
        d["allow"] += [
            {"id": "everything", "from": "owner", "to": "label_holder", "kinds": "*"},
            {"id": "send-labels", "from": "label_holder", "to": "owner", "kinds": ["labels"]},
            {"id": "send-raw", "from": "owner", "to": "label_holder", "kinds": ["raw_features"]},
            {"id": "weights", "from": "owner", "to": "label_holder", "kinds": "encrypted_weights"},
            {"id": "weights-any", "from": "*", "to": "owner", "kinds": "encrypted_weights"},
        ]

    _, _, findings = setup(write_setup, vanilla_spec(identities), leaky)
    by_rule = {f.rule for f in errors(findings)}
    assert {"asset:*", "asset:labels", "asset:features", "asset:weights"} <= by_rule
    texts = " ".join(f.message for f in errors(findings))
    assert "'weights'" in texts and "'weights-any'" in texts and "'everything'" in texts


def test_parties_and_peers_must_match_with_fingerprints(
    identities: dict[str, Identity], write_setup: WriteSetup
) -> None:
    def wrong(d: dict[str, Any]) -> None:
        d["parties"]["owner"]["fingerprint"] = "sha256:" + "0" * 32
        d["parties"]["mallory"] = {"fingerprint": "sha256:" + "1" * 32}
        del d["parties"]["label_holder"]
        d["allow"] = [r for r in d["allow"] if "label_holder" not in (r["from"], r["to"])]

    _, _, findings = setup(write_setup, vanilla_spec(identities), wrong)
    party = [f.message for f in errors(findings) if f.rule == "parties"]
    assert any("'label_holder' is not a party" in m for m in party)
    assert any("'mallory' of the policy is not a peer" in m for m in party)
    assert any("party 'owner' has fingerprint" in m for m in party)


def test_required_protections_must_be_configured(
    identities: dict[str, Identity], write_setup: WriteSetup
) -> None:
    def strict(d: dict[str, Any]) -> None:
        d["require"] = {
            "edges": {
                "bottom->top": {
                    "nopeek_alpha": 0.1,
                    "gradient_noise_std": 0.01,
                    "activation_noise_std": 0.01,
                    "gradient_clip_norm": 1.0,
                    "label_defence": ["marvell"],
                },
                "x->y": {"nopeek_alpha": 0.1},
            }
        }

    _, _, findings = setup(write_setup, vanilla_spec(identities), strict)
    rules = sorted(f.rule for f in errors(findings))
    assert rules == [
        "require:activation_noise_std",
        "require:edges",
        "require:gradient_clip_norm",
        "require:gradient_noise_std",
        "require:label_defence",
        "require:nopeek_alpha",
    ]
    nopeek = next(f for f in findings if f.rule == "require:nopeek_alpha")
    assert nopeek.edge == "bottom->top" and "edges[0].protections.nopeek_alpha" in nopeek.message


def test_configured_protections_satisfy_requirements(
    identities: dict[str, Identity], write_setup: WriteSetup
) -> None:
    dep = vanilla_spec(identities)
    dep["edges"][0]["protections"] = {
        "nopeek_alpha": 0.3,
        "gradient_noise_std": 0.05,
        "gradient_clip_norm": 0.5,
        "label_defence": "max_norm",
    }
    deployment, path = write_setup(dep)
    data = yaml.safe_load(path.read_text())
    # the generated policy mirrors the configured protections as requirements
    assert data["require"]["edges"]["bottom->top"]["nopeek_alpha"] == 0.3
    data["require"]["edges"]["*"] = {
        "nopeek_alpha": 0.2,
        "gradient_clip_norm": 1.0,
        "label_defence": ["max_norm"],
    }
    path.write_text(yaml.safe_dump(data))
    assert errors(check_deployment(load_policy(path), deployment)) == []


def test_he_required_at_merge_points(identities: dict[str, Identity], write_setup: WriteSetup) -> None:
    dep = vertical_he_spec(identities)
    dep["segments"]["merge"]["he"] = False
    deployment, path = write_setup(dep)
    for wanted in (["merge"], "*"):
        data = yaml.safe_load(path.read_text())
        data["require"] = {"he_merge": wanted}
        path.write_text(yaml.safe_dump(data))
        [f] = [
            f for f in errors(check_deployment(load_policy(path), deployment)) if f.rule == "require:he_merge"
        ]
        assert "merge" in f.message


def test_merge_holder_must_not_hold_the_ckks_key(
    identities: dict[str, Identity], write_setup: WriteSetup
) -> None:
    def key_at_merge(d: dict[str, Any]) -> None:
        d["parties"]["label_holder"]["assets"]["ckks_secret_key"] = True
        d["parties"]["hospital_a"]["assets"]["ckks_secret_key"] = False

    _, _, findings = setup(write_setup, vertical_he_spec(identities), key_at_merge)
    assert any(f.rule == "asset:ckks_secret_key" and "could decrypt" in f.message for f in errors(findings))


def test_min_batch_above_the_deployments_batch_is_an_error(
    identities: dict[str, Identity], write_setup: WriteSetup
) -> None:
    def big_batches(d: dict[str, Any]) -> None:
        for r in d["allow"]:
            if "min_batch" in r:
                r["min_batch"] = 64

    _, _, findings = setup(write_setup, vanilla_spec(identities, batch_size=16), big_batches)
    errs = errors(findings)
    assert len(errs) == 2 and all("batches of 16" in f.message for f in errs)


def test_check_policy_reports_validity(identities: dict[str, Identity], write_setup: WriteSetup) -> None:
    deployment, _ = write_setup(vanilla_spec(identities))
    expired = policy_from_mapping(policy_for_deployment(deployment, name="x", not_after="2020-01-01"))
    assert [f.rule for f in check_policy(expired) if f.severity == "error"] == ["validity"]
    endless = policy_from_mapping(policy_for_deployment(deployment, name="x"))
    assert [f.message for f in check_policy(endless)] == ["the policy never expires; set valid.not_after"]


def test_finding_prints_severity_rule_edge_and_line() -> None:
    f = Finding("error", "no-cut", "denied", edge="a->b", line=12)
    assert str(f) == "error: [no-cut] edge a->b: denied (policy line 12)"
