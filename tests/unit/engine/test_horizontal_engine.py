"""Horizontal schedules in the engine and the config: owners' copies, alternative in-edges,
weight vectors, and the relay that cannot open what it carries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from secure_split.crypto.seal import open_from, seal_to
from secure_split.engine.data import PeerData
from secure_split.engine.executor import PeerExecutor
from secure_split.errors import ConfigError, CryptoError, RemoteProtocolError
from secure_split.testing import fixed_identity
from tests.unit.engine.harness import deployment_yaml, write_deployment

BOTTOM = [{"linear": {"in": 6, "out": 4}}, {"relu": {}}]
TOP = [{"linear": {"in": 4, "out": 3}}]


def _spec(owners: int = 3, **training: Any) -> tuple[list[str], dict[str, Any], list[dict[str, str]]]:
    names = [f"owner_{k}" for k in range(1, owners + 1)]
    segments: dict[str, Any] = {f"bottom_{k}": {"peer": o, "input": "features", "model": BOTTOM}
                                for k, o in enumerate(names, 1)}
    segments["top"] = {"peer": "label_holder", "loss": "cross_entropy", "model": TOP}
    edges = [{"from": f"bottom_{k}", "to": "top"} for k in range(1, owners + 1)]
    return [*names, "label_holder"], segments, edges


def _deploy(tmp_path: Path, schedule: str = "splitfed", owners: int = 3, **changes: Any) -> Any:
    peers, segments, edges = _spec(owners)
    for key, value in changes.items():
        segments[key] = {**segments[key], **value}
    return write_deployment(tmp_path, deployment_yaml(peers, segments, edges, {"schedule": schedule, "seed": 3},
                                                      coordinator="label_holder"))


def _data(ids: list[int], labels: bool = False) -> PeerData:
    g = torch.Generator().manual_seed(sum(ids))
    t = torch.tensor(ids, dtype=torch.int64)
    if labels:
        return PeerData(ids=t, features=None, labels={"labels": torch.tensor([i % 3 for i in ids])})
    return PeerData(ids=t, features=torch.randn(len(ids), 6, generator=g), labels={})


def test_every_owner_starts_from_the_same_weights(tmp_path: Path) -> None:
    dep = _deploy(tmp_path)
    vectors = [PeerExecutor(dep, f"owner_{k}", _data([k * 10, k * 10 + 1])).weights_vector() for k in (1, 2, 3)]
    assert vectors[0].shape == (6 * 4 + 4,)
    assert all(np.array_equal(vectors[0], v) for v in vectors[1:])


def test_a_step_uses_only_the_edge_of_its_owner(tmp_path: Path) -> None:
    dep = _deploy(tmp_path)
    holder = PeerExecutor(dep, "label_holder", _data(list(range(40)), labels=True))
    owner2 = PeerExecutor(dep, "owner_2", _data([5, 6, 7, 8]))
    out = owner2.begin_step(1, "train", [5, 6, 7, 8])
    assert [o.edge for o in out] == ["bottom_2->top"]
    assert holder.begin_step(1, "train", [5, 6, 7, 8], peers=["owner_2"]) == []
    # Another owner's edge takes no part in this step: refused, nothing changed.
    with pytest.raises(RemoteProtocolError, match="takes no part"):
        holder.on_activation("bottom_1->top", out[0].tensor)
    grads = holder.on_activation("bottom_2->top", out[0].tensor)
    assert [(g.kind, g.edge, g.to_peer) for g in grads] == [("gradient", "bottom_2->top", "owner_2")]
    assert holder.step_complete()
    owner2.on_gradient("bottom_2->top", grads[0].tensor)
    assert owner2.step_complete()


def test_weights_vector_round_trip_and_refusals(tmp_path: Path) -> None:
    dep = _deploy(tmp_path)
    a = PeerExecutor(dep, "owner_1", _data([1, 2]))
    b = PeerExecutor(dep, "owner_2", _data([3, 4]))
    v = a.weights_vector() + 1.0
    b.load_weights_vector(v)
    assert np.array_equal(b.weights_vector(), v)
    with pytest.raises(RemoteProtocolError, match="weights"):
        b.load_weights_vector(v[:-1])
    bad = v.copy()
    bad[0] = np.nan
    with pytest.raises(RemoteProtocolError, match="NaN"):
        b.load_weights_vector(bad)
    assert np.array_equal(b.weights_vector(), v)


def test_owners_must_hold_the_same_model(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not the same models"):
        _deploy(tmp_path, bottom_2={"model": [{"linear": {"in": 6, "out": 5}}, {"relu": {}}]})


def test_alternative_in_edges_take_no_merge(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="alternatives"):
        _deploy(tmp_path, top={"merge": "mean"})
    # The sync schedule still needs a merge for several in-edges.
    with pytest.raises(ConfigError, match="set merge"):
        _deploy(tmp_path, schedule="sync")


def test_the_relay_cannot_open_the_sealed_weights_it_carries() -> None:
    owner1, owner2, coordinator = (fixed_identity(n) for n in ("owner_1", "owner_2", "label_holder"))
    weights = np.arange(16, dtype="<f4").tobytes()
    sealed = seal_to(owner2.transport_public_z85, owner1, weights)
    assert weights not in sealed
    with pytest.raises(CryptoError):
        open_from(coordinator, owner1.transport_public_z85, sealed)
    assert open_from(owner2, owner1.transport_public_z85, sealed) == weights
