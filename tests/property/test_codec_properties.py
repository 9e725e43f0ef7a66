"""Hypothesis properties of the codec: round trips, and only CodecError for any bad input.

Message strategies are derived from `KIND_RULES`, so a kind or field added to the table is
exercised here without touching this file.
"""

from __future__ import annotations

import math
import random
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from secure_split import PROTOCOL_VERSION
from secure_split.errors import CodecError
from secure_split.protocol import (
    DTYPE_SIZES,
    KIND_CODES,
    KIND_RULES,
    Binding,
    Kind,
    Message,
    MetaField,
    Presence,
    WireTensor,
    decode,
    decode_body,
    decode_header,
    encode,
)
from secure_split.protocol.messages import MAX_META_DEPTH, NAME_PATTERN

BOUND = 1 << 20
FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

names = st.from_regex(NAME_PATTERN, fullmatch=True)
int64 = st.integers(-(2**63), 2**63 - 1)
non_negative = st.integers(0, 2**63 - 1)
finite = st.floats(allow_nan=False, allow_infinity=False)
keys = st.text(min_size=1, max_size=12)
short_text = st.text(max_size=30)


def plain(depth: int = 0) -> st.SearchStrategy[Any]:
    """Any plain meta value, at most MAX_META_DEPTH containers deep."""
    scalars = st.none() | st.booleans() | int64 | finite | short_text | st.binary(max_size=20)
    if depth >= MAX_META_DEPTH:
        return scalars
    inner = plain(depth + 1)
    return scalars | st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3)


def field_values(spec: MetaField) -> st.SearchStrategy[Any]:
    """Values that fit one MetaField of the rule table."""
    if spec.type == "int":
        return st.integers(spec.min_value, 2**63 - 1)
    if spec.type == "str":
        if spec.choices is not None:
            return st.sampled_from(sorted(spec.choices))
        if spec.pattern is not None:
            return st.from_regex(spec.pattern, fullmatch=True)
        return st.text(max_size=min(spec.max_len, 40))
    if spec.type == "bytes":
        size = spec.exact_len
        return st.binary(min_size=size or 0, max_size=size if size is not None else 40)
    if spec.type == "int_list":
        return st.lists(non_negative, max_size=8)
    if spec.type == "number_map":
        return st.dictionaries(keys, int64 | finite, max_size=5)
    if spec.type == "name_list":
        return st.lists(st.from_regex(NAME_PATTERN, fullmatch=True), max_size=5, unique=True)
    if spec.type == "task_metrics":
        sums = st.integers(0, 1000).flatmap(
            lambda count: st.fixed_dictionaries({"loss_sum": finite, "correct": st.integers(0, count),
                                                 "count": st.just(count)}))
        return st.dictionaries(st.from_regex(NAME_PATTERN, fullmatch=True), sums, max_size=3)
    if spec.type == "scalar":
        return short_text | int64 | st.binary(max_size=40)
    return plain()


def tensors_for(kind: Kind) -> st.SearchStrategy[tuple[WireTensor, ...]]:
    rule = KIND_RULES[kind]
    dtypes = st.sampled_from([rule.tensor_dtype] if rule.tensor_dtype else sorted(DTYPE_SIZES))
    ndims = st.just(rule.tensor_ndim) if rule.tensor_ndim is not None else st.integers(0, 8)

    @st.composite
    def one(draw: st.DrawFn) -> WireTensor:
        dtype = draw(dtypes)
        ndim = draw(ndims)
        shape = tuple(draw(st.lists(st.integers(0, 6 if ndim <= 2 else 2), min_size=ndim, max_size=ndim)))
        size = math.prod(shape) * DTYPE_SIZES[dtype]
        raw = random.Random(draw(st.integers(0, 2**32))).randbytes(size)
        data = memoryview(bytearray(raw)) if draw(st.booleans()) else raw
        return WireTensor(dtype, shape, data)

    fewest, most = rule.tensors
    return st.lists(one(), min_size=fewest, max_size=most).map(tuple)


