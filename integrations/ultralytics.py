"""Ultralytics YOLO: trace every epoch's validation predictions (optionally the train split) in ``model.train()``.

Example (callbacks on the model, the Ultralytics way)::

    from ultralytics import YOLO
    from mldbg_callbacks.integrations.ultralytics import add_mldbg_callbacks

    model = YOLO("yolov8n.yaml")
    add_mldbg_callbacks(model, model_name="yolov8n-shapes", version_name="v1")
    model.train(data="data.yaml", epochs=10, imgsz=640)

    from mldbg_callbacks.evaluator import Evaluator
    print(Evaluator("yolov8n-shapes", "v1").request_evaluation().metrics_summary())

Or through a trainer class (the form that also survives Ultralytics' multi-GPU relaunch unchanged)::

    from mldbg_callbacks.integrations.ultralytics import MLDebuggerDetectionTrainer, mldbg_trainer

    model.train(data="data.yaml", trainer=MLDebuggerDetectionTrainer,
                mldbg_model_name="yolov8n-shapes", mldbg_version_name="v1")
    # or, with the settings baked into a class:
    model.train(data="data.yaml", trainer=mldbg_trainer("yolov8n-shapes", "v1", trace_train=True))

Classification models (``YOLO("yolov8n-cls.yaml")``) use ``MLDebuggerClassificationTrainer`` or the same
``add_mldbg_callbacks``.

What is traced, and where it comes from:

- **Detection** (tasks ``detect``, ``segment``, ``pose``): the validator's own post-NMS predictions, read in
  its per-batch ``update_metrics(preds, batch)`` (wrapped on the validator instance). Predicted boxes
  (``pred["bboxes"]``, xyxy in letterboxed input pixels) and ground truth (``batch["bboxes"]``,
  normalised xywh of the letterboxed image) are both mapped to ORIGINAL image pixels with
  ``ops.scale_boxes(imgsz, boxes, ori_shape, ratio_pad=batch["ratio_pad"][i])``, exactly as Ultralytics'
  ``_prepare_batch``/``scale_preds`` do; ``image_size`` is the original ``(h, w)``; the sample id is the
  image file stem; labels are the model's class indices. Thresholds recorded in the run metadata are the
  validator's ``conf`` (0.001 by default in validation), ``iou`` and ``max_det``. Oriented boxes (``obb``)
  are not traced (warned once).
- **Classification**: the validator's class probabilities per image (``output_kind="probs"``) and
  ``batch["cls"]``. Ultralytics' classification batches carry no file names and its validation loader
  is shuffled, so the callback gives the loader's ``ClassificationDataset`` a subclass whose items also
  carry ``im_file`` (set before the loader's workers start); the id is ``"<class folder>/<file stem>"``
  (stems alone repeat across class folders). For a custom dataset class it cannot extend, the id falls
  back to a content hash of the preprocessed image (deterministic: validation transforms do not augment).
- **dataset_type**: ``"val"`` for the validation run after every epoch; with ``trace_train=True`` also
  ``"train"``: after each epoch's validation the train split is run once more through a validator on a
  ``mode="val"`` dataloader (no augmentation, no mosaic), so its predictions are comparable to the
  validation ones. Cost: one inference pass plus loss over the train split per epoch, i.e. roughly a
  third of a training epoch.
- **n_epoch**: ``trainer.epoch`` (0-based). Validation uses the EMA weights, as Ultralytics does.
- **The final validation of best.pt** (``final_eval()``, which fires ``on_fit_epoch_end`` a last time at
  ``epoch = epochs``) is not traced: it re-evaluates weights of an epoch already traced, so recording it
  would either add a fake epoch or duplicate rows. The callback only traces validations run with the
  trainer (``validator.training``) while an epoch is open (between ``on_train_epoch_start`` and that
  epoch's ``on_fit_epoch_end``).

Every epoch is committed at its ``on_fit_epoch_end`` (``flush_every`` epochs at a time);
``on_train_end`` waits until everything is durable, ``teardown`` stops the writer on every rank (also
after a failed run). Per-run state lives on the trainer (``trainer.mldbg_tracing``), never in module
globals, so two trainings in one process do not mix.

Multi-GPU (DDP): Ultralytics validates on every rank, each on its own shard; every rank traces what its
validator sees into its own ``rank=<r>`` partition. The parent process re-launches training in new
processes from a pickled state holding ``type(trainer)`` and ``trainer.callbacks`` (cloudpickle,
``ultralytics/utils/dist.py``). The callbacks registered here are ``functools.partial`` objects of
module-level functions with a frozen, picklable ``TracingSettings``, so they arrive in the workers with
their names. Classes made by ``mldbg_trainer()`` get a deterministic name (a digest of their settings),
are attributes of this module and are also described in the environment variable
``MLDBG_ULTRALYTICS_TRAINERS``, so a worker that imports the class by name (older Ultralytics wrote
``from <module> import <Class>`` into its DDP file) re-creates the identical class. Names left at
``None`` resolve in every process to the same values: ``MLDBG_MODEL_NAME`` / ``MLDBG_VERSION_NAME`` if set,
else the model file's stem (``yolov8n``) and the run directory's name (``train``, ``train2``...).

Failure policy: with ``strict=False`` (default) nothing raised while tracing reaches Ultralytics; each
kind of failure is warned about once (``TraceWarning``) and counted in
``trainer.mldbg_tracing[...].errors``. ``strict=True`` raises.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import os
import re
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

try:
    import torch
    from ultralytics.data.dataset import ClassificationDataset
    from ultralytics.models.yolo.classify import ClassificationTrainer
    from ultralytics.models.yolo.detect import DetectionTrainer
    from ultralytics.utils import DEFAULT_CFG, LOCAL_RANK
    from ultralytics.utils import callbacks as ultralytics_callbacks
    from ultralytics.utils import ops
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("mldbg_callbacks.integrations.ultralytics needs Ultralytics 8.x (`import ultralytics`): "
                      "pip install 'mldbg-callbacks[ultralytics]'") from exc

from mldbg_callbacks.core.trace_core import TraceCore, TraceStats, TraceWarning
from mldbg_callbacks.store import LocalStore, RemoteStore
from mldbg_callbacks.store.names import validate_name

__all__ = ["TracingSettings", "UltralyticsTracing", "add_mldbg_callbacks", "callbacks", "mldbg_trainer",
           "MLDebuggerDetectionTrainer", "MLDebuggerClassificationTrainer"]

ENV_MODEL_NAME = "MLDBG_MODEL_NAME"
ENV_VERSION_NAME = "MLDBG_VERSION_NAME"
# {class name: {"task": ..., "settings": {...}}} of the classes mldbg_trainer() made, for DDP workers.
ENV_TRAINER_REGISTRY = "MLDBG_ULTRALYTICS_TRAINERS"
# Prefix of the trainer keyword arguments this integration takes out of Ultralytics' overrides.
OVERRIDE_PREFIX = "mldbg_"
DETECTION_TASKS = ("detect", "segment", "pose")


@dataclass(frozen=True)
class TracingSettings:
    """What to trace and where (frozen and picklable: it travels to DDP workers inside the callbacks).

    Args:
        model_name, version_name: identify the run in the store; ``None``: ``MLDBG_MODEL_NAME`` /
            ``MLDBG_VERSION_NAME``, else the model file's stem and the run directory's name.
        trace_train: also trace a validation-style pass over the train split after every epoch.
        store: a store directory or server URL (a store object is kept as its path / URL); ``None``:
            MLD_API_ENDPOINT, else MLD_HOME, else ``./mldbg``.
        strict: raise instead of warning once and counting.
        flush_every: commit traces every k epochs (always at the end of training).
        max_pending_batches: bound of the tracing queue (back-pressure instead of memory growth).
        max_stored_classes, top_k: storage bounds of classification probabilities, see ``docs/storage.md``.
    """

    model_name: str | None = None
    version_name: str | None = None
    trace_train: bool = False
    store: str | os.PathLike | LocalStore | None = None  # kept as a path string
    strict: bool = False
    flush_every: int = 1
    max_pending_batches: int = 32
    max_stored_classes: int = 128
    top_k: int = 32

    def __post_init__(self) -> None:
        for name in ("model_name", "version_name"):
            value = getattr(self, name)
            if value is not None:
                validate_name(value, name)
        if isinstance(self.store, (LocalStore, RemoteStore)):  # a server travels as its URL (key: MLD_API_KEY)
            object.__setattr__(self, "store", str(self.store.root))
        elif self.store is not None:
            object.__setattr__(self, "store", os.fspath(self.store))
        if not isinstance(self.flush_every, int) or self.flush_every < 1:
            raise ValueError(f"flush_every must be a positive int, got {self.flush_every!r}")

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


class UltralyticsTracing:
    """The tracing state of one training run (one ``TracingSettings``), kept on the trainer.

    Attributes:
        settings: the settings, names resolved once training is set up.
        task: ``"detect"``-like or ``"classify"``; ``None`` until set up or when the task is not traced.
        core: the ``TraceCore`` rows go to (``None`` until set up).
        errors: failures caught per callback (``strict=False``).
        open_epoch: the epoch whose validation is being traced, ``None`` between epochs.
    """

    def __init__(self, settings: TracingSettings):
        self.settings = settings
        self.task: str | None = None
        self.core: TraceCore | None = None
        self.errors: collections.Counter = collections.Counter()
        self.open_epoch: int | None = None
        self.train_validator: Any = None
        self.id_fallback_warned = False
        self._warned: set[tuple[str, str]] = set()

    @property
    def stats(self) -> TraceStats:
        """The tracing core's counters (rows received, written, skipped by reason, ...)."""
        return self.core.stats if self.core is not None else TraceStats()

    def warn_once(self, what: str, message: str) -> None:
        key = (what, message.split(":", 1)[0])
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"mldbg-callbacks (Ultralytics, {what}): {message}; training goes on, this is "
                          "counted in trainer.mldbg_tracing[...].errors. Pass strict=True to raise instead.",
                          TraceWarning, stacklevel=3)

    def guarded(self, what: str, body: Any, *args: Any) -> Any:
        """Run ``body(*args)``; with strict=False a failure is warned about once and counted, never raised."""
        try:
            return body(*args)
        except Exception as exc:  # noqa: BLE001 - tracing must never stop a training run (strict=False)
            if self.settings.strict:
                raise
            self.errors[what] += 1
            self.warn_once(what, f"{type(exc).__name__}: {exc}")
            return None

    def __repr__(self) -> str:
        s = self.settings
        return (f"UltralyticsTracing(model_name={s.model_name!r}, version_name={s.version_name!r}, task={self.task!r}, "
                f"errors={dict(self.errors)})")


