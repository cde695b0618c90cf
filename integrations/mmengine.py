"""MMEngine (MMDetection3D, MMDetection): ``MLDebuggerHook`` traces every epoch's validation predictions.

Configured only from the config, the OpenMMLab way::

    custom_imports = dict(imports=["mldbg_callbacks.integrations.mmengine"], allow_failed_imports=False)
    custom_hooks = [dict(type="MLDebuggerHook", model_name="pointpillars", version_name="v1")]

    # then, after `python tools/train.py my_config.py` (or Runner.from_cfg(cfg).train()):
    from mldbg_callbacks.evaluator import Evaluator
    print(Evaluator("pointpillars", "v1").request_evaluation().metrics_summary())

(``_base_ = ["<site-packages>/mldbg_callbacks/integrations/configs/mldbg_hook.py"]`` gives the same two lines;
``mldbg_callbacks.integrations.configs.HOOK_CONFIG`` is that path.) The hook is registered in MMEngine's root
``HOOKS`` registry; the registries of MMDetection3D and MMDetection are its children and fall back to it, so
``type="MLDebuggerHook"`` resolves under ``default_scope="mmdet3d"`` or ``"mmdet"`` alike.

What is traced, and where it comes from:

- **3D detectors** (outputs with ``pred_instances_3d``: PointPillars, SECOND, CenterPoint, ...): predicted
  ``bboxes_3d`` / ``scores_3d`` / ``labels_3d`` per frame, recorded into ``detection3d_core``. MMDetection3D's
  LiDAR boxes ``(x, y, z_bottom, x_size, y_size, z_size, yaw[, vx, vy])`` become ours ``[cx, cy, cz, w, l, h,
  yaw(, vx, vy)]`` (``cz`` the geometric centre = ``gravity_center``, ``l = x_size`` along the heading,
  ``w = y_size``); depth-frame boxes have the same layout; camera-frame boxes are converted to the LiDAR frame
  with the sample's ``lidar2cam``. Ground truth: ``data_sample.eval_ann_info`` (what MMDetection3D's own
  metrics use) else ``gt_instances_3d``; boxes labelled ``-1`` (classes outside the dataset's ``classes``,
  e.g. KITTI's DontCare) are left out.
- **2D detectors** (``pred_instances`` with ``bboxes``: RetinaNet, Faster R-CNN, DETR, ...): ``bboxes``
  (xyxy, original image pixels), ``scores``, ``labels`` into ``detection_core``; ground truth from
  ``gt_instances`` (the test pipeline loads it in original pixels), ``image_size`` = ``ori_shape``.
- **Sample ids**: the file stem of the metainfo's ``lidar_path`` (KITTI ``000123``, nuScenes' LIDAR_TOP file
  name), else ``img_id`` (COCO image id), the ``img_path`` stem, ``token``, and last ``sample_idx`` -- which
  MMEngine's ``BaseDataset`` overwrites with the frame's position in the data list, so it is stable only
  while the info file and its filtering are; ``id_key=`` picks a metainfo key.
- **n_epoch**: the 0-based epoch whose weights are evaluated. MMEngine's ``EpochBasedTrainLoop`` validates
  after it has counted the epoch (``runner.epoch`` is already 1 after the first epoch), so validation during
  ``train()`` records ``runner.epoch - 1``; with ``IterBasedTrainLoop`` the k-th validation round is epoch
  k - 1 (``ceil(runner.iter / val_interval) - 1``, resume-safe). A standalone ``runner.val()`` /
  ``runner.test()`` records at ``max(runner.epoch - 1, 0)`` (0 without a train loop).
- **dataset_type**: ``"val"`` and ``"test"`` (rename with ``dataset_types={"val": "validation"}``); with
  ``trace_train=True`` also ``"train"``: at the end of every training epoch (``EpochBasedTrainLoop``; an
  ``IterBasedTrainLoop`` has no epoch ends, so its train split is not traced) the hook runs the model once
  more over the train dataloader in eval mode (``torch.no_grad``). Cost: one inference pass over the train
  split per epoch (roughly a third of a training epoch), and its frames carry the train pipeline's random
  augmentation (boxes and predictions in the augmented frame; 2D predictions are taken with
  ``rescale=False`` so they share the input frame with ``gt_instances``). MMDetection3D's training steps
  return losses only, which is why tracing ``after_train_iter`` outputs is not an option.
- **Metadata**: class names from ``runner.model.dataset_meta`` or the dataloader's ``dataset.metainfo
  ["classes"]``; the score / NMS-IoU / max-detections thresholds from the model's ``test_cfg``
  (``score_thr`` / ``score_threshold``, ``nms_thr`` / ``nms.iou_threshold``, ``max_num`` / ``max_per_img`` /
  ``post_max_size``; nested ``pts`` / ``rcnn`` sections too); ``pc_range`` from the data preprocessor's voxel
  layer ``point_cloud_range`` (else ``test_cfg`` / the bbox coder's ``pc_range``). Explicit hook arguments
  win.

Every validation epoch is declared finished to the tracing core (committed every ``flush_every`` epochs);
the end of ``train()`` / a standalone ``val()`` / ``test()`` waits until everything is durable, and
``after_run`` stops the writer. Distributed runs: every rank traces the shard its sampler gives it into
``rank=<r>`` (``mmengine.dist.get_rank()``); nothing is gathered. Resume: MMEngine restores the epoch, so
a resumed run traces the following epochs under the same names (set ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``
with torch >= 2.6: MMEngine checkpoints pickle non-tensor state).

Failure policy as for every tracer: with ``strict=False`` (default) nothing raised while tracing reaches the
runner; each kind of failure is warned about once and counted in ``hook.errors`` (rows the core refuses
are counted in ``hook.stats``). ``strict=True`` raises.
"""

