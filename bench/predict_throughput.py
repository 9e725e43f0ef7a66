"""Split inference throughput: `secure-split serve` + `secure-split predict` vs the same model in one process.

For two trained deployments — the digits CNN as vanilla (owner.bottom -> label_holder.top: the
label holder returns each batch's predicted classes) and as U-shaped (owner.head -> server.middle
-> owner.tail: the owner's tail predicts) — and batch sizes 64 and 256 it measures, in one run
and interleaved:

- **split**: `secure-split serve` at the server and `secure-split predict` at the owner, each its
  own OS process with 1 torch thread, everything on: CURVE + ZAP, the policy gate on both sides
  (the owner's egress guards included), the hash-chained audit log (every batch is two or three
  logged messages at each end), the owner's route check and the closing exchange of signed heads;
- **local**: `engine.inference.predict_locally` on the same checkpointed segments in this
  process, 1 torch thread, no_grad, the same input and batch size.

What is timed: samples/s from the first batch to the last prediction. Split: the predict
process's own clock (`--result`: metrics.samples_per_s): no process start, checkpoint load,
handshake or closing receipts. Local: the `predict_locally` call. The input is the owner's
digits file repeated (fresh ids) so one run lasts long enough to time. Reported: medians over
the repeats; ratio = local samples/s / split samples/s (how many times slower split inference
is). Split and local alternate order from one repeat to the next. Every split run's predictions
are checked against the local ones (>= 99 % equal) and the audit logs verified at the end.

Usage::

    .venv/bin/python bench/predict_throughput.py           # full run (a few minutes on 2 cores)
    .venv/bin/python bench/predict_throughput.py --quick   # 1 repeat, fewer samples

Writes bench/results/predict_throughput.json (--quick: predict_throughput_quick.json).
Exit status: 0, or 1 when a run failed or its predictions disagreed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _host import machine

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
SCENARIOS = {"vanilla": ("label_holder", "top"), "u-shaped": ("server", "tail")}
LABELS = {"vanilla": "digits CNN, vanilla (prediction message)", "u-shaped": "digits CNN, U-shaped (owner's tail)"}
ENV = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "secure_split", *args]


def train(scenario: str, workdir: Path, timeout_s: float) -> Any:
    """Generate the demo deployment and train it for one epoch (every peer its own process)."""
    from secure_split.cli import demo
    from secure_split.cli.output import err_console
    from secure_split.scenarios import SCENARIOS, generate

    plan = SCENARIOS[scenario](1)
    gen = generate(plan, workdir)
    launched = demo.launch_peers(gen, plan.coordinator)
    with err_console.capture():
        demo.watch_peers(launched, plan.coordinator, timeout_s=timeout_s, quiet=True)
    bad = {n: p.proc.returncode for n, p in launched.items() if p.proc.returncode != 0}
    if bad:
        raise RuntimeError(f"training {scenario} failed: {bad}; logs in {workdir / 'logs'}")
    return gen


def write_input(gen: Any, repeat: int) -> Path:
    """The owner's features `repeat` times over, with fresh ids (no labels)."""
    import torch

    from secure_split.engine.data import load_peer_data, write_peer_data

    owner = load_peer_data(gen.workdir / "data" / "owner.safetensors")
    assert owner.features is not None
    n = len(owner)
    path = gen.workdir / "data" / f"bench_input_x{repeat}.safetensors"
    write_peer_data(path, ids=torch.arange(n * repeat, dtype=torch.int64),
                    features=owner.features.repeat(repeat, *([1] * (owner.features.dim() - 1))))
    return path


