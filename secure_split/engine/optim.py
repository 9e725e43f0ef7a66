"""Adam and SGD as small classes over torch's own functional steps, without `torch.optim.Optimizer`.

Why not `torch.optim.Adam`: in torch 2.13 the `Optimizer` base class wraps `add_param_group`,
`zero_grad`, `state_dict` and `step` in `torch._disable_dynamo`, whose first call imports
`torch._dynamo` (measured: 1.9 s of CPU and about 70 MiB of RSS in a peer process whose
`import torch` takes 2.0 s). A peer never compiles anything, so every peer start, restart and
rejoin paid that for nothing.

What is the same: the arithmetic. `step()` calls `torch.optim.adam.adam` / `torch.optim.sgd.sgd`,
the functions `torch.optim.Adam.step` and `torch.optim.SGD.step` call, with the same arguments
(`foreach`/`fused` left to torch's default, i.e. the single-tensor kernels on the CPU), under
`torch.no_grad()`; parameters without a gradient are skipped and state is created lazily, as
there. So the weights are bit-identical to `torch.optim`'s (tests/unit/engine/test_optim.py holds
that, and the state_dict format, which checkpoints store, is torch's).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim.adam import adam as _adam
from torch.optim.sgd import sgd as _sgd

__all__ = ["Adam", "Sgd", "StepOptimizer"]


class StepOptimizer:
    """One parameter group; `state_dict()` / `load_state_dict()` in `torch.optim`'s format."""

    kind = ""
    state_keys: tuple[str, ...] = ()

    def __init__(self, params: Sequence[nn.Parameter], group: dict[str, Any]) -> None:
        self.params = list(params)
        if not self.params:
            raise ValueError("an optimizer needs at least one parameter")
        if len({id(p) for p in self.params}) != len(self.params):
            raise ValueError("a parameter appears twice in the optimizer's list")
        self.group = group
        self.state: dict[int, dict[str, Any]] = {}  # parameter index -> its state

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_()
                p.grad.zero_()

    def step(self) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {
            "state": {i: dict(s) for i, s in sorted(self.state.items())},
            "param_groups": [{**self.group, "params": list(range(len(self.params)))}],
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Replace the state; every entry is checked before anything changes.

        Raises:
            ValueError: an index, key, shape or value that does not fit.
        """
        self.state = self.checked_state(state_dict)

    def checked_state(self, state_dict: Mapping[str, Any]) -> dict[int, dict[str, Any]]:
        """The state `load_state_dict` would adopt, checked, without adopting it (so a caller
        can refuse a whole checkpoint before it changes anything).

        Per parameter: exactly this optimizer's keys (`required_keys`), tensors of the
        parameter's shape with finite values (Adam's second moment not negative), a step count
        that is a whole number >= 0. A state a step would crash on, or turn the weights into
        NaN with, is refused here.

        Raises:
            ValueError: naming the parameter index and key.
        """
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or len(groups) != 1 or not isinstance(groups[0], Mapping):
            raise ValueError("expected exactly one parameter group")
        saved = groups[0].get("params", ())
        if not isinstance(saved, list | tuple) or len(saved) != len(self.params):
            count = len(saved) if isinstance(saved, list | tuple) else type(saved).__name__
            raise ValueError(f"the saved group has {count} parameters, this optimizer has {len(self.params)}")
        entries = state_dict.get("state", {})
        if not isinstance(entries, Mapping):
            raise ValueError("state must be a mapping of parameter index to entries")
        new: dict[int, dict[str, Any]] = {}
        needed = set(self.required_keys())
        for idx, entry in entries.items():
            if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx < len(self.params):
                raise ValueError(f"state for parameter index {idx!r}, which does not exist")
            if not isinstance(entry, Mapping):
                raise ValueError(f"state of parameter {idx} is not a mapping")
            p = self.params[idx]
            unknown = set(entry) - set(self.state_keys)
            if unknown:
                raise ValueError(f"unknown {self.kind} state keys for parameter {idx}: {sorted(unknown)}")
            missing = needed - set(entry)
            if missing:
                raise ValueError(f"{self.kind} state of parameter {idx} lacks {sorted(missing)}")
            out: dict[str, Any] = {}
            for key, value in entry.items():
                if key == "step":
                    step = torch.as_tensor(value, dtype=torch.float32).detach().clone()
                    if step.numel() != 1 or not bool(torch.isfinite(step).all()) or float(step) < 0 \
                            or float(step) != int(float(step)):
                        raise ValueError(f"step of parameter {idx} must be a whole number >= 0")
                    out[key] = step.reshape(())
                    continue
                if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(p.shape):
                    shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                    raise ValueError(f"{key} of parameter {idx}: expected shape {list(p.shape)}, got {shape}")
                if not value.is_floating_point() or not bool(torch.isfinite(value).all()):
                    raise ValueError(f"{key} of parameter {idx} must hold finite floating-point values")
                if key == "exp_avg_sq" and bool((value < 0).any()):
                    raise ValueError(f"{key} of parameter {idx} has negative values (a second moment cannot)")
                out[key] = value.detach().to(dtype=p.dtype, device=p.device, copy=True)
            new[idx] = out
        return new

    def required_keys(self) -> tuple[str, ...]:
        """The keys every parameter's state entry holds once it has one."""
        return self.state_keys


