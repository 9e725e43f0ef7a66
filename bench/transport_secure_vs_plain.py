"""What CURVE + ZAP costs: secure_split's Transport against plain ZeroMQ, in one run, on loopback.

Both sides use the same shape: each end binds a ROUTER and sends through a DEALER connected to the
other end's ROUTER, zero-copy frames, the same queue bounds. "secure" is `secure_split.transport.
Transport` (CURVE encryption, ZAP allowlist, heartbeats); "plain" is the same sockets without any
security, set up here (benchmarks may import zmq; the library offers no insecure mode).

For each message size it measures
- round-trip latency: the median time for a message to reach the echo end and come back whole;
- throughput: payload bytes per second of a stream of messages, timed until the receiver
  acknowledges the last one.

and prints secure/plain ratios (latency: how many times slower; throughput: which fraction is
kept). Numbers on a shared 2-core machine are noisy; compare ratios from one run, not across runs.

Usage: python bench/transport_secure_vs_plain.py [--quick]
"""

from __future__ import annotations

import argparse
import errno
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import zmq

from secure_split.cli.demo import free_ports
from secure_split.errors import TransportError
from secure_split.transport import Transport, TransportPeer

KIB, MIB = 1024, 1024 * 1024
SIZES = [1 * KIB, 64 * KIB, 1 * MIB, 16 * MIB]
QUEUE_MESSAGES = 16  # the same bound the Transport uses
ECHO, SINK, LAST, ACK, QUIT = b"E", b"S", b"L", b"A", b"Q"
WAIT_S = 60.0


class Link(Protocol):
    """One end of a two-way link: send to the other end, receive from it."""

    def send(self, frames: Sequence[bytes | memoryview]) -> None: ...
    def recv(self, timeout_s: float) -> list[memoryview] | None: ...
    def close(self) -> None: ...


def _free_endpoints(count: int) -> list[str]:
    return [f"tcp://127.0.0.1:{port}" for port in free_ports(count)]


def _retry_on_taken_port(open_pair: Callable[[list[str]], tuple[Link, Link]]) -> tuple[Link, Link]:
    for _ in range(6):
        try:
            return open_pair(_free_endpoints(2))
        except (zmq.ZMQError, TransportError) as error:
            cause = error.__cause__ if isinstance(error, TransportError) else error
            if not (isinstance(cause, zmq.ZMQError) and cause.errno == errno.EADDRINUSE):
                raise
    raise SystemExit("could not find two free loopback ports")


class PlainLink:
    """The Transport's socket shape without CURVE, ZAP or heartbeats."""

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], bind: str, connect: str) -> None:
        self._router = context.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.setsockopt(zmq.RCVHWM, QUEUE_MESSAGES)
        self._router.bind(bind)
        self._dealer = context.socket(zmq.DEALER)
        self._dealer.setsockopt(zmq.LINGER, 0)
        self._dealer.setsockopt(zmq.SNDHWM, QUEUE_MESSAGES)
        self._dealer.connect(connect)

    def send(self, frames: Sequence[bytes | memoryview]) -> None:
        self._dealer.send_multipart(frames, copy=False)

    def recv(self, timeout_s: float) -> list[memoryview] | None:
        if not self._router.poll(round(timeout_s * 1000), zmq.POLLIN):
            return None
        return [frame.buffer for frame in self._router.recv_multipart(copy=False)[1:]]

    def close(self) -> None:
        self._router.close()
        self._dealer.close()


def open_plain(endpoints: list[str]) -> tuple[Link, Link]:
    context = zmq.Context()
    try:
        return PlainLink(context, endpoints[0], endpoints[1]), PlainLink(context, endpoints[1], endpoints[0])
    except zmq.ZMQError:
        context.destroy(linger=0)
        raise


class SecureLink:
    """A `Transport` seen as one end of a two-peer link."""

    def __init__(self, transport: Transport, other: str) -> None:
        self._transport = transport
        self._other = other

    def send(self, frames: Sequence[bytes | memoryview]) -> None:
        self._transport.send(self._other, frames)

    def recv(self, timeout_s: float) -> list[memoryview] | None:
        received = self._transport.recv(timeout_s)
        return None if received is None else received[1]

    def close(self) -> None:
        self._transport.close()


