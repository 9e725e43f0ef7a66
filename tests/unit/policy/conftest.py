"""Fixtures for the policy tests (defined in policy_fixtures so test modules can import helpers)."""

from policy_fixtures import identities, write_setup

__all__ = ["identities", "write_setup"]
