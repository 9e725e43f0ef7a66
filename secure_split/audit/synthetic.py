"""A synthetic three-peer run's audit logs, written by the real `AuditLog`: for tests and benchmarks.

The run imitates what the gate and the peer write for a vertical split (two hospitals' bottom
segments feed a lab's top segment), in format 2: handshakes (each HELLO carries the run nonce),
the run bound at the start barrier (`bind_run`), a `step_begin` / `activation` / `gradient`
exchange per step, a barrier every `steps_per_barrier` steps at which every peer saves a
checkpoint, signs its head and exchanges it (`audit_receipt`), the hospitals sign their own epoch
metrics and the lab records them as theirs, a shutdown, and the close round. Every message is
logged by sender and receiver with the same digest. With `crash_at`, every peer is killed after
that step (a message in flight) and the run resumes as a new run segment naming the previous run.

No torch, no sockets: only the writer, so the logs are exactly what a real run would produce
in format, and the verifier can be tested on them at any size.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from secure_split.audit.writer import AuditLog
from secure_split.canonical import digest_of

PEERS: tuple[str, ...] = ("hospital_a", "hospital_b", "lab")
"""The synthetic run's peers: two feature owners and the label holder (coordinator)."""

_START_NS = 1_767_225_600 * 10**9  # 2026-01-01T00:00:00Z
_BATCH = 64
_WIDTH = 16


@dataclass(frozen=True)
class SyntheticRun:
    """Where a synthetic run's files are, and what it wrote.

    Attributes:
        directory: the run folder (deployment.yaml, audit/).
        log_dir: the folder of the logs (`audit/`).
        deployment_path: the public deployment file with the peers' public keys.
        deployment_hash: its hash.
        policy_path: the policy the run's flows comply with (None when none was written).
        policy_hash: the policy hash every entry carries.
        entries: entries written, per peer.
        identities: peer -> the identity that signed its log (secret: for tests only).
    """

    directory: Path
    log_dir: Path
    deployment_path: Path
    deployment_hash: str
    policy_path: Path | None
    policy_hash: str
    entries: dict[str, int]
    identities: dict[str, Any]

    @property
    def total_entries(self) -> int:
        """Entries across all peers."""
        return sum(self.entries.values())


def write_deployment(directory: Path, identities: dict[str, Any], *, policy_file: str = "policy.yaml") -> Path:
    """Write the synthetic run's public deployment.yaml (three peers, vertical split).

    Args:
        directory: where to write it.
        identities: peer -> `Identity` (public halves go into the file).
        policy_file: the policy file the deployment names (need not exist).

    Returns:
        The deployment file's path.
    """
    dep = {
        "version": 1,
        "name": "synthetic-audit",
        "coordinator": "lab",
        "policy": policy_file,
        "peers": {
            name: {
                "endpoint": f"tcp://127.0.0.1:{5701 + i}",
                "sign_key": identities[name].sign_key_hex,
                "transport_key": identities[name].transport_public_z85,
            }
            for i, name in enumerate(PEERS)
        },
        "segments": {
            "bottom_a": {"peer": "hospital_a", "input": "features", "model": [{"linear": {"in": 15, "out": _WIDTH}}]},
            "bottom_b": {"peer": "hospital_b", "input": "features", "model": [{"linear": {"in": 15, "out": _WIDTH}}]},
            "top": {"peer": "lab", "merge": "concat", "loss": "cross_entropy",
                    "model": [{"linear": {"in": 2 * _WIDTH, "out": 2}}]},
        },
        "edges": [{"from": "bottom_a", "to": "top"}, {"from": "bottom_b", "to": "top"}],
    }
    path = directory / "deployment.yaml"
    path.write_text("# Synthetic deployment for the audit log tests and benchmark (public keys only).\n"
                    + yaml.safe_dump(dep, sort_keys=False))
    return path


