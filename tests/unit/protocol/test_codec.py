"""The wire format: header layout, zero-copy payload frames, and refusal of every bad input."""

from __future__ import annotations

import dataclasses
import struct
import tracemalloc
from typing import Any

import msgpack
import pytest

from secure_split import PROTOCOL_VERSION
from secure_split.errors import CodecError, LocalProtocolError
from secure_split.protocol import (
    KIND_CODES,
    MAX_HEADER_BYTES,
    Kind,
    Message,
    WireTensor,
    decode,
    decode_body,
    decode_header,
    encode,
)

from .test_messages import BINDING, F32, valid_example

BOUND = 1 << 20


def header_frame(
    body: Any, *, kind: Kind = Kind.ACTIVATION, magic: bytes = b"SSPL", version: int | None = None
) -> bytes:
    """A frame 0 with a valid prefix around whatever msgpack body a test wants to send."""
    packed = body if isinstance(body, bytes) else msgpack.packb(body, use_bin_type=True)
    version = PROTOCOL_VERSION if version is None else version
    return struct.pack("<4sBBI", magic, version, KIND_CODES[kind], len(packed)) + packed


def header_map(message: Message) -> dict[str, Any]:
    """The msgpack map inside an encoded message's header, to be altered by a test."""
    frame = bytes(encode(message)[0])
    return msgpack.unpackb(frame[10:], raw=False)  # type: ignore[no-any-return]


@pytest.mark.parametrize("kind", list(Kind))
def test_every_kind_round_trips(kind: Kind) -> None:
    message = valid_example(kind)
    assert decode(encode(message), max_message_bytes=BOUND) == message


def test_header_starts_with_magic_version_kind_code_and_body_length() -> None:
    frame = encode(valid_example(Kind.GRADIENT))[0]
    magic, version, code, length = struct.unpack_from("<4sBBI", frame)
    assert (magic, version, code) == (b"SSPL", PROTOCOL_VERSION, KIND_CODES[Kind.GRADIENT])
    assert length == len(frame) - 10


def test_kind_codes_are_distinct_and_cover_every_kind() -> None:
    assert set(KIND_CODES) == set(Kind)
    assert len(set(KIND_CODES.values())) == len(Kind)
    assert all(0 < code < 256 for code in KIND_CODES.values())


def test_encode_hands_out_the_tensor_buffer_itself() -> None:
    data = memoryview(bytearray(16))
    message = Message(
        kind=Kind.ACTIVATION, binding=BINDING, edge="a->b", tensors=(WireTensor("float32", (4,), data),)
    )
    frames = encode(message)
    assert frames[1] is data


def test_decoded_tensor_is_a_view_over_the_received_frame() -> None:
    frames = encode(valid_example(Kind.ACTIVATION))
    received = [frames[0], bytearray(frames[1])]  # a writable frame, as a transport may give
    tensor = decode(received, max_message_bytes=BOUND).tensors[0]
    assert isinstance(tensor.data, memoryview)
    assert tensor.data.obj is received[1]
    received[1][0] = 0x42
    assert tensor.data[0] == 0x42


def test_blob_frame_comes_last_and_is_bytes_after_decoding() -> None:
    message = valid_example(Kind.ENCRYPTED_ACTIVATION)
    frames = encode(message)
    assert len(frames) == 2 and frames[1] is message.blob
    decoded = decode([frames[0], memoryview(frames[1])], max_message_bytes=BOUND)
    assert decoded.blob == b"ct" and isinstance(decoded.blob, bytes)


def test_decode_header_reports_kind_binding_specs_and_total_size() -> None:
    message = valid_example(Kind.ACTIVATION)
    frames = encode(message)
    header = decode_header(frames[0], max_message_bytes=BOUND)
    assert header.kind is Kind.ACTIVATION and header.binding == BINDING and header.edge == "bottom->top"
    assert [(s.dtype, s.shape, s.nbytes) for s in header.tensor_specs] == [("float32", (2, 2), 16)]
    assert header.total_bytes == len(frames[0]) + 16
    assert header.frame_count == 2


def test_encode_refuses_a_header_over_64_kib() -> None:
    message = Message(kind=Kind.PREDICTION, binding=BINDING, tensors=(F32,), meta={"big": "x" * 70_000})
    with pytest.raises(LocalProtocolError, match=r"header is \d+ bytes, the limit is 65536"):
        encode(message)


