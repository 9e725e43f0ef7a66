"""The vanilla split step without secure_split: one process, or two over gloo, TensorPipe RPC or raw ZeroMQ.

The workers of `bench/peers_compare.py` (run as `python bench/_split_workers.py SPEC.json ROLE`, one OS
process per role). Every variant trains the same two segments (built by `engine.models.build_segment`
with the deployment's derived seeds) on the same batches (`engine.schedule.epoch_batches`) with Adam
at both ends, and does exactly the split step that secure_split does without overlap:

    owner:         forward bottom -> send the cut activation -> receive its gradient -> backward, Adam
    label holder:  receive the activation -> top forward, loss, backward -> send the gradient -> Adam

The label holder sends the gradient before its own Adam step (as secure_split's peers do), so that
step overlaps the owner's backward. Both ends derive the schedule from the shared seed: no ids and
no step announcement cross the wire, only the two tensors per step (what a roll-your-own split
sends). "local" trains both segments in one process with one Adam over both (the reference).

Transports (`SPEC["transport"]`):
- `local`: no transport, one process (role `local`).
- `gloo`: `torch.distributed` send/recv, gloo backend over TCP (plaintext).
- `rpc`: `torch.distributed.rpc` over TensorPipe, TCP only (`uv` transport, `basic` channel; no
  shared memory, which would bypass the network), plaintext. The owner calls the label holder's
  step with the activation; the reply is the gradient; the label holder's Adam step runs in a
  second thread after the reply is handed over (it waits before the next step's forward).
- `zmq` / `zmq-curve`: raw pyzmq REQ (owner) / REP (label holder), the tensor's bytes as one
  zero-copy frame; `zmq-curve` adds CURVE encryption (no ZAP allowlist, no policy, no audit).

Timing: the owner drives the steps and marks the start of each epoch and the end of the last
(training steps only; no evaluation in between). Each worker writes its segment's weights as
safetensors and, for the owner (or local), the epoch marks as JSON into `SPEC["out"]`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # one torch thread per process, set before torch loads (the peers' `threads: 1`)
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_var, "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

TRANSPORTS = ("local", "gloo", "rpc", "zmq", "zmq-curve")
WAIT_S = 300.0


# -- what every worker shares ----------------------------------------------------------------------


class Setup:
    """The model, data and schedule of one worker, from the spec the bench wrote."""

    def __init__(self, spec: dict[str, Any], role: str) -> None:
        from secure_split.engine.data import digits
        from secure_split.engine.models import build_segment, derive_seed
        from secure_split.engine.schedule import split_train_test

        torch.set_num_threads(1)
        self.spec, self.role = spec, role
        seed = int(spec["seed"])
        ids, x, y = digits()
        if not torch.equal(ids, torch.arange(len(ids))):
            raise SystemExit("the digits ids are not their row numbers")
        self.features = x if role in ("owner", "local") else None
        self.labels = y if role in ("label_holder", "local") else None
        self.train_ids, self.test_ids = split_train_test(ids.numpy(), float(spec["test_fraction"]), seed)
        self.segments: dict[str, nn.Module] = {}
        if role in ("owner", "local"):
            self.segments["bottom"] = build_segment(spec["bottom"], seed=derive_seed(seed, "bottom"), name="bottom")
        if role in ("label_holder", "local"):
            self.segments["top"] = build_segment(spec["top"], seed=derive_seed(seed, "top"), name="top")
        params = [p for m in self.segments.values() for p in m.parameters()]
        self.optimizer = torch.optim.Adam(params, lr=float(spec["lr"]))
        self.cut: tuple[int, ...] = tuple(spec["cut_shape"])

    def epochs(self) -> list[list[np.ndarray]]:
        """Every epoch's training batches (the shared schedule)."""
        from secure_split.engine.schedule import epoch_batches

        s = self.spec
        return [epoch_batches(self.train_ids, int(s["batch_size"]), int(s["seed"]), e, s.get("max_steps"))
                for e in range(int(s["epochs"]))]

    def zero_grad(self) -> None:
        for m in self.segments.values():
            for p in m.parameters():
                p.grad = None

    def save(self, marks: list[float] | None) -> None:
        """This worker's weights (safetensors) and, if it keeps the clock, the epoch marks."""
        from safetensors.torch import save_file

        out = Path(self.spec["out"])
        out.mkdir(parents=True, exist_ok=True)
        for name, module in self.segments.items():
            save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, str(out / f"{name}.safetensors"))
        if marks is not None:
            (out / "marks.json").write_text(json.dumps({"marks": marks, "steps": [len(b) for b in self.epochs()]}))


