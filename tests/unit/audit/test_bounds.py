"""The verifier on hostile files: bounded memory, one finding per range of junk, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from secure_split.audit.synthetic import SyntheticRun

RSS_LIMIT_MB = 200


def verify_in_child(run: SyntheticRun) -> tuple[int, dict, float, str]:
    """Run `audit verify --json` in a child process; (exit code, report, the child's peak RSS in MB, stderr)."""
    code = ("import resource, runpy, sys\n"
            "sys.argv = ['secure-split-audit', 'verify', sys.argv[1], '--deployment', sys.argv[2], '--json']\n"
            "try:\n    runpy.run_module('secure_split.cli.audit', run_name='__main__')\n"
            "finally:\n    print('RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(run.log_dir), str(run.deployment_path)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONHASHSEED": "0"})
    rss_kb = int(next(line.split()[1] for line in proc.stderr.splitlines() if line.startswith("RSS")))
    return proc.returncode, json.loads(proc.stdout), rss_kb / 1024, proc.stderr


@pytest.mark.parametrize("junk", ["newlines", "huge_line", "random"])
def test_junk_appended_to_a_log_gives_bounded_findings_in_bounded_memory(small_run: SyntheticRun, junk: str) -> None:
    path: Path = small_run.log_dir / "lab.jsonl"
    with open(path, "ab") as fh:
        if junk == "newlines":
            # 10 MB (the flood that took 8 GB and a traceback in format 1) with SECURE_SPLIT_SLOW=1, 3 MB otherwise
            fh.write(b"\n" * (10_000_000 if os.environ.get("SECURE_SPLIT_SLOW") == "1" else 3_000_000))
        elif junk == "huge_line":
            fh.write(b"{" + b"x" * 20_000_000 + b"\n")
        else:
            fh.write(os.urandom(5_000_000))
    code, report, rss_mb, stderr = verify_in_child(small_run)
    assert code == 1, stderr
    assert "Traceback" not in stderr
    assert len(report["findings"]) < 50 and any(f["kind"] in ("garbage", "torn_tail") for f in report["findings"])
    assert rss_mb < RSS_LIMIT_MB, rss_mb
