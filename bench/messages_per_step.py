"""Messages and round trips per training step of every demo topology, counted from real runs' audit logs.

For each scenario of `secure_split.scenarios` (vanilla, u-shaped, multi-hop, multi-task, vertical,
vertical-he, sequential, splitfed) it generates the demo deployment with a few training steps per
epoch, runs every peer as its own process (`secure-split peer run`), verifies the audit logs and
reads them back:

- **messages per training step**: every `message_sent` entry whose step is a training step (a step
  that carries a gradient of any kind back), over all peers, divided by the number of training
  steps; by kind. The other messages (handshake, barriers and audit receipts, PSI, CKKS contexts,
  weight hand-offs and averages, evaluation steps, shutdown) are counted per run.
- **one-way hops per step on the critical path**: the longest chain of messages in which each one
  was sent by a peer after it had logged the receipt of the previous one (the happens-before order
  of the logs; each peer handles its messages one at a time), over the training steps of the last
  epoch, divided by that epoch's training steps; round trips = hops / 2. An upper bound on the
  network latencies a step must wait for: a send logged after an unrelated receipt is counted as
  if it had waited for it.
- with `--wan DELAY_MS` (needs root; `bench/wan.py`, no loss): each scenario again across the
  emulated WAN; measured round trips per step = (WAN ms per step - loopback ms per step) / the
  round trip time. On a real link this includes TCP's own round trips (a 64 KiB tensor from a
  fresh congestion window takes more than one).

Usage::

    .venv/bin/python bench/messages_per_step.py                 # loopback, about 2-4 minutes
    .venv/bin/python bench/messages_per_step.py --wan 25        # and across a 25 ms one-way WAN

Writes bench/results/messages_per_step.json (or --json FILE).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
SCENARIO_NAMES = ["vanilla", "u-shaped", "multi-hop", "multi-task", "vertical", "vertical-he", "sequential", "splitfed"]
GRADIENT_KINDS = {"gradient", "aggregate_gradient"}
STEP_KINDS = {"step_begin", "activation", "gradient", "encrypted_activation", "masked_aggregate", "aggregate_gradient"}
"""The kinds a training step sends; the others (barrier, audit_receipt, psi, he_context, encrypted_weights,
hello, shutdown) carry an epoch or nothing in their step field."""


HORIZONTAL = {"sequential", "splitfed"}
"""Scenarios whose schedule does not pipeline (`training.pipeline_depth` is for schedule: sync)."""


def plan_for(name: str, epochs: int, steps: int, depth: int = 1) -> Any:
    """The demo plan of `name` with at most `steps` training steps per epoch (per owner where
    horizontal), and `training.pipeline_depth: depth` where the schedule pipelines."""
    from secure_split.scenarios import SCENARIOS

    plan = SCENARIOS[name](epochs)
    extra = {"pipeline_depth": depth} if depth > 1 and name not in HORIZONTAL else {}
    return dataclasses.replace(plan, training={**plan.training, "max_steps_per_epoch": steps, **extra})


def limits_for(depth: int) -> dict[str, Any] | None:
    """The deployment limits that carry `depth` steps in flight (`config.TrainingSpec.pipeline_depth`)."""
    return {"step_window": max(2, depth - 1), "max_pending_he_rounds": max(2, depth)} if depth > 1 else None


def read_log(path: Path) -> list[dict[str, Any]]:
    """One peer's audit log entries, in order."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def count(logs: dict[str, list[dict[str, Any]]], epoch: int) -> dict[str, Any]:
    """Messages per training step and the happens-before critical path of `epoch`'s training steps.

    Args:
        logs: peer -> its audit entries (as `read_log` returns them).
        epoch: the epoch whose training steps the critical path is measured over (step numbers
            `epoch * 1_000_000 + k`).
    """
    sent = [(peer, e["data"]) for peer, entries in logs.items() for e in entries if e["event"] == "message_sent"]
    train_steps = {d["step"] for _, d in sent if d["kind"] in GRADIENT_KINDS}

    def in_step(d: dict[str, Any], steps: set[int]) -> bool:
        return d.get("kind") in STEP_KINDS and d.get("step") in steps

    step_msgs = [(p, d) for p, d in sent if in_step(d, train_steps)]
    kinds = Counter(d["kind"] for _, d in step_msgs)
    n = len(train_steps)
    epoch_steps = {s for s in train_steps if s // 1_000_000 == epoch}

    def key(d: dict[str, Any], sender: str, receiver: str) -> tuple[str, str, str, int]:
        return sender, receiver, str(d["session"]), int(d["seq"])

    depth: dict[tuple[str, str, str, int], int] = {}
    # Peers' logs are interleaved by replaying them: a receipt can be processed once its send was.
    cursors = dict.fromkeys(logs, 0)
    seen: dict[str, int] = dict.fromkeys(logs, 0)  # per peer: deepest chain received so far
    progress = True
    while progress:
        progress = False
        for peer, entries in logs.items():
            while cursors[peer] < len(entries):
                e = entries[cursors[peer]]
                d = e.get("data") or {}
                counted = e["event"] in ("message_sent", "message_received") and in_step(d, epoch_steps)
                if counted and e["event"] == "message_received":
                    k = key(d, d["sender"], d["receiver"])
                    if k not in depth:
                        break  # its send is not replayed yet
                    seen[peer] = max(seen[peer], depth[k])
                elif counted:
                    depth[key(d, d["sender"], d["receiver"])] = seen[peer] + 1
                cursors[peer] += 1
                progress = True
    stuck = {p: c for p, c in cursors.items() if c < len(logs[p])}
    if stuck:
        raise RuntimeError(f"audit logs could not be replayed: receipts without a send at {stuck}")
    hops = max(depth.values(), default=0)
    return {
        "training_steps": n,
        "messages_per_step": len(step_msgs) / n if n else None,
        "messages_per_step_by_kind": {k: v / n for k, v in sorted(kinds.items())} if n else {},
        "bytes_per_step": sum(int(d["nbytes"]) for _, d in step_msgs) / n if n else None,
        "other_messages_in_run": len(sent) - len(step_msgs),
        "other_messages_by_kind": dict(sorted(Counter(d["kind"] for _, d in sent if not in_step(d, train_steps)).items())),
        "critical_path_epoch": epoch,
        "critical_path_steps": len(epoch_steps),
        "critical_path_hops": hops,
        "hops_per_step": hops / len(epoch_steps) if epoch_steps else None,
        "round_trips_per_step": hops / len(epoch_steps) / 2 if epoch_steps else None,
    }


def run(name: str, workdir: Path, *, epochs: int, steps: int, timeout_s: float, link: Any = None,
        depth: int = 1) -> dict[str, Any]:
    """Run one scenario's peers (loopback, or across `link`), verify the audit, count."""
    from secure_split.audit import verify_logs
    from secure_split.cli import demo
    from secure_split.cli.output import err_console
    from secure_split.config import load_deployment
    from secure_split.policy import load_policy
    from secure_split.scenarios import generate

    plan = plan_for(name, epochs, steps, depth)
    gen = generate(plan, workdir, limits=limits_for(depth))
    if link is None:
        launched = demo.launch_peers(gen, plan.coordinator)
        with err_console.capture():
            demo.watch_peers(launched, plan.coordinator, timeout_s=timeout_s, quiet=True)
        codes = {n: lp.proc.returncode for n, lp in launched.items()}
        results = {n: json.loads(lp.result.read_text()) if lp.result.is_file() else {} for n, lp in launched.items()}
    else:
        sys.path.insert(0, str(BENCH))
        import wan

        out = wan.run_deployment(gen, link, timeout_s=timeout_s)
        codes, results = out["exit_codes"], out["results"]
    if any(c != 0 for c in codes.values()):
        raise RuntimeError(f"{name}: peers exited with {codes}; logs in {workdir / 'logs'}")
    report = verify_logs(workdir / "audit", load_deployment(gen.deployment), load_policy(gen.policy))
    if not report.clean:
        raise RuntimeError(f"{name}: audit verification found problems: {report.to_dict()}")
    logs = {p.stem: read_log(p) for p in sorted((workdir / "audit").glob("*.jsonl"))}
    counted = count(logs, epochs - 1)
    timing = (results[plan.coordinator].get("metrics") or {}).get("timing") or []
    last = timing[-1] if timing else {}
    steps_last = counted["critical_path_steps"]
    # SplitFed owners step side by side: a round (one step at every owner) is the unit that waits.
    parallel = int(plan.variant.get("owners", 1)) if plan.training.get("schedule") == "splitfed" else 1
    return counted | {
        "peers": len(plan.peers),
        "owners_stepping_in_parallel": parallel,
        "pipeline_depth": int(plan.training.get("pipeline_depth", 1)),
        "round_trips_per_round": counted["round_trips_per_step"] * parallel,
        "train_ms_per_step_last_epoch": 1000 * last["train_s"] / steps_last if last and steps_last else None,
        "audit": "verified clean",
    }


def main(argv: list[str] | None = None) -> int:
    """Count every scenario (see the module docstring); print a table; write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenarios", default=",".join(SCENARIO_NAMES))
    ap.add_argument("--steps", type=int, default=6, help="training steps per epoch (per owner where horizontal)")
    ap.add_argument("--epochs", type=int, default=2, help="epochs (the critical path is measured on the last)")
    ap.add_argument("--wan", type=float, default=None, metavar="DELAY_MS", help="also run across a WAN, no loss")
    ap.add_argument("--pipeline-depth", type=int, default=1, metavar="K",
                    help="training.pipeline_depth of the sync topologies (the horizontal ones stay at 1)")
    ap.add_argument("--json", type=Path, default=RESULTS / "messages_per_step.json")
    ap.add_argument("--timeout", type=float, default=600.0)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(BENCH))
    from _host import machine
    from rich.console import Console
    from rich.table import Table

    link = None
    if args.wan is not None:
        import wan

        if (why := wan.unavailable_reason()) is not None:
            print(f"cannot build a WAN here: {why}", file=sys.stderr)
            return 2
        link = wan.Link(delay_ms=args.wan)
    started = time.monotonic()
    load_before = os.getloadavg()
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="messages_per_step-") as tmp:
        for name in [s.strip() for s in args.scenarios.split(",") if s.strip()]:
            try:
                row = run(name, Path(tmp) / name, epochs=args.epochs, steps=args.steps, timeout_s=args.timeout,
                          depth=args.pipeline_depth)
                if link is not None:
                    w = run(name, Path(tmp) / f"{name}-wan", epochs=args.epochs, steps=args.steps,
                            timeout_s=args.timeout, link=link, depth=args.pipeline_depth)
                    rtt = 2 * args.wan
                    row["wan"] = {"delay_ms": args.wan, "train_ms_per_step_last_epoch": w["train_ms_per_step_last_epoch"],
                                  "measured_round_trips_per_step":
                                      (w["train_ms_per_step_last_epoch"] - row["train_ms_per_step_last_epoch"]) / rtt}
            except RuntimeError as exc:
                print(f"FAILED: {exc}", file=sys.stderr)
                return 1
            out[name] = row
            print(f"[{time.monotonic() - started:6.1f} s] {name}: {row['messages_per_step']:.2f} messages, "
                  f"{row['round_trips_per_step']:.2f} round trips per training step", file=sys.stderr, flush=True)
    t = Table(title="per training step, counted from the audit logs of a real run (loopback)")
    for col in ("topology", "peers", "messages/step", "by kind", "round trips/step (logs)", "bytes/step",
                "owners in parallel"):
        t.add_column(col)
    if link is not None:
        t.add_column(f"round trips/step measured ({args.wan:g} ms one way)")
    for name, r in out.items():
        kinds = ", ".join(f"{k} {v:g}" for k, v in r["messages_per_step_by_kind"].items())
        cells = [name, str(r["peers"]), f"{r['messages_per_step']:.2f}", kinds, f"{r['round_trips_per_step']:.2f}",
                 f"{r['bytes_per_step'] / 1024:.0f} KiB", str(r["owners_stepping_in_parallel"])]
        if link is not None:
            cells.append(f"{r['wan']['measured_round_trips_per_step']:.2f}")
        t.add_row(*cells)
    Console(width=200).print(t)
    doc = {"method": __doc__.split("\n\n")[1:3], "machine": machine() | {"loadavg_before": load_before,
                                                                          "loadavg_after": os.getloadavg()},
           "steps_per_epoch": args.steps, "epochs": args.epochs, "pipeline_depth": args.pipeline_depth, "wall_s": time.monotonic() - started, "results": out}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=1, sort_keys=True))
    print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
