"""ECDH-PSI over ristretto255 (the ring `MultiPartyPsi`, also for two parties): exact
intersections, blinded views, refusal of bad bytes.

The ring is sans-IO; `_run` delivers its steps in FIFO order, as one ZeroMQ connection per pair
of peers does (the peer runs it through `secure_split.peer.rounds.psi.PsiRound`; reordered and
delayed delivery of that round: tests/unit/peer/test_rounds.py).
"""

from __future__ import annotations

import os
import random
import struct
from collections import deque
from collections.abc import Sequence

import pytest
import rbcl

from secure_split.crypto.psi import (
    POINT_BYTES,
    MultiPartyPsi,
    PsiId,
    PsiResult,
    PsiStep,
    blind_points,
    decode_points,
    hash_ids,
    new_scalar,
)
from secure_split.errors import CryptoError, LocalProtocolError, RemoteProtocolError

SALT = b"session-0123456789abcdef"
PAIR = ["lh", "a"]
HEADER = 22  # magic, version, kind, origin, hops, session tag, count (see MultiPartyPsi)
SET, MATCHES_SHUFFLED, MATCHES = 1, 2, 3  # the kind byte, payload[5]


def _points(body: bytes) -> list[bytes]:
    return [body[i : i + POINT_BYTES] for i in range(0, len(body), POINT_BYTES)]


def _run(parties: Sequence[MultiPartyPsi]) -> tuple[dict[str, PsiResult], list[PsiStep]]:
    """Start every party, deliver every step in FIFO order; the results and the transcript."""
    by_name = {p.me: p for p in parties}
    queue = deque(step for party in parties for step in party.start())
    transcript: list[PsiStep] = []
    while queue:
        step = queue.popleft()
        transcript.append(step)
        queue.extend(by_name[step.receiver].receive(step.sender, step.payload))
    assert all(p.finished for p in parties), "the ring stalled"
    return {p.me: p.result() for p in parties}, transcript


def _ring(sets: dict[str, list[PsiId]], salt: bytes = SALT) -> tuple[list[MultiPartyPsi], list[PsiStep]]:
    parties = [MultiPartyPsi(name, list(sets), ids, salt=salt) for name, ids in sets.items()]
    _, transcript = _run(parties)
    return parties, transcript


