"""The inbound path of a peer without sockets, and a structured mutator to fuzz it.

`IntakeHarness.feed(frames)` does what a peer does with frames its transport delivered under an
authenticated key: codec header (bounded), sender check, session (binding, replay), codec body,
then for tensor kinds the executor's intake (`engine.tensors.from_wire`, `on_activation` /
`on_gradient` against a live step), for PSI blobs the point decoder. Every refusal must be one of
`REFUSALS`; anything else escaping is a finding (the fuzzers treat it as a failure).

Two receivers run one real vertical split (owner.bottom -> lh.top, tiny linear models): the label
holder takes activations, the owner takes gradients. Both hold an established session with the
other, so mutated copies of valid messages reach the deep checks: a mutation that keeps the
binding (most of them) passes the session and lands in the executor.

`Mutator` turns seeds (valid messages of every kind) into hostile ones: bit flips, truncation,
extra and missing frames, splices, and field-level changes of the msgpack header (dtype, shape
with zero and huge dimensions, nbytes, binding, meta, blob length) that byte flips rarely hit.
"""

from __future__ import annotations

import copy
import math
import random
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import torch

from secure_split.config import load_deployment
from secure_split.crypto.psi import decode_points
from secure_split.engine.data import PeerData
from secure_split.engine.executor import PeerExecutor
from secure_split.engine.tensors import from_wire, to_wire
from secure_split.errors import CryptoError, RemoteProtocolError
from secure_split.protocol import Kind, Message, PeerSession, WireTensor, decode_body, decode_header, encode

BOUND = 1 << 20
REFUSALS: tuple[type[BaseException], ...] = (RemoteProtocolError, CryptoError)
"""What the inbound path may raise for bad input: refusals, which a peer records and answers."""

EDGE = "bottom->top"
DEPLOYMENT_YAML = """
version: 1
name: fuzz
coordinator: lh
policy: policy.yaml
peers:
  owner: {{endpoint: "tcp://127.0.0.1:5601", sign_key: "{a}", transport_key: "{ta}"}}
  lh: {{endpoint: "tcp://127.0.0.1:5602", sign_key: "{b}", transport_key: "{tb}"}}
segments:
  bottom: {{peer: owner, input: features, model: [{{linear: {{in: 6, out: 4}}}}, {{relu: {{}}}}]}}
  top: {{peer: lh, loss: cross_entropy, model: [{{linear: {{in: 4, out: 2}}}}]}}
edges:
  - {{from: bottom, to: top}}
training: {{batch_size: 8, seed: 1}}
limits: {{max_message_bytes: {bound}}}
""".format(a="a" * 64, b="b" * 64, ta="x" * 40, tb="y" * 40, bound=BOUND)
STEP = 3


@dataclass
class _Side:
    """One receiver: its established session with the other side and its executor."""

    name: str
    remote: str
    session: PeerSession
    executor: PeerExecutor