@pytest.mark.parametrize(
    ("frame0", "needle"),
    [
        (b"", "shorter than"),
        (b"SSPL\x01", "shorter than"),
        (header_frame({}, magic=b"HTTP"), "bad magic"),
        (header_frame({}, version=PROTOCOL_VERSION + 1), "protocol version"),
        (b"SSPL" + bytes([PROTOCOL_VERSION, 0]) + struct.pack("<I", 1) + b"\xc0", "unknown kind code 0"),
        (b"SSPL" + bytes([PROTOCOL_VERSION, 200]) + struct.pack("<I", 1) + b"\xc0", "unknown kind code 200"),
        (header_frame(b"\xc0")[:-1] + b"\xc0\xc0", "declares a 1-byte body"),
        (header_frame(b"\xc1"), "not valid msgpack"),
        (header_frame(b"\x93\x01"), "not valid msgpack"),
        (header_frame(b"\xd6\xff\x00\x00\x00\x00"), "not valid msgpack"),  # msgpack timestamp ext
        (header_frame(b"\xc7\x01\x05a"), "not valid msgpack"),  # any other ext type
        (header_frame(b"\x81\x01\x02"), "not valid msgpack"),  # int map key
        (header_frame(b"\xa2\xff\xfe"), "not valid msgpack"),  # not UTF-8
        (header_frame(b"\x91" * 5000 + b"\xc0"), "not valid msgpack"),  # nesting bomb
        (header_frame([1, 2]), "header must be a map"),
        (header_frame({"binding": {}}), "header keys: missing"),
        (header_frame(b"\x00" * (MAX_HEADER_BYTES)), "limit is 65536"),
    ],
)
def test_decode_header_refuses_bad_frames_with_codec_error(frame0: bytes, needle: str) -> None:
    with pytest.raises(CodecError, match=needle):
        decode_header(frame0, max_message_bytes=BOUND)


@pytest.mark.parametrize(
    ("path", "value", "needle"),
    [
        (("extra",), 1, r"unexpected \['extra'\]"),
        (("binding", "extra"), 1, r"header binding keys: missing \[\], unexpected \['extra'\]"),
        (("binding", "seq"), -1, "binding.seq"),
        (("binding", "session"), "0" * 16, "16 bytes"),
        (("binding", "deployment"), b"x", "64 lowercase hex"),
        (("edge",), 5, "edge must be a str"),
        (("edge",), "", "an edge is required"),
        (("meta",), [], "meta must be a mapping"),
        (("meta",), {"phase": 1}, "must be a str"),
        (("meta",), {"surprise": 1}, "meta key 'surprise' is not allowed"),
        (("tensors",), {}, "tensors must be a list"),
        (("tensors",), [], "carries 1 tensor"),
        (("tensors",), [{"dtype": "float32", "shape": [4], "nbytes": 16}] * 65, "at most 64"),
        (("tensors", 0, "dtype"), "object", "is not one of"),
        (("tensors", 0, "shape"), [1] * 9, "at most 8"),
        (("tensors", 0, "shape"), [2, True], "dimension must be a non-negative int"),
        (("tensors", 0, "nbytes"), 17, "declares 17 bytes"),
        (("tensors", 0, "extra"), 1, r"tensor 0 keys: missing \[\], unexpected \['extra'\]"),
        (("blob",), 3, "carries no blob"),
        (("blob",), -1, "blob length"),
    ],
)
def test_decode_header_refuses_wrong_types_and_extra_keys(
    path: tuple[Any, ...], value: object, needle: str
) -> None:
    body = header_map(valid_example(Kind.ACTIVATION))
    target = body
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    with pytest.raises(CodecError, match=needle):
        decode_header(header_frame(body), max_message_bytes=BOUND)


def test_declared_size_over_the_bound_is_refused_before_any_allocation() -> None:
    body = header_map(valid_example(Kind.ACTIVATION))
    body["tensors"] = [{"dtype": "float32", "shape": [2**40], "nbytes": 2**42}]
    frame = header_frame(body)
    tracemalloc.start()
    try:
        with pytest.raises(CodecError, match=f"declares {2**42 + len(frame)} bytes, over the message bound"):
            decode_header(frame, max_message_bytes=BOUND)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024


def test_absurd_shape_products_are_refused_not_overflowed() -> None:
    body = header_map(valid_example(Kind.ACTIVATION))
    dims = [2**62] * 8
    body["tensors"] = [{"dtype": "float64", "shape": dims, "nbytes": 2**63 - 1}]
    with pytest.raises(CodecError, match="declares 9223372036854775807 bytes"):
        decode_header(header_frame(body), max_message_bytes=BOUND)


