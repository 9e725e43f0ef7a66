"""The per-owner cost model of bench/comm_vs_fl.py: the formula, and a small run on the real wire.

The formula tests are pure arithmetic. The wire test sends one digits-CNN owner's epoch (two
batches) as real codec messages through real CURVE transports on 127.0.0.1 and checks the owner's
byte counters against the formula (the README claims agreement within 5 %).
"""

from __future__ import annotations

import importlib.util
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from secure_split.engine.data import digits


def _load_bench_module() -> ModuleType:
    # bench/ is a folder of scripts, not a package; load the helper by path under a unique name.
    path = Path(__file__).resolve().parents[3] / "bench" / "_comm_model.py"
    spec = importlib.util.spec_from_file_location("secure_split_bench_comm_model", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


cm = _load_bench_module()

DIGITS_SAMPLES = 1437


def _workload(**changes: object) -> object:
    fields: dict[str, object] = {
        "name": "resnet-like",
        "samples": 50_000,
        "batch_size": 64,
        "cut_floats": 65_536,
        "bottom_params": 149_824,
        "total_params": 11_220_132,
        "bottom_forward_flops": 3.06e8,
        "total_forward_flops": 1.11e9,
        "input_layer_flops": 3.5e6,
    }
    fields.update(changes)
    return cm.Workload(**fields)


# ---- the formula ------------------------------------------------------------------------------


def test_cut_bytes_halve_when_owners_double_and_fedavg_bytes_do_not_move() -> None:
    w = _workload(header_bytes=0)
    for owners in (10, 50, 100, 500):
        assert w.cut_bytes(2 * owners) == pytest.approx(w.cut_bytes(owners) / 2, rel=1e-12)
        assert w.fedavg_bytes(owners) == w.fedavg_bytes(2 * owners)
    assert w.cut_bytes(100) == 2 * 500 * 65_536 * 4


def test_headers_count_once_per_message_with_a_partial_last_batch() -> None:
    w = _workload(samples=1000, header_bytes=100)
    # 1000 / 10 = 100 samples per owner: 2 batches (64 + 36), so 2 activations and 2 gradients.
    assert w.batches_per_owner(10) == 2
    assert w.cut_bytes(10) == 2 * 100 * 65_536 * 4 + 4 * 100


def test_splitfed_and_sequential_add_two_bottom_transfers_and_vanilla_adds_none() -> None:
    w = _workload()
    expected = 2 * (149_824 * 4 + cm.WEIGHTS_HEADER_BYTES)
    assert w.split_bytes(100, "splitfed") - w.cut_bytes(100) == expected
    assert w.split_bytes(100, "sequential") - w.cut_bytes(100) == expected
    assert w.split_bytes(100, "vanilla") == w.cut_bytes(100)
    assert w.fedavg_bytes() == 2 * (11_220_132 * 4 + cm.WEIGHTS_HEADER_BYTES)


def test_crossing_point_has_the_documented_value_for_the_resnet_layer1_cut() -> None:
    # N* = D·(4A + h/b) / (4·(W_total − W_bottom)) = 50000·(262144 + 4) / (4·11070308)
    assert _workload().crossing_owners("splitfed") == pytest.approx(296.00351, rel=1e-6)


@pytest.mark.parametrize("scheme", ["splitfed", "sequential", "vanilla"])
def test_split_and_fedavg_bytes_are_equal_at_the_crossing_point(scheme: str) -> None:
    w = _workload(header_bytes=0)  # with no per-message header the cost is exactly affine in 1/N
    n_star = w.crossing_owners(scheme)
    assert n_star is not None
    assert w.split_bytes(n_star, scheme) == pytest.approx(w.fedavg_bytes(), rel=1e-9)
    assert w.split_bytes(0.9 * n_star, scheme) > w.fedavg_bytes() > w.split_bytes(1.1 * n_star, scheme)


def test_whole_owner_crossing_is_the_first_n_where_split_is_cheaper() -> None:
    w = _workload(samples=1437, cut_floats=64, bottom_params=65_760, total_params=66_410)
    n = w.crossing_owner_count("splitfed")
    assert n is not None and 1 < n <= 1437
    assert w.split_bytes(n) <= w.fedavg_bytes() < w.split_bytes(n - 1)


def test_no_crossing_when_the_bottom_holds_every_parameter() -> None:
    w = _workload(bottom_params=11_220_132)
    assert w.crossing_owners("splitfed") is None
    assert w.crossing_owner_count("splitfed") is None
    assert w.crossing_owners("vanilla") is not None  # without weight sync split still wins eventually


def test_flops_per_owner_fall_as_one_over_owners_with_a_fixed_split_to_fedavg_ratio() -> None:
    w = _workload()
    ratios = {round(w.split_flops(n) / w.fedavg_flops(n), 12) for n in (10, 50, 100, 500)}
    assert ratios == {round(w.flops_ratio(), 12)}
    assert w.split_flops(100) == pytest.approx(500 * (3 * 3.06e8 - 3.5e6))


def test_workload_refuses_a_bottom_larger_than_the_model() -> None:
    with pytest.raises(ValueError, match="bottom_params"):
        _workload(bottom_params=20_000_000)


def test_mean_over_owners_of_an_uneven_split_accounts_for_every_sample() -> None:
    assert cm.mean_over_owners(1437, 100, float) * 100 == pytest.approx(1437)
    assert cm.mean_over_owners(50_000, 500, float) == 100


def test_interpolating_in_one_over_n_recovers_the_crossing_of_affine_curves() -> None:
    grid = [2, 5, 10, 20, 50, 100, 200, 500, 1000]
    split = [1e6 + 3e8 / n for n in grid]  # crosses 2e6 at N = 300
    found = cm.interpolated_crossing(grid, split, [2e6] * len(grid))
    assert found is not None
    assert found[0] == pytest.approx(300, rel=1e-9)
    assert found[1:] == (200, 500)
    assert cm.interpolated_crossing(grid, [1.0] * len(grid), [2.0] * len(grid)) is None


def test_bisection_finds_the_first_owner_count_that_holds() -> None:
    assert cm.smallest_owner_count(lambda n: n >= 157, 1, 1437) == 157
    assert cm.smallest_owner_count(lambda n: True, 1, 1437) == 1
    assert cm.smallest_owner_count(lambda n: False, 1, 1437) is None


# ---- models and FLOPs -------------------------------------------------------------------------


def test_forward_flops_come_from_conv_and_linear_shapes() -> None:
    module = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(1024, 10)
    )
    flops = cm.forward_flops(module, (1, 8, 8))
    assert flops.first_layer == 2 * 1 * 9 * 16 * 64
    assert flops.total == 2 * 1 * 9 * 16 * 64 + 2 * 1024 * 10


