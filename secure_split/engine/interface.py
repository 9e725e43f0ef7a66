"""An edge's interface (per-sample shape, wire dtype, value bounds), checked on both sides of the cut.

Where one side's model is private the deployment pins what crosses the edge instead of the
architecture (`EdgeSpec.interface`). The sender conforms what it sends (`outbound`: the shape
must be the interface's, activations are clamped to the bounds after any protection noise, and
the tensor is cast to the wire dtype); the receiver refuses anything else (`inbound_problem`). At
construction the executor runs each segment once on a sample of its inputs (`trial_outputs`) so
that a model that cannot produce its interface is a configuration error before the first step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch
from torch import nn

from secure_split.config import EdgeSpec, InterfaceSpec
from secure_split.errors import TrainingError

__all__ = ["WIRE_DTYPES", "inbound_problem", "outbound", "trial_outputs"]

WIRE_DTYPES: Mapping[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16,
}


def outbound(edge: EdgeSpec, t: torch.Tensor, kind: Literal["activation", "gradient"]) -> torch.Tensor:
    """Conform a tensor this peer sends on `edge` to its interface (unchanged without one).

    Raises:
        TrainingError: this peer's segment produced another per-sample shape than agreed.
    """
    spec = edge.interface
    if spec is None:
        return t
    if list(t.shape[1:]) != spec.shape:
        raise TrainingError(f"{kind} on edge {edge.name} has per-sample shape {list(t.shape[1:])}, but the "
                            f"deployment's interface of the edge is {spec.shape}")
    if kind == "activation" and spec.bounds is not None:
        t = t.clamp(spec.bounds[0], spec.bounds[1])
    return t.to(WIRE_DTYPES[spec.dtype]).contiguous()


def inbound_problem(edge: EdgeSpec, t: torch.Tensor, kind: Literal["activation", "gradient"]) -> str | None:
    """Why a tensor received on `edge` breaks its interface, or None (also None without one)."""
    spec = edge.interface
    if spec is None:
        return None
    if t.dtype != WIRE_DTYPES[spec.dtype]:
        return f"{kind} on edge {edge.name} has dtype {str(t.dtype).removeprefix('torch.')}, the interface {spec.dtype}"
    if list(t.shape[1:]) != spec.shape:
        return f"{kind} on edge {edge.name} has per-sample shape {list(t.shape[1:])}, the interface {spec.shape}"
    if kind == "activation" and spec.bounds is not None and t.numel():
        low, high = float(t.min()), float(t.max())
        if low < spec.bounds[0] or high > spec.bounds[1]:
            return (f"activation on edge {edge.name} holds values in [{low:.6g}, {high:.6g}], outside the "
                    f"interface's bounds {list(spec.bounds)}")
    return None


def _sample(spec: InterfaceSpec, rows: int) -> torch.Tensor:
    return torch.zeros(rows, *spec.shape)


def trial_outputs(
    order: Sequence[str],
    modules: Mapping[str, nn.Module],
    inputs: Callable[[str, Mapping[str, torch.Tensor]], torch.Tensor | None],
    out_edges: Mapping[str, Sequence[EdgeSpec]],
    *,
    rows: int = 2,
) -> dict[str, str]:
    """Run each segment once, in eval mode and without gradients, on a sample of its inputs.

    Args:
        order: the segments, producers before consumers.
        modules: segment -> module (left in the mode it was in).
        inputs: (segment, outputs so far) -> its input sample, or None when unknown (then it and
            what depends on it only are skipped).
        out_edges: segment -> its out-edges (their interfaces are checked).
        rows: sample rows.

    Returns:
        segment -> the problem, for segments that cannot run or miss an interface; empty if none.
    """
    problems: dict[str, str] = {}
    outputs: dict[str, torch.Tensor] = {}
    for seg in order:
        x = inputs(seg, outputs)
        if x is None:
            continue
        module = modules[seg]
        was_training = module.training
        try:
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                module.eval()
                param = next(module.parameters(), None)
                y = module(x.to(param.device) if param is not None else x)
        except Exception as exc:  # any failure of the model on its input is the finding
            problems[seg] = f"cannot run on its input (per sample {list(x.shape[1:])}): {type(exc).__name__}: {exc}"
            continue
        finally:
            module.train(was_training)
        if not isinstance(y, torch.Tensor):
            problems[seg] = f"returns {type(y).__name__}, not a tensor"
            continue
        outputs[seg] = y.detach().to("cpu", torch.float32)
        for e in out_edges.get(seg, ()):
            if e.interface is not None and list(y.shape[1:]) != e.interface.shape:
                problems[seg] = (f"outputs per-sample shape {list(y.shape[1:])}, but the interface of edge "
                                 f"{e.name} is {e.interface.shape}")
    return problems


def interface_sample(edge: EdgeSpec, rows: int = 2) -> torch.Tensor | None:
    """A zero sample of what crosses `edge` (float32), or None without an interface."""
    return None if edge.interface is None else _sample(edge.interface, rows)
