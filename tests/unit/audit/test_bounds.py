"""The verifier on hostile files: bounded memory, one finding per range of junk, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from secure_split.audit.chain import scan_file
from secure_split.audit.facts import HOLE_WINDOW
from secure_split.audit.synthetic import SyntheticRun, generate_logs

from .conftest import context_of
from .insider import entries_of, resign

RSS_LIMIT_MB = 200


def verify_in_child(run: SyntheticRun) -> tuple[int, dict, float, str]:
    """Run `audit verify --json` in a child process; (exit code, report, the child's peak RSS in MB, stderr)."""
    # The peak of the child's own address space (VmHWM): getrusage's ru_maxrss survives exec and
    # would count the forking test process (hundreds of MB once torch is loaded) as the child's.
    code = ("import runpy, sys\n"
            "sys.argv = ['secure-split-audit', 'verify', sys.argv[1], '--deployment', sys.argv[2], '--json']\n"
            "try:\n    runpy.run_module('secure_split.cli.audit', run_name='__main__')\n"
            "finally:\n    hwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')]\n"
            "    print('RSS', hwm[0], file=sys.stderr)\n")
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


def test_a_log_that_varies_its_format_problems_gets_a_bounded_number_of_findings(small_run: SyntheticRun) -> None:
    # Every message entry carries another unknown field, re-chained and re-signed by its owner: each
    # line is a distinct format problem, yet the findings (and what is kept for them) stay bounded.
    entries = entries_of(small_run, "lab")
    for i, e in enumerate(entries):
        if e["event"].startswith("message_"):
            e["data"][f"extra_{i}"] = i
    resign(small_run, "lab", entries)
    report, _facts = scan_file(small_run.log_dir / "lab.jsonl", peer="lab", context=context_of(small_run))
    malformed = [f for f in report.findings if f.kind == "malformed"]
    assert 30 <= len(malformed) <= 33
    assert any("yet other kinds" in f.message for f in malformed)


def test_protocol_seqs_that_skip_ahead_keep_a_bounded_window(small_run: SyntheticRun) -> None:
    # Every message of one stream skips 200 protocol seqs: holes stay within the window, gaps are
    # sampled, and the log is reported for its gaps.
    entries = entries_of(small_run, "lab")
    stream = [e for e in entries if e["event"] == "message_sent" and e["data"]["kind"] == "gradient"
              and e["data"]["receiver"] == "hospital_a"]
    for i, e in enumerate(stream):
        e["data"]["seq"] = 10 + 200 * i
    resign(small_run, "lab", entries)
    report, facts = scan_file(small_run.log_dir / "lab.jsonl", peer="lab", context=context_of(small_run))
    s = next(s for (snd, rcv, _), s in facts.streams.items() if (snd, rcv) == ("lab", "hospital_a")
             and s.count >= len(stream))
    assert len(s.holes) <= HOLE_WINDOW and 0 < len(s.far_gaps) <= 64
    assert any(f.kind == "message_gap" for f in report.findings)


def test_memory_does_not_grow_with_the_length_of_the_logs(tmp_path_factory: pytest.TempPathFactory) -> None:
    # Peak RSS of `audit verify` on a set ten times longer than another: the same, give or take what
    # is kept per barrier (own checkpoints, held heads: about 1.5% of entries, ~400 bytes each).
    # 2,000 vs 20,000 entries in the normal suite; 20,000 vs 200,000 with SECURE_SPLIT_SLOW=1.
    small = 20_000 if os.environ.get("SECURE_SPLIT_SLOW") == "1" else 2_000
    rss = []
    for entries in (small, 10 * small):
        run = generate_logs(tmp_path_factory.mktemp(f"len{entries}"), entries=entries)
        code, report, rss_mb, stderr = verify_in_child(run)
        assert code == 0 and report["status"] == "clean", stderr
        rss.append(rss_mb)
    print("peak RSS", rss)
    assert rss[1] < RSS_LIMIT_MB
    assert rss[1] - rss[0] < 5 + 0.015 * 9 * small * 400 / 2**20 * 2, rss
