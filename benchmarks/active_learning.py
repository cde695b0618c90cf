"""Active learning on real data with DataFiltering: scikit-learn digits, a labelled seed set and a pool.

Each round: a small PyTorch MLP trains on the labelled set; ClassificationTracer traces the labelled set
(with labels, ``train``) and the pool (``labels=None``, ``pool``); the Evaluator evaluates them and
``result.select(budget, strategy)`` picks the units to label; their held-back labels are revealed and
they move from the pool to the labelled set. Test accuracy after each round, per strategy, against
``random`` with the same budget, averaged over seeds. Prints one JSON object.

    python benchmarks/active_learning.py --seeds 5 --rounds 3 --budget 40
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import torch
from sklearn.datasets import load_digits

from mldbg_callbacks.evaluator import Evaluator
from mldbg_callbacks.training import ClassificationTracer

STRATEGIES = ("random", "error_proba", "entropy", "margin", "hotspot", "diversity")


def train(x: np.ndarray, y: np.ndarray, seed: int, steps: int = 150) -> torch.nn.Module:
    """A 64-32-10 MLP, full-batch Adam (a fixed number of steps: the labelled set is small)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
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


def learning_curve(strategy: str, seed: int, store: str, *, rounds: int, budget: int, seed_size: int,
                   test_size: int) -> list[float]:
    """Test accuracy before the first selection and after each of ``rounds`` rounds of ``strategy``."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    order = np.random.default_rng(seed).permutation(len(y))
    test, rest = order[:test_size], order[test_size:]
    labelled, pool = list(rest[:seed_size]), list(rest[seed_size:])
    curve = []
    for round_ in range(rounds + 1):
        model = train(x[labelled], y[labelled], seed)
        curve.append(accuracy(model, x[test], y[test]))
        if round_ == rounds:
            break
        version = f"{strategy}-s{seed}-r{round_}"
        with ClassificationTracer(model, "al_digits", version, store=store) as tracer, torch.no_grad():
            tracer(torch.from_numpy(x[labelled]), torch.from_numpy(y[labelled]), input_ids=np.array(labelled),
                   dataset_type="train")
            tracer(torch.from_numpy(x[pool]), None, input_ids=np.array(pool), dataset_type="pool")
            tracer.wait_for_save()
        result = Evaluator("al_digits", version, store=store).request_evaluation()
        picked = result.select(budget, strategy, dataset_type="pool", seed=seed)["input_id"].astype(int).tolist()
        labelled += picked  # the held-back labels y[picked] are revealed by training on them
        chosen = set(picked)
        pool = [i for i in pool if i not in chosen]
    return curve


def run(seeds: int = 3, rounds: int = 3, budget: int = 40, seed_size: int = 40, test_size: int = 500,
        strategies: tuple = STRATEGIES, store: str | None = None) -> dict:
    """Mean test accuracy per round for each strategy, over ``seeds`` seeds (0..seeds-1)."""
    store = store or tempfile.mkdtemp(prefix="mldbg-al-")
    started = time.perf_counter()
    curves = {s: [learning_curve(s, seed, store, rounds=rounds, budget=budget, seed_size=seed_size,
                                 test_size=test_size) for seed in range(seeds)] for s in strategies}
    return {
        "setup": {"seeds": seeds, "rounds": rounds, "budget": budget, "seed_size": seed_size, "test_size": test_size,
                  "labelled_per_round": [seed_size + budget * r for r in range(rounds + 1)]},
        "mean_accuracy": {s: np.mean(c, axis=0).round(4).tolist() for s, c in curves.items()},
        "per_seed": {s: np.round(c, 4).tolist() for s, c in curves.items()},
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--budget", type=int, default=40)
    parser.add_argument("--seed-size", type=int, default=40)
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    args = parser.parse_args()
    print(json.dumps(run(args.seeds, args.rounds, args.budget, args.seed_size,
                         strategies=tuple(args.strategies.split(","))), indent=1))


if __name__ == "__main__":
    main()
