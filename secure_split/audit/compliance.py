"""Policy compliance of logged flows: every message was allowed by the policy in force.

Each distinct flow (direction, sender, receiver, kind, edge, byte length, dtype, shape, batch
size) is decided by the policy engine at the time of the log's first and of its last message:
a decision depends only on the flow, the policy and the time, and time matters only through the
policy's validity window (one interval), so a flow allowed at both ends was allowed throughout.
The verdict applies to every entry that logged the flow. An entry logged under another policy
hash is reported, not decided. A message kind outside
the protocol's closed set is reported as `raw_data`: raw features and labels have no message
kind, so such an entry can only mean something left an owner that never should have.

The policy package is imported here only, lazily, so the rest of the verifier works without it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from secure_split.audit.facts import LogFacts
from secure_split.audit.report import Finding, to_ranges

_UNDECIDED: Any = object()


def _when(timestamp: str) -> datetime | None:
    """An entry's `time` as an aware datetime (None if it cannot be read)."""
    try:
        return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).astimezone(UTC)
    except ValueError:
        return None


def check_compliance(logs: dict[str, LogFacts], policy: Any) -> tuple[list[Finding], dict[str, int], list[str]]:
    """Decide every logged flow with `policy`, and check each segment ran under it.

    Args:
        logs: peer -> its facts.
        policy: a loaded policy (`secure_split.policy.Policy`: `.hash`, `.decide(Flow)`).

    Returns:
        (findings, counts of what was checked, reasons the check could not be completed).
    """
    try:
        from secure_split.policy import Flow
        from secure_split.policy.kinds import KIND_SET
    except ImportError as exc:
        return [], {}, [f"policy compliance not checked: the policy engine cannot be imported ({exc})"]
    findings: list[Finding] = []
    problems: list[str] = []
    decided: dict[tuple[Any, ...], Any] = {}
    flows_checked = 0
    for facts in logs.values():
        other = [seg.start_seq for seg in facts.segments if seg.policy_hash != policy.hash]
        if other:
            findings.append(Finding(
                "policy_mismatch", facts.peer, facts.file, to_ranges(other),
                f"{len(other)} run segment(s) started under another policy (run_start's policy_hash) than the policy "
                f"checked ({policy.hash[:16]}...): their flows are not judged by it", party=facts.peer))
        skip = {seg.index for seg in facts.segments if seg.policy_hash != policy.hash}
        times: list[datetime | None] = [*sorted({w for t in facts.message_times if t and (w := _when(t))})]
        raw: dict[str, list[int]] = {}
        denied: dict[str, list[int]] = {}
        denied_count: dict[str, int] = {}
        for flow_key, (count, seqs) in facts.flows.items():
            if skip and all((seg := facts.segment_of(s)) is not None and seg.index in skip for s in seqs):
                continue
            event, sender, receiver, kind, edge, nbytes, dtype, shape, batch = flow_key
            direction = "send" if event == "message_sent" else "receive"
            if kind not in KIND_SET:
                raw.setdefault(str(kind), []).extend(seqs)
                continue
            flow = Flow(sender=sender, receiver=receiver, kind=kind, edge=edge or None,
                        direction="send" if direction == "send" else "receive", nbytes=nbytes, dtype=dtype,
                        shape=shape, batch_size=batch)
            refusal = None
            for when in times or [None]:  # no readable time: judge at the verifier's clock (None)
                decision = decided.get((flow_key, when))
                if decision is None:
                    try:
                        decision = policy.decide(flow, now=when)
                    except Exception as exc:  # an engine failure must not hide the other findings
                        problems.append(f"the policy engine failed on {sender} -> {receiver} {kind}: {exc}")
                        decision = _UNDECIDED
                    decided[(flow_key, when)] = decision
                if decision is not _UNDECIDED and not decision.allowed and refusal is None:
                    refusal = decision
            flows_checked += count
            if refusal is not None:
                why = f"{refusal.reason} (rule {refusal.rule_id})"
                denied.setdefault(why, []).extend(seqs)
                denied_count[why] = denied_count.get(why, 0) + count
        for kind, seqs in raw.items():
            findings.append(Finding(
                "raw_data", facts.peer, facts.file, to_ranges(seqs),
                f"message kind {kind!r} is not a protocol kind: raw features and labels have no kind, so these "
                "entries show data leaving its owner outside the protocol", party=facts.peer))
        for reason, seqs in denied.items():
            findings.append(Finding(
                "policy_violation", facts.peer, facts.file, to_ranges(seqs),
                f"{denied_count[reason]} logged message(s) not allowed by the policy: {reason} (entries shown: the "
                "first of each flow)", party=facts.peer))
    return findings, {"flows_checked": flows_checked, "policy_decisions": len(decided)}, problems
