"""Deployment and peer config: valid files load, bad ones report every problem with file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from secure_split.config import load_deployment, load_peer_config, peer_fingerprint
from secure_split.errors import ConfigError, ExitCode

KEY_A = "a" * 64
KEY_B = "b" * 64
TK = "x" * 40
TK2 = "y" * 40

GOOD = f"""
version: 1
name: t
coordinator: lh
policy: policy.yaml
peers:
  owner: {{endpoint: "tcp://127.0.0.1:5601", sign_key: "{KEY_A}", transport_key: "{TK}"}}
  lh: {{endpoint: "tcp://127.0.0.1:5602", sign_key: "{KEY_B}", transport_key: "{TK2}"}}
segments:
  bottom: {{peer: owner, input: features, model: [{{linear: {{in: 4, out: 3}}}}]}}
  top: {{peer: lh, loss: cross_entropy, model: [{{linear: {{in: 3, out: 2}}}}]}}
edges:
  - {{from: bottom, to: top}}
"""


def write(tmp_path: Path, text: str, name: str = "deployment.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_valid_deployment_loads_with_stable_hash(tmp_path: Path) -> None:
    a = load_deployment(write(tmp_path, GOOD))
    b = load_deployment(write(tmp_path, "# a comment changes nothing\n" + GOOD, "other.yaml"))
    assert a.hash == b.hash
    assert len(a.hash) == 64
    assert [e.name for e in a.spec.edges] == ["bottom->top"]
    assert a.segments_of("owner") == ["bottom"]


def test_changed_deployment_changes_hash(tmp_path: Path) -> None:
    a = load_deployment(write(tmp_path, GOOD))
    b = load_deployment(write(tmp_path, GOOD.replace("out: 3", "out: 5").replace("in: 3", "in: 5"), "b.yaml"))
    assert a.hash != b.hash


def test_all_problems_reported_at_once_with_lines(tmp_path: Path) -> None:
    bad = GOOD.replace("coordinator: lh", "coordinator: nobody").replace("peer: lh,", "peer: ghost,").replace(
        "- {from: bottom, to: top}", "- {from: bottom, to: nowhere, colour: red}"
    )
    with pytest.raises(ConfigError) as info:
        load_deployment(write(tmp_path, bad))
    text = str(info.value)
    assert info.value.exit_code == ExitCode.BAD_CONFIG
    # unknown key is caught by the schema before the cross checks run
    assert "colour" in text and "unknown key" in text
    assert all(p.line is not None for p in info.value.problems)


def test_cross_reference_problems_are_all_listed(tmp_path: Path) -> None:
    bad = GOOD.replace("coordinator: lh", "coordinator: nobody").replace("peer: lh,", "peer: ghost,").replace(
        "to: top", "to: nowhere"
    )
    with pytest.raises(ConfigError) as info:
        load_deployment(write(tmp_path, bad))
    keys = {p.key for p in info.value.problems}
    assert {"coordinator", "segments.top.peer", "edges.0.to"} <= keys
    assert len(info.value.problems) >= 3


def test_cycle_is_refused(tmp_path: Path) -> None:
    bad = GOOD.replace("input: features, ", "") + "  - {from: top, to: bottom}\n"
    with pytest.raises(ConfigError, match="cycle"):
        load_deployment(write(tmp_path, bad))


def test_not_yaml_reports_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_deployment(write(tmp_path, "peers: [unclosed\n  x: y"))
    assert "not valid YAML" in str(info.value)


def test_yaml_tags_cannot_build_objects(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_deployment(write(tmp_path, "!!python/object/apply:os.system ['true']\n"))


def test_peer_config_resolves_relative_paths_and_names_missing_files(tmp_path: Path) -> None:
    write(tmp_path, GOOD)
    (tmp_path / "peers").mkdir()
    cfg = write(tmp_path / "peers", "peer: owner\ndeployment: ../deployment.yaml\nsecret_key: ../keys/owner.key\n", "owner.yaml")
    with pytest.raises(ConfigError) as info:
        load_peer_config(cfg)
    assert "secret_key" in str(info.value) and "keys new" in str(info.value)
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "owner.key").write_text("{}")
    loaded = load_peer_config(cfg)
    assert loaded.deployment_path == (tmp_path / "deployment.yaml").resolve()
    assert loaded.audit_dir == (tmp_path / "peers" / "audit").resolve()


def test_fingerprint_depends_on_both_keys() -> None:
    assert peer_fingerprint(KEY_A, TK) != peer_fingerprint(KEY_B, TK)
    assert peer_fingerprint(KEY_A, TK).startswith("sha256:")


HE_GOOD = GOOD.replace(
    "  top: {peer: lh,", "  top2: {peer: owner, input: features, model: [{linear: {in: 4, out: 3}}]}\n  top: {peer: lh,"
).replace("  top: {peer: lh,", "  top: {peer: lh, merge: sum, he: true,") + "  - {from: top2, to: top}\n"


def test_overlap_is_refused_where_it_does_not_apply(tmp_path: Path) -> None:
    assert load_deployment(write(tmp_path, GOOD + "training: {overlap: true}\n")).spec.training.overlap
    # with an HE merge: the owners pipeline, the merge holder sends later steps' sums out early
    assert load_deployment(write(tmp_path, HE_GOOD + "training: {overlap: true}\n", "he.yaml")).spec.training.depth == 2
    with pytest.raises(ConfigError, match="overlap is for schedule: sync"):
        load_deployment(write(tmp_path, GOOD + "training: {overlap: true, schedule: splitfed}\n", "sf.yaml"))


def test_pipeline_depth_is_overlap_generalised(tmp_path: Path) -> None:
    assert load_deployment(write(tmp_path, GOOD)).spec.training.depth == 1
    assert load_deployment(write(tmp_path, GOOD + "training: {pipeline_depth: 3}\n", "k3.yaml")).spec.training.depth == 3
    assert load_deployment(write(tmp_path, GOOD + "training: {pipeline_depth: 2, overlap: true}\n", "k2.yaml")
                           ).spec.training.depth == 2
    with pytest.raises(ConfigError, match="overlap: true is pipeline_depth: 2; remove overlap"):
        load_deployment(write(tmp_path, GOOD + "training: {pipeline_depth: 3, overlap: true}\n", "both.yaml"))
    with pytest.raises(ConfigError, match="pipeline_depth is for schedule: sync"):
        load_deployment(write(tmp_path, GOOD + "training: {pipeline_depth: 3, schedule: sequential}\n", "seq.yaml"))
    with pytest.raises(ConfigError) as info:
        load_deployment(write(tmp_path, GOOD + "training: {pipeline_depth: 0}\n", "zero.yaml"))
    assert [p.key for p in info.value.problems] == ["training.pipeline_depth"]


def test_a_pipeline_depth_the_bounds_cannot_carry_is_refused_naming_the_setting_to_raise(tmp_path: Path) -> None:
    # k steps in flight: activations up to k - 1 steps ahead of the receiver (limits.step_window),
    # up to k steps of messages from one peer waiting at another (limits.max_queued_messages),
    # k HE merge rounds open at once (limits.max_pending_he_rounds).
    with pytest.raises(ConfigError) as info:
        load_deployment(write(tmp_path, GOOD + "training: {pipeline_depth: 4}\n"))
    (problem,) = info.value.problems
    assert problem.key == "training.pipeline_depth"
    assert "raise limits.step_window to 3" in problem.message
    assert load_deployment(write(tmp_path, GOOD + "training: {pipeline_depth: 4}\nlimits: {step_window: 3}\n", "w.yaml"))
    with pytest.raises(ConfigError, match=r"raise limits.max_queued_messages to 8\b"):
        load_deployment(write(tmp_path, GOOD + "training: {pipeline_depth: 4}\n"
                              "limits: {step_window: 3, max_queued_messages: 7}\n", "q.yaml"))
    with pytest.raises(ConfigError) as info:
        load_deployment(write(tmp_path, HE_GOOD + "training: {pipeline_depth: 3}\n", "he3.yaml"))
    assert ["raise limits.max_pending_he_rounds to 3" in p.message for p in info.value.problems] == [True]
    assert load_deployment(write(tmp_path, HE_GOOD + "training: {pipeline_depth: 3}\n"
                                 "limits: {max_pending_he_rounds: 3}\n", "he3ok.yaml")).spec.training.depth == 3


def test_micro_batches_is_no_longer_a_setting(tmp_path: Path) -> None:
    # the field did nothing; pipelining is `training.pipeline_depth`
    with pytest.raises(ConfigError) as info:
        load_deployment(write(tmp_path, GOOD + "training: {micro_batches: 1}\n"))
    assert [p.key for p in info.value.problems] == ["training.micro_batches"]
