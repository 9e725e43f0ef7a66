"""Claims of SECURITY.md (Keys) that no other test pins.

- "The secret file holds the Ed25519 seed and the Curve25519 secret; the public file holds the
  public halves and a fingerprint."
- "Secrets never appear in reprs, exceptions or logs" (the exception half).
"""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path

import pytest

from secure_split.crypto.keys import generate_identity, load_identity, write_key_files
from secure_split.errors import KeyFileError


def test_public_file_holds_the_public_halves_and_the_fingerprint_only(tmp_path: Path) -> None:
    ident = generate_identity("lab")
    secret_path, public_path = write_key_files(ident, tmp_path)
    secret, public = json.loads(secret_path.read_text()), json.loads(public_path.read_text())
    assert {"sign_seed", "transport_secret"} <= set(secret)
    assert set(public) == {"format", "peer", "sign_key", "transport_key", "fingerprint"}
    assert public["fingerprint"] == ident.public.fingerprint
    text = public_path.read_text()
    assert secret["sign_seed"] not in text and secret["transport_secret"] not in text


@pytest.mark.parametrize("damage", ["bad_seed", "bad_transport", "swapped_public"])
def test_errors_on_a_damaged_secret_file_never_quote_the_secrets(tmp_path: Path, damage: str) -> None:
    secret_path, _ = write_key_files(generate_identity("lab"), tmp_path)
    data = json.loads(secret_path.read_text())
    secrets = [data["sign_seed"], data["transport_secret"]]
    if damage == "bad_seed":
        data["sign_seed"] = data["sign_seed"][:-2] + "zz"
        secrets.append(data["sign_seed"])
    elif damage == "bad_transport":
        data["transport_secret"] = data["transport_secret"][:-1] + "~~"
        secrets.append(data["transport_secret"])
    else:
        data["sign_key"] = generate_identity("other").sign_key_hex
    secret_path.write_text(json.dumps(data))
    os.chmod(secret_path, 0o600)
    with pytest.raises(KeyFileError) as info:
        load_identity(secret_path)
    shown = "".join(traceback.format_exception(info.value)) + repr(info.value)
    for s in secrets:
        assert s not in shown
