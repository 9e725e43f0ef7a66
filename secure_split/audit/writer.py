"""The audit log writer: one append-only, hash-chained, signed JSON-lines file per peer per run.

Every entry goes through one structlog processor chain, built with `structlog.wrap_logger` and
explicit processors (never the global `structlog.configure()`):

    add context → canonicalise → hash-chain → sign checkpoint → render line → append to file

- *add context*: format version, seq, time, peer, policy hash;
- *canonicalise*: checks the event name and its fields, normalises values (tuples → lists,
  numpy scalars → Python numbers, whole floats → ints) and refuses anything that is not a small
  JSON value: bytes, arrays, huge strings. A bug can therefore not dump a tensor into the log;
- *hash-chain*: `prev` = the chain head, then the entry hash;
- *sign checkpoint*: a `checkpoint` entry gets `sig` = Ed25519 over (peer, seq, head, deployment);
- the line is written with one `write(2)` and fsynced at every checkpoint, so a crash leaves at
  most one partial last line (a *torn tail*), which `resume=True` drops and records.

The format is specified in `audit/FORMAT.md`; the shared definitions live in `format.py`.
"""

from __future__ import annotations

import math
import numbers
import os
import threading
import time
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any, Protocol

import structlog

from secure_split.audit.format import (
    FORMAT_VERSION,
    GATE_EVENTS,
    LOG_EVENTS,
    MAX_LINE_BYTES,
    MAX_LIST_ITEMS,
    MAX_STRING_BYTES,
    SignedHead,
    encode_canonical,
    genesis_hash,
    head_message,
)
from secure_split.canonical import sha256_hex
from secure_split.errors import AuditError, CryptoError

_MAX_DEPTH = 4
_MAX_DICT_ITEMS = 128
_SHORT = MAX_STRING_BYTES // 4  # a str of at most this many characters is within the byte limit


class SigningIdentity(Protocol):
    """What the log needs from a peer identity (`secure_split.crypto.keys.Identity` fits)."""

    @property
    def sign_key_hex(self) -> str:
        """The Ed25519 public key, hex."""
        ...

    def secret_text_forms(self) -> tuple[str, ...]:
        """The peer's secret keys as text (hex, Z85, base64): no entry may contain one."""
        ...

    def sign(self, data: bytes) -> bytes:
        """An Ed25519 signature over `data`."""
        ...


