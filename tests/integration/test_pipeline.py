"""training.pipeline_depth on real peers (threads of this process, real sockets, CURVE, the gate,
audit logs): a data owner keeps k training steps in flight and never more, learns its training
steps from one `step_begin` per chunk, and every audit log verifies; over an HE merge the owners
encrypt the next step while the previous one is decrypted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from secure_split.testing import demo_plan, run_peers_in_threads


def _run(tmp_path: Path, scenario: str, *, steps: int, limits: dict[str, Any], **training: Any
         ) -> tuple[dict[str, Any], dict[str, Path]]:
    from secure_split.audit import verify_logs
    from secure_split.config import load_deployment
    from secure_split.policy import load_policy
    from secure_split.scenarios import generate

    plan = demo_plan(scenario, epochs=1)
    plan.training.update(max_steps_per_epoch=steps, **training)
    gen = generate(plan, tmp_path, limits=limits)
    results = run_peers_in_threads(gen.peer_configs, timeout_s=300)
    assert {n: r.status for n, r in results.items()} == dict.fromkeys(results, "ok"), \
        {n: r.error for n, r in results.items()}
    report = verify_logs(tmp_path / "audit", load_deployment(gen.deployment), load_policy(gen.policy))
    assert report.clean, report.to_dict()
    logs = {p: [json.loads(line) for line in (tmp_path / "audit" / f"{p}.jsonl").read_text().splitlines()]
            for p in results}
    return logs, gen.peer_configs


def _strictly_ordered(peer_configs: dict[str, Path], depth: int) -> dict[str, Any]:
    """The vanilla deployment's first epoch on the peers' own executors (their files, their
    initial weights), every message delivered in order and no step begun ahead: the reference
    that a racing run of the real peers must equal."""
    from secure_split.engine.schedule import epoch_batches, eval_batches, split_train_test
    from secure_split.peer.context import PeerContext

    ctxs = {n: PeerContext.load(c) for n, c in peer_configs.items()}
    owner, lab = (ctxs[n].executor(ctxs[n].training_data()[0], defer_update=True, pipeline_depth=depth)
                  for n in ("owner", "label_holder"))
    training = ctxs["label_holder"].deployment.spec.training
    data = ctxs["label_holder"].training_data()[0]
    assert data is not None
    train_ids, test_ids = split_train_test(data.ids.numpy(), training.test_fraction, training.seed)
    plan = [("train", b) for b in epoch_batches(train_ids, training.batch_size, training.seed, 0,
                                                training.max_steps_per_epoch)]
    plan += [("eval", b) for b in eval_batches(test_ids, training.batch_size)]
    for step, (phase, batch) in enumerate(plan, 1):
        (a,) = owner.begin_step(step, phase, batch)
        lab.begin_step(step, phase, batch)
        grads = lab.on_activation(a.edge, a.tensor, step=step)
        lab.finish_step()
        for g in grads:
            owner.on_gradient(g.edge, g.tensor, step=step)
        owner.finish_step()
    return {**owner.state_tensors(), **lab.state_tensors()}


def _in_flight(entries: list[dict[str, Any]], sent_kind: str, received_kind: str) -> list[int]:
    """For every training step t whose gradient this peer received: how many of its own later
    steps it had sent out (t + 1, t + 2, ...) before that gradient came in."""
    sent: set[int] = set()
    out = []
    for e in entries:
        data = e["data"]
        if e["event"] == "message_sent" and data.get("kind") == sent_kind:
            sent.add(data["step"])
        elif e["event"] == "message_received" and data.get("kind") == received_kind:
            t = data["step"]
            out.append(sum(1 for s in sent if s > t))
    return out


@pytest.mark.integration
def test_a_pipelined_owner_keeps_k_steps_in_flight_and_learns_its_steps_in_one_message(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    logs, configs = _run(tmp_path, "vanilla", steps=8, limits={}, pipeline_depth=3)
    # racing delivery on real peers trains exactly what strictly ordered delivery trains
    reference = _strictly_ordered(configs, 3)
    trained = {k: v for p in ("owner", "label_holder")
               for k, v in load_file(str(max((tmp_path / "checkpoints" / p).glob("epoch-*.safetensors")))).items()}
    assert reference.keys() <= trained.keys()
    assert [k for k in reference if not torch.equal(reference[k], trained[k])] == []
    ahead = _in_flight(logs["owner"], "activation", "gradient")
    assert len(ahead) == 8
    assert max(ahead) == 2, ahead  # steps t+1 and t+2 left before t's gradient came back ...
    assert all(n <= 2 for n in ahead)  # ... and never t+3: three steps in flight at most
    announced = [e["data"] for e in logs["owner"]
                 if e["event"] == "message_received" and e["data"].get("kind") == "step_begin"]
    train_steps = {e["data"]["step"] for e in logs["owner"]
                   if e["event"] == "message_received" and e["data"].get("kind") == "gradient"}
    first_eval = max(train_steps) + 1
    # all 8 training steps in one message; the evaluation steps one by one
    assert sum(1 for d in announced if d["step"] < first_eval) == 1
    assert sum(1 for d in announced if d["step"] >= first_eval) >= 2


@pytest.mark.integration
def test_over_an_he_merge_the_owners_encrypt_the_next_step_before_the_gradient_of_the_last(tmp_path: Path) -> None:
    logs, _ = _run(tmp_path, "vertical-he", steps=4, limits={}, pipeline_depth=2)
    for hospital in ("hospital_a", "hospital_b"):
        ahead = _in_flight(logs[hospital], "encrypted_activation", "aggregate_gradient")
        assert len(ahead) == 4 and max(ahead) == 1 and ahead[0] == 1, (hospital, ahead)
    sums = [e["data"]["step"] for e in logs["lab"]
            if e["event"] == "message_sent" and e["data"].get("kind") == "masked_aggregate"]
    assert len(sums) == len(set(sums)) >= 4  # one decryption round per step, as before
