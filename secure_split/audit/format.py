"""The audit log's on-disk format, version 2: the names, hashes and signed bytes writer and verifier share.

`audit/FORMAT.md` is the specification; this module is its executable half. Everything an
independent verifier must reproduce is defined here, in one place:

- an entry is one line of canonical JSON (`encoding.encode_entry`) followed by `\\n`, with exactly
  the keys `ENTRY_KEYS` (a checkpoint adds `sig` = exactly {key, signature});
- the **entry hash** is SHA-256 over the line's bytes as written (without the newline); for a
  checkpoint it is SHA-256 over the line without its `sig` member;
- a file holds one or more **run segments**, each opened by a `run_start` entry carrying the
  writing process's fresh `nonce`; `prev` of the file's first entry is `genesis_hash(peer,
  deployment, nonce of that first run_start)`, and every later entry chains to the one before it;
- a `run_bound` entry binds the segment to a **run id** agreed by every peer
  (`compute_run_id`): from then on every signature of the segment binds it;
- a checkpoint signs `head_message(peer, seq, head, deployment, run=, nonce=)`.

Pure standard library plus `secure_split.canonical`; no crypto imports (signatures are verified
through `secure_split.crypto.keys`, lazily).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from secure_split.canonical import canonical_json, sha256_hex
from secure_split.errors import AuditError, RemoteProtocolError

FORMAT_VERSION: Final[int] = 2
"""Value of every entry's `v` key."""

GENESIS_FORMAT: Final[str] = "secure-split-audit-genesis/2"
HEAD_FORMAT: Final[str] = "secure-split-audit-head/2"
RUN_FORMAT: Final[str] = "secure-split-run/2"
METRICS_FORMAT: Final[str] = "secure-split-audit-metrics/2"

ENTRY_KEYS: Final[frozenset[str]] = frozenset({"v", "seq", "time", "peer", "event", "policy", "prev", "data"})
"""The keys of every entry, no more and no fewer."""

CHECKPOINT_KEYS: Final[frozenset[str]] = ENTRY_KEYS | {"sig"}
"""A checkpoint entry carries its signature in `sig`."""

SIG_KEYS: Final[frozenset[str]] = frozenset({"key", "signature"})
"""The exact keys of a checkpoint's `sig` object."""

# Each event: (required fields, optional fields). The writer fills an absent optional field with
# null, so every entry of an event has exactly required | optional as its data keys; events in
# OPEN_EVENTS may carry extra, informational fields.
_MESSAGE_FIELDS = frozenset({"kind", "edge", "step", "seq", "session", "sender", "receiver", "counterparty",
                             "nbytes", "dtype", "shape", "batch_size", "digest", "decision_id", "rule_id"})
_NONE: frozenset[str] = frozenset()
GATE_EVENTS: Final[dict[str, tuple[frozenset[str], frozenset[str]]]] = {
    "message_sent": (_MESSAGE_FIELDS, _NONE),
    "message_received": (_MESSAGE_FIELDS, _NONE),
    # A refusal names the refused message: its session, protocol seq and frame digest (null where
    # the refusal came before they could be known, e.g. an undecodable header).
    "policy_denied": (frozenset({"direction", "sender", "receiver", "kind", "edge", "step", "nbytes", "decision_id",
                                 "rule_id", "reason"}), frozenset({"session", "seq", "digest"})),
    "refused": (frozenset({"direction", "counterparty", "reason", "error", "kind"}),
                frozenset({"session", "seq", "digest"})),
    "error": (frozenset({"reason", "error"}), _NONE),
    "peer_joined": (frozenset({"counterparty", "reason"}), _NONE),
    "peer_lost": (frozenset({"counterparty", "reason"}), _NONE),
    "checkpoint_saved": (frozenset({"epoch", "digest"}), _NONE),
    "checkpoint_resumed": (frozenset({"epoch", "digest"}), _NONE),
    "ids_aligned": (frozenset({"parties", "own_size", "intersection_size"}), _NONE),
    "weights_loaded": (frozenset({"counterparty", "reason"}), _NONE),
    # What trains here: per segment, the commitment an auditor can check (docs/models.md).
    "segment_commitment": (frozenset({"segment", "source", "public", "parameters", "commitment"}), _NONE),
    # Crash recovery: whom a peer waits for, and the checkpoint everyone rolled back to.
    "rejoin_wait": (frozenset({"counterparty", "reason"}), _NONE),
    "rollback": (frozenset({"epoch", "reason"}), _NONE),
}
OPEN_EVENTS: Final[frozenset[str]] = frozenset(
    {"error", "peer_joined", "peer_lost", "checkpoint_saved", "checkpoint_resumed", "ids_aligned", "weights_loaded",
     "rejoin_wait", "rollback"})

