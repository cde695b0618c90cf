"""Classification analysis on constructed cases whose answer is known by construction."""

from __future__ import annotations

import statistics

import numpy as np
import pandas as pd
import pytest

from mldbg_callbacks.evaluator import Evaluator
from mldbg_callbacks.training import ClassificationTracer

CATEGORY_RATIOS = ["stable_coverage_ratio", "operational_coverage_ratio", "hotspot_ratio", "recessive_hotspot_ratio",
                   "critical_hotspot_ratio", "aleatoric_hotspot_ratio"]


def identity(x):
    return x


class World:
    """Three well-separated clusters in a 16-d feature space; the 'model' predicts a unit's cluster."""

    def __init__(self, seed=0, dim=16, classes=3):
        self.rng = np.random.default_rng(seed)
        self.centers = self.rng.normal(size=(classes, dim)) * 4.0
        self.classes = classes

    def sample(self, cluster, n, spread=0.6, offset=None):
        center = self.centers[cluster] + (0 if offset is None else offset)
        return center + spread * self.rng.normal(size=(n, self.centers.shape[1]))

    def logits(self, pred, confidence=5.0):
        logits = self.rng.normal(scale=0.3, size=(len(pred), self.classes))
        logits[np.arange(len(pred)), pred] += confidence
        return logits.astype(np.float32)


def record(tracer, logits, labels, features, ids, dataset="train", epoch=0):
    for start in range(0, len(labels), 128):
        part = slice(start, start + 128)
        tracer.record(logits[part], labels[part], input_ids=ids[part], features=features[part],
                      dataset_type=dataset, n_epoch=epoch)


def train_set(world, per_class=300, hard_fraction=0.06):
    """Confident correct predictions plus some hard, low-confidence errors (so error_proba can be fitted)."""
    labels = np.repeat(np.arange(world.classes), per_class)
    features = np.concatenate([world.sample(c, per_class) for c in range(world.classes)])
    pred = labels.copy()
    logits = world.logits(pred)
    hard = world.rng.choice(len(labels), int(hard_fraction * len(labels)), replace=False)
    wrong_pred = (labels[hard] + 1) % world.classes
    logits[hard] = world.logits(wrong_pred, confidence=0.4)
    return logits, labels, features


def evaluate(store, model="m", version="v1", **kwargs):
    return Evaluator(model, version, store=store).request_evaluation(**kwargs)


def test_planted_mislabelled_samples_are_label_noise(store_dir):
    world = World(seed=1)
    logits, labels, features = train_set(world)
    ids = np.array([f"s{i}" for i in range(len(labels))])
    clean = np.flatnonzero(logits.argmax(1) == labels)
    planted = world.rng.choice(clean, 27, replace=False)  # their label is flipped; the model keeps the cluster
    labels = labels.copy()
    labels[planted] = (labels[planted] + 1 + world.rng.integers(0, 2, len(planted))) % world.classes
    tracer = ClassificationTracer(identity, "m", "v1", store=store_dir)
    record(tracer, logits, labels, features, ids)
    tracer.wait_for_save()

    samples = evaluate(store_dir).samples().set_index("input_id")
    found = samples.loc[ids[planted]]
    assert (found["category"] == "aleatoric_hotspot").all()
    assert (found["error_code"] == "CLS_LABEL_NOISE").all()
    flagged = set(samples.index[samples["error_code"] == "CLS_LABEL_NOISE"])
    assert flagged == set(ids[planted])  # the hard errors' labels agree with their neighbours: not noise


def test_planted_confident_error_region_is_critical(store_dir):
    world = World(seed=2)
    logits, labels, features = train_set(world)
    tracer = ClassificationTracer(identity, "m", "v1", store=store_dir)
    record(tracer, logits, labels, features, np.arange(len(labels)).astype(str))
    # validation: normal units, plus a tight group inside cluster 0 that is labelled 2 but predicted 0
    # confidently -- a silent failure no label-free signal can see (a shortcut, a shifted sub-population)
    val_labels = np.repeat(np.arange(3), 100)
    val_features = np.concatenate([world.sample(c, 100) for c in range(3)])
    region_features = world.sample(0, 40, spread=0.15, offset=0.25)
    all_features = np.concatenate([val_features, region_features])
    all_labels = np.concatenate([val_labels, np.full(40, 2)])
    all_logits = world.logits(np.concatenate([val_labels, np.zeros(40, int)]))
    val_ids = np.array([f"v{i}" for i in range(len(all_labels))])
    record(tracer, all_logits, all_labels, all_features, val_ids, dataset="val")
    tracer.wait_for_save()

    result = evaluate(store_dir)
    samples = result.samples().set_index("input_id")
    region = samples.loc[val_ids[300:]]
    assert (region["dataset_type"] == "val").all()
    assert (region["category"] == "critical_hotspot").mean() >= 0.9
    # k-means regions fitted on train cut the group into a few regions; most of it lands in hotspot ones
    assert (region["error_code"] == "CLS_REGION_FAILURE").mean() >= 0.75
    assert region["in_hotspot_region"].mean() >= 0.75
    assert set(region["error_code"]) <= {"CLS_REGION_FAILURE", "CLS_CONFIDENT_ERROR"}


