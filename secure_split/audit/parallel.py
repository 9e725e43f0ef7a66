"""Scan the logs of a set in parallel processes: one child per log, its result back as JSON.

Pass 1 of `verify_logs` (each log on its own, `chain.scan_file`) is independent per file and takes
almost all the time; on a large set with more than one core, each log is scanned by a child
process (`python -c "...parallel import main; main()"`, the request on stdin) that writes its
`FileReport` and `LogFacts` as JSON (`transfer.py`, never pickle). The cross-peer and policy
passes then run here as they always do.

The children share one hash seed, drawn at random for each verification: a stream's order-free sum
adds Python hashes of the message facts, and the sums of two logs are compared, so the logs of one
set must be hashed with one key. If any child fails (cannot start, dies, writes something else),
every log is scanned again in this process, so the verdict never depends on the children.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Final

from secure_split.audit.chain import VerifyContext, scan_file
from secure_split.audit.encoding import encode_value, parse
from secure_split.audit.facts import LogFacts
from secure_split.audit.report import FileReport
from secure_split.audit.transfer import dump_scan, load_scan
from secure_split.errors import AuditError

PARALLEL_MIN_BYTES: Final[int] = 64 * 2**20
"""Sets smaller than this (all logs together) are scanned in this process: a child costs a start."""

MAX_WORKERS: Final[int] = 4
"""Most child processes at once (each holds its own log's window and facts: ~100 MB)."""

Scan = tuple[FileReport, LogFacts] | AuditError
_CHILD = "from secure_split.audit.parallel import main; main()"


def auto_workers(paths: list[Path]) -> int:
    """How many processes to scan these logs with: 1 below `PARALLEL_MIN_BYTES` or on one core, else
    one per log, at most the cores this process may use and `MAX_WORKERS`."""
    try:
        total = sum(p.stat().st_size for p in paths)
    except OSError:
        return 1
    if total < PARALLEL_MIN_BYTES or len(paths) < 2:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(len(paths), cores, MAX_WORKERS))


def _scan_here(peer: str, path: Path, context: VerifyContext) -> Scan:
    try:
        return scan_file(path, peer=peer, context=context)
    except AuditError as exc:
        return exc


def _scan_in_child(peer: str, path: Path, context: VerifyContext, seed: int) -> Scan | None:
    """One log scanned by a child process; None when the child failed (the caller scans it here)."""
    import secure_split

    root = str(Path(secure_split.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONHASHSEED": str(seed),
           "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}
    request = encode_value({"path": str(path), "peer": peer, "deployment_hash": context.deployment_hash,
                            "keys": dict(context.keys)})
    try:
        proc = subprocess.run([sys.executable, "-c", _CHILD], input=request, capture_output=True, env=env,
                              check=False)
        if proc.returncode != 0:
            return None
        if proc.stdout.startswith(b'{"error":'):
            return AuditError(str(parse(proc.stdout)["error"]))
        return load_scan(proc.stdout)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def scan_files(files: list[tuple[str, Path]], context: VerifyContext, workers: int) -> dict[str, Scan]:
    """Scan each (peer, path) on its own; with workers > 1 in that many child processes at once.

    Returns:
        peer -> (report, facts), or the AuditError that made the file unreadable.
    """
    if workers <= 1 or len(files) < 2 or context.cache_lines:
        return {peer: _scan_here(peer, path, context) for peer, path in files}
    seed = secrets.randbelow(2**32)
    # Largest first, so the last child to start is a short one.
    order = sorted(files, key=lambda f: -f[1].stat().st_size if f[1].is_file() else 0)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        done = list(pool.map(lambda f: (f[0], _scan_in_child(f[0], f[1], context, seed)), order))
    results = dict(done)
    if any(r is None for r in results.values()):
        return {peer: _scan_here(peer, path, context) for peer, path in files}
    return {peer: r for peer, r in results.items() if r is not None}


def main() -> None:
    """The child: read {path, peer, deployment_hash, keys} on stdin, write the scan's JSON on stdout."""
    request = parse(sys.stdin.buffer.read())
    context = VerifyContext(deployment_hash=request["deployment_hash"], keys=request["keys"])
    try:
        report, facts = scan_file(request["path"], peer=request["peer"], context=context)
    except AuditError as exc:
        sys.stdout.buffer.write(encode_value({"error": str(exc)}))
        return
    sys.stdout.buffer.write(dump_scan(report, facts))
