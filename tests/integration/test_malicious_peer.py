"""A listed peer cannot crash, exhaust or stall another; an outsider cannot either (issue 14).

The victim is the label holder of a generated vanilla deployment, a real `secure-split peer run`
process. The attacker is either
- the owner itself, made malicious: `tests/integration/adversary.py` runs the genuine owner with an
  injector in its transport, so attacks travel inside the real CURVE session with the owner's key
  and meet the victim's deepest checks, while the honest half of the owner keeps training; or
- an outsider with no key: plain TCP connections from this test process.

One test per finding of the security review. Each asserts what SECURITY.md states: the victim
refuses, records and answers, and training completes (or, past the violation budget, the run
stops naming the peer). Runs are a few steps long; waits are deadlines, never timings.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import (
    Deploy,
    PeerProc,
    clone_deployment,
    events,
    start_peer,
    wait_for,
    wait_peers,
)

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
RUN_TIMEOUT_S = 240


# -- fixture pieces ------------------------------------------------------------------------------


class RssWatch:
    """Samples a process's resident memory (VmRSS) and peak (VmHWM) until it exits."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.baseline_kb: int | None = None
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _read(self) -> dict[str, int]:
        try:
            text = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return {}
        return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in text.splitlines())
                if k in ("VmRSS", "VmHWM")}  # fmt: skip

    def mark_baseline(self) -> None:
        self.baseline_kb = self._read().get("VmRSS")

    def _run(self) -> None:
        while not self._stop.is_set():
            values = self._read()
            if not values:
                return
            self.peak_kb = max(self.peak_kb, values.get("VmHWM", 0))
            time.sleep(0.05)

    def growth_mb(self) -> float:
        self._stop.set()
        self._thread.join(timeout=5)
        assert self.baseline_kb is not None, "no baseline was taken"
        return (self.peak_kb - self.baseline_kb) / 1024


def start_victim(d: Deploy, *, prefix: tuple[str, ...] = ()) -> PeerProc:
    return start_peer(d.peer_configs[d.coordinator], workdir=d.workdir, prefix=prefix)


def start_adversary(d: Deploy, attacks: list[dict[str, Any]], *, trigger: int = 2, repeat: int = 1) -> PeerProc:
    """The owner, made malicious: the genuine peer with `attacks` injected at its `trigger`-th activation."""
    plan = {"victim": d.coordinator, "attacks": attacks, "trigger_activation": trigger, "repeat": repeat,
            "out": str(d.workdir / "adversary-report.json")}  # fmt: skip
    path = d.workdir / "adversary-plan.json"
    path.write_text(json.dumps(plan))
    return start_peer(d.peer_configs["owner"], workdir=d.workdir,
                      module=("tests.integration.adversary", str(path)))  # fmt: skip


def adversary_report(d: Deploy) -> dict[str, Any]:
    path = d.workdir / "adversary-report.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def run_attack(d: Deploy, attacks: list[dict[str, Any]], **options: Any) -> tuple[dict[str, int], dict[str, PeerProc], RssWatch]:
    victim = start_victim(d)
    watch = RssWatch(victim.proc.pid)
    owner = start_adversary(d, attacks, **options)
    procs = {"label_holder": victim, "owner": owner}
    # The baseline: the victim after start-up and handshake, before the first step's activation.
    wait_for(lambda: bool(events(d.audit("label_holder"), "peer_joined")) or victim.proc.poll() is not None, 120)
    watch.mark_baseline()
    codes = wait_peers(procs, timeout=RUN_TIMEOUT_S)
    return codes, procs, watch


def assert_no_traceback(*procs: PeerProc) -> None:
    for p in procs:
        assert "Traceback" not in p.stderr, p.stderr[-3000:]


def victim_refusals(d: Deploy) -> list[dict[str, Any]]:
    entries = d.audit("label_holder")
    return [e["data"] for e in entries if e.get("event") in ("refused", "policy_denied")]


# -- 1. one message crashed the receiver -----------------------------------------------------------


