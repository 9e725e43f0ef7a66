"""The order-free sums that let two logs agree on their messages without keeping them.

For each (sender, receiver, session) a log's `Stream` keeps a count and the sum, mod 2^64, of one
hash per message over the facts sender and receiver both log (`crosscheck.COMPARED_FIELDS` and the
protocol seq). Equal counts and sums: the two logs tell the same story (the hash is keyed by the
process's secret hash seed, so a party cannot aim at a collision); different: the cross-peer pass
rereads both files for that session and compares message by message.

The logs of one set may be scanned in different processes (`parallel.py`, which gives them one
hash seed), so nothing here hashes None (whose hash is its address), and types are told apart
(1, 1.0 and true hash alike in Python, not in JSON).
"""

from __future__ import annotations

from typing import Any

from secure_split.audit.encoding import encode_value


def flow_hash(kind: Any, edge: Any, nbytes: Any, dtype: Any, shape: Any, batch: Any) -> int:
    """The hash of a message's flow facts, the same in every process of one verification (the hash of
    their canonical JSON: None's own hash is its address, and JSON tells 1, 1.0 and true apart).

    Raises:
        TypeError: a fact is not hashable (a list or an object where a scalar belongs).
    """
    hash((kind, edge, nbytes, dtype, shape, batch))
    return hash(encode_value([kind, edge, nbytes, dtype, shape, batch]))


def message_hash(n: Any, step: Any, digest: Any, kind: Any, edge: Any, nbytes: Any, dtype: Any, shape: Any,
                 batch: Any) -> int:
    """What a stream's order-free sum adds for one message. Sender and receiver log the same facts
    (`crosscheck.COMPARED_FIELDS` and the protocol seq), so their sums agree; the logs of one set may
    be scanned in different processes (`parallel.py`, one hash seed), so nothing here hashes None.
    The hot loop keeps `flow_hash` per flow and adds `hash((n, step, digest, flow_hash))`.

    Raises:
        TypeError: a fact is not hashable.
    """
    static = flow_hash(kind, edge, nbytes, dtype, shape, batch)
    if type(n) is int and type(step) is int and type(digest) is str:
        return hash((n, step, digest, static))
    hash((n, step, digest))
    return hash((encode_value([n, step, digest]), static))
