"""The audit log writer, format 2: canonical chained entries, run segments, run binding, close round."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog

from secure_split.audit import AuditLog, SignedHead, compute_run_id, genesis_hash, verify_file
from secure_split.audit.chain import VerifyContext
from secure_split.audit.encoding import checkpoint_body_hash, encode_entry, parse
from secure_split.audit.format import ENTRY_KEYS, MetricsStatement, head_message
from secure_split.audit.reading import read_log
from secure_split.audit.sink import RefusalLimiter
from secure_split.canonical import sha256_hex
from secure_split.crypto.keys import Identity, generate_identity, verify_signature
from secure_split.errors import AuditError, CryptoError, RemoteProtocolError

DEP = "d" * 64
POL = "e" * 64

MESSAGE = {
    "kind": "activation", "edge": "bottom->top", "step": 3, "seq": 7, "session": "ab" * 16, "sender": "alice",
    "receiver": "bob", "counterparty": "bob", "nbytes": 4096, "dtype": "float32", "shape": [64, 16],
    "batch_size": 64, "digest": "c" * 64, "decision_id": "d-0123456789abcdef", "rule_id": "allow-activations",
}


@pytest.fixture(scope="module")
def alice() -> Identity:
    return generate_identity("alice")


@pytest.fixture(scope="module")
def bob() -> Identity:
    return generate_identity("bob")


_T = [1_767_225_600 * 10**9]


def fixed_clock() -> Any:
    """A test clock that only moves forward (shared by every log a test opens)."""

    def clock() -> int:
        _T[0] += 1_000_000
        return _T[0]

    return clock


def open_log(path: Path, ident: Identity, **kw: Any) -> AuditLog:
    return AuditLog.open(path, peer=ident.name, identity=ident, deployment_hash=DEP, policy_hash=POL,
                         clock=kw.pop("clock", None) or fixed_clock(), **kw)


def context(*idents: Identity) -> VerifyContext:
    return VerifyContext(deployment_hash=DEP, keys={i.name: i.sign_key_hex for i in idents})


def bind(*logs: AuditLog) -> str:
    nonces = {log._peer: log.run_nonce for log in logs}
    run_id = compute_run_id(DEP, POL, nonces)
    for log in logs:
        log.bind_run(run_id, nonces)
    return run_id


def test_open_writes_run_start_with_a_fresh_nonce_bound_into_the_genesis(tmp_path: Path, alice: Identity) -> None:
    log = open_log(tmp_path / "alice.jsonl", alice)
    first = parse(read_log(tmp_path / "alice.jsonl")[0][0])
    assert first["event"] == "run_start" and first["seq"] == 0
    assert first["data"]["nonce"] == log.run_nonce and first["data"]["previous"] is None
    assert first["prev"] == genesis_hash("alice", DEP, log.run_nonce)
    other = open_log(tmp_path / "other" / "alice.jsonl", alice)
    assert other.run_nonce != log.run_nonce  # two processes' logs never share a genesis


def test_entries_are_canonical_hash_chained_and_checkpoints_bind_the_run(tmp_path: Path, alice: Identity,
                                                                         bob: Identity) -> None:
    a, b = open_log(tmp_path / "alice.jsonl", alice), open_log(tmp_path / "bob.jsonl", bob)
    run_id = bind(a, b)
    assert a.record("message_sent", **MESSAGE) == 2
    head = a.checkpoint("step barrier")
    assert (head.run, head.nonce) == (run_id, a.run_nonce)
    verify_signature(alice.sign_key_hex, head_message("alice", head.seq, head.head, DEP, run=run_id,
                                                      nonce=a.run_nonce), bytes.fromhex(head.signature))
    lines, _torn = read_log(tmp_path / "alice.jsonl")
    entries = [parse(line) for line in lines]
    prev = genesis_hash("alice", DEP, a.run_nonce)
    for line, e in zip(lines, entries, strict=True):
        assert e["prev"] == prev and set(e) - {"sig"} == ENTRY_KEYS and e["v"] == 2
        assert encode_entry(e) == line
        prev = checkpoint_body_hash(e) if "sig" in e else sha256_hex(line)
    assert entries[2]["data"] == MESSAGE


def test_a_fresh_start_in_the_same_folder_appends_a_new_segment(tmp_path: Path, alice: Identity, bob: Identity) -> None:
    path = tmp_path / "alice.jsonl"
    first = open_log(path, alice)
    first.close("failed", "no peer answered", missing=["bob"])
    second = open_log(path, alice)  # used to refuse "one file per peer per run"
    assert second.run_nonce != first.run_nonce
    entries = [parse(line) for line in read_log(path)[0]]
    starts = [e for e in entries if e["event"] == "run_start"]
    assert len(starts) == 2 and starts[1]["data"]["previous"]["closed"] is True
    assert [e["seq"] for e in entries] == list(range(len(entries)))
    second.close("failed", "again", missing=["bob"])
    assert [f.kind for f in verify_file(path, context(alice, bob)).findings] == []


def test_counterparty_heads_of_another_run_are_refused(tmp_path: Path, alice: Identity, bob: Identity) -> None:
    a, b = open_log(tmp_path / "alice.jsonl", alice), open_log(tmp_path / "bob.jsonl", bob)
    bind(a, b)
    head = b.checkpoint("barrier")
    a.record_counterparty_head(head, bob.sign_key_hex)
    entry = parse(read_log(tmp_path / "alice.jsonl")[0][-1])
    assert entry["event"] == "counterparty_head" and entry["data"]["run_id"] == head.run
    seq = a.seq
    old = SignedHead(head.peer, head.seq, head.head, head.signature, run="f" * 64, nonce=head.nonce)
    with pytest.raises(RemoteProtocolError, match="another run"):
        a.record_counterparty_head(old, bob.sign_key_hex)
    with pytest.raises(CryptoError, match="does not verify"):
        a.record_counterparty_head(head, alice.sign_key_hex)
    assert a.seq == seq


def test_bind_run_refuses_a_run_without_our_nonce_or_with_a_wrong_id(tmp_path: Path, alice: Identity) -> None:
    log = open_log(tmp_path / "alice.jsonl", alice)
    with pytest.raises(AuditError, match="does not hold"):
        log.bind_run(compute_run_id(DEP, POL, {"alice": "1" * 64}), {"alice": "1" * 64})
    with pytest.raises(AuditError, match="not the hash"):
        log.bind_run("2" * 64, {"alice": log.run_nonce})


def test_signed_metrics_are_recorded_as_the_senders(tmp_path: Path, alice: Identity, bob: Identity) -> None:
    a, b = open_log(tmp_path / "alice.jsonl", alice), open_log(tmp_path / "bob.jsonl", bob)
    bind(a, b)
    statement = b.record_epoch_metrics(0, {"accuracy": 0.5, "rows": 10.0})
    again = MetricsStatement.from_meta("bob", statement.to_meta(), statement.run)
    a.record_counterparty_metrics(again, bob.sign_key_hex)
    last = parse(read_log(tmp_path / "alice.jsonl")[0][-1])
    assert last["event"] == "counterparty_metrics" and last["data"]["counterparty"] == "bob"
    assert last["data"]["values"] == {"accuracy": 0.5, "rows": 10}
    forged = MetricsStatement("bob", 0, {"accuracy": 1.0}, statement.run, statement.signature)
    with pytest.raises(CryptoError):
        a.record_counterparty_metrics(forged, bob.sign_key_hex)


def test_close_round_and_nothing_but_its_entries_after_run_end(tmp_path: Path, alice: Identity, bob: Identity) -> None:
    a, b = open_log(tmp_path / "alice.jsonl", alice), open_log(tmp_path / "bob.jsonl", bob)
    bind(a, b)
    ha, hb = a.begin_close("ok"), b.begin_close("ok")
    with pytest.raises(AuditError, match="run has ended"):
        a.record("checkpoint_saved", epoch=1, digest="x")
    a.record_counterparty_head(hb, bob.sign_key_hex)
    b.record_counterparty_head(ha, alice.sign_key_hex)
    a.finish_close()
    b.finish_close(missing=[])
    assert a.closed and b.closed
    from secure_split.audit import verify_logs  # noqa: F401 (the pair verifies clean: test_insider_attacks)


def test_refusals_of_outsiders_are_rate_limited(tmp_path: Path, alice: Identity) -> None:
    now = [0.0]
    log = open_log(tmp_path / "alice.jsonl", alice, refusal_limit=RefusalLimiter(3, 60.0, lambda: now[0]))
    written = [log.record_refusal("key:abc", "not in the deployment") for _ in range(1000)]
    assert written.count(True) == 3
    now[0] = 61.0
    assert log.record_refusal("key:abc", "again")
    events = [parse(x)["data"] for x in read_log(tmp_path / "alice.jsonl")[0][1:]]
    assert [e["count"] for e in events] == [1, 1, 1, 997, 1]


@pytest.mark.parametrize(
    ("value", "why"),
    [(b"\x00" * 16, "never holds payloads"), (np.zeros((4, 4), dtype=np.float32), "only JSON scalars"),
     ("x" * 5000, "limit is 4096"), (list(range(1000)), "limit is 256"), (2**70, "outside")],
)
def test_writer_refuses_values_that_could_carry_payloads(tmp_path: Path, alice: Identity, value: Any, why: str) -> None:
    log = open_log(tmp_path / "alice.jsonl", alice)
    with pytest.raises(AuditError, match=why):
        log.record("error", reason=value, error="E")
    assert log.seq == 0


def test_writer_refuses_an_entry_holding_the_peers_secret_key_as_text(tmp_path: Path, alice: Identity) -> None:
    import base64

    from secure_split.crypto.z85 import z85_encode

    seed, transport = bytes(alice._signing), bytes(alice._transport)
    forms = [seed.hex(), seed.hex().upper(), transport.hex(), z85_encode(transport), z85_encode(seed),
             base64.b64encode(seed).decode(), base64.urlsafe_b64encode(transport).decode().rstrip("=")]
    assert set(forms) <= set(alice.secret_text_forms())
    log = open_log(tmp_path / "alice.jsonl", alice)
    log.record("error", reason="a harmless reason", error="E")
    for form in forms:  # anywhere in the entry: a field of its own, inside a longer string, in a list
        for fields in ({"reason": form}, {"reason": f"key file said {form}!"}, {"reason": "r", "items": ["a", form]}):
            with pytest.raises(AuditError, match="secret key as text") as info:
                log.record("error", error="E", **fields)
            assert form not in str(info.value)
    assert log.seq == 1  # run_start and the harmless entry only
    assert all(f.encode() not in (tmp_path / "alice.jsonl").read_bytes() for f in alice.secret_text_forms())
    other = generate_identity("mallory")  # another peer's key is not this writer's secret
    log.record("error", reason=bytes(other._signing).hex(), error="E")


def test_numbers_are_normalised_and_non_finite_floats_become_strings(tmp_path: Path, alice: Identity) -> None:
    log = open_log(tmp_path / "alice.jsonl", alice)
    log.begin_close("failed", "diverged", metrics={"loss": float("nan"), "best": float("inf"), "steps": np.int64(7),
                                                   "acc": np.float32(0.5), "epochs": 2.0, "tiny": 1e-7})
    line = read_log(tmp_path / "alice.jsonl")[0][1]
    assert parse(line)["data"]["metrics"] == {"loss": "NaN", "best": "Infinity", "steps": 7, "acc": 0.5, "epochs": 2,
                                              "tiny": 1e-7}
    assert b'"epochs":2,' in line and b'"tiny":1e-7' in line


def test_legacy_record_run_start_is_accepted_when_it_says_what_open_wrote(tmp_path: Path, alice: Identity) -> None:
    import secure_split

    log = open_log(tmp_path / "alice.jsonl", alice)
    assert log.record("run_start", deployment_hash=DEP, policy_hash=POL, resumed=False, resume_epoch=None,
                      versions={"secure_split": secure_split.__version__,
                                "protocol": secure_split.PROTOCOL_VERSION}) == 0
    with pytest.raises(AuditError, match=r"written by AuditLog\.open"):
        log.record("run_start", deployment_hash=DEP, policy_hash=POL, resumed=True, resume_epoch=3, versions={})


def _crash(path: Path, ident: Identity, torn: bytes) -> AuditLog:
    log = open_log(path, ident)
    for i in range(5):
        log.record("error", reason=f"r{i}", error="E")
    with open(path, "ab") as fh:
        fh.write(torn)
    log._sink.close()  # the process died; the OS released its file and lock
    return log


def test_continuing_after_a_crash_drops_the_torn_tail_and_records_it(tmp_path: Path, alice: Identity) -> None:
    path = tmp_path / "alice.jsonl"
    torn = b'{"data":{"batch_size":64,"count'
    before = _crash(path, alice, torn)
    log = open_log(path, alice, resume=True, resume_epoch=0)
    lines, tail = read_log(path)
    assert tail == b""
    start = parse(lines[-1])
    assert start["event"] == "run_start" and start["data"]["resumed"] is True
    assert start["data"]["previous"] == {"seq": before.seq, "head": before.head, "run_id": "", "closed": False,
                                         "torn_tail_bytes": len(torn), "torn_tail_sha256": sha256_hex(torn)}
    log.close("ok", missing=["bob"])
    kinds = [(f.kind, f.severity) for f in verify_file(path, context(alice)).findings]
    assert kinds == []


def test_continuing_a_tampered_log_is_refused(tmp_path: Path, alice: Identity) -> None:
    path = tmp_path / "alice.jsonl"
    _crash(path, alice, b"")
    lines, _ = read_log(path)
    lines[2] = lines[2].replace(b'"r1"', b'"r9"')
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    with pytest.raises(AuditError, match=r"cannot continue.*modified"):
        open_log(path, alice, resume=True)
    with pytest.raises(AuditError, match="cannot continue"):
        AuditLog.open(path, peer="alice", identity=generate_identity("alice"), deployment_hash=DEP, policy_hash=POL)


def test_continuing_under_another_deployment_says_so(tmp_path: Path, alice: Identity) -> None:
    path = tmp_path / "alice.jsonl"
    _crash(path, alice, b"")
    size = path.stat().st_size
    with pytest.raises(AuditError, match=r"same deployment\.yaml") as info:
        AuditLog.open(path, peer="alice", identity=alice, deployment_hash="f" * 64, policy_hash=POL, resume=True)
    assert DEP in str(info.value) and "forged" not in str(info.value)
    assert path.stat().st_size == size


def test_a_second_writer_of_the_same_log_is_refused(tmp_path: Path, alice: Identity) -> None:
    path = tmp_path / "alice.jsonl"
    first = open_log(path, alice)
    with pytest.raises(AuditError, match="open for writing in another process"):
        open_log(path, alice)
    first.close("ok", missing=["bob"])
    open_log(path, alice).close("ok", missing=["bob"])


def test_the_writer_never_touches_structlog_global_configuration(tmp_path: Path, alice: Identity) -> None:
    def explode(*_: Any) -> Any:
        raise AssertionError("the global structlog chain was used")

    old = structlog.get_config()
    try:
        structlog.configure(processors=[explode])
        open_log(tmp_path / "alice.jsonl", alice).close("ok", missing=["bob"])
    finally:
        structlog.configure(**old)


def test_concurrent_records_keep_one_consistent_chain(tmp_path: Path, alice: Identity) -> None:
    log = open_log(tmp_path / "alice.jsonl", alice)

    def work(i: int) -> None:
        for j in range(50):
            log.record("error", reason=f"thread {i} entry {j}", error="E")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close("ok", missing=["bob"])
    report = verify_file(tmp_path / "alice.jsonl", context(alice))
    assert report.findings == [] and report.entries == 205  # run_start, 200, the close (4)


def test_signed_head_travels_as_message_meta() -> None:
    head = SignedHead("bob", 12, "a" * 64, "b" * 128, run="c" * 64, nonce="d" * 64)
    assert SignedHead.from_meta(head.to_meta()) == head
    for bad in ({}, {**head.to_meta(), "seq": -1}, {**head.to_meta(), "nonce": "x"},
                {**head.to_meta(), "run_id": "C" * 64}, {k: v for k, v in head.to_meta().items() if k != "nonce"}):
        with pytest.raises(RemoteProtocolError, match="malformed signed audit head"):
            SignedHead.from_meta(bad)


def test_run_id_is_the_hash_of_deployment_policy_and_every_nonce() -> None:
    nonces = {"a": "1" * 64, "b": "2" * 64}
    rid = compute_run_id(DEP, POL, nonces)
    assert rid == compute_run_id(DEP, POL, dict(reversed(list(nonces.items()))))
    assert rid != compute_run_id(DEP, POL, {**nonces, "b": "3" * 64}) != compute_run_id("0" * 64, POL, nonces)
    assert json.loads(json.dumps(rid)) == rid and len(rid) == 64
