"""Digits splits and the small torch MLP of benchmarks/active_learning.py, for the tests of data traced
without labels."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits

MODEL, VERSION = "digits_mlp", "v1"
_BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "active_learning.py"
_spec = importlib.util.spec_from_file_location("active_learning", _BENCHMARK)
active_learning = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(active_learning)


def digits_splits(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """train 500 / val 300 / pool 997 of digits, each as (x float32 in [0, 1], y, input_ids)."""
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    x, y, ids = (x / 16.0).astype(np.float32)[order], y[order], order.astype(np.int64)
    bounds = {"train": slice(0, 500), "val": slice(500, 800), "pool": slice(800, None)}
    return {name: (x[part], y[part], ids[part]) for name, part in bounds.items()}


def train_mlp(x: np.ndarray, y: np.ndarray, *, steps: int = 20, seed: int = 0) -> torch.nn.Module:
    """The benchmark's 64-32-10 MLP; 20 steps leave about 10% training errors, so error_proba is fitted."""
    return active_learning.train(x, y, seed, steps=steps)