def test_a_zero_size_tensor_with_huge_dimensions_is_refused_and_training_completes(
    vanilla_template: Deploy, tmp_path: Path
) -> None:
    d = clone_deployment(vanilla_template, tmp_path / "d", epochs=1, max_steps=4)
    codes, procs, _ = run_attack(d, [{"attack": "zero_size_shape"}])
    assert_no_traceback(*procs.values())
    assert codes == {"label_holder": 0, "owner": 0}, procs["label_holder"].stderr[-3000:]
    refused = [r for r in victim_refusals(d) if r.get("error") == "CodecError"]
    assert refused and "over the bound" in refused[0]["reason"], victim_refusals(d)
    assert refused[0]["counterparty"] == "owner"
    # The sender was told.
    assert [e["code"] for e in adversary_report(d)["errors"]] == ["bad_frame"]
    assert events(d.audit("label_holder"), "run_end")[-1]["data"]["status"] == "ok"


# -- 2. an unbounded queue of future steps ---------------------------------------------------------


def test_a_flood_of_future_steps_is_refused_in_bounded_memory_and_training_completes(
    vanilla_template: Deploy, tmp_path: Path
) -> None:
    # The violation budget is pinned on its own below; here only the step window is at work.
    d = clone_deployment(vanilla_template, tmp_path / "d", epochs=1, max_steps=6,
                         limits={"max_violations": 100_000})  # fmt: skip
    attacks = [
        {"attack": "future_steps", "count": 60, "nbytes": 4 * MIB, "ahead": 1_000_000},  # 240 MB if queued
        {"attack": "future_steps", "count": 2_000, "nbytes": 64, "ahead": 2_000_000},
    ]
    codes, procs, watch = run_attack(d, attacks)
    assert_no_traceback(*procs.values())
    assert codes == {"label_holder": 0, "owner": 0}, procs["label_holder"].stderr[-3000:]
    # Refused at once (limits.step_window), not queued: far below the 240 MB the flood carries.
    assert watch.growth_mb() < 100
    # Every one was refused, and the log stayed small: refusals past the rate are counted, not
    # written one by one (limits.refusal_audit_per_s, limits.refusal_audit_burst).
    refused = victim_refusals(d)
    assert 0 < len(refused) < 200, len(refused)
    assert "limits.step_window" in refused[0]["reason"]


# -- 3. size checked after allocation ----------------------------------------------------------------


def test_a_message_of_40_frames_is_cut_in_bounded_memory_and_training_completes(
    vanilla_template: Deploy, tmp_path: Path
) -> None:
    # Long enough a run for the 640 MiB to arrive (several seconds of CURVE decryption here).
    d = clone_deployment(vanilla_template, tmp_path / "d", epochs=2, max_steps=30)
    bound = d.read_deployment()["limits"]["max_message_bytes"]
    attacks = [{"attack": "multipart", "frames": 40, "frame_bytes": bound}]  # each frame fits, 40x the bound
    codes, procs, watch = run_attack(d, attacks, trigger=1)
    assert_no_traceback(*procs.values())
    assert codes == {"label_holder": 0, "owner": 0}, procs["label_holder"].stderr[-3000:]
    assert adversary_report(d)["multipart_sent"] == 1
    # Cut after at most (limits.inbound_queue_messages + 2) messages' worth (96 MiB at 16 MiB),
    # never the 640 MiB the message carries.
    growth = watch.growth_mb()
    assert growth < 320, growth
    # The evidence is in the victim's log, either way: the guard cut the connection before the
    # message landed (fast flood), or it landed whole and the gate refused it (the frames are not a
    # message). The run is long enough for either to happen before the log closes.
    entries = d.audit("label_holder")
    cut = [e for e in entries if e["event"] == "transport_refused" and "closed the connection of 'owner'" in e["data"]["reason"]]
    refused = [e for e in entries if e["event"] == "refused" and e["data"]["counterparty"] == "owner"]
    assert cut or refused, json.dumps(entries)[-3000:]


# -- 5. pre-authentication file-descriptor exhaustion ---------------------------------------------------


