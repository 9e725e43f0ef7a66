"""`secure-split leakage report TARGET`: what a curious peer learns, and what each defence costs.

TARGET is a demo scenario (vanilla, u-shaped, multi-hop) or a deployment file. The report trains
the topology locally once per setting of a sweep of NoPeek α and activation noise σ (and of label
defences on an imbalanced binary task), attacks it, prints the tables and writes leakage.json and
three PNG plots. The measurement itself lives in `secure_split.analysis.leakage`; torch is imported
only after the thread policy is set.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from secure_split.cli.output import console as default_console

app = typer.Typer(
    help="Measure privacy leakage across cut layers and the cost of the defences.", no_args_is_help=True
)


@app.callback()
def _group() -> None:
    """Measure privacy leakage across cut layers and the cost of the defences."""


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def print_report(report: dict[str, Any], console: Console | None = None) -> None:
    """Print the sweep, the label-leakage tables, DCOR's cost and the output files.

    Args:
        report: what `secure_split.analysis.leakage.leakage_report` returned.
        console: where to print (default: stdout).
    """
    out = console or default_console
    base = next((r for r in report["sweep"] if r["alpha"] == 0 and r["noise_std"] == 0), None)
    t = Table(title=f"input leakage on edge {report['recon_edge']} ({report['target']}, held-out data)")
    for col in (
        "setting",
        "accuracy",
        "last 3 epochs",
        "Δ (pts)",
        "DCOR",
        "recon MSE",
        "recon SSIM",
        "act. RMS",
    ):
        t.add_column(col, justify="left" if col == "setting" else "right")
    for r in report["sweep"]:
        delta = f"{100 * (r['accuracy_smoothed'] - base['accuracy_smoothed']):+.1f}" if base else "-"
        t.add_row(
            r["label"],
            f"{100 * r['accuracy']:.1f} %",
            f"{100 * r['accuracy_smoothed']:.1f} %",
            delta,
            _fmt(r["dcor"]),
            _fmt(r["mse"], ".4f"),
            _fmt(r["ssim"]),
            _fmt(r["activation_rms"], ".2f"),
        )
    out.print(t)
    rows = report.get("label_leakage") or []
    if rows:
        task = report["parameters"].get("positive_class", "?")
        lt = Table(
            title=f"label leakage on edge {report['label_edge']} (binary: is it a {task}, "
            f"{100 * rows[0]['positives']:.0f} % positives; AUC 0.5 = nothing learnt)"
        )
        for col in (
            "defence",
            "accuracy",
            "norm AUC",
            "norm, direction-free",
            "cosine AUC",
            "cosine, direction-free",
        ):
            lt.add_column(col, justify="left" if col == "defence" else "right")
        for r in rows:
            lt.add_row(
                r["label"],
                f"{100 * r['accuracy']:.1f} %",
                _fmt(r["norm_auc"]),
                _fmt(r["norm_leak_auc"]),
                _fmt(r["cosine_auc"]),
                _fmt(r["cosine_leak_auc"]),
            )
        out.print(lt)
    scan = report.get("label_class_scan") or []
    if scan:
        st = Table(title="label leakage without a defence, per positive digit")
        for col in ("positive digit", "norm AUC", "norm, direction-free", "cosine AUC", "norm AUC per epoch"):
            st.add_column(col, justify="right")
        for r in scan:
            st.add_row(
                str(r["positive_class"]),
                _fmt(r["norm_auc"]),
                _fmt(r["norm_leak_auc"]),
                _fmt(r["cosine_auc"]),
                " ".join(f"{v:.2f}" for v in r["norm_auc_by_epoch"]),
            )
        out.print(st)
    ct = Table(title="cost of exact DCOR (forward + backward, one thread)")
    for col in ("batch", "time (ms)", "one B×B matrix (MiB)", "kept for backward (MiB)"):
        ct.add_column(col, justify="right")
    for c in report["dcor_cost"]:
        ct.add_row(str(c["batch"]), f"{c['ms']:.1f}", f"{c['matrix_mib']:.2f}", f"{c['saved_mib']:.2f}")
    out.print(ct)
    for name, path in report["files"].items():
        out.print(f"{name}: {path}", markup=False)


def run_leakage_report(
    target: str,
    out_dir: Path,
    *,
    quick: bool,
    threads: int = 1,
    console: Console | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Set the thread policy, run the report and print it (also what `demo --leakage` calls).

    Args:
        target: a demo scenario name or a deployment file path.
        out_dir: where leakage.json and the PNGs go.
        quick: the short sweep.
        threads: torch threads (applied only if torch is not imported yet).
        console: where to print the tables (default: stdout).
        **options: passed to `leakage_report` (alphas, noise_levels, epochs, ...).

    Returns:
        The report dict.

    Raises:
        ConfigError: the target cannot be measured (see `secure_split.analysis.leakage.load_target`).
    """
    from secure_split.cli.threads import apply_thread_policy

    if "torch" not in sys.modules:
        apply_thread_policy(threads)
    from secure_split.analysis.leakage import leakage_report

    report = leakage_report(target, out_dir=out_dir, quick=quick, **options)
    print_report(report, console)
    return report


@app.command("report")
def report(
    target: Annotated[str, typer.Argument(help="a demo (vanilla, u-shaped, multi-hop) or a deployment.yaml")],
    out: Annotated[Path, typer.Option("--out", help="folder for leakage.json and the PNG plots")] = Path(
        "leakage-report"
    ),
    quick: Annotated[
        bool, typer.Option("--quick/--full", help="short sweep (about 10-30 s) or the full one")
    ] = False,
    epochs: Annotated[
        int | None, typer.Option(help="training epochs per setting (default 20, quick 10)")
    ] = None,
    threads: Annotated[int, typer.Option(help="torch threads")] = 1,
) -> None:
    """Train TARGET across a sweep of defences; report reconstruction, DCOR, label AUC, accuracy."""
    options: dict[str, Any] = {} if epochs is None else {"epochs": epochs}
    run_leakage_report(target, out, quick=quick, threads=threads, **options)