@st.composite
def bindings(draw: st.DrawFn) -> Binding:
    return Binding(
        deployment=draw(st.binary(min_size=32, max_size=32)).hex(),
        session=draw(st.binary(min_size=16, max_size=16)),
        step=draw(non_negative),
        seq=draw(non_negative),
        sender=draw(names),
        receiver=draw(names),
    )


@st.composite
def messages(draw: st.DrawFn, kind: Kind | None = None) -> Message:
    """An arbitrary valid message; of any kind unless one is given."""
    kind = kind if kind is not None else draw(st.sampled_from(list(Kind)))
    rule = KIND_RULES[kind]
    meta = {key: draw(field_values(spec)) for key, spec in rule.required.items()}
    for key, spec in rule.optional.items():
        if draw(st.booleans()):
            meta[key] = draw(field_values(spec))
    if rule.other_meta is not None:
        extra_keys = keys.filter(lambda k: k not in rule.required and k not in rule.optional)
        meta.update(draw(st.dictionaries(extra_keys, field_values(rule.other_meta), max_size=3)))
    edge = draw(st.tuples(names, names).map("->".join))
    if rule.edge is Presence.FORBIDDEN or (rule.edge is Presence.OPTIONAL and draw(st.booleans())):
        edge = ""
    blob = draw(st.binary(min_size=1, max_size=200)) if rule.blob is Presence.REQUIRED else b""
    return Message(
        kind=kind, binding=draw(bindings()), edge=edge, meta=meta, tensors=draw(tensors_for(kind)), blob=blob
    )


def decodes_or_codec_error(frames: Any, bound: int = BOUND) -> Message | None:
    """Decode; a CodecError is a fine answer, any other exception fails the property."""
    try:
        return decode(frames, max_message_bytes=bound)
    except CodecError:
        return None


@pytest.mark.parametrize("kind", list(Kind))
@settings(FAST, max_examples=30)
@given(data=st.data())
def test_every_kind_round_trips_through_the_codec(kind: Kind, data: st.DataObject) -> None:
    message = data.draw(messages(kind))
    assert decode(encode(message), max_message_bytes=BOUND) == message


@FAST
@given(messages())
def test_round_trip_keeps_tensors_zero_copy_both_ways(message: Message) -> None:
    frames = encode(message)
    for index, tensor in enumerate(message.tensors):
        assert frames[1 + index] is tensor.data
    decoded = decode(frames, max_message_bytes=BOUND)
    for index, tensor in enumerate(decoded.tensors):
        assert isinstance(tensor.data, memoryview)
        source = frames[1 + index]
        assert tensor.data.obj is (source.obj if isinstance(source, memoryview) else source)


@FAST
@given(messages())
def test_decode_header_total_matches_the_frames(message: Message) -> None:
    frames = encode(message)
    header = decode_header(frames[0], max_message_bytes=BOUND)
    assert header.total_bytes == sum(len(f) for f in frames)
    assert header.frame_count == len(frames)


@FAST
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_codec_error(raw: bytes) -> None:
    assert decodes_or_codec_error([raw]) is None


@FAST
@given(st.binary(max_size=300))
def test_arbitrary_bodies_behind_a_valid_prefix_raise_only_codec_error(body: bytes) -> None:
    for code in (KIND_CODES[Kind.SHUTDOWN], KIND_CODES[Kind.ACTIVATION]):
        frame = struct.pack("<4sBBI", b"SSPL", PROTOCOL_VERSION, code, len(body)) + body
        decodes_or_codec_error([frame, b"\x00" * 16])


@FAST
@given(st.lists(st.binary(max_size=64) | st.none() | st.integers() | st.text(max_size=8), max_size=5))
def test_arbitrary_frame_lists_raise_only_codec_error(frames: list[Any]) -> None:
    assert decodes_or_codec_error(frames) is None


