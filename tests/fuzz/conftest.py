"""The fuzz harness, built once per test session (two executors, two established sessions)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fuzz.intake import IntakeHarness


@pytest.fixture(scope="session")
def intake(tmp_path_factory: pytest.TempPathFactory) -> IntakeHarness:
    return IntakeHarness.build(Path(tmp_path_factory.mktemp("fuzz")))
