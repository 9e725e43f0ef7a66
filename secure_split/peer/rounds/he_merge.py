"""The masked CKKS merge of a vertical step, as two sans-IO parties.

At a merge segment with `he: true` (a sum or mean of several owners' cut tensors):

1. every owner encrypts its cut tensor with the CKKS context and sends it to the merge holder
   (`encrypted_activation`, meta `segment`);
2. the merge holder (`HeMergeHolder`), once it has every input of the step, adds the ciphertexts
   and a fresh random mask under encryption and sends the masked sum to the key holder
   (`masked_aggregate`): it holds only a public context and cannot decrypt;
3. the key holder (`HeKeyHolder`) decrypts, rounds (a raw CKKS decryption handed to another party
   leaks key information) and returns the rounded masked sum (`masked_aggregate`, float64 values);
4. the merge holder removes the mask: it learns the sum, never a single owner's tensor.

Both sides check who may send what for which segment and step, and bound what they hold: the
holder keeps at most `max_pending` steps of partial inputs; a late or repeated message is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from secure_split.crypto.he import (
    AggregateMask,
    CkksContext,
    EncryptedTensor,
    decrypt_rounded,
    encrypt_packed,
    mask_aggregate,
    unmask,
)
from secure_split.errors import CryptoError, RemoteProtocolError
from secure_split.peer.effects import Effect, Send
from secure_split.protocol import Kind

__all__ = ["HeKeyHolder", "HeMergeHolder", "encrypt_cut"]


def encrypt_cut(ctx: CkksContext, tensor: np.ndarray) -> bytes:
    """An owner's cut tensor [batch, ...] as packed CKKS ciphertexts (the wire bytes)."""
    return encrypt_packed(ctx, tensor.reshape(tensor.shape[0], -1)).serialize()


def _load(ctx: CkksContext, blob: bytes, max_bytes: int, what: str) -> EncryptedTensor:
    try:
        return EncryptedTensor.from_bytes(ctx, blob, max_bytes=max_bytes)
    except CryptoError as exc:
        raise RemoteProtocolError(f"ciphertext from {what} refused: {exc}") from None


@dataclass
class _StepInputs:
    """Encrypted inputs of one step received so far, by edge."""

    got: dict[str, EncryptedTensor] = field(default_factory=dict)


class HeMergeHolder:
    """The merge holder's side of one HE merge segment.

    Args:
        segment: the merge segment.
        feeders: in-edge -> the peer that sends on it, in the deployment's edge order.
        key_holder: the peer holding the secret key.
        context: the public CKKS context (cannot decrypt).
        max_bytes: bound on one ciphertext message.
        max_pending: steps whose inputs may be incomplete at once.
    """

    def __init__(self, segment: str, feeders: Mapping[str, str], key_holder: str, context: CkksContext, *,
                 max_bytes: int, max_pending: int = 4) -> None:
        self.segment = segment
        self.feeders = dict(feeders)
        self.key_holder = key_holder
        self.context = context
        self._max_bytes = max_bytes
        self._max_pending = max_pending
        self._inputs: dict[int, _StepInputs] = {}
        self._masks: dict[int, AggregateMask] = {}

    def on_encrypted(self, step: int, edge: str, sender: str, blob: bytes) -> list[Effect]:
        """One owner's encrypted input; returns the masked sum to send once all are in.

        Raises:
            RemoteProtocolError: wrong edge or sender, a repeat, too many open steps, bad bytes.
        """
        if self.feeders.get(edge) != sender:
            raise RemoteProtocolError(f"'{sender}' sent an encrypted activation on edge {edge!r}, which it does "
                                      f"not feed into '{self.segment}'")
        if step in self._masks:
            raise RemoteProtocolError(f"encrypted activation on {edge} for step {step}, whose sum is already out")
        inputs = self._inputs.get(step)
        if inputs is None:
            if len(self._inputs) >= self._max_pending:
                raise RemoteProtocolError(f"'{sender}' opened HE step {step} while {len(self._inputs)} steps of "
                                          f"'{self.segment}' wait for inputs already")
            inputs = self._inputs[step] = _StepInputs()
        if edge in inputs.got:
            raise RemoteProtocolError(f"duplicate encrypted activation on {edge} for step {step}")
        inputs.got[edge] = _load(self.context, blob, self._max_bytes, f"'{sender}' on {edge}")
        if len(inputs.got) < len(self.feeders):
            return []
        del self._inputs[step]
        masked, mask = mask_aggregate(self.context, [inputs.got[e] for e in self.feeders])
        self._masks[step] = mask
        return [Send(self.key_holder, Kind.MASKED_AGGREGATE, step=step, meta={"segment": self.segment},
                     blob=masked.serialize())]

    def on_decrypted(self, step: int, sender: str, blob: bytes) -> np.ndarray:
        """The key holder's rounded decryption of step `step`'s masked sum: returns the sum.

        Raises:
            RemoteProtocolError: not from the key holder, not outstanding, or the wrong size.
        """
        if sender != self.key_holder or step not in self._masks:
            raise RemoteProtocolError(f"unexpected masked aggregate from '{sender}' for step {step}")
        mask = self._masks[step]
        size = int(np.prod(mask.shape))
        if len(blob) != 8 * size:
            raise RemoteProtocolError(f"masked aggregate from '{sender}' has {len(blob)} bytes, expected {8 * size}")
        del self._masks[step]
        rounded = np.frombuffer(blob, dtype="<f8")
        try:
            total = unmask(mask, rounded.reshape(mask.shape))
        except CryptoError as exc:
            raise RemoteProtocolError(f"'{sender}' answered step {step} of '{self.segment}' badly: {exc}") from None
        return np.ascontiguousarray(total, dtype="<f4")

    def pending_batch(self, step: int) -> int | None:
        """The batch size of step `step`'s masked sum out for decryption (None if none is)."""
        mask = self._masks.get(step)
        return int(mask.shape[0]) if mask is not None and mask.shape else None

    def drop(self, step: int) -> None:
        """Forget step `step` (aborted)."""
        self._inputs.pop(step, None)
        self._masks.pop(step, None)

    def clear(self) -> None:
        """Forget every step (a rollback)."""
        self._inputs.clear()
        self._masks.clear()


class HeKeyHolder:
    """The key holder's side: decrypt masked sums for the holders of the merges it keys.

    Args:
        holders: merge segment -> the peer that holds it.
        contexts: merge segment -> the secret context.
        max_bytes: bound on one ciphertext message.
    """

    def __init__(self, holders: Mapping[str, str], contexts: Mapping[str, CkksContext], *, max_bytes: int) -> None:
        self.holders = dict(holders)
        self.contexts = dict(contexts)
        self._max_bytes = max_bytes

    def keys(self, segment: str) -> bool:
        """Whether this peer decrypts for `segment`."""
        return segment in self.holders

    def on_masked(self, sender: str, step: int, segment: str, blob: bytes) -> list[Effect]:
        """Decrypt a holder's masked sum, rounded, and send it back.

        Raises:
            RemoteProtocolError: the sender does not hold that merge, or bad ciphertext bytes.
        """
        holder = self.holders.get(segment)
        if holder is None or sender != holder:
            raise RemoteProtocolError(f"'{sender}' asked for a decryption at {segment!r}, held by {holder!r}")
        ctx = self.contexts[segment]
        enc = _load(ctx, blob, self._max_bytes, f"'{sender}' for {segment}")
        rounded = np.ascontiguousarray(decrypt_rounded(ctx, enc), dtype="<f8")
        return [Send(holder, Kind.MASKED_AGGREGATE, step=step, meta={"segment": segment}, blob=rounded.tobytes())]
