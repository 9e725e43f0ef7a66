"""The connection guard: what an outsider's connections or a listed peer's bytes can make a transport
hold is bounded, and honest traffic is never cut.

Attackers here are raw pyzmq sockets and plain TCP sockets on loopback, against a real Transport.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time

import pytest
import zmq

from secure_split.transport import open_files_needed

MIB = 1024 * 1024


def _raw_dealer(ctx: zmq.Context[zmq.Socket[bytes]], client, server_public: str, endpoint: str) -> zmq.Socket[bytes]:
    """A bare DEALER holding `client`'s listed key: it may send any frames it likes."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.curve_serverkey = server_public.encode()
    sock.curve_secretkey = client.secret.encode()
    sock.curve_publickey = client.public.encode()
    sock.setsockopt(zmq.RECONNECT_IVL, 60_000)  # once cut, stay cut
    sock.connect(endpoint)
    return sock


def _pair(kit, **receiver_options):
    """alice and bob, both real transports; bob (the one attacked) with `receiver_options`."""
    alice_id, bob_id = kit.identity("alice"), kit.identity("bob")
    used: dict[str, str] = {}

    def build(endpoints):
        alice_ep, bob_ep = endpoints
        used["bob"] = bob_ep
        directory = {"alice": kit.peer(alice_id, alice_ep), "bob": kit.peer(bob_id, bob_ep)}
        return [kit.transport(bob_id, bob_ep, directory, **receiver_options),
                kit.transport(alice_id, alice_ep, directory)]  # fmt: skip

    bob, alice = kit.start(2, build)
    return alice_id, bob_id, alice, bob, used["bob"]


def _host_port(endpoint: str) -> tuple[str, int]:
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    return host, int(port)


def _cut_events(transport, timeout_s, seen):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        seen.extend(transport.events())
        if any(e.kind == "connection_cut" for e in seen):
            return [e for e in seen if e.kind == "connection_cut"]
        transport.recv(0.05)
    return []


def test_a_multipart_message_over_the_bound_is_cut_before_it_lands(kit):
    alice_id, bob_id, alice, bob, bob_ep = _pair(kit, max_message_bytes=MIB, inbound_queue_messages=2)
    ctx = zmq.Context()
    try:
        rogue = _raw_dealer(ctx, alice_id, bob_id.public, bob_ep)
        rogue.send(b"first, a small message that names the connection's peer")
        assert bob.recv(kit.CONNECT_TIMEOUT_S) is not None
        # 160 frames of 1 MiB: each under the frame bound, the message 160 times the message bound.
        rogue.send_multipart([b"\x00" * MIB] * 160, copy=False)
        seen: list = []
        cuts = _cut_events(bob, kit.CONNECT_TIMEOUT_S, seen)
        assert cuts, "the 160 MiB message was not cut"
        assert cuts[0].peer == "alice"
        held = int(re.search(r"(\d+) bytes arrived", cuts[0].detail).group(1))  # type: ignore[union-attr]
        # Bound: (queue + 2) messages of 1 MiB + 64 KiB header allowance, plus what arrives between
        # two inspections of the guard thread (10 ms apart on an idle machine; 14.6 and 31 MB were
        # seen beside a full test run, when the thread waits for a core): the cut comes long before
        # the message's 160 MiB, whatever the load.
        assert held < 64 * MIB, held
        assert bob.connection_stats().cut.get("backlog") == 1
        assert bob.recv(0.5) is None, "no part of the cut message was delivered"
    finally:
        ctx.destroy(linger=0)
    # The real alice's own connection was not touched.
    alice.send("bob", [b"still here"])
    received = bob.recv(kit.CONNECT_TIMEOUT_S)
    assert received is not None and bytes(received[1][0]) == b"still here"


@pytest.mark.parametrize("pauses", [(), (5, 40)], ids=["steady", "reader-pauses"])
def test_an_honest_sender_of_maximal_messages_is_never_cut(kit, pauses):
    _, _, alice, bob, _ = _pair(kit, max_message_bytes=MIB, inbound_queue_messages=2)
    assert alice.wait_connected({"bob"}, kit.CONNECT_TIMEOUT_S) == set()
    payload = b"\x07" * (MIB - 1024)
    count = 60
    sender = threading.Thread(target=lambda: [alice.send("bob", [payload]) for _ in range(count)])
    sender.start()
    got = 0
    try:
        while got < count:
            received = bob.recv(kit.CONNECT_TIMEOUT_S)
            assert received is not None, f"only {got} of {count} messages arrived"
            got += 1
            if got in pauses:
                time.sleep(2.0)  # the reader stalls: libzmq stops reading, nothing may be cut
    finally:
        sender.join(timeout=60)
    assert bob.connection_stats().cut == {}
    assert not [e for e in bob.events() if e.kind == "connection_cut"]


