"""The networks users bring, as small in-memory split deployments (one per model source).

- resnet: a torchvision ResNet-18 cut after layer1 (preset, public), on 32x32x3 images;
- tabular: a bank's table with two categorical columns, embedded by the `embedding` layer type;
- private: the bank's own module (`org_code/bank_models.py`), named only in its peer config, with
  only a commitment and the edge's interface in the deployment;
- transformer: token embedding + positional embedding + encoder layer at the owner, pooling and
  head at the label holder, on generated token sequences.

Each case carries its peer configs (written to disk and loaded like a peer loads them) and the
sources `segment_sources` resolves from them.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from secure_split.architecture import SegmentSource, peer_config_source, segment_commitment, segment_sources
from secure_split.config import Deployment, PeerConfig, load_peer_config
from secure_split.engine.data import PeerData, write_peer_data
from secure_split.engine.sources import describe_source

from .harness import deployment_yaml, write_deployment

ORG_CODE = Path(__file__).resolve().parent / "org_code"
SALT = "5a17" * 8
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
NEEDS_TORCHVISION = "torchvision is not installed (pip install 'secure-split[vision]')"
FAST = {"seed": 5, "epochs": 2, "batch_size": 8, "max_steps_per_epoch": 3, "test_fraction": 0.25,
        "optimizer": {"type": "adam", "lr": 0.01}}


@dataclass
class ModelCase:
    """A deployment, each peer's data, config and sources, and the baseline's inputs."""

    dep: Deployment
    datas: dict[str, PeerData | None]
    configs: dict[str, PeerConfig]
    features: dict[str, torch.Tensor]
    labels: dict[str, torch.Tensor]
    ids: torch.Tensor

    @property
    def sources(self) -> dict[str, dict[str, SegmentSource]]:
        """peer -> its segment sources, as each peer resolves them from its own config."""
        return {p: segment_sources(self.dep, cfg) for p, cfg in self.configs.items()}

    @property
    def all_sources(self) -> dict[str, SegmentSource]:
        """Every segment's source (what the baseline needs)."""
        return {s: src for per_peer in self.sources.values() for s, src in per_peer.items()}


def write_peer_config(tmp: Path, peer: str, segments: dict[str, Any] | None = None, **extra: Any) -> Path:
    """peers/PEER.yaml next to tmp/deployment.yaml (a placeholder is written if none exists yet)."""
    (tmp / "peers").mkdir(parents=True, exist_ok=True)
    key = tmp / "keys" / f"{peer}.key"
    key.parent.mkdir(exist_ok=True)
    key.write_text("placeholder: the engine never reads it\n")
    if not (tmp / "deployment.yaml").exists():
        (tmp / "deployment.yaml").write_text("# written below\n")
    doc = {"peer": peer, "deployment": "../deployment.yaml", "secret_key": f"../keys/{peer}.key",
           "checkpoints": f"../checkpoints/{peer}",
           **({"segments": segments} if segments else {}), **extra}
    path = tmp / "peers" / f"{peer}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def commit(config: Path, segment: str) -> dict[str, Any]:
    """The deployment entry of a private segment: {commitment, parameters} (as `model describe` prints)."""
    document = describe_source(peer_config_source(load_peer_config(config), segment))
    return {"commitment": segment_commitment(document), "parameters": document["parameters"]}


def _case(tmp: Path, peers: list[str], segments: dict[str, Any], edges: list[dict[str, Any]],
          datas: dict[str, PeerData | None], features: dict[str, torch.Tensor], labels: dict[str, torch.Tensor],
          ids: torch.Tensor, private: dict[str, dict[str, Any]] | None = None,
          training: dict[str, Any] | None = None) -> ModelCase:
    (tmp / "data").mkdir(exist_ok=True)
    for p, d in datas.items():
        if d is not None:
            write_peer_data(tmp / "data" / f"{p}.safetensors", ids=d.ids, features=d.features,
                            labels=dict(d.labels) or None)
    paths = {p: write_peer_config(tmp, p, (private or {}).get(p),
                                  **({"data": f"../data/{p}.safetensors"} if datas.get(p) else {})) for p in peers}
    dep = write_deployment(tmp, deployment_yaml(peers, segments, edges, training or FAST))
    return ModelCase(dep, datas, {p: load_peer_config(path) for p, path in paths.items()}, features, labels, ids)


