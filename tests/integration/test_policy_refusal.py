"""A flow the policy forbids is refused between peers: at the sender and at the receiver, with an
error that names the rule, in the audit logs, and training does not go past it.

Peers agree on the policy hash in the handshake, so two running peers always enforce the same
policy. "A peer whose own copy is permissive is still refused by a strict counterparty" is
therefore pinned where it can happen: two gates over real CURVE transports in this process, the
sender holding a loosened Policy object. The multi-process test drives a real run into a flow
its signed policy forbids at run time (the last, partial evaluation batch is below min_batch).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from secure_split.errors import PolicyDenied
from secure_split.policy import policy_from_mapping
from secure_split.protocol import Kind, WireTensor
from tests.integration.helpers import (
    Deploy,
    clone_deployment,
    close_gates,
    edit_policy,
    events,
    gate_pair,
    start_peers,
    wait_peers,
)

pytestmark = pytest.mark.integration

EDGE = "bottom->top"
ACT_RULE = f"activation@{EDGE}"


def _activation(batch: int, width: int = 16) -> WireTensor:
    return WireTensor("float32", (batch, width), bytes(4 * batch * width))


def _set_min_batch(policy: dict, value: int) -> None:  # type: ignore[type-arg]
    for rule in policy["allow"]:
        if set(rule["kinds"]) & {"activation", "gradient"}:
            rule["min_batch"] = value


def test_strict_receiver_refuses_what_a_permissive_sender_let_out(vanilla_template: Deploy, tmp_path: Path) -> None:
    d = clone_deployment(vanilla_template, tmp_path / "d")
    loose = yaml.safe_load(d.policy.read_text())
    _set_min_batch(loose, 1)
    permissive = policy_from_mapping(loose)
    sides = gate_pair(d, tmp_path / "audit", {"owner": permissive})
    owner, holder = sides["owner"], sides["label_holder"]
    try:
        # The owner's own (loosened) copy lets a batch of 4 out ...
        owner.gate.send("label_holder", Kind.ACTIVATION, step=1, edge=EDGE, meta={"phase": "train"},
                        tensors=(_activation(4),))
        # ... the label holder's signed policy (min_batch 8) refuses it before decoding the payload.
        with pytest.raises(PolicyDenied) as refused:
            holder.receive()
        assert "batch of 4 is below min_batch 8" in str(refused.value)
        assert f"(rule: {ACT_RULE})" in str(refused.value)
        # The sender is told why, with the rule.
        reply = owner.receive()
        assert reply.kind is Kind.ERROR
        assert reply.meta["code"] == "policy_denied"
        assert "refused by label_holder" in reply.meta["reason"] and ACT_RULE in reply.meta["reason"]
        # The receiver keeps serving: a compliant activation on the same session passes.
        owner.gate.send("label_holder", Kind.ACTIVATION, step=2, edge=EDGE, meta={"phase": "train"},
                        tensors=(_activation(8),))
        ok = holder.receive()
        assert ok.kind is Kind.ACTIVATION and tuple(ok.tensors[0].shape) == (8, 16)

        # The same strict policy refuses at the sender too: nothing leaves.
        with pytest.raises(PolicyDenied, match="below min_batch 8"):
            holder.gate.send("owner", Kind.GRADIENT, step=2, edge=EDGE, meta={"phase": "train"},
                             tensors=(_activation(4),))
        assert owner.gate.receive(0.5) is None
    finally:
        close_gates(sides)

    denied = events(holder.entries(), "policy_denied")
    assert [(e["data"]["direction"], e["data"]["kind"], e["data"]["rule_id"]) for e in denied] == [
        ("receive", "activation", ACT_RULE),
        ("send", "gradient", f"gradient@{EDGE}"),
    ]
    assert denied[0]["data"]["sender"] == "owner" and "below min_batch 8" in denied[0]["data"]["reason"]
    received = [e["data"] for e in events(holder.entries(), "message_received") if e["data"]["kind"] == "activation"]
    assert [r["batch_size"] for r in received] == [8], "the refused activation is not logged as received"
    sent = [e["data"] for e in events(owner.entries(), "message_sent") if e["data"]["kind"] == "activation"]
    assert [s["batch_size"] for s in sent] == [4, 8]
    errors_in = [e["data"] for e in events(owner.entries(), "message_received") if e["data"]["kind"] == "error"]
    assert len(errors_in) == 1 and errors_in[0]["sender"] == "label_holder", "the refusal is in the sender's log too"
    assert not events(owner.entries(), "policy_denied"), "the permissive copy refused nothing"


def test_run_stops_at_a_flow_the_policy_forbids(vanilla_template: Deploy, tmp_path: Path) -> None:
    """min_batch 40 with batch_size 64: training batches pass; the last evaluation batch of the
    digits test set (359 = 5 x 64 + 39 samples) is refused at the owner's gate."""
    d = clone_deployment(vanilla_template, tmp_path / "d", epochs=1, max_steps=2)
    edit_policy(d, lambda p: _set_min_batch(p, 40))
    procs = start_peers(d)
    codes = wait_peers(procs, timeout=180)
    owner_out = " ".join(procs["owner"].stderr.split())
    holder_out = " ".join(procs["label_holder"].stderr.split())

    # The refusing peer exits 4 (the policy refused a flow the run needed), naming the rule.
    assert codes["owner"] == 4, owner_out
    assert "PolicyDenied" in owner_out
    assert "batch of 39 is below min_batch 40" in owner_out and f"(rule: {ACT_RULE})" in owner_out
    # The coordinator stops too and says why.
    assert codes["label_holder"] == 4, holder_out  # the owner's cause travels to the coordinator
    assert "peer 'owner' reported" in holder_out and "below min_batch 40" in holder_out and ACT_RULE in holder_out
    for p in procs.values():
        assert p.result_json()["status"] == "failed"
        assert p.result_json()["epochs_done"] == 0

    owner_log, holder_log = d.audit("owner"), d.audit("label_holder")
    denied = events(owner_log, "policy_denied")
    assert len(denied) == 1
    assert denied[0]["data"]["direction"] == "send" and denied[0]["data"]["rule_id"] == ACT_RULE
    assert "below min_batch 40" in denied[0]["data"]["reason"]
    refused_step = denied[0]["data"]["step"]
    # The refusal reached the counterparty's log.
    got_error = [e for e in events(holder_log, "message_received")
                 if e["data"]["kind"] == "error" and e["data"]["sender"] == "owner"]
    assert got_error, "the coordinator logged the owner's refusal notice"
    holder_errors = [e["data"]["reason"] for e in events(holder_log, "error")]
    assert any("below min_batch 40" in r and ACT_RULE in r for r in holder_errors), holder_errors
    # Training did not go past it: nothing below min_batch crossed, no later step began, no epoch ended.
    for log in (owner_log, holder_log):
        moved = [e["data"] for e in log if e["event"] in ("message_sent", "message_received")
                 and e["data"]["kind"] in ("activation", "gradient")]
        assert moved and all(m["batch_size"] >= 40 for m in moved)
        assert not events(log, "checkpoint_saved")
        assert events(log, "run_end")[-1]["data"]["status"] == "failed"
    steps = [e["data"]["step"] for e in events(holder_log, "message_sent") if e["data"]["kind"] == "step_begin"]
    assert max(steps) == refused_step
