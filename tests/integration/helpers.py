"""Helpers for integration tests: run the real CLI in real processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


def cli(*args: str, timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m secure_split ARGS` and capture its output."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "secure_split", *args],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd, check=False,
    )


def run_demo(tmp_path: Path, scenario: str, *extra: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """Run a demo into tmp_path/work and return the process and its summary JSON."""
    summary = tmp_path / "summary.json"
    proc = cli("demo", scenario, "--workdir", str(tmp_path / "work"), "--summary", str(summary), "--quiet",
               *extra, timeout=timeout)
    data = json.loads(summary.read_text()) if summary.is_file() else {}
    return proc, data


# -- multi-process peer runs (failure-path tests) ------------------------------------------------

PY_ENV = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@dataclass
class PeerProc:
    """One `secure-split peer run` process started by a test."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    result: Path

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            self.proc.kill()
            self.proc.wait(timeout=30)

    @property
    def stderr(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else ""

    def result_json(self) -> dict[str, Any]:
        return json.loads(self.result.read_text()) if self.result.is_file() else {}


def start_peer(config: Path, *, workdir: Path, tag: str = "", resume: bool = False,
               extra: tuple[str, ...] = (), prefix: tuple[str, ...] = (),
               module: tuple[str, ...] = ("secure_split", "peer", "run")) -> PeerProc:
    """Start `secure-split peer run CONFIG` as its own OS process; stderr+stdout go to logs/.

    `prefix` goes before the interpreter (e.g. `prlimit --nofile=1024 --`); `module` replaces
    `-m secure_split peer run` (e.g. the adversary of `tests/integration/adversary.py`)."""
    name = config.stem
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}{tag}.log"
    result = workdir / "results" / f"{name}{tag}.json"
    result.parent.mkdir(parents=True, exist_ok=True)
    result.unlink(missing_ok=True)
    if module == ("secure_split", "peer", "run"):
        cmd = [*prefix, sys.executable, "-m", *module, str(config), "--result", str(result), "--progress", "none", *extra]
    else:
        cmd = [*prefix, sys.executable, "-m", *module, str(config), str(result), *extra]
    if resume:
        cmd.append("--resume")
    root = str(Path(__file__).resolve().parents[2])  # so that `-m tests....` modules import
    path = os.pathsep.join([root, *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])])
    with open(log, "wb") as fh:
        # SIGINT as from an operator's terminal: a test run started in the background by a
        # non-interactive shell inherits SIGINT ignored, and Python then installs no handler
        # for it, so the interrupt tests' Ctrl-C would do nothing.
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=dict(os.environ, **PY_ENV, PYTHONPATH=path), preexec_fn=_default_sigint)
    return PeerProc(name, proc, log, result)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_peers(gen: Any, names: list[str] | None = None, **kw: Any) -> dict[str, PeerProc]:
    """Start the named peers of a generated deployment (default: all of them)."""
    configs = gen.peer_configs
    return {n: start_peer(configs[n], workdir=gen.workdir, **kw) for n in (names or list(configs))}


def wait_peers(procs: dict[str, PeerProc], timeout: float) -> dict[str, int]:
    """Wait for every process (one shared deadline); kill all of them if it passes."""
    deadline = time.monotonic() + timeout
    codes: dict[str, int] = {}
    try:
        for name, p in procs.items():
            codes[name] = p.wait(max(0.1, deadline - time.monotonic()))
    finally:
        for p in procs.values():
            p.kill()
    return codes


def kill_all(procs: dict[str, PeerProc]) -> None:
    for p in procs.values():
        p.kill()


