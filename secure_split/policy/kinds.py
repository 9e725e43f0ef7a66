"""The message kinds a policy can name, the groups they form, and which assets a kind can carry.

The policy package keeps its own copy of the kind names so that it depends on the protocol layer
by name only; a unit test pins this list to `secure_split.protocol.Kind` once that exists.

Raw features and labels have no message kind at all, so no allow rule can move them; segment
weights travel only as `encrypted_weights`; a CKKS secret key has no kind either (`he_context`
carries the public context only). `ASSET_CARRIERS` states exactly that, and the engine and the
checks read it from here.
"""

from __future__ import annotations

from typing import Final

KINDS: Final[tuple[str, ...]] = (
    "hello",
    "refuse",
    "error",
    "step_begin",
    "activation",
    "gradient",
    "barrier",
    "barrier_ack",
    "audit_receipt",
    "shutdown",
    "he_context",
    "encrypted_activation",
    "masked_aggregate",
    "aggregate_gradient",
    "encrypted_weights",
    "psi",
    "prediction",
)
"""Every message kind of the protocol, in the protocol's order."""

KIND_SET: Final[frozenset[str]] = frozenset(KINDS)

CONTROL_KINDS: Final[frozenset[str]] = frozenset(
    {"hello", "refuse", "error", "step_begin", "barrier", "barrier_ack", "shutdown"}
)
"""Kinds that steer a run and never carry a tensor."""

SESSION_KINDS: Final[tuple[str, ...]] = ("hello", "refuse", "error", "audit_receipt")
"""Kinds any two peers that talk at all exchange: handshake, refusals, audit receipts (liveness is
the transport's own heartbeat, below the protocol)."""

HE_KINDS: Final[frozenset[str]] = frozenset(
    {"he_context", "encrypted_activation", "masked_aggregate", "aggregate_gradient"}
)
"""Kinds of homomorphic aggregation at a merge point."""

NO_TENSOR_KINDS: Final[frozenset[str]] = CONTROL_KINDS | {"audit_receipt"}
"""Kinds that carry no tensor: tensor constraints (dtype, shape, min_batch) on them can never hold."""

KIND_GROUPS: Final[dict[str, frozenset[str]]] = {
    "control": CONTROL_KINDS,
    "session": frozenset(SESSION_KINDS),
    "he": HE_KINDS,
}
"""Names a policy may use in `kinds:` to mean several kinds at once."""

WILDCARD: Final[str] = "*"

ASSETS: Final[tuple[str, ...]] = ("features", "labels", "weights", "ckks_secret_key")
"""The assets a party can own. They never leave their owner."""

ASSET_CARRIERS: Final[dict[str, frozenset[str]]] = {
    "features": frozenset(),
    "labels": frozenset(),
    "weights": frozenset({"encrypted_weights"}),
    "ckks_secret_key": frozenset(),
}
"""For each asset, the message kinds that could carry it (raw features, labels and CKKS secret keys:
none; segment weights: only `encrypted_weights`, and only between owners of the same model or to
an aggregator that cannot decrypt)."""

DTYPES: Final[tuple[str, ...]] = (
    "float32",
    "float64",
    "float16",
    "bfloat16",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint8",
    "bool",
)
"""Tensor dtypes the wire format knows; a `dtype:` constraint must name these."""

MAX_NDIM: Final[int] = 8


def expand_kinds(names: tuple[str, ...]) -> frozenset[str]:
    """Expand kind names, group names and `*` into a set of kinds.

    Args:
        names: names as written in a rule (already validated).

    Returns:
        The set of kinds they stand for. Unknown names are ignored (the schema rejects them).
    """
    out: set[str] = set()
    for n in names:
        if n == WILDCARD:
            out |= KIND_SET
        elif n in KIND_GROUPS:
            out |= KIND_GROUPS[n]
        elif n in KIND_SET:
            out.add(n)
    return frozenset(out)
