"""CKKS homomorphic encryption (TenSEAL) for sums of tensors the label holder must not see.

Two uses (see docs/he-and-psi.md for the argument and the measured costs):

- **Masked aggregate at a sum/mean merge.** The feature owners encrypt their cut tensors; the
  label holder (LH), which holds only a public context, adds the ciphertexts and a fresh random
  mask; the key holder (KH, a designated owner) decrypts the masked sum and hands back only a
  value rounded to a fixed grid; the LH removes the mask::

      owner i:  enc_i = encrypt_packed(public_or_secret_ctx, x_i)              owner -> LH
      LH:       masked, mask = mask_aggregate(public_ctx, [enc_1, ..., enc_K])  LH -> KH
      KH:       rounded = decrypt_rounded(kh_ctx, masked)                     KH -> LH
      LH:       total = unmask(mask, rounded)          # or unmask(..., mean=True)

  The LH learns the aggregate only; the KH learns aggregate + mask, which statistically hides
  the aggregate; owners learn nothing new.

- **Weight averaging (SplitFed).** Owners encrypt flat weight vectors under the owners' key
  (`encrypt_vector`), the LH adds them (`sum_encrypted`), owners decrypt the average
  (`decrypt_vector(..., mean=True)`).

Always batched (`ckks_vector`, N/2 slots per ciphertext): unbatched `ckks_tensor` is 1000x slower.
Every deserialisation is bounded before TenSEAL sees the bytes and its structure is checked
first, because TenSEAL crashes the process on some malformed inputs; bad bytes raise CryptoError.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tenseal as ts

from secure_split.crypto.ckks_params import DEFAULT_MASK_BITS as DEFAULT_MASK_BITS
from secure_split.crypto.ckks_params import DEFAULT_PRECISION_BITS as DEFAULT_PRECISION_BITS
from secure_split.crypto.ckks_params import PRECISION_BUDGET_BITS as PRECISION_BUDGET_BITS
from secure_split.crypto.ckks_params import SECURITY_TABLE_128 as SECURITY_TABLE_128
from secure_split.crypto.ckks_params import CkksParams as CkksParams
from secure_split.errors import CryptoError

DEFAULT_MAX_CONTEXT_BYTES = 64 << 20
"""Default bound on a serialised context (public: 0.46 MB, with relin keys 1.9 MB, Galois 35 MB)."""

_TENSOR_MAGIC = b"SSHE"
_TENSOR_VERSION = 1
_TENSOR_HEADER = struct.Struct("<4sBBHII")  # magic, version, ndim, reserved, count, chunks
_MAX_NDIM = 8
_TENSEAL_ERRORS = (ValueError, RuntimeError, TypeError)


# --------------------------------------------------------------------------------------------
# Contexts
# --------------------------------------------------------------------------------------------


def _check_loaded_context(ctx: Any, params: CkksParams, what: str) -> None:
    """Refuse a deserialised context whose parameters are not the agreed ones."""
    try:
        data = ctx.seal_context().data
        key_data = data.key_context_data()
        parms = key_data.parms()
        scheme = getattr(parms.scheme(), "name", str(parms.scheme()))
        n = parms.poly_modulus_degree()
        total = key_data.total_coeff_modulus_bit_count()
        scale = ctx.global_scale
        ok = data.parameters_set() and ctx.has_public_key()
    except _TENSEAL_ERRORS as exc:
        raise CryptoError(f"{what}: cannot read its parameters: {exc}") from exc
    if not ok or not str(scheme).endswith("CKKS"):
        raise CryptoError(f"{what}: not a usable CKKS context with a public key")
    if n != params.poly_modulus_degree or total != params.total_coeff_bits or scale != params.scale:
        raise CryptoError(
            f"{what}: parameters N={n}, {total} modulus bits, scale {scale} differ from the agreed "
            f"N={params.poly_modulus_degree}, {params.total_coeff_bits} bits, scale "
            f"2**{params.global_scale_bits}; refusing it"
        )


# One thread per context: peers share the host's cores, and a packed batch is one or two
# ciphertexts, too little work for a thread pool to pay for its wake-ups.
_THREADS = 1


def _load_context(data: bytes, *, params: CkksParams, max_bytes: int, what: str) -> Any:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CryptoError(f"{what} must be bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise CryptoError(f"{what} is {len(data)} bytes, more than the bound {max_bytes}")
    try:
        ctx = ts.context_from(bytes(data), n_threads=_THREADS)
    except _TENSEAL_ERRORS as exc:
        raise CryptoError(f"{what} could not be parsed: {exc}") from exc
    _check_loaded_context(ctx, params, what)
    return ctx


class CkksContext:
    """A CKKS context: the parameters and the keys this party holds. Use the two subclasses."""

    def __init__(self, tenseal_context: Any, params: CkksParams) -> None:
        self._ts = tenseal_context
        self.params = params

    @property
    def slots(self) -> int:
        """Values per ciphertext (N/2)."""
        return self.params.slots

    def is_private(self) -> bool:
        """True when this context holds the secret key (and can decrypt)."""
        return bool(self._ts.is_private())

    def __repr__(self) -> str:
        kind = "secret" if self.is_private() else "public"
        return f"{type(self).__name__}({kind}, N={self.params.poly_modulus_degree})"


class KeyHolderContext(CkksContext):
    """A context with the secret key: the key holder's, shared (sealed) with the other owners."""

    @classmethod
    def create(cls, params: CkksParams | None = None) -> KeyHolderContext:
        """Generate fresh keys.

        Args:
            params: the parameters (default: N=4096, [60, 29, 20], scale 2**40).

        Returns:
            A new context holding a secret key, a public key and nothing else.
        """
        params = params or CkksParams()
        params.check_security()
        ctx = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=params.poly_modulus_degree,
            coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
            n_threads=_THREADS,
        )
        ctx.global_scale = params.scale
        return cls(ctx, params)

    @classmethod
    def from_secret_bytes(
        cls, data: bytes, *, params: CkksParams | None = None, max_bytes: int = DEFAULT_MAX_CONTEXT_BYTES
    ) -> KeyHolderContext:
        """Load a secret context (after opening the sealed box it travelled in).

        Args:
            data: bytes from `serialize_secret()`.
            params: the agreed parameters; the context must match them.
            max_bytes: refuse larger inputs before parsing.

        Raises:
            CryptoError: unparseable, other parameters, or no secret key in it.
        """
        params = params or CkksParams()
        ctx = _load_context(data, params=params, max_bytes=max_bytes, what="secret CKKS context")
        if not ctx.is_private():
            raise CryptoError("secret CKKS context: it holds no secret key")
        return cls(ctx, params)

    def serialize_secret(self) -> bytes:
        """The context WITH the secret key. Seal it end-to-end to each owner; never send it clear.

        Returns:
            About 0.7 MB for the default parameters.
        """
        return bytes(
            self._ts.serialize(
                save_public_key=True, save_secret_key=True, save_galois_keys=False, save_relin_keys=False
            )
        )

    def public_context_bytes(self, *, galois_keys: bool = False, relin_keys: bool = False) -> bytes:
        """The public context for the label holder: no secret key, no Galois or relin keys by default.

        Additions and plaintext additions need neither; Galois keys would make it 35 MB instead
        of 0.46 MB (1.9 MB with relin keys).

        Args:
            galois_keys: include Galois keys (generated here if missing; only for rotations).
            relin_keys: include relinearisation keys (only for ciphertext multiplications).
        """
        if galois_keys and not self._ts.has_galois_keys():
            self._ts.generate_galois_keys()
        if relin_keys and not self._ts.has_relin_keys():
            self._ts.generate_relin_keys()
        return bytes(
            self._ts.serialize(
                save_public_key=True,
                save_secret_key=False,
                save_galois_keys=galois_keys,
                save_relin_keys=relin_keys,
            )
        )

    def public(self) -> PublicContext:
        """This context without its secret key, as the label holder would load it."""
        return PublicContext.from_bytes(self.public_context_bytes(), params=self.params)


