"""Operation logs, drift monitoring and data selection on scikit-learn's digits (offline, CPU-only).

A small PyTorch classifier is trained and traced (train and a labelled held-out val set); then it "serves"
requests through an InferenceLogger: first ordinary digits, then digits from a noisy sensor. The
evaluation scores the logs without labels, ``result.monitoring()`` flags the noisy day, and
``result.select()`` writes the ids to label next:

    python examples/operation_logging.py --store ./mldbg --ids to_label.txt
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from sklearn.datasets import load_digits

from mldbg_callbacks.evaluator import Evaluator
from mldbg_callbacks.operation import InferenceLogger
from mldbg_callbacks.training import ClassificationTracer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--store", default=None, help="store directory (default: MLD_HOME, else ./mldbg)")
    parser.add_argument("--ids", default="to_label.txt", help="where to write the ids selected for labelling")
    args = parser.parse_args(argv)

    x, y = load_digits(return_X_y=True)
    x, y = (x / 16.0).astype(np.float32), y.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    train, val, served = order[:900], order[900:1200], order[1200:]

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(torch.from_numpy(x[train])), torch.from_numpy(y[train])).backward()
        optimizer.step()
    model.eval()

    # Training traces: the reference the logs are compared with (train) and a labelled held-out baseline (val).
    with ClassificationTracer(model, "digits_service", "v1", store=args.store) as tracer, torch.no_grad():
        for name, part in (("train", train), ("val", val)):
            tracer(torch.from_numpy(x[part]), torch.from_numpy(y[part]), input_ids=part, dataset_type=name)
        tracer.wait_for_save()

    # Serving: one request per image, every request logged (sample_rate=1.0 for the demo).
    noisy = np.clip(x + np.random.default_rng(1).normal(0, 0.4, x.shape).astype(np.float32), 0, 1)
    for day, inputs in (("normal", x), ("noisy", noisy)):
        # a request loop with no pause between requests: a deeper queue than the default keeps every log
        with InferenceLogger(model, "digits_service", "v1", store=args.store, sample_rate=1.0, dataset_type=day,
                             max_pending_batches=1024) as logger, torch.no_grad():
            for i in served:
                logger(torch.from_numpy(inputs[i:i + 1]), input_ids=[f"{day}-{i}"])
        print(f"{day}: {logger.stats.calls} calls, {logger.stats.trace.rows_written} logged")

    # risk: the error rate tolerated among accepted predictions (here below the model's training error rate)
    result = Evaluator("digits_service", "v1", store=args.store).request_evaluation(risk=0.01)
    print(result.unlabelled_summary().to_string(index=False))
    for day in ("normal", "noisy"):
        window = result.monitoring("D", dataset_type=day).iloc[0]
        print(f"{day}: drift={window['drift']} {window['drift_reasons']}")
    picked = result.select(50, "hotspot", dataset_type="noisy", output=args.ids)
    print(f"{len(picked)} ids to label written to {args.ids}")


if __name__ == "__main__":
    main()
