"""Loading policies: safe YAML, strict schema, contradictions, every problem at once with a line."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from policy_fixtures import POLICIES, SHIPPED

from secure_split.canonical import digest_of
from secure_split.errors import ConfigError, ExitCode
from secure_split.policy import Flow, load_policy, policy_from_mapping

FP_A = "sha256:" + "a" * 32
FP_B = "sha256:" + "b" * 32


def base() -> dict[str, Any]:
    return {
        "language": 1,
        "name": "hospitals-v1",
        "version": 1,
        "parties": {
            "hospital_a": {"fingerprint": FP_A, "assets": {"features": True, "weights": ["a_bottom"]}},
            "bank": {"fingerprint": FP_B, "assets": {"labels": True, "weights": ["top"]}},
        },
        "allow": [
            {
                "id": "fwd",
                "from": "hospital_a",
                "to": "bank",
                "kinds": "activation",
                "edges": "a_bottom->top",
            },
        ],
    }


def problems_of(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        policy_from_mapping(data)
    return [f"{p.key}: {p.message}" for p in info.value.problems]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "policy.yaml"
    p.write_text(text, encoding="utf-8")
    return p


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_policy_loads_and_hash_is_digest_of_parsed_mapping(name: str) -> None:
    policy = load_policy(POLICIES / f"{name}.yaml")
    parsed = yaml.safe_load((POLICIES / f"{name}.yaml").read_text())

    def iso(obj: Any) -> Any:
        if hasattr(obj, "isoformat"):
            return obj.isoformat()
        if isinstance(obj, dict):
            return {k: iso(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [iso(v) for v in obj]
        return obj

    assert policy.hash == digest_of(iso(parsed))
    assert policy.path == (POLICIES / f"{name}.yaml").resolve()
    assert policy.parties


def test_hash_ignores_comments_and_layout_but_not_content(tmp_path: Path) -> None:
    a = write(tmp_path, yaml.safe_dump(base()))
    h1 = load_policy(a).hash
    a.write_text("# a comment\n" + yaml.safe_dump(base(), default_flow_style=True), encoding="utf-8")
    assert load_policy(a).hash == h1
    changed = base()
    changed["version"] = 2
    a.write_text(yaml.safe_dump(changed), encoding="utf-8")
    assert load_policy(a).hash != h1


def test_all_problems_are_reported_at_once_with_lines(tmp_path: Path) -> None:
    text = """\
language: 1
name: hospitals-v1
version: one
colour: blue
parties:
  hospital_a:
    fingerprint: sha256:nothex
allow:
  - id: fwd
    from: hospital_a
    to: nobody
    kinds: activation
"""
    with pytest.raises(ConfigError) as info:
        load_policy(write(tmp_path, text))
    probs = info.value.problems
    assert info.value.exit_code == ExitCode.BAD_CONFIG
    messages = {p.key: (p.line, p.message) for p in probs}
    assert messages["version"][0] == 3
    assert messages["colour"] == (4, "unknown key; remove it or check its spelling")
    # pydantic errors come first; cross-checks run only on a schema-valid document
    assert len(probs) >= 2


def test_cross_check_problems_are_all_reported_with_lines(tmp_path: Path) -> None:
    text = """\
name: hospitals-v1
version: 1
parties:
  hospital_a:
    fingerprint: sha256:nothex
allow:
  - id: fwd
    from: hospital_a
    to: nobody
    kinds: activatoin
    edges: top
