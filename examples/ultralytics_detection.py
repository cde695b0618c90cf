"""Trace a YOLOv8n training on generated shapes with the Ultralytics callbacks, then evaluate the traces.

Offline and CPU-only (random initial weights, no download): the images are drawn here, with exact boxes.

    python examples/ultralytics_detection.py --epochs 2 --store ./mldbg
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

CLASS_NAMES = {0: "rect", 1: "ellipse"}


def offline_ultralytics(config_dir: Path) -> None:
    """Keep Ultralytics off the network: set before its first import; a local font instead of a download."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "0")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(config_dir))
    import matplotlib
    from ultralytics import settings
    from ultralytics.utils import USER_CONFIG_DIR

    font = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    Path(USER_CONFIG_DIR).mkdir(parents=True, exist_ok=True)
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        if not (Path(USER_CONFIG_DIR) / name).exists():
            shutil.copy(font, Path(USER_CONFIG_DIR) / name)
    settings.update(sync=False)


def make_dataset(root: Path, n_train: int = 24, n_val: int = 12, seed: int = 0) -> Path:
    """YOLO-format dataset of filled rectangles (class 0) and ellipses (class 1); returns data.yaml."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            w, h = (96, 72) if i % 3 == 0 else (64, 64)
            image = Image.new("RGB", (w, h), (25, 25, 25))
            draw = ImageDraw.Draw(image)
            lines = []
            for _ in range(int(rng.integers(1, 4))):
                cls = int(rng.integers(2))
                bw, bh = (int(v) for v in rng.integers(14, 30, 2))
                x1, y1 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
                (draw.rectangle if cls == 0 else draw.ellipse)([x1, y1, x1 + bw - 1, y1 + bh - 1],
                                                                fill=(230, 70, 60) if cls == 0 else (60, 210, 90))
                lines.append(f"{cls} {(x1 + bw / 2) / w:.8f} {(y1 + bh / 2) / h:.8f} {bw / w:.8f} {bh / h:.8f}\n")
            image.save(root / "images" / split / f"{split}_{i:03d}.png")
            (root / "labels" / split / f"{split}_{i:03d}.txt").write_text("".join(lines))
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n"
                    + "".join(f"  {k}: {v}\n" for k, v in CLASS_NAMES.items()))
    return data


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--store", default=None, help="store directory (default: MLD_HOME, else ./mldbg)")
    parser.add_argument("--model-name", default="yolov8n-shapes")
    parser.add_argument("--version-name", default="v1")
    parser.add_argument("--trace-train", action="store_true", help="also trace a pass over the train split")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="mldbg-yolo-") as tmp:
        work = Path(tmp)
        offline_ultralytics(work / "yolo_config")
        from ultralytics import YOLO

        from mldbg_callbacks.evaluator import Evaluator
        from mldbg_callbacks.integrations.ultralytics import add_mldbg_callbacks
        from mldbg_callbacks.store import resolve_store

        data = make_dataset(work / "shapes")
        model = YOLO("yolov8n.yaml")  # architecture only: random weights, nothing downloaded
        add_mldbg_callbacks(model, model_name=args.model_name, version_name=args.version_name,
                            trace_train=args.trace_train, store=args.store)
        model.train(data=str(data), epochs=args.epochs, imgsz=64, batch=4, workers=0, device="cpu", amp=False,
                    plots=False, project=str(work / "runs"), name="train", verbose=False)

        store = resolve_store(args.store)
        print("traced partitions (dataset_type, epoch, rows):")
        for p in store.partitions(args.model_name, args.version_name):
            print(f"  {p.dataset_type:6s} {p.n_epoch:3d} {p.rows:6d}")
        result = Evaluator(args.model_name, args.version_name, store=store).request_evaluation()
        print(result.metrics_summary().to_string())
        print(result.issue_category_summary().to_string())
        print(result.tide().to_string())

if __name__ == "__main__":
    main()
