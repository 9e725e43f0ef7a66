"""What a running peer shows its operators: Prometheus metrics, served on localhost by default.

The only importer of `prometheus_client`. Each `PeerMetrics` has its own registry (never the
process-global one), so several peers in one process (tests) do not mix. The peer node updates
it at the points listed on each method; `start_http` serves it in Prometheus text format; `scrape`
reads a served endpoint back (`secure-split peer status`).

Every label value comes from the deployment (peer names), from a closed set (message kinds,
directions, states) or from our own refusal codes; values are cleaned and their number bounded,
so no counterparty can grow the registry. Metrics carry no tensor, key or secret.
"""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from threading import Thread
from typing import Any, Literal
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    Info,
    generate_latest,
    start_http_server,
)
from prometheus_client.parser import text_string_to_metric_families

PEER_STATES = ("starting", "handshake", "setup", "training", "serving", "waiting", "closing", "finished", "failed")
"""The states a peer reports (`secure_split_peer_state`), in the order a run goes through them."""

Direction = Literal["sent", "received"]
MAX_LABEL_VALUES = 64
"""Distinct refusal reasons (or tasks) kept apart; further ones are counted under 'other'."""
_LABEL_CLEAN = re.compile(r"[^a-z0-9_:.\-]")
SCRAPE_LIMIT_BYTES = 4 * 1024 * 1024


def _clean(value: str, limit: int = 48) -> str:
    text = _LABEL_CLEAN.sub("_", str(value).lower())[:limit]
    return text or "unknown"


