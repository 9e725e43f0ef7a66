"""The WAN harness (bench/wan.py): namespaces come and go, delay and loss are really applied.

Needs root, the `ip` tool and /dev/net/tun; skipped with the reason elsewhere. Assertions are
lower bounds (a delay cannot be shorter than emulated) or counts the seeded forwarder fixes; none
depends on how fast an idle machine is.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest


def load_wan() -> ModuleType:
    """bench/ is a folder of scripts, not a package: load bench/wan.py by path."""
    path = Path(__file__).resolve().parents[3] / "bench" / "wan.py"
    spec = importlib.util.spec_from_file_location("secure_split_bench_wan", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


wan = load_wan()
UNAVAILABLE = wan.unavailable_reason()
pytestmark = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"no emulated WAN here: {UNAVAILABLE}")

_UDP_SEND = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(int(sys.argv[2])):
    s.sendto(b"x" * 100, (sys.argv[1], 9000))
    if i % 5 == 4:
        time.sleep(0.01)  # stay far below the TUN queue, so only the emulated loss drops packets
"""


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_round_trip_is_at_least_twice_the_one_way_delay_and_loss_is_applied():
    out = wan.measure(wan.Link(delay_ms=30, loss=0.01), rounds=10, megabytes=2)
    assert out["rtt_ms"]["min"] >= 60.0
    assert out["throughput_mbit"] > 0
    assert out["lost"] > 0  # about 1 % of some 2,000 packets; the forwarder's seed fixes which


def test_the_loss_fraction_is_what_the_link_says():
    with wan.Wan(["a", "b"], wan.Link(loss=0.3), seed=1) as net:
        done = net.run("a", [sys.executable, "-c", _UDP_SEND, net.ip("b"), "400"])
        assert done.returncode == 0, done.stderr
        counters = {}
        for _ in range(50):  # the forwarder writes its counters twice a second
            counters = net.link_stats().get("a>b", {})
            if counters.get("packets", 0) + counters.get("lost", 0) >= 400:
                break
            time.sleep(0.2)
    sent = counters["packets"] + counters["lost"]
    assert sent == 400
    assert 0.2 < counters["lost"] / sent < 0.4


def test_leaving_the_block_kills_its_processes_and_deletes_the_namespaces_even_on_an_error():
    with pytest.raises(RuntimeError, match="boom"), wan.Wan(["a", "b"]) as net:
        names = {net.namespace("a"), net.namespace("b")}
        assert names <= _namespaces()
        sleeper = net.popen("a", ["sleep", "600"])
        raise RuntimeError("boom")
    assert not names & _namespaces()
    assert sleeper.poll() is not None


def test_cleanup_removes_namespaces_of_a_dead_harness_and_spares_a_live_one():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = f"{wan.PREFIX}{dead.pid}x0h0"
    mine = f"{wan.PREFIX}{os.getpid()}x999h0"
    for ns in (orphan, mine):
        subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        removed = wan.cleanup_leftovers()
        assert orphan in removed
        assert mine not in removed
        assert mine in _namespaces()
        assert orphan not in _namespaces()
    finally:
        for ns in (orphan, mine):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
