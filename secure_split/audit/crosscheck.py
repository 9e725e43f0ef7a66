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

import hashlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from secure_split.audit.chain import VerifyContext, signature_valid
from secure_split.audit.format import HEX128, encode_canonical, head_message
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
        sent: receiver -> [(message key, compared facts)] of every message_sent, in log order.
        sent_seq: receiver -> the entry seqs of those entries.
        received: sender -> [(message key, compared facts)] of every message_received, in log order.
        received_seq: sender -> the entry seqs of those entries.
        policies: policy hash -> seqs of the message entries logged under it.
        refusals: (counterparty, kind) -> how many inbound messages this peer refused.
        heads: counterparty heads recorded: (counterparty, seq, head, signature, key, entry seq).
        signed_heads: this peer's own checkpoints: seq -> (entry hash, signature valid, signature).
        message_times: (earliest, latest) `time` of the message entries ("" when none).
        digests: set by `compact`: ("sent" | "received", counterparty) -> (count, SHA-256 of the
            canonical JSON of that list); the lists themselves are then dropped.
        flows: set by `compact(with_flows=True)`: `message_flows(self)`, for the policy pass.
    """

    peer: str
    file: str
    last_seq: int
    sent: dict[str, list[tuple[MessageKey, tuple[Any, ...]]]] = field(default_factory=dict)
    sent_seq: dict[str, list[int]] = field(default_factory=dict)
    received: dict[str, list[tuple[MessageKey, tuple[Any, ...]]]] = field(default_factory=dict)
    received_seq: dict[str, list[int]] = field(default_factory=dict)
    policies: dict[str, list[int]] = field(default_factory=dict)
    refusals: Counter[tuple[str, str]] = field(default_factory=Counter)
    heads: list[tuple[Any, ...]] = field(default_factory=list)
    signed_heads: dict[int, tuple[str, bool, str]] = field(default_factory=dict)
    message_times: tuple[str, str] = ("", "")
    digests: dict[tuple[str, str], tuple[int, str]] | None = None
    flows: dict[tuple[Any, ...], list[int]] | None = None


FlowKey = tuple[str, str, str, str, str, int, Any, Any, Any]
"""(direction, sender, receiver, kind, edge, nbytes, dtype, shape as a tuple, batch_size)."""


def message_flows(facts: LogFacts) -> dict[tuple[Any, ...], list[int]]:
    """Group a log's messages by flow: flow key -> entry seqs (what the policy pass decides)."""
    if facts.flows is not None:
        return facts.flows
    groups: dict[tuple[Any, ...], list[int]] = {}
    sides = [("send", msgs, facts.sent_seq[p]) for p, msgs in facts.sent.items()]
    sides += [("receive", msgs, facts.received_seq[p]) for p, msgs in facts.received.items()]
    for direction, messages, seqs in sides:
        for (key, (kind, edge, _step, nbytes, dtype, shape, batch, _digest)), seq in zip(messages, seqs, strict=True):
            flow = (direction, key[0], key[1], kind, edge, nbytes, dtype,
                    tuple(shape) if isinstance(shape, list) else shape, batch)
            g = groups.get(flow)
            if g is None:
                groups[flow] = [seq]
            else:
                g.append(seq)
    return groups


def compact(facts: LogFacts, *, with_flows: bool) -> LogFacts:
    """Replace the per-message lists by one digest per counterparty and direction (for transport).

    Two logs agree on the messages between them exactly when these digests agree; only when they
    do not are the full facts needed again (`cross_check`'s `reload`).
    """
    digests = {}
    for direction, by_peer in (("sent", facts.sent), ("received", facts.received)):
        for peer, messages in by_peer.items():
            digests[(direction, peer)] = (len(messages), hashlib.sha256(encode_canonical(messages).encode()).hexdigest())
    out = LogFacts(facts.peer, facts.file, facts.last_seq, policies=facts.policies, refusals=facts.refusals,
                   heads=facts.heads, signed_heads=facts.signed_heads, message_times=facts.message_times,
                   digests=digests, flows=message_flows(facts) if with_flows else None)
    return out


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
    for p, (seq, _prev, _h, event, problem, _cp, facts, policy, time) in enumerate(report.infos):
        if facts is None:
            continue
        if event == "message_sent" or event == "message_received":
            if problem is not None or p in excluded:
                continue
            if event == "message_sent":
                to, by_peer, seq_by = facts[0][1], sent, sent_seq
            else:
                to, by_peer, seq_by = facts[0][0], received, received_seq
            got = by_peer.get(to)
            if got is None:
                got = by_peer[to] = []
                seq_by[to] = []
            got.append(facts)
            seq_by[to].append(seq)
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


