"""error_proba: the probability that a prediction is wrong, estimated without the unit's own label.

A small gradient-boosted classifier (scikit-learn's HistGradientBoostingClassifier, seeded) learns
"wrong vs right" on the reference set from label-free signals: ``msp``, ``top2_gap``, ``entropy``,
``neighbor_error_rate``, ``neighbor_pred_agreement`` and ``density``. K-fold cross-fitting: each
reference unit is scored by the model of the fold that held it out; other units are scored by the
mean of the K fold models, none of which saw them. The same estimator therefore serves operation-time
logging, where no label exists.

The operating threshold follows selective classification (Geifman & El-Yaniv 2017): ``τ_op`` is the
largest threshold on error_proba at which the accepted reference units (error_proba < τ) have an error
rate ≤ ``risk``; ``τ_stable`` uses ``risk / 5``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.model_selection import StratifiedKFold

ESTIMATOR_INPUTS = ["msp", "top2_gap", "entropy", "neighbor_error_rate", "neighbor_pred_agreement", "density"]
MIN_CLASS_COUNT = 5  # errors and non-errors needed in the reference set to fit at all


@dataclass
class ErrorProbaEstimator:
    """Cross-fitted error-probability model of one reference set."""

    inputs: list = field(default_factory=lambda: list(ESTIMATOR_INPUTS))  # detection passes its own signals
    folds: int = 5
    seed: int = 0
    max_train_rows: int = 20000
    models: list = field(default_factory=list)
    note: str | None = None

    def fit_predict(self, signals: pd.DataFrame, wrong: np.ndarray) -> np.ndarray:
        """Fit on the reference set and return its cross-fitted scores."""
        wrong = np.asarray(wrong, dtype=bool)
        n_wrong, n_right = int(wrong.sum()), int((~wrong).sum())
        if min(n_wrong, n_right) < MIN_CLASS_COUNT:
            self.note = (f"error_proba falls back to 1 - msp (1 - score for detection): the reference set has {n_wrong} wrong and "
                         f"{n_right} right predictions (at least {MIN_CLASS_COUNT} of each are needed to fit)")
            return baseline(signals)
        x = signals[self.inputs].to_numpy(dtype=np.float64)
        folds = min(self.folds, n_wrong, n_right)
        scores = np.empty(len(x))
        rng = np.random.default_rng(self.seed)
        for train, held_out in StratifiedKFold(folds, shuffle=True, random_state=self.seed).split(x, wrong):
            if len(train) > self.max_train_rows:  # bound the fitting cost on huge reference sets
                train = np.sort(rng.choice(train, self.max_train_rows, replace=False))
            model = HistGradientBoostingClassifier(max_iter=50, learning_rate=0.1, max_leaf_nodes=15,
                                                   min_samples_leaf=20, early_stopping=False,
                                                   random_state=self.seed)
            model.fit(x[train], wrong[train])
            scores[held_out] = model.predict_proba(x[held_out])[:, 1]
            self.models.append(model)
        return scores

    def predict(self, signals: pd.DataFrame) -> np.ndarray:
        """Score units the fold models never saw (another dataset, or operation-time logs)."""
        if not self.models:
            return baseline(signals)
        x = signals[self.inputs].to_numpy(dtype=np.float64)
        return np.mean([model.predict_proba(x)[:, 1] for model in self.models], axis=0)


def baseline(signals: pd.DataFrame) -> np.ndarray:
    return 1.0 - signals["msp"].to_numpy(dtype=np.float64)


def operating_threshold(error_proba: np.ndarray, wrong: np.ndarray, risk: float) -> float:
    """Largest τ such that units with error_proba < τ have an error rate ≤ risk (τ = -inf: accept none)."""
    if not len(error_proba):
        return float("-inf")
    values, inverse = np.unique(error_proba, return_inverse=True)
    errors = np.bincount(inverse, weights=np.asarray(wrong, dtype=float), minlength=len(values))
    counts = np.bincount(inverse, minlength=len(values))
    rate = np.cumsum(errors) / np.cumsum(counts)  # error rate when accepting every value up to this one
    ok = np.flatnonzero(rate <= risk)
    if not len(ok):
        return float(values[0])  # accept nothing: every unit has error_proba >= values[0]
    last = ok[-1]
    return float(values[last + 1]) if last + 1 < len(values) else float(np.nextafter(values[-1], np.inf))