class Adam(StepOptimizer):
    kind = "adam"
    state_keys = ("step", "exp_avg", "exp_avg_sq")

    def __init__(self, params: Sequence[nn.Parameter], *, lr: float, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        super().__init__(params, {
            "lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "amsgrad": False,
            "maximize": False, "foreach": None, "capturable": False, "differentiable": False,
            "fused": None, "decoupled_weight_decay": False,
        })

    def step(self) -> None:
        g = self.group
        params: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        avgs: list[torch.Tensor] = []
        sqs: list[torch.Tensor] = []
        steps: list[torch.Tensor] = []
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            st = self.state.get(i)
            if st is None:
                st = self.state[i] = {
                    "step": torch.tensor(0.0, dtype=torch.float32),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }
            params.append(p)
            grads.append(p.grad)
            avgs.append(st["exp_avg"])
            sqs.append(st["exp_avg_sq"])
            steps.append(st["step"])
        if not params:
            return
        beta1, beta2 = g["betas"]
        with torch.no_grad():
            _adam(params, grads, avgs, sqs, [], steps, amsgrad=False,
                  has_complex=any(torch.is_complex(p) for p in params), beta1=beta1, beta2=beta2,
                  lr=g["lr"], weight_decay=g["weight_decay"], eps=g["eps"], maximize=False, foreach=None,
                  capturable=False, differentiable=False, fused=None, grad_scale=None, found_inf=None,
                  decoupled_weight_decay=False)


class Sgd(StepOptimizer):
    kind = "sgd"
    state_keys = ("momentum_buffer",)

    def required_keys(self) -> tuple[str, ...]:
        return self.state_keys if self.group["momentum"] != 0 else ()

    def __init__(self, params: Sequence[nn.Parameter], *, lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, {
            "lr": lr, "momentum": momentum, "dampening": 0, "weight_decay": weight_decay,
            "nesterov": False, "maximize": False, "foreach": None, "differentiable": False, "fused": None,
        })

    def step(self) -> None:
        g = self.group
        idx = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not idx:
            return
        params: list[torch.Tensor] = [self.params[i] for i in idx]
        grads: list[torch.Tensor] = [p.grad for p in params if p.grad is not None]
        buffers: list[torch.Tensor | None] = (
            [self.state.get(i, {}).get("momentum_buffer") for i in idx] if g["momentum"] != 0 else []
        )
        with torch.no_grad():
            _sgd(params, grads, buffers, weight_decay=g["weight_decay"], momentum=g["momentum"], lr=g["lr"],
                 dampening=g["dampening"], nesterov=False, maximize=False,
                 has_sparse_grad=any(gr.is_sparse for gr in grads), foreach=None, fused=None,
                 grad_scale=None, found_inf=None)
        if g["momentum"] != 0:
            for i, buf in zip(idx, buffers, strict=True):
                self.state.setdefault(i, {})["momentum_buffer"] = buf
