"""Policy compliance: every logged flow allowed by the policy in force, judged at the time it was logged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from secure_split.audit import verify_logs
from secure_split.audit.synthetic import SyntheticRun, generate_logs
from secure_split.config import load_deployment
from secure_split.policy import load_policy, policy_for_deployment

from .conftest import lines_of


def write_policy(run: SyntheticRun, path: Path, *, drop: tuple[str, ...] = (), **valid: Any) -> Path:
    mapping = policy_for_deployment(load_deployment(run.deployment_path), name=path.stem, **valid)
    mapping["allow"] = [r for r in mapping["allow"] if r["id"] not in drop]
    path.write_text(yaml.safe_dump(mapping, sort_keys=False))
    return path


def test_flows_the_policy_denies_are_reported_at_sender_and_receiver(small_run: SyntheticRun, tmp_path: Path) -> None:
    strict = write_policy(small_run, tmp_path / "no-gradients-to-a.yaml", drop=("gradient@bottom_a->top",))
    run = generate_logs(tmp_path / "strict-run", entries=400, steps_per_barrier=5, policy_hash=load_policy(strict).hash,
                        identities=small_run.identities)
    report = verify_logs(run.log_dir, run.deployment_path, strict)
    violations = report.of_kind("policy_violation")
    assert {f.peer for f in violations} == {"lab", "hospital_a"}
    assert {f.kind for f in report.findings} == {"policy_violation"}
    for peer in ("lab", "hospital_a"):
        gradient_entries = [i for i, line in enumerate(lines_of(run, peer))
                            if b'"kind":"gradient"' in line and b'"receiver":"hospital_a"' in line]
        assert gradient_entries
        mine = [f for f in violations if f.peer == peer]
        assert any(f.covers(gradient_entries[0]) for f in mine)  # the first entries of each flow are named
        assert sum(int(f.message.split()[0]) for f in mine) == len(gradient_entries)  # and every one counted
    assert all("default-deny" in f.message for f in violations)
    assert int(report.exit_code) == 1


def test_logs_written_under_another_policy_are_a_policy_mismatch(small_run: SyntheticRun, tmp_path: Path) -> None:
    other = write_policy(small_run, tmp_path / "another-policy.yaml")
    report = verify_logs(small_run.log_dir, small_run.deployment_path, other)
    assert {f.kind for f in report.findings} == {"policy_mismatch"}
    assert {f.peer for f in report.findings} == {"hospital_a", "hospital_b", "lab"}


def test_flows_are_judged_at_the_time_they_were_logged(small_run: SyntheticRun, tmp_path: Path) -> None:
    # The synthetic run is logged on 2026-01-01. A policy that expired since then still covers it;
    # one that only became valid later does not.
    expired_since = write_policy(small_run, tmp_path / "expired.yaml", not_before="2025-12-01T00:00:00Z",
                                 not_after="2026-01-02T00:00:00Z")
    later = write_policy(small_run, tmp_path / "later.yaml", not_before="2026-02-01T00:00:00Z")
    for policy, clean in ((expired_since, True), (later, False)):
        run = generate_logs(tmp_path / policy.stem, entries=200, policy_hash=load_policy(policy).hash,
                            identities=small_run.identities)
        report = verify_logs(run.log_dir, run.deployment_path, policy)
        assert report.clean is clean, [f.describe() for f in report.findings][:3]
        if not clean:
            assert all(f.kind == "policy_violation" and "validity" in f.message for f in report.findings)


def test_a_message_kind_outside_the_protocol_shows_raw_data_leaving(small_run: SyntheticRun) -> None:
    from .insider import entries_of, index_of, resign

    def is_activation(e: dict) -> bool:
        return e["event"].startswith("message_") and e["data"]["kind"] == "activation" \
            and e["data"]["sender"] == "hospital_a"

    k = 0
    for peer in ("hospital_a", "lab"):
        es = entries_of(small_run, peer)
        i = index_of(es, is_activation, 3)
        es[i]["data"]["kind"] = "features"
        resign(small_run, peer, es)
        k = i if peer == "hospital_a" else k
    report = verify_logs(small_run.log_dir, small_run.deployment_path, small_run.policy_path)
    raw = report.of_kind("raw_data")
    assert {f.peer for f in raw} == {"hospital_a", "lab"}
    assert any(f.peer == "hospital_a" and f.covers(k) and f.party == "hospital_a" for f in raw)
    assert "'features'" in raw[0].message
