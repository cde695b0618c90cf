"""The classification evaluation, end to end: traces -> per-unit table, metrics, categories, history.

Order of work for one evaluated (dataset_type, epoch):

1. per-epoch scalar signals of every saved epoch up to the evaluated one (the *history*), from which
   the training dynamics are computed;
2. the *reference set*: the ``train`` traces of the same epoch (else the nearest earlier train epoch,
   else the dataset itself with each unit left out of its own neighbourhood); on it the kNN index,
   the k-means regions, the cross-fitted error_proba estimator and the operating thresholds are built,
   once per reference and embedding;
3. feature-space signals of the evaluated units against the reference, error_proba, regions,
   categories and error codes.

Rows traced without a label (``labels=None``: operation-time logs, an unlabelled pool) are evaluated
apart, into the ``unlabelled`` table: only what needs no label (error_proba from the reference's
estimator, accepted/rejected at ``τ_op``, the reference's regions and hotspots, density and
out-of-distribution), never against themselves: they need a labelled reference set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa

from ..errors import NoReferenceError
from .classification import (ClassificationUnits, drop_duplicate_units, load_units, metrics_row, prediction_signals,
                             unit_signals, unlabelled_metrics_row)
from .dynamics import training_dynamics
from .error_proba import ErrorProbaEstimator, operating_threshold
from .issues import CATEGORY_SUMMARY_ORDER, assign_classification, assign_unlabelled
from .neighbors import NeighborIndex, fit_regions, hotspot_regions, neighbor_signals, normalize
from .selection import reference_key

HISTORY_COLUMNS = ["dataset_type", "n_epoch", "input_id", "label", "pred", "correct", "loss", "entropy", "msp",
                   "margin", "logit_margin", "p_label"]
ReadTraces = Callable[[str, int, bool], pa.Table]  # (dataset_type, epoch, with_features) -> table


@dataclass
class Reference:
    """Everything built once on a reference set and reused for every dataset evaluated against it."""

    name: str  # e.g. "train@3"
    embedding_kind: str  # "features" | "probs"
    index: NeighborIndex
    neighbor_signals: dict
    mean_distance: np.ndarray
    estimator: ErrorProbaEstimator
    scores: np.ndarray
    tau_op: float
    tau_stable: float
    regions: object
    region_error_rate: pd.Series  # per region of the reference: its error rate there
    hotspot_regions: np.ndarray  # the reference's hotspot region ids

    def regions_of(self, embedding: np.ndarray) -> np.ndarray:
        """The reference region of every row of ``embedding`` (all 0 when there are too few units for k-means)."""
        if self.regions is None:
            return np.zeros(len(embedding), dtype=np.int64)
        return self.regions.predict(normalize(embedding).astype(np.float64))


@dataclass
class ClassificationEvaluation:
    samples: pd.DataFrame
    metrics: pd.DataFrame
    categories: pd.DataFrame
    history: pd.DataFrame
    thresholds: list[dict]
    notes: list[str]
    unlabelled: pd.DataFrame | None = None


def evaluate_classification(read: ReadTraces, meta: dict, epochs: dict[str, list[int]],
                            committed: dict[str, list[int]], risk: float = 0.05,
                            progress: Callable[[str, int, int], None] | None = None) -> ClassificationEvaluation:
    """``epochs``: evaluated epochs per dataset_type; ``committed``: every readable epoch per dataset_type."""
    if not 0.0 < risk < 1.0:
        raise ValueError(f"risk must be in (0, 1), got {risk!r}")
    run = _Run(read, meta, committed, risk)
    samples, unlabelled, metrics, thresholds = [], [], [], []
    jobs = [(d, e) for d, es in epochs.items() for e in es]
    for done, (dataset_type, epoch) in enumerate(jobs):
        if progress:
            progress(f"{dataset_type} epoch {epoch}", done, len(jobs))
        all_units = run.units(dataset_type, epoch)
        if all_units.labelled.any():
            frame, units, reference = run.evaluate(dataset_type, epoch)
            samples.append(frame)
            metrics.append({**metrics_row(dataset_type, units, frame), "n_epoch": epoch})
        if not all_units.labelled.all():
            frame, reference = run.evaluate_unlabelled(dataset_type, epoch)
            unlabelled.append(frame)
            if not all_units.labelled.any():
                metrics.append({**unlabelled_metrics_row(dataset_type, frame), "n_epoch": epoch})
        thresholds.append({"dataset": dataset_type, "n_epoch": epoch, "reference": reference.name,
                           "embedding": reference.embedding_kind, "tau_op": reference.tau_op,
                           "tau_stable": reference.tau_stable, "risk": risk})
    samples_frame = pd.concat(samples, ignore_index=True) if samples else pd.DataFrame(
        columns=["dataset_type", "n_epoch", "input_id", "label", "pred", "correct", "category", "error_code"])
    categories = category_summary(samples_frame)
    histories = [h[h["n_epoch"] <= max(epochs[d])] for d, h in run.history.items() if d in epochs]
    history = pd.concat(histories, ignore_index=True) if histories else pd.DataFrame(columns=HISTORY_COLUMNS)
    return ClassificationEvaluation(samples_frame, pd.DataFrame(metrics), categories, history, thresholds,
                                    run.notes, pd.concat(unlabelled, ignore_index=True) if unlabelled else None)


def self_label_agreement(embedding: np.ndarray, units: ClassificationUnits, wrong: np.ndarray) -> np.ndarray:
    """Share of a unit's nearest neighbours *within its own dataset* (itself left out) that carry its label.

    Separates label noise (a label that disagrees with its neighbours everywhere) from a coherent group
    of units the model gets wrong (whose labels agree with each other but not with the reference).
    """
    index = NeighborIndex.build(embedding, units.input_id, units.label, wrong)
    neighbors, _ = index.query(embedding, input_id=units.input_id)
    if neighbors.shape[1] == 0:
        return np.full(len(units), np.nan)
    return (index.base_label[neighbors] == units.label[:, None]).mean(axis=1)


def category_summary(samples: pd.DataFrame) -> pd.DataFrame:
    """Share of each category per dataset and epoch; the six ratios sum to 1."""
    if samples.empty:
        return pd.DataFrame(columns=["dataset", "n_epoch", *[f"{c}_ratio" for c in CATEGORY_SUMMARY_ORDER]])
    counts = pd.crosstab([samples["dataset_type"], samples["n_epoch"]], samples["category"])
    counts = counts.reindex(columns=CATEGORY_SUMMARY_ORDER, fill_value=0)
    ratios = counts.div(counts.sum(axis=1), axis=0)
    ratios.columns = [f"{c}_ratio" for c in ratios.columns]
    return ratios.reset_index().rename(columns={"dataset_type": "dataset"})


class _Run:
    def __init__(self, read: ReadTraces, meta: dict, committed: dict[str, list[int]], risk: float):
        self.read, self.meta, self.committed, self.risk = read, meta, committed, risk
        self.notes: list[str] = []
        self._units: dict[tuple[str, int], ClassificationUnits] = {}
        self._references: dict[tuple[str, int, str], Reference] = {}
        self.history: dict[str, pd.DataFrame] = {}

    # -- data --------------------------------------------------------------------------------
    def labelled_units(self, dataset_type: str, epoch: int) -> ClassificationUnits:
        """The rows of a dataset and epoch traced with a label."""
        units = self.units(dataset_type, epoch)
        return units if units.labelled.all() else units.take(np.flatnonzero(units.labelled))

    def units(self, dataset_type: str, epoch: int) -> ClassificationUnits:
        """Every row of a dataset and epoch (unlabelled ones carry label -1)."""
        key = (dataset_type, epoch)
        if key not in self._units:
            units, duplicates = drop_duplicate_units(load_units(self.read(dataset_type, epoch, True), self.meta))
            if units.feature_problem:
                self.note(f"{dataset_type} epoch {epoch}: stored features are not used ({units.feature_problem}); "
                          "feature-space signals use the probabilities")
            if duplicates:
                self.note(f"{dataset_type} epoch {epoch}: {duplicates} duplicate input_id(s) across ranks removed "
                          "(distributed sampler padding)")
            self._units[key] = units
        return self._units[key]

    def history_of(self, dataset_type: str, upto: int) -> pd.DataFrame:
        """Scalar per-epoch signals of every committed epoch <= upto (read without features)."""
        have = self.history.get(dataset_type)
        needed = [e for e in self.committed.get(dataset_type, []) if e <= upto]
        missing = [e for e in needed if have is None or e not in set(have["n_epoch"])]
        frames = [] if have is None else [have]
        for epoch in missing:
            if (dataset_type, epoch) in self._units:
                units = self._units[(dataset_type, epoch)]
            else:
                units, _ = drop_duplicate_units(load_units(self.read(dataset_type, epoch, False), self.meta))
            signals = unit_signals(units.take(np.flatnonzero(units.labelled)))
            signals.insert(0, "dataset_type", dataset_type)
            frames.append(signals[HISTORY_COLUMNS])
        if frames:
            self.history[dataset_type] = pd.concat(frames, ignore_index=True).sort_values(["n_epoch", "input_id"],
                                                                                             kind="stable")
        return self.history[dataset_type][self.history[dataset_type]["n_epoch"] <= upto]

    def note(self, message: str) -> None:
        if message not in self.notes:
            self.notes.append(message)

    # -- reference ----------------------------------------------------------------------------
    def reference_key(self, dataset_type: str, epoch: int) -> tuple[str, int]:
        return reference_key(self.committed, dataset_type, epoch, self.note)

    def embedding(self, units: ClassificationUnits, kind: str) -> np.ndarray:
        return units.features if kind == "features" else units.probs

    def reference(self, key: tuple[str, int], kind: str) -> Reference:
        cache_key = (*key, kind)
        if cache_key in self._references:
            return self._references[cache_key]
        units = self.labelled_units(*key)
        if not len(units):
            raise NoReferenceError(
                f"the reference set, {key[0]} epoch {key[1]}, was traced without labels: error_proba, regions and "
                "density are learnt on labelled data. Trace the training data with labels to evaluate against it")
        signals = unit_signals(units)
        wrong = ~signals["correct"].to_numpy()
        embedding = self.embedding(units, kind)
        index = NeighborIndex.build(embedding, units.input_id, units.label, wrong)
        neighbors, distances = index.query(embedding, input_id=units.input_id)
        own = neighbor_signals(index, neighbors, distances, units.label, signals["pred"].to_numpy(), None)
        estimator = ErrorProbaEstimator()
        scores = estimator.fit_predict(signals.assign(**own), wrong)
        if estimator.note:
            self.note(f"{key[0]}@{key[1]}: {estimator.note}")
        regions = fit_regions(embedding)
        reference = Reference(
            name=f"{key[0]}@{key[1]}", embedding_kind=kind, index=index, neighbor_signals=own,
            mean_distance=np.sort(own["mean_neighbor_distance"]), estimator=estimator, scores=scores,
            tau_op=operating_threshold(scores, wrong, self.risk),
            tau_stable=operating_threshold(scores, wrong, self.risk / 5), regions=regions,
            region_error_rate=pd.Series(dtype=float), hotspot_regions=np.empty(0, dtype=np.int64))
        region = reference.regions_of(embedding)
        rate, hot = hotspot_regions(region, wrong)
        reference.region_error_rate = pd.Series(rate, index=region).groupby(level=0).first()
        reference.hotspot_regions = np.unique(region[hot])
        self._references[cache_key] = reference
        return reference

    def embedding_kind(self, units: ClassificationUnits, ref_units: ClassificationUnits, dataset_type: str,
                       epoch: int) -> str:
        """``"features"`` when both the evaluated units and the reference have features of one width, else
        ``"probs"`` (with a note saying why)."""
        kind = "features"
        if units.features is None or ref_units.features is None:
            kind = "probs"
            if not (units.feature_problem or ref_units.feature_problem):  # already noted when loading
                self.note(f"{dataset_type} epoch {epoch}: no features captured; feature-space signals use "
                          "the predicted probabilities instead")
        elif units.features.shape[1] != ref_units.features.shape[1]:
            kind = "probs"
            self.note(f"{dataset_type} epoch {epoch}: features are {units.features.shape[1]}-d but the reference "
                      f"set's are {ref_units.features.shape[1]}-d; feature-space signals use the probabilities")
        return kind

    # -- one dataset and epoch ----------------------------------------------------------------
    def evaluate(self, dataset_type: str, epoch: int) -> tuple[pd.DataFrame, ClassificationUnits, Reference]:
        units = self.labelled_units(dataset_type, epoch)
        ref_key = self.reference_key(dataset_type, epoch)
        kind = self.embedding_kind(units, self.labelled_units(*ref_key), dataset_type, epoch)
        reference = self.reference(ref_key, kind)
        is_reference = ref_key == (dataset_type, epoch)

        frame = unit_signals(units)
        embedding = self.embedding(units, kind)
        if is_reference:
            own, error_proba = reference.neighbor_signals, reference.scores
            dataset_agreement = own["neighbor_label_agreement"]
        else:
            neighbors, distances = reference.index.query(embedding)
            own = neighbor_signals(reference.index, neighbors, distances, units.label, frame["pred"].to_numpy(),
                                   reference.mean_distance)
            error_proba = reference.estimator.predict(frame.assign(**own))
            dataset_agreement = self_label_agreement(embedding, units, ~frame["correct"].to_numpy())
        for name, values in own.items():
            frame[name] = values
        frame["dataset_label_agreement"] = dataset_agreement
        frame["error_proba"] = error_proba
        wrong = ~frame["correct"].to_numpy()
        region = reference.regions_of(embedding)
        frame["region"] = region
        frame["region_error_rate"], frame["in_hotspot_region"] = hotspot_regions(region, wrong)

        dynamics = training_dynamics(self.history_of(dataset_type, epoch))
        if dynamics["variability"].isna().all():
            self.note(f"{dataset_type} epoch {epoch}: fewer than two saved epochs, so no training dynamics")
        frame = frame.join(dynamics, on="input_id")
        frame = assign_classification(frame, reference.tau_op, reference.tau_stable, reference=is_reference)
        frame.insert(0, "dataset_type", dataset_type)
        return frame, units, reference

    def evaluate_unlabelled(self, dataset_type: str, epoch: int) -> tuple[pd.DataFrame, Reference]:
        """The label-free signals of the rows of a dataset and epoch traced without labels, against a
        labelled reference set (raises NoReferenceError when there is none)."""
        all_units = self.units(dataset_type, epoch)
        units = all_units.take(np.flatnonzero(~all_units.labelled))
        ref_key = self.reference_key(dataset_type, epoch)
        if ref_key == (dataset_type, epoch) and not all_units.labelled.any():
            raise NoReferenceError(
                f"{dataset_type} epoch {epoch} was traced without labels and has no labelled train traces to be "
                "compared with: error_proba, regions and density are learnt on labelled data. Trace the training data "
                "(with labels, dataset_type='train') under the same model_name/version_name, then evaluate again")
        ref_units = self.labelled_units(*ref_key)
        reference = self.reference(ref_key, self.embedding_kind(units, ref_units, dataset_type, epoch))
        frame = prediction_signals(units)
        embedding = self.embedding(units, reference.embedding_kind)
        neighbors, distances = reference.index.query(embedding)
        pred = frame["pred"].to_numpy()
        own = neighbor_signals(reference.index, neighbors, distances, pred, pred, reference.mean_distance)
        del own["neighbor_label_agreement"]  # no label to agree with (computed against pred, it repeats the next)
        for name, values in own.items():
            frame[name] = values
        frame["error_proba"] = reference.estimator.predict(frame)
        region = reference.regions_of(embedding)
        frame["region"] = region
        frame["region_error_rate"] = reference.region_error_rate.reindex(region).to_numpy()
        frame["in_hotspot_region"] = np.isin(region, reference.hotspot_regions)
        if units.logged_at is not None:
            frame["logged_at"] = pd.to_datetime(units.logged_at).tz_localize("UTC")
        frame = assign_unlabelled(frame, reference.tau_op)
        frame.insert(0, "dataset_type", dataset_type)
        return frame, reference
