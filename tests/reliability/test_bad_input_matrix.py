"""The bad-input matrix: one table-driven test per task (classification, 2D detection, 3D detection) over the
bad inputs the tracers refuse: shapes and counts, NaN/Inf, label ranges and types, boxes, formats, names,
ids and epochs.

Every case runs in both modes through the real tracer and a real LocalStore:

- fail-safe (``strict=False``): two bad batches never raise; one ``TraceWarning`` names the reason; the
  refused units are counted in ``tracer.stats.rows_skipped[reason]``; the good units of a partly bad
  batch are stored unchanged and a good batch afterwards is stored (training goes on);
- strict (``strict=True``): the bad batch raises ``TraceInputError`` (a ``ValueError``) whose message
  names the fix; nothing of it is stored and the tracer stays usable.

Names are a usage error, not bad data: an invalid ``dataset_type`` raises ``InvalidNameError`` in both
modes (every bad name is in ``tests/test_store.py::BAD_NAMES``; here one per task).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest
import scipy.special

from mldbg_callbacks.core.trace_core import TraceWarning
from mldbg_callbacks.core.vectors import decoded_rows
from mldbg_callbacks.errors import InvalidNameError, TraceInputError
from mldbg_callbacks.store import LocalStore
from mldbg_callbacks.training import ClassificationTracer, Detection3DTracer, DetectionTracer

MODEL = "m"


@dataclass(frozen=True)
class BadInput:
    """One row of a task's table. ``build(rng, offset)`` returns the keyword arguments of ``tracer.record``
    for a batch of ``units`` units with ids ``offset, offset + 1, ...``."""

    build: Callable[[np.random.Generator, int], dict]
    reason: str  # the key of tracer.stats.rows_skipped in fail-safe mode
    fix: tuple[str, ...]  # fragments of the strict-mode message (the fix it names)
    kept: tuple[int, ...] = ()  # units of the bad batch that fail-safe mode still stores
    units: int = 4
    always: type[Exception] | None = None  # raised in both modes (a usage error, e.g. a bad name)
    prime: Callable | None = None  # the batch recorded before (default: the task's good batch)


@dataclass(frozen=True)
class Task:
    make_tracer: Callable  # (store, version, strict) -> tracer
    good: Callable[[np.random.Generator, int], dict]  # a valid batch of 4 units, as record() kwargs
    dataset_type: str = "train"
    check_kept: Callable | None = None  # (stored row, bad batch, unit index): the kept unit is stored unchanged
    cases: dict = field(default_factory=dict)


def ids(offset: int, n: int = 4) -> np.ndarray:
    return np.arange(offset, offset + n)


def replace(build: Callable, **changes) -> Callable:
    """A builder whose batch differs from ``build``'s in the given record() arguments (callables get the batch)."""
    def changed(rng, offset):
        batch = build(rng, offset)
        return {**batch, **{k: (v(batch) if callable(v) else v) for k, v in changes.items()}}
    return changed


def common_cases(good: Callable, dataset_type: str) -> dict[str, BadInput]:
    """Ids, epochs and names: the same refusal in every task (the core validates them)."""
    return {
        "ids_not_1d": BadInput(replace(good, input_ids=lambda b: np.stack([b["input_ids"]] * 2, axis=1)),
                               "invalid_batch", ("input_ids must be one id per sample (1-D)",)),
        "ids_fractional": BadInput(replace(good, input_ids=lambda b: b["input_ids"] + 0.5), "invalid_batch",
                                   ("non-integer floats", "pass ints or strings")),
        "ids_missing_and_no_inputs": BadInput(replace(good, input_ids=None), "invalid_batch",
                                              ("input_ids is None and no inputs", "pass input_ids=")),
        "negative_epoch": BadInput(replace(good, n_epoch=-1), "invalid_batch", ("n_epoch must be a non-negative int",)),
        "epoch_not_int": BadInput(replace(good, n_epoch=1.5), "invalid_batch", ("n_epoch must be a non-negative int",)),
        "dataset_type_path": BadInput(replace(good, dataset_type=f"../{dataset_type}"), "", ("path separator",),
                                      always=InvalidNameError),
    }


# -- classification --------------------------------------------------------------------------------
C = 3


