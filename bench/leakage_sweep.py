"""The full leakage sweep: NoPeek α, activation noise σ and label defences on a digits deployment.

Trains the target once per setting (one process, one torch thread, the real executors routed in
memory), attacks it and prints the tables; writes leakage.json and the three PNG plots into --out.
With --docs-img the PNGs are also copied there (docs/privacy.md shows docs/img/leakage_*.png).
The full vanilla sweep takes about 1.5 minutes on one core; --quick about 15 s.

    .venv/bin/python bench/leakage_sweep.py                       # vanilla, into bench/results/leakage
    .venv/bin/python bench/leakage_sweep.py --target multi-hop --out /tmp/leak
    .venv/bin/python bench/leakage_sweep.py --docs-img docs/img  # refresh the docs' figures
    .venv/bin/python bench/leakage_sweep.py --target deep-owner   # NoPeek with a trainable owner

`deep-owner` is not a demo: it writes a deployment file (into --out) whose data owner keeps two
trainable layers (the zoo's convolution, then 256 -> 32), to show how NoPeek behaves when the owner
has parameters to decorrelate with; the zoo's vanilla owner has one convolution (160 weights).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

DEEP_OWNER = "deep-owner"
DEEP_OWNER_ALPHAS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
"""The deep owner collapses at a much smaller α than the one-convolution owner: sweep lower."""
DEEP_OWNER_NOISE = (1.0, 3.0, 10.0)
"""Its cut activation's RMS is about 3 without noise."""
DEEP_OWNER_COMBINED = ((0.5, 1.0), (1.0, 3.0))


def floats(text: str) -> tuple[float, ...]:
    """Parse "0,0.5,1" into (0.0, 0.5, 1.0)."""
    return tuple(float(v) for v in text.split(",") if v.strip())


def write_deep_owner_deployment(folder: Path) -> Path:
    """A two-peer digits deployment whose owner has trainable layers after the convolution."""
    import yaml

    from secure_split.engine import zoo

    def peer(i: int) -> dict[str, Any]:
        return {
            "endpoint": f"tcp://127.0.0.1:{5900 + i}",
            "sign_key": f"{i + 1:064x}",
            "transport_key": "0" * 40,
        }

    doc = {
        "version": 1,
        "name": "leakage-deep-owner",
        "coordinator": "label_holder",
        "policy": "policy.yaml",
        "peers": {"owner": peer(0), "label_holder": peer(1)},
        "segments": {
            "bottom": {
                "peer": "owner",
                "input": "features",
                "model": [*zoo.DIGITS_CNN_BOTTOM, {"linear": {"in": 256, "out": 32}}, {"relu": {}}],
            },
            "top": {
                "peer": "label_holder",
                "loss": "cross_entropy",
                "model": [{"linear": {"in": 32, "out": 32}}, {"relu": {}}, {"linear": {"in": 32, "out": 10}}],
            },
        },
        "edges": [{"from": "bottom", "to": "top"}],
        "training": {
            "seed": 7,
            "epochs": 20,
            "batch_size": 64,
            "test_fraction": 0.2,
            "optimizer": {"type": "adam", "lr": zoo.DIGITS_LR},
        },
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "deep_owner_deployment.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def main() -> None:
    """Parse the arguments, run the sweep, print and copy."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--target", default="vanilla", help="vanilla, u-shaped, multi-hop, deep-owner or a deployment file"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/leakage"), help="output folder")
    parser.add_argument("--quick", action="store_true", help="the short sweep")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs per setting")
    parser.add_argument(
        "--docs-img", type=Path, default=None, help="also copy the PNGs here as leakage_*.png"
    )
    parser.add_argument("--alphas", type=floats, default=None, help="NoPeek α values, e.g. 0,1,3")
    parser.add_argument("--noise", type=floats, default=None, help="activation noise σ values, e.g. 0.3,1")
    args = parser.parse_args()

    # Sets one torch thread before torch is imported, then runs and prints the report.
    from secure_split.cli.leakage import run_leakage_report

    options: dict[str, Any] = {} if args.epochs is None else {"epochs": args.epochs}
    target, prefix = args.target, "leakage"
    if args.target == DEEP_OWNER:
        target, prefix = str(write_deep_owner_deployment(args.out)), "leakage_deep_owner"
        if not args.quick:
            options.update(
                alphas=DEEP_OWNER_ALPHAS, noise_levels=DEEP_OWNER_NOISE, combined=DEEP_OWNER_COMBINED
            )
    elif args.target != "vanilla":
        prefix = "leakage_" + "".join(c if c.isalnum() else "_" for c in Path(args.target).stem)
    if args.alphas is not None:
        options["alphas"] = args.alphas
    if args.noise is not None:
        options["noise_levels"] = args.noise
    report = run_leakage_report(target, args.out, quick=args.quick, threads=1, **options)
    if args.docs_img is not None:
        args.docs_img.mkdir(parents=True, exist_ok=True)
        for key in ("reconstruction_grid", "tradeoff", "label_leakage"):
            if key in report["files"]:
                dest = args.docs_img / f"{prefix}_{key}.png"
                shutil.copyfile(report["files"][key], dest)
                print(f"copied {key} -> {dest}")
    print(f"total: {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
