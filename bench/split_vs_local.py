"""Per-epoch training time: the split deployment over real peer processes vs the same model in one process.

For four deployments — the digits CNN (vanilla: owner.bottom -> label_holder.top), a breast
cancer MLP 30-64-32-2 (vanilla), the digits CNN as a 3-hop chain (owner -> hop1 -> hop2 ->
label_holder: three cut edges, four peers) and a digits CNN with two 64-channel conv layers
(about 10x the compute per step, to show where the split's fixed per-step cost stops mattering),
plus the CNN, MLP and chain again with `training.overlap` (`cnn-overlap`, `mlp-overlap`,
`chain-overlap`), and a ResNet-18 from the torchvision preset cut after layer1 (`resnet18`, CIFAR
stem, synthetic 3x32x32 images, 4 steps per epoch; needs the vision extra) — it measures, in one
run and interleaved:

- **split**: the deployment generated with `secure_split.scenarios.generate` (keys, signed
  policy, per-peer data files) and run by `launch_peers` / `watch_peers` as one
  `secure-split peer run` OS process per peer, 1 torch thread each, everything on: CURVE + ZAP,
  the policy gate on both sides (with the egress leakage guards), the hash-chained audit log,
  checkpoints and signed heads at every epoch barrier;
- **local**: `engine.baseline.train_centralized` on the same deployment (same segments, seeds,
  optimizer and batches) in this process, with 1 torch thread.

What is timed: the training steps of an epoch only, on both sides (evaluation and the epoch-end
barrier are excluded from both; the split run's are reported separately). Split: the
coordinator's own clock around the epoch's training steps, reported in its result JSON
(`PeerResult.metrics["timing"]`): no process startup, handshake or start barrier. Local: from
the start of one epoch's batches to the next (`epoch_batches` / `evaluate` calls of
`train_centralized`). The first epoch of every run is warm-up and dropped. Reported: medians
over the remaining epochs of all repeats; ratio = median split / median local. Split and local
alternate order from one repeat to the next, so load on the shared machine hits both alike.
Every split run's audit logs are verified afterwards (`audit verify`, outside the timing).

Usage::

    .venv/bin/python bench/split_vs_local.py            # full run (a few minutes on 2 cores)
    .venv/bin/python bench/split_vs_local.py --quick    # < 60 s: 1 repeat, few epochs
    .venv/bin/python bench/split_vs_local.py --profile  # per-step time breakdown of every peer

Writes bench/results/split_vs_local.json (--quick: split_vs_local_quick.json; --profile:
split_vs_local_profile.json).
`--profile` runs each deployment once more with every peer under a section timer (this file's
`_probe` mode: wraps the gate, policy, codec, audit, transport, executor and runtime functions
and attributes inclusive/exclusive time to train / eval / barrier phases). `--cprofile DIR`
additionally writes cProfile dumps of every peer.

Exit status: 0, or 1 when a run failed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _host import machine

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"

# Prototype ratios measured on this kind of machine (DESIGN.md, "Measured on this kind of machine").
PROTOTYPE: dict[str, float | None] = {"cnn": 1.75, "mlp": 3.4, "chain": 2.6, "cnn-wide": None,
                                      "cnn-overlap": 1.75, "mlp-overlap": 3.4, "chain-overlap": 2.6,
                                      "resnet18": 1.05}
# The target: CNN <= 1.5x; every model never worse than the prototype. cnn-wide is ours: the
# same task with about 14x the compute per step, to show where the fixed per-step cost stops mattering.
TARGET = {"cnn": 1.5, "mlp": 3.4, "chain": 2.6, "cnn-wide": 1.5, "cnn-overlap": 1.5, "mlp-overlap": 3.4,
          "chain-overlap": 2.6, "resnet18": 1.05}
LABELS = {
    "cnn": "digits CNN (vanilla, 2 peers)",
    "mlp": "MLP 30-64-32-2 (breast cancer, vanilla, 2 peers)",
    "chain": "digits CNN, 3-hop chain (4 peers)",
    "cnn-wide": "digits CNN, 2 conv layers of 64 channels (vanilla, 2 peers)",
    "cnn-overlap": "digits CNN with training.overlap (vanilla, 2 peers)",
    "mlp-overlap": "MLP 30-64-32-2 with training.overlap (vanilla, 2 peers)",
    "chain-overlap": "digits CNN, 3-hop chain with training.overlap (4 peers)",
    "resnet18": "ResNet-18 (torchvision preset, CIFAR stem) cut after layer1, 3x32x32 (vanilla, 2 peers)",
}
WIDE_CNN_BOTTOM = [
    {"conv2d": {"in": 1, "out": 64, "kernel": 3, "padding": 1}},
    {"relu": {}},
    {"conv2d": {"in": 64, "out": 64, "kernel": 3, "padding": 1}},
    {"relu": {}},
    {"maxpool2d": {"kernel": 2}},
    {"flatten": {}},  # 64 x 4 x 4 = 1024
]
WIDE_CNN_TOP = [{"linear": {"in": 1024, "out": 256}}, {"relu": {}}, {"linear": {"in": 256, "out": 10}}]
# ResNet-18: about 1.2 s per step at batch 64 on one core, so few steps per epoch (and few rows: the
# evaluation runs over the test fifth of them).
RESNET_ROWS = 400
RESNET_STEPS = 4
# Its cut activation is 64 x 64 x 32 x 32 float32 = 16 MiB per message: above the demos' 16 MiB limit.
LIMITS = {"bench-resnet18": {"max_message_bytes": 64 * 1024 * 1024}}


# -- deployments ---------------------------------------------------------------------------------


def plan_for(model: str, epochs: int) -> Any:
    """The demo ScenarioPlan of one benchmark model."""
    from secure_split.scenarios import SCENARIOS, PeerPlan, ScenarioPlan

    if model.endswith("-overlap"):  # the same deployment with training.overlap (the owner runs ahead)
        import dataclasses

        plan = plan_for(model.removesuffix("-overlap"), epochs)
        return dataclasses.replace(plan, name=f"bench-{model}", training={**plan.training, "overlap": True})

    if model == "cnn":
        return SCENARIOS["vanilla"](epochs)
    if model == "chain":
        return SCENARIOS["multi-hop"](epochs, hops=2)
    if model == "cnn-wide":
        import dataclasses

        plan = SCENARIOS["vanilla"](epochs)
        segments = {"bottom": {**plan.segments["bottom"], "model": WIDE_CNN_BOTTOM},
                    "top": {**plan.segments["top"], "model": WIDE_CNN_TOP}}
        training = {**plan.training, "optimizer": {"type": "adam", "lr": 1e-3}}
        return dataclasses.replace(plan, name="bench-cnn-wide", segments=segments, training=training)
    if model == "mlp":
        from secure_split.engine import zoo
        from secure_split.engine.data import breast_cancer

        ids, x, y = breast_cancer()
        return ScenarioPlan(
            name="bench-mlp",
            peers=[PeerPlan("owner", ids, features=x), PeerPlan("label_holder", ids, labels={"labels": y})],
            coordinator="label_holder",
            segments={
                "bottom": {"peer": "owner", "input": "features", "model": zoo.BREAST_CANCER_MLP_BOTTOM},
                "top": {"peer": "label_holder", "loss": "cross_entropy", "model": zoo.BREAST_CANCER_MLP_TOP},
            },
            edges=[{"from": "bottom", "to": "top"}],
            training={"seed": 7, "epochs": epochs, "batch_size": 64, "test_fraction": 0.2,
                      "optimizer": {"type": "adam", "lr": zoo.BREAST_CANCER_LR}},
            baseline_features={"bottom": x},
            baseline_labels={"top": y},
            baseline_ids=ids,
            main_task="labels",
        )
    if model == "resnet18":
        # ResNet-18 from the torchvision preset (docs/models.md), cut after layer1, with the CIFAR stem
        # (3x3 first convolution, no max-pool) on CIFAR-shaped synthetic images: the cut is 64x32x32.
        import torch
        from _comm_model import synthetic_cifar

        x, y = synthetic_cifar(RESNET_ROWS, 10, seed=7)
        ids = torch.arange(RESNET_ROWS)
        preset = {"torchvision": "resnet18", "stem": "cifar"}
        return ScenarioPlan(
            name="bench-resnet18",
            peers=[PeerPlan("owner", ids, features=x), PeerPlan("label_holder", ids, labels={"labels": y})],
            coordinator="label_holder",
            segments={
                "bottom": {"peer": "owner", "input": "features", "model": {**preset, "cut_after": "layer1"}},
                "top": {"peer": "label_holder", "loss": "cross_entropy",
                        "model": {**preset, "start_after": "layer1", "num_classes": 10}},
            },
            edges=[{"from": "bottom", "to": "top"}],
            training={"seed": 7, "epochs": epochs, "batch_size": 64, "test_fraction": 0.2,
                      "max_steps_per_epoch": RESNET_STEPS, "optimizer": {"type": "adam", "lr": 1e-3}},
            baseline_features={"bottom": x},
            baseline_labels={"top": y},
            baseline_ids=ids,
            main_task="labels",
            tolerance=None,  # synthetic labels: no accuracy claim
        )
    raise ValueError(model)


def train_steps_per_epoch(dep: Any, ids: Any) -> list[int]:
    """Training steps of every epoch, from the shared schedule (what the coordinator runs)."""
    from secure_split.engine.schedule import epoch_batches, split_train_test

    t = dep.spec.training
    train_ids, _ = split_train_test(_np(ids), t.test_fraction, t.seed)
    return [len(epoch_batches(train_ids, t.batch_size, t.seed, e, t.max_steps_per_epoch)) for e in range(t.epochs)]


def _np(ids: Any) -> Any:
    return ids.numpy() if hasattr(ids, "numpy") else ids


# -- split run -----------------------------------------------------------------------------------


def run_split(plan: Any, workdir: Path, *, timeout_s: float, probe: Path | None = None,
              cprofile: Path | None = None, verify: bool = False, limits: dict[str, Any] | None = None) -> dict[str, Any]:
    """Generate the deployment (`limits`: deployment limits over this bench's), run every peer as
    its own process, return its epoch times."""
    from secure_split.cli import demo
    from secure_split.config import load_deployment
    from secure_split.scenarios import generate

    gen = generate(plan, workdir, limits={**LIMITS.get(plan.name, {}), **(limits or {})} or None)
    dep = load_deployment(gen.deployment)
    steps = train_steps_per_epoch(dep, plan.baseline_ids)
    t0 = time.monotonic()
    if probe is None and cprofile is None:
        launched = demo.launch_peers(gen, plan.coordinator)
    else:
        launched = _launch_instrumented(gen, plan.coordinator, probe, cprofile)
    from secure_split.cli.output import err_console

    with err_console.capture():  # watch_peers prints each epoch's accuracy even when quiet
        demo.watch_peers(launched, plan.coordinator, timeout_s=timeout_s, quiet=True)
    wall = time.monotonic() - t0
    results = {}
    for name, lp in launched.items():
        res = json.loads(lp.result.read_text()) if lp.result.is_file() else {}
        results[name] = res
        if lp.proc.returncode != 0 or res.get("status") != "ok":
            tail = lp.log.read_text(errors="replace").strip().splitlines()[-5:] if lp.log.is_file() else []
            raise RuntimeError(f"peer {name} failed (exit {lp.proc.returncode}): {' | '.join(tail)}")
    coord = results[plan.coordinator]
    timing = (coord.get("metrics") or {}).get("timing")
    if not timing or [t["train_steps"] for t in timing] != steps:
        raise RuntimeError(f"the coordinator's result has no per-epoch timing for {steps} training steps: {timing}")
    epochs = [{"steps": t["train_steps"], "train_s": t["train_s"], "eval_s": t["eval_s"], "barrier_s": t["barrier_s"]}
              for t in timing]
    audit = None
    if verify:
        from secure_split.audit import verify_logs
        from secure_split.policy import load_policy

        report = verify_logs(gen.workdir / "audit", dep, load_policy(gen.policy))
        audit = {"clean": bool(report.clean), "findings": len(report.findings)}
        if not report.clean:
            raise RuntimeError(f"audit verification of {gen.workdir / 'audit'} found problems: {report.to_dict()}")
    return {
        "epochs": epochs,
        "wall_s": wall,
        "accuracy": (coord.get("metrics") or {}).get("final", {}).get("accuracy/labels"),
        "audit": audit,
        "peers": {n: {k: r.get(k) for k in ("bytes_sent", "bytes_received", "messages_sent", "messages_received",
                                             "wall_s")} for n, r in results.items()},
    }


def _launch_instrumented(gen: Any, coordinator: str, probe: Path | None, cprofile: Path | None) -> dict[str, Any]:
    """Like demo.launch_peers, but each peer runs under this file's section timer and/or cProfile."""
    import subprocess

    from secure_split.cli.demo import LaunchedPeer

    launched = {}
    for name, cfg in gen.peer_configs.items():
        log = gen.workdir / "logs" / f"{name}.log"
        result = gen.workdir / "results" / f"{name}.json"
        result.unlink(missing_ok=True)
        cmd = [sys.executable]
        if cprofile is not None:
            cprofile.mkdir(parents=True, exist_ok=True)
            cmd += ["-m", "cProfile", "-o", str(cprofile / f"{gen.workdir.name}-{name}.prof")]
        cmd += [str(Path(__file__).resolve()), "_probe", str(probe / f"{name}.json") if probe else "-",
                "peer", "run", str(cfg), "--result", str(result),
                "--progress", "jsonl" if name == coordinator else "none"]
        with open(log, "ab") as logf:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE if name == coordinator else subprocess.DEVNULL,
                                    stderr=logf, stdin=subprocess.DEVNULL)
        launched[name] = LaunchedPeer(name, proc, log, result)
    return launched


