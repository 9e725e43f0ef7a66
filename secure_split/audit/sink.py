"""What the audit writer is built on: value normalisation, the append-only file, the write lock.

`clean_value` is the writer's gate for field values (nothing that could carry a payload or a
secret enters the log); `AppendOnlyFile` appends each line with one `write(2)`; `lock_for_writing`
keeps two processes of one peer from forking one chain; `RefusalLimiter` bounds how many
outsider refusals a flood can write.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import structlog

from secure_split.audit.format import INT_LIMIT, INT_MIN, MAX_LIST_ITEMS, MAX_STRING_BYTES
from secure_split.errors import AuditError

_MAX_DEPTH = 4
_MAX_DICT_ITEMS = 128
SHORT = MAX_STRING_BYTES // 4  # a str of at most this many characters is within the byte limit


class SigningIdentity(Protocol):
    """What the log needs from a peer identity (`secure_split.crypto.keys.Identity` fits)."""

    @property
    def sign_key_hex(self) -> str:
        """The Ed25519 public key, hex."""
        ...

    def secret_text_forms(self) -> tuple[str, ...]:
        """The peer's secret keys as text (hex, Z85, base64): no entry may contain one."""
        ...

    def sign(self, data: bytes) -> bytes:
        """An Ed25519 signature over `data`."""
        ...


def utc_timestamp(ns: int) -> str:
    """Format nanoseconds since the Unix epoch as `YYYY-MM-DDTHH:MM:SS.ffffffZ` (UTC).

    Args:
        ns: time.time_ns() or a test clock's value.

    Returns:
        The ISO 8601 timestamp with microseconds that entries carry in `time`.
    """
    secs, us = divmod(ns // 1000, 1_000_000)
    return _second(secs) + f".{us:06d}Z"


@functools.lru_cache(maxsize=8)
def _second(secs: int) -> str:
    """`YYYY-MM-DDTHH:MM:SS` of a whole second (entries come in bursts within one second)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))


def _refuse(path: str, why: str) -> AuditError:
    return AuditError(f"audit field {path}: {why}")


def clean_value(value: Any, path: str, depth: int = 0) -> Any:
    """Normalise one field value for the log, or refuse it.

    Accepts None, bool, int, finite float (whole floats become ints; NaN and ±Infinity become
    the strings "NaN", "Infinity", "-Infinity"), str up to `MAX_STRING_BYTES`, and lists,
    tuples and str-keyed dicts of those, nested at most 4 deep. numpy scalars are accepted as
    numbers; str enums as their value.

    Args:
        value: the value a caller passed to `record`.
        path: the field's name, for the error message.
        depth: nesting depth (internal).

    Returns:
        The JSON-ready value.

    Raises:
        AuditError: bytes, arrays, objects, huge strings or lists, too deep nesting.
    """
    t = type(value)
    if value is None or t is bool:
        return value
    if t is int:
        if not INT_MIN <= value < INT_LIMIT:
            raise _refuse(path, f"the integer {value} is outside [-2^63, 2^63)")
        return value
    if t is str:
        if len(value) > MAX_STRING_BYTES // 4 and len(value.encode("utf-8")) > MAX_STRING_BYTES:
            raise _refuse(path, f"a string of {len(value.encode('utf-8'))} bytes; the limit is "
                                f"{MAX_STRING_BYTES} (log a digest, not the content)")
        return value
    if t is float:
        if not math.isfinite(value):
            return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
        return int(value) if value.is_integer() and abs(value) < 2**53 else value
    if isinstance(value, bytes | bytearray | memoryview):
        raise _refuse(path, f"{t.__name__} value; the audit log never holds payloads or secrets, "
                            "log their SHA-256 digest instead")
    if isinstance(value, str):  # a str subclass, e.g. a str enum such as protocol.Kind: its value
        return clean_value(str.__str__(value), path, depth)
    if getattr(value, "shape", None) == () and hasattr(value, "item"):
        return clean_value(value.item(), path, depth)  # a numpy (or similar) scalar: its Python value
    if isinstance(value, numbers.Integral):
        return clean_value(int(value), path, depth)
    if isinstance(value, numbers.Real):
        return clean_value(float(value), path, depth)
    if depth >= _MAX_DEPTH:
        raise _refuse(path, f"nested more than {_MAX_DEPTH} deep")
    if t is list or t is tuple:
        if len(value) > MAX_LIST_ITEMS:
            raise _refuse(path, f"a list of {len(value)} items; the limit is {MAX_LIST_ITEMS} "
                                "(the log records shapes and digests, never tensor values)")
        return [clean_value(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
    if t is dict:
        if len(value) > _MAX_DICT_ITEMS:
            raise _refuse(path, f"a dict of {len(value)} items; the limit is {_MAX_DICT_ITEMS}")
        out = {}
        for k, v in value.items():
            if type(k) is not str:
                raise _refuse(path, f"dict key {k!r} is not a str")
            out[k] = clean_value(v, f"{path}.{k}", depth + 1)
        return out
    raise _refuse(path, f"a {t.__module__}.{t.__name__}; only JSON scalars, lists and dicts go into the "
                        "audit log (never tensors, arrays or payloads)")


class AppendOnlyFile:
    """The wrapped logger at the end of the chain: appends each rendered line with one write."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def write_entry(self, line: bytes) -> None:
        """Append one line with one write (a short write on a full disk is continued)."""
        view = memoryview(line)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def fsync(self) -> None:
        """Flush the file to stable storage."""
        os.fsync(self._fd)

    def close(self) -> None:
        """Close the file."""
        os.close(self._fd)


class AuditBoundLogger(structlog.BoundLoggerBase):
    """The bound logger: one method, `write_entry`, that runs the chain and appends the line."""

    def write_entry(self, event: str, **event_kw: Any) -> Any:
        """Run the processor chain on one event and hand the rendered line to the file."""
        return self._proxy_to_logger("write_entry", event, **event_kw)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the file's own fsync still holds
    finally:
        os.close(fd)


def lock_for_writing(fd: int, path: Path) -> None:
    """Take the log's exclusive write lock (held until the file is closed), or refuse.

    Two processes of one peer (a `peer run` and a `predict`, or two `predict`s) appending to one
    chain would fork it; the second one is refused instead.
    """
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise AuditError(
            f"audit log {path} is open for writing in another process of this peer (a running `peer run`, "
            "`serve` or `predict`); wait until it ends, or stop it, then run this again"
        ) from None




class RefusalLimiter:
    """At most `limit` outsider refusals recorded per `window_s`; the rest counted, then one summary.

    Args:
        limit: entries per window.
        window_s: the window, in seconds of `monotonic`.
        monotonic: the clock (tests pass their own).
    """

    def __init__(self, limit: int = 20, window_s: float = 60.0,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        """See the class docstring."""
        self.limit = limit
        self.window_s = window_s
        self._now = monotonic
        self._start = monotonic()
        self._recorded = 0
        self.suppressed = 0

    def admit(self) -> tuple[bool, int]:
        """Whether to record the next refusal, and how many were suppressed in the window that just ended.

        Returns:
            (record it, suppressed count to summarise first: > 0 only when a new window begins).
        """
        now = self._now()
        flushed = 0
        if now - self._start >= self.window_s:
            flushed, self.suppressed = self.suppressed, 0
            self._start, self._recorded = now, 0
        if self._recorded < self.limit:
            self._recorded += 1
            return True, flushed
        self.suppressed += 1
        return False, flushed

    def take_suppressed(self) -> int:
        """The suppressed count not yet summarised (reset to 0)."""
        n, self.suppressed = self.suppressed, 0
        return n
