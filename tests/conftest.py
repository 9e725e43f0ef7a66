"""Shared test settings: one torch thread per process, no network but loopback."""

from __future__ import annotations

import os

# Peers and tests share 2 cores: keep OpenMP from spinning (see DESIGN.md, measured limits).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("MKL_NUM_THREADS", "1")
