"""The audit log writer: canonical hash-chained entries, signed checkpoints, refusals, crash safety."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog

from secure_split.audit import AuditLog, SignedHead, genesis_hash, verify_file, verify_lines
from secure_split.audit.chain import VerifyContext, read_log
from secure_split.audit.format import ENTRY_KEYS, checkpoint_body_hash, head_message
from secure_split.canonical import canonical_json, sha256_hex
from secure_split.crypto.keys import Identity, generate_identity, verify_signature
from secure_split.errors import AuditError, CryptoError, RemoteProtocolError

DEP = "d" * 64
POL = "p" * 64

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


def fixed_clock() -> Any:
    t = [1_767_225_600 * 10**9]

    def clock() -> int:
        t[0] += 1_000_000
        return t[0]

    return clock


def open_log(path: Path, ident: Identity, **kw: Any) -> AuditLog:
    return AuditLog.open(path, peer=ident.name, identity=ident, deployment_hash=DEP, policy_hash=POL,
                         clock=kw.pop("clock", None) or fixed_clock(), **kw)


def context(*idents: Identity) -> VerifyContext:
    return VerifyContext(deployment_hash=DEP, keys={i.name: i.sign_key_hex for i in idents})


def start(log: AuditLog) -> None:
    log.record("run_start", deployment_hash=DEP, policy_hash=POL, versions={"secure_split": "0.1.0", "protocol": 1},
               resumed=False, resume_epoch=None)


def test_entries_are_canonical_hash_chained_and_the_checkpoint_is_signed(tmp_path: Path, alice: Identity) -> None:
    log = open_log(tmp_path / "alice.jsonl", alice)
    start(log)
    assert log.record("message_sent", **MESSAGE) == 1
    head = log.checkpoint("step barrier")
    final = log.close("ok", metrics={"accuracy": 0.9, "steps": 3})
    lines, torn = read_log(tmp_path / "alice.jsonl")
    assert torn == b""
    entries = [json.loads(line) for line in lines]
    assert [e["seq"] for e in entries] == [0, 1, 2, 3, 4]
    assert [e["event"] for e in entries] == ["run_start", "message_sent", "checkpoint", "run_end", "checkpoint"]
    prev = genesis_hash("alice", DEP)
    for line, e in zip(lines, entries, strict=True):
        assert e["prev"] == prev and e["peer"] == "alice" and e["policy"] == POL and e["v"] == 1
        assert set(e) - {"sig"} == ENTRY_KEYS
        assert canonical_json(e) == line  # written canonical
        prev = checkpoint_body_hash(e) if "sig" in e else sha256_hex(line)
    assert entries[1]["data"] == MESSAGE  # no payload, only the facts
    assert (head.seq, head.head) == (2, checkpoint_body_hash(entries[2]))
    assert (final.seq, final.head) == (4, log.head)
    verify_signature(alice.sign_key_hex, head_message("alice", 2, head.head, DEP), bytes.fromhex(head.signature))
    assert entries[2]["sig"] == {"key": alice.sign_key_hex, "signature": head.signature}
    assert verify_lines(lines, peer="alice", context=context(alice)).findings == []


def test_equal_events_with_fields_in_another_order_give_equal_bytes(tmp_path: Path, alice: Identity) -> None:
    a = open_log(tmp_path / "a" / "alice.jsonl", alice)
    b = open_log(tmp_path / "b" / "alice.jsonl", alice)
    a.record("message_sent", **MESSAGE)
    b.record("message_sent", **dict(reversed(list({**MESSAGE, "shape": (64, 16), "nbytes": 4096.0}.items()))))
    assert (tmp_path / "a" / "alice.jsonl").read_bytes() == (tmp_path / "b" / "alice.jsonl").read_bytes()


def test_one_file_per_peer_per_run(tmp_path: Path, alice: Identity) -> None:
    path = tmp_path / "alice.jsonl"
    open_log(path, alice).record("error", reason="x", error="E")
    with pytest.raises(AuditError, match="already exists"):
        open_log(path, alice)


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (b"\x00" * 16, "never holds payloads"),
        (bytearray(4), "never holds payloads"),
        (memoryview(b"abc"), "never holds payloads"),
        (np.zeros((4, 4), dtype=np.float32), "only JSON scalars"),
        ("x" * 5000, "limit is 4096"),
        (list(range(1000)), "limit is 256"),
        (object(), "only JSON scalars"),
    ],
)
def test_writer_refuses_values_that_could_carry_payloads(tmp_path: Path, alice: Identity, value: Any, why: str) -> None:
    log = open_log(tmp_path / "alice.jsonl", alice)
    with pytest.raises(AuditError, match=why):
        log.record("error", reason=value, error="E")
    assert log.seq == -1
    assert (tmp_path / "alice.jsonl").read_bytes() == b""


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
    assert log.seq == 0  # only the harmless entry was written
    assert all(f.encode() not in (tmp_path / "alice.jsonl").read_bytes() for f in alice.secret_text_forms())
    other = generate_identity("mallory")  # another peer's key is not this writer's secret
    log.record("error", reason=bytes(other._signing).hex(), error="E")


def test_writer_refuses_unknown_events_missing_fields_and_direct_checkpoints(tmp_path: Path, alice: Identity) -> None:
    log = open_log(tmp_path / "alice.jsonl", alice)
    with pytest.raises(AuditError, match=r"unknown audit event|cannot be recorded"):
        log.record("mesage_sent", **MESSAGE)
    with pytest.raises(AuditError, match=r"missing fields \['digest'\]"):
        log.record("message_sent", **{k: v for k, v in MESSAGE.items() if k != "digest"})
    with pytest.raises(AuditError, match="checkpoint"):
        log.record("checkpoint", reason="sneaky")
    assert log.seq == -1


def test_numbers_are_normalised_and_non_finite_floats_become_strings(tmp_path: Path, alice: Identity) -> None:
    log = open_log(tmp_path / "alice.jsonl", alice)
    log.record("run_end", status="failed", reason="diverged",
               metrics={"loss": float("nan"), "best": float("inf"), "steps": np.int64(7), "acc": np.float32(0.5),
                        "epochs": 2.0})
    line = (tmp_path / "alice.jsonl").read_bytes().rstrip(b"\n")
    metrics = json.loads(line)["data"]["metrics"]
    assert metrics == {"loss": "NaN", "best": "Infinity", "steps": 7, "acc": 0.5, "epochs": 2}
    assert b'"epochs":2,' in line


def test_counterparty_head_is_verified_before_it_is_recorded(tmp_path: Path, alice: Identity, bob: Identity) -> None:
    a = open_log(tmp_path / "alice.jsonl", alice)
    b = open_log(tmp_path / "bob.jsonl", bob)
    start(b)
    head = b.checkpoint("barrier")
    a.record_counterparty_head(head, bob.sign_key_hex)
    entry = json.loads((tmp_path / "alice.jsonl").read_bytes().splitlines()[-1])
    assert entry["event"] == "counterparty_head"
    assert entry["data"] == {"counterparty": "bob", "seq": head.seq, "head": head.head,
                             "signature": head.signature, "key": bob.sign_key_hex}
    seq = a.seq
    with pytest.raises(CryptoError, match="does not verify"):
        a.record_counterparty_head(head, alice.sign_key_hex)  # wrong key
    forged = SignedHead(head.peer, head.seq + 1, head.head, head.signature)
    with pytest.raises(CryptoError):
        a.record_counterparty_head(forged, bob.sign_key_hex)
    assert a.seq == seq  # nothing recorded


def test_signed_head_travels_as_message_meta() -> None:
    head = SignedHead("bob", 12, "a" * 64, "b" * 128)
    assert SignedHead.from_meta(head.to_meta()) == head
    for bad in ({}, {**head.to_meta(), "seq": -1}, {**head.to_meta(), "head": "x"},
                {**head.to_meta(), "signature": "B" * 128}, {**head.to_meta(), "peer": "Bob"},
                {**head.to_meta(), "seq": True}):
        with pytest.raises(RemoteProtocolError, match="malformed signed audit head"):
            SignedHead.from_meta(bad)


def test_fsync_at_every_checkpoint_and_close_only(tmp_path: Path, alice: Identity,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    log = open_log(tmp_path / "alice.jsonl", alice)
    before = len(calls)  # creating the file fsyncs its folder
    for _ in range(5):
        log.record("error", reason="r", error="E")
    assert len(calls) == before
    log.checkpoint("barrier")
    assert len(calls) == before + 1
    log.close("ok")
    assert len(calls) == before + 2  # close: run_end, then the final checkpoint and its fsync


def test_closed_log_refuses_entries(tmp_path: Path, alice: Identity) -> None:
    log = open_log(tmp_path / "alice.jsonl", alice)
    log.close("ok")
    assert log.closed
    with pytest.raises(AuditError, match="closed"):
        log.record("error", reason="late", error="E")


def _crashed_log(path: Path, ident: Identity, torn: bytes) -> int:
    log = open_log(path, ident)
    start(log)
    for i in range(5):
        log.record("error", reason=f"r{i}", error="E")
    log.checkpoint("barrier")
    log.record("message_sent", **MESSAGE)
    with open(path, "ab") as fh:  # the process died in the middle of the next write
        fh.write(torn)
    log._sink.close()  # ... and the OS closed its file, releasing the write lock
    return log.seq


def test_torn_tail_is_reported_as_a_crash_not_as_tampering(tmp_path: Path, alice: Identity) -> None:
    path = tmp_path / "alice.jsonl"
    last = _crashed_log(path, alice, b'{"data":{"batch_size":64,"count')
    report = verify_file(path, context(alice))
    assert {f.kind for f in report.findings} == {"torn_tail", "truncated"}
    assert all(f.severity == "warning" for f in report.findings)
    torn = next(f for f in report.findings if f.kind == "torn_tail")
    assert torn.covers(last + 1) and "partial line" in torn.message


def test_resume_drops_the_torn_tail_records_it_and_continues_the_same_chain(tmp_path: Path, alice: Identity) -> None:
    path = tmp_path / "alice.jsonl"
    torn = b'{"data":{"batch_size":64,"count'
    last = _crashed_log(path, alice, torn)
    head_before = verify_file(path, context(alice)).head
    log = open_log(path, alice, resume=True)
    assert log.seq == last + 1
    lines, tail = read_log(path)
    assert tail == b""
    resumed = json.loads(lines[-1])
    assert resumed["event"] == "log_resumed" and resumed["prev"] == head_before
    assert resumed["data"] == {"last_seq": last, "torn_tail_bytes": len(torn), "torn_tail_sha256": sha256_hex(torn)}
    log.record("run_start", deployment_hash=DEP, policy_hash=POL, versions={}, resumed=True, resume_epoch=0)
    log.close("ok")
    assert verify_file(path, context(alice)).findings == []


def test_resume_refuses_to_continue_a_tampered_log(tmp_path: Path, alice: Identity) -> None:
    path = tmp_path / "alice.jsonl"
    _crashed_log(path, alice, b"")
    lines, _ = read_log(path)
    lines[2] = lines[2].replace(b'"r1"', b'"r9"')
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    with pytest.raises(AuditError, match=r"cannot resume.*modified"):
        open_log(path, alice, resume=True)


def test_resume_with_another_key_is_refused(tmp_path: Path, alice: Identity) -> None:
    path = tmp_path / "alice.jsonl"
    _crashed_log(path, alice, b"")
    other = generate_identity("alice")
    with pytest.raises(AuditError, match="cannot resume"):
        AuditLog.open(path, peer="alice", identity=other, deployment_hash=DEP, policy_hash=POL, resume=True)


def test_the_writer_never_touches_structlog_global_configuration(tmp_path: Path, alice: Identity) -> None:
    def explode(*_: Any) -> Any:
        raise AssertionError("the global structlog chain was used")

    old = structlog.get_config()
    try:
        structlog.configure(processors=[explode])
        log = open_log(tmp_path / "alice.jsonl", alice)
        log.record("error", reason="r", error="E")
        log.close("ok")
    finally:
        structlog.configure(**old)
    assert verify_file(tmp_path / "alice.jsonl", context(alice)).findings == []


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
    log.close("ok")
    report = verify_file(tmp_path / "alice.jsonl", context(alice))
    assert report.findings == [] and report.entries == 202


def test_resume_under_another_deployment_says_so_without_accusing_the_log(tmp_path: Path, alice: Identity) -> None:
    path = tmp_path / "alice.jsonl"
    _crashed_log(path, alice, b"")
    size = path.stat().st_size
    with pytest.raises(AuditError, match=r"same deployment\.yaml") as info:
        AuditLog.open(path, peer="alice", identity=alice, deployment_hash="e" * 64, policy_hash=POL, resume=True)
    assert DEP in str(info.value) and "e" * 64 in str(info.value) and "forged" not in str(info.value)
    assert path.stat().st_size == size


def test_a_second_writer_of_the_same_log_is_refused_until_the_first_closes(tmp_path: Path, alice: Identity) -> None:
    path = tmp_path / "alice.jsonl"
    first = open_log(path, alice)
    start(first)
    with pytest.raises(AuditError, match="open for writing in another process"):
        open_log(path, alice, resume=True)  # e.g. `predict` while `peer run` still trains
    first.close("ok")
    second = open_log(path, alice, resume=True)
    second.close("ok")
    assert verify_file(path, context(alice)).findings == []
