"""DataFiltering: which units to label or review next, within a budget (``Result.select()``).

Every strategy ranks the units of one pool (a dataset traced without labels, or labelled data such as the
training set) and returns the first ``budget``:

- ``error_proba``: highest estimated probability of a wrong prediction first (docs/analysis.md).
- ``entropy`` / ``margin``: highest predictive entropy / smallest top-2 probability gap first (uncertainty
  sampling, Settles 2009).
- ``hotspot``: the budget is spread over the hotspot regions in proportion to their error mass (the
  expected number of errors, Σ error_proba, in an unlabelled pool; the errors in a labelled one), highest
  error_proba first within a region; without hotspot regions, over every region.
- ``diversity``: k-center greedy on the penultimate features (Sener & Savarese 2018, core-set): each pick
  is the unit farthest (Euclidean on L2-normalised features) from the already labelled reference set
  and from every earlier pick.
- ``review_labels``: labelled pools only: the label-noise and ambiguous units (aleatoric_hotspot), the
  most confident prediction against the label first.
- ``random``: a seeded uniform sample, the baseline every other strategy should beat.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from sklearn.metrics import pairwise_distances_argmin_min

from ..errors import SelectionError
from .neighbors import normalize

STRATEGIES = ("error_proba", "entropy", "margin", "hotspot", "diversity", "review_labels", "random")
FEATURE_STRATEGIES = ("diversity",)
REVIEW_CODES = ("CLS_LABEL_NOISE", "CLS_AMBIGUOUS")
SELECTION_COLUMNS = ["rank", "input_id", "dataset_type", "n_epoch", "strategy", "score", "pred", "error_proba",
                     "region"]


def check_request(budget: int, strategy: str) -> None:
    """Raise ValueError for a budget that is not a positive int or an unknown strategy."""
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1:
        raise ValueError(f"budget must be a positive int (how many units to select), got {budget!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}")


def select_units(pool: pd.DataFrame, budget: int, strategy: str, *, features: np.ndarray | None = None,
                 labelled_features: np.ndarray | None = None, seed: int = 0) -> pd.DataFrame:
    """The ``budget`` units of ``pool`` (one row per unit: input_id, pred, entropy, top2_gap, error_proba,
    region, in_hotspot_region, msp, and for labelled pools correct and error_code) that ``strategy`` picks,
    in pick order, with ``rank`` (0 first) and the strategy's ``score``.

    ``features`` (rows aligned with ``pool``) and ``labelled_features`` (the already labelled set, the
    initial centres) are used by ``diversity`` only. A budget above what the pool holds returns the whole
    pool (all candidates for ``review_labels``) with a warning.
    """
    check_request(budget, strategy)
    labelled = "correct" in pool
    if strategy == "review_labels" and not labelled:
        raise SelectionError("strategy 'review_labels' needs labels (it finds labels that disagree with the model "
                             "and the neighbours); this pool was traced without labels. Use it on a labelled "
                             "dataset_type such as 'train', or another strategy for this pool")
    if strategy == "review_labels":
        pool = pool[pool["error_code"].isin(REVIEW_CODES).to_numpy()]
    if budget > len(pool):
        what = "label-noise candidates" if strategy == "review_labels" else "units"
        warnings.warn(f"budget {budget} exceeds the {len(pool)} {what} of the pool; all {len(pool)} are returned",
                      UserWarning, stacklevel=3)
        budget = len(pool)
    if strategy == "diversity":
        order, score = _k_center_greedy(features, labelled_features, budget, seed)
    elif strategy == "hotspot":
        order, score = _hotspot_allocation(pool, budget, labelled)
    elif strategy == "random":
        order = np.random.default_rng(seed).permutation(len(pool))[:budget]
        score = np.zeros(budget)
    else:
        column, descending = {"error_proba": ("error_proba", True), "entropy": ("entropy", True),
                              "margin": ("top2_gap", False), "review_labels": ("msp", True)}[strategy]
        values = pool[column].to_numpy(dtype=float)
        order = _ranked(values if descending else -values, pool["input_id"].to_numpy())[:budget]
        score = values[order]
    picked = pool.iloc[order].assign(rank=np.arange(len(order)), strategy=strategy, score=score)
    return picked[[c for c in SELECTION_COLUMNS if c in picked]].reset_index(drop=True)


def _ranked(priority: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Indices by descending priority, ties by input_id (NaN last), so a selection is reproducible."""
    return np.lexsort((ids.astype(str), np.nan_to_num(-priority, nan=np.inf)))