"""
    with pytest.raises(ConfigError) as info:
        load_policy(write(tmp_path, text))
    by_key = {p.key: p for p in info.value.problems}
    assert by_key["parties.hospital_a.fingerprint"].line == 5
    assert "nobody" in by_key["allow.0.to"].message and by_key["allow.0.to"].line == 9
    assert "activatoin" in by_key["allow.0.kinds"].message and by_key["allow.0.kinds"].line == 10
    assert by_key["allow.0.edges"].line == 11
    assert str(tmp_path / "policy.yaml") in str(info.value)


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda d: d["allow"].append(dict(d["allow"][0])), "used twice"),
        (lambda d: d["parties"]["bank"].update(fingerprint=FP_A), "same fingerprint"),
        (lambda d: d["allow"][0].update({"to": "hospital_a"}), "sending to itself"),
        (
            lambda d: d.update(valid={"not_before": "2026-01-01", "not_after": "2025-01-01"}),
            "before not_after",
        ),
        (
            lambda d: d["allow"].append(
                {"id": "c", "from": "bank", "to": "hospital_a", "kinds": "control", "dtype": "float32"}
            ),
            "no tensor",
        ),
        (
            lambda d: d.update(
                require={"ckks": {"min_poly_modulus_degree": 8192, "coeff_mod_bit_sizes": [60, 60, 60, 60]}}
            ),
            "128-bit",
        ),
        (
            lambda d: d.update(require={"ckks": {"coeff_mod_bit_sizes": [60, 49], "scale_bits": 40}}),
            "require.ckks.coeff_mod_bit_sizes: the data primes [60] give 60 bits",
        ),
        (lambda d: d.update(require={"ckks": {"scale_bits": 60}}), "require.ckks.scale_bits: 60 must be below"),
        (lambda d: d["allow"][0].update(id="default-deny"), "reserved"),
        (lambda d: d["allow"][0].update(id="asset:x"), "reserved"),
        (lambda d: d["allow"][0].update(dtype="float128"), "wire dtype"),
        (lambda d: d["allow"][0].update(shape=[0, 4]), "positive integers"),
        (lambda d: d["allow"][0].update(kinds=[]), "empty list"),
        (lambda d: d["allow"][0].update(edges="a->a"), "itself"),
        (lambda d: d.update(valid={"not_after": datetime(2030, 1, 1)}), "timezone"),
        (lambda d: d.update(require={"edges": {"nonsense": {}}}), "edge id"),
        (lambda d: d.update(require={"edges": {"*": {"label_defence": "prayer"}}}), "not one of"),
        (lambda d: d["parties"]["bank"].update(aggregates=["top"]), "owned by this party"),
        (lambda d: d.update(parties={}), "at least 1"),
        (lambda d: d.update(version=True), "valid integer"),
        (lambda d: d["allow"][0].update(max_bytes="10"), "valid integer"),
        (lambda d: d["allow"][0].update(compression="yes"), "valid boolean"),
        (lambda d: d["allow"][0].update(max_distance_correlation=1.5), "less than or equal"),
    ],
)
def test_invalid_policies_are_config_errors(mutate: Any, fragment: str) -> None:
    data = copy.deepcopy(base())
    mutate(data)
    problems = problems_of(data)
    assert any(fragment in p for p in problems), problems


def test_unreadable_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_policy(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_policy(write(tmp_path, "name: [unclosed\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_policy(write(tmp_path, "- a\n- b\n"))


def test_python_tags_are_refused_by_the_safe_loader(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_policy(write(tmp_path, "name: !!python/object/apply:os.system ['true']\nversion: 1\n"))


def test_dates_mean_whole_days_in_utc() -> None:
    data = base()
    data["valid"] = {"not_before": "2026-01-01", "not_after": "2026-12-31"}
    p = policy_from_mapping(data)
    assert p.not_before == datetime(2026, 1, 1, tzinfo=UTC)
    assert p.is_valid_at(datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC))
    assert not p.is_valid_at(datetime(2027, 1, 1, tzinfo=UTC))
    assert not p.is_valid_at(datetime(2025, 12, 31, 23, 59, tzinfo=UTC))


def test_yaml_timestamps_with_timezone_load_and_hash(tmp_path: Path) -> None:
    data = yaml.safe_dump(base()) + "valid:\n  not_after: 2030-06-01T12:00:00+02:00\n"
    p = load_policy(write(tmp_path, data))
    assert p.not_after == datetime(2030, 6, 1, 10, 0, tzinfo=UTC)
    assert len(p.hash) == 64


def test_asset_names_as_kinds_load_but_match_no_message() -> None:
    data = base()
    data["allow"].append({"id": "leak", "from": "bank", "to": "hospital_a", "kinds": ["labels"]})
    p = policy_from_mapping(data)
    rule = p.rule("leak")
    assert rule is not None and rule.kind_names == ("labels",) and rule.kinds == frozenset()
    d = p.decide(Flow("bank", "hospital_a", "labels", None, "send", 10))
    assert not d.allowed and d.rule_id == "unknown-kind"


def test_kind_groups_expand() -> None:
    data = base()
    data["allow"].append(
        {"id": "ctl", "from": "bank", "to": "hospital_a", "kinds": ["control", "audit_receipt"]}
    )
    rule = policy_from_mapping(data).rule("ctl")
    assert rule is not None
    assert {"hello", "step_begin", "shutdown", "audit_receipt"} <= rule.kinds
    assert "activation" not in rule.kinds


def test_yaml_aliases_are_refused(tmp_path: Path) -> None:
    text = "a: &x [1, 2]\nname: p\nversion: 1\nb: *x\n"
    with pytest.raises(ConfigError, match="anchors and aliases") as info:
        load_policy(write(tmp_path, text))
    assert info.value.problems[0].line == 1


def test_the_ckks_section_gives_the_parameters_every_context_uses() -> None:
    # the key holder creates its context with exactly these, and every party refuses others
    shipped = load_policy(POLICIES / "two_hospitals.yaml").requirements.ckks.params()
    assert (shipped.poly_modulus_degree, shipped.coeff_mod_bit_sizes, shipped.global_scale_bits) == (
        4096,
        (60, 29, 20),
        40,
    )
    absent = policy_from_mapping(base()).requirements.ckks.params()
    assert absent == shipped  # no section: the same default set
    doc = base()
    doc["require"] = {"ckks": {"scale_bits": 40}}
    assert policy_from_mapping(doc).requirements.ckks.params() == shipped  # a section naming no N or primes
    doc = base()
    doc["require"] = {"ckks": {"min_poly_modulus_degree": 8192, "scale_bits": 35}}
    larger = policy_from_mapping(doc).requirements.ckks.params()
    assert (larger.poly_modulus_degree, larger.coeff_mod_bit_sizes, larger.global_scale_bits) == (
        8192,
        (60, 40, 40, 60),
        35,
    )
