"""Checks across peers' logs, with attribution: heads, runs, the close round's tail, messages, metrics.

Every finding names the party that must have acted — the peer whose key signed the inconsistent
data — following the table in FORMAT.md §9:

- a counterparty head that does not verify, names another key, or binds another run than the
  segment it stands in: the **holder** (its writer records only verified heads of its own run);
- a head that verifies but the signer's log differs, ends before it, or lacks its segment: the
  **signer** (it signed one history and handed over another); two heads for one entry: the signer;
- an uncountersigned tail after a normal close: the **owner**; after a crash or an incomplete
  close round: a warning, nobody's wrongdoing;
- a message one side logged and the other did not: the side whose own later entries prove it
  handled the message (a session delivers seqs in order); across a crash of the other side: a
  warning (in flight); otherwise undetermined (`suspects` names both);
- a signed metrics statement that the signer's own log contradicts: the **signer**.

Messages are matched in two passes: the first (per file) keeps per (sender, receiver, session)
a count and an order-free sum of the facts; when sender and receiver agree, nothing else is
needed; when they do not, `reread` streams both files again for that session only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from secure_split.audit.encoding import encode_value
from secure_split.audit.facts import ZERO_SESSION, LogFacts, Segment, Stream
from secure_split.audit.format import HEX128, head_message
from secure_split.audit.regions import signature_valid
from secure_split.audit.report import Finding, to_ranges

COMPARED_FIELDS = ("kind", "edge", "step", "nbytes", "dtype", "shape", "batch_size", "digest")
"""The facts sender and receiver must log alike for one message."""

Reread = Callable[[str, str], Iterator[tuple[int, str, dict[str, Any]]]]
"""(peer, session) -> that log's (entry seq, event, data) of messages and refusals of the session."""

_SESSION_ITEMS_MAX = 1 << 20


def _f(kind: str, facts: LogFacts, seqs: Any, message: str, *, party: str = "", severity: str = "error",
       evidence: tuple[str, ...] = (), suspects: tuple[str, ...] = ()) -> Finding:
    ranges = (tuple(seqs),) if isinstance(seqs, tuple) else to_ranges(seqs)
    return Finding(kind, facts.peer, facts.file, ranges, message, severity, evidence, party, suspects)


