"""2D object detection codec: per-image detections, ground truth and image size -> validated Arrow rows.

Stored per image and epoch (one row; variable counts as Arrow list columns):

- ``input_id`` (string), ``image_h`` / ``image_w`` (int32, null when unknown)
- ``pred_boxes`` list<fixed_size_list<float32, 4>>, ``pred_scores`` list<float32>, ``pred_labels`` list<int32>
- ``gt_boxes`` list<fixed_size_list<float32, 4>>, ``gt_labels`` list<int32> (null for an image traced
  without ground truth, ``targets=None``: operation-time logs; such rows also carry ``logged_at``)
- ``features`` (optional): a float16 image-level embedding, as in classification.

Boxes are ``[x1, y1, x2, y2]`` in pixels of the image the model saw. Detections are filtered here, the
same way for every model family: score >= ``score_thresh``, then the ``max_detections`` highest scores;
what is kept is clipped to the image (box regression may reach past the border, as torchvision clips).
Ground-truth boxes beyond the border are refused instead: they reveal a wrong coordinate convention.

What the codec receives (adapters in ``integrations/detectors`` produce it from each family's output)::

    outputs = {"boxes": [(n_i, 4) per image], "scores": [(n_i,)], "labels": [(n_i,)],
               "image_size": [(h, w) per image] or None}
    targets = either format of the product page, see ``ground_truth_lists``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from ..core.arrays import leading_dim, to_float16, to_numpy
from ..core.batch import EncodedBatch, PendingBatch, RowProblem
from ..core.hashing import batch_ids
from ..core.vectors import FeatureReducer, vector_table
from ..errors import TraceInputError

GT_FORMATS = ("List[Dict]: [{'boxes': (N, 4) [x1, y1, x2, y2], 'labels': (N,)}, ...] one dict per image; or "
              "Dict[str, List]: {'boxes': [per-image (N, 4)], 'labels': [per-image (N,)]}")
# Tolerance for boxes slightly beyond the image border (sub-pixel rounding, boxes of 0-based pixel
# indices that end at the last pixel): beyond this they are refused, not clipped, because far-off boxes
# mean a wrong coordinate convention (normalised, xywh, or another image size).
BORDER_TOLERANCE_PX = 2.0


def ground_truth_lists(targets: Any, n_images: int | None = None) -> dict[str, list]:
    """Either ground-truth format of the product page as ``{"boxes": [...], "labels": [...]}`` per image.

    No data is copied or moved off the device: only the containers are rearranged.
    """
    if isinstance(targets, Mapping) and "boxes" in targets and "labels" in targets:
        boxes, labels, velocities = targets["boxes"], targets["labels"], targets.get("velocities")
        if hasattr(boxes, "shape") and len(boxes.shape) == 2 and n_images != boxes.shape[0]:
            # one image's (N, 4) given without the list around it
            boxes, labels, velocities = [boxes], [labels], None if velocities is None else [velocities]
        if not (_is_sequence(boxes) and _is_sequence(labels)):
            raise TraceInputError(f"ground truth 'boxes' and 'labels' must be per-image lists; accepted formats: {GT_FORMATS}")
        out = {"boxes": list(boxes), "labels": list(labels)}
        if velocities is not None:  # 3D: (M, 2) per frame
            out["velocities"] = list(velocities)
        return out
    if _is_sequence(targets) and all(isinstance(t, Mapping) and "boxes" in t and "labels" in t for t in targets):
        out = {"boxes": [t["boxes"] for t in targets], "labels": [t["labels"] for t in targets]}
        if any(t.get("velocities") is not None for t in targets):
            out["velocities"] = [t.get("velocities") for t in targets]
        return out
    found = type(targets).__name__
    if isinstance(targets, Mapping):
        found += f" with keys {sorted(map(str, targets))}"
    elif _is_sequence(targets) and len(targets):
        first = targets[0]
        found += f" of {type(first).__name__}" + (f" with keys {sorted(map(str, first))}" if isinstance(first, Mapping) else "")
    raise TraceInputError(f"ground truth in an unknown format ({found}); accepted formats: {GT_FORMATS}")


def _is_sequence(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes)) or (
        hasattr(value, "shape") and len(getattr(value, "shape", ())) >= 1 and not isinstance(value, Mapping))


class DetectionCodec:
    """Validates and encodes detection batches (one row per image).

    Args:
        num_classes: labels must lie in ``[0, num_classes)``; ``None`` skips that check.
        score_thresh, max_detections: the filter applied to every image's detections.
        iou_thresh: the model's NMS IoU (recorded in the run's metadata; DETR-style models have none).
        architecture: recorded in the metadata (``"torchvision.FasterRCNN"``, ``"hf.DetrForObjectDetection"``...).
        class_names: optional ``{id: name}``.
        max_feature_dim: project wider image embeddings down to this width.
    """

    task = "object_detection"

    def __init__(self, num_classes: int | None = None, score_thresh: float = 0.05, iou_thresh: float | None = 0.5,
                 max_detections: int = 300, architecture: str = "custom", class_names: Mapping | None = None,
                 max_feature_dim: int = 1024):
        self.num_classes = num_classes
        self.score_thresh = float(score_thresh)
        self.iou_thresh = None if iou_thresh is None else float(iou_thresh)
        self.max_detections = int(max_detections)
        self.architecture = architecture
        self.class_names = {int(k): str(v) for k, v in (class_names or {}).items()}
        self.features = FeatureReducer(max_feature_dim)

    # -- training thread: metadata only ---------------------------------------------------------
    def check(self, batch: PendingBatch) -> int:
        outputs = batch.outputs
        if not (isinstance(outputs, Mapping) and all(k in outputs for k in ("boxes", "scores", "labels"))):
            raise TraceInputError("detections must be {'boxes': [...], 'scores': [...], 'labels': [...]} with one "
                                  "entry per image (use ObjectDetectionTracer, or postprocess= to convert a "
                                  "model's output)")
        size = len(outputs["boxes"])
        if batch.targets is None:  # predictions only (operation logs): stored with null ground-truth columns
            batch.targets = {"boxes": [np.zeros((0, self.box_width))] * size, "labels": [np.zeros(0)] * size,
                             "missing": True}
        else:
            batch.targets = ground_truth_lists(batch.targets, size)
        counts = {"predicted boxes": size, "scores": len(outputs["scores"]), "labels": len(outputs["labels"]),
                  "ground-truth boxes": len(batch.targets["boxes"]),
                  "ground-truth labels": len(batch.targets["labels"])}
        for name, value in (("input_ids", batch.input_ids), ("image sizes", outputs.get("image_size")),
                            ("features", batch.features)):
            if value is not None:
                counts[name] = leading_dim(value)
        if batch.input_ids is None and batch.inputs is not None:
            counts["images"] = leading_dim(batch.inputs)
        if len(set(counts.values())) > 1:
            detail = ", ".join(f"{k}: {v}" for k, v in counts.items())
            raise TraceInputError(f"the batch has different numbers of images ({detail}); pass one entry per "
                                  "image everywhere (predictions, ground truth, input_ids)")
        for i in range(size):  # per image, metadata only
            n = leading_dim(outputs["boxes"][i]) or 0
            for name, seq in (("scores", outputs["scores"]), ("labels", outputs["labels"])):
                if (leading_dim(seq[i]) or 0) != n:
                    raise TraceInputError(f"image {i}: {n} predicted boxes but {leading_dim(seq[i])} {name}")
            n_gt = leading_dim(batch.targets["boxes"][i]) or 0
            if (leading_dim(batch.targets["labels"][i]) or 0) != n_gt:
                raise TraceInputError(f"image {i}: {n_gt} ground-truth boxes but "
                                      f"{leading_dim(batch.targets['labels'][i])} labels")
        return size

    # -- worker thread -------------------------------------------------------------------------
    def merge_key(self, batch: PendingBatch) -> tuple:
        """What batches must share to be encoded as one (metadata only)."""
        features = getattr(batch.features, "shape", None)
        return (bool(batch.targets.get("missing")), "velocities" in batch.targets,
                batch.outputs.get("image_size") is None, batch.logged_at, None if features is None else features[1:])

    def merge(self, batches: list[PendingBatch]) -> PendingBatch:
        """One batch with the images of several that share ``merge_key``: the per-image lists joined (the
        arrays themselves are not copied), image sizes, ids and features concatenated."""
        first = batches[0]
        images = [len(b.outputs["boxes"]) for b in batches]
        outputs = {k: [x for b in batches for x in b.outputs[k]] for k in ("boxes", "scores", "labels")}
        if first.outputs.get("image_size") is not None:
            outputs["image_size"] = np.concatenate([self._image_sizes(b.outputs["image_size"], n)
                                                    for b, n in zip(batches, images)])
        targets = {k: [x for b in batches for x in b.targets[k]] for k in first.targets if k != "missing"}
        if first.targets.get("missing"):
            targets["missing"] = True
        ids = np.concatenate([batch_ids(b.input_ids, b.inputs, n) for b, n in zip(batches, images)])
        features = None if first.features is None else np.concatenate([to_numpy(b.features) for b in batches])
        return PendingBatch(outputs, targets, ids, features, None, first.dataset_type, first.n_epoch, first.logged_at)

    def encode(self, batch: PendingBatch) -> EncodedBatch:
        outputs, targets = batch.outputs, batch.targets
        size = len(outputs["boxes"])
        pred_boxes, pred_counts = self._stack_boxes(outputs["boxes"], "predicted boxes")
        pred_scores = _concat(outputs["scores"], np.float64)
        pred_labels = _concat(outputs["labels"], np.float64)
        gt_boxes, gt_counts = self._stack_boxes(targets["boxes"], "ground-truth boxes", targets.get("velocities"))
        gt_labels = _concat(targets["labels"], np.float64)
        image_size = self._image_sizes(outputs.get("image_size"), size)
        ids = batch_ids(batch.input_ids, batch.inputs, size)
        features = self.features.reduce(to_numpy(batch.features), size)

        pred_image = np.repeat(np.arange(size), pred_counts)
        gt_image = np.repeat(np.arange(size), gt_counts)
        problems: list[RowProblem] = []
        bad_image = np.zeros(size, dtype=bool)

        def refuse(reason: str, per_box_bad: np.ndarray, owner: np.ndarray, message: str) -> None:
            """Refuse every image owning a bad box (counted once, under the first reason that hits it)."""
            images = np.zeros(size, dtype=bool)
            images[owner[per_box_bad]] = True
            images &= ~bad_image
            if images.any():
                first = int(np.flatnonzero(images)[0])
                problems.append(RowProblem(reason, int(images.sum()), f"{message} (image {ids[first]!r})"))
                bad_image[images] = True

        geometry = slice(0, self.box_width)  # velocities (3D) may be missing: NaN is allowed there
        refuse("non_finite_predictions", ~np.isfinite(pred_scores) | ~np.isfinite(pred_boxes[:, geometry]).all(axis=1),
               pred_image, "predicted boxes or scores contain NaN or Inf (diverged training or a bad batch); those "
               "images are not traced")
        # the uniform filter (score threshold, then the highest max_detections per image); only what is
        # stored is checked further, so a low-score junk box does not cost the image
        keep_pred = pred_scores >= self.score_thresh
        order = np.lexsort((-pred_scores, pred_image))  # by image, score descending
        rank = np.empty(len(order), dtype=np.int64)
        starts = np.cumsum(pred_counts) - pred_counts
        rank[order] = np.arange(len(order)) - np.repeat(starts, pred_counts)
        keep_pred &= rank < self.max_detections
        refuse("non_finite_ground_truth", ~np.isfinite(gt_boxes[:, geometry]).all(axis=1) | ~np.isfinite(gt_labels),
               gt_image, "ground-truth boxes or labels contain NaN or Inf; those images are not traced")
        problems += self.check_geometry(refuse, pred_boxes[keep_pred], pred_image[keep_pred], gt_boxes, gt_image,
                                        image_size)
        for name, labels, owner in (("predicted", pred_labels[keep_pred], pred_image[keep_pred]),
                                    ("ground-truth", gt_labels, gt_image)):
            finite = np.isfinite(labels)
            not_int = finite & (labels != np.round(labels))
            out_of_range = finite & ((labels < 0) | ((labels >= self.num_classes) if self.num_classes else False))
            refuse("label_out_of_range", not_int | out_of_range, owner,
                   f"{name} labels must be class indices in [0, {self.num_classes or 'num_classes'}) of the model's "
                   "classes (pass num_classes= if the model does not say); those images are not traced")
        pred_boxes, gt_boxes = self.finish_boxes(pred_boxes, pred_image, gt_boxes, image_size)

        # keep the model's own order (score-sorted for every known family) among what survives
        keep_pred &= ~bad_image[pred_image]
        keep_gt = ~bad_image[gt_image]
        kept = ~bad_image
        columns = {"input_id": pa.array(ids[kept], type=pa.string()), **self.frame_columns(image_size, kept)}
        for prefix, boxes, owner, keep in (("pred", pred_boxes, pred_image, keep_pred),
                                           ("gt", gt_boxes, gt_image, keep_gt)):
            columns.update(self.box_columns(prefix, boxes[keep], owner[keep], kept))
            if prefix == "pred":
                columns["pred_scores"] = _value_lists(pred_scores[keep], owner[keep], kept, pa.float32())
            columns[f"{prefix}_labels"] = _value_lists((pred_labels if prefix == "pred" else gt_labels)[keep],
                                                       owner[keep], kept, pa.int32())
        if targets.get("missing"):  # no ground truth, not an image without objects
            for name in [c for c in columns if c.startswith("gt_")]:
                columns[name] = pa.nulls(int(kept.sum()), columns[name].type)
        if features is not None:
            columns["features"] = to_float16(features[kept])
        return EncodedBatch(vector_table(columns), problems)

    # -- what 2D and 3D do differently ---------------------------------------------------------
    box_width = 4

    def _stack_boxes(self, per_image: list, what: str, velocities: list | None = None) -> tuple[np.ndarray, np.ndarray]:
        return _stack_boxes(per_image, what, (4,), "[x1, y1, x2, y2]")

    def check_geometry(self, refuse: Callable, pred_boxes: np.ndarray, pred_image: np.ndarray, gt_boxes: np.ndarray,
                       gt_image: np.ndarray, image_size: np.ndarray | None) -> list[RowProblem]:
        """Refuse images with impossible boxes (kept predictions and all ground truth); return notices
        (``RowProblem`` with count 0) about what is kept but suspicious."""
        for name, boxes, owner in (("predicted", pred_boxes, pred_image), ("ground-truth", gt_boxes, gt_image)):
            inverted = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
            refuse(f"invalid_{name.replace('-', '_')}_boxes", inverted, owner,
                   f"{name} boxes with x2 < x1 or y2 < y1: boxes must be [x1, y1, x2, y2] in pixels (convert "
                   "[x, y, w, h] or [cx, cy, w, h] first); those images are not traced")
        if image_size is not None:
            h, w = image_size[gt_image, 0], image_size[gt_image, 1]
            outside = ((gt_boxes[:, 0] < -BORDER_TOLERANCE_PX) | (gt_boxes[:, 1] < -BORDER_TOLERANCE_PX)
                       | (gt_boxes[:, 2] > w + BORDER_TOLERANCE_PX) | (gt_boxes[:, 3] > h + BORDER_TOLERANCE_PX))
            refuse("ground_truth_boxes_outside_image", outside & (h > 0), gt_image,
                   "ground-truth boxes lie outside the image (height x width given by the image tensor): boxes must "
                   "be pixels of the image the model saw, not normalised to [0, 1] and not of another resize; "
                   "those images are not traced")
        return []

    def finish_boxes(self, pred_boxes: np.ndarray, pred_image: np.ndarray, gt_boxes: np.ndarray,
                     image_size: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Predictions may reach past the border (box regression): clipped, as torchvision does."""
        if image_size is not None:
            upper = image_size[:, [1, 0, 1, 0]][pred_image].astype(pred_boxes.dtype)  # w, h, w, h per box
            known = upper[:, 1] > 0  # height 0: size unknown
            if known.all():  # the usual case: clipped in place, without boolean-indexed copies
                np.clip(pred_boxes, 0, upper, out=pred_boxes)
            else:
                pred_boxes[known] = np.clip(pred_boxes[known], 0, upper[known])
        return pred_boxes, gt_boxes

    def frame_columns(self, image_size: np.ndarray | None, kept: np.ndarray) -> dict[str, pa.Array]:
        return {"image_h": _sizes(image_size, 0, kept), "image_w": _sizes(image_size, 1, kept)}

    def box_columns(self, prefix: str, boxes: np.ndarray, owner: np.ndarray, kept: np.ndarray) -> dict[str, pa.Array]:
        return {f"{prefix}_boxes": _box_lists(boxes, owner, kept)}

    def run_meta(self) -> dict:
        return {
            "task": self.task,
            "num_classes": self.num_classes,
            "class_names": {str(k): v for k, v in self.class_names.items()} or None,
            "architecture": self.architecture,
            "box_format": "xyxy",
            "score_thresh": self.score_thresh,
            "iou_thresh": self.iou_thresh,
            "max_detections_per_image": self.max_detections,
            **self.features.meta(),
        }

    @staticmethod
    def _image_sizes(value: Any, size: int) -> np.ndarray | None:
        if value is None:
            return None
        sizes = to_numpy(value)
        if sizes is None or sizes.shape != (size, 2):
            raise TraceInputError(f"image sizes must be (height, width) per image, got shape "
                                  f"{None if sizes is None else sizes.shape}")
        return sizes.astype(np.int64)


