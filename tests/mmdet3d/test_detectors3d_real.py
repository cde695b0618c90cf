"""The mmdet3d tracer families on real MMDetection3D 1.4 models with random weights (mmdet3d environment).

PointPillars (KITTI 3-class) and CenterPoint (pillar, nuScenes) are built from the configs mmdet3d ships in
``.mim/configs``, with the point-cloud range and the pillar grid shrunk so that a forward pass takes a
fraction of a second on CPU. What is checked: the factory's choice and the settings it reads from the
config, and that a traced call stores exactly the model's own predictions (an independent
``model.val_step`` on the same batch), converted to ``[cx, cy, cz, w, l, h, yaw]`` from the box objects'
``gravity_center`` / ``dims`` / ``yaw`` (not from ``mmdet3d_to_ours``), with CenterPoint's velocities.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import mmdet3d
import numpy as np
import torch
from mmengine.config import Config
from mmdet3d.registry import MODELS
from mmdet3d.structures import Box3DMode, Det3DDataSample, LiDARInstance3DBoxes
from mmdet3d.utils import register_all_modules

from mldbg_callbacks.core.vectors import decode_vectors
from mldbg_callbacks.store import LocalStore
from mldbg_callbacks.training import ObjectDetection3DTracer

CONFIGS = Path(mmdet3d.__file__).parent / ".mim" / "configs"
KITTI_CLASSES = ["Pedestrian", "Cyclist", "Car"]
PP_RANGE = [0.0, -10.24, -3.0, 20.48, 10.24, 1.0]  # 128 x 128 pillars of 0.16 m
CP_RANGE = [-6.4, -6.4, -5.0, 6.4, 6.4, 3.0]  # 64 x 64 pillars of 0.2 m

register_all_modules(init_default_scope=True)


def _shrunk_pointpillars() -> dict:
    cfg = Config.fromfile(str(CONFIGS / "pointpillars" / "pointpillars_hv_secfpn_8xb6-160e_kitti-3d-3class.py"))
    model = copy.deepcopy(cfg.model)
    voxel = model["data_preprocessor"]["voxel_layer"]["voxel_size"]
    nx = round((PP_RANGE[3] - PP_RANGE[0]) / voxel[0])
    ny = round((PP_RANGE[4] - PP_RANGE[1]) / voxel[1])
    model["data_preprocessor"]["voxel_layer"].update(point_cloud_range=PP_RANGE, max_voxels=(2000, 2000))
    model["voxel_encoder"]["point_cloud_range"] = PP_RANGE
    model["middle_encoder"]["output_shape"] = [ny, nx]
    ranges = model["bbox_head"]["anchor_generator"]["ranges"]
    model["bbox_head"]["anchor_generator"]["ranges"] = [[PP_RANGE[0], PP_RANGE[1], r[2], PP_RANGE[3], PP_RANGE[4],
                                                         r[5]] for r in ranges]
    return {"model": model, "class_names": cfg.class_names}


def _shrunk_centerpoint() -> dict:
    cfg = Config.fromfile(str(CONFIGS / "centerpoint" / "centerpoint_pillar02_second_secfpn_8xb4-cyclic-20e_nus-3d.py"))
    model = copy.deepcopy(cfg.model)
    voxel = model["data_preprocessor"]["voxel_layer"]["voxel_size"]
    n = round((CP_RANGE[3] - CP_RANGE[0]) / voxel[0])
    model["data_preprocessor"]["voxel_layer"].update(point_cloud_range=CP_RANGE, max_voxels=(2000, 2000))
    model["pts_voxel_encoder"]["point_cloud_range"] = CP_RANGE
    model["pts_middle_encoder"]["output_shape"] = (n, n)
    model["pts_bbox_head"]["bbox_coder"].update(pc_range=CP_RANGE[:2], max_num=100)  # top-k <= 16 x 16 cells
    model["train_cfg"]["pts"].update(point_cloud_range=CP_RANGE, grid_size=[n, n, 1])
    model["test_cfg"]["pts"].update(pc_range=CP_RANGE[:2], pre_max_size=100)
    return {"model": model, "class_names": cfg.class_names}


@functools.lru_cache(maxsize=None)
def _configs(name: str) -> dict:
    return {"pointpillars": _shrunk_pointpillars, "centerpoint": _shrunk_centerpoint}[name]()


def build(name: str) -> torch.nn.Module:
    """The shrunk model with random weights, classification biases at 0 so that random weights produce
    detections above the configs' score thresholds; ``dataset_meta`` as ``init_model`` sets it."""
    torch.manual_seed(0)
    cfg = _configs(name)
    model = MODELS.build(copy.deepcopy(cfg["model"]))
    head = model.bbox_head if name == "pointpillars" else model.pts_bbox_head
    with torch.no_grad():
        if name == "pointpillars":
            head.conv_cls.bias.zero_()
        else:
            for task in head.task_heads:
                task.heatmap[-1].bias.zero_()
    model.dataset_meta = {"classes": list(cfg["class_names"])}
    return model.eval()


