"""Per-owner communication and computation of split learning and of FedAvg: the formula and the wire.

Two halves, used by `bench/comm_vs_fl.py` and by `tests/unit/bench/test_comm_model.py`:

- **The analytic model** (`Workload`): bytes and FLOPs per data owner per epoch, for D samples
  split evenly among N owners, from the model's cut size A, parameter counts W_bottom and W_total,
  forward FLOPs per sample, batch size b and the codec's per-message header. Pure arithmetic.
- **The measurement** (`LoopbackWire`, `measure_owner_epoch`, `measure_weight_sync`,
  `count_training_flops`): real `Message`s encoded with `secure_split.protocol.encode` and sent
  through real `secure_split.transport.Transport`s (CURVE, ZAP allowlist, sockets on 127.0.0.1);
  bytes are the owner transport's `bytes_sent + bytes_received` (sum of frame sizes: codec header
  frame + raw tensor frames + blob frame; ZMTP framing and CURVE's 16-byte MAC and 8-byte nonce per
  frame are below that counter and not counted). FLOPs come from `torch.utils.flop_counter`.

Per-owner traffic depends only on how many samples the owner holds (D/N), so one representative
owner is measured per N (`mean_over_owners` averages the floor(D/N)- and ceil(D/N)-sample owners
exactly as an even split makes them) instead of running N processes.

The models: `digits_split` (the digits CNN of `secure_split.engine.zoo`) and `resnet18_split` (a
CIFAR ResNet-18, about 11.2 M parameters, written here because torchvision is not installed), cut
at a configurable stage.
"""

from __future__ import annotations

import errno
import hashlib
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from secure_split.crypto.keys import Identity, generate_identity
from secure_split.crypto.seal import open_from, seal_to
from secure_split.engine import zoo
from secure_split.engine.models import build_segment, derive_seed
from secure_split.engine.tensors import from_wire, to_wire
from secure_split.errors import TransportError
from secure_split.protocol import Binding, Kind, Message, decode, encode
from secure_split.scenarios import free_ports
from secure_split.transport import Transport, TransportPeer

__all__ = [
    "FLOAT_BYTES",
    "HEADER_BYTES",
    "RESNET_CUTS",
    "WEIGHTS_HEADER_BYTES",
    "CutTraffic",
    "ForwardFlops",
    "LoopbackWire",
    "Scheme",
    "SplitModel",
    "TensorCache",
    "TrainingFlops",
    "WeightTraffic",
    "Workload",
    "count_training_flops",
    "digits_split",
    "forward_flops",
    "interpolated_crossing",
    "mean_over_owners",
    "measure_owner_epoch",
    "measure_weight_sync",
    "resnet18_split",
    "smallest_owner_count",
    "synthetic_cifar",
    "workload_of",
]

FLOAT_BYTES = 4
"""Activations, gradients and weights travel as float32."""

HEADER_BYTES = 256
"""Nominal codec header (frame 0) of an activation or gradient message.

12-byte prefix + msgpack of the binding (64 hex digits of deployment hash, 16-byte session,
step, seq, two peer names), the edge, the meta and one tensor spec (dtype, shape, nbytes):
measured 240–265 bytes for the names used here. It is < 0.4 % of a digits-CNN activation
message of 64 samples and noise for the ResNet, so a round nominal value is enough.
"""

WEIGHTS_HEADER_BYTES = 264
"""Nominal overhead of one `encrypted_weights` message: codec header (about 224 bytes) plus the
40 bytes a NaCl box adds (24-byte nonce, 16-byte MAC) to the sealed float32 parameters."""

Scheme = Literal["splitfed", "sequential", "vanilla"]
"""How owners share the bottom segment's weights.

- splitfed: every round (epoch) each owner sends its bottom weights to the fed server and gets the
  average back (2 weight messages per owner per epoch).
- sequential: round-robin; each owner receives the bottom weights from the previous owner (sealed
  to it) and hands them to the next (2 weight messages per owner per epoch).
- vanilla: every owner keeps its own bottom; no weight traffic at all.
"""