@pytest.mark.parametrize(
    "shape",
    [[64, 2**62, 0], [0, 2**40], [2**21, 0, 2**21], [0] * 7 + [2**31 + 1]],
)
def test_a_zero_size_tensor_with_huge_dimensions_is_refused(shape: list[int]) -> None:
    # Zero bytes on the wire, so the size bound alone lets it through; torch.empty overflows on
    # [64, 2**62, 0] ("Storage size calculation overflowed") and would crash the receiver.
    body = header_map(valid_example(Kind.ACTIVATION))
    body["tensors"] = [{"dtype": "float32", "shape": shape, "nbytes": 0}]
    with pytest.raises(CodecError, match="over the bound of 1048576"):
        decode_header(header_frame(body), max_message_bytes=BOUND)


def test_a_zero_size_tensor_whose_span_fits_the_bound_is_accepted() -> None:
    body = header_map(valid_example(Kind.ACTIVATION))
    body["tensors"] = [{"dtype": "float32", "shape": [8, 0, 1024], "nbytes": 0}]
    header = decode_header(header_frame(body), max_message_bytes=BOUND)
    assert header.tensor_specs[0].shape == (8, 0, 1024)


def test_blob_length_counts_against_the_bound() -> None:
    frames = encode(valid_example(Kind.PSI))
    with pytest.raises(CodecError, match="over the message bound"):
        decode(frames, max_message_bytes=len(frames[0]) + 2)
    assert decode(frames, max_message_bytes=len(frames[0]) + 3).blob == b"ids"


def test_header_alone_over_the_bound_is_refused() -> None:
    frames = encode(valid_example(Kind.SHUTDOWN))
    with pytest.raises(CodecError, match="header alone"):
        decode(frames, max_message_bytes=len(frames[0]) - 1)


@pytest.mark.parametrize("kind", list(Kind))
def test_decode_body_skips_the_second_check_only_for_what_decode_header_made(kind: Kind) -> None:
    """decode_body builds the Message without checking again what decode_header just checked; the
    result is the Message the full check builds, and a Header made or altered by hand is checked."""
    message = valid_example(kind)
    frames = encode(message)
    header = decode_header(frames[0], max_message_bytes=BOUND)
    assert header.checked
    fast = decode_body(header, frames)
    slow = Message(kind=fast.kind, binding=fast.binding, edge=fast.edge, meta=fast.meta, tensors=fast.tensors,
                   blob=fast.blob)
    assert fast == slow == message
    assert type(fast.meta) is type(slow.meta) and dict(fast.meta) == dict(slow.meta)
    altered = dataclasses.replace(header, edge="not an edge")
    assert not altered.checked
    with pytest.raises(CodecError, match="edge must be"):
        decode_body(altered, frames)


def test_decode_body_refuses_a_missing_or_extra_frame() -> None:
    frames = encode(valid_example(Kind.ACTIVATION))
    header = decode_header(frames[0], max_message_bytes=BOUND)
    with pytest.raises(CodecError, match="declares 2 frames, got 1"):
        decode_body(header, frames[:1])
    with pytest.raises(CodecError, match="declares 2 frames, got 3"):
        decode_body(header, [*frames, b""])


def test_decode_body_refuses_a_frame_whose_length_differs_from_the_header() -> None:
    frames = encode(valid_example(Kind.ACTIVATION))
    header = decode_header(frames[0], max_message_bytes=BOUND)
    with pytest.raises(CodecError, match="tensor 0 frame is 15 bytes, the header declares 16"):
        decode_body(header, [frames[0], bytes(15)])
    blob_frames = encode(valid_example(Kind.PSI))
    blob_header = decode_header(blob_frames[0], max_message_bytes=BOUND)
    with pytest.raises(CodecError, match="blob frame is 4 bytes"):
        decode_body(blob_header, [blob_frames[0], b"idss"])


@pytest.mark.parametrize("frames", [[], "SSPL", None, [None], [12], ["text"], [memoryview(bytes(20))[::2]]])
def test_decode_refuses_things_that_are_not_frames(frames: Any) -> None:
    with pytest.raises(CodecError):
        decode(frames, max_message_bytes=BOUND)


def test_decode_header_refuses_a_non_positive_bound_as_our_bug() -> None:
    with pytest.raises(LocalProtocolError, match="max_message_bytes"):
        decode_header(b"SSPL", max_message_bytes=0)


def test_errors_quote_peer_values_briefly() -> None:
    body = header_map(valid_example(Kind.ACTIVATION))
    body["binding"]["sender"] = "x" * 50_000
    with pytest.raises(CodecError, match=r"binding\.sender") as caught:
        decode_header(header_frame(body), max_message_bytes=BOUND)
    assert len(str(caught.value)) < 300
