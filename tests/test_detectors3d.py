"""3D detector families with stand-in models (main environment: mmdet3d and OpenPCDet are not importable
here): the factory's choice, settings read from mmengine ``ConfigDict``s, the box conversions, exact
BEVFormer/DETR3D query decoding, OpenPCDet's layout and 1-based labels, and bad input through the tracers.
Real mmdet3d models are exercised in ``tests/mmdet3d/test_detectors3d_real.py``."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from mldbg_callbacks.core.vectors import decode_vectors
from mldbg_callbacks.errors import TraceInputError
from mldbg_callbacks.store import LocalStore
from mldbg_callbacks.tasks.detection3d import mmdet3d_to_ours, normalize_yaw, ours_to_mmdet3d
from mldbg_callbacks.training import Detection3DTracer, ObjectDetection3DTracer

structures = pytest.importorskip("mmengine.structures")
ConfigDict = pytest.importorskip("mmengine.config").ConfigDict
m3d = pytest.importorskip("mldbg_callbacks.integrations.detectors3d.mmdet3d")
pcdet = pytest.importorskip("mldbg_callbacks.integrations.detectors3d.openpcdet")

BaseDataElement, InstanceData = structures.BaseDataElement, structures.InstanceData


# -- stand-ins -------------------------------------------------------------------------------------
class LiDARBoxes:
    """What the tracers read of mmdet3d's ``LiDARInstance3DBoxes``: ``.tensor`` and ``.gravity_center``."""

    def __init__(self, tensor):
        self.tensor = torch.as_tensor(tensor, dtype=torch.float32)

    def __len__(self):
        return len(self.tensor)

    @property
    def gravity_center(self):
        return torch.cat([self.tensor[:, :2], self.tensor[:, 2:3] + self.tensor[:, 5:6] / 2], dim=1)


def standin(name: str, module: str, base: type = nn.Module) -> type:
    """A class called ``name`` living in ``module`` (how the registry recognises families)."""
    cls = type(name, (base,), {})
    cls.__module__ = module
    cls.__qualname__ = name
    return cls


class Preprocessor(nn.Module):
    """mmdet3d's data_preprocessor contract: ``(data, training) -> data`` (voxelisation skipped)."""

    def __init__(self, voxel_range=None):
        super().__init__()
        self.calls = []
        if voxel_range is not None:
            self.voxel_layer = ConfigDict(point_cloud_range=voxel_range)

    def forward(self, data, training=False):
        self.calls.append(training)
        return data


class MMDet3DModel(nn.Module):
    """``forward(inputs, data_samples, mode)`` as mmdet3d's ``Base3DDetector``: ``predict`` fills each
    sample's ``pred_instances_3d`` with the next prepared results, ``loss`` returns a loss dict."""

    def __init__(self, results=None, voxel_range=(0.0, -40.0, -3.0, 70.4, 40.0, 1.0)):
        super().__init__()
        self.data_preprocessor = Preprocessor(voxel_range)
        self.neck = nn.Conv2d(4, 3, 1)
        self.results = list(results or [])
        self.modes = []

    def forward(self, inputs=None, data_samples=None, mode="tensor"):
        self.modes.append((mode, self.training))
        self.neck(torch.ones(len(data_samples), 4, 2, 2))
        if mode == "loss":
            return {"loss_cls": torch.tensor(1.0, requires_grad=True)}
        for sample, (boxes, scores, labels) in zip(data_samples, self.results.pop(0)):
            sample.pred_instances_3d = InstanceData(bboxes_3d=LiDARBoxes(boxes), scores_3d=torch.as_tensor(scores),
                                                    labels_3d=torch.as_tensor(labels))
        return data_samples


VoxelNet = standin("VoxelNet", "mmdet3d.models.detectors.voxelnet", MMDet3DModel)
CenterPoint = standin("CenterPoint", "mmdet3d.models.detectors.centerpoint", MMDet3DModel)
BEVFusion = standin("BEVFusion", "projects.BEVFusion.bevfusion.bevfusion", MMDet3DModel)


class QueryModel(nn.Module):
    """Returns raw ``{"all_cls_scores", "all_bbox_preds"}`` as BEVFormer's head does."""

    def __init__(self, outputs, pc_range=(-51.2, -51.2, -5.0, 51.2, 51.2, 3.0), post_center_range=None,
                 max_num=300):
        super().__init__()
        self.outputs = outputs
        self.pts_bbox_head = nn.Module()
        if pc_range is not None:
            self.pts_bbox_head.bbox_coder = ConfigDict(pc_range=list(pc_range), post_center_range=post_center_range,
                                                       max_num=max_num, num_classes=outputs["all_cls_scores"].shape[-1],
                                                       score_threshold=None)

    def forward(self, inputs, **kwargs):
        return self.outputs


