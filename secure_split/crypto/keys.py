"""Peer identities and key files.

A peer has one long-term identity: an Ed25519 signing key (audit checkpoints, policy
signatures) and a Curve25519 transport key (ZeroMQ CURVE, end-to-end sealed boxes). The secret
file holds both secrets and must be mode 0600; a peer refuses to start on a looser one. The
public file holds the public halves and a fingerprint and is what goes into deployment.yaml.

Secrets never appear in reprs, exceptions or logs.
"""

from __future__ import annotations

import base64
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import nacl.exceptions
import nacl.public
import nacl.signing

from secure_split.config import NAME_RE, peer_fingerprint
from secure_split.crypto.z85 import z85_decode, z85_encode
from secure_split.errors import ConfigProblem, CryptoError, KeyFileError

KEY_FILE_FORMAT = "secure-split-key-v1"
_MAX_KEY_FILE_BYTES = 16 * 1024


@dataclass(frozen=True)
class PublicIdentity:
    """The public half of a peer's identity, as it appears in deployment.yaml."""

    name: str
    sign_key_hex: str
    transport_key_z85: str

    @property
    def fingerprint(self) -> str:
        return peer_fingerprint(self.sign_key_hex, self.transport_key_z85)

    def verify(self, data: bytes, signature: bytes) -> None:
        """Verify an Ed25519 signature by this peer. Raises CryptoError if it does not verify."""
        verify_signature(self.sign_key_hex, data, signature)


@dataclass(frozen=True)
class Identity:
    """A peer's secret identity. Its repr never shows a secret."""

    name: str
    _signing: nacl.signing.SigningKey = field(repr=False)
    _transport: nacl.public.PrivateKey = field(repr=False)

    @property
    def sign_key_hex(self) -> str:
        return bytes(self._signing.verify_key).hex()

    @property
    def transport_public_z85(self) -> str:
        return z85_encode(bytes(self._transport.public_key))

    @property
    def transport_secret_z85(self) -> str:
        """The Curve25519 secret in Z85, for the transport layer only. Never log it."""
        return z85_encode(bytes(self._transport))

    @property
    def transport_private_key(self) -> nacl.public.PrivateKey:
        return self._transport

    @property
    def public(self) -> PublicIdentity:
        return PublicIdentity(self.name, self.sign_key_hex, self.transport_public_z85)

    def sign(self, data: bytes) -> bytes:
        """Ed25519 signature (64 bytes) over `data`."""
        return bytes(self._signing.sign(data).signature)

    def secret_text_forms(self) -> tuple[str, ...]:
        """Both secret keys in every text form a bug could write (hex either case, Z85, base64 and
        URL-safe base64 with and without padding), for writers that must refuse them. Never log it."""
        forms: set[str] = set()
        for raw in (bytes(self._signing), bytes(self._transport)):
            forms.update((raw.hex(), raw.hex().upper(), z85_encode(raw)))
            for b64 in (base64.b64encode(raw), base64.urlsafe_b64encode(raw)):
                text = b64.decode("ascii")
                forms.update((text, text.rstrip("=")))
        return tuple(sorted(forms))


def generate_identity(name: str) -> Identity:
    """Create a fresh identity with new random keys.

    Raises:
        ValueError: `name` is not a valid peer name.
    """
    if not NAME_RE.match(name):
        raise ValueError(f"peer name {name!r}: use lowercase letters, digits and _ (start with a letter)")
    return Identity(name, nacl.signing.SigningKey.generate(), nacl.public.PrivateKey.generate())


def identity_from_seed(name: str, seed: bytes) -> Identity:
    """A deterministic identity from a 32-byte seed: for tests and fixtures only, never for peers.

    Raises:
        ValueError: invalid name or a seed that is not 32 bytes.
    """
    if not NAME_RE.match(name):
        raise ValueError(f"peer name {name!r}: use lowercase letters, digits and _ (start with a letter)")
    if len(seed) != 32:
        raise ValueError("the seed must be 32 bytes")
    import hashlib

    transport_seed = hashlib.sha256(b"secure-split-transport:" + seed).digest()
    return Identity(name, nacl.signing.SigningKey(seed), nacl.public.PrivateKey(transport_seed))


