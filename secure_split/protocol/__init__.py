"""The protocol layer: message kinds, the wire codec and the per-peer session state machine.

Sans-IO, like h11: bytes in, checked values out, no sockets, no clocks, no torch, no crypto.
Only the standard library, `msgpack` (for the small header), `secure_split.errors` and
`secure_split.canonical` may be imported here.

Raw features and labels have no message kind, by design: they cannot be encoded, so they
cannot be sent.

Modules:
- `messages`: `Kind`, `CONTROL_KINDS`, `Binding`, `WireTensor`, `Message`, `KIND_RULES`.
- `codec`: `encode`, `decode_header`, `decode_body`, `decode`, `Header`, `TensorSpec`.
- `session`: `PeerSession`, `SessionState`.
- `bounds`: `StepWindow`, `ViolationBudget`, `RefusalThrottle`: what one counterparty may make a
  peer hold or do (the `limits.*` settings).

Typical use by the gate::

    session = PeerSession("hospital_a", "bank", deployment.hash, policy.hash)
    transport.send("bank", encode(session.hello()))
    ...
    header = decode_header(frames[0], max_message_bytes=limit)   # CodecError on bad bytes
    session.receive(header)                                       # binding, seq, handshake
    ...                                                           # policy decides on the header
    message = decode_body(header, frames)                         # zero-copy tensors
    transport.send("bank", encode(session.bind(Kind.ACTIVATION, step=7, edge="bottom->top",
                                               tensors=(wire_tensor,))))
"""

from secure_split.protocol.bounds import RefusalThrottle, StepWindow, ViolationBudget
from secure_split.protocol.codec import (
    KIND_CODES,
    MAGIC,
    MAX_HEADER_BYTES,
    Header,
    TensorSpec,
    decode,
    decode_body,
    decode_header,
    encode,
)
from secure_split.protocol.messages import (
    CONTROL_KINDS,
    DTYPE_SIZES,
    KIND_RULES,
    Binding,
    Kind,
    KindRule,
    Message,
    MetaField,
    MetaValue,
    Presence,
    WireTensor,
)
from secure_split.protocol.session import (
    ZERO_SESSION,
    PeerSession,
    SessionState,
    session_id_from_nonces,
)

__all__ = [
    "CONTROL_KINDS",
    "DTYPE_SIZES",
    "KIND_CODES",
    "KIND_RULES",
    "MAGIC",
    "MAX_HEADER_BYTES",
    "ZERO_SESSION",
    "Binding",
    "Header",
    "Kind",
    "KindRule",
    "Message",
    "MetaField",
    "MetaValue",
    "PeerSession",
    "Presence",
    "RefusalThrottle",
    "SessionState",
    "StepWindow",
    "TensorSpec",
    "ViolationBudget",
    "WireTensor",
    "decode",
    "decode_body",
    "decode_header",
    "encode",
    "session_id_from_nonces",
]
