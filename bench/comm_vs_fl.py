"""Per-owner bytes and FLOPs per epoch: split learning (SplitFed, sequential) vs FedAvg, on the wire.

For the same model and data, measures what one data owner sends plus receives in one epoch of
split learning (cut-layer activations out, their gradients in, plus the bottom-weight sync of
SplitFed or the hand-off of sequential split learning) and in one FedAvg round (the whole model
in, the update out), and the training FLOPs the owner spends, for many owner counts N. Compares
the measurements with the analytic formula of `_comm_model.Workload` (docs/comm-vs-fl.md), finds
where the byte curves cross, and writes docs/img/comm_vs_fl_bytes.png and comm_vs_fl_flops.png.

What is real: every message is a `secure_split.protocol.Message` (activation, gradient,
encrypted_weights with a NaCl-sealed float32 parameter blob) encoded with the real codec and sent
through real `secure_split.transport.Transport`s (CURVE, ZAP allowlist) between three peers on
127.0.0.1; bytes are the owner transport's counters. FLOPs are `FlopCounterMode` counts of one
forward+backward, per sample, times the owner's samples. One representative owner per N is
measured (traffic depends only on D/N), not N processes.

Setups: (1) the digits CNN of `engine.zoo` on the digits data (D = 1,437 training images, 1×8×8),
every batch computed and sent; (2) a CIFAR ResNet-18 (11.2 M parameters, 100 classes) on
CIFAR-shaped synthetic data (D = 50,000, 3×32×32), cut after `--cut` (default layer1): one real
batch is computed and sent per owner size, the other full batches are scaled from it, and that
scaling is checked against owners whose every batch is sent.

Usage::

    .venv/bin/python bench/comm_vs_fl.py            # full run (< 3 min on 2 cores), writes the PNGs
    .venv/bin/python bench/comm_vs_fl.py --quick    # < 30 s, fewer points, no PNGs
    .venv/bin/python bench/comm_vs_fl.py --markdown /tmp/tables.md   # also write markdown tables

Exit status 1 when a measurement and the formula differ by more than 5 %.
"""

from __future__ import annotations

import os

# Three peers and torch share the cores of one process: keep idle OpenMP threads from spinning.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import math
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from _comm_model import (
    RESNET_CUTS,
    LoopbackWire,
    Scheme,
    SplitModel,
    TensorCache,
    TrainingFlops,
    WeightTraffic,
    Workload,
    count_training_flops,
    digits_split,
    interpolated_crossing,
    mean_over_owners,
    measure_owner_epoch,
    measure_weight_sync,
    resnet18_split,
    smallest_owner_count,
    synthetic_cifar,
    workload_of,
)
from rich.console import Console
from rich.table import Table

from secure_split.engine.data import digits

REPO = Path(__file__).resolve().parent.parent
IMG_DIR = REPO / "docs" / "img"

DIGITS_SAMPLES = 1437
"""The digits training set: 1,797 images less the demos' 20 % test split."""
CIFAR_SAMPLES = 50_000
"""CIFAR-10/100 training set size."""
CIFAR_CLASSES = 100
BATCH_SIZE = 64
OWNER_GRID = (2, 5, 10, 20, 50, 100, 200, 500, 1000)
QUICK_GRID = (10, 50, 100, 500)
ISSUE_OWNERS = (10, 50, 100)
TOLERANCE = 0.05
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # the whole ResNet-18 (44.9 MB) travels in one FedAvg message

SEED_TFLOPS = {100: (0.15, 29.4), 500: (0.03, 5.89)}
"""The seed's computation per client, TFLOPs (split, FL), VGG on CIFAR-10."""
SEED_GB = {100: (6.0, 3.0), 500: (1.2, 2.4)}
"""The seed's communication per client, GB (split, FL), ResNet on CIFAR-100."""


