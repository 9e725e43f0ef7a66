"""The audit log's on-disk format: the names, hashes and signed bytes writer and verifier share.

`audit/FORMAT.md` is the specification; this module is its executable half. Everything an
independent verifier must reproduce is defined here, in one place:

- an entry is one line of canonical JSON (`secure_split.canonical.canonical_json`) followed by
  `\\n`, with exactly the keys `ENTRY_KEYS` (a checkpoint adds `sig`);
- the **entry hash** is SHA-256 over the line's bytes as written (without the newline); for a
  checkpoint it is SHA-256 over the canonical JSON of the entry *without* its `sig` key, so the
  signature can cover the hash it sits next to;
- `prev` of entry 0 is the **genesis hash** of (peer, deployment); `prev` of entry n is the entry
  hash of entry n-1; the **chain head** after entry n is its entry hash;
- a checkpoint signs `head_message(peer, seq, head, deployment)` with the peer's Ed25519 key.

Pure standard library plus `secure_split.canonical`; no crypto imports (signatures are verified
by the verifier through `secure_split.crypto.keys`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from secure_split.canonical import canonical_json, sha256_hex
from secure_split.errors import RemoteProtocolError

FORMAT_VERSION: Final[int] = 1
"""Value of every entry's `v` key."""

GENESIS_FORMAT: Final[str] = "secure-split-audit-genesis/1"
HEAD_FORMAT: Final[str] = "secure-split-audit-head/1"

ENTRY_KEYS: Final[frozenset[str]] = frozenset({"v", "seq", "time", "peer", "event", "policy", "prev", "data"})
"""The keys of every entry, no more and no fewer."""

CHECKPOINT_KEYS: Final[frozenset[str]] = ENTRY_KEYS | {"sig"}
"""A checkpoint entry carries its signature in `sig` = {key, signature}."""

# Events the gate and the runtime write through `AuditLog.record`, with the fields each must carry.
GATE_EVENTS: Final[dict[str, frozenset[str]]] = {
    "run_start": frozenset({"deployment_hash", "policy_hash", "versions", "resumed", "resume_epoch"}),
    "message_sent": frozenset(
        {"kind", "edge", "step", "seq", "session", "sender", "receiver", "counterparty", "nbytes", "dtype",
         "shape", "batch_size", "digest", "decision_id", "rule_id"}
    ),
    "policy_denied": frozenset(
        {"direction", "sender", "receiver", "kind", "edge", "step", "nbytes", "decision_id", "rule_id", "reason"}
    ),
    "refused": frozenset({"direction", "counterparty", "reason", "error", "kind"}),
    "error": frozenset({"reason", "error"}),
    "peer_joined": frozenset({"counterparty", "reason"}),
    "peer_lost": frozenset({"counterparty", "reason"}),
    "checkpoint_saved": frozenset({"epoch", "digest"}),
    "checkpoint_resumed": frozenset({"epoch", "digest"}),
    "run_end": frozenset({"status", "reason", "metrics"}),
    # Vertical training: sizes of the PSI, never ids.
    "ids_aligned": frozenset({"parties", "own_size", "intersection_size"}),
    # Horizontal training: an owner replaced its weights (hand-off from `counterparty`, or an average).
    "weights_loaded": frozenset({"counterparty", "reason"}),
}
GATE_EVENTS["message_received"] = GATE_EVENTS["message_sent"]

# Events only the log itself writes (through checkpoint(), record_counterparty_head() and resume).
LOG_EVENTS: Final[dict[str, frozenset[str]]] = {
    "checkpoint": frozenset({"reason"}),
    "counterparty_head": frozenset({"counterparty", "seq", "head", "signature", "key"}),
    "log_resumed": frozenset({"last_seq", "torn_tail_bytes", "torn_tail_sha256"}),
}

EVENTS: Final[frozenset[str]] = frozenset(GATE_EVENTS) | frozenset(LOG_EVENTS)
"""Every event name a valid log may hold."""

MESSAGE_EVENTS: Final[frozenset[str]] = frozenset({"message_sent", "message_received"})

MAX_STRING_BYTES: Final[int] = 4096
"""Longest string value an entry may hold (UTF-8 bytes): a reason, never a payload."""

MAX_LIST_ITEMS: Final[int] = 256
"""Longest list an entry may hold (shapes have at most 8 items)."""

MAX_LINE_BYTES: Final[int] = 64 * 1024
"""Longest line the writer produces and the verifier accepts."""

HEX64: Final[re.Pattern[str]] = re.compile(r"[0-9a-f]{64}")
HEX128: Final[re.Pattern[str]] = re.compile(r"[0-9a-f]{128}")
PEER_NAME: Final[re.Pattern[str]] = re.compile(r"[a-z][a-z0-9_]{0,62}")


def _canonical_encoder() -> Callable[[Any], str]:
    """`json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)`, built once.

    `json.dumps` builds a new C encoder on every call, which costs as much as the encoding itself.
    """
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # no C accelerator (e.g. PyPy): the pure-Python encoder gives the same text
        return json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode
    enc = make(None, None, json.encoder.encode_basestring, None, ":", ",", True, False, False)
    return lambda obj: "".join(enc(obj, 0))