# -- local run -----------------------------------------------------------------------------------


def run_local(plan: Any, workdir: Path) -> dict[str, Any]:
    """train_centralized on the same deployment in this process; epoch boundaries by wrapping the
    schedule call at the start of every epoch and the evaluation after the last."""
    import secure_split.engine.baseline as baseline
    from secure_split.config import load_deployment

    dep = load_deployment(workdir / "deployment.yaml")
    marks: list[float] = []
    orig_batches, orig_eval = baseline.epoch_batches, baseline.evaluate

    def batches(*a: Any, **k: Any) -> Any:
        marks.append(time.perf_counter())
        return orig_batches(*a, **k)

    def evaluate(*a: Any, **k: Any) -> Any:
        marks.append(time.perf_counter())
        return orig_eval(*a, **k)

    baseline.epoch_batches, baseline.evaluate = batches, evaluate  # type: ignore[assignment]
    try:
        out = baseline.train_centralized(dep, features=plan.baseline_features, labels=plan.baseline_labels,
                                         ids=plan.baseline_ids)
    finally:
        baseline.epoch_batches, baseline.evaluate = orig_batches, orig_eval  # type: ignore[assignment]
    steps = train_steps_per_epoch(dep, plan.baseline_ids)
    return {
        "epochs": [{"steps": steps[i], "train_s": marks[i + 1] - marks[i]} for i in range(len(marks) - 1)],
        "accuracy": float(out["accuracy"].get("labels", float("nan"))),
    }