def _rebody(payload: bytes, body: bytes, unit: int = POINT_BYTES) -> bytes:
    """A crafted message: a genuine header (kind, origin, hops, session tag) over another body,
    its count set to match the body (so only the body's content is wrong)."""
    return payload[:18] + struct.pack("<I", len(body) // unit) + body


def _kind(step: PsiStep) -> int:
    return step.payload[5]


# -- exact results ----------------------------------------------------------------------------


def test_blinding_commutes_on_ristretto255() -> None:
    a, b = new_scalar(), new_scalar()
    points = hash_ids([1, "two", b"three"], salt=SALT)
    ab = blind_points(a, blind_points(b, points))
    ba = blind_points(b, blind_points(a, points))
    assert ab == ba
    assert blind_points(a, points) != blind_points(b, points)


def test_two_party_ring_gives_the_exact_intersection_to_both_sides() -> None:
    ids_lh = list(range(0, 1500))
    ids_a = [*range(1000, 2200), 5, 7]
    parties, transcript = _ring({"lh": ids_lh, "a": ids_a})
    expected = sorted(set(ids_lh) & set(ids_a))
    lh, a = parties
    assert lh.intersection() == a.intersection() == expected
    assert [ids_a[i] for i in a.result().positions] == expected
    assert [ids_lh[i] for i in lh.result().positions] == expected
    assert lh.set_sizes == a.set_sizes == {"lh": 1500, "a": 1202}
    # n^2 + 2n messages, of which one fully blinded set and one position list stay inside lh
    assert len(transcript) == 6
    assert {(s.sender, s.receiver) for s in transcript} == {("lh", "a"), ("a", "lh")}


@pytest.mark.slow
def test_two_party_ring_is_exact_on_100k_ids_with_partial_overlap() -> None:
    # Full size (100,000 ids per side: 40-60 s on 2 shared cores) with SECURE_SPLIT_SLOW=1; 10,000 by default.
    n = 100_000 if os.environ.get("SECURE_SPLIT_SLOW") == "1" else 10_000
    rng = random.Random(7)
    universe = rng.sample(range(10**12), 2 * n - n // 3)
    ids_lh, ids_a = universe[:n], universe[n - n // 3 :]
    rng.shuffle(ids_a)
    lh, a = _ring({"lh": ids_lh, "a": ids_a})[0]
    expected = sorted(set(ids_lh) & set(ids_a))
    assert len(expected) == n // 3
    assert lh.intersection() == a.intersection() == expected
    assert [ids_lh[i] for i in lh.result().positions] == expected
    assert [ids_a[i] for i in a.result().positions] == expected


def test_three_party_ring_gives_every_party_the_exact_intersection() -> None:
    sets: dict[str, list[PsiId]] = {
        "label_holder": list(range(0, 2000)),
        "hospital_a": list(range(500, 2600)),
        "hospital_b": list(range(0, 3000, 2)),
    }
    parties, transcript = _ring(sets)
    expected = sorted(set.intersection(*(set(s) for s in sets.values())))
    assert len(expected) == 750
    for party in parties:
        assert party.intersection() == expected
        assert [sets[party.me][i] for i in party.result().positions] == expected
        assert party.set_sizes == {name: len(ids) for name, ids in sets.items()}
    # every message went to the ring neighbour, the coordinator, or back along the path
    assert {(s.sender, s.receiver) for s in transcript} <= {
        ("label_holder", "hospital_a"), ("hospital_a", "hospital_b"), ("hospital_b", "label_holder"),
        ("hospital_a", "label_holder"), ("label_holder", "hospital_b"),
    }  # fmt: skip
    assert len(transcript) == 3 * 3 + 2 * 3 - 2


def test_ring_result_does_not_depend_on_delivery_order() -> None:
    sets: dict[str, list[PsiId]] = {
        "lh": list(range(300)),
        "a": list(range(100, 400)),
        "b": list(range(50, 250)),
        "c": [120, 130, 999],
    }
    parties = [MultiPartyPsi(name, list(sets), ids, salt=SALT) for name, ids in sets.items()]
    by_name = {p.me: p for p in parties}
    rng = random.Random(3)
    not_started = parties[1:]
    queue = parties[0].start()
    while queue or not_started:
        # parties start late (a message may arrive before start()) and messages arrive shuffled
        if not_started and (not queue or rng.random() < 0.3):
            queue.extend(not_started.pop(rng.randrange(len(not_started))).start())
            continue
        step = queue.pop(rng.randrange(len(queue)))
        queue.extend(by_name[step.receiver].receive(step.sender, step.payload))
    assert all(p.finished and p.intersection() == [120, 130] for p in parties)


def test_ids_match_by_type_and_value() -> None:
    lh, a = _ring({"lh": ["7", "8", "x"], "a": ["8", "x", "y"]})[0]
    assert lh.intersection() == a.intersection() == ["8", "x"]
    lh, a = _ring({"lh": [b"\x00id", b"k"], "a": [b"k", b"\x00id"]})[0]
    assert a.intersection() == [b"\x00id", b"k"]
    lh, a = _ring({"lh": [7, 8], "a": ["7", "8"]})[0]
    assert lh.intersection() == [] and a.intersection() == []


# -- what each party sees ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "sets",
    [
        {"label_holder": list(range(0, 300)), "bank": list(range(200, 500))},
        {
            "label_holder": list(range(0, 400)),
            "hospital_a": list(range(200, 600)),
            "hospital_b": list(range(300, 800)),
        },
    ],
    ids=["two parties", "three parties"],
)
def test_no_ring_party_receives_points_it_can_match_to_a_guessed_id(sets: dict[str, list[PsiId]]) -> None:
    parties, transcript = _ring(sets)
    # every id any party holds, in the intersection or not, and ids nobody holds
    universe = sorted(set().union(*(set(s) for s in sets.values())) | {10_000, 10_001})
    plain = hash_ids(universe, salt=SALT)
    for party in parties:
        received: set[bytes] = set()
        for step in transcript:
            if step.receiver == party.me and _kind(step) == SET:
                received |= set(_points(step.payload[HEADER:]))
        assert received
        own_key = blind_points(party._own.scalar, plain)  # what this party can compute itself
        assert received.isdisjoint(plain)
        assert received.isdisjoint(own_key)


def test_in_a_two_party_ring_only_the_coordinator_matches_and_only_the_intersection() -> None:
    ids_lh, ids_a = list(range(0, 300)), list(range(200, 500))
    (lh, a), transcript = _ring({"lh": ids_lh, "a": ids_a})
    to_lh = {
        s.payload[8]: _points(s.payload[HEADER:])
        for s in transcript
        if s.receiver == "lh" and _kind(s) == SET
    }
    partial, full = to_lh[1], to_lh[2]  # a·H(y) from a; lh's own set under both keys, shuffled by a
    # The coordinator's only matches: the owner's points under both keys against its own: |I|.
    assert len(set(blind_points(lh._own.scalar, partial)) & set(full)) == len(lh.intersection()) == 100
    # The owner never holds two sets under the same keys: nothing it can blind matches anything it got.
    to_a = [
        p for s in transcript if s.receiver == "a" and _kind(s) == SET for p in _points(s.payload[HEADER:])
    ]
    assert set(blind_points(a._own.scalar, to_a)).isdisjoint(to_a)


def test_every_set_leaves_its_owner_shuffled_and_the_last_blinder_shuffles_it_again() -> None:
    ids = list(range(1000))
    lh = MultiPartyPsi("lh", PAIR, ids, salt=SALT)
    a = MultiPartyPsi("a", PAIR, [1], salt=SALT)
    (sent,) = lh.start()
    on_wire = _points(sent.payload[HEADER:])
    in_order = blind_points(lh._own.scalar, hash_ids(ids, salt=SALT))
    assert sorted(on_wire) == sorted(in_order)
    assert on_wire != in_order
    (full,) = a.receive("lh", sent.payload)  # a is the last blinder of lh's set
    back = _points(full.payload[HEADER:])
    blinded_in_lh_order = blind_points(a._own.scalar, on_wire)
    assert sorted(back) == sorted(blinded_in_lh_order)
    assert back != blinded_in_lh_order


# -- refusals ---------------------------------------------------------------------------------

_BAD_POINTS = [
    b"\xff" * 32,  # not a canonical field element
    bytes(32),  # the identity (rbcl's is_valid_point accepts it; blinding it is pointless)
    bytes([0xF0] * 31 + [0x7F]),  # a field element >= 2**255 - 19: not canonical
]


@pytest.mark.parametrize("bad", _BAD_POINTS)
def test_invalid_points_are_refused_with_crypto_error(bad: bytes) -> None:
    good = rbcl.crypto_core_ristretto255_random()
    with pytest.raises(CryptoError, match="not a valid ristretto255"):
        decode_points(good + bad, what="a set")
    (sent,) = MultiPartyPsi("lh", PAIR, [1, 2], salt=SALT).start()
    a = MultiPartyPsi("a", PAIR, [1], salt=SALT)
    with pytest.raises(CryptoError, match="not a valid ristretto255"):
        a.receive("lh", _rebody(sent.payload, good + bad))
    assert a.receive("lh", sent.payload)  # refused bytes do not spend the genuine message


def test_a_second_encoding_with_bit_255_set_is_refused() -> None:
    # rbcl's libsodium ignores bit 255, so this decodes to the same point as `good`
    good = rbcl.crypto_core_ristretto255_random()
    alias = good[:31] + bytes([good[31] | 0x80])
    assert rbcl.crypto_core_ristretto255_is_valid_point(alias)
    with pytest.raises(CryptoError, match="not a valid ristretto255"):
        decode_points(alias, what="a set")
    (sent,) = MultiPartyPsi("lh", PAIR, [1], salt=SALT).start()
    with pytest.raises(CryptoError, match="not a valid ristretto255"):
        MultiPartyPsi("a", PAIR, [1], salt=SALT).receive("lh", _rebody(sent.payload, alias))


@pytest.mark.parametrize("length", [1, 31, 33, 65])
def test_wrong_lengths_are_refused_with_crypto_error(length: int) -> None:
    with pytest.raises(CryptoError, match="multiple of 32"):
        decode_points(b"\x01" * length, what="a set")
    (sent,) = MultiPartyPsi("lh", PAIR, [1], salt=SALT).start()
    with pytest.raises(CryptoError, match=f"has {length} bytes for 1 entries"):
        MultiPartyPsi("a", PAIR, [1], salt=SALT).receive("lh", sent.payload[:HEADER] + b"\x01" * length)


def test_a_set_above_the_bound_is_refused_before_any_point_is_read() -> None:
    eleven = b"\xff" * (11 * POINT_BYTES)  # invalid points: reading one would say so instead
    with pytest.raises(CryptoError, match="more than the bound 10"):
        decode_points(eleven, what="a set", max_points=10)
    (sent,) = MultiPartyPsi("lh", PAIR, [1], salt=SALT).start()
    a = MultiPartyPsi("a", PAIR, [1], salt=SALT, max_points=10)
    with pytest.raises(CryptoError, match=r"\(bound 10\)"):
        a.receive("lh", _rebody(sent.payload, eleven))


def test_a_fully_blinded_set_with_repeated_points_is_refused() -> None:
    lh = MultiPartyPsi("lh", PAIR, [1, 2, 3], salt=SALT)
    a = MultiPartyPsi("a", PAIR, [2, 3, 4], salt=SALT)
    (to_a,) = lh.start()
    (full,) = a.receive("lh", to_a.payload)  # lh's set under both keys, back to the coordinator
    first = full.payload[HEADER : HEADER + POINT_BYTES]
    with pytest.raises(CryptoError, match="repeated points"):
        lh.receive("a", _rebody(full.payload, first * 3))
    assert lh.receive("a", full.payload) == []  # the genuine one is still taken


def test_bad_match_positions_are_refused() -> None:
    # Genuine messages of each kind, for their headers (the session tag depends on names and salt).
    _, transcript = _ring({"lh": [1, 2, 3], "a": [2, 3, 4]})
    (matches,) = [s for s in transcript if s.receiver == "a" and _kind(s) == MATCHES]
    (shuffled,) = [s for s in transcript if s.receiver == "a" and _kind(s) == MATCHES_SHUFFLED]
    a = MultiPartyPsi("a", PAIR, [2, 3, 4], salt=SALT)
    for body, problem in (
        (struct.pack("<II", 2, 1), "strictly increasing"),
        (struct.pack("<II", 1, 1), "strictly increasing"),
        (struct.pack("<I", 3), "strictly increasing"),  # past the end of a's 3 ids
        (struct.pack("<IIII", 0, 1, 2, 3), "more positions than"),
    ):
        with pytest.raises(CryptoError, match=problem):
            a.receive("lh", _rebody(matches.payload, body, unit=4))
    with pytest.raises(CryptoError, match="has 3 bytes for 0 entries"):
        a.receive("lh", _rebody(matches.payload, b"\x00\x00\x00", unit=4))
    # shuffled matches reach a only for a set a shuffled, and only positions inside it
    with pytest.raises(RemoteProtocolError, match="before this party shuffled it"):
        a.receive("lh", shuffled.payload)
    (sent,) = MultiPartyPsi("lh", PAIR, [1, 2, 3], salt=SALT).start()
    a.receive("lh", sent.payload)  # a blinds and shuffles lh's set of 3
    with pytest.raises(CryptoError, match="strictly increasing"):
        a.receive("lh", _rebody(shuffled.payload, struct.pack("<I", 3), unit=4))
    assert a.receive("lh", _rebody(matches.payload, struct.pack("<II", 0, 2), unit=4)) == []
    # once well formed, a message of that kind is taken: positions in a's own shuffled order
    assert len(a.intersection()) == 2 and set(a.intersection()) <= {2, 3, 4}


def test_ring_refuses_malformed_messages_with_crypto_error() -> None:
    lh = MultiPartyPsi("lh", PAIR, [1, 2], salt=SALT)
    a = MultiPartyPsi("a", PAIR, [2, 3], salt=SALT)
    (first,) = lh.start()
    a.start()
    for bad in (first.payload[:10], first.payload[:-1], first.payload + b"\x00" * 32):
        with pytest.raises(CryptoError):
            a.receive("lh", bad)
    forged = first.payload[:HEADER] + b"\xff" * 32 + first.payload[HEADER + 32 :]
    with pytest.raises(CryptoError, match="not a valid ristretto255"):
        a.receive("lh", forged)


def test_ring_refuses_wrong_sender_repeats_and_other_sessions() -> None:
    names = ["lh", "a", "b"]
    lh, a, b = (MultiPartyPsi(n, names, [1, 2], salt=SALT) for n in names)
    (to_a,) = lh.start()
    a.start()
    b.start()
    with pytest.raises(RemoteProtocolError, match="must not receive"):
        a.receive("b", to_a.payload)  # a's set-from-lh can only come from lh
    with pytest.raises(RemoteProtocolError, match="must not receive"):
        b.receive("lh", to_a.payload)  # addressed to a, not b
    a.receive("lh", to_a.payload)
    with pytest.raises(RemoteProtocolError, match="repeated"):
        a.receive("lh", to_a.payload)
    other = MultiPartyPsi("lh", names, [1, 2], salt=b"another-session-salt")
    with pytest.raises(RemoteProtocolError, match="different PSI session"):
        b.receive("lh", other.start()[0].payload)
    reordered = MultiPartyPsi("lh", ["lh", "b", "a"], [1, 2], salt=SALT)
    with pytest.raises(RemoteProtocolError, match="different PSI session"):
        a.receive("lh", reordered.start()[0].payload)
    with pytest.raises(RemoteProtocolError, match="not a party"):
        b.receive("mallory", to_a.payload)
    with pytest.raises(RemoteProtocolError, match="not a PSI v1 message"):
        b.receive("a", b"XPSI" + to_a.payload[4:])


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="salt"):
        MultiPartyPsi("a", PAIR, [1], salt=b"short")
    with pytest.raises(TypeError, match="one type"):
        MultiPartyPsi("a", PAIR, [1, "1"], salt=SALT)
    with pytest.raises(TypeError, match="bool"):
        MultiPartyPsi("a", PAIR, [True], salt=SALT)
    with pytest.raises(ValueError, match="at least 2 parties"):
        MultiPartyPsi("lh", ["lh"], [1], salt=SALT)
    with pytest.raises(ValueError, match="at least 2 parties"):
        MultiPartyPsi("lh", ["lh", "a", "lh"], [1], salt=SALT)
    with pytest.raises(ValueError, match="not one of the parties"):
        MultiPartyPsi("mallory", PAIR, [1], salt=SALT)
    with pytest.raises(ValueError, match="exceed the bound"):
        MultiPartyPsi("a", PAIR, [1, 2, 3], salt=SALT, max_points=2)
    party = MultiPartyPsi("a", PAIR, [1], salt=SALT)
    with pytest.raises(LocalProtocolError):
        party.intersection()
    party.start()
    with pytest.raises(LocalProtocolError, match="already called"):
        party.start()


# -- a set keeps its size all the way round -------------------------------------------------------


def test_a_party_that_drops_points_from_the_coordinators_set_is_refused() -> None:
    # The owner would learn from the matches which of lh's ids it dropped: refused instead.
    lh = MultiPartyPsi("lh", PAIR, [1, 2, 3, 4], salt=SALT)
    a = MultiPartyPsi("a", PAIR, [2, 3, 4, 5], salt=SALT)
    (to_a,) = lh.start()
    (full,) = a.receive("lh", to_a.payload)
    body = full.payload[HEADER:]
    with pytest.raises(RemoteProtocolError, match=r"has 3 points, but it had 4 .* dropped or added points"):
        lh.receive("a", _rebody(full.payload, body[POINT_BYTES:]))
    assert lh.receive("a", full.payload) == []  # the genuine one is still taken


def test_a_party_that_drops_points_from_another_partys_set_is_refused_by_the_coordinator() -> None:
    # Three parties: b's set goes b -> lh -> a -> lh; a (its last blinder) drops a point of it.
    names = ["lh", "a", "b"]
    sets = {"lh": [1, 2, 3, 4], "a": [2, 3, 4, 5], "b": [3, 4, 6, 7]}
    parties = {n: MultiPartyPsi(n, names, ids, salt=SALT) for n, ids in sets.items()}
    queue = deque(step for p in parties.values() for step in p.start())
    refused = []
    while queue:
        step = queue.popleft()
        payload = step.payload
        origin = struct.unpack_from("<H", payload, 6)[0]
        if step.sender == "a" and step.receiver == "lh" and _kind(step) == SET and origin == 2:
            payload = _rebody(payload, payload[HEADER + POINT_BYTES :])
            with pytest.raises(RemoteProtocolError, match="dropped or added points"):
                parties["lh"].receive(step.sender, payload)
            refused.append(step)
            continue
        queue.extend(parties[step.receiver].receive(step.sender, payload))
    assert len(refused) == 1
    assert not parties["lh"].finished, "no matches go out for a set that lost points"
