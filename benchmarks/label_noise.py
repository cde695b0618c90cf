"""Label-noise detection on real data: scikit-learn digits with a share of labels flipped.

A small PyTorch MLP trains on the noisy labels through ClassificationTracer; the evaluation's
aleatoric category / CLS_LABEL_NOISE code is compared with the truly flipped samples, and with
cleanlab's ``find_label_issues`` on the same data (given the same final-epoch probabilities, and given
5-fold cross-validated probabilities, cleanlab's recommended input). Prints one JSON object.

    python benchmarks/label_noise.py --epochs 15 --noise 0.1
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import StratifiedKFold

from mldbg_callbacks.evaluator import Evaluator
from mldbg_callbacks.training import ClassificationTracer


def noisy_digits(noise: float, seed: int):
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    flipped = rng.choice(len(y), int(round(noise * len(y))), replace=False)
    noisy = y.copy()
    noisy[flipped] = (y[flipped] + rng.integers(1, 10, len(flipped))) % 10  # always a different class
    return x, y, noisy, np.sort(flipped)


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64),
                               torch.nn.ReLU(), torch.nn.Linear(64, 10))


def train(model, x, y, epochs, seed, tracer=None, ids=None):
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        order = torch.randperm(len(yt), generator=generator)
        for start in range(0, len(order), 64):
            batch = order[start:start + 64]
            if tracer is None:
                logits = model(xt[batch])
            else:
                logits = tracer(xt[batch], yt[batch], input_ids=ids[batch.numpy()], dataset_type="train", n_epoch=epoch)
            loss = torch.nn.functional.cross_entropy(logits, yt[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model


def scores(flagged: np.ndarray, truth: np.ndarray) -> dict:
    tp = int((flagged & truth).sum())
    precision = tp / max(int(flagged.sum()), 1)
    recall = tp / max(int(truth.sum()), 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    return {"flagged": int(flagged.sum()), "precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4)}


def run(epochs: int = 15, noise: float = 0.1, seed: int = 0, store: str | None = None) -> dict:
    x, y, noisy, flipped = noisy_digits(noise, seed)
    truth = np.zeros(len(y), bool)
    truth[flipped] = True
    ids = np.arange(len(y))
    store = store or tempfile.mkdtemp(prefix="mldbg-label-noise-")

    started = time.perf_counter()
    model = make_model(seed)
    tracer = ClassificationTracer(model, model_name="digits", version_name=f"noise{noise}", store=store)
    train(model, x, noisy, epochs, seed, tracer=tracer, ids=ids)
    tracer.wait_for_save()
    tracer.close()
    train_s = time.perf_counter() - started
    started = time.perf_counter()
    result = Evaluator("digits", f"noise{noise}", store=store).request_evaluation()
    evaluate_s = time.perf_counter() - started
    samples = result.samples()
    samples = samples[samples["dataset_type"] == "train"].assign(i=lambda f: f["input_id"].astype(int)).set_index("i").sort_index()

    from cleanlab.filter import find_label_issues

    history = result._tables["history"]
    last = samples
    probs_final = _final_probs(store, f"noise{noise}", epochs - 1)
    cleanlab_final = find_label_issues(noisy, probs_final)
    cv_probs = np.zeros((len(y), 10))
    for fold, (fit, held) in enumerate(StratifiedKFold(5, shuffle=True, random_state=seed).split(x, noisy)):
        fold_model = train(make_model(seed + fold), x[fit], noisy[fit], epochs, seed + fold)
        with torch.no_grad():
            cv_probs[held] = torch.softmax(fold_model(torch.from_numpy(x[held])), 1).numpy()
    cleanlab_cv = find_label_issues(noisy, cv_probs)
    return {
        "data": "sklearn digits", "samples": int(len(y)), "flipped": int(truth.sum()), "noise": noise,
        "epochs": epochs, "train_accuracy_on_noisy_labels": round(float(last["correct"].mean()), 4),
        "mldbg_label_noise_code": scores((last["error_code"] == "CLS_LABEL_NOISE").to_numpy(), truth),
        "mldbg_aleatoric_category": scores((last["category"] == "aleatoric_hotspot").to_numpy(), truth),
        "mldbg_any_error_category": scores(last["category"].isin(["aleatoric_hotspot", "critical_hotspot", "hotspot"]).to_numpy(), truth),
        "cleanlab_same_final_epoch_probs": scores(cleanlab_final, truth),
        "cleanlab_5fold_cross_validated_probs": scores(cleanlab_cv, truth),
        "seconds": {"traced_training": round(train_s, 2), "evaluation": round(evaluate_s, 2)},
        "history_rows": int(len(history)),
    }


def _final_probs(store: str, version: str, epoch: int) -> np.ndarray:
    from scipy.special import softmax

    from mldbg_callbacks.core.vectors import decode_vectors
    from mldbg_callbacks.store import LocalStore

    table = LocalStore(store).read_traces("digits", version, "train", [epoch], exclude_columns=("features",))
    order = np.argsort(np.array(table.column("input_id").to_pylist(), dtype=int))
    logits = decode_vectors(table, "logits")[order]
    return softmax(logits.astype(np.float64), axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(run(args.epochs, args.noise, args.seed), indent=2))


if __name__ == "__main__":
    main()
