"""The operational log a peer writes for its operators, and the status `secure-split peer status` reads.

The ops log is JSON lines (structlog: `wrap_logger` with explicit processors, never the global
configuration) in a file next to the audit log, `AUDIT_DIR/PEER.ops.log` by default. It is not
the audit log: unsigned, not hash-chained, for people and log shippers (what the peer is doing,
whom it waits for, why it stopped). It never holds a secret: every line is checked against the
peer's secret key text forms before it is written, and a line that contains one is replaced by a
notice. Lines are capped in size and the file rolls over to `.1` past `max_bytes`.

Event names and their fields (the peer node writes these; `peer_status` reads them)::

    peer_start   pid, host, deployment, policy, version, resume, metrics_url
    state        state (metrics.PEER_STATES), detail
    step         epoch, step, loss                 (sparingly: e.g. every epoch, or every N steps)
    epoch        epoch, epochs, values
    peer_lost / peer_joined / rejoin_wait / rollback   counterparty, since, epoch, detail
    refused      counterparty, direction, reason
    audit_head   seq
    peer_end     status ("ok" | "failed"), exit_code, error
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, WrappedLogger

OPS_LOG_SUFFIX = ".ops.log"
MAX_LINE_BYTES = 8 * 1024
MAX_LOG_BYTES = 64 * 1024 * 1024
TAIL_BYTES = 1024 * 1024
"""How much of the end of a log `peer status` reads (the newest run is at the end)."""


def default_ops_log_path(audit_dir: Path, peer: str) -> Path:
    """`AUDIT_DIR/PEER.ops.log`: next to the audit log, and not a `*.jsonl` the verifier would read."""
    return audit_dir / f"{peer}{OPS_LOG_SUFFIX}"


class _SecretGuard:
    """Last processor: refuse a rendered line that contains a secret key in any text form."""

    def __init__(self, forbidden: Iterable[str]) -> None:
        self._forbidden = tuple(f for f in forbidden if len(f) >= 16)

    def __call__(self, logger: WrappedLogger, name: str, line: Any) -> str:
        # After JSONRenderer, the "event dict" is the rendered line (str).
        text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
        if any(secret in text for secret in self._forbidden):
            return json.dumps({"event": "ops_log_refused", "reason": "a field held a secret key; the line was dropped",
                               "time": _now()}, sort_keys=True)
        if len(text.encode("utf-8")) > MAX_LINE_BYTES:
            event = json.loads(text).get("event", "?")
            return json.dumps({"event": str(event)[:64], "truncated": True, "time": _now()}, sort_keys=True)
        return text


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _plain(logger: WrappedLogger, name: str, event_dict: EventDict) -> EventDict:
    """Make every value JSON-plain (objects become their str), so rendering never fails."""
    return {k: v if isinstance(v, str | int | float | bool | type(None) | list | dict) else str(v)
            for k, v in event_dict.items()}


class OpsLog:
    """A peer's operational JSON-lines log (see the module docstring).

    Args:
        path: the log file (appended to; its folder is created).
        peer: this peer's name, added to every line.
        secrets: the peer's secret key text forms (`Identity.secret_text_forms()`); lines holding
            any of them are never written.
        max_bytes: roll the file over to `PATH.1` when it grows past this.
    """

    def __init__(self, path: str | Path, peer: str, *, secrets: Iterable[str] = (),
                 max_bytes: int = MAX_LOG_BYTES) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.peer = peer
        self._max_bytes = max_bytes
        self._fh: TextIO = open(self.path, "a", encoding="utf-8")
        self._guard = _SecretGuard(secrets)
        self._log = self._wrap()

    def _wrap(self) -> Any:
        return structlog.wrap_logger(
            structlog.PrintLogger(self._fh),
            processors=[
                structlog.processors.TimeStamper(fmt="iso", utc=True, key="time"),
                _plain,
                structlog.processors.JSONRenderer(sort_keys=True),
                self._guard,
            ],
        ).bind(peer=self.peer)

    def event(self, name: str, **fields: Any) -> None:
        """Write one line: {"event": name, "peer": ..., "time": ..., **fields}. Never raises on
        a closed log (a peer shutting down may still report)."""
        if self._fh.closed:
            return
        if self._fh.tell() > self._max_bytes:
            self._roll()
        self._log.msg(name, **fields)

    def start(self, *, deployment: str, policy: str, version: str, resume: bool,
              metrics_url: str | None = None) -> None:
        """The first line of a run: who, which process on which host, which files."""
        self.event("peer_start", pid=os.getpid(), host=socket.gethostname(), deployment=deployment,
                   policy=policy, version=version, resume=resume, metrics_url=metrics_url)

    def _roll(self) -> None:
        self._fh.close()
        os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        self._fh = open(self.path, "a", encoding="utf-8")
        self._log = self._wrap()

    def close(self) -> None:
        """Close the file (idempotent)."""
        if not self._fh.closed:
            self._fh.close()


def read_tail(path: Path, max_bytes: int = TAIL_BYTES) -> list[dict[str, Any]]:
    """The JSON objects on the last `max_bytes` of a JSON-lines file (unparsable lines skipped).

    Returns [] when the file does not exist.
    """
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read(max_bytes)
    except FileNotFoundError:
        return []
    lines = data.split(b"\n")
    if size > max_bytes:
        lines = lines[1:]  # the first line is cut
    out = []
    for line in lines:
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


@dataclass
class PeerStatus:
    """What `peer status` found out about one peer.

    Attributes:
        peer: the peer's name.
        verdict: "running", "finished", "failed", "unreachable" (it should be running but
            nothing answers, e.g. after a crash) or "never_ran".
        detail: a sentence for the operator (what it does, whom it waits for, what to do).
        live: the scraped metrics summary (metrics.summarise), when the endpoint answered.
        last_events: the newest ops-log events of the latest run.
        audit_end: the audit log's last run_end data, if the latest run ended.
    """

    peer: str
    verdict: str
    detail: str
    live: dict[str, Any] | None = None
    last_events: list[dict[str, Any]] = field(default_factory=list)
    audit_end: dict[str, Any] | None = None

    @property
    def exit_code(self) -> int:
        """0 running or finished, 1 failed, 3 unreachable or never ran (2 is for config errors)."""
        return {"running": 0, "finished": 0, "failed": 1}.get(self.verdict, 3)


def _latest_run(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    starts = [i for i, e in enumerate(events) if e.get("event") == "peer_start"]
    return events[starts[-1]:] if starts else events


def _audit_end(audit_log: Path) -> dict[str, Any] | None:
    """The data of the audit log's last run_end after its last run_start, or None (still running or crashed)."""
    end = None
    for entry in read_tail(audit_log):
        if entry.get("event") == "run_start":
            end = None
        elif entry.get("event") == "run_end" and isinstance(entry.get("data"), dict):
            end = entry["data"]
    return end


