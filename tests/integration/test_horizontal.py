"""Horizontal training (many data owners) as real peer processes over CURVE on loopback.

Each test generates a demo deployment (`secure_split.cli.demo`: keys, one shard of the digits
per owner, a policy every party signed) with a short schedule, starts every peer through
`secure-split peer run`, and checks real outcomes: every process exits 0, the model learned
(accuracy well above chance, 0.1), the audit logs verify against the deployment and policy, and
the coordinator's own log shows that no owner's weights reached it in the clear: weights only
ever arrive as `encrypted_weights`, a sealed blob with no tensor in it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import Deploy, audit_entries, events, start_peers, wait_peers

pytestmark = pytest.mark.integration

# Kinds that carry tensors (cut-layer values); weights have none of their own.
TENSOR_KINDS = {"activation", "gradient"}


def _generate(tmp_path: Path, scenario: str, *, owners: int, epochs: int = 1, max_steps: int | None = 3,
              **options: Any) -> Deploy:
    from secure_split.scenarios import SCENARIOS, generate

    plan = SCENARIOS[scenario](epochs, owners=owners, **options)
    plan.training["max_steps_per_epoch"] = max_steps
    gen = generate(plan, tmp_path / "work")
    return Deploy(gen.workdir, gen.deployment, gen.policy, dict(gen.peer_configs), plan.coordinator)


def _run(d: Deploy, timeout: float) -> tuple[dict[str, int], dict[str, dict[str, Any]], float]:
    started = time.monotonic()
    procs = start_peers(d)
    codes = wait_peers(procs, timeout)
    wall = time.monotonic() - started
    failed = {n: procs[n].stderr[-2000:] for n, c in codes.items() if c != 0}
    assert not failed, f"peers failed: {failed}"
    return codes, {n: p.result_json() for n, p in procs.items()}, wall


def _assert_audit_clean(d: Deploy) -> None:
    from secure_split.audit import verify_logs
    from secure_split.config import load_deployment
    from secure_split.policy import load_policy

    report = verify_logs(d.audit_dir, load_deployment(d.deployment), load_policy(d.policy))
    assert report.clean, report.to_dict()
    # No peer's secret (signing seed, transport secret, the key file's own text) reaches any log.
    import json

    logs = "".join(p.read_text() for p in d.audit_dir.glob("*.jsonl"))
    for key_file in (d.workdir / "keys").glob("*.key"):
        secret = json.loads(key_file.read_text())
        for field in ("sign_seed", "transport_secret"):
            assert secret[field] not in logs, f"{key_file.name}: {field} found in an audit log"


def _coordinator_saw_no_plain_weights(d: Deploy, *, expect_weights: bool) -> None:
    """The coordinator's log: what arrived from owners carried no weights in the clear."""
    received = [e["data"] for e in events(d.audit(d.coordinator), "message_received")]
    assert received, "the coordinator logged what it received"
    weights = [m for m in received if m["kind"] == "encrypted_weights"]
    for m in received:
        if m["dtype"] is not None or m["shape"] is not None:  # a tensor-bearing message
            assert m["kind"] in TENSOR_KINDS, m
            assert m["shape"][0] == m["batch_size"], f"a tensor that is not one batch's cut values: {m}"
    assert all(m["dtype"] is None and m["shape"] is None for m in weights), "weights are sealed blobs"
    assert bool(weights) == expect_weights, f"{len(weights)} encrypted_weights messages at the coordinator"


def _accuracy(results: dict[str, dict[str, Any]], coordinator: str) -> float:
    """The coordinator's test accuracy; U-shaped: pooled over the owners' tails (one task each)."""
    from secure_split.cli.demo import pooled_owner_accuracy

    final = results[coordinator]["metrics"]["final"]
    if "accuracy/labels" in final:
        return float(final["accuracy/labels"])
    pooled = pooled_owner_accuracy([r for n, r in results.items() if n != coordinator])
    assert pooled is not None, final
    return pooled


# One variant each in the normal suite; SECURE_SPLIT_SLOW=1 runs every one.
SLOW = os.environ.get("SECURE_SPLIT_SLOW") == "1"


@pytest.mark.parametrize("handoff", ["relay", "direct"] if SLOW else ["direct"])
def test_sequential_three_owners_hand_sealed_weights_on(tmp_path: Path, handoff: str) -> None:
    d = _generate(tmp_path, "sequential", owners=3, handoff=handoff, epochs=2)
    _codes, results, _ = _run(d, timeout=120)
    assert _accuracy(results, d.coordinator) > 0.5, "well above chance (0.1)"
    _assert_audit_clean(d)
    _coordinator_saw_no_plain_weights(d, expect_weights=handoff == "relay")
    # Every owner trained (sent cut values) and every owner received the weights at some point.
    for k in (1, 2, 3):
        log = d.audit(f"owner_{k}")
        kinds_out = {e["data"]["kind"] for e in events(log, "message_sent")}
        kinds_in = {e["data"]["kind"] for e in events(log, "message_received")}
        assert "activation" in kinds_out, f"owner_{k} trained"
        assert "encrypted_weights" in kinds_in | kinds_out, f"owner_{k} took part in the hand-off"


