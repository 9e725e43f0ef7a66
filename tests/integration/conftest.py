"""Fixtures of the multi-process integration tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.helpers import Deploy, generate_template


@pytest.fixture(scope="session")
def vanilla_template(tmp_path_factory: pytest.TempPathFactory) -> Deploy:
    """One generated vanilla deployment (keys, data, signed policy); tests clone it."""
    return generate_template(Path(tmp_path_factory.mktemp("vanilla-template")), "vanilla")
