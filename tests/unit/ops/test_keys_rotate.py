"""`keys rotate`: a new identity, exact file edits every party signs, and a retired key refused everywhere."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from secure_split.cli.main import app
from secure_split.cli.rotate import add_retired_key, replace_key_text
from secure_split.config import load_deployment, retired_transport_keys, sign_keys_valid_at
from secure_split.crypto.keys import load_identity, load_public
from secure_split.errors import ConfigError
from secure_split.policy import (
    check_startup,
    load_policy,
    policy_for_deployment,
    sign_policy,
    signature_problems,
)
from secure_split.transport import Transport, TransportPeer
from tests.unit.ops.ops_fixtures import identities, vertical, write_keys, write_yaml

runner = CliRunner()


@pytest.fixture
def signed(tmp_path):
    """A deployment with a comment, its signed policy, and every party's key files in keys/."""
    ids = identities()
    dep_path = write_yaml(tmp_path / "deployment.yaml", vertical(ids), header="# shared by all three parties\n")
    dep = load_deployment(dep_path)
    write_yaml(tmp_path / "policy.yaml", policy_for_deployment(dep, name="ops", not_after="2099-12-31"))
    for ident in ids.values():
        sign_policy(tmp_path / "policy.yaml", ident)
    write_keys(ids, tmp_path / "keys")
    return tmp_path, ids


def _rotate(tmp_path: Path, *extra: str):
    return runner.invoke(app, ["keys", "rotate", "hospital_a", "-d", str(tmp_path / "deployment.yaml"),
                               "--dir", str(tmp_path / "keys"), "--reason", "leaked", *extra])


def test_rotation_replaces_the_keys_records_the_old_ones_and_needs_every_signature_again(signed):
    tmp_path, ids = signed
    old = ids["hospital_a"]
    out = _rotate(tmp_path, "--in-place")
    assert out.exit_code == 0, out.output

    new_pub = load_public(tmp_path / "keys" / "hospital_a.pub")
    assert new_pub.sign_key_hex != old.sign_key_hex
    assert list((tmp_path / "keys" / "retired").glob("hospital_a.*.key"))  # kept aside, not overwritten
    text = (tmp_path / "deployment.yaml").read_text()
    assert text.startswith("# shared by all three parties\n")  # the edit replaced keys, nothing else
    dep = load_deployment(tmp_path / "deployment.yaml")
    assert dep.spec.peers["hospital_a"].sign_key == new_pub.sign_key_hex
    assert dep.spec.peers["hospital_a"].transport_key == new_pub.transport_key_z85
    (retired,) = dep.spec.retired_keys
    assert (retired.peer, retired.sign_key, retired.reason) == ("hospital_a", old.sign_key_hex, "leaked")
    assert (tmp_path / "deployment.yaml.bak").is_file()

    policy = load_policy(tmp_path / "policy.yaml")
    assert policy.parties["hospital_a"].fingerprint == new_pub.fingerprint
    assert {p.party for p in signature_problems(policy, dep)} == {"hospital_a", "hospital_b", "lab"}
    for party in ("hospital_a", "hospital_b", "lab"):
        assert "--key" in out.output and party in out.output
    sign_policy(tmp_path / "policy.yaml", load_identity(tmp_path / "keys" / "hospital_a.key"))
    for party in ("hospital_b", "lab"):
        sign_policy(tmp_path / "policy.yaml", ids[party])
    check_startup(load_policy(tmp_path / "policy.yaml"), dep)  # everyone signed: the deployment may start


def test_without_in_place_the_originals_stay_and_new_files_are_written(signed):
    tmp_path, _ = signed
    before = (tmp_path / "deployment.yaml").read_text()
    out = _rotate(tmp_path)
    assert out.exit_code == 0, out.output
    assert (tmp_path / "deployment.yaml").read_text() == before
    assert "retired_keys" in (tmp_path / "deployment.yaml.new").read_text()
    assert (tmp_path / "policy.yaml.new").is_file()
    assert "+retired_keys:" in out.output  # the diff is printed


def test_rotating_an_unknown_peer_is_a_config_error(signed):
    tmp_path, _ = signed
    out = runner.invoke(app, ["keys", "rotate", "nobody", "-d", str(tmp_path / "deployment.yaml"),
                              "--dir", str(tmp_path / "keys")])
    assert out.exit_code == 2
    assert not (tmp_path / "keys" / "nobody.key").exists()


def test_a_retired_key_put_back_into_the_deployment_is_refused(signed):
    tmp_path, ids = signed
    _rotate(tmp_path, "--in-place")
    raw = yaml.safe_load((tmp_path / "deployment.yaml").read_text())
    raw["peers"]["hospital_a"]["transport_key"] = ids["hospital_a"].transport_public_z85
    with pytest.raises(ConfigError, match=r"hospital_a's retired key \(retired_keys\[0\].*leaked"):
        load_deployment(write_yaml(tmp_path / "deployment.yaml", raw))


