"""Layer lists of the shipped demos, as plain data (what a deployment's `model:` holds).

Reused by the demo deployments and tests, so the YAML and the code never drift. Accuracies are
measured by tests/unit/engine/test_zoo.py (3 epochs, batch 64, Adam, the stated learning rate).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BREAST_CANCER_HALF_BOTTOM",
    "BREAST_CANCER_LR",
    "BREAST_CANCER_MLP_BOTTOM",
    "BREAST_CANCER_MLP_TOP",
    "BREAST_CANCER_SUM_TOP",
    "BREAST_CANCER_VERTICAL_TOP",
    "DIGITS_CNN_BOTTOM",
    "DIGITS_CNN_TOP",
    "DIGITS_GE5_HEAD",
    "DIGITS_HOP",
    "DIGITS_LR",
    "DIGITS_U_HEAD",
    "DIGITS_U_MIDDLE",
    "DIGITS_U_TAIL",
]

Layers = list[dict[str, Any]]

# --- digits: 1×8×8 images in [0, 1], 10 classes ---------------------------------------------

DIGITS_LR = 1e-2
"""Adam learning rate for the digits models. At batch 64 for 3 epochs the vanilla split reaches
95–98 % test accuracy over seeds 0–7 (1e-3 reaches only about 70 % in so few steps)."""

DIGITS_U_HEAD: Layers = [
    {"conv2d": {"in": 1, "out": 16, "kernel": 3, "padding": 1}},
    {"relu": {}},
    {"maxpool2d": {"kernel": 2}},
    {"flatten": {}},  # 16×4×4 = 256
]
"""At the data owner: image (64 pixels) -> 256 features. The cut is deliberately not 64 wide: the
policy's egress guard refuses a cut tensor with as many values per sample as the raw input."""

DIGITS_U_MIDDLE: Layers = [
    {"linear": {"in": 256, "out": 64}},
    {"relu": {}},
]
"""U-shaped, at the server: 256 -> 64; it sees neither images nor labels."""

DIGITS_U_TAIL: Layers = [
    {"linear": {"in": 64, "out": 10}},
]
"""U-shaped, back at the data owner: 64 -> 10 logits; the loss (and labels) stay with the owner."""

DIGITS_CNN_BOTTOM: Layers = list(DIGITS_U_HEAD)
"""Data owner's part of the vanilla digits split: image -> 256-wide cut-layer activation."""

DIGITS_CNN_TOP: Layers = DIGITS_U_MIDDLE + DIGITS_U_TAIL
"""Label holder's part of the vanilla digits split: 256-wide activation -> 10 logits.
(The same network as the U-shaped trio, cut in one place instead of two.)"""

DIGITS_HOP: Layers = [
    {"linear": {"in": 256, "out": 256}},
    {"relu": {}},
]
"""One relay hop of the multi-hop chain (256 -> 256); chain any number between bottom and top."""

DIGITS_GE5_HEAD: Layers = [
    {"linear": {"in": 256, "out": 32}},
    {"relu": {}},
    {"linear": {"in": 32, "out": 2}},
]
"""Multi-task: a second label holder's head on the same 256-wide trunk: "is the digit >= 5?"."""

# --- breast cancer: 30 standardised features, 2 classes -------------------------------------

BREAST_CANCER_LR = 1e-2
"""Adam learning rate for the breast cancer models (3 epochs of batch 64 are only 24 steps)."""

BREAST_CANCER_MLP_BOTTOM: Layers = [
    {"linear": {"in": 30, "out": 64}},
    {"relu": {}},
    {"linear": {"in": 64, "out": 32}},
    {"relu": {}},
]
"""Vanilla split, data owner with all 30 features: 30 -> 32."""

BREAST_CANCER_MLP_TOP: Layers = [
    {"linear": {"in": 32, "out": 2}},
]
"""Vanilla split, label holder: 32 -> 2 logits."""

BREAST_CANCER_HALF_BOTTOM: Layers = [
    {"linear": {"in": 15, "out": 16}},
    {"relu": {}},
]
"""Vertical split, each hospital holding 15 of the 30 columns: 15 -> 16."""

BREAST_CANCER_VERTICAL_TOP: Layers = [
    {"linear": {"in": 32, "out": 16}},
    {"relu": {}},
    {"linear": {"in": 16, "out": 2}},
]
"""Vertical split, label holder after `merge: concat` of two 16-wide halves: 32 -> 2 logits."""

BREAST_CANCER_SUM_TOP: Layers = [
    {"linear": {"in": 16, "out": 16}},
    {"relu": {}},
    {"linear": {"in": 16, "out": 2}},
]
"""Vertical split with `merge: sum` (optionally under HE): the two 16-wide halves are added -> 2 logits."""