BEVFormer = standin("BEVFormer", "projects.mmdet3d_plugin.bevformer.detectors.bevformer", QueryModel)


class PCDetModel(nn.Module):
    """OpenPCDet's contract: ``model(batch_dict)`` -> ``(pred_dicts, recall_dicts)`` in eval mode,
    ``(ret_dict, tb_dict, disp_dict)`` in training; writes its BEV map into the dict."""

    def __init__(self, pred_dicts):
        super().__init__()
        self.pred_dicts = pred_dicts
        self.num_class = 3
        self.class_names = ["Car", "Pedestrian", "Cyclist"]
        self.dataset = ConfigDict(point_cloud_range=np.array([0, -39.68, -3, 69.12, 39.68, 1]))
        self.model_cfg = ConfigDict(POST_PROCESSING=dict(SCORE_THRESH=0.1, NMS_CONFIG=dict(
            MULTI_CLASSES_NMS=False, NMS_THRESH=0.01, NMS_POST_MAXSIZE=500)))
        self.seen = []

    def forward(self, batch_dict):
        self.seen.append((self.training, sorted(batch_dict)))
        batch_dict["spatial_features_2d"] = torch.arange(batch_dict["batch_size"] * 2 * 4, dtype=torch.float32
                                                         ).reshape(-1, 2, 2, 2)
        if self.training:
            return {"loss": torch.tensor(2.0)}, {}, {}
        return self.pred_dicts, {}


PointPillar = standin("PointPillar", "pcdet.models.detectors.pointpillar", PCDetModel)
PCDetCenterPoint = standin("CenterPoint", "pcdet.models.detectors.centerpoint", PCDetModel)


def samples(n: int, gt=None) -> list:
    """Data samples as a validation dataloader gives them (``eval_ann_info`` holds mmdet3d's ground truth)."""
    out = []
    for i in range(n):
        sample = BaseDataElement(metainfo={"sample_idx": i})
        if gt is not None:
            sample.eval_ann_info = {"gt_bboxes_3d": LiDARBoxes(gt[i][0]), "gt_labels_3d": np.asarray(gt[i][1])}
        out.append(sample)
    return out


def batch(n: int, gt=None) -> dict:
    return {"inputs": {"points": [torch.rand(50, 4) for _ in range(n)]}, "data_samples": samples(n, gt)}


def read(store_dir, model="det3d", epoch=0, dataset_type="val"):
    table = LocalStore(store_dir).read_traces(model, "v1", dataset_type, [epoch])
    return table, sorted(table.to_pylist(), key=lambda row: row["input_id"])


def boxes_of(row, column="pred_boxes", width=7):
    return np.asarray(row[column], dtype=np.float64).reshape(-1, width)


def mm_box(x, y, z_bottom, x_size, y_size, z_size, yaw, *velocity):
    return [x, y, z_bottom, x_size, y_size, z_size, yaw, *velocity]


# -- the factory -----------------------------------------------------------------------------------
@pytest.mark.parametrize("model, expected", [
    (lambda: VoxelNet(), "PointPillarsTracer"),
    (lambda: CenterPoint(), "CenterPointTracer"),
    (lambda: BEVFusion(), "BEVFusionTracer"),
    (lambda: BEVFormer({"all_cls_scores": torch.zeros(1, 1, 2, 2), "all_bbox_preds": torch.zeros(1, 1, 2, 10)}),
     "BEVFormerTracer"),
    (lambda: PointPillar([]), "OpenPCDetTracer"),
    (lambda: PCDetCenterPoint([]), "OpenPCDetTracer"),  # OpenPCDet's CenterPoint is not mmdet3d's
    (lambda: nn.Linear(2, 2), "Generic3DTracer"),
])
def test_factory_picks_the_family(store_dir, model, expected):
    tracer = ObjectDetection3DTracer(model(), "det3d", "v1")
    assert type(tracer).__name__ == expected
    assert isinstance(tracer, Detection3DTracer)
    tracer.close()


def test_unknown_model_lists_families_and_postprocess(store_dir):
    with pytest.raises(TypeError) as info:
        ObjectDetection3DTracer(object(), "det3d", "v1")
    message = str(info.value)
    for family in ("PointPillars", "CenterPoint", "BEVFormer", "BEVFusion", "OpenPCDet", "postprocess="):
        assert family in message
    tracer = ObjectDetection3DTracer(lambda x: x, "det3d", "v1", postprocess=lambda out: out)
    assert type(tracer) is Detection3DTracer
    tracer.close()