def _hotspot_allocation(pool: pd.DataFrame, budget: int, labelled: bool) -> tuple[np.ndarray, np.ndarray]:
    error_proba = pool["error_proba"].to_numpy(dtype=float)
    mass = (~pool["correct"].to_numpy(dtype=bool)).astype(float) if labelled else error_proba
    region = pool["region"].to_numpy()
    candidates = pool["in_hotspot_region"].to_numpy(dtype=bool)
    if not candidates.any() or mass[candidates].sum() == 0:
        candidates = np.ones(len(pool), dtype=bool)  # no hotspot (or no error in them): spread over all regions
    regions, inverse = np.unique(region[candidates], return_inverse=True)
    region_mass = np.bincount(inverse, weights=mass[candidates], minlength=len(regions))
    sizes = np.bincount(inverse, minlength=len(regions))
    quota = _proportional_quota(region_mass if region_mass.sum() > 0 else sizes.astype(float), sizes, budget)
    index = np.flatnonzero(candidates)
    ids = pool["input_id"].to_numpy()
    order = []
    for r, take in zip(range(len(regions)), quota):  # loop over regions, not units
        members = index[inverse == r]
        order.extend(members[_ranked(error_proba[members], ids[members])[:take]])
    order = np.asarray(order, dtype=np.int64)
    order = order[_ranked(error_proba[order], ids[order])]  # most likely errors first across regions
    if len(order) < budget:  # the hotspot regions hold fewer units than the budget: fill by error_proba
        rest = np.setdiff1d(np.arange(len(pool)), order)
        order = np.concatenate([order, rest[_ranked(error_proba[rest], ids[rest])][:budget - len(order)]])
    return order, error_proba[order]


def _proportional_quota(weight: np.ndarray, capacity: np.ndarray, budget: int) -> np.ndarray:
    """Integer shares of ``budget`` proportional to ``weight`` (largest remainder), none above its capacity;
    what a full group cannot take goes to the others."""
    quota = np.zeros(len(weight), dtype=np.int64)
    budget = min(budget, int(capacity.sum()))
    while quota.sum() < budget:
        open_ = (quota < capacity) & (weight > 0)
        if not open_.any():
            open_ = quota < capacity
            weight = np.ones(len(weight))
        left = budget - quota.sum()
        ideal = np.where(open_, weight, 0.0) / weight[open_].sum() * left
        extra = np.minimum(np.floor(ideal).astype(np.int64), capacity - quota)
        remainder = left - extra.sum()
        if remainder > 0:  # largest remainders first, among groups with room left
            room = open_ & (quota + extra < capacity)
            fraction = np.where(room, ideal - np.floor(ideal), -1.0)
            for g in np.argsort(-fraction, kind="stable")[:remainder]:
                if fraction[g] >= 0:
                    extra[g] += 1
        if extra.sum() == 0:  # every share rounded to 0: one unit to the heaviest open group
            extra[np.argmax(np.where(open_, weight, -1.0))] = 1
        quota += extra
    return quota


def _k_center_greedy(features: np.ndarray | None, centers: np.ndarray | None, budget: int,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy k-center picks (indices into ``features``) and each pick's distance to its nearest centre."""
    if features is None:
        raise SelectionError("strategy 'diversity' needs features")
    points = normalize(features)
    if centers is not None and len(centers):
        _, nearest = pairwise_distances_argmin_min(points, normalize(centers))
    else:  # nothing labelled yet: the first pick is a seeded random unit (score NaN: no centre to be far from)
        nearest = np.full(len(points), np.nan)
    start = int(np.random.default_rng(seed).integers(len(points)))
    picks, scores = [], []
    for _ in range(budget):  # O(budget · N · D): one distance row per pick
        pick = start if np.isnan(nearest).all() else int(np.nanargmax(nearest))
        picks.append(pick)
        scores.append(float(nearest[pick]))
        nearest = np.fmin(nearest, np.linalg.norm(points - points[pick], axis=1))
        nearest[pick] = -1.0  # never picked twice
    return np.asarray(picks, dtype=np.int64), np.asarray(scores)
