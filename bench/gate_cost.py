"""CPU per tensor message at each end of the gate, without the network: the per-message budget.

Two real gates of a generated `vanilla` deployment (digits CNN: the owner's cut is 64 x 16x4x4
float32, exactly 64 KiB): the signed policy with its egress guards, real protocol sessions,
real audit logs on disk (hash chain, one write(2) per entry), the real codec. Only the
transport is an in-memory pipe (frames copied to bytes, as zmq hands them over), so what is
measured is the gate's own work; the transport's is raw pyzmq's and is measured by
bench/peers_compare.py (the zmq and zmq-curve floors).

One round = the owner sends an activation (with its raw batch, so the egress guards run), the
label holder receives it, sends the gradient back, the owner receives it. Timed with
`time.thread_time()` around each of the four calls over `--messages` rounds after a warm-up;
then the same rounds once more with a section timer around the parts (policy decision, egress
guards, session bind/check, codec, SHA-256 of the frames, audit entry) to say where it goes.

Usage::

    .venv/bin/python bench/gate_cost.py                 # 5 x 1,000 rounds (about 15 s)
    .venv/bin/python bench/gate_cost.py --json FILE     # also write the numbers

Budget (issue: performance v2): at most 0.25 ms of CPU per 64 KiB message per end, the egress
guards not counted (they are the data owner's leakage check, priced on their own).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from _host import machine

BUDGET_MS = 0.25


class _Pipe:
    """Both ends of an in-memory transport: `send` copies the frames to bytes, like zmq's recv does."""

    def __init__(self) -> None:
        self.queues: dict[str, deque[tuple[str, list[bytes]]]] = {}

    def end(self, me: str) -> Any:
        pipe = self
        pipe.queues[me] = deque()

        class End:
            bytes_sent = bytes_received = 0

            def send(self, peer: str, frames: Sequence[bytes | memoryview]) -> int:
                data = [bytes(f) for f in frames]
                pipe.queues[peer].append((me, data))
                return sum(len(f) for f in data)

            def recv(self, timeout_s: float) -> tuple[str, list[memoryview]] | None:
                q = pipe.queues[me]
                if not q:
                    return None
                sender, frames = q.popleft()
                return sender, [memoryview(f) for f in frames]

        return End()


def build(workdir: Path) -> dict[str, Any]:
    import secure_split
    from secure_split.audit.writer import AuditLog
    from secure_split.peer.context import PeerContext
    from secure_split.peer.gate import Gate
    from secure_split.protocol import PeerSession
    from secure_split.testing import generate_deployment

    gen = generate_deployment("vanilla", workdir / "deployment", epochs=1)
    pipe = _Pipe()
    gates: dict[str, Any] = {}
    for me, other in (("owner", "label_holder"), ("label_holder", "owner")):
        ctx = PeerContext.load(gen.peer_configs[me])
        audit = AuditLog.open(workdir / f"{me}.jsonl", peer=me, identity=ctx.identity,
                              deployment_hash=ctx.deployment.hash, policy_hash=ctx.policy.hash,
                              versions={"secure_split": secure_split.__version__,
                                        "protocol": secure_split.PROTOCOL_VERSION})
        session = PeerSession(me, other, ctx.deployment.hash, ctx.policy.hash)
        gates[me] = Gate(me=me, deployment_hash=ctx.deployment.hash, policy=ctx.policy, audit=audit,
                         transport=pipe.end(me), sessions={other: session},
                         max_message_bytes=ctx.deployment.spec.limits.max_message_bytes)
    owner, holder = gates["owner"], gates["label_holder"]
    owner.send_hello("label_holder")
    holder.send_hello("owner")
    holder.receive(0.0)
    owner.receive(0.0)
    return gates


def tensors() -> tuple[Any, Any, np.ndarray]:
    """The digits CNN's cut activation and its gradient for one batch of 64 real digits, and the raw batch."""
    import torch
    from sklearn.datasets import load_digits

    from secure_split.engine.tensors import to_wire

    x = torch.tensor(load_digits().data[:64] / 16.0, dtype=torch.float32)
    torch.manual_seed(0)
    bottom = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                                 torch.nn.Flatten())
    with torch.no_grad():
        act = bottom(x.reshape(64, 1, 8, 8))
    grad = torch.randn_like(act) * 1e-3
    assert act.numel() * 4 == 64 * 1024
    return to_wire(act), to_wire(grad), x.numpy()


def rounds(gates: dict[str, Any], n: int, act: Any, grad: Any, raw: np.ndarray, step0: int) -> dict[str, list[float]]:
    """`n` rounds; every other one sends the activation without its raw batch (no egress guards),
    so the owner's send is timed with and without them under the same conditions."""
    from secure_split.protocol import Kind

    owner, holder = gates["owner"], gates["label_holder"]
    clock = time.thread_time
    out: dict[str, list[float]] = {"owner send": [], "owner send, no guards": [], "label_holder receive": [],
                                   "label_holder send": [], "owner receive": []}
    for i in range(n):
        step = step0 + i
        guarded = i % 2 == 0
        t0 = clock()
        owner.send("label_holder", Kind.ACTIVATION, step=step, edge="bottom->top", tensors=(act,),
                   raw=raw if guarded else None)
        t1 = clock()
        holder.receive(0.0)
        t2 = clock()
        holder.send("owner", Kind.GRADIENT, step=step, edge="bottom->top", tensors=(grad,))
        t3 = clock()
        owner.receive(0.0)
        t4 = clock()
        out["owner send" if guarded else "owner send, no guards"].append((t1 - t0) * 1000)
        for key, dt in (("label_holder receive", t2 - t1), ("label_holder send", t3 - t2), ("owner receive", t4 - t3)):
            out[key].append(dt * 1000)
    return out


