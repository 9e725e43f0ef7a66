"""`secure-split peer run --resume` after a crash: every peer continues from the last checkpoint
all of them share, training goes on from the epoch after it, and each audit log continues its
own hash chain. A resume under a changed deployment.yaml is refused, and says why."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Any

import pytest

from secure_split.audit import verify_logs
from secure_split.config import load_deployment
from secure_split.engine.checkpoint import list_checkpoints
from secure_split.policy import load_policy
from tests.integration.helpers import (
    Deploy,
    PeerProc,
    clone_deployment,
    events,
    kill_all,
    run_cli_many,
    start_peers,
    wait_for,
    wait_peers,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EPOCHS = 3
STEPS_PER_EPOCH = 1_000_000  # the coordinator numbers steps epoch * 1e6 + i


@dataclass
class Resumed:
    deploy: Deploy
    last_common: int  # the newest checkpoint every peer had after the crash
    lines_before: dict[str, int]  # audit entries each peer had written before the crash
    procs: dict[str, PeerProc]
    codes: dict[str, int]


@pytest.fixture(scope="module")
def resumed(vanilla_template: Deploy, tmp_path_factory: pytest.TempPathFactory) -> Resumed:
    d = clone_deployment(vanilla_template, tmp_path_factory.mktemp("resume") / "d", epochs=EPOCHS, max_steps=2)
    ckpt = {name: d.workdir / "checkpoints" / name for name in d.peer_configs}

    # Run 1 crashes once epoch 0 is checkpointed: the owner is frozen the moment its checkpoint
    # appears (so no peer can finish another epoch), then both peers are killed.
    procs = start_peers(d, tag="-run1")
    try:
        assert wait_for(lambda: (ckpt["owner"] / "epoch-0000.json").is_file(), 150, interval=0.005), \
            procs["owner"].stderr + procs["label_holder"].stderr
        os.kill(procs["owner"].proc.pid, signal.SIGSTOP)
        assert wait_for(lambda: 0 in list_checkpoints(ckpt["label_holder"]), 30)
    finally:
        kill_all(procs)
    common = set(list_checkpoints(ckpt["owner"])) & set(list_checkpoints(ckpt["label_holder"]))
    assert common and max(common) < EPOCHS - 1, common
    lines_before = {name: len(d.audit(name)) for name in d.peer_configs}

    # Run 2: every peer with --resume, same files.
    procs = start_peers(d, tag="-run2", resume=True)
    codes = wait_peers(procs, timeout=180)
    return Resumed(d, max(common), lines_before, procs, codes)


def test_resume_continues_training_after_the_last_common_checkpoint(resumed: Resumed) -> None:
    for name, p in resumed.procs.items():
        assert resumed.codes[name] == 0, p.stderr
    res = resumed.procs["label_holder"].result_json()
    assert res["status"] == "ok" and res["epochs_done"] == EPOCHS
    assert [h["epoch"] for h in res["metrics"]["history"]] == list(range(resumed.last_common + 1, EPOCHS)), \
        "training continued after the checkpointed epoch, not from scratch"
    assert "accuracy/labels" in res["metrics"]["final"]
    d = resumed.deploy
    for name in d.peer_configs:
        assert list_checkpoints(d.workdir / "checkpoints" / name) == list(range(EPOCHS))
    log = d.audit("label_holder")[resumed.lines_before["label_holder"]:]
    steps = [e["data"]["step"] for e in events(log, "message_sent") if e["data"]["kind"] == "step_begin"]
    assert steps and min(steps) > (resumed.last_common + 1) * STEPS_PER_EPOCH, "no step of a finished epoch reran"


def test_resume_continues_each_audit_chain(resumed: Resumed) -> None:
    d = resumed.deploy
    for name in d.peer_configs:
        log = d.audit(name)
        before = resumed.lines_before[name]
        assert before > 0
        assert [e["seq"] for e in log] == list(range(len(log))), "one chain per peer: no gap, no restart"
        # The resumed process begins a new run segment that names the crashed one.
        assert log[before]["event"] == "run_start" and log[before]["data"]["resumed"] is True
        previous = log[before]["data"]["previous"]
        assert previous["seq"] == before - 1 and previous["closed"] is False
        assert [s["data"]["resumed"] for s in events(log, "run_start")] == [False, True]
        assert len({e["data"]["run_id"] for e in events(log, "run_bound")}) == 2, "each segment is its own run"
        assert [e["data"]["epoch"] for e in events(log, "checkpoint_resumed")] == [resumed.last_common]
        assert events(log, "run_end")[-1]["data"]["status"] == "ok"
        assert not events(log[:before], "run_end"), "run 1 crashed: it never wrote run_end"

    report = verify_logs(d.audit_dir, load_deployment(d.deployment), load_policy(d.policy))
    assert sorted(f.peer for f in report.files) == ["label_holder", "owner"]
    for f in report.files:
        assert f.intact, report.to_json()
    assert not report.unverifiable
    # A kill -9 and a resume verify with warnings only: the crashed segment's uncountersigned
    # tail and the messages in flight at the crash, all before the resume.
    assert report.clean and not report.errors, report.to_json()
    for finding in report.findings:
        assert finding.severity == "warning", finding.describe()
        crashed_at = resumed.lines_before[finding.peer]
        assert all(last < crashed_at for _, last in finding.entries), finding.describe()


def test_resume_under_a_changed_deployment_is_refused_and_says_why(resumed: Resumed) -> None:
    d = resumed.deploy
    old_hash = load_deployment(d.deployment).hash
    data: dict[str, Any] = d.read_deployment()
    data["training"]["epochs"] = EPOCHS + 2  # "train some more": a new deployment, not a resume
    d.write_deployment(data)
    new_hash = load_deployment(d.deployment).hash
    log = d.audit_dir / "owner.jsonl"
    size = log.stat().st_size
    (p,) = run_cli_many([["peer", "run", str(d.peer_configs["owner"]), "--resume"]])
    out = " ".join((p.stdout + p.stderr).split())
    assert p.returncode == 2, out  # a configuration problem, found before anything started
    assert "cannot resume" in out and old_hash in out and new_hash in out, out
    assert "same deployment.yaml" in out
    assert "forged" not in out, "the old log is not accused of tampering"
    assert log.stat().st_size == size, "the old log is left as it was"
