"""MLDebuggerCallback inside real ``Trainer.train()`` runs of tiny models built from configs (CPU, offline).

What the callback stored is compared with references taken independently of it: the dataset's ids and
labels, a fresh ``model(**batch)`` forward after training, a forward hook on the classifier, forward-call
counts and metrics of the same run without the callback.
"""

from __future__ import annotations

import gc
import json
import os
import pickle
import subprocess
import sys
import warnings
import weakref
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hf_data  # noqa: E402
from hf_data import (digits_datasets, stored_ids, stored_rows, text_datasets, tiny_bert, tiny_vit,  # noqa: E402
                     training_args)
from transformers import DataCollatorWithPadding, Trainer  # noqa: E402

from mldbg_callbacks.core.hashing import row_hashes  # noqa: E402
from mldbg_callbacks.core.trace_core import TraceWarning  # noqa: E402
from mldbg_callbacks.errors import TraceInputError  # noqa: E402
from mldbg_callbacks.integrations.transformers import (BATCH_KEY, IdCollator, MLDebuggerCallback,  # noqa: E402
                                                        token_fingerprint)

ROOT = Path(__file__).resolve().parents[1]
MODEL, VERSION = "tiny-bert", "v1"
N_TRAIN, N_EVAL = 50, 20  # 50 = 6 batches of 8 + a short last batch of 2


class ForwardCounter:
    """Counts forward calls of a model by mode, with a hook of its own."""

    def __init__(self, model):
        self.train = self.eval = 0
        self.handle = model.register_forward_hook(self)

    def __call__(self, module, args, output):
        if module.training:
            self.train += 1
        else:
            self.eval += 1


def text_trainer(tmp_path, callbacks=(), model=None, id_column="idx", collator=None, name="out", **overrides):
    tokenizer, train, evaluation = text_datasets(N_TRAIN, N_EVAL, id_column=id_column)
    model = model if model is not None else tiny_bert(tokenizer.vocab_size)
    eval_dataset = overrides.pop("eval_dataset", None) or evaluation
    trainer = Trainer(model=model, args=training_args(tmp_path / name, **overrides), train_dataset=train,
                      eval_dataset=eval_dataset,
                      data_collator=collator or DataCollatorWithPadding(tokenizer), callbacks=list(callbacks))
    return trainer, tokenizer, train, evaluation


def each_once(counter, n) -> bool:
    return counter == {str(i): 1 for i in range(n)}


def eval_losses(trainer) -> list:
    return [round(entry["eval_loss"], 6) for entry in trainer.state.log_history if "eval_loss" in entry]


