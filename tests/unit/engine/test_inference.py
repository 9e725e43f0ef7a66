"""predict_locally: the whole network in one process, the reference of split inference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from secure_split.config import Deployment
from secure_split.engine.data import PeerData
from secure_split.engine.inference import predict_locally
from secure_split.errors import ConfigError

from .harness import LocalRouter, deployment_yaml, make_executors, write_deployment


def _u_shaped(tmp_path: Path) -> tuple[Deployment, dict[str, PeerData | None]]:
    dep = write_deployment(tmp_path, deployment_yaml(
        ["owner", "server"],
        {"head": {"peer": "owner", "input": "features", "model": [{"linear": {"in": 5, "out": 4}}, {"relu": {}}]},
         "middle": {"peer": "server", "model": [{"linear": {"in": 4, "out": 4}}, {"tanh": {}}]},
         "tail": {"peer": "owner", "loss": "cross_entropy", "model": [{"linear": {"in": 4, "out": 3}}]}},
        [{"from": "head", "to": "middle"}, {"from": "middle", "to": "tail"}],
        coordinator="owner",
    ))
    g = torch.Generator().manual_seed(1)
    ids = torch.arange(30)
    owner = PeerData(ids=ids, features=torch.randn(30, 5, generator=g),
                     labels={"labels": torch.randint(0, 3, (30,), generator=g)})
    return dep, {"owner": owner, "server": None}


def test_local_predictions_equal_the_split_infer_steps(tmp_path: Path) -> None:
    dep, datas = _u_shaped(tmp_path)
    router = LocalRouter(make_executors(dep, datas))
    split = []
    for step, batch in enumerate(np.array_split(np.arange(30), 4)):
        router.run_step(step, "infer", batch)
        split.append(router.executors["owner"].predictions()["tail"])
    segments = {s: m for ex in router.executors.values() for s, m in ex.segments.items()}
    owner = datas["owner"]
    assert owner is not None and owner.features is not None
    local = predict_locally(dep, segments, {"head": owner.features}, batch_size=7)
    assert list(local) == ["tail"]
    assert torch.equal(local["tail"], torch.cat(split))


def test_local_prediction_names_what_is_missing(tmp_path: Path) -> None:
    dep, datas = _u_shaped(tmp_path)
    segments = dict(make_executors(dep, datas)["owner"].segments)
    with pytest.raises(ConfigError, match="no module given for segment 'middle'"):
        predict_locally(dep, segments, {"head": torch.zeros(2, 5)})
    with pytest.raises(ConfigError, match="'middle' is not an input segment"):
        predict_locally(dep, segments, {"middle": torch.zeros(2, 4)})
