"""`PredictSchedule` (`secure-split predict peers/NAME.yaml --input F --output F`): one party's
prediction request, run by the party that wants the output (`secure_split.inference_routes`).

The requester loads its checkpoint and its input file (the ids to predict, with its own
features where it owns an input segment, transformed by its checkpoint's preprocessing) and,
before it sends anything, checks that the policy allows every route of the request that
concerns it, predictions first (else exit 4 with a `policy_denied` entry). It shakes hands with
every server of the request, checks they serve the same epoch and opens the request: a
`barrier` (reason `request`, a random request number in the step, the epoch, the parties) to
each; each answers `barrier_ack` once set up. Where other parties read rows for the ids, the
requested ids are aligned with theirs by PSI first: only the ids every one of them holds are
predicted, the others are reported as missing (`missing_ids`), not predicted.

Then batch by batch (batch k is step `number << 20 | k`): the ids of the batch go in a
`step_begin` to each party that reads rows (a few batches ahead, so they work while this one
waits); this party runs its own segments; the predictions come from its own output segments
(U-shaped tail, a lab's top) or in `prediction` messages from the holders of the outputs. Up to
`IN_FLIGHT` batches are in flight. Labels in the input file are only compared locally. A
request ends with an exchange of signed audit heads with every server.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from secure_split.engine.checkpoint import checkpoint_preprocessing
from secure_split.engine.data import PeerData, load_rows_to_predict
from secure_split.errors import ConfigError, ConfigProblem, PolicyDenied, RemoteProtocolError
from secure_split.inference_routes import request_routes
from secure_split.peer.checkpoints import checkpoint_digest, chosen_epoch, load_trained
from secure_split.peer.context import PeerContext
from secure_split.peer.effects import Record
from secure_split.peer.requests import (
    IN_FLIGHT,
    MAX_BATCHES,
    MAX_NUMBER,
    REQUEST_KINDS,
    InferenceRequest,
    request_number,
)
from secure_split.peer.steps import ids_to_wire
from secure_split.policy import he_key_holder
from secure_split.protocol import Kind, Message

if TYPE_CHECKING:
    from secure_split.peer.node import PeerNode

__all__ = ["PredictSchedule"]

# Batches in flight: the next batches' work overlaps the wait for this one's prediction.


class PredictSchedule:
    """One party's prediction request (module docstring).

    Args:
        ctx: the requester's loaded files.
        input_path: a data file: the ids, and the features where this party owns an input
            segment (labels optional, never sent).
        epoch: the checkpoint to use (default: the newest); the servers must serve the same.
        batch_size: samples per step (default: the deployment's training batch size).

    Raises:
        ConfigError: unreadable input, a party that cannot ask, no such checkpoint.
    """

    def __init__(self, ctx: PeerContext, input_path: str | Path, *, epoch: int | None = None,
                 batch_size: int | None = None) -> None:
        self.ctx = ctx
        self.me = ctx.me
        dep = ctx.deployment
        key_holders = {s: he_key_holder(dep, s, ctx.policy) for s in ctx.topology.he_segments}
        self.routes = request_routes(dep, self.me, key_holders)
        self.epoch = chosen_epoch(ctx, epoch)
        prep = checkpoint_preprocessing(ctx.cfg.checkpoints_dir, self.epoch)
        self.inputs: PeerData = load_rows_to_predict(ctx.cfg, input_path, prep)
        if len(self.inputs) == 0:
            raise ConfigError(ConfigProblem(str(input_path), "ids", "the input file holds no samples"))
        self.executor = ctx.executor(self.inputs)
        load_trained(ctx, self.executor, self.epoch)
        self.batch_size = batch_size or dep.spec.training.batch_size
        if self.batch_size < 1:
            raise ConfigError(ConfigProblem("--batch-size", "batch_size", "give a batch size of at least 1"))
        if -(-len(self.inputs) // self.batch_size) > MAX_BATCHES:
            raise ConfigError(ConfigProblem("--batch-size", "batch_size", (
                f"{len(self.inputs)} samples make more than {MAX_BATCHES} batches of {self.batch_size}: give a "
                "larger --batch-size or split the input file")))
        self.number = 1 + secrets.randbelow(MAX_NUMBER)
        self.request: InferenceRequest | None = None
        n = len(self.inputs)
        self.predicted = {s: np.full(n, -1, dtype=np.int64) for s in self.routes.outputs}
        self.done_rows = np.zeros(n, dtype=bool)
        self.missing_ids = np.zeros(0, dtype=np.int64)
        self.acks: set[str] = set()
        self.rows: dict[int, np.ndarray] = {}  # step -> input rows of its batch (announced, not yet predicted)
        self.got: dict[int, set[str]] = {}  # step -> output segments predicted so far
        self.batches_done = 0
        self.batches_total = 0
        self.samples_done = 0
        self.metrics: dict[str, Any] = {}

    @property
    def servers(self) -> list[str]:
        """The other parties of the request (the node's counterparties)."""
        return list(self.routes.servers)

    # -- the Schedule protocol ------------------------------------------------------------------

    def attach(self, node: PeerNode) -> None:
        """The node this schedule sends through."""
        self.node = node

    def start_records(self) -> list[Record]:
        """What runs here: one `segment_commitment` entry per local segment."""
        return [Record("segment_commitment", r) for r in self.executor.segment_records()]

    def working_state(self) -> str:
        """The state this peer reports while it runs (`peer.metrics.PEER_STATES`)."""
        return "predicting"

    def close_peers(self) -> list[str]:
        """The run ends with the close round: every server countersigns our close head."""
        return self.servers

    def hello_meta(self) -> dict[str, Any]:
        """The epoch used (the servers must serve the same)."""
        return {"checkpoints": [self.epoch]}

    def prepare(self) -> None:
        """Before anything is sent: the policy must allow every route of the request this party
        sends or receives, the predictions coming back first.

        Raises:
            PolicyDenied: a route is denied (audited; nothing was sent).
        """
        flows = [f for f in self.routes.flows() if self.me in (f.sender, f.receiver)]
        flows.sort(key=lambda f: f.kind != "prediction")
        for f in flows:
            try:
                self.node.gate.check_route(f.sender, f.receiver, Kind(f.kind), edge=f.edge or "")
            except PolicyDenied as exc:
                on = f" on edge {f.edge}" if f.edge else ""
                edge = f" --edge {f.edge}" if f.edge else ""
                raise PolicyDenied(
                    f"{exc}; nothing was sent. This prediction request needs an allow rule for kind '{f.kind}' from "
                    f"{f.sender} to {f.receiver}{on} ({f.why}); see `secure-split policy explain POLICY "
                    f"--from {f.sender} --to {f.receiver} --kind {f.kind}{edge}`", exc.decision) from None

    def set_up(self) -> None:
        """Check the servers serve the same epoch; open the request; align the ids by PSI where
        other parties read rows; wait until every server is set up."""
        self.node.record("checkpoint_resumed", epoch=self.epoch,
                         digest=checkpoint_digest(self.ctx.cfg.checkpoints_dir, self.epoch))
        for peer in self.servers:
            theirs = self.node.hello_meta_of(peer).get("checkpoints")
            if theirs != [self.epoch]:
                raise ConfigError(ConfigProblem(str(self.ctx.cfg.path), "checkpoints", (
                    f"'{peer}' serves the checkpoint of epoch {theirs!r}, '{self.me}' loaded epoch {self.epoch}: both "
                    f"must use the same training epoch; restart `secure-split serve --epoch {self.epoch}` at "
                    f"'{peer}' or run predict with --epoch")))
        ids = self.inputs.ids.numpy()
        req = self.request = InferenceRequest(self.ctx, self.routes, self.number, self.executor,
                                              own_ids=ids if self.routes.psi_parties else None)
        for peer in self.servers:
            self.node.send(peer, Kind.BARRIER, step=req.base, meta={
                "epoch": self.epoch, "reason": "request", "phase": "infer", "members": list(self.routes.peers)})
        self.node.apply(req.start())
        self.node.wait(lambda: req.ready and self.acks >= set(self.servers),
                       lambda: f"opening prediction request {self.number}",
                       lambda: sorted(set(self.servers) - self.acks) or list(self.routes.psi_parties[1:]))
        if req.aligned is not None:
            keep = np.isin(ids, req.aligned)
            self.missing_ids = ids[~keep]

    def run(self) -> tuple[str, str]:
        """Every batch, then the closing exchange of signed heads."""
        started = time.perf_counter()
        self._predict_batches()
        seconds = time.perf_counter() - started
        req = self._request
        self.node.exchange_heads(req.base, self.servers, f"prediction request {self.number} done")
        n = int(self.done_rows.sum())
        self.metrics = {"samples": float(n), "seconds": seconds, "samples_per_s": n / max(seconds, 1e-9),
                        "missing": float(len(self.missing_ids)), **self._accuracy()}
        self.node.result.metrics = dict(self.metrics)
        return "ok", ""

    def on_message(self, msg: Message) -> bool:
        """Set-up rounds, acknowledgements, predictions and the request's step tensors."""
        kind, sender, step = msg.kind, msg.binding.sender, msg.binding.step
        if kind == Kind.HELLO:
            return True
        req = self.request
        if req is None or request_number(step) != self.number:
            raise RemoteProtocolError(f"'{sender}' sent {kind.value} for step {step}, which is not part of "
                                      f"prediction request {self.number}")
        if kind == Kind.BARRIER_ACK:
            if sender not in self.servers or step != req.base or sender in self.acks:
                raise RemoteProtocolError(f"'{sender}' acknowledged a request it was not asked to, or twice")
            self.acks.add(sender)
            return True
        if kind in (Kind.PSI, Kind.HE_CONTEXT):
            self.node.apply(req.on_setup(msg))
            return True
        if kind == Kind.PREDICTION:
            self._on_prediction(msg)
            return True
        if kind not in REQUEST_KINDS:
            raise RemoteProtocolError(f"'{sender}' sent {kind.value} to a prediction request, which takes only "
                                      "infer tensors, predictions and its set-up messages")
        if not req.ready:
            return False
        effects = req.offer(msg, executor_free=self.executor.active_step is None)
        if effects is None:
            return False
        self.node.apply(effects)
        self._finish_if_complete()
        return True

    def on_peer_lost(self, peer: str, reason: str, *, timed_out: bool) -> bool:
        """A request needs every party."""
        return False

    def on_peer_restarted(self, peer: str) -> None:
        """Not accepted (a second HELLO from a server is refused by the gate)."""

    def on_remote_error(self, msg: Message) -> bool:
        """A server that refuses on policy grounds stops the request with exit 4; any other
        error stops it with the server's reason.

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

    def tell_others_we_stopped(self, reason: str) -> None:
        """Each server learns the request stopped."""
        for peer in self.servers:
            if self.node.established(peer):
                self.node.refuse(peer, f"'{self.me}' stopped its prediction request: {reason}", "client_stopped")

    def final_metrics(self) -> dict[str, float]:
        """Samples, seconds, throughput, missing ids and local accuracy."""
        return {k: float(v) for k, v in self.metrics.items()}

    # -- the request --------------------------------------------------------------------------------

    @property
    def _request(self) -> InferenceRequest:
        if self.request is None:
            raise RemoteProtocolError("internal: the prediction request is not open")  # pragma: no cover
        return self.request

    def _finish_if_complete(self) -> None:
        done = self._request.finish()
        if done is None:
            return
        step, predictions = done
        for segment, values in predictions.items():
            self._store(step, segment, values)

    def _on_prediction(self, msg: Message) -> None:
        sender, step = msg.binding.sender, msg.binding.step
        segment = msg.meta.get("segment")
        expected = segment in self.routes.outputs and self.routes.output_peer(str(segment)) == sender \
            and (self.routes.prediction_edge(str(segment)) or "") == msg.edge
        if not expected:
            raise RemoteProtocolError(f"'{sender}' sent a prediction for {segment!r} on edge {msg.edge!r}, which "
                                      "this request does not expect from it")
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
        if len(got) == len(self.routes.outputs):
            del self.rows[step], self.got[step]
            self.done_rows[rows] = True
            self.batches_done += 1
            self.samples_done += len(rows)
            self.node.progress({"event": "batch", "done": self.batches_done, "batches": self.batches_total,
                                "samples": self.samples_done})

    def _predict_batches(self) -> None:
        req = self._request
        ids = self.inputs.ids.numpy()
        if req.aligned is None:
            positions = np.arange(len(ids))
        else:  # the aligned ids, sorted: each party reads the same rows in the same order
            order = {int(v): i for i, v in enumerate(ids.tolist())}
            positions = np.asarray([order[int(v)] for v in req.aligned.tolist()], dtype=np.int64)
        n = len(positions)
        batches = np.array_split(positions, max(1, -(-n // self.batch_size))) if n else []
        self.batches_total = len(batches)
        readers = [p for p in self.routes.row_holders if p != self.me]
        announced = 0

        def announce_ahead() -> None:
            nonlocal announced
            while announced < len(batches) and len(self.rows) < IN_FLIGHT:
                rows = batches[announced]
                announced += 1
                step = req.step(announced)
                self.rows[step] = rows
                for peer in readers:
                    self.node.send(peer, Kind.STEP_BEGIN, step=step, meta={"epoch": self.epoch, "phase": "infer"},
                                   tensors=(ids_to_wire(ids[rows]),))

        def may_begin(step: int) -> bool:
            announce_ahead()  # as predictions come back, the next batches go out
            return step in self.rows and self._steps_idle()

        for k in range(1, len(batches) + 1):
            step = req.step(k)
            self.node.wait(_bind(may_begin, step), lambda: "waiting for predictions", lambda: self.servers)
            self.node.apply(req.begin(step, ids[self.rows[step]]))
            self._finish_if_complete()
        self.node.wait(lambda: not self.rows, lambda: "waiting for the last predictions", lambda: self.servers)

    def _steps_idle(self) -> bool:
        steps = self._request.steps
        return steps is not None and steps.idle

    def _accuracy(self) -> dict[str, float]:
        """Accuracy per output over the predicted rows, where the input file holds its label
        column (never sent)."""
        out = {}
        done = self.done_rows
        for segment in self.routes.outputs:
            column = self.ctx.deployment.spec.segments[segment].labels
            labels = self.inputs.labels.get(column)
            if labels is not None and done.any():
                out[f"accuracy/{segment}"] = float((self.predicted[segment][done] == labels.numpy()[done]).mean())
        return out

    def predictions(self) -> dict[str, np.ndarray]:
        """Output segment -> int64 [N] predicted classes, in the input file's order (-1 for the
        ids not predicted: see `missing_ids`)."""
        return dict(self.predicted)

    def predicted_ids(self) -> np.ndarray:
        """The ids that were predicted, in the input file's order."""
        return self.inputs.ids.numpy()[self.done_rows]


def _bind(fn: Callable[[int], bool], step: int) -> Callable[[], bool]:
    """`fn(step)` as a condition for `node.wait` (one closure per step, no loop variable)."""
    return lambda: fn(step)
