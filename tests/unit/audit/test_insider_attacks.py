"""A named corpus of insider attacks on one's own log and on the set of logs (issue 13's nine classes).

Each attack is one function that tampers with a fresh copy of a clean three-peer run (format 2,
close round, signed metrics) and returns nothing; `EXPECTED` names the finding it must produce and
the party it must be attributed to ("" for a warning or an undetermined finding). Every attacker
here holds its own signing key and re-signs what it rewrote (`insider.resign`), unless the attack
is a plain edit. The honest parties' files must stay `intact`.

In the normal suite the corpus runs on a small run; with SECURE_SPLIT_SLOW=1 on a larger one too.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from secure_split.audit import verify_logs
from secure_split.audit.synthetic import SyntheticRun, generate_logs

from .conftest import lines_of, write_lines
from .insider import entries_of, event, index_of, resign

Attack = Callable[[SyntheticRun, SyntheticRun], None]
ATTACKS: dict[str, tuple[Attack, str, str]] = {}


def attack(kind: str, party: str) -> Callable[[Attack], Attack]:
    """Register an attack with the finding kind it must produce and the party it must blame."""

    def register(fn: Attack) -> Attack:
        ATTACKS[fn.__name__] = (fn, kind, party)
        return fn

    return register


def msg(kind: str, **data: Any) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e["event"].startswith("message_") and e["data"]["kind"] == kind and all(
        e["data"].get(k) == v for k, v in data.items())


# -- 1. framing with another run's material ------------------------------------------------------

@attack("run_mismatch", "lab")
def replay_counterparty_head_from_an_earlier_run(run: SyntheticRun, other: SyntheticRun) -> None:
    old = entries_of(other, "lab")
    replay = old[index_of(old, event("counterparty_head", counterparty="hospital_a"), 3)]
    es = entries_of(run, "lab")
    es.insert(index_of(es, event("counterparty_head", counterparty="hospital_a"), 2) + 1, replay)
    resign(run, "lab", es)


@attack("head_mismatch", "hospital_a")
def hand_in_the_log_of_another_run(run: SyntheticRun, other: SyntheticRun) -> None:
    shutil.copy(other.log_dir / "hospital_a.jsonl", run.log_dir / "hospital_a.jsonl")


@attack("run_mismatch", "hospital_b")
def rebind_a_segment_to_another_run_id(run: SyntheticRun, other: SyntheticRun) -> None:
    es = entries_of(run, "hospital_b")
    i = index_of(es, event("run_bound"))
    es[i]["data"]["run_id"] = entries_of(other, "hospital_b")[i]["data"]["run_id"]
    resign(run, "hospital_b", es)


@attack("equivocation", "hospital_a")
def resign_a_different_history_after_giving_heads_away(run: SyntheticRun, other: SyntheticRun) -> None:
    es = entries_of(run, "hospital_a")
    i = index_of(es, event("checkpoint_saved"), 2)
    es[i]["data"]["digest"] = "0" * 64
    resign(run, "hospital_a", es)


# -- 2. rewriting one's tail -----------------------------------------------------------------------

@attack("head_mismatch", "hospital_a")
def rewrite_run_end_status(run: SyntheticRun, other: SyntheticRun) -> None:
    es = entries_of(run, "hospital_a")
    es[index_of(es, event("run_end"))]["data"]["status"] = "failed"
    resign(run, "hospital_a", es)


@attack("head_mismatch", "lab")
def rewrite_run_end_metrics(run: SyntheticRun, other: SyntheticRun) -> None:
    es = entries_of(run, "lab")
    es[index_of(es, event("run_end"))]["data"]["metrics"] = {"accuracy": 1.0}
    resign(run, "lab", es)


@attack("truncated", "hospital_b")
def cut_the_close_round(run: SyntheticRun, other: SyntheticRun) -> None:
    es = entries_of(run, "hospital_b")
    resign(run, "hospital_b", es[: index_of(es, event("run_end"))])


@attack("malformed", "lab")
def append_after_the_final_checkpoint(run: SyntheticRun, other: SyntheticRun) -> None:
    es = entries_of(run, "lab")
    extra = dict(es[-3], event="checkpoint_saved", data={"epoch": 99, "digest": "0" * 64})
    resign(run, "lab", [*es, extra, dict(es[-1])])


@attack("head_mismatch", "hospital_b")
def rewrite_the_last_messages(run: SyntheticRun, other: SyntheticRun) -> None:
    es = entries_of(run, "hospital_b")
    # The last message before run_end (the shutdown): the close head, countersigned, covers it.
    es[index_of(es, msg("shutdown"), -1)]["data"]["nbytes"] = 1
    resign(run, "hospital_b", es)


# -- 3. forging what a run achieved ----------------------------------------------------------------

@attack("forged_signature", "lab")
def inflate_a_counterpartys_metrics(run: SyntheticRun, other: SyntheticRun) -> None:
    es = entries_of(run, "lab")
    es[index_of(es, event("counterparty_metrics"), -1)]["data"]["values"]["loss"] = 0.0
    resign(run, "lab", es)


@attack("metrics_mismatch", "hospital_a")
def log_other_metrics_than_signed(run: SyntheticRun, other: SyntheticRun) -> None:
    es = entries_of(run, "hospital_a")
    es[index_of(es, event("epoch_metrics"), -1)]["data"]["values"]["loss"] = 0.01
    resign(run, "hospital_a", es)


@attack("metrics_mismatch", "hospital_b")
def drop_ones_own_metrics(run: SyntheticRun, other: SyntheticRun) -> None:
    es = entries_of(run, "hospital_b")
    del es[index_of(es, event("epoch_metrics"), 1)]
    resign(run, "hospital_b", es)


@attack("run_mismatch", "lab")
def record_metrics_of_another_run(run: SyntheticRun, other: SyntheticRun) -> None:
    es = entries_of(run, "lab")
    old = entries_of(other, "lab")
    es.insert(index_of(es, event("counterparty_metrics"), 1), old[index_of(old, event("counterparty_metrics"), 1)])
    resign(run, "lab", es)


# -- 4. passing without the right policy -----------------------------------------------------------

@attack("policy_mismatch", "hospital_a")
def start_under_another_policy(run: SyntheticRun, other: SyntheticRun) -> None:
    es = entries_of(run, "hospital_a")
    es[0]["data"]["policy_hash"] = "f" * 64
    for e in es:
        e["policy"] = "f" * 64
    resign(run, "hospital_a", es)


@attack("run_mismatch", "lab")
def log_entries_under_another_policy_hash(run: SyntheticRun, other: SyntheticRun) -> None:
    es = entries_of(run, "lab")
    es[40]["policy"] = "f" * 64
    resign(run, "lab", es)


@attack("malformed", "hospital_b")
def drop_run_start(run: SyntheticRun, other: SyntheticRun) -> None:
    es = entries_of(run, "hospital_b")
    nonce = es[0]["data"]["nonce"]
    first = dict(es[1])
    resign(run, "hospital_b", [first, *es[2:]], )
    lines = lines_of(run, "hospital_b")
    del nonce, lines


@attack("run_mismatch", "hospital_a")
def name_another_deployment_in_run_start(run: SyntheticRun, other: SyntheticRun) -> None:
    es = entries_of(run, "hospital_a")
    es[0]["data"]["deployment_hash"] = "a" * 64
    resign(run, "hospital_a", es)


# -- 5. inventing or hiding refusals ---------------------------------------------------------------

@attack("digest_mismatch", "")
def turn_a_received_message_into_a_refusal(run: SyntheticRun, other: SyntheticRun) -> None:
    es = entries_of(run, "lab")
    i = index_of(es, msg("activation", sender="hospital_a"), -2)
    d = es[i]["data"]
    es[i] = dict(es[i], event="policy_denied", data={
        "direction": "receive", "sender": d["sender"], "receiver": "lab", "kind": d["kind"], "edge": d["edge"],
        "step": d["step"], "nbytes": d["nbytes"], "decision_id": "x", "rule_id": "default-deny", "reason": "denied",
        "session": d["session"], "seq": d["seq"], "digest": "0" * 64})
    resign(run, "lab", es)


@attack("duplicate_message", "lab")
def place_a_fake_entry_before_the_genuine_one(run: SyntheticRun, other: SyntheticRun) -> None:
    es = entries_of(run, "lab")
    i = index_of(es, msg("activation", sender="hospital_b"), 3)
    fake = dict(es[i], data={**es[i]["data"], "digest": "1" * 64})
    es.insert(i, fake)
    resign(run, "lab", es)


@attack("duplicate_message", "hospital_a")
def log_one_send_twice(run: SyntheticRun, other: SyntheticRun) -> None:
    es = entries_of(run, "hospital_a")
    i = index_of(es, lambda e: e["event"] == "message_sent", 5)
    es.insert(i + 3, dict(es[i]))
    resign(run, "hospital_a", es)


# -- 6. non-canonical bytes (a plain edit, or a writer that cheats on the encoding) --------------

def _edit(run: SyntheticRun, peer: str, k: int, old: bytes, new: bytes) -> None:
    lines = lines_of(run, peer)
    assert old in lines[k]
    lines[k] = lines[k].replace(old, new, 1)
    write_lines(run, peer, lines)


def _noncanonical(encode: Callable[[dict[str, Any]], bytes]) -> Callable[[dict[str, Any]], bytes]:
    from secure_split.audit.encoding import encode_entry

    chosen: list[int] = []

    def enc(e: dict[str, Any]) -> bytes:
        if not chosen and e["seq"] >= 30 and e["event"] != "checkpoint":
            chosen.append(e["seq"])
        if chosen and e["seq"] == chosen[0]:
            return encode(e)
        return encode_entry(e)

    return enc


@attack("malformed", "hospital_a")
def whole_float_for_an_integer(run: SyntheticRun, other: SyntheticRun) -> None:
    from secure_split.audit.encoding import encode_entry

    es = entries_of(run, "hospital_a")
    es[30] = dict(es[30], event="error", data={"reason": "x", "error": "E", "n": 112.0})
    resign(run, "hospital_a", es, encode=lambda e: encode_entry(e))


@attack("malformed", "hospital_b")
def whole_float_in_a_message(run: SyntheticRun, other: SyntheticRun) -> None:
    es = entries_of(run, "hospital_b")
    i = index_of(es, lambda e: e["event"] == "message_sent", 4)
    es[i]["data"]["nbytes"] = float(es[i]["data"]["nbytes"])
    resign(run, "hospital_b", es)


@attack("malformed", "lab")
def unsorted_keys(run: SyntheticRun, other: SyntheticRun) -> None:
    import json

    resign(run, "lab", entries_of(run, "lab"), encode=_noncanonical(
        lambda e: json.dumps(dict(reversed(list(e.items()))), separators=(",", ":"), ensure_ascii=False).encode()))


@attack("malformed", "lab")
def escaped_ascii(run: SyntheticRun, other: SyntheticRun) -> None:
    from secure_split.audit.encoding import encode_entry

    resign(run, "lab", entries_of(run, "lab"), encode=_noncanonical(
        lambda e: encode_entry(e).replace(b'"peer":"lab"', b'"peer":"\\u006cab"')))


@attack("malformed", "hospital_a")
def duplicate_key_with_a_fake_first_value(run: SyntheticRun, other: SyntheticRun) -> None:
    from secure_split.audit.encoding import encode_entry

    resign(run, "hospital_a", entries_of(run, "hospital_a"), encode=_noncanonical(
        lambda e: encode_entry(e).replace(b'{"data":', b'{"event":"error","data":', 1)))


@attack("malformed", "hospital_b")
def whitespace_between_tokens(run: SyntheticRun, other: SyntheticRun) -> None:
    import json

    resign(run, "hospital_b", entries_of(run, "hospital_b"), encode=_noncanonical(
        lambda e: json.dumps(e, sort_keys=True, ensure_ascii=False).encode()))


@attack("forged_signature", "lab")
def extra_key_in_sig(run: SyntheticRun, other: SyntheticRun) -> None:
    lines = lines_of(run, "lab")
    k = next(i for i, x in enumerate(lines) if b'"sig":{' in x)
    lines[k] = lines[k].replace(b'"sig":{', b'"sig":{"extra":1,', 1)
    write_lines(run, "lab", lines)


@attack("modified", "lab")
def nan_in_an_entry(run: SyntheticRun, other: SyntheticRun) -> None:
    _edit(run, "lab", 20, b'"seq":20', b'"seq":NaN')


# -- 7. deleting counterpart entries: blame the deleter --------------------------------------------

@attack("missing_counterpart", "lab")
def hide_received_messages(run: SyntheticRun, other: SyntheticRun) -> None:
    es = entries_of(run, "lab")
    i = index_of(es, msg("activation", sender="hospital_a"), 2)
    del es[i]
    resign(run, "lab", es)


@attack("head_mismatch", "hospital_b")
def hide_sent_messages(run: SyntheticRun, other: SyntheticRun) -> None:
    es = entries_of(run, "hospital_b")
    del es[index_of(es, lambda e: e["event"] == "message_sent", 6)]
    resign(run, "hospital_b", es)


@attack("message_gap", "lab")
def skip_a_protocol_seq_in_ones_own_log(run: SyntheticRun, other: SyntheticRun) -> None:
    es = entries_of(run, "lab")
    del es[index_of(es, msg("gradient", receiver="hospital_b"), 2)]
    resign(run, "lab", es)


@attack("missing_counterpart", "")
def invent_a_received_message(run: SyntheticRun, other: SyntheticRun) -> None:
    es = entries_of(run, "hospital_a")
    i = index_of(es, msg("gradient", receiver="hospital_a"), -1)
    fake = dict(es[i], data={**es[i]["data"], "seq": es[i]["data"]["seq"] + 1000, "kind": "activation"})
    es.insert(index_of(es, event("run_end")), fake)
    resign(run, "hospital_a", es)


@attack("missing_counterpart", "")
def hide_a_received_hello(run: SyntheticRun, other: SyntheticRun) -> None:
    # The zero session (HELLOs) has no seq order to blame anyone by: both are suspects.
    es = entries_of(run, "hospital_b")
    del es[index_of(es, lambda e: e["event"] == "message_received" and e["data"]["kind"] == "hello")]
    resign(run, "hospital_b", es)


# -- plain edits by anyone holding the file (no key) ------------------------------------------------

@attack("modified", "hospital_a")
def flip_a_byte(run: SyntheticRun, other: SyntheticRun) -> None:
    lines = lines_of(run, "hospital_a")
    lines[50] = lines[50].replace(b'"step":', b'"step":1', 1)
    write_lines(run, "hospital_a", lines)


@attack("deleted", "lab")
def delete_an_entry(run: SyntheticRun, other: SyntheticRun) -> None:
    lines = lines_of(run, "lab")
    del lines[77]
    write_lines(run, "lab", lines)


@attack("duplicated", "hospital_b")
def duplicate_an_entry(run: SyntheticRun, other: SyntheticRun) -> None:
    lines = lines_of(run, "hospital_b")
    lines.insert(31, lines[30])
    write_lines(run, "hospital_b", lines)


@attack("reordered", "lab")
def swap_two_entries(run: SyntheticRun, other: SyntheticRun) -> None:
    lines = lines_of(run, "lab")
    lines[60], lines[61] = lines[61], lines[60]
    write_lines(run, "lab", lines)


@attack("truncated", "hospital_a")
def truncate_to_a_clean_looking_end(run: SyntheticRun, other: SyntheticRun) -> None:
    lines = lines_of(run, "hospital_a")
    cut = [i for i, x in enumerate(lines) if b'"sig":' in x][3] + 1
    write_lines(run, "hospital_a", lines[:cut])


@attack("unknown_key", "hospital_b")
def sign_with_another_peers_key(run: SyntheticRun, other: SyntheticRun) -> None:
    es = entries_of(run, "hospital_b")
    lab = run.identities["lab"]
    ident = run.identities["hospital_b"]
    run.identities["hospital_b"] = lab
    try:
        resign(run, "hospital_b", es)
    finally:
        run.identities["hospital_b"] = ident


# -- 8. robustness: floods and junk ---------------------------------------------------------------

@attack("garbage", "lab")
def append_a_newline_flood(run: SyntheticRun, other: SyntheticRun) -> None:
    with open(run.log_dir / "lab.jsonl", "ab") as fh:
        fh.write(b"\n" * 200_000)


@attack("garbage", "hospital_a")
def append_a_huge_line(run: SyntheticRun, other: SyntheticRun) -> None:
    with open(run.log_dir / "hospital_a.jsonl", "ab") as fh:
        fh.write(b"x" * 300_000 + b"\n")


@attack("garbage", "hospital_b")
def insert_random_bytes(run: SyntheticRun, other: SyntheticRun) -> None:
    lines = lines_of(run, "hospital_b")
    rng = random.Random(13)
    lines[40:40] = [bytes(rng.randrange(256) for _ in range(80)).replace(b"\n", b"") for _ in range(5)]
    write_lines(run, "hospital_b", lines)


EXPECTED = {name: (kind, party) for name, (_fn, kind, party) in ATTACKS.items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, small_run_template: SyntheticRun) -> tuple[SyntheticRun, ...]:
    other = generate_logs(tmp_path_factory.mktemp("other"), entries=600, steps_per_barrier=5,
                          identities=small_run_template.identities, seed=1)
    return small_run_template, other


def fresh(template: SyntheticRun, where: Path) -> SyntheticRun:
    shutil.copytree(template.directory, where)
    t = template
    return SyntheticRun(where, where / "audit", where / "deployment.yaml", t.deployment_hash,
                        where / "policy.yaml" if t.policy_path else None, t.policy_hash, dict(t.entries),
                        dict(t.identities))


def test_the_corpus_holds_forty_distinct_attacks() -> None:
    assert len(ATTACKS) >= 40


def test_the_clean_run_is_clean(runs: tuple[SyntheticRun, ...]) -> None:
    report = verify_logs(runs[0].log_dir, runs[0].deployment_path, runs[0].policy_path)
    assert report.clean, [f.describe() for f in report.findings]


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_is_found_and_blamed_on_the_party_that_acted(name: str, runs: tuple[SyntheticRun, ...],
                                                           tmp_path: Path) -> None:
    fn, kind, party = ATTACKS[name]
    run = fresh(runs[0], tmp_path / "run")
    fn(run, runs[1])
    report = verify_logs(run.log_dir, run.deployment_path, run.policy_path)
    described = [f"{f.describe()} [party {f.party or '-'}]" for f in report.findings]
    kinds = {kind, "equivocation"} if kind == "head_mismatch" else {kind}  # both: rewrote what it had signed
    assert any(f.kind in kinds and f.party == party for f in report.findings), described
    assert int(report.exit_code) in (1, 2), described
    honest = {"hospital_a", "hospital_b", "lab"} - {party}
    if party:
        assert not any(f.party in honest for f in report.findings if f.severity == "error"), described
        assert {f.peer: f.intact for f in report.files}.get(party) is False


def test_replacing_every_log_with_another_runs_is_reported_as_that_run(runs: tuple[SyntheticRun, ...]) -> None:
    mine = verify_logs(runs[0].log_dir, runs[0].deployment_path, runs[0].policy_path)
    theirs = verify_logs(runs[1].log_dir, runs[1].deployment_path, runs[1].policy_path)
    assert set(mine.runs).isdisjoint(theirs.runs) and mine.runs and theirs.runs


def test_without_a_policy_the_verdict_is_incomplete_never_clean(runs: tuple[SyntheticRun, ...]) -> None:
    report = verify_logs(runs[0].log_dir, runs[0].deployment_path)
    assert report.status == "incomplete" and int(report.exit_code) == 2 and not report.clean


def test_a_crash_and_resume_verifies_with_warnings_only(tmp_path: Path, small_run_template: SyntheticRun) -> None:
    run = generate_logs(tmp_path / "crash", entries=900, steps_per_barrier=5, crash_at=12,
                        identities=small_run_template.identities)
    report = verify_logs(run.log_dir, run.deployment_path, run.policy_path)
    assert report.clean, [f.describe() for f in report.findings]
    kinds = {f.kind for f in report.findings}
    assert kinds == {"unsigned_tail", "in_flight"} and all(f.severity == "warning" for f in report.findings)
    assert all(f.intact for f in report.files)


def test_segments_that_bind_no_run_and_run_no_close_round_verify_with_warnings(
        tmp_path: Path, small_run_template: SyntheticRun) -> None:
    # A failed start, or a peer layer that runs neither a start barrier nor a close round: heads
    # still bind each writer's nonce and are countersigned; the uncountersigned close is a warning.
    run = generate_logs(tmp_path / "unbound", entries=600, steps_per_barrier=5, unbound=True,
                        identities=small_run_template.identities)
    report = verify_logs(run.log_dir, run.deployment_path, run.policy_path)
    assert report.clean, [f.describe() for f in report.findings]
    assert {f.kind for f in report.findings} == {"unsigned_tail"} and not report.runs


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SECURE_SPLIT_SLOW") != "1", reason="the corpus on a 6,000-entry run")
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_on_a_larger_run(name: str, tmp_path_factory: pytest.TempPathFactory, big_run: SyntheticRun,
                                tmp_path: Path) -> None:
    other = generate_logs(tmp_path_factory.mktemp("big_other"), entries=3000, identities=big_run.identities, seed=3)
    fn, kind, party = ATTACKS[name]
    run = fresh(big_run, tmp_path / "run")
    fn(run, other)
    report = verify_logs(run.log_dir, run.deployment_path, run.policy_path)
    kinds = {kind, "equivocation"} if kind == "head_mismatch" else {kind}
    assert any(f.kind in kinds and f.party == party for f in report.findings)