# -- callbacks --------------------------------------------------------------------------------------------------------
# Each takes the trainer and optionally the settings: add_mldbg_callbacks() and the trainer classes bind settings
# with functools.partial; called by Ultralytics with the trainer alone (the module-level ``callbacks`` dict),
# they trace with the trainer's ``mldbg_settings`` or the defaults.

def on_pretrain_routine_end(trainer: Any, settings: TracingSettings | None = None) -> None:
    """Set up: resolve names, create the tracing core, hook the validator (it exists by now, on every rank)."""
    state = _state(trainer, settings)
    state.guarded("on_pretrain_routine_end", _setup, trainer, state)


def on_train_epoch_start(trainer: Any, settings: TracingSettings | None = None) -> None:
    """Open the epoch: validations with the trainer from now until its on_fit_epoch_end are traced."""
    state = _state(trainer, settings)
    if state.core is not None:
        state.open_epoch = int(trainer.epoch)


def on_fit_epoch_end(trainer: Any, settings: TracingSettings | None = None) -> None:
    """After the epoch's validation: the optional train-split pass, then commit the epoch.

    The extra call after ``final_eval()`` (best.pt, ``trainer.epoch == epochs``) finds no open epoch and
    does nothing.
    """
    state = _state(trainer, settings)
    if state.core is None or state.open_epoch is None or state.open_epoch != int(trainer.epoch):
        return
    epoch = state.open_epoch
    try:
        if state.settings.trace_train:
            state.guarded("trace_train", _trace_train_split, trainer, state)
        state.guarded("on_fit_epoch_end", state.core.end_epoch, epoch)
    finally:
        state.open_epoch = None


