"""Benchmark: audit log verification throughput (entries per second) on a synthetic 3-peer run.

Generates the logs with the real writer (one signed checkpoint per ~100 entries per peer, like a
step barrier), then times `verify_logs` sequentially and with one worker process per core, and
the per-file pass alone. Prints entries/s; the issue asks for at least 100,000 entries/s.

    .venv/bin/python bench/audit_verify.py [--entries 200000] [--keep DIR] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import tempfile
import time
from pathlib import Path

from secure_split.audit import verify_logs
from secure_split.audit.synthetic import generate_logs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=200_000, help="entries across the three peers")
    ap.add_argument("--steps-per-barrier", type=int, default=20, help="steps between signed checkpoints")
    ap.add_argument("--keep", type=Path, default=None, help="write the logs here and keep them")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per mode (best is reported)")
    ap.add_argument("--profile", action="store_true", help="print the top of a cProfile of one sequential run")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        t0 = time.perf_counter()
        run = generate_logs(root / "run", entries=args.entries, steps_per_barrier=args.steps_per_barrier)
        gen_s = time.perf_counter() - t0
        n = run.total_entries
        size = sum(p.stat().st_size for p in run.log_dir.glob("*.jsonl"))
        checkpoints = sum(1 for p in run.log_dir.glob("*.jsonl") for line in p.open("rb") if b'"sig":' in line)
        print(f"generated {n} entries ({size / 2**20:.1f} MiB, {checkpoints} signed checkpoints, "
              f"one per {n / checkpoints:.0f} entries) in {gen_s:.1f} s "
              f"({n / gen_s:,.0f} entries/s written)")
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        modes = [("sequential", 1)] + ([(f"parallel ({min(cores, 3)} workers)", min(cores, 3))] if cores > 1 else [])
        for name, workers in modes:
            best = float("inf")
            for _ in range(args.repeat):
                t = time.perf_counter()
                report = verify_logs(run.log_dir, run.deployment_path, workers=workers)
                best = min(best, time.perf_counter() - t)
            assert report.clean, report.findings[:3]
            print(f"verify_logs {name}: {best:.3f} s, {n / best:,.0f} entries/s "
                  f"({report.checks['messages_matched']} messages matched, "
                  f"{report.checks['checkpoints_verified']} checkpoints verified)")
        default = verify_logs(run.log_dir, run.deployment_path)
        assert default.clean
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            verify_logs(run.log_dir, run.deployment_path, workers=1)
            prof.disable()
            pstats.Stats(prof).sort_stats("cumulative").print_stats(20)


if __name__ == "__main__":
    main()
