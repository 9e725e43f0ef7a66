"""Where a segment's model comes from, and the commitment that stands in for a private one.

A segment's model has one of three sources:
- **layers**: a list from the fixed table of layer types (`engine.models.LAYER_TYPES`);
- **torchvision**: a preset, `{torchvision: resnet18, cut_after: layer1}`: a slice of a torchvision
  network, from a fixed table of architectures (`TORCHVISION_STAGES`);
- **module**: `{module: "package.module:factory", arguments: {...}}`, the organisation's own code.

The shared deployment holds, per segment, either the public model (layers or a preset; never
`module:`, which names code) or only a commitment `{commitment: sha256:HEX, parameters: N}`. A
private segment's model lives in its owner's peer config (`segments.NAME.model`) with a `salt`.
The commitment is the SHA-256 of the canonical JSON of the segment's *architecture document*
(`architecture_document`): the source as configured, the salt, the parameter count and the name,
shape and dtype of every state entry. The owner's engine builds the module, makes the document and
refuses to start unless its commitment is the deployment's; the document is what the owner hands
an auditor, who recomputes the commitment with `segment_commitment` (this module imports no torch).

Code is imported only from a peer's own config: `segment_sources` is the one place that turns a
`module:` entry into a `SegmentSource`, and it reads it from the `PeerConfig` alone. A deployment
naming `module:` is refused when loaded; nothing a counterparty sends names a model.
"""

from __future__ import annotations

import dataclasses
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from secure_split.canonical import canonical_json, sha256_hex
from secure_split.errors import ConfigError, ConfigProblem

if TYPE_CHECKING:
    from secure_split.config import Deployment, DeploymentSpec, PeerConfig
    from secure_split.yamlfile import YamlDocument

__all__ = [
    "ARCHITECTURE_FORMAT",
    "COMMITMENT_RE",
    "SALT_RE",
    "TORCHVISION_STAGES",
    "SegmentSource",
    "SourceKind",
    "architecture_document",
    "commitment_problems",
    "deployment_model_problems",
    "model_problems",
    "peer_config_source",
    "public_model_digest",
    "public_sources",
    "segment_commitment",
    "segment_sources",
    "source_kind",
    "torchvision_spec",
]

ARCHITECTURE_FORMAT = 1
COMMITMENT_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
SALT_RE = re.compile(r"^[0-9a-f]{32,128}$")
MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")
_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_CUT_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}(\.[0-9]{1,4})?$")

SourceKind = Literal["layers", "torchvision", "module"]

_RESNET = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "flatten", "fc")
_FEATURES = ("features", "avgpool", "flatten", "classifier")
TORCHVISION_STAGES: Mapping[str, tuple[str, ...]] = {
    **{n: _RESNET for n in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
                            "wide_resnet50_2")},
    **{n: _FEATURES for n in ("vgg11", "vgg11_bn", "vgg16", "vgg16_bn", "mobilenet_v3_small",
                              "mobilenet_v3_large", "efficientnet_b0")},
}
"""The torchvision architectures a preset may name, with the stages their forward pass runs in
order (`flatten` is the `torch.flatten(x, 1)` of their forward). A cut names a stage, or a child
of a sequential stage as `STAGE.N` (`layer2.0`: the first block of layer2)."""

_TORCHVISION_KEYS = ("torchvision", "cut_after", "start_after", "num_classes", "stem")
_MODULE_KEYS = ("module", "arguments", "path")
MAX_ARGUMENT_DEPTH = 4


def deployment_model_problems(doc: YamlDocument, spec: DeploymentSpec) -> list[ConfigProblem]:
    """The deployment's models: each segment has a public model (layers or a preset, never `module:`)
    or a commitment with its parameter count; an edge touching a private segment has an interface.

    Returns:
        One problem per finding, with key and line.
    """
    problems: list[ConfigProblem] = []
    private = set()
    for sname, seg in spec.segments.items():
        where = ("segments", sname)
        if seg.model is None and seg.commitment is None:
            problems.append(doc.problem(where, "give the segment's model, or (for a private model) its "
                                               "commitment and parameters"))
        elif seg.model is not None and seg.commitment is not None:
            problems.append(doc.problem((*where, "commitment"), "a segment has a public model or a commitment, "
                                                                "not both"))
        elif seg.model is not None:
            problems.extend(doc.problem((*where, "model"), m) for m in model_problems(seg.model, in_deployment=True))
            if seg.parameters is not None:
                problems.append(doc.problem((*where, "parameters"), "parameters goes with a commitment"))
        else:
            private.add(sname)
            if not COMMITMENT_RE.match(seg.commitment or ""):
                problems.append(doc.problem((*where, "commitment"), "expected sha256: and 64 hex digits, as "
                                                                    "`secure-split model describe` prints it"))
            if seg.parameters is None:
                problems.append(doc.problem((*where, "parameters"), "a commitment needs the parameter count"))
    for i, e in enumerate(spec.edges):
        hidden = sorted({e.from_, e.to} & private)
        if hidden and e.interface is None:
            problems.append(doc.problem(("edges", i), f"edge {e.name} touches the private segment(s) {hidden}: give "
                                                      "its interface ({shape: [...], dtype: float32}), which both "
                                                      "sides check"))
    return problems


