"""Checks across peers' logs: every message on both sides, countersigned heads, equivocation.

Each log is first reduced to `LogFacts` (what the other logs can confirm or contradict), so
files can be verified in parallel processes and only these facts travel back.

- Messages: a message is identified by (sender, receiver, session, protocol seq). The sender's
  `message_sent` and the receiver's `message_received` must both exist and agree on kind, edge,
  step, byte length, dtype, shape, batch size and digest. A message the receiver refused is
  matched by the receiver's `policy_denied`/`refused` entry for that sender and kind.
- Heads: a `counterparty_head` entry in B's log holds A's signed head (seq, hash). It must verify
  with A's key, and A's log must hold that very checkpoint: if A's log ends before it, A's tail
  was truncated; if A's entry differs, A's history was rewritten after it signed; two different
  validly signed heads for one seq are equivocation.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from secure_split.audit.chain import VerifyContext, signature_valid
from secure_split.audit.format import head_message
from secure_split.audit.report import FileReport, Finding, to_ranges

MessageKey = tuple[str, str, str, int]
"""(sender, receiver, session, protocol seq): names one message on both sides."""

COMPARED_FIELDS = ("kind", "edge", "step", "nbytes", "dtype", "shape", "batch_size", "digest")
"""The facts sender and receiver must log alike for one message."""


@dataclass
class LogFacts:
    """What one peer's log says that other logs can confirm or contradict.

    Attributes:
        peer: whose log.
        file: its file name.
        last_seq: the highest seq in the log's chain.
        sent: receiver -> {message key -> compared facts} for every message_sent.
        sent_seq: receiver -> {message key -> entry seq}.
        received: sender -> {message key -> compared facts} for every message_received.
        received_seq: sender -> {message key -> entry seq}.
        policies: policy hash -> seqs of the message entries logged under it.
        refusals: (counterparty, kind) -> how many inbound messages this peer refused.
        heads: counterparty heads recorded: (counterparty, seq, head, signature, key, entry seq).
        signed_heads: this peer's own checkpoints: seq -> (entry hash, signature valid).
        message_times: (earliest, latest) `time` of the message entries ("" when none).
    """

    peer: str
    file: str
    last_seq: int
    sent: dict[str, dict[MessageKey, tuple[Any, ...]]] = field(default_factory=dict)
    sent_seq: dict[str, dict[MessageKey, int]] = field(default_factory=dict)
    received: dict[str, dict[MessageKey, tuple[Any, ...]]] = field(default_factory=dict)
    received_seq: dict[str, dict[MessageKey, int]] = field(default_factory=dict)
    policies: dict[str, list[int]] = field(default_factory=dict)
    refusals: Counter[tuple[str, str]] = field(default_factory=Counter)
    heads: list[tuple[Any, ...]] = field(default_factory=list)
    signed_heads: dict[int, tuple[str, bool]] = field(default_factory=dict)
    message_times: tuple[str, str] = ("", "")


def extract_facts(report: FileReport) -> LogFacts:
    """Reduce a verified file to the facts the cross-peer and policy passes need.

    Lines the per-file pass excluded (duplicates, inserted or modified lines) and malformed
    message entries are left out.
    """
    out = LogFacts(report.peer, report.file, report.last_seq, signed_heads=dict(report.signed_heads))
    excluded = report.excluded
    sent, sent_seq, received, received_seq = out.sent, out.sent_seq, out.received, out.received_seq
    policies = out.policies
    last_policy, policy_seqs = None, None
    first_time, last_time = "~", ""  # ISO 8601 UTC strings order like the times they name
    for p, (seq, _prev, _h, event, problem, _cp, facts, policy, time, _li, _lo) in enumerate(report.infos):
        if facts is None:
            continue
        if event == "message_sent" or event == "message_received":
            if problem is not None or p in excluded:
                continue
            key, compared = facts
            if event == "message_sent":
                to, cmp_by, seq_by = key[1], sent, sent_seq
            else:
                to, cmp_by, seq_by = key[0], received, received_seq
            d = cmp_by.get(to)
            if d is None:
                d = cmp_by[to] = {}
                seq_by[to] = {}
            d[key] = compared
            seq_by[to][key] = seq
            if policy != last_policy:
                last_policy, policy_seqs = policy, policies.setdefault(policy, [])
            policy_seqs.append(seq)  # type: ignore[union-attr]
            if time < first_time:
                first_time = time
            if time > last_time:
                last_time = time
        elif p in excluded:
            continue
        elif event == "counterparty_head":
            out.heads.append((*facts, seq))
        elif event == "policy_denied":
            if facts[0] == "receive":
                out.refusals[(str(facts[1]), str(facts[3]))] += 1
        elif event == "refused":
            if facts[0] == "receive":
                out.refusals[(str(facts[1]), str(facts[2]))] += 1
    if last_time:
        out.message_times = (first_time, last_time)
    return out


def _finding(kind: str, facts: LogFacts, seqs: Any, message: str, evidence: tuple[str, ...] = (),
             severity: str = "error") -> Finding:
    return Finding(kind, facts.peer, facts.file, to_ranges(seqs), message, severity, evidence)


def _check_pair(sender: LogFacts, receiver: LogFacts) -> tuple[list[Finding], int]:
    """Messages from `sender` to `receiver`, as both logged them."""
    s_cmp = sender.sent.get(receiver.peer, {})
    r_cmp = receiver.received.get(sender.peer, {})
    if s_cmp == r_cmp:
        return [], len(s_cmp)
    s_seq = sender.sent_seq.get(receiver.peer, {})
    r_seq = receiver.received_seq.get(sender.peer, {})
    findings: list[Finding] = []
    only_sent = s_cmp.keys() - r_cmp.keys()
    only_received = r_cmp.keys() - s_cmp.keys()
    both = s_cmp.keys() & r_cmp.keys()
    differ = [k for k in both if s_cmp[k] != r_cmp[k]]
    a, b = sender.peer, receiver.peer
    if only_sent:
        refusals = Counter(receiver.refusals)
        unanswered = []
        for k in sorted(only_sent, key=s_seq.__getitem__):
            rk = (a, str(s_cmp[k][0]))
            if refusals[rk] > 0:
                refusals[rk] -= 1  # the receiver refused it: its refusal entry is the counterpart
            else:
                unanswered.append(s_seq[k])
        if unanswered:
            findings.append(_finding(
                "missing_counterpart", sender, unanswered,
                f"{len(unanswered)} message(s) {a} logged as sent to {b} have no message_received "
                f"(same session and seq) in {b}'s log"))
    if only_received:
        seqs = sorted(r_seq[k] for k in only_received)
        findings.append(_finding(
            "missing_counterpart", receiver, seqs,
            f"{len(seqs)} message(s) {b} logged as received from {a} have no message_sent "
            f"(same session and seq) in {a}'s log"))
    if differ:
        differ.sort(key=r_seq.__getitem__)
        first = differ[0]
        what = [f for f, x, y in zip(COMPARED_FIELDS, s_cmp[first], r_cmp[first], strict=True) if x != y]
        findings.append(_finding(
            "digest_mismatch", receiver, [r_seq[k] for k in differ],
            f"{len(differ)} message(s) from {a} were logged differently by {a} and {b} "
            f"(first: {', '.join(what)} differ)", tuple(f"{a}:{s_seq[k]}" for k in differ[:10])))
    return findings, len(both) - len(differ)


def cross_check(logs: dict[str, LogFacts], context: VerifyContext) -> tuple[list[Finding], dict[str, int]]:
    """Check messages and heads across peers.

    Args:
        logs: peer -> its facts (peers whose log is missing are simply absent).
        context: deployment hash and keys.

    Returns:
        (findings, counts of what was checked).
    """
    findings: list[Finding] = []
    matched = 0
    pairs = {(a, b) for a, f in logs.items() for b in f.sent} | {(a, b) for b, f in logs.items() for a in f.received}
    for a, b in sorted(pairs):
        if a in logs and b in logs:  # a missing log is reported as "cannot verify"
            found, n = _check_pair(logs[a], logs[b])
            findings.extend(found)
            matched += n

    # -- countersigned heads ----------------------------------------------------------------
    variants_of: dict[tuple[str, int], dict[str, list[str]]] = {}
    for holder in logs.values():
        bad_key, bad_sig = [], []
        for cp, s, h, sig, key, at in holder.heads:
            if type(cp) is not str or context.keys.get(cp) != key:
                bad_key.append(at)
            elif type(s) is not int or type(h) is not str or type(sig) is not str or not signature_valid(
                    key, head_message(cp, s, h, context.deployment_hash), sig):
                bad_sig.append(at)
            else:
                variants_of.setdefault((cp, s), {}).setdefault(h, []).append(f"{holder.peer}:{at}")
        if bad_key:
            findings.append(_finding("unknown_key", holder, bad_key,
                                     "recorded counterparty heads name a key that is not that peer's key "
                                     "in the deployment"))
        if bad_sig:
            findings.append(_finding("forged_signature", holder, bad_sig,
                                     "recorded counterparty heads do not verify with the counterparty's key "
                                     "(the writer records only verified heads: this log was altered)"))
    for facts in logs.values():
        for s, (h, ok) in facts.signed_heads.items():
            if ok and (facts.peer, s) in variants_of:
                variants_of[(facts.peer, s)].setdefault(h, []).append(f"{facts.peer}:{s}")
    truncated: dict[str, tuple[int, set[str]]] = {}
    mismatched: dict[str, tuple[list[int], set[str]]] = {}
    equivocated: dict[str, tuple[list[int], set[str]]] = {}
    for (peer, s), variants in sorted(variants_of.items()):
        witnesses = {w for where in variants.values() for w in where[:2]}
        if len(variants) > 1:
            seqs, ev = equivocated.setdefault(peer, ([], set()))
            seqs.append(s)
            ev.update(witnesses)
        log = logs.get(peer)
        if log is None:
            continue
        own = log.signed_heads.get(s)
        if s > log.last_seq:
            top, ev = truncated.get(peer, (-1, set()))
            truncated[peer] = (max(top, s), ev | witnesses)
        elif own is None or own[0] not in variants:
            seqs, ev = mismatched.setdefault(peer, ([], set()))
            seqs.append(s)
            ev.update(witnesses)
    for peer, (top, ev) in truncated.items():
        log = logs[peer]
        findings.append(_finding(
            "truncated", log, range(log.last_seq + 1, top + 1),
            f"{peer}'s log ends at entry {log.last_seq}, but counterparties hold its signed head for entry "
            f"{top}: entries {log.last_seq + 1}-{top} (at least) were removed", tuple(sorted(ev))[:10]))
    for peer, (seqs, ev) in mismatched.items():
        findings.append(_finding(
            "head_mismatch", logs[peer], seqs,
            f"counterparties hold {peer}'s signed heads for these entries, but {peer}'s log has a different "
            "entry there: its history was rewritten after it signed", tuple(sorted(ev))[:10]))
    for peer, (seqs, ev) in equivocated.items():
        if peer in logs:
            findings.append(_finding("equivocation", logs[peer], seqs,
                                     f"{peer} signed two different heads for the same entry",
                                     tuple(sorted(ev))[:10]))
    return findings, {"messages_matched": matched, "heads_compared": len(variants_of)}