# ---------------------------------------------------------------------------------------------
# Measuring one setup
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    """Measured and predicted per-owner cost at one owner count (means over an even split).

    Attributes:
        owners: N.
        samples: D/N.
        cut_bytes: measured activation + gradient bytes of the owner.
        weights: measured weight traffic per round (the same at every N).
        split_flops: measured training FLOPs of the owner in split learning.
        fedavg_flops: measured training FLOPs of the owner in FedAvg.
        workload: the analytic model.
        extrapolated: some full batches were scaled from the ones sent.
    """

    owners: int
    samples: float
    cut_bytes: float
    weights: WeightTraffic
    split_flops: float
    fedavg_flops: float
    workload: Workload
    extrapolated: bool

    def split_bytes(self, scheme: Scheme = "splitfed") -> float:
        """Measured split-learning bytes of the owner per epoch."""
        return self.cut_bytes + self.weights.for_scheme(scheme)

    @property
    def fedavg_bytes(self) -> float:
        """Measured FedAvg bytes of the owner per round."""
        return self.weights.fedavg

    def errors(self) -> dict[str, float]:
        """|measured − analytic| / measured for each quantity."""
        w, n = self.workload, self.owners
        pairs = {
            "split bytes": (self.split_bytes(), w.split_bytes(n)),
            "sequential bytes": (self.split_bytes("sequential"), w.split_bytes(n, "sequential")),
            "vanilla bytes": (self.split_bytes("vanilla"), w.split_bytes(n, "vanilla")),
            "FedAvg bytes": (self.fedavg_bytes, w.fedavg_bytes()),
            "split FLOPs": (self.split_flops, w.split_flops(n)),
            "FedAvg FLOPs": (self.fedavg_flops, w.fedavg_flops(n)),
        }
        return {k: abs(m - a) / m for k, (m, a) in pairs.items()}


@dataclass
class Crossing:
    """Where split and FedAvg bytes per owner meet, for one scheme.

    Attributes:
        scheme: splitfed (= sequential up to a few header bytes) or vanilla.
        formula: N* from `Workload.crossing_owners` (closed form).
        formula_count: the whole N from `Workload.crossing_owner_count` (whole batches).
        interpolated: (N, grid below, grid above) from the measured grid, or None.
        bisected: the smallest integer N where measured split <= measured FedAvg, or None.
    """

    scheme: Scheme
    formula: float | None
    formula_count: int | None
    interpolated: tuple[float, float, float] | None
    bisected: int | None


@dataclass
class SetupResult:
    """Everything measured for one model and dataset.

    Attributes:
        model: the split model.
        workload: the analytic model.
        weights: measured weight traffic.
        flops: measured FLOPs per sample.
        points: one per owner count of the grid.
        crossings: per scheme.
        checks: scaling checks (description, scaled bytes, bytes with every batch sent).
        seconds: wall time of the measurement.
    """

    model: SplitModel
    workload: Workload
    weights: WeightTraffic
    flops: TrainingFlops
    points: list[Point]
    crossings: list[Crossing]
    checks: list[tuple[str, float, float]] = field(default_factory=list)
    seconds: float = 0.0


class OwnerMeter:
    """One setup's representative owner: measures (and caches) its cut bytes per sample count.

    Args:
        wire: the loopback peers.
        model: the split model.
        x: input rows.
        y: labels.
        samples: D.
        sample_batches: None sends every batch; k sends k full batches and scales the rest.
        reuse_tensors: compute one batch for real and reuse its tensors (bytes depend on shapes only).
    """

    def __init__(
        self, wire: LoopbackWire, model: SplitModel, x: torch.Tensor, y: torch.Tensor, *, samples: int,
        sample_batches: int | None, reuse_tensors: bool,
    ) -> None:  # fmt: skip
        self.wire, self.model, self.x, self.y = wire, model, x, y
        self.samples = samples
        self.sample_batches = sample_batches
        self.cache = TensorCache() if reuse_tensors else None
        self._bytes: dict[int, tuple[float, bool]] = {}

    def owner(self, samples: int) -> tuple[float, bool]:
        """(cut bytes, extrapolated) of an owner holding `samples` samples, measured once."""
        if samples not in self._bytes:
            traffic = measure_owner_epoch(
                self.wire, self.model, self.x, self.y, samples, batch_size=BATCH_SIZE,
                sample_batches=self.sample_batches, cache=self.cache,
            )  # fmt: skip
            self._bytes[samples] = (traffic.bytes, traffic.extrapolated)
        return self._bytes[samples]

    def mean_cut_bytes(self, owners: int) -> float:
        """Mean cut bytes per owner when D samples are split evenly among `owners`."""
        return mean_over_owners(self.samples, owners, lambda n: self.owner(n)[0])

    def extrapolated(self, owners: int) -> bool:
        """Whether any owner size at this N was scaled rather than fully sent."""
        small, larger = divmod(self.samples, owners)
        sizes = [max(1, small)] + ([small + 1] if larger else [])
        return any(self.owner(n)[1] for n in sizes)


