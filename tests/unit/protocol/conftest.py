"""Fixtures for the protocol unit tests: a fresh link, and an established one."""

from __future__ import annotations

import pytest

from .fake_link import FakeLink, make_link


@pytest.fixture
def link() -> FakeLink:
    """Two sessions that have not shaken hands yet."""
    return make_link()


@pytest.fixture
def established() -> FakeLink:
    """Two sessions after a completed handshake."""
    pair = make_link()
    pair.handshake()
    return pair
