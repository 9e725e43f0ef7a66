"""Horizontal training with many data owners: how the coordinator and the host scale with N.

Runs the `splitfed` and `sequential` demo scenarios (`secure_split.cli.demo`: owners
`owner_1..owner_N`, each with one shard of the digits and the same bottom CNN, one label holder
with the top) with N = 5, 20, 50, 100 owners as real deployments: one `secure-split peer run` OS
process per peer (N + 1 processes, 1 torch thread each, OMP_WAIT_POLICY=PASSIVE; CURVE, policy
gate, audit log, PSI id alignment, sealed weight hand-off through the coordinator: everything
on), all on this host. Each owner trains at most `--steps` batches per epoch
(`training.max_steps_per_epoch`), so the work per owner stays the same as N grows and what grows
is the coordinator's load, the number of processes and the set-up. Each owner tests on half of
its rows (`test_fraction` 0.5, for every N: with 100 owners of about 18 digits each, a smaller
share would leave an owner fewer than 8 test rows, below the policy's smallest batch).

What is measured, per (schedule, N):

- **wall per epoch**: the coordinator's own timing of each epoch (train + eval + epoch barrier,
  `metrics.timing` in its result), median over the epochs; **set-up**: the coordinator's wall
  time minus its epochs (handshake with every owner, PSI with each, first barrier); **launch to
  exit**: from starting the first process until the last one exited (includes N + 1 Python +
  torch start-ups on the shared cores);
- **coordinator CPU**: user + system seconds of the label holder's process (`wait4` rusage), and
  the sum over all owner processes;
- **bytes**: per owner, bytes sent and received on the wire (CURVE frames; each peer's result
  JSON): median, min and max over the owners; the coordinator's totals;
- **memory**: the peak over the run of the summed PSS of the live peer processes
  (`/proc/PID/smaps_rollup`: shared library pages split among the processes that map them, so
  the sum is what they really take), the peak of the host's used memory (MemTotal - MemAvailable,
  minus what was in use before the launch), and the largest single-process max RSS.

Ratios are against N = 5 of the same schedule, measured in the same run. A run that fails (a peer
exits non-zero, the host runs out of memory, the time limit passes) is recorded with its error
and the peers' exit codes; the script goes on with the next.

Usage::

    .venv/bin/python bench/many_owners.py                  # N = 5, 20, 50, 100; splitfed and sequential
    .venv/bin/python bench/many_owners.py --quick          # N = 5, 20; splitfed only (about 2 minutes)
    .venv/bin/python bench/many_owners.py --owners 5,50 --schedules sequential --epochs 3

Writes bench/results/many_owners.json and bench/results/many_owners.png (with --quick:
many_owners_quick.*). Exit status: 0, or 1 when a run failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
TEST_FRACTION = 0.5
"""Each owner splits its own rows; with 100 owners (about 18 digits each) a test share of 0.5 is
the smallest that leaves every owner 8 test rows, the policy's smallest batch. Same for every N."""
MIN_AVAILABLE_KIB = 1536 * 1024
"""Stop a run when the host has less memory available than this (1.5 GiB)."""
PEER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"}


# -- memory sampling --------------------------------------------------------------------------


def pss_kib(pid: int) -> int:
    """Proportional set size of one process in KiB (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return 0
    return 0


def host_used_kib() -> int:
    """MemTotal - MemAvailable of this host, in KiB."""
    info: dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":", 1)
            info[key] = int(value.split()[0])
    return info["MemTotal"] - info["MemAvailable"]


def host_total_kib() -> int:
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1])


# -- one run ----------------------------------------------------------------------------------


class _ForkedPeer:
    """An owner process forked from this one (`--prefork`): the parts of `Popen` the loop uses."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def kill(self) -> None:
        try:
            os.kill(self.pid, 9)
        except ProcessLookupError:
            pass


def _prefork_parent_ready() -> None:
    """Import everything a peer needs and build one optimizer (which imports torch._dynamo), so
    the forked owners share those pages copy-on-write instead of each loading its own."""
    import torch

    import secure_split.peer.launch  # noqa: F401  (torch, the engine, the crypto)

    torch.set_num_threads(1)
    torch.optim.Adam(torch.nn.Linear(1, 1).parameters())