def run_split(gen: Any, server: str, input_path: Path, batch: int, tag: str, timeout_s: float) -> dict[str, Any]:
    """One request: serve (one request) + predict, as two processes; the predict's own timing."""
    logs = gen.workdir / "logs"
    out, result = logs / f"pred-{tag}.csv", logs / f"pred-{tag}.json"
    env = dict(os.environ, **ENV)
    with open(logs / f"serve-{tag}.log", "wb") as fh:
        serve = subprocess.Popen(cli("serve", str(gen.peer_configs[server]), "--max-requests", "1", "--threads", "1",
                                     "--quiet"), stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    try:
        pred = subprocess.run(cli("predict", str(gen.peer_configs["owner"]), "--input", str(input_path), "--output",
                                  str(out), "--batch-size", str(batch), "--threads", "1", "--result", str(result),
                                  "--quiet"), capture_output=True, text=True, env=env, timeout=timeout_s, check=False)
        serve_code = serve.wait(timeout=60)
    finally:
        if serve.poll() is None:
            serve.kill()
    if pred.returncode != 0 or serve_code != 0:
        raise RuntimeError(f"split run {tag} failed: predict {pred.returncode} {pred.stderr[-800:]}; serve {serve_code}")
    data = json.loads(result.read_text())
    with out.open() as fh:
        preds = [int(row[1]) for row in list(csv.reader(fh))[1:]]
    return {"samples_per_s": data["metrics"]["samples_per_s"], "seconds": data["metrics"]["seconds"],
            "bytes_sent": data["bytes_sent"], "bytes_received": data["bytes_received"],
            "messages_sent": data["messages_sent"], "predictions": preds}


def run_local(gen: Any, output: str, input_path: Path, batch: int) -> dict[str, Any]:
    """The same checkpoints, every segment in this process."""
    from secure_split.config import load_deployment, load_peer_config
    from secure_split.engine.data import load_peer_data
    from secure_split.engine.inference import predict_locally, trained_segments

    dep = load_deployment(gen.deployment)
    segments = trained_segments(dep, {n: load_peer_config(c) for n, c in gen.peer_configs.items()}, epoch=0)
    features = load_peer_data(input_path).features
    assert features is not None
    inputs = {s: features for s, seg in dep.spec.segments.items() if seg.input == "features"}
    predict_locally(dep, segments, {s: x[:batch] for s, x in inputs.items()}, batch_size=batch)  # warm-up
    t0 = time.perf_counter()
    preds = predict_locally(dep, segments, inputs, batch_size=batch)[output]
    seconds = time.perf_counter() - t0
    return {"samples_per_s": len(preds) / seconds, "seconds": seconds, "predictions": preds.tolist()}


def bench(batches: list[int], repeat_data: int, repeats: int, workroot: Path, timeout_s: float,
          log: Callable[[str], None]) -> dict[str, Any]:
    from secure_split.audit import verify_logs
    from secure_split.config import load_deployment
    from secure_split.policy import load_policy

    results: dict[str, Any] = {}
    for scenario, (server, output) in SCENARIOS.items():
        gen = train(scenario, workroot / scenario, timeout_s)
        input_path = write_input(gen, repeat_data)
        log(f"trained {scenario}; input {input_path.name}")
        for batch in batches:
            split, local, agree = [], [], []
            for r in range(repeats):
                order = ("split", "local") if r % 2 == 0 else ("local", "split")
                runs: dict[str, dict[str, Any]] = {}
                for which in order:
                    if which == "split":
                        runs[which] = run_split(gen, server, input_path, batch, f"b{batch}-r{r}", timeout_s)
                    else:
                        runs[which] = run_local(gen, output, input_path, batch)
                a, b = runs["split"].pop("predictions"), runs["local"].pop("predictions")
                agree.append(sum(x == y for x, y in zip(a, b, strict=True)) / len(a))
                split.append(runs["split"])
                local.append(runs["local"])
                log(f"{scenario} batch {batch} repeat {r}: split {runs['split']['samples_per_s']:.0f}/s, "
                    f"local {runs['local']['samples_per_s']:.0f}/s, agreement {agree[-1]:.4f}")
            s = statistics.median(x["samples_per_s"] for x in split)
            loc = statistics.median(x["samples_per_s"] for x in local)
            results[f"{scenario}/b{batch}"] = {
                "scenario": scenario, "label": LABELS[scenario], "batch_size": batch, "samples": len(a),
                "split_samples_per_s": s, "local_samples_per_s": loc, "ratio_local_over_split": loc / s,
                "min_agreement": min(agree), "split_runs": split, "local_runs": local,
                "bytes_per_sample": statistics.median((x["bytes_sent"] + x["bytes_received"]) / len(a) for x in split),
            }
            if min(agree) < 0.99:
                raise RuntimeError(f"{scenario} batch {batch}: split and local predictions agree on only {min(agree):.4f}")
        report = verify_logs(gen.workdir / "audit", load_deployment(gen.deployment), load_policy(gen.policy))
        if not report.clean:
            raise RuntimeError(f"{scenario}: the audit logs do not verify: {report.to_dict()}")
        results[f"{scenario}/audit_verified"] = True
    return results


def print_table(results: dict[str, Any]) -> None:
    rows = [r for r in results.values() if isinstance(r, dict)]
    print(f"{'deployment':44} {'batch':>5} {'local/s':>9} {'split/s':>9} {'ratio':>7} {'B/sample':>9}")
    for r in rows:
        print(f"{r['label']:44} {r['batch_size']:5d} {r['local_samples_per_s']:9.0f} {r['split_samples_per_s']:9.0f} "
              f"{r['ratio_local_over_split']:6.2f}x {r['bytes_per_sample']:9.0f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 repeat, the input twice over")
    parser.add_argument("--batches", default="64,256", help="batch sizes, comma-separated")
    parser.add_argument("--repeats", type=int, default=None, help="runs per setting (default 3; --quick 1)")
    parser.add_argument("--repeat-data", type=int, default=None, help="input = owner's digits this many times (default 5)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep deployments and logs here")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per process")
    parser.add_argument("--out", type=Path, default=None, help="results file")
    args = parser.parse_args()

    os.environ.update(ENV)
    import torch

    torch.set_num_threads(1)
    repeats = args.repeats or (1 if args.quick else 3)
    repeat_data = args.repeat_data or (2 if args.quick else 5)
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    started = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {msg}", file=sys.stderr, flush=True)

    tmp = tempfile.TemporaryDirectory(prefix="predict_throughput-") if args.workdir is None else None
    workroot = Path(tmp.name) if tmp is not None else args.workdir.resolve()
    load_before = os.getloadavg()
    try:
        results = bench(batches, repeat_data, repeats, workroot, args.timeout, log)
    except RuntimeError as exc:
        log(f"FAILED: {exc}")
        return 1
    finally:
        if tmp is not None:
            tmp.cleanup()
    print_table(results)
    doc = {
        "method": __doc__.split("\n\n")[1:4],
        "quick": args.quick,
        "repeats": repeats,
        "machine": machine() | {"loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "threads_per_process": 1,
        "wall_s": time.monotonic() - started,
        "results": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = args.out or RESULTS / ("predict_throughput_quick.json" if args.quick else "predict_throughput.json")
    out.write_text(json.dumps(doc, indent=1, sort_keys=True))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
