"""nuscenes-devkit inputs built from our flat 3D boxes (the reference of the 3D metrics in tests)."""

from __future__ import annotations

import numpy as np
from nuscenes.eval.common.data_classes import EvalBoxes
from nuscenes.eval.detection.constants import DETECTION_NAMES
from nuscenes.eval.detection.data_classes import DetectionBox
from pyquaternion import Quaternion

from mldbg_callbacks.evaluation.nuscenes import Boxes3D


def to_devkit(b: Boxes3D, n_frames: int) -> EvalBoxes:
    """EvalBoxes with frames in ascending order and each frame's boxes in row order."""
    eb = EvalBoxes()
    for f in range(n_frames):
        boxes = []
        for i in np.flatnonzero(b.frame == f):
            x = b.box[i]
            boxes.append(DetectionBox(
                sample_token=f"f{f}", translation=tuple(float(v) for v in x[:3]),
                size=tuple(float(v) for v in x[3:6]),
                rotation=tuple(Quaternion(axis=[0, 0, 1], angle=float(x[6])).elements),
                velocity=tuple(float(v) for v in b.velocity[i]) if b.velocity is not None else (np.nan, np.nan),
                detection_name=DETECTION_NAMES[int(b.label[i])],
                detection_score=float(b.score[i]) if b.score is not None else -1.0, attribute_name=""))
        eb.add_boxes(f"f{f}", boxes)
    return eb