# -- the main path -------------------------------------------------------------------------------------
def test_every_sample_traced_once_per_epoch_without_an_extra_forward(tmp_path, store_dir):
    plain, *_ = text_trainer(tmp_path, name="plain")
    plain_counter = ForwardCounter(plain.model)
    plain.train()

    callback = MLDebuggerCallback(MODEL, VERSION)
    trainer, tokenizer, train, evaluation = text_trainer(tmp_path, callbacks=[callback])
    counter = ForwardCounter(trainer.model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TraceWarning)
        trainer.train()

    # no extra forward pass: 3 epochs x (7 training batches + 2 evaluation batches), as without the callback
    assert (counter.train, counter.eval) == (plain_counter.train, plain_counter.eval) == (21, 6)
    assert eval_losses(trainer) == eval_losses(plain)  # tracing changes nothing in training

    ids = stored_ids(store_dir, MODEL, VERSION)
    assert sorted(ids) == [("eval", e) for e in range(3)] + [("train", e) for e in range(3)]
    assert all(each_once(ids[("train", e)], N_TRAIN) and each_once(ids[("eval", e)], N_EVAL) for e in range(3))
    assert callback.stats.total_skipped == 0 and callback.stats.duplicates_dropped == 0

    # the last epoch's eval traces are the trained model's logits and pooled features on the eval set
    model = trainer.model.eval()
    pooled = []
    hook = model.classifier.register_forward_pre_hook(lambda module, args: pooled.append(args[0].detach()))
    batch = DataCollatorWithPadding(tokenizer)([{k: v for k, v in evaluation[i].items() if k != "idx"}
                                                for i in range(N_EVAL)])
    with torch.no_grad():
        logits = model(**batch).logits.numpy()
    hook.remove()
    rows = stored_rows(store_dir, MODEL, VERSION, "eval", 2)
    np.testing.assert_allclose(np.stack([rows[str(i)]["logits"] for i in range(N_EVAL)]), logits, atol=1e-5)
    np.testing.assert_allclose(np.stack([rows[str(i)]["features"] for i in range(N_EVAL)]), pooled[0].numpy(),
                               atol=2e-3)  # stored as float16
    assert [rows[str(i)]["label"] for i in range(N_EVAL)] == [evaluation[i]["label"] for i in range(N_EVAL)]

    png = store_dir / MODEL / VERSION / "label_tracker_train_loss.png"
    assert callback.label_tracker_path == png and png.read_bytes()[:4] == b"\x89PNG"

    # after train(): evaluate() and predict() work (the id entry is taken out of the batch) and trace nothing
    trainer.evaluate()
    trainer.predict(evaluation)
    assert stored_ids(store_dir, MODEL, VERSION) == ids
    callback.close()  # hooks off, collator and column removal restored: the Trainer works as without it
    assert "idx" not in trainer._signature_columns and not isinstance(trainer.data_collator, IdCollator)
    assert not trainer.model._forward_hooks.keys() - {counter.handle.id} and not trainer.model._forward_pre_hooks
    trainer.evaluate()


def test_content_hash_ids_are_stable_across_epochs_with_dynamic_padding(tmp_path, store_dir):
    padded_lengths: dict = {}

    class RecordingCollator(DataCollatorWithPadding):
        def __call__(self, features):
            batch = super().__call__(features)
            for feature in features:
                padded_lengths.setdefault(tuple(feature["input_ids"]), set()).add(batch["input_ids"].shape[1])
            return batch

    tokenizer, train, evaluation = text_datasets(N_TRAIN, N_EVAL, id_column=None)
    callback = MLDebuggerCallback(MODEL, VERSION, store=store_dir)
    trainer, *_ = text_trainer(tmp_path, callbacks=[callback], id_column=None,
                               collator=RecordingCollator(tokenizer))
    trainer.train()
    assert any(len(lengths) > 1 for lengths in padded_lengths.values())  # padding really varied by epoch

    def expected_ids(dataset):  # the id of each unpadded token sequence, computed here without the callback
        return {row_hashes(token_fingerprint(torch.tensor([row["input_ids"]])).numpy())[0] for row in dataset.rows}

    ids = stored_ids(store_dir, MODEL, VERSION)
    for epoch in range(3):
        assert set(ids[("train", epoch)]) == expected_ids(train) and len(ids[("train", epoch)]) == N_TRAIN
        assert set(ids[("eval", epoch)]) == expected_ids(evaluation) and len(ids[("eval", epoch)]) == N_EVAL
        assert max(ids[("train", epoch)].values()) == max(ids[("eval", epoch)].values()) == 1


def test_token_fingerprint_ignores_padding_but_not_content():
    tokens = [5, 9, 2, 7]
    right = torch.tensor([tokens + [0, 0, 0]])
    left = torch.tensor([[0] + tokens])
    masks = (torch.tensor([[1, 1, 1, 1, 0, 0, 0]]), torch.tensor([[0, 1, 1, 1, 1]]))
    bare = token_fingerprint(torch.tensor([tokens]))
    assert torch.equal(token_fingerprint(right, masks[0]), bare)
    assert torch.equal(token_fingerprint(left, masks[1]), bare)
    others = torch.tensor([[5, 9, 7, 2], [5, 9, 2, 8], [5, 9, 2, 7]])
    prints = token_fingerprint(others, torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]]))
    assert len({tuple(row) for row in prints.tolist()} | {tuple(bare[0].tolist())}) == 4
    big = torch.randint(0, 250_000, (64, 300))
    assert token_fingerprint(big).min() >= 0  # no int64 overflow with large vocabularies and long rows


