"""secure_split side by side with what a user would otherwise pick, on the same split, in one run.

Every variant trains the digits CNN of the `vanilla` demo (zoo.DIGITS_CNN_BOTTOM at the data owner,
zoo.DIGITS_CNN_TOP at the label holder: 1,437 training images, batch 64, 23 steps per epoch, Adam
lr 1e-2) from the same initial weights (`engine.models.build_segment` with the deployment's derived
seeds) on the same batches in the same order (`engine.schedule.epoch_batches`), 1 torch thread per
process. The two-party variants run the owner and the label holder as two OS processes that
exchange, per step, the cut activation forward and its gradient back:

- **local**: both segments in one process, one Adam (the reference; `_split_workers.run_local`);
- **torch.distributed** send/recv, gloo backend over TCP, plaintext;
- **torch.distributed.rpc** over TensorPipe, TCP only, plaintext (the owner calls the label
  holder's step; the reply is the gradient);
- **raw pyzmq REQ/REP**, plaintext and with CURVE: the transport floors (no policy, no audit);
- **secure_split**: the real peers (`secure-split peer run`, one process per peer: CURVE + ZAP,
  the policy gate at both ends with the egress guard, the hash-chained audit log), without and
  with `training.overlap` (pipeline depth 2) and with `training.pipeline_depth: 4`;
- **NVFlare SplitNN**: only where `nvflare` imports (skipped with a note otherwise).

The variants are one table (`VARIANTS`): adding one (say a pipelining depth) is one line.

What is timed: the training steps of each epoch. The two-party workers' owner drives the steps and
marks each epoch's start and the last one's end (no evaluation in between); secure_split's
coordinator reports the same span per epoch (`PeerResult.metrics["timing"]`, evaluation and the
epoch-end barrier excluded). No process start, handshake or start barrier is included. The first
epoch of every run is warm-up and dropped; a variant's ms per step is the median over the
remaining epochs of all repeats; its ratios (`ratio_to_local`, `ratio_to_rpc`) divide medians of
this run. Repeats are interleaved and the variant order is rotated from one repeat to the next, so
load on a shared machine hits all alike; the load average is recorded at the start of every run.

Every run's trained weights are read back (safetensors; secure_split: the last checkpoint) and
evaluated here on the same test ids: the test accuracy of each variant, and whether its weights are
bit-identical to local's (every variant without overlap computes the same updates). Every
secure_split run's audit logs are verified (`secure_split.audit.verify_logs`); a dirty log fails
the run.

`--wan DELAY_MS,LOSS` runs every two-party variant across the emulated WAN of `bench/wan.py`
(each process in its own network namespace host, one-way delay DELAY_MS and loss LOSS on every
direction); local runs as usual. It needs root (see `bench/wan.py`).

Usage::

    .venv/bin/python bench/peers_compare.py                        # 3 repeats, 8 epochs per run
    .venv/bin/python bench/peers_compare.py --quick --json q.json  # 1 repeat, 3 epochs (about 2 min)
    .venv/bin/python bench/peers_compare.py --wan 25,0.005         # across an emulated WAN

Writes bench/results/peers_compare.json and .png (`--wan`: peers_compare_wan.*; `--quick`:
peers_compare_quick.*), or `--json FILE` (the chart next to it).

Exit status: 0, or 1 when a run failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
WORKER = BENCH / "_split_workers.py"
WAN_PORT = 29500


@dataclass(frozen=True)
class Variant:
    """One row of the comparison.

    Attributes:
        name: short key (JSON, `--variants`).
        label: the row's text.
        kind: "local", "workers" (two `_split_workers.py` processes), "secure_split" or "nvflare".
        transport: the workers' transport (`_split_workers.TRANSPORTS`).
        training: secure_split only: keys merged into the deployment's `training` section.
        limits: secure_split only: keys merged into the deployment's `limits` section.
    """

    name: str
    label: str
    kind: str
    transport: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    limits: dict[str, Any] = field(default_factory=dict)


VARIANTS: list[Variant] = [
    Variant("local", "local, one process", "local", "local"),
    Variant("zmq", "raw pyzmq REQ/REP, no encryption (transport floor)", "workers", "zmq"),
    Variant("zmq-curve", "raw pyzmq REQ/REP with CURVE (encrypted floor)", "workers", "zmq-curve"),
    Variant("gloo", "torch.distributed send/recv (gloo, TCP, plaintext)", "workers", "gloo"),
    Variant("rpc", "torch.distributed.rpc (TensorPipe over TCP, plaintext)", "workers", "rpc"),
    Variant("secure_split", "secure_split (CURVE + ZAP, policy gate both ends, egress guard, audit chain)",
            "secure_split"),
    Variant("secure_split-overlap", "secure_split with training.overlap", "secure_split", training={"overlap": True}),
    Variant("secure_split-pipe4", "secure_split with training.pipeline_depth: 4", "secure_split",
            training={"pipeline_depth": 4}, limits={"step_window": 3}),
    Variant("nvflare", "NVFlare SplitNN", "nvflare"),
]
BY_NAME = {v.name: v for v in VARIANTS}


class RunFailed(RuntimeError):
    """A variant's run did not finish cleanly (message says which and why)."""


