"""Fixtures of the multi-process integration tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import Deploy, clone_deployment, generate_template

TOPOLOGIES: dict[str, dict[str, object]] = {
    "vanilla": {},
    "u-shaped": {},
    "multi-hop": {"hops": 2},
    "multi-task": {},
    "vertical": {},
    "vertical-he": {},
    "sequential": {"owners": 2},
    "splitfed": {"owners": 2, "labels": "owners"},
}


@pytest.fixture(scope="session")
def vanilla_template(tmp_path_factory: pytest.TempPathFactory) -> Deploy:
    """One generated vanilla deployment (keys, data, signed policy); tests clone it."""
    return generate_template(Path(tmp_path_factory.mktemp("vanilla-template")), "vanilla")


@pytest.fixture(scope="session")
def trained_topologies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Deploy]:
    """Every topology trained for 12 steps of one epoch (checkpoint of epoch 0), every peer a
    thread of this process; tests copy the one they need (split inference starts from these)."""
    from secure_split.testing import run_peers_in_threads

    root = Path(tmp_path_factory.mktemp("trained"))
    out = {}
    for scenario, options in TOPOLOGIES.items():
        template = generate_template(root / f"{scenario}-template", scenario, **options)
        d = clone_deployment(template, root / scenario, max_steps=12)
        results: dict[str, Any] = run_peers_in_threads(d.peer_configs, timeout_s=300)
        assert {n: r.status for n, r in results.items()} == dict.fromkeys(results, "ok"), \
            {n: r.error for n, r in results.items()}
        out[scenario] = d
    return out
