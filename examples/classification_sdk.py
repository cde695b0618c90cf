"""Trace a small PyTorch classifier on scikit-learn's digits, evaluate it, write a report.

Offline and CPU-only; follows the product page with the import renamed to ``mldbg_callbacks``:

    python examples/classification_sdk.py --epochs 8 --store ./mldbg --report reports/demo.html
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset

from mldbg_callbacks.evaluator import Evaluator
from mldbg_callbacks.training import ClassificationTracer


def loaders(batch_size: int = 64, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    ids = np.arange(len(y))
    x_tr, x_va, y_tr, y_va, id_tr, id_va = train_test_split(x, y, ids, test_size=0.25, random_state=seed, stratify=y)
    make = lambda *a: TensorDataset(*(torch.from_numpy(v) for v in a))  # noqa: E731
    generator = torch.Generator().manual_seed(seed)
    return (DataLoader(make(x_tr, y_tr, id_tr), batch_size=batch_size, shuffle=True, generator=generator),
            DataLoader(make(x_va, y_va, id_va), batch_size=256))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--store", default=None, help="store directory (default: MLD_HOME, else ./mldbg)")
    parser.add_argument("--model-name", default="digits_mlp")
    parser.add_argument("--version-name", default="v1")
    parser.add_argument("--report", default="reports/classification_sdk.html")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32),
                                torch.nn.ReLU(), torch.nn.Linear(32, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    train_loader, val_loader = loaders()

    # The tracer wraps the model: it returns the model's output unchanged and records every sample.
    tracer = ClassificationTracer(model, model_name=args.model_name, version_name=args.version_name,
                                  store=args.store)
    for epoch in range(args.epochs):
        model.train()
        for image, label, indices in train_loader:
            logits = tracer(image, label, input_ids=indices.numpy(), dataset_type="train", n_epoch=epoch)
            loss = torch.nn.functional.cross_entropy(logits, label)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            for image, label, indices in val_loader:
                _ = tracer(image, label, input_ids=indices.numpy(), dataset_type="val", n_epoch=epoch)
        tracer.wait_for_save(n_epoch=epoch)
    tracer.close()

    evaluator = Evaluator(model_name=args.model_name, version_name=args.version_name, store=args.store)
    result = evaluator.request_evaluation()
    print(result.metrics_summary().to_string(index=False))
    result.get_summary()
    print(f"report: {result.to_html(args.report)}")


if __name__ == "__main__":
    main()
