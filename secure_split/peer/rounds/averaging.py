"""Weights moving between the owners of a horizontal deployment, as sans-IO rounds.

An owner's weights only ever travel sealed (a NaCl box to the receiving owner's transport key),
peer to peer or relayed by the coordinator, which cannot open them; or, with `average: he`, as
CKKS ciphertexts the coordinator adds without being able to decrypt.

Rounds (each opened by a coordinator `barrier` naming a round id, meta `phase`):
- hand-off (`reason: handoff`, `to`): the owner seals its weights to `to`; `to` loads them and
  acknowledges `loaded`;
- sealed averaging (`reason: average`, `members`): every member seals its weights to every other
  member and averages what it receives with its own; weights that arrive before the barrier that
  opens their round are kept for it (one round ahead, one copy per origin); a member lost
  mid-round is left out; acknowledged `averaged`;
- HE averaging: every member sends `encrypt_vector(weights)` to the coordinator (`HeWeightSum`),
  which adds the ciphertexts of the live members and returns the sum; each owner decrypts and
  divides by the count.

`OwnerWeights` is an owner's side of all three; `WeightRelay` and `HeWeightSum` the coordinator's.
They take messages and return effects; the schedule gives them the executor's weights when a
round opens and loads what they return.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from secure_split.crypto.he import CkksContext, EncryptedTensor, decrypt_vector, encrypt_vector, sum_encrypted
from secure_split.crypto.keys import Identity
from secure_split.crypto.seal import open_from, seal_to
from secure_split.errors import CryptoError, RemoteProtocolError
from secure_split.peer.effects import Effect, Record, Send
from secure_split.protocol import Kind, Message

__all__ = ["HeWeightSum", "OwnerWeights", "WeightRelay", "WeightsUpdate"]

LOADED, AVERAGED = "loaded", "averaged"


@dataclass(frozen=True)
class WeightsUpdate:
    """New weights for this owner's segments, and the acknowledgement to send once loaded."""

    weights: np.ndarray
    record: Record
    ack: tuple[str, str]  # (reason, round id)


@dataclass
class _Average:
    phase: str
    expect: set[str]
    got: dict[str, np.ndarray] = field(default_factory=dict)


