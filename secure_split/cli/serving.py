"""`secure-split serve` and `secure-split predict`: split inference with a trained deployment.

Both run as peers (same config, keys, signed policy, gate and audit chain as `peer run`); the
logic lives in `secure_split.peer.schedules.serve` and `.predict`. torch is imported only after the thread policy is set.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from secure_split.cli.output import console, err_console
from secure_split.errors import ExitCode

SERVE_HELP = (
    "Take part in split prediction requests with a trained peer: the party that wants the output asks "
    "(`secure-split predict`), the others serve.\n\n"
    "A server computes its segments for each request: with its own rows for the ids the requester names "
    "(aligned by PSI: it never learns ids it does not hold), or on the tensors it receives (batch positions, "
    "never ids); the holder of an output returns the predicted classes to the requester where the policy "
    "allows kind 'prediction'. Every message passes this peer's policy gate and is written to its audit log, "
    "which continues the training run's chain; a request ends with an exchange of signed audit heads. "
    "Train-phase tensors, gradients and malformed input are refused, audited and answered with an error; the "
    "server keeps serving. Stops on SIGTERM (exit 0), Ctrl-C (exit 130), --max-requests or --idle-exit (exit 0)."
)
PREDICT_HELP = (
    "Ask for split predictions of the ids in a data file; the other parties of the request run "
    "`secure-split serve`.\n\n"
    "The file holds the ids, and this party's features where it owns an input segment (same format as its "
    "training data; labels optional, only used here to report accuracy). Where other parties read rows for "
    "the ids (a vertical deployment), the ids are aligned with theirs by PSI first: ids some party does not "
    "hold are reported, not predicted. Only cut-layer activations leave this peer, through its policy gate "
    "(egress guards included) and into its audit log; predictions come from this party's own output segment "
    "or from the output's holder, which needs the policy to allow kind 'prediction' to this party: every "
    "route of the request is checked before anything is sent (else exit 4).\n\n"
    "Exit codes: 2 bad configuration, 3 a server did not answer (named), 4 the policy refused a flow, "
    "5 a server broke the protocol."
)
_SERVED = ("Who asks: in vanilla, U-shaped, multi-hop, multi-task and vertical deployments a party that reads "
           "features or holds an output (a multi-task owner gets every head; a label holder its own); in "
           "sequential and splitfed deployments each data owner, for its own rows.")


def _set_threads(config: Path, threads: str) -> None:
    from secure_split.cli.threads import apply_thread_policy, choose_threads
    from secure_split.config import load_deployment, load_peer_config

    cfg = load_peer_config(config)
    endpoints = [p.endpoint for p in load_deployment(cfg.deployment_path).spec.peers.values()]
    apply_thread_policy(choose_threads(threads or cfg.spec.threads, endpoints))


def _write_result(path: Path | None, res: Any) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res.to_json(), indent=1, sort_keys=True))


def _exit_for(res: Any, what: str) -> None:
    if res.status != "ok":
        err_console.print(f"{what} '{res.name}' failed: {res.error}", markup=False, soft_wrap=True)
        raise typer.Exit(int(res.exit_code or ExitCode.FAILED))


def register(app: typer.Typer) -> None:
    """Add the `serve` and `predict` commands to the main CLI."""

    @app.command("serve", help=SERVE_HELP, epilog=_SERVED)
    def serve(
        config: Annotated[Path, typer.Argument(help="this organisation's peers/NAME.yaml (a trained peer)")],
        epoch: Annotated[int | None, typer.Option(help="serve this epoch's checkpoint (default: the newest)")] = None,
        max_requests: Annotated[int | None, typer.Option(
            help="stop after this many finished requests (one request = one `predict` run)")] = None,
        idle_exit: Annotated[float | None, typer.Option(help="stop after this many seconds without a message")] = None,
        threads: Annotated[str, typer.Option(help="torch threads: a number, or 'auto' (cores / local peers)")] = "",
        result: Annotated[Path | None, typer.Option(help="write this server's result as JSON here")] = None,
        quiet: Annotated[bool, typer.Option(help="no line per request")] = False,
    ) -> None:
        """Serve split predictions from a trained peer (see SERVE_HELP)."""
        _set_threads(config, threads)
        from secure_split.peer.launch import serve_node

        def show(event: dict[str, Any]) -> None:
            if event.get("event") == "request" and not quiet:
                err_console.print(f"request {event['requests']} from '{event['owner']}' done "
                                  f"({event['batches']} batches served in all)", markup=False)

        server = serve_node(config, epoch=epoch, max_requests=max_requests, idle_exit_s=idle_exit, progress=show)
        if not quiet:
            err_console.print(f"'{server.me}' serves the checkpoint of epoch {server.schedule.epoch} in the "  # type: ignore[attr-defined]
                              f"prediction requests of {', '.join(server.schedule.clients)}", markup=False)  # type: ignore[attr-defined]
        res = server.run()
        _write_result(result, res)
        _exit_for(res, "server")
        raise typer.Exit(int(res.exit_code))

    @app.command("predict", help=PREDICT_HELP, epilog=_SERVED)
    def predict(
        config: Annotated[Path, typer.Argument(help="the requesting party's peers/NAME.yaml")],
        input: Annotated[Path, typer.Option("--input", help=(
            "data file in this party's data format: the ids, and its features where it owns an input segment"))],
        output: Annotated[Path, typer.Option("--output", help="CSV `id,prediction`, or JSON when it ends in .json")],
        batch_size: Annotated[int | None, typer.Option(help="samples per batch (default: the training batch size)")] = None,
        epoch: Annotated[int | None, typer.Option(help="use this epoch's checkpoint (default: the newest)")] = None,
        threads: Annotated[str, typer.Option(help="torch threads: a number, or 'auto' (cores / local peers)")] = "",
        result: Annotated[Path | None, typer.Option(help="write the run's result (throughput, bytes) as JSON here")] = None,
        quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
    ) -> None:
        """Predict a data file with the trained split network (see PREDICT_HELP)."""
        _set_threads(config, threads)
        from secure_split.peer.launch import predict_node
        from secure_split.peer.serving import write_predictions

        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=err_console,
                      disable=quiet) as prog:
            task = prog.add_task("predicting", total=None, info="")

            def show(event: dict[str, Any]) -> None:
                if event.get("event") == "batch":
                    prog.update(task, total=event["batches"], completed=event["done"],
                                info=f"{event['samples']} samples")

            node, client = predict_node(config, input, epoch=epoch, batch_size=batch_size, progress=show)
            res = node.run()
        _write_result(result, res)
        _exit_for(res, "predict for")
        done = client.done_rows
        path = write_predictions(output, client.predicted_ids(), {s: v[done] for s, v in client.predictions().items()})
        m = res.metrics
        console.print(f"{int(m['samples'])} predictions written to {path} (epoch {client.epoch}): "
                      f"{m['samples_per_s']:.0f} samples/s over {m['seconds']:.2f} s", markup=False)
        missing = client.missing_ids
        if len(missing):
            shown = ", ".join(str(int(i)) for i in missing[:10]) + (", ..." if len(missing) > 10 else "")
            console.print(f"{len(missing)} id(s) not predicted: not held by every party that reads rows for them "
                          f"({shown})", markup=False)
        for key in sorted(k for k in m if k.startswith("accuracy/")):
            console.print(f"{key} (labels of {input.name}, kept here): {m[key]:.4f}", markup=False)
