"""One party's part in one split prediction request, sans-IO (the requester's `PredictSchedule`
and every server's `ServeSchedule` drive one each).

A request is numbered by its requester (a random `number`); every message of it carries a step
in the request's range, `number << STEP_BITS` for its set-up messages (PSI, CKKS contexts, the
opening barrier, the closing signed heads) and that plus k for batch k. So a party that takes
part in several requests at once tells their messages apart by the step alone, whoever sent them.

Set-up (`start`, `on_setup`): a CKKS context per HE merge of the request (the key holder makes a
fresh one: public to the merge holder, secret sealed to the other feeders), and a PSI among the
requester and the parties that read rows for it (`RequestRoutes.psi_parties`): afterwards each
knows the requested ids that every one of them holds (`aligned`), nothing of the others' ids.
`ready` once every round this party takes part in is done.

Steps (`begin`, `offer`, `finish`): one step of the executor at a time (at a server, across all
its requests). The requester begins each batch itself; a party that reads rows begins on the
requester's `step_begin` (ids it holds, checked against `aligned`); any other server begins on
the first tensor of a step, with batch positions for ids (an activation gives the batch size; at
an HE merge, the masked sum out for decryption does). Ciphertexts into an HE merge are collected
whatever the executor does; the key holder decrypts at once. Gradients and train-phase tensors
have no place in a request and are refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from secure_split.crypto.he import CkksContext
from secure_split.engine.executor import PeerExecutor
from secure_split.errors import RemoteProtocolError, SecureSplitError
from secure_split.inference_routes import RequestRoutes
from secure_split.peer.context import PeerContext
from secure_split.peer.effects import Effect, Send
from secure_split.peer.rounds.contexts import ContextRound, vertical_plans
from secure_split.peer.rounds.he_merge import HeKeyHolder
from secure_split.peer.rounds.psi import PsiRound
from secure_split.peer.steps import STEP_TENSOR_KINDS, StepRunner, ids_from_wire
from secure_split.protocol import Kind, Message, WireTensor

__all__ = ["IN_FLIGHT", "MAX_BATCHES", "STEP_BITS", "InferenceRequest", "request_number"]

STEP_BITS = 20
IN_FLIGHT = 4
"""Batches a requester has announced and not yet got back, at most."""
"""A request's steps are `number << STEP_BITS` (set-up) and that plus 1..MAX_BATCHES (batches)."""
MAX_BATCHES = (1 << STEP_BITS) - 1
MAX_NUMBER = (1 << 31) - 1
"""Request numbers are 1..MAX_NUMBER (so every step stays far below the protocol's 2**63)."""

REQUEST_KINDS = frozenset({Kind.STEP_BEGIN, *STEP_TENSOR_KINDS})
"""The kinds of a request's batches (set-up kinds: `psi`, `he_context`)."""


def request_number(step: int) -> int:
    """The request a message's step belongs to (0: none)."""
    return step >> STEP_BITS


