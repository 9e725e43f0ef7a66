"""`secure-split data check peers/NAME.yaml`: is this organisation's data ready to train?

Reads the peer config's data source and checks it against the deployment before any network:
columns, values, missing values, duplicate ids, feature width after one-hot against the first
layer, label tasks against the loss segments, classes against their outputs. `peer run` runs the
same check first.

Exit codes (secure_split.errors.ExitCode): 0 the data fits; 2 a problem was found (each listed
with file, column or key, and rows or line).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from secure_split.cli.output import console
from secure_split.errors import ConfigError, ExitCode

app = typer.Typer(
    help="Check an organisation's data file against the deployment, before any network.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command("check")
def check(
    config: Annotated[Path, typer.Argument(metavar="PEER_CONFIG", help="this organisation's peers/NAME.yaml")],
) -> None:
    """Validate the peer's data against the deployment; list every problem (exit 2) or summarise it (exit 0)."""
    from secure_split.config import load_deployment, load_peer_config
    from secure_split.engine.data import load_checked_site_data

    try:
        cfg = load_peer_config(config)
        dep = load_deployment(cfg.deployment_path)
        site = load_checked_site_data(cfg, dep)
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(int(ExitCode.BAD_CONFIG)) from None
    if site is None:
        console.print(f"{cfg.path}: peer '{cfg.name}' holds no data and needs none", markup=False)
        return
    segs = [s for s, seg in dep.spec.segments.items() if seg.peer == cfg.name and seg.input == "features"]
    parts = [f"{len(site)} rows"]
    if site.has_features:
        encoded = f", {len(site.texts)} one-hot" if site.texts else ""
        shape = (f"{len(site.feature_order)} feature columns{encoded} -> {site.width} values per row"
                 if site.block is None else f"features {list(site.block.shape[1:])} per row")
        parts.append(shape + (f" (segment {', '.join(segs)})" if segs else ""))
    if site.labels:
        parts.append("label tasks " + ", ".join(sorted(site.labels)))
    spec = site.source.spec
    if not site.source.legacy:
        scaled = sorted({spec.preprocess.scale, *spec.preprocess.columns.values()} - {"none"})
        if scaled:
            parts.append("scaling " + "/".join(scaled) + " fitted on training rows")
        if spec.impute:
            parts.append("imputation for " + ", ".join(sorted(spec.impute)))
    console.print(f"{site.source.path} ({site.source.format}): " + "; ".join(parts) + ": ok", markup=False,
                  soft_wrap=True)
