"""The demo models learn: split runs of the zoo reach their stated accuracy in 3 epochs of batch 64."""

from __future__ import annotations

from pathlib import Path

import pytest

from secure_split.engine import zoo
from secure_split.engine.data import PeerData, breast_cancer, digits

from .harness import (
    deployment_yaml,
    train_split,
    u_shaped_digits_yaml,
    vanilla_digits_yaml,
    vertical_breast_cancer_yaml,
    write_deployment,
)

DEMO = {"seed": 0, "epochs": 3, "batch_size": 64, "test_fraction": 0.2}


def test_vanilla_digits_cnn_split_exceeds_90_percent(tmp_path: Path) -> None:
    ids, x, y = digits()
    text = vanilla_digits_yaml({**DEMO, "optimizer": {"type": "adam", "lr": zoo.DIGITS_LR}})
    result = train_split(
        write_deployment(tmp_path, text),
        {"owner": PeerData(ids=ids, features=x), "lab": PeerData(ids=ids, labels={"labels": y})},
        ids,
    )
    assert result["accuracy"]["labels"] > 0.90
    assert result["loss"][-1] < result["loss"][0]


def test_u_shaped_digits_split_exceeds_90_percent(tmp_path: Path) -> None:
    ids, x, y = digits()
    text = u_shaped_digits_yaml({**DEMO, "optimizer": {"type": "adam", "lr": zoo.DIGITS_LR}})
    datas = {"owner": PeerData(ids=ids, features=x, labels={"labels": y}), "server": None}
    assert train_split(write_deployment(tmp_path, text), datas, ids)["accuracy"]["labels"] > 0.90


@pytest.mark.parametrize("vertical", [False, True])
def test_breast_cancer_mlps_exceed_90_percent(tmp_path: Path, vertical: bool) -> None:
    ids, x, y = breast_cancer()
    training = {**DEMO, "optimizer": {"type": "adam", "lr": zoo.BREAST_CANCER_LR}}
    lab = PeerData(ids=ids, labels={"labels": y})
    if vertical:
        text = vertical_breast_cancer_yaml(training)
        datas = {
            "hospital_a": PeerData(ids=ids, features=x[:, :15].contiguous()),
            "hospital_b": PeerData(ids=ids, features=x[:, 15:].contiguous()),
            "lab": lab,
        }
    else:
        text = deployment_yaml(
            ["owner", "lab"],
            {
                "bottom": {"peer": "owner", "model": zoo.BREAST_CANCER_MLP_BOTTOM, "input": "features"},
                "top": {"peer": "lab", "model": zoo.BREAST_CANCER_MLP_TOP, "loss": "cross_entropy"},
            },
            [{"from": "bottom", "to": "top"}],
            training,
        )
        datas = {"owner": PeerData(ids=ids, features=x), "lab": lab}
    assert train_split(write_deployment(tmp_path, text), datas, ids)["accuracy"]["labels"] > 0.90
