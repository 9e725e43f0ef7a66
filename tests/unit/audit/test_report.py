"""The verifier's report: per-file diagnosis kinds, exit codes, JSON and the table."""

from __future__ import annotations

import json

from rich.console import Console

from secure_split.audit import AuditReport, Finding, verify_lines, verify_logs
from secure_split.audit.report import format_ranges, to_ranges
from secure_split.audit.synthetic import SyntheticRun

from .conftest import context_of, lines_of, write_lines


def test_an_inserted_line_that_fits_the_chain_before_it_is_reported_as_inserted(small_run: SyntheticRun) -> None:
    lines = lines_of(small_run, "lab")
    k = 30
    fake = json.loads(lines[k + 1])
    fake["data"]["reason"] = "an entry nobody wrote"
    fake.update(event="error", data={"reason": "an entry nobody wrote", "error": "Fabricated"})
    lines.insert(k + 1, json.dumps(fake, sort_keys=True, separators=(",", ":")).encode())
    report = verify_lines(lines, peer="lab", context=context_of(small_run))
    assert [(f.kind, f.entries) for f in report.findings] == [("inserted", ((k + 1, k + 1),))]
    assert "line 32" in report.findings[0].message


def test_entries_from_another_peers_log_are_malformed_and_break_the_chain(small_run: SyntheticRun) -> None:
    lines = lines_of(small_run, "lab")
    lines[10] = lines_of(small_run, "hospital_a")[10]
    report = verify_lines(lines, peer="lab", context=context_of(small_run))
    assert any(f.kind == "modified" and f.covers(10) for f in report.findings)


def test_a_log_cut_inside_its_close_round_is_a_warning(small_run: SyntheticRun) -> None:
    lines = lines_of(small_run, "lab")
    write_lines(small_run, "lab", lines[:-1])  # the final checkpoint is gone: the close round did not finish
    report = verify_logs(small_run.log_dir, small_run.deployment_path, small_run.policy_path)
    unclosed = [f for f in report.of_kind("truncated") if f.severity == "warning"]
    assert unclosed and "close round" in unclosed[0].message
    assert report.clean  # what the close head covers was countersigned: nothing provable is missing


def test_exit_codes_clean_problems_cannot_verify() -> None:
    f = Finding("modified", "lab", "lab.jsonl", ((3, 3),), "m", party="lab")
    w = Finding("torn_tail", "lab", "lab.jsonl", ((3, 3),), "m", "warning")
    pol = "p" * 64
    assert int(AuditReport(files=[], findings=[], policy_hash=pol).exit_code) == 0
    assert int(AuditReport(files=[], findings=[w], policy_hash=pol).exit_code) == 0  # a warning is not a finding
    assert int(AuditReport(files=[], findings=[f], policy_hash=pol).exit_code) == 1
    assert int(AuditReport(files=[], findings=[], unverifiable=["no log"], policy_hash=pol).exit_code) == 2
    assert AuditReport(files=[], findings=[]).status == "incomplete"  # no policy: never clean
    assert int(AuditReport(files=[], findings=[]).exit_code) == 2
    # A proven problem outranks an incomplete verification.
    assert int(AuditReport(files=[], findings=[f], unverifiable=["no log"]).exit_code) == 1


def test_ranges_compress_entry_numbers() -> None:
    assert to_ranges([7, 1, 2, 3, 3]) == ((1, 3), (7, 7))
    assert format_ranges(to_ranges([1, 2, 3, 7])) == "1-3, 7"
    assert Finding("deleted", "a", "a.jsonl", ((5, 9),), "m").covers(7)


def test_table_and_json_name_the_problem(small_run: SyntheticRun) -> None:
    lines = lines_of(small_run, "hospital_b")
    lines[20], lines[21] = lines[21], lines[20]
    write_lines(small_run, "hospital_b", lines)
    report = verify_logs(small_run.log_dir, small_run.deployment_path, small_run.policy_path)
    console = Console(record=True, width=200)
    console.print(report.render_table())
    text = console.export_text()
    assert "reordered" in text and "hospital_b" in text and "FINDINGS" in text and "20-21" in text
    data = json.loads(report.to_json())
    assert data["status"] == "findings"
    assert data["findings"][0]["kind"] == "reordered" and data["findings"][0]["entries"] == [[20, 21]]


def test_a_forged_huge_seq_is_reported_without_listing_every_number(small_run: SyntheticRun) -> None:
    # Renumber everything after entry 50 to start at 10**15 and re-chain it: the verifier reports
    # the jump as a range of deleted entries instead of enumerating a quadrillion numbers.
    from secure_split.audit.encoding import checkpoint_body_hash
    from secure_split.audit.encoding import encode_entry as canonical_json
    from secure_split.canonical import sha256_hex

    lines = lines_of(small_run, "lab")
    k, jump = 50, 10**15
    for i in range(k + 1, len(lines)):
        entry = json.loads(lines[i])
        entry["seq"] += jump
        prev = json.loads(lines[i - 1])
        entry["prev"] = checkpoint_body_hash(prev) if "sig" in prev else sha256_hex(lines[i - 1])
        lines[i] = canonical_json(entry)
    report = verify_lines(lines, peer="lab", context=context_of(small_run))
    deleted = report.of_kind("deleted") if hasattr(report, "of_kind") else [
        f for f in report.findings if f.kind == "deleted"]
    assert deleted and deleted[0].entries == ((k + 1, k + jump),)
    assert all(len(f.entries) < 50 for f in report.findings)
