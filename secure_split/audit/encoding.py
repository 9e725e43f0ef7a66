"""The one canonical encoding of an audit entry (format 2), for the writer and the verifier.

An entry's line is `orjson.dumps(entry, option=OPT_SORT_KEYS)` of the normalised entry
(`writer.clean_value`): keys sorted by code point, no whitespace, UTF-8 strings with only `"`,
`\\`, and U+0000-U+001F escaped (`\\n \\r \\t \\b \\f`, else `\\u00xx`), integers in
[-2^63, 2^63), a float only when it is finite and not a whole number below 2^53 in magnitude,
written as the shortest decimal that reads back to the same double (`0.1`, `1e-7`, `1.5e+300`).
FORMAT.md §2 spells it out byte by byte.

The verifier enforces it on every line: `canonical_problem` parses, re-encodes and compares bytes
(which also refuses duplicate keys, other escapes and other number spellings); `value_problem`
finds whole floats and out-of-range integers, which re-encode to themselves (the scanner walks the
values of every entry but messages, whose numeric fields the collector checks one by one). orjson lives here
only (an import-linter contract keeps it so).
"""

from __future__ import annotations

from typing import Any, Final

import orjson

from secure_split.audit.format import INT_LIMIT, INT_MIN

_SORT: Final[int] = orjson.OPT_SORT_KEYS
_dumps = orjson.dumps

SORT_KEYS: Final[int] = _SORT
dumps = orjson.dumps
"""`dumps(entry, option=SORT_KEYS)` is `encode_entry(entry)` without the call in between (the scanner's hot path)."""

JSONDecodeError = orjson.JSONDecodeError
"""What `parse` raises for bytes that are not JSON (a subclass of ValueError)."""

parse = orjson.loads
"""Parse one line (bytes) into Python values; strict RFC 8259 (no NaN, no lone surrogates)."""

def encode_entry(entry: dict[str, Any]) -> bytes:
    """The canonical bytes of a normalised entry (without the newline).

    Raises:
        TypeError: a value canonical JSON cannot hold (an integer beyond 64 bits, an object).
    """
    return _dumps(entry, option=_SORT)


def encode_value(value: Any) -> bytes:
    """Canonical bytes of any normalised value (used for the metrics comparison)."""
    return _dumps(value, option=_SORT)


def value_problem(value: Any, depth: int = 0) -> str | None:
    """Why a parsed value is not canonical although it re-encodes to itself: a whole float, an integer
    out of range (None when it is fine)."""
    t = type(value)
    if t is float:
        if value.is_integer() and abs(value) < 2**53:
            return f"the whole number {value!r} is written as a float (canonical form: an integer)"
        return None
    if t is int:
        return None if INT_MIN <= value < INT_LIMIT else f"the integer {value} is out of range [-2^63, 2^63)"
    if t is dict:
        for v in value.values():
            p = value_problem(v, depth + 1)
            if p:
                return p
    elif t is list:
        for v in value:
            p = value_problem(v, depth + 1)
            if p:
                return p
    return None


def canonical_problem(line: bytes, entry: Any) -> str | None:
    """Why `line` is not the canonical encoding of `entry` (its parse), or None when it is.

    Args:
        line: the raw line as written (no newline).
        entry: `parse(line)`.
    """
    try:
        again = _dumps(entry, option=_SORT)
    except TypeError:
        return "holds a value canonical JSON cannot express"
    if again != line:
        return "not in canonical encoding (sorted keys, each once, no spaces, canonical escapes and numbers)"
    return None


def checkpoint_body_hash(entry: dict[str, Any]) -> str:
    """The entry hash of a checkpoint: SHA-256 of the canonical encoding of the entry without `sig`."""
    import hashlib

    return hashlib.sha256(encode_entry({k: v for k, v in entry.items() if k != "sig"})).hexdigest()
