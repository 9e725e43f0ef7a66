"""Steps announced ahead (`step_begin`): what the coordinator sends when, and what a follower keeps.

The coordinator of a sync run names every step's batch (its sample ids) to every peer. Training
steps are announced in chunks: one `step_begin` carries the ids of up to `PLAN_CHUNK_STEPS`
consecutive training steps (meta `sizes`: each step's batch size, in order; the binding's step
is the first of them), sent while `lookahead` announced steps are still to come, so each peer
learns its next steps from one message per chunk instead of one per step, and never waits for an
announcement. In a training step every peer is paced by the gradients it waits for (at most
`training.pipeline_depth` steps in flight), so knowing many steps ahead lets no one run ahead.
Evaluation steps have no gradients: only the announcements pace a data owner through them, so
they are announced one by one, `lookahead` steps ahead, as every step was before.

- `Announcer` (the coordinator): which announcements are due before and after it begins step i.
- `StepPlan` (a follower): the announced steps not begun yet, bounded; a chunk that does not fit
  waits in the node's later-queue; a malformed one, or one that repeats a step already
  announced, is refused.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from secure_split.errors import RemoteProtocolError
from secure_split.protocol import Message

__all__ = ["PLAN_CHUNK_STEPS", "Announcement", "Announcer", "PlannedStep", "StepPlan"]

PLAN_CHUNK_STEPS = 32
"""The most training steps one `step_begin` announces."""


@dataclass(frozen=True, eq=False)
class Announcement:
    """One `step_begin` to send to every peer.

    Attributes:
        step: the first step it announces (the binding's step).
        phase: the phase of every step it announces.
        ids: the ids of every step, one after the other (int64, one dimension).
        sizes: each step's batch size, in order; None for a single step (no `sizes` meta).
    """

    step: int
    phase: str
    ids: np.ndarray
    sizes: tuple[int, ...] | None

    @property
    def last_step(self) -> int:
        """The last step it announces."""
        return self.step + (len(self.sizes) - 1 if self.sizes else 0)

    def meta(self, epoch: int) -> dict[str, Any]:
        """The `step_begin` meta."""
        return {"epoch": epoch, "phase": self.phase, **({"sizes": list(self.sizes)} if self.sizes else {})}


class Announcer:
    """What the coordinator announces, and when, over one epoch's steps (module docstring).

    Args:
        plan: the epoch's steps in order: (phase, sample ids).
        first_step: the step number of plan[0] (the others follow one by one).
        lookahead: steps announced ahead of the one the coordinator runs (>= 1; the pipeline
            depth - 1, at least 1).
        chunk: the most training steps in one announcement.
        max_ids: the most ids in one announcement (a chunk stops before it would exceed them;
            one step is always announced).
    """

    def __init__(self, plan: Sequence[tuple[str, np.ndarray]], first_step: int, *, lookahead: int,
                 chunk: int = PLAN_CHUNK_STEPS, max_ids: int = 1 << 22) -> None:
        if lookahead < 1 or chunk < 1:
            raise ValueError(f"lookahead and chunk must be >= 1, got {lookahead}, {chunk}")
        self.plan = list(plan)
        self.first_step = first_step
        self.lookahead = lookahead
        self.chunk = chunk
        self.max_ids = max_ids
        self.announced = -1  # plan index announced through

    def through(self, index: int) -> list[Announcement]:
        """The announcements due so that every step up to plan[index] is announced (none if
        they all are already)."""
        out: list[Announcement] = []
        index = min(index, len(self.plan) - 1)
        while self.announced < index:
            start = self.announced + 1
            phase = self.plan[start][0]
            end = start + 1
            total = len(self.plan[start][1])
            if phase == "train":
                while (end < len(self.plan) and end - start < self.chunk and self.plan[end][0] == "train"
                       and total + len(self.plan[end][1]) <= self.max_ids):
                    total += len(self.plan[end][1])
                    end += 1
            batches = [np.asarray(b, dtype=np.int64).reshape(-1) for _, b in self.plan[start:end]]
            sizes = tuple(len(b) for b in batches) if end - start > 1 else None
            out.append(Announcement(self.first_step + start, phase, np.concatenate(batches), sizes))
            self.announced = end - 1
        return out


@dataclass(frozen=True, eq=False)
class PlannedStep:
    """A step announced to this peer: its number, phase, epoch and batch ids."""

    step: int
    phase: str
    epoch: int
    ids: np.ndarray


class StepPlan:
    """A follower's announced steps not begun yet, in order (module docstring).

    Args:
        bound: the most steps held; a `step_begin` that would exceed it is left for later.
        coordinator: the only peer whose announcements count (at the coordinator itself, nobody's).
        me: this peer.
    """

    def __init__(self, bound: int, *, coordinator: str, me: str) -> None:
        self.bound = bound
        self.coordinator = coordinator
        self.me = me
        self._steps: deque[PlannedStep] = deque()
        self.last_step = -1  # the highest step ever announced here (kept across `clear`)

    def __len__(self) -> int:
        return len(self._steps)

    def offer(self, msg: Message) -> bool:
        """Keep the steps a `step_begin` announces.

        Returns:
            True when kept; False when they do not fit yet (the node keeps the message and
            offers it again once steps have begun).

        Raises:
            RemoteProtocolError: not from the coordinator, sizes that do not add up to the ids or
                a batch without ids, ids repeated within a batch, or a step not after every step
                announced so far.
        """
        first, sender = msg.binding.step, msg.binding.sender
        if sender != self.coordinator or self.me == self.coordinator:
            raise RemoteProtocolError(f"'{sender}' announced step {first}; only the coordinator "
                                      f"'{self.coordinator}' announces steps, to the others")
        w = msg.tensors[0]
        if w.dtype != "int64" or len(w.shape) != 1:
            raise RemoteProtocolError(f"step_begin ids must be a 1-D int64 tensor, got {w.dtype}{list(w.shape)}")
        ids = np.frombuffer(w.data, dtype="<i8")
        raw = msg.meta.get("sizes")
        sizes = [x for x in raw if isinstance(x, int)] if isinstance(raw, list | tuple) else [int(ids.shape[0])]
        if not sizes or min(sizes) < 1 or sum(sizes) != ids.shape[0] or (isinstance(raw, list | tuple)
                                                                       and len(sizes) != len(raw)):
            raise RemoteProtocolError(f"step_begin for step {first}: batch sizes {sizes[:8]} do not split its "
                                      f"{ids.shape[0]} ids into batches of at least one")
        if first <= self.last_step:
            raise RemoteProtocolError(f"step_begin for step {first}: steps up to {self.last_step} were announced already")
        if len(self._steps) + len(sizes) > self.bound:
            return False
        phase = str(msg.meta.get("phase", "train"))
        epoch = msg.meta.get("epoch", 0)
        epoch = epoch if isinstance(epoch, int) else 0
        batches: list[np.ndarray] = []
        offset = 0
        for size in sizes:
            batch = ids[offset:offset + size].copy()
            offset += size
            ordered = np.sort(batch)
            if bool((ordered[1:] == ordered[:-1]).any()):
                raise RemoteProtocolError(f"step_begin for step {first + len(batches)}: the batch repeats sample ids")
            batches.append(batch)
        self._steps.extend(PlannedStep(first + i, phase, epoch, b) for i, b in enumerate(batches))
        self.last_step = first + len(sizes) - 1
        return True

    def next(self) -> PlannedStep | None:
        """The next step to begin, or None."""
        return self._steps[0] if self._steps else None

    def pop(self) -> PlannedStep:
        """Remove and return the next step (`next` said there is one)."""
        return self._steps.popleft()

    def clear(self) -> None:
        """Forget the steps not begun (a rollback); steps stay unique, so `last_step` stays."""
        self._steps.clear()
