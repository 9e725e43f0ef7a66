"""`secure-split`: keys, peers, demos, policies, audit verification.

Every command maps errors to the exit codes in `secure_split.errors.ExitCode`; torch is
imported only after the thread policy of a peer process is set.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from secure_split.cli.output import console, err_console, report_error
from secure_split.errors import EXIT_CODE_HELP, ExitCode, SecureSplitError

_EXIT_HELP = "\n".join(f"  {int(c)}  {EXIT_CODE_HELP[c]}" for c in ExitCode)

app = typer.Typer(
    name="secure-split",
    help=f"Split learning across organisations: policy-gated, audited, encrypted peers.\n\nExit codes:\n{_EXIT_HELP}",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
keys_app = typer.Typer(help="Create and inspect peer identities.", no_args_is_help=True)
peer_app = typer.Typer(help="Run a peer process, or ask one how it is doing.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(peer_app, name="peer")


def _mount_subcommands() -> None:
    import importlib

    for name in ("policy", "audit", "leakage", "data", "deployment", "model"):
        try:
            module = importlib.import_module(f"secure_split.cli.{name}")
        except ModuleNotFoundError as exc:  # pragma: no cover - only while a sub-app is being written
            if exc.name != f"secure_split.cli.{name}":
                raise
            continue
        app.add_typer(module.app, name=name)


_mount_subcommands()


@keys_app.command("new")
def keys_new(
    name: Annotated[str, typer.Argument(help="peer name: lowercase letters, digits and _")],
    dir: Annotated[Path, typer.Option("--dir", help="folder for NAME.key (0600) and NAME.pub")] = Path("keys"),
) -> None:
    """Write NAME's secret key file (mode 0600) and its public file."""
    from secure_split.crypto.keys import generate_identity, write_key_files

    try:
        ident = generate_identity(name)
    except ValueError as exc:
        report_error(exc)
        raise typer.Exit(int(ExitCode.BAD_CONFIG)) from None
    secret, public = write_key_files(ident, dir)
    # YAML-ready: the comments and the block paste into deployment.yaml as they are.
    console.print(f"# secret key: {secret} (mode 0600; never share it)", markup=False, soft_wrap=True)
    console.print(f"# public key: {public}", markup=False, soft_wrap=True)
    console.print(public_yaml_block(ident.public), markup=False, soft_wrap=True)


def public_yaml_block(pub: Any) -> str:
    """A peer's public keys as a deployment.yaml `peers:` entry (values quoted: Z85 text holds
    characters YAML reads as syntax), with its fingerprint as a comment for the policy."""
    return (
        f"{pub.name}:\n  sign_key: \"{pub.sign_key_hex}\"\n  transport_key: \"{pub.transport_key_z85}\"\n"
        f"  # fingerprint (the policy's parties.{pub.name}.fingerprint): \"{pub.fingerprint}\""
    )


@keys_app.command("show")
def keys_show(path: Annotated[Path, typer.Argument(help="a NAME.pub or NAME.key file")]) -> None:
    """Print the public half of a key file, ready to paste into deployment.yaml."""
    from secure_split.crypto.keys import load_identity, load_public

    pub = load_identity(path).public if path.suffix == ".key" else load_public(path)
    console.print(public_yaml_block(pub), markup=False, soft_wrap=True)


@peer_app.command("run")
def peer_run(
    config: Annotated[Path, typer.Argument(help="this organisation's peers/NAME.yaml")],
    resume: Annotated[bool | None, typer.Option(
        "--resume/--fresh",
        help="--resume: continue from the newest checkpoint all peers share, and rejoin a running deployment "
             "(the default when this peer holds a checkpoint); --fresh: start over (earlier checkpoints are "
             "moved aside into a superseded-TIME folder)")] = None,
    threads: Annotated[str, typer.Option(help="torch threads: a number, or 'auto' (cores / local peers)")] = "",
    result: Annotated[Path | None, typer.Option(help="write this peer's result as JSON here")] = None,
    progress: Annotated[str, typer.Option(help="progress output: 'auto' (rich on a terminal, else jsonl), 'rich', "
                                               "'jsonl' (machine-readable, on stdout) or 'none'")] = "auto",
) -> None:
    """Start one peer. When every peer is up, the coordinator runs training; each exits 0 when done."""
    from secure_split.cli.threads import apply_thread_policy, choose_threads
    from secure_split.config import load_deployment, load_peer_config

    cfg = load_peer_config(config)
    dep = load_deployment(cfg.deployment_path)
    endpoints = [p.endpoint for p in dep.spec.peers.values()]
    apply_thread_policy(choose_threads(threads or cfg.spec.threads, endpoints))

    from secure_split.peer.launch import set_aside_checkpoints, training_node

    held = sorted(cfg.checkpoints_dir.glob("epoch-*.json")) if cfg.checkpoints_dir.is_dir() else []
    if resume is None:
        resume = bool(held)
    elif not resume and held:
        moved = set_aside_checkpoints(cfg.checkpoints_dir)
        err_console.print(f"--fresh: moved this peer's earlier checkpoints aside to {moved}", markup=False)
    res = training_node(config, resume=resume, progress=_progress_printer(progress)).run()
    if result is not None:
        result.parent.mkdir(parents=True, exist_ok=True)
        result.write_text(json.dumps(res.to_json(), indent=1, sort_keys=True))
    if res.status != "ok":
        err_console.print(f"peer '{res.name}' failed: {res.error}", markup=False, soft_wrap=True)
        # The code of the error that stopped this peer (3 timeout, 4 policy, 5 protocol, ...), else 1.
        raise typer.Exit(int(getattr(res, "exit_code", 0) or ExitCode.FAILED))
    if progress != "jsonl":
        err_console.print(f"peer '{res.name}' finished: sent {res.bytes_sent} B, received {res.bytes_received} B")