# -- training variants ---------------------------------------------------------------------------------
def test_gradient_accumulation_bf16_and_named_eval_sets(tmp_path, store_dir):
    tokenizer, train, evaluation = text_datasets(N_TRAIN, N_EVAL)
    more = hf_data.DictDataset(evaluation.rows[:10])  # a second eval set: its own partition, ids 0..9
    model = tiny_bert(tokenizer.vocab_size).to(torch.bfloat16)  # bf16 logits and features
    callback = MLDebuggerCallback(MODEL, VERSION)
    trainer = Trainer(model=model, args=training_args(tmp_path / "out", gradient_accumulation_steps=3, bf16=True,
                                                      num_train_epochs=2),
                      train_dataset=train, eval_dataset={"reviews": evaluation, "more": more},
                      data_collator=DataCollatorWithPadding(tokenizer), callbacks=[callback])
    trainer.train()
    ids = stored_ids(store_dir, MODEL, VERSION)
    assert sorted(ids) == [(name, e) for name in ("eval_more", "eval_reviews", "train") for e in range(2)]
    sizes = {"train": N_TRAIN, "eval_reviews": N_EVAL, "eval_more": 10}
    assert all(each_once(counts, sizes[name]) for (name, _), counts in ids.items())
    rows = stored_rows(store_dir, MODEL, VERSION, "train", 1)
    assert np.isfinite(np.stack([row["logits"] for row in rows.values()])).all()
    assert len(rows["0"]["features"]) == 32 and callback.stats.total_skipped == 0


def test_steps_evaluation_traces_the_last_evaluation_of_each_epoch(tmp_path, store_dir):
    # 7 optimizer steps per epoch, evaluation every 3 steps: at 3, 6 | 9, 12, and at max_steps 14
    callback = MLDebuggerCallback(MODEL, VERSION)
    trainer, _, _, evaluation = text_trainer(tmp_path, callbacks=[callback], eval_strategy="steps", eval_steps=3,
                                             num_train_epochs=2, per_device_eval_batch_size=N_EVAL)
    trainer.train()
    losses = {entry["step"]: entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry}
    assert sorted(losses) == [3, 6, 9, 12, 14]
    ids = stored_ids(store_dir, MODEL, VERSION)
    assert each_once(ids[("eval", 0)], N_EVAL) and each_once(ids[("eval", 1)], N_EVAL)
    for epoch, step in ((0, 6), (1, 14)):  # the stored logits give the loss logged at that step
        rows = stored_rows(store_dir, MODEL, VERSION, "eval", epoch)
        logits = torch.tensor(np.stack([rows[str(i)]["logits"] for i in range(N_EVAL)]))
        labels = torch.tensor([rows[str(i)]["label"] for i in range(N_EVAL)])
        assert torch.nn.functional.cross_entropy(logits, labels).item() == pytest.approx(losses[step], abs=1e-5)


def test_vit_image_classification_with_label_smoothing(tmp_path, store_dir):
    train, evaluation = digits_datasets(120, 40)
    callback = MLDebuggerCallback("tiny-vit", VERSION)
    trainer = Trainer(model=tiny_vit(), callbacks=[callback], train_dataset=train, eval_dataset=evaluation,
                      args=training_args(tmp_path / "out", num_train_epochs=2, label_smoothing_factor=0.1))
    trainer.train()  # label smoothing: the Trainer pops labels before forward; the batch still carries them
    ids = stored_ids(store_dir, "tiny-vit", VERSION)
    # ids are the dataset's "id" column: 0..119 for training, 120..159 for evaluation
    assert all(ids[("train", e)] == {str(i): 1 for i in range(120)} for e in range(2))
    assert all(ids[("eval", e)] == {str(i): 1 for i in range(120, 160)} for e in range(2))
    model = trainer.model.eval()
    with torch.no_grad():
        logits = model(pixel_values=torch.stack([evaluation[i]["pixel_values"] for i in range(40)])).logits
    rows = stored_rows(store_dir, "tiny-vit", VERSION, "eval", 1)
    np.testing.assert_allclose(np.stack([rows[str(i)]["logits"] for i in range(120, 160)]), logits.numpy(),
                               atol=1e-5)
    assert len(rows["120"]["features"]) == 32 and rows["120"]["label"] == evaluation[0]["label"]


