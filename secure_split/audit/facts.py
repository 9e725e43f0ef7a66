"""What one peer's log says, reduced as it streams by: run segments, heads, message streams, metrics.

`FactCollector.accept` is called once per authentic entry, in chain order, by the scanner
(`chain.py`). It checks what one entry can break on its own or against the entries before it in
the same log (event schema, time, run binding, signatures, the close round's tail, protocol seqs)
and keeps, in memory bounded by peers x sessions x a window (not by the log's length), what the
other logs can confirm or contradict:

- per (sender, receiver, session): how many messages, an order-free sum of their facts, the
  highest protocol seq and the seqs skipped so far (a bounded set);
- its own signed checkpoints and the counterparty heads it holds (one per barrier: about 1% of
  entries), its segments and runs, its signed metrics statements, its flows for the policy pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from secure_split.audit.format import (
    CLOSE_TAIL_EVENTS,
    CLOSE_TAIL_KINDS,
    HEX64,
    HEX128,
    MESSAGE_EVENTS,
    OPEN_EVENTS,
    SCHEMAS,
    SIG_KEYS,
    TIME_FORMAT,
    compute_run_id,
    head_message,
    metrics_message,
)
from secure_split.audit.regions import signature_valid
from secure_split.audit.report import Finding, to_ranges
from secure_split.audit.sums import message_hash
from secure_split.errors import AuditError

ZERO_SESSION = "0" * 32
"""HELLO and pre-session REFUSE/ERROR are bound to this session with seq 0 (and may repeat)."""

HOLE_WINDOW = 256
"""Protocol seqs a stream may skip and fill later (a sender's threads may log slightly out of order)."""

_MASK = (1 << 64) - 1
_MESSAGE_FIELDS = SCHEMAS["message_sent"][0]
_INTS = frozenset({int})
_SAMPLE = 16  # entry seqs kept per finding-in-the-making
_REASONS_KEPT = 32  # distinct format problems described per log
_GAPS_KEPT = 64  # skipped protocol seq ranges kept per stream (a finding lists the first 8)


def _tail_kind(kind: Any) -> bool:
    """True for a message kind the close round's tail may hold (any JSON value may stand in a log)."""
    return type(kind) is str and kind in CLOSE_TAIL_KINDS


@dataclass
class Segment:
    """One run segment of a log: the entries one writer process appended, from its run_start on.

    Attributes:
        index: 0 for the file's first segment.
        start_seq: seq of its run_start.
        nonce: its run nonce.
        policy_hash: the policy hash its run_start names.
        deployment_hash: the deployment hash its run_start names.
        previous: run_start's `previous` (how the segment before it ended), None for the first.
        runs: (seq, run id, nonces) of each run_bound, in order.
        last_seq: seq of its last entry.
        run_end_seq: seq of its run_end (-1: none: it crashed).
        status: run_end's status.
        close_missing: peers close_incomplete named (None: no close_incomplete).
        final: its last entry is a checkpoint after run_end (the close round finished).
        last_disallowed_seq: seq of its last entry that the close round's tail may not hold.
        checkpoints: seqs of its own valid checkpoints.
    """

    index: int
    start_seq: int
    nonce: str
    policy_hash: str
    deployment_hash: str
    previous: Any
    runs: list[tuple[int, str, dict[str, str]]] = field(default_factory=list)
    last_seq: int = -1
    run_end_seq: int = -1
    status: str = ""
    close_missing: list[str] | None = None
    final: bool = False
    last_disallowed_seq: int = -1
    checkpoints: list[int] = field(default_factory=list)
    tainted: bool = False  # the chain breaks inside it: its run binding may be among the lost entries
    deferred: list[tuple[int, str, str]] = field(default_factory=list)  # checkpoints to settle at its end
    candidate_runs: set[str] = field(default_factory=set)

    @property
    def run(self) -> str:
        """The run id in force at the segment's end ("" when never bound)."""
        return self.runs[-1][1] if self.runs else ""

    @property
    def crashed(self) -> bool:
        """True when the segment did not finish its close round (no run_end or no final checkpoint)."""
        return self.run_end_seq < 0 or not self.final


@dataclass
class Stream:
    """The messages of one (sender, receiver, session) as one log saw them."""

    count: int = 0
    total: int = 0  # sum of hash(facts) mod 2^64: order-free, so a slightly reordered log still agrees
    refused: int = 0
    refused_total: int = 0
    max_n: int = 0
    holes: set[int] = field(default_factory=set)
    far_gaps: list[tuple[int, int]] = field(default_factory=list)
    duplicates: list[int] = field(default_factory=list)  # entry seqs naming a protocol seq seen before
    first_entry: int = -1
    last_entry: int = -1
    segments: set[int] = field(default_factory=set)


@dataclass
class LogFacts:
    """What one peer's log says that other logs can confirm or contradict (see module docstring)."""

    peer: str
    file: str
    last_seq: int = -1
    segments: list[Segment] = field(default_factory=list)
    streams: dict[tuple[str, str, str], Stream] = field(default_factory=dict)
    # own checkpoints: seq -> (entry hash, signature, valid, run, nonce)
    checkpoints: dict[int, tuple[str, str, bool, str, str]] = field(default_factory=dict)
    # counterparty heads held: (counterparty, seq, head, signature, key, run, nonce, entry seq)
    heads: list[tuple[Any, ...]] = field(default_factory=list)
    own_metrics: dict[tuple[str, int], Any] = field(default_factory=dict)  # (run, epoch) -> values
    # counterparty metrics held: (counterparty, epoch, values, run, entry seq)
    reported_metrics: list[tuple[str, int, Any, str, int]] = field(default_factory=list)
    flows: dict[tuple[Any, ...], list[Any]] = field(default_factory=dict)  # flow -> [count, sample seqs]
    message_times: tuple[str, str] = ("", "")
    policy_mismatch: dict[str, list[int]] = field(default_factory=dict)  # other policy hash -> sample seqs
    policy_mismatch_count: int = 0

    def segment_of(self, seq: int) -> Segment | None:
        """The segment entry `seq` belongs to."""
        found = None
        for seg in self.segments:
            if seg.start_seq <= seq:
                found = seg
            else:
                break
        return found


class FactCollector:
    """Checks each authentic entry of one log in order and keeps its `LogFacts` (see module docstring)."""

    def __init__(self, peer: str, file: str, deployment_hash: str, keys: dict[str, str],
                 found: Any, *, own_only: bool = False) -> None:
        """Args: the log's peer and file, the deployment's hash and keys, `found(Finding)`, and whether
        only the owner's key is known (statements of others are then not checked)."""
        self.own_only = own_only
        self.peer = peer
        self.file = file
        self.dep = deployment_hash
        self.keys = keys
        self.own_key = keys.get(peer, "")
        self.facts = LogFacts(peer, file)
        self._found = found
        self.seg: Segment | None = None
        self._last_time = ""
        self._time_bad: list[int] = []
        self._time_bad_count = 0
        self._time_back: list[int] = []
        self._time_back_count = 0
        self._malformed: dict[str, list[int]] = {}
        self._first_time = "~"
        self._msg_last_time = ""
        self._nonces: dict[str, str] = {}

    # -- findings --------------------------------------------------------------------------

    def finding(self, kind: str, seqs: Any, message: str, *, severity: str = "error",
                evidence: tuple[str, ...] = ()) -> None:
        """Report a finding about this log, attributed to its owner when it is an error."""
        party = self.peer if severity == "error" else ""
        self._found(Finding(kind, self.peer, self.file, to_ranges(seqs), message, severity, evidence, party))

    def malformed(self, seq: int, why: str) -> None:
        """Collect a format problem; one finding per distinct problem at the end (at most
        `_REASONS_KEPT` distinct ones: a hostile log may vary them with every line)."""
        if why not in self._malformed and len(self._malformed) >= _REASONS_KEPT:
            why = f"format problems of yet other kinds (only the first {_REASONS_KEPT} kinds are described)"
        seqs = self._malformed.setdefault(why, [])
        if len(seqs) < _SAMPLE:
            seqs.append(seq)
        else:
            seqs[-1] = seq  # keep the latest as the last sample

    # -- per entry ---------------------------------------------------------------------------

    def accept(self, entry: dict[str, Any], seq: int, entry_hash: str) -> None:
        """Check one authentic entry (in chain order) and keep its facts."""
        event = entry["event"]
        data = entry["data"]
        t = entry["time"]
        seg = self.seg
        last = self._last_time
        # The common case first: a message entry, in a segment still running, its time in the same
        # second as the entry before (so only the microseconds need checking) or a valid later one.
        if (event == "message_sent" or event == "message_received") and seg is not None and seg.run_end_seq < 0 \
                and type(data) is dict and data.keys() == _MESSAGE_FIELDS and type(t) is str and len(t) == 27 \
                and t >= last and entry["policy"] == seg.policy_hash \
                and ((t[:20] == last[:20] and t[26] == "Z" and t[20:26].isascii() and t[20:26].isdigit())
                     or TIME_FORMAT.fullmatch(t)):
            self._last_time = t
            seg.last_seq = seq
            self.facts.last_seq = seq
            if not _tail_kind(data["kind"]):
                seg.last_disallowed_seq = seq
            seg.final = False
            self._message(event, data, seq, t)
            return
        if type(t) is not str or not TIME_FORMAT.fullmatch(t):
            self._time_bad_count += 1
            if len(self._time_bad) < _SAMPLE:
                self._time_bad.append(seq)
        else:
            if t < self._last_time:
                self._time_back_count += 1
                if len(self._time_back) < _SAMPLE:
                    self._time_back.append(seq)
            self._last_time = t
        schema = SCHEMAS.get(event)
        if schema is None or type(data) is not dict:
            self.malformed(seq, f"unknown event {event!r} or data not an object")
            return
        required, optional = schema
        keys = data.keys()
        if keys != required and not (keys >= required and (event in OPEN_EVENTS or keys <= required | optional)):
            self.malformed(seq, f"{event} entries carry exactly the fields {sorted(required | optional)} "
                                f"(FORMAT.md §5); this one has {sorted(keys)}")
            return
        if event == "run_start":
            self._run_start(data, seq)
            seg = self.seg
        elif seg is None:
            self.malformed(seq, "a log and each of its segments begin with run_start")
            return
        assert seg is not None
        seg.last_seq = seq
        self.facts.last_seq = seq
        if entry["policy"] != seg.policy_hash:
            self.facts.policy_mismatch_count += 1
            sample = self.facts.policy_mismatch.setdefault(str(entry["policy"]), [])
            if len(sample) < _SAMPLE:
                sample.append(seq)
        if event not in CLOSE_TAIL_EVENTS and not (event in MESSAGE_EVENTS and _tail_kind(data.get("kind"))):
            seg.last_disallowed_seq = seq
            if seg.run_end_seq >= 0 and event != "run_start":
                self.malformed(seq, "after run_end a segment holds only the close round's entries "
                                    "(counterparty_head, close_incomplete, checkpoint)")
        seg.final = False
        if event == "message_sent" or event == "message_received":
            self._message(event, data, seq, t)
        elif event == "checkpoint":
            self._checkpoint(entry, seq, entry_hash)
        elif event == "counterparty_head":
            self._counterparty_head(data, seq)
        elif event == "policy_denied" or event == "refused":
            self._refusal(event, data, seq)
        elif event == "run_bound":
            self._run_bound(data, seq)
        elif event == "epoch_metrics":
            if type(data["epoch"]) is int and type(data["values"]) is dict:
                self.facts.own_metrics[(seg.run, data["epoch"])] = data["values"]
        elif event == "counterparty_metrics":
            self._counterparty_metrics(data, seq)
        elif event == "run_end":
            if seg.run_end_seq >= 0:
                self.malformed(seq, "a second run_end in one segment")
            seg.run_end_seq = seq
            seg.status = str(data["status"])
        elif event == "close_incomplete":
            missing = data["missing"]
            seg.close_missing = [str(m) for m in missing] if type(missing) is list else []

    def taint(self) -> None:
        """The chain breaks in the current segment (entries modified or deleted): its run binding may
        be among them, so checkpoints that do not verify under the binding in force are settled at the
        segment's end against every run id the segment names."""
        if self.seg is not None:
            self.seg.tainted = True

    def _settle(self, seg: Segment) -> None:
        for seq, entry_hash, signature in seg.deferred:
            for run in sorted(seg.candidate_runs | {r for _a, r, _n in seg.runs} | {""}):
                msg = head_message(self.peer, seq, entry_hash, self.dep, run=run, nonce=seg.nonce)
                if HEX128.fullmatch(signature) and signature_valid(self.own_key, msg, signature):
                    self.facts.checkpoints[seq] = (entry_hash, signature, True, run, seg.nonce)
                    seg.checkpoints.append(seq)
                    if seq == seg.last_seq and seg.run_end_seq >= 0:
                        seg.final = True
                    break
            else:
                self.finding("forged_signature", [seq], f"checkpoint {seq} does not verify with {self.peer}'s key "
                                                        "(over its head, run and nonce): rewritten or forged")
        seg.deferred.clear()
        seg.checkpoints.sort()

    def adopt_run_start(self, entry: Any, seq: int) -> None:
        """Open a segment from a run_start the chain shows modified (reported as such): its nonce is
        still what the segment's later signatures bind."""
        data = entry.get("data") if isinstance(entry, dict) else None
        if type(data) is not dict:
            return
        self._run_start({"nonce": data.get("nonce"), "deployment_hash": data.get("deployment_hash", self.dep),
                         "policy_hash": data.get("policy_hash", entry.get("policy")), "previous": data.get("previous")},
                        seq, quiet=True)

    def _run_start(self, data: dict[str, Any], seq: int, *, quiet: bool = False) -> None:
        prev_seg = self.seg
        if prev_seg is not None:
            self._settle(prev_seg)
        nonce = data["nonce"]
        if type(nonce) is not str or not HEX64.fullmatch(nonce):
            self.malformed(seq, "run_start's nonce must be 64 lowercase hex digits")
            nonce = ""
        if quiet:
            pass
        elif data["deployment_hash"] != self.dep:
            self.finding("run_mismatch", [seq], f"run_start names deployment {str(data['deployment_hash'])[:16]}..., "
                                                f"not the deployment verified ({self.dep[:16]}...)")
        previous = data["previous"]
        if quiet:
            pass
        elif prev_seg is None:
            if previous is not None:
                self.malformed(seq, "the file's first run_start names a previous segment")
        elif type(previous) is not dict or previous.get("seq") != seq - 1 \
                or previous.get("closed") != (not prev_seg.crashed):
            self.malformed(seq, "run_start's previous must name the seq before it and whether that segment "
                                "closed (closed: true only after run_end and the final checkpoint)")
        self.seg = Segment(index=len(self.facts.segments), start_seq=seq, nonce=nonce,
                           policy_hash=str(data["policy_hash"]), deployment_hash=str(data["deployment_hash"]),
                           previous=previous, last_seq=seq)
        self.facts.segments.append(self.seg)
        self._nonces = {}

    def _run_bound(self, data: dict[str, Any], seq: int) -> None:
        seg = self.seg
        assert seg is not None
        run_id, nonces = data["run_id"], data["nonces"]
        try:
            expected = compute_run_id(self.dep, seg.policy_hash, nonces)
        except AuditError as exc:
            self.malformed(seq, f"run_bound: {exc}")
            return
        if run_id != expected or nonces.get(self.peer) != seg.nonce:
            self.finding("run_mismatch", [seq], "run_bound names a run id that is not the hash of its nonces, "
                                                "or nonces without this segment's own nonce")
            return
        seg.runs.append((seq, run_id, dict(nonces)))
        self._nonces = dict(nonces)

    def _checkpoint(self, entry: dict[str, Any], seq: int, entry_hash: str) -> None:
        seg = self.seg
        assert seg is not None
        sig = entry.get("sig")
        if type(sig) is not dict or sig.keys() != SIG_KEYS or type(sig["key"]) is not str \
                or type(sig["signature"]) is not str:
            self.finding("forged_signature", [seq], "checkpoint without a valid sig object "
                                                    "(exactly {key, signature}, both strings)")
            return
        key, signature = sig["key"], sig["signature"]
        if key != self.own_key:
            owner = next((p for p, k in self.keys.items() if k == key), None)
            who = f"the key of peer '{owner}'" if owner else "a key that is not in the deployment"
            self.finding("unknown_key", [seq], f"checkpoint {seq} is signed with {who}, not {self.peer}'s key")
            return
        run = seg.run
        valid = bool(HEX128.fullmatch(signature)) and signature_valid(
            key, head_message(self.peer, seq, entry_hash, self.dep, run=run, nonce=seg.nonce), signature)
        if not valid and seg.tainted and len(seg.deferred) < 4096:
            seg.deferred.append((seq, entry_hash, signature))
        elif not valid:
            self.finding("forged_signature", [seq], f"checkpoint {seq} does not verify with {self.peer}'s key "
                                                    "(over its head, run and nonce): rewritten or forged")
        self.facts.checkpoints[seq] = (entry_hash, signature, valid, run, seg.nonce)
        if valid:
            seg.checkpoints.append(seq)
            seg.final = seg.run_end_seq >= 0

    def _counterparty_head(self, data: dict[str, Any], seq: int) -> None:
        seg = self.seg
        assert seg is not None
        cp, run, nonce = data["counterparty"], data["run_id"], data["nonce"]
        if seg.tainted and (not seg.runs or run != seg.run) and type(run) is str:
            seg.candidate_runs.add(run)  # its run_bound may be among the entries lost: judged by the heads' owner
        elif not seg.runs and run == "":
            pass  # both unbound (a failed start): the head binds the signer's nonce, checked against its log
        elif not seg.runs or run != seg.run or (type(cp) is str and self._nonces.get(cp) != nonce):
            self.finding("run_mismatch", [seq],
                         f"a head of '{cp}' recorded for run {str(run)[:16]}... (nonce {str(nonce)[:12]}...) while "
                         f"this segment is bound to run {seg.run[:16] or '(none)'}...: the writer refuses such a head, "
                         "so it was put here by hand (a replayed head)")
            return
        # (A head whose fields are not strings is kept too: the cross-peer pass blames its holder.)
        self.facts.heads.append((cp, data["seq"], data["head"], data["signature"], data["key"], run, nonce, seq))

    def _counterparty_metrics(self, data: dict[str, Any], seq: int) -> None:
        seg = self.seg
        assert seg is not None
        cp, epoch, values, run = data["counterparty"], data["epoch"], data["values"], data["run_id"]
        if (not seg.runs or run != seg.run) and not seg.tainted:
            self.finding("run_mismatch", [seq], f"metrics of '{cp}' recorded for another run than this segment's")
            return
        key = self.keys.get(cp) if isinstance(cp, str) else None
        if key is None and self.own_only:
            return
        if key is None or data["key"] != key or type(epoch) is not int or type(values) is not dict \
                or type(data["signature"]) is not str or not signature_valid(
                    key, metrics_message(cp, epoch, values, self.dep, run=run), data["signature"]):
            self.finding("forged_signature", [seq], f"metrics attributed to '{cp}' carry no valid signature of "
                                                    f"'{cp}': the writer records only verified statements")
            return
        self.facts.reported_metrics.append((cp, epoch, values, run, seq))

    def _stream(self, sender: Any, receiver: Any, session: Any, seq: int) -> Stream | None:
        if type(sender) is not str or type(receiver) is not str or type(session) is not str:
            self.malformed(seq, "a message's sender, receiver and session must be strings")
            return None
        key = (sender, receiver, session)
        s = self.facts.streams.get(key)
        if s is None:
            s = self.facts.streams[key] = Stream(first_entry=seq)
        s.last_entry = seq
        s.segments.add(self.seg.index if self.seg is not None else 0)
        return s

    def _protocol_seq(self, s: Stream, n: int, session: str, seq: int) -> None:
        if session == ZERO_SESSION:
            return
        if n > s.max_n:
            if n - s.max_n - 1 > HOLE_WINDOW:
                if len(s.far_gaps) < _GAPS_KEPT:
                    s.far_gaps.append((s.max_n + 1, n - 1))
            else:
                s.holes.update(range(s.max_n + 1, n))
                if len(s.holes) > HOLE_WINDOW:  # the oldest holes are gaps for good
                    for low in sorted(s.holes)[: len(s.holes) - HOLE_WINDOW]:
                        s.holes.discard(low)
                        if len(s.far_gaps) < _GAPS_KEPT:
                            s.far_gaps.append((low, low))
            s.max_n = n
        elif n in s.holes:
            s.holes.discard(n)
        elif len(s.duplicates) < _SAMPLE * 4:
            s.duplicates.append(seq)

    def _message(self, event: str, d: dict[str, Any], seq: int, t: str) -> None:
        sender, receiver, n = d["sender"], d["receiver"], d["seq"]
        if (sender if event == "message_sent" else receiver) != self.peer:
            self.malformed(seq, f"{event} in the log of '{self.peer}' names another peer on its side")
            return
        if type(n) is not int or n < 0:
            self.malformed(seq, "a message's protocol seq must be a non-negative integer")
            return
        shape = d["shape"]
        batch = d["batch_size"]
        if type(d["step"]) is not int or type(d["nbytes"]) is not int or not 0 <= d["nbytes"] < 2**63 \
                or (batch is not None and type(batch) is not int) \
                or (shape is not None and (type(shape) is not list or not {*map(type, shape)} <= _INTS)):
            self.malformed(seq, "a message's step, nbytes, batch_size and shape are integers (canonical form: "
                                "never a float such as 112.0)")
        session = d["session"]
        s = self.facts.streams.get((sender, receiver, session)) \
            if type(sender) is str and type(receiver) is str and type(session) is str else None
        if s is None:
            s = self._stream(sender, receiver, session, seq)
            if s is None:
                return
        s.last_entry = seq
        seg_index = self.seg.index if self.seg is not None else 0
        if seg_index not in s.segments:
            s.segments.add(seg_index)
        kind, edge, nbytes, dtype = d["kind"], d["edge"], d["nbytes"], d["dtype"]
        shape_t = tuple(shape) if type(shape) is list else shape
        try:
            s.total = (s.total + message_hash(n, d["step"], d["digest"], kind, edge, nbytes, dtype, shape_t, batch)) \
                & _MASK
        except TypeError:
            self.malformed(seq, "a message's facts must be scalars (and a list for shape)")
            return
        s.count += 1
        if n == s.max_n + 1:
            s.max_n = n  # the common case: the next protocol seq
        else:
            self._protocol_seq(s, n, session, seq)
        flow = (event, sender, receiver, kind, edge, nbytes, dtype, shape_t, batch)
        f = self.facts.flows.get(flow)
        if f is None:
            self.facts.flows[flow] = [1, [seq]]
        else:
            f[0] += 1
            if len(f[1]) < _SAMPLE:
                f[1].append(seq)
        if type(t) is not str:
            return  # reported as time_order
        if t < self._first_time:
            self._first_time = t
        if t > self._msg_last_time:
            self._msg_last_time = t

    def _refusal(self, event: str, d: dict[str, Any], seq: int) -> None:
        if d["direction"] != "receive" or d.get("seq") is None or d.get("session") is None:
            return  # an outbound denial consumes no seq; a refusal before the header names no message
        sender = d["sender"] if event == "policy_denied" else d["counterparty"]
        n, digest = d["seq"], d.get("digest")
        if type(n) is not int or n < 0:
            self.malformed(seq, "a refusal's protocol seq must be a non-negative integer or null")
            return
        s = self._stream(sender, self.peer, d["session"], seq)
        if s is None:
            return
        try:
            s.refused_total = (s.refused_total + hash((n, digest))) & _MASK
        except TypeError:
            self.malformed(seq, "a refusal's digest must be a string or null")
            return
        s.refused += 1
        self._protocol_seq(s, n, d["session"], seq)

    # -- the end -----------------------------------------------------------------------------

    def finish(self) -> LogFacts:
        """Report what can only be judged at the end of the log, and return its facts."""
        if self.seg is not None:
            self._settle(self.seg)
        for why, seqs in self._malformed.items():
            self.finding("malformed", seqs, why)
        if self._time_bad_count:
            self.finding("time_order", self._time_bad, f"{self._time_bad_count} entr(y/ies) with a time that is "
                         "not RFC 3339 UTC (YYYY-MM-DDTHH:MM:SS.ffffffZ)", severity="warning")
        if self._time_back_count:
            self.finding("time_order", self._time_back, f"{self._time_back_count} entr(y/ies) dated before the "
                         "entry above them (the writer's clock went back)", severity="warning")
        if self.facts.policy_mismatch_count:
            seqs = [s for v in self.facts.policy_mismatch.values() for s in v]
            self.finding("run_mismatch", seqs, f"{self.facts.policy_mismatch_count} entr(y/ies) carry another policy "
                                               "hash than their segment's run_start")
        for (sender, receiver, session), s in self.facts.streams.items():
            skipped = [(h, h) for h in sorted(s.holes)] + s.far_gaps
            if skipped:
                shown = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in skipped[:8])
                self.finding("message_gap", [s.first_entry, s.last_entry],
                             f"messages {sender} -> {receiver} of session {session[:12]}...: protocol seqs {shown} "
                             f"are never logged, though later ones are (a session delivers each seq in order, "
                             "and the gate logs every message it sends, receives or refuses)")
            if s.duplicates:
                self.finding("duplicate_message", s.duplicates,
                             f"entries naming a message {sender} -> {receiver} (same session and protocol seq) that an "
                             "earlier entry of this log already names")
        if self._msg_last_time:
            self.facts.message_times = (self._first_time, self._msg_last_time)
        return self.facts
