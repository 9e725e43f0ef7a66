"""An operator's Ctrl-C stops a peer with exit code 130, and its counterparty is told at once."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.integration.helpers import (
    Deploy,
    clone_deployment,
    events,
    kill_all,
    start_peers,
    wait_for_training,
)

pytestmark = pytest.mark.integration


def test_interrupted_coordinator_exits_130_and_the_owner_stops_promptly(vanilla_template: Deploy, tmp_path: Path) -> None:
    d = clone_deployment(vanilla_template, tmp_path / "d", epochs=5, max_steps=None,
                         limits={"peer_timeout_s": 120.0})
    procs = start_peers(d)
    owner, holder = procs["owner"], procs["label_holder"]
    try:
        wait_for_training(d, procs)
        os.kill(holder.proc.pid, signal.SIGINT)
        interrupted_at = time.monotonic()
        holder_code = holder.proc.wait(timeout=30)
        owner_code = owner.proc.wait(timeout=30)
        owner_after = time.monotonic() - interrupted_at
    finally:
        kill_all(procs)
    assert holder_code == 130, holder.stderr
    assert owner_code != 0
    assert owner_after < 20, "the owner was told to stop, it did not wait for its 120 s timeout"
    assert events(d.audit("label_holder"), "run_end")[-1]["data"]["status"] == "failed"
