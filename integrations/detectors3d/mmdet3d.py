"""MMDetection3D detectors (and the camera/fusion projects built on it): PointPillars and the other voxel
detectors, CenterPoint (CenterFormer), BEVFusion, the query-based camera detectors (BEVFormer, DETR3D,
PETR, StreamPETR, BEVDet), and a generic tracer for any other PyTorch module returning one of their
output formats::

    tracer = ObjectDetection3DTracer(model, "pointpillars", "v1")  # PointPillarsTracer, thresholds from test_cfg
    for data in val_dataloader:  # {"inputs": {"points": [...]}, "data_samples": [...]}
        tracer(data, None, input_ids=[s.metainfo["sample_idx"] for s in data["data_samples"]],
               dataset_type="val", n_epoch=epoch)  # ground truth from the data samples
    tracer.wait_for_save()

Nothing here imports ``mmdet3d`` at module level (the main environment has no mmdet3d); results are read
by their structure, and ``mmdet3d.structures`` is imported only when the tracer has to build
``Det3DDataSample``s for a real mmdet3d model.

**Outputs read.** ``Det3DDataSample``-like objects (mmdet3d >= 1.1, ``mode="predict"``): per frame
``.pred_instances_3d`` with ``.bboxes_3d`` (a ``LiDARInstance3DBoxes``-like object: ``.tensor`` (N, 7|9)),
``.scores_3d`` and ``.labels_3d``; the head's ``InstanceData`` (the same three fields) directly; mmdet3d
< 1.1 result dicts ``{"boxes_3d", "scores_3d", "labels_3d"}`` or ``{"pts_bbox": {...}}`` (BEVFormer,
BEVDet, StreamPETR, DETR3D's original repository); raw query outputs ``{"all_cls_scores": (L, B, Q, C)
logits, "all_bbox_preds": (L, B, Q, 8|10)}`` (see ``decode_nms_free``).

**Box conversion** (explicit, in NumPy float64). mmdet3d >= 1.0 LiDAR rows ``(x, y, z_bottom, x_size,
y_size, z_size, yaw[, vx, vy])`` become ours with ``mmdet3d_to_ours``: ``cz = z_bottom + z_size / 2``
(the gravity centre), ``l = x_size`` (the extent along the heading), ``w = y_size``, yaw and velocities
unchanged. mmdet3d < 1.0 (0.17.x, which BEVFormer, StreamPETR, PETR and DETR3D's original code are built
on) used another LiDAR convention: rows ``(x, y, z_bottom, w, l, h, theta)`` with ``x_size`` the width
and ``theta`` measured from -y, clockwise; ``legacy_to_ours`` maps them to ``w = x_size``, ``l = y_size``,
``yaw = -theta - pi/2`` (the formula of mmdet3d's own migration script, ``tools/update_data_coords.py``:
swap ``x_size``/``y_size``, ``yaw = -yaw - pi/2``). Which one applies is read from the
installed mmdet3d (``mmdet3d.__version__`` < 1.0 means legacy; no mmdet3d imported means >= 1.0), or set
with ``legacy_boxes=True/False``. ``DepthInstance3DBoxes`` (indoor) share the LiDAR layout and are
converted the same way; ``CameraInstance3DBoxes`` (monocular detectors) need the camera calibration and
are refused (``postprocess=`` converts them).

**Ground truth**: the product's formats (ours; a ``boxes`` entry that is an mmdet3d box object is converted
like predictions), or mmdet3d's: a list of ``Det3DDataSample`` (``eval_ann_info["gt_bboxes_3d"/
"gt_labels_3d"]`` when set -- the annotations mmdet3d's evaluators score against in validation -- else
``gt_instances_3d.bboxes_3d/labels_3d``), dicts with ``gt_bboxes_3d``/``gt_labels_3d`` (one per frame, or
a dict of per-frame lists), or ``InstanceData`` with ``bboxes_3d``/``labels_3d``. A ``gt_bboxes_3d``
given as a plain tensor/array is read in mmdet3d's layout of the installed version (bottom centre,
``x_size`` first) and converted like a box object's ``.tensor``. Boxes labelled ``-1`` (mmdet3d's mark for
classes outside the model's class list, which its evaluators ignore) are dropped. With ``targets=None``
the ground truth is read from the data samples of the call (the dataloader batch's ``data_samples``).

**Inputs and modes** (mmengine-based models, i.e. with a ``data_preprocessor``): the tracer accepts a
dataloader batch ``{"inputs": {"points": [...], "imgs": ...}, "data_samples": [...]}``, a batch inputs
dict ``{"points": [...], ...}`` (``data_samples=`` may be passed to the call), a list of point tensors
(N, 4+) or one such tensor (one frame). It then does what mmengine's ``val_step`` / ``train_step`` do:
``model.data_preprocessor(data, training)`` (voxelisation) and ``model(**data, mode=...)``. Frames given
without data samples get ``Det3DDataSample(metainfo={"box_type_3d": LiDARInstance3DBoxes, ...})`` (pass
``data_samples=`` for camera inputs, which need their calibration metainfo). In eval mode one
``mode="predict"`` pass runs and its list of ``Det3DDataSample`` is returned. In training mode the
``mode="loss"`` pass runs (ground truth: the data samples', or ``targets`` in our format converted to
``gt_instances_3d``) and its loss dict is returned; the predictions come from an extra
``data_preprocessor(data, False)`` + ``mode="predict"`` pass under ``torch.no_grad()`` with every module
in eval mode (flags restored afterwards). That pass costs one inference forward per traced batch
(roughly a third to a half of a training step): trace every k-th batch, or trace in validation. Models
without a ``data_preprocessor`` (mmdet3d < 1.1 and its projects) are called as ``model(**inputs)`` for a
dict (``model(inputs)`` otherwise) plus the call's keyword arguments, and must return predictions (eval
mode, e.g. ``return_loss=False, rescale=True``).

**Thresholds** (``model_settings``) are read from the model's config objects as each family documents;
the model applies them itself before the tracer sees anything, so a lower tracer ``score_thresh`` cannot
bring back what the model dropped.

**Features** (``feature_layer=None``): the neck's output (``pts_neck`` / ``neck``: the BEV feature map)
mean-pooled to one vector per frame; the camera detectors have none by default (their image necks run per
camera view). A module name picks another layer; ``False`` none.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from mldbg_callbacks.core.arrays import to_numpy
from mldbg_callbacks.errors import TraceInputError
from mldbg_callbacks.integrations.detectors import describe
from mldbg_callbacks.integrations.detectors.torchvision import inference_mode_pass
from mldbg_callbacks.integrations.torch_model import PooledFeatures
from mldbg_callbacks.tasks.detection3d import mmdet3d_to_ours, ours_to_mmdet3d
from mldbg_callbacks.training import Detection3DTracer

__all__ = ["MMDet3DTracer", "PointPillarsTracer", "CenterPointTracer", "BEVFusionTracer", "BEVFormerTracer",
           "Generic3DTracer", "decode_nms_free", "denormalize_bbox", "legacy_to_ours", "ours_to_legacy",
           "mmdet3d_boxes_to_ours", "mmdet3d_ground_truth", "output_format", "legacy_mmdet3d"]

MMDET3D_LAYOUT = "(x, y, z_bottom, x_size, y_size, z_size, yaw[, vx, vy])"

OUTPUT_FORMATS = (
    "(1) a list of Det3DDataSample-like objects with .pred_instances_3d (.bboxes_3d, .scores_3d, .labels_3d) "
    "or of InstanceData with those fields; (2) OpenPCDet's (pred_dicts, recall_dicts) or a list of "
    "{'pred_boxes', 'pred_scores', 'pred_labels'} dicts; (3) mmdet3d < 1.1 result dicts {'boxes_3d', "
    "'scores_3d', 'labels_3d'} or {'pts_bbox': {...}}, one per frame; (4) DETR-style query outputs "
    "{'all_cls_scores': (L, B, Q, C), 'all_bbox_preds': (L, B, Q, 8 or 10)} (BEVFormer/DETR3D/PETR)")


# -- small helpers ---------------------------------------------------------------------------------
def _get(obj: Any, *path: str) -> Any:
    """``obj.a.b`` or ``obj["a"]["b"]`` (config dicts, EasyDicts, modules); None where anything is missing."""
    for name in path:
        if obj is None:
            return None
        if isinstance(obj, Mapping):
            obj = obj.get(name)
        else:
            try:
                obj = getattr(obj, name, None)
            except Exception:  # noqa: BLE001 - some data elements raise other errors for missing fields
                return None
    return obj


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _range6(value: Any) -> list[float] | None:
    """A full ``[x_min, y_min, z_min, x_max, y_max, z_max]`` or None (CenterPoint's 2-value pc_range is not)."""
    if value is None:
        return None
    try:
        values = [float(v) for v in np.asarray(to_numpy(value), dtype=np.float64).reshape(-1)]
    except (TypeError, ValueError):
        return None
    return values if len(values) == 6 else None


def _int(value: Any) -> int | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, np.integer)) for v in value):
        return int(sum(value))  # CenterHead: classes per task
    return None


