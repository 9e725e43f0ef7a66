"""Fuzz the inbound path of a peer: codec + session + executor intake (+ PSI point decoding).

Hostile variants of valid messages (see `tests/fuzz/intake.py`) go through what a peer does with
frames from an authenticated counterparty. Nothing but a refusal may come out, memory stays
bounded, and the fuzzer must really reach the executor (else it would prove nothing).

Sizes: a seeded 3,000 inputs by default (a few seconds); 1,000,000 with SECURE_SPLIT_SLOW=1
(several minutes on 2 shared cores), plus 1,000,000 coverage-guided atheris runs when atheris is
installed (`tests/fuzz/atheris_intake.py`).
"""

from __future__ import annotations

import importlib.util
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz.intake import IntakeHarness, envelope, run, unenvelope

SLOW = os.environ.get("SECURE_SPLIT_SLOW") == "1"
RSS_GROWTH_BOUND_MB = 256


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_every_seed_is_accepted_as_is(intake: IntakeHarness) -> None:
    # The mutations start from valid messages that reach the deep checks unchanged.
    outcomes = [intake.feed(receiver, list(frames)) for receiver, frames in intake.seeds]
    assert outcomes.count("used") == 2, outcomes  # the activation at lh, the gradient at the owner
    assert set(outcomes) <= {"used", "accepted", "psi"}, outcomes


@pytest.mark.slow
def test_mutated_messages_only_ever_raise_refusals_in_bounded_memory(intake: IntakeHarness) -> None:
    count = 1_000_000 if SLOW else 3_000
    intake.outcomes.clear()
    before = _max_rss_mb()
    outcomes = run(intake, count, seed=20260101)  # raises on the first input that is not refused cleanly
    assert sum(outcomes.values()) == count
    assert _max_rss_mb() - before < RSS_GROWTH_BOUND_MB
    # The fuzzer got deep: some inputs stopped at each stage, some reached the executor and were
    # refused there (NaN, shapes, steps, edges), some were used (mutations that stay valid).
    for stage in ("codec", "session", "body", "executor", "used"):
        assert outcomes[stage] > 0, (stage, outcomes)
    assert outcomes["executor"] + outcomes["used"] >= count // 100, outcomes


def test_the_envelope_of_the_byte_fuzzer_is_total() -> None:
    frames = [b"head", b"", b"payload"]
    selector, back = unenvelope(envelope(7, frames))
    assert (selector, back) == (7, frames)
    for junk in (b"", b"\x00", b"\x01\x07", b"\xff" * 40, os.urandom(300)):
        unenvelope(junk)  # never raises


@pytest.mark.slow
@pytest.mark.skipif(not SLOW, reason="coverage-guided fuzzing (minutes): set SECURE_SPLIT_SLOW=1")
@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris is not installed")
def test_a_million_coverage_guided_inputs_find_nothing(tmp_path: Path) -> None:
    script = Path(__file__).with_name("atheris_intake.py")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "work"), "-runs=1000000", f"-rss_limit_mb={1024 + RSS_GROWTH_BOUND_MB}",
         "-max_len=8192", "-print_final_stats=1"],
        capture_output=True, text=True, timeout=3600, check=False,
        env=dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1"),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Done 1000000 runs" in done.stderr, done.stderr[-3000:]
