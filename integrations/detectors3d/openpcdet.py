"""OpenPCDet detectors (``pcdet.models.detectors.*``: PointPillar, SECONDNet, PV-RCNN, Voxel R-CNN,
CenterPoint, VoxelNeXt, TransFusion, BevFusion...)::

    tracer = ObjectDetection3DTracer(model, "pointpillar", "v1")  # OpenPCDetTracer, thresholds from model_cfg
    for batch_dict in val_loader:
        load_data_to_gpu(batch_dict)
        tracer(batch_dict, None, input_ids=list(batch_dict["frame_id"]), dataset_type="val", n_epoch=epoch)
    tracer.wait_for_save()

**Output read.** In eval mode ``model(batch_dict)`` returns ``(pred_dicts, recall_dicts)`` with one
``{"pred_boxes": (N, 7|9), "pred_scores": (N,), "pred_labels": (N,)}`` per frame. ``pred_boxes`` rows are
``[x, y, z, dx, dy, dz, heading(, vx, vy)]``: ``(x, y, z)`` the geometric centre, ``dx`` the extent along
the heading, ``heading`` about +z from +x (OpenPCDet's unified normative frame, the same as mmdet3d >= 1.0's
LiDAR frame). Converted to ours ``[cx, cy, cz, w, l, h, yaw(, vx, vy)]`` as ``cx, cy, cz = x, y, z``,
``w = dy``, ``l = dx``, ``h = dz``, ``yaw = heading`` (``pcdet_to_ours``). ``pred_labels`` are 1-based
(OpenPCDet reserves 0 for the background); the tracer stores ``pred_labels - 1``, so label ``i`` is
``model.class_names[i]``.

**Ground truth.** ``targets`` in the product's formats (ours, 0-based labels); or ``targets=None`` with
the batch dict as input: its ``gt_boxes`` (B, M, 8) ``[x, y, z, dx, dy, dz, heading, class]`` (or
(B, M, 10) with ``vx, vy`` before the class), class 1-based, the rows of a frame padded with zeros up to
M, are converted like predictions, the padding (class 0) dropped and the class made 0-based. The same
tensor may be passed as ``targets``. So ``tracer(batch_dict, None, ...)`` traces a validation batch of
an OpenPCDet dataloader (after ``load_data_to_gpu``) with its own annotations.

**Thresholds** (``model_settings``): ``model.model_cfg.DENSE_HEAD.POST_PROCESSING`` when the dense head
does its own post-processing (CenterPoint, VoxelNeXt, TransFusion), else ``model.model_cfg.POST_PROCESSING``:
``SCORE_THRESH``, ``NMS_CONFIG.NMS_THRESH``, and ``max_detections`` = ``NMS_CONFIG.NMS_POST_MAXSIZE`` x the
number of separately suppressed groups (the dense head's ``CLASS_NAMES_EACH_HEAD`` groups, or every class
with ``MULTI_CLASSES_NMS``), ``MAX_OBJ_PER_SAMPLE`` where there is no NMS; ``num_classes`` =
``model.num_class``; class names ``model.class_names``; ``pc_range`` = ``model.dataset.point_cloud_range``.

**Training mode**: ``model(batch_dict)`` returns ``(ret_dict, tb_dict, disp_dict)`` (the loss is
``ret_dict["loss"]``); the tracer returns that tuple and gets the predictions from an extra pass under
``torch.no_grad()`` with every module in eval mode, on a shallow copy of the batch dict taken before the
training pass (OpenPCDet's modules add their outputs to the dict they are given). The extra pass costs
about one inference forward per traced batch.

**Features** (``feature_layer=None``): ``batch_dict["spatial_features_2d"]`` (the 2D backbone's BEV map,
which the model leaves in the dict) of the pass the predictions come from, mean-pooled to one vector per
frame; a module name = that module's output instead; ``False`` = none.

OpenPCDet needs CUDA (its ops), so it is not installed here: the tests use stand-in modules whose class
lives in ``pcdet.models.detectors.*`` and that return exactly constructed outputs of this format.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from mldbg_callbacks.core.arrays import to_numpy
from mldbg_callbacks.errors import TraceInputError
from mldbg_callbacks.integrations.detectors.torchvision import inference_mode_pass
from mldbg_callbacks.integrations.torch_model import PooledFeatures
from mldbg_callbacks.training import Detection3DTracer

from .mmdet3d import _class_names, _first, _get, _int, _range6, describe, mmdet3d_ground_truth

__all__ = ["OpenPCDetTracer", "pcdet_to_ours", "ours_to_pcdet", "decode_pcdet", "pcdet_ground_truth"]

PCDET_LAYOUT = "[x, y, z, dx, dy, dz, heading(, vx, vy)]"


def pcdet_to_ours(boxes: Any) -> np.ndarray:
    """OpenPCDet rows ``[x, y, z, dx, dy, dz, heading(, vx, vy)]`` (centre, dx along the heading) -> ours
    ``[cx, cy, cz, w, l, h, yaw(, vx, vy)]``: ``w = dy``, ``l = dx``, the rest unchanged."""
    boxes = np.asarray(to_numpy(boxes), dtype=np.float64)
    if boxes.ndim == 1 and boxes.size == 0:
        boxes = boxes.reshape(0, 7)
    if boxes.ndim != 2 or boxes.shape[1] not in (7, 9):
        raise TraceInputError(f"OpenPCDet boxes must be (N, 7) or (N, 9) rows {PCDET_LAYOUT}, got shape "
                              f"{tuple(boxes.shape)}")
    out = boxes.copy()
    out[:, 3], out[:, 4] = boxes[:, 4], boxes[:, 3]
    return out


def ours_to_pcdet(boxes: Any) -> np.ndarray:
    """The inverse of ``pcdet_to_ours`` (the same swap)."""
    boxes = np.asarray(boxes, dtype=np.float64)
    out = boxes.copy()
    out[:, 3], out[:, 4] = boxes[:, 4], boxes[:, 3]
    return out


def decode_pcdet(outputs: Any) -> list[dict[str, np.ndarray]]:
    """``(pred_dicts, recall_dicts)`` or ``pred_dicts`` -> per-frame ours, labels made 0-based."""
    pred_dicts = outputs[0] if isinstance(outputs, tuple) and len(outputs) == 2 and isinstance(
        outputs[1], Mapping) else outputs
    if not isinstance(pred_dicts, (list, tuple)) or not all(
            isinstance(d, Mapping) and all(k in d for k in ("pred_boxes", "pred_scores", "pred_labels"))
            for d in pred_dicts):
        raise TraceInputError(f"OpenPCDet output must be (pred_dicts, recall_dicts) with one {{'pred_boxes', "
                              f"'pred_scores', 'pred_labels'}} dict per frame, got {describe(outputs)} (in training "
                              "mode the model returns losses: the tracer runs an extra eval pass for that)")
    return [{"boxes": pcdet_to_ours(d["pred_boxes"]), "scores": np.asarray(to_numpy(d["pred_scores"])).reshape(-1),
             "labels": np.asarray(to_numpy(d["pred_labels"])).reshape(-1) - 1} for d in pred_dicts]


def pcdet_ground_truth(gt_boxes: Any) -> list[dict[str, np.ndarray]]:
    """OpenPCDet's ``gt_boxes`` (B, M, 8|10), class last and 1-based, zero-padded -> per-frame ours."""
    array = np.asarray(to_numpy(gt_boxes), dtype=np.float64)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[2] not in (8, 10):
        raise TraceInputError("OpenPCDet gt_boxes must be (B, M, 8) [x, y, z, dx, dy, dz, heading, class] or "
                              f"(B, M, 10) with vx, vy before the class, got shape {tuple(array.shape)}")
    frames = []
    for frame in array:
        keep = frame[:, -1] > 0  # class 0: padding
        frames.append({"boxes": pcdet_to_ours(frame[keep, :-1]), "labels": frame[keep, -1].astype(np.int64) - 1})
    return frames