# Parts of the gate, timed by a wrapper around each (exclusive of the parts nested in them).
SECTIONS: dict[str, tuple[str, str]] = {
    "policy decision": ("secure_split.policy.model:Policy", "decide"),
    "egress guards": ("secure_split.peer.gate", "check_egress"),
    "session bind": ("secure_split.protocol.session:PeerSession", "bind"),
    "session check": ("secure_split.protocol.session:PeerSession", "receive"),
    "encode": ("secure_split.peer.gate", "encode"),
    "decode header": ("secure_split.peer.gate", "decode_header"),
    "decode payload": ("secure_split.peer.gate", "decode_body"),
    "SHA-256 of the frames": ("secure_split.peer.gate", "sha256_frames"),
    "audit entry (JSON, chain hash, write)": ("secure_split.audit.writer:AuditLog", "record"),
    "transport (in-memory pipe)": ("bench:pipe", ""),
}


def _install_sections(gates: dict[str, Any]) -> dict[str, float]:
    import importlib

    spent: dict[str, float] = {name: 0.0 for name in SECTIONS}
    stack: list[list[float]] = []
    clock = time.thread_time

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*a: Any, **k: Any) -> Any:
            frame = [clock(), 0.0]
            stack.append(frame)
            try:
                return fn(*a, **k)
            finally:
                dt = clock() - frame[0]
                stack.pop()
                if stack:
                    stack[-1][1] += dt
                spent[name] += dt - frame[1]

        return wrapper

    for name, (where, attr) in SECTIONS.items():
        if where == "bench:pipe":
            for g in gates.values():
                g.transport.send = timed(name, g.transport.send)
                g.transport.recv = timed(name, g.transport.recv)
            continue
        module, _, cls = where.partition(":")
        owner = importlib.import_module(module)
        if cls:
            owner = getattr(owner, cls)
        setattr(owner, attr, timed(name, getattr(owner, attr)))
    return spent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=1000, help="rounds per repeat (each: 2 messages, 4 gate calls)")
    ap.add_argument("--repeats", type=int, default=5, help="repeats; the result is the median of their medians")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    blocks: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        gates = build(Path(tmp))
        act, grad, raw = tensors()
        rounds(gates, 200, act, grad, raw, 1)  # warm-up
        step = 1000
        for _ in range(args.repeats):
            got = rounds(gates, args.messages, act, grad, raw, step)
            step += args.messages
            blocks.append({k: statistics.median(v) for k, v in got.items()})
        spent = _install_sections(gates)
        rounds(gates, args.messages, act, grad, raw, step)
    per_end = {k: statistics.median(b[k] for b in blocks) for k in blocks[0]}
    spread = {k: (min(b[k] for b in blocks), max(b[k] for b in blocks)) for k in blocks[0]}
    sections = {k: v * 1000 / args.messages for k, v in spent.items()}  # ms per round (2 messages, 4 gate calls)
    sections["egress guards"] *= 2  # they ran in every other round
    guard = per_end["owner send"] - per_end["owner send, no guards"]
    ends = [k for k in per_end if k != "owner send"]
    print(f"gate CPU per 64 KiB tensor message at each end (ms; median of {args.repeats} repeats of "
          f"{args.messages} rounds, their range in brackets)")
    for k, v in per_end.items():
        print(f"  {k:24s} {v:.3f}  [{spread[k][0]:.3f}-{spread[k][1]:.3f}]")
    worst = max(per_end[k] for k in ends)
    print(f"  egress guards (owner send with - without): {guard:.3f}")
    print(f"  budget {BUDGET_MS} ms per message per end, guards not counted: worst end {worst:.3f} ms "
          f"({'met' if worst <= BUDGET_MS else 'not met'})")
    print("where it goes (ms per round: 2 messages, each sent and received once; under the section timer,"
          " which adds its own overhead):")
    for k, v in sorted(sections.items(), key=lambda kv: -kv[1]):
        print(f"  {k:38s} {v:.3f}")
    if args.json:
        args.json.write_text(json.dumps({
            "machine": machine(), "rounds_per_repeat": args.messages, "repeats": args.repeats,
            "message_bytes": 64 * 1024, "median_ms_per_end": per_end, "range_ms_per_end": spread,
            "egress_guards_ms_per_activation": guard, "sections_ms_per_round": sections,
            "budget_ms": BUDGET_MS, "worst_end_ms": worst, "budget_met": worst <= BUDGET_MS,
        }, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
