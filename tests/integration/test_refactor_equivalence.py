"""The peer layer's rewrite (one node, schedule objects, sans-IO rounds) trains bit-identical
weights: the SHA-256 of every peer's final checkpoint (segments and optimizer state) equals the
one recorded with the runtime it replaced, for the deterministic schedules, at a fixed seed.

Recorded on 2026-12-07 from main d12ab1e (the last commit of the inheritance-based runtime),
torch 2.13.0 CPU, with the demo deployments at 2 epochs of 6 training steps. Splitfed is not
here: its coordinator serves the owners' steps in arrival order, so two runs of the old runtime
gave different weights (measured); its behaviour is pinned by tests/integration/test_horizontal.py.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from safetensors.numpy import load_file

from secure_split.testing import demo_plan, run_peers_in_threads

RECORDED: dict[str, tuple[dict[str, Any], dict[str, str]]] = {
    "vanilla": ({}, {"label_holder": "21fbde1b98d49ce3", "owner": "525fc61e35e6af49"}),
    "u-shaped": ({}, {"owner": "e805237d8d58ad91", "server": "e512281b3954703b"}),
    "multi-hop": ({}, {"hop1": "b44c18d36cbf3604", "hop2": "1f987125e979ebf0", "label_holder": "fa5c4477b4caab06",
                       "owner": "2d1ca4d68bd7e757"}),
    "multi-task": ({}, {"digit_lab": "227a85bc0aea7ba4", "ge5_lab": "2d1c85edb50ddee9", "owner": "fc9ca1cd879f23bc"}),
    "sequential": ({"owners": 3}, {"label_holder": "065e203c80ed9597", "owner_1": "35b391e79ecfc81e",
                                   "owner_2": "0b79c399b0a3f017", "owner_3": "186db3b6f129b3f2"}),
}


def _state_digest(checkpoints: Path) -> str:
    files = sorted(checkpoints.glob("epoch-*.safetensors"))
    assert files, f"no checkpoint in {checkpoints}"
    arrays = load_file(str(files[-1]))
    h = hashlib.sha256()
    for name in sorted(arrays):
        h.update(name.encode())
        h.update(arrays[name].tobytes())
    return h.hexdigest()[:16]


@pytest.mark.integration
@pytest.mark.parametrize("scenario", sorted(RECORDED))
def test_trained_weights_are_bit_identical_to_the_replaced_runtime(scenario: str, tmp_path: Path) -> None:
    from secure_split.scenarios import generate

    options, recorded = RECORDED[scenario]
    plan = demo_plan(scenario, epochs=2, **options)
    plan.training["max_steps_per_epoch"] = 6
    gen = generate(plan, tmp_path)
    results = run_peers_in_threads(gen.peer_configs, timeout_s=300)
    assert {n: r.status for n, r in results.items()} == dict.fromkeys(recorded, "ok")
    assert {n: _state_digest(tmp_path / "checkpoints" / n) for n in recorded} == recorded
