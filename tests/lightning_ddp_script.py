"""Lightning test helpers: the digits MLP and its loaders, and a script that fits it under DDP.

``tests/test_lightning.py`` imports the model and data from here. Run as a script it fits the model
with ``strategy="ddp"`` on two CPU processes (gloo); Lightning's DDP launcher re-executes this file
(``sys.argv``) for rank 1, which is why it cannot run inside pytest's process::

    python tests/lightning_ddp_script.py --store DIR [--devices 2] [--epochs 2] [--env-callback]

``--env-callback`` passes no callback: the one the ``MLDBG_LIGHTNING`` entry point adds must trace.
Prints one JSON line (``{"rank": 0, "callbacks": [...], ...}``) from rank 0.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset

import lightning.pytorch as pl

MODEL, VERSION = "digits_mlp", "v1"


class DigitsMLP(pl.LightningModule):
    """64 -> 32 -> 16 -> 10 MLP. ``step_output``: what the steps return, ``"loss"`` (a loss only: the
    callback reads the forward hook) or ``"dict"`` (``{"loss", "logits"}``)."""

    def __init__(self, step_output: str = "loss", lr: float = 3e-3, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16),
                                        torch.nn.ReLU())
        self.head = torch.nn.Linear(16, 10)
        self.step_output = step_output
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def _step(self, batch):
        x, y = batch[0], batch[1]
        logits = self(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        return loss if self.step_output == "loss" else {"loss": loss, "logits": logits}

    def training_step(self, batch, batch_idx):
        return self._step(batch)

    def validation_step(self, batch, batch_idx):
        return self._step(batch)

    def test_step(self, batch, batch_idx):
        return self._step(batch)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def digits_arrays(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """{"train": (x, y, ids), "val": (...)}: digits scaled to [0, 1], split 75/25, ids = row index."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    ids = np.arange(len(y))
    x_tr, x_va, y_tr, y_va, id_tr, id_va = train_test_split(x, y, ids, test_size=0.25, random_state=seed,
                                                            stratify=y)
    return {"train": (x_tr, y_tr, id_tr), "val": (x_va, y_va, id_va)}


def digits_loaders(batch_size: int = 64, val_batch_size: int = 100, with_ids: bool = True,
                   seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """Shuffled train loader and a val loader; 1347 and 450 samples, so the last batches are smaller."""
    data = digits_arrays(seed)

    def dataset(name):
        x, y, ids = data[name]
        tensors = (x, y, ids) if with_ids else (x, y)
        return TensorDataset(*(torch.from_numpy(t) for t in tensors))

    generator = torch.Generator().manual_seed(seed)
    return (DataLoader(dataset("train"), batch_size=batch_size, shuffle=True, generator=generator),
            DataLoader(dataset("val"), batch_size=val_batch_size))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", required=True)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--env-callback", action="store_true")
    args = parser.parse_args(argv)

    callbacks = []
    if not args.env_callback:
        from mldbg_callbacks.integrations.lightning import MLDebuggerCallback

        callbacks.append(MLDebuggerCallback(MODEL, VERSION, store=args.store))
    strategy = {"strategy": "ddp"} if args.devices > 1 else {}
    trainer = pl.Trainer(accelerator="cpu", devices=args.devices, max_epochs=args.epochs, callbacks=callbacks,
                         enable_progress_bar=False, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, **strategy)
    train_loader, val_loader = digits_loaders()
    trainer.fit(DigitsMLP(), train_loader, val_loader)
    if trainer.is_global_zero:
        print(json.dumps({"rank": trainer.global_rank, "world_size": trainer.world_size,
                          "callbacks": [type(cb).__name__ for cb in trainer.callbacks],
                          "versions": [getattr(cb, "version_name", None) for cb in trainer.callbacks
                                       if type(cb).__name__ == "MLDebuggerCallback"]}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
