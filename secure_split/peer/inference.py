"""Split inference: a trained deployment serves predictions to its data owners.

Two peer processes, both built on `PeerRuntime` (same config, keys, policy checks, gate, audit
chain and message loop):

- `InferenceServer` (`secure-split serve peers/NAME.yaml`) loads its newest checkpoint (or a
  given epoch), continues its audit log, and answers any data owner that says HELLO; each new
  `predict` process gets a fresh session. For each inbound `activation` with phase `infer` it
  runs an infer step restricted to the sender (`begin_step(peers=[sender])`; the batch's ids are
  positions, a server reads no data), sends on what its segments produce (U-shaped: back to the
  owner's tail) and, where it holds an output segment, returns a `prediction` message (int64
  argmax per sample) to the owner. It refuses, audited and with an `error` naming the reason,
  train-phase tensors, gradients, control messages and anything malformed, and keeps serving.
  It stops after `max_requests` finished requests, after `idle_exit_s` without a message, or on
  SIGTERM (exit 0) / SIGINT (exit 130), closing its audit log.
- `PredictClient` (`secure-split predict peers/OWNER.yaml --input F --output F`) loads the
  owner's checkpoint, checks before it sends anything that the policy lets every prediction come
  back (else exit 4 with a `policy_denied` entry), shakes hands with the servers the topology
  needs, checks they serve the same epoch, runs its input segments batch by batch, sends the cut
  activations through its gate (egress guards included) and collects the predictions: from a
  `prediction` message, or from its own output segment (U-shaped: the server never sees one).
  Labels in the input file are only compared locally. A request ends with an exchange of signed
  audit heads.

A request is one `predict` run: one session, its batches as steps 1..N, and a closing
`audit_receipt` each way. Several batches may be in flight where the owner's own step ends when
its activations are sent (vanilla); a U-shaped owner waits for each batch's tail input.

Topologies served: every segment a request reaches is at the owner or fed directly by it or by
the server itself, and every output segment is at the owner or fed directly by the owner
(vanilla, U-shaped, multi-task, horizontal owners). Multi-hop chains (a prediction would pass
peers that hold no session with the owner) and vertical merges (one owner cannot feed a merge of
several owners) are refused with a configuration error.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from secure_split.audit import SignedHead
from secure_split.config import Deployment
from secure_split.engine.checkpoint import list_checkpoints, load_checkpoint
from secure_split.engine.data import PeerData, load_peer_data
from secure_split.engine.executor import PeerExecutor
from secure_split.engine.tensors import from_wire
from secure_split.engine.topology import Topology
from secure_split.errors import (
    ConfigError,
    ConfigProblem,
    ExitCode,
    HandshakeRefused,
    PolicyDenied,
    RemoteProtocolError,
    SecureSplitError,
)
from secure_split.peer.runtime import PeerRuntime, ProgressFn, _checkpoint_digest, _clip
from secure_split.protocol import Kind, Message, SessionState, WireTensor

__all__ = [
    "InferencePlan",
    "InferenceServer",
    "PredictClient",
    "inference_clients",
    "inference_plan",
    "prediction_edge",
    "write_predictions",
]

# Batches a vanilla owner keeps in flight: its next batch's forward overlaps the server's work.
_IN_FLIGHT = 4
# Messages a server holds while another request's step is open; more are refused (bounded memory).
_MAX_BACKLOG = 64


@dataclass(frozen=True)
class InferencePlan:
    """What one owner's prediction request involves.

    Attributes:
        owner: the data owner asking.
        servers: the other peers whose segments the request runs through.
        local_outputs: output segments at the owner (U-shaped tail): predicted here.
        remote_outputs: output segment -> (its peer, the owner's edge into it): that peer returns
            a `prediction` message on that edge.
    """

    owner: str
    servers: tuple[str, ...]
    local_outputs: tuple[str, ...]
    remote_outputs: Mapping[str, tuple[str, str]]

    @property
    def outputs(self) -> tuple[str, ...]:
        """Every output segment, local first."""
        return (*self.local_outputs, *self.remote_outputs)


def inference_plan(deployment: Deployment, owner: str) -> InferencePlan:
    """Which segments and peers a prediction request of `owner` runs through.

    Raises:
        ConfigError: `owner` reads no features, or the topology cannot be served to it (see the
            module docstring), listing every reason.
    """
    topo = Topology.from_deployment(deployment)
    where = str(deployment.path)
    reached = {s for s in topo.order if topo.segments[s].input == "features" and topo.peer_of(s) == owner}
    if not reached:
        raise ConfigError(ConfigProblem(where, "segments", (
            f"peer '{owner}' owns no segment that reads features: only a data owner can ask for predictions")))
    problems: list[str] = []
    for seg in topo.order:
        ins = [e for e in topo.in_edges[seg] if topo.edges[e].from_ in reached]
        if seg in reached or not ins:
            continue
        spec = topo.segments[seg]
        if spec.merge is not None and len(ins) < len(topo.in_edges[seg]):
            others = sorted({topo.peer_of(topo.edges[e].from_) for e in topo.in_edges[seg] if e not in ins})
            problems.append(f"segment '{seg}' merges ({spec.merge}) inputs from {others} too, which one owner's "
                            "request cannot give")
        reached.add(seg)
    for eid, e in topo.edges.items():
        a, b = topo.peer_of(e.from_), topo.peer_of(e.to)
        if e.from_ in reached and a != b and owner not in (a, b):
            problems.append(f"edge {eid} runs from {a} to {b}: the request would pass peers that hold no session "
                            f"with {owner} (multi-hop chains are not served)")
    local: list[str] = []
    remote: dict[str, tuple[str, str]] = {}
    for seg in (s for s in topo.order if s in reached and not topo.out_edges[s]):
        peer = topo.peer_of(seg)
        if peer == owner:
            local.append(seg)
            continue
        edge = prediction_edge(topo, seg, owner)
        if edge is None:
            problems.append(f"output segment '{seg}' at {peer} is not fed directly by {owner}, so its "
                            "prediction could not come back")
        else:
            remote[seg] = (peer, edge)
    if problems:
        raise ConfigError([ConfigProblem(where, "edges", f"split inference for '{owner}': {p}") for p in problems])
    servers = tuple(sorted({topo.peer_of(s) for s in reached} - {owner}))
    return InferencePlan(owner, servers, tuple(local), remote)


def prediction_edge(topo: Topology, segment: str, owner: str) -> str | None:
    """The edge from one of `owner`'s segments into output `segment`: the route of its prediction."""
    return next((e for e in topo.in_edges[segment] if topo.peer_of(topo.edges[e].from_) == owner), None)


def inference_clients(deployment: Deployment, server: str) -> list[str]:
    """The data owners whose prediction requests run through `server`, sorted."""
    owners = sorted({seg.peer for seg in deployment.spec.segments.values() if seg.input == "features"} - {server})
    out = []
    for o in owners:
        try:
            if server in inference_plan(deployment, o).servers:
                out.append(o)
        except ConfigError:
            continue
    return out


def _load_trained(runtime: PeerRuntime, epoch: int | None) -> int:
    """Load `epoch` (default: the newest intact one) into the runtime's executor; return it."""
    have = list_checkpoints(runtime.checkpoint_dir)
    if epoch is None and not have:
        raise ConfigError(ConfigProblem(str(runtime.cfg.path), "checkpoints", (
            f"no checkpoint in {runtime.checkpoint_dir}: train the deployment first (`secure-split peer run` "
            "at every peer); split inference serves trained weights only")))
    chosen = have[-1] if epoch is None else epoch
    if chosen not in have:
        raise ConfigError(ConfigProblem(str(runtime.cfg.path), "checkpoints", (
            f"no intact checkpoint of epoch {chosen} in {runtime.checkpoint_dir} (there are: {have or 'none'})")))
    load_checkpoint(runtime.checkpoint_dir, chosen, runtime.executor)
    runtime.available_checkpoints = [chosen]  # announced in our HELLO: both sides must use one epoch
    return chosen


class _InferenceRuntime(PeerRuntime):
    """What server and client share: open with the audit chain continued and the weights on record."""

    def __init__(self, config_path: str | Path, *, progress: ProgressFn | None) -> None:
        # resume: the audit log continues the training run's chain (as `peer run --resume` does).
        super().__init__(config_path, resume=True, progress=progress)
        self.epoch = -1
        self.metrics: dict[str, float] = {}

    def _open(self) -> None:
        super()._open()
        self.audit.record("checkpoint_resumed", epoch=self.epoch, digest=_checkpoint_digest(self.checkpoint_dir, self.epoch))

    def _scalar_metrics(self) -> dict[str, float]:
        return dict(self.metrics)


class InferenceServer(_InferenceRuntime):
    """`secure-split serve`: answer prediction requests until told to stop (module docstring).

    Args:
        config_path: this peer's `peers/NAME.yaml`.
        epoch: the checkpoint to serve (default: the newest).
        max_requests: stop after this many finished requests (None: no limit).
        idle_exit_s: stop after this many seconds without a message (None: never).
        progress: called with {"event": "request", ...} when a request ends.

    Raises:
        ConfigError: this peer serves no owner, or has no such checkpoint.
    """

    accepts_restarted_peers = True  # every `predict` run opens a fresh session

    def __init__(self, config_path: str | Path, *, epoch: int | None = None, max_requests: int | None = None,
                 idle_exit_s: float | None = None, progress: ProgressFn | None = None) -> None:
        super().__init__(config_path, progress=progress)
        self.counterparties = inference_clients(self.deployment, self.me)
        if not self.counterparties:
            raise ConfigError(ConfigProblem(str(self.deployment.path), "segments", (
                f"peer '{self.me}' takes part in no owner's prediction request, so it has nothing to serve "
                "(see `secure-split predict --help` for the topologies served)")))
        self.epoch = _load_trained(self, epoch)
        self.max_requests = max_requests
        self.idle_exit_s = idle_exit_s
        self.requests_done = 0
        self.batches_served = 0
        self.stop_signal: int | None = None
        # The infer step in progress: (owner, step, started); messages of other steps wait.
        self.open_step: tuple[str, int, float] | None = None
        self.backlog: deque[Message] = deque()

    def _main(self) -> tuple[str, str]:
        with self._stop_on_signals():
            why = self._serve()
        if self.stop_signal == signal.SIGINT:
            self.result.exit_code = int(ExitCode.INTERRUPTED)
        self.metrics = {"requests": float(self.requests_done), "batches": float(self.batches_served)}
        return "ok", why

    def _tell_others_we_stopped(self, reason: str) -> None:
        if self.open_step is not None:
            self.gate.refuse(self.open_step[0], f"'{self.me}' stopped: {reason}", "server_stopped")

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
        last_message = time.monotonic()
        while True:
            if self.stop_signal is not None:
                return f"stopped by {signal.Signals(self.stop_signal).name}"
            if self.max_requests is not None and self.requests_done >= self.max_requests:
                return f"served {self.requests_done} request(s)"
            if self.idle_exit_s is not None and self.open_step is None and time.monotonic() - last_message > self.idle_exit_s:
                return f"no request for {self.idle_exit_s:g} s"
            self._note_transport_events()
            self._expire_open_step()
            try:
                msg = self.gate.receive(0.2)
            except HandshakeRefused:
                # Audited and answered by the gate; a later, matching HELLO gets a fresh session.
                self._reset_refused_sessions()
                continue
            except (RemoteProtocolError, PolicyDenied):
                continue  # audited and answered by the gate; keep serving
            if msg is None:
                continue
            last_message = time.monotonic()
            self._handle(msg)
            self._drain_backlog()

    def _reset_refused_sessions(self) -> None:
        for peer, session in list(self.gate.sessions.items()):
            if session.state is SessionState.REFUSED:
                self.gate.sessions[peer] = self._new_session(peer)

    def _note_transport_events(self) -> None:
        for ev in self.transport.events():
            if ev.kind == "handshake_failed":
                self.audit.record("error", reason=_clip(f"transport handshake with '{ev.peer}' failed: {ev.detail}"),
                                  error="TransportError")

    def _expire_open_step(self) -> None:
        if self.open_step is None:
            return
        owner, step, started = self.open_step
        limit = self.deployment.spec.limits.peer_timeout_s
        if time.monotonic() - started > limit:
            self._drop_open_step()
            self.audit.record("peer_lost", counterparty=owner, reason=f"infer step {step} incomplete after {limit:.0f} s")
            self.gate.refuse(owner, f"'{self.me}' dropped infer step {step}: its inputs did not all arrive within "
                             f"{limit:.0f} s", "timeout")

    def _drop_open_step(self) -> None:
        self.executor.abort_step()
        self.open_step = None

    def _drain_backlog(self) -> None:
        while self.backlog and self.open_step is None:
            self._handle(self.backlog.popleft())

    def _refuse(self, msg: Message, reason: str, code: str) -> None:
        """Refuse one message we received: audited, the sender told why; we keep serving."""
        sender = msg.binding.sender
        self.audit.record("refused", direction="receive", counterparty=sender, reason=_clip(reason),
                          error="RemoteProtocolError", kind=msg.kind.value)
        self.gate.refuse(sender, reason, code)

    def _handle(self, msg: Message) -> None:
        kind, sender = msg.kind, msg.binding.sender
        if kind == Kind.HELLO:
            rejoined = sender in self.gate.take_rejoined()
            if self.open_step is not None and self.open_step[0] == sender:
                self._drop_open_step()  # the old session's step can never complete
            self.backlog = deque(m for m in self.backlog if m.binding.sender != sender)
            if self.gate.sessions[sender].state is SessionState.HELLO_RECEIVED:
                self.gate.send_hello(sender)
            if not rejoined:
                self.audit.record("peer_joined", counterparty=sender, reason="prediction request")
        elif kind == Kind.HEARTBEAT:
            return
        elif kind == Kind.AUDIT_RECEIPT:
            self._end_request(msg)
        elif kind in (Kind.ERROR, Kind.REFUSE):
            self.audit.record("error", error="RemoteError", reason=_clip(
                f"'{sender}' reported {msg.meta.get('code', '')!s}: {msg.meta.get('reason', '')!s}"))
            if self.open_step is not None and self.open_step[0] == sender:
                self._drop_open_step()
        elif kind == Kind.ACTIVATION:
            self._on_activation(msg)
        else:
            self._refuse(msg, f"'{self.me}' serves predictions only and does not take '{kind.value}' messages; "
                         "training runs under `secure-split peer run`", "not_served")

    def _end_request(self, msg: Message) -> None:
        """The owner's closing receipt: countersign its head, send ours; one request done."""
        sender = msg.binding.sender
        head = SignedHead.from_meta(dict(msg.meta))
        if head.peer != sender:
            self._refuse(msg, f"'{sender}' sent an audit receipt for '{head.peer}'", "protocol")
            return
        self.audit.record_counterparty_head(head, self.deployment.spec.peers[sender].sign_key)
        own = self.audit.checkpoint(f"prediction request of {sender} done")
        self.gate.send(sender, Kind.AUDIT_RECEIPT, step=msg.binding.step, meta=own.to_meta())
        self.requests_done += 1
        self.progress({"event": "request", "owner": sender, "requests": self.requests_done,
                       "batches": self.batches_served})

    def _on_activation(self, msg: Message) -> None:
        sender, step = msg.binding.sender, msg.binding.step
        phase = msg.meta.get("phase")
        if phase != "infer":
            self._refuse(msg, f"'{self.me}' serves inference only: the activation on {msg.edge} has phase "
                         f"{phase!r}, not 'infer'; training runs under `secure-split peer run`", "not_served")
            return
        if self.open_step is not None and self.open_step[:2] != (sender, step):
            if len(self.backlog) >= _MAX_BACKLOG:
                self._refuse(msg, f"'{self.me}' is busy: {len(self.backlog)} activations wait already; send "
                             "the next batch when a prediction has come back", "busy")
            else:
                self.backlog.append(msg)
            return
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
            self._send_outgoing(outs)
        except SecureSplitError as exc:
            self._drop_open_step()
            code = "policy_denied" if isinstance(exc, PolicyDenied) else "bad_tensor"
            self._refuse(msg, f"'{self.me}' could not serve step {step} of '{sender}': {exc}", code)
            return
        if self.executor.step_complete():
            self.executor.finish_step()
            self.open_step = None
            self.batches_served += 1
            self._send_predictions(sender, step)

    def _send_predictions(self, owner: str, step: int) -> None:
        for segment, pred in self.executor.predictions().items():
            edge = prediction_edge(self.executor.topology, segment, owner)
            if edge is None:
                continue  # not this owner's output (inference_plan refuses such topologies)
            arr = np.ascontiguousarray(pred.numpy(), dtype="<i8")
            try:
                self.gate.send(owner, Kind.PREDICTION, step=step, edge=edge, meta={"segment": segment},
                               tensors=(WireTensor("int64", (int(arr.shape[0]),), arr.tobytes()),))
            except PolicyDenied as exc:  # audited by the gate
                self.gate.refuse(owner, f"'{self.me}' may not return the prediction of '{segment}': {exc}",
                                 "policy_denied")


class PredictClient(_InferenceRuntime):
    """`secure-split predict`: one owner's prediction request (module docstring).

    Args:
        config_path: the owner's `peers/OWNER.yaml`.
        input_path: a data file (`write_peer_data`: ids + features; labels optional, never sent).
        epoch: the checkpoint to use (default: the newest); the servers must serve the same.
        batch_size: samples per step (default: the deployment's training batch size).
        progress: called with {"event": "batch", "done", "batches", "samples"} per finished batch.

    Raises:
        ConfigError: unreadable input, a topology that cannot be served, no such checkpoint.
    """

    def __init__(self, config_path: str | Path, input_path: str | Path, *, epoch: int | None = None,
                 batch_size: int | None = None, progress: ProgressFn | None = None) -> None:
        super().__init__(config_path, progress=progress)
        self.plan = inference_plan(self.deployment, self.me)
        self.inputs: PeerData = load_peer_data(input_path)
        if len(self.inputs) == 0:
            raise ConfigError(ConfigProblem(str(input_path), "ids", "the input file holds no samples"))
        self.executor = PeerExecutor(self.deployment, self.me, self.inputs)
        self.epoch = _load_trained(self, epoch)
        self.batch_size = batch_size or self.deployment.spec.training.batch_size
        if self.batch_size < 1:
            raise ConfigError(ConfigProblem("--batch-size", "batch_size", "give a batch size of at least 1"))
        self.counterparties = list(self.plan.servers)
        n = len(self.inputs)
        self.predicted = {s: np.full(n, -1, dtype=np.int64) for s in self.plan.outputs}
        self.rows: dict[int, np.ndarray] = {}  # step -> input rows of its batch
        self.got: dict[int, set[str]] = {}  # step -> output segments predicted so far
        self.batches_done = 0
        self.batches_total = 0
        self.samples_done = 0

    def _main(self) -> tuple[str, str]:
        for segment, (peer, edge) in self.plan.remote_outputs.items():
            try:
                self.gate.check_route(peer, self.me, Kind.PREDICTION, edge=edge)
            except PolicyDenied as exc:
                raise PolicyDenied(
                    f"{exc}; nothing was sent. Serving needs an allow rule for kind 'prediction' from {peer} "
                    f"to {self.me} on edge {edge} (the prediction of '{segment}'); see "
                    f"`secure-split policy explain POLICY --from {peer} --to {self.me} --kind prediction --edge {edge}`",
                    exc.decision) from None
        self._handshake()
        self._check_server_epochs()
        started = time.perf_counter()
        self._predict_batches()
        seconds = time.perf_counter() - started
        self._exchange_heads()
        n = len(self.inputs)
        self.metrics = {"samples": float(n), "seconds": seconds, "samples_per_s": n / max(seconds, 1e-9),
                        **self._accuracy()}
        self.result.metrics = dict(self.metrics)
        return "ok", ""

    def _tell_others_we_stopped(self, reason: str) -> None:
        for peer in self.counterparties:
            session = self.gate.sessions.get(peer)
            if session is not None and session.state is SessionState.ESTABLISHED:
                self.gate.refuse(peer, f"'{self.me}' stopped its prediction request: {reason}", "client_stopped")

    def _check_server_epochs(self) -> None:
        for peer in self.counterparties:
            theirs = (self.gate.sessions[peer].remote_hello_meta or {}).get("checkpoints")
            if theirs != [self.epoch]:
                raise ConfigError(ConfigProblem(str(self.cfg.path), "checkpoints", (
                    f"'{peer}' serves the checkpoint of epoch {theirs!r}, '{self.me}' loaded epoch {self.epoch}: both "
                    f"must use the same training epoch; restart `secure-split serve --epoch {self.epoch}` at "
                    f"'{peer}' or run predict with --epoch")))

    def _dispatch(self, msg: Message) -> None:
        if msg.kind in (Kind.ERROR, Kind.REFUSE) and msg.meta.get("code") == "policy_denied":
            raise PolicyDenied(f"'{msg.binding.sender}' refused: {msg.meta.get('reason', '')!s}")
        super()._dispatch(msg)

    def _try_process(self, msg: Message) -> bool:
        if msg.kind == Kind.PREDICTION:
            self._on_prediction(msg)
            return True
        if msg.kind != Kind.ACTIVATION or msg.meta.get("phase") != "infer":
            raise RemoteProtocolError(
                f"'{msg.binding.sender}' sent {msg.kind.value} (phase {msg.meta.get('phase')!r}) to a prediction "
                "request, which takes only infer activations and predictions")
        return super()._try_process(msg)

    def _maybe_finish_step(self) -> None:
        step = self.current_step
        super()._maybe_finish_step()
        if step is not None and self.current_step is None:
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
            self.progress({"event": "batch", "done": self.batches_done, "batches": self.batches_total,
                           "samples": self.samples_done})

    def _predict_batches(self) -> None:
        n = len(self.inputs)
        batches = np.array_split(np.arange(n), max(1, -(-n // self.batch_size)))
        self.batches_total = len(batches)
        ids = self.inputs.ids.numpy()

        def servers() -> list[str]:
            return list(self.counterparties)

        for i, rows in enumerate(batches):
            self._wait(lambda: self.current_step is None and len(self.rows) < _IN_FLIGHT,
                       lambda: "waiting for predictions", servers)
            step = i + 1
            self.rows[step] = rows
            self._begin(step, "infer", ids[rows])
        self._wait(lambda: not self.rows, lambda: "waiting for the last predictions", servers)

    def _exchange_heads(self) -> None:
        key = self.batches_total + 1
        head = self.audit.checkpoint("prediction request done")
        for peer in self.counterparties:
            self.gate.send(peer, Kind.AUDIT_RECEIPT, step=key, meta=head.to_meta())
        self._wait(lambda: self.receipts.get(key, set()) >= set(self.counterparties),
                   lambda: "exchanging signed audit heads", lambda: sorted(set(self.counterparties) - self.receipts.get(key, set())))

    def _accuracy(self) -> dict[str, float]:
        """Accuracy per output segment where the input file holds its label column (never sent)."""
        out = {}
        for segment in self.plan.outputs:
            column = self.deployment.spec.segments[segment].labels
            labels = self.inputs.labels.get(column)
            if labels is not None:
                out[f"accuracy/{segment}"] = float((self.predicted[segment] == labels.numpy()).mean())
        return out

    def predictions(self) -> dict[str, np.ndarray]:
        """Output segment -> int64 [N] predicted classes, in the input file's order."""
        return dict(self.predicted)


def write_predictions(path: str | Path, ids: np.ndarray, predictions: Mapping[str, np.ndarray]) -> Path:
    """Write predictions as CSV (`id,prediction`; one `prediction_SEGMENT` column per output with
    several outputs) or, for a name ending in .json, a JSON list of such rows. The file is
    private to the owner (mode 0600), written whole or not at all.

    Returns:
        The path written.
    """
    p = Path(path)
    columns = ["prediction"] if len(predictions) == 1 else [f"prediction_{s}" for s in predictions]
    values = [np.asarray(v).tolist() for v in predictions.values()]
    rows = [[int(i), *(int(col[k]) for col in values)] for k, i in enumerate(np.asarray(ids).tolist())]
    if p.suffix.lower() == ".json":
        lines = [json.dumps(dict(zip(["id", *columns], r, strict=True))) for r in rows]
        text = "[\n" + ",\n".join(lines) + "\n]\n"  # one sample per line
    else:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["id", *columns])
        writer.writerows(rows)
        text = buf.getvalue()
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, p)
    return p

