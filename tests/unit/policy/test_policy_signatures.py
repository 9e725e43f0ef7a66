"""Signing policies and the startup gate: missing, forged, stale signatures; validity; tampering."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from policy_fixtures import WriteSetup, sign_all, vanilla_spec

from secure_split.crypto.keys import Identity, verify_signature
from secure_split.errors import ExitCode, PolicyError
from secure_split.policy import (
    check_startup,
    load_policy,
    sign_policy,
    signature_path,
    signature_paths,
    signature_problems,
    signing_message,
    verify_signatures,
)

PEERS = ["owner", "label_holder"]


def test_sign_writes_a_verifiable_signature_next_to_the_policy(
    identities: dict[str, Identity], write_setup: WriteSetup
) -> None:
    _, path = write_setup(vanilla_spec(identities))
    out = sign_policy(path, identities["owner"])
    policy = load_policy(path)
    assert out == path.parent / "signatures" / "policy.owner.sig" == signature_path(policy, "owner")
    assert signature_paths(policy) == {
        n: path.parent / "signatures" / f"policy.{n}.sig" for n in sorted(PEERS)
    }
    record = json.loads(out.read_text())
    assert record["peer"] == "owner" and record["policy_hash"] == policy.hash
    assert record["sign_key"] == identities["owner"].sign_key_hex
    verify_signature(record["sign_key"], signing_message(policy.hash), bytes.fromhex(record["signature"]))


def test_only_parties_with_their_listed_key_may_sign(
    identities: dict[str, Identity], write_setup: WriteSetup
) -> None:
    _, path = write_setup(vanilla_spec(identities))
    with pytest.raises(PolicyError, match="not a party"):
        sign_policy(path, identities["mallory"])
    impostor = Identity("owner", identities["mallory"]._signing, identities["mallory"]._transport)
    with pytest.raises(PolicyError, match="fingerprint"):
        sign_policy(path, impostor)


def test_fully_signed_valid_policy_starts(identities: dict[str, Identity], write_setup: WriteSetup) -> None:
    deployment, path = write_setup(vanilla_spec(identities))
    policy = sign_all(path, identities, PEERS)
    assert signature_problems(policy, deployment) == []
    verify_signatures(policy, deployment)
    check_startup(policy, deployment)
    check_startup(path, deployment)


def test_missing_signature_does_not_start(identities: dict[str, Identity], write_setup: WriteSetup) -> None:
    deployment, path = write_setup(vanilla_spec(identities))
    policy = sign_all(path, identities, ["owner"])
    with pytest.raises(PolicyError) as info:
        verify_signatures(policy, deployment)
    assert "'label_holder' has not signed" in str(info.value) and "'owner'" not in str(info.value)
    with pytest.raises(PolicyError) as info:
        check_startup(policy, deployment)
    assert info.value.exit_code == ExitCode.POLICY_DENIED


def test_tampered_policy_file_does_not_start(
    identities: dict[str, Identity], write_setup: WriteSetup
) -> None:
    deployment, path = write_setup(vanilla_spec(identities))
    sign_all(path, identities, PEERS)
    data = yaml.safe_load(path.read_text())
    data["allow"][0]["max_bytes"] = 2**31  # someone loosens a limit after everyone signed
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(PolicyError) as info:
        check_startup(load_policy(path), deployment)
    text = str(info.value)
    assert text.count("changed after") == 2 and "'owner'" in text and "'label_holder'" in text
    assert [p.problem for p in signature_problems(load_policy(path), deployment)] == ["stale", "stale"]


def test_forged_or_foreign_signatures_are_invalid(
    identities: dict[str, Identity], write_setup: WriteSetup
) -> None:
    deployment, path = write_setup(vanilla_spec(identities))
    policy = sign_all(path, identities, PEERS)
    owner_sig = signature_path(policy, "owner")
    record = json.loads(owner_sig.read_text())
    record["signature"] = ("00" if record["signature"][:2] != "00" else "11") + record["signature"][2:]
    owner_sig.write_text(json.dumps(record))
    lh_sig = signature_path(policy, "label_holder")
    record = json.loads(lh_sig.read_text())
    record["sign_key"] = identities["mallory"].sign_key_hex
    record["signature"] = identities["mallory"].sign(signing_message(policy.hash)).hex()
    lh_sig.write_text(json.dumps(record))
    problems = {p.party: p for p in signature_problems(policy, deployment)}
    assert problems["owner"].problem == "invalid" and "does not verify" in problems["owner"].message
    assert (
        problems["label_holder"].problem == "invalid"
        and "not with the sign_key" in problems["label_holder"].message
    )
    lh_sig.write_text("not json")
    assert {p.problem for p in signature_problems(policy, deployment)} == {"invalid"}


def test_expired_or_not_yet_valid_policy_does_not_start(
    identities: dict[str, Identity], write_setup: WriteSetup
) -> None:
    deployment, path = write_setup(vanilla_spec(identities), not_before="2026-01-01", not_after="2026-12-31")
    policy = sign_all(path, identities, PEERS)
    check_startup(policy, deployment, now=datetime(2026, 6, 1, tzinfo=UTC))
    with pytest.raises(PolicyError, match="expired"):
        check_startup(policy, deployment, now=datetime(2027, 1, 1, tzinfo=UTC))
    with pytest.raises(PolicyError, match="not valid before"):
        check_startup(policy, deployment, now=datetime(2025, 1, 1, tzinfo=UTC))


def test_startup_lists_every_problem_at_once(
    identities: dict[str, Identity], write_setup: WriteSetup
) -> None:
    deployment, path = write_setup(vanilla_spec(identities), not_after="2020-01-01")
    data = yaml.safe_load(path.read_text())
    data["allow"] = [r for r in data["allow"] if r["kinds"] != ["gradient"]]
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(PolicyError) as info:
        check_startup(load_policy(path), deployment)
    text = str(info.value)
    assert "expired" in text and "bottom->top" in text and "default deny" in text
    assert text.count("has not signed") == 2


def test_invalid_policy_file_does_not_start(
    identities: dict[str, Identity], write_setup: WriteSetup, tmp_path: Path
) -> None:
    deployment, path = write_setup(vanilla_spec(identities))
    path.write_text("name: [broken\n")
    with pytest.raises(PolicyError, match="cannot be used"):
        check_startup(path, deployment)
