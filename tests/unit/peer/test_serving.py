"""Split inference pieces: who asks and who serves in each topology (`inference_routes`), what is
refused before any socket opens, the route check at the gate, and the predictions file."""

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
from secure_split.inference_routes import RequestRoutes, request_routes, requesters
from secure_split.peer.launch import predict_node, serve_node
from secure_split.peer.serving import write_predictions
from secure_split.policy import he_key_holder
from secure_split.testing import generate_deployment


def _routes(tmp_path: Path, scenario: str, requester: str, **options: Any) -> RequestRoutes:
    dep = load_deployment(generate_deployment(scenario, tmp_path, **options).deployment)
    return request_routes(dep, requester, {s: he_key_holder(dep, s) for s, seg in dep.spec.segments.items() if seg.he})


def test_vanilla_owner_gets_its_prediction_from_the_label_holder_without_psi(tmp_path: Path) -> None:
    r = _routes(tmp_path, "vanilla", "owner")
    assert r.servers == ("label_holder",) and r.outputs == ("top",) and r.psi_parties == ()
    assert r.output_peer("top") == "label_holder" and r.prediction_edge("top") == "bottom->top"


def test_vanilla_label_holder_asks_for_ids_the_owner_serves_rows_for_after_psi(tmp_path: Path) -> None:
    r = _routes(tmp_path, "vanilla", "label_holder")
    assert r.servers == ("owner",) and r.row_holders == ("owner",) and r.psi_parties == ("label_holder", "owner")
    kinds = {(f.sender, f.receiver, f.kind) for f in r.flows()}
    assert ("label_holder", "owner", "step_begin") in kinds and not any(k == "prediction" for *_, k in kinds)


def test_u_shaped_owner_predicts_with_its_own_tail_and_only_it_asks(tmp_path: Path) -> None:
    r = _routes(tmp_path, "u-shaped", "owner")
    assert r.servers == ("server",) and r.local_outputs("owner") == ("tail",)
    with pytest.raises(ConfigError, match="neither a segment that reads features nor an output"):
        _routes(tmp_path / "s", "u-shaped", "server")


def test_multi_task_owner_gets_every_head_and_a_head_s_holder_its_own(tmp_path: Path) -> None:
    r = _routes(tmp_path, "multi-task", "owner")
    assert r.servers == ("digit_lab", "ge5_lab") and r.outputs == ("head_digit", "head_ge5")
    assert {o: r.prediction_edge(o) for o in r.outputs} == {"head_digit": "trunk->head_digit",
                                                           "head_ge5": "trunk->head_ge5"}
    lab = _routes(tmp_path / "l", "multi-task", "ge5_lab")
    assert lab.peers == ("ge5_lab", "owner") and lab.outputs == ("head_ge5",)  # digit_lab takes no part


def test_a_chain_runs_through_every_hop_and_the_prediction_comes_back_on_no_edge(tmp_path: Path) -> None:
    r = _routes(tmp_path, "multi-hop", "owner", hops=2)
    assert r.servers == ("hop1", "hop2", "label_holder") and r.psi_parties == ()
    assert r.prediction_edge("top") is None
    assert r.links("hop2") == ("hop1", "label_holder", "owner")  # its signed heads go to each of them
    with pytest.raises(ConfigError, match="'hop1' owns neither"):
        _routes(tmp_path / "h", "multi-hop", "hop1", hops=2)


def test_vertical_requests_align_ids_among_the_parties_that_read_rows(tmp_path: Path) -> None:
    lab = _routes(tmp_path, "vertical", "lab")
    assert lab.row_holders == ("hospital_a", "hospital_b") and lab.psi_parties == ("lab", "hospital_a", "hospital_b")
    hospital = _routes(tmp_path / "a", "vertical", "hospital_a")
    assert hospital.psi_parties == ("hospital_a", "hospital_b")  # the lab reads no rows: it sees positions only
    assert hospital.prediction_edge("top") == "bottom_a->top"
    he = _routes(tmp_path / "he", "vertical-he", "lab")
    assert dict(he.he_merges) == {"top": "hospital_a"}
    assert ("hospital_a", "lab", "he_context") in {(f.sender, f.receiver, f.kind) for f in he.flows()}


def test_horizontal_owners_ask_for_their_own_rows_and_nobody_else_does(tmp_path: Path) -> None:
    dep = load_deployment(generate_deployment("splitfed", tmp_path, owners=2, labels="owners").deployment)
    routes = requesters(dep, {})
    assert sorted(routes) == ["owner_1", "owner_2"]
    assert routes["owner_2"].peers == ("owner_2", "server") and routes["owner_2"].outputs == ("tail_2",)


def test_a_peer_with_nothing_to_serve_or_ask_is_refused_before_it_opens_anything(tmp_path: Path) -> None:
    gen = generate_deployment("u-shaped", tmp_path)
    with pytest.raises(ConfigError, match="takes part in no party's prediction request"):
        serve_node(gen.peer_configs["owner"])
    with pytest.raises(ConfigError, match="'server' owns neither"):
        predict_node(gen.peer_configs["server"], tmp_path / "data" / "owner.safetensors")
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