class _Run:
    """The simulated peers: their logs, sessions and protocol counters."""

    def __init__(self, logs: dict[str, AuditLog], seed: int, keys: dict[str, str], policy: Any = None) -> None:
        self.logs = logs
        self.keys = keys
        self.policy = policy
        self.rules: dict[tuple[Any, ...], str] = {}
        self.seed = seed
        self.pseq: dict[tuple[str, str], int] = {}
        self.sessions: dict[frozenset[str], str] = {}

    def session(self, a: str, b: str) -> str:
        """The session id (hex) of the pair a, b: one per pair, as the handshake makes it."""
        key = frozenset((a, b))
        if key not in self.sessions:
            self.sessions[key] = hashlib.sha256(f"{self.seed}:{sorted(key)}".encode()).hexdigest()[:32]
        return self.sessions[key]

    def message(self, sender: str, receiver: str, kind: str, step: int, *, edge: str = "",
                shape: list[int] | None = None, dtype: str | None = None, deliver: bool = True) -> None:
        """One message, logged by its sender (message_sent) and, when delivered, its receiver (message_received)."""
        n = self.pseq.get((sender, receiver), 0 if kind == "hello" else 1)
        if kind == "hello":
            n = 0  # a HELLO is bound to the zero session with seq 0
        else:
            self.pseq[(sender, receiver)] = n + 1
        itemsize = {"float32": 4, "int64": 8}.get(dtype or "", 0)
        nbytes = itemsize
        for d in shape or []:
            nbytes *= d
        digest = hashlib.sha256(f"{self.seed}:{sender}:{receiver}:{n}:{kind}:{step}".encode()).hexdigest()
        batch = shape[0] if shape else None
        fields = {
            "kind": kind, "edge": edge, "step": step, "seq": n,
            "session": "0" * 32 if kind == "hello" else self.session(sender, receiver),
            "sender": sender, "receiver": receiver, "nbytes": nbytes, "dtype": dtype, "shape": shape,
            "batch_size": batch, "digest": digest,
        }
        sides = (("send", "message_sent", receiver), ("receive", "message_received", sender))
        for side, event, counterparty in sides if deliver else sides[:1]:
            rule = self.rule(side, sender, receiver, kind, edge, nbytes, dtype, shape, batch)
            decision_id = "d-" + hashlib.sha256(f"{digest}:{side}".encode()).hexdigest()[:16]
            self.logs[sender if side == "send" else receiver].record(
                event, counterparty=counterparty, decision_id=decision_id, rule_id=rule, **fields)

    def rule(self, direction: str, sender: str, receiver: str, kind: str, edge: str, nbytes: int,
             dtype: str | None, shape: list[int] | None, batch: int | None) -> str:
        """The id of the policy rule that allows this flow (what the gate would log)."""
        key = (direction, sender, receiver, kind, edge, nbytes, dtype, tuple(shape or ()), batch)
        if key not in self.rules:
            if self.policy is None:
                self.rules[key] = f"allow-{kind}"
            else:
                from secure_split.policy import Flow

                flow = Flow(sender=sender, receiver=receiver, kind=kind, edge=edge or None, direction=direction,  # type: ignore[arg-type]
                            nbytes=nbytes, dtype=dtype, shape=tuple(shape) if shape else None, batch_size=batch)
                self.rules[key] = self.policy.decide(flow).rule_id
        return self.rules[key]

    def bind(self, previous: dict[str, Any] | None = None) -> str:
        """The start barrier: the lab announces run id and every nonce; each peer records run_bound."""
        from secure_split.audit.format import compute_run_id

        nonces = {p: log.run_nonce for p, log in self.logs.items()}
        lab = self.logs["lab"]
        run_id = compute_run_id(lab._deployment_hash, lab._policy_hash, nonces)
        for log in self.logs.values():
            log.bind_run(run_id, nonces, previous)
        return run_id

    def exchange_heads(self, heads: dict[str, Any], step: int) -> None:
        """Signed heads sent (audit_receipt) and recorded between the lab and each hospital."""
        for p, q in (("hospital_a", "lab"), ("hospital_b", "lab"), ("lab", "hospital_a"), ("lab", "hospital_b")):
            self.message(p, q, "audit_receipt", step)
            self.logs[q].record_counterparty_head(heads[p], self.keys[p])

    def barrier(self, epoch: int, step: int) -> None:
        """A step barrier: checkpoints, signed heads exchanged and recorded, signed metrics in the acks."""
        for p in ("hospital_a", "hospital_b"):
            self.message("lab", p, "barrier", step)
        heads = {}
        for p, log in self.logs.items():
            log.record("checkpoint_saved", epoch=epoch,
                       digest=hashlib.sha256(f"{self.seed}:{p}:ckpt:{epoch}".encode()).hexdigest())
            heads[p] = log.checkpoint(f"epoch_end barrier, epoch {epoch}")
        self.exchange_heads(heads, step)
        for p in ("hospital_a", "hospital_b"):
            if self.logs[p].run_id:
                statement = self.logs[p].record_epoch_metrics(epoch, {"rows": 64 * step, "loss": 0.5})
                self.message(p, "lab", "barrier_ack", step)
                self.logs["lab"].record_counterparty_metrics(statement, self.keys[p])
            else:
                self.message(p, "lab", "barrier_ack", step)
        if self.logs["lab"].run_id:
            self.logs["lab"].record_epoch_metrics(epoch, {"accuracy": 0.9, "loss": 0.3})

    def close_round(self, step: int) -> None:
        """run_end, close heads exchanged and recorded, final heads."""
        heads = {p: log.begin_close("ok", metrics={"steps": step}) for p, log in self.logs.items()}
        self.exchange_heads(heads, step)
        for log in self.logs.values():
            log.finish_close()

    def step(self, step: int) -> None:
        """One training step: step_begin, activations, gradients."""
        for p in ("hospital_a", "hospital_b"):
            self.message("lab", p, "step_begin", step, shape=[_BATCH], dtype="int64")
        for p, seg in (("hospital_a", "bottom_a"), ("hospital_b", "bottom_b")):
            self.message(p, "lab", "activation", step, edge=f"{seg}->top", shape=[_BATCH, _WIDTH], dtype="float32")
        for p, seg in (("hospital_a", "bottom_a"), ("hospital_b", "bottom_b")):
            self.message("lab", p, "gradient", step, edge=f"{seg}->top", shape=[_BATCH, _WIDTH], dtype="float32")