from __future__ import annotations

import collections
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

try:
    import torch
    from mmengine.hooks import Hook
    from mmengine.registry import HOOKS
    from mmengine.runner import IterBasedTrainLoop
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("mldbg_callbacks.integrations.mmengine needs MMEngine (`import mmengine`): "
                      "pip install 'mldbg-callbacks[mmengine]'") from exc

import numpy as np

from mldbg_callbacks.core.trace_core import TraceStats, TraceWarning
from mldbg_callbacks.errors import TraceInputError
from mldbg_callbacks.integrations.detectors3d.mmdet3d import mmdet3d_boxes_to_ours

__all__ = ["MLDebuggerHook", "boxes3d_to_ours"]

# File names first: MMEngine's BaseDataset.get_data_info() overwrites an info's ``sample_idx`` with the frame's
# position in the (filtered) data list, so ``sample_idx`` is the last resort, not the frame's identity.
ID_KEYS = ("lidar_path", "img_id", "img_path", "token", "sample_idx")
SCORE_KEYS = ("score_thr", "score_threshold", "score_thresh")
IOU_KEYS = ("nms_thr", "iou_thr", "nms_iou_threshold", "iou_threshold")
MAX_KEYS = ("max_num", "max_per_img", "post_max_size", "max_per_frame", "max_det")


