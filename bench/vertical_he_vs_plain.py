"""Vertical split learning with and without HE: per-step time and bytes, as ratios, in one run.

Runs the `vertical` demo scenario (two hospitals' cut tensors concatenated at the lab, in the
clear) and `vertical-he` (the same tensors summed at the lab under CKKS: the owners encrypt, the
lab adds and masks, the key holder decrypts the masked sum rounded, the lab unmasks) as real
deployments: `secure_split.scenarios.generate` writes keys, signed policy and per-peer data,
`demo.launch_peers` starts one `secure-split peer run` OS process per peer (3 peers, CURVE, policy
gate, audit log, PSI alignment, checkpoints: everything on, 1 torch thread each). The scenarios
alternate (plain, HE, plain, HE, ...) so load on the shared machine hits both alike.

Also (one pair by default, off with --no-wide) the same two scenarios with a wider cut: each
hospital's bottom is 15 -> 128, so a full batch sends a 64x128 cut tensor per owner, which CKKS
packs into two 4096-slot ciphertexts (the shape of the issue's measurement). The demo's own cut
is 64x16 per owner: one ciphertext, mostly empty slots.

What is measured:

- **step time**: the arrival times, in this process, of the coordinator's `step` progress events
  (`peer run --progress jsonl` on its stdout, read here as `demo.watch_peers` does). One step's
  time is the interval from the previous step event (or the previous epoch's `epoch` event, for
  an epoch's first step) to its own; the very first step of a run (which includes startup,
  handshake, HE context set-up and PSI) is dropped. "Full" steps are the batches of exactly
  `batch_size` rows (the issue's "at batch 64"); the last batch of an epoch is smaller.
  Cross-check: the same interval from the lab's audit log (`step_begin` to `step_begin`, in-process
  microsecond timestamps). Also, per interval, the CPU time of every thread of all three peers
  and their run-queue wait (`/proc/PID/task/*/schedstat`, sampled as each event arrives): CPU per
  step barely depends on the machine's load, wall time does.
- **where the step time goes**: from the three audit logs (one clock, one machine): owners'
  forward (+ encrypt + serialize) until their cut tensor is sent; the lab's sum + mask; the key
  holder's decryption round trip; the lab's top forward/backward until the gradients are sent.
- **bytes**: per peer, the wire totals (`bytes_sent` / `bytes_received`, CURVE frames) from each
  peer's result JSON; per step, the payload bytes (`nbytes` of every `message_sent` audit entry
  of that step, all peers) and message count.
- **set-up** (audit logs, critical path): from the last peer's handshake to the last peer's first
  PSI message (HE: CKKS keygen, public context to the lab, sealed secret context to the other
  owner, loading them; both: each party's first hashing and blinding), then to the last
  `ids_aligned` (the PSI rounds); the bytes of those messages; and launch -> first training step
  (mostly Python + torch start-up of three processes on two cores).

Medians everywhere: the machine has 2 cores shared with other people's jobs, so single numbers are
noisy. The target (from the issue): median full-batch HE step time <= 3x the plaintext one.

Usage::

    .venv/bin/python bench/vertical_he_vs_plain.py           # 2 pairs + 1 wide-cut pair (< 3 min)
    .venv/bin/python bench/vertical_he_vs_plain.py --quick   # 1 run of each, no wide cut (< 60 s)

Writes bench/results/vertical_he_vs_plain.json. Exit status: 0, or 1 when a run failed.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import selectors
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "vertical_he_vs_plain.json"
TARGET_RATIO = 3.0
STEP_KINDS = {
    "step_begin",
    "activation",
    "gradient",
    "encrypted_activation",
    "masked_aggregate",
    "aggregate_gradient",
}

# Wide-cut variant: each hospital 15 -> 128, so a full batch's cut tensor is 64x128 per owner.
WIDE_BOTTOM = [{"linear": {"in": 15, "out": 128}}, {"relu": {}}]
WIDE_CONCAT_TOP = [{"linear": {"in": 256, "out": 16}}, {"relu": {}}, {"linear": {"in": 16, "out": 2}}]
WIDE_SUM_TOP = [{"linear": {"in": 128, "out": 16}}, {"relu": {}}, {"linear": {"in": 16, "out": 2}}]


def make_plan(variant: str, he: bool, epochs: int) -> Any:
    """The demo's vertical plan, or (variant "wide") the same with 128-wide cut tensors."""
    from secure_split.scenarios import SCENARIOS

    plan = SCENARIOS["vertical-he" if he else "vertical"](epochs)
    if variant == "wide":
        plan.name += "-wide"
        segments = copy.deepcopy(plan.segments)
        segments["bottom_a"]["model"] = copy.deepcopy(WIDE_BOTTOM)
        segments["bottom_b"]["model"] = copy.deepcopy(WIDE_BOTTOM)
        segments["top"]["model"] = copy.deepcopy(WIDE_SUM_TOP if he else WIDE_CONCAT_TOP)
        plan.segments = segments
    return plan