def source_kind(model: object) -> SourceKind | None:
    """The source a `model:` value names: a list is layers, a mapping with `torchvision` or
    `module` a preset or own code; None for anything else."""
    if isinstance(model, list):
        return "layers"
    if isinstance(model, Mapping):
        if "torchvision" in model:
            return "torchvision"
        if "module" in model:
            return "module"
    return None


def torchvision_spec(model: Mapping[str, Any]) -> dict[str, Any]:
    """A (valid) preset with its defaults filled in: num_classes 1000, stem imagenet, no cuts."""
    return {
        "torchvision": model["torchvision"],
        "cut_after": model.get("cut_after"),
        "start_after": model.get("start_after"),
        "num_classes": model.get("num_classes", 1000),
        "stem": model.get("stem", "imagenet"),
    }


def _torchvision_problems(model: Mapping[str, Any]) -> list[str]:
    problems = [f"unknown key {k!r} in a torchvision preset; expected {', '.join(_TORCHVISION_KEYS)}"
                for k in model if k not in _TORCHVISION_KEYS]
    name = model.get("torchvision")
    stages = TORCHVISION_STAGES.get(name) if isinstance(name, str) else None
    if stages is None:
        problems.append(f"torchvision: {name!r} is not a supported architecture; expected one of "
                        f"{', '.join(TORCHVISION_STAGES)}")
    positions: dict[str, int] = {}
    for key in ("start_after", "cut_after"):
        cut = model.get(key)
        if cut is None:
            continue
        if not isinstance(cut, str) or not _CUT_RE.match(cut):
            problems.append(f"{key}: expected a stage name such as layer1 (or layer1.0), got {cut!r}")
        elif stages is not None:
            stage = cut.split(".")[0]
            if stage not in stages:
                problems.append(f"{key}: {name} has no stage {stage!r}; its stages are {', '.join(stages)}")
            else:
                positions[key] = stages.index(stage) * 10_000 + int(cut.split(".")[1] if "." in cut else 9_999)
    if len(positions) == 2 and positions["start_after"] >= positions["cut_after"]:
        problems.append("start_after must come before cut_after in the network (the segment would be empty)")
    classes = model.get("num_classes", 1000)
    if not isinstance(classes, int) or isinstance(classes, bool) or not 1 <= classes <= 2**20:
        problems.append(f"num_classes: expected an integer in 1..{2**20}, got {classes!r}")
    stem = model.get("stem", "imagenet")
    if stem not in ("imagenet", "cifar"):
        problems.append(f"stem: expected imagenet or cifar, got {stem!r}")
    elif stem == "cifar" and stages is not None and stages != _RESNET:
        problems.append("stem: cifar (3x3 first convolution, no max-pool) is for the ResNet family")
    return problems


def _argument_problem(value: object, depth: int = 0) -> str | None:
    if depth > MAX_ARGUMENT_DEPTH:
        return f"arguments are nested more than {MAX_ARGUMENT_DEPTH} deep"
    if value is None or isinstance(value, bool | int | float | str):
        return None
    if isinstance(value, list):
        return next((p for v in value if (p := _argument_problem(v, depth + 1))), None)
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            return "argument keys must be strings"
        return next((p for v in value.values() if (p := _argument_problem(v, depth + 1))), None)
    return f"arguments hold plain values only (numbers, strings, lists, mappings), got {type(value).__name__}"


def _module_problems(model: Mapping[str, Any]) -> list[str]:
    problems = [f"unknown key {k!r} next to module:; expected {', '.join(_MODULE_KEYS)}"
                for k in model if k not in _MODULE_KEYS]
    target = model.get("module")
    if not isinstance(target, str) or not MODULE_RE.match(target):
        problems.append(f"module: expected \"package.module:factory\", got {target!r}")
    args = model.get("arguments", {})
    if not isinstance(args, Mapping):
        problems.append("arguments: expected a mapping of keyword arguments for the factory")
    else:
        bad = [k for k in args if not isinstance(k, str) or not _IDENT_RE.match(k)]
        if bad:
            problems.append(f"arguments: {bad} are not keyword argument names")
        problem = _argument_problem(args)
        if problem:
            problems.append(f"arguments: {problem}")
    path = model.get("path")
    if path is not None and (not isinstance(path, str) or not path):
        problems.append("path: expected a folder (relative to this peer config) to import the module from")
    return problems