@HOOKS.register_module(force=True)  # a re-imported module (reload, two import paths) replaces itself
class MLDebuggerHook(Hook):
    """Trace per-frame (3D) or per-image (2D) detections and ground truth of every validation epoch.

    Example (config)::

        custom_imports = dict(imports=["mldbg_callbacks.integrations.mmengine"], allow_failed_imports=False)
        custom_hooks = [dict(type="MLDebuggerHook", model_name="pointpillars", version_name="v1",
                             trace_train=False)]

    Args:
        model_name, version_name: identify the run in the store.
        store: a directory, a ``LocalStore`` or ``None`` (MLD_API_ENDPOINT, else MLD_HOME, else ``./mldbg``).
        trace_train: also trace the train split after every training epoch (an extra inference pass in eval
            mode over the train dataloader; see the module docstring for its cost).
        trace_test: trace ``runner.test()`` as ``"test"``.
        dataset_types: names stored for ``"train"``, ``"val"`` and ``"test"``, e.g. ``{"val": "validation"}``.
        id_key: the metainfo key holding the sample id (default: the ``lidar_path`` stem, ``img_id``, the
            ``img_path`` stem, ``token``, then ``sample_idx``, the position in the dataset).
        score_thresh, iou_thresh, max_detections: ``None`` = the model's ``test_cfg``, else the core's defaults.
        num_classes, class_names: ``None`` = from the dataset's ``classes``.
        pc_range: ``[x_min, y_min, z_min, x_max, y_max, z_max]`` (3D); ``None`` = from the model.
        flush_every, strict, max_pending_batches: as for every tracer.
    """

    priority = "LOW"  # after the hooks that prepare or log an iteration; tracing only reads its outputs

    def __init__(self, model_name: str, version_name: str, *, store: Any = None, trace_train: bool = False,
                 trace_test: bool = True, dataset_types: Mapping[str, str] | None = None, id_key: str | None = None,
                 score_thresh: float | None = None, iou_thresh: float | None = None,
                 max_detections: int | None = None, num_classes: int | None = None,
                 class_names: Sequence[str] | Mapping[int, str] | None = None,
                 pc_range: Sequence[float] | None = None, flush_every: int = 1, strict: bool = False,
                 max_pending_batches: int = 32):
        from mldbg_callbacks.store import resolve_store
        from mldbg_callbacks.store.names import validate_name

        self.model_name = validate_name(model_name, "model_name")
        self.version_name = validate_name(version_name, "version_name")
        self.store = resolve_store(store)
        self.trace_train = bool(trace_train)
        self.trace_test = bool(trace_test)
        unknown = set(dataset_types or {}) - {"train", "val", "test"}
        if unknown:
            raise ValueError(f"dataset_types keys must be 'train', 'val' or 'test', got {sorted(unknown)}")
        self.dataset_types = {"train": "train", "val": "val", "test": "test", **dict(dataset_types or {})}
        for name in self.dataset_types.values():
            validate_name(name, "dataset_types")
        self.id_key = id_key
        self.score_thresh, self.iou_thresh, self.max_detections = score_thresh, iou_thresh, max_detections
        self.num_classes = num_classes
        self.class_names = class_names
        self.pc_range = None if pc_range is None else [float(v) for v in pc_range]
        if not isinstance(flush_every, int) or flush_every < 1:
            raise ValueError(f"flush_every must be a positive int, got {flush_every!r}")
        self.flush_every = flush_every
        self.strict = bool(strict)
        self.max_pending_batches = max_pending_batches
        self.core = None  # the TraceCore, created at the first traced batch (the task is read from the outputs)
        self.task: str | None = None  # "object_detection_3d" or "object_detection"
        self.settings: dict[str, Any] = {}  # what the core was made with (thresholds, classes, pc_range)
        self.errors: collections.Counter = collections.Counter()
        self._warned: set[tuple[str, str]] = set()
        self._fitting = False
        self._loop_epoch: int | None = None  # the epoch of the validation / test loop being traced

    # -- failure policy -----------------------------------------------------------------------------------------------
    @property
    def stats(self) -> TraceStats:
        """The tracing core's counters (rows received, written, skipped by reason, ...)."""
        return self.core.stats if self.core is not None else TraceStats()

    def _guarded(self, what: str, body: Any, *args: Any) -> Any:
        """Run ``body(*args)``; with strict=False a failure is warned about once and counted, never raised."""
        try:
            return body(*args)
        except Exception as exc:  # noqa: BLE001 - tracing must never stop a training run (strict=False)
            if self.strict:
                raise
            self.errors[what] += 1
            message = f"{type(exc).__name__}: {exc}"
            key = (what, type(exc).__name__)
            if key not in self._warned:
                self._warned.add(key)
                warnings.warn(f"mldbg-callbacks (MMEngine, {what}): {message}; training goes on, this is counted in "
                              "MLDebuggerHook.errors. Pass strict=True to raise instead.", TraceWarning, stacklevel=3)
            return None

    # -- MMEngine events ----------------------------------------------------------------------------------------------
    def before_train(self, runner: Any) -> None:
        self._fitting = True

    def after_train_epoch(self, runner: Any) -> None:
        if self.trace_train:
            # MMEngine counts the epoch only after this event: runner.epoch is the epoch just trained
            self._guarded("train pass", self._trace_train_split, runner, runner.epoch)

    def before_val_epoch(self, runner: Any) -> None:
        self._loop_epoch = self._guarded("epoch", self._eval_epoch, runner)

    def after_val_iter(self, runner: Any, batch_idx: int, data_batch: Any = None, outputs: Any = None) -> None:
        if self._loop_epoch is not None:
            self._guarded("val batch", self._record, runner, outputs, "val", self._loop_epoch, False)

    def after_val_epoch(self, runner: Any, metrics: Any = None) -> None:
        self._guarded("end of validation", self._end_loop, runner)

    def before_test_epoch(self, runner: Any) -> None:
        self._loop_epoch = self._guarded("epoch", self._eval_epoch, runner) if self.trace_test else None

    def after_test_iter(self, runner: Any, batch_idx: int, data_batch: Any = None, outputs: Any = None) -> None:
        if self._loop_epoch is not None:
            self._guarded("test batch", self._record, runner, outputs, "test", self._loop_epoch, False)

    def after_test_epoch(self, runner: Any, metrics: Any = None) -> None:
        self._guarded("end of test", self._end_loop, runner)

    def after_train(self, runner: Any) -> None:
        self._fitting = False
        if self.core is not None:
            self._guarded("saving traces", self.core.wait_for_save)

    def after_run(self, runner: Any) -> None:
        if self.core is not None:
            self._guarded("saving traces", self.core.close)

    # -- epochs -------------------------------------------------------------------------------------------------------
    def _eval_epoch(self, runner: Any) -> int:
        """The 0-based epoch whose weights the validation / test loop about to run evaluates."""
        loop = getattr(runner, "_train_loop", None)  # not runner.train_loop: that builds a dict-configured loop
        if loop is None or isinstance(loop, Mapping):
            return 0
        if isinstance(loop, IterBasedTrainLoop) or not hasattr(loop, "epoch"):
            interval = max(int(getattr(loop, "val_interval", 1) or 1), 1)
            return max(math.ceil(int(loop.iter) / interval) - 1, 0)
        return max(int(loop.epoch) - 1, 0)

    def _end_loop(self, runner: Any) -> None:
        epoch, self._loop_epoch = self._loop_epoch, None
        if self.core is None or epoch is None:
            return
        self.core.end_epoch(epoch)
        if not self._fitting:  # a standalone val() / test(): nothing follows, make it durable now
            self.core.wait_for_save()

    # -- recording ----------------------------------------------------------------------------------------------------
    def _record(self, runner: Any, outputs: Any, loop: str, epoch: int, input_frame: bool) -> None:
        samples = list(outputs or [])
        if not samples:
            return
        if self.core is None:
            self.core = self._make_core(runner, samples[0], loop)
        frames = [_frame(s, self.task, input_frame) for s in samples]
        detections = {key: [f[0][key] for f in frames] for key in ("boxes", "scores", "labels")}
        targets = {key: [f[1][key] for f in frames] for key in ("boxes", "labels")}
        if self.task == "object_detection":
            detections["image_size"] = [f[2] for f in frames]
        ids = [self._sample_id(s) for s in samples]
        self.core.record(detections, targets, input_ids=ids, dataset_type=self.dataset_types[loop], n_epoch=epoch)

    def _sample_id(self, sample: Any) -> Any:
        meta = getattr(sample, "metainfo", {}) or {}
        for key in ((self.id_key,) if self.id_key else ID_KEYS):
            value = meta.get(key)
            if isinstance(value, (list, tuple)) and value:  # multi-view frames: the first path names the frame
                value = value[0]
            if value is None or (isinstance(value, str) and not value):
                continue
            if key.endswith("_path"):
                return Path(str(value)).stem
            return value.item() if hasattr(value, "item") else value
        raise TraceInputError(f"no sample id in the data sample's metainfo (looked for {self.id_key or ID_KEYS}); "
                              "keep one in the pipeline's Pack3DDetInputs / PackDetInputs meta_keys or pass "
                              "id_key= to MLDebuggerHook")

    def _trace_train_split(self, runner: Any, epoch: int) -> None:
        loop = getattr(runner, "_train_loop", None)
        dataloader = getattr(loop, "dataloader", None)
        if dataloader is None:
            return
        model = runner.model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for data_batch in dataloader:
                    outputs = _predict_input_frame(model, data_batch)
                    self._record(runner, outputs, "train", epoch, True)
        finally:
            model.train(was_training)

    # -- the core and its settings ------------------------------------------------------------------------------------
    def _make_core(self, runner: Any, sample: Any, loop: str) -> Any:
        from mldbg_callbacks.training import detection3d_core, detection_core

        self.task = _task_of(sample)
        model = _unwrap(runner.model)
        inferred = model_settings(model)
        classes = self.class_names if self.class_names is not None else _dataset_classes(runner, model, loop)
        names = dict(classes) if isinstance(classes, Mapping) else (
            {i: str(c) for i, c in enumerate(classes)} if classes is not None else None)
        num_classes = self.num_classes if self.num_classes is not None else (
            len(names) if names else inferred.get("num_classes"))
        options = dict(num_classes=num_classes, class_names=names,
                       architecture=f"{type(model).__module__.split('.')[0]}.{type(model).__name__}",
                       flush_every=self.flush_every, strict=self.strict,
                       max_pending_batches=self.max_pending_batches)
        for name, given in (("score_thresh", self.score_thresh), ("iou_thresh", self.iou_thresh),
                            ("max_detections", self.max_detections)):
            value = given if given is not None else inferred.get(name)
            if value is not None:
                options[name] = int(value) if name == "max_detections" else float(value)
        if self.task == "object_detection_3d":
            options["pc_range"] = self.pc_range if self.pc_range is not None else inferred.get("pc_range")
            make = detection3d_core
        else:
            make = detection_core
        self.settings = {k: v for k, v in options.items() if k not in ("flush_every", "strict", "max_pending_batches")}
        return make(self.model_name, self.version_name, store=self.store, **options)

    def __repr__(self) -> str:
        return (f"MLDebuggerHook(model_name={self.model_name!r}, version_name={self.version_name!r}, task={self.task!r}, "
                f"trace_train={self.trace_train}, errors={dict(self.errors)})")