def test_learned_then_forgotten_sample(store_dir):
    world = World(seed=3)
    logits, labels, features = train_set(world, hard_fraction=0.05)
    ids = np.arange(len(labels)).astype(str)
    clean = np.flatnonzero(logits.argmax(1) == labels)
    forgotten, relearned = clean[0], clean[1]
    tracer = ClassificationTracer(identity, "m", "v1", store=store_dir)
    for epoch in range(5):
        epoch_logits = logits + world.rng.normal(scale=0.05, size=logits.shape).astype(np.float32)
        if epoch >= 3:  # correct at epochs 0-2, then predicted as another class
            epoch_logits[forgotten] = world.logits(np.array([(labels[forgotten] + 1) % 3]), confidence=3.0)[0]
        if epoch == 1:  # wrong once, right again afterwards
            epoch_logits[relearned] = world.logits(np.array([(labels[relearned] + 1) % 3]), confidence=3.0)[0]
        record(tracer, epoch_logits, labels, features, ids, epoch=epoch)
    tracer.wait_for_save()

    samples = evaluate(store_dir).samples().set_index("input_id")
    unit = samples.loc[ids[forgotten]]
    assert not unit["correct"] and unit["forgetting_events"] == 1 and unit["first_learned_epoch"] == 0
    assert unit["error_code"] == "CLS_FORGOTTEN"
    assert unit["category"] in ("critical_hotspot", "hotspot")
    again = samples.loc[ids[relearned]]
    assert again["correct"] and again["forgetting_events"] == 1
    assert again["category"] == "recessive_hotspot" and again["error_code"] == "CLS_FORGOTTEN"


def test_training_dynamics_match_direct_computation(store_dir):
    rng = np.random.default_rng(4)
    n, c, epochs = 40, 4, 4
    labels = rng.integers(0, c, n)
    trajectories = rng.normal(size=(epochs, n, c)).astype(np.float32) * 2
    tracer = ClassificationTracer(identity, "m", "v1", store=store_dir)
    for epoch in range(epochs):
        tracer(trajectories[epoch], labels, input_ids=np.arange(n), n_epoch=epoch)
    tracer.wait_for_save()
    samples = evaluate(store_dir).samples().assign(i=lambda f: f["input_id"].astype(int)).set_index("i").sort_index()
    for i in range(n):  # a plain per-sample reference, epoch by epoch
        p = [np.exp(t[i]) / np.exp(t[i]).sum() for t in trajectories.astype(np.float64)]
        p_label = [q[labels[i]] for q in p]
        correct = [int(np.argmax(q) == labels[i]) for q in p]
        margins = [t[i][labels[i]] - max(np.delete(t[i], labels[i])) for t in trajectories]
        row = samples.loc[i]
        assert row["confidence"] == pytest.approx(statistics.fmean(p_label), abs=1e-5)
        assert row["variability"] == pytest.approx(statistics.pstdev(p_label), abs=1e-5)
        assert row["correctness"] == pytest.approx(statistics.fmean(correct))
        assert row["forgetting_events"] == sum(1 for a, b in zip(correct, correct[1:]) if a == 1 and b == 0)
        assert row["aum"] == pytest.approx(statistics.fmean(margins), abs=1e-4)
        first = next((e for e, ok in enumerate(correct) if ok), None)
        assert (np.isnan(row["first_learned_epoch"]) if first is None else row["first_learned_epoch"] == first)
        assert row["recent_variability"] == pytest.approx(statistics.pstdev(p_label[-2:]), abs=1e-5)


@pytest.fixture
def two_dataset_result(store_dir):
    world = World(seed=5)
    logits, labels, features = train_set(world)
    tracer = ClassificationTracer(identity, "m", "v1", store=store_dir)
    for epoch in range(3):
        noisy = logits + world.rng.normal(scale=0.5, size=logits.shape).astype(np.float32)
        record(tracer, noisy, labels, features, np.arange(len(labels)).astype(str), epoch=epoch)
        record(tracer, noisy[::3], labels[::3], features[::3], np.arange(0, len(labels), 3).astype(str),
               dataset="val", epoch=epoch)
    tracer.wait_for_save()
    return evaluate(store_dir, result_name="r1")


