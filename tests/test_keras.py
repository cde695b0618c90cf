"""MLDebuggerCallback in real ``model.fit`` runs (Keras 3, torch backend, scikit-learn digits, CPU).

Stored rows are read back with plain pyarrow from the committed parts and compared with references
taken independently of the callback: ``model.predict`` on the same arrays and a separately built
``keras.Model(model.inputs, model.layers[-1].input)``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

if os.environ.get("KERAS_BACKEND", "torch") != "torch":
    pytest.skip("these tests run Keras on the torch backend", allow_module_level=True)
keras = pytest.importorskip("keras")
torch = pytest.importorskip("torch")

from mldbg_callbacks.core.trace_core import TraceWarning  # noqa: E402
from mldbg_callbacks.errors import TraceInputError  # noqa: E402
from mldbg_callbacks.evaluator import Evaluator  # noqa: E402
from mldbg_callbacks.integrations.keras import MLDebuggerCallback  # noqa: E402
from mldbg_callbacks.core.vectors import decoded_rows

ROOT = Path(__file__).resolve().parents[1]
MODEL, VERSION = "digits", "v1"


# -- fixtures ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    """A fixed 500/197 split of scikit-learn's digits (small enough for fast fits)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))[:697]
    return x[order[:500]], y[order[:500]], x[order[500:]], y[order[500:]]


def sequential(softmax: bool = True):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(32, activation="relu", name="hidden1"),
        keras.layers.Dense(16, activation="relu", name="hidden2"),
        keras.layers.Dense(10, activation="softmax" if softmax else None, name="head"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=not softmax))
    return model


def functional():
    keras.utils.set_random_seed(1)
    inputs = keras.Input((64,), name="pixels")
    hidden = keras.layers.Dense(24, activation="relu", name="body")(inputs)
    hidden = keras.layers.Dropout(0.2)(hidden)
    logits = keras.layers.Dense(10, name="head")(hidden)
    model = keras.Model(inputs, logits)
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


# -- reading the store (plain pyarrow, independent of the package's reader) --------------------------
def partitions(root, version=VERSION) -> dict:
    """{(dataset_type, n_epoch): [rows...]} of every committed part, duplicates kept."""
    found: dict = {}
    base = Path(root) / MODEL / version / "traces"
    for marker in sorted(base.glob("dataset_type=*/n_epoch=*/rank=*/_COMMITTED")):
        key = (marker.parent.parent.parent.name.split("=")[1], int(marker.parent.parent.name.split("=")[1]))
        for part in json.loads(marker.read_text())["parts"]:
            found.setdefault(key, []).extend(decoded_rows(pq.read_table(marker.parent / part)))
    return found


def epochs_of(found: dict, dataset_type: str) -> list[int]:
    return sorted(epoch for name, epoch in found if name == dataset_type)


def column(rows: list, name: str, ids) -> np.ndarray:
    by_id = {row["input_id"]: row for row in rows}
    return np.stack([np.asarray(by_id[str(i)][name], np.float32) for i in ids])


def assert_each_sample_once(rows: list, expected_ids) -> None:
    ids = [row["input_id"] for row in rows]
    assert len(ids) == len(set(ids)), "a sample was stored twice in one epoch"
    assert sorted(ids) == sorted(str(i) for i in expected_ids)


