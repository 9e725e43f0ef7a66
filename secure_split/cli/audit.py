"""`secure-split audit verify`: what an auditor runs, offline, on a folder of audit logs.

Exit codes (secure_split.errors.ExitCode): 0 every log intact and consistent; 1 a problem was
found (tampering, truncation, a missing counterpart, a policy violation, a crash artefact);
2 verification could not be done (a log is missing, the deployment or policy is unreadable).

Needs neither torch nor tenseal: auditors install `audit/requirements.txt` only. Without the
full package's console script, run it as `python -m secure_split.cli.audit verify ...`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from secure_split.audit.report import AuditReport
from secure_split.errors import ExitCode, SecureSplitError

app = typer.Typer(
    help="Verify audit logs offline: hash chains, signatures, cross-peer consistency, policy compliance.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _audit() -> None:
    """Verify the signed, hash-chained audit logs peers write (see audit/README.md)."""


@app.command("verify")
def verify(
    log_dir: Annotated[Path, typer.Argument(help="folder with one PEER.jsonl per peer of the deployment")],
    deployment: Annotated[Path, typer.Option("--deployment", help="the public deployment.yaml (peers' keys)")],
    policy: Annotated[
        Path | None,
        typer.Option("--policy", help="policy to check flows against (default: the deployment's policy file)"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the machine-readable report")] = False,
    strict_encoding: Annotated[
        bool, typer.Option("--strict-encoding", help="re-encode every entry to check canonical encoding")
    ] = False,
    workers: Annotated[
        int | None, typer.Option("--workers", min=1, help="processes for the per-file pass (default: auto)")
    ] = None,
) -> None:
    """Verify every peer's log: per file, across peers, and against the policy.

    Exit 0 clean, 1 a problem found, 2 cannot verify.
    """
    from secure_split.audit import verify_logs
    from secure_split.config import load_deployment

    out = Console(highlight=False, soft_wrap=not as_json)
    try:
        dep = load_deployment(deployment)
    except SecureSplitError as exc:
        report = AuditReport(files=[], findings=[], unverifiable=[f"cannot read the deployment: {exc}"])
        _emit(out, report, as_json)
        raise typer.Exit(int(ExitCode.BAD_CONFIG)) from None
    if policy is None and dep.policy_path.is_file():
        policy = dep.policy_path
    report = verify_logs(log_dir, dep, policy, workers=workers, strict_encoding=strict_encoding)
    _emit(out, report, as_json)
    raise typer.Exit(int(report.exit_code))


def _emit(out: Console, report: AuditReport, as_json: bool) -> None:
    if as_json:
        # Plain print: rich would wrap or colour the JSON.
        print(report.to_json())
    else:
        out.print(report.render_table())


if __name__ == "__main__":
    app()
