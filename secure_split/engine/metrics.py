"""Per-step metrics of the loss segments, and `evaluate`, shared by the split run and the baseline.

Metrics are sums (loss summed over samples, correct count, sample count), so the coordinator can
add the metrics of steps and of peers and divide once: accuracy = correct / count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from secure_split.engine.schedule import eval_batches

__all__ = ["Phase", "StepMetrics", "TaskMetrics", "evaluate", "sum_task_metrics"]

Phase = Literal["train", "eval", "infer"]


@dataclass(frozen=True)
class TaskMetrics:
    """Sums for one task over some samples.

    Attributes:
        loss_sum: cross-entropy summed over the samples (mean loss = loss_sum / count).
        correct: samples whose argmax equals the label.
        count: samples.
    """

    loss_sum: float = 0.0
    correct: int = 0
    count: int = 0

    def __add__(self, other: TaskMetrics) -> TaskMetrics:
        return TaskMetrics(
            self.loss_sum + other.loss_sum, self.correct + other.correct, self.count + other.count
        )

    @property
    def mean_loss(self) -> float:
        """loss_sum / count (0.0 for no samples)."""
        return self.loss_sum / self.count if self.count else 0.0

    @property
    def accuracy(self) -> float:
        """correct / count (0.0 for no samples)."""
        return self.correct / self.count if self.count else 0.0

    def as_dict(self) -> dict[str, float | int]:
        """Plain values, e.g. for a metrics message."""
        return {"loss_sum": self.loss_sum, "correct": self.correct, "count": self.count}


@dataclass(frozen=True)
class StepMetrics:
    """What one peer measured in one step.

    Attributes:
        step: the step number.
        phase: "train", "eval" or "infer".
        tasks: task name -> sums, for this peer's loss segments (empty for a peer without one,
            and in the infer phase).
        dcor: edge id -> NoPeek distance correlation of that edge's activation with the raw
            batch (train phase, edges with nopeek_alpha > 0 only).
    """

    step: int
    phase: Phase
    tasks: Mapping[str, TaskMetrics] = field(default_factory=dict)
    dcor: Mapping[str, float] = field(default_factory=dict)

    def as_values(self) -> dict[str, float | int]:
        """Flat "task.field" -> number map (the `values` of a metrics message)."""
        out: dict[str, float | int] = {}
        for task, m in self.tasks.items():
            out.update({f"{task}.{k}": v for k, v in m.as_dict().items()})
        out.update({f"dcor.{e}": v for e, v in self.dcor.items()})
        return out


def sum_task_metrics(steps: Iterable[StepMetrics | Mapping[str, TaskMetrics]]) -> dict[str, TaskMetrics]:
    """Add up task metrics over steps (and over peers): task -> summed `TaskMetrics`."""
    total: dict[str, TaskMetrics] = {}
    for s in steps:
        tasks = s.tasks if isinstance(s, StepMetrics) else s
        for task, m in tasks.items():
            total[task] = total.get(task, TaskMetrics()) + m
    return total


def evaluate(
    run_batch: Callable[[np.ndarray], StepMetrics | Mapping[str, TaskMetrics]],
    test_ids: Any,
    batch_size: int,
) -> dict[str, TaskMetrics]:
    """Run every evaluation batch (`eval_batches` order) and add up the task metrics.

    The split coordinator passes a function that runs one eval step across the peers and
    collects their metrics; the baseline passes its in-process forward pass.

    Args:
        run_batch: runs one eval batch of sample ids, returns its metrics.
        test_ids: the test ids (from `split_train_test`).
        batch_size: `training.batch_size`.

    Returns:
        task -> summed metrics over the test set (`.accuracy`, `.mean_loss`).
    """
    return sum_task_metrics(run_batch(ids) for ids in eval_batches(test_ids, batch_size))
