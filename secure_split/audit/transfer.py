"""One file's verification result (its `FileReport` and `LogFacts`) as JSON, to hand it across processes.

`verify_logs` may scan the logs of a set in child processes (`parallel.py`); each child writes its
result with `dump_scan` and the parent reads it with `load_scan`, which rebuilds exactly the objects
`chain.scan_file` returns in process (tuples, sets, tuple-keyed maps), so the cross-peer and policy
passes cannot tell the difference. JSON through the one canonical encoding, never pickle.
"""

from __future__ import annotations

from typing import Any

from secure_split.audit.encoding import encode_value, parse
from secure_split.audit.facts import LogFacts, Segment, Stream
from secure_split.audit.report import FileReport, Finding


def _finding(f: Finding) -> list[Any]:
    return [f.kind, f.peer, f.file, f.entries, f.message, f.severity, f.evidence, f.party, f.suspects]


def _load_finding(v: list[Any]) -> Finding:
    kind, peer, file, entries, message, severity, evidence, party, suspects = v
    return Finding(kind, peer, file, tuple((a, b) for a, b in entries), message, severity, tuple(evidence), party,
                   tuple(suspects))


def _segment(s: Segment) -> dict[str, Any]:
    return {"index": s.index, "start_seq": s.start_seq, "nonce": s.nonce, "policy_hash": s.policy_hash,
            "deployment_hash": s.deployment_hash, "previous": s.previous, "runs": s.runs, "last_seq": s.last_seq,
            "run_end_seq": s.run_end_seq, "status": s.status, "close_missing": s.close_missing, "final": s.final,
            "last_disallowed_seq": s.last_disallowed_seq, "checkpoints": s.checkpoints, "tainted": s.tainted,
            "deferred": s.deferred, "candidate_runs": sorted(s.candidate_runs)}


def _load_segment(v: dict[str, Any]) -> Segment:
    return Segment(index=v["index"], start_seq=v["start_seq"], nonce=v["nonce"], policy_hash=v["policy_hash"],
                   deployment_hash=v["deployment_hash"], previous=v["previous"],
                   runs=[(a, r, n) for a, r, n in v["runs"]], last_seq=v["last_seq"], run_end_seq=v["run_end_seq"],
                   status=v["status"], close_missing=v["close_missing"], final=v["final"],
                   last_disallowed_seq=v["last_disallowed_seq"], checkpoints=v["checkpoints"], tainted=v["tainted"],
                   deferred=[(a, h, s) for a, h, s in v["deferred"]], candidate_runs=set(v["candidate_runs"]))


def _stream(s: Stream) -> list[Any]:
    return [s.count, s.total, s.refused, s.refused_total, s.max_n, sorted(s.holes), s.far_gaps, s.duplicates,
            s.first_entry, s.last_entry, sorted(s.segments)]


def _load_stream(v: list[Any]) -> Stream:
    count, total, refused, refused_total, max_n, holes, far_gaps, duplicates, first, last, segments = v
    return Stream(count=count, total=total, refused=refused, refused_total=refused_total, max_n=max_n,
                  holes=set(holes), far_gaps=[(a, b) for a, b in far_gaps], duplicates=duplicates,
                  first_entry=first, last_entry=last, segments=set(segments))


def _flow_key(v: list[Any]) -> tuple[Any, ...]:
    # (event, sender, receiver, kind, edge, nbytes, dtype, shape, batch): shape is a tuple or a scalar.
    shape = v[7]
    return (*v[:7], tuple(shape) if type(shape) is list else shape, v[8])


def dump_scan(report: FileReport, facts: LogFacts) -> bytes:
    """One file's report and facts as JSON bytes (see `load_scan`).

    Raises:
        TypeError: a value JSON cannot hold (never for what a scan of a log produces).
    """
    r = report
    out = {
        "report": [r.peer, r.file, r.lines, r.entries, r.last_seq, r.head, r.checkpoints,
                   [_finding(f) for f in r.findings], r.segments, r.runs, r.torn_bytes, r.suppressed, r.intact],
        "facts": {
            "peer": facts.peer, "file": facts.file, "last_seq": facts.last_seq,
            "segments": [_segment(s) for s in facts.segments],
            "streams": [[list(k), _stream(s)] for k, s in facts.streams.items()],
            "checkpoints": [[k, v] for k, v in facts.checkpoints.items()],
            "heads": facts.heads,
            "own_metrics": [[list(k), v] for k, v in facts.own_metrics.items()],
            "reported_metrics": facts.reported_metrics,
            "flows": [[list(k), v] for k, v in facts.flows.items()],
            "message_times": facts.message_times,
            "policy_mismatch": facts.policy_mismatch,
            "policy_mismatch_count": facts.policy_mismatch_count,
        },
    }
    return encode_value(out)


def load_scan(data: bytes) -> tuple[FileReport, LogFacts]:
    """The report and facts `dump_scan` wrote, rebuilt as the objects a scan in this process returns.

    Raises:
        ValueError, TypeError, KeyError: `data` is not what `dump_scan` writes.
    """
    doc = parse(data)
    peer, file, lines, entries, last_seq, head, checkpoints, findings, segments, runs, torn, suppressed, intact = \
        doc["report"]
    report = FileReport(peer=peer, file=file, lines=lines, entries=entries, last_seq=last_seq, head=head,
                        checkpoints=checkpoints, findings=[_load_finding(f) for f in findings], segments=segments,
                        runs=runs, torn_bytes=torn, suppressed=suppressed, intact=intact)
    f = doc["facts"]
    facts = LogFacts(
        peer=f["peer"], file=f["file"], last_seq=f["last_seq"],
        segments=[_load_segment(s) for s in f["segments"]],
        streams={(a, b, c): _load_stream(s) for (a, b, c), s in f["streams"]},
        checkpoints={k: tuple(v) for k, v in f["checkpoints"]},
        heads=[tuple(h) for h in f["heads"]],
        own_metrics={(run, epoch): v for (run, epoch), v in f["own_metrics"]},
        reported_metrics=[tuple(m) for m in f["reported_metrics"]],
        flows={_flow_key(k): v for k, v in f["flows"]},
        message_times=tuple(f["message_times"]),
        policy_mismatch=f["policy_mismatch"],
        policy_mismatch_count=f["policy_mismatch_count"],
    )
    return report, facts
