"""A peer that stops answering mid-training (SIGSTOP: the process and its sockets stay open, only
silent) is detected by heartbeats within seconds, not after the long peer timeout, and named.

What follows depends on `limits.rejoin_grace_s`: by default the others wait for it to be restarted
(tests/integration/test_rejoin.py heals such a run), saying whom they wait for, and a stalled
process that simply continues carries on; with no grace the run stops at once with exit 3."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.integration.helpers import (
    Deploy,
    PeerProc,
    clone_deployment,
    events,
    kill_all,
    start_peer,
    start_peers,
    wait_for,
    wait_for_training,
    wait_peers,
)

pytestmark = pytest.mark.integration

HEARTBEAT_S = 0.5
PEER_TIMEOUT_S = 120.0  # far above the bound below: detection must come from the heartbeats
DETECTION_BOUND_S = 30.0


def _stop_the_owner_once_training_and_see_the_wait(d: Deploy, owner: PeerProc, holder: PeerProc) -> None:
    """SIGSTOP the owner after three activations; the coordinator names it and waits (rejoin_wait)
    within the detection bound, still running."""
    wait_for_training(d, {"owner": owner, "label_holder": holder})
    os.kill(owner.proc.pid, signal.SIGSTOP)
    stopped_at = time.monotonic()

    def waiting() -> bool:
        return any(e["data"]["counterparty"] == "owner" for e in events(d.audit("label_holder"), "rejoin_wait"))

    assert wait_for(waiting, DETECTION_BOUND_S + 15, interval=0.1), holder.stderr
    assert time.monotonic() - stopped_at < DETECTION_BOUND_S
    assert holder.proc.poll() is None, "the coordinator keeps running while it waits"


def test_stalled_follower_is_detected_and_named_within_seconds(vanilla_template: Deploy, tmp_path: Path) -> None:
    d = clone_deployment(vanilla_template, tmp_path / "d", epochs=5, max_steps=None,
                         limits={"heartbeat_s": HEARTBEAT_S, "peer_timeout_s": PEER_TIMEOUT_S, "rejoin_grace_s": 0.0,
                                 "close_timeout_s": 3.0})
    procs = start_peers(d)
    owner, holder = procs["owner"], procs["label_holder"]
    try:
        wait_for_training(d, procs)
        os.kill(owner.proc.pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            code = holder.proc.wait(timeout=DETECTION_BOUND_S + 15)
        except Exception:
            pytest.fail(f"the coordinator did not notice the stalled owner within {DETECTION_BOUND_S + 15} s")
        detected_after = time.monotonic() - stopped_at
    finally:
        if owner.proc.poll() is None:
            os.kill(owner.proc.pid, signal.SIGCONT)
        kill_all(procs)

    out = " ".join(holder.stderr.split())
    assert code == 3, out  # 3 = a peer did not answer in time
    assert detected_after < DETECTION_BOUND_S, f"detected after {detected_after:.1f} s"
    assert "PeerTimeout: peer 'owner' did not answer" in out
    assert "stalled or stopped peer" in out
    res = holder.result_json()
    assert res["status"] == "failed" and res["exit_code"] == 3 and res["epochs_done"] < 5
    log = d.audit("label_holder")
    lost = events(log, "peer_lost")
    assert lost and lost[0]["data"]["counterparty"] == "owner"
    assert events(log, "run_end")[-1]["data"]["status"] == "failed"


def test_with_a_rejoin_grace_the_coordinator_names_the_stalled_follower_and_waits_for_it(
        vanilla_template: Deploy, tmp_path: Path) -> None:
    d = clone_deployment(vanilla_template, tmp_path / "d", epochs=5, max_steps=None,
                         limits={"heartbeat_s": HEARTBEAT_S, "peer_timeout_s": PEER_TIMEOUT_S, "rejoin_grace_s": 600.0})
    procs = start_peers(d)
    owner, holder = procs["owner"], procs["label_holder"]
    try:
        _stop_the_owner_once_training_and_see_the_wait(d, owner, holder)
        lost = events(d.audit("label_holder"), "peer_lost")
        assert lost and lost[0]["data"]["counterparty"] == "owner"
    finally:
        if owner.proc.poll() is None:
            os.kill(owner.proc.pid, signal.SIGCONT)
        kill_all(procs)


def test_a_stalled_follower_that_continues_carries_on_or_is_restarted(vanilla_template: Deploy, tmp_path: Path) -> None:
    # With a rejoin grace the coordinator names the stalled owner and waits for it. The old process
    # then continues (SIGCONT). Two outcomes, both healthy, depending on whether libzmq dropped a
    # message when the heartbeat closed the connection:
    # - nothing lost: every message arrives in sequence, the coordinator logs that the owner came
    #   back in its session, and the run finishes;
    # - a message lost: the coordinator refuses the next one as out of sequence, the owner stops on
    #   its own (nobody answers it), and restarted with --resume it rejoins and the run finishes.
    d = clone_deployment(vanilla_template, tmp_path / "d", epochs=2, max_steps=30,
                         limits={"heartbeat_s": HEARTBEAT_S, "peer_timeout_s": 10.0, "rejoin_grace_s": 600.0})
    procs = start_peers(d)
    owner, holder = procs["owner"], procs["label_holder"]
    try:
        _stop_the_owner_once_training_and_see_the_wait(d, owner, holder)
        os.kill(owner.proc.pid, signal.SIGCONT)
        owner_code = owner.wait(120)
        restarted = None
        if owner_code != 0:  # a message was lost: the owner stopped; restart it as an operator would
            assert holder.proc.poll() is None, "the coordinator still waits"
            restarted = procs["owner_again"] = start_peer(d.peer_configs["owner"], workdir=d.workdir, tag="-again",
                                                          resume=True)
            del procs["owner"]
        codes = wait_peers(procs, timeout=300)
    finally:
        if owner.proc.poll() is None:
            os.kill(owner.proc.pid, signal.SIGCONT)
        kill_all(procs)
    assert set(codes.values()) == {0}, holder.stderr[-3000:] + owner.stderr[-3000:]
    log = d.audit("label_holder")
    assert [e["data"]["counterparty"] for e in events(log, "peer_lost")] == ["owner"]
    joined = [e["data"]["reason"] for e in events(log, "peer_joined") if e["data"]["counterparty"] == "owner"]
    if restarted is None:
        assert "came back in its session (no message lost)" in joined, joined
    else:
        assert any("messages missing" in e["data"]["reason"] for e in events(log, "refused")), "the gap is on record"
        assert any("restarted" in r for r in joined) and events(log, "rollback"), joined
    assert events(log, "run_end")[-1]["data"]["status"] == "ok"