class OwnerWeights:
    """One owner's side of the weight rounds.

    Args:
        me: this owner.
        owners: every owner of the deployment.
        coordinator: the coordinator (relays sealed weights when `via_coordinator`).
        via_coordinator: sealed weights travel through the coordinator.
        identity: this peer's keys.
        transport_keys: every peer's public transport key.
        he_context: the CKKS context (`average: he`), else None.
    """

    def __init__(self, me: str, owners: Sequence[str], coordinator: str, *, via_coordinator: bool,
                 identity: Identity, transport_keys: Mapping[str, str], he_context: CkksContext | None = None,
                 max_bytes: int) -> None:
        self.me = me
        self.owners = list(owners)
        self.coordinator = coordinator
        self.via_coordinator = via_coordinator
        self._identity = identity
        self._keys = dict(transport_keys)
        self.he_context = he_context
        self._max_bytes = max_bytes
        self._average: _Average | None = None
        self._early: dict[str, dict[str, np.ndarray]] = {}  # round -> weights that came before its barrier
        self._done: set[str] = set()

    # -- rounds the coordinator opens ----------------------------------------------------------

    def hand_to(self, to: str, phase: str, weights: np.ndarray) -> list[Effect]:
        """A hand-off: seal our weights to owner `to`."""
        if to not in self.owners or to == self.me:
            raise RemoteProtocolError(f"the coordinator asked to hand weights to {to!r}")
        return [self._sealed(to, "handoff", phase, weights)]

    def open_average(self, phase: str, members: Sequence[str], weights: np.ndarray) -> tuple[list[Effect], WeightsUpdate | None]:
        """An averaging round: send our weights to the other members (sealed) or, under HE, to
        the coordinator encrypted. Returns the effects and, if nothing is awaited, the average."""
        if self.he_context is not None:
            enc = encrypt_vector(self.he_context, weights)
            return [Send(self.coordinator, Kind.ENCRYPTED_WEIGHTS, meta={"mode": "he", "phase": phase},
                         blob=enc.serialize())], None
        names = set(members)
        if self.me not in names or not names <= set(self.owners):
            raise RemoteProtocolError(f"averaging round {phase!r} names owners {sorted(names)}")
        self._average = _Average(phase, names - {self.me})
        out: list[Effect] = [self._sealed(o, "average", phase, weights) for o in sorted(names - {self.me})]
        for origin, vec in self._early.pop(phase, {}).items():
            if origin in self._average.expect:
                self._average.got[origin] = vec
                self._average.expect.discard(origin)
        return out, self._maybe_average(weights)

    def member_lost(self, peer: str, weights: np.ndarray) -> WeightsUpdate | None:
        """A member of the open round dropped out: average without it."""
        if self._average is not None:
            self._average.expect.discard(peer)
        return self._maybe_average(weights)

    # -- weights that arrive ---------------------------------------------------------------------

    def on_weights(self, msg: Message, weights: Callable[[], np.ndarray]) -> tuple[list[Effect], WeightsUpdate | None]:
        """Sealed weights (hand-off or average) or the coordinator's encrypted sum.

        Args:
            msg: the `encrypted_weights` message.
            weights: our current weights (asked only when an average completes).

        Returns:
            Effects (a late contribution is only recorded), and weights to load if this message
            completes a round.

        Raises:
            RemoteProtocolError: from the wrong peer, for no open round, or bytes that do not open.
        """
        mode, phase = str(msg.meta.get("mode", "")), str(msg.meta.get("phase", ""))
        if mode == "handoff":
            origin, vec = self._open(msg)
            return [], WeightsUpdate(vec, Record("weights_loaded", {"counterparty": origin, "reason": f"hand-off {phase}"}),
                                     (LOADED, phase))
        if mode == "average":
            origin, vec = self._open(msg)
            if phase in self._done:  # from an owner the round went on without
                return [Record("error", {"error": "RemoteProtocolError", "reason":
                                         f"weights from '{origin}' came after averaging round {phase!r} ended; ignored"})], None
            avg = self._average
            if avg is None or phase != avg.phase:
                # Peer to peer, another owner's weights can overtake the coordinator's barrier that
                # opens the round here: keep them for it (one round ahead at most, one copy each).
                early = self._early.setdefault(phase, {})
                if len(self._early) > 2 or origin in early:
                    raise RemoteProtocolError(f"unexpected weights from '{origin}' for averaging round {phase!r}")
                early[origin] = vec
                return [], None
            if origin not in avg.expect:
                raise RemoteProtocolError(f"unexpected weights from '{origin}' for averaging round {phase!r}")
            avg.got[origin] = vec
            avg.expect.discard(origin)
            return [], self._maybe_average(weights())
        if mode == "he_sum":
            if msg.binding.sender != self.coordinator or self.he_context is None:
                raise RemoteProtocolError(f"'{msg.binding.sender}' sent an encrypted weight sum")
            try:
                enc = EncryptedTensor.from_bytes(self.he_context, bytes(msg.blob), max_bytes=self._max_bytes)
            except CryptoError as exc:
                raise RemoteProtocolError(f"encrypted weight sum refused: {exc}") from None
            if not 1 <= enc.count <= len(self.owners):
                raise RemoteProtocolError(f"the encrypted weight sum claims {enc.count} owners; the deployment has {len(self.owners)}")
            mean = decrypt_vector(self.he_context, enc, mean=True).astype(np.float32)
            return [], WeightsUpdate(mean, Record("weights_loaded", {"counterparty": self.coordinator,
                                                                     "reason": f"HE average of {enc.count} owners"}),
                                     (AVERAGED, phase))
        raise RemoteProtocolError(f"'{msg.binding.sender}' sent encrypted weights with mode {mode!r}")

    def _maybe_average(self, own: np.ndarray) -> WeightsUpdate | None:
        avg = self._average
        if avg is None or avg.expect:
            return None
        stack = [own, *avg.got.values()]
        self._average = None
        self._done.add(avg.phase)
        return WeightsUpdate(np.mean(np.stack(stack), axis=0).astype(np.float32),
                             Record("weights_loaded", {"counterparty": self.me, "reason": f"average of {len(stack)} owners"}),
                             (AVERAGED, avg.phase))

    # -- sealing -----------------------------------------------------------------------------------

    def _sealed(self, to: str, mode: str, phase: str, weights: np.ndarray) -> Send:
        vec = np.ascontiguousarray(weights, dtype="<f4")
        sealed = seal_to(self._keys[to], self._identity, vec.tobytes())
        meta: dict[str, Any] = {"mode": mode, "phase": phase}
        if self.via_coordinator:
            return Send(self.coordinator, Kind.ENCRYPTED_WEIGHTS, meta={**meta, "to": to}, blob=sealed)
        return Send(to, Kind.ENCRYPTED_WEIGHTS, meta=meta, blob=sealed)

    def _open(self, msg: Message) -> tuple[str, np.ndarray]:
        origin = str(msg.meta.get("from", "")) if self.via_coordinator else msg.binding.sender
        via_ok = msg.binding.sender == (self.coordinator if self.via_coordinator else origin)
        if origin not in self.owners or origin == self.me or not via_ok:
            raise RemoteProtocolError(f"weights from '{msg.binding.sender}' (origin {origin!r}) do not come from another owner")
        try:
            plain = open_from(self._identity, self._keys[origin], bytes(msg.blob))
        except CryptoError as exc:
            raise RemoteProtocolError(f"weights from '{origin}' do not open: {exc}") from None
        if len(plain) % 4:
            raise RemoteProtocolError(f"weights from '{origin}' are {len(plain)} bytes, not whole float32 values")
        return origin, np.frombuffer(plain, dtype="<f4").astype(np.float32)


