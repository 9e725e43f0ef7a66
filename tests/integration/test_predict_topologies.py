"""Split inference for every topology trained: train (a few steps, every peer a thread of this
process), then one prediction request per (topology, requester) with every server a `serve` node
and the requester a `predict` node (real sockets, gates, audit logs), compared with the same
checkpoints run in one process (`engine.inference.predict_locally`) on the same rows; every
audit log verifies afterwards. A chain also runs as real processes.

Each deployment is trained once for the session (`trained_topologies` in conftest.py) and copied
per test (with its checkpoints), so every test starts from the same trained weights and writes
its own audit logs.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from secure_split.config import load_deployment, load_peer_config
from secure_split.engine.checkpoint import checkpoint_preprocessing
from secure_split.engine.data import load_rows_to_predict
from secure_split.engine.inference import predict_locally, trained_segments
from secure_split.inference_routes import RequestRoutes, request_routes
from secure_split.peer.launch import predict_node, serve_node
from secure_split.policy import he_key_holder, load_policy
from tests.integration.helpers import Deploy, events, last_segment

pytestmark = pytest.mark.integration

def _copy(d: Deploy, dest: Path) -> Deploy:
    shutil.copytree(d.workdir, dest)
    return Deploy(dest, dest / d.deployment.name, dest / d.policy.name,
                  {n: dest / "peers" / p.name for n, p in d.peer_configs.items()}, d.coordinator)


def _routes(d: Deploy, requester: str) -> RequestRoutes:
    dep = load_deployment(d.deployment)
    return request_routes(dep, requester, {s: he_key_holder(dep, s) for s, seg in dep.spec.segments.items() if seg.he})


def _request(d: Deploy, requester: str) -> tuple[Any, Any, dict[str, Any]]:
    """Every server a `serve` node in a thread (one request each), the requester's `predict` here."""
    routes = _routes(d, requester)
    served: dict[str, Any] = {}
    threads = []
    for s in routes.servers:
        node = serve_node(d.peer_configs[s], max_requests=1)
        t = threading.Thread(target=lambda n=node, s=s: served.__setitem__(s, n.run()), name=f"serve-{s}", daemon=True)
        t.start()
        threads.append(t)
    node, client = predict_node(d.peer_configs[requester], d.workdir / "data" / f"{requester}.safetensors")
    result = node.run()
    for t in threads:
        t.join(60)
    return result, client, served


def _reference(d: Deploy, routes: RequestRoutes, ids: np.ndarray) -> dict[str, np.ndarray]:
    """The same checkpoints, every segment in this process, each input segment on its owner's rows
    for `ids` (the requester's from its input file), transformed as that owner transforms them."""
    dep = load_deployment(d.deployment)
    configs = {n: load_peer_config(c) for n, c in d.peer_configs.items()}
    segments = trained_segments(dep, configs, epoch=0)
    features = {}
    for s in routes.segments:
        if dep.spec.segments[s].input != "features":
            continue
        cfg = configs[routes.owners[s]]
        path = d.workdir / "data" / f"{routes.requester}.safetensors" if cfg.name == routes.requester else cfg.data_path
        rows = load_rows_to_predict(cfg, path, checkpoint_preprocessing(cfg.checkpoints_dir, 0))
        assert rows.features is not None
        features[s] = rows.features[rows.rows(ids)]
    return {s: v.numpy() for s, v in predict_locally(dep, segments, features).items()}


def _served(d: Deploy, peer: str) -> list[dict[str, Any]]:
    """`peer`'s audit entries since the training run ended (the request's)."""
    return last_segment(d.audit(peer))


def _audit_clean(d: Deploy) -> None:
    from secure_split.audit import verify_logs

    report = verify_logs(d.audit_dir, load_deployment(d.deployment), load_policy(d.policy))
    assert report.clean, report.to_dict()


CASES = [
    ("vanilla", "label_holder"),  # the label holder names ids; the owner serves its rows after a PSI
    ("u-shaped", "owner"),
    ("multi-hop", "label_holder"),
    ("multi-task", "owner"),
    ("multi-task", "ge5_lab"),
    ("vertical", "hospital_a"),
    ("vertical", "lab"),
    ("vertical-he", "lab"),
    ("vertical-he", "hospital_b"),
    ("sequential", "owner_2"),
    ("splitfed", "owner_1"),
]