def test_predict_without_labels_traces_operation_rows_the_evaluator_reads(tmp_path, store_dir):
    from mldbg_callbacks.evaluator import Evaluator

    train, evaluation = digits_datasets(120, 40)
    held_out = hf_data.DictDataset([{"pixel_values": row["pixel_values"], "id": f"req-{row['id']}"}
                                    for row in digits_datasets(200, 60)[1]])  # digits 200..259, no label column
    callback = MLDebuggerCallback("tiny-vit", VERSION)
    trainer = Trainer(model=tiny_vit(), callbacks=[callback], train_dataset=train, eval_dataset=evaluation,
                      args=training_args(tmp_path / "out", num_train_epochs=2))
    trainer.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error", TraceWarning)
        predicted = trainer.predict(held_out)
    # durable when predict returns, at the last epoch's weights; labelled data keeps today's behaviour
    ids = stored_ids(store_dir, "tiny-vit", VERSION)
    assert ids[("operation", 1)] == {f"req-{i}": 1 for i in range(200, 260)}
    rows = stored_rows(store_dir, "tiny-vit", VERSION, "operation", 1)
    assert all(row["label"] is None and row["logged_at"] is not None for row in rows.values())
    np.testing.assert_allclose(np.stack([rows[f"req-{i}"]["logits"] for i in range(200, 260)]),
                               predicted.predictions, atol=1e-5)
    assert len(rows["req-200"]["features"]) == 32
    trainer.predict(evaluation)  # with labels: not traced outside train()
    assert sorted(stored_ids(store_dir, "tiny-vit", VERSION)) == sorted(ids)

    unlabelled = Evaluator("tiny-vit", VERSION).request_evaluation().unlabelled()
    assert sorted(unlabelled["input_id"]) == sorted(f"req-{i}" for i in range(200, 260))
    expected = dict(zip((f"req-{i}" for i in range(200, 260)), predicted.predictions.argmax(1)))
    assert all(expected[i] == p for i, p in zip(unlabelled["input_id"], unlabelled["pred"]))

    # without an id column: content hashes of pixel_values; another name; a Trainer that did not train: epoch 0
    anonymous = hf_data.DictDataset([{"pixel_values": row["pixel_values"]} for row in held_out])
    other = MLDebuggerCallback("tiny-vit", "v2", predict_dataset_type="pool", strict=True)
    fresh = Trainer(model=trainer.model, callbacks=[other], args=training_args(tmp_path / "out2", eval_strategy="no"))
    fresh.predict(anonymous)
    pixels = np.stack([row["pixel_values"].numpy() for row in held_out])
    assert stored_ids(store_dir, "tiny-vit", "v2") == {("pool", 0): {h: 1 for h in row_hashes(pixels)}}



