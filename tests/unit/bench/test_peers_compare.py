"""bench/peers_compare.py: its variants train the same model, and its command line parses.

The two-party variants run as real OS processes over real sockets (loopback) for three steps; the
assertions are about weights and accuracy, never about time.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCH = Path(__file__).resolve().parents[3] / "bench"


def load_peers_compare() -> ModuleType:
    """bench/ is a folder of scripts, not a package: load bench/peers_compare.py by path."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))  # its helpers (split_vs_local, wan, _host) import each other so
    spec = importlib.util.spec_from_file_location("secure_split_bench_peers_compare", BENCH / "peers_compare.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


pc = load_peers_compare()


def _three_step_plan() -> object:
    plan = pc.base_plan(1)
    return dataclasses.replace(plan, training={**plan.training, "max_steps_per_epoch": 3})


def _local_in_this_process(plan: object, out: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The `local` variant's loop (bench/_split_workers.py), run here instead of in a process of its own."""
    spec = importlib.util.spec_from_file_location("secure_split_bench_split_workers", BENCH / "_split_workers.py")
    assert spec is not None and spec.loader is not None
    workers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(workers)
    workers.run_local(workers.Setup(pc.worker_spec(plan, "local", out, {}, 0), "local"))
    return {seg: pc._load_weights(out / f"{seg}.safetensors") for seg in ("bottom", "top")}


def test_the_rpc_split_and_the_local_loop_train_bit_identical_weights_to_the_project_baseline(tmp_path: Path) -> None:
    from secure_split.config import load_deployment
    from secure_split.engine.baseline import train_centralized
    from secure_split.scenarios import generate

    plan = _three_step_plan()
    rpc = pc.run_workers(pc.BY_NAME["rpc"], plan, tmp_path / "rpc", link=None, timeout_s=120)  # two OS processes
    assert [e["steps"] for e in rpc["epochs"]] == [3]
    local = _local_in_this_process(plan, tmp_path / "local")

    initial = {seg: pc.build_initial(plan, seg) for seg in ("bottom", "top")}
    assert pc.max_weight_difference(local, initial) > 0  # three steps moved the weights
    assert pc.max_weight_difference(rpc["weights"], local) == 0.0

    gen = generate(plan, tmp_path / "baseline")
    base = train_centralized(load_deployment(gen.deployment), features=plan.baseline_features,
                             labels=plan.baseline_labels, ids=plan.baseline_ids)
    reference = {seg: base["segments"][seg].state_dict() for seg in ("bottom", "top")}
    assert pc.max_weight_difference(local, reference) == 0.0
    assert pc.evaluate(plan, rpc["weights"]) == pytest.approx(base["accuracy"]["labels"], abs=1e-12)


def test_weight_difference_sees_a_single_changed_value() -> None:
    a = {"bottom": {"w": torch.zeros(3)}}
    b = {"bottom": {"w": torch.tensor([0.0, 0.5, 0.0])}}
    assert pc.max_weight_difference(a, a) == 0.0
    assert pc.max_weight_difference(a, b) == 0.5
    assert pc.max_weight_difference(a, {"bottom": {"v": torch.zeros(3)}}) == float("inf")


def test_quick_json_and_wan_arguments_parse() -> None:
    args = pc.parse_args(["--quick", "--json", "out.json"])
    assert (args.repeats, args.epochs, args.json, args.link) == (1, 3, Path("out.json"), None)
    assert [v.name for v in args.variant_list] == [v.name for v in pc.VARIANTS]
    full = pc.parse_args(["--wan", "25,0.005", "--variants", "local,rpc,secure_split"])
    assert (full.repeats, full.link) == (3, (25.0, 0.005))
    assert [v.name for v in full.variant_list] == ["local", "rpc", "secure_split"]


@pytest.mark.parametrize("argv", [["--wan", "25"], ["--wan", "x,0.1"], ["--wan", "25,1.5"],
                                  ["--variants", "local,teleport"], ["--epochs", "1"]])
def test_bad_arguments_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        pc.parse_args(argv)


def test_every_variant_has_a_runner_and_the_ratios_have_their_references() -> None:
    names = [v.name for v in pc.VARIANTS]
    assert len(set(names)) == len(names)
    assert {"local", "rpc"} <= set(names)
    assert all(v.kind in pc.RUNNERS for v in pc.VARIANTS)