@pytest.mark.parametrize(("scenario", "requester"), CASES, ids=[f"{s}-{r}" for s, r in CASES])
def test_a_request_predicts_what_the_trained_network_predicts_in_one_process(
        trained_topologies: dict[str, Deploy], tmp_path: Path, scenario: str, requester: str) -> None:
    d = _copy(trained_topologies[scenario], tmp_path / "d")
    routes = _routes(d, requester)
    result, client, served = _request(d, requester)
    assert result.status == "ok", result.error
    assert {s: r.status for s, r in served.items()} == dict.fromkeys(routes.servers, "ok")

    ids = client.predicted_ids()
    local = _reference(d, routes, ids)
    predicted = client.predictions()
    for output in routes.outputs:
        got = predicted[output][client.done_rows]
        if scenario == "vertical-he":
            # The CKKS sum is exact to 2**-21 per value: an argmax can differ only between two
            # logits closer than that error; over a few hundred patients none does here.
            assert (got == local[output]).mean() >= 0.99, output
        else:
            assert np.array_equal(got, local[output]), output
    requested = client.inputs.ids.numpy()
    if routes.psi_parties:
        # Ids some party does not hold are reported, not predicted; each server learnt only the
        # intersection (its ids_aligned entry), never the ids it does not hold.
        assert len(ids) + len(client.missing_ids) == len(requested) and len(ids) > 0
        for p in routes.psi_parties[1:]:
            aligned = events(d.audit(p), "ids_aligned")[-1]["data"]
            assert aligned["intersection_size"] == len(ids) and aligned["parties"] == list(routes.psi_parties)
    else:
        assert np.array_equal(ids, requested) and len(client.missing_ids) == 0
    # Every party logged the request and closed it with signed heads exchanged with each party it
    # talked to; the logs verify.
    for p in routes.peers:
        log = d.audit(p)
        assert log[-1]["event"] == "checkpoint", p
        heads = {e["data"]["counterparty"] for e in events(log, "counterparty_head")[-len(routes.links(p)):]}
        assert heads == set(routes.links(p)), p
    kinds = {e["data"]["kind"] for s in routes.servers for e in events(_served(d, s), "message_sent")}
    assert "gradient" not in kinds and ("prediction" in kinds) == any(
        routes.output_peer(o) != requester for o in routes.outputs)
    _audit_clean(d)


def test_a_chain_serves_as_real_processes(trained_topologies: dict[str, Deploy], tmp_path: Path) -> None:
    """The owner asks; two hops and the label holder run `secure-split serve`: the hops see only
    tensors and batch positions, the top's prediction comes back to the owner on no edge."""
    import csv
    import os
    import sys

    from tests.integration.helpers import PY_ENV

    d = _copy(trained_topologies["multi-hop"], tmp_path / "d")
    env = dict(os.environ, **PY_ENV)
    servers = {s: subprocess.Popen([sys.executable, "-m", "secure_split", "serve", str(d.peer_configs[s]),
                                    "--max-requests", "1", "--quiet"], env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE)
               for s in ("hop1", "hop2", "label_holder")}
    out = tmp_path / "p.csv"
    try:
        pred = subprocess.run([sys.executable, "-m", "secure_split", "predict", str(d.peer_configs["owner"]), "--input",
                               str(d.workdir / "data" / "owner.safetensors"), "--output", str(out), "--quiet"],
                              env=env, capture_output=True, text=True, timeout=120, check=False)
        codes = {s: p.wait(timeout=60) for s, p in servers.items()}
    finally:
        for p in servers.values():
            if p.poll() is None:
                p.kill()
    assert pred.returncode == 0, pred.stderr
    assert codes == dict.fromkeys(servers, 0), {s: p.stderr.read() if p.stderr else b"" for s, p in servers.items()}
    with out.open() as fh:
        rows = list(csv.reader(fh))[1:]
    ids = np.array([int(r[0]) for r in rows])
    got = np.array([int(r[1]) for r in rows])
    assert np.array_equal(got, _reference(d, _routes(d, "owner"), ids)["top"])
    for hop in ("hop1", "hop2"):
        assert {e["data"]["kind"] for e in events(_served(d, hop), "message_received")} <= {
            "hello", "barrier", "activation", "audit_receipt"}
    predictions = [e for e in events(d.audit("owner"), "message_received") if e["data"]["kind"] == "prediction"]
    assert predictions and {e["data"]["edge"] for e in predictions} == {""}
    _audit_clean(d)