def images(n: int = 48, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Synthetic 3x32x32 images whose class shifts one colour channel (learnable, not trivial)."""
    g = torch.Generator().manual_seed(11)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.rand(n, 3, 32, 32, generator=g)
    x[:, 0] += 0.25 * y[:, None, None]
    return torch.arange(n), x, y


def resnet(tmp: Path, *, cut: str = "layer1", stem: str = "imagenet") -> ModelCase:
    ids, x, y = images()
    segments = {
        "bottom": {"peer": "hospital", "input": "features",
                   "model": {"torchvision": "resnet18", "cut_after": cut, "stem": stem}},
        "top": {"peer": "lab", "loss": "cross_entropy",
                "model": {"torchvision": "resnet18", "start_after": cut, "num_classes": 4, "stem": stem}},
    }
    datas: dict[str, PeerData | None] = {"hospital": PeerData(ids=ids, features=x),
                                         "lab": PeerData(ids=ids, labels={"labels": y})}
    return _case(tmp, ["hospital", "lab"], segments, [{"from": "bottom", "to": "top"}], datas,
                 {"bottom": x}, {"top": y}, ids, training={**FAST, "max_steps_per_epoch": 2})


def bank_table(n: int = 400) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three numeric columns, then two categorical ones (codes 0..4 and 0..6); the label needs both kinds."""
    g = torch.Generator().manual_seed(7)
    numeric = torch.randn(n, 3, generator=g)
    product = torch.randint(0, 5, (n,), generator=g)
    region = torch.randint(0, 7, (n,), generator=g)
    y = ((product % 2 == 1) ^ (numeric[:, 0] > 0)).to(torch.int64)
    x = torch.cat([numeric, product[:, None].float(), region[:, None].float()], dim=1)
    return torch.arange(n), x, y


TABULAR_BOTTOM = [
    {"embedding": {"columns": [3, 4], "cardinalities": [5, 7], "dim": 4}},  # 3 + 2 * 4 = 11 wide
    {"linear": {"in": 11, "out": 32}},
    {"relu": {}},
    {"linear": {"in": 32, "out": 16}},
    {"relu": {}},
]


def tabular(tmp: Path, training: dict[str, Any] | None = None) -> ModelCase:
    ids, x, y = bank_table()
    segments = {
        "bottom": {"peer": "bank", "input": "features", "model": TABULAR_BOTTOM},
        "top": {"peer": "lab", "loss": "cross_entropy", "model": [{"linear": {"in": 16, "out": 2}}]},
    }
    datas: dict[str, PeerData | None] = {"bank": PeerData(ids=ids, features=x),
                                         "lab": PeerData(ids=ids, labels={"labels": y})}
    return _case(tmp, ["bank", "lab"], segments, [{"from": "bottom", "to": "top"}], datas,
                 {"bottom": x}, {"top": y}, ids, training=training)


def bank_module(factory: str = "tabular_bottom", **arguments: Any) -> dict[str, Any]:
    """A peer config's `model:` naming the bank's own code."""
    args = arguments or {"features": 5, "columns": [3, 4], "cardinalities": [5, 7], "dim": 4, "out": 8}
    return {"module": f"bank_models:{factory}", "arguments": args, "path": str(ORG_CODE)}


def private(tmp: Path, training: dict[str, Any] | None = None) -> ModelCase:
    ids, x, y = bank_table()
    bank = write_peer_config(tmp, "bank", {"bottom": {"model": bank_module(), "salt": SALT}})
    segments = {
        "bottom": {"peer": "bank", "input": "features", **commit(bank, "bottom")},
        "top": {"peer": "lab", "loss": "cross_entropy", "model": [{"linear": {"in": 8, "out": 2}}]},
    }
    edges = [{"from": "bottom", "to": "top", "interface": {"shape": [8], "dtype": "float32", "bounds": [-1, 1]}}]
    datas: dict[str, PeerData | None] = {"bank": PeerData(ids=ids, features=x),
                                         "lab": PeerData(ids=ids, labels={"labels": y})}
    return _case(tmp, ["bank", "lab"], segments, edges, datas, {"bottom": x}, {"top": y}, ids,
                 private={"bank": {"bottom": {"model": bank_module(), "salt": SALT}}}, training=training)


def token_sequences(n: int = 400, length: int = 8, vocabulary: int = 12) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids (as float32 features); label 1 when token 1 occurs anywhere in the sequence."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, vocabulary, (n, length), generator=g)
    y = (x == 1).any(dim=1).to(torch.int64)
    return torch.arange(n), x.float(), y


TRANSFORMER_OWNER = [
    {"embedding": {"num": 12, "dim": 16}},
    {"positional_embedding": {"length": 8, "dim": 16}},
    {"transformer_encoder_layer": {"dim": 16, "heads": 2, "feedforward": 32, "dropout": 0.0}},
]
TRANSFORMER_HEAD = [
    {"layernorm": {"shape": 16}},
    {"pool_sequence": {"how": "max"}},
    {"linear": {"in": 16, "out": 2}},
]


def transformer(tmp: Path, training: dict[str, Any] | None = None) -> ModelCase:
    ids, x, y = token_sequences()
    segments = {
        "encoder": {"peer": "lab_a", "input": "features", "model": TRANSFORMER_OWNER},
        "head": {"peer": "lab_b", "loss": "cross_entropy", "model": TRANSFORMER_HEAD},
    }
    datas: dict[str, PeerData | None] = {"lab_a": PeerData(ids=ids, features=x),
                                         "lab_b": PeerData(ids=ids, labels={"labels": y})}
    return _case(tmp, ["lab_a", "lab_b"], segments, [{"from": "encoder", "to": "head"}], datas,
                 {"encoder": x}, {"head": y}, ids, training=training)