def write_key_files(identity: Identity, directory: str | Path) -> tuple[Path, Path]:
    """Write NAME.key (secret, mode 0600, created without ever being readable by others) and NAME.pub.

    Returns:
        (secret_path, public_path).

    Raises:
        KeyFileError: the secret file exists already (never overwritten).
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    secret_path = d / f"{identity.name}.key"
    public_path = d / f"{identity.name}.pub"
    if secret_path.exists():
        raise KeyFileError(ConfigProblem(str(secret_path), "-", "exists already; refusing to overwrite a secret key"))
    secret = {
        "format": KEY_FILE_FORMAT,
        "peer": identity.name,
        "sign_seed": bytes(identity._signing).hex(),
        "transport_secret": identity.transport_secret_z85,
        "sign_key": identity.sign_key_hex,
        "transport_key": identity.transport_public_z85,
    }
    fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(secret, fh, indent=1, sort_keys=True)
        fh.write("\n")
    os.chmod(secret_path, 0o600)
    pub = identity.public
    public = {
        "format": KEY_FILE_FORMAT,
        "peer": pub.name,
        "sign_key": pub.sign_key_hex,
        "transport_key": pub.transport_key_z85,
        "fingerprint": pub.fingerprint,
    }
    public_path.write_text(json.dumps(public, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return secret_path, public_path


def _read_json(path: Path, what: str) -> dict[str, object]:
    if not path.is_file():
        raise KeyFileError(ConfigProblem(str(path), "-", f"{what} not found; create it with `secure-split keys new`"))
    if path.stat().st_size > _MAX_KEY_FILE_BYTES:
        raise KeyFileError(ConfigProblem(str(path), "-", f"{what} is too large to be a key file"))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise KeyFileError(ConfigProblem(str(path), "-", f"{what} is not a secure-split key file (JSON)")) from None
    if not isinstance(data, dict) or data.get("format") != KEY_FILE_FORMAT:
        raise KeyFileError(ConfigProblem(str(path), "format", f"expected format: {KEY_FILE_FORMAT}"))
    return data


def check_secret_file_mode(path: str | Path) -> None:
    """Refuse a secret key file that group or others can read or write.

    Raises:
        KeyFileError: naming the file, its mode and the command that fixes it.
    """
    p = Path(path)
    mode = stat.S_IMODE(p.stat().st_mode)
    if mode & 0o077:
        raise KeyFileError(
            ConfigProblem(
                str(p),
                "mode",
                f"secret key file has mode {mode:04o}; it must be readable by its owner only. "
                f"Fix it with: chmod 600 {p}",
            )
        )


def load_identity(path: str | Path) -> Identity:
    """Load a secret key file after checking its permissions and internal consistency.

    Raises:
        KeyFileError: missing, loose permissions, malformed, or public halves that do not match.
    """
    p = Path(path)
    if p.is_file():
        check_secret_file_mode(p)
    data = _read_json(p, "secret key file")
    try:
        name = str(data["peer"])
        signing = nacl.signing.SigningKey(bytes.fromhex(str(data["sign_seed"])))
        transport = nacl.public.PrivateKey(z85_decode(str(data["transport_secret"])))
    except (KeyError, ValueError, TypeError, nacl.exceptions.CryptoError):
        raise KeyFileError(ConfigProblem(str(p), "-", "malformed secret key file")) from None
    ident = Identity(name, signing, transport)
    if data.get("sign_key") != ident.sign_key_hex or data.get("transport_key") != ident.transport_public_z85:
        raise KeyFileError(ConfigProblem(str(p), "-", "public keys in the file do not match its secret keys"))
    return ident


def load_public(path: str | Path) -> PublicIdentity:
    """Load a public key file (NAME.pub).

    Raises:
        KeyFileError: missing or malformed.
    """
    p = Path(path)
    data = _read_json(p, "public key file")
    try:
        pub = PublicIdentity(str(data["peer"]), str(data["sign_key"]), str(data["transport_key"]))
        nacl.signing.VerifyKey(bytes.fromhex(pub.sign_key_hex))
        if len(z85_decode(pub.transport_key_z85)) != 32:
            raise ValueError
    except (KeyError, ValueError, TypeError, nacl.exceptions.CryptoError):
        raise KeyFileError(ConfigProblem(str(p), "-", "malformed public key file")) from None
    return pub


def verify_signature(sign_key_hex: str, data: bytes, signature: bytes) -> None:
    """Verify an Ed25519 signature.

    Raises:
        CryptoError: the key is malformed or the signature does not verify.
    """
    try:
        nacl.signing.VerifyKey(bytes.fromhex(sign_key_hex)).verify(data, signature)
    except (ValueError, TypeError, nacl.exceptions.CryptoError, nacl.exceptions.BadSignatureError):
        raise CryptoError("signature does not verify with the expected public key") from None