def test_predict_during_training_traces_the_pool_at_the_epoch_of_the_weights(tmp_path, store_dir):
    """A user's callback scores an unlabelled pool at each epoch end (active learning inside train()):
    each epoch's predictions are stored under that epoch, and training and evaluation are traced as without it."""
    from transformers import TrainerCallback

    train, evaluation = digits_datasets(120, 40)
    pool = hf_data.DictDataset([{"pixel_values": row["pixel_values"], "id": f"pool-{row['id']}"}
                                for row in digits_datasets(200, 30)[1]])
    scored = []

    class ScorePool(TrainerCallback):
        trainer = None

        def on_epoch_end(self, args, state, control, **kwargs):
            scored.append(self.trainer.predict(pool).predictions)

    scorer = ScorePool()
    trainer = Trainer(model=tiny_vit(), callbacks=[MLDebuggerCallback("tiny-vit", VERSION, strict=True), scorer],
                      train_dataset=train, eval_dataset=evaluation,
                      args=training_args(tmp_path / "out", num_train_epochs=2))
    scorer.trainer = trainer
    trainer.train()
    ids = stored_ids(store_dir, "tiny-vit", VERSION)
    pool_ids = {f"pool-{i}": 1 for i in range(200, 230)}
    assert ids[("operation", 0)] == ids[("operation", 1)] == pool_ids
    for epoch in (0, 1):
        assert len(ids[("train", epoch)]) == 120 and len(ids[("eval", epoch)]) == 40
        rows = stored_rows(store_dir, "tiny-vit", VERSION, "operation", epoch)
        assert all(row["label"] is None for row in rows.values())
        np.testing.assert_allclose(np.stack([rows[f"pool-{i}"]["logits"] for i in range(200, 230)]),
                                   scored[epoch], atol=1e-5)

def test_resume_from_checkpoint_records_each_epoch_once(tmp_path, store_dir):
    first, *_ = text_trainer(tmp_path, callbacks=[MLDebuggerCallback(MODEL, VERSION)], num_train_epochs=2,
                             save_strategy="epoch")
    first.train()
    checkpoint = max((tmp_path / "out").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert checkpoint.name == "checkpoint-14"

    second, *_ = text_trainer(tmp_path, callbacks=[MLDebuggerCallback(MODEL, VERSION)], num_train_epochs=4,
                              save_strategy="epoch")
    second.train(resume_from_checkpoint=str(checkpoint))
    ids = stored_ids(store_dir, MODEL, VERSION)
    assert sorted(ids) == [("eval", e) for e in range(4)] + [("train", e) for e in range(4)]
    assert all(each_once(ids[("train", e)], N_TRAIN) and each_once(ids[("eval", e)], N_EVAL) for e in range(4))

    fresh, *_ = text_trainer(tmp_path, callbacks=[MLDebuggerCallback(MODEL, VERSION)], max_steps=1, name="fresh")
    with pytest.warns(TraceWarning, match="already has traces .* Use a new version_name"):
        fresh.train()  # not a resume: starting over in the same version is almost always a mistake


def test_distributed_data_parallel_two_ranks(tmp_path):
    store = tmp_path / "store"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}
    env.pop("MLD_HOME", None)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "tests" / "hf_ddp_script.py"),
                           "--store", str(store), "--output-dir", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-5000:])
    report = json.loads((tmp_path / "out" / "ddp_report.json").read_text())
    assert report["world_size"] == 2 and all(r["skipped"] == 0 for r in report["ranks"])

    ids = stored_ids(store, "ddp-bert", "v1")
    assert sorted(ids) == [("eval", 0), ("eval", 1), ("train", 0), ("train", 1)]
    for (dataset_type, epoch), counts in ids.items():
        n = report["n_train"] if dataset_type == "train" else report["n_eval"]
        assert set(counts) == {str(i) for i in range(n)}  # every sample, some twice (sampler padding)
        for rank in (0, 1):
            assert (store / "ddp-bert" / "v1" / "traces" / f"dataset_type={dataset_type}" / f"n_epoch={epoch}"
                    / f"rank={rank}" / "_COMMITTED").is_file()

    from mldbg_callbacks.evaluator import Evaluator

    summary = Evaluator("ddp-bert", "v1", store=store).request_evaluation().metrics_summary()
    counts = dict(zip(summary["dataset"], summary["counts"]))
    assert counts == {"train": report["n_train"], "eval": report["n_eval"]}  # de-duplicated across ranks
    assert (store / "ddp-bert" / "v1" / "label_tracker_train_loss.png").is_file()


