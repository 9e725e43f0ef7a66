"""The peer runtime refuses what it cannot do, before opening any socket or log."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from secure_split.errors import ConfigError
from secure_split.peer.runtime import PeerRuntime
from secure_split.testing import generate_deployment


@pytest.mark.parametrize("schedule", ["sequential", "splitfed"])
def test_horizontal_schedules_get_the_horizontal_runtime(tmp_path: Path, schedule: str) -> None:
    from secure_split.peer.horizontal import HorizontalRuntime
    from secure_split.peer.runtime import make_runtime

    gen = generate_deployment("vanilla", tmp_path / "sync")
    assert type(make_runtime(gen.peer_configs["owner"])) is PeerRuntime
    gen = generate_deployment(schedule, tmp_path / schedule, owners=2)
    assert isinstance(make_runtime(gen.peer_configs["owner_1"]), HorizontalRuntime)
    assert not (tmp_path / schedule / "audit" / "owner_1.jsonl").exists()


def test_a_key_that_does_not_match_the_deployment_is_refused(tmp_path: Path) -> None:
    gen = generate_deployment("vanilla", tmp_path)
    cfg = yaml.safe_load(gen.peer_configs["owner"].read_text())
    cfg["secret_key"] = "../keys/label_holder.key"
    gen.peer_configs["owner"].write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="does not match the public keys of peer 'owner'"):
        PeerRuntime(gen.peer_configs["owner"])