# ---------------------------------------------------------------------------------------------
# The analytic model
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """Everything the analytic formula needs about one model, dataset and schedule.

    Attributes:
        name: a label for tables and plots.
        samples: D, training samples of the whole federation (split evenly among the owners).
        batch_size: b, samples per step at one owner.
        cut_floats: A, float32 values per sample at the cut (the gradient has the same size).
        bottom_params: W_bottom, parameters of the owner's segment.
        total_params: W_total, parameters of the whole model (what FedAvg ships).
        bottom_forward_flops: F_bottom, forward FLOPs per sample of the bottom segment.
        total_forward_flops: F_total, forward FLOPs per sample of the whole model.
        input_layer_flops: F_in, forward FLOPs per sample of the first weight layer; its backward
            computes only the weight gradient (raw features need no gradient), so it costs one
            forward less than the 2x of every other layer.
        header_bytes: h, codec header of one activation or gradient message.
        weights_header_bytes: h_w, overhead of one weight message (header + sealing).

    Raises:
        ValueError: if a count is not positive or W_bottom > W_total.
    """

    name: str
    samples: int
    batch_size: int
    cut_floats: int
    bottom_params: int
    total_params: int
    bottom_forward_flops: float
    total_forward_flops: float
    input_layer_flops: float
    header_bytes: int = HEADER_BYTES
    weights_header_bytes: int = WEIGHTS_HEADER_BYTES

    def __post_init__(self) -> None:
        positive = ("samples", "batch_size", "cut_floats", "bottom_params", "total_params")
        bad = [f"{k}={getattr(self, k)!r}" for k in positive if getattr(self, k) <= 0]
        if self.bottom_params > self.total_params:
            bad.append(f"bottom_params {self.bottom_params} > total_params {self.total_params}")
        if min(self.header_bytes, self.weights_header_bytes, self.input_layer_flops) < 0:
            bad.append("header sizes and input_layer_flops must be >= 0")
        if bad:
            raise ValueError(f"workload {self.name!r}: " + "; ".join(bad))

    def samples_per_owner(self, owners: float) -> float:
        """D/N: samples one owner holds on average."""
        return self.samples / owners

    def batches_per_owner(self, owners: float) -> int:
        """ceil((D/N)/b): steps one owner runs per epoch (a partial last batch counts)."""
        return math.ceil(self.samples_per_owner(owners) / self.batch_size - 1e-9)

    def cut_bytes(self, owners: float) -> float:
        """Activations sent plus gradients received by one owner per epoch, headers included.

        2·(D/N)·A·4 + 2·ceil((D/N)/b)·h.
        """
        n = self.samples_per_owner(owners)
        return 2 * n * self.cut_floats * FLOAT_BYTES + 2 * self.batches_per_owner(owners) * self.header_bytes

    def weight_sync_bytes(self, scheme: Scheme = "splitfed") -> float:
        """Bottom-weight traffic of one owner per epoch: 2·(W_bottom·4 + h_w), 0 for vanilla."""
        if scheme == "vanilla":
            return 0.0
        return 2 * (self.bottom_params * FLOAT_BYTES + self.weights_header_bytes)

    def split_bytes(self, owners: float, scheme: Scheme = "splitfed") -> float:
        """Bytes one owner sends plus receives per epoch of split learning."""
        return self.cut_bytes(owners) + self.weight_sync_bytes(scheme)

    def fedavg_bytes(self, owners: float | None = None) -> float:
        """Bytes one owner sends plus receives per FedAvg round (= one local epoch).

        2·(W_total·4 + h_w): the global model in, the update out. Independent of N (the argument
        is accepted only so both curves can be called alike).
        """
        del owners
        return 2 * (self.total_params * FLOAT_BYTES + self.weights_header_bytes)

    def split_flops(self, owners: float) -> float:
        """Training FLOPs of one owner per epoch of split learning: (D/N)·(3·F_bottom − F_in)."""
        return self.samples_per_owner(owners) * (3 * self.bottom_forward_flops - self.input_layer_flops)

    def fedavg_flops(self, owners: float) -> float:
        """Training FLOPs of one owner per FedAvg round: (D/N)·(3·F_total − F_in)."""
        return self.samples_per_owner(owners) * (3 * self.total_forward_flops - self.input_layer_flops)

    def crossing_owners(self, scheme: Scheme = "splitfed") -> float | None:
        """N*: the owner count where split and FedAvg bytes per owner are equal.

        Taking ceil((D/N)/b) as (D/N)/b::

            N* = D·(4·A + h/b) / (4·(W_total − W_bottom))          splitfed, sequential
            N* = D·(4·A + h/b) / (4·W_total + h_w)                 vanilla

        Below N* split learning moves more bytes per owner than FedAvg, above it fewer.

        Returns:
            N* (a real number), or None when split never moves fewer bytes (W_bottom = W_total
            with weight sync).
        """
        per_sample = 2 * (self.cut_floats * FLOAT_BYTES + self.header_bytes / self.batch_size)
        gap = self.fedavg_bytes() - self.weight_sync_bytes(scheme)
        if gap <= 0:
            return None
        return self.samples * per_sample / gap

    def crossing_owner_count(self, scheme: Scheme = "splitfed") -> int | None:
        """The smallest whole N in 1..D at which the formula's split bytes <= its FedAvg bytes.

        Unlike `crossing_owners` this keeps whole batches (ceil), which matters when an owner holds
        less than one batch and the byte gap between the two schemes is a few headers wide.

        Returns:
            That N, or None when split learning is not cheaper even at N = D.
        """
        fedavg = self.fedavg_bytes()
        return smallest_owner_count(lambda n: self.split_bytes(n, scheme) <= fedavg, 1, self.samples)

    def flops_ratio(self) -> float:
        """Split over FedAvg FLOPs per owner: (3·F_bottom − F_in)/(3·F_total − F_in), for every N."""
        return (3 * self.bottom_forward_flops - self.input_layer_flops) / (
            3 * self.total_forward_flops - self.input_layer_flops
        )


