"""Everything one peer loads and checks before it opens a socket.

`PeerContext.load(config_path)` reads the private peer config, the shared deployment, the key file
and the policy, and refuses to go on (a `ConfigError` listing every problem, with file and key)
when the key does not match the deployment or the policy does not allow what the topology needs.
Nothing here talks to another party; the node (`peer/node.py`) starts from a loaded context.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from secure_split.architecture import SegmentSource, segment_sources
from secure_split.config import Deployment, PeerConfig, load_deployment, load_peer_config, own_key_problems
from secure_split.crypto.keys import Identity, load_identity
from secure_split.engine.data import (
    PeerData,
    Preprocessing,
    SiteData,
    fit_preprocessing,
    load_checked_site_data,
)
from secure_split.engine.executor import PeerExecutor
from secure_split.engine.schedule import split_train_test
from secure_split.errors import ConfigError, ConfigProblem
from secure_split.policy import Policy, check_startup, load_policy, required_flows
from secure_split.topology import Topology

__all__ = ["PeerContext", "PeerResult", "clip"]


def clip(text: str, limit: int = 3000) -> str:
    """Cut text to at most `limit` UTF-8 bytes (the audit log refuses strings over 4 KiB)."""
    data = text.encode("utf-8")
    return text if len(data) <= limit else data[:limit].decode("utf-8", errors="ignore")


@dataclass
class PeerResult:
    """What a peer reports when it exits (the demo's table and summary read these)."""

    name: str
    pid: int
    status: str = "failed"
    error: str | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0
    messages_received: int = 0
    refused: int = 0
    epochs_done: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0
    # The ExitCode of the error that stopped this peer (0 when it did not stop on an error of its own).
    exit_code: int = 0

    def to_json(self) -> dict[str, Any]:
        """Plain values (the `--result` file)."""
        return asdict(self)


@dataclass
class PeerContext:
    """One peer's loaded and checked files.

    Attributes:
        cfg: the private peer config.
        deployment: the shared deployment.
        identity: this peer's secret keys.
        policy: the signed policy.
        topology: the deployment's segments and edges.
        counterparties: every peer this one exchanges messages with (from the required flows).
        site: this peer's rows as read from its data source and checked against the deployment
            (None for a peer that holds no data); preprocessing is fitted later, on the
            training rows of the aligned ids (`training_data`).
        sources: where each of this peer's segments gets its model (the deployment's public
            layers, a preset, or a private model of this peer config, checked against the
            deployment's commitment when built).
    """

    cfg: PeerConfig
    deployment: Deployment
    identity: Identity
    policy: Policy
    topology: Topology
    counterparties: list[str]
    site: SiteData | None = None
    sources: dict[str, SegmentSource] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    @property
    def me(self) -> str:
        """This peer's name."""
        return self.cfg.name

    @property
    def is_coordinator(self) -> bool:
        """Whether this peer drives the schedule."""
        return self.deployment.spec.coordinator == self.me

    @property
    def audit_path(self) -> Path:
        """This peer's audit log file."""
        return self.cfg.audit_dir / f"{self.me}.jsonl"

    @classmethod
    def load(cls, config_path: str | Path) -> PeerContext:
        """Load and check a peer's files.

        Raises:
            ConfigError: every problem found (unreadable files, a key that is not this peer's, a
                policy that does not allow what the topology needs).
        """
        cfg = load_peer_config(config_path)
        deployment = load_deployment(cfg.deployment_path)
        me = cfg.name
        spec = deployment.spec
        if me not in spec.peers:
            raise ConfigError(ConfigProblem(str(cfg.path), "peer", f"'{me}' is not a peer of deployment {deployment.path}"))
        identity = load_identity(cfg.secret_key_path)
        problems = own_key_problems(deployment, me, identity.sign_key_hex, identity.transport_public_z85,
                                    cfg.secret_key_path)
        if identity.name != me:
            problems.append(ConfigProblem(str(cfg.secret_key_path), "peer", f"key file is for '{identity.name}', not '{me}'"))
        if problems:
            raise ConfigError(problems)
        policy = load_policy(deployment.policy_path)
        check_startup(policy, deployment)
        # Data before any network: a file that does not fit the deployment fails here, named.
        site = load_checked_site_data(cfg, deployment)
        sources = segment_sources(deployment, cfg)
        return cls(cfg, deployment, identity, policy, Topology.from_deployment(deployment),
                   counterparties(deployment, policy, me), site, sources)

    def executor(self, data: PeerData | None, **options: Any) -> PeerExecutor:
        """This peer's executor over `data`, with its segments' sources and its device.

        Raises:
            ConfigError: a model that does not build, match its commitment or fit its data.
        """
        return PeerExecutor(self.deployment, self.me, data, sources=self.sources, device=self.cfg.spec.device,
                            **options)

    def training_data(self, ids: np.ndarray | None = None, *, positions: bool = False
                      ) -> tuple[PeerData | None, Preprocessing | None]:
        """This peer's rows, restricted to `ids` (the aligned ids) when given, preprocessed with a
        transform fitted on its training rows only.

        The training rows are the coordinator's split: `split_train_test` of the aligned ids
        (every party of a PSI holds the same intersection), or, where a horizontal coordinator
        schedules row positions (`positions`), of the positions 0..N-1 of the sorted ids.

        Returns:
            (the data the executor reads, the fitted preprocessing); (None, None) without data.
        """
        if self.site is None:
            return None, None
        site = self.site if ids is None else self.site.subset(ids)
        training = self.deployment.spec.training
        if positions:
            order = np.sort(site.ids)
            train_ids = order[split_train_test(np.arange(len(order)), training.test_fraction, training.seed)[0]]
        else:
            train_ids = split_train_test(site.ids, training.test_fraction, training.seed)[0]
        prep = fit_preprocessing(site, train_ids)
        return prep.apply(site), prep

    def resume_problem(self) -> str | None:
        """Why `--resume` cannot continue this peer's audit log under this deployment, or None."""
        log_path = self.audit_path
        try:
            with open(log_path, "rb") as fh:
                theirs = json.loads(fh.readline(1 << 20))["data"]["deployment_hash"]
        except (OSError, ValueError, KeyError, TypeError):
            return None  # no log yet, or one the audit layer judges when it opens it
        if not isinstance(theirs, str) or theirs == self.deployment.hash:
            return None
        return (
            f"cannot resume: audit log {log_path} was written under deployment {theirs}, but {self.deployment.path} "
            f"now hashes to {self.deployment.hash}; --resume needs the same deployment.yaml (training settings included) "
            "at every peer; to change it, start a new run with fresh audit and checkpoint folders"
        )

    def new_result(self) -> PeerResult:
        """An empty result for this peer and process."""
        return PeerResult(name=self.me, pid=os.getpid())


def counterparties(deployment: Deployment, policy: Policy, me: str) -> list[str]:
    """Every peer `me` exchanges messages with in training: those the topology's required flows
    name, less the serving flows."""
    peers: set[str] = set()
    for flow in required_flows(deployment, policy=policy):
        if flow.serving:
            continue  # split inference only (`serve` and `predict` pick their own counterparties)
        if flow.sender == me:
            peers.add(flow.receiver)
        elif flow.receiver == me:
            peers.add(flow.sender)
    peers.discard(me)
    return sorted(peers)
