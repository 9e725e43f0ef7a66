"""A malicious listed peer for integration tests: the real owner, with an injector in its transport.

    python -m tests.integration.adversary PLAN.json PEER_CONFIG RESULT.json

runs `secure-split peer run PEER_CONFIG` in this process (the genuine owner: its model, data,
audit log, handshake, barriers), after wrapping `Transport.send` and `Transport.recv`. The owner
therefore completes training unless the victim stops, and every attack travels inside the real,
established CURVE session with the owner's key, so it meets the victim's deep checks (a made-up
session would be refused at the binding).

The injector, on the owner's k-th activation to the victim, first sends the plan's attacks,
bound to the session with the next sequence numbers, then shifts the sequence numbers of every
later real message by the number of injected messages the victim counted (a message refused at
its header, before the session, uses no sequence number). Error replies of the victim are taken
out of the owner's stream (the same shift inbound) and recorded for the test: the owner of a
real deployment would see them; here they must not stop the honest half of the adversary.

Attacks (the plan's "attacks" list, each {"attack": NAME, ...}):
- zero_size_shape: an activation declaring float32[64, 2**62, 0] (0 bytes; torch overflows on it).
- future_steps (count, nbytes, ahead): activations for steps far beyond the current one.
- nan_activation, wrong_shape: the step's activation with NaN values / one column more.
- denied_kind (kind): a message of a kind the policy forbids owner -> victim (e.g. gradient).
- multipart (frames, frame_bytes): on a second connection with the owner's key, one message of
  `frames` frames of `frame_bytes` each (every frame under the bound, the total far over).
Results (RESULT.json next to the plan's "out"): injected counts, the victim's error replies.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import math
import struct
import sys
from pathlib import Path
from typing import Any

import msgpack

from secure_split import PROTOCOL_VERSION
from secure_split.protocol import (
    KIND_CODES,
    Binding,
    Kind,
    Message,
    WireTensor,
    decode_body,
    decode_header,
    encode,
)
from secure_split.transport import Transport

BOUND = 2**31


class Injector:
    """Wraps one Transport's send/recv (see the module docstring)."""

    def __init__(self, plan: dict[str, Any]) -> None:
        self.plan = plan
        self.victim: str = plan["victim"]
        self.trigger = int(plan.get("trigger_activation", 1))
        self.out = Path(plan["out"])
        self.activations = 0
        self.offset_out = 0  # victim seqs our injections used up
        self.offset_in = 0  # victim messages we took out of the owner's stream
        self.report: dict[str, Any] = {"injected": 0, "consumed": 0, "errors": [], "multipart_sent": 0}
        self._save()

    def _save(self) -> None:
        self.out.write_text(json.dumps(self.report))

    # -- outbound ----------------------------------------------------------------------------------

    def send(self, transport: Transport, original: Any, peer: str, frames: Any) -> int:
        if peer != self.victim:
            return int(original(transport, peer, frames))
        header = decode_header(frames[0], max_message_bytes=BOUND)
        if header.kind is Kind.ACTIVATION:
            self.activations += 1
            if self.activations == self.trigger:
                self._inject(transport, original, header)
        if header.binding.seq and self.offset_out:
            frames = _rebind(header, frames, header.binding.seq + self.offset_out)
        return int(original(transport, peer, frames))

    def _inject(self, transport: Transport, original: Any, real: Any) -> None:
        for _ in range(int(self.plan.get("repeat", 1))):
            for attack in self.plan["attacks"]:
                for build, consumes in self._build(attack, real, transport):
                    # Bound to the next seq the victim expects: the real message's, shifted.
                    original(transport, self.victim, build(real.binding.seq + self.offset_out))
                    self.report["injected"] += 1
                    if consumes:
                        self.offset_out += 1
                        self.report["consumed"] += 1
        self._save()

    def _build(self, attack: dict[str, Any], real: Any, transport: Transport) -> list[tuple[Any, bool]]:
        """(frames for a seq, whether the victim's session takes that seq) for each message."""
        name = attack["attack"]
        spec = real.tensor_specs[0]
        batch, cols = spec.shape[0], math.prod(spec.shape[1:])

        def bound(seq: int, step: int | None = None) -> Binding:
            return dataclasses.replace(real.binding, seq=seq, step=real.binding.step if step is None else step)

        def activation(values: bytes, shape: tuple[int, ...], step: int | None = None) -> Any:
            tensor = WireTensor("float32", shape, values)
            return lambda seq: list(encode(Message(Kind.ACTIVATION, bound(seq, step), edge=real.edge,
                                                   meta=dict(real.meta), tensors=(tensor,))))  # fmt: skip

        if name == "zero_size_shape":
            return [(lambda seq: _raw_activation_header(bound(seq), real.edge, [64, 2**62, 0]), False)]
        if name == "nan_activation":
            return [(activation(struct.pack("<f", float("nan")) * (batch * cols), (batch, cols)), True)]
        if name == "wrong_shape":
            return [(activation(bytes(4 * batch * (cols + 1)), (batch, cols + 1)), True)]
        if name == "denied_kind":
            kind = Kind(attack.get("kind", "gradient"))
            tensor = WireTensor("float32", (batch, cols), bytes(4 * batch * cols))
            return [(lambda seq: list(encode(Message(kind, bound(seq), edge=real.edge, tensors=(tensor,)))), True)]
        if name == "future_steps":
            width = max(1, int(attack.get("nbytes", 4 * batch * cols)) // (4 * batch))
            payload = bytes(4 * batch * width)
            first = real.binding.step + int(attack.get("ahead", 10**6))
            return [(activation(payload, (batch, width), step=first + i), True) for i in range(int(attack["count"]))]
        if name == "multipart":
            self._multipart(transport, int(attack["frames"]), int(attack["frame_bytes"]))
            return []
        raise ValueError(f"unknown attack {name!r}")

    def _multipart(self, transport: Transport, frames: int, frame_bytes: int) -> None:
        """One huge multipart message on a second connection with the owner's key."""
        import zmq

        from secure_split.config import load_peer_config
        from secure_split.crypto.keys import load_identity

        identity = load_identity(load_peer_config(self.plan["config"]).secret_key_path)
        victim = transport._peers[self.victim]  # test tooling: the victim's public entry
        # Its own context, destroyed before the interpreter exits: libzmq releases zero-copy frames
        # from its I/O thread, which must not happen during interpreter teardown.
        # Linger: the owner may finish training before the whole message is out; the process then
        # waits (up to 60 s) until it is, or until the victim has closed the connection.
        ctx = self._ctx = zmq.Context()
        atexit.register(ctx.destroy, linger=60_000)
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.RECONNECT_IVL, 60_000)
        sock.curve_serverkey = victim.transport_key.encode()
        sock.curve_secretkey = identity.transport_secret_z85.encode()
        sock.curve_publickey = identity.transport_public_z85.encode()
        sock.connect(victim.endpoint)
        sock.send(b"garbage that names this connection's peer")
        self._chunk = bytes(frame_bytes)  # one buffer, sent `frames` times without a copy
        sock.send_multipart([self._chunk] * frames, copy=False)
        self.report["multipart_sent"] += 1

    # -- inbound -----------------------------------------------------------------------------------

    def recv(self, transport: Transport, original: Any, timeout_s: float) -> Any:
        while True:
            item = original(transport, timeout_s)
            if item is None:
                return None
            sender, frames = item
            if sender != self.victim:
                return item
            try:
                header = decode_header(frames[0], max_message_bytes=BOUND)
            except Exception:
                return item
            code = str(header.meta.get("code", "")) if header.kind is Kind.ERROR else ""
            if header.kind is Kind.ERROR and not code.startswith("peer_failed"):
                self.report["errors"].append({"code": code, "reason": str(header.meta.get("reason", ""))[:500]})
                if header.binding.seq:
                    self.offset_in += 1
                self._save()
                continue  # taken out of the owner's stream
            if header.binding.seq and self.offset_in:
                frames = _rebind(header, frames, header.binding.seq - self.offset_in)
            return sender, frames


