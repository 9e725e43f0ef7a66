"""PSI throughput: hashing, blinding and full runs of the ring (`MultiPartyPsi`, the protocol
the peer runs) with two parties (a coordinator and one owner: vertical with one owner, and each
PSI of a horizontal coordinator) and three, printed as a table.

Every party runs in this one process, one after another, messages delivered in FIFO order, so a
full run's time is the total compute of all parties on one core (on separate hosts the parties
blind in parallel and the wall time is about that divided by the number of parties, plus the
network). The load average is printed with the table: the machine is shared. Usage:

    .venv/bin/python bench/psi_throughput.py               # 10k and 100k ids per party (~3 min)
    .venv/bin/python bench/psi_throughput.py --sizes 10000  # quick
"""

from __future__ import annotations

import argparse
import os
import random
import time
from collections import deque

from secure_split.crypto.psi import (
    MultiPartyPsi,
    PsiResult,
    PsiStep,
    blind_points,
    decode_points,
    hash_ids,
    new_scalar,
)

SALT = os.urandom(16)


def _sets(n: int, parties: int, seed: int) -> list[list[int]]:
    """`parties` sets of n ids; about half of each set is shared by all of them."""
    rng = random.Random(seed)
    shared = rng.sample(range(10**12), n // 2)
    return [shared + rng.sample(range(10**12, 2 * 10**12), n - n // 2) for _ in range(parties)]


def _row(label: str, n: int, seconds: float, ids: int, wire: int | None = None) -> None:
    mb = f"{wire / 1e6:9.1f}" if wire is not None else f"{'-':>9}"
    print(f"{label:<34} {n:>8,} {seconds:>9.2f} {ids / seconds:>11,.0f} {mb}")


def primitives(n: int) -> None:
    ids = list(range(n))
    t = time.perf_counter()
    points = hash_ids(ids, salt=SALT)
    _row("hash ids to ristretto255", n, time.perf_counter() - t, n)
    scalar = new_scalar()
    for workers in (1, 2):
        t = time.perf_counter()
        blinded = blind_points(scalar, points, workers=workers)
        _row(f"blind (scalarmult), {workers} thread(s)", n, time.perf_counter() - t, n)
    wire = b"".join(blinded)
    t = time.perf_counter()
    decode_points(wire, what="bench", max_points=n)
    _row("decode + validate received points", n, time.perf_counter() - t, n)


def run_ring(members: list[MultiPartyPsi], steps: list[PsiStep]) -> dict[str, PsiResult]:
    """Start every party and deliver every step in FIFO order (what one connection per pair does)."""
    by_name = {p.me: p for p in members}
    queue = deque(step for p in members for step in p.start())
    while queue:
        step = queue.popleft()
        steps.append(step)
        queue.extend(by_name[step.receiver].receive(step.sender, step.payload))
    assert all(p.finished for p in members), "the ring stalled"
    return {p.me: p.result() for p in members}


def ring(n: int, parties: int) -> None:
    sets = _sets(n, parties, seed=n + parties)
    names = ["label_holder"] + [f"owner_{i}" for i in range(1, parties)]
    t = time.perf_counter()
    members = [MultiPartyPsi(name, names, ids, salt=SALT) for name, ids in zip(names, sets, strict=True)]
    steps: list[PsiStep] = []
    results = run_ring(members, steps)
    seconds = time.perf_counter() - t
    expected = sorted(set.intersection(*(set(s) for s in sets)))
    assert all(r.ids == expected for r in results.values())
    wire = sum(len(s.payload) for s in steps)
    _row(f"{parties}-party ring ({len(steps)} messages)", n, seconds, parties * n, wire)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="10000,100000", help="ids per party, comma-separated")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"cores: {os.cpu_count()}; load average {load}; all parties in one process, one after another")
    print(f"{'step':<34} {'ids/party':>8} {'seconds':>9} {'ids/s':>11} {'wire MB':>9}")
    primitives(min(sizes))
    for n in sizes:
        ring(n, 2)
        ring(n, 3)


if __name__ == "__main__":
    main()
