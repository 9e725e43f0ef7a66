"""`deployment hash` / `deployment diff` and the section digests peers use to name what differs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from secure_split.cli.main import app
from secure_split.config import load_deployment
from secure_split.deployment_diff import (
    MAX_SECTIONS,
    deployment_section_digests,
    diff_deployments,
    explain_deployment_mismatch,
    valid_section_digests,
)
from tests.unit.ops.ops_fixtures import identities, vertical, write_yaml

runner = CliRunner()


@pytest.fixture(scope="module")
def ids():
    return identities()


def _pair(tmp_path: Path, ids, change) -> tuple[Path, Path]:
    a = vertical(ids)
    b = copy.deepcopy(a)
    change(b)
    (tmp_path / "a").mkdir(exist_ok=True)
    (tmp_path / "b").mkdir(exist_ok=True)
    return write_yaml(tmp_path / "a" / "deployment.yaml", a), write_yaml(tmp_path / "b" / "deployment.yaml", b)


def _other_key(b):
    b["peers"]["hospital_b"]["transport_key"] = identities("mallory")["mallory"].transport_public_z85


def test_section_digests_change_only_where_the_files_differ(tmp_path, ids):
    a_path, b_path = _pair(tmp_path, ids, _other_key)
    a, b = deployment_section_digests(load_deployment(a_path)), deployment_section_digests(load_deployment(b_path))
    assert {"version", "name", "peers", "segments", "edges", "training", "peers.lab", "segments.top"} <= set(a)
    assert all(len(v) == 16 for v in a.values())
    assert sorted(k for k in a if a[k] != b[k]) == ["peers", "peers.hospital_b"]


def test_the_mismatch_error_names_the_peer_and_the_sections_that_differ(tmp_path, ids):
    def change(b):
        _other_key(b)
        b["training"]["batch_size"] = 16

    a_path, b_path = _pair(tmp_path, ids, change)
    ours, theirs = load_deployment(a_path), load_deployment(b_path)
    text = explain_deployment_mismatch(ours, deployment_section_digests(theirs), "hospital_b", their_hash=theirs.hash)
    assert "peer 'hospital_b'" in text
    assert "the sections that differ are peers.hospital_b, training" in text
    assert "secure-split deployment hash deployment.yaml" in text
    assert theirs.hash in text and ours.hash in text and "both parties must load the same deployment.yaml" in text


@pytest.mark.parametrize("garbage", [None, "peers", {"peers": "zz"}, {"peers": 5}, {"a b": "0" * 16},
                                     {f"s{i}": "0" * 16 for i in range(MAX_SECTIONS + 1)}])
def test_a_malformed_section_table_from_a_peer_is_ignored_not_trusted(tmp_path, ids, garbage):
    a_path, _ = _pair(tmp_path, ids, _other_key)
    assert valid_section_digests(garbage) is None
    text = explain_deployment_mismatch(load_deployment(a_path), garbage, "hospital_b")
    assert "runs a different deployment.yaml" in text and "sections that differ" not in text


def test_diff_lists_each_differing_field_and_spots_files_that_only_differ_in_writing(tmp_path, ids):
    a_path, b_path = _pair(tmp_path, ids, _other_key)
    result = diff_deployments(load_deployment(a_path).raw, load_deployment(b_path).raw)
    assert [d.path for d in result.differences] == ["peers.hospital_b.transport_key"]
    assert result.same_meaning is False

    def spell_out_a_default(b):
        b["limits"] = {"heartbeat_s": 1.0}

    a_path, b_path = _pair(tmp_path, ids, spell_out_a_default)
    result = diff_deployments(load_deployment(a_path).raw, load_deployment(b_path).raw)
    assert [(d.path, d.change) for d in result.differences] == [("limits", "only_in_b")]
    assert result.same_meaning is True
    assert result.hash_a != result.hash_b


def test_cli_hash_prints_the_hash_peers_agree_on_and_the_section_digests(tmp_path, ids):
    a_path, _ = _pair(tmp_path, ids, _other_key)
    dep = load_deployment(a_path)
    out = runner.invoke(app, ["deployment", "hash", str(a_path)])
    assert out.exit_code == 0, out.output
    assert dep.hash in out.output
    assert "peers.hospital_b" in out.output
    as_json = runner.invoke(app, ["deployment", "hash", str(a_path), "--json"])
    assert json.loads(as_json.output) == {"deployment": "ops-test", "hash": dep.hash,
                                          "sections": deployment_section_digests(dep)}


def test_cli_diff_exit_codes_and_field_paths(tmp_path, ids):
    a_path, b_path = _pair(tmp_path, ids, _other_key)
    differ = runner.invoke(app, ["deployment", "diff", str(a_path), str(b_path)])
    assert differ.exit_code == 1
    assert "peers.hospital_b.transport_key" in differ.output
    same = runner.invoke(app, ["deployment", "diff", str(a_path), str(a_path)])
    assert same.exit_code == 0 and "same deployment" in same.output
    missing = runner.invoke(app, ["deployment", "diff", str(a_path), str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2
    broken = runner.invoke(app, ["deployment", "hash", str(tmp_path / "nope.yaml")])
    assert broken.exit_code == 2