def _rebind(header: Any, frames: Any, seq: int) -> list[Any]:
    message = decode_body(header, frames)
    return list(encode(dataclasses.replace(message, binding=dataclasses.replace(message.binding, seq=seq))))


def _raw_activation_header(binding: Binding, edge: str, shape: list[int]) -> list[Any]:
    """An activation header built by hand: `WireTensor` itself refuses such a shape."""
    body = msgpack.packb(
        {
            "binding": {"deployment": binding.deployment, "session": binding.session, "step": binding.step,
                        "seq": binding.seq, "sender": binding.sender, "receiver": binding.receiver},
            "edge": edge,
            "meta": {"phase": "train"},
            "tensors": [{"dtype": "float32", "shape": shape, "nbytes": 0}],
            "blob": 0,
        },
        use_bin_type=True,
    )  # fmt: skip
    header = struct.pack("<4sBBI", b"SSPL", PROTOCOL_VERSION, KIND_CODES[Kind.ACTIVATION], len(body)) + body
    return [header, b""]


def install(plan: dict[str, Any]) -> Injector:
    """Wrap `Transport.send` / `Transport.recv` of every transport in this process."""
    injector = Injector(plan)
    original_send, original_recv = Transport.send, Transport.recv

    def send(self: Transport, peer: str, frames: Any) -> int:
        return injector.send(self, original_send, peer, frames)

    def recv(self: Transport, timeout_s: float) -> Any:
        return injector.recv(self, original_recv, timeout_s)

    Transport.send = send  # type: ignore[method-assign]
    Transport.recv = recv  # type: ignore[method-assign]
    return injector


def main(argv: list[str]) -> None:
    plan_path, config, result = argv
    plan = json.loads(Path(plan_path).read_text())
    plan["config"] = config
    install(plan)
    from secure_split.cli.main import main as cli

    sys.argv = ["secure-split", "peer", "run", config, "--result", result, "--progress", "none"]
    cli()


if __name__ == "__main__":
    main(sys.argv[1:])