# -- the benchmark -------------------------------------------------------------------------------


def _measured(epochs: list[dict[str, float]], key: str = "train_s") -> list[float]:
    return [e[key] for e in epochs[1:]]  # epoch 0 is warm-up


def bench(models: list[str], epochs: dict[str, int], repeats: int, workroot: Path, timeout_s: float,
          log: Callable[[str], None]) -> dict[str, Any]:
    runs: dict[str, dict[str, list[Any]]] = {m: {"split": [], "local": []} for m in models}
    for r in range(repeats):
        for m in models:
            plan = plan_for(m, epochs[m])
            wd = workroot / m
            wd.mkdir(parents=True, exist_ok=True)
            order = ("split", "local") if (r + models.index(m)) % 2 == 0 else ("local", "split")
            for side in order:
                if side == "split":
                    res = run_split(plan, wd, timeout_s=timeout_s, verify=True)
                else:
                    if not (wd / "deployment.yaml").is_file():
                        from secure_split.scenarios import generate

                        generate(plan, wd)
                    res = run_local(plan, wd)
                runs[m][side].append(res)
                med = statistics.median(_measured(res["epochs"]))
                log(f"repeat {r + 1}/{repeats} {m:5s} {side:5s}: {med * 1000:8.1f} ms/epoch "
                    f"({res['epochs'][0]['steps']} steps)")
    out: dict[str, Any] = {}
    for m in models:
        split = [x for res in runs[m]["split"] for x in _measured(res["epochs"])]
        local = [x for res in runs[m]["local"] for x in _measured(res["epochs"])]
        s_med, l_med = statistics.median(split), statistics.median(local)
        paired = [statistics.median(_measured(s["epochs"])) / statistics.median(_measured(lo["epochs"]))
                  for s, lo in zip(runs[m]["split"], runs[m]["local"], strict=True)]
        steps = runs[m]["split"][0]["epochs"][0]["steps"]
        out[m] = {
            "label": LABELS[m],
            "steps_per_epoch": steps,
            "epochs_per_run": epochs[m],
            "repeats": repeats,
            "local_s_per_epoch": l_med,
            "split_s_per_epoch": s_med,
            "local_ms_per_step": l_med / steps * 1000,
            "split_ms_per_step": s_med / steps * 1000,
            "ratio": s_med / l_med,
            "ratio_per_repeat": paired,
            "prototype_ratio": PROTOTYPE.get(m),
            "target_ratio": TARGET[m],
            "meets_target": s_med / l_med <= TARGET[m],
            "split_eval_s_per_epoch": statistics.median(
                [x for res in runs[m]["split"] for x in _measured(res["epochs"], "eval_s")]),
            "split_barrier_s_per_epoch": statistics.median(
                [x for res in runs[m]["split"] for x in _measured(res["epochs"], "barrier_s")]),
            "samples": {"split_train_s": split, "local_train_s": local},
            "split_accuracy": [res["accuracy"] for res in runs[m]["split"]],
            "local_accuracy": [res["accuracy"] for res in runs[m]["local"]],
            "split_runs": [{k: v for k, v in res.items() if k != "epochs"} | {"epochs": res["epochs"]}
                           for res in runs[m]["split"]],
        }
    return out


