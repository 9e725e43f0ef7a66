"""Checkpoints: an exact round trip of weights and optimizer state; tampering is refused."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from secure_split.config import Deployment
from secure_split.engine.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from secure_split.engine.data import PeerData
from secure_split.errors import TrainingError

from .harness import LocalRouter, deployment_yaml, make_executors, write_deployment

IDS = torch.arange(60)


def _router(
    tmp_path: Path, optimizer: dict[str, object]
) -> tuple[LocalRouter, tuple[Deployment, dict[str, PeerData | None]]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 6, generator=g)
    y = (x.sum(dim=1) > 0).to(torch.int64)
    text = deployment_yaml(
        ["owner", "lab"],
        {
            "bottom": {
                "peer": "owner",
                "model": [{"linear": {"in": 6, "out": 4}}, {"batchnorm1d": {"features": 4}}, {"relu": {}}],
                "input": "features",
            },
            "top": {"peer": "lab", "model": [{"linear": {"in": 4, "out": 2}}], "loss": "cross_entropy"},
        },
        [{"from": "bottom", "to": "top"}],
        {"seed": 4, "optimizer": optimizer},
    )
    dep = write_deployment(tmp_path, text)
    datas: dict[str, PeerData | None] = {
        "owner": PeerData(ids=IDS, features=x),
        "lab": PeerData(ids=IDS, labels={"labels": y}),
    }
    return LocalRouter(make_executors(dep, datas)), (dep, datas)


def _batch(step: int) -> np.ndarray:
    return np.arange(60)[(step * 10) % 60 : (step * 10) % 60 + 10]


@pytest.mark.parametrize(
    "optimizer",
    [{"type": "adam", "lr": 0.01, "weight_decay": 0.001}, {"type": "sgd", "lr": 0.1, "momentum": 0.9}],
)
def test_checkpoint_round_trip_restores_weights_and_optimizer_exactly(
    tmp_path: Path, optimizer: dict[str, object]
) -> None:
    router, (dep, datas) = _router(tmp_path, optimizer)
    for step in range(3):
        router.run_step(step, "train", _batch(step))
    saved = {p: {k: v.clone() for k, v in ex.state_tensors().items()} for p, ex in router.executors.items()}
    assert any(k.startswith("optimizer.") for k in saved["owner"])
    assert "segments.bottom.1.running_mean" in saved["owner"]  # buffers too
    for peer, ex in router.executors.items():
        save_checkpoint(tmp_path / peer, epoch=1, executor=ex, meta={"step": 3})
    for step in range(3, 6):
        router.run_step(step, "train", _batch(step))
    after = {p: ex.state_tensors() for p, ex in router.executors.items()}

    resumed = LocalRouter(make_executors(dep, datas))
    for peer, ex in resumed.executors.items():
        manifest = load_checkpoint(tmp_path / peer, 1, ex)
        assert manifest["meta"] == {"step": 3} and manifest["peer"] == peer
        restored = ex.state_tensors()
        assert restored.keys() == saved[peer].keys()
        for k, v in saved[peer].items():
            assert torch.equal(restored[k], v), k
    for step in range(3, 6):
        resumed.run_step(step, "train", _batch(step))
    for peer, ex in resumed.executors.items():
        for k, v in ex.state_tensors().items():
            assert torch.equal(v, after[peer][k]), f"{peer} {k} diverged after resuming"


def test_tampered_or_foreign_checkpoints_are_refused(tmp_path: Path) -> None:
    router, _ = _router(tmp_path, {"type": "adam", "lr": 0.01})
    router.run_step(0, "train", _batch(0))
    owner, lab = router.executors["owner"], router.executors["lab"]
    folder = tmp_path / "ckpt"
    manifest = save_checkpoint(folder, epoch=0, executor=owner, meta={})
    save_checkpoint(folder, epoch=1, executor=owner, meta={})
    save_checkpoint(folder, epoch=2, executor=owner, meta={})
    assert manifest.name == "epoch-0000.json" and (folder / "epoch-0000.safetensors").is_file()
    assert list_checkpoints(folder) == [0, 1, 2]
    assert (folder / "epoch-0000.safetensors").stat().st_mode & 0o077 == 0

    weights = folder / "epoch-0001.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0x01  # one bit in the last tensor
    weights.write_bytes(bytes(blob))
    before = {k: v.clone() for k, v in owner.state_tensors().items()}
    with pytest.raises(TrainingError, match="do not match their manifest"):
        load_checkpoint(folder, 1, owner)
    assert all(torch.equal(v, owner.state_tensors()[k]) for k, v in before.items())
    assert list_checkpoints(folder) == [0, 2]

    (folder / "epoch-0002.safetensors").unlink()
    assert list_checkpoints(folder) == [0]
    with pytest.raises(TrainingError, match="no checkpoint of epoch 2"):
        load_checkpoint(folder, 2, owner)

    with pytest.raises(TrainingError, match="belongs to peer 'owner', not 'lab'"):
        load_checkpoint(folder, 0, lab)
    data = json.loads(manifest.read_text())
    data["deployment_hash"] = "0" * 64
    manifest.write_text(json.dumps(data))
    with pytest.raises(TrainingError, match="made for deployment 0000"):
        load_checkpoint(folder, 0, owner)
    manifest.write_text("{not json")
    with pytest.raises(TrainingError, match="not valid JSON"):
        load_checkpoint(folder, 0, owner)
    assert list_checkpoints(folder) == []


def test_state_that_does_not_fit_is_refused_before_anything_changes(tmp_path: Path) -> None:
    router, _ = _router(tmp_path, {"type": "adam", "lr": 0.01})
    owner = router.executors["owner"]
    state = {k: v.clone() for k, v in owner.state_tensors().items()}
    wrong = dict(state)
    wrong["segments.bottom.0.weight"] = torch.zeros(5, 6)
    wrong["segments.top.0.weight"] = torch.zeros(2, 4)
    with pytest.raises(TrainingError) as info:
        owner.load_state_tensors(wrong)
    assert "segments.bottom.0.weight: expected" in str(info.value) and "unexpected entry segments.top" in str(
        info.value
    )
    assert all(torch.equal(v, owner.state_tensors()[k]) for k, v in state.items())


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda s: s.__setitem__("optimizer.bottom.0.weight.exp_avg", torch.zeros(2, 2)), "expected shape"),
        (lambda s: s.pop("optimizer.bottom.0.weight.exp_avg_sq"), "lacks ['exp_avg_sq']"),
        (lambda s: s.__setitem__("optimizer.bottom.0.weight.step", torch.tensor(-1.0)), "whole number >= 0"),
        (lambda s: s.__setitem__("optimizer.bottom.0.weight.step", torch.tensor(float("nan"))), "whole number"),
        (lambda s: s["optimizer.bottom.0.weight.exp_avg_sq"].fill_(-1.0), "negative values"),
        (lambda s: s["optimizer.bottom.0.weight.exp_avg"].fill_(float("inf")), "finite"),
    ],
    ids=["shape", "missing-key", "negative-step", "nan-step", "negative-second-moment", "infinite-moment"],
)
def test_optimizer_state_that_would_crash_or_poison_a_step_is_refused_and_nothing_is_loaded(
        tmp_path: Path, change: object, words: str) -> None:
    """A crafted checkpoint: its segment weights must not stay loaded when its optimizer part is
    refused, and a state the next step would crash on (or turn into NaN) is refused up front."""
    router, _ = _router(tmp_path, {"type": "adam", "lr": 0.01})
    router.run_step(0, "train", _batch(0))
    owner = router.executors["owner"]
    before = {k: v.clone() for k, v in owner.state_tensors().items()}
    crafted = {k: v.clone() for k, v in before.items()}
    crafted["segments.bottom.0.weight"] = torch.full_like(crafted["segments.bottom.0.weight"], 7.0)
    change(crafted)  # type: ignore[operator]
    with pytest.raises(TrainingError, match=re.escape(words)):
        owner.load_state_tensors(crafted, owner.optimizer_meta())
    after = owner.state_tensors()
    assert after.keys() == before.keys()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    router.run_step(1, "train", _batch(1))  # the peer trains on as before


def test_a_scalar_entry_with_many_values_is_refused_not_a_traceback(tmp_path: Path) -> None:
    router, _ = _router(tmp_path, {"type": "adam", "lr": 0.01})
    router.run_step(0, "train", _batch(0))
    owner = router.executors["owner"]
    state = {k: v.clone() for k, v in owner.state_tensors().items()}
    meta = {**owner.optimizer_meta(), "scalars": ["optimizer.bottom.0.weight.exp_avg"]}
    with pytest.raises(TrainingError, match="listed as a number"):
        owner.load_state_tensors(state, meta)
    with pytest.raises(TrainingError, match="not a list of names"):
        owner.load_state_tensors(state, {**owner.optimizer_meta(), "scalars": 5})
