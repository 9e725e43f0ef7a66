"""Every YAML file the package reads goes through one bounded loader: alias bombs and deep nesting
are refused with file, line and advice, before anything expands, in bounded memory.

The CLI side (exit 2 for each file kind, the verifier included) is pinned in
`tests/integration/test_hostile_files.py`.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from secure_split.config import load_deployment, load_peer_config
from secure_split.errors import ConfigError, ExitCode
from secure_split.policy import load_policy
from secure_split.yamlfile import MAX_ALIAS_NODES, MAX_DEPTH, dump_yaml, read_yaml

_A, _B, _TA, _TB = "a" * 64, "b" * 64, "x" * 40, "y" * 40
GOOD = f"""
version: 1
name: t
coordinator: lh
policy: policy.yaml
peers:
  owner: {{endpoint: "tcp://127.0.0.1:5601", sign_key: "{_A}", transport_key: "{_TA}"}}
  lh: {{endpoint: "tcp://127.0.0.1:5602", sign_key: "{_B}", transport_key: "{_TB}"}}
segments:
  bottom: {{peer: owner, input: features, model: [{{linear: {{in: 4, out: 3}}}}]}}
  top: {{peer: lh, loss: cross_entropy, model: [{{linear: {{in: 3, out: 2}}}}]}}
edges:
  - {{from: bottom, to: top}}
