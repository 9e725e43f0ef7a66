"""An emulated WAN on one machine: hosts in network namespaces, joined by a userspace link emulator.

This kernel has no `sch_netem`, iptables or nft, so delay and loss are made in userspace: every
host is a network namespace with one TUN device (`tun0`, an address in 198.18.0.0/24, the range
RFC 2544 sets aside for benchmarks); one forwarder process holds all TUN devices, reads each IPv4
packet a host sends, drops it with the link's loss probability, holds it for the link's one-way
delay (plus serialisation time where a rate is set) and writes it into the destination's device.
The kernels' TCP stacks see real loss and real round trips, so retransmissions and congestion
control behave as across organisations. Nothing leaves the namespaces.

API (the bench and the tests use only this)::

    from wan import Link, Wan, run_deployment
    with Wan(["lab", "hospital_a", "hospital_b"], Link(delay_ms=20, loss=0.005)) as wan:
        wan.ip("lab")                                   # '198.18.0.1'
        proc = wan.popen("lab", [sys.executable, ...])  # a command inside lab's namespace
        wan.link_stats()                                # packets forwarded / dropped per link
    run_deployment(generated, link=Link(delay_ms=20, loss=0.005), timeout_s=120)

`Wan(hosts, link, links={("a", "b"): Link(...)}, seed=0)`: `link` applies to every direction,
`links` overrides single directions (a -> b). Leaving the `with` block (also on an exception or
Ctrl-C) kills every process started in the namespaces, the forwarder, and deletes the namespaces.
`cleanup_leftovers()` removes what a killed harness left behind (namespaces named
`sswan<pid>...` whose process is gone); `Wan` calls it when it starts.

Needs root (network namespaces, /dev/net/tun) and the `ip` tool; `unavailable_reason()` says
why a machine cannot run it (tests skip with that reason).

Usage::

    python bench/wan.py measure --delay-ms 20 --loss 0.005       # RTT, throughput, loss applied
    python bench/wan.py run vertical-he --delay-ms 20 --loss 0.005 --max-steps 5
    python bench/wan.py cleanup                                  # remove a crashed harness's leftovers

The forwarder is this file too (`python bench/wan.py forward SPEC.json`, started by `Wan`).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import heapq
import itertools
import json
import os
import random
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

PREFIX = "sswan"
SUBNET = "198.18.0"  # RFC 2544 benchmarking range: never a real host's address
MTU = 1500
_CLONE_NEWNET = 0x40000000
_TUNSETIFF = 0x400454CA
_IFF_TUN, _IFF_NO_PI = 0x0001, 0x1000
_counter = itertools.count()


@dataclass(frozen=True)
class Link:
    """One direction of an emulated link.

    Attributes:
        delay_ms: one-way delay added to every packet.
        loss: fraction of packets dropped at random (0.005 = 0.5 %).
        rate_mbit: bandwidth in Mbit/s (packets queue behind each other), None for no limit.
        queue_ms: a packet that would wait longer than this behind the rate limit is dropped
            (a router's tail-drop buffer).
    """

    delay_ms: float = 0.0
    loss: float = 0.0
    rate_mbit: float | None = None
    queue_ms: float = 200.0


def unavailable_reason() -> str | None:
    """Why this machine cannot build a WAN (None when it can): not root, no `ip`, no TUN, no netns."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces and TUN devices need root"
    if shutil.which("ip") is None:
        return "the `ip` tool (iproute2) is not installed"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun does not exist (no TUN support)"
    probe = f"{PREFIX}{os.getpid()}probe{next(_counter)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _kill_namespace(ns: str) -> None:
    """Kill every process inside `ns` (all of them were started there by a harness), then delete it."""
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=False).stdout
    for pid in (int(p) for p in pids.split() if p.isdigit()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def cleanup_leftovers(prefix: str = PREFIX) -> list[str]:
    """Delete namespaces a crashed harness left behind; returns their names.

    Only namespaces named `<prefix><pid>...` whose creating process `pid` is gone are touched, so a
    harness running beside this one (another test run) keeps its own.
    """
    removed = []
    for ns in _namespaces():
        if not ns.startswith(prefix):
            continue
        digits = "".join(itertools.takewhile(str.isdigit, ns[len(prefix):]))
        if digits and not _pid_alive(int(digits)):
            _kill_namespace(ns)
            removed.append(ns)
    return removed


class Wan:
    """Hosts in network namespaces joined by emulated links (see the module docstring).

    Args:
        hosts: host names (at most 250); each gets a namespace and the address `ip(host)`.
        link: the link every direction gets.
        links: per-direction overrides, `(from_host, to_host) -> Link`.
        seed: seed of the loss draws (the same seed drops the same packet numbers).
    """

    def __init__(self, hosts: Sequence[str], link: Link = Link(), *,
                 links: Mapping[tuple[str, str], Link] | None = None, seed: int = 0) -> None:
        if not hosts or len(hosts) > 250 or len(set(hosts)) != len(hosts):
            raise ValueError("give 1 to 250 distinct host names")
        unknown = {h for pair in (links or {}) for h in pair} - set(hosts)
        if unknown:
            raise ValueError(f"links name unknown hosts {sorted(unknown)}")
        self.hosts = list(hosts)
        self.link = link
        self.links = dict(links or {})
        self.seed = seed
        tag = f"{PREFIX}{os.getpid()}x{next(_counter)}"
        self._ns = {h: f"{tag}h{i}" for i, h in enumerate(self.hosts)}
        self._ip = {h: f"{SUBNET}.{i + 1}" for i, h in enumerate(self.hosts)}
        self._dir = Path(tempfile.mkdtemp(prefix="sswan-"))
        self._forwarder: subprocess.Popen[str] | None = None
        self._procs: list[subprocess.Popen[Any]] = []

    # -- lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> Wan:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, timeout_s: float = 60.0) -> None:
        """Create the namespaces, start the forwarder, address and raise every `tun0`.

        Raises:
            RuntimeError: a namespace cannot be created or the forwarder did not come up.
        """
        why = unavailable_reason()
        if why is not None:
            raise RuntimeError(f"cannot build a WAN here: {why}")
        cleanup_leftovers()
        try:
            for ns in self._ns.values():
                _ip("netns", "add", ns)
                _ip("-n", ns, "link", "set", "lo", "up")
            spec = {
                "hosts": [{"ns": self._ns[h], "ip": self._ip[h]} for h in self.hosts],
                "links": {f"{a}>{b}": asdict(self._link(a, b)) for a in self.hosts for b in self.hosts if a != b},
                "names": self.hosts,
                "seed": self.seed,
                "stats": str(self._dir / "stats.json"),
            }
            (self._dir / "spec.json").write_text(json.dumps(spec))
            self._forwarder = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "forward", str(self._dir / "spec.json")],
                stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, start_new_session=True,
            )
            assert self._forwarder.stdout is not None
            sel = selectors.DefaultSelector()
            sel.register(self._forwarder.stdout, selectors.EVENT_READ)
            ready = sel.select(timeout_s)
            line = self._forwarder.stdout.readline().strip() if ready else ""
            if line != "READY":
                raise RuntimeError(f"the WAN forwarder did not start (said {line!r})")
            for h in self.hosts:
                ns = self._ns[h]
                _ip("-n", ns, "addr", "add", f"{self._ip[h]}/24", "dev", "tun0")
                _ip("-n", ns, "link", "set", "tun0", "mtu", str(MTU), "up")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Kill every process started in the namespaces and the forwarder; delete the namespaces."""
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=30)
        self._procs.clear()
        for ns in self._ns.values():
            _kill_namespace(ns)
        if self._forwarder is not None:
            if self._forwarder.poll() is None:
                self._forwarder.terminate()
                try:
                    self._forwarder.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._forwarder.kill()
                    self._forwarder.wait(timeout=10)
            if self._forwarder.stdout is not None:
                self._forwarder.stdout.close()
            self._forwarder = None
        shutil.rmtree(self._dir, ignore_errors=True)

    # -- use -----------------------------------------------------------------------------------

    def ip(self, host: str) -> str:
        """The host's address, e.g. '198.18.0.1'."""
        return self._ip[host]

    def namespace(self, host: str) -> str:
        """The host's network namespace name (for `ip netns exec`)."""
        return self._ns[host]

    def popen(self, host: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start `argv` inside `host`'s namespace (its own process group); `close()` kills it.

        Keyword arguments go to `subprocess.Popen` (stdout, stderr, env, cwd, text, ...).
        """
        proc = subprocess.Popen(["ip", "netns", "exec", self._ns[host], *argv], start_new_session=True, **kwargs)
        self._procs.append(proc)
        return proc

    def run(self, host: str, argv: Sequence[str], timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside `host`'s namespace to completion; returns its captured output."""
        return subprocess.run(["ip", "netns", "exec", self._ns[host], *argv], capture_output=True, text=True,
                              timeout=timeout_s, check=False)

    def link_stats(self) -> dict[str, dict[str, int]]:
        """Per direction 'a>b': packets forwarded, dropped by loss, dropped by a full queue, bytes.

        The forwarder writes its counters twice a second; a just-sent packet may not show yet.
        """
        try:
            return dict(json.loads((self._dir / "stats.json").read_text()))
        except (OSError, ValueError):
            return {}

    def _link(self, a: str, b: str) -> Link:
        return self.links.get((a, b), self.link)


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


# -- the forwarder (a process of its own) ---------------------------------------------------------


def _open_tun_in(ns: str, libc: Any, home: int) -> int:
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(target, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {ns} failed")
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", b"tun0", _IFF_TUN | _IFF_NO_PI))
    finally:
        os.close(target)
        if libc.setns(home, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns back home failed")
    return fd


def forward(spec_path: str) -> None:
    """Run the link emulator until SIGTERM or until the harness that started it is gone."""
    spec = json.loads(Path(spec_path).read_text())
    names: list[str] = spec["names"]
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    fds = [_open_tun_in(h["ns"], libc, home) for h in spec["hosts"]]
    by_ip = {socket.inet_aton(h["ip"]): i for i, h in enumerate(spec["hosts"])}
    links = {}
    for key, value in spec["links"].items():
        a, b = key.split(">")
        links[(names.index(a), names.index(b))] = Link(**value)
    stats = {key: {"packets": 0, "bytes": 0, "lost": 0, "queue_drops": 0} for key in spec["links"]}
    rng = random.Random(spec["seed"])
    busy_until: dict[tuple[int, int], float] = {}
    pending: list[tuple[float, int, int, bytes]] = []
    seq = itertools.count()
    parent = os.getppid()
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    sel = selectors.DefaultSelector()
    for i, fd in enumerate(fds):
        sel.register(fd, selectors.EVENT_READ, i)
    print("READY", flush=True)
    last_stats = 0.0
    while not stopping and os.getppid() == parent:
        now = time.monotonic()
        timeout = 0.5 if not pending else max(0.0, pending[0][0] - now)
        for key, _ in sel.select(min(timeout, 0.5)):
            src = key.data
            while True:
                try:
                    packet = os.read(fds[src], 65536)
                except BlockingIOError:
                    break
                dst = by_ip.get(packet[16:20]) if len(packet) >= 20 and packet[0] >> 4 == 4 else None
                if dst is None or dst == src:
                    continue  # IPv6 chatter, or an address that is not a host: nowhere to go
                link = links[(src, dst)]
                counters = stats[f"{names[src]}>{names[dst]}"]
                if link.loss and rng.random() < link.loss:
                    counters["lost"] += 1
                    continue
                t = time.monotonic()
                if link.rate_mbit:
                    start = max(t, busy_until.get((src, dst), t))
                    if start - t > link.queue_ms / 1000:
                        counters["queue_drops"] += 1
                        continue
                    busy_until[(src, dst)] = start + len(packet) * 8 / (link.rate_mbit * 1e6)
                    t = busy_until[(src, dst)]
                heapq.heappush(pending, (t + link.delay_ms / 1000, next(seq), dst, packet))
                counters["packets"] += 1
                counters["bytes"] += len(packet)
        now = time.monotonic()
        while pending and pending[0][0] <= now:
            _, _, dst, packet = heapq.heappop(pending)
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(fds[dst], packet)
        if now - last_stats > 0.5:
            last_stats = now
            tmp = spec["stats"] + ".tmp"
            Path(tmp).write_text(json.dumps(stats))
            os.replace(tmp, spec["stats"])
    for fd in fds:
        os.close(fd)


# -- measurements ---------------------------------------------------------------------------------

_ECHO_SERVER = """
import socket, sys
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], 7000)); srv.listen(4); print("LISTENING", flush=True)
while True:
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    mode = conn.recv(1)
    if mode == b"e":
        while (data := conn.recv(65536)):
            conn.sendall(data)
    else:
        n = 0
        while (data := conn.recv(1 << 20)):
            n += len(data)
        conn.sendall(str(n).encode())
    conn.close()
"""

_ECHO_CLIENT = """
import json, socket, sys, time
host, rounds, megabytes = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
def connect():
    for _ in range(100):
        try:
            return socket.create_connection((host, 7000), timeout=30)
        except OSError:
            time.sleep(0.1)
    raise SystemExit("no echo server")
c = connect(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1); c.sendall(b"e")
rtts = []
for _ in range(rounds):
    t = time.perf_counter(); c.sendall(b"x" * 64); got = 0
    while got < 64:
        got += len(c.recv(64 - got))
    rtts.append((time.perf_counter() - t) * 1000)
c.close()
c = connect(); c.sendall(b"t"); blob = b"\\0" * (1 << 20); t = time.perf_counter()
for _ in range(int(megabytes)):
    c.sendall(blob)
c.shutdown(socket.SHUT_WR); n = int(c.recv(64)); dt = time.perf_counter() - t
print(json.dumps({"rtt_ms": sorted(rtts), "bytes": n, "seconds": dt}))
"""


def measure(link: Link, *, rounds: int = 50, megabytes: float = 8) -> dict[str, Any]:
    """RTT (small TCP echo), throughput (bulk TCP) and the loss the forwarder applied, over `link`."""
    with Wan(["a", "b"], link) as wan:
        server = wan.popen("b", [sys.executable, "-c", _ECHO_SERVER, wan.ip("b")], stdout=subprocess.PIPE, text=True)
        assert server.stdout is not None
        server.stdout.readline()
        done = wan.run("a", [sys.executable, "-c", _ECHO_CLIENT, wan.ip("b"), str(rounds), str(megabytes)],
                       timeout_s=600)
        if done.returncode != 0:
            raise RuntimeError(f"echo client failed: {done.stderr.strip()}")
        out = json.loads(done.stdout)
        time.sleep(1.0)  # let the forwarder write its counters
        stats = wan.link_stats()
    rtts = out["rtt_ms"]
    sent = sum(s["packets"] + s["lost"] + s["queue_drops"] for s in stats.values())
    lost = sum(s["lost"] for s in stats.values())
    return {
        "link": asdict(link),
        "rtt_ms": {"min": rtts[0], "median": rtts[len(rtts) // 2], "p90": rtts[int(len(rtts) * 0.9)]},
        "throughput_mbit": out["bytes"] * 8 / out["seconds"] / 1e6,
        "packets": sent,
        "lost": lost,
        "loss_applied": lost / sent if sent else 0.0,
        "queue_drops": sum(s["queue_drops"] for s in stats.values()),
    }


# -- running a deployment ----------------------------------------------------------------------------


def place_deployment(deployment_path: Path, wan: Wan, *, port: int = 5601) -> None:
    """Rewrite the deployment's endpoints to `tcp://IP(peer):port`; every peer is a host of `wan`.

    The policy names no endpoints, so its signatures stay valid.
    """
    import yaml

    text = deployment_path.read_text()
    data = yaml.safe_load(text)
    for name, peer in data["peers"].items():
        peer["endpoint"] = f"tcp://{wan.ip(name)}:{port}"
    header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
    deployment_path.write_text(header + yaml.safe_dump(data, sort_keys=False))


def run_deployment(generated: Any, link: Link, *, timeout_s: float = 300.0,
                   links: Mapping[tuple[str, str], Link] | None = None, seed: int = 0,
                   extra_args: Sequence[str] = ()) -> dict[str, Any]:
    """Run every peer of a generated deployment in its own host of an emulated WAN.

    Args:
        generated: what `secure_split.testing.generate_deployment` returns (its deployment's
            endpoints are rewritten in place to the hosts' addresses).
        link, links, seed: as for `Wan`; the hosts are named after the peers.
        timeout_s: every peer still running after this is killed (and reported with code None).
        extra_args: more `peer run` options for every peer.

    Returns:
        {"exit_codes": {peer: code}, "results": {peer: result JSON or {}}, "logs": {peer: path},
         "wall_s": seconds from the first start to the last exit, "link_stats": per direction}.
    """
    names = list(generated.peer_configs)
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")
    with Wan(names, link, links=links, seed=seed) as wan:
        place_deployment(Path(generated.deployment), wan)
        procs, logs = {}, {}
        started = time.monotonic()
        for name, cfg in generated.peer_configs.items():
            result = Path(generated.workdir) / "results" / f"{name}.json"
            result.parent.mkdir(parents=True, exist_ok=True)
            result.unlink(missing_ok=True)
            log = logs[name] = Path(generated.workdir) / "logs" / f"{name}.wan.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "wb") as fh:
                procs[name] = wan.popen(name, [sys.executable, "-m", "secure_split", "peer", "run", str(cfg),
                                               "--result", str(result), "--progress", "none", *extra_args],
                                        stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        codes: dict[str, int | None] = {}
        for name, proc in procs.items():
            try:
                codes[name] = proc.wait(timeout=max(1.0, timeout_s - (time.monotonic() - started)))
            except subprocess.TimeoutExpired:
                codes[name] = None
        wall = time.monotonic() - started
        stats = wan.link_stats()
    results = {}
    for name in names:
        path = Path(generated.workdir) / "results" / f"{name}.json"
        results[name] = json.loads(path.read_text()) if path.is_file() else {}
    return {"exit_codes": codes, "results": results, "logs": {n: str(p) for n, p in logs.items()},
            "wall_s": wall, "link_stats": stats}


def _link_from(args: argparse.Namespace) -> Link:
    return Link(delay_ms=args.delay_ms, loss=args.loss, rate_mbit=args.rate_mbit)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    fw = sub.add_parser("forward", help="(internal) the link emulator process")
    fw.add_argument("spec")
    sub.add_parser("cleanup", help="remove namespaces a crashed harness left behind")
    for name in ("measure", "run"):
        p = sub.add_parser(name)
        p.add_argument("--delay-ms", type=float, default=20.0)
        p.add_argument("--loss", type=float, default=0.005)
        p.add_argument("--rate-mbit", type=float, default=None)
        if name == "run":
            p.add_argument("scenario")
            p.add_argument("--max-steps", type=int, default=5)
            p.add_argument("--timeout-s", type=float, default=300.0)
    args = parser.parse_args(argv)
    if args.cmd == "forward":
        forward(args.spec)
        return 0
    if args.cmd == "cleanup":
        print("\n".join(cleanup_leftovers()) or "nothing left behind")
        return 0
    if (why := unavailable_reason()) is not None:
        print(f"cannot build a WAN here: {why}", file=sys.stderr)
        return 2
    if args.cmd == "measure":
        print(json.dumps(measure(_link_from(args)), indent=1))
        return 0
    return _run_scenario(args)


def _run_scenario(args: argparse.Namespace) -> int:
    import yaml

    from secure_split.testing import generate_deployment

    with tempfile.TemporaryDirectory(prefix="sswan-run-") as tmp:
        gen = generate_deployment(args.scenario, tmp, epochs=1)
        data = yaml.safe_load(gen.deployment.read_text())
        data["training"]["max_steps_per_epoch"] = args.max_steps
        gen.deployment.write_text(yaml.safe_dump(data, sort_keys=False))
        out = run_deployment(gen, _link_from(args), timeout_s=args.timeout_s)
        timing = (out["results"].get(data["coordinator"], {}).get("metrics", {}).get("timing") or [{}])[0]
        steps = timing.get("train_steps") or 0
        print(json.dumps({"exit_codes": out["exit_codes"], "wall_s": out["wall_s"],
                          "train_ms_per_step": 1000 * timing.get("train_s", 0.0) / steps if steps else None,
                          "link_stats": out["link_stats"]}, indent=1))
        return 0 if all(c == 0 for c in out["exit_codes"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