def point_clouds(pc_range, dims: int, seed: int = 0) -> list[torch.Tensor]:
    """Two tiny frames: a ground plane and two blobs of points inside the range."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(2):
        n = 400
        xyz = rng.uniform(pc_range[:3], pc_range[3:], size=(n, 3))
        xyz[: n // 2, 2] = -1.7 + rng.normal(0, 0.02, n // 2)
        for centre in rng.uniform(np.array(pc_range[:2]) + 2, np.array(pc_range[3:5]) - 2, size=(2, 2)):
            blob = n // 8
            xyz[-blob:] = np.c_[centre + rng.normal(0, 0.5, (blob, 2)), rng.uniform(-1.7, 0.0, blob)]
            n -= blob
        extra = rng.uniform(0, 1, size=(len(xyz), dims - 3))
        frames.append(torch.tensor(np.c_[xyz, extra], dtype=torch.float32))
    return frames


def lidar_samples(n: int) -> list:
    return [Det3DDataSample(metainfo={"box_type_3d": LiDARInstance3DBoxes, "box_mode_3d": Box3DMode.LIDAR})
            for _ in range(n)]


def expected_ours(instances) -> np.ndarray:
    """Our boxes from the box object's own accessors (independent of mmdet3d_to_ours)."""
    boxes = instances.bboxes_3d
    dims = boxes.dims.numpy().astype(np.float64)  # (x_size, y_size, z_size)
    yaw = boxes.yaw.numpy().astype(np.float64)
    ours = np.c_[boxes.gravity_center.numpy(), dims[:, 1], dims[:, 0], dims[:, 2], (yaw + np.pi) % (2 * np.pi) - np.pi]
    if boxes.tensor.shape[1] == 9:
        ours = np.c_[ours, boxes.tensor[:, 7:9].numpy()]
    return ours


def read_rows(store_dir, version="v1", dataset_type="val"):
    table = LocalStore(store_dir).read_traces("det3d", version, dataset_type, [0])
    return table, sorted(table.to_pylist(), key=lambda row: row["input_id"])