def _class_names(values: Any) -> dict[int, str] | None:
    if values is None or isinstance(values, (str, bytes)):
        return None
    flat: list[str] = []
    for value in values:
        if isinstance(value, (list, tuple)):
            flat.extend(str(v) for v in value)  # CenterHead: class names per task, in label order
        else:
            flat.append(str(value))
    return dict(enumerate(flat)) or None


def legacy_mmdet3d() -> bool:
    """True when the imported mmdet3d is < 1.0 (the legacy LiDAR box convention); False otherwise,
    also when mmdet3d is not imported."""
    version = getattr(sys.modules.get("mmdet3d"), "__version__", None)
    if not isinstance(version, str):
        return False
    try:
        return int(version.split(".")[0]) < 1
    except ValueError:
        return False


def legacy_to_ours(tensor: Any) -> np.ndarray:
    """mmdet3d < 1.0 LiDAR rows ``(x, y, z_bottom, w, l, h, theta[, vx, vy])`` (``x_size`` = width,
    ``theta`` from -y, clockwise) -> ours ``[cx, cy, cz, w, l, h, yaw(, vx, vy)]`` with
    ``yaw = -theta - pi/2`` (not normalised here: the codec normalises every stored yaw)."""
    tensor = np.asarray(tensor, dtype=np.float64)
    out = tensor.copy()
    out[:, 2] = tensor[:, 2] + tensor[:, 5] / 2
    out[:, 6] = -tensor[:, 6] - math.pi / 2
    return out


