"""Egress leakage guards: raw shape, raw rows (exact, near, embedded), distance correlation."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from secure_split.policy import (
    Flow,
    Policy,
    check_egress,
    distance_correlation,
    find_raw_row,
    policy_from_mapping,
)

RNG = np.random.default_rng(1234)


def policy(max_dcor: float | None = None, **egress: Any) -> Policy:
    rule: dict[str, Any] = {"id": "cut", "from": "owner", "to": "server", "kinds": "activation"}
    if max_dcor is not None:
        rule["max_distance_correlation"] = max_dcor
    data: dict[str, Any] = {
        "name": "guards",
        "version": 1,
        "parties": {
            "owner": {"fingerprint": "sha256:" + "a" * 32, "assets": {"features": True}},
            "server": {"fingerprint": "sha256:" + "b" * 32},
        },
        "allow": [rule],
    }
    if egress:
        data["egress"] = egress
    return policy_from_mapping(data)


FLOW = Flow("owner", "server", "activation", "head->middle", "send", 4096, "float32", (64, 32), 64)


def raw_batch(n: int = 64, d: int = 30) -> np.ndarray:
    return RNG.normal(size=(n, d)).astype(np.float32)


def test_nothing_to_compare_without_raw() -> None:
    assert check_egress(policy(), FLOW, raw_batch(64, 30), None) is None


def test_unrelated_activations_pass() -> None:
    raw = raw_batch()
    out = np.maximum(raw @ RNG.normal(size=(30, 16)), 0).astype(np.float32)
    assert check_egress(policy(), FLOW, out, raw) is None


@pytest.mark.parametrize("shape", [(64, 30), (64, 5, 6), (64, 30, 1)])
def test_tensor_shaped_like_the_raw_input_is_refused(shape: tuple[int, ...]) -> None:
    raw = raw_batch()
    out = RNG.normal(size=shape).astype(np.float32)
    d = check_egress(policy(), FLOW, out, raw)
    assert d is not None and not d.allowed and d.rule_id == "guard:raw_shape"
    assert "(rule: guard:raw_shape)" in d.reason and "egress" in d.reason


def test_raw_shape_guard_can_be_switched_off_but_rows_still_caught() -> None:
    raw = raw_batch()
    p = policy(refuse_raw_shape=False)
    assert check_egress(p, FLOW, RNG.normal(size=(64, 30)), raw) is None
    d = check_egress(p, FLOW, raw.copy(), raw)
    assert d is not None and d.rule_id == "guard:raw_row"


def test_raw_row_embedded_as_a_slice_is_refused() -> None:
    raw = raw_batch()
    out = RNG.normal(size=(64, 100)).astype(np.float32)
    out[17, 41:71] = raw[5]
    d = check_egress(policy(), FLOW, out, raw)
    assert d is not None and d.rule_id == "guard:raw_row" and "row 17" in d.reason and "raw row 5" in d.reason
    assert find_raw_row(out, raw) == (17, 5)


def test_near_copy_is_refused_and_a_distant_one_is_not() -> None:
    raw = raw_batch()
    near = RNG.normal(size=(64, 90))
    near[3, :30] = raw[9] + RNG.normal(scale=1e-5, size=30)
    assert find_raw_row(near, raw) == (3, 9)
    far = RNG.normal(size=(64, 90))
    far[3, :30] = raw[9] + RNG.normal(scale=0.1, size=30)
    assert find_raw_row(far, raw) is None


def test_constant_raw_rows_are_ignored() -> None:
    raw = np.zeros((8, 10))
    out = np.zeros((8, 40))
    assert find_raw_row(out, raw) is None


def test_raw_row_search_on_a_wide_tensor_is_fast_enough() -> None:
    raw = RNG.random(size=(64, 784))
    out = np.maximum(RNG.normal(size=(64, 20_000)), 0)
    assert find_raw_row(out, raw) is None
    out[63, 10_000:10_784] = raw[0]
    assert find_raw_row(out, raw) == (63, 0)


def naive_dcor(x: np.ndarray, y: np.ndarray) -> float:
    n = len(x)
    a = np.array([[np.linalg.norm(x[i] - x[j]) for j in range(n)] for i in range(n)])
    b = np.array([[np.linalg.norm(y[i] - y[j]) for j in range(n)] for i in range(n)])
    aa = a - a.mean(0) - a.mean(1)[:, None] + a.mean()
    bb = b - b.mean(0) - b.mean(1)[:, None] + b.mean()
    return float(np.sqrt((aa * bb).mean() / np.sqrt((aa * aa).mean() * (bb * bb).mean())))


def test_distance_correlation_matches_the_definition() -> None:
    x = RNG.normal(size=(20, 4))
    y = np.tanh(x @ RNG.normal(size=(4, 3))) + 0.1 * RNG.normal(size=(20, 3))
    assert distance_correlation(x, y) == pytest.approx(naive_dcor(x, y), abs=1e-9)
    assert distance_correlation(x, 3 * x + 1) == pytest.approx(1.0)
    assert distance_correlation(x, np.ones((20, 2))) == 0.0
    with pytest.raises(ValueError, match="rows"):
        distance_correlation(x, x[:5])


def test_dcor_bound_refuses_correlated_activations_only_where_set() -> None:
    raw = raw_batch(128, 30)
    flow = Flow("owner", "server", "activation", None, "send", 4096, "float32", (128, 40), 128)
    # A distance-preserving embedding: dCor with the raw batch is exactly 1.
    q, _ = np.linalg.qr(RNG.normal(size=(40, 30)))
    leaky = raw @ q.T
    assert distance_correlation(leaky, raw) == pytest.approx(1.0)
    assert check_egress(policy(), flow, leaky, raw) is None
    d = check_egress(policy(max_dcor=0.9), flow, leaky, raw)
    assert d is not None and d.rule_id == "guard:dcor" and "max_distance_correlation 0.9" in d.reason
    # the gate hands over the decision it already took on this flow: the same bound applies
    bounded = policy(max_dcor=0.9)
    d = check_egress(bounded, flow, leaky, raw, decision=bounded.decide(flow))
    assert d is not None and d.rule_id == "guard:dcor"
    # Independent noise still has a sample dCor well above 0 at this batch size (the statistic is biased).
    unrelated = RNG.normal(size=(128, 16))
    assert check_egress(policy(max_dcor=0.9), flow, unrelated, raw) is None
    d = check_egress(policy(max_dcor=0.9), flow, unrelated[:100], raw)
    assert d is not None and d.rule_id == "guard:dcor" and "do not line up" in d.reason