# Events only the log itself writes (through open, bind_run, checkpoint, the close round, ...).
LOG_EVENTS: Final[dict[str, tuple[frozenset[str], frozenset[str]]]] = {
    "run_start": (frozenset({"deployment_hash", "policy_hash", "versions", "resumed", "resume_epoch", "nonce",
                             "previous"}), _NONE),
    "run_bound": (frozenset({"run_id", "nonces", "previous"}), _NONE),
    "checkpoint": (frozenset({"reason"}), _NONE),
    "counterparty_head": (frozenset({"counterparty", "seq", "head", "signature", "key", "run_id", "nonce"}), _NONE),
    "epoch_metrics": (frozenset({"epoch", "values"}), _NONE),
    "counterparty_metrics": (frozenset({"counterparty", "epoch", "values", "signature", "key", "run_id"}), _NONE),
    "run_end": (frozenset({"status", "reason", "metrics"}), _NONE),
    "close_incomplete": (frozenset({"missing", "reason"}), _NONE),
    "transport_refused": (frozenset({"source", "reason", "count", "window_s"}), _NONE),
}

EVENTS: Final[frozenset[str]] = frozenset(GATE_EVENTS) | frozenset(LOG_EVENTS)
"""Every event name a valid log may hold."""

SCHEMAS: Final[dict[str, tuple[frozenset[str], frozenset[str]]]] = {**GATE_EVENTS, **LOG_EVENTS}

CLOSE_TAIL_EVENTS: Final[frozenset[str]] = frozenset(
    {"counterparty_head", "close_incomplete", "checkpoint", "refused", "policy_denied", "transport_refused",
     "peer_lost", "error"})
"""What may stand after a segment's last countersigned head: the close round's answers, and what others
did to this peer meanwhile (refusals, losses). Also `message_sent`/`message_received` of kind
`audit_receipt` (the close heads themselves travel as messages)."""

CLOSE_TAIL_KINDS: Final[frozenset[str]] = frozenset({"audit_receipt"})
"""Message kinds that may stand after run_end and after the last countersigned head."""

MESSAGE_EVENTS: Final[frozenset[str]] = frozenset({"message_sent", "message_received"})

MAX_STRING_BYTES: Final[int] = 4096
"""Longest string value an entry may hold (UTF-8 bytes): a reason, never a payload."""

MAX_LIST_ITEMS: Final[int] = 256
"""Longest list an entry may hold (shapes have at most 8 items)."""

MAX_LINE_BYTES: Final[int] = 64 * 1024
"""Longest line the writer produces and the verifier accepts."""

INT_MIN: Final[int] = -(2**63)
INT_LIMIT: Final[int] = 2**63
"""Integers in an entry lie in [INT_MIN, INT_LIMIT)."""

HEX64: Final[re.Pattern[str]] = re.compile(r"[0-9a-f]{64}")
HEX128: Final[re.Pattern[str]] = re.compile(r"[0-9a-f]{128}")
PEER_NAME: Final[re.Pattern[str]] = re.compile(r"[a-z][a-z0-9_]{0,62}")
_PLAIN: Final[re.Pattern[str]] = re.compile(r"[0-9a-z_]*")
"""Strings that canonical JSON writes between quotes unchanged (no escape, ASCII)."""
TIME_FORMAT: Final[re.Pattern[str]] = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z")
"""Entry times: RFC 3339 UTC with microseconds, e.g. 2026-01-01T00:00:00.250000Z."""


def genesis_hash(peer: str, deployment_hash: str, nonce: str) -> str:
    """The `prev` of a log file's first entry: binds the chain to one peer, deployment and process.

    Args:
        peer: the peer's name.
        deployment_hash: hex SHA-256 of the deployment (`Deployment.hash`).
        nonce: the `nonce` of the file's first `run_start` (64 hex digits, fresh per process).

    Returns:
        Hex SHA-256 of canonical_json({"deployment", "format", "nonce", "peer"}).
    """
    return sha256_hex(canonical_json({"deployment": deployment_hash, "format": GENESIS_FORMAT, "nonce": nonce,
                                      "peer": peer}))


def check_nonces(nonces: object) -> dict[str, str]:
    """Check a run's nonce map: peer name -> 64 lowercase hex digits, at least one peer.

    Raises:
        AuditError: not such a map.
    """
    if not isinstance(nonces, Mapping) or not nonces or len(nonces) > 1024:
        raise AuditError("a run's nonces must be a non-empty map of peer name -> 64 hex digits")
    out: dict[str, str] = {}
    for peer, nonce in nonces.items():
        if not isinstance(peer, str) or not PEER_NAME.fullmatch(peer):
            raise AuditError(f"a run's nonces name {peer!r}, which is not a peer name")
        if not isinstance(nonce, str) or not HEX64.fullmatch(nonce):
            raise AuditError(f"the run nonce of '{peer}' must be 64 lowercase hex digits")
        out[peer] = nonce
    return out