def ours_to_legacy(boxes: Any) -> np.ndarray:
    """The inverse of ``legacy_to_ours``."""
    boxes = np.asarray(boxes, dtype=np.float64)
    out = boxes.copy()
    out[:, 2] = boxes[:, 2] - boxes[:, 5] / 2
    out[:, 6] = -boxes[:, 6] - math.pi / 2
    return out


def _is_box_object(value: Any) -> bool:
    return hasattr(value, "tensor") and hasattr(value, "gravity_center")


def mmdet3d_boxes_to_ours(boxes: Any, legacy: bool = False, what: str = "boxes") -> np.ndarray:
    """An mmdet3d box object (``.tensor``) or a tensor/array in mmdet3d's layout -> ours, (N, 7|9)."""
    name = type(boxes).__name__
    if name.startswith("Camera") and _is_box_object(boxes):
        raise TraceInputError(f"{what} are {name} (camera coordinates, y pointing down): convert them to LiDAR "
                              "boxes (boxes.convert_to(Box3DMode.LIDAR, lidar2cam inverse)) or pass postprocess=")
    tensor = boxes.tensor if _is_box_object(boxes) else boxes
    array = np.asarray(to_numpy(tensor), dtype=np.float64)
    if array.ndim == 1 and array.size == 0:
        array = array.reshape(0, 7)
    if array.ndim != 2 or array.shape[1] not in (7, 9):
        raise TraceInputError(f"{what} must be (N, 7) or (N, 9) rows {MMDET3D_LAYOUT} in mmdet3d's layout, got "
                              f"shape {tuple(array.shape)}")
    return legacy_to_ours(array) if legacy else mmdet3d_to_ours(array)


def _labels(value: Any) -> np.ndarray:
    return np.asarray(to_numpy(value)).reshape(-1)


# -- query-based (NMS-free) decoding ---------------------------------------------------------------
def denormalize_bbox(preds: torch.Tensor) -> torch.Tensor:
    """The projects' ``denormalize_bbox``: regression rows ``(cx, cy, log s3, log s4, cz, log h, sin, cos[,
    vx, vy])`` -> ``(cx, cy, cz, exp s3, exp s4, exp h, atan2(sin, cos)[, vx, vy])``.

    ``cx, cy, cz`` are already metres (the heads scale their sigmoid outputs by ``pc_range`` before
    returning them) and ``cz`` is the gravity centre (the heads' targets are ``gravity_center`` +
    ``tensor[:, 3:]``; their ``get_bboxes``/``predict_by_feat`` lower it by ``h / 2`` to build box
    objects). ``s3, s4`` are ``tensor[:, 3], tensor[:, 4]`` of the mmdet3d version the project is built on
    (see the module docstring)."""
    rot = torch.atan2(preds[..., 6:7], preds[..., 7:8])
    parts = [preds[..., 0:2], preds[..., 4:5], preds[..., 2:4].exp(), preds[..., 5:6].exp(), rot]
    if preds.shape[-1] > 8:
        parts.append(preds[..., 8:10])
    return torch.cat(parts, dim=-1)


