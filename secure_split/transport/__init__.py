"""transport: the only importer of zmq. Moves frames between named peers; knows nothing of tensors.

One ROUTER per peer (CURVE server; a ZAP allowlist admits exactly the deployment's transport keys and
names each message's sender) and one DEALER per remote peer (CURVE client). See `Transport`.
"""

from secure_split.transport.events import EventKind, TransportEvent, TransportPeer
from secure_split.transport.transport import HEADER_ALLOWANCE_BYTES, Transport

__all__ = ["HEADER_ALLOWANCE_BYTES", "EventKind", "Transport", "TransportEvent", "TransportPeer"]