class CrossCheck:
    """The cross-peer pass over every log's facts (see module docstring)."""

    def __init__(self, logs: dict[str, LogFacts], deployment_hash: str, keys: dict[str, str],
                 reread: Reread | None = None) -> None:
        """Args: peer -> facts (absent logs are simply missing), the deployment, and `reread` for pass 2."""
        self.logs = logs
        self.dep = deployment_hash
        self.keys = keys
        self.reread = reread
        self.findings: list[Finding] = []
        self.checks: dict[str, int] = {"messages_matched": 0, "heads_compared": 0, "metrics_compared": 0}
        self.countersigned: dict[str, set[int]] = {p: set() for p in logs}

    def run(self) -> tuple[list[Finding], dict[str, int]]:
        """Run every check; returns (findings, counts)."""
        support: dict[str, int] = {}
        for log in self.logs.values():
            for run in {r for seg in log.segments for _a, r, _n in seg.runs}:
                support[run] = support.get(run, 0) + 1
        self.support = support
        self.top = max(support.values(), default=0)
        self._heads()
        self._runs()
        self._tails()
        self._messages()
        self._metrics()
        return self.findings, self.checks

    # -- heads -------------------------------------------------------------------------------

    def _heads(self) -> None:
        variants: dict[tuple[str, str, int], dict[str, list[str]]] = {}
        run_of: dict[tuple[str, str], str] = {}
        for holder in self.logs.values():
            bad_key, bad_sig = [], []
            for cp, s, h, sig, key, run, nonce, at in holder.heads:
                if type(cp) is not str or self.keys.get(cp) != key:
                    bad_key.append(at)
                    continue
                owner = self.logs.get(cp)
                own = owner.checkpoints.get(s) if owner is not None and type(s) is int else None
                if own is not None and own[2] and own[0] == h and own[1] == sig and own[3] == run and own[4] == nonce:
                    pass  # the same signature over the same head already verified in its owner's log
                elif type(s) is not int or type(h) is not str or type(sig) is not str or type(run) is not str \
                        or type(nonce) is not str or not HEX128.fullmatch(sig) \
                        or not signature_valid(key, head_message(cp, s, h, self.dep, run=run, nonce=nonce), sig):
                    bad_sig.append(at)
                    continue
                variants.setdefault((cp, nonce, s), {}).setdefault(h, []).append(f"{holder.peer}:{at}")
                run_of[(cp, nonce)] = run
            if bad_key:
                self.findings.append(_f("unknown_key", holder, bad_key, "recorded counterparty heads name a key that "
                                        "is not that peer's key in the deployment", party=holder.peer))
            if bad_sig:
                self.findings.append(_f("forged_signature", holder, bad_sig, "recorded counterparty heads do not "
                                        "verify with the counterparty's key (the writer records only verified "
                                        "heads: this log was altered by its owner)", party=holder.peer))
        self.checks["heads_compared"] = len(variants)
        truncated: dict[str, tuple[int, set[str]]] = {}
        mismatched: dict[str, tuple[list[int], set[str]]] = {}
        equivocated: dict[str, tuple[list[int], set[str]]] = {}
        missing_segment: dict[str, tuple[set[str], set[str]]] = {}
        for (peer, nonce, s), by_hash in sorted(variants.items()):
            witnesses = {w for where in by_hash.values() for w in where[:2]}
            log = self.logs.get(peer)
            own = log.checkpoints.get(s) if log is not None else None
            if own is not None and own[2] and own[4] == nonce and own[0] not in by_hash:
                by_hash = {**by_hash, own[0]: [f"{peer}:{s}"]}
            if len(by_hash) > 1:
                seqs, ev = equivocated.setdefault(peer, ([], set()))
                seqs.append(s)
                ev.update(witnesses)
            if log is None:
                continue
            if not any(seg.nonce == nonce for seg in log.segments):
                if self.support.get(run_of.get((peer, nonce), ""), 0) < self.top:
                    continue  # a run only the holder's log binds: the holder's log is the odd one out
                nonces, ev = missing_segment.setdefault(peer, (set(), set()))
                nonces.add(nonce)
                ev.update(witnesses)
            elif s > log.last_seq:
                top, ev = truncated.get(peer, (-1, set()))
                truncated[peer] = (max(top, s), ev | witnesses)
            elif own is None or own[4] != nonce or own[0] not in by_hash:
                seqs, ev = mismatched.setdefault(peer, ([], set()))
                seqs.append(s)
                ev.update(witnesses)
            else:
                self.countersigned[peer].add(s)
        for peer, (top, ev) in truncated.items():
            log = self.logs[peer]
            self.findings.append(Finding(
                "truncated", peer, log.file, ((log.last_seq + 1, top),),
                f"{peer}'s log ends at entry {log.last_seq}, but counterparties hold its signed head for entry {top}: "
                f"entries {log.last_seq + 1}-{top} (at least) were removed", "error", tuple(sorted(ev))[:10], peer))
        for peer, (seqs, ev) in mismatched.items():
            self.findings.append(_f("head_mismatch", self.logs[peer], seqs,
                                    f"counterparties hold {peer}'s signed heads for these entries, but {peer}'s log has "
                                    "a different entry there: its history was rewritten after it signed",
                                    party=peer, evidence=tuple(sorted(ev))[:10]))
        for peer, (seqs, ev) in equivocated.items():
            if peer in self.logs:
                self.findings.append(_f("equivocation", self.logs[peer], seqs,
                                        f"{peer} signed two different heads for the same entry of the same segment",
                                        party=peer, evidence=tuple(sorted(ev))[:10]))
        for peer, (nonces, ev) in missing_segment.items():
            self.findings.append(_f("head_mismatch", self.logs[peer], [],
                                    f"counterparties hold {peer}'s signed heads of {len(nonces)} run segment(s) "
                                    f"(nonce {sorted(nonces)[0][:16]}...) that {peer}'s log does not hold: a removed "
                                    "or replaced log", party=peer, evidence=tuple(sorted(ev))[:10]))

    # -- runs --------------------------------------------------------------------------------

    def _runs(self) -> None:
        signed_runs: dict[str, set[str]] = {}
        for holder in self.logs.values():
            for cp, *_rest, run, _nonce, _at in holder.heads:
                signed_runs.setdefault(str(cp), set()).add(str(run))
        for log in self.logs.values():
            for seg in log.segments:
                for at, run, nonces in seg.runs:
                    for q, nonce in nonces.items():
                        other = self.logs.get(q)
                        if q == log.peer or other is None:
                            continue
                        if any(s.nonce == nonce for s in other.segments):
                            continue
                        if self.support.get(run, 0) < self.top:
                            continue  # this log binds a run the others do not: blamed through their evidence
                        if run in signed_runs.get(q, set()):
                            self.findings.append(_f("run_mismatch", other, [], f"{q}'s log holds no segment with the "
                                                    f"nonce run {run[:16]}... names for it, though {q} signed heads "
                                                    "of that run: a removed or replaced log", party=q,
                                                    evidence=(f"{log.peer}:{at}",)))
                        else:
                            self.findings.append(_f("run_mismatch", log, [at], f"run {run[:16]}... names nonce "
                                                    f"{nonce[:16]}... for '{q}', and {q}'s log holds no segment with "
                                                    f"it; nothing signed by {q} settles which log is wrong",
                                                    suspects=(log.peer, q)))

    # -- the close round's tail ---------------------------------------------------------------

    def _tails(self) -> None:
        if len(self.keys) < 2:
            return  # nobody can countersign in a one-peer deployment
        for log in self.logs.values():
            counter = sorted(self.countersigned.get(log.peer, ()))
            for i, seg in enumerate(log.segments):
                if seg.runs and len(seg.runs[-1][2]) < 2:
                    continue
                signed = [s for s in counter if seg.start_seq <= s <= seg.last_seq]
                last = signed[-1] if signed else seg.start_seq - 1
                if seg.last_disallowed_seq <= last:
                    continue
                span = (last + 1, seg.last_seq)
                nxt = log.segments[i + 1] if i + 1 < len(log.segments) else None
                if seg.crashed:
                    where = f"the crash recorded by the run_start at entry {nxt.start_seq}" if nxt else "the end of the log"
                    self.findings.append(_f("unsigned_tail", log, span, f"entries {span[0]}-{span[1]} of a segment that "
                                            f"ended in a crash ({where}) were countersigned by nobody: they are only "
                                            "hash-chained", severity="warning"))
                elif seg.close_missing is not None:
                    self.findings.append(_f("unsigned_tail", log, span, f"entries {span[0]}-{span[1]} were countersigned "
                                            f"by nobody: the close round was incomplete ({', '.join(seg.close_missing)} "
                                            "did not answer)", severity="warning"))
                else:
                    self.findings.append(_f("unsigned_tail", log, span, f"entries {span[0]}-{span[1]} come after the last "
                                            "head a counterparty countersigned, in a segment that closed normally: the "
                                            "close round would have countersigned them (rewritten, or no close round)",
                                            party=log.peer))

    # -- messages ----------------------------------------------------------------------------

    def _messages(self) -> None:
        keys: set[tuple[str, str, str]] = set()
        for log in self.logs.values():
            keys.update(log.streams)
        for sender, receiver, session in sorted(keys):
            a, b = self.logs.get(sender), self.logs.get(receiver)
            if a is None or b is None:
                known = a or b
                outsider = receiver if a is not None else sender
                if known is not None and outsider not in self.keys:
                    st = known.streams[(sender, receiver, session)]
                    self.findings.append(_f("missing_counterpart", known, [st.first_entry, st.last_entry],
                                            f"messages with '{outsider}', which is not a peer of the deployment: no log "
                                            "can confirm them, and the transport admits only the deployment's keys",
                                            party=known.peer))
                continue  # the other log is missing: reported as "cannot verify"
            sa = a.streams.get((sender, receiver, session))
            sb = b.streams.get((sender, receiver, session))
            if sa is not None and sb is not None and sb.refused == 0 and sa.count == sb.count \
                    and sa.total == sb.total:
                self.checks["messages_matched"] += sa.count
                continue
            self._reconcile(a, b, session, sa, sb)

    def _items(self, peer: str, session: str, pair: tuple[str, str],
               want: tuple[str, ...]) -> dict[Any, tuple[int, str, dict[str, Any]]]:
        """The entries of `peer`'s log for one session and (sender, receiver), by protocol seq; in the
        zero session (HELLOs, pre-session refusals: all seq 0) by digest instead."""
        out: dict[Any, tuple[int, str, dict[str, Any]]] = {}
        if self.reread is None:
            return out
        zero = session == ZERO_SESSION
        for at, event, data in self.reread(peer, session):
            if event not in want or type(data.get("seq")) is not int:
                continue
            sender = data.get("sender") if event != "refused" else data.get("counterparty")
            receiver = data.get("receiver") if event != "refused" else peer
            if (sender, receiver) != pair:
                continue
            out.setdefault((data["seq"], data.get("digest")) if zero else data["seq"], (at, event, data))
            if len(out) >= _SESSION_ITEMS_MAX:
                break
        return out

    def _seg_crashed(self, log: LogFacts, stream: Stream | None, run_of: Segment | None) -> bool:
        if stream is not None:
            return any(log.segments[i].crashed for i in stream.segments if i < len(log.segments))
        if run_of is not None and run_of.run:
            return any(s.crashed for s in log.segments if s.run == run_of.run)
        return bool(log.segments) and log.segments[-1].crashed

    def _reconcile(self, a: LogFacts, b: LogFacts, session: str, sa: Stream | None, sb: Stream | None) -> None:
        sender, receiver = a.peer, b.peer
        pair = (sender, receiver)
        zero = session == ZERO_SESSION
        sent = self._items(sender, session, pair, ("message_sent",))
        got = self._items(receiver, session, pair, ("message_received", "policy_denied", "refused"))
        matched = 0
        lost_rx: list[int] = []
        in_flight_rx: list[int] = []
        unsure_rx: list[int] = []
        differ: list[int] = []
        differ_ev: list[str] = []
        for n, (at, _ev, d) in sorted(sent.items()):
            other = got.get(n)
            if other is None:
                if not zero and sb is not None and sb.max_n > n:
                    lost_rx.append(at)
                elif d.get("kind") == "audit_receipt" or self._seg_crashed(b, sb, a.segment_of(at)):
                    in_flight_rx.append(at)
                else:
                    unsure_rx.append(at)
                continue
            _at2, ev2, d2 = other
            if ev2 == "message_received":
                same = all(d.get(k) == d2.get(k) for k in COMPARED_FIELDS)
            else:
                same = d2.get("digest") == d.get("digest")
            if same:
                matched += 1
            else:
                differ.append(other[0])
                differ_ev.append(f"{sender}:{at}")
        lost_tx: list[int] = []
        in_flight_tx: list[int] = []
        unsure_tx: list[int] = []
        for n, (at, _ev, _d) in sorted(got.items()):
            if n in sent:
                continue
            if not zero and sa is not None and sa.max_n > n:
                lost_tx.append(at)
            elif self._seg_crashed(a, sa, b.segment_of(at)):
                in_flight_tx.append(at)
            else:
                unsure_tx.append(at)
        self.checks["messages_matched"] += matched
        s12 = session[:12]
        if lost_rx:
            self.findings.append(_f("missing_counterpart", b, [], f"{len(lost_rx)} message(s) {sender} sent in session "
                                    f"{s12}... are missing from {receiver}'s log, which logs later messages of that "
                                    "session (a session delivers in order): left out by " + receiver,
                                    party=receiver, evidence=tuple(f"{sender}:{x}" for x in lost_rx[:10])))
        if lost_tx:
            self.findings.append(_f("missing_counterpart", a, [], f"{len(lost_tx)} message(s) {receiver} logged as received "
                                    f"in session {s12}... are missing from {sender}'s log, which logs later messages "
                                    "of that session: left out by " + sender, party=sender,
                                    evidence=tuple(f"{receiver}:{x}" for x in lost_tx[:10])))
        if in_flight_rx:
            self.findings.append(_f("in_flight", a, in_flight_rx, f"{len(in_flight_rx)} message(s) to {receiver} were "
                                    f"never logged by {receiver}, whose segment ended in a crash (or had left the close "
                                    "round): in flight, not tampering", severity="warning"))
        if in_flight_tx:
            self.findings.append(_f("in_flight", b, in_flight_tx, f"{len(in_flight_tx)} message(s) from {sender} are "
                                    f"not in {sender}'s log, whose segment ended in a crash: lost with its unsynced "
                                    "tail, not tampering", severity="warning"))
        if unsure_rx:
            self.findings.append(_f("missing_counterpart", a, unsure_rx, f"{len(unsure_rx)} message(s) {sender} logged as "
                                    f"sent to {receiver} have no entry in {receiver}'s log (same session and seq): "
                                    f"{sender} logged a send that did not happen, or {receiver} left it out",
                                    suspects=(sender, receiver)))
        if unsure_tx:
            self.findings.append(_f("missing_counterpart", b, unsure_tx, f"{len(unsure_tx)} message(s) {receiver} logged "
                                    f"as received from {sender} have no message_sent in {sender}'s log: {sender} sent "
                                    f"outside its gate, or {receiver} invented them", suspects=(sender, receiver)))
        if differ:
            self.findings.append(_f("digest_mismatch", b, differ, f"{len(differ)} message(s) from {sender} were logged "
                                    f"differently by {sender} and {receiver} (kind, size, shape or digest)",
                                    suspects=(sender, receiver), evidence=tuple(differ_ev[:10])))

    # -- metrics -----------------------------------------------------------------------------

    def _metrics(self) -> None:
        for holder in self.logs.values():
            for cp, epoch, values, run, at in holder.reported_metrics:
                own_log = self.logs.get(cp)
                if own_log is None:
                    continue
                self.checks["metrics_compared"] += 1
                own = own_log.own_metrics.get((run, epoch))
                if own is None or encode_value(own) != encode_value(values):
                    what = "records no epoch_metrics for that epoch" if own is None else "records other values"
                    self.findings.append(_f("metrics_mismatch", own_log, [], f"{cp} signed metrics for epoch {epoch} "
                                            f"(held by {holder.peer}), but its own log {what}: it told the coordinator "
                                            "one thing and logged another", party=cp, evidence=(f"{holder.peer}:{at}",)))
