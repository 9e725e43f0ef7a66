"""`secure-split policy check|explain|sign`: what privacy officers run on a policy file.

Exit codes (secure_split.errors.ExitCode): 0 fine; 1 a violation was found (`check`), the flow is
denied (`explain`) or the key may not sign (`sign`); 2 a file cannot be read or is invalid.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from secure_split.config import load_deployment
from secure_split.crypto.keys import load_identity
from secure_split.errors import ConfigError, ExitCode, PolicyError
from secure_split.policy import (
    Finding,
    Flow,
    check_deployment,
    check_policy,
    load_policy,
    sign_policy,
    signature_problems,
)

app = typer.Typer(
    help="Check, explain and sign policies: the signed YAML that says what may cross the wire.",
    no_args_is_help=True,
    add_completion=False,
)


def _fail_config(exc: ConfigError) -> typer.Exit:
    typer.echo(str(exc), err=True)
    return typer.Exit(int(ExitCode.BAD_CONFIG))


def _parse_time(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        typer.echo(f"--at: '{text}' is not an ISO time such as 2026-01-31T12:00:00Z", err=True)
        raise typer.Exit(int(ExitCode.BAD_CONFIG)) from None
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


@app.command("check")
def check(
    policy_path: Annotated[Path, typer.Argument(metavar="POLICY", help="the policy YAML file")],
    deployment_path: Annotated[
        Path | None, typer.Option("--deployment", "-d", help="also check against this deployment file")
    ] = None,
    at: Annotated[
        str | None, typer.Option("--at", help="judge validity at this ISO time (default: now)")
    ] = None,
) -> None:
    """Validate a policy (and its fit with a deployment); list every finding.

    Exit 0 if valid and consistent, 1 if a violation is found, 2 if a file cannot be read.
    """
    now = _parse_time(at)
    try:
        policy = load_policy(policy_path)
    except ConfigError as exc:
        raise _fail_config(exc) from None
    deployment = None
    if deployment_path is not None:
        try:
            deployment = load_deployment(deployment_path)
        except ConfigError as exc:
            raise _fail_config(exc) from None
    findings = check_policy(policy, now=now)
    if deployment is not None:
        seen = {str(f) for f in findings}
        findings += [f for f in check_deployment(policy, deployment) if str(f) not in seen]
        # Signatures are a startup matter: an unsigned or re-edited policy is only a warning here,
        # but a signature that does not verify is a forgery and fails the check.
        findings += [
            Finding("error" if p.problem == "invalid" else "warning", "signature", p.message)
            for p in signature_problems(policy, deployment)
        ]
    typer.echo(f"policy '{policy.name}' v{policy.version}  hash {policy.hash}")
    for f in findings:
        typer.echo(str(f))
    n_err = sum(1 for f in findings if f.severity == "error")
    n_warn = len(findings) - n_err
    verdict = "FAIL" if n_err else "OK"
    typer.echo(
        f"{verdict}: {n_err} error{'s' if n_err != 1 else ''}, {n_warn} warning{'s' if n_warn != 1 else ''}"
    )
    raise typer.Exit(int(ExitCode.FAILED if n_err else ExitCode.OK))


@app.command("explain")
def explain(
    policy_path: Annotated[Path, typer.Argument(metavar="POLICY", help="the policy YAML file")],
    sender: Annotated[str, typer.Option("--from", help="the sending party")],
    receiver: Annotated[str, typer.Option("--to", help="the receiving party")],
    kind: Annotated[str, typer.Option("--kind", help="the message kind, e.g. activation")],
    edge: Annotated[str | None, typer.Option("--edge", help="the edge id FROM->TO")] = None,
    nbytes: Annotated[int | None, typer.Option("--bytes", help="message size, to check max_bytes")] = None,
    batch: Annotated[int | None, typer.Option("--batch", help="batch size, to check min_batch")] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="tensor dtype, to check dtype")] = None,
    shape: Annotated[str | None, typer.Option("--shape", help="tensor shape, e.g. 64,32")] = None,
    compressed: Annotated[bool, typer.Option("--compressed", help="the payload is compressed")] = False,
    at: Annotated[str | None, typer.Option("--at", help="decide at this ISO time (default: now)")] = None,
) -> None:
    """Say whether a flow is allowed, which rule decides, and why.

    Without --bytes/--batch/--dtype/--shape/--compressed only the route is judged and the
    deciding rule's constraints are listed. Exit 0 allowed, 1 denied, 2 unreadable policy.
    """
    now = _parse_time(at)
    try:
        policy = load_policy(policy_path)
    except ConfigError as exc:
        raise _fail_config(exc) from None
    details = any(x is not None for x in (nbytes, batch, dtype, shape)) or compressed
    if details:
        try:
            dims = tuple(int(x) for x in shape.split(",")) if shape else None
        except ValueError:
            typer.echo(f"--shape: '{shape}' is not a comma-separated list of sizes", err=True)
            raise typer.Exit(int(ExitCode.BAD_CONFIG)) from None
        flow = Flow(sender, receiver, kind, edge, "send", nbytes or 0, dtype, dims, batch, compressed)
        decision = policy.decide(flow, now=now)
    else:
        decision = policy.decide_route(sender, receiver, kind, edge, now=now)
    typer.echo(f"decision: {'ALLOW' if decision.allowed else 'DENY'}")
    typer.echo(f"rule:     {decision.rule_id}")
    typer.echo(f"reason:   {decision.reason}")
    rule = policy.rule(decision.rule_id)
    if rule is not None and rule.action == "allow":
        typer.echo(f"constraints: {rule.constraints.describe()}")
        if not details:
            typer.echo("(constraints not checked: give --bytes, --batch, --dtype, --shape to check them)")
    if rule is not None and rule.line is not None:
        typer.echo(f"defined at: {policy.path}:{rule.line}")
    typer.echo(f"policy:   '{policy.name}' v{policy.version}  hash {policy.hash}")
    raise typer.Exit(int(ExitCode.OK if decision.allowed else ExitCode.FAILED))


@app.command("sign")
def sign(
    policy_path: Annotated[Path, typer.Argument(metavar="POLICY", help="the policy YAML file")],
    key: Annotated[Path, typer.Option("--key", help="your secret key file (NAME.key, mode 0600)")],
) -> None:
    """Sign the policy's canonical hash with your party's key; write POLICY_DIR/signatures/STEM.PEER.sig."""
    try:
        policy = load_policy(policy_path)
        identity = load_identity(key)
    except ConfigError as exc:
        raise _fail_config(exc) from None
    try:
        path = sign_policy(policy, identity)
    except PolicyError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(int(ExitCode.FAILED)) from None
    typer.echo(f"signed policy '{policy.name}' v{policy.version} (hash {policy.hash}) as '{identity.name}'")
    typer.echo(f"wrote {path}")