def print_table(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="split (peer processes, CURVE, policy gate, audit) vs local (one process), 1 thread each")
    for col, just in (("model", "left"), ("steps/epoch", "right"), ("local s/epoch", "right"),
                      ("split s/epoch", "right"), ("ratio", "right"), ("ratio range", "right"),
                      ("prototype", "right"), ("target", "right")):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for _m, r in results.items():
        ok = r["meets_target"]
        rng = f"{min(r['ratio_per_repeat']):.2f}–{max(r['ratio_per_repeat']):.2f}"
        t.add_row(r["label"], str(r["steps_per_epoch"]), f"{r['local_s_per_epoch']:.4f}",
                  f"{r['split_s_per_epoch']:.4f}", f"[{'green' if ok else 'red'}]{r['ratio']:.2f}×[/]", rng,
                  f"{r['prototype_ratio']:.2f}×" if r["prototype_ratio"] else "–", f"≤ {r['target_ratio']:.2f}×")
    Console(width=160).print(t)


# -- profile: section timer inside each peer process ----------------------------------------------


class _Probe:
    """Inclusive and exclusive time per wrapped function, per phase (train / eval / barrier / setup)."""

    def __init__(self) -> None:
        self.phase = "setup"
        self.phase_t0 = time.perf_counter()
        self.wall: dict[str, float] = {}
        self.steps: dict[str, int] = {}
        self.incl: dict[str, dict[str, float]] = {}
        self.excl: dict[str, dict[str, float]] = {}
        self.excl_cpu: dict[str, dict[str, float]] = {}
        self.cpu: dict[str, float] = {}
        self.phase_c0 = time.thread_time()
        self.calls: dict[str, dict[str, int]] = {}
        self.stack: list[list[float]] = []  # per active call: wall t0, child wall, cpu t0, child cpu
        self.recv_hist: dict[str, dict[str, int]] = {}
        self.recv_timeouts: dict[str, int] = {}

    def set_phase(self, phase: str) -> None:
        now, c = time.perf_counter(), time.thread_time()
        self.wall[self.phase] = self.wall.get(self.phase, 0.0) + now - self.phase_t0
        self.cpu[self.phase] = self.cpu.get(self.phase, 0.0) + c - self.phase_c0
        self.phase, self.phase_t0, self.phase_c0 = phase, now, c

    def wrap(self, owner: Any, attr: str, name: str | None = None) -> None:
        fn = getattr(owner, attr)
        label = name or f"{getattr(owner, '__name__', owner)}.{attr}"
        probe = self
        wall, cpu = time.perf_counter, time.thread_time

        def wrapper(*a: Any, **k: Any) -> Any:
            frame = [wall(), 0.0, cpu(), 0.0]  # wall t0, child wall, cpu t0, child cpu
            probe.stack.append(frame)
            try:
                return fn(*a, **k)
            finally:
                dt, dc = wall() - frame[0], cpu() - frame[2]
                probe.stack.pop()
                if probe.stack:
                    probe.stack[-1][1] += dt
                    probe.stack[-1][3] += dc
                ph = probe.phase
                for table, v in ((probe.incl, dt), (probe.excl, dt - frame[1]), (probe.excl_cpu, dc - frame[3])):
                    d = table.setdefault(ph, {})
                    d[label] = d.get(label, 0.0) + v
                c = probe.calls.setdefault(ph, {})
                c[label] = c.get(label, 0) + 1

        wrapper.__wrapped__ = fn  # type: ignore[attr-defined]
        setattr(owner, attr, wrapper)

    def install(self) -> None:

        import secure_split.audit.sink as sink
        import secure_split.audit.writer as writer
        import secure_split.engine.executor as executor
        import secure_split.engine.optim as optim
        import secure_split.peer.gate as gate
        import secure_split.peer.node as node
        import secure_split.peer.schedules.sync as sync
        import secure_split.peer.steps as steps
        import secure_split.protocol.session as session
        import secure_split.transport.transport as transport
        from secure_split.policy.model import Policy

        probe = self
        G, N, S, R, E = gate.Gate, node.PeerNode, steps.StepRunner, sync.SyncSchedule, executor.PeerExecutor
        for attr in ("send", "receive", "_send_prebound"):
            self.wrap(G, attr, f"gate.{attr}")
        for attr in ("check_egress", "encode", "decode_header", "decode_body", "sha256_frames"):
            self.wrap(gate, attr, f"gate:{attr}")
        self.wrap(Policy, "decide", "policy.decide")
        self.wrap(session.PeerSession, "bind", "session.bind")
        self.wrap(session.PeerSession, "receive", "session.receive")
        self.wrap(writer.AuditLog, "record", "audit.record")
        self.wrap(writer.AuditLog, "checkpoint", "audit.checkpoint")
        self.wrap(sink.AppendOnlyFile, "write_entry", "audit.write(2)")
        self.wrap(transport.Transport, "send", "transport.send")
        self.wrap(transport.Transport, "_take_message", "transport.take")
        self.wrap(transport.Transport, "events", "transport.events")
        for attr in ("begin_step", "on_activation", "on_gradient", "finish_step", "_forward", "_backward",
                     "_check_tensor", "_advance_guarded"):
            self.wrap(E, attr, f"executor.{attr}")
        self.wrap(optim.Adam, "step", "optimizer.step")
        self.wrap(optim.Sgd, "step", "optimizer.step")
        for attr in ("_poll_events", "_dispatch", "_offer", "_offer_later", "apply"):
            self.wrap(N, attr, f"node.{attr}")
        for attr in ("on_message", "_barrier_local"):
            self.wrap(R, attr, f"schedule.{attr}")
        for attr in ("sends", "take", "verdict"):
            self.wrap(S, attr, f"steps.{attr}")
        for attr in ("to_wire", "from_wire"):
            self.wrap(steps, attr, f"steps:{attr}")

        # transport.recv: time it, and histogram how long each call waited (a step should never
        # sit out a poll timeout: every wait must end because a message arrived).
        orig_recv = transport.Transport.recv
        self.wrap(transport.Transport, "recv", "transport.recv")
        timed_recv = transport.Transport.recv

        def recv(this: Any, timeout_s: float) -> Any:
            t0 = time.perf_counter()
            item = timed_recv(this, timeout_s)
            dt = time.perf_counter() - t0
            bucket = "<0.1ms" if dt < 1e-4 else "<1ms" if dt < 1e-3 else "<10ms" if dt < 1e-2 else \
                "<100ms" if dt < 0.1 else ">=100ms"
            h = probe.recv_hist.setdefault(probe.phase, {})
            h[bucket] = h.get(bucket, 0) + 1
            if item is None:
                probe.recv_timeouts[probe.phase] = probe.recv_timeouts.get(probe.phase, 0) + 1
            return item

        recv.__wrapped__ = orig_recv  # type: ignore[attr-defined]
        transport.Transport.recv = recv  # type: ignore[method-assign]

        orig_begin = E.begin_step

        def begin_step(this: Any, step: int, phase: str, ids: Any, **kwargs: Any) -> Any:
            if probe.phase != phase:
                probe.set_phase(phase)
            probe.steps[phase] = probe.steps.get(phase, 0) + 1
            return orig_begin(this, step, phase, ids, **kwargs)

        E.begin_step = begin_step  # type: ignore[method-assign]
        orig_barrier = R._barrier_local.__wrapped__  # type: ignore[attr-defined]
        timed_barrier = R._barrier_local

        def barrier_local(this: Any, *a: Any, **k: Any) -> Any:
            probe.set_phase("barrier")
            return timed_barrier(this, *a, **k)

        barrier_local.__wrapped__ = orig_barrier  # type: ignore[attr-defined]
        R._barrier_local = barrier_local  # type: ignore[method-assign]
        # The coordinator starts the barrier by broadcasting BARRIER before _barrier_local.
        orig_coord_barrier = R._barrier

        def coord_barrier(this: Any, *a: Any, **k: Any) -> Any:
            probe.set_phase("barrier")
            return orig_coord_barrier(this, *a, **k)

        R._barrier = coord_barrier  # type: ignore[method-assign]

    def dump(self, path: str) -> None:
        self.set_phase("end")
        data = {"pid": os.getpid(), "wall": self.wall, "steps": self.steps, "incl": self.incl, "excl": self.excl,
                "excl_cpu": self.excl_cpu, "cpu": self.cpu,
                "calls": self.calls, "recv_hist": self.recv_hist, "recv_timeouts": self.recv_timeouts}
        Path(path).write_text(json.dumps(data, indent=1, sort_keys=True))


