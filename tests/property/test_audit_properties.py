"""Hypothesis properties of the audit log's canonical encoding, and of the verifier on any input.

- Equal events give equal bytes: the same fields in any order, with tuples for lists and whole
  floats for ints, are written as the very same line.
- What the writer writes, the verifier reads back as canonical and intact.
- Whatever bytes a log file holds, the verifier reports findings and never crashes.
- Any single-byte change to any log of a clean three-peer run never verifies clean.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secure_split.audit import FINDING_KINDS, AuditLog, verify_lines, verify_logs
from secure_split.audit.chain import VerifyContext
from secure_split.audit.encoding import encode_entry, parse
from secure_split.audit.reading import read_log, split_lines
from secure_split.audit.synthetic import PEERS, SyntheticRun, generate_logs
from secure_split.crypto.keys import generate_identity

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
IDENT = generate_identity("alice")
DEP = "d" * 64
POL = "e" * 64
CONTEXT = VerifyContext(deployment_hash=DEP, keys={"alice": IDENT.sign_key_hex})
NONCE = "1" * 64

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**62), max_value=2**62)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)


def nested(levels: int) -> st.SearchStrategy[Any]:
    """Scalars in at most `levels` levels of lists and dicts (the writer allows 4 below a field)."""
    if levels == 0:
        return scalars
    inner = nested(levels - 1)
    return scalars | st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)


metrics = st.dictionaries(st.text(min_size=1, max_size=12), nested(3), max_size=6)


def variant(value: Any, rng: random.Random) -> Any:
    """The same value spelled differently: keys reordered, tuples for lists, whole floats for ints."""
    if isinstance(value, dict):
        items = list(value.items())
        rng.shuffle(items)
        return {k: variant(v, rng) for k, v in items}
    if isinstance(value, list):
        out = [variant(v, rng) for v in value]
        return tuple(out) if rng.random() < 0.5 else out
    if type(value) is int and abs(value) < 2**53 and rng.random() < 0.5:
        return float(value)
    return value


def write(directory: Path, fields: dict[str, Any]) -> bytes:
    path = directory / "alice.jsonl"
    log = AuditLog.open(path, peer="alice", identity=IDENT, deployment_hash=DEP, policy_hash=POL,
                        clock=lambda: 1_767_225_600 * 10**9, run_nonce=NONCE)
    log.record("error", **fields)
    return path.read_bytes()


@FAST
@given(metrics=metrics, reason=st.text(max_size=200), seed=st.integers(0, 2**32 - 1))
def test_equal_events_give_equal_bytes(metrics: dict[str, Any], reason: str, seed: int) -> None:
    rng = random.Random(seed)
    fields = {"error": "E", "reason": reason, "details": metrics}
    other = variant(fields, rng)
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        assert write(Path(a), fields) == write(Path(b), other)


@FAST
@given(metrics=metrics)
def test_what_the_writer_writes_reads_back_canonical_and_intact(metrics: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "alice.jsonl"
        log = AuditLog.open(path, peer="alice", identity=IDENT, deployment_hash=DEP, policy_hash=POL,
                            versions=metrics)
        log.record("error", reason="r", error="E", details=metrics)
        log.close("ok", metrics=metrics, missing=["bob"])
        lines, torn = read_log(path)
    assert torn == b""
    assert all(encode_entry(parse(line)) == line for line in lines)
    assert verify_lines(lines, peer="alice", context=CONTEXT).findings == []


@FAST
@given(st.lists(st.binary(max_size=300), max_size=12), st.binary(max_size=40))
def test_the_verifier_reports_and_never_crashes_on_any_bytes(lines: list[bytes], tail: bytes) -> None:
    data = b"\n".join(lines) + b"\n" + tail.replace(b"\n", b"")
    complete, torn = split_lines(data)
    report = verify_lines(complete, peer="alice", context=CONTEXT, torn=torn)
    assert report.findings  # random bytes are never a valid, closed log
    for f in report.findings:
        assert f.kind in FINDING_KINDS and f.message
        assert all(a <= b for a, b in f.entries)


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory: pytest.TempPathFactory) -> SyntheticRun:
    run = generate_logs(tmp_path_factory.mktemp("clean"), entries=250, steps_per_barrier=4)
    assert verify_logs(run.log_dir, run.deployment_path, run.policy_path).clean
    return run


@settings(max_examples=300 if os.environ.get("SECURE_SPLIT_SLOW") == "1" else 15, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(peer=st.sampled_from(PEERS), where=st.floats(0, 1, exclude_max=True) | st.just(0.99999999),
       new=st.integers(0, 255))
def test_any_single_byte_change_to_any_log_is_never_clean(clean_run: SyntheticRun, peer: str, where: float,
                                                          new: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        dst = Path(d) / "run"
        shutil.copytree(clean_run.directory, dst)
        path = dst / "audit" / f"{peer}.jsonl"
        data = bytearray(path.read_bytes())
        k = int(where * len(data))
        if data[k] == new:
            new = (new + 1) % 256
        data[k] = new
        path.write_bytes(bytes(data))
        report = verify_logs(dst / "audit", dst / "deployment.yaml", dst / "policy.yaml")
    assert not report.clean, (peer, k, new)