def measure_setup(
    wire: LoopbackWire,
    model: SplitModel,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    samples: int,
    grid: Sequence[int],
    sample_batches: int | None,
    reuse_tensors: bool,
    bisect: bool,
    flop_batch: int,
    full_checks: Sequence[tuple[int, bool]] = (),
) -> SetupResult:
    """Measure one setup at every owner count of `grid`, find the crossings, run scaling checks.

    Args:
        wire: the loopback peers.
        model: the split model.
        x: input rows (for FLOP counting, the first few; for sending, cycled).
        y: labels.
        samples: D.
        grid: owner counts.
        sample_batches: see `OwnerMeter`.
        reuse_tensors: see `OwnerMeter`.
        bisect: also find the exact integer crossing by bisection, measuring at each probe.
        flop_batch: rows of `x` to count FLOPs on (conv/linear FLOPs are linear in the batch, so a
            small batch gives the same FLOPs per sample for less compute).
        full_checks: (N, compute every batch) pairs at which an owner's whole epoch is sent and
            compared with the scaled measurement.

    Returns:
        The setup's results.
    """
    start = time.perf_counter()
    workload = workload_of(model, samples=samples, batch_size=BATCH_SIZE)
    flops = count_training_flops(model, x[:flop_batch], y[:flop_batch])
    weights = measure_weight_sync(wire, model)
    meter = OwnerMeter(wire, model, x, y, samples=samples, sample_batches=sample_batches,
                       reuse_tensors=reuse_tensors)  # fmt: skip
    points = [
        Point(
            owners=n, samples=samples / n, cut_bytes=meter.mean_cut_bytes(n), weights=weights,
            split_flops=flops.split_owner * samples / n, fedavg_flops=flops.fedavg_owner * samples / n,
            workload=workload, extrapolated=meter.extrapolated(n),
        )
        for n in grid
    ]  # fmt: skip
    crossings = []
    schemes: tuple[Scheme, ...] = ("splitfed", "vanilla")
    for scheme in schemes:
        sync = weights.for_scheme(scheme)

        def split_is_cheaper(owners: int, sync: float = sync) -> bool:
            return meter.mean_cut_bytes(owners) + sync <= weights.fedavg

        crossings.append(
            Crossing(
                scheme=scheme,
                formula=workload.crossing_owners(scheme),
                formula_count=workload.crossing_owner_count(scheme),
                interpolated=interpolated_crossing(
                    [p.owners for p in points],
                    [p.split_bytes(scheme) for p in points],
                    [p.fedavg_bytes for p in points],
                ),
                bisected=smallest_owner_count(split_is_cheaper, 1, samples) if bisect else None,
            )
        )
    checks = []
    for owners, compute in full_checks:
        owner_samples = samples // owners
        scaled = meter.owner(owner_samples)[0]
        sent = measure_owner_epoch(
            wire, model, x, y, owner_samples, batch_size=BATCH_SIZE, sample_batches=None,
            cache=None if compute else meter.cache,
        )  # fmt: skip
        how = "every batch computed and sent" if compute else "every batch sent"
        checks.append((f"N = {owners} ({owner_samples} samples, {sent.batches} batches, {how})", scaled,
                       sent.bytes))  # fmt: skip
    return SetupResult(
        model=model, workload=workload, weights=weights, flops=flops, points=points, crossings=crossings,
        checks=checks, seconds=time.perf_counter() - start,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def fmt_bytes(value: float) -> str:
    """Decimal units, 3 significant digits: 262 MB, 1.20 MB, 52.2 kB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.0f} B"


def fmt_flops(value: float) -> str:
    """FLOPs with an SI prefix, 3 significant digits: 457 GFLOP."""
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.0f} FLOP"


def fmt_owners(value: float | None) -> str:
    """An owner count, whole when large."""
    if value is None:
        return "none"
    if isinstance(value, int) or value >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}"


TABLE_COLUMNS = (
    "N", "samples/owner", "split B/owner", "FedAvg B/owner", "split÷FedAvg", "split FLOPs/owner",
    "FedAvg FLOPs/owner", "formula split B", "formula FedAvg B", "formula split FLOPs",
    "formula FedAvg FLOPs", "max rel. error", "≤ 5 %",
)  # fmt: skip


def table_rows(result: SetupResult) -> list[list[str]]:
    """The rows of one setup's table, as text."""
    rows = []
    for p in result.points:
        w, n = result.workload, p.owners
        worst = max(p.errors().values())
        mark = "*" if p.extrapolated else ""
        issue = " ←" if n in ISSUE_OWNERS else ""
        rows.append([
            f"{n}{issue}", f"{p.samples:.1f}", fmt_bytes(p.split_bytes()) + mark, fmt_bytes(p.fedavg_bytes),
            f"{p.split_bytes() / p.fedavg_bytes:.3g}", fmt_flops(p.split_flops), fmt_flops(p.fedavg_flops),
            fmt_bytes(w.split_bytes(n)), fmt_bytes(w.fedavg_bytes()), fmt_flops(w.split_flops(n)),
            fmt_flops(w.fedavg_flops(n)), f"{100 * worst:.3f} %", "yes" if worst <= TOLERANCE else "NO",
        ])  # fmt: skip
    return rows


def crossing_lines(result: SetupResult) -> list[str]:
    """One sentence per scheme: formula N*, measured crossing on the grid and by bisection."""
    lines = []
    for c in result.crossings:
        label = "SplitFed / sequential" if c.scheme == "splitfed" else "vanilla (no weight sync)"
        if c.interpolated:
            grid = (
                f"measured grid: between N = {c.interpolated[1]:.0f} and {c.interpolated[2]:.0f}, "
                f"interpolated (linear in 1/N) N ≈ {fmt_owners(c.interpolated[0])}"
            )
        else:
            first = result.points[0]
            cheaper = "split" if first.split_bytes(c.scheme) < first.fedavg_bytes else "FedAvg"
            grid = f"measured grid: no crossing, {cheaper} is cheaper at every N from {first.owners}"
        exact = f"; bisection on measurements: split ≤ FedAvg from N = {c.bisected}" if c.bisected else ""
        lines.append(
            f"{label}: formula N* = {fmt_owners(c.formula)} (closed form), split ≤ FedAvg from "
            f"N = {fmt_owners(c.formula_count)} (whole batches); {grid}{exact}"
        )
    return lines


def describe(result: SetupResult) -> list[str]:
    """The setup's constants and its measured weight and FLOP figures, against the formula."""
    w, m, f = result.workload, result.model, result.flops
    return [
        f"model: {m.source}",
        f"D = {w.samples:,} samples of {'×'.join(map(str, m.sample_shape))}, b = {w.batch_size}, "
        f"A = {w.cut_floats:,} floats/sample at the cut, W_bottom = {w.bottom_params:,}, "
        f"W_total = {w.total_params:,} parameters",
        f"forward FLOPs/sample (layer shapes): F_bottom = {fmt_flops(w.bottom_forward_flops)}, "
        f"F_total = {fmt_flops(w.total_forward_flops)}, first layer F_in = {fmt_flops(w.input_layer_flops)}; "
        f"FlopCounterMode fwd+bwd/sample: owner split {fmt_flops(f.split_owner)}, "
        f"owner FedAvg {fmt_flops(f.fedavg_owner)} (batch {f.batch})",
        f"weights per owner per round, measured (formula): SplitFed {fmt_bytes(result.weights.splitfed)} "
        f"({fmt_bytes(w.weight_sync_bytes('splitfed'))}), sequential {fmt_bytes(result.weights.sequential)} "
        f"({result.weights.sequential - result.weights.splitfed:+.0f} B), "
        f"FedAvg {fmt_bytes(result.weights.fedavg)} ({fmt_bytes(w.fedavg_bytes())})",
    ]


def print_setup(console: Console, title: str, result: SetupResult) -> None:
    """Print one setup: constants, the table, crossings and scaling checks."""
    console.rule(f"[bold]{title}")
    for line in describe(result):
        console.print(line, highlight=False)
    table = Table(show_lines=False, header_style="bold")
    for i, name in enumerate(TABLE_COLUMNS):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in table_rows(result):
        table.add_row(*row)
    console.print(table)
    console.print(
        "bytes: sent + received by one owner per epoch (SplitFed); FedAvg: per round = one local epoch. "
        "← the issue's owner counts."
        + (" * = full batches scaled from one sent batch (see checks)." if any(
            p.extrapolated for p in result.points) else ""),
        highlight=False,
    )  # fmt: skip
    for line in crossing_lines(result):
        console.print(line, highlight=False)
    for what, scaled, sent in result.checks:
        console.print(
            f"scaling check {what}: scaled {scaled:,.0f} B, sent {sent:,.0f} B, "
            f"difference {100 * abs(scaled - sent) / sent:.4f} %",
            highlight=False,
        )
    console.print(f"measured in {result.seconds:.1f} s", highlight=False)


def cut_choices(classes: int) -> list[tuple[str, Workload]]:
    """The formula's view of every ResNet-18 cut (no measurement): where the curves would cross."""
    return [(cut, workload_of(resnet18_split(cut, classes=classes), samples=CIFAR_SAMPLES,
                              batch_size=BATCH_SIZE)) for cut in RESNET_CUTS]  # fmt: skip


def seed_lines(resnet: SetupResult, cut: str) -> list[str]:
    """The seed's reported figures next to ours (per epoch, same owner counts)."""
    w = resnet.workload
    ours_flops = {n: (w.split_flops(n) / 1e12, w.fedavg_flops(n) / 1e12) for n in SEED_TFLOPS}
    ours_gb = {n: (w.split_bytes(n) / 1e9, w.fedavg_bytes() / 1e9) for n in SEED_GB}
    crossing = resnet.crossings[0]
    where = crossing.bisected or crossing.formula
    return [
        "seed, VGG / CIFAR-10, TFLOPs per client (split vs FL): "
        + ", ".join(f"{s:g} vs {f:g} at {n} (ratio {s / f:.4f})" for n, (s, f) in SEED_TFLOPS.items()),
        f"ours, ResNet-18 cut after {cut}, per epoch (split vs FedAvg): "
        + ", ".join(f"{s:.3g} vs {f:.3g} at {n} (ratio {s / f:.4f})" for n, (s, f) in ours_flops.items()),
        "seed, ResNet / CIFAR-100, GB per client (split vs FL): "
        + ", ".join(f"{s:g} vs {f:g} at {n}" for n, (s, f) in SEED_GB.items())
        + " → the curves cross between 100 and 500",
        f"ours, ResNet-18 cut after {cut}, per epoch (SplitFed vs FedAvg): "
        + ", ".join(f"{s:.3g} vs {f:.3g} at {n}" for n, (s, f) in ours_gb.items())
        + f" → cross at N = {fmt_owners(where)}",
        "both agree on the shape: split cost per owner ∝ 1/N, a constant FLOP ratio, a byte crossing "
        "between 100 and 500 owners; the seed's figures are totals over a whole training run (its FL "
        "bytes change with N because the rounds to converge do), ours are per epoch / round.",
    ]


def write_markdown(path: Path, results: Sequence[tuple[str, SetupResult]], cuts: list[tuple[str, Workload]],
                   seed: list[str]) -> None:  # fmt: skip
    """Write the tables, crossings and checks as markdown (for docs/comm-vs-fl.md)."""
    out: list[str] = []
    for title, result in results:
        out += [f"### {title}", ""] + [f"- {line}" for line in describe(result)] + [""]
        out.append("| " + " | ".join(TABLE_COLUMNS) + " |")
        out.append("|" + "|".join("---:" for _ in TABLE_COLUMNS) + "|")
        out += ["| " + " | ".join(row) + " |" for row in table_rows(result)]
        out.append("")
        out += [f"- {line}" for line in crossing_lines(result)]
        out += [f"- scaling check {what}: scaled {s:,.0f} B, sent {m:,.0f} B ({100 * abs(s - m) / m:.4f} %)"
                for what, s, m in result.checks]  # fmt: skip
        out.append("")
    out += ["### ResNet-18 cut points (formula)", "",
            "| cut after | A floats/sample | W_bottom | N* SplitFed | N* vanilla | split÷FedAvg FLOPs |",
            "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for cut, w in cuts:
        out.append(f"| {cut} | {w.cut_floats:,} | {w.bottom_params:,} | {fmt_owners(w.crossing_owners())} | "
                   f"{fmt_owners(w.crossing_owners('vanilla'))} | {w.flops_ratio():.4f} |")  # fmt: skip
    out += ["", "### Seed comparison", ""] + [f"- {line}" for line in seed] + [""]
    path.write_text("\n".join(out), encoding="utf-8")


def plot(results: Sequence[tuple[str, SetupResult]], directory: Path) -> list[Path]:
    """Write the bytes and FLOPs plots (log-log, one panel per setup) into `directory`."""
    import matplotlib  # only when plotting: importing it costs a second

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for what in ("bytes", "flops"):
        fig, axes = plt.subplots(1, len(results), figsize=(6.2 * len(results), 4.6), squeeze=False)
        for ax, (title, r) in zip(axes[0], results, strict=True):
            w = r.workload
            top = min(w.samples, 2 * max(p.owners for p in r.points))
            dense = [10 ** (k / 20) for k in range(0, 1 + int(20 * math.log10(top)))]
            owners = [p.owners for p in r.points]
            if what == "bytes":
                curves: list[tuple[str, Callable[[float], float], list[float], str, str]] = [
                    ("SplitFed / sequential", w.split_bytes, [p.split_bytes() for p in r.points], "C0", "o"),
                    ("split, vanilla", partial(w.split_bytes, scheme="vanilla"),
                     [p.split_bytes("vanilla") for p in r.points], "C2", "^"),
                    ("FedAvg", w.fedavg_bytes, [p.fedavg_bytes for p in r.points], "C1", "s"),
                ]  # fmt: skip
                ax.set_ylabel("bytes per owner per epoch (sent + received)")
            else:
                curves = [
                    ("split (owner's bottom)", w.split_flops, [p.split_flops for p in r.points], "C0", "o"),
                    ("FedAvg (whole model)", w.fedavg_flops, [p.fedavg_flops for p in r.points], "C1", "s"),
                ]
                ax.set_ylabel("training FLOPs per owner per epoch")
            for label, formula, measured, color, marker in curves:
                ax.plot(dense, [formula(n) for n in dense], color=color, lw=1.2, label=f"{label}: formula")
                ax.plot(owners, measured, ls="none", marker=marker, color=color, mfc="none",
                        label=f"{label}: measured")  # fmt: skip
            if what == "bytes":
                c = r.crossings[0]
                at = c.bisected or (c.interpolated[0] if c.interpolated else None)
                if at:
                    ax.axvline(at, color="grey", ls=":", lw=1)
                    ax.annotate(f"N* = {fmt_owners(at)} measured\nformula: {fmt_owners(c.formula_count)} "
                                f"(whole batches),\n{fmt_owners(c.formula)} (closed form)",
                                (at, 0.74), xycoords=("data", "axes fraction"), ha="left", va="top",
                                fontsize=8, xytext=(4, 0), textcoords="offset points",
                                bbox={"fc": "white", "ec": "none", "alpha": 0.85})  # fmt: skip
            else:
                ax.annotate(f"split ÷ FedAvg = {w.flops_ratio():.3g} at every N", (0.03, 0.05),
                            xycoords="axes fraction", fontsize=8)  # fmt: skip
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("data owners N (D split evenly)")
            ax.set_title(title, fontsize=10)
            ax.grid(True, which="major", alpha=0.3)
            ax.legend(fontsize=7, loc="upper right" if what == "flops" else "lower left")
        fig.tight_layout()
        path = directory / f"comm_vs_fl_{what}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add = parser.add_argument
    add("--quick", action="store_true", help="fewer owner counts, no bisection, no PNGs (< 30 s)")
    add("--cut", choices=RESNET_CUTS, default="layer1", help="ResNet-18 cut (default layer1)")
    add("--plots", type=Path, default=None,
        help=f"folder for the PNGs (default {IMG_DIR.relative_to(REPO)}; --quick writes none)")
    add("--no-plots", action="store_true", help="write no PNG")
    add("--markdown", type=Path, default=None, help="also write the tables as markdown here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return 0 when every measurement is within 5 % of the formula."""
    args = parse_args(argv)
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)
    started = time.perf_counter()
    grid = QUICK_GRID if args.quick else OWNER_GRID
    console.print(
        f"comm_vs_fl: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); messages: secure_split.protocol.encode → "
        "secure_split.transport.Transport (CURVE + ZAP) on 127.0.0.1, bytes from the owner transport's "
        "counters (frame payloads: codec header + raw tensors + sealed blob)",
        highlight=False,
    )
    _, x_digits, y_digits = digits()
    x_digits, y_digits = x_digits[:DIGITS_SAMPLES], y_digits[:DIGITS_SAMPLES]
    resnet = resnet18_split(args.cut, classes=CIFAR_CLASSES)
    x_cifar, y_cifar = synthetic_cifar(BATCH_SIZE, CIFAR_CLASSES)
    with LoopbackWire(max_message_bytes=MAX_MESSAGE_BYTES) as wire:
        digits_result = measure_setup(
            wire, digits_split(), x_digits, y_digits, samples=DIGITS_SAMPLES, grid=grid,
            sample_batches=None, reuse_tensors=False, bisect=not args.quick, flop_batch=BATCH_SIZE,
        )  # fmt: skip
        resnet_result = measure_setup(
            wire, resnet, x_cifar, y_cifar, samples=CIFAR_SAMPLES, grid=grid, sample_batches=1,
            reuse_tensors=True, bisect=not args.quick, flop_batch=4,
            full_checks=[(200, False)] if args.quick else [(100, False), (200, False), (500, True)],
        )  # fmt: skip
    results = [
        (f"digits CNN (engine.zoo), digits data, D = {DIGITS_SAMPLES:,}", digits_result),
        (f"ResNet-18 cut after {args.cut}, CIFAR-shaped synthetic data, D = {CIFAR_SAMPLES:,}",
         resnet_result),
    ]
    for title, result in results:
        print_setup(console, title, result)
    cuts = cut_choices(CIFAR_CLASSES)
    console.rule("[bold]ResNet-18 cut points (formula)")
    for cut, w in cuts:
        console.print(
            f"cut after {cut:6}: A = {w.cut_floats:>6,} floats, W_bottom = {w.bottom_params:>9,}, "
            f"N* SplitFed = {fmt_owners(w.crossing_owners()):>5}, "
            f"vanilla = {fmt_owners(w.crossing_owners('vanilla')):>5}, "
            f"split÷FedAvg FLOPs = {w.flops_ratio():.4f}",
            highlight=False,
        )  # fmt: skip
    console.rule("[bold]Seed comparison")
    seed = seed_lines(resnet_result, args.cut)
    for line in seed:
        console.print(line, highlight=False)
    if args.markdown:
        write_markdown(args.markdown, results, cuts, seed)
        console.print(f"markdown: {args.markdown}", highlight=False)
    plots_dir = args.plots or (None if args.quick else IMG_DIR)
    if plots_dir and not args.no_plots:
        for path in plot(results, plots_dir):
            console.print(f"plot: {path}", highlight=False)
    worst = max(max(p.errors().values()) for _, r in results for p in r.points)
    checks = [abs(s - m) / m for _, r in results for _, s, m in r.checks]
    ok = worst <= TOLERANCE and all(c <= TOLERANCE for c in checks)
    console.print(
        f"largest |measured − formula| / measured: {100 * worst:.3f} % (limit {100 * TOLERANCE:.0f} %) — "
        f"{'OK' if ok else 'FAILED'}; total {time.perf_counter() - started:.1f} s",
        highlight=False,
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
