"""Turn libzmq socket-monitor events into operator sentences.

Outbound sockets (one DEALER per remote peer) know whom they talk to, so their events carry the
peer's name. The inbound ROUTER only learns a client's name from the ZAP User-Id of its messages;
its connection events therefore carry no name.
"""

from __future__ import annotations

import errno
import os

import zmq

HANDSHAKE_FAILURES = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)

_PROTOCOL_ERRORS: dict[int, str] = {
    zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: "a CURVE box did not open (the client used a wrong server key)",
    zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: "the other side does not use CURVE",
    zmq.PROTOCOL_ERROR_ZMTP_KEY_EXCHANGE: "the CURVE key exchange failed",
}


def _errno_text(value: int) -> str:
    if value == 0:
        return "closed by the remote"
    name = errno.errorcode.get(value, str(value))
    return f"{name}: {os.strerror(value)}"


_PROTOCOL_ERROR_NAMES: dict[int, str] = {
    getattr(zmq, name): name for name in dir(zmq) if name.startswith("PROTOCOL_ERROR_")
}


def _protocol_text(value: int) -> str:
    known = _PROTOCOL_ERRORS.get(value)
    if known:
        return known
    return f"ZMTP protocol error {_PROTOCOL_ERROR_NAMES.get(value, hex(value))}"


def outbound_failure(peer: str, event: int, value: int) -> str:
    """Explain a failed handshake of our DEALER with `peer`'s ROUTER.

    Args:
        peer: the remote peer's name.
        event: one of the EVENT_HANDSHAKE_FAILED_* codes.
        value: the monitor value (errno, ZMTP protocol error code, or ZAP status code).

    Returns:
        A sentence naming the likely cause and what to check.
    """
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return (
            f"'{peer}' refused this peer's transport key (ZAP status {value}): "
            f"'{peer}' does not list this peer's key in its deployment"
        )
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return f"handshake with '{peer}' failed: {_protocol_text(value)}"
    return (
        f"handshake with '{peer}' did not complete ({_errno_text(value)}): check that the deployment's "
        f"transport_key for '{peer}' matches its key file, and that '{peer}' runs the same deployment"
    )


def inbound_failure(event: int, value: int) -> str:
    """Explain a failed handshake of some client with our ROUTER (see `outbound_failure`)."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return f"an inbound client was refused by the allowlist (ZAP status {value})"
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return f"an inbound handshake failed: {_protocol_text(value)}"
    return f"an inbound handshake did not complete ({_errno_text(value)})"
