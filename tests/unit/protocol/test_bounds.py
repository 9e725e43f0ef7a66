"""The per-counterparty bounds of `protocol.bounds`: step window, violation budget, refusal throttle."""

from __future__ import annotations

import pytest

from secure_split.errors import ExitCode, RemoteProtocolError, ViolationLimit
from secure_split.protocol import RefusalThrottle, StepWindow, ViolationBudget


def test_the_step_window_accepts_the_current_and_the_next_steps_only() -> None:
    window = StepWindow(2)
    assert window.problem(10, 10) is None
    assert window.problem(12, 10) is None
    assert "more than 2 step(s) ahead" in (window.problem(13, 10) or "")
    assert "finished" in (window.problem(9, 10) or "")
    assert "ahead" in (window.problem(2**63 - 1, 0) or "")


@pytest.mark.parametrize("ahead", [0, -1, True, 1.5])
def test_a_step_window_needs_a_positive_int(ahead: object) -> None:
    with pytest.raises(ValueError, match="int >= 1"):
        StepWindow(ahead)  # type: ignore[arg-type]


def test_the_budget_stops_at_the_limit_within_the_window_and_names_the_peer() -> None:
    budget = ViolationBudget("owner", max_violations=3, window_s=60.0)
    assert budget.record(0.0, "NaN in activation") is False
    assert budget.record(1.0, "wrong shape") is False
    assert budget.record(2.0, "step 99 is ahead") is True
    error = budget.stop_error()
    assert isinstance(error, ViolationLimit) and not isinstance(error, RemoteProtocolError)
    assert error.exit_code == ExitCode.PROTOCOL
    text = str(error)
    assert "'owner' sent 3 refused messages within 60 s" in text
    assert "NaN in activation; wrong shape; step 99 is ahead" in text


def test_violations_older_than_the_window_are_forgotten() -> None:
    budget = ViolationBudget("owner", max_violations=3, window_s=10.0)
    for t in range(100):  # one every 5 s: never 3 within 10 s
        assert budget.record(5.0 * t, "bad") is False
    assert budget.total == 100 and budget.in_window <= 3


def test_a_budget_of_policy_denials_only_exits_4_and_a_mixed_one_5() -> None:
    denials = ViolationBudget("owner", max_violations=2, window_s=60.0)
    denials.record(0.0, "kind 'labels' denied", policy_denied=True)
    assert denials.record(0.5, "kind 'labels' denied", policy_denied=True)
    assert denials.stop_error().exit_code == ExitCode.POLICY_DENIED
    mixed = ViolationBudget("owner", max_violations=2, window_s=60.0)
    mixed.record(0.0, "denied", policy_denied=True)
    assert mixed.record(0.5, "malformed")
    assert mixed.stop_error().exit_code == ExitCode.PROTOCOL


def test_the_budget_remembers_at_most_max_violations_entries() -> None:
    budget = ViolationBudget("owner", max_violations=5, window_s=1e9)
    for t in range(10_000):
        budget.record(float(t), "x" * 10_000)
    assert budget.in_window == 5
    assert all(len(v.reason) <= 300 for v in budget._recent)


def test_the_throttle_records_a_burst_then_the_rate_and_counts_the_rest() -> None:
    throttle = RefusalThrottle(rate_per_s=2.0, burst=3)
    decisions = [throttle.admit(0.0) for _ in range(10)]
    assert decisions == [0, 0, 0] + [None] * 7
    # Half a second later one token is back: the next entry carries the 7 left out.
    assert throttle.admit(0.5) == 7
    assert throttle.admit(0.5) is None
    assert throttle.take_left_out() == 1 and throttle.take_left_out() == 0


def test_the_throttle_bounds_entries_under_a_flood() -> None:
    throttle = RefusalThrottle(rate_per_s=2.0, burst=20)
    recorded = left_out = 0
    for i in range(100_000):  # 100,000 refusals in 10 s
        got = throttle.admit(i / 10_000)
        if got is not None:
            recorded += 1
            left_out += got
    left_out += throttle.take_left_out()
    assert recorded <= 20 + 2 * 10 + 1
    assert recorded + left_out == 100_000
