"""One prediction request as sans-IO parties (`peer/requests.py`): a vertical request (the lab asks,
the hospitals serve their columns) delivered in seeded random orders gives exactly the local
forward's predictions, under PSI and under the masked CKKS merge; and every message that does not
belong to the request is refused before it changes anything."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from secure_split.engine.data import PeerData
from secure_split.engine.executor import PeerExecutor, merge_inputs
from secure_split.errors import RemoteProtocolError
from secure_split.inference_routes import request_routes
from secure_split.peer.context import PeerContext
from secure_split.peer.effects import Effect, Send
from secure_split.peer.requests import STEP_BITS, InferenceRequest
from secure_split.peer.steps import ids_to_wire
from secure_split.policy import he_key_holder
from secure_split.protocol import Binding, Kind, Message, WireTensor
from secure_split.testing import DeliverySimulator, generate_deployment

NUMBER = 77


class _Party:
    """One party's request plus what a node does for it: keep what it cannot take yet, offer it
    again after each message it took."""

    def __init__(self, req: InferenceRequest) -> None:
        self.req = req
        self.kept: list[Message] = []
        self.done: dict[int, dict[str, np.ndarray]] = {}

    def __call__(self, msg: Message) -> list[Effect]:
        out = self._take(msg)
        if out is None:
            self.kept.append(msg)
            return []
        return out + self.flush()

    def flush(self) -> list[Effect]:
        """Offer the kept messages again until none is taken."""
        out: list[Effect] = []
        progressed = True
        while progressed:
            progressed = False
            for kept in list(self.kept):
                more = self._take(kept)
                if more is not None:
                    self.kept.remove(kept)
                    out += more
                    progressed = True
        return out

    def _take(self, msg: Message) -> list[Effect] | None:
        req = self.req
        if msg.kind in (Kind.PSI, Kind.HE_CONTEXT):
            return req.on_setup(msg)
        if not req.ready:
            return None
        effects = req.offer(msg, executor_free=req.executor.active_step is None)
        if effects is None:
            return None
        done = req.finish()
        if done is not None:
            step, preds = done
            self.done[step] = preds
            if req.me != req.requester:
                effects = effects + req.prediction_sends(step, preds)
        return effects


def _parties(tmp_path: Path, scenario: str) -> tuple[dict[str, _Party], np.ndarray, Any]:
    gen = generate_deployment(scenario, tmp_path)
    ctxs = {p: PeerContext.load(c) for p, c in gen.peer_configs.items()}
    dep = ctxs["lab"].deployment
    routes = request_routes(dep, "lab", {s: he_key_holder(dep, s, ctxs["lab"].policy) for s in ctxs["lab"].topology.he_segments})
    lab_ids = ctxs["lab"].site.ids  # type: ignore[union-attr]
    asked = np.sort(np.concatenate([lab_ids[::3], [999_001, 999_002]]))  # two ids nobody holds
    parties = {}
    for p, ctx in ctxs.items():
        if p == "lab":
            data: PeerData | None = PeerData(ids=torch.from_numpy(asked), features=None, labels={})
            own = asked
        else:
            assert ctx.site is not None
            data, own = ctx.training_data()[0], ctx.site.ids
        executor = PeerExecutor(dep, p, data, noise_seed=0)
        parties[p] = _Party(InferenceRequest(ctx, routes, NUMBER, executor, own_ids=own))
    return parties, asked, ctxs


def _local(parties: dict[str, _Party], ids: np.ndarray, merge: str) -> np.ndarray:
    """The same segments in one process, on the same rows."""
    outs = []
    with torch.no_grad():
        for p in ("hospital_a", "hospital_b"):
            ex = parties[p].req.executor
            assert ex.data is not None
            outs.append(ex.segments[f"bottom_{p[-1]}"](ex.data.features[ex.data.rows(ids)]))  # type: ignore[index]
        top = parties["lab"].req.executor.segments["top"]
        return top(merge_inputs(outs, merge)).argmax(dim=1).numpy()


def _run_request(tmp_path: Path, scenario: str, seed: int) -> tuple[dict[str, _Party], np.ndarray, np.ndarray]:
    parties, asked, _ = _parties(tmp_path, scenario)
    sim = DeliverySimulator(dict(parties.items()), seed=seed, max_delay=4)
    for p, party in parties.items():
        sim.post(p, party.req.start())
    sim.run()
    assert all(party.req.ready for party in parties.values())
    lab = parties["lab"].req
    aligned = lab.aligned
    assert aligned is not None
    assert {999_001, 999_002} <= set(asked.tolist()) and not {999_001, 999_002} & set(aligned.tolist())
    batches = np.array_split(aligned, 4)
    for k, ids in enumerate(batches, 1):  # every step_begin first: the hospitals run ahead of the lab
        for h in ("hospital_a", "hospital_b"):
            sim.post("lab", [Send(h, Kind.STEP_BEGIN, step=lab.step(k), meta={"epoch": 0, "phase": "infer"},
                                  tensors=(ids_to_wire(ids),))])
    for k, ids in enumerate(batches, 1):
        sim.post("lab", lab.begin(lab.step(k), ids))
        sim.post("lab", parties["lab"].flush())  # what arrived for this step while the lab was busy
        sim.run()
        assert lab.step(k) in parties["lab"].done
    got = np.concatenate([parties["lab"].done[lab.step(k)]["top"] for k in range(1, len(batches) + 1)])
    return parties, aligned, got


@pytest.mark.parametrize("seed", range(3))
def test_a_vertical_request_in_any_delivery_order_predicts_what_the_local_forward_does(tmp_path: Path, seed: int) -> None:
    parties, aligned, got = _run_request(tmp_path, "vertical", seed)
    held = set(parties["hospital_a"].req.aligned.tolist())  # type: ignore[union-attr]
    assert held == set(aligned.tolist()) and 999_001 not in held  # the PSI: ids every party holds, and only those
    assert np.array_equal(got, _local(parties, aligned, "concat"))


def test_a_vertical_he_request_predicts_the_local_forward_within_the_rounding(tmp_path: Path) -> None:
    parties, aligned, got = _run_request(tmp_path, "vertical-he", 0)
    assert (got == _local(parties, aligned, "sum")).mean() >= 0.99


def _message(kind: Kind, sender: str, receiver: str, step: int, *, edge: str = "", meta: dict[str, Any] | None = None,
             tensors: tuple[WireTensor, ...] = ()) -> Message:
    return Message(kind, Binding("0" * 64, bytes(16), step, 1, sender, receiver), edge=edge, meta=dict(meta or {}),
                   tensors=tensors)


def test_a_server_refuses_what_does_not_belong_to_the_request_and_stays_as_it_was(tmp_path: Path) -> None:
    parties, _aligned, _got = _run_request(tmp_path, "vertical", 0)
    hospital = parties["hospital_a"].req
    step = hospital.base + 100
    ids = hospital.aligned[:10]  # type: ignore[index]
    begin = {"epoch": 0, "phase": "infer"}
    held = hospital.executor.data.ids.numpy()  # type: ignore[union-attr]
    not_asked = int(next(i for i in held if i not in set(hospital.aligned.tolist())))  # type: ignore[union-attr]
    cut = WireTensor("float32", (10, 16), np.zeros((10, 16), dtype="<f4").tobytes())
    cases = {
        "from a party that is not the requester": _message(Kind.STEP_BEGIN, "hospital_b", "hospital_a", step,
                                                           meta=begin, tensors=(ids_to_wire(ids),)),
        "an id this party holds but the request's PSI did not align": _message(
            Kind.STEP_BEGIN, "lab", "hospital_a", step, meta=begin, tensors=(ids_to_wire([*ids[:9], not_asked]),)),
        "a gradient": _message(Kind.GRADIENT, "lab", "hospital_a", step, edge="bottom_a->top",
                               meta={"phase": "infer"}, tensors=(cut,)),
        "a train-phase step": _message(Kind.STEP_BEGIN, "lab", "hospital_a", step, meta={"epoch": 0, "phase": "train"},
                                       tensors=(ids_to_wire(ids),)),
        "a batch on the set-up step": _message(Kind.STEP_BEGIN, "lab", "hospital_a", hospital.base, meta=begin,
                                               tensors=(ids_to_wire(ids),)),
        "a finished step again": _message(Kind.STEP_BEGIN, "lab", "hospital_a", hospital.base + 1, meta=begin,
                                          tensors=(ids_to_wire(ids),)),
        "a party outside the request": _message(Kind.STEP_BEGIN, "mallory", "hospital_a", step, meta=begin,
                                                tensors=(ids_to_wire(ids),)),
    }
    for what, msg in cases.items():
        with pytest.raises(RemoteProtocolError):
            hospital.offer(msg, executor_free=True)
        assert hospital.steps is not None and hospital.steps.idle, what
        assert hospital.executor.active_step is None, what
    assert hospital.base >> STEP_BITS == NUMBER
