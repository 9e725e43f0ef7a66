"""Scanning the logs of a set in parallel processes gives the very same report as one process.

`verify_logs(workers=N)` scans each log in a child process (`audit/parallel.py`) that hands its
report and facts back as JSON (`audit/transfer.py`); the cross-peer and policy passes run in the
parent. Checked here on a clean set and on a tampered one (a message left out: the cross-peer
pass rereads the files for that session), with a child that fails (everything is scanned again in
process), and that the transfer format covers every field of what a scan returns.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from secure_split.audit import parallel, verify_logs
from secure_split.audit.facts import LogFacts, Segment, Stream
from secure_split.audit.report import FileReport, Finding
from secure_split.audit.synthetic import SyntheticRun

from .conftest import lines_of, write_lines


def report_of(run: SyntheticRun, workers: int) -> dict:
    return verify_logs(run.log_dir, run.deployment_path, run.policy_path, workers=workers).to_dict()


def test_a_clean_set_verifies_alike_in_one_process_and_in_three(small_run: SyntheticRun) -> None:
    one = report_of(small_run, 1)
    assert one["status"] == "clean"
    assert report_of(small_run, 3) == one


def test_a_tampered_set_verifies_alike_in_one_process_and_in_two(small_run: SyntheticRun) -> None:
    lines = lines_of(small_run, "hospital_a")
    k = next(i for i, line in enumerate(lines) if b'"kind":"activation"' in line and b"message_sent" in line)
    write_lines(small_run, "hospital_a", lines[:k] + lines[k + 1:])  # one sent message left out
    (small_run.log_dir / "hospital_b.jsonl").write_bytes(b"\x00junk\n" * 3)
    one = report_of(small_run, 1)
    assert {f["kind"] for f in one["findings"]} >= {"deleted", "garbage"}
    assert report_of(small_run, 2) == one


def test_a_child_that_fails_leaves_the_verdict_to_this_process(small_run: SyntheticRun,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    one = report_of(small_run, 1)
    monkeypatch.setattr(parallel, "_CHILD", "import sys; sys.exit(1)")
    assert report_of(small_run, 3) == one


def test_small_sets_are_scanned_in_this_process(small_run: SyntheticRun, tmp_path: Path) -> None:
    paths = sorted(small_run.log_dir.glob("*.jsonl"))
    assert parallel.auto_workers(paths) == 1
    big = tmp_path / "big.jsonl"
    with open(big, "wb") as fh:
        fh.truncate(parallel.PARALLEL_MIN_BYTES)
    assert parallel.auto_workers([big, paths[0]]) == min(2, len(os.sched_getaffinity(0)))


@pytest.mark.parametrize(("cls", "fields"), [
    (FileReport, "peer file lines entries last_seq head checkpoints findings segments runs torn_bytes suppressed "
                 "intact"),
    (Finding, "kind peer file entries message severity evidence party suspects"),
    (LogFacts, "peer file last_seq segments streams checkpoints heads own_metrics reported_metrics flows "
               "message_times policy_mismatch policy_mismatch_count"),
    (Segment, "index start_seq nonce policy_hash deployment_hash previous runs last_seq run_end_seq status "
              "close_missing final last_disallowed_seq checkpoints tainted deferred candidate_runs"),
    (Stream, "count total refused refused_total max_n holes far_gaps duplicates first_entry last_entry segments"),
])
def test_the_transfer_format_covers_every_field(cls: type, fields: str) -> None:
    # A field added to what a scan returns must be added to audit/transfer.py too (then here).
    assert [f.name for f in dataclasses.fields(cls)] == fields.split()
