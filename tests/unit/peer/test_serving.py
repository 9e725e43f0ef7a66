"""Split inference pieces: which peers a request involves, what is refused before any socket opens,
the route check at the gate, and the predictions file."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from secure_split.config import load_deployment
from secure_split.errors import ConfigError, PolicyDenied
from secure_split.peer.launch import predict_node, serve_node
from secure_split.peer.serving import inference_clients, inference_plan, write_predictions
from secure_split.testing import generate_deployment


def _plan(tmp_path: Path, scenario: str, owner: str = "owner", **options: Any) -> Any:
    gen = generate_deployment(scenario, tmp_path, **options)
    return inference_plan(load_deployment(gen.deployment), owner)


def test_vanilla_owner_gets_its_prediction_from_the_label_holder(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "vanilla")
    assert plan.servers == ("label_holder",) and plan.local_outputs == ()
    assert dict(plan.remote_outputs) == {"top": ("label_holder", "bottom->top")}


def test_u_shaped_owner_predicts_with_its_own_tail(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "u-shaped")
    assert plan.servers == ("server",) and plan.local_outputs == ("tail",) and not plan.remote_outputs


def test_multi_task_owner_gets_one_prediction_per_head(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "multi-task")
    assert plan.servers == ("digit_lab", "ge5_lab")
    assert dict(plan.remote_outputs) == {"head_digit": ("digit_lab", "trunk->head_digit"),
                                         "head_ge5": ("ge5_lab", "trunk->head_ge5")}


def test_multi_hop_and_vertical_are_refused_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as hop:
        _plan(tmp_path / "hop", "multi-hop", hops=2)
    assert "edge mid1->mid2 runs from hop1 to hop2" in str(hop.value)
    assert "output segment 'top' at label_holder is not fed directly by owner" in str(hop.value)
    with pytest.raises(ConfigError, match=r"segment 'top' merges \(concat\) inputs from \['hospital_b'\]"):
        _plan(tmp_path / "vertical", "vertical", owner="hospital_a")
    with pytest.raises(ConfigError, match="only a data owner can ask for predictions"):
        _plan(tmp_path / "lh", "vanilla", owner="label_holder")


def test_servers_serve_exactly_the_owners_that_feed_them(tmp_path: Path) -> None:
    vanilla = load_deployment(generate_deployment("vanilla", tmp_path / "v").deployment)
    assert inference_clients(vanilla, "label_holder") == ["owner"]
    chain = load_deployment(generate_deployment("multi-hop", tmp_path / "m").deployment)
    assert inference_clients(chain, "hop1") == []


def test_a_peer_with_nothing_to_serve_or_predict_is_refused_before_it_opens_anything(tmp_path: Path) -> None:
    gen = generate_deployment("multi-hop", tmp_path)
    with pytest.raises(ConfigError, match="takes part in no owner's prediction request"):
        serve_node(gen.peer_configs["hop1"])
    with pytest.raises(ConfigError, match="multi-hop chains are not served"):
        predict_node(gen.peer_configs["owner"], tmp_path / "data" / "owner.safetensors")
    assert not list((tmp_path / "audit").iterdir())


def test_untrained_peers_are_told_to_train_first(tmp_path: Path) -> None:
    gen = generate_deployment("vanilla", tmp_path)
    with pytest.raises(ConfigError, match=r"no checkpoint in .*train the deployment first"):
        predict_node(gen.peer_configs["owner"], tmp_path / "data" / "owner.safetensors")
    with pytest.raises(ConfigError, match="no checkpoint in"):
        serve_node(gen.peer_configs["label_holder"])


def test_the_gate_audits_a_denied_route_before_anything_is_sent(tmp_path: Path) -> None:
    from secure_split.peer.gate import Gate
    from secure_split.policy import load_policy, policy_from_mapping

    gen = generate_deployment("vanilla", tmp_path)
    dep = load_deployment(gen.deployment)
    strict = yaml.safe_load(gen.policy.read_text())
    strict["allow"] = [r for r in strict["allow"] if "prediction" not in r["kinds"]]
    records: list[tuple[str, dict[str, Any]]] = []
    sent: list[Any] = []

    class Audit:
        def record(self, event: str, **fields: Any) -> int:
            records.append((event, fields))
            return len(records)

    class Wire:
        def send(self, peer: str, frames: Any) -> int:
            sent.append(frames)
            return 0

        def recv(self, timeout_s: float) -> None:
            return None

    def gate(policy: Any) -> Gate:
        return Gate(me="owner", deployment_hash=dep.hash, policy=policy, audit=Audit(), transport=Wire(),
                    sessions={}, max_message_bytes=1 << 20)

    from secure_split.protocol import Kind

    assert gate(load_policy(gen.policy)).check_route("label_holder", "owner", Kind.PREDICTION, edge="bottom->top").allowed
    assert records == []
    with pytest.raises(PolicyDenied, match="prediction"):
        gate(policy_from_mapping(strict)).check_route("label_holder", "owner", Kind.PREDICTION, edge="bottom->top")
    ((event, fields),) = records
    assert event == "policy_denied" and fields["direction"] == "receive" and fields["kind"] == "prediction"
    assert fields["edge"] == "bottom->top" and fields["rule_id"] and sent == []


def test_predictions_are_written_as_csv_or_json_private_to_the_owner(tmp_path: Path) -> None:
    ids = np.array([7, 3, 11])
    one = {"top": np.array([1, 0, 9])}
    path = write_predictions(tmp_path / "out" / "p.csv", ids, one)
    with path.open() as fh:
        assert list(csv.reader(fh)) == [["id", "prediction"], ["7", "1"], ["3", "0"], ["11", "9"]]
    assert path.stat().st_mode & 0o777 == 0o600
    two = {"head_digit": np.array([1, 0, 9]), "head_ge5": np.array([0, 0, 1])}
    rows = json.loads(write_predictions(tmp_path / "p.json", ids, two).read_text())
    assert rows[2] == {"id": 11, "prediction_head_digit": 9, "prediction_head_ge5": 1}
    assert not list(tmp_path.glob("**/*.tmp"))
