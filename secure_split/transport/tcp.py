"""A look at one TCP connection that libzmq owns, through a dup of its descriptor.

libzmq reports each connection's descriptor through its socket monitor. A dup of it lets the
connection guard read the kernel's counters for the connection and shut it down; closing the dup
leaves libzmq's descriptor alone (libzmq then sees the shutdown, closes its own descriptor and
reports DISCONNECTED). Callers check `pair()` against the address pair they recorded before they
act: a descriptor libzmq closed may already name another connection.
"""

from __future__ import annotations

import os
import socket
import struct

__all__ = ["AUTHENTICATED_MIN_SENT", "FRAME_OVERHEAD", "ConnectionHandle", "host_of"]

# struct tcp_info (linux/tcp.h): tcpi_bytes_acked at 120, tcpi_bytes_received at 128 (Linux >= 4.1).
TCP_INFO_LEN = 136
BYTES_ACKED_AT = 120
# Bytes this side sends before a client is authenticated, at most: ZMTP greeting (64) + CURVE
# WELCOME (170) + an ERROR command (< 40). READY (about 67 bytes more) only follows a ZAP "yes".
AUTHENTICATED_MIN_SENT = 280
# Wire bytes per delivered frame beyond its payload, an upper bound: ZMTP frame header (<= 9) +
# CURVE MESSAGE command header (<= 9) + name (8) + nonce (8) + MAC (16) + flags (1).
FRAME_OVERHEAD = 64


class ConnectionHandle:
    """A dup of a libzmq descriptor (see the module docstring); `close()` it after use."""

    def __init__(self, fd: int) -> None:
        self.sock: socket.socket | None = None
        try:
            self.sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            self.sock = None

    def pair(self) -> tuple[object, object] | None:
        """(local address, remote address) of the connection, or None when it is gone."""
        if self.sock is None:
            return None
        try:
            return (self.sock.getsockname(), self.sock.getpeername())
        except OSError:
            return None

    def counters(self) -> tuple[int, int, int]:
        """(bytes we sent and the peer acknowledged, bytes received, receive buffer size)."""
        assert self.sock is not None
        raw = self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LEN)
        if len(raw) < TCP_INFO_LEN:  # a kernel older than 4.1: no byte counters
            return (AUTHENTICATED_MIN_SENT, 0, 0)
        acked, received = struct.unpack_from("<QQ", raw, BYTES_ACKED_AT)
        return acked, received, self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)

    def cut(self) -> None:
        """Shut the connection down, both ways (libzmq notices and closes its descriptor)."""
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        """Close the dup only."""
        if self.sock is not None:
            self.sock.close()  # closes the dup only; libzmq's descriptor stays its own
            self.sock = None


def host_of(address: object) -> str:
    """The host part of a socket address tuple (the source a per-source cap counts by)."""
    if isinstance(address, tuple) and address:
        return str(address[0])
    return str(address)
