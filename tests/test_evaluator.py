"""Evaluator and Result against reference implementations (scikit-learn, scipy)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.special import softmax
from scipy.stats import entropy
from sklearn.metrics import accuracy_score, average_precision_score, log_loss, roc_auc_score
from sklearn.preprocessing import label_binarize

from mldbg_callbacks.errors import InvalidNameError, NoTracesError
from mldbg_callbacks.evaluator import Evaluator
from mldbg_callbacks.store import LocalStore
from mldbg_callbacks.training import ClassificationTracer

SEED_COLUMNS = ["dataset", "counts", "accuracy", "auroc", "auprc", "net_entropy_loss", "net_entropy",
                "error_proba_auroc", "error_proba_auprc"]


def identity_model(x):
    """A 'model' whose inputs are already its logits: lets tests choose the outputs exactly."""
    return x


def make_logits(rng, n, c, signal=2.0):
    labels = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c)).astype(np.float32)
    logits[np.arange(n), labels] += signal * rng.random(n).astype(np.float32)
    return logits, labels


def trace(store, logits, labels, *, model="m", version="v1", dataset="train", epoch=0, ids=None, **kwargs):
    tracer = ClassificationTracer(identity_model, model_name=model, version_name=version, store=store, **kwargs)
    ids = np.arange(len(labels)) if ids is None else ids
    for start in range(0, len(labels), 97):
        part = slice(start, start + 97)
        tracer(logits[part], labels[part], input_ids=ids[part], dataset_type=dataset, n_epoch=epoch)
    tracer.wait_for_save()
    tracer.close()


def test_metrics_summary_matches_reference_implementations(store_dir, rng):
    logits, labels = make_logits(rng, 1000, 7)
    trace(store_dir, logits, labels)
    result = Evaluator("m", "v1").request_evaluation()
    summary = result.metrics_summary()
    assert list(summary.columns) == SEED_COLUMNS
    row = summary.set_index("dataset").loc["train"]
    probs = softmax(logits.astype(np.float64), axis=1)
    pred = probs.argmax(1)
    assert row["counts"] == 1000
    assert row["accuracy"] == pytest.approx(accuracy_score(labels, pred))
    assert row["auroc"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr", average="macro"), abs=1e-6)
    assert row["auprc"] == pytest.approx(
        average_precision_score(label_binarize(labels, classes=range(7)), probs, average="macro"), abs=1e-6)
    assert row["net_entropy_loss"] == pytest.approx(log_loss(labels, probs, normalize=False, labels=range(7)), rel=1e-5)
    assert row["net_entropy"] == pytest.approx(entropy(probs, axis=1).sum(), rel=1e-5)
    wrong = pred != labels
    samples = result.samples().assign(i=lambda f: f["input_id"].astype(int)).sort_values("i")
    np.testing.assert_array_equal(~samples["correct"].to_numpy(), wrong)
    assert row["error_proba_auroc"] == pytest.approx(roc_auc_score(wrong, samples["error_proba"]), abs=1e-9)
    assert row["error_proba_auprc"] == pytest.approx(average_precision_score(wrong, samples["error_proba"]), abs=1e-9)
    baseline = result.error_proba_summary().iloc[0]
    assert baseline["baseline_error_proba_auroc"] == pytest.approx(roc_auc_score(wrong, 1 - probs.max(1)), abs=1e-6)
    assert baseline["baseline_error_proba_auprc"] == pytest.approx(average_precision_score(wrong, 1 - probs.max(1)), abs=1e-6)


def test_macro_scores_use_only_classes_present(store_dir, rng):
    logits, labels = make_logits(rng, 600, 5)
    labels[labels == 3] = 1  # class 3 never occurs
    trace(store_dir, logits, labels)
    row = Evaluator("m", "v1").request_evaluation().metrics_summary().iloc[0]
    probs = softmax(logits.astype(np.float64), axis=1)
    present = [0, 1, 2, 4]
    onehot = label_binarize(labels, classes=present)
    assert row["auroc"] == pytest.approx(roc_auc_score(onehot, probs[:, present], average="macro"), abs=1e-6)
    assert row["auprc"] == pytest.approx(average_precision_score(onehot, probs[:, present], average="macro"), abs=1e-6)


def test_probability_outputs_and_topk_storage(store_dir, rng):
    logits, labels = make_logits(rng, 400, 200, signal=6.0)
    probs = softmax(logits.astype(np.float64), axis=1).astype(np.float32)
    trace(store_dir, probs, labels, version="probs")
    trace(store_dir, logits, labels, version="topk", max_stored_classes=50, top_k=10)
    dense = Evaluator("m", "probs").request_evaluation().samples()
    topk = Evaluator("m", "topk").request_evaluation().samples()
    reference = softmax(logits.astype(np.float64), axis=1)
    rows = np.arange(len(labels))
    for samples in (dense, topk):
        samples = samples.sort_values("input_id", key=lambda s: s.astype(int))
        # the label's probability and the top class are stored exactly in both layouts
        np.testing.assert_allclose(samples["loss"], -np.log(reference[rows, labels]), rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(samples["pred"], reference.argmax(1))
        np.testing.assert_allclose(samples["msp"], reference.max(1), rtol=1e-5)
    margin = np.sort(logits, axis=1)
    other = np.where(logits.argmax(1) == labels, margin[:, -2], margin[:, -1])
    samples = topk.sort_values("input_id", key=lambda s: s.astype(int))
    np.testing.assert_allclose(samples["logit_margin"], logits[rows, labels] - other, rtol=1e-5, atol=1e-5)


def test_epoch_selection_latest_int_and_all(store_dir, rng):
    for epoch in range(3):
        logits, labels = make_logits(rng, 120, 4, signal=epoch * 2.0)
        trace(store_dir, logits, labels, epoch=epoch)
    trace(store_dir, *make_logits(rng, 50, 4), dataset="val", epoch=1)
    evaluator = Evaluator("m", "v1")
    latest = evaluator.request_evaluation()
    assert latest.epochs == {"train": [2], "val": [1]}
    assert list(latest.metrics_summary().columns) == SEED_COLUMNS
    one = evaluator.request_evaluation(n_epoch=1)
    assert one.epochs == {"train": [1], "val": [1]}
    every = evaluator.request_evaluation(n_epoch=None).metrics_summary()
    assert list(every.columns) == ["dataset", "n_epoch", *SEED_COLUMNS[1:]]
    assert every[["dataset", "n_epoch"]].values.tolist() == [["train", 0], ["train", 1], ["train", 2], ["val", 1]]
    with pytest.raises(NoTracesError, match=r"committed epochs: \[0, 1, 2\]"):
        evaluator.request_evaluation(n_epoch=9)


def test_partial_rank_commit_is_evaluated_with_a_note(store_dir, rng, monkeypatch):
    logits, labels = make_logits(rng, 100, 3)
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        trace(store_dir, logits[rank::2], labels[rank::2], ids=np.arange(100)[rank::2], epoch=0)
    monkeypatch.setenv("RANK", "0")
    trace(store_dir, logits[:50], labels[:50], ids=np.arange(50), epoch=1)  # rank 1 never commits epoch 1
    result = Evaluator("m", "v1").request_evaluation(n_epoch="latest")
    assert result.epochs == {"train": [0]}  # newest *complete* epoch
    partial = Evaluator("m", "v1").request_evaluation(n_epoch=1)
    assert partial.metrics_summary().iloc[0]["counts"] == 50
    assert any("1 of 2 ranks committed" in note for note in partial.notes)


def test_duplicates_across_ranks_are_removed(store_dir, rng, monkeypatch):
    logits, labels = make_logits(rng, 64, 3)
    # a distributed sampler pads rank 1's shard with sample 0, which rank 0 also traced
    shards = {0: np.arange(0, 32), 1: np.r_[np.arange(32, 64), 0]}
    for rank, ids in shards.items():
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        trace(store_dir, logits[ids], labels[ids], ids=ids)
    result = Evaluator("m", "v1").request_evaluation()
    assert result.metrics_summary().iloc[0]["counts"] == 64
    assert sorted(result.samples()["input_id"].astype(int)) == list(range(64))
    assert any("1 duplicate" in note for note in result.notes)


def test_results_are_persisted_listed_and_reloaded(store_dir, rng):
    trace(store_dir, *make_logits(rng, 200, 4))
    evaluator = Evaluator("m", "v1")
    first = evaluator.request_evaluation(result_name="exp-001")
    second = evaluator.request_evaluation()
    listed = evaluator.list_results()
    assert set(listed["result_name"]) == {"exp-001", second.result_name}
    again = Evaluator("m", "v1", store=LocalStore(store_dir)).get_result("exp-001")
    pd.testing.assert_frame_equal(again.metrics_summary(), first.metrics_summary())
    pd.testing.assert_frame_equal(again.samples(), first.samples())
    with pytest.raises(NoTracesError, match="exp-001"):
        evaluator.get_result("nope")
    with pytest.raises(InvalidNameError):
        evaluator.request_evaluation(result_name="../escape")


def test_missing_model_or_version_lists_what_exists(store_dir, rng):
    trace(store_dir, *make_logits(rng, 20, 3))
    with pytest.raises(NoTracesError, match=r"models there: \['m'\]"):
        Evaluator("other", "v1").request_evaluation()
    with pytest.raises(NoTracesError, match=r"versions there: \['v1'\]"):
        Evaluator("m", "v9").request_evaluation()


def test_summary_prints_and_html_report(store_dir, rng, tmp_path, capsys):
    trace(store_dir, *make_logits(rng, 50, 3))
    result = Evaluator("m", "v1").request_evaluation()
    data = result.get_summary()
    out = capsys.readouterr().out
    assert "net_entropy_loss" in out and "train" in out
    assert list(data["metrics"].columns) == SEED_COLUMNS
    report = result.to_html(tmp_path / "r" / "report.html")
    text = report.read_text()
    assert "<table" in text and "error_proba_auroc" in text
    assert "<td>50</td>" in text.replace(" ", "")


def test_epoch_traced_again_after_a_resume_keeps_the_newest_rows(store_dir, rng):
    logits, labels = make_logits(rng, 60, 3)
    trace(store_dir, logits, labels, epoch=0)
    trace(store_dir, logits, labels, epoch=1)  # the run stops here; its checkpoint was from epoch 0
    newer = logits[:, ::-1].copy()  # the resumed run traces epoch 1 again, with other predictions
    trace(store_dir, newer, labels, epoch=1)
    samples = Evaluator("m", "v1").request_evaluation(n_epoch=1).samples()
    samples = samples.assign(i=samples["input_id"].astype(int)).sort_values("i")
    assert len(samples) == 60
    np.testing.assert_array_equal(samples["pred"], softmax(newer.astype(np.float64), axis=1).argmax(1))


def test_evaluation_numbers_do_not_depend_on_the_openmp_thread_count(tmp_path):
    """A server process and a notebook where torch changed the thread count must get the same result."""
    from sklearn.datasets import load_digits
    from test_server import _train, _tracer
    from threadpoolctl import threadpool_limits

    x, y = load_digits(return_X_y=True)
    tracer = _tracer(tmp_path)
    _train(tracer, (x[:600].astype(np.float32), y[:600], np.array([f"d{i:04d}" for i in range(600)])), epochs=2)
    tracer.wait_for_save()
    results = []
    for threads in (1, 2):
        with threadpool_limits(limits=threads, user_api="openmp"):
            results.append(Evaluator("digits", "v1", store=tmp_path).request_evaluation(result_name=f"t{threads}"))
    pd.testing.assert_frame_equal(results[0].metrics_summary(), results[1].metrics_summary(), check_exact=True)
    pd.testing.assert_frame_equal(results[0].samples(), results[1].samples(), check_exact=True)
