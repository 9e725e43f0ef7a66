"""`secure-split demo SCENARIO`: a whole multi-peer deployment on loopback, on bundled data.

The demo does what the organisations would do by hand: each peer gets its own keys, its own
data file (only its part), its own private peer config; the parties share one deployment and
one policy, which every party signs. Every peer then runs as its own OS process through
`secure-split peer run`; the demo only watches, then compares the split model's accuracy with
a centralized baseline (same architecture, seed and schedule, trained in one process) and has
the audit logs verified.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from secure_split.cli.output import console, err_console
from secure_split.errors import ConfigError, ConfigProblem, ExitCode
from secure_split.scenarios import (
    SCENARIO_OPTIONS,
    SCENARIOS,
    STALE_TOLERANCE,
    GeneratedDeployment,
    ScenarioPlan,
    generate,
)
from secure_split.yamlfile import dump_yaml, read_yaml

# -- running -------------------------------------------------------------------------------------


@dataclass
class LaunchedPeer:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    result: Path


def launch_peers(gen: GeneratedDeployment, coordinator: str, *, resume: bool = False) -> dict[str, LaunchedPeer]:
    """Start every peer as its own OS process through `secure-split peer run`."""
    launched = {}
    for name, cfg in gen.peer_configs.items():
        log = gen.workdir / "logs" / f"{name}.log"
        result = gen.workdir / "results" / f"{name}.json"
        result.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "secure_split", "peer", "run", str(cfg), "--result", str(result),
               "--progress", "jsonl" if name == coordinator else "none"]
        if resume:
            cmd.append("--resume")
        with open(log, "ab") as logf:
            proc = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE if name == coordinator else subprocess.DEVNULL,
                stderr=logf,
                stdin=subprocess.DEVNULL,
            )
        launched[name] = LaunchedPeer(name, proc, log, result)
    return launched


def watch_peers(launched: dict[str, LaunchedPeer], coordinator: str, *, timeout_s: float, quiet: bool) -> None:
    """Show the coordinator's progress until every peer exits; stop them all past the timeout."""
    import selectors

    coord = launched[coordinator].proc
    assert coord.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(coord.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout_s
    buf = b""
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=err_console, disable=quiet, transient=False,
    ) as prog:
        task = prog.add_task("starting peers", total=None, info="")
        open_stream = True
        while True:
            if all(p.proc.poll() is not None for p in launched.values()):
                break
            if time.monotonic() > deadline:
                for p in launched.values():
                    if p.proc.poll() is None:
                        p.proc.terminate()
                break
            if any(p.proc.poll() not in (None, 0) for p in launched.values()):
                # One peer failed: give the others a moment to notice, then stop them.
                grace = time.monotonic() + 15
                while time.monotonic() < grace and any(p.proc.poll() is None for p in launched.values()):
                    time.sleep(0.2)
                for p in launched.values():
                    if p.proc.poll() is None:
                        p.proc.terminate()
                break
            if not open_stream:
                time.sleep(0.2)
                continue
            for _key, _ in sel.select(timeout=0.2):
                chunk = os.read(coord.stdout.fileno(), 65536)  # what is there now; never blocks after select
                if not chunk:
                    open_stream = False
                    sel.unregister(coord.stdout)
                    break
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    try:
                        ev = json.loads(line)
                    except ValueError:
                        continue
                    if quiet:
                        continue
                    if ev.get("event") == "step":
                        # Horizontal schedules name the owner whose batch it was (sequential: whose turn).
                        who = f" {ev['owner']}" if ev.get("owner") else ""
                        prog.update(task, description=f"epoch {ev['epoch'] + 1}/{ev['epochs']}{who}", total=ev["steps"],
                                    completed=ev["step"], info=f"loss {ev['loss']:.3f}" if ev.get("loss") is not None else "")
                    elif ev.get("event") in ("owner_lost", "owner_joined"):
                        why = f": {ev['reason']}" if ev.get("reason") else ""
                        prog.console.print(f"{ev['owner']} {ev['event'].split('_')[1]}{why}", markup=False)
                    elif ev.get("event") == "epoch":
                        acc = {k: v for k, v in ev.get("values", {}).items() if k.startswith("accuracy/")}
                        prog.console.print(f"epoch {ev['epoch'] + 1}/{ev['epochs']} done: "
                                           + ", ".join(f"{k} {v:.3f}" for k, v in sorted(acc.items())))
    for p in launched.values():
        try:
            p.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.proc.kill()
            p.proc.wait()