def test_counted_training_flops_are_three_forwards_less_the_input_layer_backward() -> None:
    model = cm.digits_split()
    _, x, y = digits()
    w = cm.workload_of(model, samples=DIGITS_SAMPLES, batch_size=64)
    counted = cm.count_training_flops(model, x[:32], y[:32])
    assert counted.split_owner == pytest.approx(3 * w.bottom_forward_flops - w.input_layer_flops, rel=0.01)
    assert counted.fedavg_owner == pytest.approx(3 * w.total_forward_flops - w.input_layer_flops, rel=0.01)


def test_resnet18_is_resnet18_sized_and_cut_after_layer1_sends_64x32x32() -> None:
    model = cm.resnet18_split("layer1", classes=100)
    bottom, total = model.parameter_counts()
    assert 11_000_000 < total < 11_500_000
    assert bottom == 149_824
    assert model.cut_floats() == 64 * 32 * 32


# ---- on the wire ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wire() -> Iterator[object]:
    with cm.LoopbackWire(max_message_bytes=8 * 1024 * 1024) as loopback:
        yield loopback


def test_one_digits_owner_epoch_on_the_real_wire_matches_the_formula_within_5_percent(wire: object) -> None:
    model = cm.digits_split()
    _, x, y = digits()
    w = cm.workload_of(model, samples=DIGITS_SAMPLES, batch_size=64)
    samples = 100  # two batches: 64 + 36
    traffic = cm.measure_owner_epoch(wire, model, x, y, samples, batch_size=64)
    weights = cm.measure_weight_sync(wire, model)
    owners = DIGITS_SAMPLES / samples

    assert (traffic.batches, traffic.messages, traffic.extrapolated) == (2, 4, False)
    payload = 2 * samples * w.cut_floats * 4
    per_header = (traffic.bytes - payload) / traffic.messages
    assert 0.8 * cm.HEADER_BYTES < per_header < 1.2 * cm.HEADER_BYTES  # the nominal header is the codec's
    for measured, formula in [
        (traffic.bytes, w.cut_bytes(owners)),
        (traffic.bytes + weights.splitfed, w.split_bytes(owners, "splitfed")),
        (traffic.bytes + weights.sequential, w.split_bytes(owners, "sequential")),
        (weights.fedavg, w.fedavg_bytes()),
    ]:
        assert abs(measured - formula) / measured <= 0.05


def test_scaling_one_sent_batch_gives_the_bytes_of_sending_them_all(wire: object) -> None:
    model = cm.digits_split()
    _, x, y = digits()
    cache = cm.TensorCache()
    scaled = cm.measure_owner_epoch(wire, model, x, y, 300, batch_size=64, sample_batches=1, cache=cache)
    sent = cm.measure_owner_epoch(wire, model, x, y, 300, batch_size=64, cache=cache)
    assert scaled.extrapolated and not sent.extrapolated
    assert (scaled.batches, sent.messages) == (5, 10)
    assert math.isclose(scaled.bytes, sent.bytes, rel_tol=1e-3)  # seq numbers may add a header byte