class WeightRelay:
    """The coordinator's part in sealed weights: pass them on; it cannot open them."""

    def __init__(self, owners: Sequence[str], *, enabled: bool) -> None:
        self.owners = list(owners)
        self.enabled = enabled

    def relay(self, msg: Message, lost: Callable[[str], bool]) -> list[Effect]:
        """Forward an owner's sealed weights to the owner named in meta `to`.

        Raises:
            RemoteProtocolError: this deployment does not relay, or the names do not fit.
        """
        sender, to = msg.binding.sender, str(msg.meta.get("to", ""))
        if not self.enabled or sender not in self.owners or to not in self.owners or to == sender:
            raise RemoteProtocolError(f"'{sender}' asked to relay weights to {to!r}, which this deployment does not do")
        if lost(to):
            return [Record("error", {"error": "PeerTimeout", "reason": f"dropped weights from '{sender}' for '{to}', which is lost"})]
        meta = {k: v for k, v in msg.meta.items() if k != "to"}
        meta["from"] = sender
        return [Send(to, Kind.ENCRYPTED_WEIGHTS, step=msg.binding.step, meta=meta, blob=bytes(msg.blob))]


class HeWeightSum:
    """The coordinator's side of one HE averaging round: add the members' ciphertexts.

    Args:
        phase: the round id.
        members: the owners asked to take part.
        context: the coordinator's public context.
        max_bytes: bound on one ciphertext message.
    """

    def __init__(self, phase: str, members: Sequence[str], context: CkksContext, *, max_bytes: int) -> None:
        self.phase = phase
        self.members = list(members)
        self.context = context
        self._max_bytes = max_bytes
        self.parts: dict[str, bytes] = {}

    def on_part(self, msg: Message) -> None:
        """One member's encrypted weights.

        Raises:
            RemoteProtocolError: not a member of this round, or not an HE part.
        """
        sender = msg.binding.sender
        if msg.meta.get("mode") != "he" or str(msg.meta.get("phase", "")) != self.phase or sender not in self.members:
            raise RemoteProtocolError(f"'{sender}' sent encrypted weights outside an averaging round")
        self.parts[sender] = bytes(msg.blob)

    def missing(self, live: Callable[[str], bool]) -> list[str]:
        """Members still live whose part has not arrived."""
        return sorted(m for m in self.members if live(m) and m not in self.parts)

    def total(self, live: Callable[[str], bool]) -> list[Effect]:
        """The sum of every part that arrived, sent back to each live contributor.

        Raises:
            RemoteProtocolError: a part that does not load, or parts of different shapes.
        """
        try:
            loaded = [EncryptedTensor.from_bytes(self.context, blob, max_bytes=self._max_bytes)
                      for blob in self.parts.values()]
        except CryptoError as exc:
            raise RemoteProtocolError(f"encrypted weights refused: {exc}") from None
        if len({(t.shape, t.chunks) for t in loaded}) != 1:
            raise RemoteProtocolError("the owners' encrypted weights differ in shape")
        total = sum_encrypted(loaded).serialize()
        return [Send(o, Kind.ENCRYPTED_WEIGHTS, meta={"mode": "he_sum", "phase": self.phase}, blob=total)
                for o in self.parts if live(o)]