def decode_nms_free(all_cls_scores: Any, all_bbox_preds: Any, max_num: int = 300,
                    post_center_range: Sequence[float] | None = None, legacy: bool = False,
                    ) -> list[dict[str, np.ndarray]]:
    """``NMSFreeCoder.decode`` of the BEVFormer / DETR3D / PETR projects, returning our boxes per frame.

    The last decoder layer (``[-1]``) of ``all_cls_scores`` (L, B, Q, C) logits and ``all_bbox_preds``
    (L, B, Q, 8|10); per frame: sigmoid, the top ``min(max_num, Q*C)`` (query, class) pairs, label =
    index % C, query = index // C; boxes by ``denormalize_bbox``; kept where the centre lies inside
    ``post_center_range`` (when given). Score thresholds are left to the codec (``score_thresh``), which
    filters exactly as ``scores > score_threshold`` up to the boundary. Boxes are then converted to ours:
    ``(cx, cy, cz_gravity, s3, s4, h, r)`` -> ``w = s4, l = s3, yaw = r`` (mmdet3d >= 1.0:
    s3 = x_size = l) or ``w = s3, l = s4, yaw = -r - pi/2`` (``legacy``: mmdet3d 0.17, s3 = w)."""
    cls = torch.as_tensor(all_cls_scores).detach().float()
    reg = torch.as_tensor(all_bbox_preds).detach().float()
    if cls.ndim == 3:  # one decoder layer given without the layer axis
        cls, reg = cls[None], reg[None]
    if cls.ndim != 4 or reg.ndim != 4 or reg.shape[-1] not in (8, 10) or cls.shape[1:3] != reg.shape[1:3]:
        raise TraceInputError(f"query outputs must be all_cls_scores (L, B, Q, C) and all_bbox_preds (L, B, Q, 8 or "
                              f"10), got {tuple(cls.shape)} and {tuple(reg.shape)}")
    cls, reg = cls[-1], reg[-1]
    batch, queries, classes = cls.shape
    out = []
    for i in range(batch):
        scores, index = cls[i].sigmoid().reshape(-1).topk(min(int(max_num), queries * classes))
        labels = index % classes
        boxes = denormalize_bbox(reg[i][index // classes])
        if post_center_range is not None:
            limits = torch.as_tensor(list(post_center_range), dtype=boxes.dtype)
            inside = ((boxes[:, :3] >= limits[:3]) & (boxes[:, :3] <= limits[3:])).all(1)
            boxes, scores, labels = boxes[inside], scores[inside], labels[inside]
        array = boxes.double().cpu().numpy()
        ours = array.copy()
        if legacy:
            ours[:, 3], ours[:, 4] = array[:, 3], array[:, 4]
            ours[:, 6] = -array[:, 6] - math.pi / 2
        else:
            ours[:, 3], ours[:, 4] = array[:, 4], array[:, 3]
        out.append({"boxes": ours, "scores": scores.cpu().numpy(), "labels": labels.cpu().numpy()})
    return out


# -- output formats --------------------------------------------------------------------------------
def _is_instances(item: Any) -> bool:
    return all(_get(item, key) is not None for key in ("bboxes_3d", "scores_3d", "labels_3d"))


def _is_pcdet(item: Any) -> bool:
    return isinstance(item, Mapping) and all(k in item for k in ("pred_boxes", "pred_scores", "pred_labels"))


def _is_old_style(item: Any) -> bool:
    if isinstance(item, Mapping) and isinstance(item.get("pts_bbox"), Mapping):
        item = item["pts_bbox"]
    return isinstance(item, Mapping) and all(k in item for k in ("boxes_3d", "scores_3d", "labels_3d"))


def output_format(outputs: Any) -> str | None:
    """``"samples"``, ``"instances"``, ``"pcdet"``, ``"old_style"``, ``"query"`` or None (unknown)."""
    if isinstance(outputs, Mapping):
        if "all_cls_scores" in outputs and "all_bbox_preds" in outputs:
            return "query"
        return None
    if isinstance(outputs, tuple) and len(outputs) == 2 and isinstance(outputs[1], Mapping) and isinstance(
            outputs[0], (list, tuple)) and outputs[0] and all(_is_pcdet(d) for d in outputs[0]):
        return "pcdet"  # OpenPCDet eval mode: (pred_dicts, recall_dicts)
    if isinstance(outputs, (list, tuple)) and outputs:
        if all(_get(item, "pred_instances_3d") is not None for item in outputs):
            return "samples"
        if all(_is_instances(item) for item in outputs):
            return "instances"
        if all(_is_pcdet(item) for item in outputs):
            return "pcdet"
        if all(_is_old_style(item) for item in outputs):
            return "old_style"
    return None


def decode_results(outputs: Any, legacy: bool, kind: str | None = None) -> list[dict[str, np.ndarray]]:
    """Per-frame ``{"boxes" (ours), "scores", "labels"}`` of mmdet3d result structures (formats 1 and 3)."""
    kind = kind or output_format(outputs)
    frames = []
    for item in outputs:
        if kind == "samples":
            item = item.pred_instances_3d
            if _get(item, "bboxes_3d") is None:
                raise TraceInputError("a Det3DDataSample's pred_instances_3d has no bboxes_3d (a model predicting "
                                      "only 2D boxes?); pass postprocess=")
            boxes, scores, labels = item.bboxes_3d, item.scores_3d, item.labels_3d
        elif kind == "instances":
            boxes, scores, labels = item.bboxes_3d, item.scores_3d, item.labels_3d
        elif kind == "old_style":
            item = item.get("pts_bbox", item)
            boxes, scores, labels = item["boxes_3d"], item["scores_3d"], item["labels_3d"]
        else:
            raise TraceInputError(f"not an mmdet3d result: {describe(outputs)}")
        frames.append({"boxes": mmdet3d_boxes_to_ours(boxes, legacy, "predicted boxes_3d"),
                       "scores": np.asarray(to_numpy(scores)).reshape(-1), "labels": _labels(labels)})
    return frames


# -- ground truth ----------------------------------------------------------------------------------
def _gt_frame(boxes: Any, labels: Any, legacy: bool) -> dict[str, np.ndarray]:
    labels = _labels(labels) if labels is not None else np.zeros(0, dtype=np.int64)
    ours = mmdet3d_boxes_to_ours(boxes, legacy, "ground-truth gt_bboxes_3d")
    if len(labels) != len(ours):
        raise TraceInputError(f"{len(ours)} ground-truth boxes but {len(labels)} labels")
    keep = labels >= 0  # mmdet3d: -1 = a class outside the model's classes (its evaluators ignore them)
    return {"boxes": ours[keep], "labels": labels[keep]}


def _sample_gt(sample: Any, legacy: bool) -> dict[str, np.ndarray] | None:
    info = _get(sample, "eval_ann_info")
    if isinstance(info, Mapping) and info.get("gt_bboxes_3d") is not None:
        return _gt_frame(info["gt_bboxes_3d"], info.get("gt_labels_3d"), legacy)
    instances = _get(sample, "gt_instances_3d")
    if instances is not None and _get(instances, "bboxes_3d") is not None:
        return _gt_frame(instances.bboxes_3d, _get(instances, "labels_3d"), legacy)
    if instances is not None or info is not None:  # a sample without annotations: an empty frame
        return {"boxes": np.zeros((0, 7)), "labels": np.zeros(0, dtype=np.int64)}
    return None


def mmdet3d_ground_truth(targets: Any, legacy: bool = False) -> Any:
    """Ground truth in mmdet3d's formats converted to our per-frame ``{"boxes", "labels"}``; the product's
    own formats are returned as they are (box objects inside them converted). See the module docstring."""
    if targets is None:
        return None
    if isinstance(targets, Mapping):
        if "gt_bboxes_3d" in targets:
            boxes, labels = targets["gt_bboxes_3d"], targets.get("gt_labels_3d")
            if _is_box_object(boxes) or (hasattr(boxes, "shape") and len(boxes.shape) == 2):
                return [_gt_frame(boxes, labels, legacy)]  # one frame
            return [_gt_frame(b, l, legacy) for b, l in zip(boxes, labels)]
        if "boxes" in targets and isinstance(targets["boxes"], (list, tuple)) and any(
                _is_box_object(b) for b in targets["boxes"]):
            return {**targets, "boxes": [mmdet3d_boxes_to_ours(b, legacy, "ground-truth boxes") if _is_box_object(b)
                                         else b for b in targets["boxes"]]}
        if "boxes" in targets and _is_box_object(targets["boxes"]):
            return {**targets, "boxes": [mmdet3d_boxes_to_ours(targets["boxes"], legacy, "ground-truth boxes")],
                    "labels": [targets["labels"]]}
        return targets
    if isinstance(targets, (list, tuple)) and targets:
        first = targets[0]
        if _get(first, "gt_instances_3d") is not None or _get(first, "eval_ann_info") is not None:
            frames = [_sample_gt(sample, legacy) for sample in targets]
            return None if any(f is None for f in frames) else frames
        if isinstance(first, Mapping) and "gt_bboxes_3d" in first:
            return [_gt_frame(t["gt_bboxes_3d"], t.get("gt_labels_3d"), legacy) for t in targets]
        if not isinstance(first, Mapping) and _get(first, "bboxes_3d") is not None:
            return [_gt_frame(t.bboxes_3d, _get(t, "labels_3d"), legacy) for t in targets]
        if isinstance(first, Mapping) and any(_is_box_object(t.get("boxes")) for t in targets):
            return [{**t, "boxes": mmdet3d_boxes_to_ours(t["boxes"], legacy, "ground-truth boxes")}
                    if _is_box_object(t.get("boxes")) else t for t in targets]
    return targets


# -- the tracers -----------------------------------------------------------------------------------
class MMDet3DTracer(Detection3DTracer):
    """What the mmdet3d families share: input wrapping, train/eval passes, decoding, ground truth.

    Args (besides ``Detection3DTracer``'s):
        legacy_boxes: ``None`` = from the installed mmdet3d (< 1.0: the legacy LiDAR convention); ``True``
            / ``False`` to say which convention the model's boxes follow (module docstring).
    """

    default_features = ("pts_neck", "neck")
    framework = "mmdet3d"

    def __init__(self, model: Any, model_name: str, version_name: str, score_thresh: float | None = None,
                 iou_thresh: float | None = None, max_detections_per_frame: int | None = None, *,
                 legacy_boxes: bool | None = None, **kwargs: Any):
        self.legacy = legacy_mmdet3d() if legacy_boxes is None else bool(legacy_boxes)
        self.architecture = f"{self.framework}.{type(model).__name__}"
        self._data_samples: Any = None
        self._iou_thresh_given = iou_thresh is not None
        super().__init__(model, model_name, version_name, score_thresh=score_thresh, iou_thresh=iou_thresh,
                         max_detections_per_frame=max_detections_per_frame, **kwargs)
        default = next((m for m in (getattr(model, n, None) for n in self.default_features)
                        if isinstance(m, torch.nn.Module)), None)
        self._features = PooledFeatures(model, self.feature_layer, default) if isinstance(
            model, torch.nn.Module) else None

    # -- settings helpers shared by the families ----------------------------------------------------
    def head(self) -> Any:
        return _first(_get(self.model, "pts_bbox_head"), _get(self.model, "bbox_head"))

    def common_settings(self) -> dict:
        """``num_classes`` from the head, class names from ``model.dataset_meta["classes"]`` (set by mmdet3d's
        ``init_model`` and the runner), ``pc_range`` from the voxel layer / training config."""
        head = self.head()
        settings = {"num_classes": _int(_get(head, "num_classes")),
                    "class_names": _class_names(_get(self.model, "dataset_meta", "classes"))}
        settings["pc_range"] = _first(
            _range6(_get(self.model, "data_preprocessor", "voxel_layer", "point_cloud_range")),
            _range6(_get(self.model, "pts_voxel_layer", "point_cloud_range")),
            _range6(_get(self.model, "train_cfg", "pts", "point_cloud_range")),
            _range6(_get(self.model, "train_cfg", "point_cloud_range")),
            _range6(_get(head, "train_cfg", "point_cloud_range")))
        return settings

    def test_cfg(self) -> Any:
        """The head's ``test_cfg``, else the model's (``.pts`` for two-stage/MVX models)."""
        cfg = _first(_get(self.head(), "test_cfg"), _get(self.model, "test_cfg"))
        return _first(_get(cfg, "pts"), cfg)

    # -- running the model ----------------------------------------------------------------------------
    def model_data(self, inputs: Any, targets: Any, kwargs: dict) -> dict:
        """The dataloader-style batch ``{"inputs": {...}, "data_samples": [...]}`` for ``inputs``."""
        samples = kwargs.pop("data_samples", None)
        if isinstance(inputs, Mapping) and "inputs" in inputs:
            data = dict(inputs)
            if samples is not None:
                data["data_samples"] = samples
        else:
            if isinstance(inputs, Mapping):
                batch_inputs = dict(inputs)
            elif isinstance(inputs, torch.Tensor) and inputs.ndim == 2:
                batch_inputs = {"points": [inputs]}
            elif isinstance(inputs, torch.Tensor) and inputs.ndim == 3:
                batch_inputs = {"points": list(inputs)}
            elif isinstance(inputs, (list, tuple)) and inputs and all(isinstance(p, torch.Tensor) for p in inputs):
                batch_inputs = {"points": list(inputs)}
            else:
                raise TraceInputError(f"{type(self).__name__} takes a dataloader batch {{'inputs': ..., "
                                      f"'data_samples': ...}}, a dict {{'points': [...], 'imgs': ...}}, a list of "
                                      f"(N, 4+) point tensors or one such tensor; got {describe(inputs)}")
            data = {"inputs": batch_inputs, "data_samples": samples}
        if data.get("data_samples") is None:
            batch_inputs = data["inputs"]
            frames = next((len(batch_inputs[k]) for k in ("points", "imgs", "img")
                           if batch_inputs.get(k) is not None), 0)
            data["data_samples"] = self.new_samples(frames, targets)
        return data

    def new_samples(self, frames: int, targets: Any) -> list:
        """LiDAR ``Det3DDataSample``s for frames given without any; with ``gt_instances_3d`` from ``targets``
        (ours or mmdet3d's formats) when the model is training."""
        from mmdet3d.structures import Box3DMode, Det3DDataSample, LiDARInstance3DBoxes
        from mmengine.structures import InstanceData

        samples = [Det3DDataSample(metainfo={"box_type_3d": LiDARInstance3DBoxes, "box_mode_3d": Box3DMode.LIDAR})
                   for _ in range(frames)]
        if self.model.training:
            from mldbg_callbacks.tasks.detection import ground_truth_lists

            lists = ground_truth_lists(mmdet3d_ground_truth(targets, self.legacy), frames)
            for i, sample in enumerate(samples):
                boxes = np.asarray(to_numpy(lists["boxes"][i]), dtype=np.float64)
                boxes = boxes.reshape(-1, boxes.shape[-1] if boxes.ndim == 2 else 7)
                velocities = lists.get("velocities", [None] * frames)[i]
                if velocities is not None and boxes.shape[1] == 7:
                    boxes = np.concatenate([boxes, np.asarray(to_numpy(velocities), np.float64).reshape(-1, 2)], 1)
                tensor = ours_to_legacy(boxes) if self.legacy else ours_to_mmdet3d(boxes)
                sample.gt_instances_3d = InstanceData(
                    bboxes_3d=LiDARInstance3DBoxes(torch.as_tensor(tensor, dtype=torch.float32),
                                                   box_dim=tensor.shape[1]),
                    labels_3d=torch.as_tensor(to_numpy(lists["labels"][i]), dtype=torch.long).reshape(-1))
        return samples

    def forward(self, inputs: Any, targets: Any, **kwargs: Any) -> tuple[Any, Any, Any]:
        """Eval: one predict pass, the Det3DDataSamples returned. Training: the loss pass (returned) and an
        inference pass for the predictions (module docstring)."""
        self._pop_features()
        preprocessor = getattr(self.model, "data_preprocessor", None)
        if not callable(preprocessor):  # mmdet3d < 1.1 style: the model takes its keyword inputs
            self._data_samples = None
            outputs = self.model(**inputs, **kwargs) if isinstance(inputs, Mapping) else self.model(inputs, **kwargs)
            return outputs, outputs, self._pop_features()
        data = self.model_data(inputs, targets, kwargs)
        self._data_samples = data.get("data_samples")
        if not self.model.training:
            results = self.model(**preprocessor(data, False), mode="predict", **kwargs)
            return results, results, self._pop_features()
        losses = self.model(**preprocessor(data, True), mode="loss", **kwargs)
        self._pop_features()  # the training pass's features: the inference pass's are traced
        with inference_mode_pass(self.model):
            results = self.model(**preprocessor(data, False), mode="predict", **kwargs)
        return losses, results, self._pop_features()

    def _pop_features(self) -> Any:
        return self._features.pop() if self._features is not None else None

    def count_inputs(self, inputs: Any) -> int:
        """Frames in a call's input: data samples, else point clouds (not the keys of a batch dict)."""
        if isinstance(self._data_samples, (list, tuple)):
            return len(self._data_samples)
        if isinstance(inputs, Mapping):
            inputs = inputs.get("inputs", inputs)
            for key in ("points", "imgs", "img"):
                if isinstance(inputs, Mapping) and inputs.get(key) is not None:
                    return len(inputs[key])
            return 0
        if isinstance(inputs, torch.Tensor) and inputs.ndim == 2:
            return 1
        return super().count_inputs(inputs)

    def decode(self, outputs: Any, inputs: Any) -> Any:
        kind = output_format(outputs)
        if kind in ("samples", "instances", "old_style"):
            return decode_results(outputs, self.legacy, kind)
        if kind == "query":
            return self.decode_query(outputs)
        if kind == "pcdet":
            from .openpcdet import decode_pcdet

            return decode_pcdet(outputs)
        if isinstance(outputs, Mapping) and outputs and all(
                "loss" in str(k) for k in outputs):
            raise TraceInputError(f"{type(self.model).__name__} returned losses ({sorted(outputs)[:4]}...), not "
                                  "predictions: models without a data_preprocessor (mmdet3d < 1.1) are traced in "
                                  "eval mode (model.eval(), return_loss=False)")
        raise TraceInputError(f"{type(self).__name__} cannot read the output of {type(self.model).__name__} "
                              f"({describe(outputs)}). Recognised formats: {OUTPUT_FORMATS}. For any other output "
                              "pass postprocess=, a function (outputs, inputs) -> [{'boxes': (N, 7) [cx, cy, cz, w, "
                              "l, h, yaw] (+ vx, vy), 'scores': (N,), 'labels': (N,)}, ...] with one dict per frame")

    def decode_query(self, outputs: Mapping) -> list[dict]:
        """Raw query outputs: ``decode_nms_free`` with the model's ``max_num`` / ``post_center_range``."""
        if self.uses_nms:
            self._found_nms_free()
        coder = _get(self.head(), "bbox_coder")
        return decode_nms_free(outputs["all_cls_scores"], outputs["all_bbox_preds"],
                               max_num=_first(_get(coder, "max_num"), self.max_detections_per_image),
                               post_center_range=_get(coder, "post_center_range"), legacy=self.legacy)

    def _found_nms_free(self) -> None:
        """Query outputs from a model not recognised as NMS-free by its class: it has no NMS."""
        if self._iou_thresh_given:
            warnings.warn(f"{type(self.model).__name__} returns DETR-style query outputs, which have no NMS, so "
                          f"iou_thresh={self.iou_thresh} is ignored", UserWarning, stacklevel=4)
        self.uses_nms = False
        self.iou_thresh = None
        self.core.codec.iou_thresh = None  # the run metadata is written at the first flush, after this

    def ground_truth(self, targets: Any, raw: Any) -> Any:
        """``targets`` (ours or mmdet3d's formats), else the ground truth in the call's data samples."""
        return mmdet3d_ground_truth(targets if targets is not None else self._data_samples, self.legacy)

    def remove_hooks(self) -> None:
        if self._features is not None:
            self._features.remove()


class PointPillarsTracer(MMDet3DTracer):
    """PointPillars, SECOND, VoxelNet, PartA2, MVXNet and other mmdet3d detectors with NMS heads.

    ``model_settings``: the head's (else the model's) ``test_cfg`` (``.pts`` for MVX models):
    ``score_thr``, ``nms_thr``, ``max_num`` (the per-frame cap after NMS; ``use_rotate_nms`` only picks the
    NMS kind); ``num_classes`` = ``bbox_head.num_classes``; class names from ``model.dataset_meta["classes"]``;
    ``pc_range`` = ``data_preprocessor.voxel_layer.point_cloud_range`` (else ``train_cfg(.pts).point_cloud_range``).
    """

    def model_settings(self) -> dict:
        cfg = self.test_cfg()
        return {**self.common_settings(), "score_thresh": _get(cfg, "score_thr"), "iou_thresh": _get(cfg, "nms_thr"),
                "max_detections": _int(_get(cfg, "max_num"))}


class CenterPointTracer(MMDet3DTracer):
    """CenterPoint (pillar and voxel), CenterFormer: heatmap heads, boxes with velocities in nuScenes configs.

    ``model_settings``: ``test_cfg.pts`` (or the head's ``test_cfg``): ``score_threshold``, ``nms_thr``, and
    ``max_detections`` = tasks x ``post_max_size`` (the head keeps ``post_max_size`` boxes per task after
    its rotate/circle NMS and concatenates the tasks; ``max_per_img`` when there is no ``post_max_size``);
    ``num_classes`` = the sum of the head's per-task ``num_classes``; class names from ``dataset_meta``, else
    the head's task ``class_names`` (labels are global, task after task); ``pc_range`` from the voxel layer
    (``test_cfg.pts.pc_range`` and the coder's ``pc_range`` are only ``[x_min, y_min]``).
    """

    def model_settings(self) -> dict:
        cfg, head = self.test_cfg(), self.head()
        settings = self.common_settings()
        if settings["class_names"] is None:
            settings["class_names"] = _class_names(_get(head, "class_names"))
        per_task = _first(_int(_get(cfg, "post_max_size")), None)
        tasks = _get(head, "task_heads")
        n_tasks = len(tasks) if tasks is not None else len(_get(head, "num_classes") or [0]) or 1
        score = _first(_get(cfg, "score_threshold"), _get(head, "bbox_coder", "score_threshold"))
        settings.update({"score_thresh": score,
                         "iou_thresh": _get(cfg, "nms_thr"),
                         "max_detections": per_task * n_tasks if per_task else _int(_get(cfg, "max_per_img"))})
        return settings


class BEVFusionTracer(MMDet3DTracer):
    """BEVFusion (mmdet3d's ``projects/BEVFusion``): a ``TransFusionHead`` returning ``Det3DDataSample``s.

    ``model_settings``: ``bbox_head.bbox_coder.score_threshold`` (0.0 in the released configs),
    ``max_detections`` = ``bbox_head.num_proposals`` (one box per proposal), no NMS when
    ``bbox_head.test_cfg.nms_type`` is ``None`` (the released configs; ``iou_thresh`` is then ignored), else
    ``test_cfg.nms_thr``; ``num_classes`` = ``bbox_head.num_classes``; ``pc_range`` =
    ``model.pts_voxel_layer.point_cloud_range`` (else ``bbox_head.train_cfg.point_cloud_range``).
    The model is CUDA-only (its ops); tested here with stand-ins returning exact ``Det3DDataSample``-like results.
    """

    def model_settings(self) -> dict:
        head = self.head()
        cfg = _get(head, "test_cfg")
        if cfg is not None and _get(cfg, "nms_type") is None:
            self.uses_nms = False  # read by DetectionTracer.__init__ right after this
        return {**self.common_settings(), "score_thresh": _get(head, "bbox_coder", "score_threshold"),
                "iou_thresh": _get(cfg, "nms_thr"), "max_detections": _int(_get(head, "num_proposals"))}


class BEVFormerTracer(MMDet3DTracer):
    """BEVFormer, DETR3D, PETR, StreamPETR (query heads, no NMS) and BEVDet / BEVDet4D / BEVDepth.

    Outputs: ``Det3DDataSample``s (mmdet3d >= 1.1 ports), result dicts ``[{"pts_bbox": {...}}]`` (the
    original repositories, mmdet3d 0.17 or 1.0rc: box convention as the module docstring says), or raw
    ``{"all_cls_scores", "all_bbox_preds"}`` decoded by ``decode_nms_free``.

    ``model_settings`` for query heads (``pts_bbox_head.bbox_coder`` is an ``NMSFreeCoder``): ``max_num``
    (top-k), ``score_threshold`` (usually unset: then the 0.1 fallback), ``num_classes``,
    ``post_center_range``, ``pc_range`` = ``bbox_coder.pc_range`` or ``pts_bbox_head.pc_range``. BEVDet and
    its derivatives use a CenterPoint ``CenterHead`` with NMS: for them the settings are CenterPoint's
    (``test_cfg.pts``) and ``pc_range`` comes from ``img_view_transformer.grid_config`` (x, y, z ranges).
    ``pc_range`` is required (``pc_range=`` when the model does not declare it): it is the range the run's
    ground truth is checked against. Decoding itself does not need it: the heads return metres.
    No default features (the image necks run per camera view); pass ``feature_layer=``.
    """

    uses_nms = False
    needs_pc_range = True
    default_features = ()

    def model_settings(self) -> dict:
        head = self.head()
        coder = _get(head, "bbox_coder")
        settings = self.common_settings()
        grid = _get(self.model, "img_view_transformer", "grid_config")
        if grid is not None and all(_get(grid, k) is not None for k in "xyz"):
            settings["pc_range"] = settings["pc_range"] or [float(_get(grid, a)[0]) for a in "xyz"] + [
                float(_get(grid, a)[1]) for a in "xyz"]
        settings["pc_range"] = _first(_range6(_get(coder, "pc_range")), _range6(_get(head, "pc_range")),
                                      settings["pc_range"])
        cfg = self.test_cfg()
        if _get(cfg, "nms_type") is not None or _get(head, "task_heads") is not None:  # BEVDet: CenterHead + NMS
            self.uses_nms = True
            per_task = _int(_get(cfg, "post_max_size"))
            tasks = _get(head, "task_heads")
            settings.update({"score_thresh": _get(cfg, "score_threshold"), "iou_thresh": _get(cfg, "nms_thr"),
                             "max_detections": per_task * len(tasks) if per_task and tasks is not None
                             else _int(_get(cfg, "max_per_img"))})
            if settings["class_names"] is None:
                settings["class_names"] = _class_names(_get(head, "class_names"))
            return settings
        settings.update({"score_thresh": _get(coder, "score_threshold"), "max_detections": _int(_get(coder, "max_num")),
                         "num_classes": _first(_int(_get(coder, "num_classes")), settings["num_classes"])})
        return settings


class Generic3DTracer(MMDet3DTracer):
    """Any other PyTorch module: ``model(inputs, **kwargs)`` and the output recognised by its structure
    (``OUTPUT_FORMATS``: Det3DDataSample-like results, OpenPCDet dicts, mmdet3d < 1.1 result dicts, raw
    query outputs). Boxes in mmdet3d's layout follow ``legacy_boxes`` (module docstring); OpenPCDet's are
    converted as ``openpcdet.py`` says (labels 1-based -> 0-based). Raw query outputs are decoded by
    ``decode_nms_free`` with k = ``max_detections_per_frame`` (no NMS: ``iou_thresh`` is dropped when the
    first such output arrives). Nothing is read from the model: pass thresholds, ``num_classes=`` and
    ``pc_range=`` (optional) to the tracer. Anything else raises ``TraceInputError`` naming these formats
    and ``postprocess=``.

    Features: ``feature_layer=`` (a module name) only; none by default.
    """

    default_features = ()
    framework = "torch"

    def forward(self, inputs: Any, targets: Any, **kwargs: Any) -> tuple[Any, Any, Any]:
        self._pop_features()
        self._data_samples = kwargs.get("data_samples")
        outputs = self.model(inputs, **kwargs)
        return outputs, outputs, self._pop_features()

    def decode_query(self, outputs: Mapping) -> list[dict]:
        if self.uses_nms:
            self._found_nms_free()
        return decode_nms_free(outputs["all_cls_scores"], outputs["all_bbox_preds"],
                               max_num=self.max_detections_per_image, legacy=self.legacy)
