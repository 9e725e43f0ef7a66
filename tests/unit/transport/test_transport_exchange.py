"""Two and three transports on loopback exchange multipart messages, intact and correctly named."""

from __future__ import annotations

import os

import pytest

from secure_split.errors import TransportError


def test_two_peers_exchange_multipart_messages_both_ways_intact_and_zero_copy(kit):
    alice, bob = kit.mesh([kit.identity("alice"), kit.identity("bob")])
    assert alice.wait_connected({"bob"}, kit.CONNECT_TIMEOUT_S) == set()
    assert bob.wait_connected({"alice"}, kit.CONNECT_TIMEOUT_S) == set()

    big = os.urandom(4 * 1024 * 1024)
    frames = [b"header", memoryview(big), b""]
    assert alice.send("bob", frames) == 6 + len(big)

    received = bob.recv(kit.CONNECT_TIMEOUT_S)
    assert received is not None
    sender, parts = received
    assert sender == "alice"
    assert all(isinstance(part, memoryview) for part in parts)
    assert [bytes(part) for part in parts] == [b"header", big, b""]

    # The reply travels on bob's own DEALER to alice's ROUTER.
    assert bob.send("alice", [parts[1]]) == len(big)
    reply = alice.recv(kit.CONNECT_TIMEOUT_S)
    assert reply is not None
    assert reply[0] == "bob"
    assert bytes(reply[1][0]) == big

    assert (alice.messages_sent, alice.messages_received) == (1, 1)
    assert (bob.messages_sent, bob.messages_received) == (1, 1)
    assert alice.bytes_sent == bob.bytes_received == 6 + len(big)
    assert bob.bytes_sent == alice.bytes_received == len(big)


def test_received_views_stay_valid_after_later_messages_arrive(kit):
    alice, bob = kit.mesh([kit.identity("alice"), kit.identity("bob")])
    for index in range(3):
        alice.send("bob", [bytes([index]) * 70_000])  # above pyzmq's copy threshold: a real zero-copy frame
    views = []
    for _ in range(3):
        received = bob.recv(kit.CONNECT_TIMEOUT_S)
        assert received is not None
        views.append(received[1][0])
    assert [bytes(view) for view in views] == [bytes([i]) * 70_000 for i in range(3)]


def test_sender_name_is_the_authenticated_key_owner_not_what_the_frames_claim(kit):
    alice, bob, carol = kit.mesh([kit.identity("alice"), kit.identity("bob"), kit.identity("carol")])
    alice.send("carol", [b"sender=bob"])
    bob.send("carol", [b"sender=alice"])

    got = {}
    for _ in range(2):
        received = carol.recv(kit.CONNECT_TIMEOUT_S)
        assert received is not None
        got[received[0]] = bytes(received[1][0])
    assert got == {"alice": b"sender=bob", "bob": b"sender=alice"}


def test_recv_returns_none_when_nothing_arrives_before_the_timeout(kit):
    alice, _bob = kit.mesh([kit.identity("alice"), kit.identity("bob")])
    assert alice.recv(0.05) is None
    assert alice.recv(0) is None


def test_messages_sent_before_the_peer_is_up_are_delivered_once_it_connects(kit):
    alice_id, bob_id = kit.identity("alice"), kit.identity("bob")
    holder = {}

    def build(endpoints):
        directory = {"alice": kit.peer(alice_id, endpoints[0]), "bob": kit.peer(bob_id, endpoints[1])}
        holder["bob"] = kit.transport(bob_id, endpoints[1], directory)
        return [kit.transport(alice_id, endpoints[0], directory)]

    (alice,) = kit.start(2, build)
    alice.send("bob", [b"queued while bob was down"])

    bob = holder["bob"]
    try:
        bob.start()
    except TransportError as error:
        if kit.is_address_in_use(error):
            pytest.skip("bob's port was taken by another process")
        raise
    received = bob.recv(kit.CONNECT_TIMEOUT_S)
    assert received is not None
    assert received[0] == "alice"
    assert bytes(received[1][0]) == b"queued while bob was down"
    assert "bob" in alice.connected_peers()