# -- bad input -----------------------------------------------------------------------------------------
def test_forward_without_labels_is_skipped_or_raises_when_strict(tmp_path, store_dir):
    tokenizer, train, unlabelled = text_datasets(N_TRAIN, N_EVAL, eval_labels=False)
    callback = MLDebuggerCallback(MODEL, VERSION)
    trainer, *_ = text_trainer(tmp_path, callbacks=[callback], num_train_epochs=2, eval_dataset=unlabelled)
    with pytest.warns(TraceWarning, match="had no labels="):
        trainer.train()
    ids = stored_ids(store_dir, MODEL, VERSION)
    assert sorted(ids) == [("train", 0), ("train", 1)]
    assert callback.stats.rows_skipped["missing_labels"] == 2 * N_EVAL

    strict = MLDebuggerCallback(MODEL, "strict", strict=True)
    trainer, *_ = text_trainer(tmp_path, callbacks=[strict], num_train_epochs=1, eval_dataset=unlabelled)
    with pytest.raises(TraceInputError, match="eval forward call .* had no labels="):
        trainer.train()


def detr(num_labels=3):
    from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig

    torch.manual_seed(0)
    backbone = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                            layer_type="basic", out_features=["stage2"])
    return DetrForObjectDetection(DetrConfig(
        use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=backbone, d_model=16,
        encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=16, decoder_ffn_dim=16, num_queries=5, num_labels=num_labels))


def detection_trainer(tmp_path, model, callback):
    rows = [{"pixel_values": torch.rand(3, 32, 32),
             "labels": {"class_labels": torch.tensor([i % 3]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]])}}
            for i in range(4)]
    collate = lambda feats: {"pixel_values": torch.stack([f["pixel_values"] for f in feats]),  # noqa: E731
                             "labels": [f["labels"] for f in feats]}
    return Trainer(model=model, args=training_args(tmp_path / "out", max_steps=2, eval_strategy="no",
                                                   per_device_train_batch_size=2),
                   train_dataset=hf_data.DictDataset(rows), data_collator=collate, callbacks=[callback])


def test_detection_model_is_traced_and_a_wrapped_detector_points_to_the_detection_adapters(tmp_path, store_dir):
    # a transformers *ForObjectDetection model is traced as a detector (tests/test_hf_detection.py has the rest)
    traced = MLDebuggerCallback("detr-traced", VERSION, strict=True)
    detection_trainer(tmp_path, detr(), traced).train()
    assert traced.task == "detection" and traced.stats.rows_written == 4

    class Detector(torch.nn.Module):  # a wrapper hides the class name: recognised by its pred_boxes output
        def __init__(self):
            super().__init__()
            self.detr = detr()

        def forward(self, pixel_values, labels=None):
            return self.detr(pixel_values=pixel_values, labels=labels)

    with pytest.raises(TraceInputError, match="ObjectDetectionTracer"):
        detection_trainer(tmp_path, Detector(), MLDebuggerCallback("detr-strict", VERSION, strict=True)).train()
    callback = MLDebuggerCallback("detr", VERSION)
    with pytest.warns(TraceWarning, match="object detection model .*ObjectDetectionTracer"):
        detection_trainer(tmp_path, Detector(), callback).train()  # training goes on
    assert callback.stats.rows_received == 0 and not (store_dir / "detr").exists()


def test_callback_added_twice_warns_and_traces_once(tmp_path, store_dir):
    first, second = MLDebuggerCallback(MODEL, VERSION), MLDebuggerCallback(MODEL, VERSION)
    with pytest.warns(TraceWarning) as caught:  # at Trainer creation
        trainer, *_ = text_trainer(tmp_path, callbacks=[first, first, second], num_train_epochs=2)
        trainer.train()
    messages = " ".join(str(w.message) for w in caught)
    assert "added to the Trainer twice" in messages and "another MLDebuggerCallback" in messages
    ids = stored_ids(store_dir, MODEL, VERSION)
    assert all(each_once(ids[("train", e)], N_TRAIN) and each_once(ids[("eval", e)], N_EVAL) for e in range(2))
    assert first.stats.duplicates_dropped == 0 and second.stats.rows_received == 0


