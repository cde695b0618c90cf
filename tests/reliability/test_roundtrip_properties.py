"""Property-based tests (hypothesis): what is written is read back bit-identical.

- the vector codec (fixed-size binary columns) through Parquet and through the upload format (Arrow IPC);
- float16 features as stored: the same bits as NumPy's conversion, with or without torch's fast path;
- content-hash ids: equal inputs, equal ids; different inputs, different ids;
- the store round trip through the real tracing core and LocalStore, per task: ids, labels, scores,
  features (as float16), 2D and 3D boxes, scores and labels of detections.

Floats are compared by their bits (``view`` as unsigned ints), so NaN payloads, -0.0 and subnormals
count. ``derandomize=True`` and no example database keep CI deterministic; ``max_examples`` is modest.
"""

from __future__ import annotations

import io
import sys
import tempfile
import warnings
from unittest import mock

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mldbg_callbacks.core.arrays import to_float16
from mldbg_callbacks.core.hashing import row_hashes
from mldbg_callbacks.core.trace_core import TraceCore
from mldbg_callbacks.core.vectors import decode_vectors, vector_table
from mldbg_callbacks.store import LocalStore
from mldbg_callbacks.store.local import PARQUET_OPTIONS
from mldbg_callbacks.store.remote import decode_arrow, encode_chunk
from mldbg_callbacks.tasks.classification import ClassificationCodec
from mldbg_callbacks.tasks.detection import DetectionCodec
from mldbg_callbacks.tasks.detection3d import Detection3DCodec

PROPERTY = settings(max_examples=25, deadline=None, derandomize=True, database=None)
FLOAT16_MAX = float(np.finfo(np.float16).max)


def bits(array: np.ndarray) -> np.ndarray:
    """The raw bits of a float array, so that NaN == NaN and -0.0 != 0.0 in comparisons."""
    array = np.ascontiguousarray(array)
    return array.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[array.dtype.itemsize])


def matrices(dtype, min_rows=0, max_rows=20, max_width=12, elements=None) -> st.SearchStrategy:
    """2-D arrays of any values of ``dtype`` (NaN, Inf, -0.0 and subnormals included unless ``elements``)."""
    shape = st.tuples(st.integers(min_rows, max_rows), st.integers(1, max_width))
    return hnp.arrays(dtype, shape, elements=elements)


# -- codecs ----------------------------------------------------------------------------------------
@PROPERTY
@given(matrix=st.one_of(matrices(np.float16), matrices(np.float32), matrices(np.int32)))
def test_vector_columns_round_trip_bit_identical_through_parquet_and_arrow_ipc(matrix):
    table = vector_table({"input_id": pa.array([str(i) for i in range(len(matrix))]), "vector": matrix})
    parquet = io.BytesIO()
    pq.write_table(table, parquet, **PARQUET_OPTIONS)
    for restored in (table, pq.read_table(io.BytesIO(parquet.getvalue())), decode_arrow(encode_chunk(table))):
        decoded = decode_vectors(restored, "vector")
        assert decoded.dtype == matrix.dtype and decoded.shape == matrix.shape
        np.testing.assert_array_equal(bits(decoded) if matrix.dtype.kind == "f" else decoded,
                                      bits(matrix) if matrix.dtype.kind == "f" else matrix)
        assert restored.column("input_id").to_pylist() == table.column("input_id").to_pylist()


@PROPERTY
@given(matrix=matrices(np.float32, min_rows=1, max_width=40, elements=st.floats(allow_nan=False, width=32)))
def test_float16_features_are_numpys_conversion_of_the_clipped_values_with_and_without_torch(matrix):
    reference = np.clip(matrix, -FLOAT16_MAX, FLOAT16_MAX).astype(np.float16)
    with mock.patch.dict(sys.modules, {"torch": None}):  # as in a process that never imported torch
        assert np.array_equal(bits(to_float16(matrix)), bits(reference))
    import torch  # noqa: F401 - the fast path used when the training process has torch

    assert np.array_equal(bits(to_float16(matrix)), bits(reference))


@PROPERTY
@given(rows=matrices(np.float32, min_rows=2, max_rows=8, max_width=6, elements=st.floats(-4, 4, width=32)))
def test_content_ids_are_equal_exactly_for_equal_inputs(rows):
    ids = row_hashes(rows)
    for i in range(len(rows)):
        for j in range(len(rows)):
            assert (ids[i] == ids[j]) == (bits(rows[i]).tobytes() == bits(rows[j]).tobytes())
    assert row_hashes(rows.copy()).tolist() == ids.tolist()  # stable: the same bytes, the same id


# -- store round trips through the tracing core ----------------------------------------------------
def traced(codec, record_batches) -> pa.Table:
    """Record through a real TraceCore into a fresh LocalStore, wait, read the committed rows back."""
    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings():
        warnings.simplefilter("error")  # a valid batch is never skipped or changed with a warning
        core = TraceCore(codec, LocalStore(root).run("m", "v"), rows_per_part=7)  # several parts per epoch
        record_batches(core)
        stats = core.wait_for_save()
        core.close()
        assert stats.total_skipped == 0 and stats.duplicates_dropped == 0
        return LocalStore(root).read_traces("m", "v", "train", [0]).combine_chunks()


