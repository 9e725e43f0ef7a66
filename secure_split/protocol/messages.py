"""The closed set of message kinds and the frozen values that travel between peers.

Everything a peer may ever send another peer is a `Message` of one `Kind`. There is no kind
for raw features or labels, on purpose: they cannot be encoded, so no bug or misconfiguration
can put them on the wire. What crosses is cut-layer activations and their gradients, control
messages, predictions, and opaque ciphertexts (CKKS, PSI, sealed weights) as a blob.

A message carries:
- `Binding`: deployment hash, session id, step, seq, sender, receiver. Every message is bound
  to exactly one deployment, session and position in the stream, so it cannot be replayed into
  another session, another step or to another peer.
- `edge`: "" or "FROM->TO" (segment names), the cut it belongs to.
- `meta`: a small mapping of plain values (None, bool, int, float, str, bytes, lists and dicts of
  those, at most 4 containers deep). Ints fit in 64 signed bits; floats are finite.
- `tensors`: `WireTensor`s, raw little-endian buffers with a dtype and shape.
- `blob`: opaque bytes (ciphertexts), only for the kinds that carry one.

Per-kind rules
--------------
`KIND_RULES` is the single table of what each kind must and may carry. It is checked when a
`Message` is built (a violation is `LocalProtocolError`: we tried to send it) and again when one is
decoded (the codec turns it into `CodecError`: the peer sent it). In short:

=====================  ==========================================================  =======  ======  ====
kind                   meta (required; optional)                                   tensors  edge    blob
=====================  ==========================================================  =======  ======  ====
hello                  protocol, deployment, policy, nonce(16 B); checkpoints,     0        no      no
                       software, rows, sections
refuse, error          reason (<= 4000 chars), code; ref_seq                       0        no      no
shutdown               reason, status                                              0        no      no
step_begin             epoch, phase (train|eval|infer); sizes                      1 (ids)  no      no
activation, gradient,  -; phase                                                    1        yes     no
aggregate_gradient
prediction             any plain values                                            1        opt     no
barrier                epoch (>= -1); reason, phase (round id), to, members        0        no      no
barrier_ack            epoch (>= -1); reason, phase, train, eval (task -> sums)    0        no      no
audit_receipt          peer, seq, head, signature                                  0        no      no
he_context,            any keys with str / int / bytes values                      0        opt     yes
encrypted_activation,
masked_aggregate,
encrypted_weights, psi
=====================  ==========================================================  =======  ======  ====

The tensor of step_begin is the batch's sample ids: int64, one dimension; with `sizes` (a schedule
that announces several steps at once) the ids of len(sizes) consecutive steps from the bound step
on, one after the other, sizes[i] of them for the i-th. Epoch -1 in the
barrier kinds is the start barrier, before any epoch; other counts (epoch of step_begin, ref_seq,
seq) are >= 0. Meta keys not listed for a kind are refused, except where the table says "any".
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, TypeAlias, TypeGuard

from secure_split.errors import LocalProtocolError

__all__ = [
    "CONTROL_KINDS",
    "DTYPE_SIZES",
    "KIND_RULES",
    "MAX_META_DEPTH",
    "MAX_NDIM",
    "MAX_SPAN_BYTES",
    "NAME_PATTERN",
    "Binding",
    "Kind",
    "KindRule",
    "Message",
    "MetaField",
    "MetaValue",
    "Presence",
    "WireTensor",
    "message_problems",
    "shape_problem",
    "shape_span",
]


class Kind(enum.StrEnum):
    """The closed set of message kinds. Raw features and labels have no kind, by design."""

    HELLO = "hello"
    REFUSE = "refuse"
    ERROR = "error"
    STEP_BEGIN = "step_begin"
    ACTIVATION = "activation"
    GRADIENT = "gradient"
    BARRIER = "barrier"
    BARRIER_ACK = "barrier_ack"
    AUDIT_RECEIPT = "audit_receipt"
    SHUTDOWN = "shutdown"
    HE_CONTEXT = "he_context"
    ENCRYPTED_ACTIVATION = "encrypted_activation"
    MASKED_AGGREGATE = "masked_aggregate"
    AGGREGATE_GRADIENT = "aggregate_gradient"
    ENCRYPTED_WEIGHTS = "encrypted_weights"
    PSI = "psi"
    PREDICTION = "prediction"


CONTROL_KINDS: frozenset[Kind] = frozenset(
    {
        Kind.HELLO,
        Kind.REFUSE,
        Kind.ERROR,
        Kind.STEP_BEGIN,
        Kind.BARRIER,
        Kind.BARRIER_ACK,
        Kind.SHUTDOWN,
    }
)
"""Kinds that steer the run rather than carry model data."""

NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,62}")
"""Peer and segment names: lowercase, start with a letter, at most 63 characters."""

_HEX64 = re.compile(r"[0-9a-f]{64}")
_SEQ_LIMIT = 2**63  # seq and step fit in a signed 64-bit integer on every platform
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1

DTYPE_SIZES: Mapping[str, int] = MappingProxyType(
    {
        "float32": 4,
        "float64": 8,
        "float16": 2,
        "bfloat16": 2,
        "int64": 8,
        "int32": 4,
        "int16": 2,
        "int8": 1,
        "uint8": 1,
        "bool": 1,
    }
)
"""Every dtype a tensor may have on the wire, with its item size in bytes."""

MAX_NDIM = 8
MAX_SPAN_BYTES = 2**31
"""The largest span of a tensor shape: prod(max(d, 1)) * itemsize, i.e. its size in bytes if every
empty dimension held one element. It equals the byte size of any tensor without an empty dimension,
so it only binds zero-size tensors, whose declared size (0 bytes) says nothing about the other
dimensions: torch computes their storage size dimension by dimension and overflows on a shape
like [64, 2**62, 0]. The codec also holds every span to the receiver's `max_message_bytes`."""
MAX_META_DEPTH = 4
MAX_KEY_CHARS = 256

