"""The verifier's hot loop judges every log exactly as the general path does (differential tests).

(Each case also checks that the scan's result survives the trip from a child process, `transfer.py`.)

`hotloop.feed_block` takes the common line (a message entry that links, in canonical form) without
calls; everything else goes through `LogScanner.feed`. Here the same logs go through both: the
hot loop, and `LogScanner.feed` line by line (the general path, which never takes the lane). The
reports (every finding, in order) and the facts kept for the cross-peer and policy passes (streams,
their order-free sums, flows, segments, checkpoints, heads, metrics) must be equal, for the
mutation corpus (flipped bytes, deletions, duplicates, swaps, junk) and for an insider who edits
one field of a message entry and re-signs the whole log (so the edited line links and reaches
the lane's checks).
"""

from __future__ import annotations

import copy
import os
import random
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secure_split.audit.chain import LogScanner, VerifyContext, scan_lines
from secure_split.audit.facts import LogFacts
from secure_split.audit.report import FileReport
from secure_split.audit.synthetic import PEERS, SyntheticRun
from secure_split.audit.transfer import dump_scan, load_scan

from .conftest import context_of, lines_of
from .insider import entries_of, resign, resigned_lines
from .test_mutations import flip_byte, mutate


def general_path(lines: list[bytes], peer: str, context: VerifyContext) -> tuple[FileReport, LogFacts]:
    """Verify line by line through `LogScanner.feed` only (never the hot loop)."""
    scanner = LogScanner(peer, context)
    for line in lines:
        scanner.feed(line)
    return scanner.finish()


def assert_same(lines: list[bytes], peer: str, context: VerifyContext) -> FileReport:
    """Both paths give the same report and the same facts; returns the report."""
    lane_report, lane_facts = scan_lines(lines, peer=peer, context=context)
    ref_report, ref_facts = general_path(lines, peer, context)
    assert [f.describe() for f in lane_report.findings] == [f.describe() for f in ref_report.findings]
    assert lane_report == ref_report
    assert lane_facts == ref_facts
    # What a child process hands back (parallel scans) is the very same report and facts.
    assert load_scan(dump_scan(lane_report, lane_facts)) == (lane_report, lane_facts)
    return lane_report


@pytest.fixture(scope="module")
def context(small_run_template: SyntheticRun) -> VerifyContext:
    return context_of(small_run_template)


def test_a_clean_log_gives_the_same_facts_both_ways(small_run_template: SyntheticRun,
                                                    context: VerifyContext) -> None:
    for peer in PEERS:
        report = assert_same(lines_of(small_run_template, peer), peer, context)
        assert report.findings == []
        assert report.entries == small_run_template.entries[peer]


@pytest.mark.parametrize("how", ["flip", "delete", "duplicate", "swap"])
def test_the_mutation_corpus_gives_the_same_findings_both_ways(how: str, small_run_template: SyntheticRun,
                                                               context: VerifyContext) -> None:
    for peer in PEERS:
        lines = lines_of(small_run_template, peer)
        for offset in range(0, 40, 7):
            positions = list(range(offset, len(lines), 40))
            report = assert_same(mutate(lines, positions, how), peer, context)
            assert report.findings


def test_junk_and_flips_anywhere_give_the_same_findings_both_ways(small_run_template: SyntheticRun,
                                                                  context: VerifyContext) -> None:
    rng = random.Random(13)
    lines = lines_of(small_run_template, "lab")
    for trial in range(60):
        out = list(lines)
        for _ in range(rng.randint(1, 3)):
            k = rng.randrange(len(out))
            choice = rng.random()
            if choice < 0.4:
                out[k] = flip_byte(out[k], rng.randrange(10**6))
            elif choice < 0.6:
                out.insert(k, rng.choice([b"", b"{", b"not json", b"[1,2]", b"{}", rng.randbytes(40)]))
            elif choice < 0.8:
                out[k] = out[k].replace(b'"seq":', b'"seq": ', 1)  # not canonical
            else:
                out[k:k] = [b"x"] * rng.randint(1, 30)  # a run of garbage
        assert_same(out, "lab", context), trial


Edit = Callable[[dict[str, Any]], None]


def field(name: str, value: Any) -> Edit:
    def edit(e: dict[str, Any]) -> None:
        e["data"][name] = value
    return edit


def top(name: str, value: Any) -> Edit:
    def edit(e: dict[str, Any]) -> None:
        e[name] = value
    return edit


def drop(name: str) -> Edit:
    def edit(e: dict[str, Any]) -> None:
        del e["data"][name]
    return edit