def model_problems(model: object, *, in_deployment: bool) -> list[str]:
    """What is wrong with a `model:` value as far as can be told without torch.

    Layer lists are checked by the engine (`engine.models.validate_layers`); this checks presets
    and `module:` entries, and refuses `module:` in the shared deployment.

    Args:
        model: the value of `model:`.
        in_deployment: True for the shared deployment, False for a peer config.

    Returns:
        One message per problem; empty when nothing is wrong.
    """
    kind = source_kind(model)
    if kind is None:
        return ["expected a layer list, a torchvision preset {torchvision: resnet18, cut_after: layer1} or "
                "(in a peer config only) {module: \"package.module:factory\"}"]
    if kind == "layers":
        return [] if model else ["a segment's model needs at least one layer"]
    assert isinstance(model, Mapping)
    if kind == "module" and in_deployment:
        return ["module: names code to import, and the shared deployment may not name code: describe the model "
                "in the owner's peer config (segments.NAME.model) and put only its commitment here "
                "({commitment: ..., parameters: ...}; `secure-split model describe` prints both)"]
    return _torchvision_problems(model) if kind == "torchvision" else _module_problems(model)


@dataclass(frozen=True)
class SegmentSource:
    """A segment's model as one peer resolved it: what to build, and what it must match.

    Attributes:
        segment: the segment's name.
        kind: "layers", "torchvision" or "module".
        model: the layer list or the preset / module mapping.
        private: True when the deployment holds only a commitment.
        origin: the file that described the model (deployment or peer config).
        salt: the private architecture's salt (peer config), else None.
        weights: a local safetensors file of initial weights (peer config), else None.
        commitment: the deployment's commitment for a private segment, else None.
        parameters: the deployment's parameter count for a private segment, else None.
    """

    segment: str
    kind: SourceKind
    model: Any
    private: bool
    origin: Path
    salt: str | None = None
    weights: Path | None = None
    commitment: str | None = None
    parameters: int | None = None


def public_sources(deployment: Deployment) -> dict[str, SegmentSource]:
    """The sources of every segment whose model the deployment publishes.

    Returns:
        segment -> source, for segments with a public `model:` (private ones are left out).
    """
    out = {}
    for name, seg in deployment.spec.segments.items():
        kind = source_kind(seg.model)
        if seg.model is not None and kind is not None and kind != "module":
            out[name] = SegmentSource(name, kind, seg.model, private=False, origin=deployment.path)
    return out


def peer_config_source(peer_config: PeerConfig, segment: str) -> SegmentSource:
    """The private model a peer config describes for `segment` (no deployment needed: this is
    what `secure-split model describe` commits to before the deployment names the commitment).

    Returns:
        A private source without commitment or parameters (`segment_sources` adds the
        deployment's).

    Raises:
        ConfigError: the peer config has no model or no salt for the segment.
    """
    file = str(peer_config.path)
    entry = peer_config.spec.segments.get(segment)
    if entry is None or entry.model is None:
        raise ConfigError(ConfigProblem(file, f"segments.{segment}.model", f"the deployment holds only a commitment "
                                        f"for segment '{segment}': describe its model here (a layer list, a "
                                        "torchvision preset or {module: \"package.module:factory\"})"))
    if entry.salt is None:
        raise ConfigError(ConfigProblem(file, f"segments.{segment}.salt", "a private model needs a salt (32 to 128 "
                                        f"hex digits, e.g. {secrets.token_hex(16)}) so that its commitment does not "
                                        "give it away to anyone who guesses the architecture"))
    kind = source_kind(entry.model)
    assert kind is not None  # load_peer_config checked it
    weights = (peer_config.path.parent / entry.weights).resolve() if entry.weights else None
    return SegmentSource(segment, kind, entry.model, private=True, origin=peer_config.path, salt=entry.salt,
                         weights=weights)


