"""Continuing an existing audit log file: the checks before a new run segment is appended.

A writer process never rewrites what is on disk: it verifies the file with its own key (any error
refuses to continue it), truncates a torn last line (a crash mid-write), and records how the
previous segment ended in the new segment's `run_start.previous`.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from secure_split.audit.format import HEX64
from secure_split.errors import AuditError


def nonce_hex(nonce: str | bytes | None) -> str:
    """A run nonce as 64 hex digits: fresh when None, else checked (32 bytes, or 64 lowercase hex digits).

    Raises:
        AuditError: not a 32-byte nonce.
    """
    if nonce is None:
        return secrets.token_bytes(32).hex()
    if isinstance(nonce, bytes):
        if len(nonce) != 32:
            raise AuditError(f"a run nonce is 32 bytes, got {len(nonce)}")
        return nonce.hex()
    if not HEX64.fullmatch(nonce):
        raise AuditError("a run nonce is 64 lowercase hex digits")
    return nonce


def prepare_continue(path: Path, *, peer: str, key_hex: str,
                      deployment_hash: str) -> tuple[int, str, dict[str, Any]]:
    """Verify an existing log with our own key and drop a torn tail, before a new segment continues it.

    Returns:
        (last seq, last entry hash, the new run_start's `previous`).

    Raises:
        AuditError: the log belongs to another deployment or fails verification (it is left as it was).
    """
    from secure_split.audit.chain import VerifyContext, scan_file
    from secure_split.audit.reading import foreign_deployment

    other = foreign_deployment(path, peer, deployment_hash)
    if other is not None:
        raise AuditError(
            f"cannot continue audit log {path}: it was written under deployment {other}, but this run's deployment "
            f"hashes to {deployment_hash}; a resumed run needs the same deployment.yaml. The log is left as it "
            "was; start the run with a fresh audit folder (or move the old log away) to run under the changed "
            "deployment.")
    ctx = VerifyContext(deployment_hash=deployment_hash, keys={peer: key_hex}, own_only=True)
    report, facts = scan_file(path, peer=peer, context=ctx)
    fatal = [f for f in report.findings if f.severity == "error"]
    if fatal:
        listing = "; ".join(f.describe() for f in fatal[:5])
        raise AuditError(f"cannot continue audit log {path}: it fails verification ({listing}). It will not be "
                         "continued; keep it as evidence and start the run with a fresh audit folder.")
    data_len = path.stat().st_size
    torn_len = report.torn_bytes
    digest = ""
    if torn_len:
        import hashlib

        h = hashlib.sha256()
        with open(path, "r+b") as fh:
            fh.seek(data_len - torn_len)
            while block := fh.read(1 << 20):
                h.update(block)
            fh.truncate(data_len - torn_len)
            fh.flush()
            os.fsync(fh.fileno())
        digest = h.hexdigest()
    last = facts.segments[-1] if facts.segments else None
    previous = {
        "seq": report.last_seq,
        "head": report.head,
        "run_id": last.run if last is not None else "",
        "closed": last is not None and not last.crashed,
        "torn_tail_bytes": torn_len,
        "torn_tail_sha256": digest,
    }
    return report.last_seq, report.head, previous
