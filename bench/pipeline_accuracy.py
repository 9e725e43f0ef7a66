"""Test accuracy against `training.pipeline_depth`, at the demos' settings, on the real peers.

For each scenario and depth k it generates the demo deployment (the demo's seed, batch, optimizer
and learning rate; `training.pipeline_depth: k` with the limits that carry it), runs every peer
as a thread of this process (`secure_split.testing.run_peers_in_threads`: real sockets, CURVE,
the gate, audit logs) and reads the coordinator's test accuracy after every epoch. Pipelined
training does not depend on message timing (each step's weight version follows from k alone,
`engine.pipeline`), so threads give the same weights as processes; the vertical-HE scenario's
CKKS noise moves its digits a little from run to run.

Usage::

    .venv/bin/python bench/pipeline_accuracy.py                              # vanilla, multi-hop, vertical-he
    .venv/bin/python bench/pipeline_accuracy.py --scenarios vanilla --depths 1,2,4,8 --epochs 5

Writes bench/results/pipeline_accuracy.json (or --json FILE).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"


def run(scenario: str, depth: int, epochs: int, workdir: Path) -> dict[str, Any]:
    """One run: the coordinator's accuracy of the main task after every epoch."""
    from secure_split.scenarios import SCENARIOS, generate
    from secure_split.testing import run_peers_in_threads

    plan = SCENARIOS[scenario](epochs)
    plan = dataclasses.replace(plan, training={**plan.training, "pipeline_depth": depth})
    limits = {"step_window": max(2, depth - 1), "max_pending_he_rounds": max(2, depth)}
    gen = generate(plan, workdir, limits=limits)
    started = time.monotonic()
    results = run_peers_in_threads(gen.peer_configs, timeout_s=1800)
    bad = {n: r.error for n, r in results.items() if r.status != "ok"}
    if bad:
        raise RuntimeError(f"{scenario} at depth {depth}: {bad}")
    history = results[plan.coordinator].metrics["history"]
    key = f"accuracy/{plan.main_task}"
    return {"accuracy_per_epoch": [h["values"].get(key) for h in history], "wall_s": time.monotonic() - started}


def main(argv: list[str] | None = None) -> int:
    """Run the grid (see the module docstring), print it, write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenarios", default="vanilla,multi-hop,vertical-he")
    ap.add_argument("--depths", default="1,2,4")
    ap.add_argument("--epochs", type=int, default=5, help="the demos' default")
    ap.add_argument("--json", type=Path, default=RESULTS / "pipeline_accuracy.json")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(BENCH))
    import torch
    from _host import machine

    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    load_before = os.getloadavg()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pipeline_accuracy-") as tmp:
        for scenario in args.scenarios.split(","):
            rows: dict[str, Any] = {}
            for depth in (int(d) for d in args.depths.split(",")):
                rows[str(depth)] = run(scenario, depth, args.epochs, Path(tmp) / f"{scenario}-{depth}")
                acc = rows[str(depth)]["accuracy_per_epoch"]
                print(f"[{time.monotonic() - started:6.0f} s] {scenario} k={depth}: "
                      + " ".join(f"{a:.4f}" for a in acc), file=sys.stderr, flush=True)
            base = rows.get("1", {}).get("accuracy_per_epoch")
            for row in rows.values():
                if base:
                    row["points_below_k1_per_epoch"] = [round(100 * (b - a), 2) for a, b in
                                                        zip(row["accuracy_per_epoch"], base, strict=True)]
            out[scenario] = rows
    doc = {"method": __doc__.split("\n\n")[1], "epochs": args.epochs,
           "machine": machine() | {"loadavg_before": load_before, "loadavg_after": os.getloadavg()},
           "wall_s": time.monotonic() - started, "results": out}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=1, sort_keys=True))
    print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