def _check_pair(sender: LogFacts, receiver: LogFacts) -> tuple[list[Finding], int] | None:
    """Messages from `sender` to `receiver`, as both logged them (None: compact facts disagree)."""
    if sender.digests is not None or receiver.digests is not None:
        if sender.digests is None or receiver.digests is None:
            return None
        mine = sender.digests.get(("sent", receiver.peer), (0, ""))
        theirs = receiver.digests.get(("received", sender.peer), (0, ""))
        return ([], mine[0]) if mine == theirs or mine[0] == theirs[0] == 0 else None
    s_list = sender.sent.get(receiver.peer, [])
    r_list = receiver.received.get(sender.peer, [])
    if s_list == r_list:
        # One session per pair delivers in order, so both sides list the same messages in the
        # same order: one comparison settles the common case.
        return [], len(s_list)
    s_cmp = dict(s_list)
    r_cmp = dict(r_list)
    s_seq = dict(zip((k for k, _ in s_list), sender.sent_seq.get(receiver.peer, []), strict=True))
    r_seq = dict(zip((k for k, _ in r_list), receiver.received_seq.get(sender.peer, []), strict=True))
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


def _counterparties(facts: LogFacts, direction: str) -> list[str]:
    if facts.digests is not None:
        return [p for d, p in facts.digests if d == direction]
    return list(facts.sent if direction == "sent" else facts.received)


def cross_check(
    logs: dict[str, LogFacts],
    context: VerifyContext,
    reload: Callable[[str], LogFacts] | None = None,
) -> tuple[list[Finding], dict[str, int]]:
    """Check messages and heads across peers.

    Args:
        logs: peer -> its facts (peers whose log is missing are simply absent).
        context: deployment hash and keys.
        reload: peer -> its full facts, for logs given as `compact` facts whose digests disagree.

    Returns:
        (findings, counts of what was checked).
    """
    findings: list[Finding] = []
    matched = 0
    pairs = {(a, b) for a, f in logs.items() for b in _counterparties(f, "sent")}
    pairs |= {(a, b) for b, f in logs.items() for a in _counterparties(f, "received")}
    for a, b in sorted(pairs):
        if a in logs and b in logs:
            checked = _check_pair(logs[a], logs[b])
            if checked is None:
                if reload is None:
                    raise ValueError("compact facts disagree and no reload was given")
                for peer in (a, b):
                    if logs[peer].digests is not None:
                        logs[peer] = reload(peer)
                checked = _check_pair(logs[a], logs[b])
                if checked is None:  # cannot happen: both sides hold full facts now
                    raise ValueError(f"could not compare the messages between {a} and {b}")
            found, n = checked
            findings.extend(found)
            matched += n
        elif a not in context.keys or b not in context.keys:
            # A counterparty outside the deployment has no log that could confirm anything.
            known = a if a in logs else b
            if logs[known].digests is not None and reload is not None:
                logs[known] = reload(known)
            mine, other, seqs = (logs[a], b, logs[a].sent_seq[b]) if a in logs else (logs[b], a, logs[b].received_seq[a])
            findings.append(_finding(
                "missing_counterpart", mine, seqs,
                f"{len(seqs)} message(s) {'to' if mine.peer == a else 'from'} '{other}', which is not a peer of "
                "the deployment: no log can confirm them"))
        # else: the other peer's log is missing, which is reported as "cannot verify"

    # -- countersigned heads ----------------------------------------------------------------
    variants_of: dict[tuple[str, int], dict[str, list[str]]] = {}
    for holder in logs.values():
        bad_key, bad_sig = [], []
        for cp, s, h, sig, key, at in holder.heads:
            if type(cp) is not str or context.keys.get(cp) != key:
                bad_key.append(at)
                continue
            # The same signature over the same head already verified in its owner's log.
            own = logs[cp].signed_heads.get(s) if cp in logs and type(s) is int else None
            if own is not None and own[1] and own[0] == h and own[2] == sig:
                pass
            elif type(s) is not int or type(h) is not str or type(sig) is not str or not HEX128.fullmatch(sig) \
                    or not signature_valid(key, head_message(cp, s, h, context.deployment_hash), sig):
                bad_sig.append(at)
                continue
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
        for s, (h, ok, _sig) in facts.signed_heads.items():
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
        findings.append(Finding(
            "truncated", log.peer, log.file, ((log.last_seq + 1, top),),
            f"{peer}'s log ends at entry {log.last_seq}, but counterparties hold its signed head for entry "
            f"{top}: entries {log.last_seq + 1}-{top} (at least) were removed", "error", tuple(sorted(ev))[:10]))
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
