"""Split inference over real processes: `secure-split serve` at the server, `secure-split predict`
at the data owner, CURVE between them, the policy gate and audit log on both sides.

The vanilla and U-shaped deployments trained once for the session (conftest.py) are copied per
test, so each test starts from trained checkpoints. Every topology's predictions against the
local forward: test_predict_topologies.py.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from secure_split.config import load_deployment, load_peer_config
from secure_split.engine.data import load_peer_data
from secure_split.engine.inference import predict_locally, trained_segments
from tests.integration.helpers import (
    PY_ENV,
    Deploy,
    clone_deployment,
    edit_policy,
    events,
    last_segment,
)

pytestmark = pytest.mark.integration


def _copy(d: Deploy, dest: Path) -> Deploy:
    shutil.copytree(d.workdir, dest)
    return Deploy(dest, dest / d.deployment.name, dest / d.policy.name,
                  {n: dest / "peers" / p.name for n, p in d.peer_configs.items()}, d.coordinator)


@pytest.fixture
def trained(trained_topologies: dict[str, Deploy]) -> dict[str, Deploy]:
    """The session's trained deployments (conftest.py): vanilla and U-shaped are used here."""
    return trained_topologies


def _start(*args: str, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as fh:
        return subprocess.Popen([sys.executable, "-m", "secure_split", *args], stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=dict(os.environ, **PY_ENV))


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "secure_split", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, **PY_ENV), check=False)


def _local_predictions(d: Deploy, owner: str, input_file: Path) -> dict[str, np.ndarray]:
    """The same checkpoints, every segment in this process."""
    dep = load_deployment(d.deployment)
    segments = trained_segments(dep, {n: load_peer_config(c) for n, c in d.peer_configs.items()}, epoch=0)
    features = load_peer_data(input_file).features
    assert features is not None
    inputs = {s: features for s, seg in dep.spec.segments.items() if seg.input == "features" and seg.peer == owner}
    return {s: v.numpy() for s, v in predict_locally(dep, segments, inputs).items()}


def _kinds(entries: list[dict[str, Any]]) -> set[str]:
    return {e["data"]["kind"] for e in entries if e["event"] in ("message_sent", "message_received")}


def _serve_and_predict(d: Deploy, server: str, output: Path, *extra: str,
                       stop: signal.Signals | None = None) -> tuple[subprocess.CompletedProcess[str], int, str]:
    """Start `serve` (one request, or until `stop` is sent after it), run `predict`; their outcomes."""
    log = d.workdir / "logs" / "serve.log"
    serve = _start("serve", str(d.peer_configs[server]), *(["--max-requests", "1"] if stop is None else []), log=log)
    try:
        pred = _run("predict", str(d.peer_configs["owner"]), "--input", str(d.workdir / "data" / "owner.safetensors"),
                    "--output", str(output), "--result", str(d.workdir / "results" / "predict.json"), "--quiet", *extra)
        if stop is not None:
            serve.send_signal(stop)
        code = serve.wait(timeout=30)
    finally:
        if serve.poll() is None:
            serve.kill()
    return pred, code, log.read_text(errors="replace")