def mean_over_owners(samples: int, owners: int, per_owner: Callable[[int], float]) -> float:
    """Average a per-owner quantity over an even split of `samples` among `owners`.

    An even split gives `samples mod owners` owners ceil(D/N) samples and the others floor(D/N),
    so the mean needs only those two sample counts (owners with no sample are skipped as
    non-participants; that needs N > D).

    Args:
        samples: D.
        owners: N >= 1.
        per_owner: the quantity for an owner holding that many samples.

    Returns:
        The mean over the N owners (over the owners with samples when N > D).
    """
    if owners < 1:
        raise ValueError(f"owners must be >= 1, got {owners}")
    small, larger = divmod(samples, owners)
    if small == 0:
        return per_owner(1)
    total = (owners - larger) * per_owner(small)
    if larger:
        total += larger * per_owner(small + 1)
    return total / owners


def interpolated_crossing(
    owners: Sequence[float], split: Sequence[float], fedavg: Sequence[float]
) -> tuple[float, float, float] | None:
    """Where two measured curves over N cross, interpolating linearly in 1/N between grid points.

    Per-owner costs are affine in 1/N (c + a·(D/N)), so linear interpolation of split − FedAvg in
    1/N is exact up to the batch rounding; interpolating in log N would not be for nearly flat curves.

    Args:
        owners: increasing owner counts.
        split: split-learning bytes per owner at each count.
        fedavg: FedAvg bytes per owner at each count.

    Returns:
        (N at the crossing, the grid point below, the grid point above) for the first change of
        sign of split − FedAvg; (N, N, N) when they are equal at a grid point; None if the sign
        never changes on the grid (look at the first point to see which side is cheaper).
    """
    gaps = [s - f for s, f in zip(split, fedavg, strict=True)]
    for i in range(len(owners)):
        if gaps[i] == 0:
            return float(owners[i]), float(owners[i]), float(owners[i])
        if i + 1 < len(owners) and gaps[i] * gaps[i + 1] < 0:
            u0, u1 = 1 / owners[i], 1 / owners[i + 1]
            u = u0 + (u1 - u0) * gaps[i] / (gaps[i] - gaps[i + 1])
            return 1 / u, float(owners[i]), float(owners[i + 1])
    return None


def smallest_owner_count(holds: Callable[[int], bool], low: int, high: int) -> int | None:
    """The smallest integer N in [low, high] for which `holds(N)` is true, by bisection.

    `holds` must be monotone (false ... false true ... true) on the interval.

    Returns:
        That N, or None if `holds(high)` is false.
    """
    if not holds(high):
        return None
    if holds(low):
        return low
    while high - low > 1:
        mid = (low + high) // 2
        if holds(mid):
            high = mid
        else:
            low = mid
    return high


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