def generate_logs(
    directory: str | Path,
    *,
    entries: int = 10_000,
    steps_per_barrier: int = 20,
    seed: int = 0,
    policy_hash: str | None = None,
    identities: dict[str, Any] | None = None,
    clock: Callable[[], int] | None = None,
    crash_at: int | None = None,
    unbound: bool = False,
) -> SyntheticRun:
    """Write a synthetic run's deployment and three peers' audit logs (format 2).

    Args:
        directory: the run folder (created); logs go to `directory/audit/PEER.jsonl`.
        entries: at least this many entries in total across the three peers.
        steps_per_barrier: steps between signed checkpoints (20 gives one checkpoint per ~70-130
            entries per peer, like a step barrier).
        seed: makes digests and sessions reproducible (keys and nonces are fresh unless given).
        policy_hash: the policy hash entries carry. Default: write `policy.yaml`, the policy
            `secure_split.policy.policy_for_deployment` makes for the deployment (which allows
            exactly the run's flows), and use its hash.
        identities: peer -> `Identity` to sign with (default: freshly generated).
        clock: nanosecond clock for entry times (default: a fixed start, +250 µs per entry).
        crash_at: kill every peer after this step (the lab's last gradient to hospital_a in
            flight: logged as sent, never received), then resume as a new run segment.
        unbound: the peers run no start barrier (no run id) and no close round (`AuditLog.close`),
            as a failed start does, and as a peer layer that does not run them yet.

    Returns:
        Where everything is and how many entries each peer wrote.
    """
    from secure_split.config import load_deployment
    from secure_split.crypto.keys import generate_identity

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    ids = identities or {p: generate_identity(p) for p in PEERS}
    dep_path = write_deployment(root, ids)
    dep = load_deployment(dep_path)
    policy_path, pol = _write_policy(root, dep) if policy_hash is None else (None, policy_hash)
    tick = [_START_NS]

    def fixed_clock() -> int:
        tick[0] += 250_000
        return tick[0]

    clk = clock or fixed_clock
    log_dir = root / "audit"
    policy = _load(policy_path)
    keys = {p: ids[p].sign_key_hex for p in PEERS}

    def start(run_seed: int, resume: bool) -> _Run:
        logs = {p: AuditLog.open(log_dir / f"{p}.jsonl", peer=p, identity=ids[p], deployment_hash=dep.hash,
                                 policy_hash=pol, clock=clk, resume=resume,
                                 versions={"secure_split": "0.1.0", "protocol": 1}) for p in PEERS}
        run = _Run(logs, run_seed, keys, policy)
        run.rules = rules
        for p in ("hospital_a", "hospital_b"):
            logs["lab"].record("peer_joined", counterparty=p, reason="handshake complete")
            logs[p].record("peer_joined", counterparty="lab", reason="handshake complete")
            run.message("lab", p, "hello", 0)
            run.message(p, "lab", "hello", 0)
        return run

    rules: dict[tuple[Any, ...], str] = {}
    run = start(seed, False)
    if not unbound:
        run.bind()
    run.barrier(-1, 0)
    # Entries still to come after the loop: the last barrier (~35), shutdown (4) and the close round (~20).
    closing = 60
    step = 0
    epoch = 0

    def total() -> int:
        return sum(log.seq + 1 for log in run.logs.values())

    while total() + closing < entries or step == 0:
        step += 1
        run.step(step)
        if step % steps_per_barrier == 0:
            run.barrier(epoch, step)
            epoch += 1
        if crash_at is not None and step == crash_at:
            run.message("lab", "hospital_a", "step_begin", step + 1, shape=[_BATCH], dtype="int64", deliver=False)
            for log in run.logs.values():
                log._sink.close()  # killed: no run_end, no close round; the OS closes the file
            previous = {"run_id": run.logs["lab"].run_id,
                        "heads": {p: {"seq": log.seq, "head": log.head} for p, log in run.logs.items()}}
            run = start(seed + 1, True)
            run.bind(previous)
            run.barrier(epoch - 1, step)
            crash_at = None
    run.barrier(epoch, step + 1)
    for p in ("hospital_a", "hospital_b"):
        run.message("lab", p, "shutdown", step + 1)
    if unbound:
        for log in run.logs.values():
            log.close("ok", metrics={"steps": step + 1})
    else:
        run.close_round(step + 1)
    counts = {p: sum(1 for _ in (log_dir / f"{p}.jsonl").open("rb")) for p in PEERS}
    return SyntheticRun(root, log_dir, dep_path, dep.hash, policy_path, pol, counts, ids)


def _load(policy_path: Path | None) -> Any:
    if policy_path is None:
        return None
    from secure_split.policy import load_policy

    return load_policy(policy_path)


def _write_policy(root: Path, deployment: Any) -> tuple[Path | None, str]:
    """Write the deployment's own policy and return (path, hash); a synthetic hash without the engine."""
    try:
        from secure_split.policy import load_policy, policy_for_deployment
    except ImportError:
        return None, digest_of({"synthetic_policy": deployment.hash})
    path = root / "policy.yaml"
    path.write_text("# Synthetic run's policy: exactly the flows the deployment needs.\n"
                    + yaml.safe_dump(policy_for_deployment(deployment, name="synthetic-audit-v1"), sort_keys=False))
    return path, load_policy(path).hash
