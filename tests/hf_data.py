"""Offline fixtures for the Hugging Face tests: generated review texts, an in-memory word-level
tokenizer, tiny BERT / ViT models built from configs, digits images, and a reader of stored ids.

Used by ``test_transformers.py`` and by ``hf_ddp_script.py`` (run under torchrun).
"""

from __future__ import annotations

import collections
import itertools
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from mldbg_callbacks.core.vectors import decoded_rows

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SUBJECTS = ["the movie", "this film", "the plot", "the acting", "the soundtrack", "the ending", "the cast",
            "the script", "the dialogue", "the camera work"]
WORDS = {0: ["boring", "awful", "dull", "terrible", "clumsy", "weak"],          # negative
         1: ["okay", "average", "fine", "acceptable", "passable"],             # neutral
         2: ["great", "wonderful", "brilliant", "moving", "delightful", "superb"]}  # positive
ADVERBS = ["", "really", "truly", "quite", "very", "rather"]
TAILS = ["", "overall", "to be honest", "in my opinion", "from start to finish",
         "if you ask me and my friends who saw it twice last week"]


def review_texts(n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """``n`` distinct short reviews of varied length; the label is the sentiment of the adjective."""
    combos = [(s, a, lab, w, t) for s, a, (lab, words), t in itertools.product(SUBJECTS, ADVERBS, WORDS.items(), TAILS)
              for w in words]
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(combos), size=n, replace=False)
    texts, labels = [], []
    for i in chosen:
        subject, adverb, label, word, tail = combos[i]
        texts.append(" ".join(part for part in (subject, "was", adverb, word, tail) if part))
        labels.append(int(label))
    return texts, labels


def word_tokenizer(texts: list[str]):
    """A word-level fast tokenizer trained in memory on ``texts`` ([CLS] text [SEP], [PAD] = 0)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                             special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]",
                                   model_input_names=["input_ids", "attention_mask"])


class DictDataset(torch.utils.data.Dataset):
    """A map-style dataset of feature dicts (what Trainer takes when ``datasets`` is not installed)."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return dict(self.rows[i])


def text_datasets(n_train: int = 50, n_eval: int = 20, id_column: str | None = "idx", seed: int = 0,
                  eval_labels: bool = True):
    """(tokenizer, train, eval): unpadded token ids per sample, a ``label``, and ids from 0 when asked."""
    texts, labels = review_texts(n_train + n_eval, seed)
    tokenizer = word_tokenizer(texts)

    def rows(part_texts, part_labels, with_labels=True):
        out = []
        for i, (text, label) in enumerate(zip(part_texts, part_labels)):
            row = dict(tokenizer(text))
            if with_labels:
                row["label"] = label
            if id_column:
                row[id_column] = i
            out.append(row)
        return DictDataset(out)

    train = rows(texts[:n_train], labels[:n_train])
    evaluation = rows(texts[n_train:], labels[n_train:], eval_labels)
    return tokenizer, train, evaluation


def tiny_bert(vocab_size: int, num_labels: int = 3, seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=64, num_labels=num_labels, pad_token_id=0)
    return BertForSequenceClassification(config)


def digits_datasets(n_train: int = 120, n_eval: int = 40, id_column: str | None = "id"):
    """scikit-learn digits as 1x8x8 ``pixel_values`` in [0, 1] with ``label`` and optional ids."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)

    def rows(lo, hi):
        out = []
        for i in range(lo, hi):
            row = {"pixel_values": torch.from_numpy(x[i]), "label": int(y[i])}
            if id_column:
                row[id_column] = i
            out.append(row)
        return DictDataset(out)

    return rows(0, n_train), rows(n_train, n_train + n_eval)


def tiny_vit(num_labels: int = 10, seed: int = 0):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=37, num_labels=num_labels)
    return ViTForImageClassification(config)


def training_args(output_dir, **overrides):
    """CPU, no reporting, no progress bars, no checkpoints unless asked, evaluation every epoch."""
    from transformers import TrainingArguments

    options = dict(output_dir=str(output_dir), use_cpu=True, report_to="none", disable_tqdm=True,
                   save_strategy="no", eval_strategy="epoch", logging_strategy="no", num_train_epochs=3,
                   per_device_train_batch_size=8, per_device_eval_batch_size=16, learning_rate=5e-3,
                   seed=0, dataloader_num_workers=0)
    options.update(overrides)
    return TrainingArguments(**options)


def stored_ids(root, model: str, version: str) -> dict:
    """{(dataset_type, n_epoch): Counter(input_id)} over every committed part, all ranks."""
    counts: dict = collections.defaultdict(collections.Counter)
    base = Path(root) / model / version / "traces"
    for marker in sorted(base.glob("dataset_type=*/n_epoch=*/rank=*/_COMMITTED")):
        dataset_type = marker.parent.parent.parent.name.split("=", 1)[1]
        epoch = int(marker.parent.parent.name.split("=", 1)[1])
        for part in json.loads(marker.read_text())["parts"]:
            counts[(dataset_type, epoch)].update(pq.read_table(marker.parent / part, columns=["input_id"])
                                                 .column("input_id").to_pylist())
    return dict(counts)


def stored_rows(root, model: str, version: str, dataset_type: str, epoch: int) -> dict:
    """{input_id: row} of one committed (dataset_type, epoch), all ranks."""
    rows = {}
    base = Path(root) / model / version / "traces" / f"dataset_type={dataset_type}" / f"n_epoch={epoch}"
    for marker in sorted(base.glob("rank=*/_COMMITTED")):
        for part in json.loads(marker.read_text())["parts"]:
            for row in decoded_rows(pq.read_table(marker.parent / part)):
                rows.setdefault(row["input_id"], row)
    return rows
