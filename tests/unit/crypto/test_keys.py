"""Identities and key files: 0600 secret files, refusal of loose modes, signatures, sealed boxes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from secure_split.crypto import (
    generate_identity,
    load_identity,
    load_public,
    open_from,
    seal_to,
    verify_signature,
    write_key_files,
)
from secure_split.crypto.z85 import z85_decode, z85_encode
from secure_split.errors import CryptoError, KeyFileError


def test_secret_key_file_is_0600_and_round_trips(tmp_path: Path) -> None:
    ident = generate_identity("hospital_a")
    secret, public = write_key_files(ident, tmp_path)
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    again = load_identity(secret)
    assert again.public == ident.public
    assert load_public(public) == ident.public


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_loose_secret_file_is_refused_with_fix(tmp_path: Path, mode: int) -> None:
    secret, _ = write_key_files(generate_identity("bank"), tmp_path)
    os.chmod(secret, mode)
    with pytest.raises(KeyFileError) as info:
        load_identity(secret)
    assert f"chmod 600 {secret}" in str(info.value)


def test_secret_never_in_repr(tmp_path: Path) -> None:
    ident = generate_identity("lab")
    assert ident.transport_secret_z85 not in repr(ident)
    secret, _ = write_key_files(ident, tmp_path)
    assert "sign_seed" not in repr(load_identity(secret))


def test_existing_secret_is_never_overwritten(tmp_path: Path) -> None:
    ident = generate_identity("lab")
    write_key_files(ident, tmp_path)
    with pytest.raises(KeyFileError):
        write_key_files(generate_identity("lab"), tmp_path)


def test_secret_file_whose_public_half_was_swapped_is_refused(tmp_path: Path) -> None:
    import json

    secret, _ = write_key_files(generate_identity("lab"), tmp_path)
    obj = json.loads(secret.read_text())
    obj["sign_key"] = generate_identity("lab").sign_key_hex
    secret.write_text(json.dumps(obj))
    os.chmod(secret, 0o600)
    with pytest.raises(KeyFileError, match="do not match"):
        load_identity(secret)


def test_signature_verifies_and_forgery_fails() -> None:
    a, b = generate_identity("a"), generate_identity("b")
    sig = a.sign(b"head")
    verify_signature(a.sign_key_hex, b"head", sig)
    with pytest.raises(CryptoError):
        verify_signature(b.sign_key_hex, b"head", sig)
    with pytest.raises(CryptoError):
        verify_signature(a.sign_key_hex, b"head2", sig)


def test_sealed_box_opens_only_for_recipient_from_sender() -> None:
    a, b, c = generate_identity("a"), generate_identity("b"), generate_identity("c")
    box = seal_to(b.transport_public_z85, a, b"weights")
    assert open_from(b, a.transport_public_z85, box) == b"weights"
    with pytest.raises(CryptoError):
        open_from(c, a.transport_public_z85, box)
    with pytest.raises(CryptoError):
        open_from(b, c.transport_public_z85, box)
    tampered = bytearray(box)
    tampered[-1] ^= 1
    with pytest.raises(CryptoError):
        open_from(b, a.transport_public_z85, bytes(tampered))


def test_z85_matches_zeromq_vectors() -> None:
    # Test vector from ZeroMQ RFC 32.
    data = bytes([0x86, 0x4F, 0xD2, 0x6F, 0xB5, 0x59, 0xF7, 0x5B])
    assert z85_encode(data) == "HelloWorld"
    assert z85_decode("HelloWorld") == data
