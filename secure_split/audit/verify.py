"""`verify_logs`: the auditor's verdict on a folder of audit logs, offline and from the logs alone.

Three passes, streaming, memory bounded by peers x sessions x a window (not by log length):

1. per file (`chain.scan_file`): hash chain, seq order, canonical encoding, signatures, run
   segments, the end of the log; reduced to `LogFacts` (on a large set, one child process per log:
   `parallel.py`);
2. across peers (`crosscheck.CrossCheck`): countersigned heads and runs, the close round's tail,
   every message on both sides, signed metrics, each finding attributed to the party that acted;
3. policy (`compliance.check_compliance`): every segment ran under the policy given, every logged
   flow allowed. Without a policy the verdict is "incomplete" (exit 2), never clean.

Works without torch or tenseal: the standard library, orjson, pyyaml and pydantic (the
deployment), PyNaCl (signatures), rich (the table), and the policy package only for pass 3.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from secure_split.audit.chain import VerifyContext
from secure_split.audit.compliance import check_compliance
from secure_split.audit.crosscheck import CrossCheck
from secure_split.audit.encoding import JSONDecodeError, parse
from secure_split.audit.facts import LogFacts
from secure_split.audit.parallel import auto_workers, scan_files
from secure_split.audit.reading import LineReader, foreign_deployment
from secure_split.audit.regions import paused_gc
from secure_split.audit.report import MAX_FINDINGS, AuditReport, FileReport, Finding
from secure_split.errors import AuditError, SecureSplitError


def _load_deployment(deployment: Any) -> Any:
    if isinstance(deployment, str | Path):
        from secure_split.config import load_deployment

        return load_deployment(deployment)
    return deployment


def _load_policy(policy: Any) -> Any:
    if isinstance(policy, str | Path):
        from secure_split.policy import load_policy

        return load_policy(policy)
    return policy


def _reread(paths: dict[str, Path]) -> Any:
    """Pass 2: stream one log again for the message entries of one session (bytes filter first)."""

    def items(peer: str, session: str) -> Iterator[tuple[int, str, dict[str, Any]]]:
        needle = f'"session":"{session}"'.encode()
        with open(paths[peer], "rb") as fh:
            for line in LineReader(fh, lambda _n, _l: None):
                if needle not in line:
                    continue
                try:
                    e = parse(line)
                except JSONDecodeError:
                    continue
                if type(e) is dict and type(e.get("data")) is dict and type(e.get("seq")) is int:
                    yield e["seq"], str(e.get("event")), e["data"]

    return items


def verify_logs(log_dir: str | Path, deployment: Any, policy: Any = None, *, workers: int | None = None) -> AuditReport:
    """Verify every peer's log in a folder: per file, across peers, and against the policy.

    Args:
        log_dir: folder with one `PEER.jsonl` per peer of the deployment.
        deployment: a loaded `Deployment`, or the path of deployment.yaml (public keys).
        policy: a loaded `Policy` or its path; None: compliance is not checked and the verdict is
            at best "incomplete" (exit 2).
        workers: processes that scan the logs (pass 1) at once; 1: all in this process; None: as
            many as pay off (`parallel.auto_workers`: one per log on a set of 64 MiB or more, at
            most the cores available and 4). The verdict is the same either way.

    Returns:
        The report (`exit_code`: 0 clean, 1 findings, 2 cannot verify or incomplete). Never raises
        for bad inputs; an internal failure is the CLI's exit 3.
    """
    with paused_gc():
        return _verify_logs(log_dir, deployment, policy, workers)


def _verify_logs(log_dir: str | Path, deployment: Any, policy: Any, workers: int | None) -> AuditReport:
    try:
        dep = _load_deployment(deployment)
    except SecureSplitError as exc:
        return AuditReport(files=[], findings=[], unverifiable=[f"cannot read the deployment: {exc}"])
    context = VerifyContext.from_deployment(dep)
    unverifiable: list[str] = []
    pol = None
    if policy is not None:
        try:
            pol = _load_policy(policy)
        except (SecureSplitError, ImportError, OSError) as exc:
            unverifiable.append(f"cannot read the policy: {exc}")
    directory = Path(log_dir)
    if not directory.is_dir():
        return AuditReport(files=[], findings=[], unverifiable=[*unverifiable, f"{directory} is not a folder"],
                           deployment_hash=dep.hash, policy_hash=pol.hash if pol is not None else None)
    findings: list[Finding] = []
    suppressed = 0
    files: list[FileReport] = []
    logs: dict[str, LogFacts] = {}
    paths: dict[str, Path] = {}
    todo: list[tuple[str, Path]] = []
    for peer in sorted(dep.spec.peers):
        path = directory / f"{peer}.jsonl"
        if not path.is_file():
            unverifiable.append(f"no audit log for peer '{peer}' (expected {path})")
            continue
        foreign = foreign_deployment(path, peer, dep.hash)
        if foreign is not None:
            unverifiable.append(f"{path.name} belongs to deployment {foreign[:16]}... (its run_start and genesis), "
                                f"not to the deployment given ({dep.hash[:16]}...)")
            continue
        todo.append((peer, path))
    scans = scan_files(todo, context, auto_workers([p for _, p in todo]) if workers is None else workers)
    for peer, path in todo:
        scan = scans[peer]
        if isinstance(scan, AuditError):
            unverifiable.append(str(scan))
            continue
        report, facts = scan
        files.append(report)
        findings.extend(report.findings)
        suppressed += report.suppressed
        logs[peer] = facts
        paths[peer] = path
    for path in sorted(directory.glob("*.jsonl")):
        if path.stem not in dep.spec.peers:
            findings.append(Finding("unknown_key", path.stem, path.name, (),
                                    f"{path.name} is the log of '{path.stem}', which is not a peer of the deployment",
                                    "warning"))
    checks: dict[str, int] = {
        "files": len(files),
        "entries": sum(f.entries for f in files),
        "checkpoints_verified": sum(f.checkpoints for f in files),
    }
    cross, counts = CrossCheck(logs, dep.hash, dict(context.keys), _reread(paths)).run()
    findings.extend(cross)
    checks.update(counts)
    if pol is not None:
        pfind, pcounts, pproblems = check_compliance(logs, pol)
        findings.extend(pfind)
        checks.update(pcounts)
        unverifiable.extend(pproblems)
    runs: dict[str, list[str]] = {}
    for facts in logs.values():
        for seg in facts.segments:
            for _at, run, _n in seg.runs:
                if facts.peer not in runs.setdefault(run, []):
                    runs[run].append(facts.peer)
    blamed = {f.party for f in findings if f.severity == "error" and f.party}
    for fr in files:
        fr.intact = fr.peer not in blamed
    if len(findings) > MAX_FINDINGS:
        findings.sort(key=lambda f: f.severity != "error")
        suppressed += len(findings) - MAX_FINDINGS
        findings = findings[:MAX_FINDINGS]
    return AuditReport(files=files, findings=findings, unverifiable=unverifiable, checks=checks,
                       policy_hash=pol.hash if pol is not None else None, deployment_hash=dep.hash,
                       suppressed=suppressed, runs=runs)
