"""Evaluator of the product page: ``from mldbg_callbacks.evaluator import Evaluator``.

    evaluator = Evaluator(model_name="my_model", version_name="v1")
    result = evaluator.request_evaluation()          # newest completely saved epoch
    print(result.metrics_summary())
    evaluator.list_results(); evaluator.get_result(result_name=...)
"""

from __future__ import annotations

import datetime as dt
import os
from typing import Callable

import pandas as pd
from threadpoolctl import threadpool_limits

from . import __version__
from .evaluation.detection import evaluate_detection
from .evaluation.detection3d import evaluate_detection3d
from .evaluation.pipeline import evaluate_classification
from .evaluation.result import Result
from .errors import ResultWriteError
from .evaluation.selection import select_epochs
from .store import LocalStore, RemoteStore, resolve_store
from .store.names import validate_name

__all__ = ["Evaluator", "Result"]

ProgressCallback = Callable[[str, int, int], None]
EVALUATIONS = {"classification": evaluate_classification, "object_detection": evaluate_detection,
               "object_detection_3d": evaluate_detection3d}


class Evaluator:
    """Evaluate the traces of one model version and manage its results.

    Args:
        model_name, version_name: the names given to the tracer.
        store: as for the tracers (``None``: MLD_API_ENDPOINT, else MLD_HOME, else ``./mldbg``).
    """

    def __init__(self, model_name: str, version_name: str, *, store: str | os.PathLike | LocalStore | RemoteStore | None = None):
        self.model_name = validate_name(model_name, "model_name")
        self.version_name = validate_name(version_name, "version_name")
        self.store = resolve_store(store)

    def request_evaluation(self, result_name: str | None = None, n_epoch: str | int | None = "latest",
                           risk: float = 0.05, progress: ProgressCallback | None = None) -> Result:
        """Evaluate ``n_epoch`` (``"latest"``, an int, or ``None`` for every epoch) and persist the result.

        ``risk``: the error rate tolerated among accepted predictions; it sets the operating thresholds
        of the issue categories (docs/analysis.md). A result with the same ``result_name`` is replaced.
        ``progress(stage, done, total)`` is called as the evaluation advances. Against a server, the
        server evaluates (in its background worker) and this call polls it, then fetches the result.
        """
        if result_name is not None:
            validate_name(result_name, "result_name")
        if isinstance(self.store, RemoteStore):
            meta, tables = self.store.request_evaluation(self.model_name, self.version_name, result_name=result_name,
                                                         n_epoch=n_epoch, risk=risk, progress=progress)
            return Result(meta, tables, store=self.store)
        return evaluate_and_save(self.store, self.model_name, self.version_name, result_name=result_name,
                                 n_epoch=n_epoch, risk=risk, progress=progress)

    def list_results(self) -> pd.DataFrame:
        """Saved results, oldest first: name, creation time, requested and evaluated epochs."""
        rows = [{"result_name": m["result_name"], "created_at": m["created_at"],
                 "n_epoch": "all" if m["n_epoch"] is None else m["n_epoch"],
                 "epochs": m["epochs"]} for m in self.store.list_results(self.model_name, self.version_name)]
        return pd.DataFrame(rows, columns=["result_name", "created_at", "n_epoch", "epochs"])

    def get_result(self, result_name: str) -> Result:
        """Load a saved result by name."""
        meta, tables = self.store.load_result(self.model_name, self.version_name, result_name)
        return Result(meta, tables, store=self.store)


def evaluate_and_save(store: LocalStore, model_name: str, version_name: str, *, result_name: str | None = None,
                      n_epoch: str | int | None = "latest", risk: float = 0.05,
                      progress: ProgressCallback | None = None) -> Result:
    """Evaluate the traces of a version in ``store`` and save the result there (what ``mldbg serve`` runs too)."""
    meta = store.read_meta(model_name, version_name)
    task = meta.get("task")
    if task not in EVALUATIONS:
        raise NotImplementedError(f"evaluation of {task!r} traces is not available in this version "
                                  f"(available: {sorted(EVALUATIONS)})")
    partitions = store.partitions(model_name, version_name)
    selection = select_epochs(partitions, n_epoch)
    committed: dict[str, list[int]] = {}
    for partition in partitions:
        if partition.ranks_committed:
            committed.setdefault(partition.dataset_type, []).append(partition.n_epoch)

    def read(dataset_type: str, epoch: int, with_features: bool):
        return store.read_traces(model_name, version_name, dataset_type, [epoch],
                                 exclude_columns=() if with_features else ("features",))

    # One OpenMP thread: scikit-learn's gradient boosting and k-means sum in per-thread chunks, so their
    # numbers would depend on the thread count (a server process vs a notebook where torch set it).
    with threadpool_limits(limits=1, user_api="openmp"):
        evaluation = EVALUATIONS[task](read, meta, selection.epochs, committed, risk=risk, progress=progress)
    if progress:
        progress("saving", 1, 1)
    name = validate_name(result_name, "result_name") if result_name else _new_result_name(store, model_name,
                                                                                           version_name, n_epoch)
    result_meta = {
        "result_name": name, "model_name": model_name, "version_name": version_name,
        "task": meta["task"], "n_epoch": n_epoch, "risk": risk, "epochs": selection.epochs,
        "notes": selection.notes + evaluation.notes, "thresholds": evaluation.thresholds,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "package_version": __version__,
    }
    tables = {name: getattr(evaluation, name) for name in ("samples", "metrics", "categories", "history",
                                                             "per_class", "tide", "images", "unlabelled")
              if getattr(evaluation, name, None) is not None}
    try:
        store.save_result(model_name, version_name, name, result_meta, tables)
    except OSError as exc:  # a read-only or full store: reading the traces worked, saving did not
        raise ResultWriteError(
            f"the evaluation of {model_name}/{version_name} finished but its result could not be saved in "
            f"{store.results_dir(model_name, version_name)} ({exc}); make the store writable or free space "
            "(MLD_HOME or store=), then evaluate again") from exc
    return Result(result_meta, tables, store=store)


def _new_result_name(store: LocalStore, model_name: str, version_name: str, n_epoch: str | int | None) -> str:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    label = "all" if n_epoch is None else "latest" if n_epoch == "latest" else f"e{n_epoch}"
    base = f"{version_name}-{stamp}-{label}"
    existing = {m["result_name"] for m in store.list_results(model_name, version_name)}
    name, k = base, 1
    while name in existing:
        k += 1
        name = f"{base}-{k}"
    return name