def test_vanilla_predictions_come_back_from_the_label_holder_and_match_a_local_forward(
        trained: dict[str, Deploy], tmp_path: Path) -> None:
    d = _copy(trained["vanilla"], tmp_path / "d")
    out = tmp_path / "predictions.csv"
    pred, serve_code, serve_log = _serve_and_predict(d, "label_holder", out, stop=signal.SIGINT)
    assert pred.returncode == 0, pred.stderr + serve_log
    assert serve_code == 130, serve_log  # Ctrl-C: the project's exit code, after a clean stop
    assert "samples/s" in pred.stdout

    with out.open() as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["id", "prediction"]
    ids = np.array([int(r[0]) for r in rows[1:]])
    got = np.array([int(r[1]) for r in rows[1:]])
    owner_data = load_peer_data(d.workdir / "data" / "owner.safetensors")
    assert np.array_equal(ids, owner_data.ids.numpy())
    local = _local_predictions(d, "owner", d.workdir / "data" / "owner.safetensors")["top"]
    assert (got == local).mean() >= 0.99
    # The labels stayed at the label holder; checked here against its file, by id.
    holder = load_peer_data(d.workdir / "data" / "label_holder.safetensors")
    labels = holder.labels["labels"][holder.rows(ids)].numpy()
    assert (got == labels).mean() > 0.5  # chance is 0.1
    assert (out.stat().st_mode & 0o777) == 0o600

    result = json.loads((d.workdir / "results" / "predict.json").read_text())
    assert result["status"] == "ok" and result["metrics"]["samples"] == len(ids) and result["metrics"]["samples_per_s"] > 0

    # Both gates logged every prediction, under the policy's prediction rule; the logs verify.
    holder_log, owner_log = d.audit("label_holder"), d.audit("owner")
    sent = [e for e in events(holder_log, "message_sent") if e["data"]["kind"] == "prediction"]
    received = [e for e in events(owner_log, "message_received") if e["data"]["kind"] == "prediction"]
    assert len(sent) == len(received) == -(-len(ids) // 64)
    assert {e["data"]["rule_id"] for e in sent} == {"prediction@bottom->top"}
    assert {e["data"]["dtype"] for e in received} == {"int64"}
    served = last_segment(holder_log)
    # No step_begin, so no sample ids: the label holder sees activations and nothing else of the data.
    assert {e["data"]["kind"] for e in events(served, "message_received")} == {
        "hello", "barrier", "activation", "audit_receipt"}
    end = events(served, "run_end")[-1]["data"]
    assert end["status"] == "ok" and end["reason"] == "stopped by SIGINT"
    assert holder_log[-1]["event"] == "checkpoint" and events(served, "close_incomplete"), \
        "a server ends after its clients: its close says nobody was left to countersign it"
    from secure_split.audit import verify_logs
    from secure_split.policy import load_policy

    report = verify_logs(d.audit_dir, load_deployment(d.deployment), load_policy(d.policy))
    assert report.clean, report.to_dict()


def test_u_shaped_owner_predicts_with_its_own_tail_and_the_server_never_sees_a_prediction(
        trained: dict[str, Deploy], tmp_path: Path) -> None:
    d = _copy(trained["u-shaped"], tmp_path / "d")
    out = tmp_path / "predictions.json"
    pred, serve_code, serve_log = _serve_and_predict(d, "server", out, "--batch-size", "100")
    assert pred.returncode == 0, pred.stderr + serve_log
    assert serve_code == 0, serve_log

    rows = json.loads(out.read_text())
    got = np.array([r["prediction"] for r in rows])
    local = _local_predictions(d, "owner", d.workdir / "data" / "owner.safetensors")["tail"]
    assert (got == local).mean() >= 0.99
    # The owner holds the labels too: it reports its accuracy locally.
    accuracy = json.loads((d.workdir / "results" / "predict.json").read_text())["metrics"]["accuracy/tail"]
    assert accuracy > 0.5 and f"accuracy/tail (labels of owner.safetensors, kept here): {accuracy:.4f}" in pred.stdout

    server_log = d.audit("server")
    served = last_segment(server_log)
    assert "prediction" not in _kinds(server_log)
    assert "activation" in _kinds(served)  # it did serve: head->middle in, middle->tail back
    batches = [e for e in events(served, "message_received") if e["data"]["kind"] == "activation"]
    assert len(batches) == -(-len(rows) // 100) and {e["data"]["batch_size"] for e in batches} <= {99, 100}


def test_a_policy_without_the_prediction_rule_stops_predict_with_exit_4_before_anything_is_sent(
        trained: dict[str, Deploy], tmp_path: Path) -> None:
    d = _copy(trained["vanilla"], tmp_path / "d")

    def drop_predictions(policy: dict[str, Any]) -> None:
        policy["allow"] = [r for r in policy["allow"] if "prediction" not in r["kinds"]]

    edit_policy(d, drop_predictions)
    before = len(d.audit("owner"))
    pred = _run("predict", str(d.peer_configs["owner"]), "--input", str(d.workdir / "data" / "owner.safetensors"),
                "--output", str(tmp_path / "p.csv"), "--quiet")
    assert pred.returncode == 4, pred.stderr
    assert "kind 'prediction'" in pred.stderr and "nothing was sent" in pred.stderr
    run = d.audit("owner")[before:]
    denied = events(run, "policy_denied")
    assert [(e["data"]["sender"], e["data"]["receiver"], e["data"]["kind"]) for e in denied] == [
        ("label_holder", "owner", "prediction")]
    assert not events(run, "message_sent")
    assert not (tmp_path / "p.csv").exists()


def test_the_server_refuses_training_tensors_and_malformed_input_and_keeps_serving(
        trained: dict[str, Deploy], tmp_path: Path) -> None:
    """A hand-driven owner (a gate over a real transport in this process) talks to `serve`."""
    from secure_split.protocol import Kind, WireTensor

    d = _copy(trained["vanilla"], tmp_path / "d")
    serve = _start("serve", str(d.peer_configs["label_holder"]), log=d.workdir / "logs" / "serve.log")
    owner = _owner_gate(d, tmp_path / "owner-audit")
    try:
        owner.gate.send_hello("label_holder")
        assert owner.receive(30).kind is Kind.HELLO
        base = 4242 << 20  # request 4242: its steps are base + batch
        owner.gate.send("label_holder", Kind.BARRIER, step=base, meta={
            "epoch": 0, "reason": "request", "phase": "infer", "members": ["label_holder", "owner"]})
        assert owner.receive(10).kind is Kind.BARRIER_ACK

        def ask(kind: Kind, tensor: WireTensor, phase: str, step: int) -> Any:
            control = kind is Kind.STEP_BEGIN
            meta: dict[str, Any] = {"epoch": 0, "phase": phase} if control else {"phase": phase}
            edge = "" if control else "bottom->top"
            owner.gate.send("label_holder", kind, step=base + step, edge=edge, meta=meta, tensors=(tensor,))
            return owner.receive(10)

        width = int(d.read_deployment()["segments"]["top"]["model"][0]["linear"]["in"])  # the cut's width
        good = np.random.default_rng(0).standard_normal((16, width)).astype("<f4")
        wire = WireTensor("float32", (16, width), good.tobytes())
        train = ask(Kind.ACTIVATION, wire, "train", 1)
        assert train.kind is Kind.ERROR and train.meta["code"] == "not_served" and "phase 'train'" in train.meta["reason"]
        ids = WireTensor("int64", (16,), np.arange(16, dtype="<i8").tobytes())
        control = ask(Kind.STEP_BEGIN, ids, "infer", 2)  # ids to a server that reads no rows
        assert control.kind is Kind.ERROR and "only the requester sends to a party that reads rows" in control.meta["reason"]
        narrow = ask(Kind.ACTIVATION, WireTensor("float32", (16, 8), bytes(16 * 8 * 4)), "infer", 3)
        assert narrow.kind is Kind.ERROR and narrow.meta["code"] == "bad_tensor"
        nan = good.copy()
        nan[3, 5] = np.nan
        bad = ask(Kind.ACTIVATION, WireTensor("float32", (16, width), nan.tobytes()), "infer", 4)
        assert bad.kind is Kind.ERROR and "NaN" in bad.meta["reason"]
        # A gradient (this owner's gate is loosened to let it out): the server's policy refuses it.
        grad = ask(Kind.GRADIENT, wire, "infer", 5)
        assert grad.kind is Kind.ERROR and grad.meta["code"] == "policy_denied"
        # ... and it still serves the request.
        answer = ask(Kind.ACTIVATION, wire, "infer", 6)
        assert answer.kind is Kind.PREDICTION and answer.binding.step == base + 6 and answer.tensors[0].shape == (16,)
        assert answer.meta["segment"] == "top" and answer.edge == "bottom->top"
        # A message of a request that was never opened is refused, not kept.
        owner.gate.send("label_holder", Kind.ACTIVATION, step=(4243 << 20) + 1, edge="bottom->top",
                        meta={"phase": "infer"}, tensors=(wire,))
        other = owner.receive(10)
        assert other.kind is Kind.ERROR and "request 4243, which is not open" in other.meta["reason"]

        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=20) == 0
    finally:
        if serve.poll() is None:
            serve.kill()
        owner.audit.close("ok")
        owner.transport.close()
    refused = events(d.audit("label_holder"), "refused")
    assert [e["data"]["kind"] for e in refused] == ["activation", "step_begin", "activation", "activation", "activation"]
    denied = events(d.audit("label_holder"), "policy_denied")
    assert [(e["data"]["kind"], e["data"]["direction"]) for e in denied] == [("gradient", "receive")]
    end = events(d.audit("label_holder"), "run_end")[-1]["data"]
    assert end["status"] == "ok" and end["reason"] == "stopped by SIGTERM"


def test_one_server_serves_horizontal_owners_one_after_another_each_its_own_rows(
        trained: dict[str, Deploy], tmp_path: Path) -> None:
    """Sequential schedule, two owners with a copy of the bottom each: one `serve` answers both
    `predict` runs (a fresh session each), with only the asking owner's edge into the shared top."""
    import threading

    from secure_split.peer.launch import predict_node, serve_node

    d = _copy(trained["sequential"], tmp_path / "d")
    server = serve_node(d.peer_configs[d.coordinator], max_requests=2)
    served: list[Any] = []
    thread = threading.Thread(target=lambda: served.append(server.run()), daemon=True)
    thread.start()
    for owner in ("owner_1", "owner_2"):
        node, client = predict_node(d.peer_configs[owner], d.workdir / "data" / f"{owner}.safetensors")
        assert node.run().status == "ok"
        (local,) = _local_predictions(d, owner, d.workdir / "data" / f"{owner}.safetensors").values()
        (got,) = client.predictions().values()
        assert np.array_equal(got, local)
        sent = [e for e in events(d.audit(d.coordinator), "message_sent") if e["data"]["kind"] == "prediction"
                and e["data"]["receiver"] == owner]
        assert sent and {e["data"]["edge"] for e in sent} == {f"bottom_{owner[-1]}->top"}
    thread.join(30)
    assert [r.status for r in served] == ["ok"]
    opened = [e["data"]["counterparty"] for e in events(d.audit(d.coordinator), "peer_joined")
              if e["data"]["reason"].startswith("prediction request")]
    assert opened == ["owner_1", "owner_2"]


def test_predict_names_the_server_that_does_not_answer_and_exits_3(vanilla_template: Deploy, tmp_path: Path) -> None:
    from secure_split.peer.launch import predict_node

    d = clone_deployment(vanilla_template, tmp_path / "d", limits={"handshake_timeout_s": 2.0})
    _initial_checkpoints(d)
    node, _ = predict_node(d.peer_configs["owner"], d.workdir / "data" / "owner.safetensors")
    result = node.run()
    assert result.exit_code == 3 and result.status == "failed"
    assert "label_holder" in str(result.error) and "handshake" in str(result.error)
    assert not events(d.audit("owner"), "message_sent")[1:]  # only our HELLO went out


def _initial_checkpoints(d: Deploy) -> None:
    """Epoch-0 checkpoints of freshly initialised segments at every peer (no training needed)."""
    from secure_split.engine.checkpoint import save_checkpoint
    from secure_split.engine.executor import PeerExecutor

    dep = load_deployment(d.deployment)
    for name, cfg_path in d.peer_configs.items():
        cfg = load_peer_config(cfg_path)
        executor = PeerExecutor(dep, name, load_peer_data(cfg.data_path) if cfg.data_path else None)
        save_checkpoint(cfg.checkpoints_dir, epoch=0, executor=executor, meta={"peer": name})


def test_an_idle_server_stops_by_itself(trained: dict[str, Deploy], tmp_path: Path) -> None:
    from secure_split.peer.launch import serve_node

    d = _copy(trained["vanilla"], tmp_path / "d")
    started = time.monotonic()
    res = serve_node(d.peer_configs["label_holder"], idle_exit_s=0.5).run()
    assert res.status == "ok" and res.exit_code == 0 and time.monotonic() - started < 10
    assert events(d.audit("label_holder"), "run_end")[-1]["data"]["reason"] == "no request for 0.5 s"


def _owner_gate(d: Deploy, audit_dir: Path) -> Any:
    """The owner's gate, transport and audit log, run by the test instead of `predict`. Its Policy
    object also lets gradients out (the signed policy's hash is what the handshake agrees on)."""
    from secure_split.audit import AuditLog
    from secure_split.crypto.keys import load_identity
    from secure_split.peer.gate import Gate
    from secure_split.policy import load_policy, policy_from_mapping
    from secure_split.protocol import PeerSession
    from secure_split.transport import Transport, TransportPeer
    from tests.integration.helpers import GateSide

    dep = load_deployment(d.deployment)
    signed = load_policy(d.policy)
    loose = yaml.safe_load(d.policy.read_text())
    loose["allow"].append({"id": "test-gradients-out", "from": "owner", "to": "label_holder", "kinds": ["gradient"]})
    policy = policy_from_mapping(loose)
    spec = dep.spec
    ident = load_identity(d.workdir / "keys" / "owner.key")
    holder = spec.peers["label_holder"]
    transport = Transport("owner", spec.peers["owner"].endpoint, ident.transport_secret_z85, ident.transport_public_z85,
                          {"label_holder": TransportPeer("label_holder", holder.endpoint, holder.transport_key)},
                          max_message_bytes=spec.limits.max_message_bytes, linger_ms=0)
    transport.start()
    audit = AuditLog.open(audit_dir / "owner.jsonl", peer="owner", identity=ident, deployment_hash=dep.hash,
                          policy_hash=signed.hash)
    session = PeerSession("owner", "label_holder", dep.hash, signed.hash, hello_meta={"checkpoints": [0]})
    gate = Gate(me="owner", deployment_hash=dep.hash, policy=policy, audit=audit, transport=transport,
                sessions={"label_holder": session}, max_message_bytes=spec.limits.max_message_bytes)
    return GateSide("owner", gate, transport, audit, audit_dir / "owner.jsonl")
