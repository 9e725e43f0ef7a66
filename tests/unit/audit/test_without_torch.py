"""The verifier is an auditor's tool: it runs with neither torch nor tenseal installed."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from secure_split.audit.synthetic import SyntheticRun

BLOCK = "import sys\nsys.modules['torch'] = None\nsys.modules['tenseal'] = None\n"


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BLOCK + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120)


def test_verify_logs_runs_without_torch_or_tenseal(small_run: SyntheticRun) -> None:
    proc = run_python(f"""
        from secure_split.audit import verify_logs
        report = verify_logs({str(small_run.log_dir)!r}, {str(small_run.deployment_path)!r})
        assert report.status == "incomplete" and not report.findings, report.findings
        assert "secure_split.policy" not in sys.modules, "the policy engine is imported only to check a policy"
        report = verify_logs({str(small_run.log_dir)!r}, {str(small_run.deployment_path)!r},
                             {str(small_run.policy_path)!r})
        assert report.clean and report.checks["flows_checked"] > 0, report.findings
        print("verified")
    """)
    assert proc.returncode == 0, proc.stderr
    assert "verified" in proc.stdout


def test_audit_cli_runs_without_torch_or_tenseal(small_run: SyntheticRun) -> None:
    proc = run_python(f"""
        import runpy
        sys.argv = ["secure-split-audit", "verify", {str(small_run.log_dir)!r},
                    "--deployment", {str(small_run.deployment_path)!r}, "--json"]
        runpy.run_module("secure_split.cli.audit", run_name="__main__")
    """)
    assert proc.returncode == 0, proc.stderr
    assert '"status": "clean"' in proc.stdout
