"""Fine-tune a tiny BERT with the Hugging Face Trainer and MLDebuggerCallback, then evaluate the traces.

Offline and CPU-only: the reviews are generated from templates (the label is the sentiment of the
adjective, with 8% of training labels flipped so there is something to find), the word-level tokenizer
is trained in memory and the model is built from a config.

    python examples/hf_text_classification.py --epochs 4 --store ./mldbg
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import (BertConfig, BertForSequenceClassification, DataCollatorWithPadding,  # noqa: E402
                          PreTrainedTokenizerFast, Trainer, TrainingArguments)

from mldbg_callbacks.evaluator import Evaluator  # noqa: E402
from mldbg_callbacks.integrations.transformers import MLDebuggerCallback  # noqa: E402

SENTIMENT = {0: ["boring", "awful", "dull", "terrible", "clumsy", "weak"],
             1: ["okay", "average", "fine", "acceptable", "passable"],
             2: ["great", "wonderful", "brilliant", "moving", "delightful", "superb"]}
SUBJECTS = ["the movie", "this film", "the plot", "the acting", "the soundtrack", "the ending", "the cast",
            "the script", "the dialogue", "the camera work"]
ADVERBS = ["", "really", "truly", "quite", "very", "rather"]
TAILS = ["", "overall", "to be honest", "in my opinion", "from start to finish", "if you ask me"]


def reviews(n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    combos = [(s, a, label, w, t) for s, a, t in itertools.product(SUBJECTS, ADVERBS, TAILS)
              for label, words in SENTIMENT.items() for w in words]
    rng = np.random.default_rng(seed)
    picked = [combos[i] for i in rng.choice(len(combos), size=n, replace=False)]
    texts = [" ".join(p for p in (s, "was", a, w, t) if p) for s, a, _, w, t in picked]
    return texts, [label for _, _, label, _, _ in picked]


def tokenizer_for(texts: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", model_input_names=["input_ids", "attention_mask"])


class Rows(torch.utils.data.Dataset):
    """Tokenized rows with an ``idx`` column: the Trainer would drop it; the callback keeps it as the id."""

    def __init__(self, tokenizer, texts, labels):
        self.rows = [{**tokenizer(text), "label": label, "idx": i}
                     for i, (text, label) in enumerate(zip(texts, labels))]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--n-train", type=int, default=240)
    parser.add_argument("--n-eval", type=int, default=80)
    parser.add_argument("--store", default=None, help="store directory (default: MLD_HOME, else ./mldbg)")
    parser.add_argument("--output-dir", default=None, help="Trainer output directory (default: a temporary one)")
    parser.add_argument("--model-name", default="reviews-bert")
    parser.add_argument("--version-name", default="v1")
    args = parser.parse_args(argv)

    texts, labels = reviews(args.n_train + args.n_eval)
    rng = np.random.default_rng(1)
    noisy = list(labels)
    for i in rng.choice(args.n_train, size=args.n_train * 8 // 100, replace=False):
        noisy[i] = (noisy[i] + 1) % 3
    tokenizer = tokenizer_for(texts)
    train = Rows(tokenizer, texts[:args.n_train], noisy[:args.n_train])
    evaluation = Rows(tokenizer, texts[args.n_train:], labels[args.n_train:])

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=37, max_position_embeddings=64, num_labels=3, pad_token_id=tokenizer.pad_token_id))

    with tempfile.TemporaryDirectory() as scratch:
        training_args = TrainingArguments(
            output_dir=args.output_dir or scratch, num_train_epochs=args.epochs, eval_strategy="epoch",
            save_strategy="no", logging_strategy="no", per_device_train_batch_size=8, learning_rate=3e-3,
            use_cpu=True, report_to="none", disable_tqdm=True, seed=0)
        trainer = Trainer(model=model, args=training_args, train_dataset=train, eval_dataset=evaluation,
                          data_collator=DataCollatorWithPadding(tokenizer),
                          callbacks=[MLDebuggerCallback(args.model_name, args.version_name, store=args.store)])
        trainer.train()  # every training and evaluation sample is traced every epoch; a LabelTracker PNG at the end

    result = Evaluator(args.model_name, args.version_name, store=args.store).request_evaluation()
    print(result.metrics_summary().to_string(index=False))


if __name__ == "__main__":
    main()
