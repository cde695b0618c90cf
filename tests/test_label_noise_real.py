"""Real data: digits with 10% of labels flipped, a real MLP trained 10 epochs through the tracer.

The flipped samples must be found (CLS_LABEL_NOISE) about as well as cleanlab finds them with its
recommended 5-fold cross-validated probabilities, and better than cleanlab given the same traces.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "label_noise.py"


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("label_noise", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.run(epochs=10, noise=0.1, seed=0, store=str(tmp_path_factory.mktemp("store")))


@pytest.mark.slow
def test_flipped_labels_are_found(figures):
    ours = figures["mldbg_label_noise_code"]
    print(figures)
    assert figures["flipped"] == 180
    assert ours["precision"] >= 0.8 and ours["recall"] >= 0.8
    assert ours["f1"] >= figures["cleanlab_5fold_cross_validated_probs"]["f1"] - 0.05
    assert ours["f1"] >= figures["cleanlab_same_final_epoch_probs"]["f1"]
