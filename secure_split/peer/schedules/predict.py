"""`PredictSchedule` (`secure-split predict peers/OWNER.yaml --input F --output F`): one owner's
prediction request.

The owner loads its checkpoint and, before it sends anything, checks that the policy lets every
prediction come back (else exit 4 with a `policy_denied` entry); it shakes hands with the servers
the topology needs, checks they serve the same epoch, runs its input segments batch by batch
(batch k is step k), sends the cut activations through its gate (egress guards included) and
collects the predictions: from a `prediction` message, or from its own output segment (U-shaped:
the server never sees one). Up to `_IN_FLIGHT` batches are in flight where the owner's own step
ends when its activations are sent (vanilla); a U-shaped owner waits for each batch's tail input.
Labels in the input file are only compared locally. A request ends with the node's close round:
the owner's signed close head to every server, each answering with its own.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from secure_split.engine.checkpoint import checkpoint_preprocessing
from secure_split.engine.data import PeerData, load_rows_to_predict
from secure_split.errors import ConfigError, ConfigProblem, PolicyDenied, RemoteProtocolError
from secure_split.peer.checkpoints import checkpoint_digest, chosen_epoch, load_trained
from secure_split.peer.context import PeerContext
from secure_split.peer.effects import Record
from secure_split.peer.serving import inference_plan
from secure_split.peer.steps import StepRunner
from secure_split.protocol import Kind, Message

if TYPE_CHECKING:
    from secure_split.peer.node import PeerNode

__all__ = ["PredictSchedule"]

# Batches a vanilla owner keeps in flight: its next batch's forward overlaps the server's work.
_IN_FLIGHT = 4


class PredictSchedule:
    """One owner's prediction request (module docstring).

    Args:
        ctx: the owner's loaded files.
        input_path: a data file (ids + features; labels optional, never sent).
        epoch: the checkpoint to use (default: the newest); the servers must serve the same.
        batch_size: samples per step (default: the deployment's training batch size).

    Raises:
        ConfigError: unreadable input, a topology that cannot be served, no such checkpoint.
    """

    def __init__(self, ctx: PeerContext, input_path: str | Path, *, epoch: int | None = None,
                 batch_size: int | None = None) -> None:
        self.ctx = ctx
        self.me = ctx.me
        self.plan = inference_plan(ctx.deployment, self.me)
        self.epoch = chosen_epoch(ctx, epoch)
        prep = checkpoint_preprocessing(ctx.cfg.checkpoints_dir, self.epoch)
        self.inputs: PeerData = load_rows_to_predict(ctx.cfg, input_path, prep)
        if len(self.inputs) == 0:
            raise ConfigError(ConfigProblem(str(input_path), "ids", "the input file holds no samples"))
        self.executor = ctx.executor(self.inputs)
        self.steps = StepRunner(self.executor, ctx.topology, self.me,
                                limits=self.ctx.deployment.spec.limits)
        load_trained(ctx, self.executor, self.epoch)
        self.batch_size = batch_size or ctx.deployment.spec.training.batch_size
        if self.batch_size < 1:
            raise ConfigError(ConfigProblem("--batch-size", "batch_size", "give a batch size of at least 1"))
        n = len(self.inputs)
        self.predicted = {s: np.full(n, -1, dtype=np.int64) for s in self.plan.outputs}
        self.rows: dict[int, np.ndarray] = {}  # step -> input rows of its batch
        self.got: dict[int, set[str]] = {}  # step -> output segments predicted so far
        self.batches_done = 0
        self.batches_total = 0
        self.samples_done = 0
        self.metrics: dict[str, float] = {}

    @property
    def servers(self) -> list[str]:
        """The peers the request runs through (the node's counterparties)."""
        return list(self.plan.servers)

    # -- the Schedule protocol ------------------------------------------------------------------

    def attach(self, node: PeerNode) -> None:
        """The node this schedule sends through."""
        self.node = node

    def start_records(self) -> list[Record]:
        """What trains here: one `segment_commitment` entry per local segment."""
        return [Record("segment_commitment", r) for r in self.executor.segment_records()]

    def hello_meta(self) -> dict[str, Any]:
        """The epoch used (the servers must serve the same)."""
        return {"checkpoints": [self.epoch]}

    def prepare(self) -> None:
        """Before anything is sent: the policy must let every prediction come back.

        Raises:
            PolicyDenied: a route is denied (audited; nothing was sent).
        """
        for segment, (peer, edge) in self.plan.remote_outputs.items():
            try:
                self.node.gate.check_route(peer, self.me, Kind.PREDICTION, edge=edge)
            except PolicyDenied as exc:
                raise PolicyDenied(
                    f"{exc}; nothing was sent. Serving needs an allow rule for kind 'prediction' from {peer} "
                    f"to {self.me} on edge {edge} (the prediction of '{segment}'); see "
                    f"`secure-split policy explain POLICY --from {peer} --to {self.me} --kind prediction --edge {edge}`",
                    exc.decision) from None

    def set_up(self) -> None:
        """Record the weights used; check the servers serve the same epoch."""
        self.node.record("checkpoint_resumed", epoch=self.epoch,
                         digest=checkpoint_digest(self.ctx.cfg.checkpoints_dir, self.epoch))
        for peer in self.servers:
            theirs = self.node.hello_meta_of(peer).get("checkpoints")
            if theirs != [self.epoch]:
                raise ConfigError(ConfigProblem(str(self.ctx.cfg.path), "checkpoints", (
                    f"'{peer}' serves the checkpoint of epoch {theirs!r}, '{self.me}' loaded epoch {self.epoch}: both "
                    f"must use the same training epoch; restart `secure-split serve --epoch {self.epoch}` at "
                    f"'{peer}' or run predict with --epoch")))

    def run(self) -> tuple[str, str]:
        """Every batch, then the closing exchange of signed heads."""
        started = time.perf_counter()
        self._predict_batches()
        seconds = time.perf_counter() - started
        n = len(self.inputs)
        self.metrics = {"samples": float(n), "seconds": seconds, "samples_per_s": n / max(seconds, 1e-9),
                        **self._accuracy()}
        self.node.result.metrics = dict(self.metrics)
        return "ok", ""

    def on_message(self, msg: Message) -> bool:
        """Predictions and (U-shaped) the server's activations into our tail."""
        if msg.kind == Kind.PREDICTION:
            self._on_prediction(msg)
            return True
        if msg.kind == Kind.HELLO:
            return True
        if msg.kind != Kind.ACTIVATION or msg.meta.get("phase") != "infer":
            raise RemoteProtocolError(
                f"'{msg.binding.sender}' sent {msg.kind.value} (phase {msg.meta.get('phase')!r}) to a prediction "
                "request, which takes only infer activations and predictions")
        if not self.steps.verdict(msg):
            return False
        self.node.apply(self.steps.take(msg))
        self._finish_if_complete()
        return True

    def on_peer_lost(self, peer: str, reason: str, *, timed_out: bool) -> bool:
        """A request needs every server."""
        return False

    def on_peer_restarted(self, peer: str) -> None:
        """Not accepted (a second HELLO from a server is refused by the gate)."""

    def on_remote_error(self, msg: Message) -> bool:
        """A server that refuses a prediction on policy grounds stops the request with exit 4.

        Raises:
            PolicyDenied: the server's policy refused.
        """
        if msg.meta.get("code") == "policy_denied":
            raise PolicyDenied(f"'{msg.binding.sender}' refused: {msg.meta.get('reason', '')!s}")
        return False

    def on_receipt(self, sender: str, key: int) -> None:
        """Waited on by `node.exchange_heads`."""

    def reachable(self, peer: str) -> bool:
        """Servers are not sent a shutdown."""
        return False

    def working_state(self) -> str:
        """The state this peer reports while it runs (`peer.metrics.PEER_STATES`)."""
        return "predicting"

    def close_peers(self) -> list[str]:
        """The request ends with the close round: every server countersigns our close head."""
        return self.servers

    def tell_others_we_stopped(self, reason: str) -> None:
        """Each server learns the request stopped."""
        for peer in self.servers:
            if self.node.established(peer):
                self.node.refuse(peer, f"'{self.me}' stopped its prediction request: {reason}", "client_stopped")

    def final_metrics(self) -> dict[str, float]:
        """Samples, seconds, throughput and local accuracy."""
        return dict(self.metrics)

    # -- the request --------------------------------------------------------------------------------

    def _finish_if_complete(self) -> None:
        step = self.steps.current_step
        if self.steps.finish_if_complete() is None or step is None:
            return
        preds = self.executor.predictions()
        for segment in self.plan.local_outputs:
            self._store(step, segment, preds[segment].numpy())

    def _on_prediction(self, msg: Message) -> None:
        sender, step = msg.binding.sender, msg.binding.step
        segment = msg.meta.get("segment")
        expected = self.plan.remote_outputs.get(segment) if isinstance(segment, str) else None
        if expected != (sender, msg.edge):
            raise RemoteProtocolError(f"'{sender}' sent a prediction for {segment!r} on edge {msg.edge!r}, which "
                                      f"this request does not expect from it")
        rows = self.rows.get(step)
        if rows is None or segment in self.got.get(step, set()):
            raise RemoteProtocolError(f"'{sender}' sent a prediction for step {step}, which is not outstanding")
        t = msg.tensors[0]
        if t.dtype != "int64" or tuple(t.shape) != (len(rows),):
            raise RemoteProtocolError(f"'{sender}' sent a prediction of {t.dtype}{list(t.shape)}; expected "
                                      f"int64[{len(rows)}] for step {step}")
        values = np.frombuffer(t.data, dtype="<i8")
        if values.size and int(values.min()) < 0:
            raise RemoteProtocolError(f"'{sender}' sent a negative class in its prediction for step {step}")
        self._store(step, str(segment), values)

    def _store(self, step: int, segment: str, values: np.ndarray) -> None:
        rows = self.rows[step]
        self.predicted[segment][rows] = values
        got = self.got.setdefault(step, set())
        got.add(segment)
        if len(got) == len(self.plan.outputs):
            del self.rows[step], self.got[step]
            self.batches_done += 1
            self.samples_done += len(rows)
            self.node.progress({"event": "batch", "done": self.batches_done, "batches": self.batches_total,
                                "samples": self.samples_done})

    def _predict_batches(self) -> None:
        n = len(self.inputs)
        batches = np.array_split(np.arange(n), max(1, -(-n // self.batch_size)))
        self.batches_total = len(batches)
        ids = self.inputs.ids.numpy()
        for i, rows in enumerate(batches):
            self.node.wait(lambda: self.steps.idle and len(self.rows) < _IN_FLIGHT,
                           lambda: "waiting for predictions", lambda: self.servers)
            step = i + 1
            self.rows[step] = rows
            self.node.apply(self.steps.begin(step, "infer", ids[rows]))
            self._finish_if_complete()
        self.node.wait(lambda: not self.rows, lambda: "waiting for the last predictions", lambda: self.servers)

    def _accuracy(self) -> dict[str, float]:
        """Accuracy per output segment where the input file holds its label column (never sent)."""
        out = {}
        for segment in self.plan.outputs:
            column = self.ctx.deployment.spec.segments[segment].labels
            labels = self.inputs.labels.get(column)
            if labels is not None:
                out[f"accuracy/{segment}"] = float((self.predicted[segment] == labels.numpy()).mean())
        return out

    def predictions(self) -> dict[str, np.ndarray]:
        """Output segment -> int64 [N] predicted classes, in the input file's order."""
        return dict(self.predicted)
