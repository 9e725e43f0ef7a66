"""Every peer's executor in one process, with an in-memory router in place of the network.

The one in-memory router of the project: unit tests run whole topologies with it, and the
leakage analysis (`secure_split.analysis.leakage`) trains and attacks through it. It delivers each
`Outgoing` to its receiver as the peer runtime would (optionally through the wire format, so a
receiver gets a read-only buffer as from a socket), adds the inputs of an HE merge in plaintext
(what the masked CKKS round computes), and lets a caller see or replace every tensor on its way
(`intercept`: an attacker's view of the cut).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping

import numpy as np
import torch

from secure_split.engine.executor import Outgoing, PeerExecutor
from secure_split.engine.metrics import Phase, StepMetrics
from secure_split.engine.tensors import from_wire, to_wire
from secure_split.protocol import WireTensor

__all__ = ["Intercept", "LocalRouter", "over_the_wire"]

Intercept = Callable[[Outgoing, np.ndarray], Outgoing]
"""Sees (and may replace) every tensor before it is delivered: (outgoing, the step's ids)."""


def over_the_wire(t: torch.Tensor) -> torch.Tensor:
    """What a receiver gets: the tensor's bytes copied into an immutable buffer, then viewed."""
    w = to_wire(t)
    return from_wire(WireTensor(w.dtype, w.shape, bytes(w.data)))


class LocalRouter:
    """Runs the peers of one deployment in this process, exchanging their `Outgoing` tensors.

    Args:
        executors: peer -> its executor (every peer that owns a segment).
        wire: pass every tensor through the wire format (as a socket would).
    """

    def __init__(self, executors: Mapping[str, PeerExecutor], *, wire: bool = True) -> None:
        self.executors = dict(executors)
        self.wire = wire
        self.delivered: list[Outgoing] = []
        self._pending_sums: dict[str, list[torch.Tensor]] = {}

    def deliver(self, o: Outgoing) -> list[Outgoing]:
        """Hand one Outgoing to its receiver; return what the receiver sends in turn."""
        self.delivered.append(o)
        t = over_the_wire(o.tensor) if self.wire else o.tensor
        ex = self.executors[o.to_peer]
        if o.kind == "activation":
            segment = ex.topology.edges[o.edge].to
            if ex.topology.segments[segment].he:
                parts = self._pending_sums.setdefault(segment, [])
                parts.append(t)
                if len(parts) < len(ex.topology.in_edges[segment]):
                    return []
                del self._pending_sums[segment]
                return ex.on_aggregate(segment, torch.stack(parts).sum(dim=0), step=o.step)
            return ex.on_activation(o.edge, t, step=o.step)
        return ex.on_gradient(o.edge, t, step=o.step)

    def run_step(self, step: int, phase: Phase, ids: np.ndarray, *,
                 intercept: Intercept | None = None) -> dict[str, StepMetrics]:
        """Begin the step at every peer, deliver tensors until quiet, finish it everywhere.

        Returns:
            peer -> the metrics it measured in this step.

        Raises:
            AssertionError: a peer still waits for a tensor when nothing is left to deliver.
        """
        queue: deque[Outgoing] = deque()
        for ex in self.executors.values():
            queue.extend(ex.begin_step(step, phase, ids))
        while queue:
            out = queue.popleft()
            if intercept is not None:
                out = intercept(out, ids)
            queue.extend(self.deliver(out))
        for name, ex in self.executors.items():
            assert ex.step_complete(), f"{name} still waits for {ex.waiting_for()}"
        return {name: ex.finish_step() for name, ex in self.executors.items()}
