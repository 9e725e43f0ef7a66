"""audit: the signed, tamper-evident audit log every peer writes, and the auditor's verifier.

Writer (`AuditLog`): one append-only JSON-lines file per peer per run, canonical encoding, hash
chain, Ed25519-signed checkpoints, counterparty heads. Verifier (`verify_logs`, `verify_file`,
`verify_lines`): per file, across peers, and against the policy; imports neither torch nor
tenseal. The format is specified in `audit/FORMAT.md` at the repository root.
"""

from secure_split.audit.chain import VerifyContext, split_lines, verify_file, verify_lines
from secure_split.audit.format import SignedHead, genesis_hash, head_message
from secure_split.audit.report import FINDING_KINDS, AuditReport, FileReport, Finding
from secure_split.audit.verify import verify_logs
from secure_split.audit.writer import AuditLog

__all__ = [
    "FINDING_KINDS",
    "AuditLog",
    "AuditReport",
    "FileReport",
    "Finding",
    "SignedHead",
    "VerifyContext",
    "genesis_hash",
    "head_message",
    "split_lines",
    "verify_file",
    "verify_lines",
    "verify_logs",
]