def run_demo(
    scenario: str,
    *,
    workdir: Path,
    epochs: int | None,
    summary: Path | None,
    quiet: bool = False,
    timeout_s: float = 900.0,
    leakage: bool = False,
    overlap: bool = False,
    pipeline_depth: int = 1,
    **options: Any,
) -> int:
    """Generate, launch, watch, compare, verify. Returns the exit code."""
    if scenario not in SCENARIOS:
        raise ConfigError(ConfigProblem("SCENARIO", "scenario", f"unknown scenario '{scenario}'; choose one of {sorted(SCENARIOS)}"))
    foreign = sorted(k for k in options if k not in SCENARIO_OPTIONS.get(scenario, ()))
    if foreign:
        raise ConfigError([ConfigProblem(f"--{k.replace('_', '-')}", k, f"does not apply to scenario '{scenario}'; "
                                         f"it applies to: {', '.join(s for s, o in SCENARIO_OPTIONS.items() if k in o)}")
                           for k in foreign])
    started = time.monotonic()
    plan = SCENARIOS[scenario](epochs if epochs is not None else 5, **options)
    if overlap:  # training.overlap; the deployment loader refuses it where it does not apply
        plan = dataclasses.replace(plan, training={**plan.training, "overlap": True})
    limits: dict[str, Any] = {}
    if pipeline_depth > 1:  # training.pipeline_depth, with the bounds that carry it
        plan = dataclasses.replace(plan, training={**plan.training, "pipeline_depth": pipeline_depth})
        limits = {"step_window": max(2, pipeline_depth - 1), "max_pending_he_rounds": max(2, pipeline_depth)}
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    gen = generate(plan, workdir, limits=limits or None)
    if not quiet:
        names = [p.name for p in plan.peers]
        shown = ", ".join(names) if len(names) <= 8 else f"{', '.join(names[:3])}, ..., {', '.join(names[-2:])}"
        err_console.print(f"[bold]{scenario}[/]: {len(plan.peers)} peers ({shown}) in {workdir}")
    launched = launch_peers(gen, plan.coordinator)
    watch_peers(launched, plan.coordinator, timeout_s=timeout_s, quiet=quiet)

    results: dict[str, dict[str, Any]] = {}
    for name, lp in launched.items():
        res: dict[str, Any] = {"name": name, "pid": lp.proc.pid, "exit_code": lp.proc.returncode,
                               "bytes_sent": 0, "bytes_received": 0, "status": "failed", "error": None}
        if lp.result.is_file():
            res.update(json.loads(lp.result.read_text()))
        res["exit_code"] = lp.proc.returncode
        if res.get("status") != "ok" and not res.get("error"):
            tail = lp.log.read_text(errors="replace").strip().splitlines()[-3:] if lp.log.is_file() else []
            res["error"] = " | ".join(tail) or f"exit code {lp.proc.returncode}"
        results[name] = res
    all_ok = all(r["exit_code"] == 0 and r.get("status") == "ok" for r in results.values())

    coord = results[plan.coordinator]
    final = (coord.get("metrics") or {}).get("final") or {}
    accuracies = {k.split("/", 1)[1]: v for k, v in final.items() if k.startswith("accuracy/")}
    if plan.main_task not in accuracies and plan.baseline_topology is not None:
        pooled = pooled_owner_accuracy([r for n, r in results.items() if n != plan.coordinator])
        if pooled is not None:
            accuracies[plan.main_task] = pooled
    accuracy = accuracies.get(plan.main_task, next(iter(accuracies.values()), None)) if accuracies else None

    from secure_split.config import load_deployment
    from secure_split.engine.baseline import train_centralized

    base = train_centralized(baseline_deployment(plan, gen), features=plan.baseline_features,
                             labels=plan.baseline_labels, ids=plan.baseline_ids, split=plan.baseline_split)
    base_acc: dict[str, float] = {str(k): float(v) for k, v in base["accuracy"].items()}
    baseline_accuracy = base_acc.get(plan.main_task, next(iter(base_acc.values()), None))

    audit_ok, audit_summary = _verify_audit(gen)
    wall = time.monotonic() - started
    dep = load_deployment(gen.deployment)
    tolerance = plan.tolerance
    if tolerance is not None and dep.spec.training.depth > 1:
        # Stale stages (weights one update older per stage in flight) slow early convergence: the
        # 2-hop chain measured 0.961 vs 0.975 at 6 epochs (docs/performance.md). The gate then
        # checks that training works, not that it matches the baseline's updates.
        tolerance = max(tolerance, STALE_TOLERANCE)
    within = None if tolerance is None else accuracy is not None and baseline_accuracy is not None and (
        all(abs(accuracies.get(t, -1.0) - a) <= tolerance for t, a in base_acc.items())
    )
    out = {
        "scenario": scenario,
        "schedule": dep.spec.training.schedule,
        "overlap": dep.spec.training.overlap,
        "pipeline_depth": dep.spec.training.depth,
        "owners": len(data_owners(dep)),
        **({"variant": plan.variant} if plan.variant else {}),
        "accuracy": accuracy,
        "baseline_accuracy": baseline_accuracy,
        "tasks": {t: {"accuracy": accuracies.get(t), "baseline_accuracy": a} for t, a in base_acc.items()},
        "within_tolerance": within,
        "tolerance": tolerance,
        "audit_verified": audit_ok,
        "audit": audit_summary,
        "peers": [
            {k: r.get(k) for k in ("name", "pid", "bytes_sent", "bytes_received", "status", "exit_code", "error",
                                   "messages_sent", "messages_received", "wall_s")}
            for r in results.values()
        ],
        "all_peers_ok": all_ok,
        "wall_s": round(wall, 3),
        "workdir": str(workdir),
    }
    if not quiet:
        _print_table(out, data_owners(dep))
    if leakage:
        from secure_split.cli.leakage import run_leakage_report

        report = run_leakage_report(scenario, workdir / "leakage", quick=True,
                                    console=None if not quiet else console.__class__(quiet=True))
        out["leakage"] = {"dir": str(workdir / "leakage"), "json": str(workdir / "leakage" / "leakage.json"),
                          "settings": len(report.get("settings", report.get("sweep", [])) or [])}
    if summary is not None:
        summary.parent.mkdir(parents=True, exist_ok=True)
        summary.write_text(json.dumps(out, indent=1, sort_keys=True))
    if not all_ok:
        # Peers that failed the same way (many owners refused for one reason) are named once.
        by_error: dict[str, list[str]] = {}
        for r in results.values():
            if r.get("status") != "ok":
                by_error.setdefault(str(r.get("error")), []).append(r["name"])
        for error, names in by_error.items():
            who = (f"peer '{names[0]}'" if len(names) == 1 else
                   f"{len(names)} peers ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})")
            err_console.print(f"{who} failed: {error} (log: {workdir}/logs/{names[0]}.log)", markup=False,
                              soft_wrap=True)
        return int(ExitCode.FAILED)
    if tolerance is None:
        err_console.print(f"non-IID shards: no accuracy gate (the demo measures the gap): split accuracy "
                          f"{_fmt_acc(accuracy)}, baseline {_fmt_acc(baseline_accuracy)}", markup=False)
    elif not within:
        gap = f" ({(accuracy - baseline_accuracy) * 100:+.1f} points)" if accuracy is not None and baseline_accuracy is not None else ""
        err_console.print(f"split accuracy {_fmt_acc(accuracy)} is not within {tolerance * 100:.0f} points of the "
                          f"baseline {_fmt_acc(baseline_accuracy)}{gap}", markup=False)
        return int(ExitCode.FAILED)
    if not audit_ok:
        err_console.print("audit verification found problems; see the table above", markup=False)
        return int(ExitCode.FAILED)
    return int(ExitCode.OK)