def last_segment(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The entries of a log's last run segment (serve and predict continue the training run's log
    in a new segment, which begins with `run_start`)."""
    starts = [i for i, e in enumerate(entries) if e["event"] == "run_start"]
    assert len(starts) >= 2, "a new run segment after training"
    return entries[starts[-1]:]


def audit_entries(path: Path) -> list[dict[str, Any]]:
    """The entries of one audit log (JSON lines); a line still being written is left out."""
    if not path.is_file():
        return []
    lines = path.read_text().split("\n")
    return [json.loads(line) for line in lines[:-1] if line.strip()]  # complete lines end with "\n"


def events(entries: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [e for e in entries if e.get("event") == event]


def run_cli_many(argvs: list[list[str]], timeout: float = 120) -> list[subprocess.CompletedProcess[str]]:
    """Run several `python -m secure_split ARGS` at once (they are independent); return in order."""
    env = dict(os.environ, **PY_ENV)
    procs = [subprocess.Popen([sys.executable, "-m", "secure_split", *a], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, stdin=subprocess.DEVNULL)
             for a in argvs]
    out = []
    deadline = time.monotonic() + timeout
    for a, p in zip(argvs, procs, strict=True):
        try:
            so, se = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            so, se = p.communicate()
        out.append(subprocess.CompletedProcess([*a], p.returncode, so, se))
    return out


@dataclass
class Deploy:
    """A generated deployment on disk: the shared files, every peer's private config."""

    workdir: Path
    deployment: Path
    policy: Path
    peer_configs: dict[str, Path]
    coordinator: str

    @property
    def audit_dir(self) -> Path:
        return self.workdir / "audit"

    def audit(self, peer: str) -> list[dict[str, Any]]:
        return audit_entries(self.audit_dir / f"{peer}.jsonl")

    def read_deployment(self) -> dict[str, Any]:
        return yaml.safe_load(self.deployment.read_text())

    def write_deployment(self, data: dict[str, Any]) -> None:
        self.deployment.write_text(yaml.safe_dump(data, sort_keys=False))


def generate_template(workdir: Path, scenario: str = "vanilla", **options: Any) -> Deploy:
    """Generate a demo deployment once (keys, data, signed policy); clone it per test."""
    from secure_split.scenarios import SCENARIOS, generate

    plan = SCENARIOS[scenario](1, **options)
    workdir.mkdir(parents=True, exist_ok=True)
    gen = generate(plan, workdir)
    return Deploy(gen.workdir, gen.deployment, gen.policy, dict(gen.peer_configs), plan.coordinator)


def clone_deployment(
    template: Deploy,
    dest: Path,
    *,
    epochs: int = 1,
    max_steps: int | None = 2,
    training: dict[str, Any] | None = None,
    limits: dict[str, Any] | None = None,
) -> Deploy:
    """Copy a generated deployment to `dest` with fresh loopback ports and a short schedule.

    Only `training` and `limits` change (and the endpoints), so the signed policy stays valid:
    it depends on the peers' keys, the batch size and `max_message_bytes`, which stay as they are.
    """
    shutil.copytree(template.workdir, dest, ignore=shutil.ignore_patterns("audit", "checkpoints", "results", "logs"))
    for sub in ("audit", "checkpoints", "results", "logs"):
        (dest / sub).mkdir(exist_ok=True)
    d = Deploy(dest, dest / template.deployment.name, dest / template.policy.name,
               {n: dest / "peers" / p.name for n, p in template.peer_configs.items()}, template.coordinator)
    data = d.read_deployment()
    data["training"] = {**data["training"], "epochs": epochs, "max_steps_per_epoch": max_steps, **(training or {})}
    data["limits"] = {**data["limits"], **(limits or {})}
    from secure_split.scenarios import free_ports

    for (_name, peer), port in zip(data["peers"].items(), free_ports(len(data["peers"])), strict=True):
        peer["endpoint"] = f"tcp://127.0.0.1:{port}"
    d.write_deployment(data)
    return d


def edit_policy(d: Deploy, edit: Any, *, sign: bool = True) -> None:
    """Apply `edit(mapping)` to the policy file and (by default) have every party sign it again."""
    from secure_split.crypto.keys import load_identity
    from secure_split.policy import sign_policy

    data = yaml.safe_load(d.policy.read_text())
    edit(data)
    d.policy.write_text(yaml.safe_dump(data, sort_keys=False))
    if sign:
        for name in d.peer_configs:
            sign_policy(d.policy, load_identity(d.workdir / "keys" / f"{name}.key"))