def utc_timestamp(ns: int) -> str:
    """Format nanoseconds since the Unix epoch as `YYYY-MM-DDTHH:MM:SS.ffffffZ` (UTC).

    Args:
        ns: time.time_ns() or a test clock's value.

    Returns:
        The ISO 8601 timestamp with microseconds that entries carry in `time`.
    """
    secs, us = divmod(ns // 1000, 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{us:06d}Z"


def _refuse(path: str, why: str) -> AuditError:
    return AuditError(f"audit field {path}: {why}")


def clean_value(value: Any, path: str, depth: int = 0) -> Any:
    """Normalise one field value for the log, or refuse it.

    Accepts None, bool, int, finite float (whole floats become ints; NaN and ±Infinity become
    the strings "NaN", "Infinity", "-Infinity"), str up to `MAX_STRING_BYTES`, and lists,
    tuples and str-keyed dicts of those, nested at most 4 deep. numpy scalars are accepted as
    numbers; str enums as their value.

    Args:
        value: the value a caller passed to `record`.
        path: the field's name, for the error message.
        depth: nesting depth (internal).

    Returns:
        The JSON-ready value.

    Raises:
        AuditError: bytes, arrays, objects, huge strings or lists, too deep nesting.
    """
    t = type(value)
    if value is None or t is bool or t is int:
        return value
    if t is str:
        if len(value) > MAX_STRING_BYTES // 4 and len(value.encode("utf-8")) > MAX_STRING_BYTES:
            raise _refuse(path, f"a string of {len(value.encode('utf-8'))} bytes; the limit is "
                                f"{MAX_STRING_BYTES} (log a digest, not the content)")
        return value
    if t is float:
        if not math.isfinite(value):
            return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
        return int(value) if value.is_integer() and abs(value) < 2**53 else value
    if isinstance(value, bytes | bytearray | memoryview):
        raise _refuse(path, f"{t.__name__} value; the audit log never holds payloads or secrets, "
                            "log their SHA-256 digest instead")
    if isinstance(value, str):  # a str subclass, e.g. a str enum such as protocol.Kind: its value
        return clean_value(str.__str__(value), path, depth)
    if getattr(value, "shape", None) == () and hasattr(value, "item"):
        return clean_value(value.item(), path, depth)  # a numpy (or similar) scalar: its Python value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return clean_value(float(value), path, depth)
    if depth >= _MAX_DEPTH:
        raise _refuse(path, f"nested more than {_MAX_DEPTH} deep")
    if t is list or t is tuple:
        if len(value) > MAX_LIST_ITEMS:
            raise _refuse(path, f"a list of {len(value)} items; the limit is {MAX_LIST_ITEMS} "
                                "(the log records shapes and digests, never tensor values)")
        return [clean_value(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
    if t is dict:
        if len(value) > _MAX_DICT_ITEMS:
            raise _refuse(path, f"a dict of {len(value)} items; the limit is {_MAX_DICT_ITEMS}")
        out = {}
        for k, v in value.items():
            if type(k) is not str:
                raise _refuse(path, f"dict key {k!r} is not a str")
            out[k] = clean_value(v, f"{path}.{k}", depth + 1)
        return out
    raise _refuse(path, f"a {t.__module__}.{t.__name__}; only JSON scalars, lists and dicts go into the "
                        "audit log (never tensors, arrays or payloads)")


class _AppendOnlyFile:
    """The wrapped logger at the end of the chain: appends each rendered line with one write."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def write_entry(self, line: bytes) -> None:
        """Append one line with one write (a short write on a full disk is continued)."""
        view = memoryview(line)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def fsync(self) -> None:
        """Flush the file to stable storage."""
        os.fsync(self._fd)

    def close(self) -> None:
        """Close the file."""
        os.close(self._fd)


class _AuditBoundLogger(structlog.BoundLoggerBase):
    """The bound logger: one method, `write_entry`, that runs the chain and appends the line."""

    def write_entry(self, event: str, **event_kw: Any) -> Any:
        """Run the processor chain on one event and hand the rendered line to the file."""
        return self._proxy_to_logger("write_entry", event, **event_kw)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the file's own fsync still holds
    finally:
        os.close(fd)


class AuditLog:
    """One peer's append-only, hash-chained, signed audit log for one run.

    Create it with `AuditLog.open`. Thread-safe: entries are serialised by a lock.
    """

    def __init__(
        self,
        path: Path,
        fd: int,
        *,
        peer: str,
        identity: SigningIdentity,
        deployment_hash: str,
        policy_hash: str,
        seq: int,
        head: str,
        clock: Callable[[], int],
    ) -> None:
        """Internal: use `AuditLog.open`."""
        self._path = path
        self._sink = _AppendOnlyFile(fd)
        self._peer = peer
        self._identity = identity
        self._key_hex = identity.sign_key_hex
        self._secret_forms = tuple(s.encode("ascii") for s in identity.secret_text_forms())
        self._deployment_hash = deployment_hash
        self._policy_hash = policy_hash
        self._seq = seq
        self._head = head
        self._clock = clock
        self._lock = threading.Lock()
        self._closed = False
        self._broken: str | None = None
        self._pending: tuple[int, str, str] | None = None
        self._logger = structlog.wrap_logger(
            self._sink,
            processors=[
                self._add_context,
                self._canonicalise,
                self._hash_chain,
                self._sign_checkpoint,
                self._render,
            ],
            wrapper_class=_AuditBoundLogger,
            context_class=dict,
            cache_logger_on_first_use=False,
        ).bind()  # resolve the lazy proxy once, from these explicit settings only

    # -- opening ------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        peer: str,
        identity: SigningIdentity,
        deployment_hash: str,
        policy_hash: str,
        resume: bool = False,
        clock: Callable[[], int] | None = None,
    ) -> AuditLog:
        """Open the audit log of one peer for one run (`audit/PEER.jsonl`).

        Args:
            path: the log file; its folder is created if missing.
            peer: this peer's name (every entry carries it).
            identity: signs checkpoints (`Identity` from `secure_split.crypto.keys`).
            deployment_hash: the deployment's hash; bound into the genesis hash and every signature.
            policy_hash: the hash of the policy in force; every entry carries it.
            resume: continue an existing log: its chain is verified with this identity's key, a
                torn last line (a crash during a write) is dropped and recorded in a
                `log_resumed` entry, and new entries continue the same chain.
            clock: nanoseconds since the epoch (default `time.time_ns`; tests pass a fixed clock).

        Returns:
            The open log.

        Raises:
            AuditError: the file exists and is not empty and `resume` is False (one file per peer
                per run), or `resume` is True and the existing log fails verification.
        """
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        clk = clock or time.time_ns
        seq, head = -1, genesis_hash(peer, deployment_hash)
        resumed: dict[str, Any] | None = None
        if not resume and p.exists() and p.stat().st_size:
            raise _exists_error(p)
        created = not p.exists()
        fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            _lock_for_writing(fd, p)
            # Read the size under the lock: another writer may have appended until it let go.
            existing = os.fstat(fd).st_size
            if existing and not resume:
                raise _exists_error(p)
            if existing:
                seq, head, resumed = _prepare_resume(p, peer=peer, key_hex=identity.sign_key_hex,
                                                     deployment_hash=deployment_hash)
        except BaseException:
            os.close(fd)
            raise
        if created:
            _fsync_dir(p.parent)
        log = cls(p, fd, peer=peer, identity=identity, deployment_hash=deployment_hash,
                  policy_hash=policy_hash, seq=seq, head=head, clock=clk)
        if resumed is not None:
            log._write("log_resumed", resumed)
            log._sink.fsync()
        return log

    # -- the processor chain ------------------------------------------------------------------

    def _add_context(self, _logger: Any, _method: str, ed: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        ed["v"] = FORMAT_VERSION
        ed["seq"] = self._seq + 1
        ed["time"] = utc_timestamp(self._clock())
        ed["peer"] = self._peer
        ed["policy"] = self._policy_hash
        return ed

    def _canonicalise(self, _logger: Any, _method: str, ed: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event = ed["event"]
        fields = ed["data"]
        required = GATE_EVENTS.get(event) or LOG_EVENTS.get(event)
        if required is None:
            raise AuditError(f"unknown audit event {event!r}; known events: {sorted(GATE_EVENTS)}")
        missing = required - fields.keys()
        if missing:
            raise AuditError(f"audit event {event!r} is missing fields {sorted(missing)}")
        data = {}
        for k, v in fields.items():
            t = type(v)
            # Fast path: the gate's fields are mostly short strings, ints and None.
            if (t is str and len(v) <= _SHORT) or t is int or v is None or t is bool:
                data[k] = v
            else:
                data[k] = clean_value(v, f"{event}.{k}")
        ed["data"] = data
        return ed

    def _hash_chain(self, _logger: Any, _method: str, ed: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        ed["prev"] = self._head
        body = encode_canonical(ed).encode("utf-8")  # every value was normalised by _canonicalise
        if any(form in body for form in self._secret_forms):  # ~2 us per entry
            raise AuditError(f"audit entry {ed['event']!r} contains this peer's secret key as text; "
                             "refusing to write it (a bug passed a secret to the audit log)")
        if len(body) > MAX_LINE_BYTES - 512:
            raise AuditError(f"audit entry {ed['event']!r} would be {len(body)} bytes; the limit is "
                             f"{MAX_LINE_BYTES - 512}. The log records facts and digests, never payloads.")
        ed["_body"] = body
        ed["_hash"] = sha256_hex(body)
        return ed

    def _sign_checkpoint(self, _logger: Any, _method: str, ed: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        body: bytes = ed.pop("_body")
        entry_hash: str = ed.pop("_hash")
        signature = ""
        if ed["event"] == "checkpoint":
            msg = head_message(self._peer, ed["seq"], entry_hash, self._deployment_hash)
            signature = self._identity.sign(msg).hex()
            ed["sig"] = {"key": self._key_hex, "signature": signature}
            body = encode_canonical(ed).encode("utf-8")
        self._pending = (ed["seq"], entry_hash, signature)
        ed["_line"] = body
        return ed

    def _render(self, _logger: Any, _method: str, ed: MutableMapping[str, Any]) -> bytes:
        line: bytes = ed["_line"]
        return line + b"\n"

    # -- writing ------------------------------------------------------------------------------

    def _write(self, event: str, fields: dict[str, Any]) -> tuple[int, str, str]:
        """Run the chain for one entry and commit the new head. Caller holds no lock."""
        with self._lock:
            if self._closed:
                raise AuditError(f"audit log {self._path} is closed; no entry can be added")
            if self._broken is not None:
                raise AuditError(f"audit log {self._path} is unusable after a failed write: {self._broken}")
            self._pending = None
            try:
                self._logger.write_entry(event, data=fields)
            except OSError as exc:
                # A partial line may be on disk: refuse further writes rather than append after it.
                self._broken = str(exc)
                raise AuditError(f"could not write audit log {self._path}: {exc}") from exc
            pending = self._pending
            if pending is None:  # _sign_checkpoint sets it on every completed run of the chain
                raise AuditError(f"audit log {self._path}: the processor chain did not complete")
            self._seq, self._head = pending[0], pending[1]
            return pending

    def record(self, event: str, **fields: Any) -> int:
        """Append one entry.

        Args:
            event: one of `GATE_EVENTS` (run_start, message_sent, message_received, policy_denied,
                refused, error, peer_joined, peer_lost, checkpoint_saved, checkpoint_resumed, run_end).
            **fields: the event's fields (JSON scalars, lists and small dicts; see `clean_value`).

        Returns:
            The new entry's seq.

        Raises:
            AuditError: unknown event, missing fields, a value that may not enter the log
                (bytes, arrays, strings over 4 KiB), the log is closed, or the write failed.
        """
        if event not in GATE_EVENTS:
            hint = " (use checkpoint()/record_counterparty_head())" if event in LOG_EVENTS else ""
            raise AuditError(f"audit event {event!r} cannot be recorded directly{hint}; "
                             f"known events: {sorted(GATE_EVENTS)}")
        return self._write(event, fields)[0]

    def checkpoint(self, reason: str) -> SignedHead:
        """Write a signed checkpoint entry and fsync the file.

        Call it at every step barrier; send the result to every counterparty (`to_meta()` in an
        `audit_receipt` message) so they record it with `record_counterparty_head`.

        Args:
            reason: why the checkpoint was taken (e.g. "epoch_end barrier, epoch 3").

        Returns:
            The signed head: (peer, seq of the checkpoint entry, its entry hash, signature).

        Raises:
            AuditError: the log is closed or the write failed.
        """
        seq, entry_hash, signature = self._write("checkpoint", {"reason": reason})
        try:
            self._sink.fsync()
        except OSError as exc:
            raise AuditError(f"could not fsync audit log {self._path}: {exc}") from exc
        return SignedHead(peer=self._peer, seq=seq, head=entry_hash, signature=signature)

    def record_counterparty_head(self, head: SignedHead, public_sign_key_hex: str) -> None:
        """Verify a counterparty's signed head and record it in this log.

        Args:
            head: the head the counterparty sent (`SignedHead.from_meta`).
            public_sign_key_hex: that peer's public key from the deployment.

        Raises:
            CryptoError: the signature does not verify with that key (nothing is recorded).
            AuditError: the head is our own, or the log is closed.
        """
        if head.peer == self._peer:
            raise AuditError(f"'{self._peer}' cannot record its own head as a counterparty's")
        try:
            head.verify(public_sign_key_hex, self._deployment_hash)
        except (CryptoError, ValueError):
            raise CryptoError(
                f"signed audit head from '{head.peer}' (seq {head.seq}) does not verify with its key "
                "in the deployment; it was not recorded"
            ) from None
        self._write(
            "counterparty_head",
            {"counterparty": head.peer, "seq": head.seq, "head": head.head, "signature": head.signature,
             "key": public_sign_key_hex},
        )

    def close(self, status: str, reason: str = "", metrics: dict[str, Any] | None = None) -> SignedHead:
        """Write `run_end` and a final signed checkpoint, fsync and close the file.

        Args:
            status: "ok" or "failed".
            reason: why the run ended (empty when ok).
            metrics: final scalar metrics (loss, accuracy, bytes moved).

        Returns:
            The final signed head.

        Raises:
            AuditError: the log is already closed or a write failed.
        """
        self.record("run_end", status=status, reason=reason, metrics=metrics or {})
        head = self.checkpoint("close")
        with self._lock:
            self._closed = True
            self._sink.close()
        return head

    @property
    def head(self) -> str:
        """The chain head: entry hash of the last entry (the genesis hash while empty)."""
        return self._head

    @property
    def seq(self) -> int:
        """Seq of the last entry written (-1 while empty)."""
        return self._seq

    @property
    def path(self) -> Path:
        """The log file."""
        return self._path

    @property
    def closed(self) -> bool:
        """True after `close`."""
        return self._closed


def _exists_error(path: Path) -> AuditError:
    return AuditError(
        f"audit log {path} already exists and is not empty: one file per peer per run. "
        "Resume the run (--resume) to continue its chain, or start the run in a fresh folder."
    )


def _lock_for_writing(fd: int, path: Path) -> None:
    """Take the log's exclusive write lock (held until the file is closed), or refuse.

    Two processes of one peer (a `peer run` and a `predict`, or two `predict`s) appending to one
    chain would fork it; the second one is refused instead.
    """
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise AuditError(
            f"audit log {path} is open for writing in another process of this peer (a running `peer run`, "
            "`serve` or `predict`); wait until it ends, or stop it, then run this again"
        ) from None


def _prepare_resume(path: Path, *, peer: str, key_hex: str, deployment_hash: str) -> tuple[int, str, dict[str, Any]]:
    """Verify an existing log with our own key, drop a torn tail; return (seq, head, log_resumed fields)."""
    from secure_split.audit.chain import VerifyContext, foreign_deployment, split_lines, verify_lines

    data = path.read_bytes()
    lines, torn = split_lines(data)
    other = foreign_deployment(lines, peer, deployment_hash)
    if other is not None:
        raise AuditError(
            f"cannot resume: audit log {path} was written under deployment {other}, but this run's deployment "
            f"hashes to {deployment_hash}; a resumed run needs the same deployment.yaml. The log is left as it "
            "was; start a new run in a fresh folder to run under the changed deployment."
        )
    ctx = VerifyContext(deployment_hash=deployment_hash, keys={peer: key_hex})
    report = verify_lines(lines, peer=peer, context=ctx, torn=torn, file=path.name)
    fatal = [f for f in report.findings if f.kind not in ("torn_tail", "truncated")]
    if fatal:
        listing = "; ".join(f.describe() for f in fatal[:5])
        raise AuditError(
            f"cannot resume audit log {path}: it fails verification ({listing}). It will not be "
            "continued; keep it as evidence and start the run in a fresh folder."
        )
    if torn:
        with open(path, "r+b") as fh:
            fh.truncate(len(data) - len(torn))
            fh.flush()
            os.fsync(fh.fileno())
    fields = {
        "last_seq": report.last_seq,
        "torn_tail_bytes": len(torn),
        "torn_tail_sha256": sha256_hex(torn) if torn else "",
    }
    return report.last_seq, report.head, fields
