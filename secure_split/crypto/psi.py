"""Private set intersection (PSI) by commutative blinding over ristretto255 (ECDH-PSI).

Vertical split learning needs the parties to agree on which samples they share before the first
step, without any party learning the ids the others hold outside that intersection. Each id is
hashed to a point of the prime-order group ristretto255,

    H(x) = ristretto255_from_hash(SHA-512(DOMAIN || len(salt) || salt || type tag || id)),

and each party blinds points with its own secret scalar k: B_k(P) = k·P. Blindings commute,
a·(b·H(x)) = b·(a·H(x)), so sets blinded by every party's key can be compared for equality while
no party can test a guessed id without all the keys (decisional Diffie-Hellman on ristretto255).
See docs/he-and-psi.md for the full argument and what each party learns.

Everything here is sans-IO: objects take and return `bytes`; the peer moves them through its
gate (as `psi` messages, inside authenticated frames; `secure_split.peer.rounds.psi.PsiRound`).
One protocol serves every case, two parties included:

- `MultiPartyPsi`: the coordinator (label holder) and K >= 1 feature owners, a ring of blindings
  in which every set is blinded by every key, the fully blinded sets are compared by the
  coordinator (who cannot map any of them back to ids) and the matches come back as positions
  that only the owner of each set can turn into ids. Steps are `PsiStep(sender, receiver,
  payload)`. A vertical deployment runs one ring of all its parties; a horizontal coordinator
  that holds labels runs a two-party ring with each owner.

Wire encoding: points are 32 bytes each, concatenated; positions are little-endian uint32. Every
received point is checked with `crypto_core_ristretto255_is_valid_point`, every size is bounded
before anything is allocated, and bad bytes raise `CryptoError`.
"""

from __future__ import annotations

import hashlib
import os
import struct
import sys
import tempfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeAlias

import numpy as np
import rbcl

from secure_split.errors import CryptoError, LocalProtocolError, RemoteProtocolError


def _remove_rbcl_temp_library() -> None:
    """Delete the copy of libsodium that `import rbcl` writes to the temp dir (and never removes).

    rbcl 1.1 writes its bundled libsodium (2.8 MB) to a fresh temporary file on every import and
    loads it from there. Once loaded the file is no longer needed; unlinking it keeps every peer
    process from leaving one behind.
    """
    path = getattr(sys.modules.get("rbcl._sodium"), "lib_path", None)
    if not isinstance(path, str) or not path.endswith((".so", ".pyd")):
        return
    if os.path.dirname(os.path.abspath(path)) != os.path.abspath(tempfile.gettempdir()):
        return
    try:
        os.unlink(path)
    except OSError:
        pass  # already gone, or not ours to remove (Windows keeps loaded files locked)


_remove_rbcl_temp_library()

PsiId: TypeAlias = int | str | bytes
"""A sample id. Ids match only when type and value are equal (7 and "7" are different ids)."""

POINT_BYTES = 32
"""Bytes per encoded ristretto255 point on the wire."""

DEFAULT_MAX_POINTS = 1 << 22
"""Default bound on the size of one set (4,194,304 ids; 128 MiB of points)."""

DOMAIN = b"secure_split/psi/ristretto255/v1\x00"
"""Domain separation for hashing ids to the group: no other protocol hashes to the same points."""

MIN_SALT_BYTES = 16
MAX_SALT_BYTES = 1024

_POSITION = np.dtype("<u4")
_IDENTITY = bytes(POINT_BYTES)


# --------------------------------------------------------------------------------------------
# Group primitives
# --------------------------------------------------------------------------------------------


def _id_bytes(value: PsiId) -> bytes:
    """Unambiguous encoding of one id: a type tag, then the value."""
    if isinstance(value, bool):
        raise TypeError("PSI ids must be int, str or bytes, not bool")
    if isinstance(value, int):
        return b"i" + str(value).encode("ascii")
    if isinstance(value, str):
        return b"s" + value.encode("utf-8")
    if isinstance(value, bytes):
        return b"b" + value
    raise TypeError(f"PSI ids must be int, str or bytes, got {type(value).__name__}")


def _check_salt(salt: bytes) -> None:
    if not isinstance(salt, bytes) or not MIN_SALT_BYTES <= len(salt) <= MAX_SALT_BYTES:
        raise ValueError(
            f"PSI salt must be {MIN_SALT_BYTES}..{MAX_SALT_BYTES} bytes that every party shares "
            "(the peers use `psi_salt(deployment hash)`); runs stay unlinkable on the wire because "
            "each run draws fresh blinding scalars"
        )