def on_train_end(trainer: Any, settings: TracingSettings | None = None) -> None:
    """Make every trace durable (Ultralytics runs this on rank 0 only; ``teardown`` covers every rank)."""
    state = _state(trainer, settings)
    if state.core is not None:
        state.guarded("on_train_end", state.core.wait_for_save)


def teardown(trainer: Any, settings: TracingSettings | None = None) -> None:
    """Save what is buffered and stop the writer thread, on every rank, also after a failed run."""
    state = _state(trainer, settings)
    state.open_epoch = None
    if state.core is not None:
        state.guarded("teardown", state.core.close)


callbacks = {
    "on_pretrain_routine_end": on_pretrain_routine_end,
    "on_train_epoch_start": on_train_epoch_start,
    "on_fit_epoch_end": on_fit_epoch_end,
    "on_train_end": on_train_end,
    "teardown": teardown,
}


def add_mldbg_callbacks(model: Any, model_name: str | None = None, version_name: str | None = None, *,
                        trace_train: bool = False, store: str | os.PathLike | LocalStore | None = None,
                        strict: bool = False, flush_every: int = 1, max_pending_batches: int = 32,
                        max_stored_classes: int = 128, top_k: int = 32) -> TracingSettings:
    """Register the tracing callbacks on an Ultralytics ``YOLO`` model (or a trainer); returns the settings.

    Every later ``model.train()`` is traced; each run's state lives on its trainer
    (``model.trainer.mldbg_tracing``). Arguments as for ``TracingSettings``. Registering the same settings
    twice is a no-op.
    """
    settings = TracingSettings(model_name, version_name, trace_train=trace_train, store=store,
                               strict=strict, flush_every=flush_every, max_pending_batches=max_pending_batches,
                               max_stored_classes=max_stored_classes, top_k=top_k)
    if settings not in _registered_settings(model.callbacks):
        for event, function in callbacks.items():
            model.add_callback(event, functools.partial(function, settings=settings))
    return settings


