# MLDebuggerHook for an MMEngine / MMDetection3D / MMDetection config: `_base_`-include this file, e.g.
#
#   from mldbg_callbacks.integrations.configs import HOOK_CONFIG     # its installed path
#   _base_ = ["mmdet3d::pointpillars/pointpillars_hv_secfpn_8xb6-160e_kitti-3d-3class.py", HOOK_CONFIG]
#
# then name the run in your own config or on the command line (a list is replaced, not merged, so repeat the type):
#
#   custom_hooks = [dict(type="MLDebuggerHook", model_name="pointpillars", version_name="v2", trace_train=True)]
#   python tools/train.py my_config.py --cfg-options custom_hooks.0.version_name=v2
#
# Options (see mldbg_callbacks.integrations.mmengine.MLDebuggerHook): store, trace_train, trace_test, dataset_types,
# id_key, score_thresh, iou_thresh, max_detections, num_classes, class_names, pc_range, flush_every, strict.
custom_imports = dict(imports=["mldbg_callbacks.integrations.mmengine"], allow_failed_imports=False)
custom_hooks = [dict(type="MLDebuggerHook", model_name="mmdet_model", version_name="v1")]
