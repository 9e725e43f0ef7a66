"""Without protections, a split run computes what the centralised baseline computes.

Each topology of DESIGN.md runs twice on the same schedule: split across PeerExecutors that only
exchange Outgoing tensors (through the wire format), and as one network in `train_centralized`.
Weights, per-epoch losses and test accuracy must agree to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from secure_split.config import Deployment
from secure_split.engine import zoo
from secure_split.engine.baseline import train_centralized
from secure_split.engine.data import PeerData, breast_cancer, digits

from .harness import (
    deployment_yaml,
    train_split,
    u_shaped_digits_yaml,
    vanilla_digits_yaml,
    vertical_breast_cancer_yaml,
    write_deployment,
)

FAST = {"seed": 3, "epochs": 2, "batch_size": 32, "max_steps_per_epoch": 6, "test_fraction": 0.2}


@dataclass
class Case:
    dep: Deployment
    datas: Mapping[str, PeerData | None]
    features: dict[str, torch.Tensor]
    labels: dict[str, torch.Tensor]
    ids: torch.Tensor


def vanilla(tmp: Path) -> Case:
    ids, x, y = digits()
    text = vanilla_digits_yaml({**FAST, "optimizer": {"type": "adam", "lr": zoo.DIGITS_LR}})
    datas = {"owner": PeerData(ids=ids, features=x), "lab": PeerData(ids=ids, labels={"labels": y})}
    return Case(write_deployment(tmp, text), datas, {"bottom": x}, {"top": y}, ids)


def u_shaped(tmp: Path) -> Case:
    ids, x, y = digits()
    text = u_shaped_digits_yaml({**FAST, "optimizer": {"type": "adam", "lr": zoo.DIGITS_LR}})
    datas = {"owner": PeerData(ids=ids, features=x, labels={"labels": y}), "server": None}
    return Case(write_deployment(tmp, text), datas, {"head": x}, {"tail": y}, ids)


def chain(tmp: Path) -> Case:
    ids, x, y = digits()
    text = deployment_yaml(
        ["owner", "hop1", "hop2", "lab"],
        {
            "bottom": {"peer": "owner", "model": zoo.DIGITS_CNN_BOTTOM, "input": "features"},
            "mid1": {"peer": "hop1", "model": zoo.DIGITS_HOP},
            "mid2": {"peer": "hop2", "model": zoo.DIGITS_HOP},
            "top": {"peer": "lab", "model": zoo.DIGITS_CNN_TOP, "loss": "cross_entropy"},
        },
        [{"from": "bottom", "to": "mid1"}, {"from": "mid1", "to": "mid2"}, {"from": "mid2", "to": "top"}],
        # a deeper chain needs a few more steps to move clearly away from chance
        {**FAST, "max_steps_per_epoch": 20, "optimizer": {"type": "adam", "lr": zoo.DIGITS_LR, "weight_decay": 1e-4}},
    )
    datas = {
        "owner": PeerData(ids=ids, features=x),
        "hop1": None,
        "hop2": None,
        "lab": PeerData(ids=ids, labels={"labels": y}),
    }
    return Case(write_deployment(tmp, text), datas, {"bottom": x}, {"top": y}, ids)


def vertical(tmp: Path) -> Case:
    ids, x, y = breast_cancer()
    xa, xb = x[:, :15].contiguous(), x[:, 15:].contiguous()
    text = vertical_breast_cancer_yaml({**FAST, "optimizer": {"type": "adam", "lr": zoo.BREAST_CANCER_LR}})
    datas = {
        "hospital_a": PeerData(ids=ids, features=xa),
        "hospital_b": PeerData(ids=ids, features=xb),
        "lab": PeerData(ids=ids, labels={"labels": y}),
    }
    return Case(write_deployment(tmp, text), datas, {"bottom_a": xa, "bottom_b": xb}, {"top": y}, ids)


def multi_task(tmp: Path) -> Case:
    ids, x, y = digits()
    ge5 = (y >= 5).to(torch.int64)
    text = deployment_yaml(
        ["owner", "lab_digit", "lab_ge5"],
        {
            "trunk": {"peer": "owner", "model": zoo.DIGITS_CNN_BOTTOM, "input": "features"},
            "head_digit": {"peer": "lab_digit", "model": zoo.DIGITS_CNN_TOP, "loss": "cross_entropy"},
            "head_ge5": {
                "peer": "lab_ge5",
                "model": zoo.DIGITS_GE5_HEAD,
                "loss": "cross_entropy",
                "labels": "ge5",
            },
        },
        [{"from": "trunk", "to": "head_digit"}, {"from": "trunk", "to": "head_ge5"}],
        {**FAST, "optimizer": {"type": "adam", "lr": zoo.DIGITS_LR}},
        coordinator="lab_digit",
    )
    datas = {
        "owner": PeerData(ids=ids, features=x),
        "lab_digit": PeerData(ids=ids, labels={"labels": y}),
        "lab_ge5": PeerData(ids=ids, labels={"ge5": ge5}),
    }
    return Case(write_deployment(tmp, text), datas, {"trunk": x}, {"head_digit": y, "head_ge5": ge5}, ids)


def local_edges_and_sum_merge(tmp: Path) -> Case:
    """Two owners summed at the label holder, which runs two segments joined by a local edge."""
    ids, x, y = breast_cancer()
    xa, xb = x[:, :15].contiguous(), x[:, 15:].contiguous()
    text = deployment_yaml(
        ["hospital_a", "hospital_b", "lab"],
        {
            "bottom_a": {"peer": "hospital_a", "model": zoo.BREAST_CANCER_HALF_BOTTOM, "input": "features"},
            "bottom_b": {"peer": "hospital_b", "model": zoo.BREAST_CANCER_HALF_BOTTOM, "input": "features"},
            "mid": {"peer": "lab", "model": [{"linear": {"in": 16, "out": 8}}, {"tanh": {}}], "merge": "sum"},
            "top": {"peer": "lab", "model": [{"linear": {"in": 8, "out": 2}}], "loss": "cross_entropy"},
        },
        [{"from": "bottom_a", "to": "mid"}, {"from": "bottom_b", "to": "mid"}, {"from": "mid", "to": "top"}],
        {**FAST, "optimizer": {"type": "sgd", "lr": 0.1}},
    )
    datas = {
        "hospital_a": PeerData(ids=ids, features=xa),
        "hospital_b": PeerData(ids=ids, features=xb),
        "lab": PeerData(ids=ids, labels={"labels": y}),
    }
    return Case(write_deployment(tmp, text), datas, {"bottom_a": xa, "bottom_b": xb}, {"top": y}, ids)


def he_mean_merge(tmp: Path) -> Case:
    """Three owners averaged under HE: the label holder only ever gets the sum (on_aggregate)."""
    ids, x, y = breast_cancer()
    parts = [x[:, i * 10 : (i + 1) * 10].contiguous() for i in range(3)]
    bottom = [{"linear": {"in": 10, "out": 8}}, {"relu": {}}]
    text = deployment_yaml(
        ["a", "b", "c", "lab"],
        {
            **{f"bottom_{p}": {"peer": p, "model": bottom, "input": "features"} for p in "abc"},
            "top": {
                "peer": "lab",
                "model": [{"linear": {"in": 8, "out": 2}}],
                "loss": "cross_entropy",
                "merge": "mean",
                "he": True,
            },
        },
        [{"from": f"bottom_{p}", "to": "top"} for p in "abc"],
        {**FAST, "optimizer": {"type": "adam", "lr": zoo.BREAST_CANCER_LR}},
    )
    datas: dict[str, PeerData | None] = {
        p: PeerData(ids=ids, features=f) for p, f in zip("abc", parts, strict=True)
    }
    datas["lab"] = PeerData(ids=ids, labels={"labels": y})
    features = {f"bottom_{p}": f for p, f in zip("abc", parts, strict=True)}
    return Case(write_deployment(tmp, text), datas, features, {"top": y}, ids)


CASES: dict[str, Callable[[Path], Case]] = {
    "vanilla": vanilla,
    "u_shaped": u_shaped,
    "chain_3_hops": chain,
    "vertical_concat": vertical,
    "multi_task_fan_out": multi_task,
    "local_edge_sum_merge": local_edges_and_sum_merge,
    "he_mean_merge": he_mean_merge,
}


@pytest.mark.parametrize("name", list(CASES))
def test_split_run_matches_the_centralised_baseline(name: str, tmp_path: Path) -> None:
    case = CASES[name](tmp_path)
    split: dict[str, Any] = train_split(case.dep, case.datas, case.ids)
    central = train_centralized(case.dep, features=case.features, labels=case.labels, ids=case.ids)
    assert set(split["segments"]) == set(central["segments"]) == set(case.dep.spec.segments)
    for seg, module in split["segments"].items():
        ours = dict(module.state_dict())
        theirs = dict(central["segments"][seg].state_dict())
        for key, value in ours.items():
            torch.testing.assert_close(value, theirs[key], rtol=1e-5, atol=1e-6, msg=f"{seg}.{key}")
    assert split["loss"] == pytest.approx(central["loss"], rel=1e-5)
    assert split["accuracy"].keys() == central["accuracy"].keys()
    for task, acc in split["accuracy"].items():
        assert acc == pytest.approx(central["accuracy"][task], abs=1e-9), task
        assert acc > 0.3, f"{task}: training did not move (accuracy {acc})"  # guards against a no-op run


def test_multi_task_fan_out_sums_the_gradients_of_both_heads(tmp_path: Path) -> None:
    """The trunk waits for both heads; with one head's gradient missing it must not step."""
    case = multi_task(tmp_path)
    from .harness import LocalRouter, make_executors

    router = LocalRouter(make_executors(case.dep, case.datas))
    owner = router.executors["owner"]
    before = [p.detach().clone() for p in owner.segments["trunk"].parameters()]
    ids = case.ids[:8].numpy()
    pending = [o for ex in router.executors.values() for o in ex.begin_step(0, "train", ids)]
    grads = []
    for act in pending:
        grads.extend(router.deliver(act))
    assert sorted(g.edge for g in grads) == ["trunk->head_digit", "trunk->head_ge5"]
    assert router.deliver(grads[0]) == [] and not owner.step_complete()
    assert owner.waiting_for() == [("gradient", grads[1].edge)]
    assert all(torch.equal(a, b) for a, b in zip(before, owner.segments["trunk"].parameters(), strict=True))
    router.deliver(grads[1])
    assert owner.step_complete()
    assert not all(
        torch.equal(a, b) for a, b in zip(before, owner.segments["trunk"].parameters(), strict=True)
    )
