"""The self-contained HTML report of a Result: tables plus heatmaps, in one file with no external asset.

Heatmaps are matplotlib figures embedded as inline SVG (no CDN, no script), so the file opens offline
and prints. Each cell carries its number, so the plots are readable without a colour scale:

- classification: the confusion matrix (label x prediction) of the newest evaluated epoch;
- detection: the error rate per class x size (3D: class x distance band);
- every task: units per class x error code, and the category mix per dataset (and epoch).
"""

from __future__ import annotations

import html
import io
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from .result import Result

STYLE = ("body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin-bottom:1em}"
         "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}h2{margin-top:1.5em}"
         "figure{display:inline-block;margin:0 1em 1em 0;vertical-align:top}figcaption{font-weight:bold}")
MAX_HEATMAP_SIDE = 40  # rows / columns shown; the most frequent ones are kept


def heatmaps(result: "Result") -> list[tuple[str, pd.DataFrame]]:
    """The (title, matrix) pairs the report draws, as DataFrames (the numbers behind each plot)."""
    samples = result.samples()
    if samples.empty:
        return []
    newest = samples[samples["n_epoch"] == samples.groupby("dataset_type")["n_epoch"].transform("max")]
    maps = []
    if result.task == "classification":
        for dataset, part in newest.groupby("dataset_type"):
            maps.append((f"Confusion matrix, {dataset} (rows: label, columns: prediction)",
                         pd.crosstab(part["label"], part["pred"])))
    else:
        slice_column = "size" if "size" in samples else "distance_band"
        for dataset, part in newest.groupby("dataset_type"):
            rate = 1.0 - part.pivot_table(index="label", columns=slice_column, values="correct", aggfunc="mean")
            maps.append((f"Error rate by class x {slice_column.replace('_', ' ')}, {dataset}", rate.round(3)))
    for dataset, part in newest.groupby("dataset_type"):
        maps.append((f"Units by class x error code, {dataset}", pd.crosstab(part["label"], part["error_code"])))
    categories = result.issue_category_summary()
    keys = [c for c in ("dataset", "n_epoch") if c in categories]
    matrix = categories.set_index(keys)
    matrix.index = [" / ".join(map(str, k)) if isinstance(k, tuple) else str(k) for k in matrix.index]
    matrix.columns = [c.removesuffix("_ratio") for c in matrix.columns]
    maps.append(("Share of units per category" + (" by epoch" if "n_epoch" in keys else ""), matrix.round(3)))
    return maps


def heatmap_svg(title: str, matrix: pd.DataFrame) -> str:
    """An annotated heatmap as inline SVG ('' without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return ""
    matrix = limit_matrix(matrix)
    values = matrix.to_numpy(dtype=float)
    height, width = values.shape
    fig, ax = plt.subplots(figsize=(min(2 + 0.55 * width, 18), min(1.5 + 0.4 * height, 14)))
    image = ax.imshow(np.nan_to_num(values, nan=0.0), cmap="Reds", aspect="auto")
    ax.set_xticks(range(width), [str(c) for c in matrix.columns], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(height), [str(i) for i in matrix.index], fontsize=8)
    ax.set_xlabel(str(matrix.columns.name or ""), fontsize=8)
    ax.set_ylabel(str(matrix.index.name or ""), fontsize=8)
    top = np.nanmax(values) if values.size and np.isfinite(values).any() else 0.0
    for (i, j), value in np.ndenumerate(values):
        if np.isfinite(value):
            text = f"{value:.0f}" if float(value).is_integer() and top > 1 else f"{value:.2f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7,
                    color="white" if top and value > 0.6 * top else "black")
    fig.colorbar(image, ax=ax, fraction=0.03)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg")
    plt.close(fig)
    svg = buffer.getvalue()
    return svg[svg.index("<svg"):]  # drop the XML prologue: the SVG sits inside the HTML


def limit_matrix(matrix: pd.DataFrame) -> pd.DataFrame:
    """At most MAX_HEATMAP_SIDE rows and columns: those with the most units (what the report and UI draw)."""
    if len(matrix.index) > MAX_HEATMAP_SIDE:
        matrix = matrix.loc[matrix.sum(axis=1).sort_values(ascending=False).index[:MAX_HEATMAP_SIDE]]
    if len(matrix.columns) > MAX_HEATMAP_SIDE:
        matrix = matrix[matrix.sum(axis=0).sort_values(ascending=False).index[:MAX_HEATMAP_SIDE]]
    return matrix


def report_html(result: "Result") -> str:
    """The whole report as one HTML document."""
    figures = []
    for title, matrix in heatmaps(result):
        svg = heatmap_svg(title, matrix)
        if svg:
            figures.append(f"<figure><figcaption>{html.escape(title)}</figcaption>{svg}</figure>")
        else:
            figures.append(_table(matrix.reset_index(), title))
    plots = "".join(figures) or "<p>No units to plot.</p>"
    return ("<!doctype html><html lang='en'><meta charset='utf-8'>"
            f"<title>mldbg report: {html.escape(result.model_name)}/{html.escape(result.version_name)}</title>"
            f"<style>{STYLE}</style><body>{result._repr_html_()}<h2>Heatmaps</h2>{plots}</body></html>")


def _table(frame: pd.DataFrame, title: str) -> str:
    return f"<h4>{html.escape(title)}</h4>" + frame.to_html(index=False, float_format=lambda v: f"{v:.4g}")