def test_categories_are_exclusive_and_sum_to_one(two_dataset_result):
    summary = two_dataset_result.issue_category_summary()
    assert list(summary.columns) == ["dataset", *CATEGORY_RATIOS]
    np.testing.assert_allclose(summary[CATEGORY_RATIOS].sum(axis=1), 1.0)
    samples = two_dataset_result.samples()
    counts = samples.groupby("dataset_type")["category"].value_counts(normalize=True)
    for _, row in summary.iterrows():
        for column in CATEGORY_RATIOS:
            expected = counts.get((row["dataset"], column.removesuffix("_ratio")), 0.0)
            assert row[column] == pytest.approx(expected)
    assert samples["error_code"].str.startswith("CLS_").all()


def test_get_view_and_get_issues(two_dataset_result):
    view = two_dataset_result.get_view(groupby=["category", "error_code"], adjustby="category")
    assert {"dataset", "category", "error_code", "count", "ratio"} <= set(view.columns)
    np.testing.assert_allclose(view.groupby(["dataset", "category"])["ratio"].sum(), 1.0)
    samples = two_dataset_result.samples()
    direct = samples.groupby(["dataset_type", "category", "error_code"]).size()
    assert view.set_index(["dataset", "category", "error_code"])["count"].sort_index().tolist() == direct.sort_index().tolist()

    issues = two_dataset_result.get_issues()
    assert {"dataset", "category", "error_code", "count", "ratio", "description", "recommendation", "top_labels",
            "confused_pairs", "examples"} <= set(issues.columns)
    assert issues.groupby("dataset")["count"].sum().to_dict() == samples.groupby("dataset_type").size().to_dict()
    assert issues["examples"].map(len).max() <= 10
    assert (issues["description"].str.len() > 0).all() and (issues["recommendation"].str.len() > 0).all()
    worst = issues[issues["category"].isin(["critical_hotspot", "hotspot"])]
    for _, row in worst.iterrows():  # examples ordered by severity: highest loss first
        losses = samples.set_index(["dataset_type", "input_id"]).loc[[(row["dataset"], i) for i in row["examples"]], "loss"]
        assert list(losses) == sorted(losses, reverse=True)
    with pytest.raises(KeyError, match="unknown column"):
        two_dataset_result.get_view(groupby=["nope"])


def test_summary_shows_estimator_and_baseline(two_dataset_result, capsys):
    summary = two_dataset_result.get_summary()
    out = capsys.readouterr().out
    assert "baseline_error_proba_auroc" in out and "CLS_" in out and "stable_coverage_ratio" in out
    assert set(summary) >= {"metrics", "error_proba", "categories", "error_codes"}
    assert "<table" in two_dataset_result._repr_html_()


def test_label_tracker_follows_fastestimator_semantics(two_dataset_result):
    history = two_dataset_result._tables["history"]
    tracker = two_dataset_result.label_tracker(metric="loss", bounds=["std", "range", None],
                                               label_mapping={"zero": 0, "two": 2})
    assert set(tracker["label"]) == {"zero", "two"}
    assert set(tracker["bounds"]) == {"std", "range", "mean"}
    train = history[history["dataset_type"] == "train"]
    for (name, value) in (("zero", 0), ("two", 2)):
        for epoch in range(3):
            losses = train[(train["label"] == value) & (train["n_epoch"] == epoch)]["loss"].tolist()
            rows = tracker[(tracker["label"] == name) & (tracker["n_epoch"] == epoch)].set_index("bounds")
            mean, std = statistics.fmean(losses), statistics.stdev(losses)
            assert rows.loc["std", "mean"] == pytest.approx(mean)
            assert rows.loc["std", "low"] == pytest.approx(mean - std)
            assert rows.loc["std", "high"] == pytest.approx(mean + std)
            assert rows.loc["range", "low"] == pytest.approx(min(losses))
            assert rows.loc["range", "high"] == pytest.approx(max(losses))
            assert np.isnan(rows.loc["mean", "low"])
    with pytest.raises(ValueError, match="bounds"):
        two_dataset_result.label_tracker(bounds="iqr")


def test_label_tracker_plot(two_dataset_result, tmp_path):
    import matplotlib
    import matplotlib.pyplot as plt

    previous = matplotlib.get_backend()
    plt.switch_backend("pdf")  # a user's backend (a notebook's, say): saving a PNG must not replace it
    try:
        open_figure = plt.figure()
        path = tmp_path / "tracker.png"
        two_dataset_result.label_tracker(bounds=["std", "range"]).plot(str(path))
        assert path.stat().st_size > 5000 and path.read_bytes()[:4] == b"\x89PNG"
        assert matplotlib.get_backend() == "pdf" and plt.get_fignums() == [open_figure.number]
    finally:
        plt.close("all")
        plt.switch_backend(previous)


