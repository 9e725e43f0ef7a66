"""Test helpers for the engine: deployments from YAML text, executors for each peer, and
`train_split`, the split schedule over the in-memory router (`secure_split.engine.local`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from secure_split.architecture import SegmentSource
from secure_split.config import Deployment, load_deployment
from secure_split.engine import zoo
from secure_split.engine.data import PeerData
from secure_split.engine.executor import PeerExecutor
from secure_split.engine.local import LocalRouter, over_the_wire

__all__ = ["LocalRouter", "deployment_yaml", "make_executors", "over_the_wire", "train_split", "write_deployment"]
from secure_split.engine.metrics import StepMetrics, evaluate, sum_task_metrics
from secure_split.engine.schedule import epoch_batches, split_train_test


def deployment_yaml(
    peers: list[str],
    segments: Mapping[str, Mapping[str, Any]],
    edges: list[Mapping[str, Any]],
    training: Mapping[str, Any] | None = None,
    coordinator: str | None = None,
) -> str:
    """The YAML text of a deployment with placeholder keys and loopback endpoints."""
    doc = {
        "version": 1,
        "name": "engine-test",
        "coordinator": coordinator or peers[-1],
        "policy": "policy.yaml",
        "peers": {
            p: {
                "endpoint": f"tcp://127.0.0.1:{5600 + i}",
                # Each peer its own placeholder keys: a key listed for two peers is refused.
                "sign_key": f"{i:02x}" * 32,
                "transport_key": f"{i:02d}" * 20,
            }
            for i, p in enumerate(peers)
        },
        "segments": {k: dict(v) for k, v in segments.items()},
        "edges": [dict(e) for e in edges],
        "training": dict(training or {}),
    }
    return yaml.safe_dump(doc, sort_keys=False)


def vanilla_digits_yaml(training: Mapping[str, Any]) -> str:
    """Digits CNN split in two: `bottom` at `owner` (features), `top` at `lab` (labels)."""
    return deployment_yaml(
        ["owner", "lab"],
        {
            "bottom": {"peer": "owner", "model": zoo.DIGITS_CNN_BOTTOM, "input": "features"},
            "top": {"peer": "lab", "model": zoo.DIGITS_CNN_TOP, "loss": "cross_entropy"},
        },
        [{"from": "bottom", "to": "top"}],
        training,
    )


def u_shaped_digits_yaml(training: Mapping[str, Any]) -> str:
    """Digits U-shape: `head` and `tail` at `owner` (features and labels), `middle` at `server`."""
    return deployment_yaml(
        ["owner", "server"],
        {
            "head": {"peer": "owner", "model": zoo.DIGITS_U_HEAD, "input": "features"},
            "middle": {"peer": "server", "model": zoo.DIGITS_U_MIDDLE},
            "tail": {"peer": "owner", "model": zoo.DIGITS_U_TAIL, "loss": "cross_entropy"},
        },
        [{"from": "head", "to": "middle"}, {"from": "middle", "to": "tail"}],
        training,
        coordinator="owner",
    )


def vertical_breast_cancer_yaml(training: Mapping[str, Any]) -> str:
    """Breast cancer split by columns: `bottom_a`/`bottom_b` at two hospitals, concatenated at `lab`'s `top`."""
    return deployment_yaml(
        ["hospital_a", "hospital_b", "lab"],
        {
            "bottom_a": {"peer": "hospital_a", "model": zoo.BREAST_CANCER_HALF_BOTTOM, "input": "features"},
            "bottom_b": {"peer": "hospital_b", "model": zoo.BREAST_CANCER_HALF_BOTTOM, "input": "features"},
            "top": {
                "peer": "lab",
                "model": zoo.BREAST_CANCER_VERTICAL_TOP,
                "loss": "cross_entropy",
                "merge": "concat",
            },
        },
        [{"from": "bottom_a", "to": "top"}, {"from": "bottom_b", "to": "top"}],
        training,
    )


def write_deployment(tmp_path: Path, text: str, name: str = "deployment.yaml") -> Deployment:
    """Write YAML text to tmp_path/name and load it with `load_deployment`."""
    path = tmp_path / name
    path.write_text(text)
    return load_deployment(path)


def make_executors(
    dep: Deployment, datas: Mapping[str, PeerData | None], *, noise_seed: int | None = 0,
    sources: Mapping[str, Mapping[str, SegmentSource]] | None = None,
) -> dict[str, PeerExecutor]:
    """One executor per peer that owns a segment (`sources`: peer -> its segment sources)."""
    peers = {seg.peer for seg in dep.spec.segments.values()}
    return {p: PeerExecutor(dep, p, datas.get(p), noise_seed=noise_seed, sources=(sources or {}).get(p))
            for p in sorted(peers)}


def train_split(
    dep: Deployment, datas: Mapping[str, PeerData | None], ids: Any, *, epochs: int | None = None,
    sources: Mapping[str, Mapping[str, SegmentSource]] | None = None,
) -> dict[str, Any]:
    """Train over the LocalRouter on the same schedule as `train_centralized`; same result keys."""
    training = dep.spec.training
    router = LocalRouter(make_executors(dep, datas, sources=sources))
    train_ids, test_ids = split_train_test(np.asarray(ids), training.test_fraction, training.seed)
    losses: list[float] = []
    step = 0
    for epoch in range(training.epochs if epochs is None else epochs):
        seen: list[StepMetrics] = []
        for batch in epoch_batches(
            train_ids, training.batch_size, training.seed, epoch, training.max_steps_per_epoch
        ):
            seen.extend(router.run_step(step, "train", batch).values())
            step += 1
        losses.append(sum(m.mean_loss for m in sum_task_metrics(seen).values()))

    def run_eval(batch: np.ndarray) -> dict[str, Any]:
        nonlocal step
        metrics = router.run_step(step, "eval", batch)
        step += 1
        return sum_task_metrics(metrics.values())

    test = evaluate(run_eval, test_ids, training.batch_size)
    segments = {s: m for ex in router.executors.values() for s, m in ex.segments.items()}
    return {
        "accuracy": {t: m.accuracy for t, m in test.items()},
        "loss": losses,
        "segments": segments,
        "router": router,
    }
