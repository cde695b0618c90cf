"""Operation-time monitoring of data traced without labels: per time window shares and drift.

Per window (``logged_at``, UTC, e.g. hour or day) of a dataset traced without labels:

- shares of units accepted / rejected at ``τ_op``, out of distribution (density ≥ 99th percentile of the
  reference), in a hotspot region of the reference, and the mean error_proba;
- the predicted-class distribution and its population stability index against the baseline,
  ``PSI = Σ (a - b) · ln(a / b)`` over classes (shares floored at 1e-4), flagged at ``PSI ≥ 0.25``
  (the conventional "major shift" level);
- a two-sample Kolmogorov-Smirnov statistic (scipy ``ks_2samp``) per signal (``msp``, ``error_proba``,
  ``density``) against the baseline, flagged when its p-value is below 0.01 / 3 (Bonferroni over the three
  signals) and the statistic is at least 0.1 (so huge windows do not flag negligible differences).

Detection (one unit per image, ``detection.label_free_images``): the predicted class of an image is the
class of its top reported detection, "no detection" (-1) being a class of its own, and the KS signals are
``max_score``, ``error_proba``, ``expected_errors`` and, when image-level features were traced, ``density``
(``DETECTION_KS_SIGNALS``).

Windows with fewer than ``MIN_WINDOW_UNITS`` units are summarised but never flagged. The baseline is a
labelled dataset evaluated against the same reference (e.g. ``val``: held-out data of the training
distribution), else the reference set itself; the training set's own msp and error_proba are optimistic
(the model fitted it), so comparing against it would flag the generalisation gap as drift.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import ks_2samp

PSI_DRIFT = 0.25
PSI_FLOOR = 1e-4
KS_SIGNALS = ("msp", "error_proba", "density")
DETECTION_KS_SIGNALS = ("max_score", "error_proba", "expected_errors", "density")  # density: with features
KS_ALPHA = 0.01
KS_MIN_STATISTIC = 0.1
MIN_WINDOW_UNITS = 30


def population_stability_index(actual: np.ndarray, expected: np.ndarray, num_classes: int) -> float:
    """PSI of two samples of class indices over ``num_classes`` classes (shares floored at 1e-4)."""
    a = np.bincount(actual, minlength=num_classes) / max(len(actual), 1)
    b = np.bincount(expected, minlength=num_classes) / max(len(expected), 1)
    a, b = np.clip(a, PSI_FLOOR, None), np.clip(b, PSI_FLOOR, None)
    return float(np.sum((a - b) * np.log(a / b)))


def window_summary(units: pd.DataFrame, baseline: pd.DataFrame, window: str,
                   signals: tuple[str, ...] = KS_SIGNALS) -> pd.DataFrame:
    """One row per ``window`` (a pandas frequency: ``"h"``, ``"D"``, ``"15min"``...) of ``units`` (the
    ``unlabelled`` table of one dataset, with ``logged_at``) against ``baseline`` (per-unit rows with pred,
    msp, error_proba, density): counts, shares, predicted-class shares, PSI, KS per signal of ``signals``
    and ``drift`` with its ``drift_reasons``. A signal missing on either side (all NaN: detection's density)
    is not tested."""
    classes = np.union1d(units["pred"].to_numpy(dtype=np.int64), baseline["pred"].to_numpy(dtype=np.int64))
    num_classes = len(classes)  # class ids as indices into ``classes`` (detection's "no detection" is -1)
    baseline_pred = np.searchsorted(classes, baseline["pred"].to_numpy(dtype=np.int64))
    signals = tuple(s for s in signals if baseline[s].notna().any() and units[s].notna().any())
    rows = []
    for start, group in units.groupby(units["logged_at"].dt.floor(window), sort=True):
        pred = np.searchsorted(classes, group["pred"].to_numpy(dtype=np.int64))
        shares = np.bincount(pred, minlength=num_classes) / len(group)
        row = {"window_start": start, "counts": len(group),
               "accepted_ratio": float(group["accepted"].mean()),
               "rejected_ratio": float(1.0 - group["accepted"].mean()),
               "ood_ratio": float(group["out_of_distribution"].mean()),
               "hotspot_region_ratio": float(group["in_hotspot_region"].mean()),
               "mean_error_proba": float(group["error_proba"].mean()),
               "pred_distribution": {int(c): round(float(s), 4) for c, s in zip(classes, shares) if s > 0},
               "psi_pred": population_stability_index(pred, baseline_pred, num_classes)}
        reasons = []
        if row["psi_pred"] >= PSI_DRIFT:
            reasons.append(f"predicted classes PSI {row['psi_pred']:.2f} >= {PSI_DRIFT}")
        for signal in signals:
            test = ks_2samp(group[signal].to_numpy(dtype=float), baseline[signal].to_numpy(dtype=float))
            row[f"ks_{signal}"], row[f"ks_{signal}_pvalue"] = float(test.statistic), float(test.pvalue)
            if test.pvalue < KS_ALPHA / len(signals) and test.statistic >= KS_MIN_STATISTIC:
                reasons.append(f"{signal} KS {test.statistic:.2f} (p={test.pvalue:.1e})")
        enough = len(group) >= MIN_WINDOW_UNITS
        row["drift"] = bool(reasons) and enough
        row["drift_reasons"] = "; ".join(reasons) if enough else f"fewer than {MIN_WINDOW_UNITS} units: not tested"
        rows.append(row)
    return pd.DataFrame(rows)
