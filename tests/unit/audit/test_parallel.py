"""Verifying files in worker processes gives the same verdict as verifying them in one process."""

from __future__ import annotations

from secure_split.audit import verify_logs
from secure_split.audit.synthetic import SyntheticRun

from .conftest import lines_of, write_lines


def verdict(run: SyntheticRun, workers: int) -> tuple[list[str], dict[str, int]]:
    report = verify_logs(run.log_dir, run.deployment_path, run.policy_path, workers=workers)
    return sorted(f.describe() for f in report.findings), report.checks


def test_parallel_and_sequential_agree_on_clean_logs(small_run: SyntheticRun) -> None:
    assert verdict(small_run, 2) == verdict(small_run, 1) == ([], verdict(small_run, 1)[1])


def test_parallel_and_sequential_agree_when_messages_disagree(small_run: SyntheticRun) -> None:
    # A received message deleted from the lab's log: the compact digests of the pair disagree, so
    # the parent reloads both logs' full facts and names the entries.
    lines = lines_of(small_run, "lab")
    k = next(i for i, line in enumerate(lines) if b'"event":"message_received"' in line and b'"activation"' in line)
    del lines[k]
    write_lines(small_run, "lab", lines)
    findings, checks = verdict(small_run, 2)
    assert (findings, checks) == verdict(small_run, 1)
    assert any(f.startswith("missing_counterpart in hospital_") for f in findings)
