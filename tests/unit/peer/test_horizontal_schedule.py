"""What a horizontal peer announces before any socket opens: U-shaped owners give the server a
row count, never ids; vanilla owners give nothing (the label holder aligns ids by PSI)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from secure_split.engine.data import load_peer_data
from secure_split.peer.context import PeerContext
from secure_split.peer.schedules.horizontal import HorizontalSchedule
from secure_split.testing import generate_deployment


def _schedule(config: Path) -> HorizontalSchedule:
    return HorizontalSchedule(PeerContext.load(config))


def test_u_shaped_owners_announce_a_row_count_and_the_server_holds_no_data(tmp_path: Path) -> None:
    gen = generate_deployment("splitfed", tmp_path, owners=2, labels="owners")
    owner = _schedule(gen.peer_configs["owner_1"])
    server = _schedule(gen.peer_configs["server"])
    assert owner.ordinal and server.ordinal
    data = load_peer_data(tmp_path / "data" / "owner_1.safetensors")
    assert owner.hello_meta()["rows"] == len(data)
    assert server.data is None and "rows" not in server.hello_meta()
    # Steps name row positions; only the owner maps them to its ids.
    owner._align_ids()
    assert owner.positions is not None
    assert np.array_equal(owner.positions, np.sort(data.ids.numpy()))
    assert not np.array_equal(owner.positions, np.arange(len(data))), "ids are not positions here"


def test_vanilla_owners_announce_nothing_but_their_hello(tmp_path: Path) -> None:
    gen = generate_deployment("splitfed", tmp_path, owners=2)
    owner = _schedule(gen.peer_configs["owner_1"])
    assert not owner.ordinal
    assert "rows" not in owner.hello_meta()
    assert owner.owners == ["owner_1", "owner_2"] and owner.coordinator == "label_holder"