def test_idle_connections_beyond_the_caps_are_closed_at_once_and_peers_keep_talking(kit):
    _, _, alice, bob, bob_ep = _pair(kit, max_unauthenticated=8, max_unauthenticated_per_source=3)
    assert alice.wait_connected({"bob"}, kit.CONNECT_TIMEOUT_S) == set()
    idle = [socket.create_connection(_host_port(bob_ep), timeout=kit.CONNECT_TIMEOUT_S) for _ in range(60)]
    try:
        deadline = time.monotonic() + kit.CONNECT_TIMEOUT_S
        while bob.connection_stats().cut.get("unauthenticated", 0) < 57 and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = bob.connection_stats()
        assert stats.cut.get("unauthenticated", 0) >= 57
        assert stats.unauthenticated <= 3
        closed = 0
        for sock in idle:
            sock.settimeout(1.0)  # the server closed them already (its stats say so): EOF is here
            try:
                closed += _is_closed(sock)
            except TimeoutError:  # still open: one of the few the caps allow
                pass
            except OSError:  # reset: closed too
                closed += 1
        assert closed >= 57, closed
        alice.send("bob", [b"through the flood"])
        received = bob.recv(kit.CONNECT_TIMEOUT_S)
        assert received is not None and bytes(received[1][0]) == b"through the flood"
        cuts = [e for e in bob.events() if e.kind == "connection_cut"]
        assert cuts and cuts[0].peer is None and "limits.max_unauthenticated_per_source" in cuts[0].detail
        assert len(cuts) < 10, "repeated cuts from one source fold into few events"
    finally:
        for sock in idle:
            sock.close()


def _is_closed(sock: socket.socket) -> bool:
    """Read what the server sent (a greeting, perhaps) until EOF; True when the server closed."""
    while True:
        data = sock.recv(4096)
        if not data:
            return True


def test_a_connection_that_never_authenticates_is_closed_after_the_handshake_timeout(kit):
    _, _, _, bob, bob_ep = _pair(kit, handshake_timeout_s=0.5)
    with socket.create_connection(_host_port(bob_ep), timeout=kit.CONNECT_TIMEOUT_S) as idle:
        assert _is_closed(idle)
    deadline = time.monotonic() + kit.CONNECT_TIMEOUT_S
    while bob.connection_stats().unauthenticated and time.monotonic() < deadline:
        time.sleep(0.05)
    assert bob.connection_stats().unauthenticated == 0


def test_a_peer_holding_more_connections_than_allowed_loses_the_oldest(kit):
    alice_id, bob_id, _, bob, bob_ep = _pair(kit, connections_per_peer=2)
    ctx = zmq.Context()
    try:
        extra = [_raw_dealer(ctx, alice_id, bob_id.public, bob_ep) for _ in range(3)]
        for index, sock in enumerate(extra):
            sock.send(f"from extra connection {index}".encode())
        for _ in extra:
            assert bob.recv(kit.CONNECT_TIMEOUT_S) is not None
        seen: list = []
        cuts = _cut_events(bob, kit.CONNECT_TIMEOUT_S, seen)
        assert cuts and cuts[0].peer == "alice" and "limits.connections_per_peer" in cuts[0].detail
        deadline = time.monotonic() + kit.CONNECT_TIMEOUT_S
        while bob.connection_stats().cut.get("per_peer", 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert bob.connection_stats().cut.get("per_peer", 0) >= 1
    finally:
        ctx.destroy(linger=0)


def test_a_server_that_pushes_messages_to_our_outbound_connection_is_cut(kit):
    alice_id, bob_id = kit.identity("alice"), kit.identity("bob")
    (bob_ep,) = kit.endpoints(1)
    ctx = zmq.Context()
    try:
        # A hostile "bob": a bare CURVE ROUTER with bob's listed key, no allowlist.
        server = ctx.socket(zmq.ROUTER)
        server.setsockopt(zmq.LINGER, 0)
        server.curve_server = True
        server.curve_secretkey = bob_id.secret.encode()
        server.curve_publickey = bob_id.public.encode()
        server.bind(bob_ep)

        def build(endpoints):
            (alice_ep,) = endpoints
            return [kit.transport(alice_id, alice_ep, {"bob": kit.peer(bob_id, bob_ep)})]

        (alice,) = kit.start(1, build)
        alice.send("bob", [b"hello"])
        assert server.poll(kit.CONNECT_TIMEOUT_S * 1000)
        routing_id, _ = server.recv_multipart()
        server.send_multipart([routing_id] + [b"\x00" * (60 * 1024)] * 40)  # 2.4 MB at our DEALER
        seen: list = []
        cuts = _cut_events(alice, kit.CONNECT_TIMEOUT_S, seen)
        assert cuts and cuts[0].peer == "bob" and "nothing but heartbeats" in cuts[0].detail
    finally:
        ctx.destroy(linger=0)


# -- the open-file budget ---------------------------------------------------------------------------


def _with_nofile(limit_soft: int, limit_hard: int, code: str) -> subprocess.CompletedProcess[str]:
    script = (
        "import resource\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({limit_soft}, {limit_hard}))\n"
        "from secure_split.transport import ensure_open_file_limit\n" + code
    )
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)


