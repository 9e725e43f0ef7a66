"""Policy signatures: each party signs the policy's canonical hash; a run needs every signature.

A signature file sits next to the policy, in `signatures/`, one per party:
`POLICY_DIR/signatures/<policy file stem>.<peer>.sig`. It is JSON:

    {"format": "secure-split-policy-signature-v1", "peer": "bank", "policy": "bank-hospital",
     "policy_version": 1, "policy_hash": "<hex sha256>", "sign_key": "<hex Ed25519 public key>",
     "signature": "<hex Ed25519 signature>"}

The signed bytes are `b"secure-split-policy-signature-v1\\n" + policy_hash` (ASCII hex), so a
signature cannot be replayed as any other kind of signed statement. The deployment's peers'
`sign_key`s are the trust anchors: the key inside the file is only a hint and must equal them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from secure_split.config import Deployment
from secure_split.crypto.keys import Identity, verify_signature
from secure_split.errors import CryptoError, PolicyError
from secure_split.policy.model import Policy
from secure_split.policy.schema import load_policy

SIGNATURE_FORMAT = "secure-split-policy-signature-v1"
_MAX_SIGNATURE_BYTES = 64 * 1024


@dataclass(frozen=True)
class SignatureProblem:
    """Why one party's signature does not count.

    Attributes:
        party: the party (peer) name.
        problem: "missing", "invalid" (malformed, wrong key, does not verify), "stale" (a valid
            signature over a different policy hash: the file changed after signing), or
            "unknown_peer" (no deployment peer to verify against).
        message: what is wrong and what to do.
    """

    party: str
    problem: Literal["missing", "invalid", "stale", "unknown_peer"]
    message: str


def signing_message(policy_hash: str) -> bytes:
    """The exact bytes a party signs for a policy hash."""
    return f"{SIGNATURE_FORMAT}\n{policy_hash}".encode("ascii")


def signature_path(policy: Policy, peer: str) -> Path:
    """Where `peer`'s signature of `policy` lives: POLICY_DIR/signatures/STEM.PEER.sig."""
    return policy.path.parent / "signatures" / f"{policy.path.stem}.{peer}.sig"


def signature_paths(policy: Policy) -> dict[str, Path]:
    """Party name -> the path of its signature file, for every party of the policy."""
    return {name: signature_path(policy, name) for name in sorted(policy.parties)}


def sign_policy(policy_path: str | Path | Policy, identity: Identity) -> Path:
    """Sign a policy with a party's identity and write the signature file (replacing an old one).

    Args:
        policy_path: the policy file (or an already loaded Policy).
        identity: the signing party; its name must be a party whose fingerprint matches its keys.

    Returns:
        The path of the signature file written.

    Raises:
        ConfigError: the policy cannot be read or is invalid.
        PolicyError: the identity is not a party of the policy, or its keys are not the party's.
    """
    policy = policy_path if isinstance(policy_path, Policy) else load_policy(policy_path)
    party = policy.parties.get(identity.name)
    if party is None:
        raise PolicyError(
            f"'{identity.name}' is not a party of policy '{policy.name}' (parties: "
            f"{sorted(policy.parties)}); "
            "only parties sign it"
        )
    fingerprint = identity.public.fingerprint
    if party.fingerprint != fingerprint:
        raise PolicyError(
            f"the key of '{identity.name}' has fingerprint {fingerprint}, but policy '{policy.name}' lists "
            f"{party.fingerprint} for it; sign with the key the policy names, or fix the policy"
        )
    record = {
        "format": SIGNATURE_FORMAT,
        "peer": identity.name,
        "policy": policy.name,
        "policy_version": policy.version,
        "policy_hash": policy.hash,
        "sign_key": identity.sign_key_hex,
        "signature": identity.sign(signing_message(policy.hash)).hex(),
    }
    path = signature_path(policy, identity.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _read_signature(path: Path) -> dict[str, object] | None:
    try:
        if path.stat().st_size > _MAX_SIGNATURE_BYTES:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("format") == SIGNATURE_FORMAT else None


def signature_problems(policy: Policy, deployment: Deployment) -> list[SignatureProblem]:
    """Check every party's signature against the deployment's keys; report each one that fails.

    Returns:
        One SignatureProblem per party whose signature is missing, invalid or stale (a party can
        have at most one); empty if every party has signed exactly this policy.
    """
    out: list[SignatureProblem] = []
    peers = deployment.spec.peers
    for name, path in signature_paths(policy).items():
        if name not in peers:
            out.append(
                SignatureProblem(
                    name,
                    "unknown_peer",
                    f"party '{name}' is not a peer of the deployment; its key is unknown",
                )
            )
            continue
        if not path.is_file():
            out.append(
                SignatureProblem(
                    name,
                    "missing",
                    f"party '{name}' has not signed the policy (no {path}); "
                    f"run: secure-split policy sign {policy.path} --key {name}.key",
                )
            )
            continue
        data = _read_signature(path)
        if data is None or data.get("peer") != name:
            out.append(SignatureProblem(name, "invalid", f"{path} is not a policy signature by '{name}'"))
            continue
        anchor = peers[name].sign_key
        retired = next(
            (r for r in deployment.spec.retired_keys if r.sign_key == data.get("sign_key")), None
        )
        if retired is not None:
            out.append(
                SignatureProblem(
                    name,
                    "invalid",
                    f"{path} was made with {retired.peer}'s retired key (retired at {retired.retired_at}); "
                    f"a retired key signs nothing: '{name}' signs again with its current key "
                    f"(secure-split policy sign {policy.path} --key {name}.key)",
                )
            )
            continue
        if data.get("sign_key") != anchor:
            out.append(
                SignatureProblem(
                    name,
                    "invalid",
                    f"{path} was made with key {data.get('sign_key')!s:.16}..., not with the sign_key of "
                    f"'{name}' in the deployment ({anchor[:16]}...)",
                )
            )
            continue
        signed_hash = data.get("policy_hash")
        signature = data.get("signature")
        try:
            if (
                not isinstance(signed_hash, str)
                or not isinstance(signature, str)
                or not signed_hash.isascii()
            ):
                raise CryptoError("malformed")
            verify_signature(anchor, signing_message(signed_hash), bytes.fromhex(signature))
        except (CryptoError, ValueError):
            out.append(
                SignatureProblem(
                    name,
                    "invalid",
                    f"the signature in {path} does not verify with '{name}''s key (forged or corrupted)",
                )
            )
            continue
        if signed_hash != policy.hash:
            out.append(
                SignatureProblem(
                    name,
                    "stale",
                    f"'{name}' signed a policy with hash {signed_hash[:16]}..., but {policy.path.name} "
                    f"now hashes to {policy.hash[:16]}...: the policy changed after '{name}' signed it "
                    "(tampered, or a new version that needs signing again)",
                )
            )
    return out


def verify_signatures(policy: Policy, deployment: Deployment) -> None:
    """Require a valid signature of exactly this policy from every party.

    Raises:
        PolicyError: naming every party whose signature is missing, invalid or over another hash.
    """
    problems = signature_problems(policy, deployment)
    if problems:
        lines = "\n".join(f"  - {p.message}" for p in problems)
        raise PolicyError(
            f"policy '{policy.name}' (hash {policy.hash[:16]}...) lacks {len(problems)} valid "
            f"signature{'s' if len(problems) != 1 else ''}:\n{lines}"
        )