@dataclass
class IntakeHarness:
    """Both receivers of the split, and the seeds: valid frames for each, of every kind."""

    sides: dict[str, _Side]
    seeds: list[tuple[str, list[bytes]]]  # (receiver, frames), every kind
    ids: np.ndarray
    tensor_seeds: list[tuple[str, list[bytes]]] = field(default_factory=list)  # the deepest path
    outcomes: Counter[str] = field(default_factory=Counter)

    @classmethod
    def build(cls, workdir: Path) -> IntakeHarness:
        """Write the tiny deployment to `workdir`, build both executors, handshake both sessions."""
        workdir.mkdir(parents=True, exist_ok=True)
        path = workdir / "deployment.yaml"
        path.write_text(DEPLOYMENT_YAML)
        dep = load_deployment(path)
        gen = torch.Generator().manual_seed(0)
        ids = torch.arange(100, 164, dtype=torch.int64)
        owner_data = PeerData(ids=ids, features=torch.randn(64, 6, generator=gen))
        lh_data = PeerData(ids=ids, labels={"labels": torch.randint(0, 2, (64,), generator=gen)})
        executors = {
            "owner": PeerExecutor(dep, "owner", owner_data, noise_seed=0),
            "lh": PeerExecutor(dep, "lh", lh_data, noise_seed=0),
        }
        owner_s = PeerSession("owner", "lh", dep.hash, "policy-fuzz", nonce=bytes(range(16)))
        lh_s = PeerSession("lh", "owner", dep.hash, "policy-fuzz", nonce=bytes(range(1, 17)))
        for a, b in ((owner_s, lh_s), (lh_s, owner_s)):
            b.receive(decode_header(encode(a.hello())[0], max_message_bytes=BOUND))
        harness = cls(
            sides={
                "lh": _Side("lh", "owner", lh_s, executors["lh"]),
                "owner": _Side("owner", "lh", owner_s, executors["owner"]),
            },
            seeds=[],
            ids=ids[:8].numpy(),
        )
        harness._reset("lh")
        outs = harness._reset("owner")
        activation = to_wire(outs[0].tensor)
        gradient = to_wire(torch.randn(tuple(outs[0].tensor.shape), generator=gen))
        to_lh = [("lh", f) for f in _seed_frames(owner_s, activation, ids[:8])]
        to_owner = [("owner", f) for f in _seed_frames(lh_s, gradient, ids[:8])]
        harness.seeds = to_lh + to_owner
        harness.tensor_seeds = [to_lh[0], to_owner[0]]  # _seed_frames puts the tensor message first
        return harness

    def _reset(self, name: str) -> list[Any]:
        executor = self.sides[name].executor
        executor.abort_step()
        return executor.begin_step(STEP, "train", self.ids)

    def feed(self, receiver: str, frames: list[bytes | memoryview]) -> str:
        """Put one message through `receiver`'s inbound path; return where it stopped.

        Returns:
            Where a refused input stopped ("codec", "sender", "session", "body", "executor",
            "psi"), "used" (a tensor the executor took), or "accepted" (passed every check).

        Raises:
            Anything but a refusal (`REFUSALS`): that is a finding.
        """
        side = self.sides[receiver]
        stage = "codec"
        session = copy.copy(side.session)  # every input meets the same established session
        try:
            header = decode_header(frames[0], max_message_bytes=BOUND)
            stage = "sender"
            if header.binding.sender != side.remote or header.binding.receiver != side.name:
                raise RemoteProtocolError("spoofed sender or receiver")
            stage = "session"
            session.receive(header)
            stage = "body"
            message = decode_body(header, frames)
            stage = "executor" if message.kind in (Kind.ACTIVATION, Kind.GRADIENT) else "psi"
            outcome = self._use(side, message)
        except REFUSALS:
            self.outcomes[stage] += 1
            return stage
        self.outcomes[outcome] += 1
        return outcome

    def _use(self, side: _Side, message: Message) -> str:
        if message.kind in (Kind.ACTIVATION, Kind.GRADIENT) and message.tensors:
            tensor = from_wire(message.tensors[0])
            if message.kind is Kind.ACTIVATION:
                side.executor.on_activation(message.edge, tensor, step=message.binding.step)
            else:
                side.executor.on_gradient(message.edge, tensor, step=message.binding.step)
            self._reset(side.name)  # accepted: the step moved on; start it again
            return "used"
        if message.kind is Kind.PSI:
            decode_points(message.blob, what="a fuzzed PSI set", max_points=BOUND // 32)
            return "psi"
        return "accepted"


def _seed_frames(sender: PeerSession, tensor: WireTensor, ids: torch.Tensor) -> list[list[bytes]]:
    """Valid messages from `sender` bound to the next seq (so they pass the receiver's session)."""
    kinds: list[tuple[Kind, dict[str, Any]]] = [
        (Kind.ACTIVATION if sender.local == "owner" else Kind.GRADIENT,
         {"edge": EDGE, "meta": {"phase": "train"}, "tensors": (tensor,)}),
        (Kind.STEP_BEGIN, {"meta": {"epoch": 0, "phase": "train"}, "tensors": (to_wire(ids),)}),
        (Kind.BARRIER_ACK, {"meta": {"epoch": 0, "eval": {"labels": {"loss_sum": 0.5, "correct": 1, "count": 2}}}}),
        (Kind.BARRIER, {"meta": {"epoch": 0}}),
        (Kind.ERROR, {"meta": {"reason": "r", "code": "c"}}),
        (Kind.SHUTDOWN, {"meta": {"reason": "r", "status": "ok"}}),
        (Kind.PSI, {"meta": {"round": 1}, "blob": bytes(range(32)) * 4}),
        (Kind.ENCRYPTED_ACTIVATION, {"edge": EDGE, "meta": {"segment": "top"}, "blob": b"\x01" * 64}),
    ]  # fmt: skip
    frames = []
    for kind, parts in kinds:
        probe = copy.copy(sender)  # each seed is bound to the same next seq
        message = probe.bind(kind, step=STEP, **parts)
        frames.append([bytes(f) for f in encode(message)])
    return frames


# -- the mutator ---------------------------------------------------------------------------------

_INTERESTING_INTS = [0, 1, -1, 7, 8, 9, 255, 2**16, 2**31 - 1, 2**31, 2**32, 2**62, 2**63 - 1, 2**64 - 1, -(2**63)]
_INTERESTING_VALUES: list[Any] = [
    None, True, False, "", "x" * 5000, b"", b"\x00" * 16, [], {}, 1.5, float("nan"), float("inf"),
    [[[[[[1]]]]]], {"a": {"b": {"c": {"d": {"e": 1}}}}}, "float32", "activation", *_INTERESTING_INTS,
]  # fmt: skip
_FLOATS = [float("nan"), float("inf"), float("-inf"), 3.4e38, -3.4e38, 1e-45, 0.0]
_PREFIX = struct.Struct("<4sBBI")


class Mutator:
    """Deterministic hostile variants of seed frames (seeded `random.Random`)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def mutate(self, frames: list[bytes], other: list[bytes]) -> list[bytes | memoryview]:
        """One to three mutations of `frames` (`other` is a second seed, for splices)."""
        out: list[bytes] = list(frames)
        for _ in range(self.rng.choice((1, 1, 1, 2, 3))):
            out = self.rng.choice(self._MUTATIONS)(self, out, other)
            if not out:
                out = [b""]
        return list(out)

    def _flip_bits(self, frames: list[bytes], other: list[bytes]) -> list[bytes]:
        index = self.rng.randrange(len(frames))
        data = bytearray(frames[index])
        for _ in range(self.rng.randint(1, 8)):
            if data:
                data[self.rng.randrange(len(data))] ^= 1 << self.rng.randrange(8)
        return [*frames[:index], bytes(data), *frames[index + 1 :]]

    def _truncate_or_extend(self, frames: list[bytes], other: list[bytes]) -> list[bytes]:
        index = self.rng.randrange(len(frames))
        data = frames[index]
        if self.rng.random() < 0.5 and data:
            data = data[: self.rng.randrange(len(data))]
        else:
            data = data + bytes(self.rng.randrange(1, 64))
        return [*frames[:index], data, *frames[index + 1 :]]

    def _frames(self, frames: list[bytes], other: list[bytes]) -> list[bytes]:
        choice = self.rng.randrange(4)
        if choice == 0:
            return frames[:-1]
        if choice == 1:
            return [*frames, self.rng.choice([*other, b"", b"\x00" * 4096])]
        if choice == 2:
            return [frames[0], *other[1:]]  # this header, the other message's payload
        return [frames[0]] * self.rng.randint(2, 40)

    def _payload_values(self, frames: list[bytes], other: list[bytes]) -> list[bytes]:
        if len(frames) < 2 or len(frames[1]) < 4:
            return self._flip_bits(frames, other)
        data = bytearray(frames[1])
        for _ in range(self.rng.randint(1, 4)):
            at = 4 * self.rng.randrange(len(data) // 4)
            struct.pack_into("<f", data, at, self.rng.choice(_FLOATS))
        return [frames[0], bytes(data), *frames[2:]]

    def _header_field(self, frames: list[bytes], other: list[bytes]) -> list[bytes]:
        head = frames[0]
        try:
            magic, version, code, _ = _PREFIX.unpack_from(head)
            body = msgpack.unpackb(head[_PREFIX.size :], raw=False, strict_map_key=False)
        except Exception:
            return self._flip_bits(frames, other)
        if not isinstance(body, dict):
            return self._flip_bits(frames, other)
        self.rng.choice(self._FIELD_MUTATIONS)(self, body)
        try:
            packed = msgpack.packb(body, use_bin_type=True)
        except (OverflowError, ValueError, TypeError):  # a value msgpack cannot carry: not an input
            return self._flip_bits(frames, other)
        if self.rng.random() < 0.05:
            code = self.rng.randrange(256)
        return [_PREFIX.pack(magic, version, code, len(packed)) + packed, *frames[1:]]

    def _tensor_spec(self, body: dict[str, Any]) -> None:
        tensors = body.get("tensors")
        if not isinstance(tensors, list) or not tensors or not isinstance(tensors[0], dict):
            body["tensors"] = [{"dtype": "float32", "shape": [8, 0, 2**62], "nbytes": 0}]
            return
        spec = tensors[0]
        shape = list(spec.get("shape") or [1])
        which = self.rng.randrange(6)
        if which == 0:  # a zero-size tensor with huge dimensions: zero bytes, an overflow in torch
            shape = [self.rng.choice([8, 64, 2**31, 2**62]), 0, self.rng.choice([2**31, 2**40, 2**62])]
        elif which == 1:
            shape[self.rng.randrange(len(shape))] = self.rng.choice(_INTERESTING_INTS)
        elif which == 2:
            shape = shape + [self.rng.choice([0, 1, 2])] * self.rng.randint(1, 8)
        elif which == 3:
            spec["dtype"] = self.rng.choice(["float16", "bfloat16", "float64", "int64", "bool", "uint8", "complex64", 3])
        elif which == 4:
            shape = [shape[0] + self.rng.choice([-1, 1]), *shape[1:]] if shape else [1]
        else:
            spec["nbytes"] = self.rng.choice(_INTERESTING_INTS)
            return
        spec["shape"] = shape
        itemsize = {"float16": 2, "bfloat16": 2, "float64": 8, "int64": 8, "bool": 1, "uint8": 1}.get(
            str(spec.get("dtype")), 4
        )
        if all(isinstance(d, int) and d >= 0 for d in shape):
            spec["nbytes"] = math.prod(shape) * itemsize  # consistent: the deeper checks must catch it

    def _binding(self, body: dict[str, Any]) -> None:
        binding = body.get("binding")
        if not isinstance(binding, dict):
            body["binding"] = self.rng.choice(_INTERESTING_VALUES)
            return
        key = self.rng.choice(["step", "seq", "session", "sender", "receiver", "deployment"])
        binding[key] = self.rng.choice([*_INTERESTING_VALUES, STEP + 1, STEP + 10**6, "owner", "lh"])

    def _meta(self, body: dict[str, Any]) -> None:
        meta = body.get("meta")
        if not isinstance(meta, dict):
            meta = body["meta"] = {}
        key = self.rng.choice(["phase", "epoch", "eval", "members", "reason", "round", "x" * 300, "segment"])
        meta[key] = self.rng.choice([*_INTERESTING_VALUES, "eval", "infer", {"loss": float("nan")}])

    def _other_field(self, body: dict[str, Any]) -> None:
        key = self.rng.choice(["edge", "blob", "tensors", "extra", "binding", "meta"])
        if self.rng.random() < 0.2:
            body.pop(key, None)
        else:
            body[key] = self.rng.choice([*_INTERESTING_VALUES, "top->bottom", "bottom->top", "a->b->c"])

    _MUTATIONS = (_flip_bits, _truncate_or_extend, _frames, _payload_values, _header_field, _header_field)
    _FIELD_MUTATIONS = (_tensor_spec, _tensor_spec, _binding, _meta, _other_field)


def run(harness: IntakeHarness, count: int, seed: int) -> Counter[str]:
    """Feed `count` mutated inputs; return where they stopped. Raises on the first finding.

    Half the inputs start from a tensor message (the deepest path), half from any kind.
    """
    mutator = Mutator(seed)
    seeds, tensors = harness.seeds, harness.tensor_seeds
    for _ in range(count):
        receiver, frames = mutator.rng.choice(tensors if mutator.rng.random() < 0.5 else seeds)
        _, other = mutator.rng.choice(seeds)
        harness.feed(receiver, mutator.mutate(frames, other))
    return harness.outcomes


def envelope(selector: int, frames: list[bytes]) -> bytes:
    """Frames as one byte string (selector, count, lengths, bytes): what the byte-level fuzzer mutates."""
    return struct.pack(f"<BB{len(frames)}I", selector, len(frames), *(len(f) for f in frames)) + b"".join(frames)


def unenvelope(data: bytes) -> tuple[int, list[bytes]]:
    """Inverse of `envelope`, total on any input: (selector byte, frames)."""
    if len(data) < 2:
        return 0, [data]
    selector, count = data[0], data[1] % 8
    at, lengths = 2, []
    for _ in range(count):
        if at + 4 > len(data):
            break
        lengths.append(struct.unpack_from("<I", data, at)[0])
        at += 4
    frames = []
    for length in lengths:
        frames.append(data[at : at + length])
        at += length
    return selector, frames or [data[2:]]
