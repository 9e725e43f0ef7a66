"""The leakage report on a small, quick run: trends (not exact numbers), files, and targets.

One quick report on the vanilla digits demo is shared by the tests of this module (about 10-15 s
on one thread); the seeds are fixed, and the assertions leave wide margins.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from rich.console import Console
from typer.testing import CliRunner

from secure_split.analysis.leakage import (
    LocalRun,
    binary_target,
    demo_target,
    leakage_report,
    load_target,
    with_protections,
)
from secure_split.cli.leakage import app, print_report
from secure_split.engine import zoo
from secure_split.engine.executor import Outgoing
from secure_split.errors import ConfigError


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("leakage")
    return leakage_report("vanilla", out_dir=out, quick=True, progress=False)


def row(report: dict[str, Any], alpha: float, noise: float) -> dict[str, Any]:
    return next(r for r in report["sweep"] if r["alpha"] == alpha and r["noise_std"] == noise)


def defence(report: dict[str, Any], name: str) -> dict[str, Any]:
    return next(r for r in report["label_leakage"] if r["defence"] == name)


def test_strong_nopeek_lowers_dcor_and_raises_reconstruction_error(report: dict[str, Any]) -> None:
    plain, nopeek = row(report, 0.0, 0.0), row(report, 8.0, 0.0)
    assert plain["dcor"] > 0.8
    assert nopeek["dcor"] < plain["dcor"] - 0.15
    assert nopeek["mse"] > 1.2 * plain["mse"]
    assert nopeek["ssim"] < plain["ssim"]


def test_activation_noise_raises_reconstruction_error(report: dict[str, Any]) -> None:
    plain, noisy = row(report, 0.0, 0.0), row(report, 0.0, 1.0)
    assert noisy["mse"] > 1.2 * plain["mse"]
    assert noisy["dcor"] < plain["dcor"]


def test_accuracy_stays_well_above_chance_across_the_sweep(report: dict[str, Any]) -> None:
    # Ten balanced classes: chance is 0.1.
    assert all(r["accuracy"] > 0.8 for r in report["sweep"])
    assert row(report, 8.0, 0.0)["accuracy_smoothed"] > row(report, 0.0, 0.0)["accuracy_smoothed"] - 0.1


def test_norm_attack_reads_labels_unprotected_and_defences_bring_it_near_chance(
    report: dict[str, Any],
) -> None:
    none = defence(report, "none")
    assert 0.05 < none["positives"] < 0.15
    assert none["norm_auc"] > 0.85 and none["norm_leak_auc"] > 0.85
    assert none["cosine_auc"] > 0.9
    for name in ("max_norm", "marvell"):
        protected = defence(report, name)
        assert abs(protected["norm_auc"] - 0.5) < 0.15, name
        assert protected["norm_leak_auc"] < 0.65, name
        assert protected["accuracy"] > 0.92, name  # above always answering "no" (about 0.90)
    assert defence(report, "marvell")["cosine_auc"] < none["cosine_auc"] - 0.2


def test_report_writes_json_with_every_number_and_three_pngs(report: dict[str, Any]) -> None:
    files = report["files"]
    saved = json.loads(Path(files["json"]).read_text())
    assert saved["sweep"] == report["sweep"] and saved["label_leakage"] == report["label_leakage"]
    assert {"epochs", "training_seed", "attack_seed", "aux_fraction", "decoder_epochs"} <= set(
        saved["parameters"]
    )
    for key in ("accuracy", "dcor", "mse", "ssim", "activation_rms"):
        assert all(isinstance(r[key], float) for r in saved["sweep"]), key
    for key in ("reconstruction_grid", "tradeoff", "label_leakage"):
        data = Path(files[key]).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000, key


def test_dcor_cost_grows_quadratically_in_memory(report: dict[str, Any]) -> None:
    cost = {c["batch"]: c for c in report["dcor_cost"]}
    assert set(cost) == {64, 256, 1024}
    assert cost[1024]["saved_mib"] == pytest.approx(16 * cost[256]["saved_mib"], rel=0.2)
    assert cost[1024]["ms"] > cost[64]["ms"]


def test_cli_prints_the_tables_and_file_paths(report: dict[str, Any]) -> None:
    console = Console(record=True, width=160)
    print_report(report, console)
    text = console.export_text()
    assert "α=8" in text and "marvell" in text and "direction-free" in text
    assert report["files"]["tradeoff"] in text


def test_cli_refuses_an_unknown_target_with_a_config_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["report", "not-a-demo", "--out", str(tmp_path), "--quick"])
    assert isinstance(result.exception, ConfigError)
    assert "neither a demo" in str(result.exception)


def write_deployment(path: Path, segments: dict[str, Any], edges: list[dict[str, str]]) -> Path:
    peers = sorted({s["peer"] for s in segments.values()})
    doc = {
        "version": 1,
        "name": "t",
        "coordinator": peers[0],
        "policy": "policy.yaml",
        "peers": {
            p: {"endpoint": f"tcp://127.0.0.1:{6100 + i}", "sign_key": f"{i:02x}" * 32, "transport_key": f"{i:02d}" * 20}
            for i, p in enumerate(peers)
        },
        "segments": segments,
        "edges": edges,
        "training": {"seed": 3, "epochs": 1, "batch_size": 32, "max_steps_per_epoch": 2},
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def test_a_deployment_file_reading_digits_is_measured_on_its_first_cut_edge(tmp_path: Path) -> None:
    dep = write_deployment(
        tmp_path / "d.yaml",
        {
            "enc": {"peer": "clinic", "input": "features", "model": zoo.DIGITS_CNN_BOTTOM},
            "relay": {"peer": "cloud", "model": zoo.DIGITS_HOP},
            "head": {"peer": "lab", "loss": "cross_entropy", "model": zoo.DIGITS_CNN_TOP},
        },
        [{"from": "enc", "to": "relay"}, {"from": "relay", "to": "head"}],
    )
    target = load_target(dep)
    assert (target.recon_edge, target.label_edge) == ("enc->relay", "relay->head")
    assert target.data["clinic"].features is not None and not target.data["clinic"].labels
    assert target.data["cloud"].features is None and not target.data["cloud"].labels
    assert set(target.data["lab"].labels) == {"labels"}


def test_a_vertical_deployment_is_refused_with_the_reason(tmp_path: Path) -> None:
    half = [{"flatten": {}}, {"linear": {"in": 64, "out": 8}}]
    dep = write_deployment(
        tmp_path / "v.yaml",
        {
            "a": {"peer": "hospital_a", "input": "features", "model": half},
            "b": {"peer": "hospital_b", "input": "features", "model": half},
            "top": {
                "peer": "lab",
                "loss": "cross_entropy",
                "merge": "concat",
                "model": [{"linear": {"in": 16, "out": 10}}],
            },
        },
        [{"from": "a", "to": "top"}, {"from": "b", "to": "top"}],
    )
    with pytest.raises(ConfigError, match="vertical"):
        load_target(dep)


def test_the_executor_applies_a_configured_label_defence_on_the_returned_gradient() -> None:
    target = binary_target(demo_target("vanilla", epochs=1))
    spec = target.deployment.spec
    short = dataclasses.replace(
        target.deployment,
        spec=spec.model_copy(
            update={"training": spec.training.model_copy(update={"max_steps_per_epoch": 3})}
        ),
    )
    spread = {}
    for name in ("none", "max_norm"):
        run = LocalRun.start(target, with_protections(short, target.label_edge, label_defence=name))
        norms: list[torch.Tensor] = []

        def seen(out: Outgoing, ids: np.ndarray, norms: list[torch.Tensor] = norms) -> Outgoing:
            if out.kind == "gradient":
                norms.append(out.tensor.norm(dim=1))
            return out

        run.train(1, seen)
        n = torch.cat(norms)
        spread[name] = float(n.std() / n.mean())
    # Max-norm equalises the norms the attacker sees.
    assert spread["max_norm"] < 0.5 * spread["none"]
