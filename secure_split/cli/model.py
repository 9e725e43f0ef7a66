"""`secure-split model describe|verify`: commitments to private segment models.

- `describe PEER_CONFIG`: the owner builds each private model its peer config describes and
  prints the deployment entry (`commitment`, `parameters`) to publish instead of the model; with
  `--out DIR` it writes each segment's architecture document (`SEGMENT.architecture.json`), which
  the owner hands an auditor when the architecture is to be disclosed.
- `verify DOCUMENT --deployment D --segment S`: the auditor checks such a document against the
  deployment's commitment. Needs no torch.

Exit codes (secure_split.errors.ExitCode): 0 fine; 1 the document is not the committed one;
2 a file cannot be read or is invalid (or a model cannot be built).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from secure_split.architecture import commitment_problems, peer_config_source, segment_commitment
from secure_split.config import load_deployment, load_peer_config
from secure_split.errors import ConfigError, ExitCode

app = typer.Typer(
    help="Commitments to private segment models: describe them (owner), verify them (auditor).",
    no_args_is_help=True,
    add_completion=False,
)

MAX_DOCUMENT_BYTES = 16 * 1024 * 1024


def _fail_config(exc: ConfigError | str) -> typer.Exit:
    typer.echo(str(exc), err=True)
    return typer.Exit(int(ExitCode.BAD_CONFIG))


@app.command("describe")
def describe(
    config: Annotated[Path, typer.Argument(metavar="PEER_CONFIG", help="the owner's peer config (peers/NAME.yaml)")],
    segment: Annotated[list[str] | None, typer.Option("--segment", "-s", help="only these segments")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="write SEGMENT.architecture.json files here")] = None,
) -> None:
    """Build each private model of a peer config and print the commitment to put in the deployment."""
    from secure_split.cli.threads import apply_thread_policy

    try:
        cfg = load_peer_config(config)
    except ConfigError as exc:
        raise _fail_config(exc) from None
    names = segment or [s for s, entry in cfg.spec.segments.items() if entry.model is not None]
    if not names:
        raise _fail_config(f"{config}: no segment of this peer config describes a model (segments.NAME.model)")
    if "torch" not in sys.modules:  # a command-line run: one thread, set before torch loads
        apply_thread_policy(1)
    from secure_split.engine.sources import describe_source

    documents: dict[str, dict[str, Any]] = {}
    try:
        for name in names:
            documents[name] = describe_source(peer_config_source(cfg, name))
    except ConfigError as exc:
        raise _fail_config(exc) from None
    typer.echo(f"# deployment.yaml: these segments of peer '{cfg.name}' publish only their commitment")
    for name, document in documents.items():
        typer.echo(f"segments.{name}:\n  commitment: {segment_commitment(document)}\n"
                   f"  parameters: {document['parameters']}")
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            path = out / f"{name}.architecture.json"
            path.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
            path.chmod(0o600)  # it holds the salt: give it only to whom the architecture may be disclosed
            typer.echo(f"  # architecture document: {path}")


@app.command("verify")
def verify(
    document_path: Annotated[Path, typer.Argument(metavar="DOCUMENT", help="a SEGMENT.architecture.json")],
    deployment_path: Annotated[Path, typer.Option("--deployment", "-d", help="the deployment file")],
    segment: Annotated[str, typer.Option("--segment", "-s", help="the segment the document describes")],
) -> None:
    """Check an architecture document against the deployment's commitment (no torch needed)."""
    try:
        dep = load_deployment(deployment_path)
    except ConfigError as exc:
        raise _fail_config(exc) from None
    seg = dep.spec.segments.get(segment)
    if seg is None or seg.commitment is None or seg.parameters is None:
        raise _fail_config(f"{deployment_path}: segment '{segment}' has no commitment (segments: "
                           f"{sorted(s for s, v in dep.spec.segments.items() if v.commitment)})")
    try:
        if document_path.stat().st_size > MAX_DOCUMENT_BYTES:
            raise _fail_config(f"{document_path}: larger than {MAX_DOCUMENT_BYTES} bytes")
        document = json.loads(document_path.read_bytes())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise _fail_config(f"{document_path}: cannot read it as JSON: {exc}") from None
    if not isinstance(document, dict):
        raise _fail_config(f"{document_path}: not a JSON object")
    problems = commitment_problems(document, seg.commitment, seg.parameters)
    if problems:
        for p in problems:
            typer.echo(f"MISMATCH segment '{segment}': {p}")
        raise typer.Exit(int(ExitCode.FAILED))
    typer.echo(f"OK segment '{segment}': the document is the committed architecture ({seg.commitment}, "
               f"{seg.parameters} parameters, source {document.get('source')})")
