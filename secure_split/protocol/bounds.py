"""What one counterparty may make this peer hold or do, as small sans-IO rules (no clocks: callers
pass `now`, a `time.monotonic()` value).

Rules of this file
------------------
1. A listed peer holds a valid key, so it can send any message at any rate. Each rule here turns
   one thing it could grow without bound into a bound with a named consequence; SECURITY.md
   ("Bounds") lists them with the `limits.*` setting behind each.
2. Nothing here raises on a peer's input: each check returns a reason (refuse that message and
   keep serving) or a verdict (stop the run, naming the peer).

- `StepWindow`: messages for steps far ahead of the current one are refused, not queued.
- `ViolationBudget`: every refused message of a counterparty counts; `max_violations` of them
  within `window_s` stop the run (exit 4 if every one was a policy denial, else 5).
- `RefusalThrottle`: refusals are recorded one by one up to a rate (token bucket); beyond it
  they are counted and the count goes into the next recorded one.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from secure_split.errors import ViolationLimit

__all__ = ["RefusalThrottle", "StepWindow", "Violation", "ViolationBudget"]


@dataclass(frozen=True)
class StepWindow:
    """The steps a counterparty may send step-bound messages for, relative to this peer's step.

    `base` is the lowest step this peer still accepts messages for: the active step, or, between
    steps, the next one it expects. Steps from `base` to `base + ahead` are accepted (and may
    wait in a queue: overlap begins the next step early, a fast peer runs one step ahead);
    later steps are refused, so the queue of future steps holds at most `ahead + 1` steps' worth.

    Attributes:
        ahead: how many steps past `base` are accepted (`limits.step_window`), >= 1.
    """

    ahead: int

    def __post_init__(self) -> None:
        if isinstance(self.ahead, bool) or not isinstance(self.ahead, int) or self.ahead < 1:
            raise ValueError(f"StepWindow.ahead must be an int >= 1, got {self.ahead!r}")

    def problem(self, step: int, base: int) -> str | None:
        """Why a message for `step` is refused, or None when it may be accepted (or queued).

        Args:
            step: the step the message is bound to.
            base: the lowest step still accepted (see the class docstring).

        Returns:
            A sentence for the refusal, or None.
        """
        if step < base:
            return f"step {step} is finished (this peer is at step {base})"
        if step > base + self.ahead:
            return (
                f"step {step} is more than {self.ahead} step(s) ahead of this peer's step {base} "
                "(limits.step_window); a peer sends for a step only after it began"
            )
        return None


@dataclass(frozen=True)
class Violation:
    """One refused message of a counterparty, as the budget remembers it."""

    time: float
    reason: str
    policy_denied: bool


class ViolationBudget:
    """Counts one counterparty's refused messages; too many within a window stop the run.

    Every bad message is refused, recorded and answered on its own; the run stops only when
    `max_violations` of them fall within `window_s` seconds. Memory is bounded by
    `max_violations` entries.

    Args:
        peer: the counterparty's name (for the stop reason).
        max_violations: `limits.max_violations`, >= 1.
        window_s: `limits.violation_window_s`, > 0.
    """

    def __init__(self, peer: str, max_violations: int, window_s: float) -> None:
        if isinstance(max_violations, bool) or not isinstance(max_violations, int) or max_violations < 1:
            raise ValueError(f"max_violations must be an int >= 1, got {max_violations!r}")
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0, got {window_s!r}")
        self.peer = peer
        self.max_violations = max_violations
        self.window_s = float(window_s)
        self._recent: deque[Violation] = deque(maxlen=max_violations)
        self.total = 0

    def record(self, now: float, reason: str, *, policy_denied: bool = False) -> bool:
        """Count one refused message.

        Args:
            now: `time.monotonic()` when it was refused.
            reason: why it was refused (kept, cut to 300 characters, for the stop reason).
            policy_denied: True when the policy refused it (the stop then exits 4 if every
                violation in the window was a denial).

        Returns:
            True when this violation exhausts the budget: the caller stops the run with
            `stop_error()`. False: keep serving.
        """
        self.total += 1
        self._recent.append(Violation(now, reason[:300], policy_denied))
        while self._recent and now - self._recent[0].time >= self.window_s:
            self._recent.popleft()
        return len(self._recent) >= self.max_violations

    @property
    def in_window(self) -> int:
        """Violations remembered in the current window (at most `max_violations`)."""
        return len(self._recent)

    def stop_error(self) -> ViolationLimit:
        """The error that stops the run once `record` returned True.

        Returns:
            A `ViolationLimit` naming the peer, the count, the window and the last three reasons;
            its exit code is 4 when every violation in the window was a policy denial, else 5.
        """
        last = list(self._recent)[-3:]
        reasons = "; ".join(v.reason for v in last) or "(none)"
        return ViolationLimit(
            f"'{self.peer}' sent {len(self._recent)} refused messages within {self.window_s:g} s "
            f"(limits.max_violations = {self.max_violations}), so this peer stops the run; "
            f"last reasons: {reasons}",
            policy_denials_only=bool(self._recent) and all(v.policy_denied for v in self._recent),
        )


class RefusalThrottle:
    """Decides which refusals get an audit entry of their own: a token bucket per counterparty.

    Up to `burst` refusals are recorded one by one, then `rate_per_s` per second on average; the
    others are only counted, and the next one recorded carries how many were left out, so the
    log stays small under a flood yet every refusal is accounted for.

    Args:
        rate_per_s: `limits.refusal_audit_per_s`, > 0.
        burst: `limits.refusal_audit_burst`, >= 1.
    """

    def __init__(self, rate_per_s: float, burst: int) -> None:
        if not rate_per_s > 0:
            raise ValueError(f"rate_per_s must be > 0, got {rate_per_s!r}")
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ValueError(f"burst must be an int >= 1, got {burst!r}")
        self.rate_per_s = float(rate_per_s)
        self.burst = burst
        self._tokens = float(burst)
        self._last: float | None = None
        self._left_out = 0

    def admit(self, now: float) -> int | None:
        """Ask whether the refusal happening `now` gets its own audit entry.

        Args:
            now: `time.monotonic()`.

        Returns:
            None: count it only (no entry). An int: write an entry, with this many refusals left
            out since the previous entry (0 when none were).
        """
        if self._last is not None:
            self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.rate_per_s)
        self._last = now
        if self._tokens < 1.0:
            self._left_out += 1
            return None
        self._tokens -= 1.0
        left_out, self._left_out = self._left_out, 0
        return left_out

    def take_left_out(self) -> int:
        """Refusals counted but not yet reported (for a final entry at close); resets the count."""
        left_out, self._left_out = self._left_out, 0
        return left_out