def open_secure(endpoints: list[str]) -> tuple[Link, Link]:
    keys = {name: zmq.curve_keypair() for name in ("client", "server")}
    peers = {
        name: TransportPeer(name=name, endpoint=endpoint, transport_key=keys[name][0].decode())
        for name, endpoint in zip(("client", "server"), endpoints, strict=True)
    }
    ends = []
    for name, endpoint in zip(("client", "server"), endpoints, strict=True):
        public, secret = keys[name]
        transport = Transport(
            name, endpoint, secret.decode(), public.decode(), peers, max_message_bytes=max(SIZES), linger_ms=0
        )
        try:
            transport.start()
        except TransportError:
            for end in ends:
                end.close()
            raise
        ends.append(transport)
    client, server = ends
    missing = client.wait_connected({"server"}, WAIT_S) | server.wait_connected({"client"}, WAIT_S)
    if missing:
        raise SystemExit(f"secure link did not come up: {missing}")
    return SecureLink(client, "server"), SecureLink(server, "client")


def serve_echo(link: Link) -> None:
    """The far end: echo ECHO messages, count SINK ones, ACK the LAST of a stream, stop on QUIT."""
    while True:
        frames = link.recv(WAIT_S)
        if frames is None or bytes(frames[0]) == QUIT:
            return
        op = bytes(frames[0])
        if op == ECHO:
            link.send(frames)
        elif op == LAST:
            link.send([ACK])


def _recv_or_die(link: Link) -> list[memoryview]:
    frames = link.recv(WAIT_S)
    if frames is None:
        raise SystemExit("the echo end stopped answering")
    return frames


@dataclass
class Measured:
    rtt_ms: float
    mb_per_s: float


def measure(link: Link, size: int, quick: bool) -> Measured:
    payload = bytes(size)
    scale = 4 if quick else 1
    round_trips = max(5, min(2000, (64 * MIB) // size) // scale)
    for _ in range(3):  # warm-up: connection, buffers, allocator
        link.send([ECHO, payload])
        _recv_or_die(link)
    times = []
    for _ in range(round_trips):
        started = time.perf_counter()
        link.send([ECHO, payload])
        reply = _recv_or_die(link)
        times.append(time.perf_counter() - started)
        if len(reply[1]) != size:
            raise SystemExit("echo came back truncated")

    stream = max(8, min(20_000, (128 * MIB) // size) // scale)
    started = time.perf_counter()
    for _ in range(stream):
        link.send([SINK, payload])
    link.send([LAST])
    if bytes(_recv_or_die(link)[0]) != ACK:
        raise SystemExit("stream was not acknowledged")
    elapsed = time.perf_counter() - started
    return Measured(rtt_ms=statistics.median(times) * 1000, mb_per_s=stream * size / elapsed / 1e6)


def run_mode(open_pair: Callable[[list[str]], tuple[Link, Link]], quick: bool) -> dict[int, Measured]:
    near, far = _retry_on_taken_port(open_pair)
    echo = threading.Thread(target=serve_echo, args=(far,), daemon=True)
    echo.start()
    try:
        return {size: measure(near, size, quick) for size in SIZES}
    finally:
        near.send([QUIT])
        echo.join(timeout=WAIT_S)
        near.close()
        far.close()


def _size_name(size: int) -> str:
    return f"{size // MIB} MiB" if size >= MIB else f"{size // KIB} KiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a quarter of the repetitions (smoke run)")
    args = parser.parse_args()

    started = time.perf_counter()
    plain = run_mode(open_plain, args.quick)
    secure = run_mode(open_secure, args.quick)

    print(f"{'size':>8} | {'RTT plain':>10} {'RTT secure':>11} {'ratio':>6} | "
          f"{'plain MB/s':>10} {'secure MB/s':>11} {'ratio':>6}")  # fmt: skip
    print("-" * 75)
    for size in SIZES:
        p, s = plain[size], secure[size]
        print(
            f"{_size_name(size):>8} | {p.rtt_ms:>8.3f}ms {s.rtt_ms:>9.3f}ms {s.rtt_ms / p.rtt_ms:>6.2f} | "
            f"{p.mb_per_s:>10.0f} {s.mb_per_s:>11.0f} {s.mb_per_s / p.mb_per_s:>6.2f}"
        )
    print(
        f"\nratio = secure / plain: latency ratio > 1 is the slowdown, throughput ratio < 1 the share kept. "
        f"({time.perf_counter() - started:.1f} s)"
    )


if __name__ == "__main__":
    main()
