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


def _run(tmp_path: Path, scenario: str, *, steps: int, limits: dict[str, Any], **training: Any) -> dict[str, Any]:
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
    return {p: [json.loads(line) for line in (tmp_path / "audit" / f"{p}.jsonl").read_text().splitlines()]
            for p in results}


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
    logs = _run(tmp_path, "vanilla", steps=8, limits={}, pipeline_depth=3)
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
    logs = _run(tmp_path, "vertical-he", steps=4, limits={}, pipeline_depth=2)
    for hospital in ("hospital_a", "hospital_b"):
        ahead = _in_flight(logs[hospital], "encrypted_activation", "aggregate_gradient")
        assert len(ahead) == 4 and max(ahead) == 1 and ahead[0] == 1, (hospital, ahead)
    sums = [e["data"]["step"] for e in logs["lab"]
            if e["event"] == "message_sent" and e["data"].get("kind") == "masked_aggregate"]
    assert len(sums) == len(set(sums)) >= 4  # one decryption round per step, as before
