"""Keys paste into YAML as printed; a key pasted under the wrong peer is named as such."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from secure_split.cli.main import app, public_yaml_block
from secure_split.config import load_deployment, own_key_problems, peer_fingerprint
from secure_split.crypto.keys import PublicIdentity, load_public
from secure_split.errors import ConfigError
from secure_split.policy import check_deployment, load_policy, policy_for_deployment
from tests.unit.ops.ops_fixtures import entry, identities, vertical, write_yaml

runner = CliRunner()


@pytest.fixture(scope="module")
def ids():
    return identities()


def test_keys_new_output_pastes_into_yaml_as_it_is(tmp_path):
    for i in range(5):
        out = runner.invoke(app, ["keys", "new", f"peer_{i}", "--dir", str(tmp_path)])
        assert out.exit_code == 0, out.output
        pub = load_public(tmp_path / f"peer_{i}.pub")
        pasted = yaml.safe_load(out.output)
        assert pasted == {pub.name: {"sign_key": pub.sign_key_hex, "transport_key": pub.transport_key_z85}}
        assert str(tmp_path / f"peer_{i}.key") in out.output  # as a comment
        assert pub.fingerprint in out.output


@pytest.mark.parametrize("hostile", ["*aliasxx", "&anchorx", "!tagxxxx", "[flow]xx", "{a}#comm", "%direct:", "@resrvd>"])
def test_a_transport_key_full_of_yaml_syntax_survives_the_paste(hostile):
    # Z85 uses these characters; unquoted, a key starting with '*' is an alias, with '&' an anchor.
    key = (hostile * 5)[:40]
    pub = PublicIdentity("peer", "ab" * 32, key)
    assert yaml.safe_load(public_yaml_block(pub)) == {"peer": {"sign_key": "ab" * 32, "transport_key": key}}
    try:  # what `keys new` used to print: an error, or worse, another value
        unquoted = yaml.safe_load(f"peer:\n  transport_key: {key}\n")["peer"]["transport_key"]
    except yaml.YAMLError:
        unquoted = None
    assert unquoted != key


def test_a_key_holding_an_emoji_code_prints_as_it_is(tmp_path, monkeypatch):
    # Z85 holds ':' and letters: a key with ":b:" in it was printed by rich as an emoji.
    from secure_split.crypto import keys as keys_module

    pub = PublicIdentity("peer", "ab" * 32, ("x:b:y:+1:" * 5)[:40])
    monkeypatch.setattr(keys_module, "load_public", lambda _p: pub)
    shown = runner.invoke(app, ["keys", "show", str(tmp_path / "peer.pub")])
    assert shown.exit_code == 0, shown.output
    assert yaml.safe_load(shown.output)["peer"]["transport_key"] == pub.transport_key_z85


def test_keys_show_prints_the_same_block(tmp_path):
    runner.invoke(app, ["keys", "new", "lab", "--dir", str(tmp_path)])
    shown = runner.invoke(app, ["keys", "show", str(tmp_path / "lab.pub")])
    assert shown.exit_code == 0
    assert yaml.safe_load(shown.output)["lab"]["transport_key"] == load_public(tmp_path / "lab.pub").transport_key_z85


def test_a_deployment_listing_one_key_for_two_peers_names_whose_key_it_is(tmp_path, ids):
    dep = vertical(ids)
    dep["peers"]["hospital_b"]["transport_key"] = dep["peers"]["hospital_a"]["transport_key"]
    with pytest.raises(ConfigError) as raised:
        load_deployment(write_yaml(tmp_path / "deployment.yaml", dep))
    (problem,) = raised.value.problems
    assert problem.key == "peers.hospital_b.transport_key"
    assert problem.line is not None
    assert "the key for hospital_b in deployment.yaml is hospital_a's" in problem.message


def _with_policy(tmp_path: Path, dep: dict, policy_from: dict | None = None):
    """Write the deployment and a policy generated from `policy_from` (default: the deployment)."""
    base = load_deployment(write_yaml(tmp_path / "deployment.yaml", policy_from or dep))
    policy = policy_for_deployment(base, name="ops", not_after="2099-12-31")
    write_yaml(tmp_path / "policy.yaml", policy)
    return load_deployment(write_yaml(tmp_path / "deployment.yaml", dep)), load_policy(tmp_path / "policy.yaml")


def test_policy_check_says_a_pasted_deployment_key_is_another_partys(tmp_path, ids):
    # hospital_a rotated its keys; hospital_b's entry got hospital_a's old ones by mistake.
    before = vertical(ids)
    after = copy.deepcopy(before)
    after["peers"]["hospital_a"] = entry(identities("hospital_a")["hospital_a"], 7100)
    for key in ("sign_key", "transport_key"):
        after["peers"]["hospital_b"][key] = before["peers"]["hospital_a"][key]
    dep, policy = _with_policy(tmp_path, after, policy_from=before)
    texts = [f.message for f in check_deployment(policy, dep) if f.rule == "parties"]
    assert any("the key for hospital_b in deployment.yaml is hospital_a's" in t for t in texts), texts
    # hospital_a's own finding cannot know which of the two files is wrong; it names both readings.
    about_a = [t for t in texts if "for hospital_a in policy.yaml" in t]
    assert about_a and "the keys for hospital_b in deployment.yaml are hospital_a's" in about_a[0]


def test_a_fingerprint_matching_no_key_at_all_says_one_of_the_two_keys_is_wrong(tmp_path, ids):
    after = vertical(ids)
    after["peers"]["lab"]["transport_key"] = identities("mallory")["mallory"].transport_public_z85
    dep, policy = _with_policy(tmp_path, after, policy_from=vertical(ids))
    (finding,) = [f for f in check_deployment(policy, dep) if f.rule == "parties"]
    assert "party 'lab'" in finding.message and "one of the two keys was pasted wrong" in finding.message
    assert "keys show lab.pub" in finding.message


def test_a_policy_listing_one_fingerprint_for_two_parties_names_whose_it_is(tmp_path, ids):
    dep, _ = _with_policy(tmp_path, vertical(ids))
    text = (tmp_path / "policy.yaml").read_text()
    spec = dep.spec.peers
    fp_a = peer_fingerprint(spec["hospital_a"].sign_key, spec["hospital_a"].transport_key)
    fp_b = peer_fingerprint(spec["hospital_b"].sign_key, spec["hospital_b"].transport_key)
    (tmp_path / "policy.yaml").write_text(text.replace(fp_b, fp_a))
    with pytest.raises(ConfigError) as raised:
        load_policy(tmp_path / "policy.yaml")
    (problem,) = raised.value.problems
    assert "the fingerprint for hospital_b in policy.yaml is hospital_a's" in problem.message
    assert problem.line is not None


def test_policy_check_says_a_policy_fingerprint_belongs_to_another_peers_keys(tmp_path, ids):
    # The deployment has hospital_a's new keys; the policy lists them for hospital_b by mistake.
    before = vertical(ids)
    after = copy.deepcopy(before)
    new_a = identities("hospital_a")["hospital_a"]
    after["peers"]["hospital_a"] = entry(new_a, 7100)
    dep, _ = _with_policy(tmp_path, after, policy_from=before)
    fp_b = peer_fingerprint(ids["hospital_b"].sign_key_hex, ids["hospital_b"].transport_public_z85)
    text = (tmp_path / "policy.yaml").read_text()
    (tmp_path / "policy.yaml").write_text(text.replace(fp_b, new_a.public.fingerprint))
    texts = [f.message for f in check_deployment(load_policy(tmp_path / "policy.yaml"), dep) if f.rule == "parties"]
    assert any("the fingerprint for hospital_b in policy.yaml is hospital_a's" in t for t in texts), texts


def test_a_peer_started_with_another_peers_key_file_is_told_whose_it_is(tmp_path, ids):
    dep = load_deployment(write_yaml(tmp_path / "deployment.yaml", vertical(ids)))
    a = ids["hospital_a"]
    (problem,) = own_key_problems(dep, "hospital_b", a.sign_key_hex, a.transport_public_z85, "keys/hospital_a.key")
    assert "this key file holds hospital_a's keys" in problem.message
    assert "not hospital_b's" in problem.message
    assert own_key_problems(dep, "hospital_a", a.sign_key_hex, a.transport_public_z85, "k") == []


def test_a_peer_whose_deployment_entry_has_a_wrong_transport_key_is_told_which_key_and_line(tmp_path, ids):
    raw = vertical(ids)
    raw["peers"]["hospital_b"]["transport_key"] = identities("mallory")["mallory"].transport_public_z85
    dep = load_deployment(write_yaml(tmp_path / "deployment.yaml", raw))
    b = ids["hospital_b"]
    (problem,) = own_key_problems(dep, "hospital_b", b.sign_key_hex, b.transport_public_z85, "keys/hospital_b.key")
    assert "the transport_key for hospital_b in deployment.yaml (deployment.yaml:" in problem.message
    assert "the sign_key for" not in problem.message  # only the key that differs is named
