"""A vertical prediction request, counted: messages per party and kind, bytes, and where the time goes.

For the vertical demo (two hospitals' columns concatenated at a lab) and vertical-HE (summed under
CKKS), trained for a few steps, the lab asks for the patients of its own data file (`secure-split
predict`); each hospital serves its columns (`secure-split serve`). All three run as threads of
this process on loopback, 1 torch thread (counts are exact; times are one run's, on a shared
host). From the audit logs it reports, per party, the messages sent by kind and their payload
bytes, and from the lab's log: handshake done, request open (last `barrier_ack`, the PSI
included), batches done, request closed (seconds from the lab's start).

Usage::

    .venv/bin/python bench/vertical_request.py

Writes bench/results/vertical_request.json.
"""

from __future__ import annotations

import collections
import json
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from _host import machine

RESULTS = Path(__file__).resolve().parent / "results"


def _ts(entry: dict[str, Any]) -> float:
    return datetime.fromisoformat(entry["time"].replace("Z", "+00:00")).timestamp()


def _since_resume(path: Path) -> list[dict[str, Any]]:
    log = [json.loads(line) for line in path.read_text().splitlines()]
    start = max(i for i, e in enumerate(log) if e["event"] == "log_resumed")
    return log[start:]


def measure(scenario: str) -> dict[str, Any]:
    """One trained deployment, one request of the lab; the counts and the lab's timeline."""
    import torch

    from secure_split.peer.launch import predict_node, serve_node
    from secure_split.testing import generate_deployment, run_peers_in_threads

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix=f"vertical-request-{scenario}-"))
    gen = generate_deployment(scenario, root)
    dep = yaml.safe_load(gen.deployment.read_text())
    dep["training"].update(epochs=1, max_steps_per_epoch=3)
    gen.deployment.write_text(yaml.safe_dump(dep, sort_keys=False))
    run_peers_in_threads(gen.peer_configs)
    threads = []
    for hospital in ("hospital_a", "hospital_b"):
        node = serve_node(gen.peer_configs[hospital], max_requests=1)
        threads.append(threading.Thread(target=node.run, daemon=True))
        threads[-1].start()
    node, client = predict_node(gen.peer_configs["lab"], root / "data" / "lab.safetensors")
    result = node.run()
    for t in threads:
        t.join(60)
    if result.status != "ok":
        raise SystemExit(f"{scenario}: the request failed: {result.error}")
    parties = {}
    for peer in ("lab", "hospital_a", "hospital_b"):
        sent = [e["data"] for e in _since_resume(root / "audit" / f"{peer}.jsonl") if e["event"] == "message_sent"]
        parties[peer] = {"messages": dict(collections.Counter(d["kind"] for d in sent)),
                         "payload_bytes": sum(int(d["nbytes"]) for d in sent)}
    lab = _since_resume(root / "audit" / "lab.jsonl")
    t0 = _ts(lab[0])
    received = [(e["data"]["kind"], _ts(e) - t0) for e in lab if e["event"] == "message_received"]
    inputs = [t for k, t in received if k in ("activation", "masked_aggregate")]
    return {
        "requested": len(client.inputs), "predicted": int(result.metrics["samples"]),
        "missing": int(result.metrics["missing"]), "batches": client.batches_total, "parties": parties,
        "lab_seconds": {
            "handshake": round(next(_ts(e) - t0 for e in lab if e["event"] == "peer_joined"), 3),
            "open": round(max(t for k, t in received if k == "barrier_ack"), 3),
            "batches_done": round(max(inputs), 3),
            "closed": round(_ts(lab[-1]) - t0, 3),
        },
    }


def main() -> int:
    """Both scenarios; print and write the results."""
    started = time.time()
    out = {"machine": machine(), "scenarios": {s: measure(s) for s in ("vertical", "vertical-he")}}
    out["seconds"] = round(time.time() - started, 1)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "vertical_request.json").write_text(json.dumps(out, indent=1, sort_keys=True))
    for scenario, r in out["scenarios"].items():
        print(f"{scenario}: {r['predicted']} of {r['requested']} ids predicted ({r['missing']} not held by both "
              f"hospitals), {r['batches']} batches; lab timeline (s): {r['lab_seconds']}")
        for peer, p in r["parties"].items():
            print(f"  {peer:<11} sent {p['messages']}  payload {p['payload_bytes']:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
