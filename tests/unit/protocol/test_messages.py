"""Message kinds, bindings, wire tensors and the per-kind rules, checked when a Message is built."""

from __future__ import annotations

import array

import pytest

from secure_split.errors import LocalProtocolError
from secure_split.protocol import (
    CONTROL_KINDS,
    KIND_RULES,
    Binding,
    Kind,
    Message,
    WireTensor,
)

from .fake_link import DEPLOYMENT

BINDING = Binding(DEPLOYMENT, bytes(range(16)), 3, 7, "hospital_a", "bank")
F32 = WireTensor("float32", (2, 2), bytes(16))
IDS = WireTensor("int64", (3,), bytes(24))


def valid_example(kind: Kind) -> Message:
    """One valid message of each kind (the codec tests reuse these)."""
    examples: dict[Kind, dict[str, object]] = {
        Kind.HELLO: {"meta": {"protocol": 1, "deployment": DEPLOYMENT, "policy": "p", "nonce": bytes(16)}},
        Kind.REFUSE: {"meta": {"reason": "policy", "code": "denied", "ref_seq": 4}},
        Kind.ERROR: {"meta": {"reason": "bad frame", "code": "codec"}},
        Kind.SHUTDOWN: {"meta": {"reason": "done", "status": "ok"}},
        Kind.STEP_BEGIN: {"meta": {"epoch": 0, "phase": "train"}, "tensors": (IDS,)},
        Kind.ACTIVATION: {"edge": "bottom->top", "tensors": (F32,), "meta": {"phase": "train"}},
        Kind.GRADIENT: {"edge": "bottom->top", "tensors": (F32,)},
        Kind.AGGREGATE_GRADIENT: {"edge": "merge->top", "tensors": (F32,)},
        Kind.PREDICTION: {"tensors": (F32,), "meta": {"request": "r1", "scores": {"auc": 0.5}}},
        Kind.BARRIER: {"meta": {"epoch": 1, "phase": "a3", "reason": "average", "members": ["o1", "o2"]}},
        Kind.BARRIER_ACK: {"meta": {"epoch": 1, "eval": {"labels": {"loss_sum": 0.25, "correct": 3, "count": 4}}}},
        Kind.AUDIT_RECEIPT: {"meta": {"peer": "bank", "seq": 12, "head": "ab" * 32, "signature": "cd" * 64}},
        Kind.HE_CONTEXT: {"blob": b"ctx", "meta": {"round": 0}},
        Kind.ENCRYPTED_ACTIVATION: {"blob": b"ct", "edge": "bottom->merge", "meta": {"part": "a"}},
        Kind.MASKED_AGGREGATE: {"blob": b"sum"},
        Kind.ENCRYPTED_WEIGHTS: {"blob": b"w", "meta": {"round": 2, "key_id": b"\x01"}},
        Kind.PSI: {"blob": b"ids", "meta": {"stage": "blinded"}},
    }
    return Message(kind=kind, binding=BINDING, **examples[kind])  # type: ignore[arg-type]


def test_kind_set_is_closed_and_has_no_kind_for_raw_features_or_labels() -> None:
    assert {k.value for k in Kind} == {
        "hello", "refuse", "error", "step_begin", "activation", "gradient",
        "barrier", "barrier_ack", "audit_receipt", "shutdown", "he_context", "encrypted_activation",
        "masked_aggregate", "aggregate_gradient", "encrypted_weights", "psi", "prediction",
    }  # fmt: skip
    assert not any(word in k.value for k in Kind for word in ("feature", "label", "raw"))


def test_control_kinds_are_the_kinds_that_steer_the_run() -> None:
    assert {k.value for k in CONTROL_KINDS} == {
        "hello", "refuse", "error", "step_begin",
        "barrier", "barrier_ack", "shutdown",
    }  # fmt: skip


def test_every_kind_has_a_rule_and_a_valid_example() -> None:
    assert set(KIND_RULES) == set(Kind)
    for kind in Kind:
        assert valid_example(kind).kind is kind


def test_kind_accepts_its_string_value() -> None:
    assert Message(kind="barrier", binding=BINDING, meta={"epoch": 0}).kind is Kind.BARRIER  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError, match="unknown message kind 'heartbeat'"):
        Message(kind="heartbeat", binding=BINDING)  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError, match="unknown message kind 'features'"):
        Message(kind="features", binding=BINDING)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("deployment", "A" * 64, "64 lowercase hex"),
        ("deployment", "ab", "64 lowercase hex"),
        ("session", bytes(15), "exactly 16 bytes"),
        ("session", "x" * 16, "exactly 16 bytes"),
        ("step", -1, "binding.step"),
        ("seq", 2**63, "binding.seq"),
        ("seq", True, "binding.seq"),
        ("sender", "Bank", "binding.sender"),
        ("receiver", "b" * 64, "binding.receiver"),
        ("receiver", "1bank", "binding.receiver"),
    ],
)
def test_binding_refuses_values_out_of_range(field: str, value: object, needle: str) -> None:
    fields = {
        "deployment": DEPLOYMENT, "session": bytes(16), "step": 0, "seq": 0, "sender": "a", "receiver": "b",
    }  # fmt: skip
    fields[field] = value
    with pytest.raises(LocalProtocolError, match=needle):
        Binding(**fields)  # type: ignore[arg-type]


