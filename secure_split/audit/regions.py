"""Verify one peer's log on its own: hash chain, seq order, checkpoint signatures, format.

Designed for speed (an auditor verifies hundreds of thousands of entries per second) and for
precise diagnosis:

1. every line is parsed once into a `LineInfo` (seq, prev, entry hash, event, facts). The entry
   hash is SHA-256 over the raw line bytes as written, so nothing is re-encoded to hash it;
   canonical encoding is checked by re-encoding the parsed entry (every entry but messages, and
   messages on a sample, unless `strict_encoding`);
2. the chain is checked with C-level passes over the lines: a line is an *anomaly* when its
   (seq, prev) is not (previous seq + 1, previous entry hash). An intact log has none;
3. each cluster of anomalies is diagnosed locally (`_diagnose_region`): walking back by hash
   from the first intact line after it (whose `prev` vouches for its predecessor) and forward
   from the last intact line before it, the region's lines are classified as modified, deleted,
   reordered, duplicated or inserted, with entry numbers;
4. checkpoint signatures are checked with the peer's key from the deployment (results cached).

Nothing here imports torch or tenseal; signatures go through `secure_split.crypto.keys` (PyNaCl).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import compress, islice, pairwise, repeat
from operator import add as _plus
from operator import itemgetter, ne
from pathlib import Path
from typing import Any, NamedTuple

from secure_split.audit.format import (
    CHECKPOINT_KEYS,
    ENTRY_KEYS,
    EVENTS,
    FORMAT_VERSION,
    HEX128,
    MAX_LINE_BYTES,
    MESSAGE_EVENTS,
    checkpoint_body_hash,
    encode_canonical,
    genesis_hash,
    head_message,
)
from secure_split.audit.report import FileReport, Finding, format_ranges, to_ranges
from secure_split.errors import AuditError


class LineInfo(NamedTuple):
    """What the verifier keeps of one line (a plain tuple underneath, for speed)."""

    seq: int  # -1 when unreadable
    prev: str  # "" when unreadable
    hash: str  # the entry hash
    event: str  # "" when unreadable
    problem: str | None  # why the line breaks the format; None when it is a well-formed entry
    checkpoint: bool
    facts: tuple[Any, ...] | None  # event-specific facts for the cross-peer and policy passes
    policy: str
    time: str


_SEQ = itemgetter(0)
_PREV = itemgetter(1)
_HASH = itemgetter(2)
_PROBLEM = itemgetter(4)
_CHECKPOINT = itemgetter(5)
_NEW = tuple.__new__


_ENCODE = encode_canonical

ENCODING_SAMPLE_HEAD = 64
"""Message lines at the start of each log whose canonical encoding is always checked."""
ENCODING_SAMPLE_EVERY = 16
"""After the head, every this-many-th message line has its canonical encoding checked."""
# The C scanner without `json.loads`' wrapper (two regex matches per call): (obj, end) or StopIteration.
_SCAN: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]
_SHA256 = hashlib.sha256

# Message facts: the key that identifies a message on both sides, and the facts both must agree on.
_MESSAGE_KEY = itemgetter("sender", "receiver", "session", "seq")
_MESSAGE_COMPARED = itemgetter("kind", "edge", "step", "nbytes", "dtype", "shape", "batch_size", "digest")
_HEAD_FACTS = itemgetter("counterparty", "seq", "head", "signature", "key")


def _info(seq: int, prev: str, h: str, event: str, problem: str | None, checkpoint: bool,
          facts: tuple[Any, ...] | None, policy: str, time: str = "") -> LineInfo:
    return _NEW(LineInfo, (seq, prev, h, event, problem, checkpoint, facts, policy, time))


def _envelope_problem(entry: dict[str, Any], peer: str) -> tuple[str, int, str, str, str, dict[str, Any]]:
    """The slow path for an entry whose envelope is not as expected: say what is wrong."""
    seq, prev, event, data, policy = entry["seq"], entry["prev"], entry["event"], entry["data"], entry["policy"]
    problem = "malformed entry"
    if type(data) is not dict:
        problem, data = "data is not an object", {}
    if type(policy) is not str or type(entry["time"]) is not str:
        problem, policy = "policy and time must be strings", ""
    if entry["v"] != FORMAT_VERSION or type(entry["v"]) is not int:
        problem = f"format version {entry['v']!r}, expected {FORMAT_VERSION}"
    if entry["peer"] != peer:
        problem = f"entry names peer {entry['peer']!r} in the log of {peer!r}"
    if type(event) is not str or event not in EVENTS:
        problem, event = f"unknown event {event!r}", ""
    if type(prev) is not str:
        problem, prev = "prev is not a string", ""
    if type(seq) is not int or seq < 0:
        problem, seq = "seq is not a non-negative integer", -1
    return problem, seq, prev, event, policy, data


def parse_line(line: bytes, peer: str, *, check_encoding: bool = True) -> LineInfo:
    """Parse and check one line of `peer`'s log (without its newline).

    The entry hash is SHA-256 of the raw bytes (of the entry without `sig` for a checkpoint).

    Args:
        line: the raw bytes as written.
        peer: whose log it is (every entry must name it).
        check_encoding: re-encode the parsed entry and compare it with the line (canonical
            encoding). Always done for entries other than messages, whatever this says.

    Returns:
        The line's `LineInfo`; `problem` says what is wrong with a line that is not a
        well-formed entry (its chain fields are kept when they can be read).
    """
    h = _SHA256(line).hexdigest()
    if len(line) > MAX_LINE_BYTES:
        return _info(-1, "", h, "", f"a line of {len(line)} bytes (longer than {MAX_LINE_BYTES}): "
                                    "an entry never holds payloads", False, None, "")
    try:
        text = line.decode("utf-8")
        entry, end = _SCAN(text, 0)
        keys = entry.keys()
        if end != len(text):
            raise ValueError("trailing bytes")
    except (ValueError, RecursionError, AttributeError, StopIteration):
        return _info(-1, "", h, "", "not a JSON entry (invalid UTF-8 or JSON, or not an object)", False, None, "")
    checkpoint = False
    if keys != ENTRY_KEYS:
        if keys != CHECKPOINT_KEYS:
            seq0, prev0, ev0 = entry.get("seq"), entry.get("prev"), entry.get("event")
            return _info(seq0 if type(seq0) is int and seq0 >= 0 else -1, prev0 if type(prev0) is str else "", h,
                         ev0 if type(ev0) is str and ev0 in EVENTS else "",
                         f"keys {sorted(keys)} are not the entry keys {sorted(ENTRY_KEYS)}", False, None, "")
        checkpoint = True
    seq = entry["seq"]
    prev = entry["prev"]
    event = entry["event"]
    data = entry["data"]
    policy = entry["policy"]
    problem: str | None = None
    if not (type(seq) is int and seq >= 0 and type(prev) is str and type(event) is str and event in EVENTS
            and type(data) is dict and type(policy) is str and entry["peer"] == peer
            and entry["v"] == FORMAT_VERSION and type(entry["v"]) is int and type(entry["time"]) is str):
        problem, seq, prev, event, policy, data = _envelope_problem(entry, peer)
    if check_encoding or event not in MESSAGE_EVENTS:
        try:
            if _ENCODE(entry) != text:
                problem = problem or "not in canonical encoding (sorted keys, no spaces, shortest numbers)"
        except (ValueError, TypeError):
            problem = problem or "holds values canonical JSON cannot express (NaN or Infinity)"
    facts: tuple[Any, ...] | None = None
    if checkpoint:
        sig = entry["sig"]
        try:
            h = checkpoint_body_hash(entry)
        except (TypeError, ValueError):
            problem = problem or "checkpoint holds values canonical JSON cannot express"
        if event != "checkpoint":
            problem = f"a {event!r} entry carries a signature; only checkpoints do"
        elif type(sig) is dict and type(sig.get("key")) is str and type(sig.get("signature")) is str:
            facts = (sig["key"], sig["signature"])
    elif event == "message_sent" or event == "message_received":
        try:
            key = _MESSAGE_KEY(data)
            facts = (key, _MESSAGE_COMPARED(data))
            hash(key)
        except KeyError as exc:
            problem, facts = f"{event} lacks field {exc}", None
        except TypeError:
            problem, facts = f"{event} names its message with values that are not scalars", None
        else:
            me = 0 if event == "message_sent" else 1
            if key[me] != peer:
                role = ("sender", "receiver")[me]
                problem = f"{event} in the log of {peer!r} names {key[me]!r} as the {role}"
    elif event == "counterparty_head":
        try:
            facts = _HEAD_FACTS(data)
        except KeyError as exc:
            problem = f"counterparty_head lacks field {exc}"
    elif event == "policy_denied":
        facts = (data.get("direction"), data.get("sender"), data.get("receiver"), data.get("kind"))
    elif event == "refused":
        facts = (data.get("direction"), data.get("counterparty"), data.get("kind"))
    elif event == "run_start":
        facts = (data.get("deployment_hash"), data.get("policy_hash"))
    return _NEW(LineInfo, (seq, prev, h, event, problem, event == "checkpoint", facts, policy,
                           entry["time"] if problem is None else ""))


def split_lines(data: bytes) -> tuple[list[bytes], bytes]:
    """Split a log file's bytes into complete lines and a torn tail.

    Args:
        data: the whole file.

    Returns:
        (lines without their newline, the bytes after the last newline — empty unless the
        writer crashed mid-line).
    """
    lines = data.split(b"\n")
    torn = lines.pop()
    return lines, torn


@dataclass
class VerifyContext:
    """What verifying a peer's log needs to know: the deployment hash and the peers' keys.

    Attributes:
        deployment_hash: the deployment every log must belong to.
        keys: peer name -> Ed25519 public key (hex), from the deployment.
        strict_encoding: re-encode every line to check canonical encoding. By default every
            entry except messages is re-encoded, and messages on a deterministic sample (the
            first `ENCODING_SAMPLE_HEAD` lines, then every `ENCODING_SAMPLE_EVERY`-th): a message
            entry holds only names, hex digests and integers, whose encoding cannot vary from
            one entry to the next, so a non-conforming writer shows on the sample. The hash chain
            covers the raw bytes either way, so this check is about the writer, not tampering.
        cache_lines: keep each parsed line by its bytes, so verifying many variants of one log
            (mutation tests) parses each distinct line once, with its encoding always checked.
            Off for a normal verification.
    """

    deployment_hash: str
    keys: Mapping[str, str]
    strict_encoding: bool = False
    cache_lines: bool = False
    _owners: dict[str, str] = field(default_factory=dict, repr=False)
    _genesis: dict[str, str] = field(default_factory=dict, repr=False)
    _caches: dict[str, dict[bytes, LineInfo]] = field(default_factory=dict, repr=False)
    _signatures: dict[tuple[Any, ...], str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._owners = {k: p for p, k in self.keys.items()}

    @classmethod
    def from_deployment(cls, deployment: Any, *, strict_encoding: bool = False,
                        cache_lines: bool = False) -> VerifyContext:
        """Build the context from a loaded `Deployment` (its hash and every peer's sign_key)."""
        keys = {name: p.sign_key for name, p in deployment.spec.peers.items()}
        return cls(deployment_hash=deployment.hash, keys=keys, strict_encoding=strict_encoding,
                   cache_lines=cache_lines)

    def genesis(self, peer: str) -> str:
        """The genesis hash of `peer`'s log in this deployment."""
        g = self._genesis.get(peer)
        if g is None:
            g = self._genesis[peer] = genesis_hash(peer, self.deployment_hash)
        return g

    def key_owner(self, key_hex: str) -> str | None:
        """The peer whose sign key this is, or None."""
        return self._owners.get(key_hex)

    def checkpoint_status(self, peer: str, info: LineInfo) -> str:
        """Whether a checkpoint line's signature holds: "ok", "missing", "invalid", or whose key signed.

        Args:
            peer: whose log the line is in.
            info: the parsed checkpoint line.

        Returns:
            "ok" (valid with `peer`'s key), "missing" (no signature), "invalid" (does not verify
            with `peer`'s key), or a description of the foreign key it names.
        """
        if info.facts is None:
            return "missing"
        key, signature = info.facts
        memo_key = (peer, info.seq, info.hash, key, signature)
        status = self._signatures.get(memo_key)
        if status is None:
            if key != self.keys.get(peer):
                owner = self.key_owner(key)
                status = f"the key of peer '{owner}'" if owner else "a key that is not in the deployment"
            # Exactly the writer's lowercase hex: `sig` lies outside the entry hash, so a variant
            # spelling of the same signature (upper case) would otherwise pass unseen.
            elif info.seq >= 0 and HEX128.fullmatch(signature) and signature_valid(
                    key, head_message(peer, info.seq, info.hash, self.deployment_hash), signature):
                status = "ok"
            else:
                status = "invalid"
            self._signatures[memo_key] = status
        return status

    def parse_all(self, lines: Sequence[bytes], peer: str) -> list[LineInfo]:
        """Parse every line (through the per-peer cache when `cache_lines`)."""
        if not self.cache_lines:
            if self.strict_encoding:
                return [parse_line(line, peer) for line in lines]
            every, head = ENCODING_SAMPLE_EVERY, ENCODING_SAMPLE_HEAD
            return [parse_line(line, peer, check_encoding=i < head or i % every == 0)
                    for i, line in enumerate(lines)]
        cache = self._caches.setdefault(peer, {})
        infos: list[Any] = list(map(cache.get, lines))
        if None in infos:
            for i, info in enumerate(infos):
                if info is None:
                    info = infos[i] = parse_line(lines[i], peer)
                    cache[lines[i]] = info
        return infos


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector for a verification pass (restored afterwards).

    Verification allocates millions of small acyclic objects (freed by reference counting);
    the collector's generational passes over them would otherwise cost as much as the parsing.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@functools.lru_cache(maxsize=1 << 16)
def signature_valid(key_hex: str, message: bytes, signature_hex: str) -> bool:
    """True when `signature_hex` is a valid Ed25519 signature of `message` by `key_hex` (cached)."""
    from secure_split.crypto.keys import verify_signature
    from secure_split.errors import CryptoError

    try:
        verify_signature(key_hex, message, bytes.fromhex(signature_hex))
    except (CryptoError, ValueError):
        return False
    return True


@dataclass
class _Region:
    """The verdict on one cluster of anomalies."""

    modified: dict[int, tuple[int, str]] = field(default_factory=dict)  # seq -> (line position, how it was seen)
    deleted: list[tuple[int, int]] = field(default_factory=list)  # inclusive ranges of seqs
    duplicated: dict[int, list[int]] = field(default_factory=dict)  # seq -> line numbers
    inserted: dict[int, int] = field(default_factory=dict)  # line position -> claimed seq
    reordered: set[int] = field(default_factory=set)
    authentic: list[int] = field(default_factory=list)  # positions that belong to the chain


def _ranges_without(gap: range, taken: set[int]) -> list[tuple[int, int]]:
    """The inclusive ranges of `gap` minus the (few) numbers in `taken`."""
    out: list[tuple[int, int]] = []
    start = gap.start
    for t in sorted(x for x in taken if x in gap):
        if t > start:
            out.append((start, t - 1))
        start = t + 1
    if start < gap.stop:
        out.append((start, gap.stop - 1))
    return out


def _diagnose_region(
    infos: Sequence[LineInfo], lo: int, hi: int, prev_start: str, seq_start: int, tail: tuple[str, int] | None
) -> _Region:
    """Classify the lines lo..hi (positions) of a region where the chain breaks.

    Args:
        infos: all lines of the file.
        lo, hi: the region (inclusive positions).
        prev_start, seq_start: the prev and seq the region's first entry must have (from the
            intact line before it, or the genesis).
        tail: (hash, seq) of the region's last entry as vouched for by the intact line after it
            (its prev) or by a valid signed checkpoint at `hi`; None at an unsigned end of file.

    Returns:
        The region's verdict.
    """
    out = _Region()
    positions = range(lo, hi + 1)
    by_hash: dict[str, list[int]] = {}
    by_link: dict[tuple[str, int], list[int]] = {}
    for p in positions:
        info = infos[p]
        by_hash.setdefault(info.hash, []).append(p)
        if info.seq >= 0:
            by_link.setdefault((info.prev, info.seq), []).append(p)
    used: set[int] = set()
    back: list[int] = []
    complete = False
    if tail is not None:
        cur, cur_seq = tail
        while True:
            cands = [p for p in by_hash.get(cur, ()) if p not in used]
            if not cands or cur_seq < seq_start:
                break
            p = cands[0]
            used.add(p)
            back.append(p)
            if infos[p].prev == prev_start:
                complete = True
                break
            cur, cur_seq = infos[p].prev, cur_seq - 1
        back.reverse()
    fwd: list[int] = []
    if not complete:
        stop = infos[back[0]].seq if back else (tail[1] + 1 if tail is not None else None)
        cur, cur_seq = prev_start, seq_start
        while stop is None or cur_seq < stop:
            cands = [p for p in by_link.get((cur, cur_seq), ()) if p not in used]
            if not cands:
                break
            p = cands[0]
            used.add(p)
            fwd.append(p)
            cur, cur_seq = infos[p].hash, cur_seq + 1
        if tail is not None and fwd and cur_seq == stop:
            # The forward walk reached the vouched part but its last line does not hash to
            # what the vouched successor recorded: that line was changed after it was written.
            need = infos[back[0]].prev if back else tail[0]
            last = fwd[-1]
            if infos[last].hash != need:
                fwd.pop()
                out.modified[infos[last].seq] = (last, f"line {last + 1} no longer hashes to the prev its "
                                                       "successor recorded")
    # Along the hash-linked part, seqs must still count up by one: a jump means entries were
    # removed and the chain recomputed after them (their checkpoints then fail as well).
    if back:
        # (When the walk back did not reach the anchor, the gap before back[0] is handled below.)
        expected = seq_start if complete else infos[back[0]].seq
        for q in back:
            if infos[q].seq > expected:
                out.deleted.append((expected, infos[q].seq - 1))
            expected = max(expected, infos[q].seq + 1)
    chain = fwd + back
    chain_hashes = {infos[p].hash for p in chain}
    rest = [p for p in positions if p not in used]
    suspects = []
    for p in rest:
        if infos[p].hash in chain_hashes:
            first = next(q for q in chain if infos[q].hash == infos[p].hash)
            out.duplicated.setdefault(infos[first].seq, [first + 1]).append(p + 1)
        else:
            suspects.append(p)
    if not complete:
        first_gap = infos[fwd[-1]].seq + 1 if fwd else seq_start
        if back:
            last_gap = infos[back[0]].seq - 1
        elif tail is not None:
            last_gap = tail[1]
        else:
            last_gap = first_gap + len(suspects) - 1
        # The gap is a range: a forged seq must not make the verifier list billions of numbers.
        gap = range(first_gap, max(first_gap, last_gap + 1))
        taken = set(out.modified)
        leftover = []
        for p in suspects:
            s = infos[p].seq
            if s in gap and s not in taken:
                out.modified[s] = (p, f"line {p + 1} does not hash to the prev its successor recorded")
                taken.add(s)
            else:
                leftover.append(p)
        # Lines that cannot be linked, standing where entries are missing: the same entries, changed.
        free = (s for s in gap if s not in taken)
        for p in leftover:
            slot = next(free, None)
            if slot is None:
                out.inserted[p] = infos[p].seq
                continue
            why = infos[p].problem if infos[p].seq < 0 else f"its seq reads {infos[p].seq}"
            out.modified[slot] = (p, f"line {p + 1} stands where entry {slot} belongs but does not link ({why})")
            taken.add(slot)
        out.deleted.extend(_ranges_without(gap, taken))
    else:
        for p in suspects:
            out.inserted[p] = infos[p].seq
    ordered = sorted(chain, key=lambda q: infos[q].seq)
    for a, b in pairwise(ordered):
        if b < a:
            out.reordered.update((infos[a].seq, infos[b].seq))
    out.authentic = chain
    return out


def verify_lines(
    lines: Sequence[bytes],
    *,
    peer: str,
    context: VerifyContext,
    torn: bytes = b"",
    file: str = "",
) -> FileReport:
    """Verify one peer's log given as lines (the per-file pass; O(n)).

    Args:
        lines: the complete lines of the file, without newlines (`split_lines`).
        peer: whose log it is.
        context: deployment hash and keys (`VerifyContext.from_deployment`).
        torn: bytes after the last newline (a torn tail), if any.
        file: the file name findings name (default PEER.jsonl).

    Returns:
        The file's report: findings of kinds modified, deleted, reordered, duplicated, inserted,
        truncated (unclosed log), forged_signature, unknown_key, torn_tail, malformed.
    """
    with paused_gc():
        return _verify_lines(lines, peer=peer, context=context, torn=torn, file=file)


def _verify_lines(lines: Sequence[bytes], *, peer: str, context: VerifyContext, torn: bytes, file: str) -> FileReport:
    file = file or f"{peer}.jsonl"
    n = len(lines)
    infos = context.parse_all(lines, peer)
    findings: list[Finding] = []

    def found(kind: str, seqs: Any, message: str, severity: str = "error") -> None:
        findings.append(Finding(kind, peer, file, to_ranges(seqs), message, severity))

    genesis = context.genesis(peer)
    # A line is an anomaly when its prev is not the previous line's hash or its seq is not the
    # previous seq + 1: C-level passes over the columns, so an intact log costs next to nothing.
    seqs = list(map(_SEQ, infos))
    hashes = list(map(_HASH, infos))
    bad = set(compress(range(1, n), map(ne, islice(map(_PREV, infos), 1, None), hashes)))
    bad.update(compress(range(1, n), map(ne, islice(seqs, 1, None), map(_plus, seqs, repeat(1)))))
    if n and (seqs[0] != 0 or infos[0].prev != genesis):
        bad.add(0)
    anomalies = sorted(bad)
    excluded: set[int] = set()
    modified: set[int] = set()
    position_of_seq_override: dict[int, int] = {}

    # Signatures first: a valid checkpoint at the end of the file vouches for the lines before it.
    cp_positions = list(compress(range(n), map(_CHECKPOINT, infos)))
    sig_status = {p: context.checkpoint_status(peer, infos[p]) for p in cp_positions}

    # Diagnose clusters of anomalies; regions are merged so that the lines anchoring them are intact.
    regions: list[list[int]] = []
    for a in anomalies:
        if regions and a - 2 <= regions[-1][1]:
            regions[-1][1] = a
        else:
            regions.append([max(a - 1, 0), a])
    for lo, hi in regions:
        if lo == 0:
            prev_start, seq_start = genesis, 0
        else:
            prev_start, seq_start = infos[lo].prev, infos[lo].seq
        tail: tuple[str, int] | None
        if hi + 1 < n:
            tail = (infos[hi + 1].prev, infos[hi + 1].seq - 1)
        elif sig_status.get(hi) == "ok":
            tail = (infos[hi].hash, infos[hi].seq)
        else:
            tail = None
        region = _diagnose_region(infos, lo, hi, prev_start, seq_start, tail)
        for s, (p, how) in sorted(region.modified.items()):
            found("modified", [s], f"entry {s} was changed after it was written: {how}")
            modified.add(s)
            excluded.add(p)
        if region.deleted:
            missing = sum(b - a + 1 for a, b in region.deleted)
            findings.append(Finding("deleted", peer, file, tuple(region.deleted),
                                    f"{missing} entr{'y is' if missing == 1 else 'ies are'} missing "
                                    f"between lines {lo + 1} and {hi + 1}"))
        for s, where in sorted(region.duplicated.items()):
            found("duplicated", [s], f"entry {s} appears {len(where)} times (lines {', '.join(map(str, where))})")
            excluded.update(w - 1 for w in where[1:])
        for p, s in sorted(region.inserted.items()):
            found("inserted", [s] if s >= 0 else [], f"line {p + 1} (claiming seq {s}) is not part of the hash chain")
            excluded.add(p)
        if region.reordered:
            found("reordered", region.reordered,
                f"entries {format_ranges(to_ranges(region.reordered))} are out of order (lines {lo + 1}-{hi + 1})")
        for p in region.authentic:
            position_of_seq_override[infos[p].seq] = p

    # Checkpoint signatures.
    checkpoints_ok = 0
    for p, status in sig_status.items():
        s = infos[p].seq
        if status == "ok":
            checkpoints_ok += 1
        elif s in modified or p in excluded:
            continue
        elif status == "missing":
            found("forged_signature", [s], f"checkpoint at line {p + 1} has no valid signature field")
        elif status == "invalid":
            found("forged_signature", [s],
                f"checkpoint {s} (line {p + 1}) does not verify with {peer}'s key: the entries it covers "
                "were rewritten, or the signature was forged")
        else:
            found("unknown_key", [s], f"checkpoint {s} (line {p + 1}) is signed with {status}, not {peer}'s key")

    # Format problems of lines that still chain correctly (a writer bug, or a re-chained forgery).
    for p in compress(range(n), map(_PROBLEM, infos)):
        s = infos[p].seq
        if s in modified or p in excluded:
            continue
        found("malformed", [s] if s >= 0 else [], f"line {p + 1}: {infos[p].problem}")

    # The end of the log.
    if anomalies:
        # The end of the chain: the highest seq among the lines that belong to it.
        for p in excluded:
            seqs[p] = -1
        last_seq = max(seqs)
        last_pos = seqs.index(last_seq)
    else:
        last_pos, last_seq = n - 1, (infos[-1].seq if n else -1)
    if torn:
        found("torn_tail", [last_seq + 1],
            f"the last {len(torn)} bytes are a partial line (the writer stopped mid-write, e.g. a crash); "
            "they are not part of the log", severity="warning")
    if n:
        last = infos[last_pos]
        before = infos[position_of_seq_override.get(last_seq - 1, last_pos - 1)] if last_pos > 0 else None
        closed = last.event == "checkpoint" and before is not None and before.event == "run_end"
        if not closed:
            last_cp = max((infos[p].seq for p in cp_positions if sig_status[p] == "ok"), default=-1)
            unsigned = f"entries {last_cp + 1}-{last_seq} are not covered by a signature" if last_cp < last_seq \
                else "every entry is covered by a signature"
            found("truncated", [last_seq + 1],
                f"the log ends at entry {last_seq} without run_end and a final signed checkpoint: the run did "
                f"not close (a crash) or its tail was removed; {unsigned}", severity="warning")
    else:
        found("truncated", [], "the log is empty", severity="warning")

    # seq -> (entry hash, signature valid, signature): what counterparty heads are compared with.
    signed_heads = {infos[p].seq: (infos[p].hash, sig_status[p] == "ok", (infos[p].facts or ("", ""))[1])
                    for p in cp_positions
                    if p not in excluded and infos[p].seq >= 0}
    return FileReport(
        peer=peer,
        file=file,
        lines=n,
        entries=n - len(excluded),
        last_seq=last_seq,
        head=infos[-1].hash if n else genesis,
        checkpoints=checkpoints_ok,
        findings=findings,
        infos=infos,
        excluded=frozenset(excluded),
        signed_heads=signed_heads,
    )


def foreign_deployment(lines: Sequence[bytes], peer: str, deployment_hash: str) -> str | None:
    """The deployment hash a log provably belongs to when it is not `deployment_hash`, else None.

    "Provably": its first entry is a run_start naming that other deployment, and its genesis is
    that deployment's. Such a log is not tampered with; it is simply verified against the wrong file.
    """
    if not lines:
        return None
    first = parse_line(lines[0], peer)
    if first.event != "run_start" or first.facts is None:
        return None
    named = first.facts[0]
    if isinstance(named, str) and named != deployment_hash and first.prev == genesis_hash(peer, named):
        return named
    return None


def read_log(path: str | Path) -> tuple[list[bytes], bytes]:
    """Read a log file and split it into complete lines and a torn tail.

    Raises:
        AuditError: the file cannot be read.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise AuditError(f"cannot read audit log {path}: {exc.strerror or exc}") from None
    return split_lines(data)


def verify_file(path: str | Path, deployment: Any, *, peer: str | None = None) -> FileReport:
    """Verify one log file on its own (chain, order, signatures, format, ending).

    Cross-peer checks need every log: use `verify_logs` for the full verdict.

    Args:
        path: the log (`PEER.jsonl`).
        deployment: a `VerifyContext`, or a loaded `Deployment` (keys and hash are taken from it).
        peer: whose log it is (default: the file name without `.jsonl`).

    Returns:
        The file's report.

    Raises:
        AuditError: the file cannot be read.
    """
    context = deployment if isinstance(deployment, VerifyContext) else VerifyContext.from_deployment(deployment)
    p = Path(path)
    lines, torn = read_log(p)
    return verify_lines(lines, peer=peer or p.stem, context=context, torn=torn, file=p.name)
