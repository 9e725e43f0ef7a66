"""training.overlap: a data owner runs the next batch's forward while the previous gradient is on its
way. Each batch's backward runs on the weights of its own forward (copies taken when it began ahead);
the update order is unchanged. Checked against the same schedule written out in plain torch."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from secure_split.engine.executor import PeerExecutor, build_optimizer
from secure_split.errors import LocalProtocolError

from .test_executor import BATCH, _data, _vanilla
from .test_executor import _pair as _executors


def _pair(tmp_path: Path, overlap: bool) -> tuple[PeerExecutor, PeerExecutor]:
    return _executors(_vanilla(tmp_path, name=f"o{int(overlap)}.yaml"), overlap=overlap)


def test_a_step_begun_ahead_trains_on_the_weights_of_its_own_forward(tmp_path: Path) -> None:
    owner, lab = _pair(tmp_path, overlap=True)
    assert owner.overlap and not lab.overlap  # the label holder has inbound tensors and the loss
    bottom0 = copy.deepcopy(owner.segments["bottom"])
    top0 = copy.deepcopy(lab.segments["top"])
    batches = [BATCH, BATCH + 8, BATCH + 16]

    # owner: step 0, then step 1 ahead of step 0's gradient; lab: strictly one step at a time
    (a0,) = owner.begin_step(0, "train", batches[0])
    assert owner.can_begin_ahead("train") and not owner.can_begin_ahead("eval")
    (a1,) = owner.begin_step(1, "train", batches[1])
    assert owner.active_step == 0 and owner.ahead_step == 1
    with pytest.raises(LocalProtocolError):
        owner.begin_step(2, "train", batches[2])  # one step ahead at most
    lab.begin_step(0, "train", batches[0])
    (g0,) = lab.on_activation(a0.edge, a0.tensor, step=0)
    lab.finish_step()
    assert owner.on_gradient(g0.edge, g0.tensor, step=0) == []
    owner.finish_step()
    assert owner.active_step == 1 and owner.ahead_step is None
    (a2,) = owner.begin_step(2, "train", batches[2])  # ahead of step 1, on the weights after update 0
    for step, act in ((1, a1), (2, a2)):
        lab.begin_step(step, "train", batches[step])
        (g,) = lab.on_activation(act.edge, act.tensor, step=step)
        lab.finish_step()
        owner.on_gradient(g.edge, g.tensor, step=step)
        owner.finish_step()

    # the same schedule in plain torch: batch t+1's forward uses the weights before update t
    owner_data, lab_data = _data()
    bottom, top = copy.deepcopy(bottom0), copy.deepcopy(top0)
    opt_b = build_optimizer(list(bottom.parameters()), owner.deployment)
    opt_t = build_optimizer(list(top.parameters()), owner.deployment)
    assert opt_b is not None and opt_t is not None
    pending = None  # (module copy the forward ran on, output) of the batch begun ahead
    for t, ids in enumerate(batches):
        rows = owner_data.rows(ids)
        forward_on = copy.deepcopy(bottom) if pending is None else pending[0]
        out = pending[1] if pending is not None else forward_on(owner_data.features[rows])
        if t + 1 < len(batches):  # the next batch's forward, before this batch's update
            ahead_module = copy.deepcopy(bottom)
            pending = (ahead_module, ahead_module(owner_data.features[owner_data.rows(batches[t + 1])]))
        cut = out.detach().requires_grad_(True)
        opt_t.zero_grad()
        F.cross_entropy(top(cut), lab_data.labels["labels"][rows]).backward()
        opt_t.step()
        out.backward(cut.grad)
        for p, q in zip(bottom.parameters(), forward_on.parameters(), strict=True):
            p.grad = q.grad
        opt_b.step()
    for mine, ref in ((owner.segments["bottom"], bottom), (lab.segments["top"], top)):
        for p, q in zip(mine.parameters(), ref.parameters(), strict=True):
            assert torch.allclose(p, q, atol=1e-6), (p, q)
    # and not the same as training without overlap (the stale forward is a different run)
    plain_owner, plain_lab = _pair(tmp_path, overlap=False)
    for step, ids in enumerate(batches):
        (a,) = plain_owner.begin_step(step, "train", ids)
        plain_lab.begin_step(step, "train", ids)
        (g,) = plain_lab.on_activation(a.edge, a.tensor, step=step)
        plain_lab.finish_step()
        plain_owner.on_gradient(g.edge, g.tensor, step=step)
        plain_owner.finish_step()
    assert not all(torch.equal(p, q) for p, q in zip(
        plain_owner.segments["bottom"].parameters(), owner.segments["bottom"].parameters(), strict=True))


def test_without_overlap_or_outside_training_no_step_begins_ahead(tmp_path: Path) -> None:
    owner, _ = _pair(tmp_path, overlap=False)
    owner.begin_step(0, "train", BATCH)
    assert not owner.can_begin_ahead("train")
    with pytest.raises(LocalProtocolError, match="still active"):
        owner.begin_step(1, "train", BATCH + 8)
    owner, _ = _pair(tmp_path, overlap=True)
    owner.begin_step(0, "eval", BATCH)
    with pytest.raises(LocalProtocolError, match="still active"):
        owner.begin_step(1, "train", BATCH + 8)  # an eval step is never overtaken


def test_a_step_whose_update_is_taken_is_finished_before_the_next_begins(tmp_path: Path) -> None:
    owner, lab = _pair(tmp_path, overlap=True)
    (a,) = owner.begin_step(0, "train", BATCH)
    assert owner.can_begin_ahead("train")  # waits for its gradient only
    lab.begin_step(0, "train", BATCH)
    (g,) = lab.on_activation(a.edge, a.tensor, step=0)
    owner.on_gradient(g.edge, g.tensor, step=0)  # backward and update taken
    assert not owner.can_begin_ahead("train")  # a step begun now would run on the updated weights
    with pytest.raises(LocalProtocolError, match="still active"):
        owner.begin_step(1, "train", BATCH + 8)
    owner.finish_step()
    assert owner.begin_step(1, "train", BATCH + 8)


def test_abort_drops_the_step_begun_ahead_too(tmp_path: Path) -> None:
    owner, _ = _pair(tmp_path, overlap=True)
    owner.begin_step(0, "train", BATCH)
    owner.begin_step(1, "train", BATCH + 8)
    owner.abort_step()
    assert owner.active_step is None and owner.ahead_step is None
    assert owner.begin_step(2, "train", BATCH)  # ready for the next


def _train(tmp_path: Path, *, overlap: bool, ahead: bool, steps: int = 4) -> dict[str, torch.Tensor]:
    """Owner and lab over `steps` training steps, then one eval step and two more training steps;
    with `ahead`, the owner begins every training step it can before the previous one's gradient."""
    owner, lab = _pair(tmp_path, overlap=overlap)
    plan = [("train", BATCH + 8 * i) for i in range(steps)] + [("eval", BATCH)] + [("train", BATCH + 3), ("train", BATCH + 5)]
    acts = {}
    for step, (phase, ids) in enumerate(plan):
        if step not in acts:
            acts[step] = owner.begin_step(step, phase, ids)
        nxt = step + 1
        if ahead and nxt < len(plan) and owner.can_begin_ahead(plan[nxt][0]):
            acts[nxt] = owner.begin_step(nxt, plan[nxt][0], plan[nxt][1])
        lab.begin_step(step, phase, ids)
        (a,) = acts[step]
        out = lab.on_activation(a.edge, a.tensor, step=step)
        lab.finish_step()
        for g in out:
            owner.on_gradient(g.edge, g.tensor, step=step)
        owner.finish_step()
    return {**owner.state_tensors(), **lab.state_tensors()}