@FAST
@given(messages(), st.data())
def test_mutated_headers_raise_only_codec_error_or_decode_to_a_valid_message(
    message: Message, data: st.DataObject
) -> None:
    frames = encode(message)
    header = bytearray(frames[0])
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        how = data.draw(st.sampled_from(["flip", "set", "cut", "insert"]), label="how")
        at = data.draw(st.integers(0, max(len(header) - 1, 0)), label="at")
        if how == "flip" and header:
            header[at] ^= 1 << data.draw(st.integers(0, 7))
        elif how == "set" and header:
            header[at] = data.draw(st.integers(0, 255))
        elif how == "cut":
            del header[at:]
        else:
            header[at:at] = data.draw(st.binary(min_size=1, max_size=4))
    decoded = decodes_or_codec_error([bytes(header), *frames[1:]])
    if decoded is not None:  # whatever gets through is a message the rules allow
        assert decode(encode(decoded), max_message_bytes=BOUND) == decoded


@FAST
@given(messages(), st.data())
def test_structurally_mutated_headers_raise_only_codec_error_or_decode_validly(
    message: Message, data: st.DataObject
) -> None:
    frames = encode(message)
    body = msgpack.unpackb(bytes(frames[0])[10:], raw=False)
    node, path = body, []
    while isinstance(node, dict | list) and node and data.draw(st.booleans(), label="descend"):
        key = data.draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
        path.append(key)
        node = node[key]
    replacement = data.draw(plain(2) | st.sampled_from([None, -1, 2**64 - 1, "", b""]), label="value")
    if path:
        target = body
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = replacement
    else:
        body = replacement
    packed = msgpack.packb(body, use_bin_type=True)
    code = data.draw(st.sampled_from(sorted(KIND_CODES.values())), label="kind code")
    frame = struct.pack("<4sBBI", b"SSPL", PROTOCOL_VERSION, code, len(packed)) + packed
    decoded = decodes_or_codec_error([frame, *frames[1:]])
    if decoded is not None:
        assert decode(encode(decoded), max_message_bytes=BOUND) == decoded


@FAST
@given(
    st.sampled_from(sorted(DTYPE_SIZES)),
    st.lists(st.integers(1, 2**40), min_size=1, max_size=8),
    st.integers(1, 1 << 20),
)
def test_declared_sizes_over_the_bound_are_refused_by_the_header_alone(
    dtype: str, shape: list[int], bound: int
) -> None:
    nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
    declared = min(nbytes, 2**64 - 1)  # what a header can say: msgpack ints stop at 64 bits
    body = {
        "binding": {
            "deployment": "0" * 64, "session": bytes(16), "step": 0, "seq": 1, "sender": "a", "receiver": "b",
        },
        "edge": "x->y",
        "meta": {},
        "tensors": [{"dtype": dtype, "shape": shape, "nbytes": declared}],
        "blob": 0,
    }  # fmt: skip
    packed = msgpack.packb(body, use_bin_type=True)
    frame = (
        struct.pack("<4sBBI", b"SSPL", PROTOCOL_VERSION, KIND_CODES[Kind.ACTIVATION], len(packed)) + packed
    )
    assume(len(frame) + nbytes > bound)
    try:
        decode_header(frame, max_message_bytes=bound)
    except CodecError as refused:
        # A size too large for 64 bits cannot even be declared correctly: refused as a mismatch.
        assert "bound" in str(refused) or declared != nbytes
    else:
        raise AssertionError("an oversized declaration was accepted")


@FAST
@given(messages(), st.data())
def test_payload_frames_that_differ_from_the_header_raise_only_codec_error(
    message: Message, data: st.DataObject
) -> None:
    frames = encode(message)
    header = decode_header(frames[0], max_message_bytes=BOUND)
    payload = data.draw(st.lists(st.binary(max_size=64), max_size=3), label="payload")
    assume([bytes(f) for f in frames[1:]] != payload)
    try:
        decoded = decode_body(header, [frames[0], *payload])
    except CodecError:
        return
    assert decoded.kind is message.kind  # same lengths, other bytes: still exactly what the header says
