"""torchvision presets: slices of torchvision's own networks, under their own names, never downloaded."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from secure_split.architecture import SegmentSource
from secure_split.engine import vision
from secure_split.engine.sources import build_segment_module
from secure_split.errors import ConfigError

from .model_cases import HAS_TORCHVISION, NEEDS_TORCHVISION

pytestmark = pytest.mark.skipif(not HAS_TORCHVISION, reason=NEEDS_TORCHVISION)


def _full(name: str, seed: int, **kwargs: Any) -> torch.nn.Module:
    tv = vision.import_torchvision()
    torch.manual_seed(seed)
    net: torch.nn.Module = getattr(tv.models, name)(weights=None, **kwargs)
    return net.eval()


@pytest.mark.parametrize(("name", "cut", "shape"), [
    ("resnet18", "layer1", (64, 8, 8)),
    ("resnet18", "layer2.0", (128, 4, 4)),
    ("mobilenet_v3_small", "features.3", (24, 4, 4)),
])
def test_the_two_sides_of_a_cut_compose_to_the_torchvision_network(name: str, cut: str, shape: tuple[int, ...]) -> None:
    # num_classes on both sides: the head's size changes the random stream of the layers initialised after it.
    bottom = vision.build_preset({"torchvision": name, "cut_after": cut, "num_classes": 7}, seed=3).eval()
    top = vision.build_preset({"torchvision": name, "start_after": cut, "num_classes": 7}, seed=3).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert tuple(bottom(x).shape[1:]) == shape
        torch.testing.assert_close(top(bottom(x)), _full(name, 3, num_classes=7)(x))


def test_state_names_are_torchvisions_so_a_network_file_loads_into_a_slice(tmp_path: Path) -> None:
    full = _full("resnet18", 9, num_classes=10)
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(tmp_path / "resnet18.safetensors"))
    source = SegmentSource("bottom", "torchvision", {"torchvision": "resnet18", "cut_after": "layer2"}, private=False,
                           origin=tmp_path / "deployment.yaml", weights=tmp_path / "resnet18.safetensors")
    bottom = build_segment_module(source, seed=0)
    own = bottom.state_dict()
    assert "layer2.1.bn2.running_var" in own and "fc.weight" not in own
    for key, value in own.items():
        assert torch.equal(value, full.state_dict()[key]), key


def test_a_weights_file_for_another_head_is_refused_with_the_entry(tmp_path: Path) -> None:
    full = _full("resnet18", 9)  # 1000 classes
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(tmp_path / "w.safetensors"))
    source = SegmentSource("top", "torchvision", {"torchvision": "resnet18", "start_after": "layer4",
                                                  "num_classes": 10},
                           private=False, origin=tmp_path / "d.yaml", weights=tmp_path / "w.safetensors")
    with pytest.raises(ConfigError, match=r"fc.weight: the file has \[1000, 512\], the segment \[10, 512\]"):
        build_segment_module(source, seed=0)


def test_nothing_is_downloaded(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("a preset tried to download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr("urllib.request.urlopen", no_network)
    vision.build_preset({"torchvision": "resnet18", "cut_after": "layer1"}, seed=0)


def test_the_cifar_stem_keeps_32x32_resolution_through_layer1() -> None:
    bottom = vision.build_preset({"torchvision": "resnet18", "cut_after": "layer1", "stem": "cifar"}, seed=0)
    assert tuple(bottom(torch.rand(2, 3, 32, 32)).shape) == (2, 64, 32, 32)
    assert tuple(bottom.conv1.weight.shape) == (64, 3, 3, 3)


def test_the_same_seed_builds_the_same_weights_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    a = vision.build_preset({"torchvision": "resnet18", "cut_after": "layer1"}, seed=4)
    b = vision.build_preset({"torchvision": "resnet18", "cut_after": "layer1"}, seed=4)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@pytest.mark.parametrize(("preset", "message"), [
    ({"torchvision": "resnet18", "cut_after": "layer1.7"}, "layer1.7: stage layer1 has blocks 0 to 1"),
    ({"torchvision": "resnet18", "cut_after": "relu.0"}, "stage relu is not a sequence of blocks"),
    ({"torchvision": "alexnet"}, "not a supported architecture"),
    ({"torchvision": "resnet18", "start_after": "layer3", "cut_after": "layer2"}, "start_after must come before"),
])
def test_bad_presets_are_configuration_errors(preset: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        vision.build_preset(preset, seed=0, name="bottom")


def test_a_missing_torchvision_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    monkeypatch.setattr(vision.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"not installed: install it with `pip install 'secure-split\[vision\]'`"):
        vision.build_preset({"torchvision": "resnet18"}, seed=0)


def test_torchvision_operators_either_work_or_fail_with_torchvisions_own_message() -> None:
    # With the PyPI wheel (built against CUDA torch) and the CPU torch, the extension does not load:
    # the schemas are defined here so that import succeeds, and the operators stay unusable.
    tv = vision.import_torchvision()
    boxes, scores = torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([1.0])
    if vision.operators_defined_here():
        with pytest.raises(RuntimeError, match="Couldn't load custom C\\+\\+ ops"):
            tv.ops.nms(boxes, scores, 0.5)
    else:
        assert tv.ops.nms(boxes, scores, 0.5).tolist() == [0]
