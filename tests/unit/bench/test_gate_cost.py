"""bench/gate_cost.py measures the real gate: real policy (its egress guards live), real sessions,
real audit logs in which sender and receiver record each message with the same digest."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[3] / "bench"


def load_gate_cost() -> ModuleType:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))  # its helper _host
    spec = importlib.util.spec_from_file_location("secure_split_bench_gate_cost", BENCH / "gate_cost.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_bench_times_the_real_gate_with_live_guards_and_audit(tmp_path: Path) -> None:
    from secure_split.engine.tensors import to_wire
    from secure_split.errors import PolicyDenied
    from secure_split.protocol import Kind

    bench = load_gate_cost()
    gates = bench.build(tmp_path)
    act, grad, raw = bench.tensors()
    out = bench.rounds(gates, 4, act, grad, raw, 1)
    assert len(out["owner send"]) == len(out["owner send, no guards"]) == 2
    assert all(len(v) == 4 for k, v in out.items() if not k.startswith("owner send"))
    digests = {}
    for peer, event in (("owner", "message_sent"), ("label_holder", "message_received")):
        lines = [json.loads(x) for x in (tmp_path / f"{peer}.jsonl").read_text().splitlines()]
        digests[peer] = [e["data"]["digest"] for e in lines if e["event"] == event and e["data"]["kind"] == "activation"]
    assert len(digests["owner"]) == 4 and digests["owner"] == digests["label_holder"]
    # The raw rows inside the cut tensor: the egress guard the bench times refuses it.
    leak = to_wire(torch.tensor(np.concatenate([raw, np.zeros((64, 192), np.float32)], axis=1)))
    with pytest.raises(PolicyDenied, match="guard:raw_row"):
        gates["owner"].send("label_holder", Kind.ACTIVATION, step=99, edge="bottom->top", tensors=(leak,), raw=raw)