# -- the shared workload ------------------------------------------------------------------------------


def base_plan(epochs: int) -> Any:
    """The vanilla demo's plan: what every variant trains."""
    from secure_split.scenarios import SCENARIOS

    return SCENARIOS["vanilla"](epochs)


def worker_spec(plan: Any, transport: str, out: Path, hosts: dict[str, str], port: int) -> dict[str, Any]:
    """The `_split_workers.py` spec of one run: the plan's model, schedule and optimizer, and where to meet."""
    import torch

    from secure_split.engine.data import digits
    from secure_split.engine.models import build_segment

    t = plan.training
    bottom, top = plan.segments["bottom"]["model"], plan.segments["top"]["model"]
    with torch.no_grad():
        cut = tuple(build_segment(bottom, seed=0)(digits()[1][:1]).shape[1:])
    return {"transport": transport, "seed": t["seed"], "epochs": t["epochs"], "batch_size": t["batch_size"],
            "test_fraction": t["test_fraction"], "max_steps": t.get("max_steps_per_epoch"),
            "lr": t["optimizer"]["lr"], "bottom": bottom, "top": top, "cut_shape": list(cut),
            "hosts": hosts, "port": port, "out": str(out)}


def curve_keys() -> dict[str, str]:
    """A fresh CURVE key pair for each end of the raw pyzmq CURVE floor."""
    import zmq

    sp, ss = zmq.curve_keypair()
    cp, cs = zmq.curve_keypair()
    return {"server_public": sp.decode(), "server_secret": ss.decode(), "client_public": cp.decode(),
            "client_secret": cs.decode()}


def _epochs_from_marks(out: Path) -> list[dict[str, float]]:
    doc = json.loads((out / "marks.json").read_text())
    marks, steps = doc["marks"], doc["steps"]
    return [{"steps": steps[i], "train_s": marks[i + 1] - marks[i]} for i in range(len(steps))]


def _load_weights(path: Path, prefix: str = "") -> dict[str, Any]:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


# -- running the variants -----------------------------------------------------------------------------


def _worker_env(wan: bool) -> dict[str, str]:
    iface = "tun0" if wan else "lo"
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE",
                PYTHONUNBUFFERED="1", GLOO_SOCKET_IFNAME=iface, TP_SOCKET_IFNAME=iface)


