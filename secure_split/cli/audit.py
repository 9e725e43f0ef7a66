"""`secure-split audit verify`: what an auditor runs, offline, on a folder of audit logs.

Exit codes (`secure_split.audit.VerifyExit`): 0 every log intact, consistent across peers and
every flow allowed by the policy; 1 at least one error finding (tampering, a contradiction, a
policy violation); 2 verification could not be completed (a log missing or unreadable, the
deployment or policy unreadable) or is incomplete (no policy to check the flows against);
3 the verifier itself failed (one line on stderr; never a traceback).

Needs neither torch nor tenseal: auditors install `audit/requirements.txt` only. Without the
full package's console script, run it as `python -m secure_split.cli.audit verify ...`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from secure_split.audit.report import AuditReport, VerifyExit
from secure_split.errors import SecureSplitError

app = typer.Typer(
    help="Verify audit logs offline: hash chains, signatures, runs, cross-peer consistency, policy compliance.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
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
        typer.Option("--policy", help="policy to check flows against (default: the deployment's policy file, "
                                      "when it exists; without one the verdict is 'incomplete', exit 2)"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the machine-readable report")] = False,
) -> None:
    """Verify every peer's log: per file, across peers, and against the policy.

    Exit 0 clean, 1 findings, 2 cannot verify or incomplete (no policy), 3 internal error.
    """
    try:
        code = _verify(log_dir, deployment, policy, as_json)
    except (typer.Exit, KeyboardInterrupt):
        raise
    except MemoryError:
        print("audit verify: internal error: out of memory (please report it with the sizes of the logs)",
              file=sys.stderr)
        code = int(VerifyExit.INTERNAL_ERROR)
    except Exception as exc:  # the verifier's own failure: one line, its own exit code, never a traceback
        print(f"audit verify: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = int(VerifyExit.INTERNAL_ERROR)
    raise typer.Exit(code)


def _verify(log_dir: Path, deployment: Path, policy: Path | None, as_json: bool) -> int:
    from secure_split.audit import verify_logs
    from secure_split.config import load_deployment

    out = Console(highlight=False, emoji=False, soft_wrap=not as_json)
    try:
        dep = load_deployment(deployment)
    except SecureSplitError as exc:
        report = AuditReport(files=[], findings=[], unverifiable=[f"cannot read the deployment: {exc}"])
        _emit(out, report, as_json)
        return int(VerifyExit.CANNOT_VERIFY)
    if policy is None and dep.policy_path.is_file():
        policy = dep.policy_path
    report = verify_logs(log_dir, dep, policy)
    _emit(out, report, as_json)
    return int(report.exit_code)


def _emit(out: Console, report: AuditReport, as_json: bool) -> None:
    if as_json:
        # Plain print: rich would wrap or colour the JSON.
        print(report.to_json())
    else:
        out.print(report.render_table())


if __name__ == "__main__":
    app()
