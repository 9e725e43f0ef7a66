"""The handshake between real peer processes: a peer on another deployment file is refused, and
a peer that never comes is named when the others give up.

The scenarios are independent; the module starts them all at once and each test checks its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import yaml

from secure_split.config import load_deployment
from tests.integration.helpers import Deploy, PeerProc, clone_deployment, events, start_peers, wait_peers

pytestmark = pytest.mark.integration

HANDSHAKE_TIMEOUT_S = 5.0


@dataclass
class Run:
    deploy: Deploy
    procs: dict[str, PeerProc]
    codes: dict[str, int]


@pytest.fixture(scope="module")
def runs(vanilla_template: Deploy, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    root = tmp_path_factory.mktemp("handshake")
    limits = {"handshake_timeout_s": HANDSHAKE_TIMEOUT_S}

    # The owner's config points to its own copy of deployment.yaml with one training setting changed.
    mismatch = clone_deployment(vanilla_template, root / "mismatch", limits=limits)
    data = mismatch.read_deployment()
    data["training"]["optimizer"]["lr"] = data["training"]["optimizer"]["lr"] * 2
    (mismatch.workdir / "deployment-owner.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    cfg_path = mismatch.peer_configs["owner"]
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["deployment"] = "../deployment-owner.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))

    only_coordinator = clone_deployment(vanilla_template, root / "no-owner", limits=limits)
    only_owner = clone_deployment(vanilla_template, root / "no-label-holder", limits=limits)

    started = {
        "mismatch": (mismatch, start_peers(mismatch)),
        "no_owner": (only_coordinator, start_peers(only_coordinator, ["label_holder"])),
        "no_label_holder": (only_owner, start_peers(only_owner, ["owner"])),
    }
    out = {}
    for name, (d, procs) in started.items():
        out[name] = Run(d, procs, wait_peers(procs, timeout=180))
    return out


def test_peer_with_another_deployment_file_is_refused_by_both(runs: dict[str, Run]) -> None:
    run = runs["mismatch"]
    shared = load_deployment(run.deploy.deployment).hash
    owners = load_deployment(run.deploy.workdir / "deployment-owner.yaml").hash
    assert shared != owners
    for name, p in run.procs.items():
        out = " ".join(p.stderr.split())
        # 5 = a peer broke the protocol (here: another deployment hash in its HELLO)
        assert run.codes[name] == 5, out
        assert "HandshakeRefused" in out
        assert shared in out and owners in out, "the message names both hashes"
        assert "both parties must load the same deployment.yaml" in out
        assert p.result_json()["status"] == "failed"

    for name in ("owner", "label_holder"):
        log = run.deploy.audit(name)
        refused = events(log, "refused")
        assert refused, f"{name}'s audit log records the refusal"
        reason = refused[0]["data"]["reason"]
        assert refused[0]["data"]["kind"] == "hello"
        assert shared in reason and owners in reason and "same deployment.yaml" in reason
        assert events(log, "run_end")[-1]["data"]["status"] == "failed"
        assert not [e for e in events(log, "message_sent") if e["data"]["kind"] in ("step_begin", "activation")], \
            "no training message crosses a refused handshake"
        assert log[0]["data"]["deployment_hash"] == (owners if name == "owner" else shared)


@pytest.mark.parametrize(("scenario", "started", "missing"), [
    ("no_owner", "label_holder", "owner"),
    ("no_label_holder", "owner", "label_holder"),
])
def test_missing_peer_is_named_when_the_handshake_times_out(
    runs: dict[str, Run], scenario: str, started: str, missing: str,
) -> None:
    run = runs[scenario]
    p = run.procs[started]
    out = " ".join(p.stderr.split())
    assert run.codes[started] == 3, out  # 3 = a peer did not answer in time
    assert f"PeerTimeout: peer '{missing}' did not answer within {HANDSHAKE_TIMEOUT_S:.1f} s" in out
    assert "while waiting for the handshake" in out
    assert f"check that '{missing}' is running" in out
    res = p.result_json()
    assert res["status"] == "failed" and res["exit_code"] == 3
    log = run.deploy.audit(started)
    lost = events(log, "peer_lost")
    assert [e["data"]["counterparty"] for e in lost] == [missing]
    assert events(log, "run_end")[-1]["data"]["status"] == "failed"
    assert not (run.deploy.audit_dir / f"{missing}.jsonl").exists()