def test_a_policy_signature_by_a_retired_key_does_not_count(signed):
    tmp_path, ids = signed
    _rotate(tmp_path, "--in-place")
    dep = load_deployment(tmp_path / "deployment.yaml")
    policy = load_policy(tmp_path / "policy.yaml")
    # An old signature file re-stamped over the new hash, signed by the retired key.
    sig = tmp_path / "signatures" / "policy.hospital_a.sig"
    record = json.loads(sig.read_text())
    record["policy_hash"] = policy.hash
    record["signature"] = ids["hospital_a"].sign(f"secure-split-policy-signature-v1\n{policy.hash}".encode()).hex()
    sig.write_text(json.dumps(record))
    (problem,) = [p for p in signature_problems(policy, dep) if p.party == "hospital_a"]
    assert problem.problem == "invalid" and "retired key" in problem.message


def test_audit_history_verifies_under_the_key_that_signed_it_and_not_after_retirement(signed):
    tmp_path, ids = signed
    _rotate(tmp_path, "--in-place")
    dep = load_deployment(tmp_path / "deployment.yaml")
    (retired,) = dep.spec.retired_keys
    before = retired.retired_time - timedelta(days=1)
    after = retired.retired_time + timedelta(seconds=1)
    current = dep.spec.peers["hospital_a"].sign_key
    assert sign_keys_valid_at(dep.spec, "hospital_a", before) == [current, ids["hospital_a"].sign_key_hex]
    assert sign_keys_valid_at(dep.spec, "hospital_a", after) == [current]
    assert sign_keys_valid_at(dep.spec, "lab", before) == [ids["lab"].sign_key_hex]
    assert retired.retired_time <= datetime.now(UTC)


def test_the_transport_refuses_a_retired_key_and_says_whose_it_was(signed, tmp_path):
    from tests.unit.transport.conftest import TransportKit

    _, ids = signed
    _rotate(tmp_path, "--in-place")
    dep = load_deployment(tmp_path / "deployment.yaml")
    new_a = load_identity(tmp_path / "keys" / "hospital_a.key")
    old_a, lab = ids["hospital_a"], ids["lab"]
    kit = TransportKit()
    try:
        def build(endpoints):
            lab_ep, a_ep = endpoints
            lab_t = Transport("lab", lab_ep, lab.transport_secret_z85, lab.transport_public_z85,
                              {"hospital_a": TransportPeer("hospital_a", a_ep, new_a.transport_public_z85)},
                              max_message_bytes=4096, linger_ms=0, retired_keys=retired_transport_keys(dep.spec))
            # hospital_a, not yet restarted with its new key, knocks with the old one.
            stale = Transport("hospital_a", a_ep, old_a.transport_secret_z85, old_a.transport_public_z85,
                              {"lab": TransportPeer("lab", lab_ep, lab.transport_public_z85)},
                              max_message_bytes=4096, linger_ms=0)
            kit._opened.extend([lab_t, stale])
            return [lab_t, stale]

        lab_t, stale = kit.start(2, build)
        stale.send("lab", [b"hello"])
        refused = kit.wait_for_event(lab_t, lambda e: e.kind == "auth_refused", kit.CONNECT_TIMEOUT_S)
        assert refused is not None
        assert "retired transport key (hospital_a's key, retired at" in refused.detail
        assert lab_t.recv(0.2) is None
    finally:
        kit.close_all()

    with pytest.raises(ConfigError, match="retired key"):
        Transport("lab", "tcp://127.0.0.1:1", lab.transport_secret_z85, lab.transport_public_z85,
                  {"hospital_a": TransportPeer("hospital_a", "tcp://127.0.0.1:2", old_a.transport_public_z85)},
                  max_message_bytes=4096, retired_keys=retired_transport_keys(dep.spec))


@pytest.mark.parametrize("before", [
    "a: 1\n",
    "a: 1\nretired_keys:\n  - {peer: x, sign_key: s, transport_key: t, retired_at: r}\nb: 2\n",
    "a: 1\nretired_keys:\n- peer: x\n  reason: ''\n",
    "a: 1\nretired_keys: []\n",
    "a: 1\nretired_keys: [{peer: x}]  # a comment\nb: 2",
])
def test_a_retired_entry_is_appended_in_every_list_style(before):
    entry = {"peer": "hospital_a", "sign_key": "ab" * 32, "transport_key": "*&[{#x" * 6 + "zzzz",
             "retired_at": "2026-01-01T00:00:00Z", "reason": "leaked"}
    after = yaml.safe_load(add_retired_key(before, entry))
    old = yaml.safe_load(before)
    assert after["retired_keys"] == [*(old.get("retired_keys") or []), entry]
    assert {k: v for k, v in after.items() if k != "retired_keys"} == {k: v for k, v in old.items() if k != "retired_keys"}


def test_a_key_that_stood_bare_is_replaced_by_a_quoted_one():
    text = "k: abc\nq: \"abc\"\ns: 'abc'\n"
    assert yaml.safe_load(replace_key_text(text, "abc", "*x&y")) == {"k": "*x&y", "q": "*x&y", "s": "*x&y"}