def _fork_peer(cfg: Path, result: Path, log: Path) -> _ForkedPeer:
    """Fork an owner: a real OS process of its own (own sockets, keys, audit log), started from
    this process's memory image rather than a fresh interpreter."""
    pid = os.fork()
    if pid:
        return _ForkedPeer(pid)
    code = 1
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        from secure_split.peer.launch import training_node

        res = training_node(cfg).run()
        result.write_text(json.dumps(res.to_json(), indent=1, sort_keys=True))
        if res.status != "ok":
            print(f"peer '{res.name}' failed: {res.error}", flush=True)
        code = 0 if res.status == "ok" else (int(res.exit_code) or 1)
    except BaseException as exc:  # the child must never return into the parent's loop
        print(f"forked peer failed: {type(exc).__name__}: {exc}", flush=True)
    finally:
        os._exit(code)


def run_one(schedule: str, owners: int, *, epochs: int, steps: int, timeout_s: float, keep: bool,
            prefork: bool = False) -> dict[str, Any]:
    """Generate, launch N + 1 peers, sample memory until all exit, collect results."""
    from secure_split.scenarios import SCENARIOS, generate

    plan = SCENARIOS[schedule](epochs, owners=owners, test_fraction=TEST_FRACTION)
    plan.training["max_steps_per_epoch"] = steps
    work = Path(tempfile.mkdtemp(prefix=f"many-owners-{schedule}-{owners}-"))
    # Every process must be up before the handshake deadline: N + 1 torch start-ups share the cores.
    limits = {"handshake_timeout_s": max(120.0, 4.0 * (owners + 1)), "peer_timeout_s": max(60.0, 2.0 * owners)}
    gen = generate(plan, work, limits=limits)
    baseline_used = host_used_kib()
    pids: dict[int, str] = {}
    procs: dict[str, Any] = {}
    started = time.monotonic()
    for name, cfg in gen.peer_configs.items():
        if prefork and name != plan.coordinator:
            forked = _fork_peer(cfg, work / "results" / f"{name}.json", work / "logs" / f"{name}.log")
            procs[name] = forked
            pids[forked.pid] = name
            continue
        with open(work / "logs" / f"{name}.log", "wb") as log:  # the child keeps its own copy
            proc = subprocess.Popen(
                [sys.executable, "-m", "secure_split", "peer", "run", str(cfg), "--result",
                 str(work / "results" / f"{name}.json"), "--progress", "none"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=dict(os.environ, **PEER_ENV),
            )
        procs[name] = proc
        pids[proc.pid] = name
    exits: dict[str, dict[str, Any]] = {}
    peak_pss = peak_used = 0
    memory_stop: dict[str, float] | None = None
    next_sample = 0.0
    problem: str | None = None
    while len(exits) < len(procs):
        now = time.monotonic()
        if now >= next_sample:
            live = [pid for pid, n in pids.items() if n not in exits]
            peak_pss = max(peak_pss, sum(pss_kib(pid) for pid in live))
            peak_used = max(peak_used, host_used_kib() - baseline_used)
            next_sample = now + 0.25
            available = host_total_kib() - host_used_kib()
            if available < MIN_AVAILABLE_KIB and problem is None:
                # Stop before the kernel's OOM killer picks victims (other people's jobs too).
                problem = (f"host memory nearly exhausted ({available / 1024:.0f} MiB available) with "
                           f"{len(live)} peer processes alive, their PSS {peak_pss / 1024:.0f} MiB; stopped them")
                memory_stop = {"alive": len(live), "pss_mib": peak_pss / 1024, "available_mib": available / 1024,
                               "after_s": now - started}
                for n, p in procs.items():
                    if n not in exits:
                        p.kill()
        if now - started > timeout_s and problem is None:
            problem = f"time limit of {timeout_s:.0f} s passed; stopped the remaining peers"
            for n, p in procs.items():
                if n not in exits:
                    p.kill()
        try:
            pid, status, usage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            time.sleep(0.05)
            continue
        name = pids.get(pid)
        if name is None:
            continue
        exits[name] = {
            "exit_code": os.waitstatus_to_exitcode(status),
            "cpu_s": usage.ru_utime + usage.ru_stime,
            "max_rss_kib": usage.ru_maxrss,
            "exit_after_s": time.monotonic() - started,
        }
        procs[name].returncode = exits[name]["exit_code"]  # reaped here; keep Popen from waiting again
    launch_to_exit = time.monotonic() - started

    results: dict[str, dict[str, Any]] = {}
    for name in procs:
        path = work / "results" / f"{name}.json"
        results[name] = json.loads(path.read_text()) if path.is_file() else {}
    coordinator = plan.coordinator
    owner_names = [n for n in procs if n != coordinator]
    failed = {n: e["exit_code"] for n, e in exits.items() if e["exit_code"] != 0}
    if failed and problem is None:
        codes = sorted(set(failed.values()))
        first = next(iter(failed))
        tail = (work / "logs" / f"{first}.log").read_text(errors="replace").strip().splitlines()[-2:]
        problem = f"{len(failed)} peer(s) exited non-zero (codes {codes}), e.g. {first}: {' | '.join(tail)}"
    coord = results.get(coordinator, {})
    timing = (coord.get("metrics") or {}).get("timing") or []
    epoch_s = [t["train_s"] + t["eval_s"] + t["barrier_s"] for t in timing]
    final = (coord.get("metrics") or {}).get("final") or {}
    sent = [results[o].get("bytes_sent", 0) for o in owner_names if results.get(o)]
    received = [results[o].get("bytes_received", 0) for o in owner_names if results.get(o)]
    row: dict[str, Any] = {
        "schedule": schedule,
        "owners": owners,
        "processes": len(procs),
        "prefork": prefork,
        "ok": problem is None,
        "problem": problem,
        "exit_codes": {str(c): sum(1 for e in exits.values() if e["exit_code"] == c)
                       for c in sorted({e["exit_code"] for e in exits.values()})},
        "epochs": epochs,
        "steps_per_owner_epoch": steps,
        "wall_per_epoch_s": statistics.median(epoch_s) if epoch_s else None,
        "epoch_s": epoch_s,
        "train_s": [t["train_s"] for t in timing],
        "setup_s": (coord["wall_s"] - sum(epoch_s)) if coord.get("wall_s") and epoch_s else None,
        "coordinator_wall_s": coord.get("wall_s"),
        "launch_to_exit_s": launch_to_exit,
        "coordinator_cpu_s": exits.get(coordinator, {}).get("cpu_s"),
        "owners_cpu_s": sum(exits[o]["cpu_s"] for o in owner_names if o in exits),
        "owner_bytes_sent": _spread(sent),
        "owner_bytes_received": _spread(received),
        "coordinator_bytes_sent": coord.get("bytes_sent"),
        "coordinator_bytes_received": coord.get("bytes_received"),
        "coordinator_messages": [coord.get("messages_sent"), coord.get("messages_received")],
        "peak_pss_total_mib": peak_pss / 1024,
        "peak_host_used_mib": peak_used / 1024,
        "memory_stop": memory_stop,
        "max_rss_one_process_mib": max((e["max_rss_kib"] for e in exits.values()), default=0) / 1024,
        "accuracy": final.get("accuracy/labels"),
        "workdir": str(work) if keep else None,
    }
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return row


def _spread(values: list[int]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": float(statistics.median(values)), "min": float(min(values)), "max": float(max(values))}


# -- report -----------------------------------------------------------------------------------


def _ratio(row: dict[str, Any], base: dict[str, Any] | None, key: str) -> str:
    a, b = row.get(key), (base or {}).get(key)
    if not isinstance(a, int | float) or not isinstance(b, int | float) or not b:
        return "-"
    return f"{a / b:.2f}x"


def print_table(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="many owners: one label holder, N owner processes (ratios vs N = 5, same run)")
    for col in ("schedule", "N", "ok", "s/epoch", "x", "set-up s", "launch->exit s", "coord CPU s", "x",
                "owner sent (median)", "owner recv (median)", "coord recv", "PSS total MiB", "host used MiB", "acc"):
        t.add_column(col, justify="left" if col in ("schedule", "ok") else "right")
    for r in rows:
        base = next((b for b in rows if b["schedule"] == r["schedule"] and b["owners"] == 5 and b["ok"]), None)

        def f(v: Any, fmt: str = "{:.2f}") -> str:
            return fmt.format(v) if isinstance(v, int | float) else "-"

        t.add_row(
            r["schedule"], str(r["owners"]), "yes" if r["ok"] else f"NO: {str(r['problem'])[:60]}",
            f(r["wall_per_epoch_s"]), _ratio(r, base, "wall_per_epoch_s"), f(r["setup_s"], "{:.1f}"),
            f(r["launch_to_exit_s"], "{:.1f}"), f(r["coordinator_cpu_s"], "{:.1f}"), _ratio(r, base, "coordinator_cpu_s"),
            _kib((r["owner_bytes_sent"] or {}).get("median")), _kib((r["owner_bytes_received"] or {}).get("median")),
            _kib(r["coordinator_bytes_received"]), f(r["peak_pss_total_mib"], "{:.0f}"),
            f(r["peak_host_used_mib"], "{:.0f}"), f(r["accuracy"], "{:.3f}"),
        )
    Console(width=230).print(t)


def _kib(n: Any) -> str:
    if not isinstance(n, int | float):
        return "-"
    return f"{n / 1024:.0f} KiB" if n < 10 * 1024 * 1024 else f"{n / 1024 / 1024:.1f} MiB"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    panels = [
        ("wall_per_epoch_s", "wall per epoch (s)"),
        ("coordinator_cpu_s", "coordinator CPU (s, whole run)"),
        ("owner_bytes_sent", "bytes sent per owner (median, KiB)"),
        ("peak_pss_total_mib", "peak PSS of all peers (MiB)"),
    ]
    for ax, (key, title) in zip(axes, panels, strict=True):
        for schedule in sorted({r["schedule"] for r in rows}):
            pts = [(r["owners"], r[key]) for r in rows if r["schedule"] == schedule and r["ok"] and r[key] is not None]
            if key == "owner_bytes_sent":
                pts = [(n, v["median"] / 1024) for n, v in pts]
            if pts:
                line = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=schedule)
            if key == "peak_pss_total_mib":  # runs stopped for memory: where they stood
                stopped = [(r["owners"], r[key]) for r in rows
                           if r["schedule"] == schedule and r.get("memory_stop") and r[key] is not None]
                if stopped:
                    ax.scatter([p[0] for p in stopped], [p[1] for p in stopped], marker="x", s=60,
                               color=line[0].get_color() if pts else None, label=f"{schedule}: stopped, memory")
        if key == "peak_pss_total_mib":
            ax.axhline(host_total_kib() / 1024, color="red", linestyle="--", linewidth=1, label="host memory")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("owners N")
        ax.set_xscale("log")
        ax.set_xticks(sorted({r["owners"] for r in rows}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"secure-split: N owner processes + 1 label holder on {os.cpu_count()} cores "
                 f"({host_total_kib() / 1024 / 1024:.0f} GiB)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--owners", default="5,20,50,100", help="comma-separated owner counts")
    ap.add_argument("--schedules", default="splitfed,sequential", help="comma-separated: splitfed, sequential")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=1, help="max training steps per owner per epoch")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    ap.add_argument("--keep", action="store_true", help="keep each run's workdir (logs, audit)")
    ap.add_argument("--quick", action="store_true", help="N = 5, 20; splitfed only")
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNG from the JSON of the last run")
    ap.add_argument("--prefork", action="store_true",
                    help="fork the owner processes from this one after it has imported torch, so they share "
                         "its read-only pages (what makes 100 owner processes fit in 24 GiB)")
    args = ap.parse_args()
    stem = "many_owners_quick" if args.quick else "many_owners"
    if args.prefork:
        stem += "_prefork"
        os.environ.update(PEER_ENV)  # before torch is imported: the forked owners inherit it
        _prefork_parent_ready()
    if args.plot_only:
        rows = json.loads((RESULTS / f"{stem}.json").read_text())["runs"]
        print_table(rows)
        plot(rows, RESULTS / f"{stem}.png")
        return 0
    owners = [5, 20] if args.quick else [int(x) for x in args.owners.split(",")]
    schedules = ["splitfed"] if args.quick else args.schedules.split(",")
    rows = []
    for schedule in schedules:
        for n in owners:
            print(f"{schedule}, {n} owners ...", file=sys.stderr, flush=True)
            row = run_one(schedule, n, epochs=args.epochs, steps=args.steps, timeout_s=args.timeout, keep=args.keep,
                          prefork=args.prefork)
            print(f"  {'ok' if row['ok'] else 'FAILED: ' + str(row['problem'])}: {row['launch_to_exit_s']:.1f} s, "
                  f"peak PSS {row['peak_pss_total_mib']:.0f} MiB", file=sys.stderr, flush=True)
            rows.append(row)
    print_table(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": {"cpus": os.cpu_count(), "memory_gib": round(host_total_kib() / 1024 / 1024, 1),
                 "python": platform.python_version(), "machine": platform.machine()},
        "settings": {"epochs": args.epochs, "steps_per_owner_epoch": args.steps, "batch_size": 64,
                     "threads_per_peer": 1, "prefork": args.prefork},
        "runs": rows,
    }
    (RESULTS / f"{stem}.json").write_text(json.dumps(out, indent=1))
    plot(rows, RESULTS / f"{stem}.png")
    print(f"wrote {RESULTS / (stem + '.json')} and {RESULTS / (stem + '.png')}", file=sys.stderr)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
