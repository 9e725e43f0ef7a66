"""Pipelining over an HE merge, on the real StepRunners, executors and CKKS (no sockets): the owners
encrypt step t+1 while step t waits for its gradient; the merge holder sends step t+1's masked sum
out for decryption at once, while step t is still running; a decryption that comes back early
waits for its step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from secure_split.config import LimitsSpec
from secure_split.crypto.he import KeyHolderContext
from secure_split.engine.data import PeerData
from secure_split.engine.executor import PeerExecutor
from secure_split.errors import RemoteProtocolError
from secure_split.peer.effects import Effect, Send
from secure_split.peer.rounds.he_merge import HeKeyHolder
from secure_split.peer.steps import StepRunner
from secure_split.protocol import Binding, Kind, Message
from secure_split.topology import Topology
from tests.unit.engine.harness import deployment_yaml, write_deployment

IDS = np.arange(200, 232)


def _messages(sender: str, effects: list[Effect]) -> list[Message]:
    out = []
    for i, e in enumerate(effects):
        assert isinstance(e, Send)
        out.append(Message(e.kind, Binding("0" * 64, bytes(16), e.step, i, sender, e.to), edge=e.edge,
                           meta=dict(e.meta), tensors=e.tensors, blob=e.blob))
    return out


@pytest.fixture(scope="module")
def ckks() -> KeyHolderContext:
    return KeyHolderContext.create()


def test_the_merge_holder_sends_the_next_steps_sum_for_decryption_while_a_step_runs(
    tmp_path: Path, ckks: KeyHolderContext
) -> None:
    linear = [{"linear": {"in": 4, "out": 3}}]
    dep = write_deployment(tmp_path, deployment_yaml(
        ["a", "b", "lab"],
        {"bottom_a": {"peer": "a", "input": "features", "model": linear},
         "bottom_b": {"peer": "b", "input": "features", "model": linear},
         "top": {"peer": "lab", "loss": "cross_entropy", "merge": "sum", "he": True,
                 "model": [{"linear": {"in": 3, "out": 2}}]}},
        [{"from": "bottom_a", "to": "top"}, {"from": "bottom_b", "to": "top"}],
        {"seed": 1, "optimizer": {"type": "adam", "lr": 0.01}, "pipeline_depth": 2},
    ))
    topo, limits = Topology.from_deployment(dep), LimitsSpec()
    g = torch.Generator().manual_seed(0)
    ids = torch.as_tensor(IDS)
    datas = {"a": PeerData(ids=ids, features=torch.randn(32, 4, generator=g)),
             "b": PeerData(ids=ids, features=torch.randn(32, 4, generator=g)),
             "lab": PeerData(ids=ids, labels={"labels": torch.randint(0, 2, (32,), generator=g)})}
    runners = {}
    for p in ("a", "b", "lab"):
        ex = PeerExecutor(dep, p, datas[p], noise_seed=0, pipeline_depth=dep.spec.training.depth)
        ctx = ckks.public() if p == "lab" else ckks
        runners[p] = StepRunner(ex, topo, p, limits=limits, he_contexts={"top": ctx}, he_key_holders={"top": "a"})
    key_holder = HeKeyHolder({"top": "lab"}, {"top": ckks}, max_bytes=limits.max_message_bytes)
    lab = runners["lab"]
    batches = [IDS[:8], IDS[8:16]]

    lab.begin(0, "train", batches[0])
    sent = {p: _messages(p, runners[p].begin(0, "train", batches[0])) for p in ("a", "b")}
    for p in ("a", "b"):  # step 1 begins ahead at each owner: its ciphertext leaves at once
        assert runners[p].can_begin_ahead(1, "train")
        sent[p] += _messages(p, runners[p].begin_ahead(1, "train", batches[1]))
        assert [(m.kind, m.binding.step) for m in sent[p]] == [(Kind.ENCRYPTED_ACTIVATION, 0),
                                                                (Kind.ENCRYPTED_ACTIVATION, 1)]
        assert not runners[p].can_begin_ahead(2, "train")  # depth 2: two steps in flight at most
    out: list[Message] = []
    for m in (sent["a"][0], sent["b"][0], sent["a"][1], sent["b"][1]):
        assert lab.verdict(m)  # step 1's ciphertexts are taken while step 0 runs
        out += _messages("lab", lab.take(m))
    assert [(m.kind, m.binding.receiver, m.binding.step) for m in out] == [
        (Kind.MASKED_AGGREGATE, "a", 0), (Kind.MASKED_AGGREGATE, "a", 1)]
    replies = [_messages("a", key_holder.on_masked("lab", m.binding.step, "top", bytes(m.blob)))[0] for m in out]
    assert not lab.verdict(replies[1])  # step 1's sum waits for step 1
    assert lab.verdict(replies[0])
    grads = _messages("lab", lab.take(replies[0]))
    assert [(m.kind, m.binding.receiver, m.binding.step) for m in grads] == [
        (Kind.AGGREGATE_GRADIENT, "a", 0), (Kind.AGGREGATE_GRADIENT, "b", 0)]
    assert lab.finish_if_complete() is not None and lab.idle
    lab.begin(1, "train", batches[1])
    assert lab.verdict(replies[1]) and len(lab.take(replies[1])) == 2
    for m in grads:
        runner = runners[m.binding.receiver]
        assert runner.verdict(m) and runner.take(m) == []
        assert runner.finish_if_complete() is not None and runner.current_step == 1  # step 1 was in flight

    # a later step's ciphertext beyond the step window is still refused
    late = Message(Kind.ENCRYPTED_ACTIVATION, Binding("0" * 64, bytes(16), 1 + limits.step_window + 1, 9, "b", "lab"),
                   edge="bottom_b->top", meta={"segment": "top", "phase": "train"}, blob=b"x")
    with pytest.raises(RemoteProtocolError, match="step_window"):
        lab.verdict(late)