def _pid_alive(pid: object, host: object) -> bool | None:
    if not isinstance(pid, int) or host != socket.gethostname():
        return None  # another host: cannot tell
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def peer_status(peer: str, ops_log: Path, audit_log: Path, live: dict[str, Any] | None,
                live_error: str | None = None) -> PeerStatus:
    """Judge a peer's status from its ops log, its audit log and (if it answered) its metrics.

    Args:
        peer: the peer's name.
        ops_log: its ops log path; audit_log: its audit log path.
        live: `metrics.summarise(scrape(...))` when the metrics endpoint answered, else None.
        live_error: why the endpoint did not answer (None when it is not configured).
    """
    events = _latest_run(read_tail(ops_log))
    last = {e.get("event"): e for e in events}
    audit_end = _audit_end(audit_log)
    status = PeerStatus(peer, "never_ran", "", live=live, last_events=events[-8:], audit_end=audit_end)
    ended = last.get("peer_end") or ({"status": audit_end.get("status"), "error": audit_end.get("reason")}
                                     if audit_end else None)
    if live is not None:
        state = live.get("state") or "unknown"
        status.verdict = "failed" if state == "failed" else "running"
        status.detail = _live_detail(live)
        return status
    if ended is not None:
        ok = ended.get("status") == "ok"
        status.verdict = "finished" if ok else "failed"
        status.detail = "the last run finished" if ok else f"the last run failed: {ended.get('error') or 'no reason recorded'}"
        return status
    if not events:
        status.detail = f"no run recorded in {ops_log} or {audit_log}"
        return status
    state = (last.get("state") or {}).get("state", "starting")
    start = last.get("peer_start") or {}
    alive = _pid_alive(start.get("pid"), start.get("host"))
    since = (last.get("state") or start).get("time", "?")
    if alive is True and live_error is None:
        status.verdict = "running"
        status.detail = f"process {start.get('pid')} is running; state '{state}' since {since} (no metrics endpoint configured)"
        return status
    status.verdict = "unreachable"
    why = f"its metrics endpoint does not answer ({live_error}); " if live_error else ""
    gone = f"process {start.get('pid')} is gone; " if alive is False else ""
    status.detail = (f"{why}{gone}the last record says '{state}' since {since} and the run never ended: it may have "
                     "crashed; restart it with `secure-split peer run` (the others wait up to limits.rejoin_grace_s)")
    return status


def _live_detail(live: dict[str, Any]) -> str:
    parts = [f"state '{live.get('state', 'unknown')}'"]
    if "epoch" in live:
        parts.append(f"epoch {live['epoch'] + 1}, step {live.get('step', 0)}")
    down = sorted(p for p, up in live.get("connected", {}).items() if not up)
    if down:
        parts.append(f"not connected to {', '.join(down)}")
    waiting = live.get("waiting_since", {})
    for peer, since in sorted(waiting.items()):
        parts.append(f"waiting for {peer} since {time.strftime('%H:%M:%S', time.gmtime(since))} UTC")
    refused = sum(live.get("refusals", {}).values())
    if refused:
        parts.append(f"{refused} message(s) refused")
    return "; ".join(parts)
