"""3D object detection codec: per-frame 3D boxes, scores, labels and ground truth -> validated Arrow rows.

Our box is ``[cx, cy, cz, w, l, h, yaw]``: the geometric centre in metres, ``l`` the extent along the
heading (the box's x axis at yaw 0), ``w`` across it, ``h`` the height, ``yaw`` the rotation about +z
from +x in radians (MMDetection3D >= 1.0's LiDAR convention; nuScenes' ``wlh`` is ``(w, l, h)``). Nine
columns add the velocity ``vx, vy`` in m/s; ground truth may also give ``velocities`` (M, 2) apart.

Stored per frame and epoch (one row): ``input_id``, ``pred_boxes`` / ``gt_boxes`` list<float32[7]>,
``pred_velocities`` / ``gt_velocities`` list<float32[2]> (only when the run has velocities; NaN for a
frame without), ``pred_scores``, ``pred_labels``, ``gt_labels``, optional ``features``.

Validation on top of the 2D codec's (non-finite values, labels, the uniform score / top-k filter):
boxes must have 7 or 9 columns (else the batch is refused with the layout), negative sizes refuse the
frame, yaw is normalised to [-pi, pi) (not refused), and ground truth that lies entirely outside the
model's ``pc_range`` is warned about (counted under ``gt_outside_pc_range``, nothing is dropped).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa

from ..core.arrays import to_numpy
from ..core.batch import RowProblem
from ..errors import TraceInputError
from .detection import DetectionCodec, _box_lists, _stack_boxes

BOX_LAYOUT = "[cx, cy, cz, w, l, h, yaw] (+ vx, vy)"


def normalize_yaw(yaw: np.ndarray) -> np.ndarray:
    """Angles to [-pi, pi). Angles already in range are kept bit for bit: the shift by pi would round away
    up to ~4e-16 rad (a yaw of 1e-16 became 0), so a stored box would not be the box the model gave."""
    yaw = np.asarray(yaw)
    in_range = (yaw >= -np.pi) & (yaw < np.pi)
    return np.where(in_range, yaw, (yaw + np.pi) % (2 * np.pi) - np.pi)


class Detection3DCodec(DetectionCodec):
    """Validates and encodes 3D detection batches (one row per frame).

    Args (beyond the 2D codec's): ``pc_range`` ``[x_min, y_min, z_min, x_max, y_max, z_max]`` of the
    model, recorded in the metadata and used to warn about ground truth the model cannot see.
    """

    task = "object_detection_3d"
    box_width = 7

    def __init__(self, *args, pc_range: Sequence[float] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.pc_range = None if pc_range is None else [float(v) for v in pc_range]
        if self.pc_range is not None and len(self.pc_range) != 6:
            raise ValueError(f"pc_range must be [x_min, y_min, z_min, x_max, y_max, z_max], got {pc_range!r}")
        self.velocities: dict[str, bool] = {}  # per prefix, decided by the first batch: one schema per run

    def _stack_boxes(self, per_image: list, what: str, velocities: list | None = None) -> tuple[np.ndarray, np.ndarray]:
        boxes, counts = _stack_boxes(per_image, what, (7, 9), BOX_LAYOUT)
        if velocities is not None:  # ground truth with velocities given apart from the boxes
            given = [np.asarray(to_numpy(v), dtype=np.float64).reshape(-1, 2) if v is not None
                     else np.full((n, 2), np.nan) for v, n in zip(velocities, counts)]
            if [len(v) for v in given] != counts.tolist():
                raise TraceInputError(f"ground-truth velocities must be (M, 2) per frame, one row per box; got "
                                      f"{[len(v) for v in given]} rows for {counts.tolist()} boxes")
            if given:
                boxes[:, 7:9] = np.concatenate(given)
        return boxes, counts

    def check_geometry(self, refuse: Callable, pred_boxes: np.ndarray, pred_image: np.ndarray, gt_boxes: np.ndarray,
                       gt_image: np.ndarray, image_size: np.ndarray | None) -> list[RowProblem]:
        for name, boxes, owner in (("predicted", pred_boxes, pred_image), ("ground-truth", gt_boxes, gt_image)):
            refuse("negative_box_sizes", (boxes[:, 3:6] < 0).any(axis=1), owner,
                   f"{name} boxes with a negative size: boxes must be {BOX_LAYOUT} with w, l, h >= 0 in metres; "
                   "those frames are not traced")
        if self.pc_range is not None and len(gt_boxes):
            low, high = np.array(self.pc_range[:3]), np.array(self.pc_range[3:])
            outside = ((gt_boxes[:, :3] < low) | (gt_boxes[:, :3] > high)).any(axis=1)
            if outside.all():
                return [RowProblem(
                    "gt_outside_pc_range", 0,
                    f"every ground-truth box of a batch lies outside pc_range {self.pc_range}: the model cannot "
                    "detect them. Check pc_range= and the box coordinate frame (LiDAR vs. camera vs. global); "
                    "the frames are traced as they are")]
        return []

    def finish_boxes(self, pred_boxes: np.ndarray, pred_image: np.ndarray, gt_boxes: np.ndarray,
                     image_size: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        for boxes in (pred_boxes, gt_boxes):
            boxes[:, 6] = normalize_yaw(boxes[:, 6])
        return pred_boxes, gt_boxes

    def frame_columns(self, image_size: np.ndarray | None, kept: np.ndarray) -> dict[str, pa.Array]:
        return {}

    def box_columns(self, prefix: str, boxes: np.ndarray, owner: np.ndarray, kept: np.ndarray) -> dict[str, pa.Array]:
        if prefix not in self.velocities:
            self.velocities[prefix] = bool(np.isfinite(boxes[:, 7:9]).any())
        columns = {f"{prefix}_boxes": _box_lists(boxes[:, :7], owner, kept)}
        if self.velocities[prefix]:
            columns[f"{prefix}_velocities"] = _box_lists(boxes[:, 7:9], owner, kept)
        return columns

    def run_meta(self) -> dict:
        meta = super().run_meta()
        meta.update({"box_format": "cx,cy,cz,w,l,h,yaw", "pc_range": self.pc_range,
                     "max_detections_per_frame": meta.pop("max_detections_per_image"),
                     "pred_velocities": self.velocities.get("pred", False),
                     "gt_velocities": self.velocities.get("gt", False)})
        return meta


def mmdet3d_to_ours(tensor: np.ndarray) -> np.ndarray:
    """MMDetection3D LiDAR box rows ``(x, y, z_bottom, x_size, y_size, z_size, yaw[, vx, vy])`` -> ours
    ``[cx, cy, cz, w, l, h, yaw(, vx, vy)]``: the bottom centre rises by half the height, ``l`` is
    ``x_size`` (the extent along the heading), ``w`` is ``y_size``."""
    tensor = np.asarray(tensor, dtype=np.float64)
    out = tensor.copy()
    out[:, 2] = tensor[:, 2] + tensor[:, 5] / 2
    out[:, 3], out[:, 4] = tensor[:, 4], tensor[:, 3]
    return out


def ours_to_mmdet3d(boxes: np.ndarray) -> np.ndarray:
    """The inverse of ``mmdet3d_to_ours``."""
    boxes = np.asarray(boxes, dtype=np.float64)
    out = boxes.copy()
    out[:, 2] = boxes[:, 2] - boxes[:, 5] / 2
    out[:, 3], out[:, 4] = boxes[:, 4], boxes[:, 3]
    return out