def test_the_open_file_budget_counts_every_admitted_connection() -> None:
    base = open_files_needed(1, max_unauthenticated=16, connections_per_peer=2)
    assert open_files_needed(1, max_unauthenticated=116, connections_per_peer=2) == base + 100
    assert open_files_needed(2, max_unauthenticated=16, connections_per_peer=2) > base + 2
    assert base < 1024, "the defaults of a two-peer deployment fit the usual limit of 1024"


def test_a_soft_limit_below_the_budget_is_raised_to_the_hard_limit() -> None:
    done = _with_nofile(256, 4096, "print(ensure_open_file_limit(600))\n"
                                   "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["4096", "4096"]


def test_a_hard_limit_below_the_budget_is_a_config_error_that_says_how_to_fix_it() -> None:
    done = _with_nofile(256, 512, "from secure_split.errors import ConfigError\n"
                                  "try:\n    ensure_open_file_limit(600)\n"
                                  "except ConfigError as e:\n    print(e)\n")
    assert done.returncode == 0, done.stderr
    assert "may need 600 open files" in done.stdout and "ulimit -n 600" in done.stdout
    assert "limits.max_unauthenticated" in done.stdout


def test_idle_connections_holding_the_slots_are_evicted_for_a_newcomer(kit):
    alice_id, bob_id, alice, bob, bob_ep = _pair(kit, max_unauthenticated=8, max_unauthenticated_per_source=3)
    assert alice.wait_connected({"bob"}, kit.CONNECT_TIMEOUT_S) == set()
    # From a source address of their own (127.0.0.2): a socket an earlier test left reconnecting
    # to a port bob now reuses cannot take this source's slots.
    source = ("127.0.0.2", 0)
    idle = [socket.create_connection(_host_port(bob_ep), timeout=kit.CONNECT_TIMEOUT_S, source_address=source)
            for _ in range(3)]
    ctx = zmq.Context()
    try:
        deadline = time.monotonic() + kit.CONNECT_TIMEOUT_S
        while bob.connection_stats().unauthenticated < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        # At least these 3 (a socket another test left reconnecting may add one from 127.0.0.1:
        # seen once as 4 beside a parallel run; it does not touch this source's slots).
        assert bob.connection_stats().unauthenticated >= 3, bob.connection_stats()
        # The slots of this source are full of connections that never speak. Once they have idled
        # past the grace period, a newcomer evicts the oldest instead of being refused.
        time.sleep(1.2)  # part of the scenario: the idle ones must be older than PENDING_GRACE_S
        newcomer = _raw_dealer(ctx, alice_id, bob_id.public, bob_ep.replace("tcp://", "tcp://127.0.0.2:0;"))
        newcomer.send(b"a peer that connects while idle connections hold the slots")
        received = bob.recv(kit.CONNECT_TIMEOUT_S)
        assert received is not None and received[0] == "alice"
        assert bob.connection_stats().cut.get("unauthenticated", 0) >= 1
    finally:
        ctx.destroy(linger=0)
        for sock in idle:
            sock.close()