# -- local ------------------------------------------------------------------------------------------


def run_local(setup: Setup) -> None:
    """Both segments in one process, one backward through the whole network, one Adam."""
    assert setup.features is not None and setup.labels is not None
    bottom, top = setup.segments["bottom"], setup.segments["top"]
    marks = []
    for batches in setup.epochs():
        marks.append(time.perf_counter())
        for batch in batches:
            rows = torch.from_numpy(batch)
            setup.zero_grad()
            loss = F.cross_entropy(top(bottom(setup.features[rows])), setup.labels[rows])
            loss.backward()  # type: ignore[no-untyped-call]  # torch leaves it untyped
            setup.optimizer.step()
    marks.append(time.perf_counter())
    setup.save(marks)


# -- the two ends of a step over a byte or tensor link ----------------------------------------------


def owner_loop(setup: Setup, exchange: Callable[[torch.Tensor, int, int], torch.Tensor]) -> list[float]:
    """The owner's side of every training step; `exchange(activation, epoch, i)` returns its gradient."""
    assert setup.features is not None
    bottom = setup.segments["bottom"]
    marks = []
    for epoch, batches in enumerate(setup.epochs()):
        marks.append(time.perf_counter())
        for i, batch in enumerate(batches):
            rows = torch.from_numpy(batch)
            setup.zero_grad()
            act = bottom(setup.features[rows])
            grad = exchange(act.detach().contiguous(), epoch, i)
            act.backward(grad)
            setup.optimizer.step()
    marks.append(time.perf_counter())
    return marks


def top_step(setup: Setup, act: torch.Tensor, batch: np.ndarray) -> torch.Tensor:
    """The label holder's forward, loss and backward of one step; returns the cut gradient."""
    assert setup.labels is not None
    setup.zero_grad()
    act.requires_grad_(True)
    loss = F.cross_entropy(setup.segments["top"](act), setup.labels[torch.from_numpy(batch)])
    loss.backward()  # type: ignore[no-untyped-call]  # torch leaves it untyped
    assert act.grad is not None
    return act.grad


def label_holder_loop(setup: Setup, receive: Callable[[tuple[int, ...]], torch.Tensor],
                      send: Callable[[torch.Tensor], object]) -> None:
    """The label holder's side of every training step over a link it receives from and sends to."""
    for batches in setup.epochs():
        for batch in batches:
            act = receive((len(batch), *setup.cut))
            send(top_step(setup, act, batch).contiguous())
            setup.optimizer.step()


# -- gloo -----------------------------------------------------------------------------------------


def run_gloo(setup: Setup) -> None:
    """torch.distributed point-to-point send/recv (gloo, TCP): rank 0 the owner, rank 1 the label holder."""
    import datetime

    import torch.distributed as dist

    s = setup.spec
    rank = 0 if setup.role == "owner" else 1
    dist.init_process_group("gloo", init_method=f"tcp://{s['hosts']['owner']}:{s['port']}", rank=rank,
                            world_size=2, timeout=datetime.timedelta(seconds=WAIT_S))
    try:
        if setup.role == "owner":
            def exchange(act: torch.Tensor, epoch: int, i: int) -> torch.Tensor:
                dist.send(act, dst=1)
                grad = torch.empty_like(act)
                dist.recv(grad, src=1)
                return grad

            setup.save(owner_loop(setup, exchange))
        else:
            def receive(shape: tuple[int, ...]) -> torch.Tensor:
                buf = torch.empty(shape)
                dist.recv(buf, src=0)
                return buf

            label_holder_loop(setup, receive, lambda g: dist.send(g, dst=0))
            setup.save(None)
        dist.barrier()
    finally:
        dist.destroy_process_group()


# -- torch.distributed.rpc ----------------------------------------------------------------------------

_RPC: dict[str, Any] = {}
"""The label holder's state between RPC calls: its Setup, the batches, the pending Adam step."""


def _rpc_wait_update() -> None:
    pending = _RPC.pop("pending", None)
    if pending is not None:
        pending.result()


def rpc_top_step(act: torch.Tensor, epoch: int, i: int) -> torch.Tensor:
    """Runs at the label holder, called by the owner: one step's top half; returns the gradient."""
    setup: Setup = _RPC["setup"]
    _rpc_wait_update()
    grad = top_step(setup, act, _RPC["epochs"][epoch][i]).clone()
    _RPC["pending"] = _RPC["pool"].submit(setup.optimizer.step)  # after the reply, like the others
    return grad