def test_a_server_takes_part_in_two_requests_at_once(trained_topologies: dict[str, Deploy], tmp_path: Path) -> None:
    """Both owners of a sequential deployment ask at the same time: the shared top serves the two
    requests interleaved (their messages told apart by their steps), one step at a time."""
    d = _copy(trained_topologies["sequential"], tmp_path / "d")
    server = serve_node(d.peer_configs[d.coordinator], max_requests=2)
    served: list[Any] = []
    serving = threading.Thread(target=lambda: served.append(server.run()), daemon=True)
    serving.start()
    clients = {o: predict_node(d.peer_configs[o], d.workdir / "data" / f"{o}.safetensors") for o in ("owner_1", "owner_2")}
    results: dict[str, Any] = {}
    asking = [threading.Thread(target=lambda o=o: results.__setitem__(o, clients[o][0].run()), daemon=True)
              for o in clients]
    for t in asking:
        t.start()
    for t in [*asking, serving]:
        t.join(120)
    assert {o: r.status for o, r in results.items()} == {"owner_1": "ok", "owner_2": "ok"}, results
    assert [r.status for r in served] == ["ok"] and server.schedule.requests_done == 2  # type: ignore[attr-defined]
    for owner, (_, client) in clients.items():
        routes = _routes(d, owner)
        assert np.array_equal(client.predictions()["top"], _reference(d, routes, client.predicted_ids())["top"])
    steps = [e["data"]["step"] >> 20 for e in events(_served(d, d.coordinator), "message_received")
             if e["data"]["kind"] == "activation"]
    assert len(set(steps)) == 2  # two request numbers
    _audit_clean(d)


def test_a_failed_request_is_dropped_and_the_servers_serve_the_next(trained_topologies: dict[str, Deploy],
                                                                     tmp_path: Path) -> None:
    """hospital_b's server breaks down at the first batch: the lab's request fails with its reason,
    hospital_a drops the request (audited) and keeps serving; a restarted hospital_b and a new
    request of the lab then succeed against the same hospital_a process."""
    from secure_split.errors import TrainingError
    from secure_split.protocol import Kind

    d = _copy(trained_topologies["vertical"], tmp_path / "d")
    a = serve_node(d.peer_configs["hospital_a"], max_requests=1)
    results: dict[str, Any] = {}
    threads = {"hospital_a": threading.Thread(target=lambda: results.__setitem__("hospital_a", a.run()), daemon=True)}
    broken = serve_node(d.peer_configs["hospital_b"])
    take = broken.schedule.on_message

    def break_down(msg: Any) -> bool:
        if msg.kind == Kind.STEP_BEGIN:
            raise TrainingError("hospital_b's disk failed")
        return take(msg)

    broken.schedule.on_message = break_down  # type: ignore[method-assign]
    threads["broken"] = threading.Thread(target=lambda: results.__setitem__("broken", broken.run()), daemon=True)
    for t in threads.values():
        t.start()
    first, _ = predict_node(d.peer_configs["lab"], d.workdir / "data" / "lab.safetensors")
    failed = first.run()
    threads["broken"].join(60)
    assert failed.status == "failed" and "hospital_b's disk failed" in str(failed.error), failed.error
    assert results["broken"].status == "failed"

    again = serve_node(d.peer_configs["hospital_b"], max_requests=1)
    threads["hospital_b"] = threading.Thread(target=lambda: results.__setitem__("hospital_b", again.run()), daemon=True)
    threads["hospital_b"].start()
    second, client = predict_node(d.peer_configs["lab"], d.workdir / "data" / "lab.safetensors")
    assert second.run().status == "ok"
    for name in ("hospital_a", "hospital_b"):
        threads[name].join(60)
        assert results[name].status == "ok", results[name].error
    dropped = [e for e in events(d.audit("hospital_a"), "error") if e["data"]["error"] == "RequestDropped"]
    assert len(dropped) == 1 and "lab" in dropped[0]["data"]["reason"]
    routes = _routes(d, "lab")
    assert np.array_equal(client.predictions()["top"][client.done_rows],
                          _reference(d, routes, client.predicted_ids())["top"])
