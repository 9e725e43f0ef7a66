"""Helpers for integration tests: run the real CLI in real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def cli(*args: str, timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m secure_split ARGS` and capture its output."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "secure_split", *args],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd, check=False,
    )


def run_demo(tmp_path: Path, scenario: str, *extra: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """Run a demo into tmp_path/work and return the process and its summary JSON."""
    summary = tmp_path / "summary.json"
    proc = cli("demo", scenario, "--workdir", str(tmp_path / "work"), "--summary", str(summary), "--quiet",
               *extra, timeout=timeout)
    data = json.loads(summary.read_text()) if summary.is_file() else {}
    return proc, data