def classification_good(rng, offset, n=8):
    return dict(outputs=rng.standard_normal((n, C)).astype(np.float32), labels=rng.integers(0, C, n),
                input_ids=ids(offset, n))


def with_values(**changes: Callable) -> Callable:
    """A classification batch with some entries replaced: ``changes[name](array)`` edits a copy in place."""
    def build(rng, offset):
        batch = classification_good(rng, offset)
        for name, edit in changes.items():
            edit(batch[name])
        return batch
    return build


def check_classification_row(row, batch, i):
    assert row["label"] == batch["labels"][i]
    np.testing.assert_array_equal(np.asarray(row["logits"], np.float32), batch["outputs"][i])


def _labels_out_of_range(labels):
    labels[2], labels[5] = C, -1


def _non_finite(outputs):
    outputs[1, 0], outputs[6, 2] = np.nan, np.inf


CLASSIFICATION = Task(
    make_tracer=lambda store, version, strict: ClassificationTracer(lambda x: x, MODEL, version, store=store,
                                                                    feature_layer=False, strict=strict),
    good=classification_good, check_kept=check_classification_row,
    cases={
        "labels_count": BadInput(replace(classification_good, labels=lambda b: b["labels"][:7]), "invalid_batch",
                                 ("labels has 7 entries", "outputs has 8 rows", "one entry of labels per sample"), units=8),
        "ids_count": BadInput(replace(classification_good, input_ids=lambda b: b["input_ids"][:6]), "invalid_batch",
                              ("input_ids has 6 entries", "one entry of input_ids per sample"), units=8),
        "features_count": BadInput(replace(classification_good, features=np.ones((5, 4), np.float32)), "invalid_batch",
                                   ("features has 5 entries",), units=8),
        # (labels=None is no bad input: rows traced without labels are operation data, tests/test_operation.py)
        "labels_out_of_range": BadInput(with_values(labels=_labels_out_of_range), "label_out_of_range",
                                        ("outside [0, 3)", "labels must be class indices"), kept=(0, 1, 3, 4, 6, 7), units=8),
        "outputs_nan_inf": BadInput(with_values(outputs=_non_finite), "non_finite_outputs", ("NaN or Inf",),
                                    kept=(0, 2, 3, 4, 5, 7), units=8),
        "labels_fractional": BadInput(replace(classification_good, labels=np.array([0, 1, 2, 0.5, 1, 2, 0, 1])),
                                      "invalid_batch", ("integer class indices", "0.5"), units=8),
        "labels_strings": BadInput(replace(classification_good, labels=np.array(["cat", "dog", "cat", "bird"] * 2)),
                                   "invalid_batch", ("integer class indices", "map class names to indices first"), units=8),
        "labels_soft": BadInput(replace(classification_good, labels=lambda b: scipy.special.softmax(
            np.random.default_rng(1).standard_normal((8, C)), axis=1)), "invalid_batch",
            ("soft labels", "pass hard class indices"), units=8),
        "labels_2d": BadInput(replace(classification_good, labels=lambda b: np.stack([b["labels"]] * 2, axis=1)),
                              "invalid_batch", ("labels have shape (8, 2)", "one class index per sample"), units=8),
        "outputs_3d": BadInput(replace(classification_good, outputs=np.zeros((8, C, 2), np.float32)), "invalid_batch",
                               ("(batch, num_classes)",), units=8),
        "outputs_not_numeric": BadInput(replace(classification_good, outputs=np.full((8, C), "x")), "invalid_batch",
                                        ("outputs must be numeric scores",), units=8),
        "features_nan": BadInput(replace(classification_good, features=lambda b: np.where(
            np.arange(8)[:, None] == 3, np.nan, np.ones((8, 4), np.float32))), "non_finite_features",
            ("features contain NaN or Inf",), kept=(0, 1, 2, 4, 5, 6, 7), units=8),
        "features_width_changes": BadInput(replace(classification_good, features=np.ones((8, 6), np.float32)),
                                           "invalid_batch", ("features have 6 values per sample but earlier batches "
                                                             "had 4", "feature_layer="), units=8,
                                           prime=replace(classification_good, features=np.ones((8, 4), np.float32))),
        "class_count_changes": BadInput(replace(classification_good, outputs=np.zeros((8, C + 2), np.float32)),
                                        "invalid_batch", ("outputs has 5 columns but earlier batches had 3",
                                                          "one model head per tracer"), units=8),
        **{name: BadInput(case.build, case.reason, case.fix, units=8, always=case.always)
           for name, case in common_cases(classification_good, "train").items()},
    },
)