# -- reading MMDetection / MMDetection3D structures ---------------------------------------------------------------------
def _unwrap(model: Any) -> Any:
    try:
        from mmengine.model import is_model_wrapper

        return model.module if is_model_wrapper(model) else model
    except ImportError:  # pragma: no cover - very old MMEngine
        return getattr(model, "module", model)


def _task_of(sample: Any) -> str:
    if _has(sample, "pred_instances_3d"):
        return "object_detection_3d"
    if _has(sample, "pred_instances") and _has(sample.pred_instances, "bboxes"):
        return "object_detection"
    raise TraceInputError(f"MLDebuggerHook traces detectors: the outputs ({type(sample).__name__}) have neither "
                          "pred_instances_3d (MMDetection3D) nor pred_instances.bboxes (MMDetection)")


def _has(element: Any, key: str) -> bool:
    try:
        return key in element
    except TypeError:
        return hasattr(element, key)


def _numpy(value: Any, dtype: Any = np.float64) -> np.ndarray:
    if not isinstance(value, torch.Tensor) and hasattr(value, "tensor"):  # an mmdet box structure
        value = value.tensor
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=dtype)


def boxes3d_to_ours(boxes: Any, metainfo: Mapping | None = None) -> np.ndarray:
    """MMDetection3D boxes (a ``LiDARInstance3DBoxes`` / ``DepthInstance3DBoxes`` / ``CameraInstance3DBoxes``,
    or a LiDAR-layout array ``(x, y, z_bottom, x_size, y_size, z_size, yaw[, vx, vy])``) -> ours ``(N, 7|9)``
    ``[cx, cy, cz, w, l, h, yaw(, vx, vy)]`` in the LiDAR frame. Camera boxes need ``metainfo["lidar2cam"]``."""
    kind = type(boxes).__name__
    if kind == "CameraInstance3DBoxes":
        lidar2cam = None if metainfo is None else metainfo.get("lidar2cam")
        if lidar2cam is None:
            raise TraceInputError("camera-frame 3D boxes (CameraInstance3DBoxes) need the sample's lidar2cam in "
                                  "its metainfo to be converted to the LiDAR frame; keep 'lidar2cam' in the "
                                  "pipeline's Pack3DDetInputs meta_keys")
        from mmdet3d.structures import Box3DMode

        rt_mat = np.linalg.inv(np.asarray(lidar2cam, dtype=np.float64).reshape(4, 4))
        boxes = boxes.convert_to(Box3DMode.LIDAR, rt_mat=boxes.tensor.new_tensor(rt_mat))
    ours = mmdet3d_boxes_to_ours(boxes)
    if hasattr(boxes, "gravity_center") and len(ours):
        ours[:, :3] = _numpy(boxes.gravity_center)  # the box type knows where its origin sits
    return ours


