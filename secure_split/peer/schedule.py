"""The contract between the node (how a peer runs) and a schedule (what it does).

`PeerNode` owns the lifecycle: it opens the audit log and the transport, shakes hands, runs the
one inbound path (transport events, the gate, the node's own message kinds), signs and exchanges
audit heads, saves checkpoints and closes. What the peer does in between, step by step, is a
`Schedule`:

- `SyncSchedule` (`schedules/sync.py`): every topology of one run, coordinator and followers;
- `HorizontalSchedule` (`schedules/horizontal.py`): many data owners, sequential or splitfed;
- `ServeSchedule` (`schedules/serve.py`): take part in prediction requests from a trained checkpoint;
- `PredictSchedule` (`schedules/predict.py`): one party's prediction request (both drive
  `peer/requests.py`: one party's part in one request, sans-IO).

The node calls the schedule; the schedule calls back only through the node's public methods
(`send`, `apply`, `record`, `progress`, `wait`, `refuse`, `exchange_heads`). No schedule imports
another (an import-linter contract keeps it so). A message the node does not handle itself goes
to `Schedule.on_message`, which either takes it now (True) or leaves it for later (False: the node
keeps it, within its bounds, and offers it again after the next message that was taken); a
message it must refuse raises `RemoteProtocolError` (the node audits it, answers the sender and
counts it against the sender's violation budget).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from secure_split.peer.effects import Record
from secure_split.protocol import Message

if TYPE_CHECKING:
    from secure_split.peer.node import PeerNode

__all__ = ["ProgressFn", "Rollback", "Schedule"]

ProgressFn = Callable[[dict[str, Any]], None]
"""Receives progress events ({"event": "step" | "epoch" | ..., ...}) for the operator's display."""


class Rollback(Exception):
    """Raised by a schedule from a node callback to unwind its own waits to its run loop: at the
    coordinator when a restarted peer came back (it then rolls every peer back to a common
    checkpoint), at a follower when that rollback's start barrier arrives (`barrier`: taken at
    the run loop, outside the waits it interrupted). Not a `SecureSplitError`: the node never
    catches it."""

    def __init__(self, reason: str, *, barrier: Message | None = None) -> None:
        super().__init__(reason)
        self.barrier = barrier


class Schedule(Protocol):
    """What a peer does between its handshake and its close (see the module docstring)."""

    def attach(self, node: PeerNode) -> None:
        """Called once, before the node opens anything: the node to send through."""

    def hello_meta(self) -> dict[str, Any]:
        """Extra meta for this peer's HELLO (checkpoints it holds, row counts, ...)."""

    def start_records(self) -> list[Record]:
        """Audit entries right after the log opens (what trains here: segment commitments)."""

    def prepare(self) -> None:
        """After the node opened, before any HELLO: checks that need the gate but send nothing
        (a prediction request checks that the policy lets its predictions come back)."""

    def set_up(self) -> None:
        """After the handshake: id alignment, CKKS contexts (waits through `node.wait`)."""

    def run(self) -> tuple[str, str]:
        """The schedule proper; returns (status, reason) for `run_end`. Raises a
        `SecureSplitError` to stop the peer on an error."""

    def on_message(self, msg: Message) -> bool:
        """A message for the schedule: True if taken now, False to be offered again later.

        Raises:
            RemoteProtocolError: the message is refused (the node audits and answers it).
        """

    def on_peer_lost(self, peer: str, reason: str, *, timed_out: bool) -> bool:
        """`peer` went away: its connection stayed down past the grace period, or (`timed_out`)
        nothing arrived from it for `limits.peer_timeout_s` while we waited on it. True: the
        schedule carries on without it; False: the node stops."""

    def on_peer_restarted(self, peer: str) -> None:
        """`peer` opened a new session (a restarted process; the node already answered its HELLO)."""

    def on_remote_error(self, msg: Message) -> bool:
        """An `error`/`refuse` from a counterparty that was not a mere notice. True: handled;
        False: the node stops the run with it."""

    def on_receipt(self, sender: str, key: int) -> None:
        """A counterparty's signed audit head for barrier/request `key` was verified and recorded."""

    def working_state(self) -> str:
        """The state this peer reports while the schedule runs (training, serving, predicting)."""

    def close_peers(self) -> list[str]:
        """Whom this peer exchanges signed close heads with at the end of its run."""

    def reachable(self, peer: str) -> bool:
        """Whether the node should still send `peer` anything (a shutdown notice, say)."""

    def tell_others_we_stopped(self, reason: str) -> None:
        """This peer stops on an error: tell whom it concerns (best effort, never raises)."""

    def final_metrics(self) -> dict[str, float]:
        """The scalar metrics for `run_end` (what this peer computed itself)."""
