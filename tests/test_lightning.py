"""MLDebuggerCallback in real Lightning Trainers on scikit-learn's digits (CPU, small MLP).

References are independent of the callback: the dataset's own ids, the module's forward on the same
inputs, the penultimate activations computed by hand, checkpoints written by Lightning itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
pl = pytest.importorskip("lightning.pytorch")

from lightning_ddp_script import MODEL, VERSION, DigitsMLP, digits_arrays, digits_loaders  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from mldbg_callbacks.core.trace_core import TraceWarning  # noqa: E402
from mldbg_callbacks.errors import MLDebuggerError, TraceInputError  # noqa: E402
from mldbg_callbacks.evaluator import Evaluator  # noqa: E402
from mldbg_callbacks.integrations.lightning import MLDebuggerCallback  # noqa: E402
from mldbg_callbacks.store import LocalStore  # noqa: E402
from mldbg_callbacks.core.hashing import row_hashes  # noqa: E402
from mldbg_callbacks.core.vectors import decoded_rows  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = digits_arrays()
N_TRAIN, N_VAL = len(DATA["train"][2]), len(DATA["val"][2])


def make_trainer(callbacks, max_epochs=2, **kwargs) -> "pl.Trainer":
    options = dict(accelerator="cpu", devices=1, max_epochs=max_epochs, enable_progress_bar=False, logger=False,
                   enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=2)
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


def traces(store_dir, dataset_type, epoch, version=VERSION, model=MODEL):
    """The committed rows of one partition as a DataFrame (every rank)."""
    return pd.DataFrame(decoded_rows(LocalStore(store_dir).read_traces(model, version, dataset_type, [epoch])))


def epochs_of(store_dir, version=VERSION, model=MODEL) -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    for p in LocalStore(store_dir).partitions(model, version):
        if p.ranks_committed:
            found.setdefault(p.dataset_type, []).append(p.n_epoch)
    return found


def assert_each_sample_once(store_dir, dataset_type, epoch, **kwargs):
    rows = traces(store_dir, dataset_type, epoch, **kwargs)
    expected = sorted(str(i) for i in DATA[dataset_type][2])
    assert sorted(rows["input_id"]) == expected, f"{dataset_type} epoch {epoch}"
    labels = dict(zip(DATA[dataset_type][2].astype(str), DATA[dataset_type][1]))
    assert all(labels[i] == label for i, label in zip(rows["input_id"], rows["label"]))


def stored_matrix(rows, column, ids) -> np.ndarray:
    by_id = dict(zip(rows["input_id"], rows[column]))
    return np.stack([np.asarray(by_id[str(i)], dtype=np.float32) for i in ids])


# -- what is stored ----------------------------------------------------------------------------
def test_every_sample_once_per_epoch_and_label_tracker_png(store_dir):
    callback = MLDebuggerCallback(MODEL, VERSION)
    trainer = make_trainer([callback], max_epochs=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TraceWarning)  # a clean run warns about nothing
        trainer.fit(DigitsMLP(), *digits_loaders(batch_size=64, val_batch_size=100))
    # 1347 = 21 * 64 + 3 and 450 = 4 * 100 + 50: the last batches are smaller; the sanity check adds no epoch
    assert epochs_of(store_dir) == {"train": [0, 1, 2], "val": [0, 1, 2]}
    for epoch in range(3):
        assert_each_sample_once(store_dir, "train", epoch)
        assert_each_sample_once(store_dir, "val", epoch)
    stats = callback.stats
    assert stats.rows_written == 3 * (N_TRAIN + N_VAL) and stats.duplicates_dropped == 0
    assert stats.total_skipped == 0
    assert (store_dir / MODEL / VERSION / "label_tracker_train_loss.png").stat().st_size > 1000


@pytest.mark.parametrize("step_output", ["loss", "dict"])
def test_val_logits_and_features_equal_the_module_forward(store_dir, step_output):
    model = DigitsMLP(step_output=step_output)
    trainer = make_trainer([MLDebuggerCallback(MODEL, VERSION)], max_epochs=2)
    trainer.fit(model, *digits_loaders())
    x, _, ids = DATA["val"]
    model.eval()
    with torch.no_grad():
        features = model.body(torch.from_numpy(x))
        logits = model.head(features)
    rows = traces(store_dir, "val", 1)  # the last epoch's validation ran with the final weights
    np.testing.assert_allclose(stored_matrix(rows, "logits", ids), logits.numpy(), rtol=1e-5, atol=1e-5)
    # features are stored as float16: compare at float16 precision
    np.testing.assert_allclose(stored_matrix(rows, "features", ids), features.numpy(), rtol=2e-3, atol=2e-3)


class ForwardBeforeStep(pl.Callback):
    """Reference: the module's output on each training batch just before its optimizer step."""

    def __init__(self):
        self.logits = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == trainer.max_epochs - 1:
            with torch.no_grad():
                out = pl_module(batch[0])
            self.logits.update(zip(batch[2].tolist(), out.numpy()))


