"""Verify one peer's log on its own, streaming: hash chain, seq order, canonical encoding, signatures.

One pass, memory bounded by a window (not by the log's length):

1. lines are read in blocks (`iter_lines`); a line longer than `MAX_LINE_BYTES` is skipped
   without being held, and bytes after the last newline are a torn tail;
2. each line is hashed over its raw bytes, parsed, and checked for the canonical encoding
   (`encoding.canonical_problem`). A line whose (seq, prev) is (last seq + 1, last hash) is
   intact and handed at once to the `FactCollector` (facts.py), which checks what depends on the
   entries before it and keeps what other logs can confirm;
3. where the chain breaks, lines are buffered (at most `REGION_LINES`; runs of lines that are not
   entries at all are counted, not kept) until two lines link again, and the region is diagnosed
   by `regions.diagnose_region`: modified, deleted, reordered, duplicated, inserted, with entry
   numbers. Its authentic lines then go to the collector in seq order.

Nothing here imports torch or tenseal; signatures go through `secure_split.crypto.keys` (PyNaCl).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from secure_split.audit.encoding import JSONDecodeError, canonical_problem, encode_entry, parse, value_problem
from secure_split.audit.facts import FactCollector, LogFacts
from secure_split.audit.format import (
    CHECKPOINT_KEYS,
    ENTRY_KEYS,
    EVENTS,
    FORMAT_VERSION,
    HEX64,
    HEX128,
    MAX_LINE_BYTES,
    MESSAGE_EVENTS,
    genesis_hash,
    head_message,
)
from secure_split.audit.hotloop import feed_block
from secure_split.audit.reading import LineReader
from secure_split.audit.regions import LineInfo, diagnose_region, paused_gc, signature_valid
from secure_split.audit.report import MAX_FINDINGS, FileReport, Finding, format_ranges, to_ranges
from secure_split.errors import AuditError

REGION_LINES = 4096
"""Most lines of one broken region kept for its diagnosis; past it the region is judged as it stands."""

GARBAGE_KEPT = 8
"""Lines of a run of non-entries kept for the diagnosis (the rest of the run is only counted)."""

_SHA256 = hashlib.sha256


@dataclass
class VerifyContext:
    """What verifying a peer's log needs to know: the deployment hash and the peers' keys.

    Attributes:
        deployment_hash: the deployment every log must belong to.
        keys: peer name -> Ed25519 public key (hex), from the deployment.
        cache_lines: keep each parsed line by its bytes, so verifying many variants of one log
            (mutation tests) parses each distinct line once. Off for a normal verification.
        own_only: the writer checking its own log before continuing it: it knows only its own key,
            so statements of other peers (their signed metrics) are not checked here.
    """

    deployment_hash: str
    keys: Mapping[str, str]
    cache_lines: bool = False
    own_only: bool = False
    _cache: dict[bytes, tuple[str, Any, str | None, str | None]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_deployment(cls, deployment: Any, *, cache_lines: bool = False) -> VerifyContext:
        """Build the context from a loaded `Deployment` (its hash and every peer's sign_key)."""
        keys = {name: p.sign_key for name, p in deployment.spec.peers.items()}
        return cls(deployment_hash=deployment.hash, keys=keys, cache_lines=cache_lines)


class LogScanner:
    """Verify one peer's log line by line (see module docstring); `feed` each line, then `finish`."""

    def __init__(self, peer: str, context: VerifyContext, file: str = "") -> None:
        """Args: whose log, the deployment context, the file name findings name."""
        self.peer = peer
        self.file = file or f"{peer}.jsonl"
        self.ctx = context
        self.findings: list[Finding] = []
        self.suppressed = 0
        self.collector = FactCollector(peer, self.file, context.deployment_hash, dict(context.keys), self._add,
                                       own_only=context.own_only)
        self.lines = 0
        self.entries = 0
        self.seq = -1
        self.head = ""  # the hash the next entry's prev must be ("" until the genesis is known)
        self.last_hash = ""
        self._region: list[LineInfo] = []
        self._anomaly_at = -1  # index in _region of its last anomaly
        self._garbage_run = 0  # lines of the current run of non-entries
        self._garbage_from = 0
        self._garbage_ranges: list[tuple[int, int]] = []
        self._garbage_total = 0
        self._cache = context._cache if context.cache_lines else None
        self._overlong: list[tuple[int, int]] = []
        self._pending: LineInfo | None = None
        self._region_start: tuple[str, int] = ("", 0)

    def _add(self, finding: Finding) -> None:
        if len(self.findings) < MAX_FINDINGS:
            self.findings.append(finding)
        else:
            self.suppressed += 1

    def found(self, kind: str, seqs: Any, message: str, severity: str = "error") -> None:
        """Report a per-file finding about this log (errors are attributed to its owner)."""
        self._add(Finding(kind, self.peer, self.file, to_ranges(seqs), message, severity, (),
                          self.peer if severity == "error" else ""))

    def overlong(self, line_no: int, length: int) -> None:
        """A line over `MAX_LINE_BYTES` (called by the reader; the line itself is never held)."""
        if len(self._overlong) < 16:
            self._overlong.append((line_no, length))

    # -- parsing -------------------------------------------------------------------------------

    def _parse(self, line: bytes, parsed: dict[str, Any] | None = None) -> tuple[str, Any, str | None, str | None]:
        """(entry hash, parsed entry or None, structural problem, encoding problem); `parsed` is
        `parse(line)` when the caller has it already."""
        cache = self._cache
        if cache is not None:
            hit = cache.get(line)
            if hit is not None:
                return hit
        h = _SHA256(line).hexdigest()
        out: tuple[str, Any, str | None, str | None]
        try:
            entry = parse(line) if parsed is None else parsed
        except JSONDecodeError:
            out = (h, None, "not a JSON entry (invalid UTF-8 or JSON)", None)
        else:
            if type(entry) is not dict:
                out = (h, None, "not a JSON object", None)
            else:
                canon = canonical_problem(line, entry)
                event = entry.get("event")
                if canon is None and not (type(event) is str and event in MESSAGE_EVENTS):
                    canon = value_problem(entry)
                problem = None
                keys = entry.keys()
                if keys != ENTRY_KEYS:
                    if keys == CHECKPOINT_KEYS:
                        body = {k: v for k, v in entry.items() if k != "sig"}
                        try:
                            h = _SHA256(encode_entry(body)).hexdigest()
                        except TypeError:
                            problem = "holds a value canonical JSON cannot express"
                    else:
                        problem = f"keys {sorted(map(str, keys))} are not the entry keys {sorted(ENTRY_KEYS)}"
                out = (h, entry, problem, canon)
        if cache is not None:
            cache[line] = out
        return out

    def _info(self, line: bytes, parsed: dict[str, Any] | None = None) -> LineInfo:
        n = self.lines
        h, entry, problem, canon = self._parse(line, parsed)
        if entry is None:
            return LineInfo(-1, "", h, "", problem, False, None, n)
        seq, prev, event = entry.get("seq"), entry.get("prev"), entry.get("event")
        if type(seq) is not int or seq < 0:
            seq, problem = -1, problem or "seq is not a non-negative integer"
        if type(prev) is not str:
            prev, problem = "", problem or "prev is not a string"
        if type(event) is not str or event not in EVENTS:
            event, problem = "", problem or f"unknown event {str(event)[:40]!r}"
        if problem is None:
            if entry["peer"] != self.peer:
                problem = f"entry names peer {str(entry['peer'])[:40]!r} in the log of {self.peer!r}"
            elif entry["v"] != FORMAT_VERSION or type(entry["v"]) is not int:
                problem = f"format version {str(entry['v'])[:12]!r}, expected {FORMAT_VERSION}"
            elif type(entry["policy"]) is not str:
                problem = "policy is not a string"
            elif "sig" in entry and event != "checkpoint":
                problem = f"a {event!r} entry carries a signature; only checkpoints do"
        return LineInfo(seq, prev, h, event, problem, event == "checkpoint", entry, n, canon)

    def _genesis_of(self, info: LineInfo) -> str:
        """The genesis hash a first entry implies (from its run_start nonce), or "" when it has none."""
        e = info.entry
        if e is None or info.event != "run_start" or type(e.get("data")) is not dict:
            return ""
        nonce = e["data"].get("nonce")
        if type(nonce) is not str or not HEX64.fullmatch(nonce):
            return ""
        return genesis_hash(self.peer, self.ctx.deployment_hash, nonce)

    # -- feeding -------------------------------------------------------------------------------

    def feed(self, line: bytes, parsed: dict[str, Any] | None = None) -> None:
        """Verify the next complete line (`parsed`: `parse(line)` when the caller has it already)."""
        self.lines += 1
        info = self._info(line, parsed) if line and line[0] == 0x7B else None
        if info is None or info.entry is None:  # not an entry at all: part of a run of garbage
            if self._garbage_run == 0:
                self._garbage_from = self.lines
            self._garbage_run += 1
            if self._garbage_run > GARBAGE_KEPT:
                return
            self._step(info or LineInfo(-1, "", _SHA256(line).hexdigest(), "", "not a JSON entry", False, None,
                                        self.lines))
            return
        if self._garbage_run:
            self._end_garbage_run()
        self._step(info)

    def _end_garbage_run(self) -> None:
        # A short run was handed to the region diagnosis line by line; a long one is a range of junk.
        if self._garbage_run > GARBAGE_KEPT:
            self._garbage_total += self._garbage_run
            if len(self._garbage_ranges) < 16:
                self._garbage_ranges.append((self._garbage_from, self._garbage_from + self._garbage_run - 1))
        self._garbage_run = 0

    def _step(self, info: LineInfo) -> None:
        region = self._region
        if not region:
            if self.lines == 1 or (self.seq < 0 and not self.head):
                self.head = self._genesis_of(info) if info.seq == 0 else ""
            if info.seq == self.seq + 1 and info.prev == self.head and self.head:
                if self._pending is not None:
                    self._accept(self._pending)
                self._pending = info
                self.seq, self.head = info.seq, info.hash
                return
            # The chain breaks here: a region, from the last line that linked (not yet accepted).
            pending = self._pending
            if pending is not None:
                self._region = [pending, info]
                self._region_start = (pending.prev, pending.seq)
                self._pending = None
            else:
                self._region = [info]
                self._region_start = (self.head, self.seq + 1)
            self._anomaly_at = len(self._region) - 1
            return
        before = region[-1]
        links = info.seq >= 0 and before.seq >= 0 and info.seq == before.seq + 1 and info.prev == before.hash
        region.append(info)
        if not links:
            self._anomaly_at = len(region) - 1
        elif len(region) - 1 - self._anomaly_at >= 2:
            self._close_region()
            return
        if len(region) >= REGION_LINES:
            self._anomaly_at = len(region) - 1
            self._close_region()

    def _signed_end(self, info: LineInfo) -> tuple[str, int] | None:
        """(hash, seq) of a region's last line when it is a checkpoint whose signature holds, else None."""
        seg = self.collector.seg
        sig = info.entry.get("sig") if info.entry is not None else None
        if seg is None or not info.checkpoint or info.seq < 0 or type(sig) is not dict:
            return None
        key, signature = sig.get("key"), sig.get("signature")
        if key != self.ctx.keys.get(self.peer) or type(signature) is not str or not HEX128.fullmatch(signature):
            return None
        runs = {seg.run} | {r for _, r, _ in seg.runs} | {""}
        for run in runs:
            msg = head_message(self.peer, info.seq, info.hash, self.ctx.deployment_hash, run=run, nonce=seg.nonce)
            if signature_valid(str(key), msg, signature):
                return info.hash, info.seq
        return None

    def _accept(self, info: LineInfo) -> None:
        """Hand an authentic line to the collector (a line that breaks the format is reported instead)."""
        self.entries += 1
        if info.problem is not None or info.entry is None:
            self.found("malformed", [info.seq] if info.seq >= 0 else [], f"line {info.line_no}: {info.problem}")
            return
        if info.canon is not None:
            self.found("malformed", [info.seq], f"line {info.line_no}: {info.canon}")
        self.collector.accept(info.entry, info.seq, info.hash)

    def _close_region(self) -> None:
        """Diagnose the buffered region; the lines after its last anomaly link and continue the chain."""
        region = self._region
        hi = self._anomaly_at
        prev_start, seq_start = self._region_start
        if seq_start == 0 and not prev_start:
            for info in region[: hi + 1]:
                if info.seq == 0 and (g := self._genesis_of(info)) and info.prev == g:
                    prev_start = g
                    break
            else:
                prev_start = "-"
        tail = (region[hi + 1].prev, region[hi + 1].seq - 1) if hi + 1 < len(region) else self._signed_end(region[hi])
        verdict = diagnose_region(region, 0, hi, prev_start, seq_start, tail)
        line_of = [info.line_no for info in region]
        for s, (_p, how) in sorted(verdict.modified.items()):
            self.found("modified", [s], f"entry {s} was changed after it was written: {how}")
        if verdict.deleted:
            missing = sum(b - a + 1 for a, b in verdict.deleted)
            self._add(Finding("deleted", self.peer, self.file, tuple(verdict.deleted),
                              f"{missing} entr{'y is' if missing == 1 else 'ies are'} missing between lines "
                              f"{line_of[0]} and {line_of[hi]}", "error", (), self.peer))
        for s, where in sorted(verdict.duplicated.items()):
            self.found("duplicated", [s], f"entry {s} appears {len(where)} times (lines "
                                          f"{', '.join(str(line_of[w]) for w in where)})")
        inserted = sorted(verdict.inserted.items())
        for p, s in inserted:
            if region[p].entry is not None:
                self.found("inserted", [s] if s >= 0 else [], f"line {line_of[p]} (claiming seq {s}) is not part "
                                                              "of the hash chain")
        for a, b in to_ranges(line_of[p] for p, _s in inserted if region[p].entry is None):
            self.found("garbage", [], f"line{'s' if b > a else ''} {a}{f'-{b}' if b > a else ''} "
                                      f"{'are' if b > a else 'is'} not an entry (not part of the hash chain)")
        if verdict.reordered:
            self.found("reordered", verdict.reordered,
                       f"entries {format_ranges(to_ranges(verdict.reordered))} are out of order "
                       f"(lines {line_of[0]}-{line_of[hi]})")
        authentic = sorted((region[p] for p in verdict.authentic), key=lambda i: i.seq)
        if verdict.modified or verdict.deleted:
            self.collector.taint()
        # A modified run_start still opens its segment (its nonce is what later signatures bind), so
        # one changed byte there does not make every later checkpoint unverifiable too.
        starts = [(s, region[p]) for s, (p, _how) in verdict.modified.items()
                  if region[p].event == "run_start" and region[p].entry is not None and region[p].seq == s]
        for info in authentic:
            while starts and starts[0][0] < info.seq:
                self.collector.adopt_run_start(starts.pop(0)[1].entry, info.seq)
            self._accept(info)
        for _s, start in starts:
            self.collector.adopt_run_start(start.entry, start.seq)
        rest = region[hi + 1:]
        self._region = []
        for info in rest[:-1]:
            self._accept(info)
        if rest:
            self._pending = rest[-1]
            self.seq, self.head = rest[-1].seq, rest[-1].hash
        elif authentic:
            self.seq, self.head = authentic[-1].seq, authentic[-1].hash
        else:
            # Nothing of the region belongs to the chain: go on from its last readable line.
            last = next((i for i in reversed(region) if i.seq >= 0), None)
            if last is not None:
                self.seq, self.head = last.seq, last.hash

    def _whole_entry(self, torn: bytes) -> bool:
        """True when a torn tail is a complete entry linking to the chain (with or without one byte more)."""
        for candidate in (torn, torn[:-1]):
            if not candidate.startswith(b"{"):
                continue
            info = self._info(candidate)
            if info.entry is not None and info.seq == self.seq + 1 and info.prev == self.head:
                return True
        return False

    def finish(self, torn: bytes = b"", torn_length: int = 0) -> tuple[FileReport, LogFacts]:
        """End of file: close any open region, judge the end, and return the report and facts."""
        self._end_garbage_run()
        if self._region:
            self._anomaly_at = len(self._region) - 1
            self._close_region()
        if self._pending is not None:
            self._accept(self._pending)
            self._pending = None
        for a, b in self._garbage_ranges:
            self.found("garbage", [], f"lines {a}-{b} ({b - a + 1} lines) are not entries")
        if self._garbage_total and len(self._garbage_ranges) >= 16:
            self.found("garbage", [], f"{self._garbage_total} lines in all are not entries (only the first "
                                      "16 ranges are listed)")
        for line_no, length in self._overlong:
            self.found("garbage", [], f"line {line_no} is {length} bytes long (the limit is {MAX_LINE_BYTES}): "
                                      "an entry never holds payloads")
        torn_length = torn_length or len(torn)
        if torn and self._whole_entry(torn):
            self.found("modified", [self.seq + 1], f"the last {len(torn)} bytes are a whole entry that links to the "
                       "chain but lacks its newline: the writer writes each line and its newline in one write, so "
                       "the newline was removed or changed after the fact")
        elif torn_length:
            self.found("torn_tail", [self.seq + 1], f"the last {torn_length} bytes are a partial line (the writer "
                       "stopped mid-write, e.g. a crash); they are not part of the log", severity="warning")
        facts = self.collector.finish()
        segs = facts.segments
        if not segs:
            self.found("truncated", [], "the log holds no entry", severity="warning")
        else:
            last = segs[-1]
            if last.crashed:
                self.found("truncated", [self.seq + 1], f"the log ends at entry {self.seq} inside a run segment that "
                           "did not finish its close round (a crash, or a removed tail)", severity="warning")
        report = FileReport(
            peer=self.peer, file=self.file, lines=self.lines, entries=self.entries, last_seq=self.seq,
            head=self.head, checkpoints=sum(len(s.checkpoints) for s in segs), findings=self.findings,
            segments=len(segs), runs=[r for s in segs for _, r, _ in s.runs], torn_bytes=torn_length, suppressed=self.suppressed,
        )
        facts.last_seq = self.seq
        report.intact = not any(f.severity == "error" and f.party == self.peer for f in self.findings)
        return report, facts


def scan_lines(lines: Iterable[bytes], *, peer: str, context: VerifyContext, torn: bytes = b"",
               file: str = "") -> tuple[FileReport, LogFacts]:
    """Verify one peer's log given as lines (without newlines); returns its report and facts."""
    scanner = LogScanner(peer, context, file)
    it = iter(lines)
    with paused_gc():
        while block := list(islice(it, 4096)):
            feed_block(scanner, block)
        return scanner.finish(torn)


def verify_lines(lines: Iterable[bytes], *, peer: str, context: VerifyContext, torn: bytes = b"",
                 file: str = "") -> FileReport:
    """Verify one peer's log given as lines, on its own (chain, order, signatures, format, ending).

    Args:
        lines: the complete lines of the file, without newlines (`split_lines`).
        peer: whose log it is.
        context: deployment hash and keys (`VerifyContext.from_deployment`).
        torn: bytes after the last newline (a torn tail), if any.
        file: the file name findings name (default PEER.jsonl).

    Returns:
        The file's report (cross-peer checks need every log: use `verify_logs`).
    """
    return scan_lines(lines, peer=peer, context=context, torn=torn, file=file)[0]


def scan_file(path: str | Path, *, peer: str, context: VerifyContext) -> tuple[FileReport, LogFacts]:
    """Verify one log file on its own, streaming (bounded memory).

    Raises:
        AuditError: the file cannot be read.
    """
    p = Path(path)
    scanner = LogScanner(peer, context, p.name)
    try:
        with open(p, "rb") as fh, paused_gc():
            reader = LineReader(fh, scanner.overlong)
            for block in reader.blocks():
                feed_block(scanner, block)
            return scanner.finish(reader.torn, reader.torn_length)
    except OSError as exc:
        raise AuditError(f"cannot read audit log {p}: {exc.strerror or exc}") from None


def verify_file(path: str | Path, deployment: Any, *, peer: str | None = None) -> FileReport:
    """Verify one log file on its own (chain, order, signatures, format, ending).

    Args:
        path: the log (`PEER.jsonl`).
        deployment: a `VerifyContext`, or a loaded `Deployment`.
        peer: whose log it is (default: the file name without `.jsonl`).

    Raises:
        AuditError: the file cannot be read.
    """
    context = deployment if isinstance(deployment, VerifyContext) else VerifyContext.from_deployment(deployment)
    p = Path(path)
    return scan_file(p, peer=peer or p.stem, context=context)[0]


