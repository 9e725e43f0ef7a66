"""Build a segment's torch module from the layer list in the deployment YAML.

A segment is written as a list of one-key mappings, layer type -> parameters:

    [{conv2d: {in: 1, out: 16, kernel: 3, padding: 1}}, {relu: {}}, {maxpool2d: {kernel: 2}},
     {flatten: {}}, {linear: {in: 256, out: 64}}]

The layer types form a fixed table (`LAYER_TYPES`); a name outside it is an error, never a
lookup on `torch.nn` (the deployment comes from another organisation). `validate_layers` reports
every problem of a list at once; `build_segment` builds under a given seed so that every party,
and the centralised baseline, initialise a segment identically (`derive_seed`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from secure_split.config import horizontal_owners
from secure_split.engine.layers import (
    ColumnEmbedding,
    PositionalEmbedding,
    Recurrent,
    Reshape,
    Residual,
    SequencePool,
    TokenEmbedding,
)
from secure_split.errors import ConfigError, ConfigProblem

__all__ = [
    "LAYER_TYPES",
    "MAX_NESTING",
    "MAX_SEGMENT_PARAMETERS",
    "InputShape",
    "Reshape",
    "build_segment",
    "derive_seed",
    "input_shape",
    "validate_layers",
]

# Config integers above this are typos or attacks, not models we train on CPU.
MAX_INT = 2**24
# A segment bigger than this (1 GiB of float32) is refused before anything is allocated.
MAX_SEGMENT_PARAMETERS = 2**28

# A residual block nests a layer list; deeper than this is a typo or an attack on the validator.
MAX_NESTING = 4

ParamKind = Literal[
    "int", "size", "padding", "prob", "bool", "shape", "dims", "number", "choice", "ints", "indices", "layers"
]


@dataclass(frozen=True)
class _Param:
    kind: ParamKind
    required: bool = False
    default: Any = None
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class _LayerType:
    params: Mapping[str, _Param]
    build: Callable[[dict[str, Any]], nn.Module]
    # Parameter count estimate from the (valid) parameters, to bound a segment before building.
    size: Callable[[dict[str, Any]], int] = field(default=lambda p: 0)
    # What the parameters cannot say one by one (e.g. "dim must divide by heads"), or None.
    check: Callable[[dict[str, Any]], str | None] = field(default=lambda p: None)


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _conv_size(p: dict[str, Any]) -> int:
    kh, kw = _pair(p["kernel"])
    return int(p["in"]) * int(p["out"]) * kh * kw + int(p["out"])


_NONE: Mapping[str, _Param] = {}
_CONV: Mapping[str, _Param] = {
    "in": _Param("int", required=True),
    "out": _Param("int", required=True),
    "kernel": _Param("size", required=True),
    "stride": _Param("size", default=1),
    "padding": _Param("padding", default=0),
    "bias": _Param("bool", default=True),
}
_POOL: Mapping[str, _Param] = {
    "kernel": _Param("size", required=True),
    "stride": _Param("size"),  # default: the kernel size, as in torch
    "padding": _Param("padding", default=0),
}

_RNN: Mapping[str, _Param] = {
    "in": _Param("int", required=True),
    "hidden": _Param("int", required=True),
    "layers": _Param("int", default=1),
    "bidirectional": _Param("bool", default=False),
    "dropout": _Param("prob", default=0.0),
    "output": _Param("choice", default="sequence", choices=("sequence", "last")),
}


def _recurrent(kind: Literal["lstm", "gru"], p: dict[str, Any]) -> nn.Module:
    return Recurrent(kind, p["in"], p["hidden"], layers=p["layers"], bidirectional=p["bidirectional"],
                     dropout=p["dropout"], output=p["output"])


def _recurrent_size(gates: int, p: dict[str, Any]) -> int:
    h, d = int(p["hidden"]), 2 if p["bidirectional"] else 1
    first = gates * (int(p["in"]) * h + h * h + 2 * h)
    rest = gates * (d * h * h + h * h + 2 * h)
    return d * (first + (int(p["layers"]) - 1) * rest)


def _transformer_size(dim: int, ff: int) -> int:
    return 4 * dim * dim + 4 * dim + 2 * dim * ff + ff + dim + 4 * dim


def _embedding_problem(p: dict[str, Any]) -> str | None:
    tabular = p["columns"] is not None or p["cardinalities"] is not None
    if (p["num"] is not None) == tabular:
        return ("give num (token ids: every input value is an id) or columns and cardinalities (a table's "
                "categorical columns), not both")
    if tabular and (p["columns"] is None or p["cardinalities"] is None or len(p["columns"]) != len(p["cardinalities"])):
        return "columns and cardinalities are lists of the same length (one cardinality per categorical column)"
    return None


LAYER_TYPES: Mapping[str, _LayerType] = {
    "linear": _LayerType(
        {
            "in": _Param("int", required=True),
            "out": _Param("int", required=True),
            "bias": _Param("bool", default=True),
        },
        lambda p: nn.Linear(p["in"], p["out"], bias=p["bias"]),
        lambda p: int(p["in"]) * int(p["out"]) + int(p["out"]),
    ),
    "conv2d": _LayerType(
        _CONV,
        lambda p: nn.Conv2d(
            p["in"], p["out"], _pair(p["kernel"]), stride=_pair(p["stride"]),
            padding=_pair(p["padding"]), bias=p["bias"],
        ),
        _conv_size,
    ),
    "conv_transpose2d": _LayerType(
        {**_CONV, "output_padding": _Param("padding", default=0)},
        lambda p: nn.ConvTranspose2d(
            p["in"], p["out"], _pair(p["kernel"]), stride=_pair(p["stride"]),
            padding=_pair(p["padding"]), output_padding=_pair(p["output_padding"]), bias=p["bias"],
        ),
        _conv_size,
    ),
    "relu": _LayerType(_NONE, lambda p: nn.ReLU()),
    "leaky_relu": _LayerType({"slope": _Param("number", default=0.01)}, lambda p: nn.LeakyReLU(p["slope"])),
    "tanh": _LayerType(_NONE, lambda p: nn.Tanh()),
    "sigmoid": _LayerType(_NONE, lambda p: nn.Sigmoid()),
    "gelu": _LayerType(_NONE, lambda p: nn.GELU()),
    "identity": _LayerType(_NONE, lambda p: nn.Identity()),
    "flatten": _LayerType(_NONE, lambda p: nn.Flatten(start_dim=1)),
    "maxpool2d": _LayerType(
        _POOL, lambda p: nn.MaxPool2d(_pair(p["kernel"]), stride=_pair(p["stride"] or p["kernel"]),
                                      padding=_pair(p["padding"]))
    ),
    "avgpool2d": _LayerType(
        _POOL, lambda p: nn.AvgPool2d(_pair(p["kernel"]), stride=_pair(p["stride"] or p["kernel"]),
                                      padding=_pair(p["padding"]))
    ),
    "dropout": _LayerType({"p": _Param("prob", default=0.5)}, lambda p: nn.Dropout(p["p"])),
    "batchnorm1d": _LayerType(
        {"features": _Param("int", required=True)}, lambda p: nn.BatchNorm1d(p["features"]),
        lambda p: 4 * int(p["features"]),
    ),
    "batchnorm2d": _LayerType(
        {"features": _Param("int", required=True)}, lambda p: nn.BatchNorm2d(p["features"]),
        lambda p: 4 * int(p["features"]),
    ),
    "layernorm": _LayerType(
        {"shape": _Param("dims", required=True)},
        lambda p: nn.LayerNorm([p["shape"]] if isinstance(p["shape"], int) else list(p["shape"])),
        lambda p: 2 * math.prod([p["shape"]] if isinstance(p["shape"], int) else p["shape"]),
    ),
    "reshape": _LayerType({"shape": _Param("shape", required=True)}, lambda p: Reshape(p["shape"])),
    "upsample": _LayerType(
        {"scale": _Param("number", required=True), "mode": _Param("choice", default="nearest",
                                                                   choices=("nearest", "bilinear"))},
        lambda p: nn.Upsample(scale_factor=float(p["scale"]), mode=p["mode"],
                              align_corners=False if p["mode"] == "bilinear" else None),
    ),
    "residual": _LayerType(
        {"layers": _Param("layers", required=True), "shortcut": _Param("layers")},
        lambda p: Residual(_build_list(p["layers"]), _build_list(p["shortcut"]) if p["shortcut"] else None),
        lambda p: _list_size(p["layers"]) + (_list_size(p["shortcut"]) if p["shortcut"] else 0),
    ),
    "embedding": _LayerType(
        {"dim": _Param("int", required=True), "num": _Param("int"), "columns": _Param("indices"),
         "cardinalities": _Param("ints")},
        lambda p: TokenEmbedding(p["num"], p["dim"]) if p["num"] is not None
        else ColumnEmbedding(p["columns"], p["cardinalities"], p["dim"]),
        lambda p: int(p["dim"]) * (int(p["num"]) if p["num"] is not None else sum(p["cardinalities"])),
        lambda p: _embedding_problem(p),
    ),
    "positional_embedding": _LayerType(
        {"length": _Param("int", required=True), "dim": _Param("int", required=True)},
        lambda p: PositionalEmbedding(p["length"], p["dim"]),
        lambda p: int(p["length"]) * int(p["dim"]),
    ),
    "lstm": _LayerType(_RNN, lambda p: _recurrent("lstm", p), lambda p: _recurrent_size(4, p)),
    "gru": _LayerType(_RNN, lambda p: _recurrent("gru", p), lambda p: _recurrent_size(3, p)),
    "transformer_encoder_layer": _LayerType(
        {"dim": _Param("int", required=True), "heads": _Param("int", required=True),
         "feedforward": _Param("int"), "dropout": _Param("prob", default=0.1),
         "activation": _Param("choice", default="relu", choices=("relu", "gelu")),
         "norm_first": _Param("bool", default=False)},
        lambda p: nn.TransformerEncoderLayer(
            p["dim"], p["heads"], dim_feedforward=p["feedforward"] or 4 * p["dim"], dropout=p["dropout"],
            activation=p["activation"], batch_first=True, norm_first=p["norm_first"],
        ),
        lambda p: _transformer_size(int(p["dim"]), int(p["feedforward"] or 4 * p["dim"])),
        lambda p: None if p["dim"] % p["heads"] == 0 else f"dim {p['dim']} must be a multiple of heads {p['heads']}",
    ),
    "pool_sequence": _LayerType(
        {"how": _Param("choice", default="mean", choices=("mean", "max", "first", "last"))},
        lambda p: SequencePool(p["how"]),
    ),
}
"""The fixed table of layer types a deployment may use, with their parameters in documented order."""


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _param_problem(kind: ParamKind, v: object, spec: _Param) -> str | None:
    """Why `v` is not a valid value of this kind, or None."""
    if kind == "int":
        ok = isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_INT
        return None if ok else f"expected an integer in 1..{MAX_INT}"
    if kind in ("size", "padding"):
        low = 1 if kind == "size" else 0
        items = [v] if _is_int(v) else v if isinstance(v, list) and len(v) == 2 else None
        if items is None or not all(isinstance(x, int) and not isinstance(x, bool) and low <= x <= MAX_INT
                                    for x in items):
            return f"expected an integer >= {low} or a list of two"
        return None
    if kind == "prob":
        ok = isinstance(v, int | float) and not isinstance(v, bool) and 0.0 <= v < 1.0
        return None if ok else "expected a number in [0, 1)"
    if kind == "bool":
        return None if isinstance(v, bool) else "expected true or false"
    if kind == "number":
        ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and 0 < v <= MAX_INT
        return None if ok else "expected a positive number"
    if kind == "choice":
        return None if v in spec.choices else f"expected one of {', '.join(spec.choices)}"
    if kind == "dims":
        items = [v] if _is_int(v) else v if isinstance(v, list) and v else None
        if items is None or not all(isinstance(x, int) and not isinstance(x, bool) and 0 < x <= MAX_INT
                                    for x in items):
            return "expected a positive integer or a list of them"
        return None
    if kind in ("ints", "indices"):
        low = 0 if kind == "indices" else 1
        if not isinstance(v, list) or not v or len(v) > 4096 or not all(
                _is_int(x) and low <= x <= MAX_INT for x in v):
            return f"expected a non-empty list of integers >= {low}"
        if kind == "indices" and len(set(v)) != len(v):
            return "expected each column once"
        return None
    # shape: per-sample target shape, one -1 allowed
    if not isinstance(v, list) or not v or len(v) > 7:
        return "expected a list of 1 to 7 sizes (per sample; one may be -1)"
    if not all(_is_int(x) and (x == -1 or 0 < x <= MAX_INT) for x in v) or v.count(-1) > 1:
        return "expected positive sizes, at most one -1"
    return None


def _layer_params(
    i: int, item: object, problems: list[str], depth: int = 0, prefix: str = ""
) -> tuple[str, dict[str, Any]] | None:
    """Check one layer entry; append its problems; return (type, params with defaults) if valid."""
    at = f"{prefix}layer {i}"
    if not isinstance(item, Mapping) or len(item) != 1:
        problems.append(f"{at}: expected a mapping with exactly one layer type, e.g. {{relu: {{}}}}")
        return None
    ((ltype, raw),) = item.items()
    if not isinstance(ltype, str) or ltype not in LAYER_TYPES:
        problems.append(f"{at}: unknown layer type {ltype!r}; expected one of {', '.join(LAYER_TYPES)}")
        return None
    at = f"{at} ({ltype})"
    spec = LAYER_TYPES[ltype]
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        problems.append(f"{at}: parameters must be a mapping, got {type(raw).__name__}")
        return None
    expected = ", ".join(spec.params) or "no parameters"
    ok = True
    for key in raw:
        if key not in spec.params:
            problems.append(f"{at}: unknown key {key!r}; expected {expected}")
            ok = False
    params: dict[str, Any] = {}
    for key, pspec in spec.params.items():
        if key not in raw or (raw[key] is None and not pspec.required):
            if pspec.required:
                problems.append(f"{at}: missing key {key!r}; expected {expected}")
                ok = False
            params[key] = pspec.default
            continue
        if pspec.kind == "layers":
            nested = _list_problems(raw[key], depth + 1, f"{at}: {key}: ")
            problems.extend(nested)
            ok = ok and not nested
        else:
            problem = _param_problem(pspec.kind, raw[key], pspec)
            if problem:
                problems.append(f"{at}: {key}: {problem}, got {raw[key]!r}")
                ok = False
        params[key] = raw[key]
    if ok:
        problem = spec.check(params)
        if problem:
            problems.append(f"{at}: {problem}")
            ok = False
    return (ltype, params) if ok else None


def _list_problems(layers: object, depth: int = 0, prefix: str = "") -> list[str]:
    if depth > MAX_NESTING:
        return [f"{prefix}residual blocks are nested more than {MAX_NESTING} deep"]
    if not isinstance(layers, list) or not layers:
        return [f"{prefix}a segment's model must be a non-empty list of layers" if not prefix
                else f"{prefix}expected a non-empty list of layers"]
    problems: list[str] = []
    for i, item in enumerate(layers):
        _layer_params(i, item, problems, depth, prefix)
    return problems


def _list_size(layers: Sequence[Mapping[str, Any]]) -> int:
    """Estimated parameter count of a (valid) layer list."""
    total = 0
    for i, item in enumerate(layers):
        checked = _layer_params(i, item, [])
        if checked is not None:
            total += LAYER_TYPES[checked[0]].size(checked[1])
    return total


def validate_layers(layers: object) -> list[str]:
    """Check a segment's layer list against `LAYER_TYPES`; report every problem at once.

    Layers are numbered from 0, as in the YAML list; a problem inside a residual block names
    the path ("layer 2 (residual): layers: layer 0 (conv2d): ...").

    Args:
        layers: the `model:` value from the deployment (anything; it is checked).

    Returns:
        One message per problem, e.g. "layer 3 (conv2d): unknown key 'kernal'; expected in, out,
        kernel, stride, padding, bias". Empty when the list is valid.
    """
    problems = _list_problems(layers)
    if problems:
        return problems
    assert isinstance(layers, list)
    total = _list_size(layers)
    if total > MAX_SEGMENT_PARAMETERS:
        problems.append(
            f"the segment has about {total} parameters, more than {MAX_SEGMENT_PARAMETERS} allowed"
        )
    return problems


def derive_seed(training_seed: int, segment_name: str) -> int:
    """The initialisation seed of one segment, the same at every party and in the baseline.

    Args:
        training_seed: `training.seed` of the deployment.
        segment_name: the segment's name.

    Returns:
        A non-negative 63-bit integer: the first 8 bytes of SHA-256("seed:SEGMENT") (stable across
        Python runs and machines, unlike `hash()`).
    """
    digest = hashlib.sha256(f"{int(training_seed)}:{segment_name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def build_segment(layers: Sequence[Mapping[str, Any]], *, seed: int, name: str = "segment") -> nn.Sequential:
    """Build a segment's module from its layer list, initialised under `seed`.

    The global torch RNG is left untouched (the build runs inside `torch.random.fork_rng`).

    Args:
        layers: the layer list (see the module docstring).
        seed: the initialisation seed, normally `derive_seed(training.seed, name)`.
        name: the segment's name, for error messages.

    Returns:
        A float32 `nn.Sequential` on the CPU, in train mode.

    Raises:
        ConfigError: listing every problem of the layer list.
    """
    problems = validate_layers(layers)
    if problems:
        key = f"segments.{name}.model"
        raise ConfigError([ConfigProblem(file="-", key=key, message=p) for p in problems])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build_list(layers).float()


def _build_list(layers: Sequence[Mapping[str, Any]]) -> nn.Sequential:
    """Build a validated layer list (the caller seeds the RNG)."""
    modules: list[nn.Module] = []
    for i, item in enumerate(layers):
        checked = _layer_params(i, item, [])
        assert checked is not None  # validated by the caller
        modules.append(LAYER_TYPES[checked[0]].build(checked[1]))
    return nn.Sequential(*modules)


@dataclass(frozen=True)
class InputShape:
    """What a segment's first shape-bearing layer needs of one sample (batch dimension excluded).

    Attributes:
        ndim: the number of per-sample dimensions, or None if any.
        sizes: per-sample dimension index (negative counts from the end) -> required size.
        numel: the required number of elements per sample (after a flatten), or None.
    """

    ndim: int | None = None
    sizes: Mapping[int, int] = field(default_factory=dict)
    numel: int | None = None

    def problem(self, sample_shape: Sequence[int]) -> str | None:
        """Say why a per-sample shape does not fit, or None if it does (or nothing is known)."""
        shape = tuple(sample_shape)
        if self.ndim is not None and len(shape) != self.ndim:
            return f"expected {self.ndim} dimension(s) per sample, got shape {list(shape)}"
        for dim, size in self.sizes.items():
            if not -len(shape) <= dim < len(shape):
                return f"expected a dimension {dim} of size {size} per sample, got shape {list(shape)}"
            if shape[dim] != size:
                return f"expected size {size} in per-sample dimension {dim}, got shape {list(shape)}"
        if self.numel is not None and math.prod(shape) != self.numel:
            return f"expected {self.numel} values per sample, got shape {list(shape)} ({math.prod(shape)})"
        return None


_ELEMENTWISE = frozenset({"relu", "leaky_relu", "tanh", "sigmoid", "gelu", "identity", "dropout"})


def input_shape(layers: object) -> InputShape:
    """Derive what a (valid) layer list needs of its input, from its first shape-bearing layer.

    Used to refuse a received tensor with a clear message before running the segment on it.

    Args:
        layers: a layer list that passed `validate_layers` (for any other model source, e.g. a
            torchvision preset, nothing is derived).

    Returns:
        The constraint; an empty `InputShape` when the first layers do not fix one.
    """
    if not isinstance(layers, list):
        return InputShape()
    flattened = False
    for i, item in enumerate(layers):
        checked = _layer_params(i, item, [])
        if checked is None:
            return InputShape()
        ltype, p = checked
        if ltype in _ELEMENTWISE:
            continue
        if ltype == "flatten":
            flattened = True
            continue
        if ltype == "linear":
            return InputShape(numel=p["in"]) if flattened else InputShape(sizes={-1: p["in"]})
        if flattened:
            return InputShape()
        if ltype in ("conv2d", "conv_transpose2d", "batchnorm2d"):
            return InputShape(ndim=3, sizes={0: p["in"] if "in" in p else p["features"]})
        if ltype == "batchnorm1d":
            return InputShape(sizes={0: p["features"]})
        if ltype in ("maxpool2d", "avgpool2d"):
            return InputShape(ndim=3)
        if ltype == "layernorm":
            dims = [p["shape"]] if isinstance(p["shape"], int) else list(p["shape"])
            return InputShape(sizes={d - len(dims): s for d, s in enumerate(dims)})
        if ltype == "reshape" and -1 not in p["shape"]:
            return InputShape(numel=math.prod(p["shape"]))
        if ltype == "residual":
            return input_shape(p["layers"])
        if ltype in ("lstm", "gru"):
            return InputShape(ndim=2, sizes={-1: p["in"]})
        if ltype in ("transformer_encoder_layer", "positional_embedding"):
            return InputShape(ndim=2, sizes={-1: p["dim"]})
        if ltype == "pool_sequence" or (ltype == "embedding" and p["columns"] is not None):
            return InputShape(ndim=2 if ltype == "pool_sequence" else 1)
        return InputShape()
    return InputShape()


def horizontal_seed_names(deployment: Any) -> dict[str, str]:
    """Seed names that make every owner's copy of a model start from the same weights.

    In a horizontal schedule (sequential, splitfed) owner k's i-th segment is seeded as the first
    owner's i-th segment (so the centralised baseline, built with the first owner's names, starts
    from the same weights too). Other segments keep their own names; empty for `sync`.
    """
    owners = horizontal_owners(deployment.spec)
    if not owners:
        return {}
    first = next(iter(owners.values()))
    return {seg: first[i] for segs in owners.values() for i, seg in enumerate(segs) if i < len(first)}
