"""Shared test set-up: offline, Keras on the torch backend, every test gets its own store."""

from __future__ import annotations

import os

# Before any framework import: Keras picks its backend at import time; nothing may reach a hub.
os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.pop("MLD_API_ENDPOINT", None)
os.environ.pop("MLD_API_KEY", None)

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def store_dir(tmp_path, monkeypatch):
    """A fresh store directory, also set as MLD_HOME so store=None resolves to it."""
    root = tmp_path / "mldbg"
    monkeypatch.setenv("MLD_HOME", str(root))
    return root


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def pytest_configure(config):
    config.addinivalue_line("markers", "http_errors(*statuses): HTTP error statuses a browser test provokes on purpose")