def _wait_all(procs: dict[str, subprocess.Popen[bytes]], logs: dict[str, Path], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    failed = []
    for role, proc in procs.items():
        try:
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            code = None
        if code != 0:
            failed.append(role)
    if failed:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        tails = {r: " | ".join(logs[r].read_text(errors="replace").strip().splitlines()[-4:]) for r in failed}
        raise RunFailed(f"{what}: {', '.join(failed)} did not finish (timeout {timeout_s:.0f} s or error): {tails}")


def run_workers(variant: Variant, plan: Any, workdir: Path, *, link: Any, timeout_s: float) -> dict[str, Any]:
    """One run of a `_split_workers.py` variant (local: one process; else owner + label holder)."""
    from secure_split.scenarios import free_ports

    out = workdir / "out"
    out.mkdir(parents=True, exist_ok=True)
    for f in out.iterdir():
        f.unlink()
    roles = ["local"] if variant.kind == "local" else ["owner", "label_holder"]
    logs = {r: workdir / f"{r}.log" for r in roles}
    spec_path = workdir / "spec.json"

    def start(hosts: dict[str, str], port: int, popen: Callable[..., subprocess.Popen[bytes]]) -> dict[str, Any]:
        spec = worker_spec(plan, variant.transport, out, hosts, port)
        if variant.transport == "zmq-curve":
            spec["curve"] = curve_keys()
        fd = os.open(spec_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds CURVE secrets
        with os.fdopen(fd, "w") as fh:
            json.dump(spec, fh)
        procs = {}
        for role in roles:
            with open(logs[role], "wb") as log:
                procs[role] = popen(role, [sys.executable, str(WORKER), str(spec_path), role], stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=_worker_env(link is not None))
        _wait_all(procs, logs, timeout_s, variant.name)
        return spec

    if link is None or variant.kind == "local":
        loop = {"owner": "127.0.0.1", "label_holder": "127.0.0.1"}
        start(loop, free_ports(1)[0], lambda _role, argv, **kw: subprocess.Popen(argv, **kw))
    else:
        wan = _wan_module()
        with wan.Wan(["owner", "label_holder"], link) as net:
            start({r: net.ip(r) for r in ("owner", "label_holder")}, WAN_PORT, net.popen)
    return {"epochs": _epochs_from_marks(out),
            "weights": {"bottom": _load_weights(out / "bottom.safetensors"), "top": _load_weights(out / "top.safetensors")}}


def run_secure_split(variant: Variant, plan: Any, workdir: Path, *, link: Any, timeout_s: float) -> dict[str, Any]:
    """One run of the real peers (one `secure-split peer run` process each), audit verified."""
    from secure_split.audit import verify_logs
    from secure_split.config import load_deployment
    from secure_split.policy import load_policy
    from secure_split.scenarios import generate

    plan = dataclasses.replace(plan, name=f"bench-{variant.name}", training={**plan.training, **variant.training})
    if link is None:
        import split_vs_local

        res = split_vs_local.run_split(plan, workdir, timeout_s=timeout_s, verify=True, limits=variant.limits)
        epochs = res["epochs"]
        peers = res["peers"]
    else:
        gen = generate(plan, workdir, limits=variant.limits or None)
        outcome = _wan_module().run_deployment(gen, link, timeout_s=timeout_s)
        if any(code != 0 for code in outcome["exit_codes"].values()):
            raise RunFailed(f"{variant.name} across the WAN: exit codes {outcome['exit_codes']} (logs {outcome['logs']})")
        timing = ((outcome["results"][plan.coordinator].get("metrics") or {}).get("timing")) or []
        epochs = [{"steps": t["train_steps"], "train_s": t["train_s"], "eval_s": t["eval_s"],
                   "barrier_s": t["barrier_s"]} for t in timing]
        if len(epochs) != plan.training["epochs"]:
            raise RunFailed(f"{variant.name}: the coordinator reported {len(epochs)} timed epochs")
        report = verify_logs(workdir / "audit", load_deployment(gen.deployment), load_policy(gen.policy))
        if not report.clean:
            raise RunFailed(f"{variant.name}: audit verification of {workdir / 'audit'} found problems: {report.to_dict()}")
        peers = {n: {k: r.get(k) for k in ("bytes_sent", "bytes_received", "messages_sent", "messages_received")}
                 for n, r in outcome["results"].items()}
    weights = {}
    for peer, seg in (("owner", "bottom"), ("label_holder", "top")):
        last = max((workdir / "checkpoints" / peer).glob("epoch-*.safetensors"))
        weights[seg] = _load_weights(last, f"segments.{seg}.")
    return {"epochs": epochs, "weights": weights, "audit": "verified clean", "peers": peers}


def run_nvflare(variant: Variant, plan: Any, workdir: Path, *, link: Any, timeout_s: float) -> dict[str, Any]:
    """NVFlare's SplitNN: skipped (the reason is the row's note)."""
    if importlib.util.find_spec("nvflare") is None:
        raise Skipped("nvflare is not installed (optional)")
    raise Skipped("nvflare is installed, but this bench does not drive its SplitNN job yet")


class Skipped(Exception):
    """A variant that cannot run here; the message is the note the table shows."""


RUNNERS: dict[str, Callable[..., dict[str, Any]]] = {
    "local": run_workers, "workers": run_workers, "secure_split": run_secure_split, "nvflare": run_nvflare,
}


def _wan_module() -> Any:
    sys.path.insert(0, str(BENCH))
    import wan

    return wan


# -- evaluation ------------------------------------------------------------------------------------------


def evaluate(plan: Any, weights: dict[str, dict[str, Any]]) -> float:
    """Test accuracy of trained (bottom, top) weights on the plan's test ids (the same for every variant)."""
    import torch

    from secure_split.engine.data import digits
    from secure_split.engine.models import build_segment
    from secure_split.engine.schedule import eval_batches, split_train_test

    ids, x, y = digits()
    _, test_ids = split_train_test(ids.numpy(), plan.training["test_fraction"], plan.training["seed"])
    net = {}
    for seg in ("bottom", "top"):
        net[seg] = build_segment(plan.segments[seg]["model"], seed=0, name=seg)
        net[seg].load_state_dict(weights[seg])
        net[seg].eval()
    correct = 0
    with torch.no_grad():
        for batch in eval_batches(test_ids, plan.training["batch_size"]):
            rows = torch.from_numpy(batch)
            correct += int((net["top"](net["bottom"](x[rows])).argmax(dim=1) == y[rows]).sum())
    return correct / len(test_ids)


def build_initial(plan: Any, segment: str) -> dict[str, Any]:
    """A segment's initial weights, as every variant starts from them (the deployment's derived seed)."""
    from secure_split.engine.models import build_segment, derive_seed

    module = build_segment(plan.segments[segment]["model"], seed=derive_seed(plan.training["seed"], segment),
                           name=segment)
    return {k: v.detach() for k, v in module.state_dict().items()}


def max_weight_difference(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]) -> float:
    """Largest absolute difference between two runs' weights (0.0: bit-identical)."""
    diff = 0.0
    for seg in a:
        if set(a[seg]) != set(b[seg]):
            return float("inf")
        for k, v in a[seg].items():
            diff = max(diff, float((v - b[seg][k]).abs().max()))
    return diff


# -- the benchmark ---------------------------------------------------------------------------------------


def _measured(epochs: list[dict[str, float]]) -> list[float]:
    """ms per step of every epoch but the first (warm-up)."""
    return [e["train_s"] / e["steps"] * 1000 for e in epochs[1:]]


def bench(variants: list[Variant], epochs: int, repeats: int, workroot: Path, *, link: Any, timeout_s: float,
          log: Callable[[str], None]) -> dict[str, Any]:
    """Run every variant `repeats` times, interleaved, the order rotated per repeat; summarise."""
    plan = base_plan(epochs)
    runs: dict[str, list[dict[str, Any]]] = {v.name: [] for v in variants}
    notes: dict[str, str] = {}
    live = list(variants)
    for r in range(repeats):
        order = live[r % len(live):] + live[:r % len(live)] if live else []
        for v in order:
            if v.name in notes:
                continue
            wd = workroot / v.name
            wd.mkdir(parents=True, exist_ok=True)
            load = os.getloadavg()
            started = time.monotonic()
            try:
                res = RUNNERS[v.kind](v, plan, wd, link=link, timeout_s=timeout_s)
            except Skipped as why:
                notes[v.name] = str(why)
                log(f"{v.name}: skipped ({why})")
                continue
            res |= {"repeat": r, "loadavg_at_start": load, "run_wall_s": time.monotonic() - started,
                    "accuracy": evaluate(plan, res["weights"])}
            runs[v.name].append(res)
            log(f"repeat {r + 1}/{repeats} {v.name:22s} {statistics.median(_measured(res['epochs'])):7.2f} ms/step  "
                f"accuracy {res['accuracy']:.4f}  (load {load[0]:.2f})")
    return summarise(variants, runs, notes, plan)


def summarise(variants: list[Variant], runs: dict[str, list[dict[str, Any]]], notes: dict[str, str],
              plan: Any) -> dict[str, Any]:
    """Per variant: median ms/step, ratios to local and rpc (this run), accuracy, weights vs local."""
    med = {n: statistics.median([x for res in rs for x in _measured(res["epochs"])]) for n, rs in runs.items() if rs}
    per_repeat = {n: {res["repeat"]: statistics.median(_measured(res["epochs"])) for res in rs} for n, rs in runs.items()}
    ref_weights = runs["local"][0]["weights"] if runs.get("local") else None
    out: dict[str, Any] = {}
    for v in variants:
        rs = runs.get(v.name) or []
        if not rs:
            out[v.name] = {"label": v.label, "skipped": notes.get(v.name, "not run")}
            continue
        row: dict[str, Any] = {
            "label": v.label,
            "ms_per_step": med[v.name],
            "ratio_to_local": med[v.name] / med["local"] if "local" in med else None,
            "ratio_to_rpc": med[v.name] / med["rpc"] if "rpc" in med else None,
            "steps_per_epoch": rs[0]["epochs"][0]["steps"],
            "epochs_per_run": len(rs[0]["epochs"]),
            "repeats": len(rs),
            "ms_per_step_per_repeat": [per_repeat[v.name][r] for r in sorted(per_repeat[v.name])],
            "accuracy": [res["accuracy"] for res in rs],
            "samples_ms_per_step": [x for res in rs for x in _measured(res["epochs"])],
            "loadavg_at_start": [res["loadavg_at_start"] for res in rs],
        }
        for ref in ("local", "rpc"):
            if ref in per_repeat and ref != v.name:
                row[f"ratio_to_{ref}_per_repeat"] = [per_repeat[v.name][r] / per_repeat[ref][r]
                                                     for r in sorted(per_repeat[v.name]) if r in per_repeat[ref]]
        if ref_weights is not None:
            diffs = [max_weight_difference(res["weights"], ref_weights) for res in rs]
            row["max_weight_difference_to_local"] = max(diffs)
            row["weights_identical_to_local"] = all(d == 0.0 for d in diffs)
        if v.kind == "secure_split":
            row["audit"] = [res["audit"] for res in rs]
            row["peers"] = rs[-1].get("peers")
            row["training"] = {**plan.training, **v.training}
        out[v.name] = row
    return out


def print_table(results: dict[str, Any], title: str) -> None:
    """The side-by-side table on stdout."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for col, just in (("variant", "left"), ("ms/step", "right"), ("× local", "right"), ("× rpc", "right"),
                      ("× local per repeat", "right"), ("accuracy", "right"), ("= local weights", "center")):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for r in results.values():
        if "skipped" in r:
            t.add_row(f"{r['label']} [dim](skipped: {r['skipped']})[/]", "–", "–", "–", "–", "–", "–")
            continue
        rng = r.get("ratio_to_local_per_repeat") or []
        t.add_row(r["label"], f"{r['ms_per_step']:.2f}", _x(r["ratio_to_local"]), _x(r["ratio_to_rpc"]),
                  f"{min(rng):.2f}–{max(rng):.2f}" if rng else "–",
                  " ".join(f"{a:.4f}" for a in r["accuracy"]),
                  "yes" if r.get("weights_identical_to_local") else f"no ({r.get('max_weight_difference_to_local', 0):.1e})")
    Console(width=200).print(t)


def _x(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}×"


def plot(results: dict[str, Any], path: Path, title: str) -> None:
    """A horizontal bar chart of ms per step, each bar labelled with its ratios."""
    import matplotlib

    matplotlib.use("Agg")
    import textwrap

    import matplotlib.pyplot as plt

    rank = {v.name: i for i, v in enumerate(VARIANTS)}
    rows = [results[k] for k in sorted(results, key=lambda k: rank.get(k, len(rank))) if "skipped" not in results[k]]
    fig, ax = plt.subplots(figsize=(11, 0.55 * len(rows) + 1.6))
    names = [r["label"] for r in rows][::-1]
    values = [r["ms_per_step"] for r in rows][::-1]
    colors = ["#c0392b" if r["label"].startswith("secure_split") else "#7f8c8d" for r in rows][::-1]
    bars = ax.barh(names, values, color=colors)
    for bar, r in zip(bars, rows[::-1], strict=True):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                f"  {r['ms_per_step']:.2f} ms  ({_x(r['ratio_to_local'])} local, {_x(r['ratio_to_rpc'])} rpc)",
                va="center", fontsize=8)
    ax.set_xlabel("ms per training step (median; lower is better)")
    ax.set_xlim(0, max(values) * 1.6)
    ax.set_title(textwrap.fill(title, 85), fontsize=9)
    ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 repeat, 3 epochs per run (about two minutes)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 3; --quick 1)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs per run, the first dropped (default 8; --quick 3)")
    ap.add_argument("--variants", default=",".join(v.name for v in VARIANTS),
                    help=f"comma-separated subset of {','.join(BY_NAME)}")
    ap.add_argument("--wan", default=None, metavar="DELAY_MS,LOSS",
                    help="run across bench/wan.py's emulated WAN: one-way delay (ms) and loss fraction, e.g. 25,0.005")
    ap.add_argument("--json", type=Path, default=None, help="results file (the PNG goes next to it)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep every run's files here")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds one run may take")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(BY_NAME)}")
    args.variant_list = [BY_NAME[n] for n in names]
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.epochs = args.epochs or (3 if args.quick else 8)
    if args.epochs < 2:
        ap.error("--epochs must be at least 2 (the first epoch is dropped)")
    args.link = None
    if args.wan is not None:
        try:
            delay, loss = (float(p) for p in args.wan.split(","))
        except ValueError:
            ap.error(f"--wan takes DELAY_MS,LOSS (e.g. 25,0.005), got {args.wan!r}")
        if delay < 0 or not 0 <= loss < 1:
            ap.error("--wan: the delay must be >= 0 ms and the loss in [0, 1)")
        args.link = (delay, loss)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; print the table; write the JSON and the chart."""
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(BENCH))
    from _host import machine

    link = None
    if args.link is not None:
        wan = _wan_module()
        if (why := wan.unavailable_reason()) is not None:
            print(f"cannot build a WAN here: {why}", file=sys.stderr)
            return 2
        link = wan.Link(delay_ms=args.link[0], loss=args.link[1])
    stem = "peers_compare" + ("_wan" if link else "") + ("_quick" if args.quick else "")
    out = args.json or RESULTS / f"{stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {msg}", file=sys.stderr, flush=True)

    tmp = tempfile.TemporaryDirectory(prefix="peers_compare-") if args.workdir is None else None
    workroot = Path(tmp.name) if tmp is not None else args.workdir.resolve()
    load_before = os.getloadavg()
    try:
        results = bench(args.variant_list, args.epochs, args.repeats, workroot, link=link, timeout_s=args.timeout,
                        log=log)
    except RuntimeError as exc:  # RunFailed, or a secure_split run that failed (split_vs_local.run_split)
        log(f"FAILED: {exc}")
        return 1
    finally:
        if tmp is not None:
            tmp.cleanup()
    where = f"across an emulated WAN ({args.link[0]:g} ms one way, {args.link[1]:.1%} loss)" if link else "loopback"
    title = (f"digits CNN, vanilla split, batch 64, 1 torch thread per process, {where}; "
             f"{args.repeats} repeat(s) × {args.epochs} epochs, first dropped")
    print_table(results, title)
    doc = {
        "method": __doc__.split("\n\n")[1:6],
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "quick": args.quick,
        "wan": {"delay_ms": args.link[0], "loss": args.link[1]} if link else None,
        "machine": machine() | {"loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "threads_per_process": 1,
        "repeats": args.repeats,
        "epochs_per_run": args.epochs,
        "wall_s": time.monotonic() - started,
        "results": results,
    }
    out.write_text(json.dumps(doc, indent=1, sort_keys=True))
    png = out.with_suffix(".png")
    plot(results, png, title)
    log(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
