"""The policy's own list of message kinds agrees with the protocol's, once the protocol has one."""

from __future__ import annotations

import importlib

import pytest

from secure_split.policy import ASSET_CARRIERS, ASSETS, CONTROL_KINDS, HE_KINDS, KINDS


def test_kind_names_match_the_protocol() -> None:
    protocol = importlib.import_module("secure_split.protocol")
    kind = getattr(protocol, "Kind", None)
    if kind is None:
        pytest.skip("secure_split.protocol.Kind does not exist yet")
    assert {str(getattr(k, "value", k)) for k in kind} == set(KINDS)
    control = getattr(protocol, "CONTROL_KINDS", None)
    if control is not None:
        assert {str(getattr(k, "value", k)) for k in control} == set(CONTROL_KINDS)


def test_raw_features_labels_and_secret_keys_have_no_carrier_kind() -> None:
    assert set(ASSETS) == set(ASSET_CARRIERS)
    assert (
        ASSET_CARRIERS["features"]
        == ASSET_CARRIERS["labels"]
        == ASSET_CARRIERS["ckks_secret_key"]
        == frozenset()
    )
    assert ASSET_CARRIERS["weights"] == {"encrypted_weights"}
    assert not {"features", "labels", "raw", "weights", "ckks_secret_key"} & set(KINDS)
    assert HE_KINDS <= set(KINDS) and CONTROL_KINDS <= set(KINDS)