ids_strategy = st.lists(st.one_of(st.integers(-2**62, 2**62).map(str),
                                  st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1,
                                          max_size=12)),
                        min_size=1, max_size=24, unique=True)


@st.composite
def classification_batches(draw):
    ids = draw(ids_strategy)
    n, classes, width = len(ids), draw(st.integers(2, 6)), draw(st.integers(1, 8))
    finite = {"allow_nan": False, "allow_infinity": False, "width": 32}
    logits = draw(hnp.arrays(np.float32, (n, classes), elements=st.floats(**finite)))
    labels = draw(hnp.arrays(np.int64, n, elements=st.integers(0, classes - 1)))
    features = draw(hnp.arrays(np.float32, (n, width), elements=st.floats(-65504, 65504, **finite)))
    return ids, logits, labels, features


@PROPERTY
@given(batch=classification_batches(), batch_size=st.integers(1, 10))
@example(batch=(["a", "a\x00", "\x00"], np.eye(3, dtype=np.float32), np.arange(3), np.ones((3, 2), np.float32)),
         batch_size=3)  # NumPy's str dtype drops trailing NULs: these ids once collided
def test_classification_rows_round_trip_through_the_store(batch, batch_size):
    ids, logits, labels, features = batch

    def record(core):
        for start in range(0, len(ids), batch_size):
            rows = slice(start, start + batch_size)
            core.record(logits[rows], labels[rows], input_ids=ids[rows], features=features[rows])

    table = traced(ClassificationCodec(output_kind="logits"), record)
    assert table.column("input_id").to_pylist() == ids  # every row once, in recording order
    assert table.column("label").to_pylist() == labels.tolist()
    np.testing.assert_array_equal(bits(decode_vectors(table, "logits")), bits(logits))
    np.testing.assert_array_equal(bits(decode_vectors(table, "features")), bits(features.astype(np.float16)))


@st.composite
def detection_batches(draw, box_width: int):
    """Per unit: predicted boxes (valid, inside a 1000 x 1000 image for 2D), scores >= 0.5 in descending
    order (the model's own order is kept), labels < 5; ground-truth boxes and labels."""
    n = draw(st.integers(1, 6))
    coordinate = st.floats(0, 400, allow_nan=False, width=32)
    size = st.floats(0, 400, allow_nan=False, width=32)
    yaw = st.floats(-3, 3, allow_nan=False, width=32)

    def boxes(count):
        corner = draw(hnp.arrays(np.float32, (count, box_width - (4 if box_width == 7 else 2)), elements=coordinate))
        extent = draw(hnp.arrays(np.float32, (count, 3 if box_width == 7 else 2), elements=size))
        if box_width == 4:  # [x1, y1, x2, y2] with x2 >= x1, y2 >= y1
            return np.concatenate([corner, corner + extent], axis=1).astype(np.float32)
        return np.concatenate([corner, extent, draw(hnp.arrays(np.float32, (count, 1), elements=yaw))], axis=1)

    units = []
    for _ in range(n):
        n_pred, n_gt = draw(st.integers(0, 5)), draw(st.integers(0, 5))
        scores = np.sort(draw(hnp.arrays(np.float32, n_pred, elements=st.floats(0.5, 1, width=32))))[::-1].copy()
        units.append(dict(boxes=boxes(n_pred), scores=scores,
                          labels=draw(hnp.arrays(np.int64, n_pred, elements=st.integers(0, 4))),
                          gt_boxes=boxes(n_gt), gt_labels=draw(hnp.arrays(np.int64, n_gt, elements=st.integers(0, 4)))))
    return units


def check_detection_round_trip(codec, units: list[dict], box_width: int) -> None:
    ids = [f"img{i}" for i in range(len(units))]

    def record(core):
        detections = {k: [u[k] for u in units] for k in ("boxes", "scores", "labels")}
        targets = [{"boxes": u["gt_boxes"], "labels": u["gt_labels"]} for u in units]
        core.record(detections, targets, input_ids=np.array(ids))

    table = traced(codec, record)
    assert table.column("input_id").to_pylist() == ids
    rows = table.to_pylist()
    for row, unit in zip(rows, units):
        for stored, given_boxes in (("pred_boxes", unit["boxes"]), ("gt_boxes", unit["gt_boxes"])):
            stored_boxes = np.asarray(row[stored], np.float32).reshape(-1, box_width)
            np.testing.assert_array_equal(bits(stored_boxes), bits(given_boxes))  # 3D: a yaw in range is kept
        np.testing.assert_array_equal(bits(np.asarray(row["pred_scores"], np.float32)), bits(unit["scores"]))
        assert row["pred_labels"] == unit["labels"].tolist() and row["gt_labels"] == unit["gt_labels"].tolist()


@PROPERTY
@given(units=detection_batches(box_width=4))
def test_detection_rows_round_trip_through_the_store(units):
    check_detection_round_trip(DetectionCodec(num_classes=5, score_thresh=0.0, max_detections=10), units, 4)


@PROPERTY
@given(units=detection_batches(box_width=7))
def test_detection3d_rows_round_trip_through_the_store(units):
    check_detection_round_trip(Detection3DCodec(num_classes=5, score_thresh=0.0, max_detections=10), units, 7)
