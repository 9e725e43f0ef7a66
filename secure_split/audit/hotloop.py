"""The verifier's hot loop: a block of lines, the common line checked and reduced with no call in between.

About 94% of a log's lines are message entries (`message_sent`, `message_received`) that link to
the chain, are in canonical form, and stand in a running segment. `feed_block` takes a block of
lines in one loop over local variables and, for such a line, does in place what the general path
does through five calls: one parse, one re-encoding compared byte for byte (the canonical form),
one SHA-256 (the entry hash), the link to the line before (seq, prev, peer, version), the checks
of `FactCollector.accept` and `_message` (time, policy, the message's own side, its integer
fields), and, once the next line links in turn, the facts the collector keeps (its stream's
count, sum and protocol seq, its flow for the policy pass).

The lane takes a line only when the general path would accept it without a finding; it keeps for
it exactly what the general path keeps. Every other line (another event, a line that does not
link, an unusual type in any field, anything not canonical, a new stream) goes through
`LogScanner.feed` and `FactCollector.accept`, which judge it as they always did. So the lane can
make verification faster but never laxer; `tests/unit/audit/test_hotloop.py` holds both paths to
the same findings over the mutation corpus.
"""

from __future__ import annotations

import hashlib
import re
from operator import itemgetter
from typing import TYPE_CHECKING, Any

from secure_split.audit.encoding import SORT_KEYS, JSONDecodeError, dumps, parse
from secure_split.audit.format import CLOSE_TAIL_KINDS, FORMAT_VERSION, TIME_FORMAT
from secure_split.audit.regions import LineInfo
from secure_split.audit.sums import flow_hash

if TYPE_CHECKING:
    from secure_split.audit.chain import LogScanner
    from secure_split.audit.facts import FactCollector

# The entry's keys in canonical (sorted) order; with len(entry) == 8, fetching them all proves the
# key set is exactly ENTRY_KEYS (a missing key raises KeyError).
_ENTRY = itemgetter("data", "event", "peer", "policy", "prev", "seq", "time", "v")
# A message's 15 fields, sorted; with len(data) == 15 this proves the key set is the schema's.
_MESSAGE = itemgetter("batch_size", "counterparty", "decision_id", "digest", "dtype", "edge", "kind", "nbytes",
                      "receiver", "rule_id", "sender", "seq", "session", "shape", "step")
_MESSAGE_LEN = 15
_ENTRY_LEN = 8
_MASK = (1 << 64) - 1
_NBYTES_LIMIT = 2**63
_NO_DAY = "\x00" * 21  # no time starts with it (a time of 27 characters has a digit at index 20)
_MICROS = re.compile(r"[0-9]{6}Z")  # a time's last 7 characters, after a first 20 known to be valid
_SENT = "message_sent"
_RECEIVED = "message_received"


def _collector_state(col: FactCollector) -> tuple[Any, bool, Any, int, str, str, str, str]:
    """The collector's state the lane works on: (segment, running?, its policy, its index, last time,
    its first 20 characters (date to seconds), first and last message time)."""
    seg = col.seg
    running = seg is not None and seg.run_end_seq < 0
    last = col._last_time  # "" or a valid time (the collector keeps only those)
    return (seg, running, seg.policy_hash if seg is not None else None, seg.index if seg is not None else 0,
            last, last[:20] if last else _NO_DAY, col._first_time, col._msg_last_time)


def _lane_record(streams: dict[Any, Any], flows: dict[Any, Any], seg_index: int, key: tuple[Any, ...]) -> Any:
    """(stream, flow counter, `flow_hash` of its facts, segment) of a message whose stream already holds
    messages of this segment, whose flow is known and whose kind, edge and dtype are strings (dtype may
    be null); None otherwise (the general path creates them)."""
    event, sender, receiver, session, kind, edge, nbytes, dtype, shape, batch = key
    s = streams.get((sender, receiver, session))
    if s is None or seg_index not in s.segments:
        return None
    if type(kind) is not str or type(edge) is not str or (dtype is not None and type(dtype) is not str):
        return None  # so that a record's key equals only facts of the very same types (1 == 1.0 == true)
    f = flows.get((event, sender, receiver, kind, edge, nbytes, dtype, shape, batch))
    if f is None:
        return None
    return s, f, flow_hash(kind, edge, nbytes, dtype, shape, batch), seg_index