# -- trainer classes --------------------------------------------------------------------------------------------------

class _MLDebuggerTrainerMixin:
    """Registers the tracing callbacks in ``__init__``; settings from ``mldbg_*`` keyword arguments of
    ``model.train()`` (taken out of the overrides before Ultralytics validates them), else the class's
    ``mldbg_settings`` (``mldbg_trainer()``), else the defaults."""

    mldbg_settings: TracingSettings | None = None

    def __init__(self, cfg: Any = DEFAULT_CFG, overrides: dict | None = None, _callbacks: dict | None = None):
        overrides = dict(overrides or {})
        options = {key[len(OVERRIDE_PREFIX):]: overrides.pop(key) for key in list(overrides)
                   if key.startswith(OVERRIDE_PREFIX)}
        unknown = sorted(set(options) - set(TracingSettings.option_names()))
        if unknown:
            raise TypeError(f"unknown mldbg options {[OVERRIDE_PREFIX + k for k in unknown]}; known: "
                            f"{[OVERRIDE_PREFIX + k for k in TracingSettings.option_names()]}")
        settings = type(self).mldbg_settings or TracingSettings()
        if options:
            settings = replace(settings, **options)
        super().__init__(cfg, overrides, _callbacks)
        self.mldbg_settings = settings
        # A DDP worker receives the parent's callbacks, these included: register each settings once. A class
        # without settings of its own defers to callbacks added with add_mldbg_callbacks().
        registered = _registered_settings(self.callbacks)
        explicit = bool(options) or type(self).mldbg_settings is not None
        if settings not in registered and (explicit or not registered):
            for event, function in callbacks.items():
                self.add_callback(event, functools.partial(function, settings=settings))


class MLDebuggerDetectionTrainer(_MLDebuggerTrainerMixin, DetectionTrainer):
    """``DetectionTrainer`` that traces every epoch's validation predictions (see the module docstring).

    ``model.train(trainer=MLDebuggerDetectionTrainer, mldbg_model_name="m", mldbg_version_name="v1",
    mldbg_trace_train=True, ...)``: every ``TracingSettings`` field is accepted with the ``mldbg_`` prefix.
    """


class MLDebuggerClassificationTrainer(_MLDebuggerTrainerMixin, ClassificationTrainer):
    """``ClassificationTrainer`` that traces every epoch's validation probabilities (see the module docstring)."""


_TRAINER_BASES = {"detect": MLDebuggerDetectionTrainer, "classify": MLDebuggerClassificationTrainer}


def mldbg_trainer(model_name: str | None = None, version_name: str | None = None, *, task: str = "detect",
                  **options: Any) -> type:
    """A trainer class with the tracing settings built in: ``model.train(trainer=mldbg_trainer("m", "v1"))``.

    ``task``: ``"detect"`` or ``"classify"``; ``options``: the other ``TracingSettings`` fields. The class is
    an attribute of this module under a name derived from its settings and is recorded in
    ``MLDBG_ULTRALYTICS_TRAINERS``, so DDP workers re-create the same class (see the module docstring).
    """
    if task not in _TRAINER_BASES:
        raise ValueError(f"task must be one of {sorted(_TRAINER_BASES)}, got {task!r}")
    settings = TracingSettings(model_name, version_name, **options)
    spec = {"task": task, "settings": asdict(settings)}
    digest = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    name = f"{_TRAINER_BASES[task].__name__}_{digest}"
    registry = _trainer_registry()
    registry[name] = spec
    os.environ[ENV_TRAINER_REGISTRY] = json.dumps(registry, sort_keys=True)
    return globals().get(name) or _define_trainer(name, spec)