def test_binding_accepts_the_extremes_of_its_ranges() -> None:
    b = Binding(DEPLOYMENT, bytes(16), 2**63 - 1, 2**63 - 1, "a", "z" + "_" * 62)
    assert b.seq == 2**63 - 1


def test_wire_tensor_checks_dtype_shape_and_length() -> None:
    with pytest.raises(LocalProtocolError, match="dtype must be one of"):
        WireTensor("complex64", (1,), bytes(8))
    with pytest.raises(LocalProtocolError, match="at most 8 are allowed"):
        WireTensor("uint8", (1,) * 9, bytes(1))
    with pytest.raises(LocalProtocolError, match="ints >= 0"):
        WireTensor("uint8", (-1,), b"")
    with pytest.raises(LocalProtocolError, match="over the bound"):
        WireTensor("float32", (64, 2**62, 0), b"")  # zero bytes, but torch overflows on such a shape
    with pytest.raises(LocalProtocolError, match=r"float32\[2, 3\] needs 24 bytes, data has 23"):
        WireTensor("float32", (2, 3), bytes(23))
    with pytest.raises(LocalProtocolError, match="bytes or memoryview"):
        WireTensor("uint8", (1,), bytearray(1))  # type: ignore[arg-type]


def test_wire_tensor_scalar_and_empty_shapes_have_the_right_size() -> None:
    assert WireTensor("float64", (), bytes(8)).nbytes == 8
    assert WireTensor("bfloat16", (0, 5), b"").nbytes == 0
    assert WireTensor("bool", [3], b"\x00\x01\x00").shape == (3,)  # type: ignore[arg-type]


def test_wire_tensor_keeps_a_byte_memoryview_without_copying() -> None:
    buffer = bytearray(16)
    view = memoryview(buffer)
    tensor = WireTensor("float32", (4,), view)
    assert tensor.data is view
    buffer[0] = 7  # a write through the owner shows in the tensor: nothing was copied
    assert tensor.data[0] == 7


def test_wire_tensor_views_a_typed_buffer_as_bytes_without_copying() -> None:
    values = array.array("f", [1.0, 2.0])
    tensor = WireTensor("float32", (2,), memoryview(values))
    assert isinstance(tensor.data, memoryview)
    assert tensor.data.format == "B" and tensor.nbytes == 8
    assert tensor.data.obj is values


def test_wire_tensor_refuses_non_contiguous_data() -> None:
    strided = memoryview(bytes(8))[::2]
    with pytest.raises(LocalProtocolError, match="C-contiguous"):
        WireTensor("uint8", (4,), strided)


def test_wire_tensors_are_equal_when_dtype_shape_and_bytes_are() -> None:
    raw = bytes(range(8))
    assert WireTensor("uint8", (8,), raw) == WireTensor("uint8", (8,), memoryview(bytearray(raw)))
    assert WireTensor("uint8", (8,), raw) != WireTensor("int8", (8,), raw)
    assert WireTensor("uint8", (8,), raw) != WireTensor("uint8", (2, 4), raw)
    assert WireTensor("uint8", (8,), raw) != WireTensor("uint8", (8,), bytes(8))


def test_wire_tensor_repr_never_shows_the_payload() -> None:
    text = repr(WireTensor("uint8", (4,), b"SECR"))
    assert "SECR" not in text and "nbytes=4" in text


def test_message_meta_is_a_read_only_copy() -> None:
    meta = {"epoch": 1, "eval": {"t": {"loss_sum": 1.0, "correct": 0, "count": 1}}}
    message = Message(kind=Kind.BARRIER_ACK, binding=BINDING, meta=meta)
    meta["epoch"] = 2
    assert message.meta["epoch"] == 1
    with pytest.raises(TypeError):
        message.meta["epoch"] = 3  # type: ignore[index]