class InferenceRequest:
    """One party's part in request `number` of `routes.requester` (see the module docstring).

    Args:
        ctx: this party's loaded files (keys, policy's CKKS parameters, limits).
        routes: the request's routes.
        number: the request number (1..MAX_NUMBER).
        executor: this party's executor, with the trained weights (shared by its requests).
        own_ids: the ids this party brings to the PSI: the requested ids at the requester, its
            rows' ids at a server that reads rows (None where it takes no part in the PSI).
    """

    def __init__(self, ctx: PeerContext, routes: RequestRoutes, number: int, executor: PeerExecutor, *,
                 own_ids: Sequence[int] | np.ndarray | None) -> None:
        if not 1 <= number <= MAX_NUMBER:
            raise RemoteProtocolError(f"request number {number} is outside 1..{MAX_NUMBER}")
        self.ctx = ctx
        self.me = ctx.me
        self.routes = routes
        self.requester = routes.requester
        self.number = number
        self.base = number << STEP_BITS
        self.executor = executor
        self.others = [p for p in routes.peers if p != self.me]
        self.reads_rows = self.me in routes.row_holders
        # A server that reads no rows learns a step's batch size from its first tensor.
        self.lazy = self.me != self.requester and not self.reads_rows
        self.last_step = self.base
        self.batches_done = 0
        self.psi: PsiRound | None = None
        self.contexts: list[ContextRound] = []
        self.key_holder: HeKeyHolder | None = None
        self.steps: StepRunner | None = None
        self.aligned: np.ndarray | None = None
        self._own_ids = None if own_ids is None else np.asarray(own_ids, dtype=np.int64)

    # -- set-up -------------------------------------------------------------------------------

    def start(self) -> list[Effect]:
        """Begin this party's set-up rounds (the key holder sends its contexts, every PSI party
        its blinded set)."""
        spec = self.ctx.deployment.spec
        limit = spec.limits.max_message_bytes
        topo = self.ctx.topology
        effects: list[Effect] = []
        keys = {name: p.transport_key for name, p in spec.peers.items()}
        params = self.ctx.policy.requirements.ckks.params()
        merges = [(s, topo.peer_of(s), kh, topo.he_feeders(s)) for s, kh in self.routes.he_merges.items()]
        for plan in vertical_plans(merges):
            if plan.role(self.me) == "none":
                continue
            rnd = ContextRound(self.me, plan, params=params, identity=self.ctx.identity, transport_keys=keys,
                               max_bytes=limit)
            self.contexts.append(rnd)
            effects += rnd.start()
        parties = self.routes.psi_parties
        if self.me in parties:
            if self._own_ids is None:
                raise ValueError(f"'{self.me}' takes part in the request's PSI but brought no ids")
            self.psi = PsiRound(self.me, parties, self._own_ids.tolist(), deployment_hash=self.ctx.deployment.hash,
                                max_points=spec.limits.max_psi_points)
            effects += self.psi.start()
        return self._stamp(effects)

    def on_setup(self, msg: Message) -> list[Effect]:
        """A `psi` or `he_context` message of this request.

        Raises:
            RemoteProtocolError: this party takes no part in that round, or the round refused it.
        """
        sender = msg.binding.sender
        if msg.kind == Kind.PSI:
            if self.psi is None:
                raise RemoteProtocolError(f"'{sender}' sent a PSI message for request {self.number}, whose PSI "
                                          f"'{self.me}' takes no part in")
            return self._stamp(self.psi.on_message(sender, bytes(msg.blob)))
        for rnd in self.contexts:
            if rnd.concerns(msg):
                return self._stamp(rnd.on_message(msg))
        raise RemoteProtocolError(f"'{sender}' sent a CKKS context for request {self.number} that '{self.me}' "
                                  "takes no part in")

    @property
    def ready(self) -> bool:
        """Every set-up round of this party is done (its step runner is built then)."""
        if self.steps is not None:
            return True
        if self.psi is not None and self.psi.result is None:
            return False
        if not all(r.done for r in self.contexts):
            return False
        if self.psi is not None and self.psi.result is not None:
            self.aligned = self.psi.result.ids
        contexts: dict[str, CkksContext] = {r.plan.scope: r.context for r in self.contexts if r.context is not None}
        mine = {s: c for s, c in contexts.items() if self.routes.he_merges.get(s) == self.me}
        if mine:
            self.key_holder = HeKeyHolder({s: self.routes.owners[s] for s in mine}, mine,
                                          max_bytes=self.ctx.deployment.spec.limits.max_message_bytes)
        # Up to IN_FLIGHT batches of the requester are open at once, each an HE round at a merge.
        limits = self.ctx.deployment.spec.limits
        limits = limits.model_copy(update={"max_pending_he_rounds": max(limits.max_pending_he_rounds, IN_FLIGHT + 1)})
        self.steps = StepRunner(self.executor, self.ctx.topology, self.me, he_contexts=contexts,
                                he_key_holders=dict(self.routes.he_merges), limits=limits)
        return True

    def _stamp(self, effects: list[Effect]) -> list[Effect]:
        """Set-up messages carry the request's base step (rounds send step 0)."""
        return [dataclasses.replace(e, step=self.base) if isinstance(e, Send) and e.step == 0 else e for e in effects]

    # -- steps --------------------------------------------------------------------------------

    def step(self, k: int) -> int:
        """The step of batch k (1-based)."""
        if not 1 <= k <= MAX_BATCHES:
            raise ValueError(f"batch {k} is outside 1..{MAX_BATCHES}")
        return self.base + k

    def begin(self, step: int, ids: np.ndarray) -> list[Effect]:
        """Begin batch `step` here with its ids (the requester, or a party that reads rows)."""
        effects = self._runner.begin(step, "infer", ids, peers=self.others)
        return effects

    def offer(self, msg: Message, *, executor_free: bool) -> list[Effect] | None:
        """A batch message of this request (`step_begin` or a step tensor).

        Args:
            msg: the message.
            executor_free: no step of any request is active in the executor.

        Returns:
            The effects of taking it, or None to keep it for later (the executor is busy).

        Raises:
            RemoteProtocolError: it does not belong here (nothing changed).
        """
        kind, step, sender = msg.kind, msg.binding.step, msg.binding.sender
        steps = self._runner
        if sender not in self.routes.peers:
            raise RemoteProtocolError(f"'{sender}' takes no part in request {self.number} of '{self.requester}'")
        if step & MAX_BATCHES == 0:
            raise RemoteProtocolError(f"'{sender}' sent {kind.value} on the set-up step of request {self.number}")
        if kind in (Kind.GRADIENT, Kind.AGGREGATE_GRADIENT) or msg.meta.get("phase", "infer") != "infer":
            raise RemoteProtocolError(f"'{self.me}' serves inference only: {kind.value} (phase "
                                      f"{msg.meta.get('phase')!r}) has no place in a prediction request; training "
                                      "runs under `secure-split peer run`", code="not_served")
        segment = str(msg.meta.get("segment", ""))
        if kind == Kind.MASKED_AGGREGATE and self.key_holder is not None and self.key_holder.keys(segment):
            return self.key_holder.on_masked(sender, step, segment, bytes(msg.blob))
        if kind == Kind.STEP_BEGIN:
            return self._on_step_begin(msg, executor_free=executor_free)
        if steps.current_step == step:
            return steps.take(msg) if steps.verdict(msg) else None
        if step <= self.last_step:
            raise RemoteProtocolError(f"'{sender}' sent {kind.value} for finished step {step} of request {self.number}")
        if self.lazy and kind == Kind.ENCRYPTED_ACTIVATION:
            return steps.take(msg)  # the merge holder collects ciphertexts (bounded per step)
        if not self.lazy or kind not in (Kind.ACTIVATION, Kind.MASKED_AGGREGATE):
            return None  # a later step: its `step_begin` (or our own batch) comes first
        if not (steps.idle and executor_free):
            return None
        if kind == Kind.ACTIVATION:
            shape = msg.tensors[0].shape
            batch = int(shape[0]) if shape else 0
        else:
            batch = steps.he_pending_batch(segment, step) or 0
        if batch < 1:
            raise RemoteProtocolError(f"'{sender}' sent {kind.value} for step {step} with no batch to begin it by")
        effects = steps.begin(step, "infer", np.arange(batch, dtype=np.int64), peers=self.others)
        try:
            return effects + steps.take(msg)
        except SecureSplitError:
            steps.abort()
            raise

    def _on_step_begin(self, msg: Message, *, executor_free: bool) -> list[Effect] | None:
        steps, step, sender = self._runner, msg.binding.step, msg.binding.sender
        if sender != self.requester or not self.reads_rows:
            raise RemoteProtocolError(f"'{sender}' sent step_begin for request {self.number} of '{self.requester}', "
                                      f"which only the requester sends to a party that reads rows")
        if step <= self.last_step or steps.current_step == step:
            raise RemoteProtocolError(f"'{sender}' began step {step} of request {self.number} again")
        if not (steps.idle and executor_free):
            return None
        ids = ids_from_wire(msg.tensors[0])
        if self.aligned is not None and not bool(np.isin(ids, self.aligned).all()):
            raise RemoteProtocolError(f"'{sender}' named ids for step {step} that are not among the ids aligned for "
                                      f"request {self.number}")
        return steps.begin(step, "infer", ids, peers=self.others)

    def finish(self) -> tuple[int, dict[str, np.ndarray]] | None:
        """If the active step is complete: end it and return (step, this party's predictions of
        the request's outputs it computes, int64 [batch] each)."""
        steps = self._runner
        step = steps.current_step
        if step is None or steps.finish_if_complete() is None:
            return None
        self.last_step = max(self.last_step, step)
        self.batches_done += 1
        preds = self.executor.predictions()
        mine = self.routes.local_outputs(self.me)
        return step, {o: np.ascontiguousarray(preds[o].numpy(), dtype="<i8") for o in mine if o in preds}

    def prediction_sends(self, step: int, predictions: dict[str, np.ndarray]) -> list[Effect]:
        """A server's predictions of `step`, one `prediction` message per output, to the requester."""
        return [Send(self.requester, Kind.PREDICTION, step=step, edge=self.routes.prediction_edge(o) or "",
                     meta={"segment": o}, tensors=(WireTensor("int64", (int(v.shape[0]),), v.tobytes()),))
                for o, v in predictions.items()]

    def abort(self) -> None:
        """Drop this request's active step (the request failed or was dropped)."""
        if self.steps is not None:
            self.steps.abort()

    @property
    def _runner(self) -> StepRunner:
        if self.steps is None:
            raise RemoteProtocolError(f"a batch of request {self.number} arrived at '{self.me}' before its set-up "
                                      "was done")
        return self.steps