# -- 2D detection ----------------------------------------------------------------------------------
def detection_good(rng, offset, n=4):
    """Per image one predicted box (score 0.9, class 1) and one ground-truth box, in an 80 x 50 image."""
    return dict(detections=[{"boxes": np.array([[1.0, 1.0, 5.0 + i, 5.0]]), "scores": np.array([0.9]),
                             "labels": np.array([1])} for i in range(n)],
                targets=[{"boxes": np.array([[1.0, 1.0, 6.0, 6.0 + i]]), "labels": np.array([1])} for i in range(n)],
                input_ids=ids(offset, n), image_sizes=[(50, 80)] * n)


def in_unit(good: Callable, unit: int, where: str, key: str, value) -> Callable:
    """A detection batch (``good``'s) whose ``where`` ("detections" or "targets") entry ``key`` of one image
    or frame is ``value``."""
    def build(rng, offset):
        batch = good(rng, offset)
        batch[where][unit] = {**batch[where][unit], key: np.asarray(value)}
        return batch
    return build


def check_detection_row(row, batch, i):
    """2D and 3D: the kept image's (frame's) predicted boxes and ground-truth labels as given."""
    np.testing.assert_array_equal(np.asarray(row["pred_boxes"], np.float32),
                                  np.asarray(batch["detections"][i]["boxes"], np.float32))
    assert row["gt_labels"] == list(batch["targets"][i]["labels"])


def detection_format_cases(good: Callable, box: list) -> dict[str, BadInput]:
    """Format and count refusals shared by 2D and 3D detection; ``box`` is one valid box of the task."""
    return {
        "detections_unknown_format": BadInput(replace(good, detections=lambda b: [(d["boxes"], d["scores"])
                                                                                  for d in b["detections"]]),
                                              "undecodable_output", ("list of {'boxes', 'scores', 'labels'} dicts",)),
        "ground_truth_unknown_format": BadInput(replace(good, targets=lambda b: [(t["boxes"], t["labels"])
                                                                                 for t in b["targets"]]),
                                                "invalid_batch", ("List[Dict]", "Dict[str, List]")),
        # (targets=None: detections without ground truth are stored as operation data,
        #  tests/test_operation.py::test_inference_logger_stores_detections_without_ground_truth and its 3D twin)
        "image_count": BadInput(replace(good, targets=lambda b: b["targets"][:3]), "invalid_batch",
                                ("different numbers of images", "ground-truth boxes: 3", "one entry per image")),
        "ids_count": BadInput(replace(good, input_ids=lambda b: ids(0, 5)), "invalid_batch", ("input_ids: 5",)),
        "scores_count": BadInput(replace(good, detections=lambda b: [{**d, "scores": np.array([0.9, 0.8])}
                                                                     for d in b["detections"]]),
                                 "invalid_batch", ("image 0: 1 predicted boxes but 2 scores",)),
        "gt_labels_count": BadInput(replace(good, targets=lambda b: [{**t, "labels": np.array([1, 1])}
                                                                     for t in b["targets"]]),
                                    "invalid_batch", ("image 0: 1 ground-truth boxes but 2 labels",)),
        "pred_nan": BadInput(in_unit(good, 2, "detections", "scores", [np.nan]), "non_finite_predictions",
                             ("NaN or Inf",), kept=(0, 1, 3)),
        "gt_inf": BadInput(in_unit(good, 1, "targets", "boxes", [[np.inf] + box[1:]]), "non_finite_ground_truth",
                           ("ground-truth boxes or labels contain NaN or Inf",), kept=(0, 2, 3)),
        "pred_label_out_of_range": BadInput(in_unit(good, 0, "detections", "labels", [7]), "label_out_of_range",
                                            ("predicted labels must be class indices in [0, 3)",), kept=(1, 2, 3)),
        "gt_label_negative": BadInput(in_unit(good, 3, "targets", "labels", [-1]), "label_out_of_range",
                                      ("ground-truth labels must be class indices in [0, 3)",), kept=(0, 1, 2)),
        "gt_label_fractional": BadInput(in_unit(good, 3, "targets", "labels", [1.5]), "label_out_of_range",
                                        ("ground-truth labels must be class indices",), kept=(0, 1, 2)),
    }


