"""`secure-split audit verify`: table and JSON output, exit codes 0 clean, 1 findings, 2 cannot verify or
incomplete, 3 internal error."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from secure_split.audit.synthetic import SyntheticRun, generate_logs
from secure_split.cli import audit as audit_cli

from .conftest import lines_of, write_lines

runner = CliRunner()


def verify(*args: str) -> tuple[int, str]:
    result = runner.invoke(audit_cli.app, ["verify", *args])
    return result.exit_code, result.output


def test_clean_logs_exit_0_with_a_table_and_the_deployments_policy_checked(small_run: SyntheticRun) -> None:
    code, out = verify(str(small_run.log_dir), "--deployment", str(small_run.deployment_path))
    assert code == 0, out
    assert "CLEAN" in out and "hospital_a.jsonl" in out and "intact" in out
    assert "flows checked" in out  # policy.yaml next to the deployment was used


def test_json_report_is_machine_readable(small_run: SyntheticRun) -> None:
    code, out = verify(str(small_run.log_dir), "--deployment", str(small_run.deployment_path), "--json")
    assert code == 0
    report = json.loads(out)
    assert report["status"] == "clean" and report["exit_code"] == 0 and report["policy_checked"]
    assert {f["peer"] for f in report["files"]} == {"hospital_a", "hospital_b", "lab"}
    assert report["checks"]["entries"] == small_run.total_entries


def test_tampering_exits_1_and_names_the_entry(small_run: SyntheticRun) -> None:
    lines = lines_of(small_run, "lab")
    del lines[40]
    write_lines(small_run, "lab", lines)
    code, out = verify(str(small_run.log_dir), "--deployment", str(small_run.deployment_path), "--json")
    assert code == 1
    findings = json.loads(out)["findings"]
    assert {"kind": "deleted", "peer": "lab", "entries": [[40, 40]], "party": "lab"}.items() <= findings[0].items()
    code, out = verify(str(small_run.log_dir), "--deployment", str(small_run.deployment_path))
    assert code == 1 and "deleted" in out and "FINDINGS" in out


def test_missing_log_exits_2(small_run: SyntheticRun) -> None:
    (small_run.log_dir / "hospital_b.jsonl").unlink()
    code, out = verify(str(small_run.log_dir), "--deployment", str(small_run.deployment_path), "--json")
    assert code == 2
    report = json.loads(out)
    assert report["status"] == "cannot_verify"
    assert any("hospital_b" in u for u in report["unverifiable"])


def test_unreadable_deployment_or_policy_exits_2(small_run: SyntheticRun, tmp_path: Path) -> None:
    bad = tmp_path / "deployment.yaml"
    bad.write_text("peers: [unclosed\n")
    code, out = verify(str(small_run.log_dir), "--deployment", str(bad))
    assert code == 2 and "cannot read the deployment" in out
    code, out = verify(str(small_run.log_dir), "--deployment", str(small_run.deployment_path),
                       "--policy", str(tmp_path / "missing.yaml"))
    assert code == 2 and "cannot read the policy" in out


def test_logs_of_another_deployment_cannot_be_verified_against_this_one(small_run: SyntheticRun,
                                                                         tmp_path: Path) -> None:
    other = generate_logs(tmp_path / "other", entries=100)
    code, out = verify(str(other.log_dir), "--deployment", str(small_run.deployment_path), "--json")
    assert code == 2
    assert any("belongs to deployment" in u for u in json.loads(out)["unverifiable"])


def test_main_cli_mounts_the_audit_sub_app() -> None:
    from secure_split.cli.main import app

    result = runner.invoke(app, ["audit", "verify", "--help"])
    assert result.exit_code == 0 and "--deployment" in result.output


def test_the_auditors_sample_verifies_clean() -> None:
    sample = Path(__file__).resolve().parents[3] / "audit" / "sample"
    code, out = verify(str(sample / "logs"), "--deployment", str(sample / "deployment.yaml"),
                       "--policy", str(sample / "policy.yaml"), "--json")
    assert code == 0, out
    checks = json.loads(out)["checks"]
    # the numbers audit/sample/README.md gives
    assert (checks["entries"], checks["checkpoints_verified"], checks["messages_matched"]) == (1120, 33, 471)


def test_without_a_policy_the_verdict_is_incomplete_exit_2(small_run: SyntheticRun) -> None:
    (small_run.directory / "policy.yaml").unlink()
    code, out = verify(str(small_run.log_dir), "--deployment", str(small_run.deployment_path), "--json")
    assert code == 2
    report = json.loads(out)
    assert report["status"] == "incomplete" and not report["policy_checked"] and report["findings"] == []
    code, out = verify(str(small_run.log_dir), "--deployment", str(small_run.deployment_path))
    assert code == 2 and "INCOMPLETE" in out and "CLEAN" not in out


def test_an_internal_error_exits_3_with_one_line(small_run: SyntheticRun, monkeypatch: object) -> None:
    import secure_split.audit as audit_pkg

    def broken(*_a: object, **_k: object) -> None:
        raise RuntimeError("simulated verifier bug")

    monkeypatch.setattr(audit_pkg, "verify_logs", broken)  # type: ignore[attr-defined]
    code, out = verify(str(small_run.log_dir), "--deployment", str(small_run.deployment_path))
    assert code == 3
    assert "internal error: RuntimeError: simulated verifier bug" in out and "Traceback" not in out


def test_a_newline_flood_gives_findings_not_a_traceback(small_run: SyntheticRun) -> None:
    with open(small_run.log_dir / "lab.jsonl", "ab") as fh:
        fh.write(b"\n" * 1_000_000)
    code, out = verify(str(small_run.log_dir), "--deployment", str(small_run.deployment_path), "--json")
    assert code == 1
    report = json.loads(out)
    garbage = [f for f in report["findings"] if f["kind"] == "garbage"]
    assert garbage and len(report["findings"]) < 20 and len(out) < 100_000
    assert garbage[0]["party"] == "lab"
