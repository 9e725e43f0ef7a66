"""`secure-split policy check|explain|sign` through typer's CliRunner: output and exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from policy_fixtures import POLICIES, WriteSetup, vanilla_spec
from typer.testing import CliRunner

from secure_split.crypto.keys import Identity, write_key_files
from secure_split.policy import load_policy, signature_path

runner = CliRunner()
VANILLA = str(POLICIES / "vanilla.yaml")
VANILLA_DEP = str(POLICIES / "deployments" / "vanilla.deployment.yaml")


def invoke(*args: str) -> tuple[int, str]:
    from secure_split.cli.policy import app

    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def test_check_valid_policy_exits_0() -> None:
    code, out = invoke("check", VANILLA)
    assert code == 0 and "OK: 0 errors" in out and load_policy(VANILLA).hash in out


def test_check_lists_every_violation_and_exits_1(
    identities: dict[str, Identity], write_setup: WriteSetup
) -> None:
    _, path = write_setup(vanilla_spec(identities))
    data = yaml.safe_load(path.read_text())
    data["allow"].append({"id": "leak-labels", "from": "label_holder", "to": "owner", "kinds": ["labels"]})
    data["allow"] = [r for r in data["allow"] if r["kinds"] != ["gradient"]]
    path.write_text(yaml.safe_dump(data))
    code, out = invoke("check", str(path), "--deployment", str(path.parent / "deployment.yaml"))
    assert code == 1
    assert "[asset:labels]" in out and "leak-labels" in out
    assert "[default-deny] edge bottom->top" in out
    assert "FAIL: 2 errors" in out


def test_check_unreadable_inputs_exit_2(tmp_path: Path) -> None:
    assert invoke("check", str(tmp_path / "none.yaml"))[0] == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: hospitals\nversion: 1\nparties: {}\nextra: 1\n")
    code, out = invoke("check", str(bad))
    assert code == 2 and "extra" in out and "unknown key" in out
    assert invoke("check", VANILLA, "--deployment", str(tmp_path / "none.yaml"))[0] == 2


def test_check_fails_on_expired_policy(tmp_path: Path) -> None:
    code, out = invoke("check", VANILLA, "--at", "2040-01-01T00:00:00Z")
    assert code == 1 and "[validity]" in out and "expired" in out


# `explain` for the owner's activation to the label holder over the vanilla policy's one edge.
EXPLAIN_FORWARD_ACTIVATION = (
    "explain", VANILLA, "--from", "owner", "--to", "label_holder", "--kind", "activation", "--edge", "bottom->top",
)  # fmt: skip


def test_explain_allowed_flow() -> None:
    code, out = invoke(*EXPLAIN_FORWARD_ACTIVATION)
    assert code == 0
    assert "decision: ALLOW" in out and "rule:     activations-forward" in out
    assert "min_batch=8" in out and "vanilla.yaml:" in out


def test_explain_denied_flow_with_message_details() -> None:
    code, out = invoke(*EXPLAIN_FORWARD_ACTIVATION, "--batch", "1", "--dtype", "float32", "--shape", "1,32")
    assert code == 1 and "decision: DENY" in out and "below min_batch 8" in out
    code, out = invoke("explain", VANILLA, "--from", "label_holder", "--to", "owner", "--kind", "prediction")
    assert code == 1 and "rule:     no-predictions-to-owner" in out
    code, out = invoke("explain", VANILLA, "--from", "owner", "--to", "label_holder", "--kind", "psi")
    assert code == 1 and "default-deny" in out and "(rule: default deny)" in out


def test_sign_writes_signature_and_check_reports_forgeries(
    identities: dict[str, Identity], write_setup: WriteSetup, tmp_path: Path
) -> None:
    _, path = write_setup(vanilla_spec(identities))
    dep = str(path.parent / "deployment.yaml")
    key, _ = write_key_files(identities["owner"], tmp_path / "keys")
    code, out = invoke("sign", str(path), "--key", str(key))
    sig = signature_path(load_policy(path), "owner")
    assert code == 0 and f"wrote {sig}" in out and sig.is_file()
    code, out = invoke("check", str(path), "--deployment", dep)
    assert code == 0 and "'label_holder' has not signed" in out and "'owner' has not signed" not in out
    record = json.loads(sig.read_text())
    record["signature"] = "00" * 64
    sig.write_text(json.dumps(record))
    code, out = invoke("check", str(path), "--deployment", dep)
    assert code == 1 and "error: [signature]" in out


def test_sign_refuses_a_non_party_and_a_bad_key_file(
    identities: dict[str, Identity], write_setup: WriteSetup, tmp_path: Path
) -> None:
    _, path = write_setup(vanilla_spec(identities))
    key, _ = write_key_files(identities["mallory"], tmp_path / "keys")
    code, out = invoke("sign", str(path), "--key", str(key))
    assert code == 1 and "not a party" in out
    key.chmod(0o644)
    code, out = invoke("sign", str(path), "--key", str(key))
    assert code == 2 and "chmod 600" in out
