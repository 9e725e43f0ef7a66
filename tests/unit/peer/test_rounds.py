"""The sans-IO rounds of a peer, run in memory under reordered and delayed delivery.

`secure_split.testing.DeliverySimulator` joins the parties of a round and delivers their messages
in a seeded random order (each link in order, as one ZeroMQ connection per pair gives; delays
let one link fall far behind the others). Every round must finish at every party, with the same
result, whatever the order.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest

from secure_split.crypto.keys import Identity
from secure_split.errors import RemoteProtocolError
from secure_split.peer.effects import Record, Send
from secure_split.peer.rounds.averaging import AVERAGED, OwnerWeights, WeightRelay
from secure_split.peer.rounds.barrier import BarrierRound, HeadExchange
from secure_split.peer.rounds.psi import PsiRound
from secure_split.protocol import Kind, Message
from secure_split.testing import DeliverySimulator, fixed_identity

SEEDS = int(os.environ.get("SECURE_SPLIT_ROUND_SEEDS", "1000"))
DEPLOYMENT = "ab" * 32
RING = ["lab", "hospital_a", "hospital_b"]
IDS = {"lab": [1, 2, 3, 5], "hospital_a": [2, 3, 5, 7], "hospital_b": [1, 3, 5, 9]}


# -- PSI ------------------------------------------------------------------------------------------


_P = 2**255 - 19  # a prime: multiplication mod P is a commutative "blinding" as cheap as it gets


@pytest.fixture
def fast_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replace ristretto255 by multiplication modulo a prime, for the thousand-order runs: the
    delivery logic of the ring is what they test (the real group: the smaller runs below and
    tests/unit/crypto/test_psi.py). Commutative and injective, so every intersection is exact."""
    import hashlib

    from secure_split.crypto import psi

    def hash_ids(ids: Any, *, salt: bytes) -> list[bytes]:
        return [(int.from_bytes(hashlib.sha256(salt + str(i).encode()).digest(), "little") % _P)
                .to_bytes(32, "little") for i in ids]

    def blind_points(scalar: bytes, points: Any, *, workers: int = 1) -> list[bytes]:
        k = int.from_bytes(scalar, "little") % _P or 1
        return [(int.from_bytes(p, "little") * k % _P).to_bytes(32, "little") for p in points]

    def decode_points(data: bytes, *, what: str, max_points: int = 0) -> list[bytes]:
        return [bytes(data[i:i + 32]) for i in range(0, len(data), 32)]

    monkeypatch.setattr(psi, "hash_ids", hash_ids)
    monkeypatch.setattr(psi, "blind_points", blind_points)
    monkeypatch.setattr(psi, "decode_points", decode_points)


def _psi_run(seed: int, *, serve_after_result: bool) -> dict[str, PsiRound]:
    """One ring PSI. `serve_after_result=False` is what a peer did before the PSI round existed:
    once its own intersection was known it stopped taking PSI messages."""
    rounds = {p: PsiRound(p, RING, IDS[p], deployment_hash=DEPLOYMENT, max_points=1000) for p in RING}

    def party(name: str) -> Any:
        def take(msg: Message) -> list[Any]:
            rnd = rounds[name]
            if not serve_after_result and rnd.result is not None:
                return []  # dropped: the peer has moved on to training
            return rnd.on_message(msg.binding.sender, bytes(msg.blob))
        return take

    sim = DeliverySimulator({p: party(p) for p in RING}, seed=seed, max_delay=6)
    for p in RING:
        sim.post(p, rounds[p].start())
    sim.run()
    return rounds


def _psi_all_orders(seeds: int) -> None:
    expected = np.array(sorted(set.intersection(*(set(v) for v in IDS.values()))))
    for seed in range(seeds):
        rounds = _psi_run(seed, serve_after_result=True)
        for name, rnd in rounds.items():
            assert rnd.finished, f"seed {seed}: '{name}' did not finish"
            assert rnd.result is not None and np.array_equal(rnd.result.ids, expected), f"seed {seed}"


@pytest.mark.usefixtures("fast_group")
def test_psi_finishes_at_every_party_in_a_thousand_delivery_orders() -> None:
    _psi_all_orders(SEEDS)


