"""Mutation tests on a 10,000-entry, three-peer log: every kind of tampering at every entry is found.

For every entry of every peer's log, flipping a byte, deleting the entry, duplicating it and
swapping it with its neighbour must be reported as modified / deleted / duplicated / reordered at
that very entry. Each mutated file is verified whole with `verify_lines` (parsed lines are cached
by their bytes, so a mutation costs one O(n) pass over the file, not a re-parse).

To keep this under a few seconds, the every-entry test mutates entries 100 apart in one file at
once (each such mutation is diagnosed in its own region of the chain) and asserts each detection
at its entry and that nothing else is reported. `test_isolated_mutations_*` checks single
mutations one at a time: a seeded sample by default, every entry with SECURE_SPLIT_SLOW=1.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable

import pytest

from secure_split.audit import verify_lines, verify_logs
from secure_split.audit.chain import VerifyContext
from secure_split.audit.format import head_message
from secure_split.audit.report import FileReport
from secure_split.audit.synthetic import PEERS, SyntheticRun
from secure_split.crypto.keys import generate_identity

from .conftest import context_of, lines_of, write_lines

EXPECTED: dict[str, set[str]] = {
    # A flipped byte changes the entry's hash (the next entry's prev no longer matches): modified.
    # In the last entry (the final checkpoint) it breaks the signature instead, and in a
    # checkpoint's `sig.key` it names a key that is not in the deployment.
    "flip": {"modified", "forged_signature", "unknown_key"},
    # Deleting the final checkpoint leaves a log that does not close: truncated.
    "delete": {"deleted", "truncated"},
    # (With run_start deleted too, nothing anchors the end: a deletion next to it reads as the final
    # checkpoint standing in the missing entry's place, "modified". Either way the entry is named.)
    "duplicate": {"duplicated"},
    "swap": {"reordered"},
}
STRIDE = 100  # mutations in one file at once are this many entries apart


def flip_byte(line: bytes, k: int) -> bytes:
    """Flip one bit of one byte; position and bit vary with the entry so every bit is exercised."""
    p = (k * 7919 + 13) % len(line)
    return line[:p] + bytes([line[p] ^ (1 << (k % 8))]) + line[p + 1 :]


def mutate(lines: list[bytes], positions: list[int], how: str) -> list[bytes]:
    """Apply one kind of mutation at each position (positions far apart; applied from the end)."""
    out = list(lines)
    for k in sorted(positions, reverse=True):
        if how == "flip":
            out[k] = flip_byte(out[k], k)
        elif how == "delete":
            del out[k]
        elif how == "duplicate":
            out.insert(k, out[k])
        elif how == "swap":
            j = k + 1 if k + 1 < len(out) else k - 1
            out[k], out[j] = out[j], out[k]
    return out


def detected(report: FileReport, k: int, how: str, *, unanchored: bool = False) -> bool:
    """True when a finding of the expected kind names entry k."""
    kinds = EXPECTED[how] | ({"modified"} if unanchored else set())
    return any(f.kind in kinds and f.covers(k) for f in report.findings)


@pytest.fixture(scope="module")
def mutated_run(big_run: SyntheticRun, small_run_template: SyntheticRun) -> SyntheticRun:
    """The 10,000-entry run with SECURE_SPLIT_SLOW=1, the ~600-entry run otherwise."""
    return big_run if os.environ.get("SECURE_SPLIT_SLOW") == "1" else small_run_template


@pytest.fixture(scope="module")
def cached_context(mutated_run: SyntheticRun) -> VerifyContext:
    return context_of(mutated_run, cache_lines=True)


@pytest.fixture(scope="module")
def big_lines(mutated_run: SyntheticRun) -> dict[str, list[bytes]]:
    return {peer: lines_of(mutated_run, peer) for peer in PEERS}


def test_generated_log_has_ten_thousand_entries_across_three_peers(big_run: SyntheticRun) -> None:
    assert big_run.total_entries >= 10_000
    assert set(big_run.entries) == set(PEERS)


def test_clean_logs_give_zero_findings(big_run: SyntheticRun) -> None:
    report = verify_logs(big_run.log_dir, big_run.deployment_path, big_run.policy_path)
    assert report.findings == []
    assert report.unverifiable == []
    assert report.clean and int(report.exit_code) == 0
    assert report.checks["entries"] == big_run.total_entries
    assert report.checks["messages_matched"] > 4000
    assert report.checks["heads_compared"] > 100
    assert report.checks["flows_checked"] > 9000


@pytest.mark.parametrize("how", sorted(EXPECTED))
def test_every_entry_mutated_is_detected_at_that_entry(
    how: str, big_lines: dict[str, list[bytes]], cached_context: VerifyContext
) -> None:
    mutated = 0
    stride = STRIDE if len(big_lines["lab"]) > 1000 else 25
    for peer, lines in big_lines.items():
        assert verify_lines(lines, peer=peer, context=cached_context).findings == []
        for offset in range(stride):
            positions = list(range(offset, len(lines), stride))
            report = verify_lines(mutate(lines, positions, how), peer=peer, context=cached_context)
            missed = [k for k in positions if not detected(report, k, how, unanchored=0 in positions)]
            assert not missed, (peer, how, missed[:5], [f.describe() for f in report.findings][:5])
            # Nothing is reported away from the mutations (a swap also names its neighbour; an
            # unclosed log names the entry after its end).
            near = {k + d for k in positions for d in (-1, 0, 1)} | {len(lines)}
            # (A deleted message also leaves a gap in its session's protocol seqs: named where the session is.)
            stray = [f for f in report.findings if f.severity == "error" and f.kind != "message_gap"
                     and not any(f.covers(s) for s in near)]
            assert not stray, (peer, how, [f.describe() for f in stray][:5])
            mutated += len(positions)
    assert mutated == sum(len(v) for v in big_lines.values())


@pytest.mark.slow
def test_isolated_mutations_are_detected_one_at_a_time(
    big_lines: dict[str, list[bytes]], cached_context: VerifyContext
) -> None:
    # A seeded sample of (entry, mutation) pairs, each on its own: 2,000 on the 10,000-entry run with
    # SECURE_SPLIT_SLOW=1, 200 on the small run otherwise (every entry is covered by the test above).
    cases = [(peer, k, how) for peer, lines in big_lines.items() for k in range(len(lines)) for how in EXPECTED]
    cases = random.Random(20260101).sample(cases, 2000 if os.environ.get("SECURE_SPLIT_SLOW") == "1" else 200)
    for peer, k, how in cases:
        report = verify_lines(mutate(big_lines[peer], [k], how), peer=peer, context=cached_context)
        assert detected(report, k, how), (peer, k, how, [f.describe() for f in report.findings])


# -- signatures ----------------------------------------------------------------------------


def _rewrite(line: bytes, change: Callable[[dict], None]) -> bytes:
    entry = json.loads(line)
    change(entry)
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _checkpoint_positions(lines: list[bytes]) -> list[int]:
    return [i for i, line in enumerate(lines) if b'"sig":' in line]


def test_forged_checkpoint_signature_is_detected(small_run: SyntheticRun) -> None:
    lines = lines_of(small_run, "lab")
    k = _checkpoint_positions(lines)[2]
    forged = "ab" * 64

    def forge(e: dict) -> None:
        e["sig"]["signature"] = forged

    lines[k] = _rewrite(lines[k], forge)
    report = verify_lines(lines, peer="lab", context=context_of(small_run))
    assert [(f.kind, f.entries) for f in report.findings] == [("forged_signature", ((k, k),))]


def test_checkpoint_without_signature_is_detected(small_run: SyntheticRun) -> None:
    lines = lines_of(small_run, "lab")
    k = _checkpoint_positions(lines)[1]
    lines[k] = _rewrite(lines[k], lambda e: e.pop("sig"))
    report = verify_lines(lines, peer="lab", context=context_of(small_run))
    assert [(f.kind, f.entries) for f in report.findings] == [("forged_signature", ((k, k),))]


def _resign(line: bytes, peer: str, run: SyntheticRun, identity: object, lines: list[bytes]) -> bytes:
    """Re-sign one checkpoint line with `identity`, binding what the writer bound (run id and nonce)."""
    from secure_split.audit.encoding import checkpoint_body_hash

    entries = [json.loads(x) for x in lines]
    entry = json.loads(line)
    nonce = run_id = ""
    for e in entries[: entry["seq"]]:
        if e["event"] == "run_start":
            nonce, run_id = e["data"]["nonce"], ""
        elif e["event"] == "run_bound":
            run_id = e["data"]["run_id"]
    head = checkpoint_body_hash(entry)
    msg = head_message(peer, entry["seq"], head, run.deployment_hash, run=run_id, nonce=nonce)
    entry["sig"] = {"key": identity.sign_key_hex, "signature": identity.sign(msg).hex()}  # type: ignore[attr-defined]
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def test_checkpoint_resigned_with_a_key_outside_the_deployment_is_unknown_key(small_run: SyntheticRun) -> None:
    lines = lines_of(small_run, "hospital_a")
    k = _checkpoint_positions(lines)[1]
    lines[k] = _resign(lines[k], "hospital_a", small_run, generate_identity("mallory"), lines)
    report = verify_lines(lines, peer="hospital_a", context=context_of(small_run))
    assert [(f.kind, f.entries) for f in report.findings] == [("unknown_key", ((k, k),))]
    assert "not in the deployment" in report.findings[0].message


def test_checkpoint_resigned_by_another_peer_of_the_deployment_is_unknown_key(small_run: SyntheticRun) -> None:
    lines = lines_of(small_run, "hospital_a")
    k = _checkpoint_positions(lines)[1]
    lines[k] = _resign(lines[k], "hospital_a", small_run, small_run.identities["lab"], lines)
    report = verify_lines(lines, peer="hospital_a", context=context_of(small_run))
    assert [(f.kind, f.entries) for f in report.findings] == [("unknown_key", ((k, k),))]
    assert "'lab'" in report.findings[0].message


def test_rewritten_history_rechained_without_the_key_breaks_the_next_signature(small_run: SyntheticRun) -> None:
    # An attacker edits entry k and recomputes every prev after it: the chain is consistent again,
    # but the next checkpoint's signature (over the head) no longer verifies.
    from secure_split.canonical import sha256_hex

    lines = lines_of(small_run, "lab")
    cps = _checkpoint_positions(lines)
    k = cps[1] + 3

    def edit(e: dict) -> None:
        e["data"]["digest"] = "0" * 64

    lines[k] = _rewrite(lines[k], edit)
    for i in range(k + 1, len(lines)):
        prev_line = lines[i - 1]
        prev_hash = sha256_hex(prev_line) if b'"sig":' not in prev_line else _body_hash(prev_line)
        lines[i] = _rewrite(lines[i], lambda e, h=prev_hash: e.__setitem__("prev", h))
    report = verify_lines(lines, peer="lab", context=context_of(small_run))
    kinds = {f.kind for f in report.findings if f.severity == "error"}
    assert kinds == {"forged_signature"}
    assert any(f.covers(next(c for c in cps if c > k)) for f in report.findings)


def _body_hash(line: bytes) -> str:
    from secure_split.audit.encoding import checkpoint_body_hash

    return checkpoint_body_hash(json.loads(line))


# -- across peers --------------------------------------------------------------------------


def test_truncated_tail_is_proved_by_the_counterparties_logs(small_run: SyntheticRun) -> None:
    lines = lines_of(small_run, "hospital_a")
    cut = len(lines) // 2
    write_lines(small_run, "hospital_a", lines[:cut])
    report = verify_logs(small_run.log_dir, small_run.deployment_path)
    proved = [f for f in report.of_kind("truncated") if f.severity == "error"]
    assert len(proved) == 1
    f = proved[0]
    assert f.peer == "hospital_a" and f.covers(cut)
    assert f.evidence and all(e.startswith("lab:") for e in f.evidence)
    assert int(report.exit_code) == 1


def test_message_missing_from_the_receivers_log_is_reported(small_run: SyntheticRun) -> None:
    lines = lines_of(small_run, "lab")
    k = next(i for i, line in enumerate(lines) if b'"event":"message_received"' in line and b'"activation"' in line)
    # The lab removes a received message: the chain shows the deletion, and the cross-check blames the
    # lab (it logs later messages of that session, which a session delivers only in order).
    del lines[k]
    write_lines(small_run, "lab", lines)
    report = verify_logs(small_run.log_dir, small_run.deployment_path, small_run.policy_path)
    assert any(f.kind == "deleted" and f.peer == "lab" and f.covers(k) for f in report.findings)
    missing = report.of_kind("missing_counterpart")
    assert missing and all(f.party == "lab" for f in missing) and "left out by lab" in missing[0].message
    assert {f.peer: f.intact for f in report.files} == {"hospital_a": True, "hospital_b": True, "lab": False}


def test_digest_mismatch_between_sender_and_receiver(small_run: SyntheticRun) -> None:
    from .insider import entries_of, index_of, resign

    es = entries_of(small_run, "lab")
    i = index_of(es, lambda e: e["event"] == "message_received" and e["data"]["kind"] == "activation", 2)
    es[i]["data"]["digest"] = "2" * 64
    resign(small_run, "lab", es)
    report = verify_logs(small_run.log_dir, small_run.deployment_path, small_run.policy_path)
    mismatch = report.of_kind("digest_mismatch")
    assert mismatch and mismatch[0].peer == "lab" and mismatch[0].covers(i)
    assert mismatch[0].suspects == (es[i]["data"]["sender"], "lab") and mismatch[0].evidence


def test_message_refused_by_the_receiver_is_matched_by_its_refusal(small_run: SyntheticRun) -> None:
    from .insider import entries_of, index_of, resign

    # The lab's gate refused one activation (a refusal naming session, seq and digest): both logs agree.
    es = entries_of(small_run, "lab")
    i = index_of(es, lambda e: e["event"] == "message_received" and e["data"]["kind"] == "activation", 2)
    d = es[i]["data"]
    es[i] = dict(es[i], event="policy_denied", data={
        "direction": "receive", "sender": d["sender"], "receiver": "lab", "kind": d["kind"], "edge": d["edge"],
        "step": d["step"], "nbytes": d["nbytes"], "decision_id": "x", "rule_id": "default-deny", "reason": "denied",
        "session": d["session"], "seq": d["seq"], "digest": d["digest"]})
    resign(small_run, "lab", es)
    report = verify_logs(small_run.log_dir, small_run.deployment_path, small_run.policy_path)
    assert not report.of_kind("missing_counterpart") and not report.of_kind("digest_mismatch")
    assert report.checks["messages_matched"] > 100
