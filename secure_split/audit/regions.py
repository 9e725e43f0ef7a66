"""Diagnose a region of a log where the hash chain breaks: modified, deleted, reordered, duplicated, inserted.

The streaming scanner (`chain.py`) buffers the lines of a region where (seq, prev) stop linking
(bounded), and hands them here with what the intact lines around the region vouch for: the
prev/seq the region's first entry must have, and the hash its last entry must have (the prev of
the intact line after it). Walking back by hash from that anchor and forward by link from the
line before, the region's lines are classified with entry numbers.
"""

from __future__ import annotations

import contextlib
import functools
import gc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any, NamedTuple


class LineInfo(NamedTuple):
    """What the scanner keeps of one line of a region (a plain tuple underneath, for speed)."""

    seq: int  # -1 when unreadable
    prev: str  # "" when unreadable
    hash: str  # the entry hash
    event: str  # "" when unreadable
    problem: str | None  # why the line breaks the format; None when it is a well-formed entry
    checkpoint: bool
    entry: dict[str, Any] | None  # the parsed entry (None when unreadable)
    line_no: int  # 1-based line number in the file
    canon: str | None = None  # why a well-formed entry is not in canonical encoding


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
class Region:
    """The verdict on one cluster of anomalies."""

    modified: dict[int, tuple[int, str]] = field(default_factory=dict)  # seq -> (line position, how it was seen)
    deleted: list[tuple[int, int]] = field(default_factory=list)  # inclusive ranges of seqs
    duplicated: dict[int, list[int]] = field(default_factory=dict)  # seq -> positions (first: the authentic one)
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


def diagnose_region(
    infos: Sequence[LineInfo], lo: int, hi: int, prev_start: str, seq_start: int, tail: tuple[str, int] | None
) -> Region:
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
    out = Region()
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
                out.modified[infos[last].seq] = (last, f"line {infos[last].line_no} no longer hashes to the prev its "
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
            out.duplicated.setdefault(infos[first].seq, [first]).append(p)
        else:
            suspects.append(p)
    if not complete:
        first_gap = infos[fwd[-1]].seq + 1 if fwd else seq_start
        if back:
            last_gap = infos[back[0]].seq - 1
        elif tail is not None:
            last_gap = tail[1]
        else:
            # An unanchored end: each readable line may stand for one entry, and a run of lines that
            # are not entries for at most one (the rest of the run is junk, reported as one range).
            readable = sum(1 for p in suspects if infos[p].seq >= 0)
            last_gap = first_gap + readable + (1 if readable < len(suspects) else 0) - 1
        # The gap is a range: a forged seq must not make the verifier list billions of numbers.
        gap = range(first_gap, max(first_gap, last_gap + 1))
        taken = set(out.modified)
        leftover = []
        for p in suspects:
            s = infos[p].seq
            if s in gap and s not in taken:
                out.modified[s] = (p, f"line {infos[p].line_no} does not hash to the prev its successor recorded")
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
            out.modified[slot] = (p, f"line {infos[p].line_no} stands where entry {slot} belongs but does not link ({why})")
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