# -- one run ------------------------------------------------------------------------------------


def cpu_snapshot(pids: list[int]) -> tuple[int, int]:
    """(ns on a CPU, ns waiting on a run queue) of every thread of these processes so far."""
    run = wait = 0
    for pid in pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    a, b, _ = f.read().split()
                run, wait = run + int(a), wait + int(b)
            except (OSError, ValueError):
                continue
    return run, wait


Event = tuple[float, dict[str, Any], tuple[int, int]]


def watch(launched: dict[str, Any], coordinator: str, timeout_s: float) -> tuple[list[Event], str | None]:
    """Read the coordinator's JSONL progress until every peer exits.

    Returns [(monotonic arrival, event, CPU snapshot of all peers at arrival)] and a problem, if any.
    """
    pids = [p.proc.pid for p in launched.values()]
    coord = launched[coordinator].proc
    assert coord.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(coord.stdout, selectors.EVENT_READ)
    events: list[Event] = []
    deadline = time.monotonic() + timeout_s
    buf = b""
    open_stream = True
    problem: str | None = None
    while True:
        if open_stream:
            for _key, _ in sel.select(timeout=0.1):
                chunk = coord.stdout.read1(65536)
                now = time.monotonic()
                if not chunk:
                    open_stream = False
                    sel.unregister(coord.stdout)
                    break
                snap = cpu_snapshot(pids)
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    try:
                        events.append((now, json.loads(line), snap))
                    except ValueError:
                        continue
        else:
            time.sleep(0.05)
        if all(p.proc.poll() is not None for p in launched.values()) and not open_stream:
            break
        failed = [p.name for p in launched.values() if p.proc.poll() not in (None, 0)]
        if failed or time.monotonic() > deadline:
            problem = f"peer(s) {failed} failed" if failed else f"timeout after {timeout_s:.0f} s"
            grace = time.monotonic() + (10 if failed else 0)
            while time.monotonic() < grace and any(p.proc.poll() is None for p in launched.values()):
                time.sleep(0.2)
            for p in launched.values():
                if p.proc.poll() is None:
                    p.proc.terminate()
            break
    for p in launched.values():
        try:
            p.proc.wait(timeout=10)
        except Exception:
            p.proc.kill()
            p.proc.wait()
    return events, problem


