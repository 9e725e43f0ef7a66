"""Convert between torch tensors and the protocol's `WireTensor`, without copying.

`to_wire` hands the transport a byte view of the tensor's own memory; `from_wire` builds a tensor
over the received buffer with `torch.frombuffer`. Nothing here unpickles or `torch.load`s.

The zero-copy choice, measured on the 2-core dev machine (torch 2.13, CPU):
`torch.frombuffer` over a 16 MiB buffer costs about 3 µs; copying the buffer first costs
1.3–2 ms (64 KiB: about 3 µs either way). Received frames are read-only (`bytes`, or a zmq frame's
read-only memoryview), and torch has no read-only tensors. We keep the view and silence torch's
"buffer is not writable" warning for exactly that call; in exchange **a tensor from `from_wire`
must not be modified in place** (the executor never does: received activations become leaves of
new graphs, received gradients only feed `backward`). Callers that need to write into the result
pass `writable=True`, which copies only when the buffer is read-only.
"""

from __future__ import annotations

import math
import sys
import warnings

import numpy as np
import torch

from secure_split.errors import RemoteProtocolError
from secure_split.protocol import WireTensor
from secure_split.protocol.messages import MAX_SPAN_BYTES, shape_problem

__all__ = ["DTYPES", "MAX_NDIM", "dtype_name", "from_wire", "to_wire"]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
"""Every dtype that may travel, by its wire name (the list fixed in docs/internals.md §1)."""

_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
MAX_NDIM = 8

# Only this warning is silenced, and only around our own frombuffer call.
_READ_ONLY_WARNING = r"The given buffer is not writable"

# The wire is little-endian and we view memory as is; every machine we target (x86-64, arm64)
# is little-endian, so a big-endian host is refused outright instead of byte-swapping.
if sys.byteorder != "little":  # pragma: no cover
    raise ImportError("secure_split.engine.tensors needs a little-endian machine")


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of a torch dtype.

    Args:
        dtype: a torch dtype.

    Returns:
        Its name in the wire list, e.g. "float32".

    Raises:
        ValueError: if the dtype cannot travel (complex, float8, unsigned > 8 bits, ...).
    """
    try:
        return _NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot travel; allowed: {', '.join(DTYPES)}") from None


def to_wire(t: torch.Tensor) -> WireTensor:
    """View a CPU tensor's memory as a `WireTensor`, without copying.

    The returned `WireTensor.data` is a memoryview of the tensor's storage and keeps it alive;
    the tensor must not be modified until the message has been sent. A non-contiguous tensor is
    made contiguous first (one copy), a tensor on another device is moved to the CPU (one copy).

    Args:
        t: the tensor. Autograd history is dropped (`detach`, which does not copy).

    Returns:
        A WireTensor (dtype name, shape, little-endian bytes).

    Raises:
        TypeError: if `t` is not a torch.Tensor.
        ValueError: if the dtype cannot travel or the tensor has more than 8 dimensions.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"to_wire needs a torch.Tensor, got {type(t).__name__}")
    name = dtype_name(t.dtype)
    if t.dim() > MAX_NDIM:
        raise ValueError(f"a tensor on the wire has at most {MAX_NDIM} dimensions, got {t.dim()}")
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    # Viewing as uint8 gives one code path for every dtype, bfloat16 and bool included (numpy
    # has no bfloat16); the numpy array holds a reference to the tensor, so the memory lives on.
    data = memoryview(flat.view(torch.uint8).numpy())  # type: ignore[arg-type]  # ndarray is a buffer
    return WireTensor(dtype=name, shape=tuple(t.shape), data=data)


def _is_aligned(buf: memoryview, itemsize: int) -> bool:
    if itemsize == 1 or buf.nbytes == 0:
        return True
    address = np.frombuffer(buf, dtype=np.uint8).ctypes.data
    return address % itemsize == 0


def from_wire(w: WireTensor, *, writable: bool = False) -> torch.Tensor:
    """Build a tensor over a received `WireTensor`'s buffer with `torch.frombuffer`.

    Everything is checked before a tensor exists: the dtype is in the wire list, the shape has at
    most 8 non-negative dimensions whose span (empty dimensions counted as 1) is at most
    `MAX_SPAN_BYTES`, and the byte length is exactly prod(shape) * itemsize. A bool tensor must
    hold only bytes 0 and 1 (torch has undefined behaviour for others). Nothing else is raised
    for any input.

    Args:
        w: the received tensor.
        writable: copy the buffer if it is read-only, so the result may be modified in place.
            Without it the result shares the buffer and **must not be modified in place**.

    Returns:
        A CPU tensor of the given dtype and shape. It shares memory with `w.data` unless a copy
        was needed (writable=True on a read-only buffer, or a buffer not aligned to the itemsize).

    Raises:
        RemoteProtocolError: for an unknown dtype, a bad or oversized shape, a byte length that
            does not match, or a bool tensor with bytes other than 0 and 1.
    """
    dtype = DTYPES.get(w.dtype) if isinstance(w.dtype, str) else None
    if dtype is None:
        raise RemoteProtocolError(f"tensor dtype {w.dtype!r} is not allowed; allowed: {', '.join(DTYPES)}")
    raw_shape = w.shape
    if not isinstance(raw_shape, tuple | list) or len(raw_shape) > MAX_NDIM:
        raise RemoteProtocolError(f"tensor shape {raw_shape!r:.80} is not a list of at most {MAX_NDIM} sizes >= 0")
    shape = tuple(raw_shape)
    # The span bound (empty dimensions counted as 1) keeps torch's storage-size arithmetic in range:
    # torch.empty([64, 2**62, 0]) raises "Storage size calculation overflowed" though it holds nothing.
    problem = shape_problem(w.dtype, shape, max_span=MAX_SPAN_BYTES)
    if problem is not None:
        raise RemoteProtocolError(f"tensor refused: {problem}")
    try:
        buf = memoryview(w.data)
        if buf.ndim != 1 or buf.format != "B":
            buf = buf.cast("B")
    except (TypeError, ValueError) as exc:
        raise RemoteProtocolError(f"tensor data is not a contiguous byte buffer: {exc}") from None
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = math.prod(shape) * itemsize
    if buf.nbytes != expected:
        raise RemoteProtocolError(
            f"tensor {w.dtype}{list(shape)} needs {expected} bytes, the buffer has {buf.nbytes}"
        )
    if expected == 0:
        # frombuffer refuses empty buffers; an empty tensor shares nothing anyway.
        return torch.empty(shape, dtype=dtype)
    if (writable and buf.readonly) or not _is_aligned(buf, itemsize):
        buf = memoryview(bytearray(buf))
    if buf.readonly:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_READ_ONLY_WARNING, category=UserWarning)
            flat = torch.frombuffer(buf, dtype=torch.uint8)
    else:
        flat = torch.frombuffer(buf, dtype=torch.uint8)
    if dtype == torch.bool and bool((flat > 1).any()):
        raise RemoteProtocolError("bool tensor holds bytes other than 0 and 1")
    return flat.view(dtype).reshape(shape)
