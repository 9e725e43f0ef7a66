"""crypto: the only importer of pynacl, cryptography, tenseal and rbcl.

Returns only verified data: a signature that does not verify, a box that does not open, a
ciphertext that does not parse raise CryptoError.
"""

from secure_split.crypto.keys import (
    Identity,
    PublicIdentity,
    check_secret_file_mode,
    generate_identity,
    load_identity,
    load_public,
    verify_signature,
    write_key_files,
)
from secure_split.crypto.seal import open_from, seal_to

__all__ = [
    "Identity",
    "PublicIdentity",
    "check_secret_file_mode",
    "generate_identity",
    "load_identity",
    "load_public",
    "open_from",
    "seal_to",
    "verify_signature",
    "write_key_files",
]