def _define_trainer(name: str, spec: dict) -> type:
    base = _TRAINER_BASES[spec["task"]]
    cls = type(name, (base,), {"mldbg_settings": TracingSettings(**spec["settings"]), "__module__": __name__,
                               "__qualname__": name, "__doc__": base.__doc__})
    globals()[name] = cls
    return cls


def _trainer_registry() -> dict:
    try:
        registry = json.loads(os.environ.get(ENV_TRAINER_REGISTRY) or "{}")
    except ValueError:
        return {}
    return registry if isinstance(registry, dict) else {}


def __getattr__(name: str) -> Any:  # PEP 562: classes made by mldbg_trainer() in the process that started DDP
    spec = _trainer_registry().get(name)
    if spec is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return _define_trainer(name, spec)


# -- internals --------------------------------------------------------------------------------------------------------

def _registered_settings(callback_lists: Any) -> list[TracingSettings]:
    found = []
    for function in callback_lists.get("on_pretrain_routine_end", ()):
        if isinstance(function, functools.partial) and function.func is on_pretrain_routine_end:
            found.append(function.keywords.get("settings"))
    return found


def _state(trainer: Any, settings: TracingSettings | None) -> UltralyticsTracing:
    if settings is None:
        settings = getattr(trainer, "mldbg_settings", None) or TracingSettings()
    states = trainer.__dict__.setdefault("_mldbg_states", {})
    state = states.get(settings)
    if state is None:
        state = states[settings] = UltralyticsTracing(settings)
    return state


def _default_name(value: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.\-+@]", "_", value).lstrip(".-+@") or "ultralytics"
    return name[:128]


def _setup(trainer: Any, state: UltralyticsTracing) -> None:
    from mldbg_callbacks.training import classification_core, detection_core

    if state.core is not None:  # the same settings registered twice (bound and through trainer.mldbg_settings)
        return
    settings = state.settings
    model_name = settings.model_name or os.environ.get(ENV_MODEL_NAME) or _default_name(
        Path(str(getattr(trainer.args, "model", None) or "yolo")).stem)
    version_name = settings.version_name or os.environ.get(ENV_VERSION_NAME) or _default_name(
        Path(str(trainer.save_dir)).name)
    state.settings = settings = replace(settings, model_name=validate_name(model_name, "model_name"),
                                        version_name=validate_name(version_name, "version_name"))
    runs = trainer.__dict__.setdefault("mldbg_tracing", {})
    runs[f"{model_name}/{version_name}"] = state

    task = trainer.args.task
    validator = trainer.validator
    if task == "classify":
        state.core = classification_core(model_name, version_name, store=settings.store,
                                         flush_every=settings.flush_every, strict=settings.strict, output_kind="probs",
                                         max_stored_classes=settings.max_stored_classes, top_k=settings.top_k,
                                         max_pending_batches=settings.max_pending_batches)
        _attach_file_names(validator.dataloader.dataset, state)
    elif task in DETECTION_TASKS:
        names = trainer.data["names"]
        model = getattr(trainer.model, "module", trainer.model)
        state.core = detection_core(model_name, version_name, store=settings.store, num_classes=int(trainer.data["nc"]),
                                    score_thresh=float(validator.args.conf), iou_thresh=float(validator.args.iou),
                                    max_detections=int(validator.args.max_det),
                                    architecture=f"ultralytics.{type(model).__name__}",
                                    class_names={int(k): str(v) for k, v in dict(names).items()},
                                    flush_every=settings.flush_every, strict=settings.strict,
                                    max_pending_batches=settings.max_pending_batches)
    else:
        raise ValueError(f"task={task!r} is not traced (supported: {', '.join(DETECTION_TASKS)}, classify)")
    state.task = task
    _hook_validator(validator, state, "val")


def _hook_validator(validator: Any, state: UltralyticsTracing, dataset_type: str) -> None:
    """Wrap ``validator.update_metrics`` (an instance attribute shadows the method) to trace each batch."""
    original = validator.update_metrics
    if getattr(original, "_mldbg_state", None) is state:
        return
    record = _record_classification if state.task == "classify" else _record_detection

    def update_metrics(preds: Any, batch: dict) -> Any:
        # Only validations run with the trainer while an epoch is open: not final_eval() on best.pt.
        if validator.training and state.open_epoch is not None and state.core is not None:
            state.guarded(f"trace {dataset_type}", record, state, preds, batch, dataset_type, state.open_epoch)
        return original(preds, batch)

    update_metrics._mldbg_state = state
    validator.update_metrics = update_metrics