DETECTION = Task(
    make_tracer=lambda store, version, strict: DetectionTracer(lambda x: x, MODEL, version, store=store,
                                                               num_classes=C, strict=strict),
    good=detection_good, dataset_type="val", check_kept=check_detection_row,
    cases={
        **detection_format_cases(detection_good, [1.0, 1.0, 6.0, 6.0]),
        "boxes_width_5": BadInput(in_unit(detection_good, 0, "detections", "boxes", [[1.0, 1.0, 5.0, 5.0, 0.0]]), "invalid_batch",
                                  ("predicted boxes must be (N, 4) [x1, y1, x2, y2]", "(1, 5)")),
        "pred_boxes_inverted": BadInput(in_unit(detection_good, 1, "detections", "boxes", [[6.0, 1.0, 2.0, 5.0]]),
                                        "invalid_predicted_boxes", ("x2 < x1 or y2 < y1", "convert [x, y, w, h]"),
                                        kept=(0, 2, 3)),
        "gt_boxes_inverted": BadInput(in_unit(detection_good, 2, "targets", "boxes", [[1.0, 9.0, 6.0, 2.0]]),
                                      "invalid_ground_truth_boxes", ("x2 < x1 or y2 < y1",), kept=(0, 1, 3)),
        "gt_boxes_outside_image": BadInput(in_unit(detection_good, 0, "targets", "boxes", [[0.0, 0.0, 200.0, 10.0]]),
                                           "ground_truth_boxes_outside_image",
                                           ("outside the image", "not normalised to [0, 1]"), kept=(1, 2, 3)),
        "image_sizes_shape": BadInput(replace(detection_good, image_sizes=lambda b: np.zeros((4, 3))), "invalid_batch",
                                      ("image sizes must be (height, width) per image", "(4, 3)")),
        **common_cases(detection_good, "val"),
    },
)


# -- 3D detection ----------------------------------------------------------------------------------
BOX3D = [1.0, 2.0, 0.0, 2.0, 4.0, 1.5, 0.1]  # [cx, cy, cz, w, l, h, yaw]


def detection3d_good(rng, offset, n=4):
    return dict(detections=[{"boxes": np.array([BOX3D]) + [i, 0, 0, 0, 0, 0, 0], "scores": np.array([0.9]),
                             "labels": np.array([1])} for i in range(n)],
                targets=[{"boxes": np.array([BOX3D]) + [0, i, 0, 0, 0, 0, 0], "labels": np.array([1])} for i in range(n)],
                input_ids=ids(offset, n))


def negative_size(axis: int) -> list:
    box = list(BOX3D)
    box[axis] = -box[axis]
    return [box]


DETECTION3D = Task(
    make_tracer=lambda store, version, strict: Detection3DTracer(lambda x: x, MODEL, version, store=store,
                                                                 postprocess=lambda out: out, num_classes=C,
                                                                 strict=strict),
    good=detection3d_good, dataset_type="val", check_kept=check_detection_row,
    cases={
        **detection_format_cases(detection3d_good, BOX3D),
        "boxes_8_columns": BadInput(in_unit(detection3d_good, 0, "detections", "boxes", [BOX3D + [0.0]]), "invalid_batch",
                                    ("(N, 7 or 9)", "[cx, cy, cz, w, l, h, yaw] (+ vx, vy)")),
        "pred_negative_length": BadInput(in_unit(detection3d_good, 1, "detections", "boxes", negative_size(4)), "negative_box_sizes",
                                         ("negative size", "w, l, h >= 0"), kept=(0, 2, 3)),
        "gt_negative_height": BadInput(in_unit(detection3d_good, 2, "targets", "boxes", negative_size(5)), "negative_box_sizes",
                                       ("ground-truth boxes with a negative size",), kept=(0, 1, 3)),
        "gt_velocities_rows": BadInput(in_unit(detection3d_good, 0, "targets", "velocities", [[1.0, 0.0], [0.0, 1.0]]), "invalid_batch",
                                       ("ground-truth velocities must be (M, 2) per frame", "one row per box")),
        **common_cases(detection3d_good, "val"),
    },
)


