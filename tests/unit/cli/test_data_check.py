"""`secure-split data check`: a peer's data checked against the deployment before any network,
every problem named with file and column or key and line; exit 0 fine, 2 a problem."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from secure_split.cli.main import app
from secure_split.config import load_deployment, load_peer_config
from secure_split.crypto.keys import generate_identity, write_key_files
from secure_split.engine.data import check_peer_data, load_peer_data
from secure_split.engine.executor import PeerExecutor
from secure_split.errors import ConfigError

HEADER = "pid," + ",".join(f"m{i}" for i in range(15))
ROWS = [f"{100 + r}," + ",".join(str(r * 0.5 + i) for i in range(15)) for r in range(12)]

DEPLOYMENT = """
version: 1
name: t
coordinator: lab
policy: policy.yaml
peers:
  hospital: {endpoint: "tcp://127.0.0.1:5801", sign_key: "%s", transport_key: "%s"}
  lab: {endpoint: "tcp://127.0.0.1:5802", sign_key: "%s", transport_key: "%s"}
segments:
  bottom: {peer: hospital, input: features, model: [{linear: {in: 15, out: 4}}]}
  top: {peer: lab, loss: cross_entropy, model: [{linear: {in: 4, out: 2}}]}
edges:
  - {from: bottom, to: top}
"""


def _setup(tmp_path: Path, hospital_csv: str, hospital_data: str, lab_csv: str, lab_data: str) -> Path:
    ids = {n: generate_identity(n) for n in ("hospital", "lab")}
    for ident in ids.values():
        write_key_files(ident, tmp_path / "keys")
    keys = [v for n in ("hospital", "lab") for v in (ids[n].sign_key_hex, ids[n].transport_public_z85)]
    (tmp_path / "deployment.yaml").write_text(DEPLOYMENT % tuple(keys))
    (tmp_path / "hospital.csv").write_text(hospital_csv)
    (tmp_path / "lab.csv").write_text(lab_csv)
    for name, data in (("hospital", hospital_data), ("lab", lab_data)):
        (tmp_path / f"{name}.yaml").write_text(
            f"peer: {name}\ndeployment: deployment.yaml\nsecret_key: keys/{name}.key\n{data}")
    return tmp_path


def _good(tmp_path: Path) -> Path:
    lab = "pid,dx\n" + "".join(f"{100 + r},{r % 2}\n" for r in range(12))
    return _setup(tmp_path, HEADER + "\n" + "\n".join(ROWS) + "\n",
                  "data: {path: hospital.csv, id_column: pid, preprocess: {scale: standard}}\n",
                  lab, "data: {path: lab.csv, id_column: pid, labels: {labels: dx}}\n")


def test_data_that_fits_passes_with_a_summary(tmp_path: Path) -> None:
    d = _good(tmp_path)
    for name in ("hospital", "lab"):
        result = CliRunner().invoke(app, ["data", "check", str(d / f"{name}.yaml")])
        assert result.exit_code == 0, result.output
        assert ": ok" in result.output
    assert "15 feature columns -> 15 values per row (segment bottom)" in CliRunner().invoke(
        app, ["data", "check", str(d / "hospital.yaml")]).output


def test_a_file_with_14_instead_of_15_columns_fails_naming_the_file_before_any_network(tmp_path: Path) -> None:
    d = _good(tmp_path)
    short = [",".join(r.split(",")[:-1]) for r in [HEADER, *ROWS]]
    (d / "hospital.csv").write_text("\n".join(short) + "\n")
    problems = check_peer_data(load_peer_config(d / "hospital.yaml"), load_deployment(d / "deployment.yaml"))
    assert len(problems) == 1 and problems[0].file == str(d / "hospital.csv")
    assert "14 feature values per row" in problems[0].message and "segment 'bottom'" in problems[0].message
    assert "expected 15" in problems[0].message or "size 15" in problems[0].message
    result = CliRunner().invoke(app, ["data", "check", str(d / "hospital.yaml")])
    assert result.exit_code == 2 and "hospital.csv" in result.output


def test_a_wrong_label_task_is_refused_with_the_tasks_that_would_be_accepted(tmp_path: Path) -> None:
    d = _good(tmp_path)
    (d / "lab.yaml").write_text((d / "lab.yaml").read_text().replace("labels: {labels: dx}", "labels: {top: dx}"))
    problems = check_peer_data(load_peer_config(d / "lab.yaml"), load_deployment(d / "deployment.yaml"))
    text = "\n".join(str(p) for p in problems)
    assert f"{d / 'lab.yaml'}:4: data.labels.top: 'top' is not the label task of any loss segment" in text
    assert "accepted: 'labels'" in text
    assert "segment 'top'" in text and "label task 'labels'" in text and "data.labels: {labels: COLUMN}" in text


def test_a_safetensors_file_with_the_wrong_label_tensor_is_named(tmp_path: Path) -> None:
    import torch

    from secure_split.engine.data import write_peer_data

    d = _good(tmp_path)
    write_peer_data(d / "lab.safetensors", ids=torch.arange(100, 112), labels={"top": torch.zeros(12, dtype=torch.int64)})
    (d / "lab.yaml").write_text("peer: lab\ndeployment: deployment.yaml\nsecret_key: keys/lab.key\ndata: lab.safetensors\n")
    cfg, dep = load_peer_config(d / "lab.yaml"), load_deployment(d / "deployment.yaml")
    problems = check_peer_data(cfg, dep)
    assert len(problems) == 1 and problems[0].file == str(d / "lab.safetensors") and problems[0].key == "labels"
    assert "name the tensor 'labels.labels'" in problems[0].message and "it has ['top']" in problems[0].message
    # The executor, reached without the check, names the file and the key too (not '- : -').
    executor = PeerExecutor(dep, "lab", load_peer_data(d / "lab.safetensors"))
    with pytest.raises(ConfigError) as exc:
        executor.begin_step(1, "train", list(range(100, 110)))
    assert exc.value.problems[0].file == str(d / "lab.safetensors") and exc.value.problems[0].key == "labels.labels"


def test_classes_beyond_the_loss_segment_outputs_are_refused_with_rows(tmp_path: Path) -> None:
    d = _good(tmp_path)
    (d / "lab.csv").write_text("pid,dx\n" + "".join(f"{100 + r},{r % 3}\n" for r in range(12)))
    problems = check_peer_data(load_peer_config(d / "lab.yaml"), load_deployment(d / "deployment.yaml"))
    assert len(problems) == 1
    assert "class 2 in rows 3, 6, 9, 12 (lines 4, 7, 10, 13), but segment 'top' outputs 2 classes" in problems[0].message


def test_a_peer_that_needs_data_and_has_none_is_told(tmp_path: Path) -> None:
    d = _good(tmp_path)
    (d / "hospital.yaml").write_text("peer: hospital\ndeployment: deployment.yaml\nsecret_key: keys/hospital.key\n")
    result = CliRunner().invoke(app, ["data", "check", str(d / "hospital.yaml")])
    assert result.exit_code == 2 and "needs its data: set data:" in result.output
