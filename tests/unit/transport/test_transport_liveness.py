"""Heartbeats find a stalled or dead peer within seconds; oversized frames never get through."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import pytest

from secure_split.errors import PeerTimeout
from secure_split.transport import Transport

# A peer in its own process: binds, says hello to the test's transport, then serves until
# killed. It exits on its own when orphaned or after a minute, so a crashed test leaks nothing.
_CHILD = """
import json, os, sys, time
from secure_split.errors import TransportError
from secure_split.transport import Transport, TransportPeer
spec = json.loads(os.environ["TRANSPORT_CHILD_SPEC"])
peers = {p["name"]: TransportPeer(**p) for p in spec["peers"]}
t = Transport(spec["name"], spec["endpoint"], spec["secret"], spec["public"], peers,
              max_message_bytes=1024, heartbeat_s=spec["heartbeat_s"], linger_ms=0)
try:
    t.start()
except TransportError:
    print("BIND-FAILED", flush=True)
    sys.exit(3)
t.send(spec["parent"], [b"hello from child"])
print("READY", flush=True)
parent, deadline = os.getppid(), time.monotonic() + 60
while os.getppid() == parent and time.monotonic() < deadline:
    t.recv(0.2)
t.close()
"""

HEARTBEAT_S = 0.2
# Heartbeat timeout is 3 intervals (0.6 s); the bound is generous for a loaded 2-core machine.
DETECTION_BOUND_S = 15.0
CHILD_START_BOUND_S = 60.0  # interpreter start + imports on a loaded machine


def _start_child(kit, parent_id, child_id):
    """Start the parent transport here and the child peer in a subprocess; retry on taken ports."""
    for _ in range(6):
        parent_ep, child_ep = kit.endpoints(2)
        parent = kit.transport(
            parent_id, parent_ep, {"child": kit.peer(child_id, child_ep)}, heartbeat_s=HEARTBEAT_S
        )
        try:
            parent.start()
        except Exception as error:
            if kit.is_address_in_use(error):
                continue
            raise
        spec = {
            "name": "child",
            "endpoint": child_ep,
            "secret": child_id.secret,
            "public": child_id.public,
            "parent": parent_id.name,
            "heartbeat_s": HEARTBEAT_S,
            "peers": [{"name": parent_id.name, "endpoint": parent_ep, "transport_key": parent_id.public}],
        }
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD],
            env={**os.environ, "TRANSPORT_CHILD_SPEC": json.dumps(spec)},
            stdout=subprocess.PIPE,
            text=True,
        )
        # Bounded wait for the child's first line: a hung child must fail the test, not stall it.
        ready, _, _ = select.select([child.stdout], [], [], CHILD_START_BOUND_S)
        status = child.stdout.readline().strip() if ready else "(nothing)"
        if status == "READY":
            return parent, child
        child.kill()
        child.wait()
        parent.close()
        if status != "BIND-FAILED":
            pytest.fail(f"child peer did not start (said {status!r}, exit {child.returncode})")
    pytest.fail("no free port pair found for the child peer")


@pytest.mark.parametrize("stop_signal", [signal.SIGSTOP, signal.SIGKILL], ids=["stalled", "killed"])
def test_stalled_or_dead_peer_shows_up_as_disconnected_within_seconds(kit, stop_signal):
    parent, child = _start_child(kit, kit.identity("parent"), kit.identity("child"))
    try:
        received = parent.recv(kit.CONNECT_TIMEOUT_S)
        assert received is not None
        assert (received[0], bytes(received[1][0])) == ("child", b"hello from child")
        assert parent.wait_connected({"child"}, kit.CONNECT_TIMEOUT_S) == set()
        parent.events()  # forget the connection events; only what follows the signal matters

        os.kill(child.pid, stop_signal)
        lost = kit.wait_for_event(
            parent, lambda e: e.kind == "disconnected" and e.peer == "child", DETECTION_BOUND_S
        )
        assert lost is not None, "the parent never noticed that its peer stopped answering"
        assert "child" not in parent.connected_peers()
    finally:
        child.kill()  # SIGKILL also ends a stopped process
        child.wait(timeout=30)
        child.stdout.close()


def _strict_receiver_and_lenient_sender(kit: Any) -> list[Transport]:
    """A started (receiver, sender) pair; the receiver accepts at most 64 KiB (+ header allowance).

    The sender is more lenient, so its own size check lets an oversized message onto the wire.
    """
    sender_id, receiver_id = kit.identity("sender"), kit.identity("receiver")

    def build(endpoints: Sequence[str]) -> list[Transport]:
        sender_ep, receiver_ep = endpoints
        return [
            kit.transport(receiver_id, receiver_ep, {"sender": kit.peer(sender_id, sender_ep)},
                          max_message_bytes=64 * 1024),
            kit.transport(sender_id, sender_ep, {"receiver": kit.peer(receiver_id, receiver_ep)}),
        ]  # fmt: skip

    return kit.start(2, build)


def test_frame_above_max_message_size_is_not_delivered_and_drops_the_connection(kit):
    receiver, sender = _strict_receiver_and_lenient_sender(kit)
    assert sender.wait_connected({"receiver"}, kit.CONNECT_TIMEOUT_S) == set()
    sender.events()

    sender.send("receiver", [b"\x00" * (1024 * 1024)])
    dropped = kit.wait_for_event(
        sender, lambda e: e.kind == "disconnected" and e.peer == "receiver", kit.CONNECT_TIMEOUT_S
    )
    assert dropped is not None, "the receiver kept a connection that sent an oversized frame"

    # zmq reconnects; the next (small) message is the first thing ever delivered.
    sender.send("receiver", [b"small"])
    received = receiver.recv(kit.CONNECT_TIMEOUT_S)
    assert received is not None
    assert (received[0], [bytes(f) for f in received[1]]) == ("sender", [b"small"])
    assert receiver.messages_received == 1


def test_many_frames_each_below_the_bound_but_too_big_together_are_dropped(kit):
    receiver, sender = _strict_receiver_and_lenient_sender(kit)
    sender.send("receiver", [b"\x01" * (60 * 1024)] * 4)  # each frame fits, the message does not
    sender.send("receiver", [b"after"])
    received = receiver.recv(kit.CONNECT_TIMEOUT_S)
    assert received is not None
    assert [bytes(f) for f in received[1]] == [b"after"]
    assert any(e.kind == "message_dropped" and e.peer == "sender" for e in receiver.events())


def test_send_raises_peer_timeout_when_the_peer_never_drains_its_queue(kit):
    alice_id, ghost_id = kit.identity("alice"), kit.identity("ghost")

    def build(endpoints):
        alice_ep, ghost_ep = endpoints  # nobody ever listens on ghost_ep
        return [
            kit.transport(alice_id, alice_ep, {"ghost": kit.peer(ghost_id, ghost_ep)}, send_timeout_s=0.05)
        ]

    (alice,) = kit.start(2, build)
    with pytest.raises(PeerTimeout) as raised:
        for _ in range(10_000):  # far above the queue bound
            alice.send("ghost", [b"x"])
    assert raised.value.peer == "ghost"
    assert alice.wait_connected({"ghost"}, 0.05) == {"ghost"}