def _record_detection(state: UltralyticsTracing, preds: list, batch: dict, dataset_type: str, epoch: int) -> None:
    imgsz = batch["img"].shape[2:]
    gt_all = batch["bboxes"]
    if gt_all.shape[0]:
        # normalised xywh of the letterboxed image -> its pixels, as DetectionValidator._prepare_batch does
        scale = torch.tensor([imgsz[1], imgsz[0], imgsz[1], imgsz[0]], device=gt_all.device, dtype=gt_all.dtype)
        gt_all = ops.xywh2xyxy(gt_all) * scale
    gt_owner = batch["batch_idx"].reshape(-1)
    gt_cls = batch["cls"].reshape(-1)
    boxes, scores, labels, gt_boxes, gt_labels, sizes, ids = [], [], [], [], [], [], []
    for i, pred in enumerate(preds):
        ori_shape = tuple(int(v) for v in batch["ori_shape"][i])
        ratio_pad = batch["ratio_pad"][i]
        # scale_boxes works in place: map copies
        boxes.append(ops.scale_boxes(imgsz, pred["bboxes"].detach().clone().float(), ori_shape, ratio_pad=ratio_pad))
        scores.append(pred["conf"].detach().clone())
        labels.append(pred["cls"].detach().clone())
        mine = gt_owner == i
        gt_boxes.append(ops.scale_boxes(imgsz, gt_all[mine].clone().float(), ori_shape, ratio_pad=ratio_pad))
        gt_labels.append(gt_cls[mine].clone())
        sizes.append(ori_shape)
        ids.append(Path(batch["im_file"][i]).stem)
    state.core.record({"boxes": boxes, "scores": scores, "labels": labels, "image_size": sizes},
                      {"boxes": gt_boxes, "labels": gt_labels}, input_ids=ids, dataset_type=dataset_type,
                      n_epoch=epoch)


def _record_classification(state: UltralyticsTracing, preds: Any, batch: dict, dataset_type: str,
                           epoch: int) -> None:
    files = batch.get("im_file")
    ids = [f"{Path(f).parent.name}/{Path(f).stem}" for f in files] if files is not None else None
    if ids is None and not state.id_fallback_warned:
        state.id_fallback_warned = True
        state.warn_once("sample ids", "the classification batches carry no file names (a dataset class this "
                                      "integration cannot extend); ids are content hashes of the images")
    probs = preds[0] if isinstance(preds, (list, tuple)) else preds
    state.core.record(probs.detach().clone(), batch["cls"].detach().clone(), input_ids=ids,
                      dataset_type=dataset_type, n_epoch=epoch,
                      inputs=batch["img"].detach().clone() if ids is None else None)


class ClassificationDatasetWithFiles(ClassificationDataset):
    """``ClassificationDataset`` whose items also carry ``im_file`` (the default collate makes it a list)."""

    def __getitem__(self, i: int) -> dict:
        item = super().__getitem__(i)
        item["im_file"] = self.samples[i][0]
        return item


def _attach_file_names(dataset: Any, state: UltralyticsTracing) -> None:
    # Swapping the class is enough: InfiniteDataLoader starts its workers at the first iteration, after this.
    if type(dataset) is ClassificationDataset:
        dataset.__class__ = ClassificationDatasetWithFiles


def _trace_train_split(trainer: Any, state: UltralyticsTracing) -> None:
    """Run the train split through a validator (mode="val" loader: no augmentation), traced as "train"."""
    if state.train_validator is None:
        batch_size = max(trainer.batch_size // max(trainer.world_size, 1), 1) * 2
        loader = trainer.get_dataloader(trainer.data["train"], batch_size=batch_size, rank=LOCAL_RANK, mode="val")
        if state.task == "classify":
            _attach_file_names(loader.dataset, state)
        validator = trainer.get_validator()
        validator.dataloader = loader
        # Its own callbacks: other integrations must not log this pass as a validation, nor ours trace it as "val".
        validator.callbacks = ultralytics_callbacks.get_default_callbacks()
        validator.args.plots = validator.args.save_json = validator.args.save_txt = False
        _hook_validator(validator, state, "train")
        state.train_validator = validator
    state.train_validator(trainer=trainer)
