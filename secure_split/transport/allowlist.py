"""The ZAP handler: admits exactly the transport keys of the deployment's peers.

libzmq asks the ZAP handler of the socket's context (``inproc://zeromq.zap.01``) about every CURVE
client during the handshake. We answer from a fixed key -> name table, and hand the peer *name* back
as the ZAP User-Id, so every message the ROUTER delivers carries its authenticated sender's name as
a frame property that nothing on the wire can forge.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

# pyzmq logs a debug line per handshake. The outcomes that matter are recorded as TransportEvents,
# so keep that chatter out even of a DEBUG-level application log (an application may lower this
# logger's level on purpose). Its rare warnings/errors still reach the application's handlers;
# the NullHandler keeps them off the console when the application configured no logging at all.
_zap_log = logging.getLogger("secure_split.transport.zap")
_zap_log.addHandler(logging.NullHandler())
_zap_log.setLevel(logging.WARNING)


def key_prefix(key_z85: str | bytes) -> str:
    """Short, public form of a transport key for messages (public keys are not secret)."""
    text = key_z85.decode("ascii", "replace") if isinstance(key_z85, bytes) else key_z85
    return f"{text[:8]}…"


class PeerAllowlist(ThreadAuthenticator):
    """A `ThreadAuthenticator` that allows exactly the given keys, on one ZAP domain.

    Args:
        context: the transport's own zmq context (one ZAP handler per context).
        names_by_key: Z85 public key (as bytes) -> peer name.
        domain: the ZAP domain the ROUTER sets; requests for any other domain are refused.
        on_refused: called (from the ZAP thread) with the refused key's Z85 text.
    """

    def __init__(
        self,
        context: zmq.Context[zmq.Socket[bytes]],
        names_by_key: Mapping[bytes, str],
        domain: str,
        on_refused: Callable[[str], None],
    ) -> None:
        super().__init__(context=context, log=_zap_log)
        self._names_by_key = dict(names_by_key)
        self._domain = domain
        self._on_refused = on_refused
        self.configure_curve_callback(domain=domain, credentials_provider=self)

    def callback(self, domain: str, client_key: bytes) -> bool:
        """pyzmq's credentials-provider hook: True admits the client.

        Args:
            domain: the ZAP domain of the server socket.
            client_key: the client's public key, Z85-encoded bytes.

        Returns:
            True exactly when the key belongs to a known peer and the domain is ours.
        """
        allowed = domain == self._domain and client_key in self._names_by_key
        if not allowed:
            self._on_refused(client_key.decode("ascii", "replace"))
        return allowed

    def curve_user_id(self, client_public_key: bytes) -> str:
        """The ZAP User-Id of an admitted client: its peer name (only called after `callback`)."""
        return self._names_by_key[z85.encode(client_public_key)]
