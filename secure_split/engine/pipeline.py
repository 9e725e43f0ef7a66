"""Which weights each training step of a pipelining peer runs on (`training.pipeline_depth`).

With depth k a peer without a loss (a data owner, the hops of a chain: `Topology.overlap_peers`)
may have up to k training steps in flight: it begins step t+1 .. t+k-1 while step t waits for
its gradients. Its weights change in place at every update, so a step begun ahead of updates
runs its forward on a copy of the weights (PipeDream's weight stashing) and its backward on the
same copy; the gradient is then applied to the live weights, in step order.

The rule that makes the result independent of message timing: in a run of consecutive training
steps (those begun since the last step of another phase, or since a reset), the step with index
n runs on V_m, m = max(0, n - k + 1), where V_i are the weights before the run's update i (V_0:
the weights as the run began). A step that begins ahead of updates and the same step begun after
them (strictly ordered delivery) use the same version, so racing and ordered delivery train
alike; the staleness is bounded by k - 1 updates. k = 1 is plain sequential training: every step
runs on the live weights and nothing is copied. k = 2 is `training.overlap`.

Memory: at most k versions are kept (each a copy of this peer's parameters), and only while a
step not begun yet still needs them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from secure_split.errors import LocalProtocolError

__all__ = ["WeightVersions", "Weights"]

Weights = dict[str, dict[str, torch.Tensor]]
"""segment -> parameter name -> tensor."""


def _copy(modules: Mapping[str, nn.Module]) -> Weights:
    return {s: {n: p.detach().clone() for n, p in m.named_parameters()} for s, m in modules.items()}


class WeightVersions:
    """The weight versions of one peer's run of training steps (see the module docstring).

    Args:
        depth: k, the training steps this peer may have in flight (>= 1).

    Raises:
        ValueError: depth < 1.
    """

    def __init__(self, depth: int) -> None:
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"pipeline depth must be an int >= 1, got {depth!r}")
        self.depth = depth
        self._begun = 0  # training steps begun in this run
        self._updates = 0  # updates applied in this run
        self._versions: dict[int, Weights] = {}  # i -> V_i, while a step not begun yet needs it

    def reset(self) -> None:
        """A new run begins (a step of another phase, an abort, weights loaded from elsewhere)."""
        self._begun = self._updates = 0
        self._versions.clear()

    @property
    def held(self) -> int:
        """How many weight versions are kept now (for tests and memory accounting)."""
        return len(self._versions)

    def _needed_from(self, begun: int) -> int:
        """The oldest version a step with index >= `begun` runs on."""
        return max(0, begun - self.depth + 1)

    def begin(self, modules: Mapping[str, nn.Module], *, in_flight: bool) -> Weights | None:
        """A training step begins: the weights its forward and backward must use.

        Args:
            modules: the peer's live segment modules.
            in_flight: other training steps of this peer are in flight (not yet updated), so the
                live weights will change before this step's backward.

        Returns:
            segment -> name -> a fresh leaf tensor for each parameter (its own `.grad`; storage
            shared with the kept version), or None: run on the live parameters.

        Raises:
            LocalProtocolError: the version this step needs was not kept (a caller broke the
                order: updates are applied in step order, one per step begun).
        """
        n = self._begun
        self._begun += 1
        m = self._needed_from(n)
        if m == self._updates and not in_flight:
            chosen = None
        else:
            if m == self._updates:
                self._versions.setdefault(m, _copy(modules))
            if m not in self._versions:
                raise LocalProtocolError(f"training step {n} of this run needs the weights before update {m}, "
                                         "which were not kept")
            chosen = self._versions[m]
        for i in [i for i in self._versions if i < self._needed_from(self._begun)]:
            del self._versions[i]
        if chosen is None:
            return None
        live = {s: dict(m.named_parameters()) for s, m in modules.items()}
        return {s: {name: t.detach().requires_grad_(live[s][name].requires_grad) for name, t in w.items()}
                for s, w in chosen.items()}

    def before_update(self, modules: Mapping[str, nn.Module]) -> None:
        """The run's next update is about to change the live weights in place: keep a copy of
        them if a step not begun yet will run on them."""
        i = self._updates
        if self.depth > 1 and self._needed_from(self._begun) <= i and i not in self._versions:
            self._versions[i] = _copy(modules)
        self._updates += 1