def wait_for(cond: Any, timeout: float, interval: float = 0.02) -> bool:
    """Poll `cond()` until it is true or `timeout` passes; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if cond():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def wait_for_training(d: Any, procs: dict[str, PeerProc], *, at: str = "label_holder", activations: int = 3,
                      timeout: float = 120) -> None:
    """Wait until `at` has logged `activations` received activations (training is under way), or
    fail the test with every peer's output."""
    def under_way() -> bool:
        got = [e for e in events(d.audit(at), "message_received") if e["data"]["kind"] == "activation"]
        return len(got) >= activations

    assert wait_for(under_way, timeout, interval=0.05), "".join(p.stderr for p in procs.values())


# -- two gates over real transports, in one test process ----------------------------------------


@dataclass
class GateSide:
    """One peer's gate, wired to a real CURVE transport and a real audit log."""

    name: str
    gate: Any
    transport: Any
    audit: Any
    audit_path: Path

    def entries(self) -> list[dict[str, Any]]:
        return audit_entries(self.audit_path)

    def receive(self, timeout: float = 10.0) -> Any:
        """The next message, or raise what the gate raises; fail if nothing arrives in time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = self.gate.receive(0.1)
            if msg is not None:
                return msg
        raise AssertionError(f"'{self.name}' received nothing within {timeout} s")


def gate_pair(d: Deploy, audit_dir: Path, policies: dict[str, Any] | None = None) -> dict[str, GateSide]:
    """Gates for every peer of deployment `d` (real keys, real Transports on loopback, real audit
    logs in `audit_dir`), handshaken with each other. `policies` overrides a peer's Policy object
    (its sessions still announce the deployment's signed policy hash, as after a handshake)."""
    from secure_split.audit import AuditLog
    from secure_split.config import load_deployment
    from secure_split.crypto.keys import load_identity
    from secure_split.peer.gate import Gate
    from secure_split.policy import load_policy
    from secure_split.protocol import PeerSession
    from secure_split.transport import Transport, TransportPeer

    dep = load_deployment(d.deployment)
    signed = load_policy(d.policy)
    spec = dep.spec
    sides: dict[str, GateSide] = {}
    for name, peer in spec.peers.items():
        ident = load_identity(d.workdir / "keys" / f"{name}.key")
        others = {n: TransportPeer(name=n, endpoint=p.endpoint, transport_key=p.transport_key)
                  for n, p in spec.peers.items() if n != name}
        transport = Transport(name, peer.endpoint, ident.transport_secret_z85, ident.transport_public_z85, others,
                              max_message_bytes=spec.limits.max_message_bytes, heartbeat_s=1.0,
                              handshake_timeout_s=10.0, linger_ms=0, send_timeout_s=10.0)
        transport.start()
        path = audit_dir / f"{name}.jsonl"
        audit = AuditLog.open(path, peer=name, identity=ident, deployment_hash=dep.hash, policy_hash=signed.hash)
        sessions = {n: PeerSession(name, n, dep.hash, signed.hash) for n in others}
        gate = Gate(me=name, deployment_hash=dep.hash, policy=(policies or {}).get(name, signed), audit=audit,
                    transport=transport, sessions=sessions, max_message_bytes=spec.limits.max_message_bytes)
        sides[name] = GateSide(name, gate, transport, audit, path)
    for side in sides.values():
        for other in side.gate.sessions:
            side.gate.send_hello(other)
    for side in sides.values():
        for _ in side.gate.sessions:
            assert side.receive().kind.value == "hello"
    return sides


def close_gates(sides: dict[str, GateSide]) -> None:
    for side in sides.values():
        try:
            side.audit.close("ok")
        finally:
            side.transport.close()
