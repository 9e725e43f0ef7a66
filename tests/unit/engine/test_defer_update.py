"""defer_update: gradients are returned before the optimizer step, and the weights end up the same."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from secure_split.engine.executor import PeerExecutor

from .test_executor import BATCH, _pair, _vanilla


def _executors(tmp_path: Path, defer: bool) -> tuple[PeerExecutor, PeerExecutor]:
    return _pair(_vanilla(tmp_path, name=f"d{int(defer)}.yaml"), defer_update=defer)


def test_deferred_update_is_taken_by_step_complete_with_the_same_result(tmp_path: Path) -> None:
    runs = {}
    for defer in (False, True):
        owner, lab = _executors(tmp_path, defer)
        for step in range(3):
            ids = BATCH + step
            lab.begin_step(step, "train", ids)
            (act,) = owner.begin_step(step, "train", ids)
            before = {k: v.clone() for k, v in lab.state_tensors().items() if k.startswith("segments.")}
            (grad,) = lab.on_activation(act.edge, act.tensor, step=step)
            after = {k: v for k, v in lab.state_tensors().items() if k.startswith("segments.")}
            unchanged = all(torch.equal(before[k], after[k]) for k in before)
            # Deferred: the gradient is returned before the label holder's weights move.
            assert unchanged == defer
            assert owner.on_gradient(grad.edge, grad.tensor, step=step) == []
            assert lab.step_complete() and owner.step_complete()
            lab.finish_step()
            owner.finish_step()
        runs[defer] = {**owner.state_tensors(), **lab.state_tensors()}
    assert runs[False].keys() == runs[True].keys()
    for k, v in runs[False].items():
        assert torch.equal(v, runs[True][k]), k


def test_eval_and_gradient_free_peers_are_unaffected(tmp_path: Path) -> None:
    owner, lab = _executors(tmp_path, True)
    lab.begin_step(0, "eval", BATCH)
    (act,) = owner.begin_step(0, "eval", BATCH)
    assert lab.on_activation(act.edge, act.tensor, step=0) == []
    assert lab.step_complete() and owner.step_complete()
    assert lab.finish_step().tasks["labels"].count == len(np.asarray(BATCH))