def test_train_logits_are_the_step_forward(store_dir):
    reference = ForwardBeforeStep()
    trainer = make_trainer([reference, MLDebuggerCallback(MODEL, VERSION)], max_epochs=2)
    trainer.fit(DigitsMLP(), *digits_loaders())
    rows = traces(store_dir, "train", 1)
    ids = sorted(reference.logits)
    assert len(ids) == N_TRAIN
    np.testing.assert_allclose(stored_matrix(rows, "logits", ids), np.stack([reference.logits[i] for i in ids]),
                               rtol=1e-5, atol=1e-5)


def test_without_ids_inputs_are_hashed_to_the_same_id_every_epoch(store_dir):
    trainer = make_trainer([MLDebuggerCallback(MODEL, VERSION)], max_epochs=2)
    trainer.fit(DigitsMLP(), *digits_loaders(with_ids=False))
    first, second = traces(store_dir, "train", 0), traces(store_dir, "train", 1)
    assert len(set(first["input_id"])) == N_TRAIN == len(first)  # digits has no duplicate images
    assert set(first["input_id"]) == set(second["input_id"])
    assert set(first["input_id"]).isdisjoint(traces(store_dir, "val", 0)["input_id"])


def test_test_after_fit_mode_filter_and_names(store_dir):
    callback = MLDebuggerCallback(MODEL, VERSION, dataset_types={"val": "validation"})
    trainer = make_trainer([callback], max_epochs=2)
    train_loader, val_loader = digits_loaders()
    model = DigitsMLP()
    trainer.fit(model, train_loader, val_loader)
    trainer.test(model, val_loader)  # the weights of epoch 1 are tested: recorded at epoch 1
    assert epochs_of(store_dir) == {"test": [1], "train": [0, 1], "validation": [0, 1]}
    np.testing.assert_allclose(stored_matrix(traces(store_dir, "test", 1), "logits", DATA["val"][2]),
                               stored_matrix(traces(store_dir, "validation", 1), "logits", DATA["val"][2]),
                               rtol=1e-6)

    filtered = MLDebuggerCallback(MODEL, "v2", mode="!test")
    trainer = make_trainer([filtered], max_epochs=1)
    trainer.fit(DigitsMLP(), train_loader, val_loader)
    trainer.test(trainer.lightning_module, val_loader)
    assert epochs_of(store_dir, version="v2") == {"train": [0], "val": [0]}
    assert MLDebuggerCallback(MODEL, "v3", mode=["train"]).loops == {"train"}
    assert MLDebuggerCallback(MODEL, "v3", mode="!predict").loops == {"train", "val", "test"}
    assert MLDebuggerCallback(MODEL, "v3", mode="operation").loops == {"predict"}
    with pytest.raises(ValueError, match="unknown loop 'serve'"):
        MLDebuggerCallback(MODEL, "v3", mode="!serve")


# -- resume --------------------------------------------------------------------------------------
def fit_with_checkpoints(tmp_path, max_epochs, ckpt_path=None):
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1,
                                               filename="{epoch}")
    callback = MLDebuggerCallback(MODEL, VERSION, label_tracker_plot=False)
    trainer = make_trainer([callback, checkpoints], max_epochs=max_epochs, enable_checkpointing=True)
    trainer.fit(DigitsMLP(), *digits_loaders(), ckpt_path=ckpt_path)
    return callback