def feed_block(sc: LogScanner, lines: list[bytes]) -> None:
    """Verify a block of complete lines (without newlines) in order: `sc.feed` for each, faster.

    Args:
        sc: the scanner of the log.
        lines: the next complete lines of the log.
    """
    if sc._cache is not None:  # verifying many variants of one log: the cache is the speed-up there
        for line in lines:
            sc.feed(line)
        return
    col = sc.collector
    facts = col.facts
    streams = facts.streams
    flows = facts.flows
    records: dict[tuple[Any, ...], Any] = {}  # (event, stream, flow facts) -> _lane_record, for this block
    me = sc.peer
    sha = hashlib.sha256
    loads, encode, sort = parse, dumps, SORT_KEYS
    entry_of, message_of = _ENTRY, _MESSAGE
    tail_kinds = CLOSE_TAIL_KINDS
    time_format = TIME_FORMAT
    micros = _MICROS.fullmatch
    limit = _NBYTES_LIMIT
    # Scanner state (written back before any call to the general path).
    n_lines, entries, cur, head = sc.lines, sc.entries, sc.seq, sc.head
    lane = not sc._region and bool(head) and not sc._garbage_run
    # The line that linked last, not yet accepted (the general path's `_pending`), when the lane took
    # it: the entry, and what accepting it changes (its stream, flow, facts' hash, protocol seq, ...).
    p_entry: Any = None
    p_rec: Any = None
    p_event = p_time = p_prev = p_hash = p_session = ""
    p_seq = p_line = p_n = p_fact = -1
    p_tail = False
    # Collector state; `done` = the seq of the last message the lane accepted (-1: none since the last sync).
    seg, running, seg_policy, seg_index, last_time, last_day, first_time, msg_last_time = _collector_state(col)
    done = disallowed = -1
    e: Any = None

    for line in lines:
        n_lines += 1
        e = None
        if lane:
            try:
                e = loads(line)
            except JSONDecodeError:
                e = None
            if type(e) is dict:
                try:
                    data, event, peer, policy, prev, seq, t, v = entry_of(e)
                except KeyError:
                    seq = None
                if seq == cur + 1 and prev == head and type(seq) is int:
                    # This line links (the general path would say so too): the one before it is authentic.
                    if p_entry is not None:  # the lane checked it: accept it (FactCollector.accept/_message)
                        entries += 1
                        if not p_time.startswith(last_day):
                            last_day = p_time[:20]
                        last_time = p_time
                        done = p_seq
                        if not p_tail:
                            disallowed = p_seq
                        st = p_rec[0]
                        st.last_entry = p_seq
                        st.total = (st.total + p_fact) & _MASK
                        st.count += 1
                        if p_n == st.max_n + 1:
                            st.max_n = p_n
                        else:
                            col._protocol_seq(st, p_n, p_session, p_seq)
                        f = p_rec[1]
                        f[0] += 1
                        if len(f[1]) < 16:
                            f[1].append(p_seq)
                        if p_time < first_time:
                            first_time = p_time
                        if p_time > msg_last_time:
                            msg_last_time = p_time
                        p_entry = None
                    elif sc._pending is not None:  # the line before went the general way
                        _sync_collector(col, seg, last_time, first_time, msg_last_time, done, disallowed)
                        done = disallowed = -1
                        sc.entries = entries
                        sc._accept(sc._pending)
                        entries = sc.entries
                        sc._pending = None
                        seg, running, seg_policy, seg_index, last_time, last_day, first_time, msg_last_time = \
                            _collector_state(col)
                    # The line itself: what the general path would accept without a finding.
                    if running and len(e) == _ENTRY_LEN and policy == seg_policy and peer == me \
                            and v == FORMAT_VERSION and type(v) is int and (event == _SENT or event == _RECEIVED) \
                            and type(t) is str and t >= last_time \
                            and ((t.startswith(last_day) and micros(t, 20)) or time_format.fullmatch(t)):
                        try:
                            batch, _c, _d, digest, dtype, edge, kind, nbytes, receiver, _r, sender, n, \
                                session, shape, step = message_of(data)
                            ok = len(data) == _MESSAGE_LEN
                        except (KeyError, TypeError):  # a field missing; data not an object
                            ok = False
                        if ok and type(n) is int and n >= 0 and (sender if event == _SENT else receiver) == me \
                                and type(step) is int and type(nbytes) is int and 0 <= nbytes < limit \
                                and (batch is None or type(batch) is int) and type(digest) is str:
                            if shape is None:
                                shape_t = None
                            elif type(shape) is list:
                                shape_t = tuple(shape)
                                if len(shape_t) == 2:
                                    if type(shape_t[0]) is not int or type(shape_t[1]) is not int:
                                        ok = False
                                else:
                                    for x in shape_t:
                                        if type(x) is not int:
                                            ok = False
                                            break
                            else:
                                ok = False
                            rec = None
                            if ok:
                                # A stream key that finds a stream consists of strings; unhashable facts raise.
                                key = (event, sender, receiver, session, kind, edge, nbytes, dtype, shape_t, batch)
                                try:
                                    rec = records.get(key)
                                    if rec is None or rec[3] != seg_index:
                                        rec = _lane_record(streams, flows, seg_index, key)
                                        if rec is not None and len(records) < 4096:
                                            records[key] = rec
                                    fact = hash((n, step, digest, rec[2])) if rec is not None else 0
                                except TypeError:
                                    rec = None
                            if rec is not None and encode(e, option=sort) == line:
                                h = sha(line).hexdigest()
                                p_entry, p_rec, p_fact, p_n, p_session, p_tail = e, rec, fact, n, session, \
                                    kind in tail_kinds
                                p_event, p_time, p_prev, p_hash, p_seq, p_line = event, t, prev, h, seq, n_lines
                                cur, head = seq, h
                                continue
        # The general path: write the lane's state back, feed the line, take the state up again.
        _sync_collector(col, seg, last_time, first_time, msg_last_time, done, disallowed)
        done = disallowed = -1
        if p_entry is not None:
            sc._pending = LineInfo(p_seq, p_prev, p_hash, p_event, None, False, p_entry, p_line, None)
            p_entry = None
        sc.lines, sc.entries, sc.seq, sc.head = n_lines - 1, entries, cur, head
        sc.feed(line, e if type(e) is dict else None)
        n_lines, entries, cur, head = sc.lines, sc.entries, sc.seq, sc.head
        lane = not sc._region and bool(head) and not sc._garbage_run
        seg, running, seg_policy, seg_index, last_time, last_day, first_time, msg_last_time = _collector_state(col)

    _sync_collector(col, seg, last_time, first_time, msg_last_time, done, disallowed)
    if p_entry is not None:
        sc._pending = LineInfo(p_seq, p_prev, p_hash, p_event, None, False, p_entry, p_line, None)
    sc.lines, sc.entries, sc.seq, sc.head = n_lines, entries, cur, head


def _sync_collector(col: FactCollector, seg: Any, last_time: str, first_time: str, msg_last_time: str,
                    done: int, disallowed: int) -> None:
    """Write the lane's collector state back (what `accept` would have set entry by entry)."""
    col._last_time, col._first_time, col._msg_last_time = last_time, first_time, msg_last_time
    if done >= 0:
        seg.last_seq = done
        col.facts.last_seq = done
        seg.final = False
        if disallowed >= 0:
            seg.last_disallowed_seq = disallowed