# -- settings --------------------------------------------------------------------------------------
def test_pointpillars_settings_from_config(store_dir):
    model = VoxelNet()
    model.bbox_head = nn.Module()
    model.bbox_head.num_classes = 3
    model.bbox_head.test_cfg = ConfigDict(use_rotate_nms=True, nms_thr=0.01, score_thr=0.1, nms_pre=100, max_num=50)
    model.dataset_meta = {"classes": ["Pedestrian", "Cyclist", "Car"]}
    tracer = ObjectDetection3DTracer(model, "det3d", "v1")
    assert (tracer.score_thresh, tracer.iou_thresh, tracer.max_detections_per_frame) == (0.1, 0.01, 50)
    assert tracer.num_classes == 3 and tracer.class_names == {0: "Pedestrian", 1: "Cyclist", 2: "Car"}
    assert tracer.pc_range == [0.0, -40.0, -3.0, 70.4, 40.0, 1.0]
    tracer.close()
    # an MVX model keeps them under test_cfg.pts; explicit arguments win
    model = VoxelNet()
    model.pts_bbox_head = nn.Module()
    model.pts_bbox_head.num_classes = 10
    model.test_cfg = ConfigDict(pts=dict(nms_thr=0.2, score_thr=0.05, max_num=500))
    tracer = ObjectDetection3DTracer(model, "det3d", "v1", score_thresh=0.3)
    assert (tracer.score_thresh, tracer.iou_thresh, tracer.max_detections_per_frame, tracer.num_classes) == (
        0.3, 0.2, 500, 10)
    tracer.close()


def test_centerpoint_settings_from_config(store_dir):
    model = CenterPoint(voxel_range=[-51.2, -51.2, -5.0, 51.2, 51.2, 3.0])
    model.pts_bbox_head = nn.Module()
    model.pts_bbox_head.num_classes = [1, 2, 2, 1, 2, 2]
    model.pts_bbox_head.class_names = [["car"], ["truck", "construction_vehicle"], ["bus", "trailer"], ["barrier"],
                                       ["motorcycle", "bicycle"], ["pedestrian", "traffic_cone"]]
    model.pts_bbox_head.task_heads = nn.ModuleList([nn.Identity() for _ in range(6)])
    model.test_cfg = ConfigDict(pts=dict(post_center_limit_range=[-61.2, -61.2, -10.0, 61.2, 61.2, 10.0],
                                         max_per_img=500, score_threshold=0.1, pc_range=[-51.2, -51.2],
                                         nms_type="rotate", pre_max_size=1000, post_max_size=83, nms_thr=0.2))
    tracer = ObjectDetection3DTracer(model, "det3d", "v1")
    assert (tracer.score_thresh, tracer.iou_thresh, tracer.max_detections_per_frame) == (0.1, 0.2, 6 * 83)
    assert tracer.num_classes == 10 and tracer.class_names[9] == "traffic_cone" and tracer.class_names[2] == \
        "construction_vehicle"
    assert tracer.pc_range == [-51.2, -51.2, -5.0, 51.2, 51.2, 3.0]  # not test_cfg's 2-value pc_range
    tracer.close()


def test_bevfusion_settings_no_nms(store_dir):
    model = BEVFusion(voxel_range=None)
    model.pts_voxel_layer = ConfigDict(point_cloud_range=[-54.0, -54.0, -5.0, 54.0, 54.0, 3.0])
    model.bbox_head = nn.Module()
    model.bbox_head.num_classes, model.bbox_head.num_proposals = 10, 200
    model.bbox_head.test_cfg = ConfigDict(dataset="nuScenes", pc_range=[-54.0, -54.0], nms_type=None)
    model.bbox_head.bbox_coder = ConfigDict(score_threshold=0.0, pc_range=[-54.0, -54.0])
    with pytest.warns(UserWarning, match="no NMS"):
        tracer = ObjectDetection3DTracer(model, "det3d", "v1", iou_thresh=0.5)
    assert (tracer.score_thresh, tracer.iou_thresh, tracer.max_detections_per_frame) == (0.0, None, 200)
    assert tracer.uses_nms is False and tracer.pc_range == [-54.0, -54.0, -5.0, 54.0, 54.0, 3.0]
    tracer.close()


def test_openpcdet_settings(store_dir):
    tracer = ObjectDetection3DTracer(PointPillar([]), "det3d", "v1")
    assert (tracer.score_thresh, tracer.iou_thresh, tracer.max_detections_per_frame) == (0.1, 0.01, 500)
    assert tracer.num_classes == 3 and tracer.class_names == {0: "Car", 1: "Pedestrian", 2: "Cyclist"}
    assert tracer.pc_range == pytest.approx([0, -39.68, -3, 69.12, 39.68, 1])
    tracer.close()
    model = PCDetCenterPoint([])  # CenterPoint: the dense head post-processes, per head of classes
    head_post = dict(SCORE_THRESH=0.1, MAX_OBJ_PER_SAMPLE=500, NMS_CONFIG=dict(NMS_THRESH=0.2, NMS_POST_MAXSIZE=83))
    model.model_cfg = ConfigDict(DENSE_HEAD=dict(CLASS_NAMES_EACH_HEAD=[["car"], ["truck", "bus"]],
                                                 POST_PROCESSING=head_post),
                                 POST_PROCESSING=dict(RECALL_THRESH_LIST=[0.3]))
    tracer = ObjectDetection3DTracer(model, "det3d", "v1")
    assert (tracer.score_thresh, tracer.iou_thresh, tracer.max_detections_per_frame) == (0.1, 0.2, 166)
    tracer.close()