def test_resume_from_checkpoint_traces_each_epoch_once(store_dir, tmp_path):
    fit_with_checkpoints(tmp_path, max_epochs=2)
    checkpoint = torch.load(tmp_path / "ckpt" / "epoch=1.ckpt", weights_only=False)
    state = checkpoint["callbacks"]["MLDebuggerCallback"]
    assert (state["model_name"], state["version_name"]) == (MODEL, VERSION)
    assert state["traced_epochs"] == {"train": [0, 1], "val": [0, 1]}

    callback = fit_with_checkpoints(tmp_path, max_epochs=4, ckpt_path=tmp_path / "ckpt" / "epoch=1.ckpt")
    assert epochs_of(store_dir) == {"train": [0, 1, 2, 3], "val": [0, 1, 2, 3]}
    for epoch in range(4):
        assert_each_sample_once(store_dir, "train", epoch)
        assert_each_sample_once(store_dir, "val", epoch)
    assert callback.stats.rows_written == 2 * (N_TRAIN + N_VAL)
    assert not (store_dir / MODEL / VERSION / "label_tracker_train_loss.png").exists()  # switched off


def test_resume_from_an_older_checkpoint_traces_the_epoch_again_and_the_newest_rows_win(store_dir, tmp_path):
    fit_with_checkpoints(tmp_path, max_epochs=2)
    stale = traces(store_dir, "val", 1)
    fit_with_checkpoints(tmp_path, max_epochs=3, ckpt_path=tmp_path / "ckpt" / "epoch=0.ckpt")  # reruns epoch 1
    assert epochs_of(store_dir) == {"train": [0, 1, 2], "val": [0, 1, 2]}
    for epoch in (0, 2):
        assert_each_sample_once(store_dir, "train", epoch)
        assert_each_sample_once(store_dir, "val", epoch)
    both = traces(store_dir, "val", 1)
    assert len(both) == 2 * N_VAL  # the stale rows stay in the store; the evaluation keeps the newest
    newest = both.iloc[N_VAL:]
    assert sorted(newest["input_id"]) == sorted(str(i) for i in DATA["val"][2])
    samples = Evaluator(MODEL, VERSION).request_evaluation(n_epoch=1).samples()
    val = samples[samples["dataset_type"] == "val"].set_index("input_id")
    assert len(val) == N_VAL
    newest_pred = np.stack(newest["logits"].to_numpy()).argmax(1)
    stale_pred = dict(zip(stale["input_id"], np.stack(stale["logits"].to_numpy()).argmax(1)))
    differs = [i for i, p in zip(newest["input_id"], newest_pred) if stale_pred[i] != p]
    assert differs  # the resumed branch predicts differently somewhere: the check can tell them apart
    np.testing.assert_array_equal(val.loc[list(newest["input_id"]), "pred"].to_numpy(), newest_pred)


# -- distributed ---------------------------------------------------------------------------------
def test_ddp_two_ranks_every_sample_once_after_deduplication(tmp_path):
    store = tmp_path / "store"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "lightning_ddp_script.py"), "--store", str(store),
                           "--devices", "2", "--epochs", "2"], capture_output=True, text=True, timeout=240,
                          cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["world_size"] == 2
    for dataset_type, n in (("train", N_TRAIN), ("val", N_VAL)):
        for epoch in (0, 1):
            epoch_dir = store / MODEL / VERSION / "traces" / f"dataset_type={dataset_type}" / f"n_epoch={epoch}"
            assert sorted(p.name for p in epoch_dir.glob("rank=*/_COMMITTED")) == ["_COMMITTED"] * 2
            assert {p.name for p in epoch_dir.iterdir()} == {"rank=0", "rank=1"}
            rows = traces(store, dataset_type, epoch)
            assert set(rows["rank"]) == {0, 1}
            # the DistributedSampler pads to an even count: at most one sample is traced twice
            assert len(rows) == n + n % 2 and set(rows["input_id"]) == {str(i) for i in DATA[dataset_type][2]}
    result = Evaluator(MODEL, VERSION, store=store).request_evaluation()
    counts = result.metrics_summary().set_index("dataset")["counts"].astype(int).to_dict()
    assert counts == {"train": N_TRAIN, "val": N_VAL}  # de-duplicated by input_id
    assert (store / MODEL / VERSION / "label_tracker_train_loss.png").is_file()


