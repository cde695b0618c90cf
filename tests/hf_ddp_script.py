"""Two-rank DDP training of a tiny BERT with MLDebuggerCallback; run by test_transformers.py under torchrun:

    python -m torch.distributed.run --nproc_per_node 2 tests/hf_ddp_script.py --store DIR --output-dir DIR

CPU and gloo. 50 training and 21 evaluation samples, so the distributed samplers pad with duplicates.
Each rank writes its counters to the report; rank 0 writes ``<output-dir>/ddp_report.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from hf_data import text_datasets, tiny_bert, training_args  # noqa: E402
from transformers import DataCollatorWithPadding, Trainer  # noqa: E402

from mldbg_callbacks.integrations.transformers import MLDebuggerCallback  # noqa: E402

N_TRAIN, N_EVAL = 50, 21


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--epochs", type=int, default=2)
    options = parser.parse_args()

    tokenizer, train, evaluation = text_datasets(N_TRAIN, N_EVAL)
    callback = MLDebuggerCallback("ddp-bert", "v1", store=options.store, strict=True)
    trainer = Trainer(model=tiny_bert(tokenizer.vocab_size), train_dataset=train, eval_dataset=evaluation,
                      args=training_args(options.output_dir, num_train_epochs=options.epochs, ddp_backend="gloo",
                                         per_device_eval_batch_size=4),
                      data_collator=DataCollatorWithPadding(tokenizer), callbacks=[callback])
    trainer.train()

    stats = callback.stats
    mine = {"rank": dist.get_rank(), "rows": stats.rows_written, "skipped": stats.total_skipped}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    if dist.get_rank() == 0:
        report = {"world_size": dist.get_world_size(), "n_train": N_TRAIN, "n_eval": N_EVAL, "ranks": gathered,
                  "torch": torch.__version__}
        Path(options.output_dir, "ddp_report.json").write_text(json.dumps(report))
        print(json.dumps(report))


if __name__ == "__main__":
    main()