def _probe_main(out: str, argv: list[str]) -> None:
    """`split_vs_local.py _probe OUT.json peer run CFG ...`: the peer command under the section timer."""
    # What apply_thread_policy(1) does (the bench's peers have threads: 1), before torch loads.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import secure_split.cli.threads as threads

    threads.apply_thread_policy = lambda n: None  # type: ignore[assignment]
    if out != "-":
        import atexit

        probe = _Probe()
        probe.install()
        atexit.register(probe.dump, out)
    sys.argv = ["secure-split", *argv]
    from secure_split.cli.main import main

    main()


# Sections grouped for the per-step breakdown (exclusive times; see _Probe.install for the names).
CATEGORIES: dict[str, tuple[str, ...]] = {
    "compute (forward, backward, optimizer)": ("executor._forward", "executor._backward", "optimizer.step"),
    "executor bookkeeping and checks": ("executor.begin_step", "executor.on_activation", "executor.on_gradient",
                                        "executor.finish_step", "executor._check_tensor", "executor._advance_guarded",
                                        "steps:from_wire", "steps:to_wire"),
    "gate: egress leakage guard": ("gate:check_egress",),
    "gate: policy decisions": ("policy.decide",),
    "gate: session bind/check": ("session.bind", "session.receive"),
    "gate: codec (encode, decode)": ("gate:encode", "gate:decode_header", "gate:decode_body"),
    "gate: SHA-256 of the frames": ("gate:sha256_frames",),
    "gate: audit entries (JSON, hash chain, write)": ("audit.record", "audit.write(2)"),
    "gate: glue": ("gate.send", "gate.receive", "gate._send_prebound"),
    "transport (zmq send/recv, monitors)": ("transport.send", "transport.recv", "transport.take", "transport.events"),
    "node loop and schedule (dispatch, queue, events, steps)": (
        "node._poll_events", "node._dispatch", "node._offer", "node._offer_later", "node.apply",
        "schedule.on_message", "steps.sends", "steps.take", "steps.verdict"),
}


