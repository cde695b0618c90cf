"""Per-label metric over epochs with error bounds: FastEstimator's LabelTracker as a view of a Result.

Semantics follow FastEstimator: ``bounds="std"`` gives mean ± sample standard deviation (0 for a single
value), ``"range"`` gives (min, mean, max), ``None`` the mean alone; several may be asked for at once.
``label_mapping = {display_name: label_value}`` renames labels and drops every label not listed.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import pandas as pd

BOUND_OPTIONS = (None, "std", "range")


class LabelTrackerFrame(pd.DataFrame):
    """A DataFrame (label, n_epoch, bounds, low, mean, high) whose ``plot()`` draws the LabelTracker graph."""

    _metadata = ["metric"]

    @property
    def _constructor(self):
        return LabelTrackerFrame

    def plot(self, path: str | None = None, title: str | None = None):  # noqa: D401 - overrides pandas' plot
        """Draw one panel per bounds option (a line per label, shaded bounds); save to ``path`` if given.

        With a path the figure is drawn apart from pyplot (its backend and open figures are left as they
        are, e.g. in a notebook, and a training callback can save it from any thread); without one it is
        a pyplot figure, shown as the user's backend shows figures."""
        options = list(dict.fromkeys(self["bounds"]))
        size = (6 * len(options), 4)
        if path is not None:
            from matplotlib.figure import Figure

            fig = Figure(figsize=size)
            axes = fig.subplots(1, len(options), squeeze=False)
        else:
            import matplotlib.pyplot as plt

            fig, axes = plt.subplots(1, len(options), figsize=size, squeeze=False)
        metric = getattr(self, "metric", "metric")
        for ax, option in zip(axes[0], options):
            part = self[self["bounds"] == option]
            for label, rows in part.groupby("label", sort=False):
                line, = ax.plot(rows["n_epoch"], rows["mean"], marker="o", label=str(label))
                if option != "mean":
                    ax.fill_between(rows["n_epoch"], rows["low"], rows["high"], alpha=0.2, color=line.get_color())
            names = {"std": "mean ± std", "range": "min, mean, max", "mean": "mean"}
            ax.set_title(f"{metric} by label ({names[option]})")
            ax.set_xlabel("epoch")
            ax.set_ylabel(metric)
            ax.legend(fontsize="small")
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=100)
        return fig


def label_tracker(history: pd.DataFrame, metric: str = "loss", bounds: None | str | Iterable = "std",
                  label_mapping: dict | None = None, dataset_type: str = "train") -> LabelTrackerFrame:
    """Aggregate ``metric`` of the per-epoch history by label and epoch."""
    options = [bounds] if bounds is None or isinstance(bounds, str) else list(bounds)
    for option in options:
        if option not in BOUND_OPTIONS:
            raise ValueError(f"bounds must be None, 'std', 'range' or a list of those, got {bounds!r}")
    data = history[history["dataset_type"] == dataset_type]
    if data.empty:
        raise KeyError(f"no history for dataset_type={dataset_type!r}; have {sorted(history['dataset_type'].unique())}")
    if metric not in data.columns:
        numeric = [c for c in data.columns if c not in ("dataset_type", "n_epoch", "input_id", "label")]
        raise KeyError(f"unknown metric {metric!r}; choose from {numeric}")
    values = data[["label", "n_epoch", metric]].astype({metric: float})
    if label_mapping:
        names = {value: name for name, value in label_mapping.items()}
        values = values[values["label"].isin(list(names))]
        values = values.assign(label=values["label"].map(names))
    stats = values.groupby(["label", "n_epoch"], sort=True)[metric].agg(["mean", "std", "min", "max", "count"])
    stats["std"] = stats["std"].where(stats["count"] > 1, 0.0)
    frames = []
    for option in options:
        if option == "std":
            low, high = stats["mean"] - stats["std"], stats["mean"] + stats["std"]
        elif option == "range":
            low, high = stats["min"], stats["max"]
        else:
            low = high = pd.Series(np.nan, index=stats.index)
        frames.append(pd.DataFrame({"bounds": option or "mean", "low": low, "mean": stats["mean"], "high": high}))
    frame = LabelTrackerFrame(pd.concat(frames).reset_index()[["label", "n_epoch", "bounds", "low", "mean", "high"]])
    frame.metric = metric
    return frame


def save_label_tracker_plot(store, model_name: str, version_name: str, path=None, metric: str = "loss",
                            bounds: None | str | Iterable = "std", dataset_type: str = "train"):
    """Draw the LabelTracker graph straight from the committed traces and save it as a PNG.

    The framework callbacks call this at training end. Default path:
    ``<store>/<model>/<version>/label_tracker_<dataset_type>_<metric>.png``. Returns the path, or None
    for a team server, whose web UI draws the curves from each evaluation (nothing is drawn locally).
    """
    from ..store import RemoteStore, resolve_store
    from .classification import drop_duplicate_units, load_units, unit_signals

    store = resolve_store(store)
    if isinstance(store, RemoteStore) and path is None:
        return None
    meta = store.read_meta(model_name, version_name)
    epochs = sorted(p.n_epoch for p in store.partitions(model_name, version_name)
                    if p.dataset_type == dataset_type and p.ranks_committed)
    frames = []
    for epoch in epochs:
        table = store.read_traces(model_name, version_name, dataset_type, [epoch], exclude_columns=("features",))
        units, _ = drop_duplicate_units(load_units(table, meta))
        frames.append(unit_signals(units).assign(dataset_type=dataset_type))
    if not frames:
        raise KeyError(f"no committed {dataset_type} traces for {model_name}/{version_name}")
    tracker = label_tracker(pd.concat(frames, ignore_index=True), metric=metric, bounds=bounds,
                            dataset_type=dataset_type)
    path = path or store.version_dir(model_name, version_name) / f"label_tracker_{dataset_type}_{metric}.png"
    tracker.plot(str(path), title=f"{model_name}/{version_name}")
    return path