# -- the environment switch ----------------------------------------------------------------------
ENV_SCRIPT = """
import json, os, sys
import lightning.pytorch as pl
sys.path.insert(0, {tests!r})
from lightning_ddp_script import main
off = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)  # MLDBG_LIGHTNING unset
print(json.dumps([type(cb).__name__ for cb in off.callbacks]))
os.environ["MLDBG_LIGHTNING"] = "1"
main(["--store", "unused", "--devices", "1", "--epochs", "1", "--env-callback"])
"""


def test_environment_variable_adds_the_callback(tmp_path):
    store = tmp_path / "store"
    env = {**os.environ, "MLD_HOME": str(store), "MLDBG_MODEL_NAME": "env_model", "MLDBG_VERSION_NAME": "env_v"}
    env.pop("MLDBG_LIGHTNING", None)
    # run elsewhere than the repository root, so the installed distribution's entry points are read
    done = subprocess.run([sys.executable, "-c", ENV_SCRIPT.format(tests=str(ROOT / "tests"))], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.strip().splitlines()
    assert "MLDebuggerCallback" not in json.loads(lines[0])
    report = json.loads(lines[-1])
    assert report["versions"] == ["env_v"]  # the script passed no callback: the entry point added it
    assert epochs_of(store, model="env_model", version="env_v") == {"train": [0], "val": [0]}
    assert_each_sample_once(store, "train", 0, model="env_model", version="env_v")
    assert_each_sample_once(store, "val", 0, model="env_model", version="env_v")


def test_callback_added_twice_warns_and_traces_once(store_dir):
    first, second = MLDebuggerCallback(MODEL, VERSION), MLDebuggerCallback(MODEL, VERSION)
    trainer = make_trainer([first, second], max_epochs=1)
    with pytest.warns(TraceWarning, match="more than once"):
        trainer.fit(DigitsMLP(), *digits_loaders())
    assert first.stats.rows_written == N_TRAIN + N_VAL and first.stats.duplicates_dropped == 0
    assert second.core is None
    assert_each_sample_once(store_dir, "train", 0)

    trainer = make_trainer([MLDebuggerCallback(MODEL, "v2"), MLDebuggerCallback(MODEL, "v2", strict=True)])
    with pytest.raises(MLDebuggerError, match="more than once"):
        trainer.fit(DigitsMLP(), *digits_loaders())


# -- bad input -----------------------------------------------------------------------------------
class CallsSubmodulesDirectly(DigitsMLP):
    """Never calls self(x): the LightningModule's forward hook sees nothing; the step returns a loss."""

    def _step(self, batch):
        return torch.nn.functional.cross_entropy(self.head(self.body(batch[0])), batch[1])


def test_no_recognizable_logits_strict_false_vs_true(store_dir):
    callback = MLDebuggerCallback(MODEL, VERSION)
    with pytest.warns(TraceWarning, match=r"logits_key='<key>'.*output_module="):
        make_trainer([callback], max_epochs=1).fit(CallsSubmodulesDirectly(), *digits_loaders())  # training goes on
    assert callback.stats.rows_skipped["no_logits"] == N_TRAIN + N_VAL
    assert callback.stats.rows_written == 0

    strict = MLDebuggerCallback(MODEL, "v2", strict=True)
    with pytest.raises(TraceInputError, match=r"no class scores .*logits_key="):
        make_trainer([strict], max_epochs=1).fit(CallsSubmodulesDirectly(), *digits_loaders())

    named = MLDebuggerCallback(MODEL, "v3", output_module="head", strict=True)  # the fix the message names
    make_trainer([named], max_epochs=1).fit(CallsSubmodulesDirectly(), *digits_loaders())
    assert_each_sample_once(store_dir, "train", 0, version="v3")


class IntegerPreds(DigitsMLP):
    def _step(self, batch):
        logits = self.head(self.body(batch[0]))
        return {"loss": torch.nn.functional.cross_entropy(logits, batch[1]), "preds": logits.argmax(1),
                "scores": logits}


def test_integer_preds_are_not_scores_and_logits_key_selects_the_key(store_dir):
    strict = MLDebuggerCallback(MODEL, VERSION, strict=True)
    with pytest.raises(TraceInputError, match=r"'preds' holds a int64 tensor"):
        make_trainer([strict], max_epochs=1).fit(IntegerPreds(), *digits_loaders())
    keyed = MLDebuggerCallback(MODEL, "v2", logits_key="scores", strict=True)
    model = IntegerPreds()
    make_trainer([keyed], max_epochs=1).fit(model, *digits_loaders())
    x, _, ids = DATA["val"]
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(stored_matrix(traces(store_dir, "val", 0, version="v2"), "logits", ids), expected,
                               rtol=1e-5, atol=1e-5)


class Detector(DigitsMLP):
    def validation_step(self, batch, batch_idx):
        logits = self(batch[0])
        return [{"boxes": torch.zeros(1, 4), "scores": scores.max(0, keepdim=True).values,
                 "labels": scores.argmax(0, keepdim=True)} for scores in logits]


def test_detection_outputs_point_to_the_detection_adapters(store_dir):
    callback = MLDebuggerCallback(MODEL, VERSION, mode="val")
    with pytest.warns(TraceWarning, match="ObjectDetectionTracer"):
        make_trainer([callback], max_epochs=1).fit(Detector(), *digits_loaders())
    assert callback.stats.rows_skipped["detection_outputs"] > 0
    with pytest.raises(TraceInputError, match="object detections .*ObjectDetectionTracer"):
        make_trainer([MLDebuggerCallback(MODEL, "v2", mode="val", strict=True)], max_epochs=1).fit(
            Detector(), *digits_loaders())


def test_batches_without_labels(store_dir):
    x, y, ids = DATA["val"]
    unlabelled = DataLoader(TensorDataset(torch.from_numpy(x)), batch_size=100)

    class PredictOnly(DigitsMLP):
        def validation_step(self, batch, batch_idx):
            return {"logits": self(batch[0])}

    callback = MLDebuggerCallback(MODEL, VERSION)
    with pytest.warns(TraceWarning, match="carry no labels .*batch_fn="):
        make_trainer([callback], max_epochs=1).fit(PredictOnly(), digits_loaders()[0], unlabelled)
    assert epochs_of(store_dir) == {"train": [0]}  # training traced; the unlabelled validation skipped
    assert callback.stats.rows_skipped["no_labels"] == N_VAL

    class DictBatches(torch.utils.data.Dataset):
        def __init__(self, keys):
            self.keys = keys

        def __len__(self):
            return N_VAL

        def __getitem__(self, i):
            return dict(zip(self.keys, (torch.from_numpy(x[i]), int(y[i]), int(ids[i]))))

    class DictSteps(DigitsMLP):
        def validation_step(self, batch, batch_idx):
            return {"logits": self(next(iter(batch.values())))}

    def dict_loader(keys):
        return DataLoader(DictBatches(keys), batch_size=64)

    # common keys are found without help; other keys need batch_fn
    standard = MLDebuggerCallback(MODEL, "v2", mode="val", strict=True)
    make_trainer([standard], max_epochs=1).fit(DictSteps(), digits_loaders()[0], dict_loader(("image", "label", "idx")))
    assert_each_sample_once(store_dir, "val", 0, version="v2")
    named = MLDebuggerCallback(MODEL, "v3", mode="val", strict=True,
                               batch_fn=lambda batch: (batch["pixels"], batch["digit"], batch["row"]))
    make_trainer([named], max_epochs=1).fit(DictSteps(), digits_loaders()[0], dict_loader(("pixels", "digit", "row")))
    assert_each_sample_once(store_dir, "val", 0, version="v3")


# -- inference: trainer.predict -------------------------------------------------------------------
class Predicts(DigitsMLP):
    """predict_step for every batch layout of the tests: a tensor, a tuple (x, ...), a dict."""

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        if isinstance(batch, dict):
            return self(batch["pixels"])
        return self(batch[0] if isinstance(batch, (tuple, list)) else batch)


def prebatched(batches: list) -> DataLoader:
    """A dataloader yielding the given batches as they are (a plain list would be many dataloaders)."""
    return DataLoader(batches, batch_size=None)


def test_predict_traces_without_labels_into_operation_and_the_evaluator_reads_them(store_dir):
    callback = MLDebuggerCallback(MODEL, VERSION)
    trainer = make_trainer([callback], max_epochs=2)
    model = Predicts()
    trainer.fit(model, *digits_loaders())
    x_new = DATA["val"][0]  # held out from training; predicted without labels (x alone)
    predictions = trainer.predict(model, DataLoader(torch.from_numpy(x_new), batch_size=100))
    logits = torch.cat(predictions).numpy()
    # durable when predict returns, at the epoch of the weights used (the last of the fit)
    assert epochs_of(store_dir) == {"operation": [1], "train": [0, 1], "val": [0, 1]}
    rows = traces(store_dir, "operation", 1)
    assert len(rows) == N_VAL and rows["label"].isna().all() and rows["logged_at"].notna().all()
    assert sorted(rows["input_id"]) == sorted(row_hashes(x_new))  # no ids: the content hash, as in every loop
    with torch.no_grad():
        features = model.body(torch.from_numpy(x_new)).numpy()
    by_hash = dict(zip(row_hashes(x_new), range(N_VAL)))
    order = [by_hash[i] for i in rows["input_id"]]
    np.testing.assert_allclose(np.stack(rows["features"].map(np.asarray)), features[order], rtol=2e-3, atol=2e-3)

    unlabelled = Evaluator(MODEL, VERSION).request_evaluation().unlabelled()
    assert len(unlabelled) == N_VAL and set(unlabelled["dataset_type"]) == {"operation"}
    expected_pred = dict(zip(row_hashes(x_new), logits.argmax(1)))
    assert all(expected_pred[i] == p for i, p in zip(unlabelled["input_id"], unlabelled["pred"]))


def test_predict_batch_layouts_names_and_mode(store_dir):
    x, y, ids = DATA["val"]
    model = Predicts()
    make_trainer([MLDebuggerCallback(MODEL, VERSION)], max_epochs=1).fit(model, *digits_loaders())
    string_ids = [f"req-{i}" for i in ids]

    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return N_VAL

        def __getitem__(self, i):
            return torch.from_numpy(x[i]), string_ids[i]

    # (x, string ids): ids; renamed with dataset_types; a new Trainer without fit records at epoch 0
    callback = MLDebuggerCallback(MODEL, "v2", dataset_types={"predict": "pool"}, strict=True)
    make_trainer([callback], max_epochs=1).predict(model, DataLoader(Pairs(), batch_size=64))
    rows = traces(store_dir, "pool", 0, version="v2")
    assert sorted(rows["input_id"]) == sorted(string_ids) and rows["label"].isna().all()
    # the test loader (x, y, ids) predicts too: its labels are traced
    callback = MLDebuggerCallback(MODEL, "v3", strict=True)
    make_trainer([callback], max_epochs=1).predict(model, digits_loaders()[1])
    rows = traces(store_dir, "operation", 0, version="v3")
    assert sorted(rows["input_id"]) == sorted(str(i) for i in ids)
    assert dict(zip(rows["input_id"], rows["label"])) == dict(zip(ids.astype(str), y))
    # dict batches: integer ids without labels
    dicts = [{"pixels": torch.from_numpy(x[i:i + 50]), "id": torch.from_numpy(ids[i:i + 50])}
             for i in range(0, N_VAL, 50)]
    make_trainer([MLDebuggerCallback(MODEL, "v4", strict=True)], max_epochs=1).predict(model, prebatched(dicts))
    rows = traces(store_dir, "operation", 0, version="v4")
    assert sorted(rows["input_id"]) == sorted(str(i) for i in ids) and rows["label"].isna().all()
    # (x,) batches of a TensorDataset: no labels, no ids: content hashes
    make_trainer([MLDebuggerCallback(MODEL, "v6", strict=True)], max_epochs=1).predict(
        model, DataLoader(TensorDataset(torch.from_numpy(x)), batch_size=64))
    rows = traces(store_dir, "operation", 0, version="v6")
    assert sorted(rows["input_id"]) == sorted(row_hashes(x)) and rows["label"].isna().all()
    # mode="!predict": nothing traced
    make_trainer([MLDebuggerCallback(MODEL, "v5", mode="!predict")], max_epochs=1).predict(model, prebatched(dicts))
    assert epochs_of(store_dir, version="v5") == {}


def test_predict_batches_without_ids_or_hashable_inputs_and_ambiguous_pairs(store_dir):
    x = DATA["val"][0]
    model = Predicts()
    # inputs that cannot be hashed (a list of strings under "x") and no ids
    unhashable = prebatched([{"x": [f"t{j}" for j in range(i, i + 50)], "pixels": torch.from_numpy(x[i:i + 50])}
                             for i in range(0, N_VAL, 50)])
    callback = MLDebuggerCallback(MODEL, VERSION)
    with pytest.warns(TraceWarning, match="no sample ids and no array inputs.*batch_fn="):
        predictions = make_trainer([callback], max_epochs=1).predict(model, unhashable)
    assert len(predictions) == len(unhashable)  # inference went on
    assert callback.stats.rows_skipped["no_ids"] == N_VAL and epochs_of(store_dir) == {}
    with pytest.raises(TraceInputError, match="no sample ids .*'id'"):
        make_trainer([MLDebuggerCallback(MODEL, VERSION, strict=True)], max_epochs=1).predict(model, unhashable)

    # (x, float tensor): neither labels nor ids
    floats = prebatched([(torch.from_numpy(x[i:i + 50]), torch.rand(50)) for i in range(0, N_VAL, 50)])
    callback = MLDebuggerCallback(MODEL, "v2")
    with pytest.warns(TraceWarning, match="neither class labels nor sample ids"):
        make_trainer([callback], max_epochs=1).predict(model, floats)
    assert callback.stats.rows_skipped["invalid_batch"] == N_VAL
    with pytest.raises(TraceInputError, match="neither class labels nor sample ids.*batch_fn="):
        make_trainer([MLDebuggerCallback(MODEL, "v2", strict=True)], max_epochs=1).predict(model, floats)
    # batch_fn names the parts: the same batches traced, float column ignored
    named = MLDebuggerCallback(MODEL, "v3", strict=True, batch_fn=lambda batch: (batch[0], None, None))
    make_trainer([named], max_epochs=1).predict(model, floats)
    assert len(traces(store_dir, "operation", 0, version="v3")) == N_VAL


class HalfOutputs(DigitsMLP):
    """A module that casts its scores to float16."""

    def forward(self, x):
        return super().forward(x).half()


def test_bf16_true_precision_and_fp16_outputs(store_dir):
    model = DigitsMLP()
    make_trainer([MLDebuggerCallback(MODEL, VERSION)], max_epochs=1, precision="bf16-true").fit(
        model, *digits_loaders())
    x, _, ids = DATA["val"]
    with torch.no_grad():
        expected = model(torch.from_numpy(x).to(torch.bfloat16)).float().numpy()
    rows = traces(store_dir, "val", 0)
    np.testing.assert_allclose(stored_matrix(rows, "logits", ids), expected, rtol=1e-6, atol=1e-6)
    assert_each_sample_once(store_dir, "train", 0)
    assert stored_matrix(rows, "features", ids).shape == (N_VAL, 16)

    half = HalfOutputs()
    make_trainer([MLDebuggerCallback(MODEL, "v2", strict=True)], max_epochs=1).fit(half, *digits_loaders())
    with torch.no_grad():
        expected = half(torch.from_numpy(x)).float().numpy()
    np.testing.assert_allclose(stored_matrix(traces(store_dir, "val", 0, version="v2"), "logits", ids), expected,
                               rtol=1e-6, atol=1e-6)


# -- the example ---------------------------------------------------------------------------------
def test_lightning_example_runs(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "lightning_classification.py"), "--epochs", "2",
                           "--store", str(tmp_path / "store")], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    header = lines[0].split()
    assert header[:3] == ["dataset", "counts", "accuracy"]
    rows = {line.split()[0]: line.split() for line in lines[1:3]}
    assert rows["train"][1] == str(N_TRAIN) and rows["val"][1] == str(N_VAL)
    assert float(rows["val"][2]) > 0.8
    assert (tmp_path / "store" / "digits_mlp_lightning" / "v1" / "label_tracker_train_loss.png").is_file()
