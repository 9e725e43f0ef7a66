"""torchvision presets: a slice of a standard network as a segment. The one home of torchvision.

`{torchvision: resnet18, cut_after: layer1}` is the network from its start through `layer1`;
`{torchvision: resnet18, start_after: layer1}` the rest of it; both keys give a middle part. The
segment is an `nn.Sequential` of the network's own stages under their own names, so its
state_dict names are torchvision's (`layer1.0.conv1.weight`) and a torchvision weights file,
converted to safetensors, loads into it. The network is built with `weights=None` under the
segment's seed: nothing is ever downloaded.

torchvision is optional (`pip install 'secure-split[vision]'`, after the CPU torch). The wheel on
PyPI is built against CUDA torch; with the CPU torch its C++ operators (nms, roi_align, ...) fail
to load, and its import then fails on its own fake-kernel registration for `torchvision::nms`.
The models need none of those operators, so before the first import `_define_missing_operators`
loads the extension itself and, only where that fails, defines the two operator schemas that
import registers kernels for (`nms`, `qnms`). The operators stay unusable (torchvision says so if
called); the models work. See docs/models.md.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from secure_split.architecture import TORCHVISION_STAGES, model_problems, torchvision_spec
from secure_split.errors import ConfigError, ConfigProblem

__all__ = ["INSTALL_HINT", "build_preset", "import_torchvision", "operators_defined_here"]

INSTALL_HINT = ("install it with `pip install 'secure-split[vision]'` (torchvision 0.28.0 matches torch 2.13; "
                "install it after the CPU torch, as the Makefile does, or pip pulls a CUDA torch)")
# The schemas torchvision's import registers fake kernels for whether or not its operators loaded.
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_defined: list[Any] = []  # the torch.library.Library holding the schemas (it must stay alive)


def operators_defined_here() -> bool:
    """Whether the operator schemas were defined here because torchvision's extension did not load."""
    return bool(_defined)


def _define_missing_operators(package: Path) -> None:
    """Load torchvision's C++ extension; define the schemas its import needs only if that fails."""
    try:
        torch.ops.torchvision.nms  # noqa: B018  # exists once the extension (or a schema) is loaded
        return
    except (AttributeError, RuntimeError):
        pass
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        library = package / f"_C{suffix}"
        if library.is_file():
            try:
                torch.ops.load_library(str(library))  # type: ignore[no-untyped-call]  # torch leaves it untyped
                return
            except OSError:
                break  # built against another torch (the PyPI wheel wants CUDA torch's libraries)
    lib = torch.library.Library("torchvision", "DEF")  # type: ignore[no-untyped-call]  # untyped in torch
    for schema in _SCHEMAS:
        lib.define(schema)  # type: ignore[no-untyped-call]  # untyped in torch
    _defined.append(lib)


def import_torchvision() -> ModuleType:
    """Import torchvision (once), with the compatibility step of the module docstring.

    Raises:
        ConfigError: torchvision is not installed, or cannot be imported with this torch.
    """
    loaded: ModuleType | None = sys.modules.get("torchvision")
    if loaded is not None:
        return loaded
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        raise ConfigError(f"a torchvision preset needs torchvision, which is not installed: {INSTALL_HINT}")
    try:
        _define_missing_operators(Path(spec.origin).parent)
        import torchvision
    except Exception as exc:  # anything its import raises: a mismatched build is not our bug to crash on
        raise ConfigError(f"torchvision cannot be imported with torch {torch.__version__}: {type(exc).__name__}: "
                          f"{exc}; {INSTALL_HINT}") from None
    module: ModuleType = torchvision
    return module


def _entries(net: nn.Module, stages: tuple[str, ...], cuts: list[str]) -> list[tuple[str, str | None, nn.Module]]:
    """The network's stages in forward order; a stage named in a cut as STAGE.N split into its children."""
    split = {c.split(".")[0] for c in cuts if "." in c}
    out: list[tuple[str, str | None, nn.Module]] = []
    for stage in stages:
        module = nn.Flatten(1) if stage == "flatten" else getattr(net, stage)
        if stage in split:
            if not isinstance(module, nn.Sequential):
                raise ValueError(f"stage {stage} is not a sequence of blocks; cut after the stage itself")
            out.extend((stage, str(i), child) for i, child in enumerate(module))
        else:
            out.append((stage, None, module))
    return out


def _position(entries: list[tuple[str, str | None, nn.Module]], cut: str) -> int:
    stage, _, index = cut.partition(".")
    for i, (s, idx, _m) in enumerate(entries):
        if s == stage and (idx or "") == index:
            return i
    count = sum(1 for s, idx, _m in entries if s == stage and idx is not None)
    raise ValueError(f"{cut}: stage {stage} has blocks 0 to {count - 1}")


def build_preset(model: Mapping[str, Any], *, seed: int, name: str = "segment") -> nn.Sequential:
    """Build a torchvision preset's slice under `seed` (random initialisation, never a download).

    Args:
        model: the preset, e.g. {torchvision: resnet18, cut_after: layer1, num_classes: 10}.
        seed: the initialisation seed (the whole network is built under it, then sliced, so the
            two sides of a cut together are the network one process would build).
        name: the segment's name, for error messages.

    Returns:
        A float32 `nn.Sequential` on the CPU, in train mode, whose children carry the network's
        stage names.

    Raises:
        ConfigError: an invalid preset, a cut that names no block, or torchvision missing.
    """
    key = f"segments.{name}.model"
    problems = model_problems(model, in_deployment=False)
    if problems:
        raise ConfigError([ConfigProblem("-", key, p) for p in problems])
    tv = import_torchvision()
    spec = torchvision_spec(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net: nn.Module = getattr(tv.models, spec["torchvision"])(weights=None, num_classes=spec["num_classes"])
        if spec["stem"] == "cifar":
            # The usual ResNet for 32x32 images: a 3x3 stride-1 first convolution and no max-pool.
            first = net.get_submodule("conv1")
            assert isinstance(first, nn.Conv2d)
            conv = nn.Conv2d(3, first.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")  # as torchvision does
            net.conv1, net.maxpool = conv, nn.Identity()
    cuts = [c for c in (spec["start_after"], spec["cut_after"]) if c is not None]
    try:
        entries = _entries(net, TORCHVISION_STAGES[spec["torchvision"]], cuts)
        start = _position(entries, spec["start_after"]) + 1 if spec["start_after"] else 0
        end = _position(entries, spec["cut_after"]) + 1 if spec["cut_after"] else len(entries)
    except ValueError as exc:
        raise ConfigError(ConfigProblem("-", key, str(exc))) from None
    children: OrderedDict[str, nn.Module] = OrderedDict()
    for stage, index, module in entries[start:end]:
        if index is None:
            children[stage] = module
        else:
            # A part of a stage keeps its blocks' numbers, so the state names stay torchvision's.
            part = children.setdefault(stage, nn.Sequential())
            part.add_module(index, module)
    return nn.Sequential(children).float().train()