"""


def alias_bomb(levels: int = 9, fan: int = 9) -> str:
    """The "billion laughs": level i lists level i-1 `fan` times; 9**9 strings once expanded."""
    lines = ["l0: &l0 [" + ", ".join(["lol"] * fan) + "]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * fan) + "]")
    return "\n".join(lines) + "\n"


def deep_flow(depth: int = 5000) -> str:
    return "nested: " + "[" * depth + "]" * depth + "\n"


def deep_block(depth: int = 500) -> str:
    return "".join(" " * i + f"k{i}:\n" for i in range(depth)) + " " * depth + "end\n"


LOADERS: dict[str, Callable[[Path], Any]] = {
    "deployment": load_deployment,
    "peer config": load_peer_config,
    "policy": load_policy,
}


def _refused(load: Callable[[Path], Any], path: Path) -> tuple[ConfigError, int]:
    """Load `path`, expect a ConfigError; return it and the peak Python allocation meanwhile."""
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError) as info:
            load(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return info.value, peak


@pytest.mark.parametrize("what", sorted(LOADERS))
def test_an_alias_bomb_is_refused_with_its_line_before_it_expands(tmp_path: Path, what: str) -> None:
    path = tmp_path / "file.yaml"
    path.write_text(alias_bomb())
    error, peak = _refused(LOADERS[what], path)
    assert error.exit_code == ExitCode.BAD_CONFIG
    (problem,) = error.problems
    assert problem.file == str(path)
    assert problem.line is not None and 1 <= problem.line <= 9  # the policy refuses the first anchor
    assert "alias" in problem.message and ("write" in problem.message)
    # Expanded, the bomb is 387 million strings; refused, it never costs more than a few MB.
    assert peak < 8 * 1024 * 1024, peak


@pytest.mark.parametrize("what", sorted(LOADERS))
@pytest.mark.parametrize("text", [deep_flow(), deep_flow(MAX_DEPTH + 1), deep_block()], ids=["flow-5000", "flow-65", "block-500"])
def test_deep_nesting_is_refused_with_a_config_error_not_a_recursion_error(
    tmp_path: Path, what: str, text: str
) -> None:
    path = tmp_path / "file.yaml"
    path.write_text(text)
    error, peak = _refused(LOADERS[what], path)
    (problem,) = error.problems
    assert problem.file == str(path) and problem.line is not None
    assert "nest" in problem.message
    assert peak < 8 * 1024 * 1024, peak


def test_nesting_up_to_the_bound_is_read(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text("a: " + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1) + "\n")
    assert read_yaml(path, "deployment").data["a"] == _nested(MAX_DEPTH - 2)


def _nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


def test_a_few_aliases_in_a_deployment_are_read_and_resolve_to_the_same_values(tmp_path: Path) -> None:
    path = tmp_path / "deployment.yaml"
    path.write_text(GOOD + "layers: &layers\n  - {linear: {in: 4, out: 3}}\nagain: *layers\n")
    doc = read_yaml(path, "deployment")
    assert doc.data["again"] == doc.data["layers"] == [{"linear": {"in": 4, "out": 3}}]
    assert doc.line_of(("again",)) == GOOD.count("\n") + 3


def test_aliases_are_budgeted_by_the_nodes_they_expand_to(tmp_path: Path) -> None:
    # 2 levels of fan 100: level 1 expands to 100 * 101 + 1 nodes, over the 10,000 budget.
    path = tmp_path / "file.yaml"
    path.write_text(alias_bomb(levels=2, fan=100))
    with pytest.raises(ConfigError, match=f"more than {MAX_ALIAS_NODES}"):
        read_yaml(path, "deployment")
    path.write_text(alias_bomb(levels=2, fan=90))  # 90 * 91 + 1 = 8,191 nodes: within it
    assert len(read_yaml(path, "deployment").data["l1"]) == 90


def test_a_policy_refuses_any_alias(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("a: &x 1\nb: *x\n")
    with pytest.raises(ConfigError, match=r"anchors and aliases .* not allowed in a policy") as info:
        load_policy(path)
    assert info.value.problems[0].line == 1


def test_the_line_index_of_a_read_file_holds_no_alias_expansion_beyond_the_budget(tmp_path: Path) -> None:
    path = tmp_path / "file.yaml"
    path.write_text(alias_bomb(levels=2, fan=90))
    doc = read_yaml(path, "deployment")
    assert len(doc.lines) <= 2 * MAX_ALIAS_NODES


def test_a_file_that_is_not_utf8_is_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "file.yaml"
    path.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_yaml(path, "deployment")


def test_dump_yaml_writes_shared_values_twice_and_no_anchor() -> None:
    layers = [{"linear": {"in": 4, "out": 3}}]
    text = dump_yaml({"a": {"model": layers}, "b": {"model": layers}})
    assert not [t for t in yaml.scan(text) if isinstance(t, yaml.AnchorToken | yaml.AliasToken)]
    assert yaml.safe_load(text) == {"a": {"model": layers}, "b": {"model": layers}}
    assert "&id" in yaml.safe_dump({"a": layers, "b": layers})  # what the plain dumper would write


@pytest.mark.parametrize("scenario", ["vanilla", "vertical", "multi-task"])
def test_the_demo_generator_writes_no_anchors(tmp_path: Path, scenario: str) -> None:
    from secure_split.testing import generate_deployment

    gen = generate_deployment(scenario, tmp_path)
    for path in [gen.deployment, gen.policy, *gen.peer_configs.values()]:
        tokens = yaml.scan(Path(path).read_text())
        assert not [t for t in tokens if isinstance(t, yaml.AnchorToken)], path


# -- the peer config's folders ---------------------------------------------------------------------


@pytest.mark.parametrize("key", ["audit", "checkpoints"])
def test_a_peer_config_folder_that_is_a_file_is_a_config_error(tmp_path: Path, key: str) -> None:
    from secure_split.testing import generate_deployment

    gen = generate_deployment("vanilla", tmp_path)
    other_log = tmp_path / "audit" / "owner.jsonl"  # another peer's log, where a folder belongs
    other_log.parent.mkdir(exist_ok=True)
    other_log.write_text("{}\n")
    config = gen.peer_configs["label_holder"]
    data = yaml.safe_load(config.read_text())
    data[key] = "../audit/owner.jsonl"
    config.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        load_peer_config(config)
    (problem,) = info.value.problems
    assert problem.key == key and problem.line is not None
    assert f"{other_log} is a file; '{key}' names a folder" in problem.message