def pooled_owner_accuracy(owner_results: list[dict[str, Any]]) -> float | None:
    """Test accuracy over every owner's test rows, from the owners' own final counts.

    In a U-shaped horizontal run each owner's tail is a loss segment of its own, so the runtime
    reports one task per owner (`accuracy/tail_k`); the model they share is judged on all their
    test rows together, the rows the baseline is tested on. None if an owner reported no counts.
    """
    correct = count = 0.0
    for r in owner_results:
        final = (r.get("metrics") or {}).get("final") or {}
        counts = {k: v for k, v in final.items() if k.startswith("n/eval_count/")}
        if not counts:
            return None
        for key, n in counts.items():
            count += float(n)
            correct += float(final.get("n/eval_correct/" + key.split("/", 2)[2], 0.0))
    return correct / count if count else None


def data_owners(dep: Any) -> list[str]:
    """Peers other than the coordinator that own a segment reading raw features, in name order."""
    from secure_split.config import horizontal_owners

    owners = horizontal_owners(dep.spec)
    if owners:
        return list(owners)
    spec = dep.spec
    return sorted({seg.peer for seg in spec.segments.values() if seg.input == "features"} - {spec.coordinator})


def baseline_deployment(plan: ScenarioPlan, gen: GeneratedDeployment) -> Any:
    """The deployment whose network the centralised baseline trains.

    The generated deployment itself, unless the plan names a `baseline_topology`: then
    `WORKDIR/baseline.yaml`, the generated deployment with only that topology's segments, edges
    and peers, on the plain `sync` schedule (same seed, batch size, optimizer and epochs), so an
    auditor can read which network the split run was compared with.
    """
    from secure_split.config import load_deployment

    if plan.baseline_topology is None:
        return load_deployment(gen.deployment)
    raw = read_yaml(gen.deployment, "deployment").data
    topo = plan.baseline_topology
    peers = {seg["peer"] for seg in topo.segments.values()}
    training = {k: v for k, v in raw["training"].items() if k not in ("schedule", "handoff", "average")}
    raw.update(
        name=f"{raw['name']}-baseline",
        peers={name: p for name, p in raw["peers"].items() if name in peers},
        segments=topo.segments,
        edges=topo.edges,
        training={**training, "schedule": "sync"},
    )
    path = gen.workdir / "baseline.yaml"
    path.write_text("# The centralised baseline's network: the split run's architecture once, trained in one "
                    "process on all the data.\n# Not a deployment to run; the demo compares the split run "
                    "with it.\n" + dump_yaml(raw))
    return load_deployment(path)