class OpenPCDetTracer(Detection3DTracer):
    """Trace an OpenPCDet detector (formats, conversions and settings in the module docstring)."""

    def __init__(self, model: Any, model_name: str, version_name: str, score_thresh: float | None = None,
                 iou_thresh: float | None = None, max_detections_per_frame: int | None = None, **kwargs: Any):
        self.architecture = f"openpcdet.{type(model).__name__}"
        self._batch: Any = None
        self._dict_features: Any = None
        super().__init__(model, model_name, version_name, score_thresh=score_thresh, iou_thresh=iou_thresh,
                         max_detections_per_frame=max_detections_per_frame, **kwargs)
        layer = self.feature_layer if self.feature_layer not in (None, False) else False
        self._features = PooledFeatures(model, layer, None) if isinstance(model, torch.nn.Module) else None

    def model_settings(self) -> dict:
        cfg = _get(self.model, "model_cfg")
        head_cfg = _get(cfg, "DENSE_HEAD", "POST_PROCESSING")
        post = _first(head_cfg, _get(cfg, "POST_PROCESSING"))
        nms = _get(post, "NMS_CONFIG")
        num_class = _int(_get(self.model, "num_class"))
        per_group = _int(_get(nms, "NMS_POST_MAXSIZE"))
        groups = 1
        if head_cfg is not None and _get(cfg, "DENSE_HEAD", "CLASS_NAMES_EACH_HEAD") is not None:
            groups = len(_get(cfg, "DENSE_HEAD", "CLASS_NAMES_EACH_HEAD"))
        elif _get(nms, "MULTI_CLASSES_NMS") and num_class:
            groups = num_class
        return {"score_thresh": _get(post, "SCORE_THRESH"), "iou_thresh": _get(nms, "NMS_THRESH"),
                "max_detections": per_group * groups if per_group else _int(_get(post, "MAX_OBJ_PER_SAMPLE")),
                "num_classes": num_class, "class_names": _class_names(_get(self.model, "class_names")),
                "pc_range": _first(_range6(_get(self.model, "dataset", "point_cloud_range")),
                                   _range6(_get(self.model, "point_cloud_range")))}

    def forward(self, inputs: Any, targets: Any, **kwargs: Any) -> tuple[Any, Any, Any]:
        """Eval: ``model(batch_dict)``. Training: the training pass (returned) and an inference pass on a
        shallow copy of the batch dict (module docstring)."""
        if not isinstance(inputs, Mapping):
            raise TraceInputError(f"OpenPCDetTracer takes OpenPCDet's batch dict (points/voxels, batch_size, ...), "
                                  f"got {describe(inputs)}")
        self._batch = inputs
        self._pop_features()
        if not getattr(self.model, "training", False):
            outputs = self.model(inputs, **kwargs)
            return outputs, outputs, self._features_of(inputs)
        pristine = dict(inputs)
        returned = self.model(inputs, **kwargs)
        self._pop_features()
        with inference_mode_pass(self.model):
            outputs = self.model(pristine, **kwargs)
        return returned, outputs, self._features_of(pristine)

    def _pop_features(self) -> Any:
        return self._features.pop() if self._features is not None else None

    def _features_of(self, batch: Mapping) -> Any:
        hooked = self._pop_features()
        if self.feature_layer is False or hooked is not None:
            return hooked
        bev = batch.get("spatial_features_2d")
        if isinstance(bev, torch.Tensor) and bev.ndim == 4:
            return bev.detach().flatten(2).mean(-1)
        return None

    def count_inputs(self, inputs: Any) -> int:
        """Frames of a batch dict: its ``batch_size``."""
        size = inputs.get("batch_size") if isinstance(inputs, Mapping) else None
        return int(size) if isinstance(size, (int, np.integer)) else super().count_inputs(inputs)

    def decode(self, outputs: Any, inputs: Any) -> Any:
        return decode_pcdet(outputs)

    def ground_truth(self, targets: Any, raw: Any) -> Any:
        """``targets`` (ours, or OpenPCDet's ``gt_boxes`` tensor), else the batch dict's ``gt_boxes``."""
        if targets is None:
            gt_boxes = self._batch.get("gt_boxes") if isinstance(self._batch, Mapping) else None
            return None if gt_boxes is None else pcdet_ground_truth(gt_boxes)
        if hasattr(targets, "shape") and len(targets.shape) == 3:
            return pcdet_ground_truth(targets)
        return mmdet3d_ground_truth(targets)  # the product's formats pass through unchanged

    def remove_hooks(self) -> None:
        if self._features is not None:
            self._features.remove()
