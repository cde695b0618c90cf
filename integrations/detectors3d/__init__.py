"""3D detector families: which ``Detection3DTracer`` subclass traces a given model.

As for 2D (``integrations/detectors``): recognised by the names in the model's class hierarchy, nothing
imported for frameworks the user does not use; each family only knows its output format and where its
config keeps the thresholds and ``pc_range``.
"""

from __future__ import annotations

from typing import Any, Callable

from mldbg_callbacks.integrations.detectors import resolve_family


def _has(*names: str) -> Callable[[list[str], Any], bool]:
    return lambda mro, model: any(n in mro for n in names)


def _prefix(prefix: str) -> Callable[[list[str], Any], bool]:
    return lambda mro, model: any(n.startswith(prefix) for n in mro)


def _named(*names: str) -> Callable[[list[str], Any], bool]:
    return lambda mro, model: any(n.rsplit(".", 1)[-1] in names for n in mro)


# (how the family is recognised, "module:Class", what users call it) -- first match wins.
FAMILIES: list[tuple[Callable[[list[str], Any], bool], str, str]] = [
    # first: OpenPCDet also has classes named CenterPoint, VoxelNeXt... that the name rules below would take
    (_prefix("pcdet.models.detectors."), "openpcdet:OpenPCDetTracer",
     "OpenPCDet detectors (PointPillar, CenterPoint, Voxel R-CNN, VoxelNeXt, TransFusion...): pred_dicts"),
    (_named("BEVFormer", "BEVDet", "BEVDet4D", "BEVDepth", "StreamPETR", "Petr3D", "PETR", "DETR3D"),
     "mmdet3d:BEVFormerTracer",
     "BEVFormer and DETR-style camera detectors (BEVDet, BEVDet4D, StreamPETR, PETR, DETR3D): query outputs, no NMS"),
    (_named("BEVFusion", "TransFusionDetector"), "mmdet3d:BEVFusionTracer", "BEVFusion (and derivatives, TransFusion)"),
    (_named("CenterPoint", "CenterFormer", "VoxelNeXt"), "mmdet3d:CenterPointTracer",
     "CenterPoint (and CenterFormer, VoxelNeXt) from MMDetection3D"),
    (_prefix("mmdet3d.models.detectors."), "mmdet3d:PointPillarsTracer",
     "PointPillars and other MMDetection3D voxel detectors (VoxelNet, SECOND, PointPillars++, EFMF-Pillars)"),
    (_has("torch.nn.modules.module.Module"), "mmdet3d:Generic3DTracer",
     "other PyTorch modules returning Det3DDataSample-like results, OpenPCDet pred_dicts, or DETR-style "
     "{'all_cls_scores', 'all_bbox_preds'} (with pc_range=)"),
]


def detector3d_class(model: Any, postprocess: Callable | None = None) -> type:
    """The Detection3DTracer subclass for ``model``; ``Detection3DTracer`` with ``postprocess``. Raises
    TypeError listing the families otherwise."""
    return resolve_family(model, FAMILIES, __name__, postprocess, "Detection3DTracer", "ObjectDetection3DTracer",
                          "(outputs, inputs) -> [{'boxes': (N, 7) [cx, cy, cz, w, l, h, yaw] (+ vx, vy), "
                          "'scores': (N,), 'labels': (N,)}, ...] with one dict per frame")
