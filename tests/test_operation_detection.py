"""Label-free evaluation of 2D and 3D detections traced without ground truth (issue 10): the per-image
``unlabelled`` table, monitoring with drift, and DataFiltering on a detection pool.

Real tracer, real Parquet store and Evaluator; detections are synthetic (jittered copies of exact
ground-truth boxes plus background boxes, ``test_detection_eval.random_scene``), so every box is known.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest
from scipy.stats import entropy as scipy_entropy

from test_detection3d_eval import _tracer as tracer3d
from test_detection3d_eval import random_frames
from server_utils import running_server
from test_detection_eval import SIZE, _tracer, random_scene

from mldbg_callbacks.cli import main as mldbg
from mldbg_callbacks.core.vectors import decode_vectors
from mldbg_callbacks.errors import NoReferenceError, SelectionError
from mldbg_callbacks.evaluator import Evaluator
from mldbg_callbacks.store import RemoteStore

START = dt.datetime(2026, 1, 5, 8, 0, tzinfo=dt.timezone.utc)
LABEL_FREE = ["n_pred", "pred", "max_score", "entropy", "top2_gap", "error_proba", "expected_errors", "region",
              "region_error_rate", "in_hotspot_region", "density"]


def _trace(tracer, images: dict, dataset_type: str, features: dict | None = None, ids: list[str] | None = None,
           at: dt.datetime | None = None) -> None:
    """Trace ``images`` (id -> (gt_boxes, gt_labels, det_boxes, det_scores, det_labels)) with their ground
    truth, or, with ``at``, as serving code would: detections only (targets=None), logged at ``at``."""
    detections = [{"boxes": np.asarray(images[i][2], float).reshape(-1, 4), "scores": np.asarray(images[i][3], float),
                   "labels": np.asarray(images[i][4], int)} for i in images]
    targets = None if at is not None else {"boxes": [np.asarray(images[i][0], float).reshape(-1, 4) for i in images],
                                            "labels": [np.asarray(images[i][1], int) for i in images]}
    tracer.record(detections, targets, input_ids=ids or list(images), dataset_type=dataset_type,
                  image_sizes=[SIZE] * len(images), logged_at=at,
                  features=None if features is None else np.stack([features[i] for i in images]))


def _embeddings(rng, images: dict, shift: np.ndarray | None = None) -> dict:
    """An image-level embedding per image: one cluster for the training distribution, moved by ``shift``."""
    centre = np.full(16, 2.0) + (0.0 if shift is None else shift)
    return {key: (centre + rng.normal(0, 1, 16)).astype(np.float32) for key in images}


def _degraded(images: dict, rng) -> dict:
    """The same scenes seen by a worse sensor: scores halved, three extra background boxes per image."""
    out = {}
    for key, (gt, labels, det, scores, det_labels) in images.items():
        bg_xy = rng.uniform(0, 80, (3, 2))
        bg = np.c_[bg_xy, bg_xy + rng.uniform(2, 20, (3, 2))]
        out[key] = (gt, labels, np.r_[det.reshape(-1, 4), bg], np.r_[scores * 0.5, rng.uniform(0.05, 0.5, 3)].round(2),
                    np.r_[det_labels, rng.integers(0, 4, 3)])
    return out


def _trace_scenario(tracer) -> tuple[dict, dict]:
    """Labelled train and val images, then three hours of operation; returns (val, shifted)."""
    rng = np.random.default_rng(7)
    train, val, fresh, shifted = (random_scene(rng, n) for n in (300, 150, 150, 150))
    features = {name: _embeddings(rng, images) for name, images in (("train", train), ("val", val), ("fresh", fresh))}
    features["shifted"] = _embeddings(rng, shifted, shift=rng.normal(0, 2, 16))
    _trace(tracer, train, "train", features["train"])
    _trace(tracer, val, "val", features["val"])
    # hour 1: the val images again, without ground truth; hour 2: new images of the same distribution;
    # hour 3: new images from a new sensor (other embeddings, lower scores, more background boxes)
    _trace(tracer, val, "operation", features["val"], [f"op-{k}" for k in val], START)
    _trace(tracer, fresh, "operation", features["fresh"], [f"fresh-{k}" for k in fresh],
           START + dt.timedelta(hours=1))
    _trace(tracer, _degraded(shifted, rng), "operation", features["shifted"], [f"shift-{k}" for k in shifted],
           START + dt.timedelta(hours=2))
    tracer.wait_for_save()
    return val, shifted


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    store_dir = tmp_path_factory.mktemp("opdet")
    with _tracer(store_dir, num_classes=4) as tracer:
        val, shifted = _trace_scenario(tracer)
    return Evaluator("det", "v1", store=store_dir).request_evaluation(), val, shifted


def test_a_server_evaluates_detections_traced_without_labels_as_a_local_store_does(evaluated, tmp_path):
    """The same operation data uploaded to `mldbg serve` on loopback and evaluated there: the same label-free
    table, monitoring windows and diversity picks (features read back through GET .../traces)."""
    local = evaluated[0]
    with running_server(tmp_path / "server") as server:
        remote = RemoteStore(server.url, server.create_key("vision"), spool_dir=tmp_path / "spool")
        with _tracer(remote, num_classes=4) as tracer:
            _trace_scenario(tracer)
        result = Evaluator("det", "v1", store=remote).request_evaluation()
        pd.testing.assert_frame_equal(result.unlabelled(), local.unlabelled())
        pd.testing.assert_frame_equal(result.monitoring(window="h"), local.monitoring(window="h"))
        picks = result.select(20, "diversity")
        pd.testing.assert_frame_equal(picks, local.select(20, "diversity"))
    assert len(picks) == 20 and picks["input_id"].str.startswith(("op-", "fresh-", "shift-")).all()


def test_images_without_ground_truth_get_the_label_free_signals_of_the_labelled_path(evaluated):
    result, val, _ = evaluated
    units = result.unlabelled()
    assert len(units) == 450 and set(units["dataset_type"]) == {"operation"}
    assert units["logged_at"].dt.tz is not None
    logged = units[units["input_id"].str.startswith("op-")].assign(input_id=lambda f: f["input_id"].str[3:])
    labelled = result.images()
    labelled = labelled[labelled["dataset_type"] == "val"]
    both = logged.set_index("input_id")[LABEL_FREE].sort_index()
    pd.testing.assert_frame_equal(both, labelled.set_index("input_id")[LABEL_FREE].sort_index(),
                                  check_dtype=False, check_names=False)
    # independent computation of the score-only columns from the traced boxes
    score_op = result.thresholds.set_index("dataset").loc["operation", "score_op"]
    for key, (_, _, _, scores, det_labels) in val.items():
        row = both.loc[key]
        reported = scores >= score_op
        assert row["n_pred"] == reported.sum()
        assert row["pred"] == (det_labels[reported][np.argmax(scores[reported])] if reported.any() else -1)
        assert row["max_score"] == pytest.approx(scores.max() if len(scores) else 0.0, abs=1e-6)
        if len(scores):
            assert row["entropy"] == pytest.approx(max(scipy_entropy([s, 1 - s]) for s in scores), abs=1e-5)
            assert row["top2_gap"] == pytest.approx(np.abs(scores - score_op).min(), abs=1e-6)
        else:
            assert np.isnan(row["top2_gap"]) and row["entropy"] == 0 and row["pred"] == -1
        assert row["expected_errors"] >= row["error_proba"] - 1e-12
    assert (both["n_pred"] == 0).sum() > 0 and ((both["n_pred"] == 0) <= (both["error_proba"] == 0)).all()
    # accepted: below the reference's threshold on P(false positive); the codes are the OP_* of classification
    tau = result.thresholds.set_index("dataset").loc["operation", "det_tau_op"]
    np.testing.assert_array_equal(units["accepted"], (units["error_proba"] < tau) | (units["n_pred"] == 0))
    assert set(units["error_code"]) <= {"OP_OUT_OF_DISTRIBUTION", "OP_REJECTED_IN_HOTSPOT", "OP_REJECTED",
                                        "OP_IN_HOTSPOT_REGION", "OP_ACCEPTED"}
    assert (units["error_code"] == "OP_OUT_OF_DISTRIBUTION").equals(units["out_of_distribution"])
    assert units["density"].between(0, 100).all()
    np.testing.assert_array_equal(units["out_of_distribution"], units["density"] >= 99)
    summary = result.unlabelled_summary()
    assert summary.loc[0, "counts"] == 450
    metrics = result.metrics_summary().set_index("dataset")
    assert metrics.loc["operation", "n_images"] == 450 and np.isnan(metrics.loc["operation", "map"])
    stored = result.store.read_traces("det", "v1", "operation", [0]).column("pred_scores").to_pylist()
    assert metrics.loc["operation", "n_pred"] == sum(map(len, stored)) > 0


def test_the_degraded_window_drifts_and_the_unshifted_one_does_not(evaluated):
    result, _, _ = evaluated
    windows = result.monitoring(window="h")
    assert list(windows["counts"]) == [150, 150, 150] and windows["baseline"].iloc[0] == "val@0"
    same, fresh, shifted = windows.iloc[0], windows.iloc[1], windows.iloc[2]
    assert same["ks_max_score"] == 0 and same["psi_pred"] == 0 and not same["drift"]
    assert not fresh["drift"], fresh["drift_reasons"]
    assert shifted["drift"] and "max_score KS" in shifted["drift_reasons"]
    assert shifted["ks_max_score"] > 3 * fresh["ks_max_score"]
    assert shifted["rejected_ratio"] > fresh["rejected_ratio"]
    assert shifted["ood_ratio"] > 0.9 and fresh["ood_ratio"] < 0.1 and "density KS" in shifted["drift_reasons"]
    assert -1 in same["pred_distribution"]  # an image without a reported detection is counted as class -1


def test_mldbg_monitor_and_select_work_on_a_detection_result(evaluated, capsys, tmp_path):
    result, _, _ = evaluated
    common = ["--store", str(result.store.root)]
    assert mldbg([*common, "monitor", "det", "v1", "--result", result.result_name, "--window", "h"]) == 0
    assert "1 of 3 window(s) drift" in capsys.readouterr().out
    output = tmp_path / "ids.txt"
    assert mldbg([*common, "select", "det", "v1", "--result", result.result_name, "--budget", "7",
                  "-o", str(output)]) == 0
    assert output.read_text().split() == list(result.select(7)["input_id"])


def test_select_on_a_detection_pool_returns_image_ids(evaluated):
    result, _, _ = evaluated
    units = result.unlabelled()
    picked = result.select(20, "error_proba")
    assert len(picked) == 20 and set(picked["dataset_type"]) == {"operation"}
    expected = units.sort_values(["error_proba", "input_id"], ascending=[False, True]).head(20)
    assert list(picked["input_id"]) == list(expected["input_id"])
    for strategy in ("entropy", "margin", "hotspot", "random"):
        chosen = result.select(15, strategy)
        assert len(chosen) == 15 and chosen["input_id"].is_unique and set(chosen["input_id"]) <= set(units["input_id"])
    margin = result.select(5, "margin")
    assert list(margin["score"]) == list(units["top2_gap"].nsmallest(5))
    with pytest.warns(UserWarning, match="exceeds the 450 units"):
        assert len(result.select(1000, "entropy")) == 450
    val_pool = result.select(10, "error_proba", dataset_type="val")  # a labelled pool: its images
    assert len(val_pool) == 10 and val_pool["input_id"].isin(list(result.images()["input_id"])).all()
    # diversity: k-center greedy on the image features; the first pick is the pool image farthest from train
    diverse = result.select(5, "diversity")
    traces = result.store.read_traces("det", "v1", "operation", [0])
    pool, train = (decode_vectors(t, "features").astype(float)
                   for t in (traces, result.store.read_traces("det", "v1", "train", [0])))
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    train /= np.linalg.norm(train, axis=1, keepdims=True)
    nearest = np.linalg.norm(pool[:, None] - train[None], axis=2).min(axis=1)
    assert diverse["input_id"].iloc[0] == traces.column("input_id")[int(np.argmax(nearest))].as_py()
    assert diverse["input_id"].str.startswith("shift-").all()  # the new sensor's images are the new ones
    with pytest.raises(SelectionError, match="OD_MISSING_LABEL"):
        result.select(5, "review_labels")


def test_detections_without_ground_truth_and_no_training_reference_get_a_clear_message(store_dir):
    rng = np.random.default_rng(1)
    scene = random_scene(rng, 20)
    with _tracer(store_dir, num_classes=4) as tracer:
        _trace(tracer, scene, "operation", at=START)
        tracer.wait_for_save()
    with pytest.raises(NoReferenceError, match="Trace the training data"):
        Evaluator("det", "v1", store=store_dir).request_evaluation()


def test_3d_frames_without_ground_truth_get_the_label_free_signals_of_the_labelled_path(store_dir):
    rng = np.random.default_rng(3)
    train, val = random_frames(rng, 200, velocities=False), random_frames(rng, 60, velocities=False)
    with tracer3d(store_dir) as tracer:
        tracer.record(*train, input_ids=[f"t{i}" for i in range(200)], dataset_type="train")
        tracer.record(*val, input_ids=[f"f{i}" for i in range(60)], dataset_type="val")
        tracer.record(val[0], None, input_ids=[f"f{i}" for i in range(60)], dataset_type="operation", logged_at=START)
        tracer.wait_for_save()
    result = Evaluator("d3", "v1", store=store_dir).request_evaluation()
    units = result.unlabelled().set_index("input_id").sort_index()
    images = result.images()
    labelled = images[images["dataset_type"] == "val"].set_index("input_id").sort_index()
    assert len(units) == 60 and units["region"].str.contains("m").any()  # class:distance band slices
    assert units["density"].isna().all() and not units["out_of_distribution"].any()  # traced without features
    pd.testing.assert_frame_equal(units[LABEL_FREE], labelled[LABEL_FREE], check_dtype=False)
    metrics = result.metrics_summary().set_index("dataset")
    assert metrics.loc["operation", "n_frames"] == 60


def test_a_dataset_with_some_images_without_ground_truth_is_split_between_the_two_tables(store_dir):
    rng = np.random.default_rng(5)
    train, pool = random_scene(rng, 120), random_scene(rng, 70)
    keys = list(pool)
    with _tracer(store_dir, num_classes=4) as tracer:
        _trace(tracer, train, "train")
        _trace(tracer, {k: pool[k] for k in keys[:30]}, "pool")
        _trace(tracer, {k: pool[k] for k in keys[30:]}, "pool", at=START)
        tracer.wait_for_save()
    result = Evaluator("det", "v1", store=store_dir).request_evaluation()
    assert result.metrics_summary().set_index("dataset").loc["pool", "n_images"] == 30
    images = result.images()
    assert set(images.loc[images["dataset_type"] == "pool", "input_id"]) == set(keys[:30])
    units = result.unlabelled()
    assert set(units["input_id"]) == set(keys[30:]) and (units["logged_at"] == START).all()
    with pytest.warns(UserWarning, match="exceeds the 40 units"):  # the pool is the images without ground truth
        assert set(result.select(50, "error_proba")["input_id"]) == set(keys[30:])