def rpc_finish() -> bool:
    """Runs at the label holder: wait for the last Adam step and write the weights."""
    _rpc_wait_update()
    _RPC["setup"].save(None)
    return True


def run_rpc(setup: Setup) -> None:
    """torch.distributed.rpc over TensorPipe (TCP only): the owner calls the label holder per step."""
    from concurrent.futures import ThreadPoolExecutor

    import torch.distributed.rpc as rpc

    s = setup.spec
    options = rpc.TensorPipeRpcBackendOptions(
        init_method=f"tcp://{s['hosts']['owner']}:{s['port']}", num_worker_threads=4, rpc_timeout=WAIT_S,
        _transports=["uv"], _channels=["basic"])
    if setup.role == "label_holder":
        _RPC.update(setup=setup, epochs=setup.epochs(), pool=ThreadPoolExecutor(1))
    rpc.init_rpc(setup.role, rank=0 if setup.role == "owner" else 1, world_size=2,  # type: ignore[no-untyped-call]
                 rpc_backend_options=options)
    try:
        if setup.role == "owner":
            def exchange(act: torch.Tensor, epoch: int, i: int) -> torch.Tensor:
                return rpc.rpc_sync("label_holder", rpc_top_step, args=(act, epoch, i))  # type: ignore[no-any-return]

            marks = owner_loop(setup, exchange)
            rpc.rpc_sync("label_holder", rpc_finish)
            setup.save(marks)
    finally:
        rpc.shutdown()
        if "pool" in _RPC:
            _RPC["pool"].shutdown()


# -- raw ZeroMQ -------------------------------------------------------------------------------------


def run_zmq(setup: Setup, curve: bool) -> None:
    """pyzmq REQ (owner) / REP (label holder), one zero-copy frame per tensor, optionally CURVE."""
    import warnings

    import zmq

    s = setup.spec
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REQ if setup.role == "owner" else zmq.REP)
    sock.setsockopt(zmq.LINGER, 0)
    if curve:
        keys = s["curve"]
        if setup.role == "label_holder":
            sock.curve_secretkey = keys["server_secret"].encode()
            sock.curve_publickey = keys["server_public"].encode()
            sock.curve_server = True
        else:
            sock.curve_secretkey = keys["client_secret"].encode()
            sock.curve_publickey = keys["client_public"].encode()
            sock.curve_serverkey = keys["server_public"].encode()
    endpoint = f"tcp://{s['hosts']['label_holder']}:{s['port']}"

    def tensor_of(frame: zmq.Frame, shape: tuple[int, ...]) -> torch.Tensor:
        with warnings.catch_warnings():  # the frame's buffer is read-only; nothing writes to it
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(np.frombuffer(frame.buffer, dtype=np.float32).reshape(shape))

    def recv_frame() -> zmq.Frame:
        if not sock.poll(round(WAIT_S * 1000)):
            raise SystemExit(f"{setup.role}: no message from the other end in {WAIT_S:.0f} s")
        return sock.recv(copy=False)

    try:
        if setup.role == "owner":
            sock.connect(endpoint)

            def exchange(act: torch.Tensor, epoch: int, i: int) -> torch.Tensor:
                sock.send(act.numpy().data, copy=False)
                return tensor_of(recv_frame(), tuple(act.shape))

            marks = owner_loop(setup, exchange)
            sock.send(b"")  # done: the label holder saves its weights and answers
            recv_frame()
            setup.save(marks)
        else:
            sock.bind(endpoint)
            label_holder_loop(setup, lambda shape: tensor_of(recv_frame(), shape),
                              lambda g: sock.send(g.numpy().data, copy=False))
            recv_frame()
            setup.save(None)
            sock.send(b"")
            time.sleep(0.2)  # let the last reply leave before the socket closes (LINGER 0)
    finally:
        sock.close()
        ctx.term()


def main(argv: list[str]) -> int:
    """`_split_workers.py SPEC.json ROLE`: run one end (or the local run) of the spec's transport."""
    spec = json.loads(Path(argv[0]).read_text())
    role = argv[1]
    transport = spec["transport"]
    if transport not in TRANSPORTS or role not in ("local", "owner", "label_holder"):
        raise SystemExit(f"unknown transport {transport!r} or role {role!r}")
    if (transport == "local") != (role == "local"):
        raise SystemExit("the local transport runs one role, 'local'; the others 'owner' and 'label_holder'")
    setup = Setup(spec, role)
    if transport == "local":
        run_local(setup)
    elif transport == "gloo":
        run_gloo(setup)
    elif transport == "rpc":
        run_rpc(setup)
    else:
        run_zmq(setup, curve=transport == "zmq-curve")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
