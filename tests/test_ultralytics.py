"""Ultralytics YOLO: real random-weight YOLOv8n detection and classification trainings on generated images, offline."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ultralytics")

from mldbg_callbacks.core.vectors import decode_vectors  # noqa: E402
from mldbg_callbacks.errors import TraceWriteError  # noqa: E402
from mldbg_callbacks.store import LocalStore  # noqa: E402

CLASS_NAMES = {0: "rect", 1: "ellipse"}
# (width, height) of the generated images: val mixes in a non-square size so the letterbox mapping matters
TRAIN_SIZES = [(64, 64)] * 12
VAL_SIZES = [(64, 64)] * 4 + [(96, 72)] * 4
TRAIN_ARGS = dict(imgsz=64, epochs=2, batch=4, workers=0, device="cpu", amp=False, plots=False, val=True,
                  verbose=False, seed=0, close_mosaic=0, mosaic=0.0)


@pytest.fixture(scope="module")
def yolo_env(tmp_path_factory):
    """Offline Ultralytics: env set before its first import, a local font, no settings sync; restored after."""
    config_dir = tmp_path_factory.mktemp("yolo_config")
    values = {"YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "0", "YOLO_CONFIG_DIR": str(config_dir)}
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        import matplotlib
        from ultralytics import settings
        from ultralytics.utils import USER_CONFIG_DIR

        font = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        for folder in {Path(USER_CONFIG_DIR), config_dir / "Ultralytics"}:
            folder.mkdir(parents=True, exist_ok=True)
            for name in ("Arial.ttf", "Arial.Unicode.ttf"):
                if not (folder / name).exists():
                    shutil.copy(font, folder / name)
        settings.update(sync=False)
        yield config_dir
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _draw(rng, size):
    """One image with two filled shapes; returns (image, [(cls, x1, y1, x2, y2)]) in exact pixels."""
    from PIL import Image, ImageDraw

    w, h = size
    image = Image.new("RGB", (w, h), (25, 25, 25))
    draw = ImageDraw.Draw(image)
    objects = []
    for _ in range(2):
        cls = int(rng.integers(2))
        bw, bh = (int(v) for v in rng.integers(14, 30, 2))
        x1, y1 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
        # PIL's shapes include their end pixel: [x1, x2 - 1] covers the pixels of box [x1, x2)
        (draw.rectangle if cls == 0 else draw.ellipse)([x1, y1, x1 + bw - 1, y1 + bh - 1],
                                                        fill=(230, 70, 60) if cls == 0 else (60, 210, 90))
        objects.append((cls, x1, y1, x1 + bw, y1 + bh))
    return image, objects


@pytest.fixture(scope="module")
def detection_data(tmp_path_factory):
    """YOLO-format dataset: data.yaml, images/{train,val}, labels/{train,val}; returns (yaml, {stem: objects})."""
    root = tmp_path_factory.mktemp("shapes")
    rng = np.random.default_rng(0)
    truth = {}
    for split, sizes in (("train", TRAIN_SIZES), ("val", VAL_SIZES)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            image, objects = _draw(rng, (w, h))
            stem = f"{split}_{i:03d}"
            image.save(root / "images" / split / f"{stem}.png")
            (root / "labels" / split / f"{stem}.txt").write_text("".join(
                f"{c} {(x1 + x2) / 2 / w:.8f} {(y1 + y2) / 2 / h:.8f} {(x2 - x1) / w:.8f} {(y2 - y1) / h:.8f}\n"
                for c, x1, y1, x2, y2 in objects))
            truth[stem] = {"size": (h, w), "objects": objects}
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n"
                    + "".join(f"  {k}: {v}\n" for k, v in CLASS_NAMES.items()))
    return data, truth


@pytest.fixture(scope="module")
def classification_data(tmp_path_factory):
    """Folder dataset train/<class>/*.png, val/<class>/*.png (same file stems in both class folders)."""
    root = tmp_path_factory.mktemp("shapes_cls")
    rng = np.random.default_rng(1)
    for split, n in (("train", 6), ("val", 4)):
        for cls, name in CLASS_NAMES.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                image = _shape_image(rng, cls)
                image.save(folder / f"{i:03d}.png")
    return root


def _shape_image(rng, cls):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (32, 32), (25, 25, 25))
    x1, y1 = (int(v) for v in rng.integers(0, 10, 2))
    (ImageDraw.Draw(image).rectangle if cls == 0 else ImageDraw.Draw(image).ellipse)(
        [x1, y1, x1 + 20, y1 + 20], fill=(200, 200, 200))
    return image


def _epochs(store_dir, model, version, dataset_type):
    return sorted(p.n_epoch for p in LocalStore(store_dir).partitions(model, version) if p.dataset_type == dataset_type)


def _check_val_traces(store_dir, model, version, truth, epochs=(0, 1)):
    store = LocalStore(store_dir)
    assert _epochs(store_dir, model, version, "val") == list(epochs)  # no extra epoch from best.pt validation
    val_stems = {s for s in truth if s.startswith("val_")}
    for epoch in epochs:
        table = store.read_traces(model, version, "val", [epoch]).to_pydict()
        assert sorted(table["input_id"]) == sorted(val_stems)  # one row per val image, exactly once
        for i, stem in enumerate(table["input_id"]):
            h, w = truth[stem]["size"]
            assert (table["image_h"][i], table["image_w"][i]) == (h, w)  # original size, not the letterbox
            expected = sorted(truth[stem]["objects"])
            got = sorted(zip(table["gt_labels"][i], *np.asarray(table["gt_boxes"][i]).T))
            assert [c for c, *_ in got] == [c for c, *_ in expected]
            np.testing.assert_allclose(np.array([b for _, *b in got]), np.array([b for _, *b in expected]), atol=1.0)
            boxes = np.asarray(table["pred_boxes"][i], dtype=np.float64).reshape(-1, 4)
            assert (boxes[:, [0, 2]] >= 0).all() and (boxes[:, [0, 2]] <= w).all()
            assert (boxes[:, [1, 3]] >= 0).all() and (boxes[:, [1, 3]] <= h).all()
            assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
            scores = np.asarray(table["pred_scores"][i])
            assert len(scores) == len(boxes) == len(table["pred_labels"][i]) <= 300
            assert ((scores >= 0.001) & (scores <= 1)).all()
            assert set(table["pred_labels"][i]) <= {0, 1}
    meta = store.read_meta(model, version)
    assert meta["num_classes"] == 2
    assert meta["class_names"] == {"0": "rect", "1": "ellipse"}
    assert meta["score_thresh"] == pytest.approx(0.001)  # Ultralytics' validation conf
    assert meta["iou_thresh"] == pytest.approx(0.7)
    assert meta["max_detections_per_image"] == 300
    assert meta["architecture"] == "ultralytics.DetectionModel"


def test_add_mldbg_callbacks_traces_each_validation_once(yolo_env, detection_data, store_dir, tmp_path):
    from ultralytics import YOLO

    from mldbg_callbacks.integrations.ultralytics import add_mldbg_callbacks

    data, truth = detection_data
    model = YOLO("yolov8n.yaml")
    add_mldbg_callbacks(model, model_name="yolo-shapes", version_name="v1")
    add_mldbg_callbacks(model, model_name="yolo-shapes", version_name="v1")  # same settings twice: one tracer
    model.train(data=str(data), project=str(tmp_path / "runs"), name="a", **TRAIN_ARGS)

    _check_val_traces(store_dir, "yolo-shapes", "v1", truth)
    assert _epochs(store_dir, "yolo-shapes", "v1", "train") == []
    (state,) = model.trainer.mldbg_tracing.values()
    assert not state.errors
    assert state.stats.rows_written == 16 and state.stats.duplicates_dropped == 0


def test_trainer_class_with_override_options_and_train_split(yolo_env, detection_data, store_dir, tmp_path):
    from ultralytics import YOLO

    from mldbg_callbacks.integrations.ultralytics import MLDebuggerDetectionTrainer

    data, truth = detection_data
    model = YOLO("yolov8n.yaml")
    model.train(data=str(data), project=str(tmp_path / "runs"), name="b", trainer=MLDebuggerDetectionTrainer,
                mldbg_model_name="yolo-shapes", mldbg_version_name="v2", mldbg_trace_train=True, **TRAIN_ARGS)

    _check_val_traces(store_dir, "yolo-shapes", "v2", truth)
    assert _epochs(store_dir, "yolo-shapes", "v2", "train") == [0, 1]
    train = LocalStore(store_dir).read_traces("yolo-shapes", "v2", "train", [0, 1]).to_pydict()
    train_stems = sorted(s for s in truth if s.startswith("train_"))
    for epoch in (0, 1):
        rows = [i for i, e in enumerate(train["n_epoch"]) if e == epoch]
        assert sorted(train["input_id"][i] for i in rows) == train_stems
        for i in rows:  # the un-augmented train images: GT equal to the drawn boxes
            got = sorted(zip(train["gt_labels"][i], *np.asarray(train["gt_boxes"][i]).T))
            expected = sorted(truth[train["input_id"][i]]["objects"])
            np.testing.assert_allclose(np.array([b for _, *b in got]), np.array([b for _, *b in expected]), atol=1.0)
    assert not next(iter(model.trainer.mldbg_tracing.values())).errors


def test_mldbg_trainer_factory_is_importable_by_name(yolo_env, detection_data, store_dir, tmp_path, monkeypatch):
    import importlib
    import pickle

    from ultralytics import YOLO

    import mldbg_callbacks.integrations.ultralytics as integration

    monkeypatch.delenv(integration.ENV_TRAINER_REGISTRY, raising=False)  # restored after the test
    cls = integration.mldbg_trainer("yolo-shapes", "v3")
    assert cls is integration.mldbg_trainer("yolo-shapes", "v3")  # deterministic: same settings, same class
    name = cls.__name__
    # what a DDP worker does: a fresh import of the module finds the class from the environment
    del integration.__dict__[name]
    fresh = getattr(importlib.import_module(integration.__name__), name)
    assert fresh.mldbg_settings == cls.mldbg_settings and issubclass(fresh, integration.MLDebuggerDetectionTrainer)
    assert pickle.loads(pickle.dumps(fresh)) is fresh

    data, truth = detection_data
    model = YOLO("yolov8n.yaml")
    model.train(data=str(data), project=str(tmp_path / "runs"), name="c", trainer=fresh, **TRAIN_ARGS)
    _check_val_traces(store_dir, "yolo-shapes", "v3", truth)


def test_classification_training_traces_val_probabilities(yolo_env, classification_data, store_dir, tmp_path,
                                                           monkeypatch):
    from ultralytics import YOLO

    from mldbg_callbacks.integrations.ultralytics import MLDebuggerClassificationTrainer

    monkeypatch.delenv("MLDBG_MODEL_NAME", raising=False)
    monkeypatch.delenv("MLDBG_VERSION_NAME", raising=False)
    model = YOLO("yolov8n-cls.yaml")
    model.train(data=str(classification_data), project=str(tmp_path / "runs"), name="cls-run",
                trainer=MLDebuggerClassificationTrainer,  # no names given: model file stem / run directory name
                imgsz=32, epochs=2, batch=4, workers=0, device="cpu", amp=False, plots=False, verbose=False)

    assert list(model.trainer.mldbg_tracing) == ["yolov8n-cls/cls-run"]
    store = LocalStore(store_dir)
    assert _epochs(store_dir, "yolov8n-cls", "cls-run", "val") == [0, 1]
    expected_ids = sorted(f"{name}/{i:03d}" for name in CLASS_NAMES.values() for i in range(4))
    for epoch in (0, 1):
        table = store.read_traces("yolov8n-cls", "cls-run", "val", [epoch])
        rows = table.to_pydict()
        assert sorted(rows["input_id"]) == expected_ids  # class folder / file stem, each once
        label_of = {name: k for k, name in model.names.items()}  # folders sorted: ellipse=0, rect=1
        assert label_of == {"ellipse": 0, "rect": 1}
        assert [label_of[i.split("/")[0]] for i in rows["input_id"]] == list(rows["label"])
    meta = store.read_meta("yolov8n-cls", "cls-run")
    assert meta["task"] == "classification" and meta.get("output_kind", "probs") == "probs"
    assert not next(iter(model.trainer.mldbg_tracing.values())).errors


def test_yolo_tracer_in_a_custom_loop(yolo_env, store_dir):
    import torch
    from ultralytics import YOLO

    from mldbg_callbacks.integrations.detectors.ultralytics import YOLOTracer
    from mldbg_callbacks.training import ObjectDetectionTracer

    torch.manual_seed(0)
    model = YOLO("yolov8n.yaml")
    model.overrides.update(conf=0.01, iou=0.6)
    tracer = ObjectDetectionTracer(model, "yolo-loop", "v1")
    assert type(tracer) is YOLOTracer
    assert (tracer.score_thresh, tracer.iou_thresh, tracer.max_detections_per_image) == (0.01, 0.6, 300)
    assert tracer.num_classes == 80

    images = torch.rand(2, 3, 64, 96)
    targets = [{"boxes": torch.tensor([[4.0, 5.0, 30.0, 40.0]]), "labels": torch.tensor([3])},
               {"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.long)}]
    model.model.eval()
    with torch.no_grad():
        outputs = tracer(images, targets, input_ids=["a", "b"], dataset_type="val", n_epoch=0)
    assert outputs[0].shape[:2] == (2, 84)  # the DetectionModel's own inference output, unchanged

    model.model.train()
    train_out = tracer(images, targets, input_ids=["a", "b"], dataset_type="train", n_epoch=0)
    assert isinstance(train_out, dict) and model.model.training  # training output returned, mode restored
    tracer.wait_for_save()
    tracer.close()

    store = LocalStore(store_dir)
    for dataset_type in ("val", "train"):
        rows = store.read_traces("yolo-loop", "v1", dataset_type, [0]).to_pydict()
        assert rows["input_id"] == ["a", "b"]
        assert (rows["image_h"], rows["image_w"]) == ([64, 64], [96, 96])
        np.testing.assert_allclose(rows["gt_boxes"][0], [[4, 5, 30, 40]])
        assert rows["gt_labels"] == [[3], []]
        for boxes, scores in zip(rows["pred_boxes"], rows["pred_scores"]):
            boxes = np.asarray(boxes).reshape(-1, 4)
            assert (boxes[:, 2] <= 96 + 2).all() and (boxes[:, 3] <= 64 + 2).all() and len(boxes) <= 300
            assert all(s >= 0.01 for s in scores)
    features = decode_vectors(store.read_traces("yolo-loop", "v1", "val", [0]), "features")
    assert features.shape == (2, 256)  # SPPF output of YOLOv8n, averaged over space
    meta = store.read_meta("yolo-loop", "v1")
    assert (meta["score_thresh"], meta["iou_thresh"], meta["num_classes"]) == (0.01, 0.6, 80)

    # the DetectionModel itself is recognised too; without overrides the product fallbacks apply
    bare = ObjectDetectionTracer(YOLO("yolov8n.yaml").model, "yolo-loop", "v2", feature_layer=False)
    assert type(bare) is YOLOTracer and (bare.score_thresh, bare.iou_thresh) == (0.05, 0.5)
    bare.close()
    with pytest.raises(TypeError, match="detection model"):
        ObjectDetectionTracer(YOLO("yolov8n-cls.yaml"), "yolo-loop", "v3")


def _broken_store(tmp_path):
    blocker = tmp_path / "not_a_directory"
    blocker.write_text("a file where the store directory should be")
    return blocker / "store"


def test_failing_tracing_never_stops_training_unless_strict(yolo_env, detection_data, tmp_path):
    from ultralytics import YOLO

    from mldbg_callbacks.core.trace_core import TraceWarning
    from mldbg_callbacks.integrations.ultralytics import add_mldbg_callbacks

    data, _ = detection_data
    args = {**TRAIN_ARGS, "epochs": 1}
    model = YOLO("yolov8n.yaml")
    add_mldbg_callbacks(model, "yolo-broken", "v1", store=_broken_store(tmp_path))
    with pytest.warns(TraceWarning):
        model.train(data=str(data), project=str(tmp_path / "runs"), name="lenient", **args)
    assert model.trainer.best.exists()  # training finished
    (state,) = model.trainer.mldbg_tracing.values()
    assert state.errors["on_train_end"] == 1

    strict_model = YOLO("yolov8n.yaml")
    add_mldbg_callbacks(strict_model, "yolo-broken", "v2", store=_broken_store(tmp_path), strict=True)
    with pytest.raises(TraceWriteError):
        strict_model.train(data=str(data), project=str(tmp_path / "runs"), name="strict", **args)


def test_ddp_relaunch_recreates_trainer_class_and_callbacks(yolo_env, detection_data, store_dir, tmp_path,
                                                            monkeypatch):
    """Ultralytics' multi-GPU launch pickles type(trainer) and trainer.callbacks into a file and re-creates the
    trainer in new processes. Run that generated worker script (on CPU it trains in one process) and check
    both the mldbg_trainer() class and add_mldbg_callbacks() callbacks trace there."""
    import subprocess
    import sys

    from ultralytics import YOLO
    from ultralytics.utils.dist import ddp_cleanup, generate_ddp_file

    from mldbg_callbacks.integrations.ultralytics import add_mldbg_callbacks, mldbg_trainer

    monkeypatch.delenv("MLDBG_ULTRALYTICS_TRAINERS", raising=False)  # restored after the test
    data, truth = detection_data
    cls = mldbg_trainer("yolo-ddp", "class", store=store_dir)
    model = YOLO("yolov8n.yaml")
    add_mldbg_callbacks(model, "yolo-ddp", "callbacks", store=store_dir)
    trainer = cls(overrides={"model": "yolov8n.yaml", "data": str(data), "project": str(tmp_path / "runs"),
                             "name": "ddp", **TRAIN_ARGS}, _callbacks=model.callbacks)
    file = generate_ddp_file(trainer)
    try:
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
        subprocess.run([sys.executable, file], env=env, check=True, timeout=240, capture_output=True)
    finally:
        ddp_cleanup(trainer, file)
    for version in ("class", "callbacks"):
        _check_val_traces(store_dir, "yolo-ddp", version, truth)
