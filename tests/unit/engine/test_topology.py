"""Topology (secure_split.topology, torch-free; its tests use the engine harness): order, ownership, neighbours and task names derived from a deployment."""

from __future__ import annotations

from pathlib import Path

import pytest

from secure_split.engine import zoo
from secure_split.topology import Topology

from .harness import deployment_yaml, write_deployment


def _u_shaped(tmp_path: Path) -> Topology:
    text = deployment_yaml(
        ["owner", "server"],
        {
            # Listed out of order on purpose: the order must come from the edges.
            "tail": {"peer": "owner", "model": zoo.DIGITS_U_TAIL, "loss": "cross_entropy"},
            "middle": {"peer": "server", "model": zoo.DIGITS_U_MIDDLE},
            "head": {"peer": "owner", "model": zoo.DIGITS_U_HEAD, "input": "features"},
        },
        [{"from": "head", "to": "middle"}, {"from": "middle", "to": "tail"}],
        coordinator="owner",
    )
    return Topology.from_deployment(write_deployment(tmp_path, text))


def test_u_shaped_topology_views(tmp_path: Path) -> None:
    topo = _u_shaped(tmp_path)
    assert topo.order == ("head", "middle", "tail")
    assert topo.local_segments("owner") == ("head", "tail")
    assert topo.local_segments("server") == ("middle",)
    assert topo.in_edges["middle"] == ("head->middle",) and topo.out_edges["middle"] == ("middle->tail",)
    assert topo.neighbours("owner") == {"server"} and topo.neighbours("server") == {"owner"}
    assert topo.edge_peers("head->middle") == ("owner", "server")
    assert topo.edge_peers("middle->tail") == ("server", "owner")
    assert topo.is_remote("middle->tail")
    assert topo.tasks == {"labels": "tail"} and topo.task_of("tail") == "labels"
    assert topo.input_segments == ("head",) and topo.output_segments == ("tail",)
    assert topo.peers == ("owner", "server")
    with pytest.raises(KeyError):
        topo.edge_peers("head->nowhere")
    with pytest.raises(KeyError):
        topo.task_of("middle")


def test_merge_order_is_the_edge_order_and_shared_label_columns_use_segment_names(tmp_path: Path) -> None:
    text = deployment_yaml(
        ["a", "b", "lab"],
        {
            "ba": {"peer": "a", "model": zoo.BREAST_CANCER_HALF_BOTTOM, "input": "features"},
            "bb": {"peer": "b", "model": zoo.BREAST_CANCER_HALF_BOTTOM, "input": "features"},
            "top": {
                "peer": "lab",
                "model": zoo.BREAST_CANCER_VERTICAL_TOP,
                "loss": "cross_entropy",
                "merge": "concat",
            },
            "aux": {"peer": "a", "model": [{"linear": {"in": 16, "out": 2}}], "loss": "cross_entropy"},
        },
        [{"from": "bb", "to": "top"}, {"from": "ba", "to": "top"}, {"from": "ba", "to": "aux"}],
    )
    topo = Topology.from_deployment(write_deployment(tmp_path, text))
    assert topo.in_edges["top"] == ("bb->top", "ba->top")
    assert topo.order == ("ba", "bb", "top", "aux")
    assert topo.tasks == {"top": "top", "aux": "aux"}  # both use column "labels"
    assert not topo.is_remote("ba->aux")
    assert topo.neighbours("a") == {"lab"} and topo.neighbours("lab") == {"a", "b"}


def test_overlap_peers_are_those_whose_inputs_can_come_early(tmp_path: Path) -> None:
    assert _u_shaped(tmp_path).overlap_peers() == frozenset()  # the owner holds the loss
    chain = deployment_yaml(
        ["owner", "hop1", "hop2", "lab", "lab2"],
        {
            "bottom": {"peer": "owner", "model": zoo.DIGITS_CNN_BOTTOM, "input": "features"},
            "h1": {"peer": "hop1", "model": zoo.DIGITS_HOP},
            "h2": {"peer": "hop2", "model": zoo.DIGITS_HOP},
            "top": {"peer": "lab", "model": zoo.DIGITS_CNN_TOP, "loss": "cross_entropy"},
            "ge5": {"peer": "lab2", "model": zoo.DIGITS_GE5_HEAD, "loss": "cross_entropy", "labels": "ge5"},
        },
        [{"from": "bottom", "to": "h1"}, {"from": "h1", "to": "h2"}, {"from": "h2", "to": "top"},
         {"from": "bottom", "to": "ge5"}],
        coordinator="lab",
    )
    topo = Topology.from_deployment(write_deployment(tmp_path, chain, "chain.yaml"))
    assert topo.overlap_peers() == frozenset({"owner", "hop1", "hop2"})
