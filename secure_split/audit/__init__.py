"""audit: the signed, tamper-evident audit log every peer writes, and the auditor's verifier.

Writer (`AuditLog`): one append-only JSON-lines file per peer, in run segments (one per writer
process), canonical encoding, hash chain, Ed25519-signed checkpoints bound to the run id, the
close round, counterparty heads and signed metrics. Verifier (`verify_logs`, `verify_file`,
`verify_lines`): streaming, per file, across peers with attribution, and against the policy;
imports neither torch nor tenseal. The format is specified in `audit/FORMAT.md`.
"""

from secure_split.audit.chain import VerifyContext, verify_file, verify_lines
from secure_split.audit.format import (
    MetricsStatement,
    SignedHead,
    compute_run_id,
    genesis_hash,
    head_message,
)
from secure_split.audit.reading import read_log, split_lines
from secure_split.audit.report import FINDING_KINDS, AuditReport, FileReport, Finding, VerifyExit
from secure_split.audit.verify import verify_logs
from secure_split.audit.writer import AuditLog

__all__ = [
    "FINDING_KINDS",
    "AuditLog",
    "AuditReport",
    "FileReport",
    "Finding",
    "MetricsStatement",
    "SignedHead",
    "VerifyContext",
    "VerifyExit",
    "compute_run_id",
    "genesis_hash",
    "head_message",
    "read_log",
    "split_lines",
    "verify_file",
    "verify_lines",
    "verify_logs",
]