def summarize_profile(probe_dir: Path) -> dict[str, Any]:
    """Per peer, per training step: exclusive wall and CPU ms per section, wall and CPU per step,
    how long each receive waited, and how many receives ended on their timeout."""
    out: dict[str, Any] = {}
    for f in sorted(probe_dir.glob("*.json")):
        d = json.loads(f.read_text())
        n = d["steps"].get("train", 0)
        if not n:
            continue
        excl, excl_cpu = d["excl"].get("train", {}), d["excl_cpu"].get("train", {})
        wall, cpu = d["wall"].get("train", 0.0), d["cpu"].get("train", 0.0)
        order = sorted(excl_cpu, key=lambda k: -excl_cpu[k])
        known = {k for ks in CATEGORIES.values() for k in ks}
        cats = {c: sum(excl_cpu.get(k, 0.0) for k in ks) / n * 1000 for c, ks in CATEGORIES.items()}
        cats["other (uninstrumented, probe)"] = (cpu - sum(v for k, v in excl_cpu.items() if k in known)) / n * 1000
        recv_wait = (excl.get("transport.recv", 0.0) - excl_cpu.get("transport.recv", 0.0)) / n * 1000
        out[f.stem] = {
            "cpu_ms_per_step_by_category": cats,
            "waiting_for_peer_ms_per_step": recv_wait,
            "descheduled_ms_per_step": (wall - cpu) / n * 1000 - recv_wait,
            "train_steps": n,
            "wall_ms_per_step": wall / n * 1000,
            "cpu_ms_per_step": cpu / n * 1000,
            "exclusive_wall_ms_per_step": {k: excl[k] / n * 1000 for k in order},
            "exclusive_cpu_ms_per_step": {k: excl_cpu[k] / n * 1000 for k in order},
            "calls_per_step": {k: v / n for k, v in d["calls"].get("train", {}).items()},
            "uninstrumented_wall_ms_per_step": (wall - sum(excl.values())) / n * 1000,
            "uninstrumented_cpu_ms_per_step": (cpu - sum(excl_cpu.values())) / n * 1000,
            "recv_hist_train": d["recv_hist"].get("train", {}),
            "recv_timeouts_train": d["recv_timeouts"].get("train", 0),
            "recv_hist_eval": d["recv_hist"].get("eval", {}),
            "recv_timeouts_eval": d["recv_timeouts"].get("eval", 0),
            "barrier_wall_ms": d["wall"].get("barrier", 0.0) * 1000,
        }
    return out


