"""Reading audit log files in bounded memory: complete lines, the torn tail, the first entry.

`LineReader` yields a file's complete lines block by block and never holds a line longer than
`MAX_LINE_BYTES`; `foreign_deployment` tells a log of another deployment from a tampered one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from secure_split.audit.encoding import JSONDecodeError, parse
from secure_split.audit.format import MAX_LINE_BYTES, genesis_hash
from secure_split.errors import AuditError

_BLOCK = 1 << 20


class LineReader:
    """Iterate the complete lines of a binary file in bounded memory; `torn` holds the tail after.

    A line longer than `MAX_LINE_BYTES` is never held: `on_overlong(line number, length)` is
    called and an empty stand-in is yielded in its place (it then counts as a line that is not an
    entry). Iterate it line by line, or by `blocks` (lists of lines) where the caller loops itself.
    """

    def __init__(self, fh: BinaryIO, on_overlong: Callable[[int, int], None]) -> None:
        """Args: the open file, and what to call for a line over `MAX_LINE_BYTES` (line number, bytes)."""
        self._fh = fh
        self._on_overlong = on_overlong
        self.torn = b""
        self.torn_length = 0

    def __iter__(self) -> Iterator[bytes]:
        for block in self.blocks():
            yield from block

    def blocks(self) -> Iterator[list[bytes]]:
        """The complete lines, a block (about 1 MiB) at a time; `torn` is set once they are exhausted."""
        carry = b""
        skipping = -1  # >= 0: bytes of an overlong line skipped so far
        line_no = 0
        limit = MAX_LINE_BYTES
        while True:
            block = self._fh.read(_BLOCK)
            if not block:
                break
            parts = block.split(b"\n")
            last = parts.pop()
            if parts:
                if skipping >= 0:
                    self._on_overlong(line_no + 1, skipping + len(parts[0]))
                    parts[0] = b""
                    skipping = -1
                elif carry:
                    parts[0] = carry + parts[0]
                carry = b""
                if max(map(len, parts)) > limit:
                    for k, part in enumerate(parts):
                        if len(part) > limit:
                            self._on_overlong(line_no + k + 1, len(part))
                            parts[k] = b""
                line_no += len(parts)
                yield parts
                carry = last
            elif skipping >= 0:
                skipping += len(last)
            else:
                carry += last
            if skipping < 0 and len(carry) > limit:
                skipping, carry = len(carry), b""
        if skipping >= 0:
            self.torn, self.torn_length = b"", skipping
        else:
            self.torn, self.torn_length = carry, len(carry)


def split_lines(data: bytes) -> tuple[list[bytes], bytes]:
    """Split a log file's bytes into complete lines and a torn tail (for logs already in memory)."""
    lines = data.split(b"\n")
    torn = lines.pop()
    return lines, torn


def read_log(path: str | Path) -> tuple[list[bytes], bytes]:
    """Read a whole log file into lines and a torn tail (tests and small logs; the verifier streams).

    Raises:
        AuditError: the file cannot be read.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise AuditError(f"cannot read audit log {path}: {exc.strerror or exc}") from None
    return split_lines(data)


def first_entry(path: str | Path) -> dict[str, Any] | None:
    """The parsed first line of a log (None when absent or unreadable): what deployment it names."""
    try:
        with open(path, "rb") as fh:
            line = fh.readline(MAX_LINE_BYTES + 1).rstrip(b"\n")
        entry = parse(line)
    except (OSError, JSONDecodeError):
        return None
    return entry if isinstance(entry, dict) else None


def foreign_deployment(path: str | Path, peer: str, deployment_hash: str) -> str | None:
    """The deployment a log provably belongs to when it is not `deployment_hash`, else None.

    "Provably": its first entry is a run_start naming that other deployment, and its genesis is
    that deployment's. Such a log is not tampered with; it is verified against the wrong file.
    """
    e = first_entry(path)
    if e is None or e.get("event") != "run_start" or type(e.get("data")) is not dict:
        return None
    named, nonce = e["data"].get("deployment_hash"), e["data"].get("nonce")
    if isinstance(named, str) and named != deployment_hash and isinstance(nonce, str) \
            and e.get("prev") == genesis_hash(peer, named, nonce):
        return named
    return None