def test_missing_pc_range_names_the_fix(store_dir):
    model = BEVFormer({"all_cls_scores": torch.zeros(1, 1, 2, 2), "all_bbox_preds": torch.zeros(1, 1, 2, 10)},
                      pc_range=None)
    with pytest.raises(ValueError, match=r"pc_range=\[x_min"):
        ObjectDetection3DTracer(model, "det3d", "v1")
    tracer = ObjectDetection3DTracer(model, "det3d", "v1", pc_range=[-50, -50, -5, 50, 50, 3])
    assert tracer.pc_range == [-50, -50, -5, 50, 50, 3]
    tracer.close()


# -- conversions -----------------------------------------------------------------------------------
def test_mmdet3d_conversion_both_ways(rng):
    tensor = rng.normal(size=(20, 9)) * 3
    tensor[:, 3:6] = np.abs(tensor[:, 3:6])
    np.testing.assert_allclose(ours_to_mmdet3d(mmdet3d_to_ours(tensor)), tensor, atol=1e-12)
    np.testing.assert_allclose(m3d.ours_to_legacy(m3d.legacy_to_ours(tensor)), tensor, atol=1e-12)
    # a car 4 m long (x_size, along the heading), 2 m wide, 1.5 m high, standing on z = -1.5
    ours = m3d.mmdet3d_boxes_to_ours(LiDARBoxes([mm_box(10, 5, -1.5, 4.0, 2.0, 1.5, 0.3)]))
    np.testing.assert_allclose(ours, [[10, 5, -0.75, 2.0, 4.0, 1.5, 0.3]], atol=1e-6)
    box = LiDARBoxes([mm_box(10, 5, -1.5, 4.0, 2.0, 1.5, 0.3)])
    np.testing.assert_allclose(ours[:, :3], box.gravity_center.numpy(), atol=1e-6)
    # mmdet3d < 1.0: x_size is the width, theta = -yaw - pi/2
    legacy = m3d.mmdet3d_boxes_to_ours(LiDARBoxes([mm_box(10, 5, -1.5, 2.0, 4.0, 1.5, -0.3 - math.pi / 2)]),
                                       legacy=True)
    np.testing.assert_allclose(legacy, [[10, 5, -0.75, 2.0, 4.0, 1.5, 0.3]], atol=1e-6)


def test_openpcdet_conversion():
    ours = pcdet.pcdet_to_ours(torch.tensor([[10.0, 5.0, -0.75, 4.0, 2.0, 1.5, 0.3, 1.0, -2.0]]))
    np.testing.assert_allclose(ours, [[10, 5, -0.75, 2.0, 4.0, 1.5, 0.3, 1.0, -2.0]], atol=1e-6)
    np.testing.assert_allclose(pcdet.ours_to_pcdet(ours), [[10, 5, -0.75, 4.0, 2.0, 1.5, 0.3, 1.0, -2.0]], atol=1e-6)
    with pytest.raises(TraceInputError, match="7.*9"):
        pcdet.pcdet_to_ours(np.zeros((2, 8)))
    gt = np.zeros((2, 3, 8))
    gt[0, 0] = [1, 2, 0, 4, 2, 1.5, 0.1, 3]
    gt[1, :2] = [[5, 6, 0, 1, 0.6, 1.7, 0, 2], [7, 8, 0, 1.8, 0.6, 1.7, 0, 1]]
    frames = pcdet.pcdet_ground_truth(gt)
    assert [f["labels"].tolist() for f in frames] == [[2], [1, 0]]
    np.testing.assert_allclose(frames[0]["boxes"], [[1, 2, 0, 2, 4, 1.5, 0.1]])


# -- query (NMS-free) decoding ---------------------------------------------------------------------
def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def reference_nms_free(cls, reg, max_num, post_center_range, legacy=False):
    """NMSFreeCoder + denormalize_bbox of the BEVFormer/DETR3D projects, written out in NumPy."""
    cls, reg = cls[-1], reg[-1]
    out = []
    for c, r in zip(cls, reg):
        flat = sigmoid(c).reshape(-1)
        index = np.argsort(-flat, kind="stable")[:min(max_num, flat.size)]
        scores, labels, query = flat[index], index % c.shape[1], index // c.shape[1]
        p = r[query]
        decoded = np.stack([p[:, 0], p[:, 1], p[:, 4], np.exp(p[:, 2]), np.exp(p[:, 3]), np.exp(p[:, 5]),
                            np.arctan2(p[:, 6], p[:, 7]), p[:, 8], p[:, 9]], axis=1)
        if post_center_range is not None:
            low, high = np.array(post_center_range[:3]), np.array(post_center_range[3:])
            inside = ((decoded[:, :3] >= low) & (decoded[:, :3] <= high)).all(1)
            decoded, scores, labels = decoded[inside], scores[inside], labels[inside]
        ours = decoded.copy()
        if legacy:
            ours[:, 6] = -decoded[:, 6] - math.pi / 2
        else:
            ours[:, 3], ours[:, 4] = decoded[:, 4], decoded[:, 3]
        out.append((ours, scores, labels))
    return out


