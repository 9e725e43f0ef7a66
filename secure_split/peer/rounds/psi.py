"""Private id alignment as a round: a `MultiPartyPsi` and the messages it sends, sans-IO.

A vertical deployment aligns the ids of the coordinator and every feature owner before training
(one ring PSI of all of them); a horizontal coordinator that holds labels runs one two-party PSI
with each owner. Either way the round is the same: `start()` once, `on_message()` for every
`psi` message from a party, each returning the `Send`s to make. `result` is set once this party
knows its intersection; `finished` once it has also passed on everything the other parties'
sets need from it. The node keeps feeding a round until `finished`, whatever else it is doing:
a party whose own result arrived early must still blind and forward the others' sets (the
stall of a WAN start where a hospital logged `ids_aligned` and never forwarded the lab's set).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from secure_split.crypto.psi import MultiPartyPsi, PsiStep
from secure_split.peer.effects import Effect, Record, Send
from secure_split.protocol import Kind

__all__ = ["Alignment", "PsiRound", "psi_salt"]

def psi_salt(deployment_hash: str) -> bytes:
    """The salt every party of a deployment hashes its ids with (the same at every party)."""
    return b"secure-split-psi-v1:" + bytes.fromhex(deployment_hash)


@dataclass(frozen=True)
class Alignment:
    """What a party learnt: the sorted intersection of everyone's ids, and the sizes."""

    ids: np.ndarray
    own_size: int
    parties: tuple[str, ...]


class PsiRound:
    """One party of one PSI (coordinator first in `parties`, the same list at every party).

    Args:
        me: this party.
        parties: every party, coordinator first.
        ids: this party's ids.
        deployment_hash: salts the ids' hashes.
        max_points: the largest set accepted from any party (`limits.max_psi_points`).
    """

    def __init__(self, me: str, parties: Sequence[str], ids: Sequence[int], *, deployment_hash: str,
                 max_points: int) -> None:
        self.parties = tuple(parties)
        self._own_size = len(ids)
        self._psi = MultiPartyPsi(me, self.parties, [int(x) for x in ids], salt=psi_salt(deployment_hash),
                                  max_points=max_points)
        self._recorded = False

    @property
    def result(self) -> Alignment | None:
        """This party's alignment, once known."""
        if not self._psi.done:
            return None
        ids = np.asarray(sorted(int(x) for x in self._psi.result().ids), dtype=np.int64)
        return Alignment(ids, self._own_size, self.parties)

    @property
    def finished(self) -> bool:
        """Result known and nothing left that another party needs from this one."""
        return self._psi.finished

    def start(self) -> list[Effect]:
        """Blind and send this party's own set."""
        return self._effects(self._psi.start())

    def on_message(self, sender: str, payload: bytes) -> list[Effect]:
        """One `psi` message from `sender`.

        Raises:
            CryptoError, RemoteProtocolError: a malformed, repeated or misrouted message (the
                round is unchanged: the same message may come again).
        """
        return self._effects(self._psi.receive(sender, payload))

    def _effects(self, steps: list[PsiStep]) -> list[Effect]:
        out: list[Effect] = [Send(st.receiver, Kind.PSI, blob=st.payload) for st in steps]
        result = self.result
        if result is not None and not self._recorded:
            self._recorded = True
            out.append(Record("ids_aligned", {"parties": list(self.parties), "own_size": self._own_size,
                                              "intersection_size": int(result.ids.shape[0])}))
        return out
