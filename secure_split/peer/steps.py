"""The steps of one peer: where an activation, a gradient or an HE input meets the executor.

`StepRunner` sits between a schedule and the sans-IO `PeerExecutor`. A schedule decides which step
runs when (`begin`); the runner takes the step's tensors as they arrive (`take`), turns what the
executor wants to send into `Send` effects (`sends`: plain tensors, or CKKS ciphertexts on an
edge into an HE merge), and reports a finished step's metrics (`finish_if_complete`).

Rules (the same for every schedule):
- one step is active at a time; `training.pipeline_depth` (k; `training.overlap` is k = 2) lets a
  peer without a loss begin up to k - 1 later training steps while the active one waits for its
  gradients (`begin_ahead`), and an activation of such a step runs its forward at once;
- a tensor for the active step is taken now; one for a later step waits (the schedule answers
  "later"), at most `limits.step_window` steps ahead (`protocol.bounds.StepWindow`); one for an
  earlier step, or further ahead, is refused (`RemoteProtocolError`: the node audits it, answers
  the sender and counts it against the sender's violation budget);
- an edge into an HE merge carries ciphertexts: the owner encrypts (`he_merge.encrypt_cut`), the
  merge holder collects and masks (`HeMergeHolder`), the key holder's rounded decryption comes
  back as `masked_aggregate` and the unmasked sum goes to the executor (`on_aggregate`);
  the merge's gradient goes back as `aggregate_gradient`. The holder takes ciphertexts of a later
  step (within the step window) at once and sends their masked sum out for decryption, so the
  key holder's round for step t+1 runs while step t computes; the decrypted sum waits for its step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from secure_split.config import LimitsSpec
from secure_split.crypto.he import CkksContext
from secure_split.engine.executor import Outgoing, PeerExecutor
from secure_split.engine.metrics import StepMetrics
from secure_split.engine.tensors import from_wire, to_wire
from secure_split.errors import RemoteProtocolError
from secure_split.peer.effects import Effect, Send
from secure_split.peer.rounds.he_merge import HeMergeHolder, encrypt_cut
from secure_split.protocol import Kind, Message, WireTensor
from secure_split.protocol.bounds import StepWindow
from secure_split.topology import Topology

__all__ = ["STEP_TENSOR_KINDS", "StepRunner", "ids_from_wire", "ids_to_wire"]

STEP_TENSOR_KINDS = frozenset(
    {Kind.ACTIVATION, Kind.GRADIENT, Kind.ENCRYPTED_ACTIVATION, Kind.AGGREGATE_GRADIENT, Kind.MASKED_AGGREGATE}
)
"""The kinds that carry a step's tensors (the key holder's decryption requests aside)."""


def ids_to_wire(ids: Any) -> WireTensor:
    """Sample ids (or row positions) as a 1-D little-endian int64 tensor."""
    arr = np.ascontiguousarray(np.asarray(ids), dtype="<i8")
    return WireTensor("int64", (int(arr.shape[0]),), arr.tobytes())


def ids_from_wire(w: WireTensor) -> np.ndarray:
    """The ids of a `step_begin`.

    Raises:
        RemoteProtocolError: not a 1-D int64 tensor.
    """
    if w.dtype != "int64" or len(w.shape) != 1:
        raise RemoteProtocolError(f"step_begin ids must be a 1-D int64 tensor, got {w.dtype}{list(w.shape)}")
    return np.frombuffer(w.data, dtype="<i8").copy()


class StepRunner:
    """One peer's steps over its executor (see the module docstring).

    Args:
        executor: the peer's executor.
        topology: the deployment's topology.
        me: this peer.
        he_contexts: HE merge segment -> the CKKS context this peer holds for it (owners: to
            encrypt; the merge holder: public, to add and mask).
        he_key_holders: HE merge segment -> the peer that decrypts for it.
        limits: the deployment's bounds (message size, step window, open HE rounds).
    """

    def __init__(self, executor: PeerExecutor, topology: Topology, me: str, *, limits: LimitsSpec,
                 he_contexts: Mapping[str, CkksContext] | None = None,
                 he_key_holders: Mapping[str, str | None] | None = None) -> None:
        self.executor = executor
        self.topology = topology
        self.me = me
        self.window = StepWindow(limits.step_window)
        max_bytes = limits.max_message_bytes
        self.current_step: int | None = None
        self.current_phase: str = "train"
        self.last_metrics: StepMetrics | None = None
        self._he_contexts = dict(he_contexts or {})
        self._holders: dict[str, HeMergeHolder] = {}
        for seg in topology.he_segments:
            if topology.peer_of(seg) != me:
                continue
            kh = (he_key_holders or {}).get(seg)
            if kh is None or seg not in self._he_contexts:
                raise ValueError(f"HE merge '{seg}' needs its public context and key holder at '{me}'")
            feeders = {e: topology.edge_peers(e)[0] for e in topology.in_edges[seg]}
            self._holders[seg] = HeMergeHolder(seg, feeders, kh, self._he_contexts[seg], max_bytes=max_bytes,
                                               max_pending=limits.max_pending_he_rounds)

    # -- beginning and ending steps -----------------------------------------------------------

    @property
    def idle(self) -> bool:
        """No step is active."""
        return self.current_step is None

    def begin(self, step: int, phase: str, ids: Any, *, peers: list[str] | None = None) -> list[Effect]:
        """Make `step` the active step and run what can run at once (a data owner's forward)."""
        self.current_step = step
        self.current_phase = phase
        return self.sends(self.executor.begin_step(step, phase, ids, peers=peers))  # type: ignore[arg-type]

    def can_begin_ahead(self, step: int, phase: str) -> bool:
        """`training.pipeline_depth`: whether `step` may begin while the active one waits for gradients."""
        return self.current_step is not None and step > self.current_step and self.executor.can_begin_ahead(phase)

    def begin_ahead(self, step: int, phase: str, ids: Any) -> list[Effect]:
        """Begin `step` ahead of the active one (`can_begin_ahead` said yes)."""
        return self.sends(self.executor.begin_step(step, phase, ids))  # type: ignore[arg-type]

    def finish_if_complete(self) -> StepMetrics | None:
        """If the active step is complete, finish it and return its metrics; a step begun ahead
        becomes the active one."""
        if self.current_step is None or not self.executor.step_complete():
            return None
        metrics = self.executor.finish_step()
        self.last_metrics = metrics
        self.current_step = self.executor.active_step
        self.current_phase = self.executor.active_phase or self.current_phase
        return metrics

    def abort(self) -> None:
        """Drop the active step (and any begun ahead): a lost owner's, a rollback (HE rounds of
        later steps stay; a rollback starts over with a new runner)."""
        if self.current_step is not None:
            self.executor.abort_step()
            for holder in self._holders.values():
                holder.drop(self.current_step)
        self.current_step = None

    def he_pending_batch(self, segment: str, step: int) -> int | None:
        """HE merge holder: the batch size of step `step`'s masked sum out for decryption at
        `segment` (None if none is); a server that reads no rows begins its step with it."""
        holder = self._holders.get(segment)
        return None if holder is None else holder.pending_batch(step)

    # -- tensors ------------------------------------------------------------------------------

    def verdict(self, msg: Message) -> bool:
        """Whether a step tensor can be taken now (True) or must wait (False).

        Raises:
            RemoteProtocolError: it belongs to a finished step, or to one too far ahead.
        """
        step = msg.binding.step
        if msg.kind == Kind.ACTIVATION and step in self.executor.ahead_steps:
            return True
        if self.current_step is not None:
            problem = self.window.problem(step, self.current_step)
            if problem is not None:
                raise RemoteProtocolError(f"'{msg.binding.sender}' sent {msg.kind.value}: {problem}")
            if msg.kind == Kind.ENCRYPTED_ACTIVATION and str(msg.meta.get("segment", "")) in self._holders:
                return True  # a later step's ciphertext: its sum goes out for decryption now
        return self.current_step is not None and step == self.current_step

    def take(self, msg: Message) -> list[Effect]:
        """Hand one step tensor (which `verdict` accepted) to the executor.

        Raises:
            RemoteProtocolError: the executor or the HE merge refused it (nothing changed).
        """
        kind, step = msg.kind, msg.binding.step
        if kind == Kind.ACTIVATION and step in self.executor.ahead_steps:
            # pipelining: the input of a step begun ahead; its forward runs now
            return self.sends(self.executor.on_activation(msg.edge, from_wire(msg.tensors[0]), step=step))
        if kind == Kind.ACTIVATION:
            return self.sends(self.executor.on_activation(msg.edge, from_wire(msg.tensors[0])))
        if kind in (Kind.GRADIENT, Kind.AGGREGATE_GRADIENT):
            return self.sends(self.executor.on_gradient(msg.edge, from_wire(msg.tensors[0])))
        segment = str(msg.meta.get("segment", ""))
        holder = self._holders.get(segment)
        if holder is None:
            raise RemoteProtocolError(f"'{msg.binding.sender}' sent {kind.value} for '{segment}', which '{self.me}' does not hold")
        if kind == Kind.ENCRYPTED_ACTIVATION:
            return holder.on_encrypted(step, msg.edge, msg.binding.sender, bytes(msg.blob))
        total = holder.on_decrypted(step, msg.binding.sender, bytes(msg.blob))
        tensor = from_wire(WireTensor("float32", tuple(int(x) for x in total.shape), total.tobytes()))
        return self.sends(self.executor.on_aggregate(segment, tensor, step=step))

    def sends(self, outs: list[Outgoing]) -> list[Effect]:
        """What the executor wants sent, as gate sends (ciphertexts on edges into an HE merge)."""
        effects: list[Effect] = []
        for o in outs:
            target = self.topology.edges[o.edge].to
            if self.topology.segments[target].he:
                effects.append(self._he_send(o, target))
                continue
            kind = Kind.ACTIVATION if o.kind == "activation" else Kind.GRADIENT
            raw = o.raw.detach().reshape(o.raw.shape[0], -1).numpy() if o.raw is not None else None
            effects.append(Send(o.to_peer, kind, step=o.step, edge=o.edge, meta={"phase": o.phase},
                                tensors=(to_wire(o.tensor),), raw=raw))
        return effects

    def _he_send(self, o: Outgoing, segment: str) -> Send:
        if o.kind == "activation":
            blob = encrypt_cut(self._he_contexts[segment], o.tensor.detach().numpy())
            return Send(o.to_peer, Kind.ENCRYPTED_ACTIVATION, step=o.step, edge=o.edge,
                        meta={"segment": segment, "phase": o.phase}, blob=blob)
        return Send(o.to_peer, Kind.AGGREGATE_GRADIENT, step=o.step, edge=o.edge, meta={"phase": o.phase},
                    tensors=(to_wire(o.tensor),))
