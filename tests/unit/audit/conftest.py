"""Fixtures for the audit tests: synthetic three-peer runs written by the real writer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from secure_split.audit.chain import VerifyContext
from secure_split.audit.reading import read_log
from secure_split.audit.synthetic import SyntheticRun, generate_logs
from secure_split.config import Deployment, load_deployment


@pytest.fixture(scope="session")
def big_run(tmp_path_factory: pytest.TempPathFactory) -> SyntheticRun:
    """A 10,000-entry run across three peers (one signed checkpoint per ~70-130 entries per peer)."""
    return generate_logs(tmp_path_factory.mktemp("big"), entries=10_000)


@pytest.fixture(scope="session")
def small_run_template(tmp_path_factory: pytest.TempPathFactory) -> SyntheticRun:
    """A small run (about 600 entries, several barriers) that tests copy before changing."""
    return generate_logs(tmp_path_factory.mktemp("small"), entries=600, steps_per_barrier=5)


@pytest.fixture
def small_run(small_run_template: SyntheticRun, tmp_path: Path) -> SyntheticRun:
    """A fresh copy of the small run, free to tamper with."""
    dst = tmp_path / "run"
    shutil.copytree(small_run_template.directory, dst)
    t = small_run_template
    return SyntheticRun(dst, dst / "audit", dst / "deployment.yaml", t.deployment_hash,
                        dst / "policy.yaml" if t.policy_path else None, t.policy_hash, dict(t.entries),
                        t.identities)


def deployment_of(run: SyntheticRun) -> Deployment:
    """The run's loaded deployment."""
    return load_deployment(run.deployment_path)


def lines_of(run: SyntheticRun, peer: str) -> list[bytes]:
    """The complete lines of a peer's log."""
    lines, torn = read_log(run.log_dir / f"{peer}.jsonl")
    assert torn == b""
    return lines


def write_lines(run: SyntheticRun, peer: str, lines: list[bytes], torn: bytes = b"") -> None:
    """Replace a peer's log with these lines (and an optional torn tail)."""
    (run.log_dir / f"{peer}.jsonl").write_bytes(b"".join(line + b"\n" for line in lines) + torn)


def context_of(run: SyntheticRun, *, cache_lines: bool = False) -> VerifyContext:
    """A verification context for the run's deployment."""
    return VerifyContext.from_deployment(deployment_of(run), cache_lines=cache_lines)
