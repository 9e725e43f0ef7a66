"""CKKS parameters and the 128-bit security table, without TenSEAL.

The policy layer validates a policy's `require.ckks` section with `CkksParams` when it loads the
policy; importing TenSEAL there would cost every policy check a second of start-up, so the
parameters live here and `crypto.he` (the only TenSEAL importer) re-exports them.

The default set is sized for what the protocol does with ciphertexts: it only adds them (owners'
cut tensors, the label holder's mask, SplitFed weight vectors) and never multiplies, so it needs
no rescaling levels. N = 4096 with primes [60, 29, 20] (109 bits, the 128-bit bound for N = 4096)
gives an 89-bit data modulus: a masked value of magnitude 2**25 at scale 2**40 fits with 24 bits
to spare, and the decryption error (measured 2**-27 at magnitude 2**24) stays 7 bits below the
2**-20 rounding grid. The last prime only serves key switching (the final modulus switch of a
public-key encryption), so 20 bits suffice. Against the earlier N = 8192 [60, 40, 40, 60] set, one
64x16 cut tensor's whole masked-aggregate chain (encrypt, serialize, load, sum and mask, decrypt)
takes 3.3 instead of 9.5 ms in one process, and a ciphertext is 103 instead of 332 kB
(docs/vertical-he-bench.md). Of the 109-bit splits tried, [60, 29, 20] serialises fastest: SEAL
compresses ciphertexts, and 45- or 44-bit residues cost its compressor twice as long.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from secure_split.errors import ConfigError, ConfigProblem

SECURITY_TABLE_128: dict[int, int] = {
    1024: 27,
    2048: 54,
    4096: 109,
    8192: 218,
    16384: 438,
    32768: 881,
}
"""Largest total coefficient-modulus bits per poly_modulus_degree for 128-bit classical security
(HomomorphicEncryption.org security standard, ternary secrets; the table SEAL enforces)."""

DEFAULT_PRECISION_BITS = 20
"""Decryptions handed to another party are rounded to multiples of 2**-20 (about 9.5e-7)."""

DEFAULT_MASK_BITS = 24
"""The label holder's mask is uniform on the 2**-20 grid in [-2**24, 2**24)."""

PRECISION_BUDGET_BITS = 44
"""mask_bits + precision_bits may not exceed this. CKKS decoding works in double precision, so
the absolute error of a decrypted value of magnitude 2**B is about 2**(B-50) (measured: 2**-25.9
at B = 24 with N = 8192 [60, 40, 40, 60] and 2**-27.0 with N = 4096 [60, 29, 20], scale 2**40);
44 bits keeps that 5 bits below the rounding grid."""

MASK_HEADROOM_BITS = DEFAULT_MASK_BITS + 2
"""Bits above the scale that the data modulus must hold: a masked aggregate reaches 2**25 in
magnitude (mask below 2**24 plus a small aggregate), and the modulus needs a sign bit on top."""

DEFAULT_POLY_MODULUS_DEGREE = 4096
DEFAULT_COEFF_MOD_BIT_SIZES: tuple[int, ...] = (60, 29, 20)
DEFAULT_SCALE_BITS = 40


def parameter_problems(n: object, sizes: Sequence[object], scale: object) -> list[tuple[str, str]]:
    """(key, message) for every rule these CKKS parameters break: the 128-bit table, CKKS's
    structural rules and room for a masked aggregate; [] if none. Keys are `CkksParams` fields."""
    out: list[tuple[str, str]] = []
    limit = SECURITY_TABLE_128.get(n) if isinstance(n, int) else None
    if limit is None:
        out.append(("poly_modulus_degree", f"{n} is not one of {sorted(SECURITY_TABLE_128)}"))
    bits = [b for b in sizes if isinstance(b, int) and not isinstance(b, bool)]
    sizes_ok = bool(sizes) and len(bits) == len(sizes)
    if not sizes_ok:
        out.append(("coeff_mod_bit_sizes", "must be a non-empty list of integers"))
    else:
        if len(bits) < 2:
            out.append(("coeff_mod_bit_sizes", "needs at least 2 primes (data + key-switching prime)"))
        if any(not 20 <= b <= 60 for b in bits):
            out.append(("coeff_mod_bit_sizes", f"every prime must be 20..60 bits, got {bits}"))
        if limit is not None and sum(bits) > limit:
            out.append((
                "coeff_mod_bit_sizes",
                f"total {sum(bits)} bits exceeds {limit}, the 128-bit security limit for "
                f"N={n} (HomomorphicEncryption.org standard); use fewer or smaller primes "
                "or a larger poly_modulus_degree",
            ))
    if not isinstance(scale, int) or isinstance(scale, bool) or not 20 <= scale <= 60:
        out.append(("global_scale_bits", f"must be an integer 20..60, got {scale!r}"))
    elif sizes_ok and scale >= bits[0]:
        out.append((
            "global_scale_bits",
            f"{scale} must be below the first prime ({bits[0]} bits) to leave room for the "
            "integer part of the values",
        ))
    elif sizes_ok and len(bits) >= 2 and sum(bits[:-1]) < scale + MASK_HEADROOM_BITS:
        out.append((
            "coeff_mod_bit_sizes",
            f"the data primes {bits[:-1]} give {sum(bits[:-1])} bits, fewer than the "
            f"scale's {scale} plus {MASK_HEADROOM_BITS} for a masked aggregate (mask below "
            f"2**{DEFAULT_MASK_BITS}); use larger data primes or a smaller scale",
        ))
    return out


@dataclass(frozen=True)
class CkksParams:
    """CKKS encryption parameters, checked against the 128-bit security table when built.

    Args:
        poly_modulus_degree: N, a power of two in `SECURITY_TABLE_128`; N/2 slots per ciphertext.
        coeff_mod_bit_sizes: bit sizes of the coefficient-modulus primes; all but the last form
            the data modulus, the last is the key-switching prime.
        global_scale_bits: log2 of the encoding scale.

    Raises:
        ConfigError: listing every problem at once, e.g. a total modulus above the security limit.
    """

    poly_modulus_degree: int = DEFAULT_POLY_MODULUS_DEGREE
    coeff_mod_bit_sizes: tuple[int, ...] = DEFAULT_COEFF_MOD_BIT_SIZES
    global_scale_bits: int = DEFAULT_SCALE_BITS

    def __post_init__(self) -> None:
        object.__setattr__(self, "coeff_mod_bit_sizes", tuple(self.coeff_mod_bit_sizes))
        self.check_security()

    @property
    def slots(self) -> int:
        """Values per ciphertext (N/2)."""
        return self.poly_modulus_degree // 2

    @property
    def total_coeff_bits(self) -> int:
        """Total bits of the coefficient modulus (what the security table bounds)."""
        return sum(self.coeff_mod_bit_sizes)

    @property
    def data_bits(self) -> int:
        """Bits of the data modulus (every prime but the key-switching one): what a fresh
        ciphertext's values, times the scale, must fit in."""
        return sum(self.coeff_mod_bit_sizes[:-1])

    @property
    def scale(self) -> float:
        """The encoding scale, 2**global_scale_bits."""
        return float(2**self.global_scale_bits)

    def check_security(self) -> None:
        """Check the parameters against the 128-bit security table and CKKS's structural rules.

        Raises:
            ConfigError: with every problem found, each naming the limit it breaks.
        """
        problems = parameter_problems(self.poly_modulus_degree, self.coeff_mod_bit_sizes, self.global_scale_bits)
        if problems:
            raise ConfigError([ConfigProblem(file="ckks parameters", key=k, message=m) for k, m in problems])
