"""Trace a tiny MMDetection3D PointPillars training with MLDebuggerHook, switched on only in the config.

Offline and CPU-only (random initial weights): LiDAR frames with exact boxes are generated here
(``tests/mmdet3d/pointcloud_data.py``). Needs the mmdet3d environment, a second virtualenv:

    source scripts/setup_mmdet3d.sh      # builds it the first time (mmcv from source: ~10 min)
    $MLDBG_MMDET3D_PY examples/mmdet3d_pointpillars.py --epochs 2 --store ./mldbg

The hook is configured exactly as in a real ``tools/train.py`` config::

    custom_imports = dict(imports=["mldbg_callbacks.integrations.mmengine"], allow_failed_imports=False)
    custom_hooks = [dict(type="MLDebuggerHook", model_name="pointpillars", version_name="v1")]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "mmdet3d"))  # the generated dataset and the tiny model config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--store", default="./mldbg", help="the trace store (MLD_HOME)")
    parser.add_argument("--model-name", default="pointpillars")
    parser.add_argument("--version-name", default="v1")
    parser.add_argument("--trace-train", action="store_true", help="also trace the train split every epoch")
    args = parser.parse_args()

    from mmengine.config import Config
    from mmengine.runner import Runner

    from mldbg_callbacks.store import LocalStore

    with tempfile.TemporaryDirectory() as tmp:
        data_root, work_dir = Path(tmp) / "data", Path(tmp) / "work"
        # importing the helper registers SyntheticLidarDataset in mmdet3d's DATASETS (listed in custom_imports too)
        import pointcloud_data

        pointcloud_data.make_dataset(data_root, n_train=8, n_val=4)
        cfg = pointcloud_data.runner_config(
            data_root, work_dir, max_epochs=args.epochs, extra_imports=("pointcloud_data",),
            hook=dict(model_name=args.model_name, version_name=args.version_name, store=str(Path(args.store).resolve()),
                      trace_train=args.trace_train))
        config_file = Path(tmp) / "pointpillars_tiny.py"
        Config(cfg).dump(str(config_file))
        runner = Runner.from_cfg(Config.fromfile(str(config_file)))  # fromfile runs custom_imports
        runner.train()

    store = LocalStore(args.store)
    print("traced partitions (dataset_type, epoch, rows):")
    for p in store.partitions(args.model_name, args.version_name):
        print(f"  {p.dataset_type:6s} {p.n_epoch:3d} {p.rows:6d}")
    meta = store.read_meta(args.model_name, args.version_name)
    print("task:", meta.get("task"), "| classes:", meta.get("class_names"), "| pc_range:", meta.get("pc_range"))
    try:
        from mldbg_callbacks.evaluator import Evaluator

        result = Evaluator(args.model_name, args.version_name, store=args.store).request_evaluation()
    except NotImplementedError as exc:  # the 3D evaluation is not in every version
        print("evaluation not available:", exc)
    else:
        print(result.metrics_summary().to_string())


if __name__ == "__main__":
    main()