MetaValue: TypeAlias = bool | int | float | str | bytes | list["MetaValue"] | dict[str, "MetaValue"] | None
"""A value allowed in `Message.meta`: plain data only, nothing a decoder would have to execute."""


def brief(value: object) -> str:
    """repr() of a value for an error message, cut to 80 characters: peers control these values."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def _is_int(value: object) -> TypeGuard[int]:
    # bool is an int subclass; a True where a count is expected is a type error, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


def shape_span(shape: Sequence[int], itemsize: int) -> int:
    """prod(max(d, 1) for d in shape) * itemsize: the byte size the shape would have with every
    empty dimension holding one element (exact: Python ints do not overflow)."""
    return math.prod(max(d, 1) for d in shape) * itemsize


def shape_problem(dtype: str, shape: object, *, max_span: int = MAX_SPAN_BYTES) -> str | None:
    """Say why `shape` cannot be the shape of a `dtype` tensor on the wire, or None if it can.

    A shape is at most `MAX_NDIM` ints, each >= 0, whose span (`shape_span`) is at most
    `max_span` bytes. Checked before anything is allocated for the tensor, by the message (our
    side) and the codec and `engine.tensors.from_wire` (the peer's side).

    Args:
        dtype: a wire dtype (one of `DTYPE_SIZES`).
        shape: the declared shape.
        max_span: the largest span in bytes (the receiver's message bound, at most `MAX_SPAN_BYTES`).

    Returns:
        A one-line description of the problem, or None. Never raises.
    """
    if not isinstance(shape, tuple | list) or len(shape) > MAX_NDIM:
        return f"a tensor shape is a list of at most {MAX_NDIM} ints, got {brief(shape)}"
    if not all(_is_int(d) and d >= 0 for d in shape):
        return f"tensor dimensions must be ints >= 0, got {brief(shape)}"
    # Each dimension first: it keeps the product below small enough to compute at once.
    itemsize = DTYPE_SIZES.get(dtype, 1)
    limit = min(max_span, MAX_SPAN_BYTES)
    big = [d for d in shape if d > limit]
    if big:
        return f"{dtype}{brief(list(shape))}: dimension {brief(big[0])} is over the bound of {limit}"
    span = shape_span(shape, itemsize)
    if span > limit:
        return (
            f"{dtype}{list(shape)} spans {span} bytes (empty dimensions counted as 1), "
            f"over the bound of {limit}"
        )
    return None


def _problem_in_plain_value(value: object, depth: int, where: str) -> str | None:
    """Return why `value` is not a plain meta value, or None if it is. Never raises."""
    if value is None or isinstance(value, bool | bytes):
        return None
    if _is_int(value):
        return None if _INT_MIN <= value <= _INT_MAX else f"{where}: int {value} does not fit in 64 bits"
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{where}: float must be finite, got {brief(value)}"
    if isinstance(value, str):
        return _problem_in_str(value, where)
    if isinstance(value, list | tuple | dict):
        if depth >= MAX_META_DEPTH:
            return f"{where}: nested deeper than {MAX_META_DEPTH} containers"
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    return f"{where}: dict keys must be str, got {type(key).__name__}"
                problem = _problem_in_key(key, where) or _problem_in_plain_value(
                    item, depth + 1, f"{where}[{key!r}]"
                )
                if problem:
                    return problem
            return None
        for index, item in enumerate(value):
            problem = _problem_in_plain_value(item, depth + 1, f"{where}[{index}]")
            if problem:
                return problem
        return None
    return f"{where}: type {type(value).__name__} is not allowed in meta"


def _problem_in_str(value: str, where: str) -> str | None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return f"{where}: string is not valid UTF-8 (lone surrogate)"
    return None


def _problem_in_key(key: str, where: str) -> str | None:
    if not 0 < len(key) <= MAX_KEY_CHARS:
        return f"{where}: keys must have 1 to {MAX_KEY_CHARS} characters, got {len(key)}"
    return _problem_in_str(key, where)


def _plain_copy(value: Any) -> Any:
    """Deep copy of a plain value, with tuples turned into lists (what the wire gives back)."""
    if isinstance(value, dict):
        return {k: _plain_copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain_copy(v) for v in value]
    return value


@dataclass(frozen=True)
class MetaField:
    """The type of one meta value in a `KindRule`.

    `type` is one of:
    - "int": an int (not bool) in [min_value, 2**63).
    - "str": a str of at most `max_len` characters, one of `choices` if given, matching `pattern`
      if given.
    - "bytes": bytes of exactly `exact_len` bytes if given, else at most `max_len`.
    - "int_list": a list of ints >= 0, at most `max_len` items.
    - "number_map": a dict of str -> int or finite float, at most `max_len` items.
    - "name_list": a list of peer names (`NAME_PATTERN`), no repeats, at most `max_len` items.
    - "task_metrics": a dict of task name (`NAME_PATTERN`) -> {"loss_sum": finite number,
      "correct": int, "count": int} with 0 <= correct <= count, at most `max_len` tasks: the
      sums of `engine.metrics.TaskMetrics`.
    - "scalar": a str, int or bytes (strings and bytes at most `max_len`).
    - "plain": any plain meta value (see `MetaValue`).
    """

    type: Literal["int", "str", "bytes", "int_list", "number_map", "name_list", "task_metrics", "scalar", "plain"]
    min_value: int = _INT_MIN
    max_len: int = 4000
    exact_len: int | None = None
    choices: frozenset[str] | None = None
    pattern: re.Pattern[str] | None = None

    def problem(self, value: object, where: str) -> str | None:
        """Say why `value` does not fit this field.

        Args:
            value: the value found in meta.
            where: how to name the value in the message, e.g. "meta['epoch']".

        Returns:
            A one-line description of the problem, or None if the value fits. Never raises.
        """
        if self.type == "int":
            if not _is_int(value):
                return f"{where} must be an int, got {type(value).__name__}"
            if not self.min_value <= value <= _INT_MAX:
                return f"{where} must be in [{self.min_value}, 2**63), got {value}"
            return None
        if self.type == "str":
            if not isinstance(value, str):
                return f"{where} must be a str, got {type(value).__name__}"
            if len(value) > self.max_len:
                return f"{where} must have at most {self.max_len} characters, got {len(value)}"
            if self.choices is not None and value not in self.choices:
                return f"{where} must be one of {sorted(self.choices)}, got {brief(value)}"
            if self.pattern is not None and not self.pattern.fullmatch(value):
                return f"{where} must match {self.pattern.pattern}, got {brief(value)}"
            return _problem_in_str(value, where)
        if self.type == "bytes":
            if not isinstance(value, bytes):
                return f"{where} must be bytes, got {type(value).__name__}"
            if self.exact_len is not None and len(value) != self.exact_len:
                return f"{where} must be exactly {self.exact_len} bytes, got {len(value)}"
            if len(value) > self.max_len:
                return f"{where} must have at most {self.max_len} bytes, got {len(value)}"
            return None
        if self.type == "int_list":
            if not isinstance(value, list | tuple):
                return f"{where} must be a list of ints, got {type(value).__name__}"
            if len(value) > self.max_len:
                return f"{where} must have at most {self.max_len} items, got {len(value)}"
            for index, item in enumerate(value):
                if not _is_int(item) or not 0 <= item <= _INT_MAX:
                    return f"{where}[{index}] must be an int in [0, 2**63), got {brief(item)}"
            return None
        if self.type == "number_map":
            if not isinstance(value, dict):
                return f"{where} must be a dict of str -> number, got {type(value).__name__}"
            if len(value) > self.max_len:
                return f"{where} must have at most {self.max_len} entries, got {len(value)}"
            for key, item in value.items():
                if not isinstance(key, str):
                    return f"{where}: keys must be str, got {type(key).__name__}"
                problem = _problem_in_key(key, where)
                if problem:
                    return problem
                if not (_is_int(item) or isinstance(item, float)):
                    return f"{where}[{key!r}] must be a number, got {type(item).__name__}"
                problem = _problem_in_plain_value(item, 0, f"{where}[{key!r}]")
                if problem:
                    return problem
            return None
        if self.type == "name_list":
            if not isinstance(value, list | tuple):
                return f"{where} must be a list of names, got {type(value).__name__}"
            if len(value) > self.max_len:
                return f"{where} must have at most {self.max_len} items, got {len(value)}"
            for index, item in enumerate(value):
                if not isinstance(item, str) or not NAME_PATTERN.fullmatch(item):
                    return f"{where}[{index}] must be a peer name, got {brief(item)}"
            if len(set(value)) != len(value):
                return f"{where} names a peer twice"
            return None
        if self.type == "task_metrics":
            return _task_metrics_problem(value, self.max_len, where)
        if self.type == "scalar":
            if isinstance(value, str | bytes):
                if len(value) > self.max_len:
                    return f"{where} must have at most {self.max_len} characters/bytes, got {len(value)}"
                return _problem_in_str(value, where) if isinstance(value, str) else None
            if _is_int(value):
                return _problem_in_plain_value(value, 0, where)
            return f"{where} must be a str, int or bytes, got {type(value).__name__}"
        return _problem_in_plain_value(value, 0, where)


_TASK_METRIC_KEYS = frozenset({"loss_sum", "correct", "count"})


def _task_metrics_problem(value: object, max_len: int, where: str) -> str | None:
    if not isinstance(value, dict):
        return f"{where} must be a dict of task -> metric sums, got {type(value).__name__}"
    if len(value) > max_len:
        return f"{where} must have at most {max_len} tasks, got {len(value)}"
    for task, sums in value.items():
        if not isinstance(task, str) or not NAME_PATTERN.fullmatch(task):
            return f"{where}: task names must match {NAME_PATTERN.pattern}, got {brief(task)}"
        at = f"{where}[{task!r}]"
        if not isinstance(sums, dict) or set(sums) != _TASK_METRIC_KEYS:
            return f"{at} must be a dict with exactly the keys {sorted(_TASK_METRIC_KEYS)}"
        loss, correct, count = sums["loss_sum"], sums["correct"], sums["count"]
        if not (_is_int(loss) or isinstance(loss, float)) or not math.isfinite(loss):
            return f"{at}['loss_sum'] must be a finite number, got {brief(loss)}"
        if not _is_int(count) or not 0 <= count <= _INT_MAX:
            return f"{at}['count'] must be an int >= 0, got {brief(count)}"
        if not _is_int(correct) or not 0 <= correct <= count:
            return f"{at}['correct'] must be an int in [0, count], got {brief(correct)}"
    return None


class Presence(enum.Enum):
    """Whether a kind requires, allows or forbids an edge or a blob."""

    REQUIRED = "required"
    OPTIONAL = "optional"
    FORBIDDEN = "forbidden"


@dataclass(frozen=True)
class KindRule:
    """What one kind of message must and may carry.

    Attributes:
        required: meta keys that must be present, with their types.
        optional: meta keys that may be present, with their types.
        other_meta: the type every key not named above must have; None refuses unknown keys.
        tensors: (fewest, most) tensors.
        tensor_dtype: the dtype every tensor must have, or None for any.
        tensor_ndim: the number of dimensions every tensor must have, or None for any.
        edge: whether an edge is required, optional or forbidden.
        blob: whether a blob is required, optional or forbidden (required means non-empty).
    """

    required: Mapping[str, MetaField] = field(default_factory=dict)
    optional: Mapping[str, MetaField] = field(default_factory=dict)
    other_meta: MetaField | None = None
    tensors: tuple[int, int] = (0, 0)
    tensor_dtype: str | None = None
    tensor_ndim: int | None = None
    edge: Presence = Presence.FORBIDDEN
    blob: Presence = Presence.FORBIDDEN

    def problems(
        self,
        kind: Kind,
        edge: str,
        meta: Mapping[str, object],
        tensors: Sequence[tuple[str, tuple[int, ...]]],
        blob_len: int,
    ) -> list[str]:
        """List every way a message breaks this rule.

        Args:
            kind: the message's kind (used in the text only).
            edge: the message's edge ("" for none).
            meta: the message's meta mapping.
            tensors: (dtype, shape) of each tensor.
            blob_len: length of the blob in bytes.

        Returns:
            One line per problem; empty when the message fits. Never raises.
        """
        found: list[str] = []
        for key in self.required:
            if key not in meta:
                found.append(f"{kind}: meta[{key!r}] is required")
        for key, value in meta.items():
            spec = self.required.get(key) or self.optional.get(key) or self.other_meta
            if spec is None:
                allowed = sorted([*self.required, *self.optional])
                found.append(f"{kind}: meta key {key!r} is not allowed (allowed: {allowed})")
                continue
            problem = spec.problem(value, f"{kind}: meta[{key!r}]")
            if problem:
                found.append(problem)
        fewest, most = self.tensors
        if not fewest <= len(tensors) <= most:
            want = str(fewest) if fewest == most else f"{fewest} to {most}"
            found.append(f"{kind}: carries {want} tensor(s), got {len(tensors)}")
        for index, (dtype, shape) in enumerate(tensors):
            if self.tensor_dtype is not None and dtype != self.tensor_dtype:
                found.append(f"{kind}: tensor {index} must be {self.tensor_dtype}, got {dtype}")
            if self.tensor_ndim is not None and len(shape) != self.tensor_ndim:
                found.append(
                    f"{kind}: tensor {index} must have {self.tensor_ndim} dimension(s), got {len(shape)}"
                )
        if self.edge is Presence.REQUIRED and not edge:
            found.append(f"{kind}: an edge is required")
        if self.edge is Presence.FORBIDDEN and edge:
            found.append(f"{kind}: carries no edge, got {brief(edge)}")
        if self.blob is Presence.REQUIRED and blob_len == 0:
            found.append(f"{kind}: a non-empty blob is required")
        if self.blob is Presence.FORBIDDEN and blob_len:
            found.append(f"{kind}: carries no blob, got {blob_len} bytes")
        return found


_PHASES = frozenset({"train", "eval", "infer"})
_COUNT = MetaField("int", min_value=0)
_REASON = MetaField("str", max_len=4000)
_SHORT = MetaField("str", max_len=64)
_HASH = MetaField("str", max_len=128)  # compared by the session, which names both in its refusal
_HEX64_FIELD = MetaField("str", pattern=_HEX64)
_PHASE = MetaField("str", choices=_PHASES)
_TENSOR_KIND = KindRule(optional={"phase": _PHASE}, tensors=(1, 1), edge=Presence.REQUIRED)
_PEER = MetaField("str", pattern=NAME_PATTERN)
_BARRIER = KindRule(
    required={"epoch": MetaField("int", min_value=-1)},  # -1: the start barrier, before any epoch
    optional={
        "reason": _SHORT,
        # a round's id, so that a late answer of an earlier round is not taken for this one
        "phase": _SHORT,
        # horizontal schedules: the owner a barrier concerns (hand weights to it, or it dropped)
        "to": _PEER,
        # horizontal schedules: the owners taking part in an averaging round
        "members": MetaField("name_list", max_len=4096),
        # audit format 2: the start barrier announces the run (run id, every peer's nonce)
        "run_id": _HEX64_FIELD,
        "nonces": MetaField("plain"),
    },
)
_BARRIER_ACK = KindRule(
    required={"epoch": MetaField("int", min_value=-1)},
    optional={
        "reason": _SHORT,
        "phase": _SHORT,
        # what this peer measured itself over the epoch's training and evaluation steps:
        # task -> TaskMetrics sums
        "train": MetaField("task_metrics", max_len=256),
        "eval": MetaField("task_metrics", max_len=256),
        # audit format 2: the sender's own epoch metrics, signed (secure_split.audit.MetricsStatement)
        "values": MetaField("number_map", max_len=1024),
        "metrics_sig": MetaField("str", pattern=re.compile(r"[0-9a-f]{128}")),
    },
)
_SEALED_KIND = KindRule(
    other_meta=MetaField("scalar", max_len=4096), edge=Presence.OPTIONAL, blob=Presence.REQUIRED
)

KIND_RULES: Mapping[Kind, KindRule] = MappingProxyType(
    {
        Kind.HELLO: KindRule(
            required={
                "protocol": _COUNT,
                "deployment": _HASH,
                "policy": _HASH,
                "nonce": MetaField("bytes", exact_len=16),
            },
            # rows: an owner's row count, for a coordinator that schedules row positions, not ids
            optional={"checkpoints": MetaField("int_list", max_len=4096), "software": _SHORT, "rows": _COUNT,
                      # a digest per deployment section, so a mismatch can name what differs
                      "sections": MetaField("plain"),
                      # the highest step this peer has seen (a restarted coordinator goes above it)
                      "last_step": _COUNT,
                      # audit format 2: the sender process's fresh run nonce (64 hex digits)
                      "run_nonce": _HEX64_FIELD},
        ),
        Kind.REFUSE: KindRule(required={"reason": _REASON, "code": _SHORT}, optional={"ref_seq": _COUNT}),
        Kind.ERROR: KindRule(required={"reason": _REASON, "code": _SHORT}, optional={"ref_seq": _COUNT}),
        Kind.SHUTDOWN: KindRule(required={"reason": _REASON, "status": _SHORT}),
        Kind.STEP_BEGIN: KindRule(
            required={"epoch": _COUNT, "phase": _PHASE},
            # several consecutive steps from the binding's step on: each one's batch size, in order
            optional={"sizes": MetaField("int_list", max_len=4096)},
            tensors=(1, 1),
            tensor_dtype="int64",
            tensor_ndim=1,
        ),
        Kind.ACTIVATION: _TENSOR_KIND,
        Kind.GRADIENT: _TENSOR_KIND,
        Kind.AGGREGATE_GRADIENT: _TENSOR_KIND,
        Kind.PREDICTION: KindRule(other_meta=MetaField("plain"), tensors=(1, 1), edge=Presence.OPTIONAL),
        Kind.BARRIER: _BARRIER,
        Kind.BARRIER_ACK: _BARRIER_ACK,
        Kind.AUDIT_RECEIPT: KindRule(
            required={
                "peer": MetaField("str", pattern=NAME_PATTERN),
                "seq": _COUNT,
                "head": _HASH,
                "signature": MetaField("str", max_len=256),
            },
            # audit format 2: the run the head binds ("" before the run is bound) and the signer's nonce
            optional={"run_id": MetaField("str", pattern=re.compile(r"(?:[0-9a-f]{64})?")), "nonce": _HEX64_FIELD},
        ),
        Kind.HE_CONTEXT: _SEALED_KIND,
        Kind.ENCRYPTED_ACTIVATION: _SEALED_KIND,
        Kind.MASKED_AGGREGATE: _SEALED_KIND,
        Kind.ENCRYPTED_WEIGHTS: _SEALED_KIND,
        Kind.PSI: _SEALED_KIND,
    }
)
"""The per-kind rules, checked when a `Message` is built and when one is decoded."""


def _fail(what: str) -> LocalProtocolError:
    return LocalProtocolError(what)


def _check_name(value: object, what: str) -> None:
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        raise _fail(f"{what} must be a peer name matching {NAME_PATTERN.pattern}, got {brief(value)}")


def _edge_problem(value: object) -> str | None:
    if not isinstance(value, str):
        return f"edge must be a str, got {type(value).__name__}"
    if value == "":
        return None
    parts = value.split("->")
    if len(parts) != 2 or not all(NAME_PATTERN.fullmatch(p) for p in parts):
        return f"edge must be '' or 'FROM->TO' (segment names: {NAME_PATTERN.pattern}), got {brief(value)}"
    return None


def message_problems(
    kind: Kind,
    edge: object,
    meta: object,
    tensors: Sequence[tuple[str, tuple[int, ...]]],
    blob_len: int,
) -> list[str]:
    """List every way the parts of a message break the format or the kind's rule.

    The one check shared by `Message` (which raises `LocalProtocolError`) and the codec (which
    raises `CodecError`), so that both sides of the wire apply the same rules.

    Args:
        kind: the message kind.
        edge: the edge as given (checked to be a str).
        meta: the meta mapping as given (checked to be a mapping of str to plain values).
        tensors: (dtype, shape) of each tensor, already checked on their own.
        blob_len: the blob length in bytes.

    Returns:
        One line per problem; empty when the parts make a valid message. Never raises.
    """
    if not isinstance(edge, str) or _edge_problem(edge):
        return [_edge_problem(edge) or ""]
    if not isinstance(meta, Mapping):
        return [f"meta must be a mapping, got {type(meta).__name__}"]
    for key, value in meta.items():
        if not isinstance(key, str):
            return [f"meta keys must be str, got {type(key).__name__}"]
        problem = _problem_in_key(key, "meta") or _problem_in_plain_value(value, 0, f"meta[{key!r}]")
        if problem:
            return [problem]
    return KIND_RULES[kind].problems(kind, edge, meta, tensors, blob_len)


@dataclass(frozen=True)
class Binding:
    """Where a message belongs: which deployment, session, step and position, from whom to whom.

    Attributes:
        deployment: the deployment hash, 64 lowercase hex digits (SHA-256).
        session: the 16-byte session id (16 zero bytes in HELLO and pre-session REFUSE/ERROR).
        step: the training/inference step, 0 <= step < 2**63.
        seq: the position in the sender's stream to this receiver, 0 <= seq < 2**63.
        sender: the sending peer's name.
        receiver: the receiving peer's name.

    Raises:
        LocalProtocolError: when built with a value outside these ranges.
    """

    deployment: str
    session: bytes
    step: int
    seq: int
    sender: str
    receiver: str

    def __post_init__(self) -> None:
        if not isinstance(self.deployment, str) or not _HEX64.fullmatch(self.deployment):
            raise _fail(f"binding.deployment must be 64 lowercase hex digits, got {brief(self.deployment)}")
        if not isinstance(self.session, bytes) or len(self.session) != 16:
            raise _fail(f"binding.session must be exactly 16 bytes, got {brief(self.session)}")
        for name in ("step", "seq"):
            value = getattr(self, name)
            if not _is_int(value) or not 0 <= value < _SEQ_LIMIT:
                raise _fail(f"binding.{name} must be an int in [0, 2**63), got {brief(value)}")
        _check_name(self.sender, "binding.sender")
        _check_name(self.receiver, "binding.receiver")


def _as_byte_view(data: object) -> bytes | memoryview:
    if isinstance(data, bytes):
        return data
    if not isinstance(data, memoryview):
        raise _fail(f"tensor data must be bytes or memoryview, got {type(data).__name__}")
    if data.format == "B" and data.ndim == 1 and data.c_contiguous:
        return data  # keep the caller's object: encode hands this very buffer to the transport
    if not data.c_contiguous:
        raise _fail("tensor data must be C-contiguous; make the tensor contiguous before sending it")
    return data.cast("B")


@dataclass(frozen=True, eq=False)
class WireTensor:
    """A tensor as it travels: dtype, shape, and its raw little-endian bytes (not copied).

    Attributes:
        dtype: one of `DTYPE_SIZES` (float32 float64 float16 bfloat16 int64 int32 int16 int8 uint8 bool).
        shape: the dimensions, each >= 0, at most `MAX_NDIM` of them (a list is stored as a tuple).
        data: bytes or a C-contiguous memoryview holding exactly prod(shape) * itemsize bytes,
            little-endian. A memoryview of another format is viewed as bytes, still without a copy.

    Two WireTensors are equal when dtype, shape and bytes are equal. They are not hashable.

    Raises:
        LocalProtocolError: on an unknown dtype, a bad shape, or a data length that does not fit.
    """

    dtype: str
    shape: tuple[int, ...]
    data: bytes | memoryview

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_SIZES:
            raise _fail(f"tensor dtype must be one of {sorted(DTYPE_SIZES)}, got {brief(self.dtype)}")
        if not isinstance(self.shape, tuple | list):
            raise _fail(f"tensor shape must be a tuple of ints, got {type(self.shape).__name__}")
        shape = tuple(self.shape)
        if len(shape) > MAX_NDIM:
            raise _fail(f"tensor shape has {len(shape)} dimensions, at most {MAX_NDIM} are allowed")
        problem = shape_problem(self.dtype, shape)
        if problem:
            raise _fail(problem)
        object.__setattr__(self, "shape", shape)
        data = _as_byte_view(self.data)
        object.__setattr__(self, "data", data)
        expected = math.prod(shape) * DTYPE_SIZES[self.dtype]
        if len(data) != expected:
            raise _fail(f"tensor {self.dtype}{list(shape)} needs {expected} bytes, data has {len(data)}")

    @property
    def nbytes(self) -> int:
        """Size of the data in bytes."""
        return len(self.data)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, WireTensor):
            return NotImplemented
        return self.dtype == other.dtype and self.shape == other.shape and self.data == other.data

    __hash__ = None  # type: ignore[assignment]  # data may be a writable buffer

    def __repr__(self) -> str:
        # Never print the payload: it can be megabytes, and it is the data the policy guards.
        return f"WireTensor(dtype={self.dtype!r}, shape={self.shape!r}, nbytes={self.nbytes})"


@dataclass(frozen=True)
class Message:
    """One message between two peers, checked against `KIND_RULES` when built.

    Attributes:
        kind: the `Kind`.
        binding: the `Binding`.
        edge: "" or "FROM->TO" with segment names.
        meta: plain values (stored as a read-only copy; tuples become lists).
        tensors: the tensors, in order (a list is stored as a tuple).
        blob: opaque bytes for the kinds that carry ciphertext (a memoryview is copied to bytes,
            because the crypto libraries that open blobs take bytes).

    Raises:
        LocalProtocolError: when any field is malformed or the kind's rule is broken; the text
            lists every problem of the rule at once.
    """

    kind: Kind
    binding: Binding
    edge: str = ""
    meta: Mapping[str, MetaValue] = field(default_factory=lambda: MappingProxyType({}))
    tensors: tuple[WireTensor, ...] = ()
    blob: bytes = b""

    def __post_init__(self) -> None:
        try:
            kind = Kind(self.kind)
        except ValueError:
            raise _fail(f"unknown message kind {self.kind!r}") from None
        object.__setattr__(self, "kind", kind)
        if not isinstance(self.binding, Binding):
            raise _fail(f"binding must be a Binding, got {type(self.binding).__name__}")
        if not isinstance(self.tensors, tuple | list) or not all(
            isinstance(t, WireTensor) for t in self.tensors
        ):
            raise _fail("tensors must be a tuple of WireTensor")
        object.__setattr__(self, "tensors", tuple(self.tensors))
        if isinstance(self.blob, memoryview):
            object.__setattr__(self, "blob", self.blob.tobytes())
        if not isinstance(self.blob, bytes):
            raise _fail(f"blob must be bytes, got {type(self.blob).__name__}")
        problems = message_problems(
            kind, self.edge, self.meta, [(t.dtype, t.shape) for t in self.tensors], len(self.blob)
        )
        if problems:
            raise _fail("; ".join(problems))
        object.__setattr__(self, "meta", MappingProxyType(_plain_copy(dict(self.meta))))

    @classmethod
    def _checked(cls, kind: Kind, binding: Binding, edge: str, meta: Mapping[str, MetaValue],
                 tensors: tuple[WireTensor, ...], blob: bytes) -> Message:
        """For `codec.decode_body` only: parts that `decode_header` and `decode_body` have just
        checked by the same rules as `__post_init__` (`message_problems`, the tensor specs against
        their frames), from a fresh msgpack parse; checking them again was repeated work on every
        receive (bench/gate_cost.py times a receive)."""
        msg = object.__new__(cls)
        for name, value in (("kind", kind), ("binding", binding), ("edge", edge), ("meta", meta),
                            ("tensors", tensors), ("blob", blob)):
            object.__setattr__(msg, name, value)
        return msg

    def __repr__(self) -> str:
        return (
            f"Message(kind={self.kind.value!r}, binding={self.binding!r}, edge={self.edge!r}, "
            f"meta={dict(self.meta)!r}, tensors={self.tensors!r}, blob=<{len(self.blob)} bytes>)"
        )