def compute_run_id(deployment_hash: str, policy_hash: str, nonces: Mapping[str, str]) -> str:
    """The run id every peer of a run agrees on (pure; the peer and the verifier both call it).

    Every peer draws a fresh 32-byte nonce at start and sends it in its HELLO; the coordinator
    collects every peer's nonce, computes this and announces run id and nonces at the start
    barrier; each peer recomputes it, checks its own nonce is in it, and records `run_bound`.

    Args:
        deployment_hash: `Deployment.hash`.
        policy_hash: `Policy.hash`.
        nonces: peer -> its run nonce (hex), for every peer of the run.

    Returns:
        Hex SHA-256 of canonical_json({"deployment", "format": RUN_FORMAT, "nonces", "policy"}).

    Raises:
        AuditError: malformed nonces.
    """
    checked = check_nonces(nonces)
    return sha256_hex(canonical_json({"deployment": deployment_hash, "format": RUN_FORMAT, "nonces": checked,
                                      "policy": policy_hash}))


def head_message(peer: str, seq: int, head: str, deployment_hash: str, *, run: str, nonce: str) -> bytes:
    """The bytes a checkpoint signature covers.

    Args:
        peer: the signing peer.
        seq: the checkpoint entry's seq.
        head: the checkpoint entry's hash (the chain head at `seq`).
        deployment_hash: the deployment the log belongs to.
        run: the run id the segment is bound to, or "" before `run_bound` (a failed start).
        nonce: the segment's run nonce (its `run_start`'s `nonce`).

    Returns:
        canonical_json({"deployment", "format": HEAD_FORMAT, "head", "nonce", "peer", "run", "seq"}).
    """
    parts = (peer, head, deployment_hash, run, nonce)
    if type(seq) is int and all(type(x) is str for x in parts) and _PLAIN.fullmatch("".join(parts)):
        # Strings JSON writes as they are (no escapes), an integer: the same bytes, without the encoder.
        return (f'{{"deployment":"{deployment_hash}","format":"{HEAD_FORMAT}","head":"{head}","nonce":"{nonce}",'
                f'"peer":"{peer}","run":"{run}","seq":{seq}}}').encode()
    return canonical_json({"deployment": deployment_hash, "format": HEAD_FORMAT, "head": head, "nonce": nonce,
                           "peer": peer, "run": run, "seq": seq})


def metrics_message(peer: str, epoch: int, values: Mapping[str, Any], deployment_hash: str, *, run: str) -> bytes:
    """The bytes a peer signs when it reports its own epoch metrics to another peer.

    Args:
        peer: the peer whose metrics these are (and who signs).
        epoch: the epoch they are for.
        values: the metric values, as the writer logs them (`clean_value` form).
        deployment_hash: the deployment.
        run: the run id.

    Returns:
        canonical_json({"deployment", "epoch", "format": METRICS_FORMAT, "peer", "run", "values"}).
    """
    return canonical_json({"deployment": deployment_hash, "epoch": epoch, "format": METRICS_FORMAT, "peer": peer,
                           "run": run, "values": dict(values)})


def _verify(key_hex: str, message: bytes, signature_hex: str) -> bool:
    from secure_split.crypto.keys import verify_signature
    from secure_split.errors import CryptoError

    if not HEX128.fullmatch(signature_hex):
        return False
    try:
        verify_signature(key_hex, message, bytes.fromhex(signature_hex))
    except (CryptoError, ValueError):
        return False
    return True