def test_callback_added_after_init_uses_content_hashes_for_training(tmp_path, store_dir):
    trainer, *_ = text_trainer(tmp_path, num_train_epochs=1)
    callback = MLDebuggerCallback(MODEL, VERSION)
    trainer.add_callback(callback)
    with pytest.warns(TraceWarning, match="added after the Trainer was created"):
        trainer.train()
    ids = stored_ids(store_dir, MODEL, VERSION)
    assert len(ids[("train", 0)]) == N_TRAIN and "0" not in ids[("train", 0)]  # hashes, each sample once
    assert each_once(ids[("eval", 0)], N_EVAL)  # the eval dataloader is built later: ids from the column


def test_ids_with_remove_unused_columns_false_and_a_collator_of_ones_own(tmp_path, store_dir):
    tokenizer, *_ = text_datasets(N_TRAIN, N_EVAL)
    padding = DataCollatorWithPadding(tokenizer)
    seen = set()

    def collate(features):  # the user's collator sees every column, the id included, as without the callback
        seen.update(features[0])
        return padding([{k: v for k, v in f.items() if k != "idx"} for f in features])

    callback = MLDebuggerCallback(MODEL, VERSION)
    trainer, *_ = text_trainer(tmp_path, callbacks=[callback], collator=collate, num_train_epochs=1,
                               remove_unused_columns=False)
    trainer.train()
    assert "idx" in seen
    ids = stored_ids(store_dir, MODEL, VERSION)
    assert each_once(ids[("train", 0)], N_TRAIN) and each_once(ids[("eval", 0)], N_EVAL)

    model = weakref.ref(trainer.model)
    del trainer
    gc.collect()
    assert model() is None  # the callback (still alive here) keeps no reference to a trained model


def test_id_collator_pickles_strips_and_delegates():
    tokenizer, train, _ = text_datasets(8, 2)
    collator = IdCollator(DataCollatorWithPadding(tokenizer), ("id", "idx"), strip=("idx",))
    copy = pickle.loads(pickle.dumps(collator))  # dataloader workers may get a pickled copy
    batch = copy([train[i] for i in range(4)])
    assert "idx" not in batch and batch[BATCH_KEY]["input_id"].tolist() == [0, 1, 2, 3]
    assert torch.equal(batch[BATCH_KEY]["labels"], batch["labels"])
    assert copy.tokenizer.pad_token == "[PAD]"
    strings = IdCollator(lambda features: {"x": torch.zeros(len(features))}, ("id",))([{"id": "a"}, {"id": b"b"}])
    assert strings[BATCH_KEY]["input_id"] == ["a", "b"]


def test_callback_validates_arguments_and_pickles(store_dir):
    with pytest.raises(ValueError, match="model_name"):
        MLDebuggerCallback("a/b", VERSION)
    with pytest.raises(TypeError, match="feature_layer"):
        MLDebuggerCallback(MODEL, VERSION, feature_layer=torch.nn.Linear(2, 2))
    callback = pickle.loads(pickle.dumps(MLDebuggerCallback(MODEL, VERSION, id_column="uid")))
    assert callback.id_columns == ("uid",) and callback.stats.rows_received == 0


# -- the example ---------------------------------------------------------------------------------------
def test_hf_text_classification_example(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "hf_text_classification.py"), "--epochs", "2",
                           "--n-train", "160", "--n-eval", "48", "--store", str(tmp_path / "store"),
                           "--output-dir", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line.split() for line in done.stdout.splitlines()]
    header = next(i for i, line in enumerate(lines) if line[:3] == ["dataset", "counts", "accuracy"])
    rows = {line[0]: line for line in lines[header + 1:header + 3]}
    assert rows["train"][1] == "160" and rows["eval"][1] == "48"  # each sample once (de-duplicated per epoch)
    assert (tmp_path / "store" / "reviews-bert" / "v1" / "label_tracker_train_loss.png").is_file()