# -- the main path -----------------------------------------------------------------------------------
def test_every_sample_once_per_epoch_and_values_equal_independent_references(store_dir, digits):
    x_tr, y_tr, x_va, y_va = digits
    model = sequential(softmax=True)
    callback = MLDebuggerCallback(MODEL, VERSION, data={"train": (x_tr, y_tr), "val": (x_va, y_va)},
                                  batch_size=96)  # 500 = 5 * 96 + 20: a short last batch
    model.fit(x_tr, y_tr, batch_size=64, epochs=3, verbose=0, validation_data=(x_va, y_va), callbacks=[callback])

    found = partitions(store_dir)
    assert epochs_of(found, "train") == [0, 1, 2] and epochs_of(found, "val") == [0, 1, 2]
    for epoch in range(3):
        assert_each_sample_once(found[("train", epoch)], range(len(y_tr)))
        assert_each_sample_once(found[("val", epoch)], range(len(y_va)))
    assert callback.stats.total_skipped == 0 and callback.stats.duplicates_dropped == 0
    meta = json.loads((Path(store_dir) / MODEL / VERSION / "_meta.json").read_text())
    assert meta["output_kind"] == "probs" and meta["num_classes"] == 10 and meta["feature_dim"] == 16

    # the last epoch was traced with the final weights: compare with references built separately
    last = found[("val", 2)]
    np.testing.assert_allclose(column(last, "probs", range(len(y_va))), model.predict(x_va, verbose=0),
                               rtol=1e-5, atol=1e-6)
    reference_features = keras.Model(model.inputs, model.layers[-1].input).predict(x_va, verbose=0)
    np.testing.assert_allclose(column(last, "features", range(len(y_va))),
                               reference_features.astype(np.float16).astype(np.float32), rtol=1e-3, atol=1e-3)
    assert [row["label"] for row in sorted(last, key=lambda r: int(r["input_id"]))] == y_va.tolist()
    # an earlier epoch differs (weights moved), so the pass really ran at every epoch's end
    assert not np.allclose(column(found[("val", 0)], "probs", range(len(y_va))), model.predict(x_va, verbose=0))


def test_functional_logits_named_feature_layer_and_own_ids(store_dir, digits):
    x_tr, y_tr, x_va, y_va = digits
    model = functional()
    ids = np.array([f"val-{i:03d}" for i in range(len(y_va))])
    callback = MLDebuggerCallback(MODEL, VERSION, data={"val": (x_va, y_va, ids)}, feature_layer="body",
                                  label_tracker=False)
    model.fit(x_tr, y_tr, epochs=2, verbose=0, callbacks=[callback])

    rows = partitions(store_dir)[("val", 1)]
    assert_each_sample_once(rows, ids)
    by_id = {row["input_id"]: row for row in rows}
    stored_logits = np.stack([by_id[i]["logits"] for i in ids])
    np.testing.assert_allclose(stored_logits, model.predict(x_va, verbose=0), rtol=1e-5, atol=1e-5)
    body = keras.Model(model.inputs, model.get_layer("body").output).predict(x_va, verbose=0)
    np.testing.assert_allclose(np.stack([by_id[i]["features"] for i in ids]).astype(np.float32),
                               body.astype(np.float16).astype(np.float32), rtol=1e-3, atol=1e-3)
    assert not list((Path(store_dir) / MODEL / VERSION).glob("*.png"))  # label_tracker=False


def test_every_n_epochs_follows_keras_validation_freq(store_dir, digits):
    x_tr, y_tr, _, _ = digits
    callback = MLDebuggerCallback(MODEL, VERSION, data={"train": (x_tr, y_tr)}, every_n_epochs=2, label_tracker=False)
    sequential().fit(x_tr, y_tr, epochs=4, verbose=0, callbacks=[callback])
    found = partitions(store_dir)
    assert epochs_of(found, "train") == [1, 3]  # (epoch + 1) % 2 == 0, as validation_freq=2
    assert sorted(callback.pass_seconds) == [1, 3]