@peer_app.command("status")
def peer_status(
    config: Annotated[Path, typer.Argument(help="this organisation's peers/NAME.yaml")],
    as_json: Annotated[bool, typer.Option("--json", help="print the status as JSON")] = False,
) -> None:
    """Say what a peer is doing: its metrics endpoint if it serves one, else its ops and audit logs.

    Exit 0 running or finished, 1 its last run failed, 2 the config is unreadable, 3 it should be
    running but does not answer (crashed?) or never ran.
    """
    from secure_split.config import load_peer_config
    from secure_split.peer.status import default_ops_log_path
    from secure_split.peer.status import peer_status as judge

    cfg = load_peer_config(config)
    live, why = None, None
    if cfg.metrics_url is not None:
        from secure_split.peer.metrics import scrape, summarise

        try:
            live = summarise(scrape(cfg.metrics_url))
        except (OSError, ValueError) as exc:
            why = f"{cfg.metrics_url}: {exc}"
    ops_log = cfg.ops_log_path or default_ops_log_path(cfg.audit_dir, cfg.name)
    status = judge(cfg.name, ops_log, cfg.audit_dir / f"{cfg.name}.jsonl", live, why)
    if as_json:
        print(json.dumps({"peer": status.peer, "verdict": status.verdict, "detail": status.detail,
                          "live": status.live, "last_events": status.last_events,
                          "audit_end": status.audit_end}, indent=1, sort_keys=True, default=str))
    else:
        console.print(f"{status.peer}: {status.verdict.upper()}: {status.detail}", markup=False, soft_wrap=True)
        for event in status.last_events:
            fields = ", ".join(f"{k}={v}" for k, v in sorted(event.items()) if k not in ("event", "time", "peer"))
            console.print(f"  {event.get('time', '?')}  {event.get('event')}  {fields}", markup=False, soft_wrap=True)
    raise typer.Exit(status.exit_code)


def _progress_printer(mode: str) -> Any:
    if mode == "auto":
        mode = "rich" if sys.stderr.isatty() else "jsonl"
    if mode == "jsonl":
        def emit(event: dict[str, Any]) -> None:
            sys.stdout.write(json.dumps(event, sort_keys=True) + "\n")
            sys.stdout.flush()
        return emit
    if mode == "rich":
        def show(event: dict[str, Any]) -> None:
            if event.get("event") == "epoch":
                vals = ", ".join(f"{k}={v:.4f}" for k, v in sorted(event.get("values", {}).items()))
                err_console.print(f"epoch {event['epoch'] + 1}/{event['epochs']}: {vals}", markup=False)
            elif event.get("event") == "owner_lost":
                err_console.print(f"owner '{event['owner']}' dropped out ({event.get('reason', '')}); "
                                  "carrying on with the others", markup=False)
            elif event.get("event") == "owner_joined":
                err_console.print(f"owner '{event['owner']}' rejoined", markup=False)
            elif event.get("event") in ("waiting", "rejoined", "rollback", "state"):
                # Any peer: whom it waits for and since when, who came back, where it rolled back to.
                fields = ", ".join(f"{k}={v}" for k, v in sorted(event.items()) if k != "event")
                err_console.print(f"{event['event']}: {fields}", markup=False)
        return show
    return None


def _register_demo() -> None:
    from secure_split.cli import demo as demo_cli

    demo_cli.register(app)


_register_demo()


def _register_rotate() -> None:
    from secure_split.cli import rotate

    rotate.register(keys_app)


_register_rotate()


def _register_serving() -> None:
    from secure_split.cli import serving

    serving.register(app)


_register_serving()


def main() -> None:
    """Entry point: run the app, mapping our errors to exit codes with advice."""
    try:
        rc = app(standalone_mode=False)
    except SecureSplitError as exc:
        report_error(exc)
        sys.exit(int(exc.exit_code))
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(int(ExitCode.INTERRUPTED))
    except Exception as exc:
        # Usage errors from typer's bundled click: duck-typed, since typer vendors its click.
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):
            exc.show()
            sys.exit(int(ExitCode.BAD_CONFIG))
        if type(exc).__name__ == "Abort":
            sys.exit(int(ExitCode.INTERRUPTED))
        raise
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
