"""End-to-end authenticated encryption between two peers, through any relay.

Used where bytes must cross a third party that may not read them (weights handed from owner to
owner via the label holder, the CKKS secret context shared among feature owners). NaCl Box:
X25519 + XSalsa20-Poly1305, keyed by the sender's transport secret and the recipient's public
transport key, so the recipient also learns who sealed it.
"""

from __future__ import annotations

import nacl.exceptions
import nacl.public

from secure_split.crypto.keys import Identity
from secure_split.crypto.z85 import z85_decode
from secure_split.errors import CryptoError


def _public(z85: str) -> nacl.public.PublicKey:
    try:
        return nacl.public.PublicKey(z85_decode(z85))
    except (ValueError, nacl.exceptions.CryptoError):
        raise CryptoError("malformed transport public key") from None


def seal_to(recipient_transport_key_z85: str, sender: Identity, plaintext: bytes) -> bytes:
    """Encrypt `plaintext` so that only the recipient can open it and knows `sender` sealed it."""
    box = nacl.public.Box(sender.transport_private_key, _public(recipient_transport_key_z85))
    return bytes(box.encrypt(plaintext))


def open_from(identity: Identity, sender_transport_key_z85: str, ciphertext: bytes) -> bytes:
    """Decrypt and authenticate a sealed message from the given sender.

    Raises:
        CryptoError: tampered, truncated, or not from that sender.
    """
    box = nacl.public.Box(identity.transport_private_key, _public(sender_transport_key_z85))
    try:
        return bytes(box.decrypt(ciphertext))
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        raise CryptoError("sealed message does not open: tampered, truncated or from another sender") from None