class DigitsBatches(keras.utils.PyDataset):
    """(x, y) or (x, y, ids) batches in a fixed order; the last batch is shorter."""

    def __init__(self, x, y, batch_size, ids=None, labels=True, fail_at=None):
        super().__init__()
        self.x, self.y, self.ids, self.batch_size, self.labels, self.fail_at = x, y, ids, batch_size, labels, fail_at

    def __len__(self):
        return -(-len(self.x) // self.batch_size)

    def __getitem__(self, index):
        if index == self.fail_at:
            raise OSError("the data source failed")
        cut = slice(index * self.batch_size, (index + 1) * self.batch_size)
        if not self.labels:
            return (self.x[cut],)
        return (self.x[cut], self.y[cut]) if self.ids is None else (self.x[cut], self.y[cut], self.ids[cut])


def test_pydataset_sources_positions_and_ids(store_dir, digits):
    x_tr, y_tr, x_va, y_va = digits
    val_ids = np.arange(1000, 1000 + len(y_va))
    callback = MLDebuggerCallback(MODEL, VERSION, data={"train": DigitsBatches(x_tr, y_tr, 64),
                                                        "val": DigitsBatches(x_va, y_va, 50, ids=val_ids)},
                                  label_tracker=False)
    model = sequential()
    model.fit(DigitsBatches(x_tr, y_tr, 64), epochs=2, verbose=0, callbacks=[callback])
    found = partitions(store_dir)
    for epoch in (0, 1):
        assert_each_sample_once(found[("train", epoch)], range(len(y_tr)))
        assert_each_sample_once(found[("val", epoch)], val_ids)
    np.testing.assert_allclose(column(found[("val", 1)], "probs", val_ids), model.predict(x_va, verbose=0),
                               rtol=1e-5, atol=1e-6)


def test_pydataset_sample_weights_are_not_taken_for_ids(store_dir, digits):
    x_tr, y_tr, _, _ = digits
    weights = np.ones(len(y_tr), np.float32)  # Keras' (x, y, sample_weight)
    callback = MLDebuggerCallback(MODEL, VERSION, data={"train": DigitsBatches(x_tr, y_tr, 64, ids=weights)},
                                  label_tracker=False)
    sequential().fit(x_tr, y_tr, epochs=1, verbose=0, callbacks=[callback])
    assert_each_sample_once(partitions(store_dir)[("train", 0)], range(len(y_tr)))


def test_torch_dataloaders_with_and_without_ids(store_dir, digits):
    from torch.utils.data import DataLoader, TensorDataset

    x_tr, y_tr, x_va, y_va = digits
    ids = torch.arange(5000, 5000 + len(y_tr))
    shuffled = DataLoader(TensorDataset(torch.from_numpy(x_tr), torch.from_numpy(y_tr), ids), batch_size=64,
                          shuffle=True, generator=torch.Generator().manual_seed(0))
    ordered = DataLoader(TensorDataset(torch.from_numpy(x_va), torch.from_numpy(y_va)), batch_size=64)
    model = sequential()
    callback = MLDebuggerCallback(MODEL, VERSION, data={"train": shuffled, "val": ordered}, label_tracker=False)
    model.fit(x_tr, y_tr, epochs=2, verbose=0, callbacks=[callback])
    found = partitions(store_dir)
    for epoch in (0, 1):
        assert_each_sample_once(found[("train", epoch)], ids.tolist())
        assert_each_sample_once(found[("val", epoch)], range(len(y_va)))
    # shuffled order, own ids: each id still carries its own sample's scores
    np.testing.assert_allclose(column(found[("train", 1)], "probs", ids.tolist()), model.predict(x_tr, verbose=0),
                               rtol=1e-5, atol=1e-6)


def test_shuffled_dataloader_without_ids_is_not_traced(store_dir, digits):
    from torch.utils.data import DataLoader, TensorDataset

    x_tr, y_tr, x_va, y_va = digits
    shuffled = DataLoader(TensorDataset(torch.from_numpy(x_tr), torch.from_numpy(y_tr)), batch_size=64, shuffle=True)
    callback = MLDebuggerCallback(MODEL, VERSION, data={"train": shuffled, "val": (x_va, y_va)}, label_tracker=False)
    with pytest.warns(TraceWarning, match="shuffling DataLoader that yields no ids"):
        sequential().fit(x_tr, y_tr, epochs=2, verbose=0, callbacks=[callback])
    found = partitions(store_dir)
    assert epochs_of(found, "train") == [] and epochs_of(found, "val") == [0, 1]
    assert callback.failures["unstable_ids"] == 2

    strict = MLDebuggerCallback(MODEL, "strict", data={"train": shuffled}, strict=True)
    with pytest.raises(TraceInputError, match=r"yield \(x, y, ids\)"):
        sequential().fit(x_tr, y_tr, epochs=1, verbose=0, callbacks=[strict])


def test_resume_with_initial_epoch_gives_each_epoch_once(store_dir, digits, tmp_path):
    x_tr, y_tr, x_va, y_va = digits
    data = {"train": (x_tr, y_tr), "val": (x_va, y_va)}
    model = sequential()
    model.fit(x_tr, y_tr, epochs=2, verbose=0, callbacks=[MLDebuggerCallback(MODEL, VERSION, data=data)])
    checkpoint = tmp_path / "after_epoch_1.keras"
    model.save(checkpoint)

    # a new process would do exactly this: load the checkpoint, a new callback, continue at epoch 2
    resumed = keras.models.load_model(checkpoint)
    callback = MLDebuggerCallback(MODEL, VERSION, data=data)
    resumed.fit(x_tr, y_tr, epochs=4, initial_epoch=2, verbose=0, callbacks=[callback])
    found = partitions(store_dir)
    assert epochs_of(found, "train") == [0, 1, 2, 3] and epochs_of(found, "val") == [0, 1, 2, 3]
    for (name, _), rows in found.items():
        assert_each_sample_once(rows, range(len(y_tr) if name == "train" else len(y_va)))
    png = Path(store_dir) / MODEL / VERSION / "label_tracker_train_loss.png"
    assert callback.label_tracker_path == png and png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    summary = Evaluator(MODEL, VERSION).request_evaluation().metrics_summary()
    counts = dict(zip(summary["dataset"], summary["counts"]))
    assert counts == {"train": len(y_tr), "val": len(y_va)}
    assert float(summary.set_index("dataset").loc["val", "accuracy"]) > 0.5


# -- inference ---------------------------------------------------------------------------------------
def held_out_digits(n: int = 200) -> np.ndarray:
    """Digits the fixture's 697 do not use (same permutation), for predictions without labels."""
    from sklearn.datasets import load_digits

    x = (load_digits().data / 16.0).astype(np.float32)
    return x[np.random.default_rng(0).permutation(len(x))[697:697 + n]]


def test_predictions_without_labels_are_traced_into_operation(store_dir, digits):
    x_tr, y_tr, x_va, y_va = digits
    x_new = held_out_digits()
    callback = MLDebuggerCallback(MODEL, VERSION, data={"train": (x_tr, y_tr), "val": (x_va, y_va)})
    model = sequential()
    model.fit(x_tr, y_tr, epochs=3, batch_size=64, verbose=0, callbacks=[callback])
    penultimate = keras.Model(model.inputs, model.layers[-1].input)  # independent of the callback
    # Keras' own predict: outputs from on_predict_batch_end, features from the same forward (torch backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TraceWarning)
        probs = model.predict(x_new[:120], batch_size=50, verbose=0, callbacks=[callback])
    generated = list(callback.predicted_ids)
    # the helper: the callback's sub-model pass, the caller's ids
    own_ids = [f"req-{i}" for i in range(120, 200)]
    scores = callback.trace_predictions(x_new[120:], input_ids=own_ids)
    np.testing.assert_allclose(scores, model.predict(x_new[120:], verbose=0), rtol=1e-5, atol=1e-6)

    found = partitions(store_dir)  # durable when the calls returned, at the epoch of the weights (2)
    assert sorted(key for key in found if key[0] == "operation") == [("operation", 2)]
    rows = found[("operation", 2)]
    assert_each_sample_once(rows, generated + own_ids)
    assert len(set(generated)) == 120 and all(row["label"] is None and row["logged_at"] is not None for row in rows)
    expected_probs = np.concatenate([probs, scores])
    np.testing.assert_allclose(column(rows, "probs", generated + own_ids), expected_probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(column(rows, "features", generated + own_ids),
                               penultimate.predict(x_new, verbose=0), rtol=2e-3, atol=2e-3)  # float16

    unlabelled = Evaluator(MODEL, VERSION).request_evaluation().unlabelled()
    assert len(unlabelled) == 200 and set(unlabelled["dataset_type"]) == {"operation"}
    expected_pred = dict(zip(generated + own_ids, expected_probs.argmax(1)))
    assert all(expected_pred[i] == p for i, p in zip(unlabelled["input_id"], unlabelled["pred"]))


def test_inference_only_callback_names_and_bad_ids(store_dir, digits):
    x_tr, y_tr, _, _ = digits
    model = sequential()
    model.fit(x_tr, y_tr, epochs=1, verbose=0)
    callback = MLDebuggerCallback(MODEL, VERSION, predict_dataset_type="pool")  # no data: inference only
    with pytest.raises(RuntimeError, match="set_model"):
        callback.trace_predictions(x_tr[:10])
    callback.set_model(model)
    with pytest.raises(ValueError, match="one id per sample"):
        callback.trace_predictions(x_tr[:10], input_ids=np.arange(9))
    callback.trace_predictions(x_tr[:10], input_ids=np.arange(10))
    model.predict(x_tr[10:30], verbose=0, callbacks=[callback])
    assert sorted(partitions(store_dir)) == [("pool", 0)]  # no fit with this callback: epoch 0
    assert len(partitions(store_dir)[("pool", 0)]) == 30 and len(callback.predicted_ids) == 20
    # predictions that are not class scores: warned once, counted, predict goes on; strict raises
    detector = detection_model()
    callback = MLDebuggerCallback(MODEL, "v2")
    with pytest.warns(TraceWarning, match="ObjectDetectionTracer"):
        detector.predict(x_tr[:20], verbose=0, callbacks=[callback])
    assert callback.failures["prediction_failed"] == 1
    with pytest.raises(TraceInputError, match="ObjectDetectionTracer"):
        detector.predict(x_tr[:20], verbose=0, callbacks=[MLDebuggerCallback(MODEL, "v3", strict=True)])


# -- bad input ---------------------------------------------------------------------------------------
def test_data_without_labels_is_refused_at_construction(digits):
    x_tr, y_tr, _, _ = digits
    with pytest.raises(TypeError, match=r"inputs without labels; pass \(x, y\)"):
        MLDebuggerCallback(MODEL, VERSION, data={"train": x_tr})
    with pytest.raises(TypeError, match="labels are missing"):
        MLDebuggerCallback(MODEL, VERSION, data={"train": (x_tr,)})
    with pytest.raises(ValueError, match="y has 499 entries but x has 500 rows"):
        MLDebuggerCallback(MODEL, VERSION, data={"train": (x_tr, y_tr[:-1])})
    with pytest.raises(TypeError, match="cannot be read again every epoch"):
        MLDebuggerCallback(MODEL, VERSION, data={"train": iter([(x_tr, y_tr)])})
    with pytest.raises(ValueError, match="every_n_epochs"):
        MLDebuggerCallback(MODEL, VERSION, data={"train": (x_tr, y_tr)}, every_n_epochs=0)


def test_batches_without_labels_warn_once_and_count(store_dir, digits):
    x_tr, y_tr, x_va, y_va = digits
    callback = MLDebuggerCallback(MODEL, VERSION, data={"train": DigitsBatches(x_tr, y_tr, 64, labels=False),
                                                        "val": (x_va, y_va)})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = sequential().fit(x_tr, y_tr, epochs=2, verbose=0, callbacks=[callback])
    assert len(history.history["loss"]) == 2  # fit went on
    messages = [str(w.message) for w in caught if "no_labels" in str(w.message)]
    assert len(messages) == 1 and "(x, y) or (x, y, ids)" in messages[0]
    assert callback.stats.rows_skipped["no_labels"] == 2 * len(y_tr)
    assert epochs_of(partitions(store_dir), "val") == [0, 1]

    strict = MLDebuggerCallback(MODEL, "strict", data={"train": DigitsBatches(x_tr, y_tr, 64, labels=False)},
                                strict=True)
    with pytest.raises(TraceInputError, match="without labels"):
        sequential().fit(x_tr, y_tr, epochs=1, verbose=0, callbacks=[strict])


def test_failing_data_source_never_breaks_fit_unless_strict(store_dir, digits):
    x_tr, y_tr, _, _ = digits
    callback = MLDebuggerCallback(MODEL, VERSION, data={"train": DigitsBatches(x_tr, y_tr, 64, fail_at=2)})
    with pytest.warns(TraceWarning, match="the data source failed"):
        history = sequential().fit(x_tr, y_tr, epochs=3, verbose=0, callbacks=[callback])
    assert len(history.history["loss"]) == 3 and callback.failures["prediction_failed"] == 3
    found = partitions(store_dir)  # the two batches read before the failure are committed each epoch
    assert epochs_of(found, "train") == [0, 1, 2]
    assert all(len(found[("train", epoch)]) == 128 for epoch in range(3))
    strict = MLDebuggerCallback(MODEL, "strict", data={"train": DigitsBatches(x_tr, y_tr, 64, fail_at=2)},
                                strict=True)
    with pytest.raises(OSError, match="the data source failed"):
        sequential().fit(x_tr, y_tr, epochs=1, verbose=0, callbacks=[strict])


def test_callback_added_twice_traces_once(store_dir, digits):
    x_tr, y_tr, _, _ = digits
    callback = MLDebuggerCallback(MODEL, VERSION, data={"train": (x_tr, y_tr)}, label_tracker=False)
    with pytest.warns(TraceWarning, match="in the callbacks list twice"):
        sequential().fit(x_tr, y_tr, epochs=2, verbose=0, callbacks=[callback, callback])
    other = MLDebuggerCallback(MODEL, "two", data={"train": (x_tr, y_tr)}, label_tracker=False)
    twin = MLDebuggerCallback(MODEL, "two", data={"train": (x_tr, y_tr)}, label_tracker=False)
    with pytest.warns(TraceWarning, match="this one does nothing"):
        sequential().fit(x_tr, y_tr, epochs=2, verbose=0, callbacks=[other, twin])
    for version, tracer in ((VERSION, callback), ("two", other)):
        found = partitions(store_dir, version)
        assert epochs_of(found, "train") == [0, 1]
        for epoch in (0, 1):
            assert_each_sample_once(found[("train", epoch)], range(len(y_tr)))
        assert tracer.stats.duplicates_dropped == 0
    assert twin.stats.rows_received == 0

    # the same callback in a later fit works again (a duplicate is about one fit, not forever)
    again = sequential()
    again.fit(x_tr, y_tr, epochs=3, initial_epoch=2, verbose=0, callbacks=[callback])
    assert epochs_of(partitions(store_dir), "train") == [0, 1, 2]


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_outputs(store_dir, digits, policy):
    x_tr, y_tr, x_va, y_va = digits
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = sequential(softmax=False)
        assert model.layers[-1].compute_dtype in ("bfloat16", "float16")
        callback = MLDebuggerCallback(MODEL, VERSION, data={"val": (x_va, y_va)}, label_tracker=False)
        model.fit(x_tr, y_tr, epochs=2, verbose=0, callbacks=[callback])
        expected = model.predict(x_va, verbose=0).astype(np.float32)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    rows = partitions(store_dir)[("val", 1)]
    assert_each_sample_once(rows, range(len(y_va)))
    np.testing.assert_array_equal(column(rows, "logits", range(len(y_va))), expected)  # widened exactly
    assert callback.stats.total_skipped == 0


def detection_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((64,))
    hidden = keras.layers.Dense(16, activation="relu")(inputs)
    model = keras.Model(inputs, {"boxes": keras.layers.Dense(4, name="boxes")(hidden),
                                 "scores": keras.layers.Dense(1, activation="sigmoid", name="scores")(hidden)})
    model.compile(optimizer="adam", loss={"boxes": "mse", "scores": "binary_crossentropy"})
    return model


def test_detection_model_points_to_the_detection_tracer(store_dir, digits):
    x_tr, y_tr, _, _ = digits
    targets = {"boxes": np.zeros((len(x_tr), 4), np.float32), "scores": np.ones((len(x_tr), 1), np.float32)}
    callback = MLDebuggerCallback(MODEL, VERSION, data={"train": (x_tr, y_tr)})
    with pytest.warns(TraceWarning, match="ObjectDetectionTracer"):
        history = detection_model().fit(x_tr, targets, epochs=2, verbose=0, callbacks=[callback])
    assert len(history.history["loss"]) == 2 and callback.stats.rows_received == 0
    assert not (Path(store_dir) / MODEL).exists()

    strict = MLDebuggerCallback(MODEL, VERSION, data={"train": (x_tr, y_tr)}, strict=True)
    with pytest.raises(TraceInputError, match="looks like object detection.*ObjectDetectionTracer"):
        detection_model().fit(x_tr, targets, epochs=1, verbose=0, callbacks=[strict])


class SubclassedMLP(keras.Model):
    def __init__(self):
        super().__init__()
        self.body = keras.layers.Dense(20, activation="relu")
        self.head = keras.layers.Dense(10)

    def call(self, x):
        return self.head(self.body(x))


def test_subclassed_model_falls_back_to_eager_capture(store_dir, digits):
    x_tr, y_tr, x_va, y_va = digits
    keras.utils.set_random_seed(0)
    model = SubclassedMLP()
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    callback = MLDebuggerCallback(MODEL, VERSION, data={"val": (x_va, y_va)}, label_tracker=False)
    with pytest.warns(UserWarning, match="calls it eagerly"):
        model.fit(x_tr, y_tr, epochs=2, verbose=0, callbacks=[callback])
    rows = partitions(store_dir)[("val", 1)]
    assert_each_sample_once(rows, range(len(y_va)))
    np.testing.assert_allclose(column(rows, "logits", range(len(y_va))), model.predict(x_va, verbose=0),
                               rtol=1e-5, atol=1e-5)
    features = keras.ops.convert_to_numpy(model.body(x_va))  # the input of the last Dense, computed by hand
    np.testing.assert_allclose(column(rows, "features", range(len(y_va))),
                               features.astype(np.float16).astype(np.float32), rtol=1e-3, atol=1e-3)
    assert "call" not in vars(model.head)  # the wrap is removed after each pass


def test_importing_the_package_imports_no_framework():
    code = ("import sys, mldbg_callbacks, mldbg_callbacks.integrations, mldbg_callbacks.training\n"
            "print(sorted(m for m in ('keras', 'torch', 'tensorflow', 'jax') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_keras_example_runs_offline(tmp_path):
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("KERAS_BACKEND", None)  # the example sets it itself
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "keras_classification.py"), "--epochs", "3",
                           "--store", str(tmp_path / "store")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    header_at = next(i for i, line in enumerate(lines) if line.split()[:2] == ["dataset", "counts"])
    rows = {line.split()[0]: line.split() for line in lines[header_at + 1:header_at + 3]}
    assert rows["train"][1] == "1347" and rows["val"][1] == "450"
    assert float(rows["val"][2]) > 0.8
    assert list((tmp_path / "store").rglob("label_tracker_train_loss.png"))
