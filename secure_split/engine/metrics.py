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

__all__ = ["Phase", "StepMetrics", "TaskMetrics", "epoch_values", "evaluate", "sum_task_metrics",
           "task_metrics_from_meta", "task_metrics_to_meta"]

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
        """Plain values, as a barrier_ack's `tasks` carries them."""
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


def task_metrics_to_meta(tasks: Mapping[str, TaskMetrics]) -> dict[str, dict[str, float | int]]:
    """task -> sums, as a barrier_ack's `tasks` meta carries them (`protocol` checks the form)."""
    return {task: m.as_dict() for task, m in sorted(tasks.items())}


def task_metrics_from_meta(value: object) -> dict[str, TaskMetrics]:
    """The inverse of `task_metrics_to_meta`, for meta the codec has already checked.

    Returns:
        task -> sums; empty for a missing or malformed value.
    """
    if not isinstance(value, Mapping):
        return {}
    out: dict[str, TaskMetrics] = {}
    for task, sums in value.items():
        if isinstance(task, str) and isinstance(sums, Mapping):
            out[task] = TaskMetrics(float(sums.get("loss_sum", 0.0)), int(sums.get("correct", 0)),
                                    int(sums.get("count", 0)))
    return out


def epoch_values(train: Mapping[str, TaskMetrics], evaluation: Mapping[str, TaskMetrics]) -> dict[str, float]:
    """The numbers shown and logged per epoch: `train_loss/TASK`, `accuracy/TASK`, `eval_loss/TASK`.

    Args:
        train: task -> sums over the epoch's training steps.
        evaluation: task -> sums over its evaluation steps.
    """
    out = {f"train_loss/{task}": m.mean_loss for task, m in sorted(train.items())}
    for task, m in sorted(evaluation.items()):
        out[f"accuracy/{task}"] = m.accuracy
        out[f"eval_loss/{task}"] = m.mean_loss
    return out
