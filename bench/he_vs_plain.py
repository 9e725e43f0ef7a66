"""CKKS vs plaintext for one 64x128 cut tensor: time and bytes per step, as ratios, one run.

Plaintext baseline: what an unencrypted sum merge does with the same tensor (float32 bytes on
the wire, numpy add). Encrypted: TenSEAL CKKS with the default parameters (N=4096 [60,29,20], scale 2**40), packed into
2048-slot ciphertexts. Each timing is the median of --repeat runs in this one process. Also the
full masked-aggregate exchange for K owners and SplitFed weight averaging of a flat vector.

    .venv/bin/python bench/he_vs_plain.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from secure_split.crypto.he import (
    EncryptedTensor,
    KeyHolderContext,
    PublicContext,
    add,
    decrypt_packed,
    decrypt_rounded,
    decrypt_vector,
    encrypt_packed,
    encrypt_vector,
    mask_aggregate,
    sum_encrypted,
    unmask,
)

MAX = 64 << 20


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """Median seconds of `repeat` calls, and the last result."""
    times, result = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def row(
    step: str, he_s: float, plain_s: float, he_bytes: int | None = None, plain_bytes: int | None = None
) -> None:
    size = f"{he_bytes / 1e6:8.3f} {he_bytes / plain_bytes:8.1f}x" if he_bytes and plain_bytes else " " * 18
    print(f"{step:<30} {he_s * 1e3:9.2f} {plain_s * 1e3:9.3f} {he_s / plain_s:9.0f}x {size}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--owners", type=int, default=3)
    parser.add_argument("--weights", type=int, default=100_000, help="flat weight-vector length")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (64, 128))
    x32 = x.astype(np.float32)

    t = time.perf_counter()
    kh = KeyHolderContext.create()
    keygen_s = time.perf_counter() - t
    public_bytes = kh.public_context_bytes()
    public = PublicContext.from_bytes(public_bytes)
    print(f"keygen {keygen_s * 1e3:.0f} ms; public context {len(public_bytes) / 1e6:.2f} MB, "
          f"secret context {len(kh.serialize_secret()) / 1e6:.2f} MB")  # fmt: skip
    print(f"\n64x128 batch ({x.size} values, {x32.nbytes} bytes as float32), median of {args.repeat}")
    print(f"{'step':<30} {'HE ms':>9} {'plain ms':>9} {'ratio':>10} {'HE MB':>8} {'bytes':>9}")

    plain_ser_s, wire_plain = timed(lambda: x32.tobytes(), args.repeat)
    enc_s, enc = timed(lambda: encrypt_packed(public, x), args.repeat)
    row("encrypt (vs nothing: tobytes)", enc_s, plain_ser_s)
    ser_s, blob = timed(lambda: enc.serialize(), args.repeat)
    row("serialize (vs tobytes)", ser_s, plain_ser_s, len(blob), len(wire_plain))
    plain_de_s, _ = timed(lambda: np.frombuffer(wire_plain, dtype=np.float32).reshape(64, 128), args.repeat)
    de_s, at_kh = timed(lambda: EncryptedTensor.from_bytes(kh, blob, max_bytes=MAX), args.repeat)
    row("deserialize (vs frombuffer)", de_s, plain_de_s)
    plain_add_s, _ = timed(lambda: x32 + x32, args.repeat)
    add_s, _ = timed(lambda: add(enc, enc), args.repeat)
    row("add two tensors", add_s, plain_add_s)
    dec_s, back = timed(lambda: decrypt_packed(kh, at_kh), args.repeat)
    row("decrypt (vs astype)", dec_s, timed(lambda: x32.astype(np.float64), args.repeat)[0])
    print(f"round-trip max error {np.abs(back - x).max():.1e}")

    k = args.owners
    xs = [rng.normal(0, 1, (64, 128)) for _ in range(k)]
    xs32 = [xi.astype(np.float32) for xi in xs]
    print(f"\nmasked-aggregate sum merge, {k} owners: each party's part of one step")
    print(f"{'party: step':<30} {'HE ms':>9} {'plain ms':>9} {'ratio':>10} {'HE MB':>8} {'bytes':>9}")
    owner_s, wire = timed(lambda: encrypt_packed(public, xs[0]).serialize(), args.repeat)
    row("owner: encrypt + serialize", owner_s, plain_ser_s, len(wire), x32.nbytes)
    wires = [encrypt_packed(public, xi).serialize() for xi in xs]
    plain_wires = [xi.tobytes() for xi in xs32]

    def lh_in() -> tuple[EncryptedTensor, Any, bytes]:
        received = [EncryptedTensor.from_bytes(public, w, max_bytes=MAX) for w in wires]
        masked, mask = mask_aggregate(public, received)
        return masked, mask, masked.serialize()

    def plain_lh() -> np.ndarray:
        return np.sum([np.frombuffer(w, dtype=np.float32) for w in plain_wires], axis=0)

    plain_lh_s, _ = timed(plain_lh, args.repeat)
    lh_s, (_, mask, to_kh) = timed(lh_in, args.repeat)
    row(f"LH: load {k}, sum, mask, send", lh_s, plain_lh_s, len(to_kh), None)
    kh_s, rounded = timed(
        lambda: decrypt_rounded(kh, EncryptedTensor.from_bytes(kh, to_kh, max_bytes=MAX)), args.repeat
    )
    row("KH: load, decrypt, round", kh_s, plain_lh_s, rounded.nbytes, None)
    un_s, total = timed(lambda: unmask(mask, rounded), args.repeat)
    row("LH: unmask", un_s, plain_lh_s)
    merge_bytes = k * len(wire) + len(to_kh) + rounded.nbytes
    whole = k * owner_s + lh_s + kh_s + un_s
    row("whole step, all parties", whole, k * plain_ser_s + plain_lh_s, merge_bytes, k * x32.nbytes)
    print(f"aggregate max error {np.abs(total - np.sum(xs, axis=0)).max():.1e}")

    w = [rng.normal(0, 0.1, args.weights) for _ in range(k)]

    def averaging() -> tuple[np.ndarray, int]:
        wires = [encrypt_vector(kh, wi).serialize() for wi in w]
        summed = sum_encrypted([EncryptedTensor.from_bytes(public, b, max_bytes=MAX) for b in wires])
        back_wire = summed.serialize()
        mean = decrypt_vector(kh, EncryptedTensor.from_bytes(kh, back_wire, max_bytes=MAX), mean=True)
        return mean, sum(len(b) for b in wires) + k * len(back_wire)

    avg_plain_s, _ = timed(lambda: np.mean(w, axis=0), args.repeat)
    avg_s, (mean, avg_bytes) = timed(averaging, 3)
    print(f"\nSplitFed averaging of {args.weights:,} weights, {k} owners (one process)")
    row("encrypt, sum, decrypt mean", avg_s, avg_plain_s, avg_bytes, 2 * k * args.weights * 4)
    print(f"average max error {np.abs(mean - np.mean(w, axis=0)).max():.1e}")


if __name__ == "__main__":
    main()