def print_profile(model: str, prof: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    peers = list(prof)
    t = Table(title=f"{LABELS[model]}: exclusive ms per training step, CPU / wall")
    t.add_column("section")
    for p in peers:
        t.add_column(f"{p} cpu", justify="right")
        t.add_column(f"{p} wall", justify="right")
    keys: list[str] = []
    for p in peers:
        for k in prof[p]["exclusive_cpu_ms_per_step"]:
            if k not in keys and (prof[p]["exclusive_cpu_ms_per_step"][k] >= 0.01
                                  or prof[p]["exclusive_wall_ms_per_step"][k] >= 0.05):
                keys.append(k)
    for k in keys:
        t.add_row(k, *[f"{prof[p][col].get(k, 0.0):.3f}" for p in peers
                       for col in ("exclusive_cpu_ms_per_step", "exclusive_wall_ms_per_step")])
    t.add_row("(runtime loop, uninstrumented)", *[f"{prof[p][col]:.3f}" for p in peers for col in
                                                  ("uninstrumented_cpu_ms_per_step", "uninstrumented_wall_ms_per_step")])
    t.add_row("[bold]total per step", *[f"[bold]{prof[p][col]:.3f}" for p in peers
                                        for col in ("cpu_ms_per_step", "wall_ms_per_step")])
    Console(width=200).print(t)
    c = Table(title=f"{LABELS[model]}: ms per training step by category (CPU; then wall spent waiting)")
    c.add_column("category")
    for p in peers:
        c.add_column(p, justify="right")
    for cat in prof[peers[0]]["cpu_ms_per_step_by_category"]:
        c.add_row(cat, *[f"{prof[p]['cpu_ms_per_step_by_category'][cat]:.3f}" for p in peers])
    c.add_row("[bold]CPU per step", *[f"[bold]{prof[p]['cpu_ms_per_step']:.3f}" for p in peers])
    c.add_row("waiting for the other peer(s)", *[f"{prof[p]['waiting_for_peer_ms_per_step']:.3f}" for p in peers])
    c.add_row("runnable but not running (shared cores)", *[f"{prof[p]['descheduled_ms_per_step']:.3f}" for p in peers])
    c.add_row("[bold]wall per step", *[f"[bold]{prof[p]['wall_ms_per_step']:.3f}" for p in peers])
    Console(width=200).print(c)
    for p in peers:
        print(f"  {p}: receives during training steps by wait time {prof[p]['recv_hist_train']}, "
              f"{prof[p]['recv_timeouts_train']} ended on the poll timeout")


# -- main ----------------------------------------------------------------------------------------


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_probe":
        _probe_main(sys.argv[2], sys.argv[3:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="< 60 s: 1 repeat, few epochs")
    ap.add_argument("--repeats", type=int, default=None, help="repeats (default 3; --quick 1)")
    ap.add_argument("--models", default="cnn,mlp,chain,cnn-wide,cnn-overlap,mlp-overlap,chain-overlap,resnet18",
                    help="comma-separated subset of cnn,mlp,chain,cnn-wide,cnn-overlap,mlp-overlap,chain-overlap,"
                         "resnet18 (resnet18 needs torchvision: pip install 'secure-split[vision]')")
    ap.add_argument("--epochs", type=int, default=None, help="epochs per run for cnn and chain (mlp: 3x)")
    ap.add_argument("--profile", action="store_true", help="per-step breakdown with every peer under the section timer")
    ap.add_argument("--cprofile", type=Path, default=None, help="also write cProfile dumps of every peer here")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the generated deployments here")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default: bench/results/split_vs_local*.json)")
    ap.add_argument("--timeout", type=float, default=600.0)
    args = ap.parse_args()

    # One torch thread in this process too, set before torch is imported.
    sys.path.insert(0, str(ROOT))
    from secure_split.cli.threads import apply_thread_policy

    apply_thread_policy(1)
    import torch

    torch.set_num_threads(1)

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    base = args.epochs or (3 if args.quick else 6)
    epochs = {"cnn": base, "chain": base, "mlp": 3 * base, "cnn-wide": base, "cnn-overlap": base, "mlp-overlap": 3 * base,
              "chain-overlap": base, "resnet18": 3}
    repeats = args.repeats or (1 if args.quick else 3)
    started = time.monotonic()
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="split_vs_local-")
        workroot = Path(tmp.name)
    else:
        workroot = args.workdir.resolve()
    RESULTS.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {msg}", file=sys.stderr, flush=True)

    try:
        return _run(args, models, epochs, repeats, workroot, started, log)
    except RuntimeError as exc:
        log(f"FAILED: {exc}")
        return 1
    finally:
        if tmp is not None:
            tmp.cleanup()


