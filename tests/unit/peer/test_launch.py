"""A peer gets the schedule its deployment names, and refuses what it cannot do before opening
any socket or log."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from secure_split.errors import ConfigError
from secure_split.peer.context import PeerContext
from secure_split.peer.launch import training_node
from secure_split.peer.schedules.horizontal import HorizontalSchedule
from secure_split.peer.schedules.sync import SyncSchedule
from secure_split.testing import generate_deployment


@pytest.mark.parametrize("schedule", ["sequential", "splitfed"])
def test_each_deployment_schedule_gets_its_schedule_object(tmp_path: Path, schedule: str) -> None:
    gen = generate_deployment("vanilla", tmp_path / "sync")
    assert type(training_node(gen.peer_configs["owner"]).schedule) is SyncSchedule
    gen = generate_deployment(schedule, tmp_path / schedule, owners=2)
    node = training_node(gen.peer_configs["owner_1"])
    assert type(node.schedule) is HorizontalSchedule and node.accepts_restarted_peers
    assert not (tmp_path / schedule / "audit" / "owner_1.jsonl").exists()


def test_a_key_that_does_not_match_the_deployment_is_refused(tmp_path: Path) -> None:
    gen = generate_deployment("vanilla", tmp_path)
    cfg = yaml.safe_load(gen.peer_configs["owner"].read_text())
    cfg["secret_key"] = "../keys/label_holder.key"
    gen.peer_configs["owner"].write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="does not match the public keys of peer 'owner'"):
        PeerContext.load(gen.peer_configs["owner"])
