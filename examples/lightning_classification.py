"""Trace a PyTorch Lightning classifier on scikit-learn's digits with MLDebuggerCallback, then evaluate it.

Offline and CPU-only. The training code is plain Lightning; one callback traces every train and
validation sample each epoch (the step returns only its loss: the callback reads the module's forward)::

    python examples/lightning_classification.py --epochs 5 --store ./mldbg

The same run without touching the code: ``MLDBG_LIGHTNING=1 MLDBG_MODEL_NAME=... MLDBG_VERSION_NAME=...``
(see ``mldbg_callbacks/integrations/lightning.py``).
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset

from mldbg_callbacks.evaluator import Evaluator
from mldbg_callbacks.integrations.lightning import MLDebuggerCallback


class DigitsClassifier(pl.LightningModule):
    def __init__(self, lr: float = 3e-3):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32),
                                       torch.nn.ReLU(), torch.nn.Linear(32, 10))
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        images, labels, _ = batch
        return torch.nn.functional.cross_entropy(self(images), labels)

    def validation_step(self, batch, batch_idx):
        images, labels, _ = batch
        loss = torch.nn.functional.cross_entropy(self(images), labels)
        self.log("val_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def loaders(batch_size: int = 64, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """Digits split 75/25; batches are (image, label, sample id)."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    ids = np.arange(len(y))
    x_tr, x_va, y_tr, y_va, id_tr, id_va = train_test_split(x, y, ids, test_size=0.25, random_state=seed, stratify=y)
    make = lambda *a: TensorDataset(*(torch.from_numpy(v) for v in a))  # noqa: E731
    return (DataLoader(make(x_tr, y_tr, id_tr), batch_size=batch_size, shuffle=True,
                       generator=torch.Generator().manual_seed(seed)),
            DataLoader(make(x_va, y_va, id_va), batch_size=256))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--store", default=None, help="store directory (default: MLD_HOME, else ./mldbg)")
    parser.add_argument("--model-name", default="digits_mlp_lightning")
    parser.add_argument("--version-name", default="v1")
    args = parser.parse_args(argv)

    pl.seed_everything(0, verbose=False)
    callback = MLDebuggerCallback(model_name=args.model_name, version_name=args.version_name, store=args.store)
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, callbacks=[callback],
                         enable_progress_bar=False, logger=False, enable_checkpointing=False,
                         enable_model_summary=False)
    trainer.fit(DigitsClassifier(), *loaders())

    evaluator = Evaluator(model_name=args.model_name, version_name=args.version_name, store=args.store)
    result = evaluator.request_evaluation()
    print(result.metrics_summary().to_string(index=False))


if __name__ == "__main__":
    main()