EDITS: dict[str, Edit] = {
    "nbytes_float": field("nbytes", 2048.0),
    "nbytes_negative": field("nbytes", -1),
    "nbytes_too_big": field("nbytes", 2**63),
    "step_string": field("step", "3"),
    "step_bool": field("step", True),
    "seq_negative": field("seq", -1),
    "seq_float": field("seq", 1.5),
    "seq_skips": field("seq", 10_000),
    "seq_repeats": field("seq", 0),
    "sender_list": field("sender", ["lab"]),
    "receiver_object": field("receiver", {"a": 1}),
    "session_int": field("session", 5),
    "session_new": field("session", "f" * 32),
    "sender_other_side": field("sender", "hospital_b"),
    "shape_float": field("shape", [64.0, 16]),
    "shape_string": field("shape", "64x16"),
    "shape_three": field("shape", [4, 4, 4]),
    "shape_mixed": field("shape", [4, "4", 4]),
    "shape_empty": field("shape", []),
    "batch_float": field("batch_size", 64.0),
    "batch_string": field("batch_size", "64"),
    "dtype_list": field("dtype", ["float32"]),
    "dtype_number": field("dtype", 32),
    "kind_object": field("kind", {"k": 1}),
    "kind_receipt": field("kind", "audit_receipt"),
    "kind_new": field("kind", "raw_features"),
    "digest_list": field("digest", [1]),
    "digest_other": field("digest", "0" * 64),
    "edge_null": field("edge", None),
    "counterparty_number": field("counterparty", 7),
    "missing_field": drop("rule_id"),
    "extra_field": field("extra", 1),
    "data_list": top("data", []),
    "data_string": top("data", "x"),
    "time_earlier": top("time", "2025-12-31T23:59:59.000000Z"),
    "time_later_day": top("time", "2026-01-02T00:00:00.000000Z"),
    "time_garbage": top("time", "yesterday"),
    "time_number": top("time", 5),
    "time_wide_digits": top("time", "２０２６-01-01T00:00:00.000000Z"),
    "time_arabic_digits": top("time", "2026-01-01T00:00:00.٠٠٠٠٠٠Z"),
    "time_no_z": top("time", "2026-01-01T00:00:00.0000000"),
    "policy_other": top("policy", "0" * 64),
    "policy_number": top("policy", 1),
    "peer_other": top("peer", "hospital_a"),
    "version_float": top("v", 2.0),
    "version_one": top("v", 1),
    "event_unknown": top("event", "message_lost"),
    "event_refused": top("event", "refused"),
    "extra_key": top("extra", 1),
    "signature_on_a_message": top("sig", {"key": "k", "signature": "s"}),
}


@pytest.mark.parametrize("name", sorted(EDITS))
def test_an_edited_and_resigned_message_gives_the_same_findings_both_ways(name: str, small_run: SyntheticRun,
                                                                          context: VerifyContext) -> None:
    for peer, nth in (("lab", 40), ("hospital_a", 25)):
        entries = entries_of(small_run, peer)
        at = [i for i, e in enumerate(entries) if e["event"].startswith("message_")][nth]
        EDITS[name](entries[at])
        resign(small_run, peer, entries)
        assert_same(lines_of(small_run, peer), peer, context)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
TOP_FIELDS = ["time", "policy", "v", "event", "data", "peer"]


@settings(max_examples=400 if os.environ.get("SECURE_SPLIT_SLOW") == "1" else 40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(nth=st.integers(0, 10_000), which=st.integers(0, 100), value=json_values, peer=st.sampled_from(PEERS),
       messages_only=st.booleans())
def test_any_value_in_any_field_of_any_entry_gives_the_same_verdict_both_ways(
        small_run_template: SyntheticRun, context: VerifyContext, nth: int, which: int, value: Any, peer: str,
        messages_only: bool) -> None:
    # Never a traceback, and the hot loop agrees with the general path (half the cases edit a
    # message entry, the lane's own kind).
    entries = entries_of(small_run_template, peer)
    pool = [i for i, e in enumerate(entries) if e["event"].startswith("message_") or not messages_only]
    at = pool[nth % len(pool)]
    edited = copy.deepcopy(entries[at])
    fields = [("data", k) for k in sorted(edited["data"])] + [("top", k) for k in TOP_FIELDS]
    where, name = fields[which % len(fields)]
    if where == "data":
        edited["data"][name] = value
    else:
        edited[name] = value
    entries[at] = edited
    assert_same(resigned_lines(small_run_template, peer, entries), peer, context)


@pytest.mark.parametrize("name", ["time_wide_digits", "time_arabic_digits", "time_garbage"])
def test_a_time_in_other_digits_is_not_rfc_3339(name: str, small_run: SyntheticRun, context: VerifyContext) -> None:
    entries = entries_of(small_run, "lab")
    at = [i for i, e in enumerate(entries) if e["event"].startswith("message_")][40]
    EDITS[name](entries[at])
    report = assert_same(resigned_lines(small_run, "lab", entries), "lab", context)
    assert any(f.kind == "time_order" and f.covers(at) for f in report.findings)