def _verify_audit(gen: GeneratedDeployment) -> tuple[bool, dict[str, Any]]:
    from secure_split.audit import verify_logs
    from secure_split.config import load_deployment
    from secure_split.policy import load_policy

    dep = load_deployment(gen.deployment)
    report = verify_logs(gen.workdir / "audit", dep, load_policy(gen.policy))
    return bool(report.clean), {"clean": bool(report.clean), "findings": len(report.findings),
                                "report": report.to_dict()}


def _fmt_acc(a: float | None) -> str:
    return "-" if a is None else f"{a:.3f}"


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


OWNER_ROWS = 10
"""With more data owners than this, the peer table shows them as one row (min-max per column)."""


def _owners_row(rows: list[dict[str, Any]]) -> list[str]:
    """One table row for many owners: how many are ok, and each column's min-max."""
    def span(key: str, fmt: Callable[[Any], str]) -> str:
        vals = [r.get(key) or 0 for r in rows]
        return f"{fmt(min(vals))} - {fmt(max(vals))}" if vals else "-"

    ok = sum(1 for r in rows if r.get("status") == "ok" and r.get("exit_code") == 0)
    failed = [r["name"] for r in rows if not (r.get("status") == "ok" and r.get("exit_code") == 0)]
    status = f"{ok}/{len(rows)} ok" + (f" (failed: {', '.join(failed[:5])}{', ...' if len(failed) > 5 else ''})"
                                       if failed else "")
    msgs = span("messages_sent", str) + " / " + span("messages_received", str)
    return [f"{len(rows)} owners", "-", status, span("bytes_sent", _fmt_bytes), span("bytes_received", _fmt_bytes),
            msgs]


