"""Training dynamics of each unit over the saved epochs (Dataset Cartography, forgetting events, AUM).

Input: the per-epoch history of one dataset (one row per input_id and epoch, epochs up to the
evaluated one). Output: one row per input_id. Needs at least two epochs; with one, every column is NaN.

- ``confidence`` / ``variability``: mean / population std of ``p_y`` over epochs (Swayamdipta et al. 2020)
- ``correctness``: fraction of epochs predicted correctly
- ``forgetting_events``: correct -> wrong transitions between consecutive saved epochs (Toneva et al. 2019)
- ``aum``: mean ``logit_margin`` (Pleiss et al. 2020); NaN when the model gave probabilities
- ``first_learned_epoch``: first saved epoch with a correct prediction (NaN if never)
- ``recent_variability``: std of ``p_y`` over the most recent half of the epochs (at least two).

Why ``recent_variability``: models trained from scratch start near chance, so the cartography
``variability`` of almost every sample is large simply because it was learned; the category rules ask
whether a sample is unstable *now*, which the recent window measures.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

DYNAMICS_COLUMNS = ["confidence", "variability", "correctness", "forgetting_events", "aum", "first_learned_epoch",
                    "recent_variability"]


def training_dynamics(history: pd.DataFrame) -> pd.DataFrame:
    """``history`` columns: input_id, n_epoch, p_label, correct, logit_margin. Index of the result: input_id."""
    ids = pd.Index(history["input_id"].unique(), name="input_id")
    if history["n_epoch"].nunique() < 2:
        return pd.DataFrame(np.nan, index=ids, columns=DYNAMICS_COLUMNS)
    grouped = history.groupby("input_id", sort=False)
    out = pd.DataFrame(index=ids)
    out["confidence"] = grouped["p_label"].mean()
    out["variability"] = grouped["p_label"].std(ddof=0)
    out["correctness"] = grouped["correct"].mean()
    out["aum"] = grouped["logit_margin"].mean()

    correct = history.pivot(index="input_id", columns="n_epoch", values="correct").reindex(ids)
    correct = correct.sort_index(axis=1).to_numpy(dtype=float)  # NaN where a unit missed an epoch
    out["forgetting_events"] = _forgetting_events(correct)
    epochs = np.sort(history["n_epoch"].unique())
    learned = correct == 1.0
    first = np.where(learned.any(axis=1), epochs[learned.argmax(axis=1)], np.nan)
    out["first_learned_epoch"] = first
    p_label = history.pivot(index="input_id", columns="n_epoch", values="p_label").reindex(ids).sort_index(axis=1)
    window = max(2, -(-len(epochs) // 2))
    recent = p_label.to_numpy(dtype=float)[:, -window:]
    with np.errstate(invalid="ignore"):
        out["recent_variability"] = np.nanstd(recent, axis=1) if recent.size else np.nan
    return out[DYNAMICS_COLUMNS]


def _forgetting_events(correct: np.ndarray) -> np.ndarray:
    """Count correct->wrong transitions along each row, skipping epochs where the unit is missing."""
    filled = pd.DataFrame(correct).ffill(axis=1).to_numpy()  # a missing epoch carries the last state
    before, after = filled[:, :-1], filled[:, 1:]
    observed = ~np.isnan(correct[:, 1:])
    return ((before == 1.0) & (after == 0.0) & observed).sum(axis=1).astype(float)