def _frame(sample: Any, task: str, input_frame: bool) -> tuple[dict, dict, Any]:
    """(prediction, ground truth, image size) of one data sample, in our formats."""
    meta = getattr(sample, "metainfo", {}) or {}
    if task == "object_detection_3d":
        pred = sample.pred_instances_3d
        detections = {"boxes": boxes3d_to_ours(pred.bboxes_3d, meta), "scores": _numpy(pred.scores_3d),
                      "labels": _numpy(pred.labels_3d, np.int64)}
        ann = sample.get("eval_ann_info") if not input_frame else None
        if ann is not None and "gt_bboxes_3d" in ann:
            gt_boxes, gt_labels = ann["gt_bboxes_3d"], ann["gt_labels_3d"]
        elif _has(sample, "gt_instances_3d") and _has(sample.gt_instances_3d, "bboxes_3d"):
            gt_boxes, gt_labels = sample.gt_instances_3d.bboxes_3d, sample.gt_instances_3d.labels_3d
        else:
            raise TraceInputError("no ground truth in the data sample: neither eval_ann_info['gt_bboxes_3d'] nor "
                                  "gt_instances_3d (load annotations in the pipeline, or run the dataset in "
                                  "test_mode so it fills eval_ann_info)")
        boxes, labels = boxes3d_to_ours(gt_boxes, meta), _numpy(gt_labels, np.int64).reshape(-1)
        size = None
    else:
        pred = sample.pred_instances
        detections = {"boxes": _numpy(pred.bboxes).reshape(-1, 4), "scores": _numpy(pred.scores),
                      "labels": _numpy(pred.labels, np.int64)}
        if not (_has(sample, "gt_instances") and _has(sample.gt_instances, "bboxes")):
            raise TraceInputError("no ground truth in the data sample: gt_instances.bboxes is missing (add "
                                  "LoadAnnotations to the validation pipeline)")
        boxes = _numpy(getattr(sample.gt_instances.bboxes, "tensor", sample.gt_instances.bboxes)).reshape(-1, 4)
        labels = _numpy(sample.gt_instances.labels, np.int64).reshape(-1)
        shape = meta.get("img_shape" if input_frame else "ori_shape") or meta.get("img_shape")
        size = None if shape is None else (int(shape[0]), int(shape[1]))
    keep = labels >= 0  # -1: a class outside the dataset's classes (KITTI's DontCare), ignored by the metrics too
    return detections, {"boxes": boxes[keep], "labels": labels[keep]}, size