def query_outputs(rng, layers=2, frames=2, queries=5, classes=3):
    cls = rng.normal(size=(layers, frames, queries, classes)) * 2
    reg = rng.normal(size=(layers, frames, queries, 10))
    reg[..., 0:2] *= 20
    reg[..., 4] *= 1.5
    reg[..., 2:4] = np.log(rng.uniform(0.5, 5, size=reg[..., 2:4].shape))
    reg[..., 5] = np.log(rng.uniform(0.5, 3, size=reg[..., 5].shape))
    reg[-1, 0, 0, :2] = [70.0, 0.0]  # outside post_center_range in the last layer
    cls[-1, 0, 0, 0] = 5.0  # ... and among the top scores
    return cls, reg


@pytest.mark.parametrize("legacy", [False, True])
def test_bevformer_query_decoding_is_exact(store_dir, rng, legacy):
    cls, reg = query_outputs(rng)
    post_center_range = [-61.2, -61.2, -10.0, 61.2, 61.2, 10.0]
    model = BEVFormer({"all_cls_scores": torch.tensor(cls, dtype=torch.float32),
                       "all_bbox_preds": torch.tensor(reg, dtype=torch.float32)},
                      post_center_range=post_center_range, max_num=8)
    tracer = ObjectDetection3DTracer(model, "det3d", "v1", score_thresh=0.0, legacy_boxes=legacy)
    assert tracer.uses_nms is False and tracer.iou_thresh is None and tracer.max_detections_per_frame == 8
    gt = [{"boxes": np.zeros((0, 7)), "labels": np.zeros(0)}] * 2
    tracer(None, gt, input_ids=["f0", "f1"], dataset_type="val", n_epoch=0)
    tracer.wait_for_save()
    _, rows = read(store_dir)
    expected = reference_nms_free(cls.astype(np.float32).astype(np.float64), reg.astype(np.float32).astype(np.float64),
                                  8, post_center_range, legacy)
    assert len(expected[0][0]) == 7  # one of the top 8 was outside post_center_range
    for row, (boxes, scores, labels) in zip(rows, expected):
        stored = boxes_of(row)
        np.testing.assert_allclose(stored[:, :6], boxes[:, :6], rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(stored[:, 6], normalize_yaw(boxes[:, 6]), atol=1e-5)
        np.testing.assert_allclose(boxes_of(row, "pred_velocities", 2), boxes[:, 7:9], atol=1e-5)
        np.testing.assert_allclose(row["pred_scores"], scores, rtol=1e-5)
        assert row["pred_labels"] == labels.tolist()
    tracer.close()


def test_generic_tracer_decodes_query_outputs_and_drops_iou(store_dir, rng):
    cls, reg = query_outputs(rng, layers=1, frames=1)
    model = nn.Module()
    model.forward = lambda inputs: {"all_cls_scores": torch.tensor(cls), "all_bbox_preds": torch.tensor(reg)}
    tracer = ObjectDetection3DTracer(model, "det3d", "v1", score_thresh=0.0, max_detections_per_frame=4,
                                     iou_thresh=0.3)
    with pytest.warns(UserWarning, match="no NMS"):
        tracer(None, [{"boxes": np.zeros((0, 7)), "labels": []}], input_ids=["a"], dataset_type="val")
    tracer.wait_for_save()
    assert tracer.iou_thresh is None
    _, rows = read(store_dir)
    expected = reference_nms_free(cls, reg, 4, None)[0]
    np.testing.assert_allclose(boxes_of(rows[0])[:, :6], expected[0][:, :6], rtol=1e-6, atol=1e-6)
    tracer.close()


# -- mmdet3d results through the tracer ------------------------------------------------------------
def test_mmdet3d_results_and_ground_truth_stored(store_dir):
    preds = [([mm_box(10, 5, -1.5, 4.0, 2.0, 1.5, 0.3), mm_box(20, -5, -1.0, 0.8, 0.6, 1.7, 4.0)], [0.9, 0.4], [2, 0]),
             (np.zeros((0, 7)), [], [])]
    gt = [([mm_box(10, 5, -1.6, 4.1, 2.0, 1.5, 0.25), mm_box(1, 1, 0, 1, 1, 1, 0)], [2, -1]),  # -1: ignored class
          (np.zeros((0, 7)), [])]
    model = VoxelNet([preds])
    model.eval()
    tracer = ObjectDetection3DTracer(model, "det3d", "v1", score_thresh=0.1)
    data = batch(2, gt)
    returned = tracer(data, None, input_ids=["a", "b"], dataset_type="val")
    assert returned is data["data_samples"] and model.modes == [("predict", False)]
    assert model.data_preprocessor.calls == [False]
    tracer.wait_for_save()
    table, rows = read(store_dir)
    np.testing.assert_allclose(boxes_of(rows[0]), [[10, 5, -0.75, 2.0, 4.0, 1.5, 0.3],
                                                   [20, -5, -0.15, 0.6, 0.8, 1.7, 4.0 - 2 * math.pi]], atol=1e-5)
    assert rows[0]["pred_labels"] == [2, 0] and rows[1]["pred_boxes"] == [] and rows[1]["gt_boxes"] == []
    np.testing.assert_allclose(boxes_of(rows[0], "gt_boxes"), [[10, 5, -0.85, 2.0, 4.1, 1.5, 0.25]], atol=1e-5)
    assert rows[0]["gt_labels"] == [2]
    assert "pred_velocities" not in table.column_names
    assert decode_vectors(table, "features").shape == (2, 3)  # the neck's output, pooled
    tracer.close()


def test_training_mode_returns_losses_and_traces_a_predict_pass(store_dir):
    preds = [([mm_box(1, 2, 0, 4, 2, 1.5, 0.0)], [0.8], [1])]
    model = VoxelNet([preds])
    model.train()
    tracer = ObjectDetection3DTracer(model, "det3d", "v1")
    data = batch(1)
    data["data_samples"][0].gt_instances_3d = InstanceData(bboxes_3d=LiDARBoxes([mm_box(1, 2, 0, 4, 2, 1.5, 0.1)]),
                                                          labels_3d=torch.tensor([1]))
    losses = tracer(data, None, input_ids=["a"], dataset_type="train")
    assert set(losses) == {"loss_cls"} and losses["loss_cls"].requires_grad
    assert model.modes == [("loss", True), ("predict", False)] and model.training
    assert model.data_preprocessor.calls == [True, False]
    tracer.wait_for_save()
    _, rows = read(store_dir, dataset_type="train")
    np.testing.assert_allclose(boxes_of(rows[0], "gt_boxes"), [[1, 2, 0.75, 2, 4, 1.5, 0.1]], atol=1e-6)
    np.testing.assert_allclose(boxes_of(rows[0]), [[1, 2, 0.75, 2, 4, 1.5, 0.0]], atol=1e-6)
    tracer.close()


def test_centerpoint_velocities_with_gt_without(store_dir):
    preds = [([mm_box(1, 2, -1, 4, 2, 1.5, 0.1, 3.0, -1.0)], [0.7], [0])]
    model = CenterPoint([preds], voxel_range=[-51.2, -51.2, -5.0, 51.2, 51.2, 3.0])
    model.eval()
    tracer = ObjectDetection3DTracer(model, "det3d", "v1")
    tracer(batch(1), [{"boxes": [[1, 2, -0.25, 2, 4, 1.5, 0.1]], "labels": [0]}], input_ids=["a"],
           dataset_type="val")
    tracer.wait_for_save()
    table, rows = read(store_dir)
    assert "pred_velocities" in table.column_names and "gt_velocities" not in table.column_names
    np.testing.assert_allclose(boxes_of(rows[0], "pred_velocities", 2), [[3.0, -1.0]])
    np.testing.assert_allclose(boxes_of(rows[0]), boxes_of(rows[0], "gt_boxes"), atol=1e-6)
    tracer.close()


# -- bad input through the tracers -----------------------------------------------------------------
def test_eight_columns_refused_naming_the_layout(store_dir):
    preds = [(np.ones((1, 8)), [0.9], [0])]
    model = VoxelNet([preds, preds])
    model.eval()
    tracer = ObjectDetection3DTracer(model, "det3d", "v1", strict=True)
    with pytest.raises(TraceInputError, match=r"\(N, 7\) or \(N, 9\)"):
        tracer(batch(1), [{"boxes": np.zeros((0, 7)), "labels": []}], input_ids=["a"], dataset_type="val")
    tracer.close()
    lenient = ObjectDetection3DTracer(model, "det3d", "v2")
    with pytest.warns(Warning, match="7"):
        lenient(batch(1), [{"boxes": np.zeros((0, 7)), "labels": []}], input_ids=["a"], dataset_type="val")
    assert lenient.stats.rows_skipped["undecodable_output"] == 1  # one frame, not the batch dict's 2 keys
    lenient.close()
    # our own format with 8 columns (postprocess=): the codec names 7 or 9 too
    direct = Detection3DTracer(lambda x: x, "det3d", "v3", postprocess=lambda out: out, strict=True)
    with pytest.raises(TraceInputError, match="7.*9"):
        direct([{"boxes": np.ones((1, 8)), "scores": [0.9], "labels": [0]}],
               [{"boxes": np.zeros((0, 7)), "labels": []}], input_ids=["a"], dataset_type="val")
    direct.close()


def test_bad_frames_through_the_tracer(store_dir):
    """Negative sizes refused and counted; yaw 4.0 normalised; zero-GT frames stored; GT outside pc_range
    warned (counted with 0 rows) but stored."""
    preds = [([mm_box(1, 1, 0, -4, 2, 1.5, 0)], [0.9], [0]),  # negative length: frame refused
             ([mm_box(5, 5, 0, 4, 2, 1.5, 4.0)], [0.9], [0]),  # yaw 4.0
             ([mm_box(6, 6, 0, 4, 2, 1.5, 0)], [0.9], [1])]
    gt = [{"boxes": [[-10, 1, 0.75, 2, 4, 1.5, 0]], "labels": [0]},  # outside pc_range, as every GT box here
          {"boxes": [[200, 0, 0.75, 2, 4, 1.5, 0]], "labels": [0]},
          {"boxes": np.zeros((0, 7)), "labels": []}]
    model = VoxelNet([preds])
    model.eval()
    tracer = ObjectDetection3DTracer(model, "det3d", "v1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracer(batch(3), gt, input_ids=["a", "b", "c"], dataset_type="val")
        stats = tracer.wait_for_save()
    messages = " ".join(str(w.message) for w in caught)
    assert stats.rows_skipped["negative_box_sizes"] == 1
    assert "gt_outside_pc_range" in stats.rows_skipped and stats.rows_skipped["gt_outside_pc_range"] == 0
    assert "pc_range" in messages and "negative" in messages
    _, rows = read(store_dir)
    assert [row["input_id"] for row in rows] == ["b", "c"]
    assert boxes_of(rows[0])[0, 6] == pytest.approx(4.0 - 2 * math.pi, abs=1e-6)
    np.testing.assert_allclose(boxes_of(rows[0], "gt_boxes"), [[200, 0, 0.75, 2, 4, 1.5, 0]])
    assert rows[1]["gt_boxes"] == [] and rows[1]["pred_labels"] == [1]
    tracer.close()


def test_camera_boxes_refused():
    CameraBoxes = type("CameraInstance3DBoxes", (LiDARBoxes,), {})
    with pytest.raises(TraceInputError, match="LiDAR"):
        m3d.mmdet3d_boxes_to_ours(CameraBoxes(np.zeros((1, 7))))


# -- OpenPCDet -------------------------------------------------------------------------------------
def test_openpcdet_predictions_labels_and_batch_gt(store_dir):
    pred_dicts = [{"pred_boxes": torch.tensor([[10.0, 5.0, -0.75, 4.0, 2.0, 1.5, 0.3]]),
                   "pred_scores": torch.tensor([0.9]), "pred_labels": torch.tensor([1])},
                  {"pred_boxes": torch.tensor([[1.0, 1.0, 0.0, 0.8, 0.6, 1.7, -0.2],
                                               [2.0, 2.0, 0.0, 1.8, 0.6, 1.7, 0.0]]),
                   "pred_scores": torch.tensor([0.8, 0.5]), "pred_labels": torch.tensor([2, 3])}]
    model = PointPillar(pred_dicts)
    model.eval()
    tracer = ObjectDetection3DTracer(model, "det3d", "v1")
    gt = torch.zeros(2, 2, 8)
    gt[0, 0] = torch.tensor([10.0, 5.0, -0.7, 4.2, 2.0, 1.5, 0.3, 1])
    gt[1, 0] = torch.tensor([2.0, 2.0, 0.0, 1.8, 0.6, 1.7, 0.0, 3])
    batch_dict = {"batch_size": 2, "points": torch.rand(10, 5), "gt_boxes": gt}
    returned = tracer(batch_dict, None, input_ids=["a", "b"], dataset_type="val")
    assert returned[0] is pred_dicts
    tracer.wait_for_save()
    table, rows = read(store_dir)
    np.testing.assert_allclose(boxes_of(rows[0]), [[10, 5, -0.75, 2.0, 4.0, 1.5, 0.3]], atol=1e-6)
    assert rows[0]["pred_labels"] == [0] and rows[1]["pred_labels"] == [1, 2]
    np.testing.assert_allclose(boxes_of(rows[0], "gt_boxes"), [[10, 5, -0.7, 2.0, 4.2, 1.5, 0.3]], atol=1e-6)
    assert rows[0]["gt_labels"] == [0] and rows[1]["gt_labels"] == [2]
    # spatial_features_2d (2 frames, 2 channels, 2 x 2) mean-pooled: channel c of frame b = mean of 4 values
    np.testing.assert_allclose(decode_vectors(table, "features"), [[1.5, 5.5], [9.5, 13.5]])
    tracer.close()


def test_openpcdet_training_mode_extra_pass(store_dir):
    pred_dicts = [{"pred_boxes": torch.zeros(0, 7), "pred_scores": torch.zeros(0), "pred_labels": torch.zeros(0)}]
    model = PointPillar(pred_dicts)
    model.train()
    tracer = ObjectDetection3DTracer(model, "det3d", "v1")
    batch_dict = {"batch_size": 1, "points": torch.rand(10, 5)}
    ret_dict, _, _ = tracer(batch_dict, [{"boxes": np.zeros((0, 7)), "labels": []}], input_ids=["a"])
    assert float(ret_dict["loss"]) == 2.0 and model.training
    # the inference pass got the dict as it was before the training pass wrote into it
    assert [seen for seen in model.seen] == [(True, ["batch_size", "points"]), (False, ["batch_size", "points"])]
    tracer.wait_for_save()
    _, rows = read(store_dir, dataset_type="train")
    assert rows[0]["pred_boxes"] == []
    tracer.close()


# -- the generic tracer ----------------------------------------------------------------------------
def _old_style(boxes, scores, labels):
    return [{"pts_bbox": {"boxes_3d": LiDARBoxes(boxes), "scores_3d": torch.tensor(scores),
                          "labels_3d": torch.tensor(labels)}}]


def _pcdet_tuple(boxes, scores, labels):
    return [{"pred_boxes": ours_to_pcdet_t(boxes), "pred_scores": torch.tensor(scores),
             "pred_labels": torch.tensor(labels) + 1}], {"gt": 0}


def ours_to_pcdet_t(mm_rows):
    return torch.tensor(pcdet.ours_to_pcdet(mmdet3d_to_ours(np.asarray(mm_rows, dtype=np.float64))),
                        dtype=torch.float32)


@pytest.mark.parametrize("make", [_old_style, _pcdet_tuple,
                                  lambda b, s, l: [InstanceData(bboxes_3d=LiDARBoxes(b), scores_3d=torch.tensor(s),
                                                                labels_3d=torch.tensor(l))]])
def test_generic_tracer_sniffs_formats(store_dir, make):
    mm_rows = [mm_box(10, 5, -1.5, 4.0, 2.0, 1.5, 0.3, 1.0, 2.0)]
    model = nn.Module()
    model.forward = lambda inputs: make(mm_rows, [0.9], [1])
    tracer = ObjectDetection3DTracer(model, "det3d", "v1", strict=True)
    tracer(torch.zeros(1, 10, 4), [{"boxes": np.zeros((0, 7)), "labels": []}], input_ids=["a"], dataset_type="val")
    tracer.wait_for_save()
    _, rows = read(store_dir)
    np.testing.assert_allclose(boxes_of(rows[0]), [[10, 5, -0.75, 2.0, 4.0, 1.5, 0.3]], atol=1e-6)
    np.testing.assert_allclose(boxes_of(rows[0], "pred_velocities", 2), [[1.0, 2.0]])
    assert rows[0]["pred_labels"] == [1]
    tracer.close()


def test_generic_tracer_unknown_output_names_formats(store_dir):
    model = nn.Module()
    model.forward = lambda inputs: {"boxes": torch.zeros(1, 7)}
    tracer = ObjectDetection3DTracer(model, "det3d", "v1", strict=True)
    with pytest.raises(TraceInputError) as info:
        tracer(torch.zeros(1, 10, 4), [{"boxes": np.zeros((0, 7)), "labels": []}], input_ids=["a"])
    for part in ("Det3DDataSample", "pred_boxes", "pts_bbox", "all_cls_scores", "postprocess="):
        assert part in str(info.value)
    tracer.close()


def test_ground_truth_outside_pc_range_only_warns_under_strict(store_dir):
    """A notice (nothing dropped) is not an error: strict=True still stores the frame and warns."""
    tracer = Detection3DTracer(lambda x: x, "det3d", "strict", postprocess=lambda out: [
        {"boxes": np.zeros((0, 7)), "scores": [], "labels": []}], pc_range=[0, -10, -3, 20, 10, 1], strict=True)
    with pytest.warns(UserWarning, match="pc_range"):
        tracer(np.zeros((1, 10, 4)), [{"boxes": [[50.0, 0, 0, 2, 4, 1.5, 0]], "labels": [0]}], input_ids=["far"])
        tracer.wait_for_save()
    rows = LocalStore(store_dir).read_traces("det3d", "strict", "train", [0]).to_pylist()
    assert [r["input_id"] for r in rows] == ["far"]
