"""training.pipeline_depth: up to k training steps in flight at a data owner (and at the hops of a
chain). Each step runs forward and backward on the weights from before the last k - 1 updates of
its run of training steps (`engine.pipeline`), whatever the message timing: racing delivery (a step
begun ahead of earlier updates) and strictly ordered delivery (begun after them) train alike.
k = 2 is `training.overlap`; k = 1 is plain sequential training, bit for bit."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secure_split.engine.executor import PeerExecutor, build_optimizer
from secure_split.engine.pipeline import WeightVersions
from secure_split.errors import LocalProtocolError

from .test_executor import BATCH, _data, _vanilla
from .test_executor import _pair as _executors
from .test_overlap import _chain

PLAN = [("train", BATCH + 3 * i) for i in range(6)] + [("eval", BATCH)] + [("train", BATCH + 5 + i) for i in range(3)]


def _pair(tmp_path: Path, depth: int, *, overlap: bool = False) -> tuple[PeerExecutor, PeerExecutor]:
    dep = _vanilla(tmp_path, name=f"p{depth}{int(overlap)}.yaml")
    owner_data, lab_data = _data()
    return (PeerExecutor(dep, "owner", owner_data, noise_seed=0, pipeline_depth=depth, overlap=overlap),
            PeerExecutor(dep, "lab", lab_data, noise_seed=0, pipeline_depth=depth, overlap=overlap))


def _train(owner: PeerExecutor, lab: PeerExecutor, *, order: random.Random | None) -> dict[str, torch.Tensor]:
    """The lab runs PLAN strictly in order; the owner begins each step when it must (nothing in
    flight) and, with `order`, a random number of later steps ahead whenever it may (racing)."""
    acts: dict[int, list] = {}
    nxt = 0  # the next step the owner begins

    def begin_ahead_some() -> None:
        nonlocal nxt
        if order is None:
            return
        for _ in range(order.randint(0, owner.pipeline_depth)):
            if nxt >= len(PLAN) or not owner.can_begin_ahead(PLAN[nxt][0]):
                return
            acts[nxt] = owner.begin_step(nxt, PLAN[nxt][0], PLAN[nxt][1])
            nxt += 1

    for step, (phase, ids) in enumerate(PLAN):
        if nxt == step:
            assert owner.active_step is None
            acts[step] = owner.begin_step(step, phase, ids)
            nxt += 1
        begin_ahead_some()
        lab.begin_step(step, phase, ids)
        (a,) = acts.pop(step)
        out = lab.on_activation(a.edge, a.tensor, step=step)
        begin_ahead_some()  # while the gradient is on its way
        lab.finish_step()
        for g in out:
            owner.on_gradient(g.edge, g.tensor, step=step)
        assert owner.active_step == step
        owner.finish_step()
    return {**owner.state_tensors(), **lab.state_tensors()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_racing_and_strictly_ordered_delivery_train_the_same_weights(tmp_path: Path, depth: int) -> None:
    strict = _train(*_pair(tmp_path, depth), order=None)
    for seed in range(3):
        raced = _train(*_pair(tmp_path, depth), order=random.Random(seed))
        assert _same(raced, strict), (depth, seed)
    plain = _train(*_pair(tmp_path, 1), order=None)
    assert not _same(strict, plain)  # a stale forward is a different run


def test_depth_one_is_sequential_training_and_depth_two_is_overlap(tmp_path: Path) -> None:
    owner, lab = _pair(tmp_path, 1)
    assert owner.pipeline_depth == 1 and not owner.overlap
    owner.begin_step(0, "train", BATCH)
    assert not owner.can_begin_ahead("train")
    sequential = _train(*_pair(tmp_path, 1), order=None)
    default = _executors(_vanilla(tmp_path, name="default.yaml"))  # no pipelining options at all
    assert _same(_train(*default, order=None), sequential)
    overlap = _train(*_pair(tmp_path, 1, overlap=True), order=random.Random(5))
    assert _same(overlap, _train(*_pair(tmp_path, 2), order=random.Random(6)))
    owner, lab = _pair(tmp_path, 4)
    assert owner.pipeline_depth == 4 and lab.pipeline_depth == 1  # the label holder never runs ahead


def test_at_most_depth_steps_are_in_flight(tmp_path: Path) -> None:
    owner, _ = _pair(tmp_path, 3)
    owner.begin_step(0, "train", BATCH)
    owner.begin_step(1, "train", BATCH + 1)
    owner.begin_step(2, "train", BATCH + 2)
    assert owner.active_step == 0 and owner.ahead_steps == (1, 2) and owner.ahead_step == 1
    assert not owner.can_begin_ahead("train")
    with pytest.raises(LocalProtocolError, match="still active"):
        owner.begin_step(3, "train", BATCH + 3)
    owner.abort_step()
    assert owner.active_step is None and owner.ahead_steps == ()


def test_each_step_runs_on_the_weights_from_before_the_last_k_minus_1_updates(tmp_path: Path) -> None:
    # The same schedule written out in plain torch, k = 3: step n's forward and backward use V_m,
    # m = max(0, n - 2), the bottom's weights before update m; every update applies to the live ones.
    depth, steps = 3, 6
    owner, lab = _pair(tmp_path, depth)
    bottom0, top0 = copy.deepcopy(owner.segments["bottom"]), copy.deepcopy(lab.segments["top"])
    batches = [ids for _, ids in PLAN[:steps]]
    acts: dict[int, list] = {}

    def fill() -> None:  # everything the owner may begin, as early as it may
        while len(acts) < steps and (owner.active_step is None or owner.can_begin_ahead("train")):
            acts[len(acts)] = owner.begin_step(len(acts), "train", batches[len(acts)])

    fill()
    assert owner.active_step == 0 and owner.ahead_steps == (1, 2)
    for t in range(steps):
        lab.begin_step(t, "train", batches[t])
        (g,) = lab.on_activation(acts[t][0].edge, acts[t][0].tensor, step=t)
        lab.finish_step()
        owner.on_gradient(g.edge, g.tensor, step=t)
        owner.finish_step()
        fill()

    owner_data, lab_data = _data()
    bottom, top = copy.deepcopy(bottom0), copy.deepcopy(top0)
    opt_b = build_optimizer(list(bottom.parameters()), owner.deployment)
    opt_t = build_optimizer(list(top.parameters()), owner.deployment)
    assert opt_b is not None and opt_t is not None
    versions: list[nn.Module] = []  # V_i: the bottom before update i
    for n, ids in enumerate(batches):
        m = max(0, n - depth + 1)
        rows = owner_data.rows(ids)
        forward_on = copy.deepcopy(versions[m] if m < len(versions) else bottom)
        out = forward_on(owner_data.features[rows])
        cut = out.detach().requires_grad_(True)
        opt_t.zero_grad()
        F.cross_entropy(top(cut), lab_data.labels["labels"][rows]).backward()
        opt_t.step()
        out.backward(cut.grad)
        versions.append(copy.deepcopy(bottom))
        for p, q in zip(bottom.parameters(), forward_on.parameters(), strict=True):
            p.grad = q.grad
        opt_b.step()
    for mine, ref in ((owner.segments["bottom"], bottom), (lab.segments["top"], top)):
        for p, q in zip(mine.parameters(), ref.parameters(), strict=True):
            assert torch.allclose(p, q, atol=1e-6), (p, q)


def test_a_chain_pipelines_at_every_hop_with_the_same_result(tmp_path: Path) -> None:
    import functools

    from .test_overlap import _begin_chain_step

    batches = [BATCH + i for i in range(5)]
    runs = []
    for ahead in (False, True):
        owner, hop, lab = _chain(tmp_path, f"chain3{int(ahead)}.yaml", depth=3)
        assert owner.pipeline_depth == hop.pipeline_depth == 3 and lab.pipeline_depth == 1
        sent: dict[int, list] = {}
        begin = functools.partial(_begin_chain_step, owner, hop, batches, sent)
        begun = 1
        begin(0)
        for step in range(len(batches)):
            while ahead and begun < len(batches) and owner.can_begin_ahead("train") and hop.can_begin_ahead("train"):
                begin(begun)
                begun += 1
            if ahead:
                assert len(hop.ahead_steps) == min(2, len(batches) - 1 - step)
            lab.begin_step(step, "train", batches[step])
            (h,) = sent.pop(step)
            (gh,) = lab.on_activation(h.edge, h.tensor, step=step)
            lab.finish_step()
            (go,) = hop.on_gradient(gh.edge, gh.tensor, step=step)
            hop.finish_step()
            owner.on_gradient(go.edge, go.tensor, step=step)
            owner.finish_step()
            if begun == step + 1 and begun < len(batches):
                begin(begun)
                begun += 1
        runs.append({**owner.state_tensors(), **hop.state_tensors(), **lab.state_tensors()})
    assert _same(*runs)


def test_weight_versions_keep_at_most_depth_copies_and_none_at_depth_one() -> None:
    modules = {"seg": nn.Linear(2, 2)}
    one = WeightVersions(1)
    for _ in range(5):
        assert one.begin(modules, in_flight=False) is None
        one.before_update(modules)
        assert one.held == 0
    for depth in (2, 3, 5):
        v = WeightVersions(depth)
        for n in range(12):  # strictly ordered: each step begins after every earlier update
            stash = v.begin(modules, in_flight=False)
            assert (stash is None) == (n == 0)
            assert v.held <= depth - 1
            v.before_update(modules)
            with torch.no_grad():
                modules["seg"].weight.add_(1.0)  # the update
        v.reset()
        assert v.held == 0 and v.begin(modules, in_flight=False) is None
    with pytest.raises(ValueError, match=">= 1"):
        WeightVersions(0)