def hash_ids(ids: Iterable[PsiId], *, salt: bytes) -> list[bytes]:
    """Hash ids to ristretto255 points, H(x) = from_hash(SHA-512(DOMAIN, salt, tagged id)).

    Args:
        ids: the ids to hash (int, str or bytes).
        salt: the session salt every party uses (16..1024 bytes).

    Returns:
        One 32-byte encoded point per id, in order.

    Raises:
        ValueError: the salt has the wrong length.
        TypeError: an id is not int, str or bytes.
    """
    _check_salt(salt)
    prefix = hashlib.sha512(DOMAIN + struct.pack("<H", len(salt)) + salt)
    from_hash = rbcl.crypto_core_ristretto255_from_hash
    points = []
    for value in ids:
        h = prefix.copy()
        h.update(_id_bytes(value))
        points.append(from_hash(h.digest()))
    return points


def new_scalar() -> bytes:
    """A fresh secret blinding scalar (uniform, non-zero, below the group order)."""
    return bytes(rbcl.crypto_core_ristretto255_scalar_random())


def blind_points(scalar: bytes, points: Sequence[bytes], *, workers: int = 1) -> list[bytes]:
    """Multiply every point by `scalar` (the blinding step). Points must already be validated.

    Args:
        scalar: a 32-byte scalar from `new_scalar()`.
        points: valid encoded points.
        workers: threads to use; libsodium releases the GIL, so 2 workers on 2 free cores
            give about 1.6x (see bench/psi_throughput.py).

    Returns:
        The blinded points, same order.

    Raises:
        CryptoError: a point could not be multiplied (invalid encoding or identity result).
    """
    mult = rbcl.crypto_scalarmult_ristretto255

    def run(chunk: Sequence[bytes]) -> list[bytes]:
        return [mult(scalar, p) for p in chunk]

    try:
        if workers <= 1 or len(points) < 4096:
            return run(points)
        step = -(-len(points) // workers)
        chunks = [points[i : i + step] for i in range(0, len(points), step)]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return [p for part in pool.map(run, chunks) for p in part]
    except (RuntimeError, ValueError, TypeError) as exc:
        raise CryptoError(f"PSI: a point could not be blinded: {exc}") from exc


def decode_points(data: bytes, *, what: str, max_points: int = DEFAULT_MAX_POINTS) -> list[bytes]:
    """Split a received set into 32-byte points, bounding its size and validating every point.

    Args:
        data: concatenated 32-byte encoded points.
        what: what the set is, for the error message.
        max_points: the largest number of points accepted (checked before anything is split).

    Returns:
        The points, in order.

    Raises:
        CryptoError: the length is not a multiple of 32, the set is larger than `max_points`,
            or a point is not the canonical encoding of a ristretto255 element other than the
            identity.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CryptoError(f"PSI: {what} must be bytes, got {type(data).__name__}")
    size = len(data)
    if size % POINT_BYTES:
        raise CryptoError(f"PSI: {what} is {size} bytes, not a multiple of {POINT_BYTES} (truncated?)")
    count = size // POINT_BYTES
    if count > max_points:
        raise CryptoError(f"PSI: {what} holds {count} points, more than the bound {max_points}")
    raw = bytes(data)
    points = [raw[i : i + POINT_BYTES] for i in range(0, size, POINT_BYTES)]
    valid = rbcl.crypto_core_ristretto255_is_valid_point
    for index, point in enumerate(points):
        # rbcl's libsodium accepts the identity and ignores bit 255 (a second encoding of the
        # same point), so both are refused here before asking it.
        if point[31] & 0x80 or point == _IDENTITY or not valid(point):
            raise CryptoError(f"PSI: {what}: point {index} is not a valid ristretto255 element")
    return points


def _random_permutation(n: int) -> np.ndarray:
    """A uniformly random permutation from the OS CSPRNG (sort by 128-bit random keys)."""
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    keys = np.frombuffer(os.urandom(16 * n), dtype="<u8").reshape(n, 2)
    return np.lexsort((keys[:, 1], keys[:, 0])).astype(np.int64)


def _encode_positions(positions: Iterable[int]) -> bytes:
    return np.fromiter(positions, dtype=_POSITION).tobytes()


def _decode_positions(data: bytes, *, size: int, what: str) -> np.ndarray:
    """Positions: strictly increasing uint32 below `size` (so no index repeats or overflows)."""
    if len(data) % _POSITION.itemsize:
        raise CryptoError(f"PSI: {what} is {len(data)} bytes, not a multiple of 4 (truncated?)")
    if len(data) // _POSITION.itemsize > size:
        raise CryptoError(f"PSI: {what} holds more positions than the {size} ids of the set")
    positions = np.frombuffer(data, dtype=_POSITION).astype(np.int64)
    if positions.size and (positions[-1] >= size or np.any(np.diff(positions) <= 0)):
        raise CryptoError(f"PSI: {what} must be strictly increasing positions below {size}")
    return positions


def _require_unique(points: Sequence[bytes], what: str) -> None:
    if len(set(points)) != len(points):
        raise CryptoError(f"PSI: {what} contains repeated points; a blinded set has no duplicates")


# --------------------------------------------------------------------------------------------
# One party's own set
# --------------------------------------------------------------------------------------------


class _OwnSet:
    """A party's deduplicated ids, its secret scalar and the shuffle it sent its set in."""

    def __init__(self, ids: Sequence[PsiId], *, salt: bytes, max_points: int) -> None:
        first: dict[PsiId, int] = {}
        kinds: set[type] = set()
        for index, value in enumerate(ids):
            if isinstance(value, bool) or not isinstance(value, int | str | bytes):
                raise TypeError(f"PSI ids must be int, str or bytes, got {type(value).__name__}")
            kinds.add(int if isinstance(value, int) else type(value))
            first.setdefault(value, index)
        if len(kinds) > 1:
            raise TypeError("PSI ids of one party must all have one type (int, str or bytes)")
        if len(first) > max_points:
            raise ValueError(f"PSI: {len(first)} ids exceed the bound max_points={max_points}")
        self.ids: list[PsiId] = list(first)
        self.first_index: list[int] = list(first.values())
        self.scalar = new_scalar()
        self.salt = salt
        # shuffled position j on the wire holds self.ids[self.perm[j]]
        self.perm = _random_permutation(len(self.ids))

    def blinded_shuffled(self, workers: int) -> bytes:
        points = hash_ids((self.ids[i] for i in self.perm), salt=self.salt)
        return b"".join(blind_points(self.scalar, points, workers=workers))

    def select(self, wire_positions: Iterable[int]) -> list[int]:
        """Indices into `self.ids` of the given wire (shuffled) positions."""
        return [int(self.perm[j]) for j in wire_positions]


@dataclass(frozen=True)
class PsiResult:
    """The intersection as one party sees it: its own ids only.

    Attributes:
        ids: the ids in the intersection, sorted (the same order at every party, so it doubles
            as the sample alignment).
        positions: for each id in `ids`, its index in the list the party passed in (first
            occurrence), to select rows of the party's own data.
    """

    ids: list[PsiId]
    positions: list[int]


def _result(own: _OwnSet, indices: Iterable[int]) -> PsiResult:
    chosen = sorted(indices, key=lambda i: own.ids[i])
    return PsiResult(ids=[own.ids[i] for i in chosen], positions=[own.first_index[i] for i in chosen])


# --------------------------------------------------------------------------------------------
# The ring: the coordinator and K >= 1 owners
# --------------------------------------------------------------------------------------------

_MAGIC = b"SPSI"
_VERSION = 1
_HEADER = struct.Struct("<4sBBHH8sI")  # magic, version, kind, origin, hops, session tag, count
_KIND_SET = 1  # a set blinded by `hops` keys (hops == n: fully blinded, to the coordinator)
_KIND_MATCHES_SHUFFLED = 2  # coordinator -> shuffler: matched positions in the final shuffled order
_KIND_MATCHES = 3  # shuffler -> origin: matched positions in the origin's own shuffled order
_KIND_NAMES = {
    _KIND_SET: "blinded set",
    _KIND_MATCHES_SHUFFLED: "matches (shuffled)",
    _KIND_MATCHES: "matches",
}


@dataclass(frozen=True)
class PsiStep:
    """One message of the multi-party PSI: `sender` must send `payload` to `receiver`."""

    sender: str
    receiver: str
    payload: bytes = field(repr=False)

    def __repr__(self) -> str:
        return f"PsiStep({self.sender} -> {self.receiver}, {len(self.payload)} bytes)"


def _session_tag(parties: Sequence[str], salt: bytes) -> bytes:
    """8 bytes binding every message to the ring order and salt, so a mismatch is caught early."""
    h = hashlib.sha256(b"secure_split/psi/ring/v1\x00" + salt)
    for name in parties:
        h.update(struct.pack("<H", len(name.encode())) + name.encode())
    return h.digest()[:8]


class MultiPartyPsi:
    """One party of the ring PSI among K >= 1 feature owners and the coordinator (the label holder).

    Parties are indexed by their place in `parties` (index 0 is the coordinator); every party
    must be given the same list (take it from the deployment). Each party's set travels the
    ring once, each party blinding it with its key; the last blinder shuffles it again and sends
    it to the coordinator, who intersects the fully blinded sets and sends each set's matched
    positions back along the path, where the shuffles are undone one at a time.

    Messages (n = K + 1 parties; party o's set is S_o; "i+1" is the next party in the ring):

    ========  ==========================  ===========================================  ============
    round     sender -> receiver          payload                                      bytes
    ========  ==========================  ===========================================  ============
    1..n-1    o+h-1 -> o+h  (h = hops)    S_o blinded by the keys of o..o+h-1          22 + 32|S_o|
    n         o-1 -> coordinator          S_o blinded by all keys, shuffled by o-1     22 + 32|S_o|
    n+1       coordinator -> o-1          positions of the intersection in that list   22 + 4|I|
    n+2       o-1 -> o                    the same positions in o's own shuffled order 22 + 4|I|
    ========  ==========================  ===========================================  ============

    Sans-IO: call `start()` once, and `receive(sender, payload)` for every message addressed
    to this party, in any order (also before `start()`: a neighbour may be faster); both
    return the steps to send now. Steps addressed to this
    party itself are handled internally and never returned. `done` turns true when this party
    knows its part of the intersection (`result()`); `finished` when it also passed on everything
    the other parties' sets need from it. Keep delivering until `finished`, not `done`: over a
    slow link a party's own result can arrive before a set it must still blind and forward.

    Args:
        me: this party's name (must be in `parties`).
        parties: all party names, coordinator first, identical at every party.
        ids: this party's ids (int, str or bytes, one type).
        salt: the session salt every party shares (16..1024 bytes).
        max_points: the largest set accepted from any party.
        workers: threads for blinding.

    Raises:
        ValueError: fewer than 2 parties, duplicate names, `me` not among them, bad salt.
    """

    def __init__(
        self,
        me: str,
        parties: Sequence[str],
        ids: Sequence[PsiId],
        *,
        salt: bytes,
        max_points: int = DEFAULT_MAX_POINTS,
        workers: int = 1,
    ) -> None:
        _check_salt(salt)
        names = list(parties)
        if len(names) < 2 or len(set(names)) != len(names):
            raise ValueError("PSI needs at least 2 parties with distinct names (coordinator first)")
        if len(names) > 0xFFFF:
            raise ValueError("PSI: too many parties")
        if me not in names:
            raise ValueError(f"PSI: '{me}' is not one of the parties {names}")
        self.me = me
        self.parties: tuple[str, ...] = tuple(names)
        self._n = len(names)
        self._index = names.index(me)
        self._own = _OwnSet(ids, salt=salt, max_points=max_points)
        self._tag = _session_tag(names, salt)
        self._max_points = max_points
        self._workers = workers
        self._started = False
        self._seen: set[tuple[int, int, int]] = set()  # (kind, origin, hops) already received
        self._final_perm: dict[int, np.ndarray] = {}  # origin -> shuffle applied as last blinder
        self._full_sets: dict[int, list[bytes]] = {}  # coordinator only: origin -> fully blinded
        self._sizes: dict[str, int] = {me: len(self._own.ids)}
        self._result: PsiResult | None = None

    # -- public ---------------------------------------------------------------------------

    @property
    def coordinator(self) -> str:
        """The party that compares the fully blinded sets (the first of `parties`)."""
        return self.parties[0]

    @property
    def done(self) -> bool:
        """True once this party knows its part of the intersection."""
        return self._result is not None

    @property
    def finished(self) -> bool:
        """True once this party knows its result AND has handled every message the others' sets
        need from it (a party can learn its own result before it has passed on another party's
        set or matches: it must keep serving the PSI until then)."""
        expected = 2 * self._n + 1 if self._index == 0 else self._n + 1
        return self._result is not None and len(self._seen) == expected

    @property
    def set_sizes(self) -> dict[str, int]:
        """The set sizes this party has seen (its own and those of sets that passed through it)."""
        return dict(self._sizes)

    def start(self) -> list[PsiStep]:
        """Round 1: blind and shuffle this party's own set and send it to the next party.

        Returns:
            The steps to send now.

        Raises:
            LocalProtocolError: called twice.
        """
        if self._started:
            raise LocalProtocolError("PSI: start() was already called")
        self._started = True
        payload = self._own.blinded_shuffled(self._workers)
        return self._route(self._set_step(origin=self._index, hops=1, points_bytes=payload))

    def receive(self, sender: str, payload: bytes) -> list[PsiStep]:
        """Handle one message addressed to this party.

        Args:
            sender: the authenticated name of the party that sent it (from the transport).
            payload: the message bytes.

        Returns:
            The steps to send now (possibly none).

        Raises:
            CryptoError: malformed bytes, a bad length, an invalid point, duplicates.
            RemoteProtocolError: a message from the wrong party, for another session or ring,
                a repeat, or one this party should not receive.
        """
        if sender not in self.parties:
            raise RemoteProtocolError(f"PSI: '{sender}' is not a party of this PSI")
        return self._route(self._handle(self.parties.index(sender), payload))

    def result(self) -> PsiResult:
        """This party's intersection: sorted ids and their positions in the caller's list.

        Raises:
            LocalProtocolError: the protocol has not finished at this party.
        """
        if self._result is None:
            raise LocalProtocolError("PSI: the intersection is not known yet at this party")
        return self._result

    def intersection(self) -> list[PsiId]:
        """The sorted ids in the intersection (this party's own ids only)."""
        return self.result().ids

    # -- internals ------------------------------------------------------------------------

    def _name(self, index: int) -> str:
        return self.parties[index % self._n]

    def _pack(self, kind: int, origin: int, hops: int, count: int, body: bytes, to: int) -> PsiStep:
        header = _HEADER.pack(_MAGIC, _VERSION, kind, origin, hops, self._tag, count)
        return PsiStep(self.me, self._name(to), header + body)

    def _set_step(self, *, origin: int, hops: int, points_bytes: bytes) -> PsiStep:
        count = len(points_bytes) // POINT_BYTES
        # fully blinded sets go to the coordinator; partial ones to the next party in the ring
        to = 0 if hops == self._n else self._index + 1
        return self._pack(_KIND_SET, origin, hops, count, points_bytes, to)

    def _route(self, steps: PsiStep | list[PsiStep]) -> list[PsiStep]:
        """Deliver steps addressed to this party at once; return the others."""
        pending = [steps] if isinstance(steps, PsiStep) else list(steps)
        out: list[PsiStep] = []
        while pending:
            step = pending.pop(0)
            if step.receiver == self.me:
                pending.extend(self._handle(self._index, step.payload))
            else:
                out.append(step)
        return out

    def _parse(self, sender: int, payload: bytes) -> tuple[int, int, int, bytes]:
        if not isinstance(payload, bytes | bytearray | memoryview) or len(payload) < _HEADER.size:
            raise CryptoError("PSI: message shorter than its header (truncated?)")
        payload = bytes(payload)
        magic, version, kind, origin, hops, tag, count = _HEADER.unpack_from(payload)
        if magic != _MAGIC or version != _VERSION:
            raise RemoteProtocolError(
                f"PSI: message from '{self._name(sender)}' is not a PSI v{_VERSION} message"
            )
        if tag != self._tag:
            raise RemoteProtocolError(
                f"PSI: '{self._name(sender)}' runs a different PSI session: the parties disagree on "
                "the salt or on the ring order (coordinator first, same list everywhere)"
            )
        if kind not in _KIND_NAMES or origin >= self._n or not 0 <= hops <= self._n:
            raise RemoteProtocolError(f"PSI: bad header from '{self._name(sender)}'")
        key = (kind, origin, hops)
        if key in self._seen:
            raise RemoteProtocolError(
                f"PSI: repeated {_KIND_NAMES[kind]} for the set of '{self._name(origin)}' "
                f"from '{self._name(sender)}'"
            )
        unit = POINT_BYTES if kind == _KIND_SET else _POSITION.itemsize
        if count > self._max_points or len(payload) - _HEADER.size != count * unit:
            raise CryptoError(
                f"PSI: {_KIND_NAMES[kind]} from '{self._name(sender)}' has {len(payload) - _HEADER.size} "
                f"bytes for {count} entries (bound {self._max_points})"
            )
        return kind, origin, hops, payload[_HEADER.size :]

    def _expect(self, ok: bool, sender: int, what: str) -> None:
        if not ok:
            raise RemoteProtocolError(
                f"PSI: '{self._name(sender)}' sent {what} that '{self.me}' must not receive"
            )

    def _handle(self, sender: int, payload: bytes) -> list[PsiStep]:
        kind, origin, hops, body = self._parse(sender, payload)
        steps = self._dispatch(sender, kind, origin, hops, body)
        # only a message that was handled counts as received: a refused one may be sent again
        self._seen.add((kind, origin, hops))
        return steps

    def _dispatch(self, sender: int, kind: int, origin: int, hops: int, body: bytes) -> list[PsiStep]:
        me, n = self._index, self._n
        if kind == _KIND_SET and hops == n:
            self._expect(me == 0 and sender == (origin - 1) % n, sender, "a fully blinded set")
            return self._on_full_set(origin, body)
        if kind == _KIND_SET:
            self._expect(
                1 <= hops and me == (origin + hops) % n and sender == (me - 1) % n, sender, "a blinded set"
            )
            return self._on_partial_set(origin, hops, body)
        if kind == _KIND_MATCHES_SHUFFLED:
            self._expect(sender == 0 and me == (origin - 1) % n, sender, "shuffled matches")
            return self._on_matches_shuffled(origin, body)
        self._expect(sender == (me - 1) % n and origin == me, sender, "matches")
        return self._on_matches(body)

    def _on_partial_set(self, origin: int, hops: int, body: bytes) -> list[PsiStep]:
        what = f"the set of '{self._name(origin)}' after {hops} blinding(s)"
        points = decode_points(body, what=what, max_points=self._max_points)
        self._check_size(origin, len(points), what)
        blinded = blind_points(self._own.scalar, points, workers=self._workers)
        if hops + 1 == self._n:
            # We are the last blinder of this set: shuffle it again so the coordinator cannot
            # line it up with anything it saw earlier; remember how, to undo it for the origin.
            perm = _random_permutation(len(blinded))
            self._final_perm[origin] = perm
            blinded = [blinded[i] for i in perm]
        return [self._set_step(origin=origin, hops=hops + 1, points_bytes=b"".join(blinded))]

    def _on_full_set(self, origin: int, body: bytes) -> list[PsiStep]:
        what = f"the fully blinded set of '{self._name(origin)}'"
        points = decode_points(body, what=what, max_points=self._max_points)
        _require_unique(points, what)
        self._check_size(origin, len(points), what)
        self._full_sets[origin] = points
        if len(self._full_sets) < self._n:
            return []
        sets = [self._full_sets[o] for o in range(self._n)]
        common = set(sets[min(range(self._n), key=lambda o: len(sets[o]))])
        for other in sets:
            common.intersection_update(other)
        steps = []
        for o, points_o in enumerate(sets):
            matched = [j for j, p in enumerate(points_o) if p in common]
            steps.append(
                self._pack(_KIND_MATCHES_SHUFFLED, o, 0, len(matched), _encode_positions(matched), o - 1)
            )
        self._full_sets.clear()
        return steps

    def _check_size(self, origin: int, size: int, what: str) -> None:
        """A set keeps its size all the way round: a party that dropped or added points (to learn
        from the matches which ids were dropped, or to hide some) is refused where the set comes
        back to a party that saw it before (its owner's own set at the coordinator, another's
        set the coordinator blinded earlier)."""
        name = self._name(origin)
        seen = self._sizes.get(name)
        if seen is not None and seen != size:
            raise RemoteProtocolError(f"PSI: {what} has {size} points, but it had {seen} when this party saw it "
                                      "before; a party on the ring dropped or added points")
        self._sizes[name] = size

    def _on_matches_shuffled(self, origin: int, body: bytes) -> list[PsiStep]:
        perm = self._final_perm.get(origin)
        if perm is None:
            raise RemoteProtocolError(
                f"PSI: matches for the set of '{self._name(origin)}' arrived before this party shuffled it"
            )
        positions = _decode_positions(body, size=len(perm), what="shuffled matches")
        unshuffled = np.sort(perm[positions])
        return [self._pack(_KIND_MATCHES, origin, 0, len(unshuffled), _encode_positions(unshuffled), origin)]

    def _on_matches(self, body: bytes) -> list[PsiStep]:
        positions = _decode_positions(body, size=len(self._own.ids), what="matches")
        self._result = _result(self._own, self._own.select(positions.tolist()))
        return []
