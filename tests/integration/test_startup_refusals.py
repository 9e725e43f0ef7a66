"""`secure-split peer run` refuses to start on a bad key file, a bad configuration or a policy
that is expired, unsigned or changed after signing: a clear message, the documented exit code,
and nothing started (no audit log, no socket).

Every case is a real `secure-split peer run` process; the cases are independent, so the module
starts them all at once and each test checks its own.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

import pytest
import yaml

from tests.integration.helpers import Deploy, clone_deployment, edit_policy, run_cli_many

pytestmark = pytest.mark.integration


@dataclass
class Case:
    deploy: Deploy
    peer: str
    proc: subprocess.CompletedProcess[str] | None = None

    @property
    def output(self) -> str:
        assert self.proc is not None
        return self.proc.stdout + self.proc.stderr


def _loose_key(d: Deploy) -> None:
    os.chmod(d.workdir / "keys" / "owner.key", 0o644)


def _expired(d: Deploy) -> None:
    edit_policy(d, lambda p: p.__setitem__("valid", {"not_after": "2020-01-01T00:00:00+00:00"}))


def _unsigned(d: Deploy) -> None:
    (d.workdir / "signatures" / "policy.label_holder.sig").unlink()


def _tampered(d: Deploy) -> None:
    # A change after every party signed: loosen a tensor rule's size bound.
    def loosen(p: dict) -> None:  # type: ignore[type-arg]
        for rule in p["allow"]:
            if "activation" in rule["kinds"]:
                rule["max_bytes"] = rule["max_bytes"] * 4

    edit_policy(d, loosen, sign=False)


def _bad_peer_config(d: Deploy) -> None:
    path = d.peer_configs["owner"]
    cfg = yaml.safe_load(path.read_text())
    cfg["checkpoints"] = ["not", "a", "path"]  # wrong type
    cfg["audit_folder"] = "../audit"  # unknown key (it is `audit`)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def _bad_deployment(d: Deploy) -> None:
    data = d.read_deployment()
    data["training"]["epochs"] = "three"  # wrong type
    data["limits"]["heartbeat"] = 1.0  # unknown key (it is `heartbeat_s`)
    d.write_deployment(data)


SETUPS = {
    "loose_key": _loose_key,
    "expired": _expired,
    "unsigned": _unsigned,
    "tampered": _tampered,
    "bad_peer_config": _bad_peer_config,
    "bad_deployment": _bad_deployment,
}


@pytest.fixture(scope="module")
def cases(vanilla_template: Deploy, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    root = tmp_path_factory.mktemp("startup")
    out: dict[str, Case] = {}
    for name, setup in SETUPS.items():
        d = clone_deployment(vanilla_template, root / name)
        setup(d)
        out[name] = Case(d, "owner")
    procs = run_cli_many([["peer", "run", str(c.deploy.peer_configs[c.peer])] for c in out.values()], timeout=180)
    for c, p in zip(out.values(), procs, strict=True):
        c.proc = p
    return out


def _assert_nothing_started(c: Case) -> None:
    assert not list(c.deploy.audit_dir.glob("*.jsonl")), "a peer that refuses to start writes no audit log"
    assert "Traceback" not in c.output, c.output


def test_loose_secret_key_file_is_refused_with_chmod_advice(cases: dict[str, Case]) -> None:
    c = cases["loose_key"]
    assert c.proc is not None and c.proc.returncode == 2, c.output
    key = c.deploy.workdir / "keys" / "owner.key"
    assert "0644" in c.output
    assert f"chmod 600 {key}" in c.output.replace("\n", "")
    _assert_nothing_started(c)


def test_expired_policy_is_refused(cases: dict[str, Case]) -> None:
    c = cases["expired"]
    assert c.proc is not None and c.proc.returncode == 4, c.output
    assert "PolicyError" in c.output
    assert "expired at 2020-01-01" in c.output
    _assert_nothing_started(c)


def test_policy_missing_a_signature_is_refused(cases: dict[str, Case]) -> None:
    c = cases["unsigned"]
    assert c.proc is not None and c.proc.returncode == 4, c.output
    assert "'label_holder' has not signed the policy" in c.output
    assert "secure-split policy sign" in c.output, "the message says how to fix it"
    _assert_nothing_started(c)


def test_policy_changed_after_signing_is_refused(cases: dict[str, Case]) -> None:
    c = cases["tampered"]
    assert c.proc is not None and c.proc.returncode == 4, c.output
    text = " ".join(c.output.split())
    for party in ("owner", "label_holder"):
        assert f"the policy changed after '{party}' signed it" in text, text
    _assert_nothing_started(c)


def test_bad_peer_config_lists_every_problem_with_file_and_key(cases: dict[str, Case]) -> None:
    c = cases["bad_peer_config"]
    assert c.proc is not None and c.proc.returncode == 2, c.output
    text = " ".join(c.output.split())
    path = str(c.deploy.peer_configs["owner"])
    assert "ConfigError" in text
    assert f"{path}:" in text
    assert "audit_folder: unknown key" in text
    assert "checkpoints" in text and "valid string" in text
    assert "2 configuration problems" in text, "both problems are reported in one run"
    _assert_nothing_started(c)


def test_bad_deployment_lists_every_problem_with_file_and_key(cases: dict[str, Case]) -> None:
    c = cases["bad_deployment"]
    assert c.proc is not None and c.proc.returncode == 2, c.output
    text = " ".join(c.output.split())
    path = str(c.deploy.deployment)
    assert f"{path}:" in text
    assert "training.epochs: Input should be a valid integer" in text
    assert "limits.heartbeat: unknown key" in text
    assert "2 configuration problems" in text
    _assert_nothing_started(c)