def _run(args: argparse.Namespace, models: list[str], epochs: dict[str, int], repeats: int, workroot: Path,
         started: float, log: Callable[[str], None]) -> int:
    load_before = os.getloadavg()
    if args.profile or args.cprofile:
        profile: dict[str, Any] = {}
        for m in models:
            plan = plan_for(m, epochs[m])
            pdir = workroot / "probe" / m
            pdir.mkdir(parents=True, exist_ok=True)
            for f in pdir.glob("*.json"):
                f.unlink()
            res = run_split(plan, workroot / f"profile-{m}", timeout_s=args.timeout,
                            probe=pdir if args.profile else None, cprofile=args.cprofile)
            log(f"profiled {m}: {statistics.median(_measured(res['epochs'])) * 1000:.1f} ms/epoch under the probe")
            if args.profile:
                profile[m] = {"split_s_per_epoch_under_probe": statistics.median(_measured(res["epochs"])),
                              "peers": summarize_profile(pdir)}
                print_profile(m, profile[m]["peers"])
        if args.profile:
            out = args.out or RESULTS / "split_vs_local_profile.json"
            out.write_text(json.dumps({"machine": machine() | {"loadavg_before": load_before},
                                       "profile": profile}, indent=1, sort_keys=True))
            log(f"wrote {out}")
        return 0
    results = bench(models, epochs, repeats, workroot, args.timeout, log)
    print_table(results)
    doc = {
        "method": __doc__.split("\n\n")[1:4],
        "quick": args.quick,
        "machine": machine() | {"loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "threads_per_process": 1,
        "wall_s": time.monotonic() - started,
        "results": results,
    }
    out = args.out or RESULTS / ("split_vs_local_quick.json" if args.quick else "split_vs_local.json")
    out.write_text(json.dumps(doc, indent=1, sort_keys=True))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
