"""The layer types beyond torch.nn one-liners: residual blocks, embeddings, recurrent and attention layers."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from secure_split.engine.models import (
    LAYER_TYPES,
    MAX_NESTING,
    InputShape,
    build_segment,
    input_shape,
    validate_layers,
)
from secure_split.errors import ConfigError

BLOCK = [{"conv2d": {"in": 4, "out": 4, "kernel": 3, "padding": 1}}, {"batchnorm2d": {"features": 4}}]


def test_a_residual_block_adds_its_input_to_its_body() -> None:
    block = build_segment([{"residual": {"layers": BLOCK}}], seed=0)
    body = build_segment(BLOCK, seed=0)  # the same layers under the same seed: the same weights
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(block(x), body(x) + x)
    assert next(iter(block.state_dict())) == "0.body.0.weight"


def test_a_residual_block_with_a_projection_shortcut_changes_width() -> None:
    layers = [{"residual": {
        "layers": [{"conv2d": {"in": 4, "out": 8, "kernel": 3, "stride": 2, "padding": 1}}, {"relu": {}}],
        "shortcut": [{"conv2d": {"in": 4, "out": 8, "kernel": 1, "stride": 2}}],
    }}, {"relu": {}}]
    assert tuple(build_segment(layers, seed=0)(torch.randn(2, 4, 6, 6)).shape) == (2, 8, 3, 3)


def test_a_residual_block_whose_skip_does_not_fit_says_what_to_add() -> None:
    bad = build_segment([{"residual": {"layers": [{"linear": {"in": 3, "out": 4}}]}}], seed=0)
    with pytest.raises(ValueError, match=r"outputs \[2, 4\] but the skip \[2, 3\]; give a shortcut"):
        bad(torch.randn(2, 3))


def test_problems_inside_nested_blocks_name_their_path() -> None:
    problems = validate_layers([
        {"relu": {}},
        {"residual": {"layers": [{"linear": {"in": 2}}, {"residual": {"layers": [{"conv": {}}]}}]}},
    ])
    assert problems == [
        "layer 1 (residual): layers: layer 0 (linear): missing key 'out'; expected in, out, bias",
        "layer 1 (residual): layers: layer 1 (residual): layers: layer 0: unknown layer type 'conv'; "
        "expected one of " + ", ".join(LAYER_TYPES),
    ]
    assert validate_layers([{"residual": {"layers": []}}]) == [
        "layer 0 (residual): layers: expected a non-empty list of layers"]


def test_residual_nesting_is_bounded() -> None:
    layers: list[dict[str, Any]] = [{"relu": {}}]
    for _ in range(MAX_NESTING + 1):
        layers = [{"residual": {"layers": layers}}]
    assert validate_layers(layers)[-1].endswith(f"residual blocks are nested more than {MAX_NESTING} deep")
    with pytest.raises(ConfigError):
        build_segment(layers, seed=0)


def test_column_embedding_replaces_categorical_columns_by_vectors() -> None:
    m = build_segment([{"embedding": {"columns": [1, 3], "cardinalities": [4, 2], "dim": 3}}], seed=0)
    x = torch.tensor([[0.5, 2.0, -1.0, 1.0], [1.5, 0.0, 2.0, 0.0]])
    y = m(x)
    assert tuple(y.shape) == (2, 2 + 2 * 3)
    torch.testing.assert_close(y[:, :2], x[:, [0, 2]])  # the numeric columns pass through, in order
    table = m[0].tables[0]
    torch.testing.assert_close(y[:, 2:5], table.weight[[2, 0]])


@pytest.mark.parametrize(("value", "shown"), [(4.0, "4.0"), (-1.0, "-1.0"), (1.5, "1.5")])
def test_a_category_out_of_range_is_refused_with_its_column(value: float, shown: str) -> None:
    m = build_segment([{"embedding": {"columns": [1], "cardinalities": [4], "dim": 2}}], seed=0)
    with pytest.raises(ValueError, match=rf"embedding: column 1 holds {shown}; expected whole numbers from 0 to 3"):
        m(torch.tensor([[0.0, 1.0], [0.0, value]]))


def test_token_embedding_refuses_ids_beyond_the_vocabulary() -> None:
    m = build_segment([{"embedding": {"num": 5, "dim": 2}}], seed=0)
    assert tuple(m(torch.tensor([[0.0, 4.0, 2.0]])).shape) == (1, 3, 2)
    with pytest.raises(ValueError, match=r"a token id holds 5\.0; expected whole numbers from 0 to 4"):
        m(torch.tensor([[0.0, 5.0]]))


@pytest.mark.parametrize(("params", "message"), [
    ({"dim": 2}, "give num (token ids"),
    ({"dim": 2, "num": 3, "columns": [0], "cardinalities": [2]}, "not both"),
    ({"dim": 2, "columns": [0, 1], "cardinalities": [2]}, "the same length"),
    ({"dim": 2, "columns": [0, 0], "cardinalities": [2, 2]}, "each column once"),
])
def test_embedding_parameters_are_checked_together(params: dict[str, Any], message: str) -> None:
    (problem,) = validate_layers([{"embedding": params}])
    assert message in problem


def test_transformer_dim_must_divide_by_heads() -> None:
    (problem,) = validate_layers([{"transformer_encoder_layer": {"dim": 10, "heads": 3}}])
    assert problem == "layer 0 (transformer_encoder_layer): dim 10 must be a multiple of heads 3"


def test_recurrent_last_output_is_the_final_hidden_state() -> None:
    x = torch.randn(2, 5, 3)
    seq = build_segment([{"gru": {"in": 3, "hidden": 4, "output": "sequence"}}], seed=0)
    last = build_segment([{"gru": {"in": 3, "hidden": 4, "output": "last"}}], seed=0)
    torch.testing.assert_close(last(x), seq(x)[:, -1])
    lstm = build_segment([{"lstm": {"in": 3, "hidden": 4, "layers": 2, "bidirectional": True, "output": "last"}}], seed=0)
    assert tuple(lstm(x).shape) == (2, 8)


def test_positional_embedding_refuses_longer_sequences_than_it_has_positions() -> None:
    m = build_segment([{"positional_embedding": {"length": 4, "dim": 2}}], seed=0)
    assert tuple(m(torch.zeros(1, 4, 2)).shape) == (1, 4, 2)
    with pytest.raises(ValueError, match=r"expected \[batch, <= 4, 2\], got \[1, 5, 2\]"):
        m(torch.zeros(1, 5, 2))


@pytest.mark.parametrize(("layer", "params"), [
    ("embedding", {"num": 7, "dim": 3}),
    ("embedding", {"columns": [0, 2], "cardinalities": [3, 9], "dim": 4}),
    ("positional_embedding", {"length": 6, "dim": 5}),
    ("lstm", {"in": 3, "hidden": 4, "layers": 2, "bidirectional": True}),
    ("gru", {"in": 5, "hidden": 2, "layers": 3}),
    ("transformer_encoder_layer", {"dim": 8, "heads": 2, "feedforward": 12}),
    ("transformer_encoder_layer", {"dim": 8, "heads": 4}),
    ("residual", {"layers": [{"linear": {"in": 3, "out": 3}}], "shortcut": [{"linear": {"in": 3, "out": 3}}]}),
])
def test_parameter_estimates_of_the_new_types_are_exact(layer: str, params: dict[str, Any]) -> None:
    # The estimate bounds a segment before anything is allocated (MAX_SEGMENT_PARAMETERS).
    full = {k: params.get(k, spec.default) for k, spec in LAYER_TYPES[layer].params.items()}
    built = build_segment([{layer: params}], seed=0)
    assert LAYER_TYPES[layer].size(full) == sum(p.numel() for p in built.parameters())


def test_a_huge_embedding_is_refused_before_allocation() -> None:
    (problem,) = validate_layers([{"embedding": {"num": 2**24, "dim": 2**10}}])
    assert "parameters, more than" in problem


def test_input_shape_of_the_new_types() -> None:
    assert input_shape([{"residual": {"layers": BLOCK}}]) == InputShape(ndim=3, sizes={0: 4})
    assert input_shape([{"lstm": {"in": 3, "hidden": 2}}]) == InputShape(ndim=2, sizes={-1: 3})
    assert input_shape([{"transformer_encoder_layer": {"dim": 8, "heads": 2}}]) == InputShape(ndim=2, sizes={-1: 8})
    assert input_shape([{"embedding": {"columns": [1], "cardinalities": [2], "dim": 2}}]) == InputShape(ndim=1)
    assert input_shape([{"embedding": {"num": 3, "dim": 2}}]) == InputShape()
    assert input_shape({"torchvision": "resnet18"}) == InputShape()  # only layer lists are read