@pytest.mark.parametrize(("average", "handoff"), [("sealed", "relay"), ("he", "relay"), ("sealed", "direct")] if SLOW
                         else [("sealed", "relay"), ("he", "relay")])
def test_splitfed_three_owners_average_without_the_coordinator_seeing_weights(
    tmp_path: Path, average: str, handoff: str
) -> None:
    # direct: owners' sealed weights can overtake the coordinator's barrier that opens the round
    d = _generate(tmp_path, "splitfed", owners=3, he=average == "he", handoff=handoff, epochs=2)
    _codes, results, _ = _run(d, timeout=150)
    assert _accuracy(results, d.coordinator) > 0.5, "well above chance (0.1)"
    _assert_audit_clean(d)
    _coordinator_saw_no_plain_weights(d, expect_weights=handoff == "relay")  # relayed sealed, or CKKS ciphertexts
    contexts = [e["data"] for e in events(d.audit(d.coordinator), "message_received") if e["data"]["kind"] == "he_context"]
    assert bool(contexts) == (average == "he"), "only HE averaging needs a CKKS context"


# Twenty owner processes with SECURE_SPLIT_SLOW=1 (about 80 s of two cores); eight in the normal
# suite, which exercise the same fan-in (bench/many_owners.py measures 5 to 100).
MANY_OWNERS = 20 if SLOW else 8


def test_many_owner_processes_train_against_one_label_holder(tmp_path: Path) -> None:
    n = MANY_OWNERS
    d = _generate(tmp_path, "splitfed", owners=n, epochs=1, max_steps=1)
    _codes, results, _wall = _run(d, timeout=180)  # the timeout bounds the run
    assert len(results) == n + 1 and len({r["pid"] for r in results.values()}) == n + 1, "one OS process each"
    coord = results["label_holder"]
    for k in range(1, n + 1):
        r = results[f"owner_{k}"]
        assert r["status"] == "ok" and r["bytes_sent"] > 0 and r["bytes_received"] > 0, r
    # Every owner's steps and evaluation reached the one label holder.
    senders = {e["data"]["sender"] for e in events(d.audit("label_holder"), "message_received")
               if e["data"]["kind"] == "activation"}
    assert senders == {f"owner_{k}" for k in range(1, n + 1)}
    # One step per owner: above chance (0.1). The label holder's top takes the owners' steps in
    # arrival order, so the accuracy varies from run to run: 0.41-0.58 in 7 runs on an idle and a
    # loaded machine, once 0.19 in a full suite run (hence not 0.2).
    assert coord["metrics"]["final"]["accuracy/labels"] > 0.15, "one step per owner: above chance (0.1)"
    _assert_audit_clean(d)
    _coordinator_saw_no_plain_weights(d, expect_weights=True)


def test_u_shaped_splitfed_demo_keeps_labels_at_the_owners(tmp_path: Path) -> None:
    """Through `secure-split demo`: two owners with heads and tails, a server with no data."""
    from tests.integration.helpers import run_demo

    proc, summary = run_demo(tmp_path, "splitfed", "--owners", "2", "--labels", "owners", "--epochs", "1")
    assert summary, proc.stdout + proc.stderr
    assert summary["schedule"] == "splitfed" and summary["owners"] == 2
    assert summary["variant"] == {"owners": 2, "labels": "owners", "handoff": "relay", "non_iid": False,
                                  "average": "sealed"}
    assert summary["tolerance"] == 0.03
    assert summary["all_peers_ok"] and summary["audit_verified"], proc.stderr
    assert [p["exit_code"] for p in summary["peers"]] == [0, 0, 0]
    assert summary["accuracy"] > 0.5 and summary["baseline_accuracy"] > 0.5, "well above chance (0.1)"
    assert (proc.returncode == 0) == summary["within_tolerance"]
    work = Path(summary["workdir"])
    d = Deploy(work, work / "deployment.yaml", work / "policy.yaml", {}, "server")
    _coordinator_saw_no_plain_weights(d, expect_weights=True)
    sent = {e["data"]["kind"] for e in events(d.audit("server"), "message_sent")}
    assert "psi" not in sent, "the server holds no ids to align"
    assert not (work / "data" / "server.safetensors").exists()
    assert (work / "baseline.yaml").is_file()
    assert audit_entries(work / "audit" / "owner_2.jsonl")
