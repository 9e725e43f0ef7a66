"""The transport's contract: socket security options, lifecycle, argument checks, no secrets shown."""

from __future__ import annotations

import pytest
import zmq

from secure_split.errors import ConfigError, TransportError
from secure_split.transport import HEADER_ALLOWANCE_BYTES, Transport, TransportPeer


def test_router_enforces_its_zap_domain_as_a_curve_server(kit):
    (alice,) = kit.mesh([kit.identity("alice")], max_message_bytes=1000, heartbeat_s=0.5)
    router = alice._router  # reading back the live socket is the point of this test
    assert router.getsockopt(zmq.MECHANISM) == zmq.CURVE
    assert router.getsockopt(zmq.CURVE_SERVER) == 1
    assert router.getsockopt(zmq.ZAP_ENFORCE_DOMAIN) == 1
    assert router.getsockopt(zmq.ZAP_DOMAIN) == b"secure-split"
    assert router.getsockopt(zmq.MAXMSGSIZE) == 1000 + HEADER_ALLOWANCE_BYTES
    assert router.getsockopt(zmq.HEARTBEAT_IVL) == 500
    assert router.getsockopt(zmq.HEARTBEAT_TIMEOUT) == 1500


def test_dealers_are_curve_clients_with_a_bounded_send_wait(kit):
    # The pinned server key cannot be read back (libzmq reports EINVAL); the wrong-key test in
    # test_transport_auth.py shows that it is used.
    alice, _bob = kit.mesh([kit.identity("alice"), kit.identity("bob")])
    dealer = alice._dealers["bob"]
    assert dealer.getsockopt(zmq.MECHANISM) == zmq.CURVE
    assert dealer.getsockopt(zmq.CURVE_SERVER) == 0
    assert dealer.getsockopt(zmq.SNDTIMEO) > 0  # a full queue raises instead of blocking forever


def test_close_is_idempotent_and_the_closed_transport_refuses_work(kit):
    alice, _bob = kit.mesh([kit.identity("alice"), kit.identity("bob")])
    alice.close()
    alice.close()
    with pytest.raises(TransportError, match="closed"):
        alice.send("bob", [b"late"])
    with pytest.raises(TransportError, match="closed"):
        alice.recv(0)
    with pytest.raises(TransportError, match="closed"):
        alice.start()


def test_context_manager_closes_the_transport(kit):
    alice_id, bob_id = kit.identity("alice"), kit.identity("bob")
    endpoints = kit.endpoints(2)
    directory = {"alice": kit.peer(alice_id, endpoints[0]), "bob": kit.peer(bob_id, endpoints[1])}
    with Transport(
        "alice", endpoints[0], alice_id.secret, alice_id.public, directory, max_message_bytes=10, linger_ms=0
    ) as alice:
        pass  # never started: close must cope with that too
    with pytest.raises(TransportError, match="closed"):
        alice.send("bob", [b"x"])


def test_sending_before_start_or_to_an_unknown_peer_is_a_transport_error(kit):
    alice_id, bob_id = kit.identity("alice"), kit.identity("bob")
    endpoints = kit.endpoints(2)
    directory = {"bob": kit.peer(bob_id, endpoints[1])}
    alice = kit.transport(alice_id, endpoints[0], directory)
    with pytest.raises(TransportError, match="start"):
        alice.send("bob", [b"x"])
    (alice,) = kit.start(2, lambda eps: [kit.transport(alice_id, eps[0], {"bob": kit.peer(bob_id, eps[1])})])
    with pytest.raises(TransportError, match=r"unknown peer 'carol'.*bob"):
        alice.send("carol", [b"x"])
    with pytest.raises(TransportError, match="empty"):
        alice.send("bob", [])
    with pytest.raises(TransportError, match="unknown peer"):
        alice.wait_connected({"carol"}, 0.01)


def test_binding_a_taken_port_fails_with_a_transport_error_naming_the_endpoint(kit):
    (alice,) = kit.mesh([kit.identity("alice")])
    bind = alice._bind_endpoint
    other_id = kit.identity("other")
    other = kit.transport(other_id, bind, {})
    with pytest.raises(TransportError, match=bind) as raised:
        other.start()
    assert kit.is_address_in_use(raised.value)


def test_invalid_arguments_are_all_reported_at_once_without_showing_the_secret_key(kit):
    me, peer = kit.identity("me"), kit.identity("peer")
    _, other_secret = zmq.curve_keypair()
    peers = {
        "peer": TransportPeer(name="peer", endpoint="tcp://127.0.0.1", transport_key=peer.public),
        "twin": TransportPeer(name="twin", endpoint="tcp://127.0.0.1:1", transport_key=peer.public),
        "bad": TransportPeer(name="bad", endpoint="tcp://127.0.0.1:2", transport_key="short"),
    }
    with pytest.raises(ConfigError) as raised:
        Transport(
            "me", "udp://x", other_secret.decode(), me.public, peers, max_message_bytes=0, heartbeat_s=0
        )
    text = str(raised.value)
    keys = {problem.key for problem in raised.value.problems}
    assert {
        "bind_endpoint",
        "public_key",
        "peers.peer.endpoint",
        "peers.twin.transport_key",
        "peers.bad.transport_key",
        "max_message_bytes",
        "heartbeat_s",
    } <= keys
    assert other_secret.decode() not in text


def test_repr_and_errors_never_contain_the_secret_key(kit):
    alice_id, bob_id = kit.identity("alice"), kit.identity("bob")
    alice, _bob = kit.mesh([alice_id, bob_id])
    assert alice_id.secret not in repr(alice)
    assert "alice" in repr(alice)
    with pytest.raises(TransportError) as raised:
        alice.send("nobody", [b"x"])
    assert alice_id.secret not in str(raised.value)
    assert alice._secret_key is None  # dropped once the sockets hold it


def test_own_entry_in_peers_is_ignored_and_gets_no_channel(kit):
    alice, _bob = kit.mesh([kit.identity("alice"), kit.identity("bob")])
    assert alice.wait_connected({"bob"}, kit.CONNECT_TIMEOUT_S) == set()
    assert alice.connected_peers() == {"bob"}
    with pytest.raises(TransportError, match="unknown peer 'alice'"):
        alice.send("alice", [b"to myself"])