def check_rows_equal_model(rows, reference, score_thresh, max_det):
    assert len(rows) == len(reference)
    total = 0
    for row, sample in zip(rows, reference):
        inst = sample.pred_instances_3d
        scores = inst.scores_3d.numpy()
        keep = np.flatnonzero(scores >= np.float32(score_thresh))
        keep = np.sort(keep[np.argsort(-scores[keep], kind="stable")][:max_det])
        ours = expected_ours(inst)[keep]
        stored = np.asarray(row["pred_boxes"], dtype=np.float64).reshape(-1, 7)
        np.testing.assert_allclose(stored, ours[:, :7], rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(row["pred_scores"], scores[keep], rtol=1e-6)
        assert row["pred_labels"] == inst.labels_3d.numpy()[keep].tolist()
        if ours.shape[1] == 9:
            np.testing.assert_allclose(np.asarray(row["pred_velocities"]).reshape(-1, 2), ours[:, 7:9], atol=1e-5)
        total += len(keep)
    assert total > 0, "random weights produced no detections: the comparison would be empty"


def test_pointpillars_real(store_dir):
    model = build("pointpillars")
    tracer = ObjectDetection3DTracer(model, "det3d", "v1")
    assert type(tracer).__name__ == "PointPillarsTracer"
    cfg = model.bbox_head.test_cfg
    assert (tracer.score_thresh, tracer.iou_thresh, tracer.max_detections_per_frame) == (
        cfg.score_thr, cfg.nms_thr, cfg.max_num) == (0.1, 0.01, 50)
    assert tracer.pc_range == PP_RANGE and tracer.num_classes == 3
    assert tracer.class_names == dict(enumerate(KITTI_CLASSES))

    points = point_clouds(PP_RANGE, 4)
    gt_mm = LiDARInstance3DBoxes(torch.tensor([[5.0, 1.0, -1.7, 3.9, 1.6, 1.56, 0.4]]))
    targets = [{"boxes": [[5.0, 1.0, -1.7 + 0.78, 1.6, 3.9, 1.56, 0.4]], "labels": [2]},
               {"boxes": np.zeros((0, 7)), "labels": []}]
    with torch.no_grad():  # as in a validation loop
        returned = tracer(points, targets, input_ids=["f0", "f1"], dataset_type="val")
    assert len(returned) == 2 and all(isinstance(s, Det3DDataSample) for s in returned)
    tracer.wait_for_save()
    table, rows = read_rows(store_dir)
    # an independent predict pass on the same frames (mmengine's val_step: data_preprocessor + predict)
    with torch.no_grad():
        reference = model.val_step({"inputs": {"points": points}, "data_samples": lidar_samples(2)})
    check_rows_equal_model(rows, reference, tracer.score_thresh, tracer.max_detections_per_frame)
    np.testing.assert_allclose(np.asarray(rows[0]["gt_boxes"]).reshape(-1, 7),
                               np.c_[gt_mm.gravity_center.numpy(), 1.6, 3.9, 1.56, 0.4], atol=1e-6)
    assert rows[0]["gt_labels"] == [2] and rows[1]["gt_boxes"] == []
    assert decode_vectors(table, "features").shape == (2, 384)  # the SECONDFPN neck, pooled
    tracer.close()


def test_pointpillars_real_dataloader_batch_and_training(store_dir):
    """mmdet3d's own ground truth (eval_ann_info with a -1 label) and the training mode's loss + predict passes."""
    model = build("pointpillars")
    tracer = ObjectDetection3DTracer(model, "det3d", "v1")
    points = point_clouds(PP_RANGE, 4, seed=1)
    samples = lidar_samples(2)
    gt = LiDARInstance3DBoxes(torch.tensor([[5.0, 1.0, -1.7, 3.9, 1.6, 1.56, 0.4],
                                            [9.0, -3.0, -1.7, 0.8, 0.6, 1.73, 0.0]]))
    samples[0].eval_ann_info = {"gt_bboxes_3d": gt, "gt_labels_3d": np.array([2, -1])}
    samples[1].eval_ann_info = {"gt_bboxes_3d": LiDARInstance3DBoxes(torch.zeros(0, 7)),
                                "gt_labels_3d": np.zeros(0, np.int64)}
    with torch.no_grad():
        tracer({"inputs": {"points": points}, "data_samples": samples}, None, input_ids=["a", "b"],
               dataset_type="val")
    tracer.wait_for_save()
    _, rows = read_rows(store_dir)
    np.testing.assert_allclose(np.asarray(rows[0]["gt_boxes"]).reshape(-1, 7),
                               np.c_[gt.gravity_center.numpy()[:1], 1.6, 3.9, 1.56, 0.4], atol=1e-6)
    assert rows[0]["gt_labels"] == [2]  # the -1 (ignored class) box is not stored

    model.train()
    targets = [{"boxes": [[5.0, 1.0, -0.92, 1.6, 3.9, 1.56, 0.4]], "labels": [2]},
               {"boxes": [[9.0, -3.0, -0.835, 0.6, 0.8, 1.73, 0.0]], "labels": [0]}]
    losses = tracer(points, targets, input_ids=["a", "b"], dataset_type="train")
    assert {"loss_cls", "loss_bbox", "loss_dir"} <= set(losses) and model.training
    sum(v.sum() if isinstance(v, torch.Tensor) else sum(x.sum() for x in v) for v in losses.values()).backward()
    tracer.wait_for_save()
    _, rows = read_rows(store_dir, dataset_type="train")
    model.eval()
    with torch.no_grad():
        reference = model.val_step({"inputs": {"points": points}, "data_samples": lidar_samples(2)})
    check_rows_equal_model(rows, reference, tracer.score_thresh, tracer.max_detections_per_frame)
    tracer.close()


def test_centerpoint_real_with_velocities(store_dir):
    model = build("centerpoint")
    tracer = ObjectDetection3DTracer(model, "det3d", "v1")
    assert type(tracer).__name__ == "CenterPointTracer"
    cfg = model.test_cfg["pts"]
    n_tasks = len(model.pts_bbox_head.task_heads)
    assert (tracer.score_thresh, tracer.iou_thresh, tracer.max_detections_per_frame) == (
        cfg["score_threshold"], cfg["nms_thr"], n_tasks * cfg["post_max_size"]) == (0.1, 0.2, 6 * 83)
    assert tracer.pc_range == CP_RANGE and tracer.num_classes == 10 and tracer.class_names[9] == "traffic_cone"

    points = point_clouds(CP_RANGE, 5)
    targets = [{"boxes": [[1.0, 2.0, -0.9, 1.9, 4.5, 1.6, 0.2]], "labels": [0], "velocities": [[1.0, 0.5]]},
               {"boxes": np.zeros((0, 7)), "labels": [], "velocities": np.zeros((0, 2))}]
    with torch.no_grad():
        tracer(points, targets, input_ids=["f0", "f1"], dataset_type="val")
    tracer.wait_for_save()
    table, rows = read_rows(store_dir)
    assert {"pred_velocities", "gt_velocities"} <= set(table.column_names)
    with torch.no_grad():
        reference = model.val_step({"inputs": {"points": points}, "data_samples": lidar_samples(2)})
    assert reference[0].pred_instances_3d.bboxes_3d.tensor.shape[1] == 9
    check_rows_equal_model(rows, reference, tracer.score_thresh, tracer.max_detections_per_frame)
    np.testing.assert_allclose(np.asarray(rows[0]["gt_velocities"]).reshape(-1, 2), [[1.0, 0.5]])
    np.testing.assert_allclose(np.asarray(rows[0]["gt_boxes"]).reshape(-1, 7), [[1.0, 2.0, -0.9, 1.9, 4.5, 1.6, 0.2]],
                               atol=1e-6)
    tracer.close()
