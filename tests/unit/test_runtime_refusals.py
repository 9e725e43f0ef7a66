"""The peer runtime refuses what it cannot do, before opening any socket or log."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from secure_split.errors import ConfigError
from secure_split.peer.runtime import PeerRuntime
from secure_split.testing import generate_deployment


@pytest.mark.parametrize("schedule", ["sequential", "splitfed"])
def test_horizontal_schedules_are_refused_until_built(tmp_path: Path, schedule: str) -> None:
    gen = generate_deployment("vanilla", tmp_path)
    dep = yaml.safe_load(gen.deployment.read_text())
    dep["training"]["schedule"] = schedule
    gen.deployment.write_text(yaml.safe_dump(dep))
    with pytest.raises(ConfigError, match="not implemented yet"):
        PeerRuntime(gen.peer_configs["owner"])
    assert not (tmp_path / "audit" / "owner.jsonl").exists()


def test_a_key_that_does_not_match_the_deployment_is_refused(tmp_path: Path) -> None:
    gen = generate_deployment("vanilla", tmp_path)
    cfg = yaml.safe_load(gen.peer_configs["owner"].read_text())
    cfg["secret_key"] = "../keys/label_holder.key"
    gen.peer_configs["owner"].write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="does not match the public keys of peer 'owner'"):
        PeerRuntime(gen.peer_configs["owner"])
