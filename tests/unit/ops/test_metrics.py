"""PeerMetrics: what the peer records is what a scrape of its endpoint shows, bounded and local."""

from __future__ import annotations

import socket

import pytest

from secure_split.peer.metrics import MAX_LABEL_VALUES, PeerMetrics, parse_metrics, scrape, summarise


@pytest.fixture
def served():
    metrics = PeerMetrics("lab", ["hospital_a", "hospital_b"], deployment_hash="ab" * 32, role="coordinator")
    port = metrics.start_http(port=0)
    try:
        yield metrics, f"http://127.0.0.1:{port}/metrics"
    finally:
        metrics.stop()


def test_a_scrape_shows_what_the_peer_recorded(served):
    metrics, url = served
    metrics.set_state("training")
    metrics.on_step(12, 1, loss=0.25, task="labels")
    metrics.on_message("hospital_a", "received", "activation", 4096)
    metrics.on_message("hospital_a", "sent", "gradient", 1024)
    metrics.on_refusal("in", "policy_denied")
    metrics.on_connectivity("hospital_a", True)
    metrics.on_rejoin_wait("hospital_b", True, since=1_700_000_000.0)
    metrics.on_audit_head(371)

    live = summarise(scrape(url))
    assert live["state"] == "training"
    assert (live["step"], live["epoch"]) == (12, 1)
    assert live["loss"] == {"labels": 0.25}
    assert live["connected"] == {"hospital_a": True, "hospital_b": False}
    assert live["waiting_since"] == {"hospital_b": 1_700_000_000.0}
    assert live["refusals"] == {"in:policy_denied": 1}
    assert live["bytes"] == {"received:hospital_a": 4096, "sent:hospital_a": 1024}
    assert live["audit_signed_head_seq"] == 371
    assert live["info"]["peer"] == "lab" and live["info"]["role"] == "coordinator"

    metrics.on_rejoin_wait("hospital_b", False)
    assert summarise(scrape(url))["waiting_since"] == {}


def test_the_endpoint_listens_on_localhost_by_default(served):
    metrics, _ = served
    assert metrics._server is not None  # the live server's bound address is the point here
    assert metrics._server.server_address[0] == "127.0.0.1"


def test_label_values_are_bounded_whatever_the_reasons_and_names():
    metrics = PeerMetrics("lab", ["hospital_a"])
    for i in range(MAX_LABEL_VALUES + 50):
        metrics.on_refusal("in", f"reason {i} with Spaces/And{{braces}}")
    metrics.on_message("mallory", "received", "activation", 10)  # not a counterparty
    samples = parse_metrics(metrics.render().decode())
    reasons = {s.labels["reason"] for s in samples if s.name == "secure_split_refusals_total"}
    assert len(reasons) == MAX_LABEL_VALUES + 1 and "other" in reasons
    assert all(" " not in r and "{" not in r for r in reasons)
    senders = {s.labels["counterparty"] for s in samples if s.name == "secure_split_messages_total"}
    assert senders == {"other"}


def test_two_peers_in_one_process_keep_their_own_numbers():
    a, b = PeerMetrics("a"), PeerMetrics("b")
    a.on_step(5, 0)
    b.on_step(7, 0)
    assert summarise(parse_metrics(a.render().decode()))["step"] == 5
    assert summarise(parse_metrics(b.render().decode()))["step"] == 7


def test_an_unknown_state_is_a_bug_and_raises():
    with pytest.raises(ValueError, match="unknown peer state"):
        PeerMetrics("a").set_state("dancing")


def test_scraping_a_port_where_nothing_listens_raises_oserror():
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    holder.close()
    with pytest.raises(OSError):
        scrape(f"http://127.0.0.1:{port}/metrics", timeout_s=5)
