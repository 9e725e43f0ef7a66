"""The ops log (JSON lines, never a secret) and `peer status` judged from logs and metrics."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from secure_split.cli.main import app
from secure_split.crypto.keys import generate_identity
from secure_split.errors import ConfigError
from secure_split.peer.metrics import PeerMetrics
from secure_split.peer.status import OpsLog, peer_status, read_tail
from tests.unit.ops.ops_fixtures import identities, vertical, write_keys, write_yaml

runner = CliRunner()


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_line_is_json_with_time_peer_and_event(tmp_path):
    log = OpsLog(tmp_path / "lab.ops.log", "lab")
    log.start(deployment="d" * 64, policy="p", version="0.1", resume=False)
    log.event("state", state="training", detail=Path("/x"))  # a non-JSON value is written as text
    log.close()
    log.event("after_close")  # a peer shutting down may still report: ignored, no exception
    first, second = _lines(tmp_path / "lab.ops.log")
    assert first["event"] == "peer_start" and first["peer"] == "lab" and first["pid"] > 0
    assert second == {"event": "state", "peer": "lab", "state": "training", "detail": "/x", "time": second["time"]}
    assert second["time"].endswith("Z")


def test_secret_key_text_in_any_field_is_refused(tmp_path):
    ident = generate_identity("lab")
    log = OpsLog(tmp_path / "lab.ops.log", "lab", secrets=ident.secret_text_forms())
    log.event("error", detail=f"oops {ident.transport_secret_z85}")
    log.event("error", detail=f"hex {ident.secret_text_forms()[0]}")
    log.close()
    text = (tmp_path / "lab.ops.log").read_text()
    assert all(form not in text for form in ident.secret_text_forms())
    assert [e["event"] for e in _lines(tmp_path / "lab.ops.log")] == ["ops_log_refused", "ops_log_refused"]


def test_long_lines_are_cut_and_the_file_rolls_over(tmp_path):
    log = OpsLog(tmp_path / "x.ops.log", "x", max_bytes=20_000)
    for _ in range(10):
        log.event("big", blob="y" * 9000)
    log.close()
    assert all(e.get("truncated") for e in _lines(tmp_path / "x.ops.log"))
    small = OpsLog(tmp_path / "y.ops.log", "y", max_bytes=1000)
    for i in range(100):
        small.event("tick", i=i)
    small.close()
    assert (tmp_path / "y.ops.log.1").is_file()
    assert (tmp_path / "y.ops.log").stat().st_size < 2000


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _ops(path: Path, *events: dict) -> Path:
    path.write_text("".join(json.dumps({"peer": "lab", "time": "2026-01-01T00:00:00Z", **e}) + "\n" for e in events))
    return path


def test_status_finished_failed_crashed_running_and_never_ran(tmp_path):
    audit = tmp_path / "lab.jsonl"
    host = socket.gethostname()
    start = {"event": "peer_start", "pid": _dead_pid(), "host": host}
    done = peer_status("lab", _ops(tmp_path / "a", start, {"event": "peer_end", "status": "ok"}), audit, None)
    assert (done.verdict, done.exit_code) == ("finished", 0)

    failed = peer_status("lab", _ops(tmp_path / "b", start, {"event": "peer_end", "status": "failed",
                                                             "error": "PeerTimeout: hospital_a"}), audit, None)
    assert (failed.verdict, failed.exit_code) == ("failed", 1) and "hospital_a" in failed.detail

    crashed = peer_status("lab", _ops(tmp_path / "c", start, {"event": "state", "state": "training"}), audit, None)
    assert (crashed.verdict, crashed.exit_code) == ("unreachable", 3)
    assert "is gone" in crashed.detail and "'training'" in crashed.detail and "peer run" in crashed.detail

    me = {"event": "peer_start", "pid": os.getpid(), "host": host}
    running = peer_status("lab", _ops(tmp_path / "d", me, {"event": "state", "state": "waiting"}), audit, None)
    assert (running.verdict, running.exit_code) == ("running", 0)

    never = peer_status("lab", tmp_path / "missing.ops.log", audit, None)
    assert (never.verdict, never.exit_code) == ("never_ran", 3)


def test_an_earlier_run_does_not_count_only_the_latest(tmp_path):
    host = socket.gethostname()
    ops = _ops(tmp_path / "e", {"event": "peer_start", "pid": 1, "host": "elsewhere"},
               {"event": "peer_end", "status": "ok"},
               {"event": "peer_start", "pid": _dead_pid(), "host": host}, {"event": "state", "state": "setup"})
    assert peer_status("lab", ops, tmp_path / "none.jsonl", None).verdict == "unreachable"


def test_the_audit_log_tells_how_a_run_ended_when_the_ops_log_does_not(tmp_path):
    audit = tmp_path / "lab.jsonl"
    audit.write_text(json.dumps({"event": "run_start", "data": {}}) + "\n"
                     + json.dumps({"event": "run_end", "data": {"status": "failed", "reason": "policy"}}) + "\n")
    ops = _ops(tmp_path / "f", {"event": "peer_start", "pid": _dead_pid(), "host": socket.gethostname()})
    status = peer_status("lab", ops, audit, None)
    assert (status.verdict, status.detail) == ("failed", "the last run failed: policy")
    assert read_tail(tmp_path / "nothing") == []


@pytest.fixture
def lab_config(tmp_path):
    ids = identities()
    write_yaml(tmp_path / "deployment.yaml", vertical(ids))
    write_keys({"lab": ids["lab"]}, tmp_path / "keys")

    def write(**extra) -> Path:
        cfg = {"peer": "lab", "deployment": "deployment.yaml", "secret_key": "keys/lab.key", "audit": "audit", **extra}
        return write_yaml(tmp_path / "lab.yaml", cfg)

    return write


def test_cli_status_reads_a_live_metrics_endpoint(lab_config):
    metrics = PeerMetrics("lab", ["hospital_a"])
    port = metrics.start_http(port=0)
    try:
        metrics.set_state("waiting")
        metrics.on_rejoin_wait("hospital_a", True, since=1_700_000_000.0)
        out = runner.invoke(app, ["peer", "status", str(lab_config(metrics={"port": port}))])
    finally:
        metrics.stop()
    assert out.exit_code == 0, out.output
    assert "RUNNING" in out.output and "waiting for hospital_a since" in out.output


def test_cli_status_of_a_crashed_peer_says_so_and_exits_3(lab_config, tmp_path):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    holder.close()
    config = lab_config(metrics={"port": port})
    (tmp_path / "audit").mkdir()
    _ops(tmp_path / "audit" / "lab.ops.log", {"event": "peer_start", "pid": _dead_pid(), "host": socket.gethostname()},
         {"event": "state", "state": "training"})
    out = runner.invoke(app, ["peer", "status", str(config), "--json"])
    assert out.exit_code == 3
    status = json.loads(out.output)
    assert status["verdict"] == "unreachable" and "does not answer" in status["detail"]


def test_cli_status_with_a_broken_config_is_a_config_error(lab_config, tmp_path):
    config = lab_config(metrics={"port": 0})
    out = runner.invoke(app, ["peer", "status", str(config)])
    assert isinstance(out.exception, ConfigError)
    assert "metrics.port" in str(out.exception)