class IdleFlood:
    """Keeps up to `target` idle TCP connections open to `endpoint`; replaces those the server closes."""

    def __init__(self, endpoint: str, target: int) -> None:
        host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
        self.address = (host, int(port))
        self.target = target
        self.opened = 0
        self.closed_by_server = 0
        self._socks: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            while len(self._socks) < self.target and not self._stop.is_set():
                try:
                    sock = socket.create_connection(self.address, timeout=5)
                except OSError:
                    break  # not listening yet, or the backlog is full: try again shortly
                sock.setblocking(False)
                self._socks.append(sock)
                self.opened += 1
            alive = []
            for sock in self._socks:
                try:
                    data = sock.recv(4096)
                    if data == b"":
                        raise ConnectionResetError
                    alive.append(sock)  # it sent its greeting; still open
                except BlockingIOError:
                    alive.append(sock)
                except OSError:
                    sock.close()
                    self.closed_by_server += 1
            self._socks = alive
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        for sock in self._socks:
            sock.close()


def test_an_idle_connection_flood_under_a_1024_file_limit_does_not_stop_training(
    vanilla_template: Deploy, tmp_path: Path
) -> None:
    d = clone_deployment(vanilla_template, tmp_path / "d", epochs=2, max_steps=20)
    endpoint = d.read_deployment()["peers"][d.coordinator]["endpoint"]
    victim = start_victim(d, prefix=("prlimit", "--nofile=1024:1024", "--"))
    flood = IdleFlood(endpoint, target=1_100)  # no key needed; more than the victim may open
    try:
        # Training starts once the flood has opened more connections than the victim may hold (a
        # short run could otherwise end before the flood is at full strength).
        assert wait_for(lambda: flood.opened > 1_100, 120, interval=0.05), (flood.opened, victim.stderr[-2000:])
        owner = start_peer(d.peer_configs["owner"], workdir=d.workdir)
        codes = wait_peers({"label_holder": victim, "owner": owner}, timeout=RUN_TIMEOUT_S)
    finally:
        flood.stop()
    assert_no_traceback(victim, owner)
    assert codes == {"label_holder": 0, "owner": 0}, victim.stderr[-3000:]
    # Both epochs' checkpoints were written under the flood (the review's crash was at a save).
    saved = [e["data"]["epoch"] for e in events(d.audit("label_holder"), "checkpoint_saved")]
    assert saved == [0, 1]
    assert flood.opened > 1_100 and flood.closed_by_server > 1_000, (flood.opened, flood.closed_by_server)


# -- 6. "keeps serving": the violation rule ---------------------------------------------------------------


def test_bad_messages_within_the_budget_are_refused_answered_and_training_completes(
    vanilla_template: Deploy, tmp_path: Path
) -> None:
    d = clone_deployment(vanilla_template, tmp_path / "d", epochs=1, max_steps=4)
    attacks = [{"attack": "nan_activation"}, {"attack": "wrong_shape"}, {"attack": "denied_kind", "kind": "gradient"}]
    codes, procs, _ = run_attack(d, attacks)
    assert_no_traceback(*procs.values())
    assert codes == {"label_holder": 0, "owner": 0}, procs["label_holder"].stderr[-3000:]
    refusals = victim_refusals(d)
    assert len(refusals) == 3, refusals
    assert any("NaN" in r.get("reason", "") for r in refusals)
    assert len(adversary_report(d)["errors"]) == 3, "each bad message was answered"


@pytest.mark.parametrize(
    ("attack", "exit_code"),
    [({"attack": "nan_activation"}, 5), ({"attack": "denied_kind", "kind": "gradient"}, 4)],
    ids=["malformed-exit-5", "policy-denials-exit-4"],
)
def test_more_violations_than_the_budget_stop_the_run_naming_the_peer(
    vanilla_template: Deploy, tmp_path: Path, attack: dict[str, Any], exit_code: int
) -> None:
    d = clone_deployment(vanilla_template, tmp_path / "d", epochs=1, max_steps=4,
                         limits={"max_violations": 5, "violation_window_s": 600})  # fmt: skip
    codes, procs, _ = run_attack(d, [attack], repeat=5)
    assert_no_traceback(procs["label_holder"])
    assert codes["label_holder"] == exit_code, procs["label_holder"].stderr[-3000:]
    end = events(d.audit("label_holder"), "run_end")[-1]["data"]
    assert "'owner'" in end["reason"] and "limits.max_violations" in end["reason"], end
