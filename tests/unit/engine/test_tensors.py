"""to_wire / from_wire: every dtype round-trips, no copies where none are needed, bad buffers refused."""

from __future__ import annotations

import types
import warnings

import numpy as np
import pytest
import torch

from secure_split.engine.tensors import DTYPES, dtype_name, from_wire, to_wire
from secure_split.errors import RemoteProtocolError
from secure_split.protocol import WireTensor


def _sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 100).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(dtype)


def _address(buf: memoryview) -> int:
    return int(np.frombuffer(buf, dtype=np.uint8).ctypes.data)


@pytest.mark.parametrize("name", list(DTYPES))
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 3, 4), (1, 1, 1, 1, 1, 1, 1, 2)])
def test_every_dtype_and_shape_round_trips_through_bytes(name: str, shape: tuple[int, ...]) -> None:
    t = _sample(DTYPES[name], shape)
    w = to_wire(t)
    assert (w.dtype, w.shape, w.nbytes) == (name, shape, t.numel() * t.element_size())
    back = from_wire(WireTensor(w.dtype, w.shape, bytes(w.data)))
    assert back.dtype == t.dtype and tuple(back.shape) == shape
    assert torch.equal(back, t)


def test_wire_bytes_are_little_endian() -> None:
    w = to_wire(torch.tensor([1], dtype=torch.int32))
    assert bytes(w.data) == b"\x01\x00\x00\x00"
    assert bytes(to_wire(torch.tensor([1.0], dtype=torch.bfloat16)).data) == b"\x80\x3f"


def test_to_wire_views_the_tensor_memory_without_copying() -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    w = to_wire(t)
    assert isinstance(w.data, memoryview)
    assert _address(w.data) == t.data_ptr()
    del t  # the view keeps the storage alive
    assert np.frombuffer(w.data, dtype=np.float32)[-1] == 11.0


def test_to_wire_of_a_non_contiguous_or_grad_tensor_sends_its_values() -> None:
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3).t()
    assert torch.equal(from_wire(to_wire(t)), t)
    leaf = torch.ones(2, requires_grad=True)
    assert torch.equal(from_wire(to_wire(leaf * 2)), torch.full((2,), 2.0))


def test_from_wire_shares_a_writable_buffer() -> None:
    buf = bytearray(np.arange(4, dtype=np.float32).tobytes())
    t = from_wire(WireTensor("float32", (2, 2), memoryview(buf)))
    assert t.data_ptr() == _address(memoryview(buf))
    buf[0:4] = np.float32(7.0).tobytes()
    assert t[0, 0] == 7.0


def test_from_wire_on_read_only_bytes_views_them_without_a_warning() -> None:
    data = np.arange(4, dtype=np.float32).tobytes()
    torch.set_warn_always(True)  # torch warns once per process; make sure we would see it
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            t = from_wire(WireTensor("float32", (4,), data))
    finally:
        torch.set_warn_always(False)
    assert t.data_ptr() == _address(memoryview(data))
    assert t.tolist() == [0.0, 1.0, 2.0, 3.0]


def test_from_wire_writable_copies_only_a_read_only_buffer() -> None:
    data = np.arange(4, dtype=np.float32).tobytes()
    t = from_wire(WireTensor("float32", (4,), data), writable=True)
    t.add_(1)  # allowed: it is a copy
    assert np.frombuffer(data, dtype=np.float32).tolist() == [0.0, 1.0, 2.0, 3.0]
    buf = bytearray(data)
    assert from_wire(WireTensor("float32", (4,), memoryview(buf)), writable=True).data_ptr() == _address(
        memoryview(buf)
    )


def test_from_wire_copes_with_a_misaligned_buffer() -> None:
    raw = bytearray(b"\x00" + np.arange(3, dtype=np.float64).tobytes())
    view = memoryview(raw)[1:]
    assert from_wire(WireTensor("float64", (3,), view)).tolist() == [0.0, 1.0, 2.0]


def _unchecked(dtype: object, shape: object, data: bytes) -> WireTensor:
    # The codec builds checked WireTensors; from_wire checks again, so test it with an unchecked one.
    return types.SimpleNamespace(dtype=dtype, shape=shape, data=data)  # type: ignore[return-value]


@pytest.mark.parametrize(
    ("dtype", "shape", "data", "message"),
    [
        ("float32", (2,), b"\x00" * 7, "needs 8 bytes"),
        ("float32", (2,), b"\x00" * 9, "needs 8 bytes"),
        ("int64", (2, 2), b"\x00" * 16, "needs 32 bytes"),
        ("complex64", (1,), b"\x00" * 8, "not allowed"),
        ("float32", (-1,), b"", ">= 0"),
        ("uint8", (1,) * 9, b"\x00", "at most 8"),
        # Zero bytes, yet torch.empty raises "Storage size calculation overflowed" on it.
        ("float32", (64, 2**62, 0), b"", "over the bound"),
        ("float32", (0, 2**20, 2**20), b"", "over the bound"),
        ("float32", (True,), b"\x00" * 4, ">= 0"),
        ("bool", (2,), b"\x00\x02", "other than 0 and 1"),
    ],
)
def test_from_wire_refuses_inconsistent_tensors(
    dtype: str, shape: tuple[int, ...], data: bytes, message: str
) -> None:
    with pytest.raises(RemoteProtocolError, match=message):
        from_wire(_unchecked(dtype, shape, data))


def test_dtype_name_refuses_dtypes_that_cannot_travel() -> None:
    assert dtype_name(torch.bfloat16) == "bfloat16"
    with pytest.raises(ValueError, match="cannot travel"):
        dtype_name(torch.complex64)
    with pytest.raises(ValueError):
        to_wire(torch.zeros(2, dtype=torch.complex64))
