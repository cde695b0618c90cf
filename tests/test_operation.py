"""Tracing without labels, label-free evaluation, operation-time monitoring (drift) and InferenceLogger.

Real components throughout: a torch MLP trained on scikit-learn's digits, the tracing core, Parquet files,
and for the remote path a real `mldbg serve` process on loopback.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import threading
import time

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pytest
import torch
from scipy.stats import ks_2samp

from digits_mlp import MODEL, VERSION, digits_splits, train_mlp
from server_utils import running_server
from mldbg_callbacks.cli import main as mldbg
from mldbg_callbacks.core.trace_core import TraceWarning
from mldbg_callbacks.errors import InvalidNameError, NoReferenceError
from mldbg_callbacks.evaluation.monitoring import PSI_DRIFT
from mldbg_callbacks.evaluation.pipeline import evaluate_classification
from mldbg_callbacks.evaluator import Evaluator
from mldbg_callbacks.operation import InferenceLogger
from mldbg_callbacks.store import LocalStore
from mldbg_callbacks.store.local import RunWriter
from mldbg_callbacks.store.remote import RemoteStore
from mldbg_callbacks.training import ClassificationTracer, DetectionTracer


@pytest.fixture(scope="module")
def digits():
    splits = digits_splits()
    return splits, train_mlp(*splits["train"][:2])


def _trace(tracer, x, y, ids, dataset_type, **kwargs):
    with torch.no_grad():
        tracer(torch.from_numpy(x), None if y is None else torch.from_numpy(y), input_ids=ids,
               dataset_type=dataset_type, **kwargs)


# -- tracing -------------------------------------------------------------------------------------------
def test_rows_traced_without_labels_have_a_null_label_and_a_utc_time(store_dir, digits):
    splits, model = digits
    x, y, ids = splits["pool"]
    before = pd.Timestamp.now(tz="UTC").floor("us")
    with ClassificationTracer(model, MODEL, VERSION, store=store_dir) as tracer:
        _trace(tracer, x[:64], None, ids[:64], "pool")
        _trace(tracer, x[:64], y[:64], ids[:64], "train")
        tracer.wait_for_save()
        assert tracer.stats.rows_written == 128 and not tracer.stats.rows_skipped
    after = pd.Timestamp.now(tz="UTC")
    # what any Parquet reader sees (the commit markers are `_`-prefixed, so pyarrow skips them)
    pool = ds.dataset(store_dir / MODEL / VERSION / "traces" / "dataset_type=pool", partitioning="hive").to_table()
    assert pool.num_rows == 64 and pool.column("label").null_count == 64
    assert str(pool.schema.field("logged_at").type) == "timestamp[us, tz=UTC]"
    logged = pool.column("logged_at").to_pandas()
    assert ((logged >= before) & (logged <= after)).all()
    train = LocalStore(store_dir).read_traces(MODEL, VERSION, "train", [0])
    assert "logged_at" not in train.column_names  # labelled traces keep the schema of existing stores
    assert train.column("label").null_count == 0


def test_a_naive_logged_at_is_refused_with_the_fix(store_dir, digits):
    splits, model = digits
    x, _, ids = splits["pool"]
    tracer = ClassificationTracer(model, MODEL, VERSION, store=store_dir, strict=True)
    with pytest.raises(ValueError, match="timezone-aware"):
        tracer.record(model(torch.from_numpy(x[:4])), None, input_ids=ids[:4], logged_at=dt.datetime(2026, 1, 1))
    tracer.close()


def test_top_k_storage_without_labels_keeps_the_prediction(store_dir):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(400, 8)).astype(np.float32)
    weights = rng.normal(size=(8, 12)).astype(np.float32)
    logits = features @ weights
    labels = logits.argmax(1)
    labels[:40] = (labels[:40] + 1) % 12  # some training errors, so error_proba is fitted
    tracer = ClassificationTracer(lambda v: v, MODEL, VERSION, store=store_dir, feature_layer=False,
                                  max_stored_classes=8, top_k=3)
    tracer.record(logits[:300], labels[:300], input_ids=np.arange(300), features=features[:300])
    tracer.record(logits[300:], None, input_ids=np.arange(300, 400), features=features[300:], dataset_type="pool")
    tracer.close()
    result = Evaluator(MODEL, VERSION, store=store_dir).request_evaluation()
    pool = result.unlabelled().sort_values("input_id", key=lambda s: s.astype(int))
    np.testing.assert_array_equal(pool["pred"], logits[300:].argmax(1))
    exp = np.exp(logits[300:] - logits[300:].max(1, keepdims=True))
    np.testing.assert_allclose(pool["msp"], (exp / exp.sum(1, keepdims=True)).max(1), rtol=1e-5)


# -- label-free evaluation -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, digits):
    """train and val traced with labels; the same val inputs traced again without labels as 'pool'."""
    splits, model = digits
    store = tmp_path_factory.mktemp("evaluated") / "mldbg"
    with ClassificationTracer(model, MODEL, VERSION, store=store) as tracer:
        _trace(tracer, *splits["train"], "train")
        _trace(tracer, *splits["val"], "val")
        x, _, ids = splits["val"]
        _trace(tracer, x, None, ids, "pool")
        tracer.wait_for_save()
    return Evaluator(MODEL, VERSION, store=store).request_evaluation()


def test_unlabelled_rows_get_the_label_free_signals_of_the_labelled_path(evaluated):
    result = evaluated
    assert not any("falls back" in note for note in result.notes)  # the estimator was fitted on train
    pool = result.unlabelled().set_index("input_id")
    samples = result.samples()
    val = samples[samples["dataset_type"] == "val"].set_index("input_id").loc[pool.index]
    assert len(pool) == 300
    for column in ("pred", "msp", "entropy", "top2_gap", "neighbor_pred_agreement", "neighbor_error_rate",
                   "mean_neighbor_distance", "density", "error_proba", "region"):
        np.testing.assert_allclose(pool[column].to_numpy(float), val[column].to_numpy(float), err_msg=column)
    tau_op = result.thresholds.set_index("dataset").loc["pool", "tau_op"]
    np.testing.assert_array_equal(pool["accepted"], pool["error_proba"] < tau_op)
    np.testing.assert_array_equal(pool["out_of_distribution"], pool["density"] >= 99.0)
    train = samples[samples["dataset_type"] == "train"]
    hot_regions = set(train.loc[train["in_hotspot_region"], "region"])
    np.testing.assert_array_equal(pool["in_hotspot_region"], pool["region"].isin(hot_regions))
    expected_code = np.select([pool["out_of_distribution"], ~pool["accepted"] & pool["in_hotspot_region"],
                               ~pool["accepted"], pool["in_hotspot_region"]],
                              ["OP_OUT_OF_DISTRIBUTION", "OP_REJECTED_IN_HOTSPOT", "OP_REJECTED",
                               "OP_IN_HOTSPOT_REGION"], "OP_ACCEPTED")
    np.testing.assert_array_equal(pool["error_code"], expected_code)
    metrics = result.metrics_summary().set_index("dataset")
    assert metrics.loc["pool", "counts"] == 300 and np.isnan(metrics.loc["pool", "accuracy"])
    summary = result.unlabelled_summary().set_index("dataset").loc["pool"]
    assert summary["accepted_ratio"] == pytest.approx(pool["accepted"].mean())
    assert summary["rejected_ratio"] == pytest.approx(1 - pool["accepted"].mean())


def test_a_dataset_with_some_rows_without_labels_is_split_between_the_two_tables(store_dir, digits):
    splits, model = digits
    x, y, ids = splits["val"]
    with ClassificationTracer(model, MODEL, VERSION, store=store_dir) as tracer:
        _trace(tracer, *splits["train"], "train")
        _trace(tracer, x[:120], y[:120], ids[:120], "val")
        _trace(tracer, x[120:], None, ids[120:], "val")
        tracer.wait_for_save()
    result = Evaluator(MODEL, VERSION, store=store_dir).request_evaluation()
    samples = result.samples()
    val = samples[samples["dataset_type"] == "val"]
    assert sorted(val["input_id"].astype(int)) == sorted(ids[:120])
    assert sorted(result.unlabelled()["input_id"].astype(int)) == sorted(ids[120:])
    metrics = result.metrics_summary().set_index("dataset")
    assert metrics.loc["val", "counts"] == 120  # accuracy of the labelled rows only
    assert metrics.loc["val", "accuracy"] == pytest.approx(val["correct"].mean())


def test_data_without_labels_and_no_training_reference_gets_a_clear_message(store_dir, digits):
    splits, model = digits
    with ClassificationTracer(model, MODEL, VERSION, store=store_dir) as tracer:
        _trace(tracer, *splits["pool"][:1], None, splits["pool"][2], "operation")
        tracer.wait_for_save()
    with pytest.raises(NoReferenceError, match=r"operation epoch 0 was traced without labels and has no labelled "
                                                r"train traces.*Trace the training data \(with labels, "
                                                r"dataset_type='train'\)"):
        Evaluator(MODEL, VERSION, store=store_dir).request_evaluation()


def test_training_traces_without_labels_are_no_reference(store_dir, digits):
    splits, model = digits
    with ClassificationTracer(model, MODEL, VERSION, store=store_dir) as tracer:
        _trace(tracer, splits["train"][0], None, splits["train"][2], "train")
        _trace(tracer, *splits["val"], "val")
        tracer.wait_for_save()
    evaluator = Evaluator(MODEL, VERSION, store=store_dir)
    with pytest.raises(NoReferenceError, match="train epoch 0 was traced without labels and has no labelled train "
                                               "traces.*Trace the training data"):
        evaluator.request_evaluation()
    with pytest.raises(NoReferenceError, match="the reference set, train epoch 0, was traced without labels.*Trace "
                                               "the training data with labels"):
        store = LocalStore(store_dir)  # the labelled val alone, against the unlabelled train
        evaluate_classification(lambda d, e, f: store.read_traces(MODEL, VERSION, d, [e]),
                                store.read_meta(MODEL, VERSION), {"val": [0]}, {"train": [0], "val": [0]})


# -- monitoring and drift -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def monitored(tmp_path_factory, digits):
    """Operation logs of unshifted inputs over two hours, and of the same inputs with Gaussian noise."""
    splits, model = digits
    store = tmp_path_factory.mktemp("monitored") / "mldbg"
    x, _, ids = splits["pool"]
    noisy = np.clip(x + np.random.default_rng(0).normal(0, 0.4, x.shape).astype(np.float32), 0, 1)
    start = dt.datetime(2026, 3, 1, 10, 0, tzinfo=dt.timezone.utc)
    with ClassificationTracer(model, MODEL, VERSION, store=store) as tracer:
        _trace(tracer, *splits["train"], "train")
        _trace(tracer, *splits["val"], "val")
        half = len(x) // 2
        for part, logged_at in ((slice(0, half), start), (slice(half, None), start + dt.timedelta(hours=1, minutes=5))):
            with torch.no_grad():
                outputs, features = tracer.forward(torch.from_numpy(x[part]))
                tracer.record(outputs, None, input_ids=ids[part], dataset_type="operation", features=features,
                              logged_at=logged_at)
                outputs, features = tracer.forward(torch.from_numpy(noisy[part]))
                tracer.record(outputs, None, input_ids=ids[part], dataset_type="shifted", features=features,
                              logged_at=logged_at)
        tracer.wait_for_save()
    return Evaluator(MODEL, VERSION, store=store).request_evaluation(), half, len(x) - half, store


def test_unshifted_operation_data_does_not_drift(monitored):
    result, first, second, _ = monitored
    windows = result.monitoring("h", dataset_type="operation")
    assert windows["window_start"].tolist() == [pd.Timestamp("2026-03-01 10:00", tz="UTC"),
                                                pd.Timestamp("2026-03-01 11:00", tz="UTC")]
    assert windows["counts"].tolist() == [first, second]
    assert (windows["baseline"] == "val@0").all()
    assert not windows["drift"].any(), windows["drift_reasons"].tolist()
    assert (windows["psi_pred"] < PSI_DRIFT).all()
    # the KS statistics are scipy's, against the labelled held-out baseline
    operation, samples = result.unlabelled(), result.samples()
    val = samples[samples["dataset_type"] == "val"]
    hour = operation[(operation["dataset_type"] == "operation") & (operation["logged_at"].dt.hour == 10)]
    assert windows.loc[0, "ks_msp"] == pytest.approx(ks_2samp(hour["msp"], val["msp"]).statistic)
    assert windows.loc[0, "accepted_ratio"] == pytest.approx(hour["accepted"].mean())


def test_shifted_operation_data_raises_the_drift_flag(monitored):
    result, *_ = monitored
    windows = result.monitoring("D", dataset_type="shifted")
    assert len(windows) == 1 and windows.loc[0, "drift"]
    assert "KS" in windows.loc[0, "drift_reasons"]
    shifted = result.unlabelled_summary().set_index("dataset")
    assert shifted.loc["shifted", "ood_ratio"] > shifted.loc["operation", "ood_ratio"]
    assert shifted.loc["shifted", "rejected_ratio"] > shifted.loc["operation", "rejected_ratio"]


def test_monitoring_needs_a_named_dataset_when_several_were_logged(monitored):
    result, *_ = monitored
    with pytest.raises(ValueError, match=r"dataset_type= one of \['operation', 'shifted'\]"):
        result.monitoring()


def test_mldbg_monitor_prints_the_windows_and_says_which_drift(monitored, capsys):
    result, *_, store = monitored
    common = ["--store", str(store), "monitor", MODEL, VERSION, "--result", result.result_name]
    assert mldbg([*common, "--dataset", "operation", "--window", "h"]) == 0
    assert "no window drifts" in capsys.readouterr().out
    assert mldbg([*common, "--dataset", "shifted"]) == 0
    assert "1 of 1 window(s) drift" in capsys.readouterr().out
    assert mldbg(common) == 2  # two datasets without labels: the message names them
    assert "dataset_type= one of ['operation', 'shifted']" in capsys.readouterr().out


# -- InferenceLogger ---------------------------------------------------------------------------------
def test_inference_logger_samples_calls_and_returns_the_model_output(store_dir, digits):
    splits, model = digits
    x, _, _ = splits["pool"]
    logger = InferenceLogger(model, MODEL, VERSION, store=store_dir, sample_rate=0.3, seed=7)
    draws = random.Random(7)
    expected_sampled = 0
    for start in range(0, 160, 4):
        batch = torch.from_numpy(x[start:start + 4])
        with torch.no_grad():
            assert torch.equal(logger(batch), model(batch))
        expected_sampled += draws.random() < 0.3
    logger.close()
    stats = logger.stats
    assert (stats.calls, stats.sampled_calls, stats.logging_errors) == (40, expected_sampled, 0)
    assert stats.trace.rows_written == 4 * expected_sampled
    rows = LocalStore(store_dir).read_traces(MODEL, VERSION, "operation", [0])
    assert rows.num_rows == 4 * expected_sampled and rows.column("label").null_count == rows.num_rows
    assert "features" in rows.column_names  # the input of the last Linear layer, as for the tracer
    assert len(set(rows.column("input_id").to_pylist())) == rows.num_rows  # generated ids are unique


def test_inference_logger_never_blocks_when_the_store_is_stuck(store_dir, digits, monkeypatch):
    splits, model = digits
    x = torch.from_numpy(splits["pool"][0][:8])
    release = threading.Event()
    real_write = RunWriter.write_part

    def stuck_write(self, *args, **kwargs):  # a store that hangs (e.g. an unresponsive network disk)
        release.wait(30)
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(RunWriter, "write_part", stuck_write)
    logger = InferenceLogger(model, MODEL, VERSION, store=store_dir, sample_rate=1.0, flush_interval_s=0.0,
                             max_pending_batches=2)
    started = time.monotonic()
    with torch.no_grad(), pytest.warns(TraceWarning, match=r"\(queue_full\).*dropped instead of blocking"):
        for _ in range(50):
            logger(x)
    elapsed = time.monotonic() - started
    release.set()
    saved = logger.wait_for_save(timeout_s=30)
    logger.close()
    assert elapsed < 5.0  # 50 calls; a blocking hand-over would wait up to 30 s on the stuck store
    dropped = saved.rows_skipped["queue_full"]
    assert dropped > 0 and dropped % 8 == 0
    assert saved.rows_written + dropped == 50 * 8


def test_inference_logger_swallows_and_counts_logging_errors(store_dir, caplog):
    def broken_decoder(outputs, images):
        raise RuntimeError("decoder bug")

    logger = InferenceLogger(lambda images: images * 2, MODEL, VERSION, task="object_detection", store=store_dir,
                             sample_rate=1.0, postprocess=broken_decoder, num_classes=3)
    images = torch.zeros(2, 3, 8, 8)
    with caplog.at_level(logging.WARNING, logger="mldbg_callbacks"):
        for _ in range(3):
            assert torch.equal(logger(images), images * 2)
    logger.close()
    assert logger.stats.logging_errors == 3
    assert sum("could not log a call" in r.getMessage() for r in caplog.records) == 1  # warned once


def test_inference_logger_stores_detections_without_ground_truth(store_dir):
    def decode(outputs, images):
        return [{"boxes": torch.tensor([[1.0, 1.0, 5.0, 6.0]]), "scores": torch.tensor([0.9]),
                 "labels": torch.tensor([1])} for _ in range(len(images))]

    images = torch.zeros(2, 3, 8, 8)
    with DetectionTracer(lambda batch: batch, MODEL, VERSION, store=store_dir, postprocess=decode,
                         num_classes=3) as tracer:
        tracer(images, [{"boxes": torch.tensor([[1.0, 1.0, 5.0, 6.0]]), "labels": torch.tensor([1])}] * 2,
               input_ids=["a", "b"], dataset_type="train")
        tracer.wait_for_save()
    with InferenceLogger(lambda batch: batch, MODEL, VERSION, task="object_detection", store=store_dir,
                         sample_rate=1.0, postprocess=decode, num_classes=3) as logger:
        logger(images)
    rows = LocalStore(store_dir).read_traces(MODEL, VERSION, "operation", [0]).to_pandas()
    assert len(rows) == 2 and rows["gt_boxes"].isna().all() and rows["gt_labels"].isna().all()
    assert rows["logged_at"].notna().all() and [len(b) for b in rows["pred_boxes"]] == [1, 1]
    result = Evaluator(MODEL, VERSION, store=store_dir).request_evaluation()
    units = result.unlabelled()  # evaluated label-free, one row per image (tests/test_operation_detection.py)
    assert len(units) == 2 and set(units["dataset_type"]) == {"operation"} and (units["n_pred"] == 1).all()


def test_inference_logger_refuses_bad_settings(store_dir, digits):
    _, model = digits
    with pytest.raises(ValueError, match=r"sample_rate must be a share of calls in \[0, 1\]"):
        InferenceLogger(model, MODEL, VERSION, store=store_dir, sample_rate=5)
    with pytest.raises(ValueError, match="strict=True is for training"):
        InferenceLogger(model, MODEL, VERSION, store=store_dir, strict=True)
    with pytest.raises(InvalidNameError):
        InferenceLogger(model, MODEL, VERSION, store=store_dir, dataset_type="../ops")
    with pytest.raises(ValueError, match="task must be one of"):
        InferenceLogger(model, MODEL, VERSION, store=store_dir, task="segmentation")


def test_operation_logs_reach_a_server_and_its_evaluation_has_the_unlabelled_table(tmp_path, digits):
    splits, model = digits
    with running_server(tmp_path / "server") as server:
        key = server.create_key("ops")
        remote = RemoteStore(server.url, key, spool_dir=tmp_path / "spool", retries=2, backoff_s=0.05)
        with ClassificationTracer(model, MODEL, VERSION, store=remote) as tracer:
            _trace(tracer, *splits["train"], "train")
            tracer.wait_for_save()
        x, _, ids = splits["pool"]
        with InferenceLogger(model, MODEL, VERSION, store=remote, sample_rate=1.0) as logger, torch.no_grad():
            for start in range(0, 200, 50):
                logger(torch.from_numpy(x[start:start + 50]), input_ids=ids[start:start + 50])
        assert logger.stats.trace.rows_written == 200 and logger.stats.trace.pending_uploads == 0
        result = Evaluator(MODEL, VERSION, store=remote).request_evaluation(result_name="ops")
        local = LocalStore(server.store / "ops")  # what the server stored, in the local layout
        assert local.read_traces(MODEL, VERSION, "operation", [0]).column("label").null_count == 200
    expected = Evaluator(MODEL, VERSION, store=server.store / "ops").get_result("ops")
    fetched = result.unlabelled().sort_values("input_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(fetched, expected.unlabelled().sort_values("input_id").reset_index(drop=True))
    assert len(fetched) == 200 and set(fetched["input_id"]) == set(ids[:200].astype(str))


def test_inference_logger_stores_3d_detections_without_ground_truth(store_dir):
    def decode(outputs, frames):
        return [{"boxes": torch.tensor([[10.0, 2.0, 0.5, 1.8, 4.2, 1.5, 0.3]]), "scores": torch.tensor([0.8]),
                 "labels": torch.tensor([2])} for _ in range(len(frames))]

    frames = torch.zeros(3, 100, 4)  # three point clouds
    with InferenceLogger(lambda batch: batch, MODEL, VERSION, task="object_detection_3d", store=store_dir,
                         sample_rate=1.0, postprocess=decode, num_classes=4) as logger:
        assert torch.equal(logger(frames), frames)
    assert logger.stats.logging_errors == 0 and logger.stats.trace.rows_written == 3
    rows = LocalStore(store_dir).read_traces(MODEL, VERSION, "operation", [0]).to_pandas()
    assert rows["gt_boxes"].isna().all() and rows["logged_at"].notna().all()
    np.testing.assert_allclose(np.stack(rows["pred_boxes"].iloc[0]), [[10.0, 2.0, 0.5, 1.8, 4.2, 1.5, 0.3]],
                               rtol=1e-6)
