"""The event log folds a flood of identical failures but never a connection state change."""

from __future__ import annotations

from secure_split.transport.events import EventLog


def test_identical_failures_inside_the_window_are_folded_into_one_event():
    log = EventLog(repeat_window_s=60.0)
    for _ in range(50):
        log.record("bob", "handshake_failed", "handshake with 'bob' did not complete")
    log.record("carol", "handshake_failed", "handshake with 'carol' did not complete")
    events = log.drain()
    assert [(e.peer, e.kind) for e in events] == [("bob", "handshake_failed"), ("carol", "handshake_failed")]
    assert log.drain() == []


def test_a_repeat_after_the_window_reports_how_many_were_folded():
    now = [100.0]
    log = EventLog(repeat_window_s=5.0, clock=lambda: now[0])
    for step in range(8):  # one reported, seven folded
        now[0] = 100.0 + step * 0.5
        log.record(None, "auth_refused", "refused key abc")
    now[0] = 106.0
    log.record(None, "auth_refused", "refused key abc")
    first, second = log.drain()
    assert first.detail == "refused key abc"
    assert "repeated 7 more times in the previous 6 s" in second.detail
    assert second.time == 106.0


def test_connection_state_changes_are_never_folded():
    log = EventLog(repeat_window_s=60.0)
    for _ in range(3):
        log.record("bob", "connected", "up", fold_repeats=False)
        log.record("bob", "disconnected", "lost", fold_repeats=False)
    assert [e.kind for e in log.drain()] == ["connected", "disconnected"] * 3


def test_unread_events_are_bounded_and_the_oldest_go_first():
    log = EventLog(maxlen=10)
    for index in range(25):
        log.record("bob", "connected", f"up {index}", fold_repeats=False)
    assert [e.detail for e in log.drain()] == [f"up {index}" for index in range(15, 25)]
