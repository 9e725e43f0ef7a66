"""Small hand-written deployments with real identities, for the operator tools' tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from secure_split.crypto.keys import Identity, generate_identity, write_key_files

NAMES = ("hospital_a", "hospital_b", "lab")


def identities(*names: str) -> dict[str, Identity]:
    """Fresh identities for `names` (default: the two hospitals and the lab)."""
    return {n: generate_identity(n) for n in (names or NAMES)}


def entry(ident: Identity, port: int) -> dict[str, Any]:
    """A `peers.NAME` entry for an identity."""
    return {"endpoint": f"tcp://127.0.0.1:{port}", "sign_key": ident.sign_key_hex,
            "transport_key": ident.transport_public_z85}


def vertical(ids: dict[str, Identity], **training: Any) -> dict[str, Any]:
    """Two hospitals' bottoms concatenated at the lab's top."""
    return {
        "version": 1,
        "name": "ops-test",
        "coordinator": "lab",
        "policy": "policy.yaml",
        "peers": {n: entry(ids[n], 7100 + i) for i, n in enumerate(NAMES)},
        "segments": {
            "bottom_a": {"peer": "hospital_a", "input": "features", "model": [{"linear": {"in": 4, "out": 3}}]},
            "bottom_b": {"peer": "hospital_b", "input": "features", "model": [{"linear": {"in": 5, "out": 3}}]},
            "top": {"peer": "lab", "loss": "cross_entropy", "merge": "concat",
                    "model": [{"linear": {"in": 6, "out": 2}}]},
        },
        "edges": [{"from": "bottom_a", "to": "top"}, {"from": "bottom_b", "to": "top"}],
        "training": {"batch_size": 32, **training},
    }


def write_yaml(path: Path, data: dict[str, Any], header: str = "") -> Path:
    """Write `data` as YAML (with an optional comment header); returns the path."""
    path.write_text(header + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def write_keys(ids: dict[str, Identity], directory: Path) -> dict[str, Path]:
    """Key files for every identity; returns name -> secret key path."""
    return {n: write_key_files(i, directory)[0] for n, i in ids.items()}
