"""What the verifier reports: findings per file and across peers, as a table or as JSON.

A `Finding` names the log it is about (peer and file), the kind of problem, the entry numbers
(seq, as ranges), a message an auditor can act on, where another log proves it (evidence), and
the **party** that must have acted: the peer whose key signed the inconsistent data ("" when the
logs cannot tell which of two parties it was; `suspects` then names both).
`AuditReport.exit_code` is the CLI's (`VerifyExit`): 0 clean, 1 findings, 2 cannot verify or
incomplete (no policy given), 3 internal error.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final


class VerifyExit(enum.IntEnum):
    """Exit codes of `secure-split audit verify`."""

    CLEAN = 0  # every log intact, consistent across peers, every flow allowed by the policy given
    FINDINGS = 1  # at least one error finding
    CANNOT_VERIFY = 2  # inputs missing or unreadable, or incomplete (no policy to check against)
    INTERNAL_ERROR = 3  # the verifier itself failed (one line of explanation on stderr)


MAX_FINDINGS: Final[int] = 1000
"""Findings kept per report; past it, findings are counted (`AuditReport.suppressed`), not kept."""

FINDING_KINDS: Final[dict[str, str]] = {
    # per file
    "modified": "an entry's bytes changed after it was written (the next entry's prev no longer matches)",
    "deleted": "entries are missing from the chain",
    "reordered": "entries are present but out of order",
    "duplicated": "an entry appears more than once",
    "inserted": "a line that is not part of the hash chain",
    "truncated": "the log ends early: proved by a counterparty's signed head (error) or the log is not "
    "closed by run_end and a final checkpoint (warning: a crash, or a removed tail)",
    "forged_signature": "a checkpoint signature does not verify with the peer's key, or is missing",
    "unknown_key": "a checkpoint or head is signed with a key that is not this peer's key in the deployment",
    "torn_tail": "a partial last line: the writer crashed mid-write (not tampering)",
    "malformed": "an entry that chains correctly but breaks the format (keys, types, canonical encoding)",
    # across peers
    "missing_counterpart": "a message one peer logged has no matching entry in the other peer's log",
    "digest_mismatch": "sender and receiver logged the same message with different facts or digests",
    "head_mismatch": "a counterparty holds this peer's signed head, but this log's entry differs",
    "equivocation": "a peer signed two different heads for the same seq",
    # policy
    "policy_violation": "a logged flow is not allowed by the policy in force",
    "policy_mismatch": "entries were logged under a different policy hash than the policy checked",
    "raw_data": "an entry shows a message kind that could carry raw features or labels",
    # format 2: runs, close round, attribution
    "garbage": "lines that are not entries at all (one finding per contiguous range of lines)",
    "run_mismatch": "an entry binds a run, deployment or policy other than the one it stands in",
    "unsigned_tail": "entries after the last head a counterparty countersigned: warning after a crash or an "
    "incomplete close round, error when the segment closed normally",
    "duplicate_message": "two entries name the same message (sender, receiver, session, seq)",
    "message_gap": "a log skips protocol seqs of a session that its own later entries prove it handled",
    "metrics_mismatch": "a peer's signed metrics statement differs from the metrics its own log records",
    "in_flight": "a message logged by one side only, across a crash of the other (warning)",
    "time_order": "entry times that are not RFC 3339 UTC or go backwards within a log (warning)",
    "out_of_window": "messages too far out of step between two logs for the verifier's window",
}
"""Every kind of finding, with the sentence the README and the table legend use."""

def to_ranges(numbers: Iterable[int]) -> tuple[tuple[int, int], ...]:
    """Compress entry numbers into sorted inclusive ranges: [1, 2, 3, 7] -> ((1, 3), (7, 7))."""
    out: list[list[int]] = []
    for n in sorted(set(numbers)):
        if out and n == out[-1][1] + 1:
            out[-1][1] = n
        else:
            out.append([n, n])
    return tuple((a, b) for a, b in out)


def format_ranges(ranges: tuple[tuple[int, int], ...], limit: int = 8) -> str:
    """Render ranges for people: '5, 7-9, 12' (at most `limit` ranges, then '...')."""
    parts = [str(a) if a == b else f"{a}-{b}" for a, b in ranges[:limit]]
    if len(ranges) > limit:
        parts.append(f"... ({len(ranges) - limit} more)")
    return ", ".join(parts) if parts else "-"


@dataclass(frozen=True)
class Finding:
    """One problem found in one peer's log.

    Attributes:
        kind: one of `FINDING_KINDS`.
        peer: the peer whose log shows the problem.
        file: that log's file name.
        entries: the entry numbers (seq) concerned, as inclusive ranges.
        message: what is wrong and how it was seen.
        severity: "error" (evidence of tampering or a violation) or "warning" (a crash artefact).
        evidence: entries of other logs that prove it, as "PEER:SEQ".
        party: the peer that must have acted (whose key signed the inconsistent data); "" when
            the logs cannot tell, or for a warning (a crash is nobody's wrongdoing).
        suspects: when `party` is "", the peers one of which must have acted.
    """

    kind: str
    peer: str
    file: str
    entries: tuple[tuple[int, int], ...]
    message: str
    severity: str = "error"
    evidence: tuple[str, ...] = ()
    party: str = ""
    suspects: tuple[str, ...] = ()

    def covers(self, seq: int) -> bool:
        """True when entry `seq` is among this finding's entries."""
        return any(a <= seq <= b for a, b in self.entries)

    def describe(self) -> str:
        """One line: 'kind in file, entries 5-7: message'."""
        return f"{self.kind} in {self.file}, entries {format_ranges(self.entries)}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (entries as [first, last] pairs)."""
        return {
            "kind": self.kind,
            "severity": self.severity,
            "peer": self.peer,
            "file": self.file,
            "entries": [list(r) for r in self.entries],
            "message": self.message,
            "evidence": list(self.evidence),
            "party": self.party or None,
            "suspects": list(self.suspects),
        }


@dataclass
class FileReport:
    """The result of verifying one peer's log on its own (chain, signatures, format).

    Attributes:
        peer: whose log it is.
        file: the file name.
        lines: complete lines in the file.
        entries: entries that belong to the chain (lines minus duplicates and inserted lines).
        last_seq: the highest seq of the chain (-1 if none).
        head: the entry hash of the last entry (what a resumed writer continues from).
        checkpoints: signed checkpoints that verified.
        findings: problems found in this file alone.
        segments: how many run segments the file holds.
        runs: the run ids the file's segments were bound to, in order.
        intact: set by the verifier: no finding is attributed to this file's peer.
    """

    peer: str
    file: str
    lines: int
    entries: int
    last_seq: int
    head: str
    checkpoints: int
    findings: list[Finding]
    segments: int = 0
    runs: list[str] = field(default_factory=list)
    torn_bytes: int = 0
    suppressed: int = 0
    intact: bool = True

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary of the file."""
        return {
            "peer": self.peer,
            "file": self.file,
            "lines": self.lines,
            "entries": self.entries,
            "last_seq": self.last_seq,
            "head": self.head,
            "checkpoints_verified": self.checkpoints,
            "segments": self.segments,
            "runs": list(self.runs),
            "intact": self.intact,
        }


@dataclass
class AuditReport:
    """The verdict on a folder of logs: per file, across peers, and against the policy.

    Attributes:
        files: one report per log file verified.
        findings: every finding kept (per file, across peers, policy), at most `MAX_FINDINGS`.
        unverifiable: reasons verification could not be completed (missing log, unreadable file).
        checks: counts of what was checked (entries, messages matched, heads compared, flows).
        policy_hash: the policy checked against, or None when compliance was not checked.
        deployment_hash: the deployment verified against.
        suppressed: findings past `MAX_FINDINGS`, counted and not kept.
        runs: run id -> the peers whose logs hold a segment bound to it.
    """

    files: list[FileReport]
    findings: list[Finding]
    unverifiable: list[str] = field(default_factory=list)
    checks: dict[str, int] = field(default_factory=dict)
    policy_hash: str | None = None
    deployment_hash: str = ""
    suppressed: int = 0
    runs: dict[str, list[str]] = field(default_factory=dict)

    @property
    def errors(self) -> list[Finding]:
        """The findings of severity error."""
        return [f for f in self.findings if f.severity == "error"]

    @property
    def clean(self) -> bool:
        """True when every log verified, nothing was found and the policy was checked."""
        return self.exit_code == VerifyExit.CLEAN

    @property
    def exit_code(self) -> VerifyExit:
        """0 clean; 1 an error finding; 2 cannot verify or no policy checked. Findings win over 2."""
        if self.errors or self.suppressed:
            return VerifyExit.FINDINGS
        if self.unverifiable or self.policy_hash is None:
            return VerifyExit.CANNOT_VERIFY
        return VerifyExit.CLEAN

    @property
    def status(self) -> str:
        """"clean", "findings", "cannot_verify" or "incomplete" (nothing else wrong, but no policy)."""
        code = self.exit_code
        if code == VerifyExit.CANNOT_VERIFY and not self.unverifiable:
            return "incomplete"
        return {0: "clean", 1: "findings", 2: "cannot_verify"}[int(code)]

    def of_kind(self, kind: str) -> list[Finding]:
        """The findings of one kind."""
        return [f for f in self.findings if f.kind == kind]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready report."""
        return {
            "format": "secure-split-audit-report/2",
            "status": self.status,
            "exit_code": int(self.exit_code),
            "deployment_hash": self.deployment_hash,
            "policy_hash": self.policy_hash,
            "policy_checked": self.policy_hash is not None,
            "runs": {r: list(p) for r, p in self.runs.items()},
            "files": [f.summary() for f in self.files],
            "findings": [f.to_dict() for f in self.findings],
            "findings_suppressed": self.suppressed,
            "unverifiable": list(self.unverifiable),
            "checks": dict(self.checks),
        }

    def to_json(self) -> str:
        """The machine-readable report (what `audit verify --json` prints)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def render_table(self) -> Any:
        """A rich renderable: one table of files, one of findings, and the verdict.

        Returns:
            A `rich.console.Group` to print with a rich Console.
        """
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        files = Table(title="audit logs", title_justify="left")
        for col, justify in (("peer", "left"), ("file", "left"), ("entries", "right"),
                             ("checkpoints", "right"), ("last seq", "right"), ("verdict", "left")):
            files.add_column(col, justify=justify)  # type: ignore[arg-type]
        by_file: dict[str, list[Finding]] = {}
        for f in self.findings:
            by_file.setdefault(f.file, []).append(f)
        for fr in self.files:
            mine = by_file.get(fr.file, [])
            kinds = sorted({f.kind for f in mine})
            verdict = Text("intact", style="green") if not mine else Text(", ".join(kinds), style="red")
            if fr.intact and mine:
                verdict = Text("intact (see findings)", style="yellow")
            files.add_row(fr.peer, fr.file, str(fr.entries), str(fr.checkpoints), str(fr.last_seq), verdict)
        parts: list[Any] = [files] if self.files else []
        if self.findings:
            table = Table(title="findings", title_justify="left", show_lines=False)
            for col in ("severity", "kind", "log", "entries", "party", "message"):
                table.add_column(col, overflow="fold")
            for f in self.findings:
                msg = f.message + (f" (evidence: {', '.join(f.evidence[:4])})" if f.evidence else "")
                style = "yellow" if f.severity == "warning" else "red"
                party = f.party or ("one of " + ", ".join(f.suspects) if f.suspects else "-")
                table.add_row(Text(f.severity, style=style), f.kind, f.peer, format_ranges(f.entries), party, msg)
            parts.append(table)
            if self.suppressed:
                parts.append(Text(f"... and {self.suppressed} more finding(s) not shown", style="red"))
        for reason in self.unverifiable:
            parts.append(Text(f"cannot verify: {reason}", style="red"))
        checks = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sorted(self.checks.items()))
        if checks:
            parts.append(Text(f"checked: {checks}"))
        if self.policy_hash is None:
            parts.append(Text("policy compliance: not checked (no policy given)", style="yellow"))
        n_err = len(self.errors) + self.suppressed
        said, style = {"clean": ("CLEAN: every log intact, consistent across peers, every flow allowed", "bold green"),
                       "findings": (f"FINDINGS: {n_err} error(s)", "bold red"),
                       "cannot_verify": ("CANNOT VERIFY: see above", "bold red"),
                       "incomplete": ("INCOMPLETE: logs consistent, but no policy was given to check the flows "
                                      "against (--policy)", "bold yellow")}[self.status]
        parts.append(Text(said, style=style))
        return Group(*parts)