def _ts(entry: dict[str, Any]) -> float:
    return datetime.strptime(entry["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


def read_audit(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        d = e.get("data") or {}
        out.append(
            {
                "t": _ts(e),
                "event": e.get("event"),
                "kind": d.get("kind"),
                "step": d.get("step"),
                "nbytes": d.get("nbytes") or 0,
                "peer": e.get("peer"),
                "counterparty": d.get("counterparty"),
            }
        )
    return out


def _med(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _global_step(epoch: int, i: int) -> int:
    """The runtime's step number of training step i (1-based) of `epoch` (see `_coordinate`)."""
    return (epoch * 1_000_000 if epoch else 0) + i


def analyse(
    events: list[Event],
    audits: dict[str, list[dict[str, Any]]],
    coordinator: str,
    batch_size: int,
    launch_mono: float,
    launch_wall: float,
    he: bool,
) -> dict[str, Any]:
    """Step intervals from the progress events; breakdown, bytes and set-up from the audit logs."""
    lab = audits[coordinator]
    owners = [p for p in audits if p != coordinator]
    rows: dict[int, int] = {}
    for e in lab:
        if e["event"] == "message_sent" and e["kind"] == "step_begin":
            rows[e["step"]] = e["nbytes"] // 8  # ids travel as int64

    # Step intervals from the progress events' arrival times.
    steps: list[dict[str, Any]] = []
    prev: Event | None = None
    for t, ev, snap in events:
        if ev.get("event") == "step":
            pev = prev[1] if prev is not None else {}
            ok = (
                pev.get("event") == "step" and pev["epoch"] == ev["epoch"] and pev["step"] == ev["step"] - 1
            ) or (pev.get("event") == "epoch" and pev["epoch"] == ev["epoch"] - 1 and ev["step"] == 1)
            if ok and prev is not None:
                g = _global_step(ev["epoch"], ev["step"])
                steps.append(
                    {
                        "epoch": ev["epoch"],
                        "step": ev["step"],
                        "global_step": g,
                        "rows": rows.get(g),
                        "s": t - prev[0],
                        "cpu_s": (snap[0] - prev[2][0]) / 1e9,
                        "runq_wait_s": (snap[1] - prev[2][1]) / 1e9,
                    }
                )
        prev = (t, ev, snap)
    train_steps = {_global_step(ev["epoch"], ev["step"]) for _, ev, _ in events if ev.get("event") == "step"}
    full = {s for s in train_steps if rows.get(s) == batch_size}

    # Per-step timelines from the audit logs.
    by_step: dict[int, list[dict[str, Any]]] = {}
    for peer, entries in audits.items():
        for e in entries:
            if (
                e["event"] in ("message_sent", "message_received")
                and e["kind"] in STEP_KINDS
                and e["step"] in train_steps
            ):
                by_step.setdefault(e["step"], []).append({**e, "who": peer})

    def first(es: list[dict[str, Any]], who: str, ev: str, kinds: set[str]) -> float | None:
        ts = [e["t"] for e in es if e["who"] == who and e["event"] == ev and e["kind"] in kinds]
        return min(ts) if ts else None

    def last(es: list[dict[str, Any]], who: str, ev: str, kinds: set[str]) -> float | None:
        ts = [e["t"] for e in es if e["who"] == who and e["event"] == ev and e["kind"] in kinds]
        return max(ts) if ts else None

    act = {"encrypted_activation"} if he else {"activation"}
    grad = {"aggregate_gradient"} if he else {"gradient"}
    phases: dict[str, list[float]] = {}
    audit_step_s: list[float] = []
    bytes_step: list[int] = []
    msgs_step: list[int] = []
    by_kind: dict[str, list[int]] = {}

    def add(name: str, a: float | None, b: float | None) -> None:
        if a is not None and b is not None:
            phases.setdefault(name, []).append(b - a)

    for s in sorted(full):
        es = by_step.get(s, [])
        t0 = first(es, coordinator, "message_sent", {"step_begin"})
        t_act = last(es, coordinator, "message_received", act)
        t_grad = last(es, coordinator, "message_sent", grad)
        nxt = by_step.get(s + 1, [])
        t_next = first(nxt, coordinator, "message_sent", {"step_begin"})
        if t0 is not None and t_next is not None:
            audit_step_s.append(t_next - t0)
        for o in owners:
            add(
                f"owner {o}: forward" + (" + encrypt + serialize" if he else "") + " until sent",
                first(es, o, "message_received", {"step_begin"}),
                first(es, o, "message_sent", act),
            )
        add("lab: step_begin sent -> last cut tensor received", t0, t_act)
        if he:
            t_ms = first(es, coordinator, "message_sent", {"masked_aggregate"})
            t_mr = first(es, coordinator, "message_received", {"masked_aggregate"})
            add("lab: load + sum + mask + serialize", t_act, t_ms)
            add("key holder round trip (lab view)", t_ms, t_mr)
            for o in owners:
                a = first(es, o, "message_received", {"masked_aggregate"})
                b = first(es, o, "message_sent", {"masked_aggregate"})
                if a is not None and b is not None:
                    add(f"key holder {o}: load + decrypt + round", a, b)
            add("lab: unmask + top fwd/bwd until gradients sent", t_mr, t_grad)
        else:
            add("lab: concat + top fwd/bwd until gradients sent", t_act, t_grad)
        if t_next is not None:
            add("lab: gradients sent -> next step_begin", t_grad, t_next)
        sent = [e for e in es if e["event"] == "message_sent"]
        bytes_step.append(sum(e["nbytes"] for e in sent))
        msgs_step.append(len(sent))
        kinds: dict[str, int] = {}
        for e in sent:
            kinds[e["kind"]] = kinds.get(e["kind"], 0) + e["nbytes"]
        for k, v in kinds.items():
            by_kind.setdefault(k, []).append(v)

    # Set-up: handshake -> first PSI message (= HE context distribution), PSI -> ids_aligned.
    setup: dict[str, Any] = {"per_peer": {}}
    for peer, entries in audits.items():
        joined = [e["t"] for e in entries if e["event"] == "peer_joined"]
        psi_sent = [e["t"] for e in entries if e["event"] == "message_sent" and e["kind"] == "psi"]
        aligned = [e["t"] for e in entries if e["event"] == "ids_aligned"]
        he_bytes = sum(
            e["nbytes"] for e in entries if e["event"] == "message_sent" and e["kind"] == "he_context"
        )
        psi_bytes = sum(e["nbytes"] for e in entries if e["event"] == "message_sent" and e["kind"] == "psi")
        if joined and psi_sent and aligned:
            setup["per_peer"][peer] = {
                "handshake_done": max(joined) - launch_wall,
                "first_psi": min(psi_sent) - launch_wall,
                "aligned": max(aligned) - launch_wall,
                "handshake_to_first_psi_s": min(psi_sent) - max(joined),
                "he_context_bytes_sent": he_bytes,
                "psi_bytes_sent": psi_bytes,
            }
    pp = setup["per_peer"]
    if pp and len(pp) == len(audits):
        # Critical path: from the moment the last peer finished its handshake, to the moment the
        # last peer sent its first PSI message (HE context distribution, if any, plus each party's
        # first hashing and blinding), to the last `ids_aligned`.
        ready = max(v["handshake_done"] for v in pp.values())
        psi_start = max(v["first_psi"] for v in pp.values())
        aligned = max(v["aligned"] for v in pp.values())
        setup["until_psi_start_s"] = psi_start - ready
        setup["psi_s"] = aligned - psi_start
        setup["setup_after_handshake_s"] = aligned - ready
        setup["he_context_bytes"] = sum(v["he_context_bytes_sent"] for v in pp.values())
        setup["psi_bytes"] = sum(v["psi_bytes_sent"] for v in pp.values())
    first_begin = [e["t"] for e in lab if e["event"] == "message_sent" and e["kind"] == "step_begin"]
    setup["launch_to_first_step_s"] = min(first_begin) - launch_wall if first_begin else None
    step_events = [t for t, ev, _ in events if ev.get("event") == "step"]
    setup["launch_to_first_step_event_s"] = step_events[0] - launch_mono if step_events else None
    return {
        "steps": steps,
        "full_step_s": [x["s"] for x in steps if x["global_step"] in full],
        "all_step_s": [x["s"] for x in steps],
        "full_step_cpu_s": [x["cpu_s"] for x in steps if x["global_step"] in full],
        "full_step_runq_wait_s": [x["runq_wait_s"] for x in steps if x["global_step"] in full],
        "audit_full_step_s": audit_step_s,
        "phases_median_ms": {k: round(1e3 * statistics.median(v), 3) for k, v in phases.items()},
        "phases_s": phases,
        "full_step_payload_bytes": bytes_step,
        "full_step_messages": msgs_step,
        "full_step_bytes_by_kind_median": {k: statistics.median(v) for k, v in by_kind.items()},
        "setup": setup,
        "train_steps": len(train_steps),
        "full_steps": len(full),
    }


def run_once(variant: str, he: bool, epochs: int, workdir: Path, timeout_s: float) -> dict[str, Any]:
    from secure_split.cli import demo
    from secure_split.scenarios import generate

    plan = make_plan(variant, he, epochs)
    gen = generate(plan, workdir)
    launch_wall, launch_mono = time.time(), time.monotonic()
    launched = demo.launch_peers(gen, plan.coordinator)
    events, problem = watch(launched, plan.coordinator, timeout_s)
    wall = time.monotonic() - launch_mono
    peers: dict[str, Any] = {}
    for name, lp in launched.items():
        res = json.loads(lp.result.read_text()) if lp.result.is_file() else {}
        peers[name] = {
            k: res.get(k)
            for k in (
                "status",
                "error",
                "bytes_sent",
                "bytes_received",
                "messages_sent",
                "messages_received",
                "wall_s",
            )
        }
        peers[name]["exit_code"] = lp.proc.returncode
        if name == plan.coordinator:
            peers[name]["final_metrics"] = (res.get("metrics") or {}).get("final")
        if res.get("status") != "ok" and lp.log.is_file():
            peers[name]["log_tail"] = lp.log.read_text(errors="replace").strip().splitlines()[-5:]
    ok = problem is None and all(p["status"] == "ok" and p["exit_code"] == 0 for p in peers.values())
    out: dict[str, Any] = {
        "scenario": plan.name,
        "variant": variant,
        "he": he,
        "ok": ok,
        "problem": problem,
        "wall_s": wall,
        "peers": peers,
    }
    if ok:
        audits = {p: read_audit(gen.workdir / "audit" / f"{p}.jsonl") for p in launched}
        out.update(
            analyse(
                events, audits, plan.coordinator, plan.training["batch_size"], launch_mono, launch_wall, he
            )
        )
    return out


# -- aggregation and output -----------------------------------------------------------------------


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if r["ok"]]
    if not ok:
        return {"runs": len(runs), "ok_runs": 0}

    def pool(key: str) -> list[float]:
        return [x for r in ok for x in r[key]]

    phases: dict[str, list[float]] = {}
    for r in ok:
        for k, v in r["phases_s"].items():
            phases.setdefault(k, []).extend(v)
    peers = sorted(ok[0]["peers"])
    return {
        "runs": len(runs),
        "ok_runs": len(ok),
        "full_step_ms": 1e3 * statistics.median(pool("full_step_s")),
        "full_step_ms_per_run": [
            round(1e3 * statistics.median(r["full_step_s"]), 3) for r in ok if r["full_step_s"]
        ],
        "full_step_samples": len(pool("full_step_s")),
        "all_step_ms": 1e3 * statistics.median(pool("all_step_s")),
        # CPU of all threads of all three peers, summed over the full-step intervals, per step (a mean:
        # work done after one step event is attributed to the next interval).
        "full_step_cpu_ms": 1e3 * statistics.fmean(pool("full_step_cpu_s")),
        "full_step_runq_wait_ms": 1e3 * statistics.fmean(pool("full_step_runq_wait_s")),
        "audit_full_step_ms": 1e3 * statistics.median(pool("audit_full_step_s")),
        "full_step_payload_bytes": statistics.median(pool("full_step_payload_bytes")),
        "full_step_messages": statistics.median(pool("full_step_messages")),
        "full_step_bytes_by_kind": {
            k: statistics.median([r["full_step_bytes_by_kind_median"].get(k, 0) for r in ok])
            for k in sorted({k for r in ok for k in r["full_step_bytes_by_kind_median"]})
        },
        "phases_ms": {k: 1e3 * statistics.median(v) for k, v in phases.items()},
        "peer_bytes_sent": {p: statistics.median([r["peers"][p]["bytes_sent"] for r in ok]) for p in peers},
        "peer_bytes_received": {
            p: statistics.median([r["peers"][p]["bytes_received"] for r in ok]) for p in peers
        },
        "peer_messages_sent": {
            p: statistics.median([r["peers"][p]["messages_sent"] for r in ok]) for p in peers
        },
        **{
            k: _med([r["setup"][k] for r in ok if r["setup"].get(k) is not None])
            for k in ("until_psi_start_s", "psi_s", "setup_after_handshake_s")
        },
        "he_context_bytes": _med([r["setup"].get("he_context_bytes", 0) for r in ok]),
        "psi_bytes": _med([r["setup"].get("psi_bytes", 0) for r in ok]),
        "launch_to_first_step_s": _med(
            [
                r["setup"]["launch_to_first_step_s"]
                for r in ok
                if r["setup"].get("launch_to_first_step_s") is not None
            ]
        ),
        "run_wall_s": statistics.median([r["wall_s"] for r in ok]),
        "train_steps_per_run": ok[0]["train_steps"],
        "full_steps_per_run": ok[0]["full_steps"],
        "accuracy": _med(
            [
                float((r["peers"]["lab"].get("final_metrics") or {})["accuracy/labels"])
                for r in ok
                if (r["peers"]["lab"].get("final_metrics") or {}).get("accuracy/labels") is not None
            ]
        ),
    }


def _mb(n: float | None) -> str:
    return "-" if n is None else (f"{n / 1e6:.3f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB")


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.0f} ms"


def _ms1(x: float) -> str:
    return f"{x:.1f} ms"


def _s1(x: float) -> str:
    return f"{x:.1f} s"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.1f}x"


def _compare_row(
    t: Any, p: dict[str, Any], h: dict[str, Any], label: str, key: str, fmt: Callable[[Any], str], ratio: bool = True
) -> None:
    """One plain-vs-HE line of `key`; the last column is HE / plain unless `ratio` is off."""
    t.add_row(label, fmt(p[key]), fmt(h[key]), _ratio(h[key], p[key]) if ratio else "")


def print_tables(summary: dict[str, Any], variants: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    for variant in variants:
        p, h = summary[variant]["plain"], summary[variant]["he"]
        if not p.get("ok_runs") or not h.get("ok_runs"):
            con.print(f"[red]{variant}: no successful run to compare[/]")
            continue
        cut = "64x16 per owner" if variant == "standard" else "64x128 per owner"
        t = Table(
            title=f"vertical vs vertical-he ({variant} cut, {cut}), medians of {p['ok_runs']}+{h['ok_runs']} runs",
            header_style="bold",
        )
        for c in ("", "vertical (plain)", "vertical-he", "HE / plain"):
            t.add_column(c, justify="left" if not c else "right")
        row = partial(_compare_row, t, p, h)
        row("step time, full batch 64 (progress events)", "full_step_ms", _ms1)
        t.add_row(
            "  per run",
            ", ".join(f"{x:.1f}" for x in p["full_step_ms_per_run"]),
            ", ".join(f"{x:.1f}" for x in h["full_step_ms_per_run"]),
            "",
        )
        row("step time, full batch (lab audit log)", "audit_full_step_ms", _ms1)
        row("CPU per full step, all peers' threads (mean)", "full_step_cpu_ms", _ms1)
        row("  run-queue wait per full step, all peers", "full_step_runq_wait_ms", _ms1, ratio=False)
        row("step time, all train steps", "all_step_ms", _ms1)
        row("bytes per full step (payload, all peers)", "full_step_payload_bytes", _mb)
        row("messages per full step", "full_step_messages", lambda x: f"{x:.0f}")
        for peer in sorted(p["peer_bytes_sent"]):
            a = p["peer_bytes_sent"][peer] + p["peer_bytes_received"][peer]
            b = h["peer_bytes_sent"][peer] + h["peer_bytes_received"][peer]
            t.add_row(f"{peer}: wire bytes sent + received, whole run", _mb(a), _mb(b), _ratio(b, a))
        row("set-up after handshake (critical path)", "setup_after_handshake_s", _ms)
        t.add_row(
            "  handshake -> all PSI started (HE context + 1st blinding)",
            _ms(p["until_psi_start_s"]),
            _ms(h["until_psi_start_s"]),
            f"+{(h['until_psi_start_s'] - p['until_psi_start_s']) * 1e3:.0f} ms",
        )
        row("  PSI rounds -> ids aligned", "psi_s", _ms, ratio=False)
        row("HE context bytes (public to lab + sealed secret)", "he_context_bytes", _mb, ratio=False)
        row("PSI bytes (all peers)", "psi_bytes", _mb, ratio=False)
        row("launch -> first training step", "launch_to_first_step_s", _s1, ratio=False)
        row("run wall (launch -> all peers exited)", "run_wall_s", _s1, ratio=False)
        row("final accuracy", "accuracy", lambda x: f"{x:.3f}", ratio=False)
        con.print(t)
        b = Table(
            title=f"where a full step goes ({variant} cut), medians from the audit logs", header_style="bold"
        )
        b.add_column("phase")
        b.add_column("vertical", justify="right")
        b.add_column("vertical-he", justify="right")
        names = list(dict.fromkeys(list(h["phases_ms"]) + list(p["phases_ms"])))
        for n in names:
            b.add_row(
                n,
                f"{p['phases_ms'][n]:.2f} ms" if n in p["phases_ms"] else "",
                f"{h['phases_ms'][n]:.2f} ms" if n in h["phases_ms"] else "",
            )
        con.print(b)
        r = h["full_step_ms"] / p["full_step_ms"]
        verdict = "[green]holds[/]" if r <= TARGET_RATIO else "[red]does not hold[/]"
        con.print(
            f"target vertical-he <= {TARGET_RATIO:.0f}x plain step time at batch 64 ({variant} cut): "
            f"{r:.2f}x -> {verdict}\n"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 run of each scenario, no wide variant (< 60 s)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each scenario (default 2)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--no-wide", action="store_true", help="skip the 64x128 cut variant")
    ap.add_argument("--wide-repeats", type=int, default=1, help="runs of each wide scenario (default 1)")
    ap.add_argument(
        "--workdir", type=Path, default=None, help="keep the deployments here (default: a temp dir, removed)"
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--timeout", type=float, default=120.0, help="per run")
    args = ap.parse_args()
    repeats = 1 if args.quick else args.repeats
    wide_repeats = 0 if (args.quick or args.no_wide) else args.wide_repeats
    started = time.monotonic()
    root = args.workdir.resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="vertical-he-bench-"))
    schedule: list[tuple[str, bool, int]] = []
    for k in range(max(repeats, wide_repeats)):
        for variant, n in (("standard", repeats), ("wide", wide_repeats)):
            if k < n:
                # Alternate which scenario goes first from one repeat to the next.
                order = (False, True) if k % 2 == 0 else (True, False)
                schedule += [(variant, he, k) for he in order]
    runs: list[dict[str, Any]] = []
    try:
        for i, (variant, he, k) in enumerate(schedule, 1):
            name = f"{variant}-{'he' if he else 'plain'}-{k}"
            t = time.monotonic()
            r = run_once(variant, he, args.epochs, root / name, args.timeout)
            r["repeat"] = k
            runs.append(r)
            status = "ok" if r["ok"] else f"FAILED: {r['problem']} {r['peers']}"
            extra = (
                f", full step median {1e3 * statistics.median(r['full_step_s']):.1f} ms"
                if r["ok"] and r["full_step_s"]
                else ""
            )
            print(
                f"[{i}/{len(schedule)}] {name}: {time.monotonic() - t:.1f} s{extra}, {status}",
                file=sys.stderr,
                flush=True,
            )
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    variants = ["standard"] + (["wide"] if wide_repeats else [])
    summary = {
        v: {
            "plain": summarise([r for r in runs if r["variant"] == v and not r["he"]]),
            "he": summarise([r for r in runs if r["variant"] == v and r["he"]]),
        }
        for v in variants
    }
    for v in variants:
        p, h = summary[v]["plain"], summary[v]["he"]
        if p.get("ok_runs") and h.get("ok_runs"):
            summary[v]["ratios"] = {
                "full_step_time": h["full_step_ms"] / p["full_step_ms"],
                "audit_full_step_time": h["audit_full_step_ms"] / p["audit_full_step_ms"],
                "all_step_time": h["all_step_ms"] / p["all_step_ms"],
                "full_step_cpu": h["full_step_cpu_ms"] / p["full_step_cpu_ms"],
                "full_step_payload_bytes": h["full_step_payload_bytes"] / p["full_step_payload_bytes"],
                "peer_wire_bytes": {
                    peer: (h["peer_bytes_sent"][peer] + h["peer_bytes_received"][peer])
                    / (p["peer_bytes_sent"][peer] + p["peer_bytes_received"][peer])
                    for peer in p["peer_bytes_sent"]
                },
            }
            summary[v]["target"] = {
                "max_ratio": TARGET_RATIO,
                "ratio": summary[v]["ratios"]["full_step_time"],
                "holds": summary[v]["ratios"]["full_step_time"] <= TARGET_RATIO,
            }
    print_tables(summary, variants)
    wall = time.monotonic() - started
    print(
        f"bench wall time {wall:.0f} s ({len(runs)} runs; 2 shared cores: medians, expect noise)",
        file=sys.stderr,
    )
    for r in runs:  # keep the JSON readable: per-step lists stay, raw phase samples go
        r.pop("phases_s", None)
    out = {
        "bench": "vertical_he_vs_plain",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        },
        "args": {
            "quick": args.quick,
            "repeats": repeats,
            "wide_repeats": wide_repeats,
            "epochs": args.epochs,
        },
        "wall_s": wall,
        "summary": summary,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, sort_keys=True, default=float))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0 if all(r["ok"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