@dataclass
class SplitModel:
    """A model cut in two: `bottom` at the data owner, `top` (with the loss) at the label holder.

    Attributes:
        name: a label for tables and plots.
        bottom: the owner's segment.
        top: the label holder's segment; its output is the logits.
        sample_shape: shape of one input sample (without the batch dimension).
        classes: number of classes of the cross-entropy loss.
        source: where the layer definitions came from (printed with the results).
    """

    name: str
    bottom: nn.Module
    top: nn.Module
    sample_shape: tuple[int, ...]
    classes: int
    source: str

    def whole(self) -> nn.Module:
        """The uncut model, bottom then top (the same module objects, so the same parameters)."""
        return nn.Sequential(self.bottom, self.top)

    def parameter_counts(self) -> tuple[int, int]:
        """(W_bottom, W_total): trainable parameters of the bottom and of the whole model."""
        bottom = sum(p.numel() for p in self.bottom.parameters() if p.requires_grad)
        top = sum(p.numel() for p in self.top.parameters() if p.requires_grad)
        return bottom, bottom + top

    def cut_floats(self) -> int:
        """A: float32 values per sample at the cut, from a forward pass of one sample."""
        was_training = self.bottom.training
        self.bottom.eval()
        with torch.no_grad():
            out = self.bottom(torch.zeros(1, *self.sample_shape))
        self.bottom.train(was_training)
        return int(out[0].numel())


def digits_split(training_seed: int = 7) -> SplitModel:
    """The digits CNN of the demos, cut between owner and label holder.

    Built from `secure_split.engine.zoo.DIGITS_CNN_BOTTOM` / `DIGITS_CNN_TOP` with
    `engine.models.build_segment`, each segment seeded through `derive_seed` as a deployment would.

    Args:
        training_seed: the deployment's `training.seed`.

    Returns:
        The split model for 1×8×8 inputs and 10 classes.
    """
    return SplitModel(
        name="digits CNN",
        bottom=build_segment(zoo.DIGITS_CNN_BOTTOM, seed=derive_seed(training_seed, "bottom"), name="bottom"),
        top=build_segment(zoo.DIGITS_CNN_TOP, seed=derive_seed(training_seed, "top"), name="top"),
        sample_shape=(1, 8, 8),
        classes=10,
        source="secure_split.engine.zoo.DIGITS_CNN_BOTTOM / DIGITS_CNN_TOP",
    )