encode_canonical: Final[Callable[[Any], str]] = _canonical_encoder()
"""Canonical JSON text of a value that is already normalised (no whole floats, no NaN, no tuples):
the same text as `secure_split.canonical.canonical_json` gives for it. The writer normalises every
value first (`writer.clean_value`); the verifier re-encodes parsed entries, which are normalised
exactly when they were written canonically."""


def genesis_hash(peer: str, deployment_hash: str) -> str:
    """The `prev` of a log's first entry: binds the chain to one peer of one deployment.

    Args:
        peer: the peer's name.
        deployment_hash: hex SHA-256 of the deployment (`Deployment.hash`).

    Returns:
        Hex SHA-256 of canonical_json({"deployment", "format", "peer"}).
    """
    return sha256_hex(canonical_json({"deployment": deployment_hash, "format": GENESIS_FORMAT, "peer": peer}))


def head_message(peer: str, seq: int, head: str, deployment_hash: str) -> bytes:
    """The bytes a checkpoint signature covers.

    Args:
        peer: the signing peer.
        seq: the checkpoint entry's seq.
        head: the checkpoint entry's hash (the chain head at `seq`).
        deployment_hash: the deployment the log belongs to.

    Returns:
        canonical_json({"deployment", "format": HEAD_FORMAT, "head", "peer", "seq"}).
    """
    return canonical_json(
        {"deployment": deployment_hash, "format": HEAD_FORMAT, "head": head, "peer": peer, "seq": seq}
    )


def checkpoint_body_hash(entry: dict[str, Any]) -> str:
    """The entry hash of a checkpoint: SHA-256 of its canonical JSON without `sig`.

    Args:
        entry: the parsed checkpoint entry (with or without `sig`).

    Returns:
        Hex SHA-256.

    Raises:
        TypeError, ValueError: the entry holds values canonical JSON cannot express.
    """
    body = {k: v for k, v in entry.items() if k != "sig"}
    return sha256_hex(canonical_json(body))


@dataclass(frozen=True)
class SignedHead:
    """A peer's signed statement "my log's entry `seq` has hash `head`".

    Produced by `AuditLog.checkpoint`, sent to counterparties in an `audit_receipt` message
    (`to_meta`), recorded by them with `AuditLog.record_counterparty_head`, so a truncated or
    rewritten log is provable from another party's log.

    Attributes:
        peer: the signing peer.
        seq: seq of the checkpoint entry.
        head: hex SHA-256 entry hash of that checkpoint (the chain head).
        signature: hex Ed25519 signature over `head_message(peer, seq, head, deployment)`.
    """

    peer: str
    seq: int
    head: str
    signature: str

    def signed_bytes(self, deployment_hash: str) -> bytes:
        """The bytes the signature covers (see `head_message`)."""
        return head_message(self.peer, self.seq, self.head, deployment_hash)

    def verify(self, public_sign_key_hex: str, deployment_hash: str) -> None:
        """Check the signature with the peer's public key.

        Args:
            public_sign_key_hex: the peer's Ed25519 public key (deployment `sign_key`).
            deployment_hash: the deployment the head belongs to.

        Raises:
            CryptoError: the signature does not verify.
        """
        from secure_split.crypto.keys import verify_signature

        verify_signature(public_sign_key_hex, self.signed_bytes(deployment_hash), bytes.fromhex(self.signature))

    def to_meta(self) -> dict[str, str | int]:
        """The head as `audit_receipt` message meta: {peer, seq, head, signature}."""
        return {"peer": self.peer, "seq": self.seq, "head": self.head, "signature": self.signature}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> SignedHead:
        """Rebuild a head from message meta sent by a counterparty (untrusted input).

        Args:
            meta: a mapping with peer, seq, head and signature.

        Returns:
            The head (its signature is not checked here; `record_counterparty_head` does).

        Raises:
            RemoteProtocolError: a key is missing or malformed.
        """
        peer, seq, head, sig = meta.get("peer"), meta.get("seq"), meta.get("head"), meta.get("signature")
        if (isinstance(peer, str) and PEER_NAME.fullmatch(peer) and type(seq) is int and seq >= 0
                and isinstance(head, str) and HEX64.fullmatch(head) and isinstance(sig, str) and HEX128.fullmatch(sig)):
            return cls(peer=peer, seq=seq, head=head, signature=sig)
        problems = []
        if not isinstance(peer, str) or not PEER_NAME.fullmatch(peer):
            problems.append(f"peer must be a peer name, got {peer!r}")
        if type(seq) is not int or seq < 0:
            problems.append(f"seq must be a non-negative integer, got {seq!r}")
        if not isinstance(head, str) or not HEX64.fullmatch(head):
            problems.append("head must be 64 lowercase hex digits")
        if not isinstance(sig, str) or not HEX128.fullmatch(sig):
            problems.append("signature must be 128 lowercase hex digits")
        raise RemoteProtocolError("malformed signed audit head: " + "; ".join(problems))
