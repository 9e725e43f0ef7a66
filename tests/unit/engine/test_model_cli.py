"""`secure-split model describe|verify`: the owner publishes a commitment, the auditor checks a document."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml
from typer.testing import CliRunner

from secure_split.cli.main import app

from .model_cases import SALT, bank_module, commit, write_peer_config

runner = CliRunner()


def _deployment(tmp_path: Path, entry: dict[str, object]) -> Path:
    doc = {
        "version": 1, "name": "t", "coordinator": "lab", "policy": "policy.yaml",
        "peers": {p: {"endpoint": f"tcp://127.0.0.1:{5601 + i}", "sign_key": "ab"[i] * 64,
                      "transport_key": "xy"[i] * 40}
                  for i, p in enumerate(("bank", "lab"))},
        "segments": {"bottom": {"peer": "bank", "input": "features", **entry},
                     "top": {"peer": "lab", "loss": "cross_entropy", "model": [{"linear": {"in": 8, "out": 2}}]}},
        "edges": [{"from": "bottom", "to": "top", "interface": {"shape": [8]}}],
    }
    path = tmp_path / "deployment.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_describe_prints_the_deployment_entry_and_writes_the_document(tmp_path: Path) -> None:
    config = write_peer_config(tmp_path, "bank", {"bottom": {"model": bank_module(), "salt": SALT}})
    proc = subprocess.run([sys.executable, "-m", "secure_split", "model", "describe", str(config),
                           "--out", str(tmp_path / "private")], capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    entry = commit(config, "bottom")
    assert f"segments.bottom:\n  commitment: {entry['commitment']}\n  parameters: {entry['parameters']}" in proc.stdout
    document = tmp_path / "private" / "bottom.architecture.json"
    assert json.loads(document.read_text())["salt"] == SALT
    assert document.stat().st_mode & 0o077 == 0  # it holds the salt


def test_describe_without_a_salt_proposes_one(tmp_path: Path) -> None:
    config = write_peer_config(tmp_path, "bank", {"bottom": {"model": [{"linear": {"in": 5, "out": 8}}]}})
    result = runner.invoke(app, ["model", "describe", str(config)])
    assert result.exit_code == 2
    assert "a private model needs a salt (32 to 128 hex digits, e.g. " in result.output


def test_an_auditor_verifies_the_document_against_the_deployment(tmp_path: Path) -> None:
    config = write_peer_config(tmp_path, "bank", {"bottom": {"model": bank_module(), "salt": SALT}})
    runner.invoke(app, ["model", "describe", str(config), "--out", str(tmp_path / "private")])
    document = tmp_path / "private" / "bottom.architecture.json"
    deployment = _deployment(tmp_path, commit(config, "bottom"))
    ok = runner.invoke(app, ["model", "verify", str(document), "--deployment", str(deployment), "--segment", "bottom"])
    assert ok.exit_code == 0, ok.output
    assert "OK segment 'bottom': the document is the committed architecture" in ok.output
    disclosed = json.loads(document.read_text())
    disclosed["model"]["arguments"]["out"] = 16  # the owner discloses another architecture than it trained
    document.write_text(json.dumps(disclosed))
    bad = runner.invoke(app, ["model", "verify", str(document), "--deployment", str(deployment), "--segment", "bottom"])
    assert bad.exit_code == 1 and "MISMATCH segment 'bottom': the document hashes to" in bad.output
    missing = runner.invoke(app, ["model", "verify", str(document), "--deployment", str(deployment), "--segment", "top"])
    assert missing.exit_code == 2 and "segment 'top' has no commitment" in missing.output
