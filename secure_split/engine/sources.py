"""Build a segment's module from its source, load initial weights, describe it, pick the device.

One function, `build_segment_module`, turns a `SegmentSource` (see `secure_split.architecture`)
into an `nn.Module` for every consumer: the peer's executor, the centralised baseline and local
inference, so all of them build the same module from the same source under the same seed.

- layers: `engine.models.build_segment` (the fixed table of layer types);
- torchvision: `engine.vision.build_preset`;
- module: the factory named in the peer's *own* config, imported on this host and called with
  its `arguments` under the segment's seed. This is the one place the package imports code by
  name, and it accepts only a private source (one `segment_sources` read from a peer config): a
  deployment cannot name code, and no message can.

`architecture_document` describes the built module for its commitment; `check_commitment`
refuses a private segment whose module is not the one the deployment commits to.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load as load_safetensors
from torch import nn

from secure_split.architecture import SegmentSource, commitment_problems, public_model_digest, public_sources
from secure_split.architecture import architecture_document as _document
from secure_split.engine.models import MAX_SEGMENT_PARAMETERS, build_segment, derive_seed
from secure_split.errors import ConfigError, ConfigProblem

if TYPE_CHECKING:
    from secure_split.config import Deployment

__all__ = [
    "MAX_WEIGHTS_BYTES",
    "architecture_document",
    "build_segment_module",
    "build_segments",
    "check_commitment",
    "describe_source",
    "load_initial_weights",
    "resolve_device",
    "segment_record",
]

MAX_WEIGHTS_BYTES = 4 * 1024**3


def _problem(source: SegmentSource, key: str, message: str) -> ConfigError:
    return ConfigError(ConfigProblem(str(source.origin), f"segments.{source.segment}.{key}", message))


def _from_factory(source: SegmentSource, seed: int) -> nn.Module:
    if not source.private:
        # Only `segment_sources` makes private sources, and only from the peer's own config.
        raise _problem(source, "model", "module: is accepted only from this peer's own config, never from the "
                                        "shared deployment")
    target: str = source.model["module"]
    module_name, _, attr = target.partition(":")
    folder = source.model.get("path")
    if folder is not None:
        where = (source.origin.parent / folder).resolve()
        if not where.is_dir():
            raise _problem(source, "model.path", f"folder {where} not found")
        if str(where) not in sys.path:
            sys.path.append(str(where))  # appended: the module cannot shadow installed packages
    try:
        code = importlib.import_module(module_name)
    except ImportError as exc:
        raise _problem(source, "model.module", f"cannot import {module_name!r} on this host ({exc}); install it, "
                                               "or set path: to the folder that holds it") from None
    except Exception as exc:  # the organisation's own module failed while importing
        raise _problem(source, "model.module", f"importing {module_name!r} failed: {type(exc).__name__}: {exc}") from None
    factory = getattr(code, attr, None)
    if not callable(factory):
        raise _problem(source, "model.module", f"{module_name} has no callable {attr!r}")
    arguments = dict(source.model.get("arguments") or {})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            built = factory(**arguments)
        except Exception as exc:  # the factory is the organisation's code: report, do not crash
            raise _problem(source, "model.module", f"{target}(**arguments) failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(built, nn.Module):
        raise _problem(source, "model.module", f"{target} returned {type(built).__name__}, not a torch.nn.Module")
    return built


def load_initial_weights(module: nn.Module, path: Path, *, name: str, max_bytes: int = MAX_WEIGHTS_BYTES) -> None:
    """Load a safetensors file of initial weights into a segment's module.

    Every state entry of the module must be in the file with the same shape; entries of the file
    that the module lacks are ignored (a whole torchvision network's file loads into one slice).
    Values are cast to the module's dtypes. Nothing is loaded unless everything fits.

    Raises:
        ConfigError: the file is missing, too big, not safetensors, or does not fit.
    """
    key = f"segments.{name}.weights"
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise ConfigError(ConfigProblem(str(path), key, f"{size} bytes, more than {max_bytes}"))
        tensors = load_safetensors(path.read_bytes())
    except OSError as exc:
        raise ConfigError(ConfigProblem(str(path), key, f"cannot read it: {exc}")) from None
    except ConfigError:
        raise
    except Exception as exc:  # safetensors raises its own error type on a malformed file
        raise ConfigError(ConfigProblem(str(path), key, f"not a valid safetensors file: {exc}")) from None
    own = module.state_dict()
    problems = []
    for entry, ref in own.items():
        got = tensors.get(entry)
        if got is None:
            problems.append(f"{entry} is missing")
        elif tuple(got.shape) != tuple(ref.shape):
            problems.append(f"{entry}: the file has {list(got.shape)}, the segment {list(ref.shape)}")
        elif got.dtype.is_floating_point != ref.dtype.is_floating_point:
            problems.append(f"{entry}: the file has {got.dtype}, the segment {ref.dtype}")
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise ConfigError(ConfigProblem(str(path), key, f"does not fit segment '{name}': {shown}"))
    module.load_state_dict({k: tensors[k].to(v.dtype) for k, v in own.items()})


def build_segment_module(source: SegmentSource, *, seed: int) -> nn.Module:
    """Build one segment's module from its source, initialised under `seed`, with its initial weights.

    The global torch RNG is left untouched.

    Args:
        source: the segment's source (`architecture.public_sources` / `segment_sources`).
        seed: normally `derive_seed(training.seed, segment)`.

    Returns:
        A float32 module on the CPU, in train mode.

    Raises:
        ConfigError: an invalid model, code that cannot be imported or fails, more parameters than
            `MAX_SEGMENT_PARAMETERS`, or weights that do not fit.
    """
    name = source.segment
    try:
        if source.kind == "layers":
            module: nn.Module = build_segment(source.model, seed=seed, name=name)
        elif source.kind == "torchvision":
            from secure_split.engine.vision import build_preset  # imports torchvision: only when asked for

            module = build_preset(source.model, seed=seed, name=name)
        else:
            module = _from_factory(source, seed)
    except ConfigError as exc:
        # The builders name no file; this source knows which one described the model.
        raise ConfigError([ConfigProblem(str(source.origin) if p.file == "-" else p.file, p.key, p.message, p.line)
                           for p in exc.problems]) from None
    count = sum(p.numel() for p in module.parameters())
    if count > MAX_SEGMENT_PARAMETERS:
        raise _problem(source, "model", f"{count} parameters, more than {MAX_SEGMENT_PARAMETERS} allowed")
    module = module.float().train()
    if source.weights is not None:
        load_initial_weights(module, source.weights, name=name)
    return module


def build_segments(
    deployment: Deployment,
    sources: Mapping[str, SegmentSource] | None,
    segments: Sequence[str],
    *,
    seed_names: Mapping[str, str] | None = None,
) -> dict[str, nn.Module]:
    """Build several segments of a deployment; private ones are checked against their commitments.

    Args:
        deployment: the deployment (its `training.seed` seeds every segment, `derive_seed`).
        sources: segment -> source for segments whose model the deployment does not publish
            (and for public ones with initial weights); the deployment's public models fill in
            the rest.
        segments: which segments to build.
        seed_names: segment -> the name its seed is derived from (horizontal schedules:
            `models.horizontal_seed_names`); default: its own name.

    Returns:
        segment -> module (float32, CPU, train mode).

    Raises:
        ConfigError: every problem of every segment at once (see `build_segment_module`,
            `check_commitment`), and private segments without a source.
    """
    merged = {**public_sources(deployment), **(sources or {})}
    seed = deployment.spec.training.seed
    names = seed_names or {}
    modules: dict[str, nn.Module] = {}
    problems: list[ConfigProblem] = []
    for s in segments:
        source = merged.get(s)
        if source is None:
            owner = deployment.spec.segments[s].peer
            problems.append(ConfigProblem(str(deployment.path), f"segments.{s}", f"segment '{s}' is private: its "
                                          f"model is in peer '{owner}''s config; pass its source "
                                          "(architecture.segment_sources)"))
            continue
        try:
            module = build_segment_module(source, seed=derive_seed(seed, names.get(s, s)))
            if source.private:
                check_commitment(source, module)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        modules[s] = module
    if problems:
        raise ConfigError(problems)
    return modules


def architecture_document(source: SegmentSource, module: nn.Module) -> dict[str, Any]:
    """The architecture document of a built segment (what its commitment hashes; see
    `secure_split.architecture.architecture_document`)."""
    state = [(n, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in module.state_dict().items()]
    return _document(source, parameters=sum(p.numel() for p in module.parameters()), state=state)


def describe_source(source: SegmentSource) -> dict[str, Any]:
    """Build a segment from its source and return its architecture document (the commitment is
    `architecture.segment_commitment` of it; the document does not depend on the seed).

    Raises:
        ConfigError: the source cannot be built (see `build_segment_module`).
    """
    return architecture_document(source, build_segment_module(dataclasses.replace(source, weights=None), seed=0))


def check_commitment(source: SegmentSource, module: nn.Module) -> str:
    """Check a private segment's built module against the deployment's commitment.

    Returns:
        The commitment ("sha256:...").

    Raises:
        ConfigError: the module is not the committed architecture (another model, salt, code
            version or parameter count), naming both commitments.
    """
    assert source.private and source.commitment is not None and source.parameters is not None
    document = architecture_document(source, module)
    problems = commitment_problems(document, source.commitment, source.parameters)
    if problems:
        raise _problem(source, "model", f"this peer's model of segment '{source.segment}' is not the one the "
                                        f"deployment commits to ({'; '.join(problems)}); run `secure-split model "
                                        "describe` on this peer config and compare, or update the deployment")
    return source.commitment


def segment_record(source: SegmentSource, module: nn.Module) -> dict[str, Any]:
    """What the peer writes to its audit log at run start about one of its segments.

    Returns:
        {"segment", "source" (layers / torchvision / module), "public", "parameters",
         "commitment"}: the deployment's commitment for a private segment (checked when the module
        was built); for a public one, `architecture.public_model_digest` of its model, which an
        auditor recomputes from the deployment without torch.
    """
    return {
        "segment": source.segment,
        "source": source.kind,
        "public": not source.private,
        "parameters": sum(p.numel() for p in module.parameters()),
        "commitment": source.commitment if source.private else public_model_digest(source.model),
    }


def resolve_device(device: str | torch.device) -> torch.device:
    """The torch device of a peer config's `device:` (cpu, cuda, cuda:N or auto).

    Raises:
        ConfigError: CUDA is asked for but this torch has none, or the index is out of range.
    """
    if isinstance(device, torch.device):
        text = str(device)
    else:
        text = device
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(text)
    except RuntimeError:
        raise ConfigError(ConfigProblem("-", "device", f"device: {text!r}; expected cpu, cuda, cuda:N or auto")) from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(ConfigProblem("-", "device", f"device: {text}, but this torch ({torch.__version__}) "
                                            "sees no CUDA device; install a CUDA build of torch or set device: cpu "
                                            "(or auto)"))
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ConfigError(ConfigProblem("-", "device", f"device: {text}, but this host has "
                                            f"{torch.cuda.device_count()} CUDA device(s)"))
    elif resolved.type != "cpu":
        raise ConfigError(ConfigProblem("-", "device", f"device: {text}; expected cpu, cuda, cuda:N or auto"))
    return resolved


def layers_of(sources: Mapping[str, SegmentSource], segment: str) -> Any:
    """The layer list of a segment whose source is layers, else None (for shape derivation)."""
    source = sources.get(segment)
    return source.model if source is not None and source.kind == "layers" else None
