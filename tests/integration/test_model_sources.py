"""Each new model source trains across real peer processes (CURVE, policy gate, audit log).

One bounded run per source: a torchvision ResNet-18 cut after layer1 on 32x32x3 images (public
preset), a bank's tabular model with categorical embeddings (layer list), and a bank's own module
named only in its peer config with only its commitment in the deployment. Batches of 8, 2-3
steps: each run takes about 20-40 s on a loaded 2-core machine (torch and torchvision imports
dominate). The CUDA smoke test runs only where a GPU is.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from secure_split import scenarios as demo
from secure_split.architecture import SegmentSource, segment_commitment
from secure_split.engine.sources import describe_source
from tests.integration.helpers import audit_entries, start_peers, wait_for

pytestmark = pytest.mark.integration

ORG_CODE = Path(__file__).resolve().parents[1] / "unit" / "engine" / "org_code"
SALT = "5a17" * 8
TRAINING = {"seed": 5, "epochs": 1, "batch_size": 8, "max_steps_per_epoch": 3, "test_fraction": 0.25,
            "optimizer": {"type": "adam", "lr": 0.01}}


def _plan(name: str, ids: Any, x: Any, y: Any, segments: dict[str, Any], edges: list[dict[str, Any]],
          owner: str = "bank") -> demo.ScenarioPlan:
    return demo.ScenarioPlan(
        name=name, peers=[demo.PeerPlan(owner, ids, features=x), demo.PeerPlan("lab", ids, labels={"labels": y})],
        coordinator="lab", segments=segments, edges=edges, training=TRAINING,
        baseline_features={"bottom": x}, baseline_labels={"top": y}, baseline_ids=ids, main_task="labels",
    )


def _run(plan: demo.ScenarioPlan, tmp_path: Path, peer_config: dict[str, dict[str, Any]] | None = None,
         timeout: float = 240) -> tuple[demo.GeneratedDeployment, dict[str, int], dict[str, str]]:
    gen = demo.generate(plan, tmp_path / "work")
    for peer, extra in (peer_config or {}).items():
        path = gen.peer_configs[peer]
        path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), **extra}, sort_keys=False))
    procs = start_peers(gen)
    # A peer that fails (e.g. refuses its config) ends the run: the others would wait for it.
    wait_for(lambda: all(p.proc.poll() is not None for p in procs.values())
             or any(p.proc.poll() not in (None, 0) for p in procs.values()), timeout, interval=0.2)
    for p in procs.values():
        p.kill()  # only those still running
    codes = {n: p.proc.returncode for n, p in procs.items()}
    return gen, codes, {n: p.stderr for n, p in procs.items()}


def _assert_trained(gen: demo.GeneratedDeployment, codes: dict[str, int], logs: dict[str, str]) -> None:
    assert codes == {n: 0 for n in codes}, logs
    result = json.loads((gen.workdir / "results" / "lab.json").read_text())
    assert result["metrics"]["final"]["accuracy/labels"] >= 0.0
    for peer in gen.peer_configs:
        assert sorted((gen.workdir / "checkpoints" / peer).glob("epoch-*.safetensors")), peer
        assert audit_entries(gen.workdir / "audit" / f"{peer}.jsonl"), peer


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="torchvision is not installed")
def test_a_torchvision_resnet18_cut_after_layer1_trains_across_two_processes(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    ids, x, y = torch.arange(40), torch.rand(40, 3, 32, 32, generator=g), torch.randint(0, 4, (40,), generator=g)
    segments = {
        "bottom": {"peer": "hospital", "input": "features", "model": {"torchvision": "resnet18", "cut_after": "layer1"}},
        "top": {"peer": "lab", "loss": "cross_entropy",
                "model": {"torchvision": "resnet18", "start_after": "layer1", "num_classes": 4}},
    }
    plan = _plan("resnet18", ids, x, y, segments, [{"from": "bottom", "to": "top"}], owner="hospital")
    _assert_trained(*_run(plan, tmp_path))


def _bank_table() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    numeric = torch.randn(64, 3, generator=g)
    product, region = torch.randint(0, 5, (64,), generator=g), torch.randint(0, 7, (64,), generator=g)
    y = ((product % 2 == 1) ^ (numeric[:, 0] > 0)).to(torch.int64)
    return torch.arange(64), torch.cat([numeric, product[:, None].float(), region[:, None].float()], dim=1), y


def test_a_bank_tabular_model_with_categorical_embeddings_trains_across_two_processes(tmp_path: Path) -> None:
    ids, x, y = _bank_table()
    segments = {
        "bottom": {"peer": "bank", "input": "features", "model": [
            {"embedding": {"columns": [3, 4], "cardinalities": [5, 7], "dim": 4}},
            {"linear": {"in": 11, "out": 16}}, {"relu": {}}]},
        "top": {"peer": "lab", "loss": "cross_entropy", "model": [{"linear": {"in": 16, "out": 2}}]},
    }
    _assert_trained(*_run(_plan("tabular", ids, x, y, segments, [{"from": "bottom", "to": "top"}]), tmp_path))


def test_a_private_user_module_trains_with_only_its_commitment_in_the_deployment(tmp_path: Path) -> None:
    ids, x, y = _bank_table()
    model = {"module": "bank_models:tabular_bottom", "path": str(ORG_CODE),
             "arguments": {"features": 5, "columns": [3, 4], "cardinalities": [5, 7], "dim": 4, "out": 8}}
    document = describe_source(SegmentSource("bottom", "module", model, private=True, origin=tmp_path, salt=SALT))
    segments = {
        "bottom": {"peer": "bank", "input": "features", "commitment": segment_commitment(document),
                   "parameters": document["parameters"]},
        "top": {"peer": "lab", "loss": "cross_entropy", "model": [{"linear": {"in": 8, "out": 2}}]},
    }
    edges = [{"from": "bottom", "to": "top", "interface": {"shape": [8], "dtype": "float32", "bounds": [-1, 1]}}]
    gen, codes, logs = _run(_plan("private", ids, x, y, segments, edges), tmp_path,
                            {"bank": {"segments": {"bottom": {"model": model, "salt": SALT}}}})
    shared = (gen.workdir / "deployment.yaml").read_text()
    assert "bank_models" not in shared and "module" not in shared  # only the commitment is shared
    _assert_trained(gen, codes, logs)
    (record,) = [e for e in audit_entries(gen.workdir / "audit" / "bank.jsonl")
                 if e.get("event") == "segment_commitment"]
    assert record["data"]["commitment"] == segment_commitment(document)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")
def test_the_vanilla_demo_trains_with_the_label_holder_on_cuda(tmp_path: Path) -> None:
    plan = demo.SCENARIOS["vanilla"](1)
    gen, codes, logs = _run(plan, tmp_path, {"label_holder": {"device": "cuda"}})
    assert codes == {n: 0 for n in codes}, logs
    result = json.loads((gen.workdir / "results" / "label_holder.json").read_text())
    assert result["metrics"]["final"]["accuracy/labels"] > 0.5
