"""DataFiltering: ``Result.select()`` and ``mldbg select`` on real traces of a torch MLP on digits.

Each strategy is checked against an independent computation (scipy/NumPy from the model's own outputs),
and the active-learning loop of benchmarks/active_learning.py must beat random selection.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist
from scipy.special import softmax
from scipy.stats import entropy

from digits_mlp import MODEL, VERSION, active_learning, digits_splits, train_mlp
from mldbg_callbacks.cli import main as mldbg
from mldbg_callbacks.errors import SelectionError
from mldbg_callbacks.evaluation.data_filtering import REVIEW_CODES
from mldbg_callbacks.evaluator import Evaluator
from mldbg_callbacks.training import ClassificationTracer

FLIPPED = 25


@pytest.fixture(scope="module")
def pool_run(tmp_path_factory):
    """train (with 25 labels flipped) and val traced with labels, pool without; evaluated once."""
    splits = digits_splits()
    x, y, ids = splits["train"]
    noisy = y.copy()
    noisy[:FLIPPED] = (y[:FLIPPED] + 3) % 10
    model = train_mlp(x, noisy)
    store = tmp_path_factory.mktemp("pool") / "mldbg"
    with ClassificationTracer(model, MODEL, VERSION, store=store) as tracer, torch.no_grad():
        tracer(torch.from_numpy(x), torch.from_numpy(noisy), input_ids=ids, dataset_type="train")
        tracer(torch.from_numpy(splits["val"][0]), torch.from_numpy(splits["val"][1]), input_ids=splits["val"][2],
               dataset_type="val")
        tracer(torch.from_numpy(splits["pool"][0]), None, input_ids=splits["pool"][2], dataset_type="pool")
        tracer.wait_for_save()
    result = Evaluator(MODEL, VERSION, store=store).request_evaluation()
    return result, model, splits, ids[:FLIPPED], store


def _pool_outputs(model, splits):
    x, _, ids = splits["pool"]
    with torch.no_grad():
        hidden = model[1](model[0](torch.from_numpy(x)))  # the input of the last Linear layer
        probs = softmax(model[2](hidden).numpy().astype(np.float64), axis=1)
    return ids.astype(str), probs, hidden.numpy()


def test_uncertainty_strategies_pick_what_scipy_ranks_first(pool_run):
    result, model, splits, _, _ = pool_run
    ids, probs, _ = _pool_outputs(model, splits)
    top2 = np.sort(probs, axis=1)[:, -2:]
    expected = {"entropy": ids[np.argsort(-entropy(probs, axis=1))[:40]],
                "margin": ids[np.argsort(top2[:, 1] - top2[:, 0])[:40]]}
    for strategy, ids_expected in expected.items():
        selected = result.select(40, strategy)  # default pool: the one dataset traced without labels
        assert (selected["dataset_type"] == "pool").all()
        assert selected["input_id"].tolist() == ids_expected.tolist(), strategy
        assert selected["rank"].tolist() == list(range(40))
    unlabelled = result.unlabelled()
    by_error_proba = unlabelled.sort_values("error_proba", ascending=False)["input_id"].head(40).tolist()
    assert result.select(40, "error_proba")["input_id"].tolist() == by_error_proba


def test_random_is_a_seeded_sample_without_repeats(pool_run):
    result, _, splits, _, _ = pool_run
    first, again, other = (result.select(100, "random", seed=s)["input_id"] for s in (1, 1, 2))
    assert first.tolist() == again.tolist() and first.tolist() != other.tolist()
    assert first.is_unique and set(first) <= set(splits["pool"][2].astype(str))


def test_hotspot_spreads_the_budget_over_hotspot_regions_by_error_mass(pool_run):
    result, *_ = pool_run
    pool = result.unlabelled()
    hot = pool[pool["in_hotspot_region"]]
    assert hot["region"].nunique() >= 2, "the fixture should have several hotspot regions"
    budget = 30
    mass = hot.groupby("region")["error_proba"].sum()
    ideal = budget * mass / mass.sum()
    quota = np.floor(ideal).astype(int)  # largest remainder (Hamilton) apportionment
    quota[(ideal - quota).sort_values(ascending=False).index[:budget - quota.sum()]] += 1
    selected = result.select(budget, "hotspot")
    counts = selected.groupby("region").size().reindex(quota.index, fill_value=0)
    assert counts.to_dict() == quota.to_dict()
    for region, group in selected.groupby("region"):  # the most likely errors of each region
        members = hot[hot["region"] == region].sort_values("error_proba", ascending=False)
        assert set(group["input_id"]) == set(members["input_id"].head(len(group)))


def test_diversity_is_k_center_greedy_on_the_stored_features(pool_run):
    result, model, splits, _, _ = pool_run
    ids, _, hidden = _pool_outputs(model, splits)
    with torch.no_grad():
        labelled = model[1](model[0](torch.from_numpy(splits["train"][0]))).numpy()

    def unit(v):  # features are stored as float16
        v = v.astype(np.float16).astype(np.float64)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    points, centres = unit(hidden), unit(labelled)
    nearest = cdist(points, centres).min(axis=1)
    expected = []
    for _ in range(20):
        pick = int(np.argmax(nearest))
        expected.append(ids[pick])
        nearest = np.minimum(nearest, cdist(points, points[pick:pick + 1])[:, 0])
    selected = result.select(20, "diversity")
    assert selected["input_id"].tolist() == expected
    assert np.all(np.diff(selected["score"]) <= 1e-6)  # each pick is nearer to its centres than the last
    # a labelled pool has no labelled set apart from itself: a seeded random first pick, then farthest-first
    train = result.select(10, "diversity", dataset_type="train", seed=3)
    assert train["input_id"].is_unique and np.isnan(train["score"].iloc[0]) and train["score"].iloc[1:].notna().all()


def test_review_labels_finds_the_flipped_labels_most_confident_first(pool_run):
    result, _, _, flipped, _ = pool_run
    selected = result.select(FLIPPED, "review_labels", dataset_type="train")
    precision = np.isin(selected["input_id"].astype(int), flipped).mean()
    assert precision >= 0.6  # 25 of 500 labels flipped: random picks would score 0.05
    assert np.all(np.diff(selected["score"]) <= 0)  # msp, most confident prediction first
    samples = result.samples().set_index("input_id")
    assert samples.loc[selected["input_id"], "error_code"].isin(REVIEW_CODES).all()
    with pytest.raises(SelectionError, match="'review_labels' needs labels.*traced without labels"):
        result.select(10, "review_labels")


def test_bad_budgets_and_strategies_are_refused_or_warned(pool_run):
    result, *_ = pool_run
    pool_size = len(result.unlabelled())
    with pytest.warns(UserWarning, match=f"budget 5000 exceeds the {pool_size} units of the pool"):
        assert len(result.select(5000, "entropy")) == pool_size
    for budget in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="budget must be a positive int"):
            result.select(budget)
    with pytest.raises(ValueError, match=r"strategy must be one of \['error_proba', 'entropy'"):
        result.select(10, "uncertainty")
    with pytest.raises(ValueError, match="dataset_type 'test' is not in this result"):
        result.select(10, dataset_type="test")


def test_a_pool_without_features_names_the_fix_and_other_strategies_work(tmp_path):
    splits = digits_splits()
    model = train_mlp(*splits["train"][:2])
    store = tmp_path / "mldbg"
    with ClassificationTracer(model, MODEL, VERSION, store=store, feature_layer=False) as tracer, torch.no_grad():
        tracer(torch.from_numpy(splits["train"][0]), torch.from_numpy(splits["train"][1]),
               input_ids=splits["train"][2], dataset_type="train")
        tracer(torch.from_numpy(splits["pool"][0]), None, input_ids=splits["pool"][2], dataset_type="pool")
        tracer.wait_for_save()
    result = Evaluator(MODEL, VERSION, store=store).request_evaluation()
    with pytest.raises(SelectionError, match=r"'diversity' needs penultimate features.*feature_layer=None.*"
                                             r"error_proba, entropy, margin, hotspot and random need none"):
        result.select(10, "diversity")
    for strategy in ("error_proba", "entropy", "margin", "hotspot", "random"):
        assert len(result.select(10, strategy)) == 10


def test_selected_ids_go_to_a_file_and_the_cli_writes_the_same(pool_run, tmp_path, capsys):
    result, _, _, _, store = pool_run
    expected = result.select(15, "margin", output=tmp_path / "ids.txt")
    assert (tmp_path / "ids.txt").read_text().splitlines() == expected["input_id"].tolist()
    code = mldbg(["--store", str(store), "select", MODEL, VERSION, "--budget", "15", "--strategy", "margin",
                  "--result", result.result_name, "-o", str(tmp_path / "cli.txt")])
    assert code == 0 and "15 unit(s) selected by margin" in capsys.readouterr().out
    assert (tmp_path / "cli.txt").read_text() == (tmp_path / "ids.txt").read_text()
    assert mldbg(["--store", str(store), "select", MODEL, VERSION, "--budget", "5", "--strategy", "bogus"]) == 2
    assert "strategy must be one of" in capsys.readouterr().out


# -- evidence: active learning on digits -------------------------------------------------------------------
@pytest.fixture(scope="module")
def curves(tmp_path_factory):
    return active_learning.run(seeds=2, rounds=3, budget=40, seed_size=40, strategies=("random", "error_proba"),
                      store=str(tmp_path_factory.mktemp("al")))


def test_selection_by_error_proba_beats_random_selection(curves):
    ours, chance = (np.array(curves["mean_accuracy"][s]) for s in ("error_proba", "random"))
    assert ours[0] == chance[0]  # the same seed set before the first selection
    assert np.all(ours[1:] > chance[1:]), curves["mean_accuracy"]  # after every round, averaged over 2 seeds
    assert ours[-1] - chance[-1] >= 0.02
