"""Horizontal training across many data owners: the `sequential` and `splitfed` schedules.

Roles: one coordinator (the label holder in vanilla, or the server of a U-shaped topology, whose
owners keep their labels) and N owners (`config.horizontal_owners`), each holding the same
models and its own rows. The coordinator runs one shared top (or middle) and serves the owners
one step at a time, in the order their activations arrive; each step uses only the edges of the
owner whose batch it is (`PeerExecutor.begin_step(peers=[owner])`).

Set-up, after the handshake:
- Ids. Where the coordinator holds labels it runs a two-party PSI with each owner (`psi`): the
  intersection is that owner's trainable rows and neither side learns the other's other ids.
  Where it holds none (U-shaped), each owner announces only its row count (`rows` in its HELLO)
  and steps name row positions, which the owner maps to its own ids: the server never sees an id.
- CKKS (splitfed with `average: he`): the first owner creates the context, gives the coordinator
  a public context (it cannot decrypt) and seals the secret context to every other owner,
  directly or relayed by the coordinator (`handoff`).

Per epoch (= round):
- `sequential`: owners take turns in name order. Before an owner's turn the owner holding the
  latest weights seals them to it (`encrypted_weights`, NaCl box to the receiver's transport
  key), peer to peer or relayed by the coordinator, which cannot open them. After the last turn
  the latest weights are sealed to every other owner, so all evaluate the same model.
- `splitfed`: every owner trains its batches at once; the coordinator serves their steps as
  they arrive. At round end the owners average their weights: `average: sealed` - each seals its
  weights to every other owner and averages what it receives; `average: he` - each sends
  `encrypt_vector(weights)` to the coordinator, which adds the ciphertexts and returns the sum;
  the owners decrypt and divide by the count. The coordinator never sees an owner's weights.
- Evaluation: every owner's test rows, in parallel, then the epoch-end barrier (checkpoints,
  signed audit heads exchanged between each owner and the coordinator).

Drop-out and rejoin: an owner whose connection stays down past the grace period, or that does
not answer within `peer_timeout_s`, is named (audit `peer_lost`, a progress event) and left out:
its pending steps are dropped, the round finishes with the others (splitfed) or the turn passes
to the next owner (sequential). A restarted owner (`peer run --resume`) opens a new session
(its HELLO is accepted as a restart), redoes its set-up (PSI, or the CKKS context the coordinator
relays again), receives the current weights sealed from a live owner at the next round start,
and takes part from then on.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from secure_split.config import horizontal_owners
from secure_split.engine.executor import PeerExecutor
from secure_split.engine.schedule import epoch_batches, eval_batches, split_train_test
from secure_split.engine.tensors import from_wire
from secure_split.errors import (
    ConfigError,
    ConfigProblem,
    RemoteProtocolError,
    SecureSplitError,
    TrainingError,
)
from secure_split.peer.runtime import (
    PeerRuntime,
    ProgressFn,
    _clip,
    _EpochMetrics,
    _ids_from_wire,
    _ids_wire,
    _meta_int,
)
from secure_split.protocol import Kind, Message

__all__ = ["HorizontalRuntime"]

# Steps announced to one owner ahead of the one it works on (hides the step_begin round trip).
_WINDOW = 2
# Barrier reasons of the horizontal schedules (the epoch barriers keep theirs: start, epoch_end).
_HANDOFF, _AVERAGE, _LOST = "handoff", "average", "lost"
_LOADED, _AVERAGED = "loaded", "averaged"
# Prefix of the raw sums owners report at the epoch barrier, merged by the coordinator.
_SUM = "n/"


@dataclass
class _Pending:
    owner: str
    phase: str
    ids: np.ndarray


class HorizontalRuntime(PeerRuntime):
    """A peer of a `sequential` or `splitfed` deployment (see the module docstring)."""

    accepts_restarted_peers = True

    def __init__(self, config_path: str | Path, *, resume: bool = False, progress: ProgressFn | None = None) -> None:
        super().__init__(config_path, resume=resume, progress=progress)
        spec = self.deployment.spec
        self.owners = list(horizontal_owners(spec))
        self.coordinator = spec.coordinator
        self.is_owner = self.me in self.owners
        self.schedule = spec.training.schedule
        self.relay = spec.training.handoff == "relay"
        self.he_average = self.schedule == "splitfed" and spec.training.average == "he"
        # Sealed weights go through the coordinator when relayed, and always under HE averaging
        # (the policy then allows weights only to and from the coordinator).
        self.via_coordinator = self.relay or self.he_average
        self.training_started = False
        # Where the coordinator holds no labels, steps name row positions rather than ids.
        self.ordinal = not any(seg.loss and seg.peer == self.coordinator for seg in spec.segments.values())
        self.lost: set[str] = set()
        self.joining: dict[str, bool] = {}  # restarted owner -> set-up finished
        self.round_id = 0
        self.weights_ctx: Any = None
        # coordinator state
        self.owner_ids: dict[str, np.ndarray] = {}
        self.pending: dict[int, _Pending] = {}
        self.plans: dict[str, deque[tuple[int, str, np.ndarray]]] = {}
        self.next_step = 0
        self.steps_total = 0
        self.steps_done = 0
        self.epoch = 0
        self.hacks: dict[tuple[str, str], set[str]] = {}
        self.turns: list[str] = []  # sequential: owners in the order they last completed a turn
        self.psi: dict[str, Any] = {}
        self.sealed_contexts: dict[str, bytes] = {}
        self.context_sent: set[str] = set()
        self.he_parts: dict[str, dict[str, bytes]] = {}
        # owner state
        self.positions: np.ndarray | None = None
        self.secret_context: bytes | None = None
        self.avg_round = ""
        self.avg_expect: set[str] = set()
        self.avg_got: dict[str, np.ndarray] = {}
        self.avg_early: dict[str, dict[str, np.ndarray]] = {}  # round -> weights that came before its barrier
        self.avg_done: set[str] = set()

    # -- session and liveness -----------------------------------------------------------------

    def _hello_meta(self) -> dict[str, Any]:
        meta = super()._hello_meta()
        if self.ordinal and self.is_owner and self.data is not None:
            meta["rows"] = len(self.data)
        return meta

    def _live(self) -> list[str]:
        """Owners taking part now (not lost, not still joining)."""
        return [o for o in self.owners if o not in self.lost and o not in self.joining]

    def _receipt_peers(self) -> list[str]:
        if self.is_coordinator:
            return self._live()
        return [self.coordinator]

    def _reachable(self, peer: str) -> bool:
        return peer not in self.lost

    def _connection_lost(self, peer: str, down_s: float) -> None:
        # The coordinator carries on without an owner, an owner without another owner; nobody
        # carries on without the coordinator.
        if peer in self.owners and peer != self.me:
            self._lose(peer, "connection lost (heartbeat timeout)")
            return
        super()._connection_lost(peer, down_s)

    def _timed_out(self, names: list[str], what: str, limit: float) -> None:
        # Once training runs, the coordinator carries on without silent owners; during set-up
        # (handshake, PSI, CKKS contexts) every owner must be there.
        if self.is_coordinator and self.training_started and names and all(n in self.owners for n in names):
            for n in names:
                self._lose(n, f"no answer within {limit:.0f} s while {what}")
            return
        super()._timed_out(names, what, limit)

    def _lose(self, peer: str, reason: str) -> None:
        """Carry on without `peer` (an owner)."""
        if peer in self.lost:
            return
        self.lost.add(peer)
        self.joining.pop(peer, None)
        self.audit.record("peer_lost", counterparty=peer, reason=_clip(reason))
        if not self.is_coordinator:
            self.avg_expect.discard(peer)
            self._maybe_average()
            return
        self.progress({"event": "owner_lost", "owner": peer, "reason": reason})
        self._forget_steps(peer)
        for o in self._live():
            try:
                self.gate.send(o, Kind.BARRIER, step=self.epoch + 1,
                               meta={"epoch": self.epoch, "reason": _LOST, "to": peer})
            except SecureSplitError as exc:  # pragma: no cover - another owner going down too
                self.audit.record("error", reason=f"could not tell '{o}' that '{peer}' dropped: {exc}", error=type(exc).__name__)

    def _forget_steps(self, peer: str) -> None:
        """Coordinator: drop everything scheduled for `peer` (lost or restarted)."""
        self.psi.pop(peer, None)
        self.plans.pop(peer, None)
        for step in [s for s, p in self.pending.items() if p.owner == peer]:
            del self.pending[step]
            self.steps_done += 1
            if step == self.current_step:
                self.executor.abort_step()
                self.current_step = None
        self.queue = deque(m for m in self.queue if m.binding.sender != peer)

    # -- dispatch --------------------------------------------------------------------------------

    def _dispatch(self, msg: Message) -> None:
        for peer in self.gate.take_rejoined():
            self._on_restarted(peer)
        kind, sender = msg.kind, msg.binding.sender
        if kind == Kind.HELLO:
            return  # a restarted peer's new session, answered above
        if self.is_coordinator:
            if kind in (Kind.ERROR, Kind.REFUSE) and self.training_started and sender in self.owners:
                # One owner's failure costs the run that owner, as a drop-out does.
                if str(msg.meta.get("code", "")) not in ("bad_frame", "spoofed"):
                    self._lose(sender, f"'{sender}' reported {msg.meta.get('code', 'an error')!s}: {msg.meta.get('reason', '')!s}")
                    return
            if kind == Kind.ENCRYPTED_WEIGHTS and "to" in msg.meta:
                self._relay(msg)
                return
            if kind == Kind.HE_CONTEXT and msg.meta.get("part") == "secret":
                self._relay_context(msg)
                return
            if kind == Kind.ENCRYPTED_WEIGHTS:
                self._on_encrypted_contribution(msg)
                return
            if kind == Kind.PSI and sender in self.joining:
                self._joiner_psi(sender, bytes(msg.blob))
                return
            if kind == Kind.BARRIER_ACK and msg.meta.get("reason") in (_LOADED, _AVERAGED):
                self.hacks.setdefault((str(msg.meta["reason"]), str(msg.meta.get("phase", ""))), set()).add(sender)
                return
        elif kind == Kind.BARRIER and msg.meta.get("reason") == _LOST:
            gone = str(msg.meta.get("to", ""))
            self._lose(gone, f"the coordinator reported '{gone}' dropped")
            return
        super()._dispatch(msg)

    def _on_restarted(self, peer: str) -> None:
        """A counterparty restarted and said HELLO again: answer, and bring it up to date."""
        self.gate.send_hello(peer)
        self.lost_since.pop(peer, None)
        if self.is_coordinator and peer == self.owners[0] and self.he_average:
            # A restarted key holder would bring a new CKKS key: its ciphertexts would not add up
            # with the others'. The others keep averaging under the old key without it.
            if peer not in self.lost:
                self._lose(peer, "the CKKS key holder restarted")
            self.gate.refuse(peer, f"'{peer}' holds the CKKS key of this run and cannot rejoin it after a restart "
                                   "(it would bring a new key); the others go on without it; restart the whole run "
                                   "to bring it back", "rejoin_refused", kind=Kind.REFUSE)
            return
        if self.is_coordinator and peer in self.owners:
            if peer not in self.lost and self.training_started:
                # Restarted before we noticed it was gone: what it had scheduled died with it.
                self._lose(peer, "restarted with a new session")
            self.lost.discard(peer)
            self.joining[peer] = False
            self.progress({"event": "owner_joined", "owner": peer})
            if self.he_average and self.relay:
                self.context_sent.discard(peer)
                self._forward_contexts()
            if self.ordinal:
                self._set_rows(peer)
                self.joining[peer] = True
            else:
                self._start_psi(peer)
        elif self.is_owner and peer in self.owners:
            self.lost.discard(peer)
            if self.he_average and not self.relay and self.me == self.owners[0] and self.secret_context:
                self._send_secret_context(peer)

    # -- set-up: ids -------------------------------------------------------------------------------

    def _psi_salt(self) -> bytes:
        return b"secure-split-psi-v1:" + bytes.fromhex(self.deployment.hash)

    def _own_ids(self) -> list[int]:
        assert self.data is not None
        return [int(x) for x in self.data.ids.tolist()]

    def _start_psi(self, owner: str) -> None:
        from secure_split.crypto.psi import MultiPartyPsi

        psi = MultiPartyPsi(self.me, [self.me, owner], self._own_ids(), salt=self._psi_salt(),
                            max_points=max(1, self.deployment.spec.limits.max_message_bytes // 32))
        self.psi[owner] = psi
        for st in psi.start():
            self.gate.send(st.receiver, Kind.PSI, blob=st.payload)

    def _psi_step(self, owner: str, payload: bytes) -> bool:
        """Feed one PSI message from `owner`; True when that PSI is done (ids recorded)."""
        psi = self.psi[owner]
        for st in psi.receive(owner, payload):
            self.gate.send(st.receiver, Kind.PSI, blob=st.payload)
        if not psi.done:
            return False
        inter = np.asarray(sorted(int(x) for x in psi.result().ids), dtype=np.int64)
        del self.psi[owner]
        self.owner_ids[owner] = inter
        self.audit.record("ids_aligned", parties=[self.me, owner], own_size=len(self._own_ids()),
                          intersection_size=int(inter.shape[0]))
        return True

    def _joiner_psi(self, owner: str, payload: bytes) -> None:
        if owner not in self.psi:
            raise RemoteProtocolError(f"'{owner}' sent a PSI message outside its set-up")
        if self._psi_step(owner, payload):
            self.joining[owner] = True

    def _set_rows(self, owner: str) -> None:
        meta = self.gate.sessions[owner].remote_hello_meta or {}
        rows = meta.get("rows")
        if not isinstance(rows, int) or rows < 2:
            raise RemoteProtocolError(f"owner '{owner}' announced {rows!r} rows in its HELLO; it needs at least 2")
        self.owner_ids[owner] = np.arange(rows, dtype=np.int64)

    def _align_ids(self) -> None:
        if self.is_coordinator:
            if self.ordinal:
                for o in self.owners:
                    self._set_rows(o)
                return
            if self.data is None:
                raise ConfigError(ConfigProblem(str(self.cfg.path), "data", "the coordinator holds the labels, so it needs its data file (ids, labels)"))
            for o in self.owners:
                self._start_psi(o)
            while self.psi:
                msg = self._setup_message((Kind.PSI,), "aligning sample ids with each owner by PSI", sorted(self.psi))
                if msg.binding.sender not in self.psi:
                    raise RemoteProtocolError(f"'{msg.binding.sender}' sent a PSI message it was not asked for")
                self._psi_step(msg.binding.sender, bytes(msg.blob))
            for o, ids in self.owner_ids.items():
                if ids.shape[0] < 2:
                    self._lose(o, f"PSI: '{o}' holds only {ids.shape[0]} labelled sample(s)")
            return
        if self.data is None:
            raise ConfigError(ConfigProblem(str(self.cfg.path), "data", "an owner needs its data file (ids, features)"))
        if self.ordinal:
            self.positions = np.asarray(sorted(self._own_ids()), dtype=np.int64)
            return
        from secure_split.crypto.psi import MultiPartyPsi

        own = self._own_ids()
        psi = MultiPartyPsi(self.me, [self.coordinator, self.me], own, salt=self._psi_salt(),
                            max_points=max(1, self.deployment.spec.limits.max_message_bytes // 32))
        for st in psi.start():
            self.gate.send(st.receiver, Kind.PSI, blob=st.payload)
        while not psi.done:
            msg = self._setup_message((Kind.PSI,), "aligning sample ids with the coordinator by PSI", [self.coordinator])
            for st in psi.receive(msg.binding.sender, bytes(msg.blob)):
                self.gate.send(st.receiver, Kind.PSI, blob=st.payload)
        inter = sorted(int(x) for x in psi.result().ids)
        if len(inter) < 2:
            raise TrainingError(f"PSI: the coordinator labels only {len(inter)} of this owner's samples; nothing to train on")
        self.data = self.data.subset(np.asarray(inter, dtype=np.int64))
        self.executor = PeerExecutor(self.deployment, self.me, self.data, defer_update=True)
        self.audit.record("ids_aligned", parties=[self.coordinator, self.me], own_size=len(own), intersection_size=len(inter))

    # -- set-up: CKKS for weight averaging -----------------------------------------------------------

    def _setup_he(self) -> None:
        if not self.he_average:
            return
        from secure_split.crypto.he import KeyHolderContext, PublicContext
        from secure_split.crypto.seal import open_from

        kh = self.owners[0]
        limit = self.deployment.spec.limits.max_message_bytes
        params = self.policy.requirements.ckks.params()  # exactly the policy's: every party checks them
        if self.me == kh:
            ctx = KeyHolderContext.create(params)
            self.weights_ctx = ctx
            self.gate.send(self.coordinator, Kind.HE_CONTEXT, meta={"part": "public"}, blob=ctx.public_context_bytes())
            self.secret_context = ctx.serialize_secret()
            for o in self.owners[1:]:
                self._send_secret_context(o)
        elif self.is_coordinator:
            msg = self._setup_message((Kind.HE_CONTEXT,), f"receiving the CKKS public context from '{kh}'", [kh])
            if msg.binding.sender != kh or msg.meta.get("part") != "public":
                raise RemoteProtocolError(f"unexpected CKKS context from '{msg.binding.sender}'; expected the public context from '{kh}'")
            pub = PublicContext.from_bytes(bytes(msg.blob), params=params, max_bytes=limit)
            if pub.is_private():  # the coordinator must never be able to decrypt
                raise RemoteProtocolError(f"'{kh}' sent a context with a secret key to the coordinator")
            self.weights_ctx = pub
            self._forward_contexts()
        elif self.is_owner:
            via = self.coordinator if self.relay else kh
            msg = self._setup_message((Kind.HE_CONTEXT,), f"receiving the CKKS context from '{kh}'", [via])
            origin = str(msg.meta.get("from", "")) if self.relay else msg.binding.sender
            if msg.binding.sender != via or origin != kh or msg.meta.get("part") != "secret":
                raise RemoteProtocolError(f"unexpected CKKS context from '{msg.binding.sender}'; expected the secret context of '{kh}'")
            secret = open_from(self.identity, self.deployment.spec.peers[kh].transport_key, bytes(msg.blob))
            self.weights_ctx = KeyHolderContext.from_secret_bytes(secret, params=params, max_bytes=limit)

    def _send_secret_context(self, owner: str) -> None:
        from secure_split.crypto.seal import seal_to

        assert self.secret_context is not None
        sealed = seal_to(self.deployment.spec.peers[owner].transport_key, self.identity, self.secret_context)
        if self.relay:
            self.gate.send(self.coordinator, Kind.HE_CONTEXT, meta={"part": "secret", "to": owner}, blob=sealed)
        else:
            self.gate.send(owner, Kind.HE_CONTEXT, meta={"part": "secret"}, blob=sealed)

    def _relay_context(self, msg: Message) -> None:
        """Coordinator: pass the key holder's sealed secret context on (it cannot open it)."""
        kh, to = self.owners[0], str(msg.meta.get("to", ""))
        if msg.binding.sender != kh or kh in self.lost or to not in self.owners or to == kh or not self.relay:
            raise RemoteProtocolError(f"'{msg.binding.sender}' asked to relay a CKKS secret context to {to!r}")
        self.sealed_contexts[to] = bytes(msg.blob)
        self._forward_contexts()

    def _forward_contexts(self) -> None:
        """Coordinator: relay the sealed contexts whose receivers have finished their handshake
        (the key holder may finish its own before ours with another owner is done)."""
        for to, blob in self.sealed_contexts.items():
            session = self.gate.sessions[to]
            if to in self.context_sent or to in self.lost or session.state.name != "ESTABLISHED":
                continue
            self.context_sent.add(to)
            self.gate.send(to, Kind.HE_CONTEXT, meta={"part": "secret", "from": self.owners[0]}, blob=blob)

    # -- weights -----------------------------------------------------------------------------------

    def _relay(self, msg: Message) -> None:
        """Coordinator: forward an owner's sealed weights to another owner (it cannot open them)."""
        sender, to = msg.binding.sender, str(msg.meta.get("to", ""))
        if not self.via_coordinator or sender not in self.owners or to not in self.owners or to == sender:
            raise RemoteProtocolError(f"'{sender}' asked to relay weights to {to!r}, which this deployment does not do")
        if to in self.lost:
            self.audit.record("error", error="PeerTimeout", reason=f"dropped weights from '{sender}' for '{to}', which is lost")
            return
        meta = {k: v for k, v in msg.meta.items() if k != "to"}
        meta["from"] = sender
        self.gate.send(to, Kind.ENCRYPTED_WEIGHTS, step=msg.binding.step, meta=meta, blob=bytes(msg.blob))

    def _seal_weights(self, to: str, mode: str, phase: str) -> None:
        """Owner: seal our weights to owner `to` and send them (direct, or through the coordinator)."""
        from secure_split.crypto.seal import seal_to

        vec = np.ascontiguousarray(self.executor.weights_vector(), dtype="<f4")
        sealed = seal_to(self.deployment.spec.peers[to].transport_key, self.identity, vec.tobytes())
        meta: dict[str, Any] = {"mode": mode, "phase": phase}
        if self.via_coordinator:
            self.gate.send(self.coordinator, Kind.ENCRYPTED_WEIGHTS, meta={**meta, "to": to}, blob=sealed)
        else:
            self.gate.send(to, Kind.ENCRYPTED_WEIGHTS, meta=meta, blob=sealed)

    def _open_weights(self, msg: Message) -> tuple[str, np.ndarray]:
        from secure_split.crypto.seal import open_from

        origin = str(msg.meta.get("from", "")) if self.via_coordinator else msg.binding.sender
        via_ok = msg.binding.sender == (self.coordinator if self.via_coordinator else origin)
        if origin not in self.owners or origin == self.me or not via_ok:
            raise RemoteProtocolError(f"weights from '{msg.binding.sender}' (origin {origin!r}) do not come from another owner")
        plain = open_from(self.identity, self.deployment.spec.peers[origin].transport_key, bytes(msg.blob))
        if len(plain) % 4:
            raise RemoteProtocolError(f"weights from '{origin}' are {len(plain)} bytes, not whole float32 values")
        return origin, np.frombuffer(plain, dtype="<f4").astype(np.float32)

    def _ack(self, reason: str, phase: str) -> None:
        self.gate.send(self.coordinator, Kind.BARRIER_ACK, step=self.epoch + 1,
                       meta={"epoch": self.epoch, "reason": reason, "phase": phase})

    def _on_owner_weights(self, msg: Message) -> None:
        mode, phase = str(msg.meta.get("mode", "")), str(msg.meta.get("phase", ""))
        if mode == "handoff":
            origin, vec = self._open_weights(msg)
            self.executor.load_weights_vector(vec)
            self.audit.record("weights_loaded", counterparty=origin, reason=f"hand-off {phase}")
            self._ack(_LOADED, phase)
        elif mode == "average":
            origin, vec = self._open_weights(msg)
            if phase in self.avg_done:  # from an owner the round went on without
                self.audit.record("error", error="RemoteProtocolError",
                                  reason=f"weights from '{origin}' came after averaging round {phase!r} ended; ignored")
                return
            if phase != self.avg_round:
                # Peer to peer, another owner's weights can overtake the coordinator's barrier that
                # opens the round here: keep them for it (one round ahead at most, one copy each).
                early = self.avg_early.setdefault(phase, {})
                if len(self.avg_early) > 2 or origin in early:
                    raise RemoteProtocolError(f"unexpected weights from '{origin}' for averaging round {phase!r}")
                early[origin] = vec
                return
            if phase != self.avg_round or origin not in self.avg_expect:
                raise RemoteProtocolError(f"unexpected weights from '{origin}' for averaging round {phase!r}")
            self.avg_got[origin] = vec
            self.avg_expect.discard(origin)
            self._maybe_average()
        elif mode == "he_sum":
            from secure_split.crypto.he import EncryptedTensor, decrypt_vector

            if msg.binding.sender != self.coordinator or self.weights_ctx is None:
                raise RemoteProtocolError(f"'{msg.binding.sender}' sent an encrypted weight sum")
            enc = EncryptedTensor.from_bytes(self.weights_ctx, bytes(msg.blob),
                                             max_bytes=self.deployment.spec.limits.max_message_bytes)
            if not 1 <= enc.count <= len(self.owners):
                raise RemoteProtocolError(f"the encrypted weight sum claims {enc.count} owners; the deployment has {len(self.owners)}")
            self.executor.load_weights_vector(decrypt_vector(self.weights_ctx, enc, mean=True).astype(np.float32))
            self.audit.record("weights_loaded", counterparty=self.coordinator, reason=f"HE average of {enc.count} owners")
            self._ack(_AVERAGED, phase)
        else:
            raise RemoteProtocolError(f"'{msg.binding.sender}' sent encrypted weights with mode {mode!r}")

    def _maybe_average(self) -> None:
        if not self.avg_round or self.avg_expect:
            return
        own = self.executor.weights_vector()
        stack = [own, *self.avg_got.values()]
        self.executor.load_weights_vector(np.mean(np.stack(stack), axis=0).astype(np.float32))
        self.audit.record("weights_loaded", counterparty=self.me, reason=f"average of {len(stack)} owners")
        phase, self.avg_round, self.avg_got = self.avg_round, "", {}
        self.avg_done.add(phase)
        self._ack(_AVERAGED, phase)

    def _on_owner_barrier(self, msg: Message) -> None:
        reason, phase = str(msg.meta.get("reason", "")), str(msg.meta.get("phase", ""))
        self.epoch = _meta_int(msg, "epoch", self.epoch)
        if reason == _HANDOFF:
            to = str(msg.meta.get("to", ""))
            if to not in self.owners or to == self.me:
                raise RemoteProtocolError(f"the coordinator asked to hand weights to {to!r}")
            self._seal_weights(to, "handoff", phase)
            return
        # _AVERAGE
        if self.he_average:
            from secure_split.crypto.he import encrypt_vector

            enc = encrypt_vector(self.weights_ctx, self.executor.weights_vector())
            self.gate.send(self.coordinator, Kind.ENCRYPTED_WEIGHTS, meta={"mode": "he", "phase": phase}, blob=enc.serialize())
            return
        values = msg.meta.get("values")
        members = {str(k) for k in values} if isinstance(values, dict) else set()
        if self.me not in members or not members <= set(self.owners):
            raise RemoteProtocolError(f"averaging round {phase!r} names owners {sorted(members)}")
        self.avg_round, self.avg_got = phase, {}
        self.avg_expect = members - {self.me}
        for o in sorted(self.avg_expect):
            self._seal_weights(o, "average", phase)
        for origin, vec in self.avg_early.pop(phase, {}).items():
            if origin in self.avg_expect:
                self.avg_got[origin] = vec
                self.avg_expect.discard(origin)
        self._maybe_average()

    def _on_encrypted_contribution(self, msg: Message) -> None:
        """Coordinator: an owner's CKKS-encrypted weights for the round's sum."""
        sender, phase = msg.binding.sender, str(msg.meta.get("phase", ""))
        parts = self.he_parts.get(phase)
        if not self.he_average or msg.meta.get("mode") != "he" or parts is None or sender not in self.owners:
            raise RemoteProtocolError(f"'{sender}' sent encrypted weights outside an averaging round")
        parts[sender] = bytes(msg.blob)

    # -- steps -------------------------------------------------------------------------------------

    def _try_process(self, msg: Message) -> bool:
        kind = msg.kind
        if self.is_coordinator and kind == Kind.ACTIVATION:
            return self._coordinator_activation(msg)
        if not self.is_coordinator:
            if kind == Kind.STEP_BEGIN and self.positions is not None:
                if self.current_step is not None:
                    return False
                pos = _ids_from_wire(msg.tensors[0])
                if pos.size == 0 or pos.min() < 0 or pos.max() >= self.positions.shape[0]:
                    raise RemoteProtocolError(f"step {msg.binding.step} names row positions outside this owner's {self.positions.shape[0]} rows")
                self.epoch = _meta_int(msg, "epoch", self.epoch)
                self._begin(msg.binding.step, str(msg.meta.get("phase", "train")), self.positions[pos])
                return True
            if kind == Kind.STEP_BEGIN:
                self.epoch = _meta_int(msg, "epoch", self.epoch)
            if kind == Kind.BARRIER and msg.meta.get("reason") in (_HANDOFF, _AVERAGE):
                if self.current_step is not None:
                    return False
                self._on_owner_barrier(msg)
                return True
            if kind == Kind.ENCRYPTED_WEIGHTS:
                if self.current_step is not None:
                    return False
                self._on_owner_weights(msg)
                return True
        return super()._try_process(msg)

    def _coordinator_activation(self, msg: Message) -> bool:
        step, sender = msg.binding.step, msg.binding.sender
        info = self.pending.get(step)
        if info is None or info.owner != sender:
            if sender in self.lost:
                return True  # a lost owner's late step
            raise RemoteProtocolError(f"'{sender}' sent an activation for step {step}, which is not one of its steps")
        if self.current_step is not None and self.current_step != step:
            return False  # another owner's step is running here; serve this one next
        try:
            if self.current_step is None:
                self.current_step, self.current_phase = step, info.phase
                self._send_outgoing(self.executor.begin_step(step, info.phase, info.ids, peers=[sender]))  # type: ignore[arg-type]
            self._send_outgoing(self.executor.on_activation(msg.edge, from_wire(msg.tensors[0])))
        except RemoteProtocolError as exc:
            # One owner's bad tensor costs that owner its step, not the run.
            self.executor.abort_step()
            self.current_step = None
            self.audit.record("error", error="RemoteProtocolError", reason=_clip(f"step {step} of '{sender}' dropped: {exc}"))
            self.gate.refuse(sender, f"refused by {self.me}: {exc}", "protocol")
            self._step_done(step)
            return True
        self._maybe_finish_step()
        return True

    def _maybe_finish_step(self) -> None:
        step = self.current_step
        super()._maybe_finish_step()
        if self.is_coordinator and step is not None and self.current_step is None:
            self._step_done(step)

    def _step_done(self, step: int) -> None:
        info = self.pending.pop(step, None)
        if info is None:
            return
        self.steps_done += 1
        if info.phase == "train":
            tasks = getattr(self, "last_step_metrics", None)
            task_m = getattr(tasks, "tasks", {}) or {}
            m = next(iter(task_m.values()), None)
            loss = m.loss_sum / max(1, m.count) if m is not None else None
            self.progress({"event": "step", "epoch": self.epoch, "epochs": self.deployment.spec.training.epochs,
                           "step": self.steps_done, "steps": self.steps_total, "loss": loss, "owner": info.owner})
        self._feed(info.owner)

    def _feed(self, owner: str) -> None:
        plan = self.plans.get(owner)
        while plan and sum(p.owner == owner for p in self.pending.values()) < _WINDOW:
            step, phase, ids = plan.popleft()
            self.pending[step] = _Pending(owner, phase, ids)
            self.gate.send(owner, Kind.STEP_BEGIN, step=step, meta={"epoch": self.epoch, "phase": phase},
                           tensors=(_ids_wire(ids),))
        if plan is not None and not plan:
            del self.plans[owner]

    def _run_steps(self, phase: str, batches: dict[str, list[np.ndarray]]) -> None:
        """Coordinator: run every owner's batches, each owner in order, owners in parallel."""
        self.plans = {}
        for owner, bs in batches.items():
            if owner in self._live() and bs:
                q: deque[tuple[int, str, np.ndarray]] = deque()
                for b in bs:
                    self.next_step += 1
                    q.append((self.next_step, phase, np.asarray(b, dtype=np.int64)))
                self.plans[owner] = q
        if phase == "train":
            self.steps_total, self.steps_done = sum(len(q) for q in self.plans.values()), 0
        for owner in list(self.plans):
            self._feed(owner)
        self._wait(
            lambda: not self.plans and not self.pending and self.current_step is None,
            lambda: f"running {phase} steps of {', '.join(sorted({p.owner for p in self.pending.values()})) or 'the owners'}",
            lambda: sorted({p.owner for p in self.pending.values()}),
        )

    # -- coordinator: rounds -------------------------------------------------------------------------

    def _wait_acks(self, reason: str, phase: str, expect: list[str], what: str, *, source: str | None = None) -> None:
        """Wait for `reason` acks of round `phase` from the live owners among `expect` (from none
        once `source`, the owner whose weights they wait for, is lost)."""
        def missing() -> list[str]:
            if source is not None and source in self.lost:
                return []
            return sorted((set(expect) & set(self._live())) - self.hacks.get((reason, phase), set()))

        self._wait(lambda: not missing(), lambda: what, missing)
        self.hacks.pop((reason, phase), None)

    def _handoff(self, src: str, dsts: list[str]) -> bool:
        """Have owner `src` seal its weights to each of `dsts`; wait until they loaded them.

        Returns:
            False if `src` was lost before every live receiver had its weights.
        """
        dsts = [d for d in dsts if d != src and d not in self.lost]
        if src in self.lost:
            return False
        if not dsts:
            return True
        self.round_id += 1
        phase = f"h{self.round_id}"
        for d in dsts:
            self.gate.send(src, Kind.BARRIER, step=self.epoch + 1,
                           meta={"epoch": self.epoch, "reason": _HANDOFF, "to": d, "phase": phase})
        self._wait_acks(_LOADED, phase, dsts, f"'{src}' handing its weights to {', '.join(dsts)}", source=src)
        return src not in self.lost

    def _hand_latest(self, dsts: list[str]) -> None:
        """Sequential: give `dsts` the weights of the owner that completed the latest turn and is
        still live (if it drops while handing them over, the one before it)."""
        while True:
            src = next((h for h in reversed(self.turns) if h in self._live()), None)
            if src is None or self._handoff(src, dsts):
                return

    def _average(self) -> None:
        """SplitFed round end: the live owners average their weights (sealed, or under CKKS here)."""
        members = self._live()
        if len(members) < 2:
            return
        self.round_id += 1
        phase = f"a{self.round_id}"
        if self.he_average:
            self.he_parts[phase] = {}
        for o in members:
            self.gate.send(o, Kind.BARRIER, step=self.epoch + 1, meta={
                "epoch": self.epoch, "reason": _AVERAGE, "phase": phase, "values": {m: 1 for m in members}})
        if self.he_average:
            from secure_split.crypto.he import EncryptedTensor, sum_encrypted

            def missing() -> list[str]:
                return sorted((set(members) & set(self._live())) - set(self.he_parts[phase]))

            self._wait(lambda: not missing(), lambda: "collecting the owners' encrypted weights", missing)
            parts = self.he_parts.pop(phase)
            limit = self.deployment.spec.limits.max_message_bytes
            loaded = [EncryptedTensor.from_bytes(self.weights_ctx, blob, max_bytes=limit) for blob in parts.values()]
            if len({(t.shape, t.chunks) for t in loaded}) != 1:
                raise RemoteProtocolError("the owners' encrypted weights differ in shape")
            total = sum_encrypted(loaded).serialize()
            for o in parts:
                if o not in self.lost:
                    self.gate.send(o, Kind.ENCRYPTED_WEIGHTS, meta={"mode": "he_sum", "phase": phase}, blob=total)
            members = [o for o in parts]
        self._wait_acks(_AVERAGED, phase, members, "waiting for the owners to average their weights")

    def _admit_joiners(self) -> None:
        """Round start: restarted owners whose set-up is done get the current weights."""
        ready = [o for o, done in self.joining.items() if done]
        if not ready:
            return
        live = self._live()
        for o in ready:
            del self.joining[o]
        if self.schedule == "sequential":
            self._hand_latest(ready)
        elif live:
            self._handoff(live[0], ready)
        for o in ready:
            self.progress({"event": "owner_joined", "owner": o, "epoch": self.epoch})

    def _coordinate(self) -> None:
        training = self.deployment.spec.training
        splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # owner -> train, test ids (joiners added later)
        resume_epoch = self._resume_epoch()
        start_epoch = resume_epoch + 1
        self.training_started = True
        self._barrier(resume_epoch, "start")
        timing: list[dict[str, float]] = []
        for epoch in range(start_epoch, training.epochs):
            self.epoch = epoch
            self.next_step = max(self.next_step, epoch * 1_000_000)
            self.epoch_metrics = _EpochMetrics()
            t0 = time.perf_counter()
            self._admit_joiners()
            self._require_owners()
            for o in self.owner_ids:
                if o not in splits:
                    splits[o] = split_train_test(self.owner_ids[o], training.test_fraction, training.seed)

            def train_batches(o: str, epoch: int = epoch) -> list[np.ndarray]:
                return epoch_batches(splits[o][0], training.batch_size, training.seed, epoch, training.max_steps_per_epoch)

            if self.schedule == "sequential":
                for o in self.owners:
                    if o not in self._live():
                        continue
                    self._hand_latest([o])
                    self._run_steps("train", {o: train_batches(o)})
                    if o not in self.lost:
                        self.turns = [t for t in self.turns if t != o] + [o]
                self._hand_latest(self._live())
            else:
                self._run_steps("train", {o: train_batches(o) for o in self._live()})
                self._average()
            t1 = time.perf_counter()
            self._require_owners()
            self._run_steps("eval", {o: eval_batches(splits[o][1], training.batch_size) for o in self._live()})
            t2 = time.perf_counter()
            values = self._barrier(epoch, "epoch_end")
            t3 = time.perf_counter()
            timing.append({"epoch": epoch, "train_s": t1 - t0, "eval_s": t2 - t1, "barrier_s": t3 - t2,
                           "owners": len(self._live())})
            self.history.append({"epoch": epoch, "values": values})
            self.result.epochs_done = epoch + 1
            self.progress({"event": "epoch", "epoch": epoch, "epochs": training.epochs, "values": values,
                           "owners": len(self._live()), "lost": sorted(self.lost)})
        self.result.metrics = {"history": self.history, "final": self._scalar_metrics(), "timing": timing,
                               "lost": sorted(self.lost)}
        self._broadcast_shutdown("ok", "training finished")

    def _require_owners(self) -> None:
        if not self._live():
            raise TrainingError(
                f"every owner dropped out ({', '.join(sorted(self.lost)) or 'none joined'}); nothing left to train "
                "with: see their logs, then restart the run"
            )

    def _barrier(self, epoch: int, reason: str) -> dict[str, float]:
        """Coordinator: an epoch barrier with the live owners; merges their metric sums."""
        members = self._live()
        for p in members:
            self.gate.send(p, Kind.BARRIER, step=epoch + 1, meta={"epoch": epoch, "reason": reason})
        own = self._barrier_local(epoch, reason)

        def missing() -> list[str]:
            return sorted((set(members) & set(self._live())) - set(self.acks.get(epoch, {})))

        self._wait(lambda: not missing(), lambda: f"waiting for every owner at the {reason} barrier of epoch {epoch}", missing)
        sums: dict[str, float] = {}
        merged = {k: v for k, v in own.items() if not k.startswith(_SUM)}
        for values in [own, *self.acks.get(epoch, {}).values()]:
            for k, v in values.items():
                if k.startswith(_SUM):
                    sums[k] = sums.get(k, 0.0) + v
        for key in [k for k in sums if k.startswith(_SUM + "eval_count/")]:
            task = key.split("/", 2)[2]
            n = max(1.0, sums[key])
            merged[f"accuracy/{task}"] = sums.get(f"{_SUM}eval_correct/{task}", 0.0) / n
            merged[f"eval_loss/{task}"] = sums.get(f"{_SUM}eval_loss_sum/{task}", 0.0) / n
        for key in [k for k in sums if k.startswith(_SUM + "train_count/")]:
            task = key.split("/", 2)[2]
            merged[f"train_loss/{task}"] = sums.get(f"{_SUM}train_loss_sum/{task}", 0.0) / max(1.0, sums[key])
        return merged

    def _barrier_local(self, epoch: int, reason: str) -> dict[str, float]:
        m = self.epoch_metrics
        values = super()._barrier_local(epoch, reason)
        if reason != "epoch_end":
            return values
        out = dict(values)
        for name, table in (("eval_count", m.eval_count), ("eval_correct", m.eval_correct),
                            ("eval_loss_sum", m.eval_loss_sum), ("train_count", m.train_count),
                            ("train_loss_sum", m.train_loss_sum)):
            for task, v in table.items():
                out[f"{_SUM}{name}/{task}"] = float(v)
        return out
