"""The wire format: one small versioned header frame, then raw tensor buffers, then the blob.

Frames of one message::

    frame 0   header: b"SSPL" | version u8 | kind code u8 | body length u32 (little-endian)
                      | msgpack map {"binding": {...}, "edge": str, "meta": {...},
                                     "tensors": [{"dtype", "shape", "nbytes"}, ...], "blob": int}
    frame 1.. one frame per tensor: its raw little-endian bytes, sent and received without a copy
    last      the blob, present only when the header declares blob > 0

Decoding is split in two so the gate can decide before it touches the payload:
`decode_header` parses and checks everything but the payload (binding, per-kind rules, every
declared size against `max_message_bytes`, before anything is allocated); `decode_body` matches
the frames to the header and wraps the tensor frames as memoryviews. Bad input of any shape
raises `CodecError` and nothing else. Encoding a `Message` cannot fail on content (the
`Message` was checked when it was built) except for a header over `MAX_HEADER_BYTES`.

Changing anything in this format means bumping `secure_split.PROTOCOL_VERSION`.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NoReturn

import msgpack

from secure_split import PROTOCOL_VERSION
from secure_split.errors import CodecError, LocalProtocolError
from secure_split.protocol.messages import (
    DTYPE_SIZES,
    MAX_NDIM,
    Binding,
    Kind,
    Message,
    MetaValue,
    WireTensor,
    brief,
    message_problems,
    shape_problem,
)

__all__ = [
    "KIND_CODES",
    "MAGIC",
    "MAX_HEADER_BYTES",
    "Header",
    "TensorSpec",
    "decode",
    "decode_body",
    "decode_header",
    "encode",
]

MAGIC = b"SSPL"
MAX_HEADER_BYTES = 64 * 1024
"""The largest frame 0 (prefix included) either side will build or parse."""

_PREFIX = struct.Struct("<4sBBI")  # magic, version, kind code, length of the msgpack body

KIND_CODES: Mapping[Kind, int] = MappingProxyType(
    {
        Kind.HELLO: 1,
        Kind.REFUSE: 2,
        Kind.ERROR: 3,
        Kind.STEP_BEGIN: 5,
        Kind.ACTIVATION: 6,
        Kind.GRADIENT: 7,
        Kind.BARRIER: 9,
        Kind.BARRIER_ACK: 10,
        Kind.AUDIT_RECEIPT: 11,
        Kind.SHUTDOWN: 12,
        Kind.HE_CONTEXT: 13,
        Kind.ENCRYPTED_ACTIVATION: 14,
        Kind.MASKED_AGGREGATE: 15,
        Kind.AGGREGATE_GRADIENT: 16,
        Kind.ENCRYPTED_WEIGHTS: 17,
        Kind.PSI: 18,
        Kind.PREDICTION: 19,
    }
)
"""The byte that names each kind in the header prefix. Codes are never reused (4 and 8 were the
retired heartbeat and metrics kinds)."""

_KINDS_BY_CODE = {code: kind for kind, code in KIND_CODES.items()}
_HEADER_KEYS = frozenset({"binding", "edge", "meta", "tensors", "blob"})
_BINDING_KEYS = ("deployment", "session", "step", "seq", "sender", "receiver")
_TENSOR_KEYS = frozenset({"dtype", "shape", "nbytes"})
_MAX_TENSORS = 64  # far above any kind's rule; only bounds the work before the rule is checked


@dataclass(frozen=True)
class TensorSpec:
    """A tensor as the header declares it, before its frame is looked at.

    Attributes:
        dtype: one of the wire dtypes.
        shape: the dimensions.
        nbytes: prod(shape) * itemsize, checked against the declared value.
    """

    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class Header:
    """Everything of a message but its payload, checked: what the gate decides on.

    Attributes:
        kind: the message kind.
        binding: the message binding.
        edge: "" or "FROM->TO".
        meta: the meta mapping (read-only), already checked against the kind's rule.
        tensor_specs: the declared tensors, in frame order.
        blob_len: declared blob length in bytes (0: no blob frame).
        header_len: length of frame 0 in bytes.
    """

    kind: Kind
    binding: Binding
    edge: str
    meta: Mapping[str, MetaValue]
    tensor_specs: tuple[TensorSpec, ...]
    blob_len: int
    header_len: int
    # True only on what decode_header returns (set after __init__: a Header built or replaced by
    # hand is checked again by decode_body).
    checked: bool = field(default=False, init=False, repr=False, compare=False)

    @property
    def total_bytes(self) -> int:
        """Bytes of the whole message: header, every tensor, the blob."""
        return self.header_len + sum(s.nbytes for s in self.tensor_specs) + self.blob_len

    @property
    def frame_count(self) -> int:
        """How many frames the whole message has, frame 0 included."""
        return 1 + len(self.tensor_specs) + (1 if self.blob_len else 0)


def encode(msg: Message) -> list[bytes | memoryview]:
    """Encode a message into frames, without copying tensor data.

    Args:
        msg: a `Message` (already checked when it was built).

    Returns:
        [header, *tensor buffers, blob?]. Each tensor frame is the very `WireTensor.data` object;
        the blob frame (only when the blob is non-empty) is `msg.blob` itself.

    Raises:
        LocalProtocolError: if `msg` is not a Message or its header exceeds `MAX_HEADER_BYTES`.
    """
    if not isinstance(msg, Message):
        raise LocalProtocolError(f"encode takes a Message, got {type(msg).__name__}")
    b = msg.binding
    body = msgpack.packb(
        {
            "binding": {
                "deployment": b.deployment,
                "session": b.session,
                "step": b.step,
                "seq": b.seq,
                "sender": b.sender,
                "receiver": b.receiver,
            },
            "edge": msg.edge,
            "meta": dict(msg.meta),
            "tensors": [{"dtype": t.dtype, "shape": list(t.shape), "nbytes": t.nbytes} for t in msg.tensors],
            "blob": len(msg.blob),
        },
        use_bin_type=True,
    )
    if _PREFIX.size + len(body) > MAX_HEADER_BYTES:
        raise LocalProtocolError(
            f"{msg.kind} header is {_PREFIX.size + len(body)} bytes, the limit is {MAX_HEADER_BYTES}: "
            "move bulk data out of meta into a tensor or the blob"
        )
    header = _PREFIX.pack(MAGIC, PROTOCOL_VERSION, KIND_CODES[msg.kind], len(body)) + body
    frames: list[bytes | memoryview] = [header]
    frames.extend(t.data for t in msg.tensors)
    if msg.blob:
        frames.append(msg.blob)
    return frames


def _bad(what: str) -> NoReturn:
    raise CodecError(f"malformed message: {what}")


def _bad_from(cause: BaseException, what: str) -> NoReturn:
    raise CodecError(f"malformed message: {what}") from cause


def _byte_view(frame: object, what: str) -> memoryview:
    """View any buffer as flat bytes without copying; CodecError for anything else."""
    if isinstance(frame, memoryview) and frame.format == "B" and frame.ndim == 1 and frame.c_contiguous:
        return frame
    try:
        view = memoryview(frame)  # type: ignore[arg-type]  # a non-buffer raises TypeError here
        if view.c_contiguous:
            return view if view.format == "B" and view.ndim == 1 else view.cast("B")
    except (TypeError, ValueError, NotImplementedError):
        _bad(f"{what} is a {type(frame).__name__}, not a bytes-like buffer")
    _bad(f"{what} is not a contiguous buffer")


def _reject_ext(code: int, data: bytes) -> NoReturn:
    _bad(f"msgpack extension type {code} is not allowed")


def _exact_keys(obj: object, keys: frozenset[str] | tuple[str, ...], what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        _bad(f"{what} must be a map, got {type(obj).__name__}")
    found = set(obj)
    if found != set(keys):
        missing = sorted(set(keys) - found)
        extra = sorted(str(k) for k in found - set(keys))
        _bad(f"{what} keys: missing {missing}, unexpected {extra}")
    return obj


def _int_field(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        _bad(f"{what} must be a non-negative int, got {brief(value)}")
    return value


def decode_header(frame0: bytes | memoryview, *, max_message_bytes: int) -> Header:
    """Parse and check frame 0: everything but the payload.

    Checks the prefix (magic, version, kind code, length), parses the msgpack map with msgpack's
    own size limits, checks the binding, edge, meta and per-kind rule, and checks every declared
    size against `max_message_bytes` before anything is allocated for the payload.

    Args:
        frame0: the first frame, any bytes-like buffer.
        max_message_bytes: the largest message (all frames together) the receiver accepts.

    Returns:
        The checked `Header`.

    Raises:
        CodecError: for anything malformed, unknown or oversized in the frame.
        LocalProtocolError: if `max_message_bytes` is not a positive int (our bug, not the peer's).
    """
    bound = max_message_bytes
    if isinstance(bound, bool) or not isinstance(bound, int) or bound <= 0:
        raise LocalProtocolError(f"max_message_bytes must be a positive int, got {max_message_bytes!r}")
    view = _byte_view(frame0, "frame 0")
    if len(view) > MAX_HEADER_BYTES:
        _bad(f"header is {len(view)} bytes, the limit is {MAX_HEADER_BYTES}")
    if len(view) > max_message_bytes:
        _bad(f"header alone is {len(view)} bytes, over the message bound of {max_message_bytes}")
    if len(view) < _PREFIX.size:
        _bad(f"header is {len(view)} bytes, shorter than the {_PREFIX.size}-byte prefix")
    magic, version, code, body_len = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        _bad(f"bad magic {bytes(magic)!r}, expected {MAGIC!r} (not a secure_split message)")
    if version != PROTOCOL_VERSION:
        _bad(f"protocol version {version}, this peer speaks version {PROTOCOL_VERSION}")
    kind = _KINDS_BY_CODE.get(code)
    if kind is None:
        _bad(f"unknown kind code {code}")
    if body_len != len(view) - _PREFIX.size:
        _bad(f"header declares a {body_len}-byte body, frame 0 holds {len(view) - _PREFIX.size}")
    try:
        parsed = msgpack.unpackb(
            view[_PREFIX.size :],
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_reject_ext,
            max_ext_len=0,
            max_bin_len=MAX_HEADER_BYTES,
            max_str_len=MAX_HEADER_BYTES,
            max_array_len=MAX_HEADER_BYTES,
            max_map_len=MAX_HEADER_BYTES,
        )
    except CodecError:
        raise
    except Exception as exc:  # msgpack raises many types (ValueError, StackError, UnicodeDecodeError, ...)
        _bad_from(exc, f"header is not valid msgpack ({type(exc).__name__}: {exc})")
    top = _exact_keys(parsed, _HEADER_KEYS, "header")
    fields = _exact_keys(top["binding"], _BINDING_KEYS, "header binding")
    try:
        binding = Binding(**fields)
    except LocalProtocolError as exc:
        _bad_from(exc, str(exc))
    edge, meta = top["edge"], top["meta"]
    specs = _tensor_specs(top["tensors"], max_message_bytes)
    blob_len = _int_field(top["blob"], "blob length")
    header_len = len(view)
    total = header_len + sum(s.nbytes for s in specs) + blob_len
    if total > max_message_bytes:
        _bad(f"{kind} declares {total} bytes, over the message bound of {max_message_bytes}")
    problems = message_problems(kind, edge, meta, [(s.dtype, s.shape) for s in specs], blob_len)
    if problems:
        _bad("; ".join(problems))
    header = Header(
        kind=kind,
        binding=binding,
        edge=edge,
        meta=MappingProxyType(meta),
        tensor_specs=specs,
        blob_len=blob_len,
        header_len=header_len,
    )
    object.__setattr__(header, "checked", True)
    return header


def _tensor_specs(raw: object, max_message_bytes: int) -> tuple[TensorSpec, ...]:
    if not isinstance(raw, list):
        _bad(f"tensors must be a list, got {type(raw).__name__}")
    if len(raw) > _MAX_TENSORS:
        _bad(f"{len(raw)} tensors declared, at most {_MAX_TENSORS}")
    specs = []
    for index, item in enumerate(raw):
        spec = _exact_keys(item, _TENSOR_KEYS, f"tensor {index}")
        dtype, shape = spec["dtype"], spec["shape"]
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            _bad(f"tensor {index} dtype {brief(dtype)} is not one of {sorted(DTYPE_SIZES)}")
        if not isinstance(shape, list) or len(shape) > MAX_NDIM:
            _bad(f"tensor {index} shape must be a list of at most {MAX_NDIM} ints, got {brief(shape)}")
        dims = tuple(_int_field(d, f"tensor {index} dimension") for d in shape)
        # Python ints do not overflow: this product is exact even for absurd shapes, and costs nothing.
        nbytes = math.prod(dims) * DTYPE_SIZES[dtype]
        if _int_field(spec["nbytes"], f"tensor {index} nbytes") != nbytes:
            _bad(f"tensor {index} declares {spec['nbytes']} bytes, {dtype}{brief(list(dims))} needs {nbytes}")
        # A tensor with bytes is bounded by the total below (its span is its size). A zero-size one
        # declares 0 bytes whatever its other dimensions, and torch overflows on [64, 2**62, 0]
        # when it allocates one: bound its span (empty dimensions counted as 1) here.
        if nbytes == 0 and (problem := shape_problem(dtype, dims, max_span=max_message_bytes)) is not None:
            _bad(f"tensor {index}: {problem}")
        specs.append(TensorSpec(dtype=dtype, shape=dims, nbytes=nbytes))
    return tuple(specs)


def decode_body(header: Header, frames: Sequence[bytes | memoryview]) -> Message:
    """Match the frames to a checked header and build the Message, without copying tensors.

    Args:
        header: what `decode_header` returned for `frames[0]`.
        frames: the whole message as received, frame 0 included (it is not parsed again).

    Returns:
        The `Message`. Each `WireTensor.data` is a memoryview over its frame (read-only when the
        frame is bytes); the blob is bytes (a copy only when its frame is not already bytes).

    Raises:
        CodecError: if the frame count or a frame length differs from the header.
    """
    if not isinstance(header, Header):
        raise LocalProtocolError(f"decode_body takes a Header, got {type(header).__name__}")
    try:
        count = len(frames)
    except TypeError:
        _bad(f"frames must be a sequence, got {type(frames).__name__}")
    if count != header.frame_count:
        _bad(f"{header.kind} declares {header.frame_count} frames, got {count}")
    tensors = []
    for index, spec in enumerate(header.tensor_specs):
        view = _byte_view(frames[1 + index], f"tensor frame {index}")
        if len(view) != spec.nbytes:
            _bad(f"tensor {index} frame is {len(view)} bytes, the header declares {spec.nbytes}")
        tensors.append(WireTensor(dtype=spec.dtype, shape=spec.shape, data=view))
    blob = b""
    if header.blob_len:
        raw = frames[-1]
        view = _byte_view(raw, "blob frame")
        if len(view) != header.blob_len:
            _bad(f"blob frame is {len(view)} bytes, the header declares {header.blob_len}")
        blob = raw if isinstance(raw, bytes) else view.tobytes()
    if not header.checked:  # a Header built by hand, not by decode_header: check it all
        try:
            return Message(kind=header.kind, binding=header.binding, edge=header.edge, meta=header.meta,
                           tensors=tuple(tensors), blob=blob)
        except LocalProtocolError as exc:
            _bad_from(exc, str(exc))
    return Message._checked(header.kind, header.binding, header.edge, header.meta, tuple(tensors), blob)


def decode(frames: Sequence[bytes | memoryview], *, max_message_bytes: int) -> Message:
    """Decode a whole message: `decode_body(decode_header(frames[0], ...), frames)`.

    Args:
        frames: all frames of one message.
        max_message_bytes: the largest message the receiver accepts.

    Returns:
        The `Message` (tensor data not copied).

    Raises:
        CodecError: for any malformed, unknown or oversized input.
    """
    try:
        first = frames[0]
    except (IndexError, TypeError, KeyError):
        _bad("no frames")
    return decode_body(decode_header(first, max_message_bytes=max_message_bytes), frames)
