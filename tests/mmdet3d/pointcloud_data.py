"""A generated LiDAR dataset with exact 3D boxes, and a tiny PointPillars config that trains on it in seconds.

Frames are KITTI-like ``.bin`` point clouds (float32 ``x, y, z, intensity``) inside a 16 m x 16 m range: a
noisy ground plane plus points filling a few boxes of KITTI's three classes. The info file is MMDetection3D
1.x's format (``{"metainfo", "data_list"}`` with ``lidar_points`` and ``instances``); boxes are stored in
MMDetection3D's LiDAR layout ``(x, y, z_bottom, x_size, y_size, z_size, yaw)``, and ``SyntheticLidarDataset``
(a ``Det3DDataset`` registered in MMDetection3D's ``DATASETS``) wraps them in ``LiDARInstance3DBoxes``.

Used by the tests in this folder and by ``examples/mmdet3d_pointpillars.py``; needs the mmdet3d environment
(``scripts/setup_mmdet3d.sh``).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from mmdet3d.datasets import Det3DDataset
from mmdet3d.registry import DATASETS
from mmdet3d.structures import LiDARInstance3DBoxes

CLASSES = ("Pedestrian", "Cyclist", "Car")
PC_RANGE = [0.0, -8.0, -3.0, 16.0, 8.0, 1.0]
VOXEL_SIZE = [0.25, 0.25, 4.0]
# MMDetection3D's anchor sizes per class: (x_size = length along the heading, y_size = width, z_size = height)
SIZES = {0: (0.8, 0.6, 1.73), 1: (1.76, 0.6, 1.73), 2: (3.9, 1.6, 1.56)}
GROUND_Z = -1.75
IGNORED_LABEL = -1  # a box of a class outside CLASSES (KITTI's DontCare): Det3DDataset keeps it with label -1


@DATASETS.register_module(force=True)
class SyntheticLidarDataset(Det3DDataset):
    """Frames written by ``make_dataset``: ground truth already in the LiDAR frame (bottom-centre boxes)."""

    METAINFO = {"classes": CLASSES}

    def parse_ann_info(self, info: dict) -> dict:
        ann = super().parse_ann_info(info)
        if ann is None:  # a frame without boxes
            ann = {"gt_bboxes_3d": np.zeros((0, 7), np.float32), "gt_labels_3d": np.zeros(0, np.int64)}
        ann["gt_bboxes_3d"] = LiDARInstance3DBoxes(ann["gt_bboxes_3d"], box_dim=7, origin=(0.5, 0.5, 0.0))
        return ann


def _box_points(rng: np.random.Generator, box: np.ndarray, n: int) -> np.ndarray:
    """``n`` points uniformly inside an mmdet3d LiDAR box (bottom centre, yaw about +z)."""
    x, y, z, dx, dy, dz, yaw = box
    local = (rng.random((n, 3)) - [0.5, 0.5, 0.0]) * [dx, dy, dz]
    c, s = np.cos(yaw), np.sin(yaw)
    world = np.stack([c * local[:, 0] - s * local[:, 1] + x, s * local[:, 0] + c * local[:, 1] + y,
                      local[:, 2] + z], axis=1)
    return world


def make_frame(rng: np.random.Generator, n_boxes: int, ignored: bool = False) -> tuple[np.ndarray, list[dict]]:
    """Points (N, 4) float32 and the instances of one frame (boxes apart from each other, inside the range)."""
    instances, centres = [], []
    while len(instances) < n_boxes:
        label = int(rng.integers(0, len(CLASSES)))
        centre = np.array([rng.uniform(2.5, 13.5), rng.uniform(-5.5, 5.5)])
        if any(np.linalg.norm(centre - c) < 4.5 for c in centres):
            continue
        centres.append(centre)
        dx, dy, dz = SIZES[label]
        box = [float(centre[0]), float(centre[1]), GROUND_Z, dx, dy, dz, float(rng.uniform(-np.pi, np.pi))]
        instances.append({"bbox_3d": box, "bbox_label_3d": label})
    if ignored:  # one box of a class the dataset does not know, away from the others
        instances.append({"bbox_3d": [14.5, 7.0, GROUND_Z, 1.0, 1.0, 1.0, 0.0], "bbox_label_3d": IGNORED_LABEL})
    ground = np.column_stack([rng.uniform(PC_RANGE[0], PC_RANGE[3], 1500), rng.uniform(PC_RANGE[1], PC_RANGE[4], 1500),
                              GROUND_Z + rng.normal(0, 0.02, 1500)])
    objects = [_box_points(rng, np.array(inst["bbox_3d"]), 150) for inst in instances]
    xyz = np.concatenate([ground, *objects])
    points = np.column_stack([xyz, rng.random(len(xyz))]).astype(np.float32)
    return points, instances


def make_dataset(root: str | Path, n_train: int = 8, n_val: int = 4, seed: int = 0) -> dict:
    """Write ``points/<sample_idx>.bin`` and ``{train,val}_infos.pkl`` under ``root``.

    Returns ``{"train": {frame_id: (boxes (M, 7) mmdet3d layout, labels (M,))}, "val": {...}}`` (the
    generated ground truth, ignored boxes included with label -1); ``frame_id`` is the point file's stem:
    train frames ``000000``.., validation frames ``000100``.. (the first also holds one ignored box).
    (The infos' ``sample_idx`` is the same number, but MMEngine's BaseDataset replaces it with the
    position in the data list.)
    """
    root = Path(root)
    (root / "points").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    truth: dict = {}
    for split, n, first in (("train", n_train, 0), ("val", n_val, 100)):
        data_list, truth[split] = [], {}
        for k in range(n):
            sample_idx = first + k
            points, instances = make_frame(rng, n_boxes=int(rng.integers(1, 4)), ignored=split == "val" and k == 0)
            name = f"{sample_idx:06d}.bin"
            points.tofile(root / "points" / name)
            data_list.append({"sample_idx": sample_idx, "lidar_points": {"lidar_path": name, "num_pts_feats": 4},
                              "instances": instances})
            truth[split][name[:-4]] = (np.array([i["bbox_3d"] for i in instances], np.float64),
                                        np.array([i["bbox_label_3d"] for i in instances], np.int64))
        with open(root / f"{split}_infos.pkl", "wb") as f:
            pickle.dump({"metainfo": {"dataset": "synthetic-lidar", "info_version": "1.1"}, "data_list": data_list}, f)
    return truth


def tiny_pointpillars(score_thr: float = 0.001, nms_thr: float = 0.01, max_num: int = 20) -> dict:
    """PointPillars (MMDetection3D's KITTI 3-class model) shrunk to a 64 x 64 pillar grid and thin layers."""
    nx = int(round((PC_RANGE[3] - PC_RANGE[0]) / VOXEL_SIZE[0]))
    ny = int(round((PC_RANGE[4] - PC_RANGE[1]) / VOXEL_SIZE[1]))
    x0, y0, x1, y1 = PC_RANGE[0], PC_RANGE[1], PC_RANGE[3], PC_RANGE[4]
    anchor_z = [GROUND_Z] * 3  # anchors stand on the ground (mmdet3d LiDAR boxes: bottom-centre z)
    assigner = dict(type="Max3DIoUAssigner", iou_calculator=dict(type="mmdet3d.BboxOverlapsNearest3D"),
                    pos_iou_thr=0.5, neg_iou_thr=0.35, min_pos_iou=0.35, ignore_iof_thr=-1)
    return dict(
        type="VoxelNet",
        data_preprocessor=dict(type="Det3DDataPreprocessor", voxel=True, voxel_layer=dict(
            max_num_points=16, point_cloud_range=PC_RANGE, voxel_size=VOXEL_SIZE, max_voxels=(4000, 4000))),
        voxel_encoder=dict(type="PillarFeatureNet", in_channels=4, feat_channels=[16], with_distance=False,
                           voxel_size=VOXEL_SIZE, point_cloud_range=PC_RANGE),
        middle_encoder=dict(type="PointPillarsScatter", in_channels=16, output_shape=[ny, nx]),
        backbone=dict(type="SECOND", in_channels=16, layer_nums=[1, 1, 1], layer_strides=[2, 2, 2],
                      out_channels=[16, 32, 64]),
        neck=dict(type="SECONDFPN", in_channels=[16, 32, 64], upsample_strides=[1, 2, 4], out_channels=[32, 32, 32]),
        bbox_head=dict(
            type="Anchor3DHead", num_classes=3, in_channels=96, feat_channels=96, use_direction_classifier=True,
            assign_per_class=True,
            anchor_generator=dict(type="AlignedAnchor3DRangeGenerator",
                                  ranges=[[x0, y0, z, x1, y1, z] for z in anchor_z],
                                  sizes=[list(SIZES[c]) for c in range(3)], rotations=[0, 1.57], reshape_out=False),
            diff_rad_by_sin=True, bbox_coder=dict(type="DeltaXYZWLHRBBoxCoder"),
            loss_cls=dict(type="mmdet.FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
            loss_bbox=dict(type="mmdet.SmoothL1Loss", beta=1.0 / 9.0, loss_weight=2.0),
            loss_dir=dict(type="mmdet.CrossEntropyLoss", use_sigmoid=False, loss_weight=0.2)),
        train_cfg=dict(assigner=[assigner, assigner, assigner], allowed_border=0, pos_weight=-1, debug=False),
        test_cfg=dict(use_rotate_nms=True, nms_across_levels=False, nms_thr=nms_thr, score_thr=score_thr,
                      min_bbox_size=0, nms_pre=100, max_num=max_num))


def runner_config(data_root: str | Path, work_dir: str | Path, *, max_epochs: int = 2, hook: dict | None = None,
                  extra_imports: tuple[str, ...] = ()) -> dict:
    """A complete MMEngine config (plain dict) training ``tiny_pointpillars`` on ``make_dataset``'s frames, with
    ``MLDebuggerHook`` switched on only through ``custom_imports`` + ``custom_hooks``."""
    data_root = str(data_root)
    load = dict(type="LoadPointsFromFile", coord_type="LIDAR", load_dim=4, use_dim=4)
    train_pipeline = [load, dict(type="LoadAnnotations3D", with_bbox_3d=True, with_label_3d=True),
                      dict(type="PointsRangeFilter", point_cloud_range=PC_RANGE),
                      dict(type="ObjectRangeFilter", point_cloud_range=PC_RANGE),
                      dict(type="PointShuffle"),
                      dict(type="Pack3DDetInputs", keys=["points", "gt_bboxes_3d", "gt_labels_3d"])]
    test_pipeline = [load, dict(type="PointsRangeFilter", point_cloud_range=PC_RANGE),
                     dict(type="Pack3DDetInputs", keys=["points"])]

    def dataset(split: str, test_mode: bool, pipeline: list) -> dict:
        return dict(type="SyntheticLidarDataset", data_root=data_root, ann_file=f"{split}_infos.pkl",
                    data_prefix=dict(pts="points"), pipeline=pipeline, modality=dict(use_lidar=True, use_camera=False),
                    box_type_3d="LiDAR", test_mode=test_mode)

    def loader(split: str, test_mode: bool, pipeline: list) -> dict:
        return dict(batch_size=2, num_workers=0, persistent_workers=False,
                    sampler=dict(type="DefaultSampler", shuffle=not test_mode), dataset=dataset(split, test_mode, pipeline))

    return dict(
        default_scope="mmdet3d",
        work_dir=str(work_dir),
        model=tiny_pointpillars(),
        train_dataloader=loader("train", False, train_pipeline),
        val_dataloader=loader("val", True, test_pipeline),
        val_evaluator=dict(type="DumpResults", out_file_path=str(Path(work_dir) / "val_results.pkl")),
        train_cfg=dict(type="EpochBasedTrainLoop", max_epochs=max_epochs, val_interval=1),
        val_cfg=dict(type="ValLoop"),
        optim_wrapper=dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=1e-3, weight_decay=0.01),
                           clip_grad=dict(max_norm=35, norm_type=2)),
        default_hooks=dict(timer=dict(type="IterTimerHook"), logger=dict(type="LoggerHook", interval=1),
                           param_scheduler=dict(type="ParamSchedulerHook"),
                           checkpoint=dict(type="CheckpointHook", interval=1), sampler_seed=dict(type="DistSamplerSeedHook")),
        env_cfg=dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
                     dist_cfg=dict(backend="gloo")),
        log_level="WARNING",
        randomness=dict(seed=0),
        custom_imports=dict(imports=["mldbg_callbacks.integrations.mmengine", *extra_imports], allow_failed_imports=False),
        custom_hooks=[{"type": "MLDebuggerHook", "model_name": "pointpillars", "version_name": "v1", **(hook or {})}],
    )
