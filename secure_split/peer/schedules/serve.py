"""`ServeSchedule` (`secure-split serve peers/NAME.yaml`): a trained peer answers prediction
requests of the data owners, from its newest checkpoint (or a given epoch).

The node continues the training run's audit chain and accepts any owner that says HELLO; each
new `predict` process gets a fresh session. For each inbound `activation` with phase `infer` the
server runs an infer step restricted to the sender (`begin_step(peers=[sender])`; the batch's
ids are positions, a server reads no data), sends on what its segments produce (U-shaped: back to
the owner's tail) and, where it holds an output segment, returns a `prediction` message (int64
argmax per sample) to the owner. It refuses, audited and with an `error` naming the reason,
train-phase tensors, gradients, control messages and anything malformed, and keeps serving.
One infer step is open at a time; activations of other requests wait, at most `_MAX_BACKLOG`
(more are refused `busy`). A request ends with the owner's signed audit head, which the server
records and answers with its own. The server stops after `max_requests` finished requests, after
`idle_exit_s` without a message, or on SIGTERM (exit 0) / SIGINT (exit 130), closing its audit log.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

from secure_split.engine.tensors import from_wire
from secure_split.errors import (
    ConfigError,
    ConfigProblem,
    ExitCode,
    PolicyDenied,
    RemoteProtocolError,
    SecureSplitError,
)
from secure_split.peer.checkpoints import checkpoint_digest, chosen_epoch, load_trained
from secure_split.peer.context import PeerContext, clip
from secure_split.peer.effects import Record
from secure_split.peer.serving import inference_clients, prediction_edge
from secure_split.peer.steps import StepRunner
from secure_split.protocol import Kind, Message, WireTensor

if TYPE_CHECKING:
    from secure_split.peer.node import PeerNode

__all__ = ["ServeSchedule"]

# Messages a server holds while another request's step is open; more are refused (bounded memory).
_MAX_BACKLOG = 64


class ServeSchedule:
    """`secure-split serve` (module docstring).

    Args:
        ctx: this peer's loaded files.
        epoch: the checkpoint to serve (default: the newest).
        max_requests: stop after this many finished requests (None: no limit).
        idle_exit_s: stop after this many seconds without a message (None: never).

    Raises:
        ConfigError: this peer serves no owner, or has no such checkpoint.
    """

    def __init__(self, ctx: PeerContext, *, epoch: int | None = None, max_requests: int | None = None,
                 idle_exit_s: float | None = None) -> None:
        self.ctx = ctx
        self.me = ctx.me
        self.clients = inference_clients(ctx.deployment, self.me)
        if not self.clients:
            raise ConfigError(ConfigProblem(str(ctx.deployment.path), "segments", (
                f"peer '{self.me}' takes part in no owner's prediction request, so it has nothing to serve "
                "(see `secure-split predict --help` for the topologies served)")))
        self.executor = ctx.executor(None)
        self.steps = StepRunner(self.executor, ctx.topology, self.me,
                                limits=self.ctx.deployment.spec.limits)
        self.epoch = chosen_epoch(ctx, epoch)
        load_trained(ctx, self.executor, self.epoch)
        self.max_requests = max_requests
        self.idle_exit_s = idle_exit_s
        self.requests_done = 0
        self.batches_served = 0
        self.stop_signal: int | None = None
        self.last_message = time.monotonic()
        # The infer step in progress: (owner, step, started); messages of other steps wait.
        self.open_step: tuple[str, int, float] | None = None
        self.backlog: deque[Message] = deque()

    # -- the Schedule protocol ------------------------------------------------------------------

    def attach(self, node: PeerNode) -> None:
        """The node this schedule sends through."""
        self.node = node

    def start_records(self) -> list[Record]:
        """What trains here: one `segment_commitment` entry per local segment."""
        return [Record("segment_commitment", r) for r in self.executor.segment_records()]

    def hello_meta(self) -> dict[str, Any]:
        """The epoch served (the client must use the same)."""
        return {"checkpoints": [self.epoch]}

    def prepare(self) -> None:
        """Nothing to check before serving."""

    def set_up(self) -> None:
        """Record which trained weights are served."""
        self.node.record("checkpoint_resumed", epoch=self.epoch,
                         digest=checkpoint_digest(self.ctx.cfg.checkpoints_dir, self.epoch))

    def run(self) -> tuple[str, str]:
        """Serve until a stop condition; returns ("ok", why it stopped)."""
        with self._stop_on_signals():
            why = self._serve()
        if self.stop_signal == signal.SIGINT:
            self.node.result.exit_code = int(ExitCode.INTERRUPTED)
        return "ok", why

    def on_message(self, msg: Message) -> bool:
        """A client's HELLO (a new request) or activation; anything else is refused."""
        self.last_message = time.monotonic()
        kind = msg.kind
        if kind == Kind.HELLO:
            self._forget(msg.binding.sender)
            self.node.record("peer_joined", counterparty=msg.binding.sender, reason="prediction request")
            return True
        if kind == Kind.ACTIVATION:
            return self._on_activation(msg)
        raise RemoteProtocolError(f"'{self.me}' serves predictions only and does not take '{kind.value}' messages; "
                                  "training runs under `secure-split peer run`", code="not_served")

    def on_peer_lost(self, peer: str, reason: str, *, timed_out: bool) -> bool:
        """A client that goes away ends only its own request."""
        self._forget(peer)
        return True

    def on_peer_restarted(self, peer: str) -> None:
        """A new `predict` run of the same owner: its old request can never complete."""
        self._forget(peer)

    def on_remote_error(self, msg: Message) -> bool:
        """A client's error ends its request; the server goes on."""
        sender = msg.binding.sender
        self.node.record("error", error="RemoteError", reason=clip(
            f"'{sender}' reported {msg.meta.get('code', '')!s}: {msg.meta.get('reason', '')!s}"))
        if self.open_step is not None and self.open_step[0] == sender:
            self._drop_open_step()
        return True

    def on_receipt(self, sender: str, key: int) -> None:
        """The client's signed close head (the end of its request): answer with ours; one request done."""
        own = self.node.signed_head(f"prediction request of {sender} done")
        self.node.send(sender, Kind.AUDIT_RECEIPT, step=key, meta=own.to_meta())
        self.requests_done += 1
        self.node.progress({"event": "request", "owner": sender, "requests": self.requests_done,
                            "batches": self.batches_served})

    def reachable(self, peer: str) -> bool:
        """Clients are not sent a shutdown."""
        return False

    def working_state(self) -> str:
        """The state this peer reports while it runs (`peer.metrics.PEER_STATES`)."""
        return "serving"

    def close_peers(self) -> list[str]:
        """A server closes after its clients left: each request ended with its client's close
        head, answered with ours."""
        return []

    def tell_others_we_stopped(self, reason: str) -> None:
        """The client of the open step learns why it will get no answer."""
        if self.open_step is not None:
            self.node.refuse(self.open_step[0], f"'{self.me}' stopped: {reason}", "server_stopped")

    def final_metrics(self) -> dict[str, float]:
        """Requests and batches served."""
        return {"requests": float(self.requests_done), "batches": float(self.batches_served)}

    # -- serving ----------------------------------------------------------------------------------

    @contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """SIGINT and SIGTERM end the loop between two messages (so the audit log closes cleanly)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def stop(signum: int, _frame: Any) -> None:
            self.stop_signal = signum

        old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)

    def _serve(self) -> str:
        """The serving loop. Returns why it ended."""
        self.last_message = time.monotonic()
        while True:
            if self.stop_signal is not None:
                return f"stopped by {signal.Signals(self.stop_signal).name}"
            if self.max_requests is not None and self.requests_done >= self.max_requests:
                return f"served {self.requests_done} request(s)"
            if self.idle_exit_s is not None and self.open_step is None \
                    and time.monotonic() - self.last_message > self.idle_exit_s:
                return f"no request for {self.idle_exit_s:g} s"
            self._expire_open_step()
            self.node.poll(0.2)
            self._drain_backlog()

    def _forget(self, peer: str) -> None:
        if self.open_step is not None and self.open_step[0] == peer:
            self._drop_open_step()  # the old session's step can never complete
        self.backlog = deque(m for m in self.backlog if m.binding.sender != peer)

    def _expire_open_step(self) -> None:
        if self.open_step is None:
            return
        owner, step, started = self.open_step
        limit = self.ctx.deployment.spec.limits.peer_timeout_s
        if time.monotonic() - started > limit:
            self._drop_open_step()
            self.node.record("peer_lost", counterparty=owner, reason=f"infer step {step} incomplete after {limit:.0f} s")
            self.node.refuse(owner, f"'{self.me}' dropped infer step {step}: its inputs did not all arrive within "
                             f"{limit:.0f} s", "timeout")

    def _drop_open_step(self) -> None:
        self.executor.abort_step()
        self.open_step = None

    def _drain_backlog(self) -> None:
        while self.backlog and self.open_step is None:
            msg = self.backlog.popleft()
            try:
                self._on_activation(msg)
            except RemoteProtocolError as exc:
                self.node.refuse_message(msg, exc)

    def _on_activation(self, msg: Message) -> bool:
        sender, step = msg.binding.sender, msg.binding.step
        phase = msg.meta.get("phase")
        if phase != "infer":
            raise RemoteProtocolError(f"'{self.me}' serves inference only: the activation on {msg.edge} has phase "
                                      f"{phase!r}, not 'infer'; training runs under `secure-split peer run`",
                                      code="not_served")
        if self.open_step is not None and self.open_step[:2] != (sender, step):
            if len(self.backlog) >= _MAX_BACKLOG:
                raise RemoteProtocolError(f"'{self.me}' is busy: {len(self.backlog)} activations wait already; send "
                                          "the next batch when a prediction has come back", code="busy")
            self.backlog.append(msg)
            return True
        t = msg.tensors[0]
        try:
            outs = []
            if self.open_step is None:
                if not t.shape:
                    raise RemoteProtocolError(f"activation on {msg.edge} has no batch dimension")
                ids = np.arange(t.shape[0], dtype=np.int64)  # positions: a server reads no data
                outs = self.executor.begin_step(step, "infer", ids, peers=[sender])
                self.open_step = (sender, step, time.monotonic())
            outs += self.executor.on_activation(msg.edge, from_wire(t), step=step)
            self.node.apply(self.steps.sends(outs))
        except SecureSplitError as exc:
            self._drop_open_step()
            code = "policy_denied" if isinstance(exc, PolicyDenied) else "bad_tensor"
            raise RemoteProtocolError(f"'{self.me}' could not serve step {step} of '{sender}': {exc}", code=code) from None
        if self.executor.step_complete():
            self.executor.finish_step()
            self.open_step = None
            self.batches_served += 1
            self._send_predictions(sender, step)
        return True

    def _send_predictions(self, owner: str, step: int) -> None:
        for segment, pred in self.executor.predictions().items():
            edge = prediction_edge(self.executor.topology, segment, owner)
            if edge is None:
                continue  # not this owner's output (inference_plan refuses such topologies)
            arr = np.ascontiguousarray(pred.numpy(), dtype="<i8")
            try:
                self.node.send(owner, Kind.PREDICTION, step=step, edge=edge, meta={"segment": segment},
                               tensors=(WireTensor("int64", (int(arr.shape[0]),), arr.tobytes()),))
            except PolicyDenied as exc:  # audited by the gate
                self.node.refuse(owner, f"'{self.me}' may not return the prediction of '{segment}': {exc}",
                                 "policy_denied")