def test_psi_over_ristretto255_finishes_in_reordered_delivery() -> None:
    _psi_all_orders(max(1, SEEDS // 50))


@pytest.mark.usefixtures("fast_group")
def test_a_party_that_stops_at_its_own_result_stalls_another() -> None:
    # The WAN stall: a hospital learnt its own result before the set it had to blind and pass
    # on, stopped taking PSI messages, and the lab waited forever. Keeping every party in the
    # round until `finished` is the fix; this shows the old rule does stall.
    stalled = next((s for s in range(SEEDS) if not all(
        r.result is not None for r in _psi_run(s, serve_after_result=False).values())), None)
    assert stalled is not None, "the old rule never stalled: the race this guards against is not exercised"


def test_psi_records_the_alignment_once_without_ids() -> None:
    rounds = {p: PsiRound(p, RING, IDS[p], deployment_hash=DEPLOYMENT, max_points=1000) for p in RING}
    sim = DeliverySimulator({p: (lambda m, p=p: rounds[p].on_message(m.binding.sender, bytes(m.blob))) for p in RING},
                            seed=3)
    for p in RING:
        sim.post(p, rounds[p].start())
    sim.run()
    for p in RING:
        (rec,) = sim.records[p]
        assert rec.event == "ids_aligned" and rec.fields["intersection_size"] == 2
        assert set(rec.fields) == {"parties", "own_size", "intersection_size"}


@pytest.mark.parametrize("seed", range(5))
def test_a_two_party_psi_round_aligns_a_coordinator_and_one_owner_in_any_order(seed: int) -> None:
    # What a horizontal coordinator that holds labels runs with each owner (the same ring, n = 2),
    # over ristretto255, every message free to overtake any other.
    ids = {"coordinator": [4, 8, 15, 16, 23, 42], "owner": [42, 16, 7, 4]}
    rounds = {p: PsiRound(p, list(ids), ids[p], deployment_hash=DEPLOYMENT, max_points=1000) for p in ids}
    sim = DeliverySimulator({p: (lambda m, p=p: rounds[p].on_message(m.binding.sender, bytes(m.blob))) for p in ids},
                            seed=seed, fifo_links=False, max_delay=2)
    for p in ids:
        sim.post(p, rounds[p].start())
    assert sim.run() == 6  # two sets out, one fully blinded set back, three position lists
    for p, rnd in rounds.items():
        assert rnd.finished and rnd.result is not None
        assert rnd.result.ids.tolist() == [4, 16, 42] and rnd.result.own_size == len(ids[p])


# -- barriers and audit heads ---------------------------------------------------------------------


def _barrier_run(seed: int, members: list[str]) -> tuple[BarrierRound, dict[int, set[str]]]:
    received: dict[int, set[str]] = {}
    barrier = BarrierRound(3, "epoch_end", members)
    exchanges = {m: HeadExchange(barrier.key, ["coordinator"], received) for m in members}

    def coordinator(msg: Message) -> list[Any]:
        if msg.kind == Kind.AUDIT_RECEIPT:
            received.setdefault(msg.binding.step, set()).add(msg.binding.sender)
            return []
        assert barrier.on_ack(msg)
        return []

    def member(name: str) -> Any:
        def take(msg: Message) -> list[Any]:
            assert msg.kind == Kind.BARRIER and msg.meta["epoch"] == 3
            sums = {"labels": {"loss_sum": 1.5, "correct": 3, "count": 4}}
            head = {"peer": name, "seq": 7, "head": "ab" * 32, "signature": "cd" * 64}
            return [*exchanges[name].send(head),
                    Send("coordinator", Kind.BARRIER_ACK, step=barrier.key, meta={"epoch": 3, "eval": sums})]
        return take

    sim = DeliverySimulator({"coordinator": coordinator, **{m: member(m) for m in members}}, seed=seed, max_delay=3)
    sim.post("coordinator", barrier.open())
    sim.run()
    return barrier, received


def test_a_barrier_collects_every_members_report_in_any_order() -> None:
    members = ["a", "b", "c", "d"]
    for seed in range(SEEDS):
        barrier, received = _barrier_run(seed, members)
        assert barrier.done() and sorted(barrier.reports) == members, f"seed {seed}"
        assert received[barrier.key] == set(members), f"seed {seed}"


def test_a_barrier_does_not_wait_for_a_lost_member_and_refuses_strangers() -> None:
    barrier = BarrierRound(0, "epoch_end", ["a", "b"])
    ack = Message(Kind.BARRIER_ACK, _binding("a", 1), meta={"epoch": 0})
    assert barrier.on_ack(ack) and barrier.missing() == ["b"]
    assert barrier.done(live=lambda m: m != "b")
    assert not barrier.on_ack(Message(Kind.BARRIER_ACK, _binding("z", 1), meta={"epoch": 0}))
    assert not barrier.on_ack(Message(Kind.BARRIER_ACK, _binding("b", 1), meta={"epoch": 5}))


def _binding(sender: str, step: int) -> Any:
    from secure_split.protocol import Binding

    return Binding(DEPLOYMENT, bytes(16), step, 1, sender, "coordinator")


# -- weight averaging -----------------------------------------------------------------------------

OWNERS = ["owner_1", "owner_2", "owner_3"]
IDENTITIES: dict[str, Identity] = {n: fixed_identity(n) for n in [*OWNERS, "coordinator"]}
KEYS = {n: i.transport_public_z85 for n, i in IDENTITIES.items()}


def _average_run(seed: int, start: dict[str, np.ndarray], via_coordinator: bool) -> tuple[dict[str, np.ndarray], set[str]]:
    weights = {o: start[o].copy() for o in OWNERS}
    sides = {o: OwnerWeights(o, OWNERS, "coordinator", via_coordinator=via_coordinator, identity=IDENTITIES[o],
                             transport_keys=KEYS, max_bytes=1 << 20) for o in OWNERS}
    relay = WeightRelay(OWNERS, enabled=via_coordinator)
    acks: set[str] = set()

    def coordinator(msg: Message) -> list[Any]:
        if msg.kind == Kind.BARRIER_ACK:
            assert msg.meta["reason"] == AVERAGED and msg.meta["phase"] == "a1"
            acks.add(msg.binding.sender)
            return []
        return relay.relay(msg, lost=lambda _: False)

    def owner(name: str) -> Any:
        def take(msg: Message) -> list[Any]:
            if msg.kind == Kind.BARRIER:
                out, update = sides[name].open_average("a1", OWNERS, weights[name])
            else:
                out, update = sides[name].on_weights(msg, lambda: weights[name])
            if update is not None:
                weights[name] = update.weights
                out = [*out, Send("coordinator", Kind.BARRIER_ACK, meta={"epoch": 0, "reason": update.ack[0],
                                                                          "phase": update.ack[1]})]
            return out
        return take

    sim = DeliverySimulator({"coordinator": coordinator, **{o: owner(o) for o in OWNERS}}, seed=seed, max_delay=4)
    sim.post("coordinator", [Send(o, Kind.BARRIER, meta={"epoch": 0, "reason": "average", "phase": "a1",
                                                        "members": OWNERS}) for o in OWNERS])
    sim.run()
    return weights, acks


@pytest.mark.parametrize("via_coordinator", [False, True])
def test_sealed_averaging_gives_every_owner_the_mean_in_any_order(via_coordinator: bool) -> None:
    rng = np.random.default_rng(0)
    start = {o: rng.standard_normal(50).astype(np.float32) for o in OWNERS}
    mean = np.mean(np.stack(list(start.values())), axis=0).astype(np.float32)
    for seed in range(max(1, SEEDS // 10)):
        weights, acks = _average_run(seed, start, via_coordinator)
        assert acks == set(OWNERS), f"seed {seed}"
        for o in OWNERS:
            assert np.allclose(weights[o], mean, atol=1e-6), f"seed {seed}: {o}"


def test_weights_from_a_non_owner_or_a_bad_box_are_refused() -> None:
    side = OwnerWeights("owner_1", OWNERS, "coordinator", via_coordinator=False, identity=IDENTITIES["owner_1"],
                        transport_keys=KEYS, max_bytes=1 << 20)
    forged = Message(Kind.ENCRYPTED_WEIGHTS, _binding("coordinator", 0), meta={"mode": "handoff", "phase": "h1"},
                     blob=b"x" * 64)
    with pytest.raises(RemoteProtocolError, match="do not come from another owner"):
        side.on_weights(forged, lambda: np.zeros(1, np.float32))
    garbled = Message(Kind.ENCRYPTED_WEIGHTS, _binding("owner_2", 0), meta={"mode": "handoff", "phase": "h1"},
                      blob=b"x" * 64)
    with pytest.raises(RemoteProtocolError, match="do not open"):
        side.on_weights(garbled, lambda: np.zeros(1, np.float32))


def test_records_are_kept_apart_from_sends() -> None:
    sim = DeliverySimulator({"a": lambda m: []}, seed=0)
    sim.post("a", [Record("x", {"n": 1})])
    assert sim.records["a"] == [Record("x", {"n": 1})] and sim.run() == 0


def test_a_head_exchange_stops_waiting_for_a_peer_that_drops_out() -> None:
    # A horizontal coordinator exchanges heads with its live owners; one is lost (or restarts in a
    # new session, which never answers the old exchange) before its head arrives.
    received: dict[int, set[str]] = {3: {"owner_1"}}
    live = {"owner_1", "owner_2", "owner_3"}
    exchange = HeadExchange(3, sorted(live), received, lambda o: o in live)
    assert exchange.missing() == ["owner_2", "owner_3"] and not exchange.done
    live.discard("owner_2")
    assert exchange.missing() == ["owner_3"]
    received[3].add("owner_3")
    assert exchange.done
    # Without `live` every peer is waited for (the sync schedules roll back instead).
    assert HeadExchange(3, ["owner_1", "owner_2"], received).missing() == ["owner_2"]
