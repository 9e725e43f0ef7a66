"""Canonical encodings and digests used for hashes that parties must agree on.

One home for "the bytes we hash": deployment hash, policy hash, audit entries. Canonical JSON
is sorted keys, no insignificant whitespace, UTF-8, integers as integers, floats in repr form
(shortest round-trip), and no NaN/Infinity. Pure standard library.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from typing import Any


def _check_floats(obj: Any) -> None:
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ValueError("canonical JSON has no NaN or Infinity")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"canonical JSON keys must be strings, got {type(k).__name__}")
            _check_floats(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            _check_floats(v)


def _normalise(obj: Any) -> Any:
    """Floats that are whole numbers become ints so 1.0 and 1 hash alike."""
    if isinstance(obj, bool) or obj is None:
        return obj
    if isinstance(obj, float) and obj.is_integer() and abs(obj) < 2**53:
        return int(obj)
    if isinstance(obj, dict):
        return {k: _normalise(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_normalise(v) for v in obj]
    return obj


def canonical_json(obj: Any) -> bytes:
    """Encode `obj` (dicts, lists, str, int, float, bool, None) as canonical JSON bytes.

    Raises:
        TypeError: for keys that are not strings or values JSON cannot express.
        ValueError: for NaN or infinite floats.
    """
    _check_floats(obj)
    return json.dumps(
        _normalise(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of `data` (faster than BLAKE2b on these machines)."""
    return hashlib.sha256(data).hexdigest()


def digest_of(obj: Any) -> str:
    """Hex SHA-256 of the canonical JSON of `obj`."""
    return sha256_hex(canonical_json(obj))


def sha256_frames(frames: Sequence[bytes | memoryview]) -> str:
    """Hex SHA-256 over the concatenation of message frames, without joining them.

    Sender and receiver both compute it over the same encoded frames, so their audit entries for
    one message carry the same digest.
    """
    h = hashlib.sha256()
    for f in frames:
        h.update(f)
    return h.hexdigest()