@dataclass(frozen=True)
class SignedHead:
    """A peer's signed statement "in run `run`, my log's entry `seq` has hash `head`".

    Produced by `AuditLog.checkpoint`, sent to counterparties in an `audit_receipt` message
    (`to_meta`), recorded by them with `AuditLog.record_counterparty_head`, so a truncated or
    rewritten log is provable from another party's log, and a head never verifies in another run.

    Attributes:
        peer: the signing peer.
        seq: seq of the checkpoint entry.
        head: hex SHA-256 entry hash of that checkpoint (the chain head).
        signature: hex Ed25519 signature over `head_message(...)`.
        run: the run id the head binds ("" before the segment was bound to a run).
        nonce: the signing segment's run nonce.
    """

    peer: str
    seq: int
    head: str
    signature: str
    run: str = ""
    nonce: str = ""

    def signed_bytes(self, deployment_hash: str) -> bytes:
        """The bytes the signature covers (see `head_message`)."""
        return head_message(self.peer, self.seq, self.head, deployment_hash, run=self.run, nonce=self.nonce)

    def verify(self, public_sign_key_hex: str, deployment_hash: str) -> None:
        """Check the signature with the peer's public key.

        Raises:
            CryptoError: the signature does not verify.
        """
        from secure_split.errors import CryptoError

        if not _verify(public_sign_key_hex, self.signed_bytes(deployment_hash), self.signature):
            raise CryptoError(f"signed audit head of '{self.peer}' (seq {self.seq}) does not verify")

    def to_meta(self) -> dict[str, str | int]:
        """The head as `audit_receipt` message meta: {peer, seq, head, signature, run_id, nonce}."""
        return {"peer": self.peer, "seq": self.seq, "head": self.head, "signature": self.signature,
                "run_id": self.run, "nonce": self.nonce}

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> SignedHead:
        """Rebuild a head from message meta sent by a counterparty (untrusted input).

        Args:
            meta: a mapping with peer, seq, head, signature, run_id ("" before binding) and nonce.

        Returns:
            The head (its signature is not checked here; `record_counterparty_head` does).

        Raises:
            RemoteProtocolError: a key is missing or malformed.
        """
        peer, seq, head, sig = meta.get("peer"), meta.get("seq"), meta.get("head"), meta.get("signature")
        run, nonce = meta.get("run_id"), meta.get("nonce")
        problems = []
        if not isinstance(peer, str) or not PEER_NAME.fullmatch(peer):
            problems.append(f"peer must be a peer name, got {peer!r}")
        if type(seq) is not int or seq < 0:
            problems.append(f"seq must be a non-negative integer, got {seq!r}")
        if not isinstance(head, str) or not HEX64.fullmatch(head):
            problems.append("head must be 64 lowercase hex digits")
        if not isinstance(sig, str) or not HEX128.fullmatch(sig):
            problems.append("signature must be 128 lowercase hex digits")
        if not isinstance(run, str) or (run and not HEX64.fullmatch(run)):
            problems.append("run_id must be 64 lowercase hex digits, or empty before the run is bound")
        if not isinstance(nonce, str) or not HEX64.fullmatch(nonce):
            problems.append("nonce must be 64 lowercase hex digits (a peer of audit format 1 sends none)")
        if problems:
            raise RemoteProtocolError("malformed signed audit head: " + "; ".join(problems))
        assert isinstance(seq, int)
        return cls(peer=str(peer), seq=seq, head=str(head), signature=str(sig), run=str(run), nonce=str(nonce))


@dataclass(frozen=True)
class MetricsStatement:
    """A peer's signed statement "my metrics for `epoch` of run `run` are `values`".

    The peer writes the same values as `epoch_metrics` in its own log (`AuditLog.record_epoch_metrics`,
    which returns this) and sends them with the signature in its `barrier_ack` (`to_meta`). The
    coordinator records them as the sender's (`AuditLog.record_counterparty_metrics`), never as
    its own; the verifier holds the sender to its signed statement.

    Attributes:
        peer: whose metrics (the signer).
        epoch: the epoch.
        values: metric name -> number (or "NaN"/"Infinity" strings), as logged.
        run: the run id.
        signature: hex Ed25519 over `metrics_message(...)`.
    """

    peer: str
    epoch: int
    values: Mapping[str, Any]
    run: str
    signature: str

    def verify(self, public_sign_key_hex: str, deployment_hash: str) -> None:
        """Check the signature. Raises CryptoError when it does not verify."""
        from secure_split.errors import CryptoError

        msg = metrics_message(self.peer, self.epoch, self.values, deployment_hash, run=self.run)
        if not _verify(public_sign_key_hex, msg, self.signature):
            raise CryptoError(f"metrics of '{self.peer}' for epoch {self.epoch} do not verify with its key")

    def to_meta(self) -> dict[str, Any]:
        """`barrier_ack` meta: {"epoch", "values", "metrics_sig"} (the run id travels in the barrier)."""
        return {"epoch": self.epoch, "values": dict(self.values), "metrics_sig": self.signature}

    @classmethod
    def from_meta(cls, peer: str, meta: Mapping[str, Any], run: str) -> MetricsStatement:
        """Rebuild the statement of `peer` from its `barrier_ack` meta (untrusted input).

        Raises:
            RemoteProtocolError: epoch, values or metrics_sig missing or malformed.
        """
        epoch, values, sig = meta.get("epoch"), meta.get("values", {}), meta.get("metrics_sig")
        if type(epoch) is not int or not isinstance(values, Mapping) or not isinstance(sig, str) \
                or not HEX128.fullmatch(sig):
            raise RemoteProtocolError(f"barrier_ack of '{peer}' carries no valid signed metrics "
                                      "(epoch int, values map, metrics_sig 128 hex digits)")
        return cls(peer=peer, epoch=epoch, values=dict(values), run=run, signature=sig)