def test_overlap_gives_the_same_weights_whether_or_not_a_step_began_ahead(tmp_path: Path) -> None:
    # The message timing decides whether the owner gets to begin a step ahead; the result must not
    # depend on it: a training step after a training step always runs on the weights from before
    # that step's update, and the first training step after an eval step on the current ones.
    raced = _train(tmp_path, overlap=True, ahead=True)
    strict = _train(tmp_path, overlap=True, ahead=False)
    assert raced.keys() == strict.keys()
    for k in raced:
        assert torch.equal(raced[k], strict[k]), k
    plain = _train(tmp_path, overlap=False, ahead=False)
    assert any(not torch.equal(raced[k], plain[k]) for k in raced if k.startswith("segments."))


def _chain(tmp_path: Path, name: str, depth: int = 2) -> tuple[PeerExecutor, PeerExecutor, PeerExecutor]:
    from .harness import deployment_yaml, write_deployment
    from .test_executor import BOTTOM, TOP

    text = deployment_yaml(
        ["owner", "hop", "lab"],
        {
            "bottom": {"peer": "owner", "model": BOTTOM, "input": "features"},
            "mid": {"peer": "hop", "model": [{"linear": {"in": 3, "out": 3}}, {"tanh": {}}]},
            "top": {"peer": "lab", "model": TOP, "loss": "cross_entropy"},
        },
        [{"from": "bottom", "to": "mid"}, {"from": "mid", "to": "top"}],
        {"seed": 1, "optimizer": {"type": "adam", "lr": 0.01}, "overlap": True},
    )
    dep = write_deployment(tmp_path, text, name)
    owner_data, lab_data = _data()
    return (PeerExecutor(dep, "owner", owner_data, noise_seed=0, overlap=True, pipeline_depth=depth),
            PeerExecutor(dep, "hop", None, noise_seed=0, overlap=True, pipeline_depth=depth),
            PeerExecutor(dep, "lab", lab_data, noise_seed=0, overlap=True, pipeline_depth=depth))


