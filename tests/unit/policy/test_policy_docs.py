"""The commented example in docs/policy-language.md is a valid policy."""

from __future__ import annotations

import re

import yaml
from policy_fixtures import REPO

from secure_split.policy import check_policy, policy_from_mapping


def test_documented_example_is_valid_and_violation_free() -> None:
    text = (REPO / "docs" / "policy-language.md").read_text(encoding="utf-8")
    block = re.search(r"```yaml\n(.*?)```", text, re.S)
    assert block is not None
    policy = policy_from_mapping(yaml.safe_load(block.group(1)))
    assert policy.name == "two-hospitals" and len(policy.allow) == 3 and len(policy.deny) == 1
    assert [f for f in check_policy(policy) if f.severity == "error"] == []