def _predict_input_frame(model: Any, data_batch: Any) -> Any:
    """Predictions for a training batch, in the frame of the network input (eval mode, no gradients)."""
    inner = _unwrap(model)
    data = inner.data_preprocessor(data_batch, False)
    if isinstance(data, Mapping) and hasattr(inner, "predict"):
        inputs, samples = data.get("inputs"), data.get("data_samples")
        try:
            return inner.predict(inputs, samples, rescale=False)
        except TypeError:  # a predict() without rescale=
            return inner.predict(inputs, samples)
    return model.val_step(data_batch)


def _config_get(cfg: Any, keys: Sequence[str]) -> Any:
    """The first of ``keys`` in a test_cfg, looking into nested ``pts`` / ``rcnn`` / ``nms`` sections too."""
    if not isinstance(cfg, Mapping):
        return None
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    for section in ("pts", "rcnn", "nms"):
        found = _config_get(cfg.get(section), keys)
        if found is not None:
            return found
    return None


def model_settings(model: Any) -> dict[str, Any]:
    """Thresholds, class count and ``pc_range`` an OpenMMLab detector declares in its config."""
    test_cfgs = [getattr(model, "test_cfg", None)]
    for head in ("bbox_head", "pts_bbox_head", "roi_head"):
        module = getattr(model, head, None)
        if module is not None:
            test_cfgs.append(getattr(module, "test_cfg", None))
    settings: dict[str, Any] = {}
    for name, keys in (("score_thresh", SCORE_KEYS), ("iou_thresh", IOU_KEYS), ("max_detections", MAX_KEYS)):
        for cfg in test_cfgs:
            value = _config_get(cfg, keys)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                settings[name] = value
                break
    for head in ("bbox_head", "pts_bbox_head"):
        module = getattr(model, head, None)
        if isinstance(getattr(module, "num_classes", None), int):
            settings["num_classes"] = module.num_classes
            break
    pc_range = _pc_range(model, test_cfgs)
    if pc_range is not None:
        settings["pc_range"] = pc_range
    return settings


