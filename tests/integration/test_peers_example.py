"""The worked example of peers/ runs end to end: policy and data checked, one `peer run` process
per config trains on the CSV files, the audit logs verify, each hospital's preprocessing was
fitted on its training rows and saved with its checkpoints; then the lab asks for the diagnosis
of the patients it has none for (`predict`), the hospitals serve their columns (`serve`), and
the audit logs, the request included, verify again."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from secure_split.engine.schedule import split_train_test
from secure_split.scenarios import free_ports
from tests.integration.helpers import last_segment

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_FILES = ["policies/hospitals_lab.yaml", "policies/deployments/hospitals_lab.deployment.yaml",
                 *(f"policies/signatures/hospitals_lab.{p}.sig" for p in ("hospital_a", "hospital_b", "lab"))]


def _copy_example(root: Path) -> Path:
    """peers/, the example's policy, deployment and signatures, and the script, on free ports."""
    shutil.copytree(REPO / "peers", root / "peers")
    shutil.copytree(REPO / "scripts", root / "scripts")
    for f in EXAMPLE_FILES:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / f, root / f)
    dep = root / "policies/deployments/hospitals_lab.deployment.yaml"
    text = dep.read_text()
    for old, new in zip((5671, 5672, 5673), free_ports(3), strict=True):
        text = text.replace(f"127.0.0.1:{old}", f"127.0.0.1:{new}")
    dep.write_text(text)
    return root


def _ids(path: Path) -> set[int]:
    with path.open() as f:
        return {int(r["patient_id"]) for r in csv.DictReader(f)}


def test_the_example_trains_predicts_verifies_its_audit_and_keeps_preprocessing_private(tmp_path: Path) -> None:
    root = _copy_example(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.run([sys.executable, "scripts/run_example.py", "--root", str(root), "--timeout", "240"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=360, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert out.count("CLEAN: every log intact") == 2 and "example: every step worked" in out
    acc = float(re.search(r"test accuracy of the split model: ([0-9.]+)", out).group(1))  # type: ignore[union-attr]
    assert acc >= 0.9, out  # raw clinical values without standardisation reach about 0.77

    # hospital_a's imputation value is the median of its *training* rows, and lives only in its own checkpoint.
    data = root / "peers" / "data"
    inter = sorted(_ids(data / "hospital_a.csv") & _ids(data / "hospital_b.csv") & _ids(data / "lab.csv"))
    train, _ = split_train_test(np.asarray(inter), 0.2, 7)
    with (data / "hospital_a.csv").open() as f:
        smooth = {int(r["patient_id"]): r["mean_smoothness"] for r in csv.DictReader(f)}
    expected = float(np.median([float(smooth[i]) for i in train if smooth[i] != ""]))
    manifests = sorted((root / "example-work" / "checkpoints" / "hospital_a").glob("epoch-*.json"))
    prep = json.loads(manifests[-1].read_text())["preprocessing"]
    column = {c["name"]: c for c in prep["columns"]}["mean_smoothness"]
    assert column["fill"] == expected and prep["train_rows"] == len(train)
    for peer in ("hospital_b", "lab"):
        for manifest in (root / "example-work" / "checkpoints" / peer).glob("epoch-*.json"):
            assert "mean_smoothness" not in manifest.read_text()
    logs = "".join(p.read_text() for p in (root / "example-work" / "audit").glob("*.jsonl"))
    assert repr(expected) not in logs and "mean_smoothness" not in logs

    # The prediction request: the lab named 20 patient ids, the hospitals served their columns.
    with (root / "example-work" / "predictions.csv").open() as f:
        predicted = {int(r["id"]) for r in csv.DictReader(f)}
    assert predicted == _ids(data / "lab_to_predict.csv") and len(predicted) == 20
    assert not predicted & _ids(data / "lab.csv")  # patients the lab has no diagnosis for
    agree = re.search(r"(\d+)/20 predictions match", out)
    assert agree is not None and int(agree.group(1)) >= 15, out
    audit = {p: [json.loads(line) for line in (root / "example-work" / "audit" / f"{p}.jsonl").read_text().splitlines()]
             for p in ("hospital_a", "hospital_b", "lab")}
    for hospital in ("hospital_a", "hospital_b"):
        served = last_segment(audit[hospital])
        aligned = [e["data"] for e in served if e["event"] == "ids_aligned"]
        # The PSI of the request: the hospital learns which 20 of its patients are asked for, nothing more.
        assert [(d["parties"], d["intersection_size"]) for d in aligned] == [(["lab", "hospital_a", "hospital_b"], 20)]
        kinds = {e["data"]["kind"] for e in served if e["event"] == "message_received"}
        assert kinds <= {"hello", "barrier", "psi", "step_begin", "audit_receipt"}, kinds
    for p, entries in audit.items():  # no prediction crossed the wire; every request ended with signed heads
        assert not [e for e in entries if e["event"].startswith("message_") and e["data"]["kind"] == "prediction"], p
        assert entries[-1]["event"] == "checkpoint", p
