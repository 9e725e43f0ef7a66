"""Hostile configuration files through the real CLI: a clear error and exit 2, never a traceback.

Every YAML file kind a peer or an auditor reads: the deployment (`peer run`, `audit verify
--deployment`), the peer config (`peer run`), the policy (`peer run`, `policy check`). Each gets an
alias bomb and 5,000-deep nesting. Before the one bounded loader, the bomb took 45-60 s and 5.8 GB
and ended in a MemoryError; the nesting in a RecursionError. The subprocess timeout (60 s, for a
loaded machine) is far above what a refusal takes and below what the expansion took.

Also: a peer config whose `audit:` points at another peer's log file.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.integration.helpers import Deploy, clone_deployment, run_cli_many

pytestmark = pytest.mark.integration

TIMEOUT_S = 60


def alias_bomb() -> str:
    lines = ["l0: &l0 [" + ", ".join(["lol"] * 9) + "]"]
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
    return "\n".join(lines) + "\n"


def deep_nesting() -> str:
    return "nested: " + "[" * 5000 + "]" * 5000 + "\n"


def _hostile_cases(d: Deploy, text: str, tag: str) -> list[tuple[str, Path, list[str]]]:
    """(what, hostile file, argv) for each file kind, in copies of the deployment's files."""
    root = d.workdir
    bad_dep = root / f"deployment-{tag}.yaml"
    bad_dep.write_text(text)
    bad_cfg = root / "peers" / f"bad-config-{tag}.yaml"
    bad_cfg.write_text(text)
    # A peer config that points at the hostile deployment.
    cfg = yaml.safe_load(d.peer_configs["owner"].read_text())
    via_cfg = root / "peers" / f"owner-{tag}.yaml"
    via_cfg.write_text(yaml.safe_dump({**cfg, "deployment": f"../{bad_dep.name}"}))
    bad_policy = root / f"policy-{tag}.yaml"
    bad_policy.write_text(text)
    return [
        ("deployment via peer run", bad_dep, ["peer", "run", str(via_cfg), "--progress", "none"]),
        ("peer config", bad_cfg, ["peer", "run", str(bad_cfg), "--progress", "none"]),
        ("policy", bad_policy, ["policy", "check", str(bad_policy)]),
        ("deployment via audit verify", bad_dep, ["audit", "verify", str(d.audit_dir), "--deployment", str(bad_dep)]),
    ]


@pytest.mark.parametrize(("tag", "make", "needle"), [("bomb", alias_bomb, "alias"), ("deep", deep_nesting, "nest")])
def test_every_yaml_file_kind_refuses_bombs_and_deep_nesting_with_exit_2(
    vanilla_template: Deploy, tmp_path: Path, tag: str, make: object, needle: str
) -> None:
    d = clone_deployment(vanilla_template, tmp_path / "d")
    d.audit_dir.mkdir(exist_ok=True)
    cases = _hostile_cases(d, make(), tag)  # type: ignore[operator]
    done = run_cli_many([argv for _, _, argv in cases], timeout=TIMEOUT_S)
    for (what, path, _), proc in zip(cases, done, strict=True):
        output = proc.stdout + proc.stderr
        assert proc.returncode == 2, (what, proc.returncode, output[-2000:])
        assert "Traceback" not in output and "MemoryError" not in output and "RecursionError" not in output, what
        assert needle in output.lower(), (what, output[-2000:])
        assert path.name in output, (what, output[-2000:])  # the error names the file (and its line)


def test_an_audit_folder_that_is_another_peers_log_is_a_config_error(vanilla_template: Deploy, tmp_path: Path) -> None:
    d = clone_deployment(vanilla_template, tmp_path / "d")
    other_log = d.audit_dir / "owner.jsonl"
    other_log.parent.mkdir(exist_ok=True)
    other_log.write_text('{"event": "run_start"}\n')
    config = d.peer_configs["label_holder"]
    data = yaml.safe_load(config.read_text())
    data["audit"] = "../audit/owner.jsonl"
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    (proc,) = run_cli_many([["peer", "run", str(config), "--progress", "none"]], timeout=TIMEOUT_S)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-2000:]
    assert "Traceback" not in output and "FileExistsError" not in output
    assert f"{other_log} is a file; 'audit' names a folder" in output
    assert other_log.read_text() == '{"event": "run_start"}\n', "the other peer's log was not touched"
