"""`verify_logs`: the auditor's verdict on a folder of audit logs, offline and from the logs alone.

Three passes:

1. per file (`chain.verify_lines`): hash chain, seq order, checkpoint signatures, format, ending;
   files are verified in parallel processes when there is enough work and more than one core;
2. across peers (`crosscheck.cross_check`): every message on both sides with the same facts and
   digest, countersigned heads agree with the logs they name, no equivocation;
3. policy (`compliance.check_compliance`, only when a policy is given): every logged flow allowed.

Works without torch or tenseal: it needs the standard library, pyyaml and pydantic (to read the
deployment), PyNaCl (signatures), rich (the table), and the policy package only for pass 3.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from secure_split.audit.chain import VerifyContext, foreign_deployment, paused_gc, read_log, verify_lines
from secure_split.audit.compliance import check_compliance
from secure_split.audit.crosscheck import LogFacts, compact, cross_check, extract_facts
from secure_split.audit.report import AuditReport, FileReport, Finding
from secure_split.errors import AuditError, SecureSplitError

# Below this much log data, starting worker processes costs more than it saves.
_PARALLEL_MIN_BYTES = 8 * 1024 * 1024


def _verify_one(path: str, peer: str, context: VerifyContext) -> tuple[FileReport | None, LogFacts | None, str | None]:
    """Verify one file; return its slim report and facts, or why it cannot be verified."""
    try:
        lines, torn = read_log(path)
    except AuditError as exc:
        return None, None, str(exc)
    foreign = foreign_deployment(lines, peer, context.deployment_hash)
    if foreign is not None:
        return None, None, (f"{Path(path).name} belongs to deployment {foreign[:16]}... (its run_start and "
                            f"genesis), not to the deployment given ({context.deployment_hash[:16]}...)")
    report = verify_lines(lines, peer=peer, context=context, torn=torn, file=Path(path).name)
    facts = extract_facts(report)
    report.infos = []
    report.excluded = frozenset()
    return report, facts, None


def _verify_job(
    args: tuple[str, str, str, dict[str, str], bool, bool],
) -> tuple[FileReport | None, LogFacts | None, str | None]:
    """One file in a worker process; the facts travel back compacted (digests, not messages)."""
    path, peer, deployment_hash, keys, strict, with_flows = args
    with paused_gc():
        report, facts, why = _verify_one(path, peer, VerifyContext(deployment_hash=deployment_hash, keys=keys,
                                                                   strict_encoding=strict))
        return report, compact(facts, with_flows=with_flows) if facts is not None else None, why


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _default_workers(files: int, total_bytes: int) -> int:
    """One process per file, up to the cores that are idle now; one process for small logs or a busy machine.

    On shared cores, worker processes compete with other work and lose more than they gain.
    """
    if total_bytes < _PARALLEL_MIN_BYTES or files < 2:
        return 1
    cpus = _cpus()
    try:
        idle = cpus - os.getloadavg()[0]
    except OSError:  # no load average on this platform
        idle = cpus - 1
    return max(1, min(files, cpus, int(idle + 0.5) + 1)) if idle >= 1 else 1


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


def verify_logs(
    log_dir: str | Path,
    deployment: Any,
    policy: Any = None,
    *,
    workers: int | None = None,
    strict_encoding: bool = False,
) -> AuditReport:
    """Verify every peer's audit log in `log_dir` against the deployment (and the policy).

    Args:
        log_dir: the folder holding one `PEER.jsonl` per peer of the deployment.
        deployment: a loaded `Deployment` or the path of `deployment.yaml` (public keys, hash).
        policy: a loaded `Policy`, the path of the policy file, or None to skip policy compliance.
        workers: processes for the per-file pass (default: one per file up to the idle cores when
            the logs are large, else 1).
        strict_encoding: re-encode every entry to check canonical encoding (default: every entry
            but messages, and messages on a sample; see `VerifyContext`).

    Returns:
        The report: `clean`, `findings`, `unverifiable`, `exit_code` (0 clean, 1 a problem found,
        2 cannot verify), `to_json()`, `render_table()`.
    """
    with paused_gc():
        return _verify_logs(log_dir, deployment, policy, workers, strict_encoding)


def _verify_logs(
    log_dir: str | Path, deployment: Any, policy: Any, workers: int | None, strict_encoding: bool
) -> AuditReport:
    try:
        dep = _load_deployment(deployment)
    except SecureSplitError as exc:
        return AuditReport(files=[], findings=[], unverifiable=[f"cannot read the deployment: {exc}"])
    context = VerifyContext.from_deployment(dep, strict_encoding=strict_encoding)
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
                           deployment_hash=dep.hash)
    findings: list[Finding] = []
    jobs: list[tuple[str, str]] = []
    for peer in sorted(dep.spec.peers):
        path = directory / f"{peer}.jsonl"
        if path.is_file():
            jobs.append((str(path), peer))
        else:
            unverifiable.append(f"no audit log for peer '{peer}' (expected {path})")
    for path in sorted(directory.glob("*.jsonl")):
        if path.stem not in dep.spec.peers:
            findings.append(Finding("unknown_key", path.stem, path.name, (),
                                    f"{path.name} is the log of '{path.stem}', which is not a peer of the deployment"))
    total_bytes = sum(os.path.getsize(p) for p, _ in jobs)
    if workers is None:
        workers = _default_workers(len(jobs), total_bytes)
    results: list[tuple[FileReport | None, LogFacts | None, str | None]]
    if workers > 1 and len(jobs) > 1:
        results = _run_parallel(jobs, context, workers, with_flows=pol is not None)
    else:
        results = [_verify_one(p, peer, context) for p, peer in jobs]
    files: list[FileReport] = []
    logs: dict[str, LogFacts] = {}
    for report, facts, why in results:
        if report is None or facts is None:
            unverifiable.append(why or "unreadable log")
            continue
        files.append(report)
        findings.extend(report.findings)
        logs[report.peer] = facts
    checks: dict[str, int] = {
        "files": len(files),
        "entries": sum(f.entries for f in files),
        "checkpoints_verified": sum(f.checkpoints for f in files),
    }
    paths = {peer: path for path, peer in jobs}

    def reload(peer: str) -> LogFacts:
        # Full facts of a log whose compact digests disagreed with a counterparty's.
        full = _verify_one(paths[peer], peer, context)[1]
        if full is None:  # readable a moment ago: it changed under us
            raise AuditError(f"{paths[peer]} could not be read again")
        return full

    cross, counts = cross_check(logs, context, reload)
    findings.extend(cross)
    checks.update(counts)
    if pol is not None:
        pfind, pcounts, pproblems = check_compliance(logs, pol)
        findings.extend(pfind)
        checks.update(pcounts)
        unverifiable.extend(pproblems)
    return AuditReport(files=files, findings=findings, unverifiable=unverifiable, checks=checks,
                       policy_hash=pol.hash if pol is not None else None, deployment_hash=dep.hash)


def _run_parallel(
    jobs: list[tuple[str, str]], context: VerifyContext, workers: int, *, with_flows: bool
) -> list[tuple[FileReport | None, LogFacts | None, str | None]]:
    """The per-file pass in worker processes (fork where available, else sequential)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    if "fork" not in multiprocessing.get_all_start_methods():
        return [_verify_one(p, peer, context) for p, peer in jobs]
    # Largest files first so the longest job starts at once.
    order = sorted(range(len(jobs)), key=lambda i: -os.path.getsize(jobs[i][0]))
    args = [(jobs[i][0], jobs[i][1], context.deployment_hash, dict(context.keys), context.strict_encoding, with_flows)
            for i in order]
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork")) as pool:
        done = list(pool.map(_verify_job, args))
    results: list[Any] = [None] * len(jobs)
    for i, res in zip(order, done, strict=True):
        results[i] = res
    return results
