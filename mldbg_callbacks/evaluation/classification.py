"""Classification analysis: per-unit signals and the metrics of ``Result.metrics_summary()``.

Definitions follow docs/analysis.md; everything is vectorised over samples (loops run over classes
at most).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
from scipy.special import entr, softmax
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score, roc_auc_score

from ..core.vectors import decode_vectors

METRIC_COLUMNS = ["dataset", "counts", "accuracy", "auroc", "auprc", "net_entropy_loss", "net_entropy",
                  "error_proba_auroc", "error_proba_auprc"]
_EPS = np.finfo(np.float64).eps  # the clipping scikit-learn's log_loss applies to float64 inputs


@dataclass
class ClassificationUnits:
    """The traces of one dataset_type as arrays: one row per (input_id, n_epoch)."""

    input_id: np.ndarray
    n_epoch: np.ndarray
    rank: np.ndarray
    label: np.ndarray
    probs: np.ndarray  # (N, C) float64
    logits: np.ndarray | None  # (N, C) float64 when the model gave logits and they were stored densely
    logit_margin: np.ndarray | None
    features: np.ndarray | None  # (N, D) float32
    feature_problem: str | None = None  # why stored features could not be used
    logged_at: np.ndarray | None = None  # datetime64[us] (UTC) of rows traced with a time, NaT elsewhere

    def __len__(self) -> int:
        return len(self.label)

    @property
    def labelled(self) -> np.ndarray:
        """Rows traced with a label (``labels=None`` rows carry label -1)."""
        return self.label >= 0

    def take(self, index: np.ndarray) -> "ClassificationUnits":
        def pick(a):
            return None if a is None else a[index]

        return ClassificationUnits(self.input_id[index], self.n_epoch[index], self.rank[index],
                                   self.label[index], self.probs[index], pick(self.logits),
                                   pick(self.logit_margin), pick(self.features), self.feature_problem,
                                   pick(self.logged_at))


def _matrix(table: pa.Table, column: str, dtype=np.float64) -> np.ndarray:
    return decode_vectors(table, column).astype(dtype, copy=False)


def load_units(table: pa.Table, meta: dict) -> ClassificationUnits:
    """Decode stored rows (dense or top-k scores, optional features) into arrays; a null label (a row
    traced without one) becomes -1."""
    label = table.column("label").fill_null(-1).to_numpy().astype(np.int64)
    logits = logit_margin = None
    if "logits" in table.column_names:
        logits = _matrix(table, "logits")
        probs = softmax(logits, axis=1)
    elif "probs" in table.column_names:
        probs = _matrix(table, "probs")
        probs = probs / np.clip(probs.sum(axis=1, keepdims=True), _EPS, None)
    else:
        probs = _dense_from_topk(table, label, int(meta["num_classes"]))
    if "logit_margin" in table.column_names:  # of an unlabelled row it is the prediction's margin: not AUM
        logit_margin = np.where(label >= 0, table.column("logit_margin").to_numpy().astype(np.float64), np.nan)
    features, feature_problem = None, None
    if "features" in table.column_names:
        try:
            features = _matrix(table, "features", np.float32)
        except ValueError as exc:  # e.g. ranks that captured different layers
            feature_problem = str(exc)
    logged_at = None
    if "logged_at" in table.column_names:
        logged_at = table.column("logged_at").cast(pa.timestamp("us")).to_numpy()  # UTC, naive datetime64
    return ClassificationUnits(feature_problem=feature_problem, logged_at=logged_at,
        input_id=np.asarray(table.column("input_id").to_pylist(), dtype=object),
        n_epoch=table.column("n_epoch").to_numpy().astype(np.int64),
        rank=table.column("rank").to_numpy().astype(np.int64),
        label=label, probs=probs, logits=logits, logit_margin=logit_margin, features=features)


def _dense_from_topk(table: pa.Table, label: np.ndarray, num_classes: int) -> np.ndarray:
    """Top-k storage back to a full matrix: stored probabilities exact, the rest of the mass spread evenly."""
    index = _matrix(table, "topk_index", np.int64)
    top = _matrix(table, "topk_prob")
    label_prob = table.column("label_prob").to_numpy().astype(np.float64)
    rows = np.arange(len(label))
    # an unlabelled row stored the predicted class's probability (the largest, always among the top k)
    label = np.where(label >= 0, label, index[rows, top.argmax(axis=1)])
    label_in_top = (index == label[:, None]).any(axis=1)
    stored_mass = top.sum(axis=1) + np.where(label_in_top, 0.0, label_prob)
    stored_count = index.shape[1] + (~label_in_top)
    rest = np.clip(1.0 - stored_mass, 0.0, None) / np.maximum(num_classes - stored_count, 1)
    probs = np.repeat(rest[:, None], num_classes, axis=1)
    np.put_along_axis(probs, index, top, axis=1)
    probs[rows, label] = label_prob
    return probs


def drop_duplicate_units(units: ClassificationUnits) -> tuple[ClassificationUnits, int]:
    """Keep one row per (n_epoch, input_id): the lowest rank's (distributed samplers pad the last batch
    with samples another rank already traced) and, within a rank, the newest row (an epoch traced
    again after resuming from an earlier checkpoint replaces the stale rows)."""
    frame = pd.DataFrame({"n_epoch": units.n_epoch, "input_id": units.input_id, "rank": units.rank})
    newest_first = -np.arange(len(units))
    order = np.lexsort((newest_first, units.rank, units.n_epoch))
    keep = order[~frame.iloc[order].duplicated(["n_epoch", "input_id"]).to_numpy()]
    keep.sort()
    return units.take(keep), len(units) - len(keep)


def prediction_signals(units: ClassificationUnits) -> pd.DataFrame:
    """The per-unit signals that need no label: input_id, n_epoch, pred, entropy, msp, top2_gap."""
    probs = units.probs
    top2 = np.partition(probs, probs.shape[1] - 2, axis=1)[:, -2:] if probs.shape[1] > 1 else np.c_[probs, probs]
    return pd.DataFrame({
        "input_id": units.input_id,
        "n_epoch": units.n_epoch,
        "pred": probs.argmax(axis=1),
        "entropy": entr(probs).sum(axis=1),
        "msp": probs.max(axis=1),
        "top2_gap": top2[:, 1] - top2[:, 0],
    })


def unit_signals(units: ClassificationUnits) -> pd.DataFrame:
    """Per-unit signals from probabilities and labels (docs/analysis.md, 'Per-unit signals')."""
    probs, label = units.probs, units.label
    rows = np.arange(len(label))
    p_label = probs[rows, label]
    others = probs.copy()
    others[rows, label] = -np.inf
    frame = prediction_signals(units)
    frame.insert(2, "label", label)
    frame.insert(4, "loss", -np.log(np.clip(p_label, _EPS, 1.0)))
    frame["p_label"] = p_label
    frame["margin"] = p_label - others.max(axis=1)
    frame["correct"] = frame["pred"].to_numpy() == label
    if units.logits is not None:
        other_logits = units.logits.copy()
        other_logits[rows, label] = -np.inf
        frame["logit_margin"] = units.logits[rows, label] - other_logits.max(axis=1)
    elif units.logit_margin is not None:
        frame["logit_margin"] = units.logit_margin
    else:
        frame["logit_margin"] = np.nan
    return frame


def macro_ovr_auroc(label: np.ndarray, probs: np.ndarray) -> float:
    """Mean one-vs-rest ROC-AUC over the classes present with both positives and negatives.

    Computed for all classes at once from column ranks (Mann-Whitney U, ties averaged exactly as
    scikit-learn's roc_auc_score does).
    """
    classes = _scorable_classes(label, probs.shape[1])
    if not len(classes):
        return float("nan")
    scores = probs[:, classes]
    positive = label[:, None] == classes[None, :]
    ranks = rankdata(scores, axis=0)
    n_pos = positive.sum(axis=0)
    n_neg = len(label) - n_pos
    u = (ranks * positive).sum(axis=0) - n_pos * (n_pos + 1) / 2.0
    return float(np.mean(u / (n_pos * n_neg)))


def macro_ovr_auprc(label: np.ndarray, probs: np.ndarray) -> float:
    """Mean one-vs-rest average precision over the classes present with both positives and negatives."""
    classes = _scorable_classes(label, probs.shape[1])
    if not len(classes):
        return float("nan")
    return float(np.mean([average_precision_score(label == c, probs[:, c]) for c in classes]))


def _scorable_classes(label: np.ndarray, num_classes: int) -> np.ndarray:
    counts = np.bincount(label, minlength=num_classes)
    return np.flatnonzero((counts > 0) & (counts < len(label)))


def _binary_scores(wrong: np.ndarray, score: np.ndarray) -> tuple[float, float]:
    if wrong.all() or not wrong.any():
        return float("nan"), float("nan")
    return float(roc_auc_score(wrong, score)), float(average_precision_score(wrong, score))


def metrics_row(dataset: str, units: ClassificationUnits, samples: pd.DataFrame) -> dict:
    """One row of metrics_summary() for one dataset (and epoch), plus the 1 - msp baseline's scores."""
    wrong = ~samples["correct"].to_numpy()
    ep_auroc, ep_auprc = _binary_scores(wrong, samples["error_proba"].to_numpy())
    base_auroc, base_auprc = _binary_scores(wrong, 1.0 - samples["msp"].to_numpy())
    return {
        "dataset": dataset,
        "counts": int(len(samples)),
        "accuracy": float(samples["correct"].mean()) if len(samples) else float("nan"),
        "auroc": macro_ovr_auroc(units.label, units.probs),
        "auprc": macro_ovr_auprc(units.label, units.probs),
        "net_entropy_loss": float(samples["loss"].sum()),
        "net_entropy": float(samples["entropy"].sum()),
        "error_proba_auroc": ep_auroc,
        "error_proba_auprc": ep_auprc,
        "baseline_error_proba_auroc": base_auroc,
        "baseline_error_proba_auprc": base_auprc,
    }


def unlabelled_metrics_row(dataset: str, samples: pd.DataFrame) -> dict:
    """The metrics_summary() row of a dataset traced without labels: its count; every metric that needs a
    label is NaN (the label-free shares are in ``Result.unlabelled_summary()``)."""
    return {column: float("nan") for column in METRIC_COLUMNS[2:]} | {
        "dataset": dataset, "counts": int(len(samples)),
        "baseline_error_proba_auroc": float("nan"), "baseline_error_proba_auprc": float("nan")}