def _print_table(out: dict[str, Any], owners: list[str]) -> None:
    t = Table(title=f"secure-split demo: {out['scenario']}")
    t.add_column("task")
    t.add_column("split accuracy", justify="right")
    t.add_column("centralized baseline", justify="right")
    t.add_column("difference", justify="right")
    for task, v in out["tasks"].items():
        a, b = v["accuracy"], v["baseline_accuracy"]
        diff = f"{(a - b) * 100:+.1f} pts" if a is not None and b is not None else "-"
        t.add_row(task, f"{a:.3f}" if a is not None else "-", f"{b:.3f}" if b is not None else "-", diff)
    console.print(t)
    p = Table(title="peers")
    for col in ("peer", "pid", "status", "sent", "received", "messages out/in"):
        p.add_column(col, justify="right" if col not in ("peer", "status") else "left")
    listed = [r for r in out["peers"] if len(owners) <= OWNER_ROWS or r["name"] not in owners]
    for r in listed:
        p.add_row(r["name"], str(r["pid"]), str(r["status"]), _fmt_bytes(r.get("bytes_sent")),
                  _fmt_bytes(r.get("bytes_received")), f"{r.get('messages_sent') or 0}/{r.get('messages_received') or 0}")
    if len(owners) > OWNER_ROWS:
        p.add_row(*_owners_row([r for r in out["peers"] if r["name"] in set(owners)]))
    console.print(p)
    verdict = "[green]verified: intact[/]" if out["audit_verified"] else "[red]PROBLEMS FOUND[/]"
    console.print(f"audit logs: {verdict} ({out['audit']['findings']} findings)   wall time: {out['wall_s']:.1f} s")


def register(app: typer.Typer) -> None:
    """Add the `demo` command to the main CLI."""

    @app.command("demo")
    def demo(
        scenario: Annotated[str, typer.Argument(help=f"one of: {', '.join(SCENARIOS)}")],
        workdir: Annotated[Path | None, typer.Option(help="where to generate everything (default demo-work/SCENARIO)")] = None,
        epochs: Annotated[int | None, typer.Option(help="training epochs (default 5)")] = None,
        summary: Annotated[Path | None, typer.Option(help="write the summary as JSON here")] = None,
        hops: Annotated[int | None, typer.Option(help="multi-hop: number of intermediate peers K >= 1 (default 2)")] = None,
        owners: Annotated[int | None, typer.Option(help="sequential/splitfed: number of data owners N (default 5)")] = None,
        non_iid: Annotated[bool, typer.Option("--non-iid", help="sequential/splitfed: split the digits among owners "
                                              "by label (2 of 2N label-sorted shards each) instead of at random")] = False,
        labels: Annotated[str | None, typer.Option(help="sequential/splitfed: 'holder' (a label holder coordinates; "
                                                   "default) or 'owners' (U-shaped: labels stay at each owner)")] = None,
        handoff: Annotated[str | None, typer.Option(help="sequential/splitfed: sealed weights travel 'relay' (through "
                                                    "the coordinator; default) or 'direct' (owner to owner)")] = None,
        he: Annotated[bool, typer.Option("--he", help="splitfed: average the owners' weights under CKKS at the "
                                         "coordinator, which cannot decrypt them")] = False,
        quiet: Annotated[bool, typer.Option(help="no progress display or tables")] = False,
        leakage: Annotated[bool, typer.Option(help="also measure leakage (quick sweep) into WORKDIR/leakage")] = False,
        overlap: Annotated[bool, typer.Option("--overlap", help="data owners run the next batch's forward while the "
                                              "previous gradient is on its way (training.overlap; weights one update "
                                              "older, so not the baseline's updates)")] = False,
        pipeline_depth: Annotated[int, typer.Option("--pipeline-depth", min=1, max=64, help="training steps a data "
                                                    "owner may have in flight (training.pipeline_depth; 2 = --overlap; "
                                                    "the demo raises limits.step_window to fit)")] = 1,
    ) -> None:
        """Run a whole multi-peer deployment on loopback on bundled data, with its audit verified."""
        options: dict[str, Any] = {"hops": hops, "owners": owners, "non_iid": non_iid, "labels": labels,
                                   "handoff": handoff, "he": he}
        rc = run_demo(scenario, workdir=workdir or Path("demo-work") / scenario, epochs=epochs,
                      summary=summary, quiet=quiet, leakage=leakage, overlap=overlap, pipeline_depth=pipeline_depth,
                      **{k: v for k, v in options.items() if v is not None and v is not False})
        raise typer.Exit(rc)
