"""Result: what an evaluation produced, as DataFrames, printed summaries and an HTML report."""

from __future__ import annotations

import html
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from .classification import METRIC_COLUMNS as CLASSIFICATION_METRICS
from .detection import METRIC_COLUMNS as DETECTION_METRICS
from .detection3d import METRIC_COLUMNS as DETECTION3D_METRICS
from .issues import CATEGORY_SUMMARY_ORDER, CLASSIFICATION_CODES, DETECTION3D_CODES, DETECTION_CODES
from .label_tracker import LabelTrackerFrame, label_tracker

CATEGORY_COLUMNS = [f"{c}_ratio" for c in CATEGORY_SUMMARY_ORDER]
METRICS = {"classification": CLASSIFICATION_METRICS, "object_detection": DETECTION_METRICS,
           "object_detection_3d": DETECTION3D_METRICS}
CODES = {"classification": CLASSIFICATION_CODES, "object_detection": DETECTION_CODES,
         "object_detection_3d": DETECTION3D_CODES}
MAX_EXAMPLES = 10


class Result:
    """The outcome of ``Evaluator.request_evaluation()``, persisted in the store under its name.

    Tables: ``metrics_summary()`` and ``issue_category_summary()`` (one row per dataset_type, and per
    epoch when several were evaluated), ``samples()`` (one row per unit with every per-unit signal,
    category and error code), ``get_issues()`` (one row per error code), ``get_view()`` (any grouping).
    """

    def __init__(self, meta: dict, tables: dict[str, pd.DataFrame], store: Any = None):
        self.meta = meta
        self._tables = tables
        self.store = store  # where the traces are: select(strategy="diversity") reads features from it

    # -- identity -------------------------------------------------------------------------------
    @property
    def result_name(self) -> str:
        return self.meta["result_name"]

    @property
    def model_name(self) -> str:
        return self.meta["model_name"]

    @property
    def version_name(self) -> str:
        return self.meta["version_name"]

    @property
    def task(self) -> str:
        return self.meta.get("task", "classification")

    @property
    def _metric_columns(self) -> list[str]:
        return METRICS[self.task][1:]

    @property
    def epochs(self) -> dict[str, list[int]]:
        """Evaluated epochs per dataset_type."""
        return self.meta["epochs"]

    @property
    def notes(self) -> list[str]:
        """What the evaluation wants you to know (partial commits, fallbacks, removed duplicates)."""
        return list(self.meta.get("notes", []))

    @property
    def thresholds(self) -> pd.DataFrame:
        """Operating thresholds per dataset and epoch: reference set, tau_op, tau_stable, risk."""
        return pd.DataFrame(self.meta.get("thresholds", []))

    def __repr__(self) -> str:
        return (f"Result({self.result_name!r}, model={self.model_name!r}, version={self.version_name!r}, "
                f"epochs={self.epochs})")

    def _several_epochs(self) -> bool:
        metrics = self._tables["metrics"]
        return bool(metrics.groupby("dataset")["n_epoch"].nunique().max() > 1)

    def _keys(self) -> list[str]:
        return ["dataset", "n_epoch"] if self._several_epochs() else ["dataset"]

    # -- tables ---------------------------------------------------------------------------------
    def metrics_summary(self) -> pd.DataFrame:
        """Classification: dataset, counts, accuracy, auroc, auprc, net_entropy_loss, net_entropy,
        error_proba_auroc, error_proba_auprc. Detection: dataset, counts (units), n_images, n_gt, n_pred,
        map (COCO AP@[.50:.95]), ap50, ap75, ap_small/medium/large, precision and recall at the operating
        score ``score_op``, error_proba_auroc/auprc. 3D: dataset, counts, n_frames, n_gt, n_pred, map
        (nuScenes, 0.5/1/2/4 m), nds, ate, ase, aoe, ave, precision, recall, score_op, error_proba_auroc/auprc.
        Definitions in docs/analysis.md; ``n_epoch``
        follows ``dataset`` when several epochs of one dataset were evaluated (``n_epoch=None``)."""
        return self._tables["metrics"][[*self._keys(), *self._metric_columns]].reset_index(drop=True)

    def issue_category_summary(self) -> pd.DataFrame:
        """Share of units in each of the six categories per dataset (and epoch); rows sum to 1."""
        return self._tables["categories"][[*self._keys(), *CATEGORY_COLUMNS]].reset_index(drop=True)

    def samples(self) -> pd.DataFrame:
        """One row per unit (dataset_type, n_epoch, input_id) with every per-unit signal."""
        return self._tables["samples"].copy()

    def error_proba_summary(self) -> pd.DataFrame:
        """How well error_proba separates wrong from right predictions, estimator vs the 1 - msp baseline."""
        metrics = self._tables["metrics"]
        return metrics[[*self._keys(), "error_proba_auroc", "baseline_error_proba_auroc", "error_proba_auprc",
                        "baseline_error_proba_auprc"]].reset_index(drop=True)

    def get_issues(self) -> pd.DataFrame:
        """One row per dataset_type, category and error code, most frequent first within a dataset.

        Columns: dataset, [n_epoch], category, error_code, count, ratio (of the dataset's units),
        description, recommendation, top_labels, confused_pairs (label->prediction), top_regions,
        examples (up to 10 input_ids, most severe first: highest loss for errors, highest error_proba
        otherwise).
        """
        samples = self._tables["samples"].rename(columns={"dataset_type": "dataset"})
        keys = self._keys()
        totals = samples.groupby(keys).size()
        rows = []
        severity = samples["severity"] if "severity" in samples else np.where(
            samples["correct"], samples["error_proba"], 1.0 + samples["loss"])
        ranked = samples.assign(_severity=severity)
        ranked = ranked.sort_values(["_severity", "input_id"], ascending=[False, True], kind="stable")
        for group, units in ranked.groupby([*keys, "category", "error_code"], sort=False):
            key = dict(zip([*keys, "category", "error_code"], group))
            code = CODES[self.task].get(key["error_code"])
            wrong = units[~units["correct"] & (units["pred"] >= 0) & (units["pred"] != units["label"])]
            rows.append({
                **key,
                "count": len(units),
                "ratio": len(units) / totals[tuple(key[k] for k in keys) if len(keys) > 1 else key[keys[0]]],
                "description": code.description if code else "",
                "recommendation": code.recommendation if code else "",
                "top_labels": _top(units["label"]),
                "confused_pairs": _top(wrong["label"].astype(str) + "->" + wrong["pred"].astype(str)),
                "top_regions": _top(units["slice"] if "slice" in units else units["region"]),
                "examples": units["input_id"].drop_duplicates().head(MAX_EXAMPLES).tolist(),
            })
        issues = pd.DataFrame(rows)
        if issues.empty:
            return issues
        return issues.sort_values([*keys, "count"], ascending=[True] * len(keys) + [False], kind="stable").reset_index(drop=True)

    def get_view(self, groupby: str | Iterable[str], adjustby: str | None = None) -> pd.DataFrame:
        """Count units by any columns of ``samples()`` (``dataset`` is accepted for ``dataset_type``).

        With ``adjustby``, ``ratio`` is each count divided by the total of its ``adjustby`` group (e.g.
        ``groupby=["category", "error_code"], adjustby="category"``: the error-code mix of each
        category); without it, by the dataset's total. Counts are per dataset (and epoch).
        """
        groupby = [groupby] if isinstance(groupby, str) else list(groupby)
        samples = self._tables["samples"].rename(columns={"dataset_type": "dataset"})
        unknown = [c for c in [*groupby, *([adjustby] if adjustby else [])] if c not in samples.columns]
        if unknown:
            raise KeyError(f"unknown column(s) {unknown}; choose from {sorted(samples.columns)}")
        keys = [k for k in self._keys() if k not in groupby]
        view = samples.groupby([*keys, *groupby], dropna=False).size().rename("count").reset_index()
        normaliser = [*keys, *([adjustby] if adjustby else [])]
        view["ratio"] = view["count"] / view.groupby(normaliser)["count"].transform("sum") if normaliser else \
            view["count"] / view["count"].sum()
        return view

    def confusion_pairs(self, dataset_type: str | None = None, top: int = 10) -> pd.DataFrame:
        """The most frequent (label, pred) errors with their counts and share of the label's samples."""
        samples = self._tables["samples"]
        if dataset_type is not None:
            samples = samples[samples["dataset_type"] == dataset_type]
        per_label = samples.groupby(["dataset_type", "n_epoch", "label"]).size().rename("label_count")
        pairs = (samples[~samples["correct"]].groupby(["dataset_type", "n_epoch", "label", "pred"]).size()
                 .rename("count").reset_index().join(per_label, on=["dataset_type", "n_epoch", "label"]))
        pairs["share_of_label"] = pairs["count"] / pairs["label_count"]
        return (pairs.sort_values(["dataset_type", "n_epoch", "count"], ascending=[True, True, False], kind="stable")
                .groupby(["dataset_type", "n_epoch"]).head(top).drop(columns="label_count").reset_index(drop=True))

    def tide(self) -> pd.DataFrame:
        """Detection: TIDE error counts and dAP (AP50 points) per error type (Cls, Loc, Both, Dupe, Bkg, Miss;
        and the FalsePos / FalseNeg summaries, which have no count), per dataset and epoch, as tidecv."""
        return self._detection_table("tide")

    def per_class(self) -> pd.DataFrame:
        """Detection: per class, COCO AP (ap, ap50, ap75, per size) and its number of objects; 3D: nuScenes
        AP per distance threshold, mean AP and the TP errors ate / ase / aoe / ave."""
        return self._detection_table("per_class")

    def images(self) -> pd.DataFrame:
        """Detection: one row per image (3D: per frame): objects, reported detections, found / missed /
        false positives, its worst category and the error codes found in it."""
        return self._detection_table("images")

    def _detection_table(self, name: str) -> pd.DataFrame:
        if name not in self._tables:
            raise ValueError(f"{name}() is a detection view; this result is of a {self.task} model")
        return self._tables[name].copy()

    # -- data traced without labels ----------------------------------------------------------------
    def unlabelled(self) -> pd.DataFrame:
        """One row per unit traced without labels (operation logs, unlabelled pools): its label-free
        signals (pred, msp, entropy, top2_gap, neighbour signals, density, error_proba, region,
        in_hotspot_region), ``accepted`` at tau_op, ``out_of_distribution``, ``error_code`` (OP_*) and
        ``logged_at`` (UTC). Detection: one row per image traced without ground truth (n_pred, pred,
        max_score, entropy, top2_gap, error_proba, expected_errors, slices as regions, density with
        features; docs/operation.md). Empty when every unit had a label."""
        frame = self._tables.get("unlabelled")
        return pd.DataFrame() if frame is None else frame.copy()

    def unlabelled_summary(self) -> pd.DataFrame:
        """Per dataset (and epoch) traced without labels: counts, accepted/rejected, out-of-distribution and
        hotspot-region shares, mean error_proba."""
        units = self.unlabelled()
        if units.empty:
            return pd.DataFrame(columns=["dataset", "n_epoch", "counts"])
        units = units.rename(columns={"dataset_type": "dataset"})
        summary = units.groupby(["dataset", "n_epoch"]).agg(
            counts=("input_id", "size"), accepted_ratio=("accepted", "mean"),
            ood_ratio=("out_of_distribution", "mean"), hotspot_region_ratio=("in_hotspot_region", "mean"),
            mean_error_proba=("error_proba", "mean")).reset_index()
        summary.insert(4, "rejected_ratio", 1.0 - summary["accepted_ratio"])
        return summary

    def monitoring(self, window: str = "D", dataset_type: str | None = None,
                   baseline: str | None = None) -> pd.DataFrame:
        """Operation-time monitoring of a dataset traced without labels: one row per time ``window`` of
        ``logged_at`` (a pandas frequency: ``"h"``, ``"D"``, ...) with the shares of accepted, rejected,
        out-of-distribution and hotspot-region units, the predicted-class distribution, its PSI and a KS
        statistic per signal against ``baseline``, and a ``drift`` flag with its reasons
        (evaluation/monitoring.py has the thresholds).

        ``dataset_type``: needed when several datasets were traced without labels. ``baseline``: a labelled
        dataset of this result; default a labelled one other than the reference set (e.g. ``val``), else
        the reference set.
        """
        from .monitoring import DETECTION_KS_SIGNALS, KS_SIGNALS, window_summary

        dataset = self._unlabelled_dataset(dataset_type)
        units = self.unlabelled()
        units = units[units["dataset_type"] == dataset]
        units = units[units["n_epoch"] == units["n_epoch"].max()]
        if "logged_at" not in units or units["logged_at"].isna().all():
            raise ValueError(f"{dataset} has no logged_at times (traced by an older version); windows need them")
        reference = self._reference_of(dataset, int(units["n_epoch"].iloc[0]))
        # the baseline's label-free signals: per unit (classification), per image (detection's images table)
        samples = self._tables["samples" if self.task == "classification" else "images"]
        if baseline is None:
            others = sorted(set(samples["dataset_type"]) - {reference[0]})
            baseline = others[0] if others else reference[0]
            if not others:
                warnings.warn(f"monitoring {dataset} against its reference set {reference[0]}, whose msp, error_proba "
                              "and density are optimistic (the model was fitted on it), so drift may be flagged "
                              "that is only the generalisation gap; trace a labelled held-out dataset (e.g. "
                              "dataset_type='val') as the baseline", UserWarning, stacklevel=2)
        rows = samples[samples["dataset_type"] == baseline]
        if rows.empty:
            raise ValueError(f"baseline {baseline!r} is not a labelled dataset of this result; choose from "
                             f"{sorted(set(samples['dataset_type']))}")
        rows = rows[rows["n_epoch"] == (reference[1] if baseline == reference[0] else rows["n_epoch"].max())]
        summary = window_summary(units.dropna(subset=["logged_at"]), rows, window,
                                 KS_SIGNALS if self.task == "classification" else DETECTION_KS_SIGNALS)
        summary.insert(0, "dataset", dataset)
        summary.insert(1, "baseline", f"{baseline}@{int(rows['n_epoch'].iloc[0])}")
        return summary

    def select(self, budget: int, strategy: str = "error_proba", dataset_type: str | None = None,
               output: str | Path | None = None, *, features: Any = None, seed: int = 0) -> pd.DataFrame:
        """The ``budget`` units to label or review next, as a DataFrame in pick order (rank, input_id,
        dataset_type, n_epoch, strategy, score, pred, error_proba, region).

        ``strategy``: ``error_proba``, ``entropy``, ``margin``, ``hotspot``, ``diversity`` (needs
        features), ``review_labels`` (needs labels) or ``random``; see evaluation/data_filtering.py.
        ``dataset_type``: the pool; default the dataset traced without labels (if exactly one), else
        ``train``. The newest evaluated epoch of the pool is used. ``output``: also write the selected
        ids there, one per line (``.csv``: the whole table). ``features``: the pool's features, rows in
        the pool's order (``diversity``; by default read from the store the result came from).
        """
        from ..errors import SelectionError
        from .data_filtering import FEATURE_STRATEGIES, check_request, select_units

        check_request(budget, strategy)
        if strategy == "review_labels" and self.task != "classification":
            raise SelectionError("strategy 'review_labels' is for classification; for detection annotation problems "
                                 "(missing or duplicated boxes) see get_issues(): OD_MISSING_LABEL, OD_DUPLICATE_GT")
        pool = self._pool(dataset_type)
        labelled_features = None
        if strategy in FEATURE_STRATEGIES and features is None:
            features, labelled_features = self._pool_features(pool)
        selected = select_units(pool, budget, strategy, features=None if features is None else np.asarray(features),
                                labelled_features=labelled_features, seed=seed)
        if output is not None:
            path = Path(output)
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.suffix == ".csv":
                selected.to_csv(path, index=False)
            else:
                path.write_text("".join(f"{i}\n" for i in selected["input_id"]), encoding="utf-8")
        return selected

    def _unlabelled_dataset(self, dataset_type: str | None) -> str:
        units = self.unlabelled()
        names = sorted(set(units["dataset_type"])) if len(units) else []
        if dataset_type is not None:
            if dataset_type not in names:
                raise ValueError(f"{dataset_type!r} has no units traced without labels in this result; "
                                 f"those are: {names or 'none'}")
            return dataset_type
        if len(names) != 1:
            raise ValueError("name the dataset: dataset_type= one of " + str(names) if names else
                             "this result has no data traced without labels (trace with labels=None, e.g. "
                             "InferenceLogger, then evaluate)")
        return names[0]

    def _reference_of(self, dataset: str, n_epoch: int) -> tuple[str, int]:
        for row in self.meta.get("thresholds", []):
            if row["dataset"] == dataset and row["n_epoch"] == n_epoch:
                name, epoch = row["reference"].rsplit("@", 1)
                return name, int(epoch)
        raise ValueError(f"no reference recorded for {dataset} epoch {n_epoch}")

    def _pool(self, dataset_type: str | None) -> pd.DataFrame:
        units = self.unlabelled()
        unlabelled = sorted(set(units["dataset_type"])) if len(units) else []
        # detection selects images: a labelled detection pool is its images table (label-free columns)
        samples = self._tables["samples" if self.task == "classification" else "images"]
        if dataset_type is None:
            dataset_type = self._unlabelled_dataset(None) if len(unlabelled) == 1 else "train"
        if dataset_type in unlabelled:
            pool = units[units["dataset_type"] == dataset_type]
        elif dataset_type in set(samples["dataset_type"]):
            pool = samples[samples["dataset_type"] == dataset_type]
        else:
            raise ValueError(f"dataset_type {dataset_type!r} is not in this result; pools: "
                             f"{sorted(set(samples['dataset_type']) | set(unlabelled))}")
        pool = pool[pool["n_epoch"] == pool["n_epoch"].max()]
        return pool.drop_duplicates("input_id").reset_index(drop=True)

    def _pool_features(self, pool: pd.DataFrame) -> tuple[np.ndarray, np.ndarray | None]:
        """Features of the pool's units (rows aligned) and of its labelled reference set (for a pool traced
        without labels: the units already labelled), read from the store."""
        from ..core.vectors import decode_vectors
        from ..errors import SelectionError

        dataset, epoch = pool["dataset_type"].iloc[0], int(pool["n_epoch"].iloc[0])
        if self.store is None or not hasattr(self.store, "read_traces"):
            raise SelectionError("strategy 'diversity' reads the pool's features from the store, which this result "
                                 "cannot reach (built by hand): pass features=, or open the result with "
                                 "Evaluator(..., store=LOCAL_DIR or a server's address)")

        def read(name: str, n_epoch: int, ids: np.ndarray | None) -> np.ndarray:
            table = self.store.read_traces(self.model_name, self.version_name, name, [n_epoch])
            if "features" not in table.column_names:
                raise SelectionError(
                    f"strategy 'diversity' needs penultimate features and {name} epoch {n_epoch} was traced without "
                    "them: trace with feature_layer=None (the default: the input of the last Linear/Dense layer) or "
                    "pass features=. The strategies error_proba, entropy, margin, hotspot and random need none")
            frame = pd.DataFrame({"input_id": table.column("input_id").to_pylist()})
            labelled = table.column("label" if "label" in table.column_names else "gt_boxes").is_valid()
            matrix = decode_vectors(table, "features").astype(np.float32)
            if ids is None:  # the labelled rows of the reference set
                return matrix[labelled.to_numpy(zero_copy_only=False)]
            position = pd.Index(frame["input_id"]).drop_duplicates().get_indexer(ids)
            first = ~frame["input_id"].duplicated().to_numpy()
            return matrix[first][position]

        features = read(dataset, epoch, pool["input_id"].to_numpy())
        labelled = None
        if "correct" not in pool:  # a pool without labels: diversity away from what is labelled already
            labelled = read(*self._reference_of(dataset, epoch), None)
        return features, labelled

    def label_tracker(self, metric: str = "loss", bounds: str | None | list = "std",
                      label_mapping: dict | None = None, dataset_type: str = "train") -> LabelTrackerFrame:
        """Per label and epoch, the mean of a per-unit metric with bounds (FastEstimator's LabelTracker).

        ``bounds``: ``"std"`` (mean ± std), ``"range"`` (min and max), ``None``, or a list of those.
        ``label_mapping = {display_name: label_value}`` keeps only those labels, renamed. Call
        ``.plot()`` on the returned frame to draw it.
        """
        return label_tracker(self._tables["history"], metric=metric, bounds=bounds, label_mapping=label_mapping,
                             dataset_type=dataset_type)

    def compare(self, other: "Result") -> pd.DataFrame:
        """Metrics and category ratios of this result and ``other`` side by side, with the difference."""
        columns = [*self._metric_columns, *CATEGORY_COLUMNS]
        mine, theirs = self._label(), other._label()
        if theirs == mine:
            theirs += " (2)"
        both = pd.concat([self._flat(columns)["value"].rename(mine), other._flat(columns)["value"].rename(theirs)],
                         axis=1)
        both["delta"] = both.iloc[:, 1] - both.iloc[:, 0]
        return both.reset_index()

    def _label(self) -> str:
        return f"{self.version_name}:{self.result_name}"

    def _flat(self, columns: list[str]) -> pd.DataFrame:
        merged = self._tables["metrics"].merge(self._tables["categories"], on=["dataset", "n_epoch"])
        long = merged.melt(id_vars=["dataset", "n_epoch"], value_vars=columns, var_name="metric")
        long = long.drop(columns="n_epoch") if not self._several_epochs() else long
        return long.set_index([c for c in ["dataset", "n_epoch", "metric"] if c in long.columns])

    # -- presentation ---------------------------------------------------------------------------
    def get_summary(self, print_summary: bool = True) -> dict[str, Any]:
        """Print metrics, error_proba quality, categories and each category's error codes; return them."""
        view = self.get_view(["category", "error_code"], adjustby="category") if len(self._tables["samples"]) else None
        summary = {"metrics": self.metrics_summary(), "error_proba": self.error_proba_summary(),
                   "categories": self.issue_category_summary(), "error_codes": view, "notes": self.notes,
                   "epochs": self.epochs}
        if "unlabelled" in self._tables:
            summary["unlabelled"] = self.unlabelled_summary()
        if print_summary:
            console = make_console()
            console.print(f"[bold]{self.model_name}/{self.version_name}[/bold] — result {self.result_name!r}, "
                          f"epochs {self.epochs}, risk {self.meta.get('risk')}")
            console.print(dataframe_table(summary["metrics"], "Metrics"))
            console.print(dataframe_table(summary["error_proba"], "error_proba: estimator vs 1 - msp baseline"))
            console.print(dataframe_table(summary["categories"], "Issue categories (share of units)"))
            if view is not None:
                console.print(dataframe_table(view, "Error codes within each category"))
            if "unlabelled" in summary:
                console.print(dataframe_table(summary["unlabelled"], "Traced without labels (docs/operation.md)"))
            for note in self.notes:
                console.print(f"[yellow]note:[/yellow] {note}")
        return summary

    def _repr_html_(self) -> str:
        from .report import _table as table

        notes = "".join(f"<li>{html.escape(n)}</li>" for n in self.notes)
        parts = [f"<h3>{html.escape(self.model_name)}/{html.escape(self.version_name)} — "
                 f"{html.escape(self.result_name)}</h3>",
                 table(self.metrics_summary(), "Metrics"),
                 table(self.error_proba_summary(), "error_proba: estimator vs 1 - msp baseline"),
                 table(self.issue_category_summary(), "Issue categories")]
        if len(self._tables["samples"]):
            parts.append(table(self.get_view(["category", "error_code"], adjustby="category"), "Error codes"))
            issues = self.get_issues()[[*self._keys(), "category", "error_code", "count", "recommendation", "examples"]]
            parts.append(table(issues, "Issues"))
        for name, title in (("per_class", "Per class"), ("tide", "TIDE error types (dAP in AP50 points)")):
            if name in self._tables:
                parts.append(table(self._tables[name], title))
        if notes:
            parts.append(f"<ul>{notes}</ul>")
        return "".join(parts)

    def to_html(self, path: str | Path) -> Path:
        """Write a self-contained HTML report (tables and inline-SVG heatmaps, no external asset) and return
        its path."""
        from .report import report_html

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(report_html(self), encoding="utf-8")
        return path


def _top(values: pd.Series, n: int = 3) -> str:
    counts = values.value_counts()
    return ", ".join(f"{k} ({v})" for k, v in counts.head(n).items())


def dataframe_table(frame: pd.DataFrame, title: str | None = None):
    """A rich Table of a DataFrame with floats shown to 4 significant digits."""
    from rich.table import Table

    table = Table(title=title)
    for column in frame.columns:
        table.add_column(str(column), justify="left" if frame[column].dtype == object else "right")
    for row in frame.itertuples(index=False):
        table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row))
    return table


def make_console():
    """A rich Console; piped or captured output gets a wide page instead of 80 squeezed columns."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=200)