def _stack_boxes(per_image: list, what: str, widths: tuple[int, ...], layout: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-image (N, width) boxes concatenated, padded with NaN to the largest accepted width, and counts."""
    arrays = [np.asarray(to_numpy(b), dtype=np.float64) for b in per_image]
    full = max(widths)
    out, counts = [], []
    for a in arrays:
        if not a.size:
            counts.append(0)
            continue
        if a.ndim != 2 or a.shape[1] not in widths:
            raise TraceInputError(f"{what} must be (N, {' or '.join(map(str, widths))}) {layout} per image, got "
                                  f"shape {a.shape}")
        counts.append(len(a))
        out.append(a if a.shape[1] == full else np.pad(a, ((0, 0), (0, full - a.shape[1])), constant_values=np.nan))
    boxes = np.concatenate(out) if out else np.zeros((0, full))
    return boxes, np.array(counts, dtype=np.int64)


def _concat(per_image: list, dtype: Any) -> np.ndarray:
    arrays = [np.asarray(to_numpy(v), dtype=dtype).reshape(-1) for v in per_image]
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)


def _sizes(image_size: np.ndarray | None, axis: int, kept_images: np.ndarray) -> pa.Array:
    if image_size is None:
        return pa.nulls(int(kept_images.sum()), pa.int32())
    return pa.array(image_size[kept_images, axis].astype(np.int32), type=pa.int32())


def _offsets(owner: np.ndarray, kept_images: np.ndarray) -> pa.Array:
    counts = np.bincount(owner, minlength=len(kept_images))[kept_images]
    return pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))


def _value_lists(values: np.ndarray, owner: np.ndarray, kept_images: np.ndarray, type_: pa.DataType) -> pa.Array:
    # values are grouped by image already (per-image concatenation order)
    return pa.ListArray.from_arrays(_offsets(owner, kept_images), pa.array(values.astype(type_.to_pandas_dtype()),
                                                                           type=type_))


def _box_lists(boxes: np.ndarray, owner: np.ndarray, kept_images: np.ndarray) -> pa.Array:
    flat = pa.array(np.ascontiguousarray(boxes, dtype=np.float32).reshape(-1), type=pa.float32())
    return pa.ListArray.from_arrays(_offsets(owner, kept_images),
                                    pa.FixedSizeListArray.from_arrays(flat, boxes.shape[1]))
