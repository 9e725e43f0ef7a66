"""The close round (SECURITY.md, Bounds): at run end every peer sends its signed close head to the
peers it closes with and waits for theirs at most `limits.close_timeout_s`. A peer that is gone
(or never answers) cannot hold the others: they close without its head, name it in
`close_incomplete`, and the auditor sees a warning that names it.

Real sockets and audit logs; the peers run as threads of this process (the only thing patched is
the departing peer's own close round, which it skips: it leaves without countersigning).
"""

from __future__ import annotations

import threading
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from secure_split.audit import verify_logs
from secure_split.config import load_deployment
from secure_split.peer.launch import training_node
from secure_split.policy import load_policy
from secure_split.testing import run_peers_in_threads
from tests.integration.helpers import Deploy, clone_deployment, events

pytestmark = pytest.mark.integration

CLOSE_TIMEOUT_S = 3.0


def _ts(entry: dict[str, Any]) -> float:
    return datetime.fromisoformat(entry["time"]).timestamp()


def _run(d: Deploy, leaver: str) -> dict[str, Any]:
    nodes = {name: training_node(cfg) for name, cfg in d.peer_configs.items()}
    others = [n for n in nodes if n != leaver]

    def leave(status: str, reason: str) -> None:
        # The leaver ends its run but skips the close round: it never sends its close head and
        # never answers ours (its sockets close right after). Its own log says so.
        audit = nodes[leaver].audit
        audit.begin_close(status, reason, metrics=nodes[leaver].schedule.final_metrics())
        audit.finish_close(others, reason="left without a close round")

    nodes[leaver]._close_round = leave  # type: ignore[method-assign]
    results: dict[str, Any] = {}
    threads = [threading.Thread(target=lambda n=n: results.__setitem__(n, nodes[n].run()), daemon=True)
               for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
        assert not t.is_alive(), "a peer still runs after 300 s"
    return results


def test_a_close_round_with_a_gone_peer_ends_in_bounded_time_and_names_it(
        vanilla_template: Deploy, tmp_path: Path) -> None:
    d = clone_deployment(vanilla_template, tmp_path / "d", limits={"close_timeout_s": CLOSE_TIMEOUT_S})
    stayer, leaver = d.coordinator, next(n for n in d.peer_configs if n != d.coordinator)
    results = _run(d, leaver)
    assert results[stayer].status == "ok" and results[leaver].status == "ok", results

    log = d.audit(stayer)
    end, = events(log, "run_end")
    incomplete, = events(log, "close_incomplete")
    assert incomplete["data"]["missing"] == [leaver]
    assert "no signed close head within 3 s" in incomplete["data"]["reason"]
    assert not any(e["data"].get("counterparty") == leaver for e in events(log, "counterparty_head")
                   if e["data"].get("kind") == "close"), "the leaver never sent a close head"
    # Bounded: the stayer waited at most the configured bound (plus one pump interval and the
    # scheduling slack of a loaded machine), not the peer timeout or forever.
    waited = _ts(incomplete) - _ts(end)
    assert waited <= CLOSE_TIMEOUT_S + 5.0, waited
    assert log[-1]["event"] == "checkpoint", "the log still ends with a signed final head"

    # The auditor sees a warning naming the peer that did not countersign, not an error.
    report = verify_logs(d.audit_dir, load_deployment(d.deployment), load_policy(d.policy))
    assert not report.errors, report.to_json()
    tails = [f for f in report.of_kind("unsigned_tail") if f.peer == stayer]
    assert tails and all(f.severity == "warning" for f in tails), report.to_json()
    assert any(f"close round was incomplete ({leaver} did not answer)" in f.message for f in tails), report.to_json()


def test_a_close_round_where_everybody_answers_is_complete(vanilla_template: Deploy, tmp_path: Path) -> None:
    d = clone_deployment(vanilla_template, tmp_path / "d", limits={"close_timeout_s": 60.0})
    results = run_peers_in_threads(d.peer_configs, timeout_s=300)
    assert all(r.status == "ok" for r in results.values()), results
    for name in d.peer_configs:
        log = d.audit(name)
        assert not events(log, "close_incomplete"), name
        others = {n for n in d.peer_configs if n != name}
        assert {e["data"]["counterparty"] for e in events(log, "counterparty_head")} >= others, name
        # Nobody waited out the 60 s bound: every close head arrived.
        end, = events(log, "run_end")
        assert _ts(log[-1]) - _ts(end) < 60.0, name