@pytest.mark.parametrize(
    ("kind", "changes", "needle"),
    [
        (
            Kind.HELLO,
            {"meta": {"protocol": 1, "deployment": "d", "policy": "p"}},
            r"meta\['nonce'\] is required",
        ),
        (
            Kind.HELLO,
            {"meta": {"protocol": 1, "deployment": "d", "policy": "p", "nonce": bytes(15)}},
            "16 bytes",
        ),
        (
            Kind.HELLO,
            {"meta": {"protocol": True, "deployment": "d", "policy": "p", "nonce": bytes(16)}},
            "int",
        ),
        (Kind.BARRIER, {"meta": {"epoch": 0, "x": 1}}, "meta key 'x' is not allowed"),
        (Kind.BARRIER, {"meta": {"epoch": 0}, "edge": "a->b"}, "carries no edge"),
        (Kind.BARRIER, {"meta": {"epoch": 0, "members": ["a", "a"]}}, "names a peer twice"),
        (Kind.BARRIER, {"meta": {"epoch": 0, "members": ["A"]}}, "must be a peer name"),
        (Kind.REFUSE, {"meta": {"reason": "r" * 4001, "code": "c"}}, "at most 4000"),
        (Kind.STEP_BEGIN, {"meta": {"epoch": 0, "phase": "fit"}, "tensors": (IDS,)}, "must be one of"),
        (Kind.STEP_BEGIN, {"meta": {"epoch": 0, "phase": "train"}, "tensors": (F32,)}, "must be int64"),
        (Kind.STEP_BEGIN, {"meta": {"epoch": 0, "phase": "train"}}, "carries 1 tensor"),
        (Kind.ACTIVATION, {"tensors": (F32,)}, "an edge is required"),
        (Kind.ACTIVATION, {"edge": "a->b", "tensors": (F32, F32)}, "carries 1 tensor"),
        (Kind.ACTIVATION, {"edge": "a->b", "tensors": (F32,), "meta": {"micro": 0}}, "meta key 'micro' is not allowed"),
        (Kind.ACTIVATION, {"edge": "A->b", "tensors": (F32,)}, "FROM->TO"),
        (Kind.ACTIVATION, {"edge": "a->b", "tensors": (F32,), "blob": b"x"}, "carries no blob"),
        (Kind.BARRIER_ACK, {"meta": {"epoch": 0, "eval": {"t": {"loss_sum": "low", "correct": 0, "count": 0}}}},
         "finite number"),
        (Kind.BARRIER_ACK, {"meta": {"epoch": 0, "eval": {"t": {"loss_sum": float("nan"), "correct": 0, "count": 0}}}},
         "finite"),
        (Kind.BARRIER_ACK, {"meta": {"epoch": 0, "eval": {"t": {"loss_sum": 1.0, "correct": 5, "count": 4}}}},
         r"in \[0, count\]"),
        (Kind.BARRIER_ACK, {"meta": {"epoch": 0, "eval": {"t": {"loss_sum": 1.0, "count": 4}}}}, "exactly the keys"),
        (Kind.BARRIER_ACK, {"meta": {"epoch": 0, "accuracy": 1.0}}, "meta key 'accuracy' is not allowed"),
        (
            Kind.AUDIT_RECEIPT,
            {"meta": {"peer": "Bank", "seq": 1, "head": "h", "signature": "s"}},
            "must match",
        ),
        (Kind.PSI, {}, "non-empty blob is required"),
        (Kind.PSI, {"blob": b"x", "meta": {"f": 1.5}}, "str, int or bytes"),
        (Kind.PREDICTION, {"tensors": (F32,), "meta": {"deep": [[[[[1]]]]]}}, "deeper than 4"),
        (Kind.PREDICTION, {"tensors": (F32,), "meta": {"big": 2**64}}, "64 bits"),
        (Kind.PREDICTION, {"tensors": (F32,), "meta": {"odd": {1, 2}}}, "not allowed in meta"),
        (Kind.PREDICTION, {"tensors": (F32,), "meta": {"s": "\ud800"}}, "UTF-8"),
    ],
)
def test_message_refuses_what_the_kind_rule_forbids(
    kind: Kind, changes: dict[str, object], needle: str
) -> None:
    with pytest.raises(LocalProtocolError, match=needle):
        Message(kind=kind, binding=BINDING, **changes)  # type: ignore[arg-type]


def test_message_lists_every_broken_rule_at_once() -> None:
    with pytest.raises(LocalProtocolError) as caught:
        Message(kind=Kind.ACTIVATION, binding=BINDING, meta={"x": 1}, blob=b"b")
    text = str(caught.value)
    for needle in ("meta key 'x'", "carries 1 tensor", "edge is required", "carries no blob"):
        assert needle in text


def test_message_nested_meta_up_to_depth_four_is_accepted() -> None:
    meta = {"deep": [[[{"k": None}]]], "t": (1, 2)}
    message = Message(kind=Kind.PREDICTION, binding=BINDING, tensors=(F32,), meta=meta)
    assert message.meta["t"] == [1, 2]  # tuples become lists: what the wire gives back


def test_message_repr_shows_blob_length_not_content() -> None:
    text = repr(Message(kind=Kind.PSI, binding=BINDING, blob=b"CIPHERTEXT"))
    assert "CIPHERTEXT" not in text and "<10 bytes>" in text