class _Bounded:
    """Keeps at most MAX_LABEL_VALUES distinct label values; the rest become 'other'."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        v = _clean(value)
        if v in self._seen:
            return v
        if len(self._seen) >= MAX_LABEL_VALUES:
            return "other"
        self._seen.add(v)
        return v


class PeerMetrics:
    """One peer's metrics (see the module docstring for where they are served).

    Args:
        peer: this peer's name.
        counterparties: the peers it exchanges messages with (connectivity starts at 0 for each).
        deployment_hash, policy_hash, version, role: shown once as `secure_split_peer_info`.
    """

    def __init__(self, peer: str, counterparties: Iterable[str] = (), *, deployment_hash: str = "",
                 policy_hash: str = "", version: str = "", role: str = "") -> None:
        self.peer = peer
        r = self.registry = CollectorRegistry(auto_describe=True)
        self._counterparties = {_clean(c, 64) for c in counterparties}
        self._reasons = _Bounded()
        self._tasks = _Bounded()
        self._kinds = _Bounded()
        self._info = Info("secure_split_peer", "This peer: name, role, deployment and policy hash, software version",
                          registry=r)
        self._info.info({"peer": peer, "role": role, "deployment": deployment_hash[:16], "policy": policy_hash[:16],
                         "version": version})
        self._state = Enum("secure_split_peer_state", "What the peer is doing", states=list(PEER_STATES), registry=r)
        self._step = Gauge("secure_split_step", "Last training or evaluation step begun", registry=r)
        self._epoch = Gauge("secure_split_epoch", "Current epoch (0-based)", registry=r)
        self._loss = Gauge("secure_split_train_loss", "Mean training loss of the last step, per task", ["task"],
                           registry=r)
        self._messages = Counter("secure_split_messages", "Messages through the gate, per counterparty, direction "
                                 "and kind", ["counterparty", "direction", "kind"], registry=r)
        self._bytes = Counter("secure_split_bytes", "Payload bytes through the gate, per counterparty and direction",
                              ["counterparty", "direction"], registry=r)
        self._refusals = Counter("secure_split_refusals", "Messages refused by the gate, per direction and reason",
                                 ["direction", "reason"], registry=r)
        self._connected = Gauge("secure_split_peer_connected", "1 while the channel to the counterparty is up",
                                ["counterparty"], registry=r)
        self._waiting = Gauge("secure_split_rejoin_waiting", "1 while waiting for a lost counterparty to rejoin",
                              ["counterparty"], registry=r)
        self._wait_since = Gauge("secure_split_rejoin_wait_since_seconds", "Unix time the current wait for the "
                                 "counterparty began (0: not waiting)", ["counterparty"], registry=r)
        self._waits = Counter("secure_split_rejoin_waits", "Times a counterparty was lost and waited for",
                              ["counterparty"], registry=r)
        self._head_seq = Gauge("secure_split_audit_signed_head_seq", "Seq of the last signed audit checkpoint",
                               registry=r)
        self._head_time = Gauge("secure_split_audit_signed_head_time_seconds",
                                "Unix time of the last signed audit checkpoint", registry=r)
        self._server: WSGIServer | None = None
        self._thread: Thread | None = None
        self._state.state("starting")
        for c in self._counterparties:
            self._connected.labels(c).set(0)
            self._waiting.labels(c).set(0)
            self._wait_since.labels(c).set(0)

    def _who(self, counterparty: str) -> str:
        name = _clean(counterparty, 64)
        return name if name in self._counterparties or not self._counterparties else "other"

    # -- what the peer node calls ------------------------------------------------------------------

    def set_state(self, state: str) -> None:
        """At each phase change: one of PEER_STATES (handshake, setup, training, waiting, ...).

        Raises:
            ValueError: an unknown state (a bug in the caller).
        """
        if state not in PEER_STATES:
            raise ValueError(f"unknown peer state {state!r}; one of {PEER_STATES}")
        self._state.state(state)

    def on_step(self, step: int, epoch: int, loss: float | None = None, task: str = "main") -> None:
        """When a step begins (loss: when the step's loss is known, at the peer that computes it)."""
        self._step.set(step)
        self._epoch.set(epoch)
        if loss is not None:
            self._loss.labels(self._tasks(task)).set(loss)

    def on_message(self, counterparty: str, direction: Direction, kind: str, nbytes: int) -> None:
        """For every message the gate sent or accepted (after the policy allowed it)."""
        who = self._who(counterparty)
        self._messages.labels(who, direction, self._kinds(kind)).inc()
        self._bytes.labels(who, direction).inc(max(0, int(nbytes)))

    def on_refusal(self, direction: Literal["in", "out"], reason: str) -> None:
        """For every message the gate refused (reason: the refusal code, e.g. 'policy_denied')."""
        self._refusals.labels(direction, self._reasons(reason)).inc()

    def on_connectivity(self, counterparty: str, up: bool) -> None:
        """On each transport `connected` / `disconnected` event about a counterparty."""
        self._connected.labels(self._who(counterparty)).set(1 if up else 0)

    def on_rejoin_wait(self, counterparty: str, waiting: bool, since: float | None = None) -> None:
        """When the peer starts waiting for a lost counterparty (waiting=True, since=unix time) and
        when the wait ends (it rejoined, or the grace ran out: waiting=False)."""
        who = self._who(counterparty)
        if waiting:
            self._waits.labels(who).inc()
            self._wait_since.labels(who).set(since if since is not None else time.time())
        else:
            self._wait_since.labels(who).set(0)
        self._waiting.labels(who).set(1 if waiting else 0)

    def on_audit_head(self, seq: int, at: float | None = None) -> None:
        """After each signed audit checkpoint (its seq)."""
        self._head_seq.set(seq)
        self._head_time.set(at if at is not None else time.time())

    # -- serving -------------------------------------------------------------------------------------

    def render(self) -> bytes:
        """The metrics in Prometheus text format."""
        return bytes(generate_latest(self.registry))

    def start_http(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Serve `/metrics` on host:port from a daemon thread; returns the bound port (port 0: any free).

        Bound to localhost unless the peer config names another host (the metrics are not secret,
        but nobody outside needs them unless a Prometheus server scrapes them).

        Raises:
            OSError: the port is taken or the host is not this machine's.
        """
        if self._server is not None:
            raise RuntimeError("the metrics endpoint is already served")
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        self._server, self._thread = server, thread
        return int(server.server_port)

    def stop(self) -> None:
        """Stop serving (idempotent)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._thread is not None:
                self._thread.join(timeout=5)
        self._server = self._thread = None


@dataclass(frozen=True)
class Sample:
    """One scraped sample: metric sample name, its labels, its value."""

    name: str
    labels: dict[str, str]
    value: float


def parse_metrics(text: str) -> list[Sample]:
    """Parse Prometheus text format into samples.

    Raises:
        ValueError: the text is not Prometheus text format.
    """
    out: list[Sample] = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.append(Sample(s.name, dict(s.labels), float(s.value)))
    return out


def scrape(url: str, timeout_s: float = 3.0) -> list[Sample]:
    """GET a metrics endpoint and parse it (at most 4 MiB).

    Raises:
        OSError: nothing answers (connection refused, timeout); urllib.error.URLError is one.
        ValueError: the answer is not Prometheus text format or too large.
    """
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"not an http(s) URL: {url!r}")
    with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 (scheme checked above)
        body = response.read(SCRAPE_LIMIT_BYTES + 1)
    if len(body) > SCRAPE_LIMIT_BYTES:
        raise ValueError(f"{url} answered more than {SCRAPE_LIMIT_BYTES} bytes; not a peer's metrics")
    return parse_metrics(body.decode("utf-8", "replace"))


def summarise(samples: list[Sample]) -> dict[str, Any]:
    """The values `peer status` shows, from scraped samples."""
    out: dict[str, Any] = {"connected": {}, "waiting_since": {}, "refusals": {}, "bytes": {}}
    for s in samples:
        if s.name == "secure_split_peer_state" and s.value == 1:
            out["state"] = s.labels.get("secure_split_peer_state")
        elif s.name == "secure_split_peer_info":
            out["info"] = s.labels
        elif s.name in ("secure_split_step", "secure_split_epoch", "secure_split_audit_signed_head_seq"):
            out[s.name.removeprefix("secure_split_")] = int(s.value)
        elif s.name == "secure_split_train_loss":
            out.setdefault("loss", {})[s.labels.get("task", "")] = s.value
        elif s.name == "secure_split_peer_connected":
            out["connected"][s.labels.get("counterparty", "")] = bool(s.value)
        elif s.name == "secure_split_rejoin_wait_since_seconds" and s.value > 0:
            out["waiting_since"][s.labels.get("counterparty", "")] = s.value
        elif s.name == "secure_split_refusals_total":
            key = f"{s.labels.get('direction', '')}:{s.labels.get('reason', '')}"
            out["refusals"][key] = int(s.value)
        elif s.name == "secure_split_bytes_total":
            key = f"{s.labels.get('direction', '')}:{s.labels.get('counterparty', '')}"
            out["bytes"][key] = int(s.value)
    return out


__all__ = ["PEER_STATES", "PeerMetrics", "Sample", "parse_metrics", "scrape", "summarise"]
