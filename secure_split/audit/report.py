"""What the verifier reports: findings per file and across peers, as a table or as JSON.

A `Finding` names the log it is about (peer and file), the kind of problem, the entry numbers
(seq, as ranges), a message an auditor can act on, and where another log proves it (evidence).
`AuditReport.exit_code` is the CLI's: 0 clean, 1 a problem found, 2 cannot verify.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from secure_split.errors import ExitCode

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
    """

    kind: str
    peer: str
    file: str
    entries: tuple[tuple[int, int], ...]
    message: str
    severity: str = "error"
    evidence: tuple[str, ...] = ()

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
        head: the entry hash of the last line (what a resumed writer continues from).
        checkpoints: signed checkpoints that verified.
        findings: problems found in this file alone.
    """

    peer: str
    file: str
    lines: int
    entries: int
    last_seq: int
    head: str
    checkpoints: int
    findings: list[Finding]
    # For the cross-peer and policy passes (not part of the JSON report):
    infos: list[Any] = field(default_factory=list, repr=False)
    excluded: frozenset[int] = field(default_factory=frozenset, repr=False)
    signed_heads: dict[int, tuple[str, bool, str]] = field(default_factory=dict, repr=False)

    @property
    def intact(self) -> bool:
        """True when this file on its own shows no problem."""
        return not self.findings

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
            "intact": self.intact,
        }


@dataclass
class AuditReport:
    """The verdict on a folder of logs: per file, across peers, and against the policy.

    Attributes:
        files: one report per log file verified.
        findings: every finding (per file, across peers, policy).
        unverifiable: reasons verification could not be completed (missing log, unreadable file).
        checks: counts of what was checked (entries, messages matched, heads compared, flows).
        policy_hash: the policy checked against, or None when compliance was not checked.
    """

    files: list[FileReport]
    findings: list[Finding]
    unverifiable: list[str] = field(default_factory=list)
    checks: dict[str, int] = field(default_factory=dict)
    policy_hash: str | None = None
    deployment_hash: str = ""

    @property
    def clean(self) -> bool:
        """True when every log verified and nothing was found."""
        return not self.findings and not self.unverifiable

    @property
    def exit_code(self) -> ExitCode:
        """0 clean, 1 a problem found, 2 cannot verify (a problem found wins over cannot verify)."""
        if self.findings:
            return ExitCode.FAILED
        if self.unverifiable:
            return ExitCode.BAD_CONFIG
        return ExitCode.OK

    def of_kind(self, kind: str) -> list[Finding]:
        """The findings of one kind."""
        return [f for f in self.findings if f.kind == kind]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready report."""
        status = {0: "clean", 1: "problems", 2: "cannot_verify"}[int(self.exit_code)]
        return {
            "format": "secure-split-audit-report/1",
            "status": status,
            "exit_code": int(self.exit_code),
            "deployment_hash": self.deployment_hash,
            "policy_hash": self.policy_hash,
            "policy_checked": self.policy_hash is not None,
            "files": [f.summary() for f in self.files],
            "findings": [f.to_dict() for f in self.findings],
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
            files.add_row(fr.peer, fr.file, str(fr.entries), str(fr.checkpoints), str(fr.last_seq), verdict)
        parts: list[Any] = [files] if self.files else []
        if self.findings:
            table = Table(title="findings", title_justify="left", show_lines=False)
            for col in ("severity", "kind", "peer", "entries", "message"):
                table.add_column(col, overflow="fold")
            for f in self.findings:
                msg = f.message + (f" (evidence: {', '.join(f.evidence[:4])})" if f.evidence else "")
                style = "yellow" if f.severity == "warning" else "red"
                table.add_row(Text(f.severity, style=style), f.kind, f.peer, format_ranges(f.entries), msg)
            parts.append(table)
        for reason in self.unverifiable:
            parts.append(Text(f"cannot verify: {reason}", style="red"))
        checks = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sorted(self.checks.items()))
        if checks:
            parts.append(Text(f"checked: {checks}"))
        if self.policy_hash is None:
            parts.append(Text("policy compliance: not checked (no policy given)", style="yellow"))
        said, style = {0: ("CLEAN: every log intact, consistent across peers", "bold green"),
                       1: (f"PROBLEMS: {len(self.findings)} finding(s)", "bold red"),
                       2: ("CANNOT VERIFY: see above", "bold red")}[int(self.exit_code)]
        parts.append(Text(said, style=style))
        return Group(*parts)
