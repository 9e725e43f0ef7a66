"""Peer data files, id lookup, bundled datasets, and the shared batch schedule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from secure_split.engine.data import PeerData, breast_cancer, digits, load_peer_data, write_peer_data
from secure_split.engine.schedule import epoch_batches, eval_batches, split_train_test
from secure_split.errors import ConfigError, TrainingError


def _small() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.tensor([10, 3, 7, 42], dtype=torch.int64)
    x = torch.arange(8, dtype=torch.float32).reshape(4, 2)
    y = torch.tensor([0, 1, 1, 0])
    return ids, x, y


def test_peer_data_file_round_trips(tmp_path: Path) -> None:
    ids, x, y = _small()
    path = write_peer_data(
        tmp_path / "a" / "data.safetensors", ids=ids, features=x, labels={"labels": y, "ge5": 1 - y}
    )
    data = load_peer_data(path)
    assert torch.equal(data.ids, ids) and data.features is not None and torch.equal(data.features, x)
    assert set(data.labels) == {"labels", "ge5"} and torch.equal(data.labels["ge5"], 1 - y)


def test_a_label_only_file_has_no_features(tmp_path: Path) -> None:
    ids, _, y = _small()
    data = load_peer_data(write_peer_data(tmp_path / "d.safetensors", ids=ids.numpy(), labels={"labels": y}))
    assert data.features is None and torch.equal(data.labels["labels"], y)


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"ids": torch.arange(3), "secret": torch.zeros(3)}, "unexpected tensor 'secret'"),
        ({"features": torch.zeros(3, 2)}, "no 'ids' tensor"),
        ({"ids": torch.arange(3).float()}, "dtype F32, expected I64"),
        (
            {"ids": torch.arange(3), "features": torch.zeros(3, 2, dtype=torch.float64)},
            "dtype F64, expected F32",
        ),
        ({"ids": torch.arange(3), "labels.y": torch.zeros(2, dtype=torch.int64)}, "has 2 rows, ids have 3"),
        ({"ids": torch.arange(3), "features": torch.zeros(4, 2)}, "shape \\[N=3"),
        ({"ids": torch.tensor([1, 1, 2])}, "ids must be unique"),
    ],
)
def test_load_peer_data_refuses_malformed_files(
    tmp_path: Path, tensors: dict[str, torch.Tensor], message: str
) -> None:
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(ConfigError, match=message):
        load_peer_data(path)


def test_load_peer_data_checks_size_before_reading(tmp_path: Path) -> None:
    ids, x, _ = _small()
    path = write_peer_data(tmp_path / "d.safetensors", ids=ids, features=x)
    with pytest.raises(ConfigError, match="more than the limit of 100"):
        load_peer_data(path, max_bytes=100)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(ConfigError, match="not a readable safetensors file"):
        load_peer_data(garbage)
    with pytest.raises(ConfigError, match="not found"):
        load_peer_data(tmp_path / "missing.safetensors")


def test_rows_finds_ids_in_request_order_and_names_unknown_ones() -> None:
    ids, x, _ = _small()
    data = PeerData(ids=ids, features=x)
    assert data.rows(np.array([42, 10, 7])).tolist() == [3, 0, 2]
    with pytest.raises(TrainingError, match=r"2 sample id\(s\) are not in this peer's data \(e.g. 5, 99\)"):
        data.rows([10, 5, 99])
    with pytest.raises(TypeError):
        data.rows(np.array([1.5]))


def test_bundled_datasets_have_the_documented_shapes() -> None:
    ids, x, y = digits()
    assert (
        x.shape == (1797, 1, 8, 8)
        and x.dtype == torch.float32
        and float(x.min()) == 0.0
        and float(x.max()) == 1.0
    )
    assert (
        y.dtype == torch.int64 and set(y.tolist()) == set(range(10)) and torch.equal(ids, torch.arange(1797))
    )
    ids, x, y = breast_cancer()
    assert x.shape == (569, 30) and x.dtype == torch.float32 and set(y.tolist()) == {0, 1} and len(ids) == 569
    assert torch.allclose(x.mean(dim=0), torch.zeros(30), atol=1e-5)
    assert torch.allclose(x.std(dim=0, unbiased=False), torch.ones(30), atol=1e-4)


def test_split_is_deterministic_disjoint_and_order_independent() -> None:
    ids = np.arange(100, 200)
    train, test = split_train_test(ids, 0.2, seed=5)
    assert len(test) == 20 and len(train) == 80
    assert set(train) | set(test) == set(ids) and not set(train) & set(test)
    again = split_train_test(ids[::-1].copy(), 0.2, seed=5)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], test)
    assert not np.array_equal(split_train_test(ids, 0.2, seed=6)[1], test)
    with pytest.raises(ConfigError):
        split_train_test(np.arange(1), 0.5, seed=0)


def test_a_last_batch_too_small_to_send_is_merged_into_the_previous_one() -> None:
    # 70 = 64 + 6: a batch of 6 would fall under the policies' min_batch of 8.
    assert [len(b) for b in epoch_batches(np.arange(70), 64, seed=0, epoch=0)] == [70]
    assert [len(b) for b in eval_batches(np.arange(72), 64)] == [64, 8]
    assert [len(b) for b in eval_batches(np.arange(71), 64)] == [71]


def test_epoch_batches_reshuffle_each_epoch_and_respect_the_step_cap() -> None:
    train = np.arange(10)
    b0 = epoch_batches(train, 4, seed=1, epoch=0)
    assert [len(b) for b in b0] == [4, 6]  # the last 2 are merged: under min(MIN_BATCH, batch_size)
    assert sorted(np.concatenate(b0).tolist()) == list(range(10))
    assert all(
        np.array_equal(a, b) for a, b in zip(b0, epoch_batches(train, 4, seed=1, epoch=0), strict=True)
    )
    assert not np.array_equal(np.concatenate(b0), np.concatenate(epoch_batches(train, 4, seed=1, epoch=1)))
    assert len(epoch_batches(train, 4, seed=1, epoch=0, max_steps=2)) == 2
    assert [b.tolist() for b in eval_batches(np.arange(5), 2)] == [[0, 1], [2, 3, 4]]
    with pytest.raises(ValueError):
        epoch_batches(train, 0, seed=1, epoch=0)