# -- the runner ------------------------------------------------------------------------------------
def stored_rows(store_dir, version: str, dataset_type: str) -> dict[str, dict]:
    table = LocalStore(store_dir).read_traces(MODEL, version, dataset_type, [0])
    rows = decoded_rows(table)
    assert len({r["input_id"] for r in rows}) == len(rows), "a row was stored twice"
    return {r["input_id"]: r for r in rows}


def trace_warnings(caught, reason: str) -> list:
    return [w for w in caught if issubclass(w.category, TraceWarning) and f"({reason})" in str(w.message)]


def check_fail_safe(task: Task, case: BadInput, store_dir, rng) -> None:
    tracer = task.make_tracer(store_dir, "fail-safe", False)
    kwargs = {"dataset_type": task.dataset_type}
    prime, good = (case.prime or task.good)(rng, 300), task.good(rng, 200)
    bad = [case.build(rng, 0), case.build(rng, 100)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracer.record(**{**kwargs, **prime})  # earlier batches fix the run's shape (classes, widths)
        for batch in bad:
            tracer.record(**{**kwargs, **batch})  # never raises
        tracer.record(**{**kwargs, **good})  # the training loop goes on
        stats = tracer.wait_for_save(n_epoch=0)
    skipped = case.units - len(case.kept)
    assert dict(stats.rows_skipped) == {case.reason: 2 * skipped}
    assert len(trace_warnings(caught, case.reason)) == 1, [str(w.message) for w in caught]
    assert [w for w in caught if not issubclass(w.category, TraceWarning)] == []
    rows = stored_rows(store_dir, "fail-safe", task.dataset_type)
    expected = {str(i) for i in (*prime["input_ids"], *good["input_ids"])}
    expected |= {str(batch["input_ids"][i]) for batch in bad for i in case.kept}
    assert set(rows) == expected
    assert stats.rows_written == len(expected)
    for batch in bad:
        for i in case.kept:  # the good units of a partly bad batch are stored unchanged
            task.check_kept(rows[str(batch["input_ids"][i])], batch, i)
    tracer.close()


def check_strict(task: Task, case: BadInput, store_dir, rng) -> None:
    tracer = task.make_tracer(store_dir, "strict", True)
    kwargs = {"dataset_type": task.dataset_type}
    prime, good = (case.prime or task.good)(rng, 300), task.good(rng, 200)
    tracer.record(**{**kwargs, **prime})
    with pytest.raises(TraceInputError) as info:
        tracer.record(**{**kwargs, **case.build(rng, 0)})
    message = str(info.value)
    for fragment in case.fix:
        assert fragment in message, message
    assert isinstance(info.value, ValueError)
    tracer.record(**{**kwargs, **good})  # the tracer stays usable; nothing of the refused batch is stored
    stats = tracer.wait_for_save()
    assert set(stored_rows(store_dir, "strict", task.dataset_type)) == {
        str(i) for i in (*prime["input_ids"], *good["input_ids"])}
    assert stats.total_skipped == 0
    tracer.close()


def check_always(task: Task, case: BadInput, store_dir, rng) -> None:
    for strict in (False, True):
        tracer = task.make_tracer(store_dir, f"always-{strict}", strict)
        with pytest.raises(case.always) as info:
            tracer.record(**{"dataset_type": task.dataset_type, **case.build(rng, 0)})
        assert all(fragment in str(info.value) for fragment in case.fix), str(info.value)
        tracer.close()
    assert not list(store_dir.parent.rglob("*.parquet"))


def check_case(task: Task, name: str, store_dir, rng) -> None:
    case = task.cases[name]
    if case.always:
        check_always(task, case, store_dir, rng)
        return
    check_fail_safe(task, case, store_dir, rng)
    check_strict(task, case, store_dir, rng)


@pytest.mark.parametrize("name", list(CLASSIFICATION.cases))
def test_classification_bad_input(store_dir, rng, name):
    check_case(CLASSIFICATION, name, store_dir, rng)


@pytest.mark.parametrize("name", list(DETECTION.cases))
def test_detection_bad_input(store_dir, rng, name):
    check_case(DETECTION, name, store_dir, rng)


@pytest.mark.parametrize("name", list(DETECTION3D.cases))
def test_detection3d_bad_input(store_dir, rng, name):
    check_case(DETECTION3D, name, store_dir, rng)
