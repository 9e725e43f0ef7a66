"""Barriers as sans-IO rounds: the coordinator's collection of acknowledgements, and the exchange
of signed audit heads every member makes at a barrier.

A barrier (`barrier` message, meta `epoch`, `reason`) is where every member saves its checkpoint,
signs its audit head, exchanges signed heads with its counterparties and reports what it measured
itself over the epoch (`barrier_ack` with `train` and `eval` metric sums). The coordinator's side
is `BarrierRound`: it opens the barrier for the members and collects one acknowledgement from
each (a member lost meanwhile is not waited for). A member's side of the head exchange is
`HeadExchange`: it sends its own signed head to its peers and is done once each of them sent
theirs; heads may arrive before this member reached the barrier (another member was faster), so
the node keeps them by barrier id until asked.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from secure_split.peer.effects import Effect, Send
from secure_split.protocol import Kind, Message

__all__ = ["CLOSE_KEY", "BarrierReport", "BarrierRound", "HeadExchange"]

CLOSE_KEY = 2**62
"""The step key of the close round's audit receipts (a barrier's key is epoch + 1; a prediction
request's, its number << 20, below 2**51: neither comes near this)."""


@dataclass(frozen=True)
class BarrierReport:
    """What one member reported at a barrier: its own metric sums, in the protocol's meta form
    (task -> {loss_sum, correct, count}; the codec checked the form)."""

    train: object = field(default_factory=dict)
    eval: object = field(default_factory=dict)


class BarrierRound:
    """The coordinator's side of one barrier.

    Args:
        epoch: the epoch the barrier closes (-1 for the start barrier of a fresh run).
        reason: "start" or "epoch_end".
        members: the peers that take part.
        meta: more for the barrier message (the start barrier announces the run: run_id, nonces).
    """

    def __init__(self, epoch: int, reason: str, members: Sequence[str], *, meta: Mapping[str, object] | None = None) -> None:
        self.epoch = epoch
        self.reason = reason
        self.members = list(members)
        self.meta = dict(meta or {})
        self.reports: dict[str, BarrierReport] = {}

    @property
    def key(self) -> int:
        """The barrier id the messages carry as their step (epoch + 1)."""
        return self.epoch + 1

    def open(self) -> list[Effect]:
        """The `barrier` message to every member."""
        return [Send(m, Kind.BARRIER, step=self.key, meta={**self.meta, "epoch": self.epoch, "reason": self.reason})
                for m in self.members]

    def on_ack(self, msg: Message) -> bool:
        """A member's acknowledgement. Returns False if it is not one of this barrier's."""
        sender = msg.binding.sender
        if sender not in self.members or msg.meta.get("epoch") != self.epoch:
            return False
        self.reports[sender] = BarrierReport(msg.meta.get("train", {}), msg.meta.get("eval", {}))
        return True

    def missing(self, live: Callable[[str], bool] = lambda _: True) -> list[str]:
        """Members still live that have not acknowledged."""
        return sorted(m for m in self.members if live(m) and m not in self.reports)

    def done(self, live: Callable[[str], bool] = lambda _: True) -> bool:
        """Every live member acknowledged."""
        return not self.missing(live)


class HeadExchange:
    """One member's exchange of signed audit heads at barrier (or request) `key`.

    Args:
        key: the barrier id (epoch + 1) or request number.
        peers: whom this member exchanges heads with.
        received: the node's record of heads already received, by key (shared, so heads that
            arrived before this member reached the barrier count).
        live: whether a peer still takes part (default: every one does); a peer that dropped out
            during the exchange is no longer waited for (a horizontal coordinator carries on
            without a lost owner, and a restarted one answers in its new session only).
    """

    def __init__(self, key: int, peers: Sequence[str], received: Mapping[int, set[str]],
                 live: Callable[[str], bool] | None = None) -> None:
        self.key = key
        self.peers = list(peers)
        self._received = received
        self._live = live

    def send(self, head_meta: Mapping[str, object]) -> list[Effect]:
        """Our signed head (as `audit_receipt` meta) to every peer."""
        return [Send(p, Kind.AUDIT_RECEIPT, step=self.key, meta=dict(head_meta)) for p in self.peers]

    def missing(self) -> list[str]:
        """Peers whose head for this key has not arrived."""
        got = self._received.get(self.key, set())
        return sorted(p for p in self.peers if p not in got and (self._live is None or self._live(p)))

    @property
    def done(self) -> bool:
        """Every peer's head arrived."""
        return not self.missing()