class PublicContext(CkksContext):
    """A context without the secret key (the label holder's): it encrypts and adds, never decrypts."""

    @classmethod
    def from_bytes(
        cls, data: bytes, *, params: CkksParams | None = None, max_bytes: int = DEFAULT_MAX_CONTEXT_BYTES
    ) -> PublicContext:
        """Load the public context sent by the key holder.

        Args:
            data: bytes from `KeyHolderContext.public_context_bytes()`.
            params: the agreed parameters (from the deployment); the context must match them.
            max_bytes: refuse larger inputs before parsing.

        Returns:
            A context whose `is_private()` is False.

        Raises:
            CryptoError: unparseable, other parameters, or it carries a secret key (the label
                holder must never hold one: refuse rather than silently drop it).
        """
        params = params or CkksParams()
        ctx = _load_context(data, params=params, max_bytes=max_bytes, what="public CKKS context")
        if ctx.is_private():
            raise CryptoError(
                "public CKKS context: it carries a secret key; the label holder must never hold "
                "one (the key holder must send public_context_bytes())"
            )
        return cls(ctx, params)


# --------------------------------------------------------------------------------------------
# Packed ciphertexts
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class EncryptedTensor:
    """A float tensor packed row-major into ceil(size / slots) CKKS ciphertexts.

    Attributes:
        shape: the plaintext shape.
        count: how many encrypted tensors were summed into this one (1 when fresh).
        slots: values per ciphertext (N/2 of the context it was made in).
    """

    shape: tuple[int, ...]
    count: int
    slots: int
    _vectors: tuple[Any, ...] = field(repr=False)

    @property
    def size(self) -> int:
        """Number of plaintext values."""
        return math.prod(self.shape)

    @property
    def chunks(self) -> int:
        """Number of ciphertexts."""
        return len(self._vectors)

    def serialize(self) -> bytes:
        """Wire form: header, shape, chunk lengths, then each TenSEAL ckks_vector serialisation.

        A 64x128 float batch (4 ciphertexts at N=4096) is about 0.44 MB.
        """
        blobs = [bytes(v.serialize()) for v in self._vectors]
        header = _TENSOR_HEADER.pack(
            _TENSOR_MAGIC, _TENSOR_VERSION, len(self.shape), 0, self.count, len(blobs)
        )
        dims = struct.pack(f"<{len(self.shape)}Q", *self.shape)
        lengths = struct.pack(f"<{len(blobs)}Q", *(len(b) for b in blobs))
        return b"".join([header, dims, lengths, *blobs])

    @classmethod
    def from_bytes(cls, ctx: CkksContext, data: bytes, *, max_bytes: int) -> EncryptedTensor:
        """Parse and load an encrypted tensor, bounding every size before TenSEAL sees a byte.

        Args:
            ctx: the context to load the ciphertexts into (same parameters as the sender's).
            data: bytes from `serialize()`.
            max_bytes: refuse larger inputs before parsing anything.

        Returns:
            The tensor, its ciphertexts linked to `ctx`.

        Raises:
            CryptoError: too large, truncated, inconsistent, or a ciphertext TenSEAL refuses.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise CryptoError(f"encrypted tensor must be bytes, got {type(data).__name__}")
        data = bytes(data)
        if len(data) > max_bytes:
            raise CryptoError(f"encrypted tensor is {len(data)} bytes, more than the bound {max_bytes}")
        if len(data) < _TENSOR_HEADER.size:
            raise CryptoError("encrypted tensor is shorter than its header (truncated?)")
        magic, version, ndim, reserved, count, chunks = _TENSOR_HEADER.unpack_from(data)
        if magic != _TENSOR_MAGIC or version != _TENSOR_VERSION or reserved != 0:
            raise CryptoError("encrypted tensor: not a secure_split v1 encrypted tensor")
        if not 1 <= ndim <= _MAX_NDIM or count < 1:
            raise CryptoError(f"encrypted tensor: bad header (ndim {ndim}, count {count})")
        offset = _TENSOR_HEADER.size
        meta_end = offset + 8 * ndim + 8 * chunks
        if meta_end > len(data):
            raise CryptoError("encrypted tensor: truncated in its shape or chunk table")
        shape = struct.unpack_from(f"<{ndim}Q", data, offset)
        lengths = struct.unpack_from(f"<{chunks}Q", data, offset + 8 * ndim)
        if any(d < 1 for d in shape):
            raise CryptoError(f"encrypted tensor: bad shape {shape}")
        size = math.prod(shape)
        if chunks != -(-size // ctx.slots):
            raise CryptoError(f"encrypted tensor: {chunks} ciphertexts cannot hold shape {shape}")
        limit = _max_ciphertext_bytes(ctx.params)
        if any(n > limit for n in lengths) or meta_end + sum(lengths) != len(data):
            raise CryptoError("encrypted tensor: chunk lengths do not match the data (truncated?)")
        vectors = []
        position = meta_end
        for index, length in enumerate(lengths):
            blob = data[position : position + length]
            position += length
            expected = min(ctx.slots, size - index * ctx.slots)
            vectors.append(_load_vector(ctx, blob, expected=expected, index=index))
        return cls(tuple(int(d) for d in shape), int(count), ctx.slots, tuple(vectors))


def _max_ciphertext_bytes(params: CkksParams) -> int:
    """Upper bound of one serialised ciphertext: 3 polynomials at the top data level, uncompressed."""
    data_primes = len(params.coeff_mod_bit_sizes) - 1
    return 3 * params.poly_modulus_degree * data_primes * 8 + 4096


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    for _ in range(10):
        if pos >= len(data):
            raise CryptoError("ciphertext: truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise CryptoError("ciphertext: varint too long")


def _check_vector_blob(blob: bytes, *, expected: int, scale: float, index: int) -> None:
    """Check the exact structure TenSEAL writes for a one-chunk ckks_vector, before TenSEAL parses it.

    TenSEAL's CKKSVectorProto is {1: packed uint32 sizes, 2: bytes ciphertexts, 3: double scale};
    TenSEAL does not check that sizes and ciphertexts agree and segfaults on decrypt when they
    do not. We accept exactly one size (the expected one), one SEAL ciphertext with a sane
    SEAL header, and the agreed scale, and nothing else.
    """
    where = f"ciphertext {index}"
    seen: dict[int, Any] = {}
    pos = 0
    while pos < len(blob):
        tag, pos = _read_varint(blob, pos)
        number, wire = tag >> 3, tag & 7
        if number in seen or (number, wire) not in {(1, 2), (2, 2), (3, 1)}:
            raise CryptoError(f"{where}: unexpected field {number} (wire type {wire})")
        if wire == 1:
            if pos + 8 > len(blob):
                raise CryptoError(f"{where}: truncated")
            seen[number] = struct.unpack_from("<d", blob, pos)[0]
            pos += 8
            continue
        length, pos = _read_varint(blob, pos)
        if pos + length > len(blob):
            raise CryptoError(f"{where}: truncated")
        seen[number] = blob[pos : pos + length]
        pos += length
    if set(seen) != {1, 2, 3}:
        raise CryptoError(f"{where}: missing fields (truncated?)")
    sizes, first = [], 0
    packed: bytes = seen[1]
    while first < len(packed):
        value, first = _read_varint(packed, first)
        sizes.append(value)
    if sizes != [expected]:
        raise CryptoError(f"{where}: holds {sizes} values, expected [{expected}]")
    if seen[3] != scale:
        raise CryptoError(f"{where}: scale {seen[3]} is not the agreed {scale}")
    seal: bytes = seen[2]
    # SEAL header: magic 0xA15E, header size 16, version 4.x, compression 0..2, reserved 0, size
    if len(seal) < 16:
        raise CryptoError(f"{where}: truncated SEAL header")
    magic, header_size, major, _minor, compression, reserved, total = struct.unpack_from("<HBBBBHQ", seal)
    if magic != 0xA15E or header_size != 16 or major != 4 or compression > 2 or reserved != 0:
        raise CryptoError(f"{where}: not a SEAL 4 ciphertext")
    if total != len(seal):
        raise CryptoError(f"{where}: SEAL size field {total} does not match {len(seal)} bytes")


def _load_vector(ctx: CkksContext, blob: bytes, *, expected: int, index: int) -> Any:
    _check_vector_blob(blob, expected=expected, scale=ctx.params.scale, index=index)
    try:
        vector = ts.ckks_vector_from(ctx._ts, blob)
        size = vector.size()
    except _TENSEAL_ERRORS as exc:
        raise CryptoError(f"ciphertext {index} refused by TenSEAL: {exc}") from exc
    if size != expected:
        raise CryptoError(f"ciphertext {index}: holds {size} values, expected {expected}")
    return vector


def _as_float_array(array: Any, what: str) -> np.ndarray:
    values = np.asarray(array, dtype=np.float64)
    if values.ndim < 1 or values.ndim > _MAX_NDIM or values.size == 0:
        raise ValueError(f"{what} must be a non-empty array with 1..{_MAX_NDIM} dimensions")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{what} contains NaN or infinity; CKKS encrypts finite values only")
    return values


def _chunks(values: np.ndarray, slots: int) -> list[np.ndarray]:
    flat = values.reshape(-1)
    return [flat[i : i + slots] for i in range(0, flat.size, slots)]


def encrypt_packed(ctx: CkksContext, array: Any) -> EncryptedTensor:
    """Encrypt a float tensor (typically batch x features), packed into N/2-slot ciphertexts.

    Args:
        ctx: a public or secret context (encryption uses the public key).
        array: finite floats, any shape with 1..8 dimensions (flattened row-major).

    Returns:
        The encrypted tensor (count 1).

    Raises:
        ValueError: empty, too many dimensions, or non-finite values.
    """
    values = _as_float_array(array, "the tensor to encrypt")
    vectors = tuple(ts.ckks_vector(ctx._ts, chunk.tolist()) for chunk in _chunks(values, ctx.slots))
    return EncryptedTensor(tuple(int(d) for d in values.shape), 1, ctx.slots, vectors)


def decrypt_packed(ctx: CkksContext, enc: EncryptedTensor) -> np.ndarray:
    """Decrypt an encrypted tensor (key holders only).

    Args:
        ctx: a context holding the secret key.
        enc: the tensor to decrypt.

    Returns:
        float64 array of `enc.shape` (CKKS is approximate: about 1e-8 absolute error at
        magnitude 1 with the default parameters).

    Raises:
        CryptoError: the context holds no secret key, or decryption failed.
    """
    if not ctx.is_private():
        raise CryptoError(
            f"{ctx!r} holds no secret key and cannot decrypt; only the key holder (and the owners "
            "it shared the key with) can"
        )
    secret = ctx._ts.secret_key()
    try:
        parts = [np.asarray(v.decrypt(secret), dtype=np.float64) for v in enc._vectors]
    except _TENSEAL_ERRORS as exc:
        raise CryptoError(f"decryption failed: {exc}") from exc
    flat = np.concatenate(parts)
    if flat.size != enc.size:
        raise CryptoError(f"decryption gave {flat.size} values for shape {enc.shape}")
    return flat.reshape(enc.shape)


def add(a: EncryptedTensor, b: EncryptedTensor) -> EncryptedTensor:
    """Enc(x) + Enc(y) = Enc(x + y), slot-wise.

    Raises:
        ValueError: different shapes.
        CryptoError: TenSEAL refused (e.g. ciphertexts from different parameters or scales).
    """
    if a.shape != b.shape or a.slots != b.slots:
        raise ValueError(
            f"cannot add encrypted tensors of shapes {a.shape} and {b.shape} "
            f"({a.slots} and {b.slots} slots per ciphertext)"
        )
    try:
        vectors = tuple(x + y for x, y in zip(a._vectors, b._vectors, strict=True))
    except _TENSEAL_ERRORS as exc:
        raise CryptoError(f"ciphertexts cannot be added: {exc}") from exc
    return EncryptedTensor(a.shape, a.count + b.count, a.slots, vectors)


def add_plain(a: EncryptedTensor, array: Any) -> EncryptedTensor:
    """Enc(x) + p = Enc(x + p) for a plaintext tensor p of the same shape (used for masking).

    Raises:
        ValueError: different shape or non-finite values.
        CryptoError: TenSEAL refused.
    """
    values = _as_float_array(array, "the plaintext to add")
    if values.shape != a.shape:
        raise ValueError(f"cannot add a plaintext of shape {values.shape} to an encrypted {a.shape}")
    try:
        vectors = tuple(v + c.tolist() for v, c in zip(a._vectors, _chunks(values, a.slots), strict=True))
    except _TENSEAL_ERRORS as exc:
        raise CryptoError(f"plaintext cannot be added: {exc}") from exc
    return EncryptedTensor(a.shape, a.count, a.slots, vectors)


def sum_encrypted(items: Sequence[EncryptedTensor]) -> EncryptedTensor:
    """Sum encrypted tensors of one shape; `count` of the result is the sum of their counts.

    Raises:
        ValueError: no items or different shapes.
        CryptoError: TenSEAL refused.
    """
    if not items:
        raise ValueError("nothing to sum")
    total = items[0]
    for item in items[1:]:
        total = add(total, item)
    return total


# --------------------------------------------------------------------------------------------
# Weight averaging (SplitFed)
# --------------------------------------------------------------------------------------------


def encrypt_vector(ctx: CkksContext, vector: Any) -> EncryptedTensor:
    """Encrypt a flat float vector of any length (chunked into N/2-slot ciphertexts).

    Raises:
        ValueError: not one-dimensional, empty, or non-finite.
    """
    values = _as_float_array(vector, "the vector to encrypt")
    if values.ndim != 1:
        raise ValueError(f"encrypt_vector takes a flat vector, got shape {values.shape}")
    return encrypt_packed(ctx, values)


def decrypt_vector(ctx: CkksContext, enc: EncryptedTensor, *, mean: bool = False) -> np.ndarray:
    """Decrypt a (summed) vector; with `mean`, divide by the number of vectors summed.

    The count comes from the aggregator; owners may compare it with the deployment's owner count.

    Raises:
        CryptoError: no secret key, or decryption failed.
    """
    values = decrypt_packed(ctx, enc).reshape(-1)
    return values / enc.count if mean else values


# --------------------------------------------------------------------------------------------
# Masked aggregate for sum/mean merges
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class AggregateMask:
    """What the label holder keeps between `mask_aggregate` and `unmask`. Never send it; use once."""

    shape: tuple[int, ...]
    count: int
    mask_bits: int
    precision_bits: int
    values: np.ndarray = field(repr=False)


def _check_budget(mask_bits: int, precision_bits: int) -> None:
    if (
        not 1 <= precision_bits <= 30
        or not 1 <= mask_bits
        or mask_bits + precision_bits > PRECISION_BUDGET_BITS
    ):
        raise ValueError(
            f"mask_bits={mask_bits} + precision_bits={precision_bits} must be at most "
            f"{PRECISION_BUDGET_BITS} (CKKS decodes in double precision), precision_bits 1..30"
        )


def _grid_mask(shape: tuple[int, ...], mask_bits: int, precision_bits: int) -> np.ndarray:
    """Uniform on {j * 2**-precision_bits : -2**(mask+precision) <= j < 2**(mask+precision)}."""
    size = math.prod(shape)
    span_bits = mask_bits + precision_bits
    raw = np.frombuffer(os.urandom(8 * size), dtype="<u8") & np.uint64((1 << (span_bits + 1)) - 1)
    ints = raw.astype(np.int64) - (1 << span_bits)
    return (ints.astype(np.float64) * 2.0**-precision_bits).reshape(shape)


def mask_aggregate(
    ctx: CkksContext,
    contributions: Sequence[EncryptedTensor],
    *,
    mask_bits: int = DEFAULT_MASK_BITS,
    precision_bits: int = DEFAULT_PRECISION_BITS,
) -> tuple[EncryptedTensor, AggregateMask]:
    """Label holder: Enc(sum x_i + r) for a fresh mask r, to send to the key holder.

    Args:
        ctx: the label holder's public context.
        contributions: one encrypted tensor per owner (at least two, else the "aggregate" is
            one owner's tensor), all of one shape.
        mask_bits: |r| < 2**mask_bits; the key holder's view hides each aggregate value v up to
            statistical distance |v| / 2**(mask_bits + 1).
        precision_bits: r lies on the 2**-precision_bits grid the key holder rounds to.

    Returns:
        (masked ciphertext for the key holder, the mask to keep for `unmask`).

    Raises:
        ValueError: fewer than two contributions, different shapes, or a budget above 44 bits.
        CryptoError: TenSEAL refused a ciphertext.
    """
    _check_budget(mask_bits, precision_bits)
    params = ctx.params
    if params.data_bits < params.global_scale_bits + mask_bits + 2:
        raise ValueError(
            f"a 2**{mask_bits} mask at scale 2**{params.global_scale_bits} does not fit the "
            f"{params.data_bits}-bit data modulus of {params.coeff_mod_bit_sizes}; use a smaller "
            "mask or larger data primes"
        )
    if len(contributions) < 2:
        raise ValueError("a masked aggregate needs at least two contributions")
    total = sum_encrypted(contributions)
    mask = _grid_mask(total.shape, mask_bits, precision_bits)
    masked = add_plain(total, mask)
    return masked, AggregateMask(total.shape, total.count, mask_bits, precision_bits, mask)


def decrypt_rounded(
    ctx: CkksContext, enc: EncryptedTensor, *, precision_bits: int = DEFAULT_PRECISION_BITS
) -> np.ndarray:
    """Key holder: decrypt a masked aggregate and round it to the 2**-precision_bits grid.

    A raw CKKS decryption carries the encryption noise, which depends on the secret key; handed
    to another party it lets that party recover the key (Li & Micciancio, 2021). Rounding to a
    grid far coarser than the noise (2**-20 vs about 2**-26) removes it.

    Returns:
        float64 array of `enc.shape`, every value a multiple of 2**-precision_bits.

    Raises:
        CryptoError: no secret key, or decryption failed.
    """
    _check_budget(1, precision_bits)
    values = decrypt_packed(ctx, enc)
    scale = 2.0**precision_bits
    return np.round(values * scale) / scale


def unmask(mask: AggregateMask, rounded: Any, *, mean: bool = False) -> np.ndarray:
    """Label holder: remove the mask from the key holder's rounded decryption.

    Args:
        mask: from `mask_aggregate`.
        rounded: what the key holder returned.
        mean: divide by the number of contributions.

    Returns:
        The sum (or mean) of the owners' tensors, to within 2**-(precision_bits+1) plus the CKKS
        error.

    Raises:
        CryptoError: the key holder's answer has the wrong shape, is not finite, is not on the
            agreed grid (it must round what it hands out) or is out of range.
    """
    values: np.ndarray = np.asarray(rounded)
    if values.shape != mask.shape or values.dtype != np.float64:
        raise CryptoError(f"key holder returned {values.dtype} {values.shape}, expected float64 {mask.shape}")
    scale = 2.0**mask.precision_bits
    scaled = values * scale
    bound = 2.0 ** (mask.mask_bits + 1)
    if not np.all(np.isfinite(values)) or np.any(np.abs(values) > bound):
        raise CryptoError(
            f"key holder returned values that are not finite or exceed {bound}: either it broke "
            f"the protocol or the aggregate is too large for a 2**{mask.mask_bits} mask"
        )
    if not np.array_equal(scaled, np.round(scaled)):
        raise CryptoError(
            f"key holder returned values not on the 2**-{mask.precision_bits} grid; it must round "
            "decryptions it hands out; refusing them"
        )
    total: np.ndarray = values - mask.values
    return total / mask.count if mean else total