def segment_sources(deployment: Deployment, peer_config: PeerConfig) -> dict[str, SegmentSource]:
    """Resolve the model of each of a peer's segments from the deployment and its own peer config.

    A public segment's model comes from the deployment (the peer config may add `weights:`); a
    private one's from `segments.NAME.model` of the peer config, with its `salt`, checked later
    against the deployment's commitment by the engine (which builds it).

    Args:
        deployment: the loaded deployment.
        peer_config: this peer's loaded config.

    Returns:
        segment -> source, for every segment of this peer.

    Raises:
        ConfigError: listing every problem: a private segment without a model or salt in the peer
            config, a model given for a segment the deployment publishes, or an entry for a segment
            that is not this peer's.
    """
    me = peer_config.name
    file = str(peer_config.path)
    base = peer_config.path.parent
    local = peer_config.spec.segments
    problems: list[ConfigProblem] = []
    out: dict[str, SegmentSource] = {}
    mine = deployment.segments_of(me)
    for name in local:
        if name not in mine:
            problems.append(ConfigProblem(file, f"segments.{name}", f"'{name}' is not a segment of peer '{me}' in "
                                          f"deployment {deployment.path.name} (its segments: {mine or 'none'})"))
    public = public_sources(deployment)
    for name in mine:
        seg = deployment.spec.segments[name]
        entry = local.get(name)
        weights = (base / entry.weights).resolve() if entry is not None and entry.weights else None
        if name in public:
            if entry is not None and entry.model is not None:
                problems.append(ConfigProblem(file, f"segments.{name}.model", "the deployment publishes this "
                                              "segment's model; remove it here, or replace it in the deployment "
                                              "by its commitment to keep it private"))
            if entry is not None and entry.salt is not None:
                problems.append(ConfigProblem(file, f"segments.{name}.salt", "a salt is for a private model; "
                                              "this segment's model is public"))
            out[name] = SegmentSource(name, public[name].kind, seg.model, private=False,
                                      origin=deployment.path, weights=weights)
            continue
        try:
            source = peer_config_source(peer_config, name)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        out[name] = dataclasses.replace(source, commitment=seg.commitment, parameters=seg.parameters)
    if problems:
        raise ConfigError(problems)
    return out


def _described_model(source: SegmentSource) -> Any:
    if source.kind == "torchvision":
        return torchvision_spec(source.model)
    if source.kind == "module":
        # path: is where this host finds the code, not part of what the code is.
        return {"module": source.model["module"], "arguments": dict(source.model.get("arguments", {}))}
    return source.model


def architecture_document(
    source: SegmentSource, *, parameters: int, state: Sequence[tuple[str, Sequence[int], str]]
) -> dict[str, Any]:
    """The canonical description of a segment's architecture that its commitment hashes.

    Args:
        source: the segment's source (its salt is included; the segment's name and any weights
            file are not: owners of one model in a horizontal schedule share a commitment).
        parameters: the number of trainable and frozen parameters (sum of `numel`).
        state: (name, shape, dtype) of every state_dict entry, in state_dict order.

    Returns:
        A JSON-able mapping: format, source kind, model, salt, parameters, state.
    """
    return {
        "format": ARCHITECTURE_FORMAT,
        "source": source.kind,
        "model": _described_model(source),
        "salt": source.salt,
        "parameters": int(parameters),
        "state": [[str(n), [int(d) for d in shape], str(dtype)] for n, shape, dtype in state],
    }


def segment_commitment(document: Mapping[str, Any]) -> str:
    """The commitment to an architecture document: "sha256:" + SHA-256 of its canonical JSON.

    Raises:
        TypeError, ValueError: the document is not canonical-JSON-able.
    """
    return "sha256:" + sha256_hex(canonical_json(document))


def public_model_digest(model: Any) -> str:
    """What a peer records for a public segment in place of a commitment: "sha256:" + SHA-256 of
    the canonical JSON of {"format", "public_model"}; anyone recomputes it from the deployment."""
    return "sha256:" + sha256_hex(canonical_json({"format": ARCHITECTURE_FORMAT, "public_model": model}))


def commitment_problems(document: Mapping[str, Any], commitment: str, parameters: int) -> list[str]:
    """Check an architecture document against a deployment's commitment and parameter count.

    What an auditor runs on the document an owner hands over (no torch needed).

    Returns:
        One message per mismatch; empty when the document is the committed one.
    """
    problems = []
    try:
        got = segment_commitment(document)
    except (TypeError, ValueError) as exc:
        return [f"the architecture document is not canonical JSON: {exc}"]
    if got != commitment:
        problems.append(f"the document hashes to {got}, the deployment commits to {commitment}")
    if document.get("parameters") != parameters:
        problems.append(f"the document counts {document.get('parameters')!r} parameters, the deployment {parameters}")
    return problems