def _pc_range(model: Any, test_cfgs: list) -> list[float] | None:
    preprocessor = getattr(model, "data_preprocessor", None)
    candidates = [getattr(getattr(preprocessor, "voxel_layer", None), "point_cloud_range", None),
                  getattr(preprocessor, "point_cloud_range", None)]
    candidates += [_config_get(cfg, ("pc_range", "point_cloud_range")) for cfg in test_cfgs]
    for head in ("bbox_head", "pts_bbox_head"):
        coder = getattr(getattr(model, head, None), "bbox_coder", None)
        candidates.append(getattr(coder, "pc_range", None))
    for value in candidates:
        if value is not None:
            values = [float(v) for v in _numpy(value).reshape(-1)]
            if len(values) == 6:
                return values
    return None


def _dataset_classes(runner: Any, model: Any, loop: str) -> Any:
    meta = getattr(model, "dataset_meta", None)
    if isinstance(meta, Mapping) and meta.get("classes"):
        return list(meta["classes"])
    for name in (f"_{loop}_loop", "_val_loop", "_test_loop", "_train_loop"):
        dataset = getattr(getattr(getattr(runner, name, None), "dataloader", None), "dataset", None)
        meta = getattr(dataset, "metainfo", None)
        if isinstance(meta, Mapping) and meta.get("classes"):
            return list(meta["classes"])
    return None


def hook_config_path() -> str:
    """The installed ``_base_``-includable config snippet (``custom_imports`` + ``custom_hooks``)."""
    return os.path.join(os.path.dirname(__file__), "configs", "mldbg_hook.py")