def _begin_chain_step(owner: PeerExecutor, hop: PeerExecutor, batches: list, sent: dict, step: int) -> None:
    (a,) = owner.begin_step(step, "train", batches[step])
    assert hop.begin_step(step, "train", batches[step]) == []
    sent[step] = hop.on_activation(a.edge, a.tensor, step=step)


def test_a_hop_runs_the_next_forward_when_its_input_comes_early_with_the_same_result(tmp_path: Path) -> None:
    batches = [BATCH, BATCH + 8, BATCH + 16]
    runs = []
    for ahead in (False, True):
        owner, hop, lab = _chain(tmp_path, f"chain{int(ahead)}.yaml")
        assert owner.overlap and hop.overlap and not lab.overlap
        sent: dict[int, list] = {}  # step -> the hop's activation for the lab
        begin = functools.partial(_begin_chain_step, owner, hop, batches, sent)
        begin(0)
        for step in range(len(batches)):
            if ahead and step + 1 < len(batches):
                assert owner.can_begin_ahead("train") and hop.can_begin_ahead("train")
                begin(step + 1)  # both run step+1's forward before step's gradients come back
                assert hop.ahead_step == step + 1
            lab.begin_step(step, "train", batches[step])
            (h,) = sent[step]
            (gh,) = lab.on_activation(h.edge, h.tensor, step=step)
            lab.finish_step()
            (go,) = hop.on_gradient(gh.edge, gh.tensor, step=step)
            hop.finish_step()
            owner.on_gradient(go.edge, go.tensor, step=step)
            owner.finish_step()
            if not ahead and step + 1 < len(batches):
                begin(step + 1)
        runs.append({**owner.state_tensors(), **hop.state_tensors(), **lab.state_tensors()})
    strict, raced = runs
    for k in strict:
        assert torch.equal(strict[k], raced[k]), k
