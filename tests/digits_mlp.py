"""A small torch MLP on scikit-learn's digits, for the tests of data traced without labels."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits

MODEL, VERSION = "digits_mlp", "v1"


def digits_splits(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """train 500 / val 300 / pool 997 of digits, each as (x float32 in [0, 1], y, input_ids)."""
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    x, y, ids = (x / 16.0).astype(np.float32)[order], y[order], order.astype(np.int64)
    bounds = {"train": slice(0, 500), "val": slice(500, 800), "pool": slice(800, None)}
    return {name: (x[part], y[part], ids[part]) for name, part in bounds.items()}


def train_mlp(x: np.ndarray, y: np.ndarray, *, steps: int = 20, seed: int = 0, hidden: int = 32) -> torch.nn.Module:
    """Full-batch Adam on cross-entropy; few steps leave some training errors (so error_proba is fitted)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    inputs, targets = torch.from_numpy(x), torch.from_numpy(y)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-32-10 MLP: more threads only spin (much slower on a busy machine)
    try:
        for _ in range(steps):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(inputs), targets).backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())
