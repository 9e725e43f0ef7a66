"""`secure-split deployment hash|diff`: what operators run when peers disagree about the deployment.

Exit codes (secure_split.errors.ExitCode): `hash` 0, or 2 when the file is missing or invalid;
`diff` 0 when both files hash alike, 1 when they differ, 2 when a file cannot be read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from secure_split.config import load_deployment
from secure_split.deployment_diff import deployment_section_digests, diff_deployments
from secure_split.errors import ConfigError, ExitCode
from secure_split.yamlfile import read_yaml

app = typer.Typer(
    help="Inspect deployment files: the hash peers agree on, and what differs between two files.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command("hash")
def hash_(
    path: Annotated[Path, typer.Argument(metavar="FILE", help="a deployment.yaml")],
    as_json: Annotated[bool, typer.Option("--json", help="print {hash, sections} as JSON")] = False,
) -> None:
    """Print the deployment hash peers compare in the handshake, and a digest per section.

    Two sites whose hashes differ compare the section digests (e.g. over the phone) to find the
    part that differs, or use `deployment diff` on copies of both files.
    """
    try:
        dep = load_deployment(path)
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(int(ExitCode.BAD_CONFIG)) from None
    sections = deployment_section_digests(dep)
    if as_json:
        typer.echo(json.dumps({"deployment": dep.spec.name, "hash": dep.hash, "sections": sections}, indent=1))
        return
    typer.echo(f"deployment '{dep.spec.name}'  hash {dep.hash}")
    width = max(len(name) for name in sections) + 2
    for name, digest in sections.items():
        label = f"  {name}" if "." in name else name
        typer.echo(f"  {label.ljust(width)}  {digest}")


@app.command("diff")
def diff(
    a: Annotated[Path, typer.Argument(metavar="A", help="one deployment.yaml")],
    b: Annotated[Path, typer.Argument(metavar="B", help="the other deployment.yaml")],
) -> None:
    """List every field that differs between two deployment files.

    Exit 0 when both hash alike (peers would agree), 1 when they differ, 2 when a file cannot be read.
    """
    try:
        raw_a, raw_b = read_yaml(a, "deployment").data, read_yaml(b, "deployment").data
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(int(ExitCode.BAD_CONFIG)) from None
    result = diff_deployments(raw_a, raw_b)
    typer.echo(f"A {a}  hash {result.hash_a}")
    typer.echo(f"B {b}  hash {result.hash_b}")
    if result.hash_a == result.hash_b:
        typer.echo("same deployment: peers loading these files agree")
        raise typer.Exit(int(ExitCode.OK))
    n = len(result.differences)
    typer.echo(f"{n} field{'s' if n != 1 else ''} differ{'s' if n == 1 else ''}:")
    for d in result.differences:
        typer.echo(f"  {d}")
    if result.same_meaning:
        typer.echo(
            "both files describe the same deployment but are written differently (e.g. a default spelled "
            "out in one of them); the hash covers what is written, so every party must use one file"
        )
    elif result.same_meaning is None:
        typer.echo("(at least one file is not a valid deployment; `secure-split deployment hash FILE` says why)")
    raise typer.Exit(int(ExitCode.FAILED))