class BasicBlock(nn.Module):
    """ResNet basic block: two 3×3 convolutions with batch norm, plus the (projected) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


RESNET_CUTS = ("stem", "layer1", "layer2", "layer3")
"""Where the ResNet-18 may be cut: after the named stage (the owner keeps it and everything before)."""


def _resnet18_stages(classes: int) -> OrderedDict[str, nn.Module]:
    def stage(cin: int, cout: int, stride: int) -> nn.Module:
        return nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1))

    return OrderedDict(
        stem=nn.Sequential(nn.Conv2d(3, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU()),
        layer1=stage(64, 64, 1),
        layer2=stage(64, 128, 2),
        layer3=stage(128, 256, 2),
        layer4=stage(256, 512, 2),
        head=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes)),
    )


def resnet18_split(cut: str = "layer1", *, classes: int = 100, seed: int = 7) -> SplitModel:
    """A CIFAR ResNet-18 (3×3 stem, no max-pool; 11.2 M parameters for 100 classes) cut after `cut`.

    Args:
        cut: one of `RESNET_CUTS`; the owner's bottom is the stem up to and including that stage.
        classes: output classes (100: CIFAR-100, the seed's ResNet bandwidth experiment).
        seed: initialisation seed.

    Returns:
        The split model for 3×32×32 inputs.

    Raises:
        ValueError: for an unknown cut.
    """
    if cut not in RESNET_CUTS:
        raise ValueError(f"unknown ResNet cut {cut!r}; expected one of {', '.join(RESNET_CUTS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        stages = _resnet18_stages(classes)
    names = list(stages)
    split_at = names.index(cut) + 1
    bottom = nn.Sequential(OrderedDict((k, stages[k]) for k in names[:split_at]))
    top = nn.Sequential(OrderedDict((k, stages[k]) for k in names[split_at:]))
    return SplitModel(
        name=f"ResNet-18 (cut after {cut})",
        bottom=bottom,
        top=top,
        sample_shape=(3, 32, 32),
        classes=classes,
        source="bench/_comm_model.py resnet18_split (torch.nn; torchvision is not installed)",
    )


def synthetic_cifar(rows: int, classes: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-shaped synthetic data: `rows` images of 3×32×32 (standard normal) and random labels."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 3, 32, 32, generator=generator)
    y = torch.randint(0, classes, (rows,), generator=generator)
    return x, y


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ForwardFlops:
    """Forward FLOPs per sample computed from layer shapes (the analytic side).

    Attributes:
        total: 2·multiply-adds of every Conv2d and Linear, per sample.
        first_layer: the same for the first Conv2d/Linear that runs (the one that sees raw data).
    """

    total: float
    first_layer: float


def forward_flops(module: nn.Module, sample_shape: Sequence[int]) -> ForwardFlops:
    """Count forward FLOPs per sample from the shapes of the Conv2d and Linear layers.

    Conv2d: 2·(C_in/groups)·k_h·k_w·C_out·H_out·W_out. Linear: 2·in·out. Biases, norms,
    activations and pooling are left out, as `FlopCounterMode` leaves them out.

    Args:
        module: the model or segment (run once on one zero sample, in eval mode, without grad).
        sample_shape: one sample's input shape.

    Returns:
        The total and the first weight layer's share.
    """
    counts: list[float] = []

    def hook(layer: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if isinstance(layer, nn.Conv2d):
            kh, kw = layer.kernel_size
            per_out = 2 * (layer.in_channels // layer.groups) * kh * kw
            counts.append(float(per_out * output[0].numel()))
        elif isinstance(layer, nn.Linear):
            rows = output[0].numel() // layer.out_features  # > 1 only for a Linear over a sequence
            counts.append(float(2 * layer.in_features * layer.out_features * rows))

    layers = [m for m in module.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    handles = [layer.register_forward_hook(hook) for layer in layers]
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            module(torch.zeros(1, *sample_shape))
    finally:
        module.train(was_training)
        for handle in handles:
            handle.remove()
    return ForwardFlops(total=sum(counts), first_layer=counts[0] if counts else 0.0)


@dataclass(frozen=True)
class TrainingFlops:
    """Measured training FLOPs per sample (forward + backward), from `FlopCounterMode`.

    Attributes:
        split_owner: the owner's bottom: forward, then backward from the received gradient.
        fedavg_owner: the whole model: forward, loss, backward.
        batch: the batch the counts were taken on (FLOPs of conv/linear are linear in the batch).
    """

    split_owner: float
    fedavg_owner: float
    batch: int


def count_training_flops(model: SplitModel, x: torch.Tensor, y: torch.Tensor) -> TrainingFlops:
    """Measure forward+backward FLOPs per sample of the bottom and of the whole model on one batch.

    Args:
        model: the split model (train mode; parameter gradients are zeroed afterwards).
        x: an input batch.
        y: its labels.

    Returns:
        FLOPs per sample of one owner's split step and of one owner's FedAvg step.
    """
    rows = x.shape[0]
    with FlopCounterMode(display=False) as counter:
        act = model.bottom(x)
        torch.autograd.backward([act], [torch.ones_like(act) / act.numel()])
    split = counter.get_total_flops()
    whole = model.whole()
    with FlopCounterMode(display=False) as counter:
        torch.autograd.backward([nn.functional.cross_entropy(whole(x), y)])
    fedavg = counter.get_total_flops()
    whole.zero_grad(set_to_none=True)
    return TrainingFlops(split_owner=split / rows, fedavg_owner=fedavg / rows, batch=rows)


def workload_of(model: SplitModel, *, samples: int, batch_size: int, name: str | None = None) -> Workload:
    """The analytic `Workload` of a split model: A, W and F from its layers, headers nominal.

    Args:
        model: the split model.
        samples: D.
        batch_size: b.
        name: label (default: the model's name).

    Returns:
        The workload.
    """
    bottom_params, total_params = model.parameter_counts()
    bottom_f = forward_flops(model.bottom, model.sample_shape)
    total_f = forward_flops(model.whole(), model.sample_shape)
    return Workload(
        name=name or model.name,
        samples=samples,
        batch_size=batch_size,
        cut_floats=model.cut_floats(),
        bottom_params=bottom_params,
        total_params=total_params,
        bottom_forward_flops=bottom_f.total,
        total_forward_flops=total_f.total,
        input_layer_flops=bottom_f.first_layer,
    )


# ---------------------------------------------------------------------------------------------
# The wire: real transports, real codec
# ---------------------------------------------------------------------------------------------

PEER_NAMES = ("owner", "label_holder", "neighbour")
"""The owner measured, the label holder (also the fed server / FedAvg server) and the next owner."""

_START_ATTEMPTS = 6
_DELIVERY_TIMEOUT_S = 60.0


def _free_endpoints(count: int) -> list[str]:
    return [f"tcp://127.0.0.1:{port}" for port in free_ports(count)]


class LoopbackWire:
    """Three peers on 127.0.0.1, each with its real `Transport` (CURVE + ZAP allowlist).

    `deliver` encodes a `Message` with the real codec, sends it on the sender's transport,
    receives it on the receiver's (checking the authenticated sender name) and decodes it. The
    owner's traffic is read from its transport's counters.

    Use as a context manager, or call `close()`.

    Args:
        max_message_bytes: the transports' bound; must exceed the largest message (the whole
            model for FedAvg).
    """

    def __init__(self, *, max_message_bytes: int) -> None:
        self.max_message_bytes = max_message_bytes
        self.identities: dict[str, Identity] = {n: generate_identity(n) for n in PEER_NAMES}
        self.deployment = hashlib.sha256(b"bench/comm_vs_fl.py loopback deployment").hexdigest()
        self.session = os.urandom(16)
        self._seq: dict[tuple[str, str], int] = {}
        self.transports = self._start()

    def _start(self) -> dict[str, Transport]:
        for attempt in range(_START_ATTEMPTS):
            endpoints = dict(zip(PEER_NAMES, _free_endpoints(len(PEER_NAMES)), strict=True))
            directory = {
                n: TransportPeer(n, endpoints[n], self.identities[n].transport_public_z85) for n in PEER_NAMES
            }
            built = {
                n: Transport(
                    n, endpoints[n], self.identities[n].transport_secret_z85,
                    self.identities[n].transport_public_z85, directory,
                    max_message_bytes=self.max_message_bytes, linger_ms=0, send_timeout_s=60.0,
                )
                for n in PEER_NAMES
            }  # fmt: skip
            try:
                for transport in built.values():
                    transport.start()
            except TransportError as error:
                for transport in built.values():
                    transport.close()
                cause = error.__cause__
                if getattr(cause, "errno", None) == errno.EADDRINUSE and attempt + 1 < _START_ATTEMPTS:
                    continue
                raise
            for name, transport in built.items():
                missing = transport.wait_connected(set(PEER_NAMES) - {name}, 30.0)
                if missing:
                    for t in built.values():
                        t.close()
                    raise TransportError(f"loopback peer {name} could not connect to {sorted(missing)}")
            return built
        raise TransportError("no free loopback ports after several attempts")  # pragma: no cover

    def binding(self, sender: str, receiver: str, step: int = 0) -> Binding:
        """The next binding from `sender` to `receiver` (seq +1 per pair, as a session would)."""
        seq = self._seq.get((sender, receiver), 0)
        self._seq[(sender, receiver)] = seq + 1
        return Binding(self.deployment, self.session, step, seq, sender, receiver)

    def deliver(self, message: Message) -> Message:
        """Encode, send, receive and decode one message; return what the receiver decoded.

        Raises:
            TransportError: nothing arrived within the deadline, or it came from someone else.
        """
        sender, receiver = message.binding.sender, message.binding.receiver
        self.transports[sender].send(receiver, encode(message))
        received = self.transports[receiver].recv(_DELIVERY_TIMEOUT_S)
        if received is None:
            raise TransportError(f"{receiver} received nothing from {sender} in {_DELIVERY_TIMEOUT_S} s")
        origin, frames = received
        if origin != sender:
            raise TransportError(f"{receiver} expected a message from {sender}, got one from {origin}")
        return decode(frames, max_message_bytes=self.max_message_bytes)

    def owner_bytes(self) -> int:
        """Bytes the owner's transport has sent plus received so far (frame payloads)."""
        owner = self.transports["owner"]
        return owner.bytes_sent + owner.bytes_received

    def owner_messages(self) -> int:
        """Messages the owner's transport has sent plus received so far."""
        owner = self.transports["owner"]
        return owner.messages_sent + owner.messages_received

    def close(self) -> None:
        """Close every transport."""
        for transport in self.transports.values():
            transport.close()

    def __enter__(self) -> LoopbackWire:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def _counting(wire: LoopbackWire) -> Iterator[list[int]]:
    """Yield a one-item list that holds the owner's byte delta of the block when it ends."""
    box = [0]
    before = wire.owner_bytes()
    yield box
    box[0] = wire.owner_bytes() - before


@dataclass(frozen=True)
class CutTraffic:
    """One owner's cut-layer traffic for one epoch, as measured on its transport.

    Attributes:
        samples: samples the owner holds.
        batches: steps of the epoch.
        bytes: activation frames sent plus gradient frames received (headers included).
        messages: messages counted on the owner's transport.
        sent_batches: batches actually sent; fewer than `batches` when the rest was extrapolated.
    """

    samples: int
    batches: int
    bytes: float
    messages: int
    sent_batches: int

    @property
    def extrapolated(self) -> bool:
        """True when some full batches were scaled from the ones sent instead of sent."""
        return self.sent_batches < self.batches


@dataclass
class TensorCache:
    """The real activation and gradient of one full batch, reused when batches are not recomputed.

    A batch of fewer rows reuses the first rows of both (same dtype and per-sample shape as a real
    partial batch: the bytes on the wire depend only on the shapes).

    Attributes:
        activation: the bottom's output on a full batch (detached).
        gradient: the loss gradient with respect to it, as the label holder computed it.
    """

    activation: torch.Tensor | None = None
    gradient: torch.Tensor | None = None

    def take(self, rows: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The first `rows` rows of the cached pair, or None when nothing large enough is cached."""
        if self.activation is None or self.gradient is None or self.activation.shape[0] < rows:
            return None
        return self.activation[:rows], self.gradient[:rows]


def _one_step(
    wire: LoopbackWire, model: SplitModel, x: torch.Tensor, y: torch.Tensor, step: int,
    cache: TensorCache | None,
) -> None:  # fmt: skip
    """One split step over the wire: activation owner → label holder, gradient back.

    Without a usable cache entry the step is computed for real: the bottom's forward at the owner,
    the top's forward, loss and backward at the label holder on the tensor it decoded, and the
    bottom's backward at the owner on the gradient it decoded.
    """
    reused = cache.take(x.shape[0]) if cache is not None else None
    act = model.bottom(x) if reused is None else None
    sent_act = act.detach() if act is not None else reused[0]  # type: ignore[index]
    arrived = wire.deliver(
        Message(Kind.ACTIVATION, wire.binding("owner", "label_holder", step), edge="bottom->top",
                meta={"phase": "train"}, tensors=(to_wire(sent_act),))
    )  # fmt: skip
    if reused is None:
        received = from_wire(arrived.tensors[0]).detach().requires_grad_(True)
        torch.autograd.backward([nn.functional.cross_entropy(model.top(received), y)])
        assert received.grad is not None
        grad = received.grad
    else:
        grad = reused[1]
    back = wire.deliver(
        Message(Kind.GRADIENT, wire.binding("label_holder", "owner", step), edge="bottom->top",
                meta={"phase": "train"}, tensors=(to_wire(grad),))
    )  # fmt: skip
    if act is not None:
        torch.autograd.backward([act], [from_wire(back.tensors[0])])
        if cache is not None and (cache.activation is None or cache.activation.shape[0] < x.shape[0]):
            cache.activation, cache.gradient = sent_act, grad


def measure_owner_epoch(
    wire: LoopbackWire,
    model: SplitModel,
    x: torch.Tensor,
    y: torch.Tensor,
    samples: int,
    *,
    batch_size: int,
    sample_batches: int | None = None,
    cache: TensorCache | None = None,
) -> CutTraffic:
    """Run one owner's split-learning epoch over the wire and count its cut-layer bytes.

    Each step sends the bottom's activation of the batch to the label holder and the gradient
    back, as real `activation` / `gradient` messages through the real transports.

    Args:
        wire: the loopback peers.
        model: the split model.
        x: input rows to draw from (rows are reused cyclically when the owner holds more samples
            than `x` has).
        y: labels of `x`.
        samples: samples the owner holds (its D/N).
        batch_size: b.
        sample_batches: if given, send only this many full batches plus the final partial one,
            and scale the bytes of the remaining full batches by the mean of those sent.
        cache: if given, compute only the first full batch for real and send its tensors (or
            their first rows) for every later batch; None computes every batch.

    Returns:
        The owner's measured cut traffic.

    Raises:
        ValueError: for an owner without samples.
    """
    if samples <= 0:
        raise ValueError(f"an owner needs at least one sample, got {samples}")
    full, rest = divmod(samples, batch_size)
    to_send = full if sample_batches is None else min(full, max(1, sample_batches))
    messages_before = wire.owner_messages()
    with _counting(wire) as full_delta:
        for step in range(to_send):
            rows = torch.arange(step * batch_size, (step + 1) * batch_size) % x.shape[0]
            _one_step(wire, model, x[rows], y[rows], step, cache)
    with _counting(wire) as rest_delta:
        if rest:
            rows = torch.arange(full * batch_size, samples) % x.shape[0]
            _one_step(wire, model, x[rows], y[rows], full, cache)
    model.bottom.zero_grad(set_to_none=True)
    model.top.zero_grad(set_to_none=True)
    scaled_full = full_delta[0] * full / to_send if to_send else 0.0
    return CutTraffic(
        samples=samples,
        batches=full + (1 if rest else 0),
        bytes=scaled_full + rest_delta[0],
        messages=wire.owner_messages() - messages_before,
        sent_batches=to_send + (1 if rest else 0),
    )


def _flat_parameters(module: nn.Module) -> bytes:
    """The module's parameters as one little-endian float32 buffer (what gets sealed and shipped)."""
    flat = nn.utils.parameters_to_vector(module.parameters()).detach().to(torch.float32).contiguous()
    return bytes(to_wire(flat).data)


@dataclass(frozen=True)
class WeightTraffic:
    """One owner's weight traffic per epoch/round, measured on its transport (bytes in + out).

    Attributes:
        splitfed: bottom weights to the fed server and the average back.
        sequential: bottom weights in from the previous owner and out to the next (sealed to each).
        fedavg: the whole model in from the server and the update out.
    """

    splitfed: float
    sequential: float
    fedavg: float

    def for_scheme(self, scheme: Scheme) -> float:
        """The weight bytes of a split scheme (0 for vanilla)."""
        return {"splitfed": self.splitfed, "sequential": self.sequential, "vanilla": 0.0}[scheme]


def _ship_weights(wire: LoopbackWire, sender: str, receiver: str, plaintext: bytes, segment: str) -> None:
    """Seal `plaintext` to the receiver, send it as `encrypted_weights`, open it on arrival."""
    blob = seal_to(wire.identities[receiver].transport_public_z85, wire.identities[sender], plaintext)
    arrived = wire.deliver(
        Message(Kind.ENCRYPTED_WEIGHTS, wire.binding(sender, receiver), meta={"segment": segment, "round": 0},
                blob=blob)
    )  # fmt: skip
    opened = open_from(wire.identities[receiver], wire.identities[sender].transport_public_z85, arrived.blob)
    if len(opened) != len(plaintext):
        raise TransportError(
            f"{receiver} opened {len(opened)} weight bytes, {sender} sealed {len(plaintext)}"
        )


def measure_weight_sync(wire: LoopbackWire, model: SplitModel) -> WeightTraffic:
    """Send one round of weight traffic for each scheme through the wire; count the owner's bytes.

    The messages do not depend on N, so one round per scheme is measured once per model.

    Args:
        wire: the loopback peers.
        model: the split model (its real parameters are sealed and sent).

    Returns:
        The owner's weight bytes per epoch/round for splitfed, sequential and FedAvg.
    """
    bottom = _flat_parameters(model.bottom)
    whole = _flat_parameters(model.whole())
    with _counting(wire) as splitfed:
        _ship_weights(wire, "owner", "label_holder", bottom, "bottom")
        _ship_weights(wire, "label_holder", "owner", bottom, "bottom")
    with _counting(wire) as sequential:
        _ship_weights(wire, "neighbour", "owner", bottom, "bottom")
        _ship_weights(wire, "owner", "neighbour", bottom, "bottom")
    with _counting(wire) as fedavg:
        _ship_weights(wire, "label_holder", "owner", whole, "model")
        _ship_weights(wire, "owner", "label_holder", whole, "model")
    return WeightTraffic(splitfed=splitfed[0], sequential=sequential[0], fedavg=fedavg[0])
