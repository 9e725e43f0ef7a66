"""The audit log writer: one append-only, hash-chained, signed JSON-lines file per peer, in run segments.

Every entry goes through one structlog processor chain, built with `structlog.wrap_logger` and
explicit processors (never the global `structlog.configure()`):

    add context → canonicalise → hash-chain → sign checkpoint → render line → append to file

- *add context*: format version, seq, time, peer, policy hash;
- *canonicalise*: checks the event and its exact fields (an absent optional field is written as
  null), normalises values (`sink.clean_value`) and refuses anything that could carry a payload;
- *hash-chain*: `prev` = the chain head, then the entry hash;
- *sign checkpoint*: a `checkpoint` gets `sig` = Ed25519 over (deployment, peer, seq, head, run, nonce);
- the line is written with one `write(2)` and fsynced at every checkpoint.

Life of one writer process (one **run segment**, FORMAT.md §6): `open` draws a fresh run nonce and
writes `run_start` (appending to the file when it exists: a crashed or finished earlier segment
is verified and continued, never rewritten); `bind_run` records the run id agreed at the start
barrier; checkpoints and heads exchanged at barriers bind it; `begin_close` / `finish_close` are
the close round. The format is specified in `audit/FORMAT.md`; shared definitions in `format.py`.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import structlog

from secure_split.audit.continuation import nonce_hex, prepare_continue
from secure_split.audit.encoding import encode_entry
from secure_split.audit.format import (
    CLOSE_TAIL_EVENTS,
    CLOSE_TAIL_KINDS,
    FORMAT_VERSION,
    GATE_EVENTS,
    LOG_EVENTS,
    MAX_LINE_BYTES,
    MESSAGE_EVENTS,
    SCHEMAS,
    MetricsStatement,
    SignedHead,
    check_nonces,
    compute_run_id,
    genesis_hash,
    head_message,
    metrics_message,
)
from secure_split.audit.sink import (
    SHORT,
    AppendOnlyFile,
    AuditBoundLogger,
    RefusalLimiter,
    SigningIdentity,
    clean_value,
    fsync_dir,
    lock_for_writing,
    utc_timestamp,
)
from secure_split.canonical import sha256_hex
from secure_split.errors import AuditError, CryptoError, RemoteProtocolError

__all__ = ["AuditLog", "SigningIdentity", "clean_value", "utc_timestamp"]


class AuditLog:
    """One peer's append-only, hash-chained, signed audit log: one run segment per process.

    Create it with `AuditLog.open`. Thread-safe: entries are serialised by a lock.
    """

    def __init__(self, path: Path, fd: int, *, peer: str, identity: SigningIdentity, deployment_hash: str,
                 policy_hash: str, seq: int, head: str, nonce: str, clock: Callable[[], int],
                 limiter: RefusalLimiter) -> None:
        """Internal: use `AuditLog.open`."""
        self._path = path
        self._sink = AppendOnlyFile(fd)
        self._peer = peer
        self._identity = identity
        self._key_hex = identity.sign_key_hex
        # One alternation of every text form of the secret keys: 5 us per gate entry, against 8 us
        # for 14 `in` tests (bench/gate_cost.py's entries, 650 bytes).
        self._secret_forms = re.compile(b"|".join(re.escape(s.encode("ascii")) for s in identity.secret_text_forms()))
        self._deployment_hash = deployment_hash
        self._policy_hash = policy_hash
        self._seq = seq
        self._head = head
        self._nonce = nonce
        self._run = ""
        self._nonces: dict[str, str] = {}
        self._clock = clock
        self._limiter = limiter
        self._lock = threading.Lock()
        self._closed = False
        self._ended = False  # run_end written: only the close round's entries may follow
        self._broken: str | None = None
        self._pending: tuple[int, str, str] | None = None
        self._start_fields: dict[str, Any] = {}
        self._start_seq = -1
        self._heard: set[str] = set()  # counterparties whose heads this segment recorded
        self._logger = structlog.wrap_logger(
            self._sink,
            processors=[self._add_context, self._canonicalise, self._hash_chain, self._sign_checkpoint, self._render],
            wrapper_class=AuditBoundLogger,
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
        run_nonce: str | bytes | None = None,
        versions: Mapping[str, Any] | None = None,
        resume_epoch: int | None = None,
        refusal_limit: RefusalLimiter | None = None,
    ) -> AuditLog:
        """Open the audit log of one peer and begin a new run segment (writes its `run_start`).

        A file that already holds segments (a finished run, a failed start, a crash) is verified
        with this identity's key and continued: a torn last line is dropped and recorded in the
        new run_start's `previous`, and the chain goes on. So a fresh start in the same folder just
        works, and a resumed run is one history with the run before it.

        Args:
            path: the log file (`audit/PEER.jsonl`); its folder is created if missing.
            peer: this peer's name (every entry carries it).
            identity: signs checkpoints (`Identity` from `secure_split.crypto.keys`).
            deployment_hash: the deployment's hash; bound into the genesis and every signature.
            policy_hash: the hash of the policy in force; every entry carries it.
            resume: this process resumes training from a checkpoint (run_start's `resumed`).
            clock: nanoseconds since the epoch (default `time.time_ns`; tests pass a fixed clock).
            run_nonce: this process's fresh 32-byte run nonce (bytes or 64 hex digits); drawn here
                when None. Send it in every HELLO (`run_nonce` property).
            versions: software versions for run_start (default: this package's and the protocol's).
            resume_epoch: the epoch training resumes from (run_start's `resume_epoch`).
            refusal_limit: the rate limit for `record_refusal` (default 20 per 60 s).

        Returns:
            The open log, its run_start written.

        Raises:
            AuditError: the existing file fails verification, belongs to another deployment, or is
                open for writing in another process.
        """
        import secure_split

        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        nonce = nonce_hex(run_nonce)
        created = not p.exists()
        fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            lock_for_writing(fd, p)
            # Read the size under the lock: another writer may have appended until it let go.
            if os.fstat(fd).st_size:
                seq, head, previous = prepare_continue(p, peer=peer, key_hex=identity.sign_key_hex,
                                                        deployment_hash=deployment_hash)
            else:
                seq, head, previous = -1, genesis_hash(peer, deployment_hash, nonce), None
        except BaseException:
            os.close(fd)
            raise
        if created:
            fsync_dir(p.parent)
        log = cls(p, fd, peer=peer, identity=identity, deployment_hash=deployment_hash, policy_hash=policy_hash,
                  seq=seq, head=head, nonce=nonce, clock=clock or time.time_ns,
                  limiter=refusal_limit or RefusalLimiter())
        fields = {
            "deployment_hash": deployment_hash, "policy_hash": policy_hash,
            "versions": dict(versions) if versions is not None else
            {"secure_split": secure_split.__version__, "protocol": secure_split.PROTOCOL_VERSION},
            "resumed": bool(resume), "resume_epoch": resume_epoch, "nonce": nonce, "previous": previous,
        }
        log._start_fields = fields
        log._start_seq = log._write("run_start", fields)[0]
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
        schema = SCHEMAS.get(event)
        if schema is None:
            raise AuditError(f"unknown audit event {event!r}; known events: {sorted(GATE_EVENTS)}")
        required, optional = schema
        missing = required - fields.keys()
        if missing:
            raise AuditError(f"audit event {event!r} is missing fields {sorted(missing)}")
        data = {}
        for k, v in fields.items():
            t = type(v)
            # Fast path: the gate's fields are mostly short strings, ints and None.
            if (t is str and len(v) <= SHORT) or (t is int and -(2**62) < v < 2**62) or v is None or t is bool:
                data[k] = v
            else:
                data[k] = clean_value(v, f"{event}.{k}")
        for k in optional:
            data.setdefault(k, None)
        ed["data"] = data
        return ed

    def _hash_chain(self, _logger: Any, _method: str, ed: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        ed["prev"] = self._head
        try:
            body = encode_entry(dict(ed))
        except TypeError as exc:
            raise AuditError(f"audit entry {ed['event']!r} holds a value canonical JSON cannot express: {exc}") from None
        if self._secret_forms.search(body) is not None:
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
            msg = head_message(self._peer, ed["seq"], entry_hash, self._deployment_hash, run=self._run,
                               nonce=self._nonce)
            signature = self._identity.sign(msg).hex()
            ed["sig"] = {"key": self._key_hex, "signature": signature}
            body = encode_entry(dict(ed))
        self._pending = (ed["seq"], entry_hash, signature)
        ed["_line"] = body
        return ed

    def _render(self, _logger: Any, _method: str, ed: MutableMapping[str, Any]) -> bytes:
        line: bytes = ed["_line"]
        return line + b"\n"

    # -- writing ------------------------------------------------------------------------------

    def _write(self, event: str, fields: dict[str, Any], *, after_end: bool = False) -> tuple[int, str, str]:
        """Run the chain for one entry and commit the new head. Caller holds no lock."""
        with self._lock:
            if self._closed:
                raise AuditError(f"audit log {self._path} is closed; no entry can be added")
            if self._broken is not None:
                raise AuditError(f"audit log {self._path} is unusable after a failed write: {self._broken}")
            if self._ended and not after_end:
                raise AuditError(f"audit log {self._path}: the run has ended (run_end is written); only the close "
                                 "round's entries may follow (audit receipts, counterparty heads, refusals, "
                                 "peer_lost, error; finish_close)")
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
        """Append one entry written by the gate or the peer.

        Args:
            event: one of `GATE_EVENTS` (message_sent, message_received, policy_denied, refused,
                error, peer_joined, peer_lost, checkpoint_saved, checkpoint_resumed, ids_aligned,
                weights_loaded). `run_start` is written by `open`; a `record("run_start", ...)`
                with the same fields is accepted and writes nothing (returns run_start's seq).
            **fields: the event's fields (JSON scalars, lists and small dicts; see `clean_value`).

        Returns:
            The new entry's seq.

        Raises:
            AuditError: unknown event, missing fields, a value that may not enter the log, the
                log is closed or its run ended, or the write failed.
        """
        if event == "run_start":
            same = all(self._start_fields.get(k) == clean_value(v, k) for k, v in fields.items())
            if not same:
                raise AuditError("run_start is written by AuditLog.open; pass versions=, resume= and resume_epoch= "
                                 "to open instead of recording it")
            return self._start_seq
        after_end = event in CLOSE_TAIL_EVENTS or (event in MESSAGE_EVENTS and fields.get("kind") in CLOSE_TAIL_KINDS)
        if event not in GATE_EVENTS:
            hint = " (the log writes it itself: see AuditLog's methods)" if event in LOG_EVENTS else ""
            raise AuditError(f"audit event {event!r} cannot be recorded directly{hint}; "
                             f"known events: {sorted(GATE_EVENTS)}")
        return self._write(event, fields, after_end=after_end)[0]

    def bind_run(self, run_id: str, nonces: Mapping[str, str], previous: Mapping[str, Any] | None = None) -> None:
        """Record the run this segment belongs to (`run_bound`); later signatures bind `run_id`.

        Call it when the start barrier announces run id and nonces (and again when peers rejoin
        mid-run and a new run id is announced).

        Args:
            run_id: the announced run id.
            nonces: peer -> run nonce (hex) of every peer of the run; must hold this segment's own.
            previous: when the run continues an earlier one (resume, rejoin): {"run_id": ...,
                "heads": {peer: {"seq": int, "head": hex}}}; recorded as given.

        Raises:
            AuditError: our nonce is not in `nonces`, or `run_id` is not `compute_run_id` of them
                (a coordinator announcing something else: refuse the barrier).
        """
        checked = check_nonces(nonces)
        if checked.get(self._peer) != self._nonce:
            raise AuditError(f"the run announced does not hold '{self._peer}''s run nonce {self._nonce[:16]}...: "
                             "it is not this process's run (a replayed or forged start barrier)")
        expected = compute_run_id(self._deployment_hash, self._policy_hash, checked)
        if run_id != expected:
            raise AuditError(f"the announced run id {str(run_id)[:16]}... is not the hash of the announced nonces "
                             f"({expected[:16]}...): refuse the start barrier")
        self._write("run_bound", {"run_id": run_id, "nonces": checked,
                                  "previous": dict(previous) if previous is not None else None})
        self._run, self._nonces = run_id, checked

    def checkpoint(self, reason: str) -> SignedHead:
        """Write a signed checkpoint entry and fsync the file.

        Call it at every step barrier; send the result to every counterparty (`to_meta()` in an
        `audit_receipt` message) so they record it with `record_counterparty_head`.

        Args:
            reason: why the checkpoint was taken (e.g. "epoch_end barrier, epoch 3").

        Returns:
            The signed head (peer, seq, entry hash, signature, run id, nonce).

        Raises:
            AuditError: the log is closed or the write failed.
        """
        return self._checkpoint(reason, after_end=False)

    def _checkpoint(self, reason: str, *, after_end: bool) -> SignedHead:
        seq, entry_hash, signature = self._write("checkpoint", {"reason": reason}, after_end=after_end)
        try:
            self._sink.fsync()
        except OSError as exc:
            raise AuditError(f"could not fsync audit log {self._path}: {exc}") from exc
        return SignedHead(peer=self._peer, seq=seq, head=entry_hash, signature=signature, run=self._run,
                          nonce=self._nonce)

    def record_counterparty_head(self, head: SignedHead, public_sign_key_hex: str) -> None:
        """Verify a counterparty's signed head of this run and record it (allowed in the close round).

        Args:
            head: the head the counterparty sent (`SignedHead.from_meta`).
            public_sign_key_hex: that peer's public key from the deployment.

        Raises:
            RemoteProtocolError: the head binds another run, or another nonce than the one the run
                names for that peer (a replayed head); nothing is recorded.
            CryptoError: the signature does not verify with that key (nothing is recorded).
            AuditError: the head is our own, or the log is closed.

        Before `bind_run` (a failed start, or a peer that runs no start barrier) only heads that bind
        no run either are accepted: they bind the signer's nonce alone.
        """
        if head.peer == self._peer:
            raise AuditError(f"'{self._peer}' cannot record its own head as a counterparty's")
        if not self._run and head.run:
            raise RemoteProtocolError(f"signed audit head from '{head.peer}' binds run {head.run[:16]}..., but this "
                                      "segment is bound to no run yet: not recorded")
        if self._run and (head.run != self._run or self._nonces.get(head.peer) != head.nonce):
            raise RemoteProtocolError(
                f"signed audit head from '{head.peer}' (seq {head.seq}) binds run {head.run[:16] or '(none)'}... with "
                f"nonce {head.nonce[:12]}..., not this run {self._run[:16]}... and the nonce it names for "
                f"'{head.peer}': a head of another run (replayed); it was not recorded")
        try:
            head.verify(public_sign_key_hex, self._deployment_hash)
        except (CryptoError, ValueError):
            raise CryptoError(f"signed audit head from '{head.peer}' (seq {head.seq}) does not verify with its key in "
                              "the deployment; it was not recorded") from None
        self._heard.add(head.peer)
        self._write("counterparty_head",
                    {"counterparty": head.peer, "seq": head.seq, "head": head.head, "signature": head.signature,
                     "key": public_sign_key_hex, "run_id": head.run, "nonce": head.nonce}, after_end=True)

    def record_epoch_metrics(self, epoch: int, values: Mapping[str, Any]) -> MetricsStatement:
        """Record this peer's own metrics for an epoch (`epoch_metrics`) and sign them for the coordinator.

        Args:
            epoch: the epoch.
            values: metric name -> number (this peer computed them).

        Returns:
            The signed statement: send `to_meta()` in the barrier_ack.

        Raises:
            AuditError: values that may not enter the log, or no run bound yet.
        """
        if not self._run:
            raise AuditError("no run is bound yet (bind_run): metrics are signed for a run")
        clean = clean_value(dict(values), "epoch_metrics.values")
        self._write("epoch_metrics", {"epoch": epoch, "values": clean})
        sig = self._identity.sign(metrics_message(self._peer, epoch, clean, self._deployment_hash, run=self._run))
        return MetricsStatement(peer=self._peer, epoch=epoch, values=clean, run=self._run, signature=sig.hex())

    def record_counterparty_metrics(self, statement: MetricsStatement, public_sign_key_hex: str) -> None:
        """Verify and record another peer's signed metrics as theirs (`counterparty_metrics`), never as ours.

        Raises:
            RemoteProtocolError: the statement is for another run, or claims to be ours.
            CryptoError: the signature does not verify with the peer's key (nothing is recorded).
            AuditError: values that may not enter the log, or the log is closed.
        """
        if statement.peer == self._peer or statement.run != self._run or not self._run:
            raise RemoteProtocolError(f"metrics statement of '{statement.peer}' is for run "
                                      f"{statement.run[:16] or '(none)'}..., not this run: not recorded")
        clean = clean_value(dict(statement.values), "counterparty_metrics.values")
        signed = MetricsStatement(statement.peer, statement.epoch, clean, statement.run, statement.signature)
        try:
            signed.verify(public_sign_key_hex, self._deployment_hash)
        except (CryptoError, ValueError):
            raise CryptoError(f"metrics of '{statement.peer}' for epoch {statement.epoch} do not verify with its key; "
                              "not recorded") from None
        self._write("counterparty_metrics", {"counterparty": statement.peer, "epoch": statement.epoch,
                                             "values": clean, "signature": statement.signature,
                                             "key": public_sign_key_hex, "run_id": statement.run})

    def record_refusal(self, source: str, reason: str) -> bool:
        """Record an outsider's refusal by the transport (ZAP-refused key, oversized message, cut connection).

        Rate-limited (`RefusalLimiter`): at most `limit` entries per window; past it the refusals are
        counted and summarised in one entry (source "*", count N) when the next window begins or
        at close. A flood cannot fill the disk.

        Args:
            source: who was refused (a public key in Z85 or hex, an address, a peer name).
            reason: why.

        Returns:
            True when an entry was written for this refusal.
        """
        if self._closed or self._ended:
            return False
        admit, flushed = self._limiter.admit()
        if flushed:
            self._summarise(flushed)
        if admit:
            self._write("transport_refused", {"source": source[:512], "reason": reason[:2000], "count": 1,
                                              "window_s": self._limiter.window_s})
        return admit

    def _summarise(self, count: int) -> None:
        self._write("transport_refused", {"source": "*", "reason": f"{count} more refusal(s) in the last window, "
                                          "not recorded one by one (rate limit)", "count": count,
                                          "window_s": self._limiter.window_s})

    # -- the close round ----------------------------------------------------------------------

    def begin_close(self, status: str, reason: str = "", metrics: Mapping[str, Any] | None = None) -> SignedHead:
        """Write `run_end` (this peer's own metrics only) and the signed close checkpoint.

        Send the returned head to every counterparty (audit_receipt) and record theirs as they
        arrive (`record_counterparty_head`), for a bounded time; then call `finish_close`.

        Args:
            status: "ok" or "failed".
            reason: why the run ended (empty when ok).
            metrics: final scalar metrics this peer computed itself (never another peer's).

        Returns:
            The close head.
        """
        suppressed = self._limiter.take_suppressed()
        if suppressed:
            self._summarise(suppressed)
        self._write("run_end", {"status": status, "reason": reason, "metrics": dict(metrics or {})})
        self._ended = True
        return self._checkpoint("close", after_end=True)

    def finish_close(self, missing: Sequence[str] = (), reason: str = "") -> SignedHead:
        """End the close round: record who did not answer (`close_incomplete`), sign the final head, close.

        Args:
            missing: counterparties whose close head did not arrive within the bound.
            reason: why (e.g. "no answer within 10 s").

        Returns:
            The final signed head.
        """
        if not self._ended:
            raise AuditError("finish_close comes after begin_close")
        if missing:
            self._write("close_incomplete", {"missing": sorted(missing), "reason": reason or "no answer"},
                        after_end=True)
        head = self._checkpoint("final", after_end=True)
        with self._lock:
            self._closed = True
            self._sink.close()
        return head

    def close(self, status: str, reason: str = "", metrics: Mapping[str, Any] | None = None,
              missing: Sequence[str] | None = None) -> SignedHead:
        """`begin_close` and `finish_close` in one call, for a peer that runs no close round.

        Nobody countersigns such a close, so it is recorded as incomplete (`close_incomplete`)
        naming `missing`, by default every counterparty of the run (or whose heads this segment
        recorded); the verifier then reports the segment's uncountersigned tail as a warning.

        Args:
            status: "ok" or "failed".
            reason: why the run ended.
            metrics: this peer's own final metrics.
            missing: the counterparties that did not countersign (default: all it knows of).
        """
        self.begin_close(status, reason, metrics)
        if missing is None:
            missing = sorted((set(self._nonces) | self._heard) - {self._peer})
        return self.finish_close(missing, reason="no close round was run" if missing else "")

    # -- state --------------------------------------------------------------------------------

    @property
    def head(self) -> str:
        """The chain head: entry hash of the last entry."""
        return self._head

    @property
    def seq(self) -> int:
        """Seq of the last entry written."""
        return self._seq

    @property
    def path(self) -> Path:
        """The log file."""
        return self._path

    @property
    def closed(self) -> bool:
        """True after the close round (or `close`)."""
        return self._closed

    @property
    def run_nonce(self) -> str:
        """This segment's run nonce (64 hex digits): send it in every HELLO (`run_nonce` meta)."""
        return self._nonce

    @property
    def run_id(self) -> str:
        """The run id bound by `bind_run` ("" before)."""
        return self._run
