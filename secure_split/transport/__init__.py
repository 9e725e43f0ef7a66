"""transport: the only importer of zmq. Moves frames between named peers; knows nothing of tensors.

One ROUTER per peer (CURVE server; a ZAP allowlist admits exactly the deployment's transport keys and
names each message's sender) and one DEALER per remote peer (CURVE client). See `Transport`.
A `ConnectionGuard` thread bounds what connections can hold (`guard.py`); `ensure_open_file_limit`
checks at start that the process may open what those bounds need (`resources.py`).
"""

from secure_split.transport.events import EventKind, TransportEvent, TransportPeer
from secure_split.transport.guard import GuardStats
from secure_split.transport.resources import ensure_open_file_limit, open_files_needed
from secure_split.transport.transport import HEADER_ALLOWANCE_BYTES, Transport

__all__ = [
    "HEADER_ALLOWANCE_BYTES",
    "EventKind",
    "GuardStats",
    "Transport",
    "TransportEvent",
    "TransportPeer",
    "ensure_open_file_limit",
    "open_files_needed",
]
