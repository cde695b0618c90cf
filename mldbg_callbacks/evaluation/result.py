"""Result: what an evaluation produced, as DataFrames, printed summaries and an HTML report."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import pandas as pd

from .classification import METRIC_COLUMNS


class Result:
    """The outcome of ``Evaluator.request_evaluation()``, persisted in the store under its name.

    ``metrics_summary()`` has one row per dataset_type (and per epoch when several were evaluated);
    ``samples()`` has one row per unit with every per-unit signal.
    """

    def __init__(self, meta: dict, tables: dict[str, pd.DataFrame]):
        self.meta = meta
        self._tables = tables

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
    def epochs(self) -> dict[str, list[int]]:
        """Evaluated epochs per dataset_type."""
        return self.meta["epochs"]

    @property
    def notes(self) -> list[str]:
        """What the evaluation wants you to know (partial commits, fallbacks, removed duplicates)."""
        return list(self.meta.get("notes", []))

    def __repr__(self) -> str:
        return (f"Result({self.result_name!r}, model={self.model_name!r}, version={self.version_name!r}, "
                f"epochs={self.epochs})")

    # -- tables ---------------------------------------------------------------------------------
    def metrics_summary(self) -> pd.DataFrame:
        """dataset, counts, accuracy, auroc, auprc, net_entropy_loss, net_entropy, error_proba_auroc,
        error_proba_auprc (definitions in docs/analysis.md); ``n_epoch`` is added after ``dataset``
        when several epochs of one dataset were evaluated (``n_epoch=None``)."""
        metrics = self._tables["metrics"].copy()
        if metrics.groupby("dataset")["n_epoch"].nunique().max() > 1:
            return metrics[["dataset", "n_epoch", *METRIC_COLUMNS[1:]]].reset_index(drop=True)
        return metrics[METRIC_COLUMNS].reset_index(drop=True)

    def samples(self) -> pd.DataFrame:
        """One row per unit (dataset_type, n_epoch, input_id) with every per-unit signal."""
        return self._tables["samples"].copy()

    # -- presentation ---------------------------------------------------------------------------
    def get_summary(self, print_summary: bool = True) -> dict[str, Any]:
        """Print the metrics (and notes) and return them as data."""
        summary = {"metrics": self.metrics_summary(), "notes": self.notes, "epochs": self.epochs}
        if print_summary:
            console = make_console()
            console.print(f"[bold]{self.model_name}/{self.version_name}[/bold] — result {self.result_name!r}, "
                          f"epochs {self.epochs}")
            console.print(dataframe_table(summary["metrics"], "Metrics"))
            for note in self.notes:
                console.print(f"[yellow]note:[/yellow] {note}")
        return summary

    def _repr_html_(self) -> str:
        notes = "".join(f"<li>{html.escape(n)}</li>" for n in self.notes)
        return (f"<h3>{html.escape(self.model_name)}/{html.escape(self.version_name)} — "
                f"{html.escape(self.result_name)}</h3>"
                + self.metrics_summary().to_html(index=False, float_format=lambda v: f"{v:.4g}")
                + (f"<ul>{notes}</ul>" if notes else ""))

    def to_html(self, path: str | Path) -> Path:
        """Write a self-contained HTML report and return its path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("<!doctype html><meta charset='utf-8'><title>mldbg report</title>"
                        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
                        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}</style>"
                        + self._repr_html_(), encoding="utf-8")
        return path


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