def test_compare_two_versions(store_dir, two_dataset_result):
    world = World(seed=6)
    logits, labels, features = train_set(world, hard_fraction=0.2)
    tracer = ClassificationTracer(identity, "m", "v2", store=store_dir)
    record(tracer, logits, labels, features, np.arange(len(labels)).astype(str))
    tracer.wait_for_save()
    other = evaluate(store_dir, version="v2")
    table = two_dataset_result.compare(other)
    train = table[table["dataset"] == "train"].set_index("metric")
    mine = two_dataset_result.metrics_summary().set_index("dataset").loc["train", "accuracy"]
    theirs = other.metrics_summary().set_index("dataset").loc["train", "accuracy"]
    first, second = table.columns[2], table.columns[3]
    assert first.endswith(":r1") and second.startswith("v2:")
    assert train.loc["accuracy", first] == pytest.approx(mine) and train.loc["accuracy", second] == pytest.approx(theirs)
    assert train.loc["accuracy", "delta"] == pytest.approx(theirs - mine)
    assert "critical_hotspot_ratio" in set(table["metric"])
    assert table[table["dataset"] == "val"].iloc[:, 3].isna().all()  # v2 has no val


def test_evaluation_is_deterministic(store_dir, two_dataset_result):
    again = Evaluator("m", "v1", store=store_dir).request_evaluation(result_name="r2")
    pd.testing.assert_frame_equal(again.samples(), two_dataset_result.samples())
    pd.testing.assert_frame_equal(again.issue_category_summary(), two_dataset_result.issue_category_summary())


def test_epoch_semantics_dynamics_use_only_earlier_epochs(store_dir, two_dataset_result):
    every = Evaluator("m", "v1", store=store_dir).request_evaluation(n_epoch=None)
    summary = every.issue_category_summary()
    assert summary[["dataset", "n_epoch"]].values.tolist() == [["train", 0], ["train", 1], ["train", 2],
                                                                 ["val", 0], ["val", 1], ["val", 2]]
    samples = every.samples()
    first = samples[(samples["dataset_type"] == "train") & (samples["n_epoch"] == 0)]
    assert first["variability"].isna().all()  # one epoch of history: no dynamics
    second = samples[(samples["dataset_type"] == "train") & (samples["n_epoch"] == 1)]
    latest = two_dataset_result.samples()
    assert second["variability"].notna().all()
    assert not np.allclose(second.sort_values("input_id")["confidence"],
                           latest[latest["dataset_type"] == "train"].sort_values("input_id")["confidence"])


# -- bad input ------------------------------------------------------------------------------------
def test_single_class_and_single_sample(store_dir):
    tracer = ClassificationTracer(identity, "m", "v1", store=store_dir)
    rng = np.random.default_rng(7)
    tracer(rng.normal(size=(30, 3)).astype(np.float32), np.zeros(30, int), input_ids=np.arange(30))
    tracer(rng.normal(size=(1, 3)).astype(np.float32), np.array([1]), input_ids=np.array([0]), dataset_type="val")
    tracer.wait_for_save()
    result = evaluate(store_dir)
    metrics = result.metrics_summary().set_index("dataset")
    assert np.isnan(metrics.loc["train", "auroc"])  # one class: no one-vs-rest AUC
    assert metrics.loc["val", "counts"] == 1
    np.testing.assert_allclose(result.issue_category_summary()[CATEGORY_RATIOS].sum(axis=1), 1.0)
    assert any("no features captured" in note for note in result.notes)


def test_feature_width_changes_between_datasets(store_dir):
    world = World(seed=8)
    logits, labels, features = train_set(world)
    tracer = ClassificationTracer(identity, "m", "v1", store=store_dir)
    record(tracer, logits, labels, features, np.arange(len(labels)).astype(str))
    tracer.wait_for_save()
    other = ClassificationTracer(identity, "m", "v1", store=store_dir)  # e.g. a different feature_layer later
    record(other, logits[:90], labels[:90], features[:90, :8], np.arange(90).astype(str), dataset="val")
    other.wait_for_save()
    result = evaluate(store_dir)
    assert any("8-d but the reference set's are 16-d" in note for note in result.notes)
    assert set(result.samples()["dataset_type"]) == {"train", "val"}


def test_feature_width_differs_between_ranks_of_one_epoch(store_dir, monkeypatch):
    rng = np.random.default_rng(9)
    for rank, width in ((0, 8), (1, 16)):  # e.g. two ranks configured with different feature layers
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        tracer = ClassificationTracer(identity, "m", "v1", store=store_dir)
        tracer.record(rng.normal(size=(50, 3)), rng.integers(0, 3, 50), input_ids=np.arange(rank * 50, rank * 50 + 50),
                      features=rng.normal(size=(50, width)))
        tracer.wait_for_save()
    result = evaluate(store_dir)
    assert result.metrics_summary().iloc[0]["counts"] == 100
    assert any("rows of different widths [8, 16]" in note for note in result.notes)
    assert not any("no features captured" in note for note in result.notes)
