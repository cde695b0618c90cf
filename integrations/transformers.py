"""Hugging Face ``Trainer``: trace every sample of its training and evaluation steps, no extra forward pass.

Classifiers (sequence, image) and ``transformers`` ``*ForObjectDetection`` detectors (DETR, Conditional /
Deformable DETR, Table Transformer, YOLOS, RT-DETR, ...) are traced; which one is decided when training
begins, from the model's class.

Example::

    from transformers import Trainer, TrainingArguments
    from mldbg_callbacks.integrations.transformers import MLDebuggerCallback

    trainer = Trainer(model=model, args=TrainingArguments("out", eval_strategy="epoch"),
                      train_dataset=train, eval_dataset=val, processing_class=tokenizer,
                      callbacks=[MLDebuggerCallback("bert-sst2", "v1")])
    trainer.train()            # traces under MLD_HOME (or ./mldbg); a LabelTracker PNG at the end

    from mldbg_callbacks.evaluator import Evaluator
    print(Evaluator("bert-sst2", "v1").request_evaluation().metrics_summary())

What is captured, and from where (all inside the Trainer's own steps):

- **logits** from the model output (``ModelOutput.logits``) by a forward hook on the model the Trainer
  calls; **features** (penultimate: the input of the classifier's last ``nn.Linear``, e.g. BERT's
  pooled output, ViT's [CLS] token) by ``TorchFeatureCapture``; **labels** from the forward call's
  ``labels=``. Works for sequence and image classification models (any model returning
  ``(batch, num_labels)`` logits).
- **dataset_type**: ``"train"`` for training steps; for evaluations the Trainer's
  ``metric_key_prefix``: ``"eval"``, or ``"eval_<name>"`` when ``eval_dataset`` is a dict. Training
  steps run in train mode (dropout active, exactly the forward the loss used); evaluation steps run in
  eval mode (the Trainer calls ``model.eval()``).
- **n_epoch**: the integer epoch in progress, taken from ``TrainerState.epoch`` when the epoch begins.
  The evaluation that follows epoch e (``on_epoch_end`` fires before it) is recorded as epoch e; so is a
  resumed run's epoch. One evaluation per dataset and epoch is traced: with ``eval_strategy="steps"``
  the last one of each epoch (earlier ones in the epoch are skipped); evaluations before the first
  epoch (``eval_on_start``) or outside ``train()`` are not traced.
- **input ids**: the dataset's ``id`` / ``idx`` column (``id_column=``). The Trainer normally drops
  columns its model's ``forward`` does not take (``remove_unused_columns=True``); the callback keeps
  the id column out of that removal, takes it out of the features before your data collator runs, and
  carries it through the batch to the forward hook, which removes it again before ``forward``. So
  nothing changes for your collator or model. Without an id column the id is a content hash: of
  ``input_ids`` with padding excluded (``attention_mask``; left or right padding, any padded length:
  the same text gets the same id in every epoch), or of ``pixel_values`` (pass ids when images are
  augmented randomly).

**Inference** (``trainer.predict(dataset)``, classifiers): forwards without labels (a dataset without a
``label``/``labels`` column) are traced with ``label`` null and a ``logged_at`` time into
``predict_dataset_type`` (default ``"operation"``), at the epoch of the weights used (the last epoch of
``train()``, 0 without training), with features and ids as above; the traces are durable when
``predict`` returns. Evaluate them label-free: ``result.unlabelled()`` (``docs/operation.md``).
``evaluate()`` and ``predict()`` with labels outside ``train()`` are not traced.

At the end of ``train()`` every rank waits until its traces are durable, then the main process saves
the LabelTracker graph (``label_tracker_plot=True``) next to the traces. Gradient accumulation, the
Trainer's mixed precision (bf16/fp16 outputs are widened) and a short last batch need nothing special.
Under DDP every rank traces its own shard; padding duplicates are removed at evaluation.

**Object detection** (a ``transformers`` ``*ForObjectDetection`` model): the same forward hook decodes
``logits`` / ``pred_boxes`` with the model family's own ``post_process_object_detection``
(``integrations/detectors/hf_detr.py``, as ``HFDetrTracer`` does), at ``score_thresh`` and
``max_detections_per_image`` (``None`` = what the model's processor keeps, else 0.05 / 300), into
``[x1, y1, x2, y2]`` pixels of the ``pixel_values`` canvas (each image's unpadded extent when the batch
has a ``pixel_mask``; the codec clips predictions to it). Ground truth comes from ``labels=`` in Hugging Face's
format (per image ``{"class_labels", "boxes": normalised cxcywh}``, as the DETR image processors make
them), converted with the same sizes. Features: the decoder output (``last_hidden_state``) averaged over
queries, or ``feature_layer``'s output mean-pooled. One row per image goes to a detection core
(``mldbg_callbacks.training.detection_core``); train and eval steps, epochs, ids and the failure policy
are as for classifiers; no LabelTracker PNG (a classification view). The Trainer needs a data collator
that stacks ``pixel_values`` (and ``pixel_mask``) and keeps ``labels`` a list of dicts, and
``remove_unused_columns=False`` when the dataset holds raw columns the collator reads (the usual DETR
fine-tuning setup); evaluation with ``compute_metrics`` needs ``eval_do_concat_batches=False``, as in
Hugging Face's object detection guide, because labels are lists of variable-length dicts. A detector
wrapped in your own ``nn.Module`` (class name not ``*ForObjectDetection``) is refused with a pointer to
``ObjectDetectionTracer``, which traces any detector in a custom loop.

Bad input follows the package's failure policy (``docs/reliability.md``): with ``strict=False`` a
forward without labels, a segmentation, wrapped-detector or token-classification model, or a batch
that cannot be read is warned about once and counted in ``callback.stats``; training goes on. ``strict=True`` raises.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import os
import re
import sys
import threading
import warnings
import weakref
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback

from mldbg_callbacks.core.trace_core import TraceStats, TraceWarning
from mldbg_callbacks.errors import MLDebuggerError, TraceInputError
from mldbg_callbacks.store import LocalStore, resolve_store
from mldbg_callbacks.store.names import validate_name
from mldbg_callbacks.training import (DEFAULT_MAX_DETECTIONS, DEFAULT_SCORE_THRESH, classification_core,
                                      detection_core)

from .detectors import hf_detr
from .torch_model import TorchFeatureCapture

__all__ = ["MLDebuggerCallback", "token_fingerprint"]

# The batch entry that carries ids (and a reference to the labels) from the collator to the forward hook.
BATCH_KEY = "mldbg_trace"
_SKIP = object()  # evaluation context: this evaluation is not traced
# refused, except transformers *ForObjectDetection models, which are traced as detectors
_DETECTION_HEADS = ("ForObjectDetection", "ForInstanceSegmentation", "ForPanopticSegmentation")
_OWNERS: "weakref.WeakKeyDictionary[torch.nn.Module, MLDebuggerCallback]" = weakref.WeakKeyDictionary()


class MLDebuggerCallback(TrainerCallback):
    """Trace a Hugging Face classifier's per-sample logits, labels and features, or a ``*ForObjectDetection``
    model's per-image detections and ground truth, during ``Trainer.train()``.

    Args:
        model_name, version_name: identify the run in the store (letters, digits, ``_ . - + @``).
        store: a directory, a ``LocalStore``, or ``None`` (MLD_HOME, else ``./mldbg``).
        feature_layer: ``None`` = input of the last ``nn.Linear`` (penultimate features; for detectors the
            decoder output averaged over queries); a module name (``"bert.pooler"``) = that module's output
            (for detectors mean-pooled over space or tokens); ``False`` = no features.
        id_column: dataset column(s) holding a sample id, first match wins; ``None`` = content hashes.
        label_tracker_plot: save the LabelTracker PNG (loss by label over epochs) at training end.
        handoff_rows: consecutive batches of one dataset and epoch are handed to the tracing core together
            once they hold this many rows (and at every epoch or evaluation end): the core's per-batch
            work runs on a worker thread that shares the GIL with training, so few larger hand-overs cost
            less than many small ones. ``strict=True`` hands over every batch (errors raise at once).
        flush_every, strict, output_kind, max_stored_classes, top_k, max_feature_dim,
            max_pending_batches: as for ``ClassificationTracer``.
        score_thresh, max_detections_per_image: detection models only, as for ``ObjectDetectionTracer``
            (``None`` = what the model's image processor keeps, else 0.05 / 300).
        predict_dataset_type: where ``trainer.predict()`` on data without labels traces its predictions
            (classifiers; default ``"operation"``, see "Inference" in the module docstring).

    Add it once: ``Trainer(..., callbacks=[MLDebuggerCallback(...)])``. A second instance on the same
    Trainer or model warns and does nothing. Added later with ``trainer.add_callback()``, the training
    dataloader already exists, so training samples of that run are identified by content hashes.
    """

    def __init__(self, model_name: str, version_name: str, *, store: str | os.PathLike | LocalStore | None = None,
                 feature_layer: Any = None, id_column: str | Sequence[str] | None = ("id", "idx"),
                 label_tracker_plot: bool = True, handoff_rows: int = 256, flush_every: int = 1, strict: bool = False,
                 output_kind: str = "auto", max_stored_classes: int = 128, top_k: int = 32,
                 max_feature_dim: int = 1024, max_pending_batches: int = 32, score_thresh: float | None = None,
                 max_detections_per_image: int | None = None, predict_dataset_type: str = "operation"):
        self.model_name = validate_name(model_name, "model_name")
        self.predict_dataset_type = validate_name(predict_dataset_type, "predict_dataset_type")
        self.version_name = validate_name(version_name, "version_name")
        self.store = resolve_store(store)
        self.core = classification_core(self.model_name, self.version_name, store=self.store,
                                        flush_every=flush_every, strict=strict, output_kind=output_kind,
                                        max_stored_classes=max_stored_classes, top_k=top_k,
                                        max_feature_dim=max_feature_dim, max_pending_batches=max_pending_batches)
        self.task = "classification"  # "detection" once training a *ForObjectDetection model (on_train_begin)
        self.core_options = {"flush_every": flush_every, "strict": strict, "output_kind": output_kind,
                             "max_stored_classes": max_stored_classes, "top_k": top_k,
                             "max_feature_dim": max_feature_dim, "max_pending_batches": max_pending_batches}
        self.score_thresh = score_thresh
        self.max_detections_per_image = max_detections_per_image
        self.detection_settings: dict | None = None  # of the detection core, once there is one
        if feature_layer is not None and feature_layer is not False and not isinstance(feature_layer, str):
            raise TypeError("feature_layer must be None, False or a module name such as 'bert.pooler' "
                            f"(an nn.Module object cannot be matched to the Trainer's model), got {feature_layer!r}")
        self.feature_layer = feature_layer
        if isinstance(id_column, str):
            id_column = (id_column,)
        self.id_columns = tuple(validate_name(c, "id_column") for c in (id_column or ()))
        self.label_tracker_plot = label_tracker_plot
        if not isinstance(handoff_rows, int) or handoff_rows < 1:
            raise ValueError(f"handoff_rows must be a positive int, got {handoff_rows!r}")
        self.handoff_rows = handoff_rows
        self.strict = strict
        self.label_tracker_path = None  # set when the PNG was saved
        self._reset_runtime()

    def _reset_runtime(self) -> None:
        self._trainer_ref: Any = None       # weakref to the Trainer, once found
        self._disabled = False               # a duplicate, or a model it cannot trace
        self._active = False                 # between on_train_begin and on_train_end
        self._run_state: Any = None          # the TrainerState of the active train() call
        self._handles: list = []             # forward hook of the current run
        self._capture: TorchFeatureCapture | None = None
        self._stripped: weakref.WeakSet = weakref.WeakSet()  # models carrying the permanent pre-hook
        self._strip_handles: list = []
        self._added_columns: tuple = ()     # id columns added to the Trainer's signature columns
        self._local = threading.local()      # ids/labels popped by the pre-hook, per thread
        self._epoch: int | None = None
        self._epoch_done = False
        self._updates_per_epoch: int | None = None
        self._eval_context: Any = None       # dataset_type of the running evaluation, _SKIP, or None
        self._traced_evals: set = set()
        self._warned: set = set()
        self._decoder: Any = None            # detection: hf_detr.DetrDecoder of the model being trained
        self._prediction: tuple | None = None  # (dataset_type, n_epoch) while trainer.predict() runs
        self._closed = False
        self._handoff = Handoff(self.core, 1 if self.strict else self.handoff_rows)

    def __getstate__(self) -> dict:
        # Hooks, thread-locals and the Trainer do not pickle; a copy starts detached (TraceCore likewise).
        keep = ("model_name", "version_name", "store", "core", "feature_layer", "id_columns", "predict_dataset_type",
                "label_tracker_plot", "strict", "handoff_rows", "label_tracker_path", "task", "core_options",
                "score_thresh", "max_detections_per_image", "detection_settings")
        return {k: self.__dict__[k] for k in keep}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset_runtime()

    # -- public --------------------------------------------------------------------------------------
    @property
    def stats(self) -> TraceStats:
        """Counters: rows received, written, skipped by reason, duplicates dropped, write errors."""
        return self.core.stats

    def wait_for_save(self, n_epoch: int | None = None, timeout_s: float | None = None) -> TraceStats:
        """Block until the traces (of ``n_epoch``, or all) are durable; raise if a write failed."""
        self._handoff.flush()
        return self.core.wait_for_save(n_epoch=n_epoch, timeout_s=timeout_s)

    def close(self) -> None:
        """Save what is buffered, stop the worker and take every hook off the model."""
        self._active = False
        self._closed = True
        self._remove_run_hooks()
        self._handoff.flush()
        trainer = self._trainer()
        if trainer is not None and isinstance(trainer.data_collator, IdCollator):
            trainer.data_collator = trainer.data_collator.collator  # batches no longer carry BATCH_KEY
            columns = getattr(trainer, "_signature_columns", None)
            if isinstance(columns, list):  # the Trainer drops the id column again
                trainer._signature_columns = [c for c in columns if c not in self._added_columns]
            cached = getattr(trainer, "_eval_dataloaders", None)
            if isinstance(cached, dict):  # persistent-worker dataloaders built with our collator: rebuild them
                cached.clear()
        for handle in self._strip_handles:
            handle.remove()
        self._strip_handles, self._stripped = [], weakref.WeakSet()
        self.core.close()

    # -- Trainer events ------------------------------------------------------------------------------
    def on_init_end(self, args, state, control, **kwargs):
        trainer = _find_trainer(self)
        if trainer is not None:
            self._attach(trainer)

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if self._disabled or (self._active and state is self._run_state):
            return  # the same event delivered twice (the callback was added twice)
        if self._active:  # the previous train() raised before on_train_end: start over
            self._remove_run_hooks()
            self._flush_handoff()
            self._active = False
        trainer = self._trainer()
        if trainer is None:
            trainer = _find_trainer(self)
            if trainer is not None:
                self._attach(trainer, late=True)
            if self._disabled:
                return
        model = model if model is not None else getattr(trainer, "model", None)
        if not isinstance(model, torch.nn.Module):
            self._fail(f"the Trainer's model is {type(model).__name__}, not a torch.nn.Module; "
                       "MLDebuggerCallback traces PyTorch models", "unsupported_model", disable=True)
            return
        owner = _OWNERS.get(model)
        if owner is not None and owner is not self and owner._active:
            self._warn_once("duplicate", "another MLDebuggerCallback already traces this model; this one does "
                                         "nothing (add the callback once)")
            return
        if owner is not None and owner is not self:
            owner._remove_run_hooks()  # left over from an earlier run that did not finish
        if hf_detr.is_hf_detector(model):
            if not self._use_detection(model):
                return
        elif any(type(model).__name__.endswith(head) for head in _DETECTION_HEADS):
            self._fail(_detection_message(type(model).__name__), "detection_model", disable=True)
            return
        else:
            self._set_core("classification")
        if trainer is None:
            self._warn_once("no_trainer", "MLDebuggerCallback could not find the Trainer it belongs to: samples "
                                          "are identified by content hashes and every evaluation is recorded "
                                          "as 'eval'")
        if state.global_step == 0 and self._has_traces():
            self._warn_once("existing", f"{self.model_name}/{self.version_name} already has traces in "
                                        f"{self.store.root} "
                                        "and this training starts from scratch: its epochs are added to the same "
                                        "partitions, where the earlier rows win. Use a new version_name per "
                                        "training run (resuming from a checkpoint continues the same version)")
        _OWNERS[model] = self  # weak key: the callback keeps no reference to the model after training
        self._hook_model(model)
        # detectors: features come from the output (last_hidden_state) unless a layer is named
        capture_layer = self.feature_layer if self.task == "classification" or isinstance(self.feature_layer, str) \
            else False
        self._capture = None if capture_layer is False else TorchFeatureCapture(model, capture_layer)
        self._handles = [model.register_forward_hook(self._after_forward, with_kwargs=True)]
        try:
            self._updates_per_epoch = math.ceil(len(train_dataloader) / max(1, args.gradient_accumulation_steps))
        except TypeError:  # an IterableDataset has no length
            self._updates_per_epoch = None
        self._epoch, self._epoch_done, self._traced_evals = None, False, set()
        self._run_state = state  # a new TrainerState per train() call
        self._active = True

    def on_epoch_begin(self, args, state, control, **kwargs):
        if not self._active:
            return
        # TrainerState.epoch is fractional (epoch + step / steps_in_epoch) and None before the first step;
        # at an epoch's start it is that epoch (or e + k/n when resuming mid-epoch).
        epoch = int(math.floor(state.epoch + 1e-9)) if state.epoch else 0
        if self._epoch is not None and epoch > self._epoch:
            self.core.end_epoch(self._epoch)  # the previous epoch's training and evaluation are complete
        self._epoch, self._epoch_done = epoch, False

    def on_epoch_end(self, args, state, control, **kwargs):
        if self._active:
            self._flush_handoff()
            self._epoch_done = True

    def on_train_end(self, args, state, control, **kwargs):
        if not self._active:
            return
        self._active = False
        self._remove_run_hooks()
        self._flush_handoff()
        try:
            self.core.wait_for_save()
        except MLDebuggerError as exc:
            if self.strict:
                raise
            warnings.warn(f"mldbg-callbacks: traces of this run could not all be saved: {exc}", TraceWarning,
                          stacklevel=2)
        _barrier()  # the main process plots only after every rank committed its traces
        if (self.label_tracker_plot and self.task == "classification" and state.is_world_process_zero
                and not self._disabled):
            self._save_label_tracker()

    # -- wiring --------------------------------------------------------------------------------------
    def _set_core(self, task: str, **detection: Any) -> None:
        """Record into a core of ``task``. The one made in ``__init__`` is a classification core that has
        written nothing yet (metadata is written with the first traces), so replacing it is free."""
        if task == self.task and detection.get("settings") == self.detection_settings:
            return  # resuming, or training again with the same settings: the same core
        self._handoff.flush()
        self.core.close()
        options = self.core_options
        if task == "detection":
            self.core = detection_core(self.model_name, self.version_name, store=self.store,
                                       **detection["settings"], flush_every=options["flush_every"],
                                       strict=options["strict"], max_feature_dim=options["max_feature_dim"],
                                       max_pending_batches=options["max_pending_batches"])
        else:
            self.core = classification_core(self.model_name, self.version_name, store=self.store, **options)
        self.task = task
        self.detection_settings = detection.get("settings")
        self._handoff = Handoff(self.core, 1 if self.strict else self.handoff_rows)

    def _use_detection(self, model: torch.nn.Module) -> bool:
        """Trace ``model`` as a detector: its family's decoder and a detection core. False when it cannot."""
        try:
            settings = hf_detr.detr_settings(model)
            score_thresh = float(_first(self.score_thresh, settings.get("score_thresh"), DEFAULT_SCORE_THRESH))
            max_detections = int(_first(self.max_detections_per_image, settings.get("max_detections"),
                                        DEFAULT_MAX_DETECTIONS))
            hf_detr.refuse_text_conditioned(model)
            self._decoder = hf_detr.DetrDecoder(model.config, score_thresh, max_detections)
        except (TypeError, ValueError, AttributeError) as exc:
            self._fail(f"{type(model).__name__} cannot be traced as a detector: {exc}", "detection_model",
                       disable=True)
            return False
        core_settings = {"num_classes": settings["num_classes"], "class_names": settings.get("class_names"),
                         "score_thresh": score_thresh, "iou_thresh": None, "max_detections": max_detections,
                         "architecture": f"hf.{type(model).__name__}"}
        self._set_core("detection", settings=core_settings)
        return True

    def _has_traces(self) -> bool:
        try:
            return any(p.ranks_committed for p in self.store.partitions(self.model_name, self.version_name))
        except Exception:  # noqa: BLE001 - only a hint
            return False

    def _trainer(self) -> Any:
        return None if self._trainer_ref is None else self._trainer_ref()

    def _attach(self, trainer: Any, late: bool = False) -> None:
        if self._trainer() is trainer:
            return
        mine = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, MLDebuggerCallback)]
        if sum(cb is self for cb in mine) > 1:
            self._warn_once("added_twice", "the same MLDebuggerCallback was added to the Trainer twice; its "
                                           "events are handled once")
        if mine and mine[0] is not self:
            self._warn_once("duplicate", "another MLDebuggerCallback is already attached to this Trainer; "
                                         "this one does nothing (add the callback once)")
            self._disabled = True
            return
        self._trainer_ref = weakref.ref(trainer)
        if trainer.model is not None:
            self._hook_model(trainer.model)
        self._wrap_collator(trainer, late)
        self._wrap_evaluation_loop(trainer)
        self._wrap_predict(trainer)

    def _hook_model(self, model: torch.nn.Module) -> None:
        """The pre-hook that takes BATCH_KEY out of forward's kwargs stays for the model's lifetime: a
        dataloader built while tracing (or its persistent workers) may still add the key later."""
        if model not in self._stripped:
            self._strip_handles.append(
                model.register_forward_pre_hook(self._before_forward, with_kwargs=True, prepend=True))
            self._stripped.add(model)

    def _remove_run_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._capture is not None:
            self._capture.remove()
            self._capture = None

    def _wrap_collator(self, trainer: Any, late: bool) -> None:
        if isinstance(trainer.data_collator, IdCollator):
            return
        strip: tuple = ()
        if self.id_columns and trainer.args.remove_unused_columns:
            # The Trainer keeps only columns named in model.forward's signature (plus labels). Adding the id
            # columns there keeps them up to our collator, which takes them out again (strip).
            try:
                trainer._set_signature_columns_if_needed()
                columns = trainer._signature_columns
            except Exception:  # noqa: BLE001 - a private API that may change
                columns = None
            if not isinstance(columns, list):
                self._warn_once("signature_columns", "this transformers version hides the Trainer's column "
                                "removal; the id column is dropped with remove_unused_columns=True, so samples "
                                "are identified by content hashes (set remove_unused_columns=False to keep ids)")
            else:
                strip = tuple(c for c in self.id_columns if c not in columns)
                # a new list: a dataloader built earlier (callback added late) keeps removing the id column,
                # since its collator would pass it on to forward() without our collator taking it out
                trainer._signature_columns = [*columns, *strip]
                self._added_columns = strip
        trainer.data_collator = IdCollator(trainer.data_collator, self.id_columns, strip)
        if late and self.id_columns and _has_id_column(trainer.train_dataset, self.id_columns):
            self._warn_once("late", "MLDebuggerCallback was added after the Trainer was created: the training "
                                    "dataloader of this run already drops the id column, so training samples "
                                    "are identified by content hashes. Pass it as Trainer(callbacks=[...]).")

    def _wrap_evaluation_loop(self, trainer: Any) -> None:
        """Know which evaluation runs (its metric_key_prefix) before its first forward: no callback event
        fires between the start of an evaluation and its first step."""
        original = trainer.evaluation_loop
        if getattr(original, "_mldbg_wrapped", False):
            return
        callback = weakref.ref(self)

        @functools.wraps(original)
        def evaluation_loop(*args: Any, **kwargs: Any) -> Any:
            owner = callback()
            if owner is None or not owner._active:
                return original(*args, **kwargs)
            prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
            with owner._evaluating(prefix):
                return original(*args, **kwargs)

        evaluation_loop._mldbg_wrapped = True
        trainer.evaluation_loop = evaluation_loop

    def _wrap_predict(self, trainer: Any) -> None:
        """Know that ``trainer.predict()`` runs: its forwards without labels are traced (no event marks it)."""
        original = trainer.predict
        if getattr(original, "_mldbg_wrapped", False):
            return
        callback = weakref.ref(self)

        @functools.wraps(original)
        def predict(*args: Any, **kwargs: Any) -> Any:
            owner = callback()
            if owner is None or owner._disabled or owner._closed:
                return original(*args, **kwargs)
            with owner._predicting(trainer):
                return original(*args, **kwargs)

        predict._mldbg_wrapped = True
        trainer.predict = predict

    @contextlib.contextmanager
    def _predicting(self, trainer: Any):
        """While ``trainer.predict()`` runs: forwards without labels are traced into ``predict_dataset_type``
        at the epoch of the weights used; outside ``train()`` with the run's hooks put on for the call, and
        durable when it returns."""
        model = trainer.model
        outside_training = not self._active
        if outside_training:
            if self.task != "classification" or hf_detr.is_hf_detector(model):
                self._warn_once("predict_detection", "predictions of detection models are not traced by the "
                                "callback; log them with InferenceLogger(task='object_detection')")
                yield
                return
            self._hook_model(model)
            self._capture = None if self.feature_layer is False else TorchFeatureCapture(model, self.feature_layer)
            self._handles = [model.register_forward_hook(self._after_forward, with_kwargs=True)]
        epoch = self._epoch if self._active and self._epoch is not None else _trained_epoch(trainer.state)
        previous, self._prediction = self._prediction, (self.predict_dataset_type, epoch)
        try:
            yield
        finally:
            self._prediction = previous
            if outside_training:
                self._remove_run_hooks()
                self._flush_handoff()
                try:
                    self.core.end_epoch(epoch)
                    self.core.wait_for_save()
                except MLDebuggerError as exc:
                    if self.strict:
                        raise
                    self._warn_once("predict_save", f"predictions could not all be saved: {exc}")

    @contextlib.contextmanager
    def _evaluating(self, metric_key_prefix: str):
        previous = self._eval_context
        self._eval_context = self._eval_decision(_dataset_name(metric_key_prefix))
        try:
            yield
        finally:
            self._flush_handoff()
            self._eval_context = previous

    def _eval_decision(self, dataset_type: str) -> Any:
        if self._epoch is None:
            return _SKIP  # eval_on_start: the model has not trained yet; epoch 0 gets the evaluation after it
        key = (dataset_type, self._epoch)
        if key in self._traced_evals:
            self._warn_once(f"eval_again_{dataset_type}",
                            f"{dataset_type} ran more than once in epoch {self._epoch}; only one evaluation per "
                            "epoch is traced (the rest are skipped)")
            return _SKIP
        if not self._epoch_done and self._later_evaluation_in_epoch():
            return _SKIP
        self._traced_evals.add(key)
        return dataset_type

    def _later_evaluation_in_epoch(self) -> bool:
        """With eval_strategy="steps": will another evaluation run before this epoch ends?"""
        trainer = self._trainer()
        if trainer is None or not self._updates_per_epoch:
            return False
        strategy = getattr(trainer.args.eval_strategy, "value", trainer.args.eval_strategy)
        state = trainer.state
        if strategy != "steps" or not state.eval_steps:
            return False
        eval_steps = int(state.eval_steps)
        end = (self._epoch + 1) * self._updates_per_epoch
        if state.max_steps and state.max_steps > 0:
            end = min(end, state.max_steps)
        if state.global_step >= end:
            return False
        following = (state.global_step // eval_steps + 1) * eval_steps
        return following <= end or end == state.max_steps  # the Trainer always evaluates at max_steps

    # -- hooks (training thread) --------------------------------------------------------------------
    def _before_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict):
        carried = kwargs.pop(BATCH_KEY, None)
        if self._active or self._prediction is not None:
            self._local.carried = carried
            if self._capture is not None:
                self._capture.pop()  # features of an earlier forward must not leak into this one
        return args, kwargs

    def _after_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        carried = getattr(self._local, "carried", None)
        self._local.carried = None
        features = None
        if self._capture is not None:
            features = self._capture.pop()
            self._capture.settle()
        dataset_type = self._dataset_type(module)
        if dataset_type is None:
            return
        try:
            self._trace(module, args, kwargs, output, carried, features, dataset_type)
        except Exception as exc:  # noqa: BLE001 - tracing must never break training (strict=False)
            if self.strict:
                raise
            reason = "invalid_batch" if isinstance(exc, TraceInputError) else "internal_error"
            message = str(exc) if isinstance(exc, MLDebuggerError) else f"{type(exc).__name__}: {exc}"
            self.core.skip(reason, _rows(output), message)

    def _dataset_type(self, module: torch.nn.Module) -> str | None:
        if self._prediction is not None and not self._active and not self._disabled:
            return self._prediction[0]  # _trace keeps only the forwards without labels
        if not self._active or self._disabled or (self._epoch is None and self._eval_context is None):
            return None
        if self._eval_context is not None:
            return None if self._eval_context is _SKIP else self._eval_context
        if module.training:
            return "train"
        # eval mode outside an evaluation we know of: without the Trainer's evaluation loop wrapped, an
        # eval-mode forward is the Trainer's evaluation; otherwise it is someone's own inference
        return "eval" if self._trainer() is None else None

    def _trace(self, module, args, kwargs, output, carried, features, dataset_type) -> None:
        if self.task == "detection":
            self._trace_detection(module, args, kwargs, output, carried, features, dataset_type)
            return
        if _get(output, "pred_boxes") is not None:
            self._fail(_detection_message(type(module).__name__), "detection_model", disable=True)
            return
        logits = _logits_of(output)
        if logits is None:
            self._fail(f"{type(module).__name__} returned {type(output).__name__} without logits; "
                       "MLDebuggerCallback traces classifiers whose output has .logits", "no_logits", disable=True)
            return
        if logits.ndim == 3:
            self._fail(f"{type(module).__name__} returned per-position logits of shape {tuple(logits.shape)} "
                       "(token classification or generation); MLDebuggerCallback traces one prediction per "
                       "sample (sequence or image classification)", "per_token_logits", disable=True)
            return
        labels = kwargs.get("labels")
        if labels is None and carried is not None:
            labels = carried.get("labels")  # compute_loss pops labels before forward for label smoothing
        epoch = self._epoch
        if labels is None:
            if self._prediction is None:
                self._skip_unlabelled(dataset_type, len(logits))
                return
            dataset_type, epoch = self._prediction  # trainer.predict() on data without labels: inference
        elif self._prediction is not None and not self._active:
            return  # labelled predictions outside train() are not traced, as evaluate() outside it
        ids = None if carried is None else carried.get("input_id")
        if ids is None:
            ids = next((kwargs[c] for c in self.id_columns if kwargs.get(c) is not None), None)  # forward takes it
        inputs = None if ids is not None else self._content(module, args, kwargs)
        self._handoff.add(logits.detach(), labels, ids, features, inputs, dataset_type, epoch)

    def _trace_detection(self, module, args, kwargs, output, carried, features, dataset_type) -> None:
        """One row per image: the family's decoded detections and the Hugging Face labels, in pixels."""
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None and args and isinstance(args[0], torch.Tensor):
            pixel_values = args[0]
        labels = kwargs.get("labels")
        if labels is None and carried is not None:
            labels = carried.get("labels")
        if labels is None:
            self._skip_unlabelled(dataset_type, _rows(output))
            return
        sizes = hf_detr.canvas_sizes(pixel_values, kwargs.get("pixel_mask"))
        detections = self._decoder(output, sizes)
        targets = hf_detr.ground_truth_xyxy(labels, sizes.scale)
        if self.feature_layer is False:
            features = None
        elif self._capture is not None:
            features = hf_detr.pooled_features(features)
        else:
            features = hf_detr.query_mean(output)
        ids = None if carried is None else carried.get("input_id")
        if ids is None:
            ids = next((kwargs[c] for c in self.id_columns if kwargs.get(c) is not None), None)
        self.core.record(detections, targets, input_ids=ids, dataset_type=dataset_type, n_epoch=self._epoch,
                         features=features, inputs=pixel_values if ids is None else None)

    def _content(self, module, args, kwargs) -> Any:
        """What identifies a sample without an id column: its tokens without padding, else its input."""
        input_ids = kwargs.get("input_ids")
        if input_ids is None and args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
            input_ids = args[0]
        if isinstance(input_ids, torch.Tensor):
            mask = kwargs.get("attention_mask")
            if mask is None:
                pad = getattr(getattr(module, "config", None), "pad_token_id", None)
                mask = None if pad is None else input_ids != pad
            return token_fingerprint(input_ids, mask)
        names = (getattr(module, "main_input_name", None), "pixel_values", "input_values", "input_features",
                 "inputs_embeds")
        for name in names:
            if name and isinstance(kwargs.get(name), torch.Tensor):
                return kwargs[name]
        if args and isinstance(args[0], torch.Tensor):
            return args[0]
        raise TraceInputError("the forward call has no input_ids or pixel_values to identify samples by; add an "
                              f"id column ({' or '.join(self.id_columns) or 'id_column='}) to the dataset")

    # -- failure policy ----------------------------------------------------------------------------
    def _flush_handoff(self) -> None:
        try:
            self._handoff.flush()
        except Exception as exc:  # noqa: BLE001 - e.g. the tracing worker died: training goes on
            if self.strict:
                raise
            self._warn_once("handoff", f"traces could not be handed to the tracing core: {type(exc).__name__}: {exc}")

    def _skip_unlabelled(self, dataset_type: str, rows: int) -> None:
        message = (f"a {dataset_type} forward call (epoch {self._epoch}) had no labels=, so its samples are "
                   "not traced; give the dataset a 'label'/'labels' column (or set TrainingArguments"
                   "(label_names=[...]) for another name)")
        if self.strict:
            raise TraceInputError(message)
        self.core.skip("missing_labels", rows, message)

    def _fail(self, message: str, reason: str, disable: bool = False) -> None:
        """A model this callback cannot trace: raise (strict) or warn once and stop tracing."""
        if self.strict:
            raise TraceInputError(message)
        if disable:
            self._disabled = True
            message += "; MLDebuggerCallback traces nothing for this model, training goes on"
        self._warn_once(reason, message)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"mldbg-callbacks: {message}", TraceWarning, stacklevel=3)

    def _save_label_tracker(self) -> None:
        try:
            from mldbg_callbacks.evaluation.label_tracker import save_label_tracker_plot

            self.label_tracker_path = save_label_tracker_plot(self.store, self.model_name, self.version_name)
        except ImportError as exc:
            self._warn_once("plot", f"the LabelTracker PNG needs matplotlib ({exc}); pip install matplotlib, or "
                                    "pass label_tracker_plot=False")
        except Exception as exc:  # noqa: BLE001 - a plot must not fail a finished training
            self._warn_once("plot", f"the LabelTracker PNG was not saved: {type(exc).__name__}: {exc}")


class Handoff:
    """Collects consecutive traced batches and passes them to ``core.record`` as one, ``rows`` at a time.

    Only references are kept (detached tensors; no copy until the concatenation at hand-over). A batch
    whose parts disagree on their row counts, or that differs in kind from the collected ones (another
    dataset or epoch, ids vs content, feature width, ...), is never merged: the collected ones go first,
    and a malformed batch goes alone, so the core reports it and the rows of good batches stay aligned.
    """

    def __init__(self, core: Any, rows: int):
        self.core = core
        self.rows = rows
        self._lock = threading.Lock()  # DataParallel runs forward hooks on several threads
        self._batches: list = []
        self._key: Any = None
        self._count = 0

    def add(self, logits, labels, ids, features, inputs, dataset_type: str, n_epoch: int) -> None:
        key = _merge_key(logits, labels, ids, features, inputs, dataset_type, n_epoch) if self.rows > 1 else None
        with self._lock:
            if key is None or key != self._key:
                self._flush_locked()
            if key is None:
                self.core.record(logits, labels, input_ids=ids, dataset_type=dataset_type, n_epoch=n_epoch,
                                 features=features, inputs=inputs)
                return
            self._key = key
            self._batches.append((logits, labels, ids, features, inputs))
            self._count += len(logits)
            if self._count >= self.rows:
                self._flush_locked()

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        batches, key = self._batches, self._key
        self._batches, self._key, self._count = [], None, 0
        if not batches:
            return
        dataset_type, n_epoch = key[0], key[1]
        merged = [batches[0]] if len(batches) == 1 else None
        if merged is None:
            try:
                merged = [tuple(_concat([batch[i] for batch in batches]) for i in range(5))]
            except Exception:  # noqa: BLE001 - e.g. devices differ: hand them over one by one
                merged = batches
        for logits, labels, ids, features, inputs in merged:
            self.core.record(logits, labels, input_ids=ids, dataset_type=dataset_type, n_epoch=n_epoch,
                             features=features, inputs=inputs)


def _merge_key(logits, labels, ids, features, inputs, dataset_type, n_epoch) -> tuple | None:
    """What batches must share to be concatenated; None for a batch that must go alone."""
    if not isinstance(logits, torch.Tensor) or logits.ndim == 0:
        return None
    rows = logits.shape[0]
    parts = []
    for value in (labels, ids, features, inputs):
        if value is None:
            parts.append(None)
        elif isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == rows:
            parts.append(("tensor", tuple(value.shape[1:]), value.dtype, value.device))
        elif isinstance(value, list) and len(value) == rows:
            parts.append("list")
        else:
            return None  # the core validates it alone and reports what is wrong
    return (dataset_type, n_epoch, tuple(logits.shape[1:]), logits.dtype, logits.device, *parts)


def _concat(values: list) -> Any:
    if values[0] is None:
        return None
    if isinstance(values[0], list):
        return [item for value in values for item in value]
    return torch.cat(values)


class IdCollator:
    """Wraps the Trainer's data collator: takes the id column out of each feature dict (when the Trainer
    would have removed it) and adds ``batch[BATCH_KEY] = {"input_id": ..., "labels": ...}``.

    Picklable (no reference to the callback), so it also runs in dataloader worker processes.
    """

    def __init__(self, collator: Any, id_columns: Sequence[str], strip: Sequence[str] = ()):
        self.collator = collator
        self.id_columns = tuple(id_columns)
        self.strip = frozenset(strip)

    def __call__(self, features: list) -> Any:
        ids = None
        if features and isinstance(features[0], Mapping):
            column = next((c for c in self.id_columns if c in features[0]), None)
            if column is not None:
                ids = _id_batch([feature.get(column) for feature in features])
            if self.strip:
                features = [{k: v for k, v in feature.items() if k not in self.strip} for feature in features]
        batch = self.collator(features)
        if isinstance(batch, MutableMapping):
            labels = next((batch[k] for k in ("labels", "label", "label_ids") if batch.get(k) is not None), None)
            batch[BATCH_KEY] = {"input_id": ids, "labels": labels}
        return batch

    def __getattr__(self, name: str) -> Any:  # trainer.data_collator.tokenizer etc. keep working
        if name == "collator":
            raise AttributeError(name)
        return getattr(self.collator, name)


# -- content hash of token ids ------------------------------------------------------------------------
_PRIMES = (2147483647, 2147483629, 2147483587, 2147483579)
_BASES = (1000003, 911382323, 972663749, 1234567891)
_POWERS: dict = {}


def _powers(length: int, device: torch.device) -> torch.Tensor:
    """(n, 4) int64: base_k ** position mod prime_k, for positions 0 .. n-1 (n >= length, cached)."""
    cached = _POWERS.get(device)
    if cached is None or len(cached) < length:
        n = 1 << max(6, (length - 1).bit_length())
        table = np.empty((n, len(_PRIMES)), dtype=np.int64)
        for k, (base, prime) in enumerate(zip(_BASES, _PRIMES)):
            value = 1
            for i in range(n):
                table[i, k] = value
                value = value * base % prime
        cached = _POWERS[device] = torch.from_numpy(table).to(device)
    return cached


def token_fingerprint(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """A ``(batch, 5)`` int64 tensor that depends only on each row's unpadded tokens, in order.

    Four polynomial hashes modulo 31-bit primes (~124 bits) of the tokens where ``attention_mask`` is 1,
    indexed by their position among those tokens (so left and right padding and any padded length give
    the same value), plus the number of tokens. Computed on the tensors' device without a sync; the
    tracing core turns each row into a hex id on its worker thread.
    """
    tokens = input_ids.reshape(len(input_ids), -1).long()
    mask = (torch.ones_like(tokens, dtype=torch.bool) if attention_mask is None
            else attention_mask.reshape(len(tokens), -1).bool())
    position = mask.long().cumsum(1).sub_(1).clamp_(min=0)
    primes = torch.tensor(_PRIMES, dtype=torch.int64, device=tokens.device)
    terms = ((tokens + 1) % primes[0]).unsqueeze(-1) * _powers(tokens.shape[1], tokens.device)[position]
    terms = (terms % primes) * mask.unsqueeze(-1)  # each term < 2**31: the sum cannot overflow int64
    hashes = terms.sum(dim=1) % primes
    return torch.cat([hashes, mask.sum(dim=1, keepdim=True)], dim=1)


# -- helpers ------------------------------------------------------------------------------------------
def _find_trainer(callback: MLDebuggerCallback) -> Any:
    """The Trainer whose callback handler holds ``callback``: found on the call stack of the event (Trainer
    events pass the model, dataloaders and optimizer, but not the Trainer)."""
    trainer_class = getattr(sys.modules.get("transformers"), "Trainer", None)
    if trainer_class is None:
        return None
    frame = sys._getframe(1)
    try:
        for _ in range(40):
            if frame is None:
                return None
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, trainer_class):
                callbacks = getattr(getattr(candidate, "callback_handler", None), "callbacks", ())
                if any(cb is callback for cb in callbacks):
                    return candidate
            frame = frame.f_back
        return None
    finally:
        del frame


def _trained_epoch(state: Any) -> int:
    """The epoch whose weights the model has after ``train()``: the last one begun (0 before any)."""
    return max(math.ceil((state.epoch or 0) - 1e-9) - 1, 0)


def _barrier() -> None:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _id_batch(values: list) -> Any:
    """Ids of one batch: an int64 tensor when every id is an integer, else a list of strings; None when a
    sample has no id (that batch is then identified by content)."""
    if any(v is None for v in values):
        return None
    values = [_scalar(v) for v in values]
    if all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in values):
        return torch.tensor([int(v) for v in values], dtype=torch.int64)
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _scalar(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, (np.ndarray, np.generic)) and value.size == 1:
        return value.item()
    return value


def _rows(output: Any) -> int:
    logits = _logits_of(output)
    return int(logits.shape[0]) if isinstance(logits, torch.Tensor) and logits.ndim else 0


def _has_id_column(dataset: Any, id_columns: Sequence[str]) -> bool:
    names = getattr(dataset, "column_names", None)
    if names is None:
        try:
            first = dataset[0]
        except Exception:  # noqa: BLE001
            return False
        names = first.keys() if isinstance(first, Mapping) else ()
    return any(c in names for c in id_columns)


def _get(output: Any, name: str) -> Any:
    if isinstance(output, Mapping):
        return output.get(name)
    return getattr(output, name, None)


def _logits_of(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output
    logits = _get(output, "logits")
    if logits is not None:
        return logits
    if isinstance(output, (tuple, list)):  # return_dict=False: (loss, logits, ...) with labels, else (logits, ...)
        return next((item for item in output if isinstance(item, torch.Tensor) and item.ndim >= 1), None)
    return None


def _dataset_name(metric_key_prefix: str) -> str:
    try:
        return validate_name(metric_key_prefix, "dataset_type")
    except MLDebuggerError:
        cleaned = re.sub(r"[^A-Za-z0-9_.\-+@]", "_", str(metric_key_prefix)).replace("..", "_").lstrip("._-+@")
        return cleaned[:128] or "eval"


def _detection_message(class_name: str) -> str:
    return (f"{class_name} is an object detection model (its outputs have pred_boxes); MLDebuggerCallback traces "
            "classifiers and transformers *ForObjectDetection models (recognised by their class, so not inside "
            "a wrapper module, and not segmentation heads). Trace other detectors with the detection adapters: "
            "ObjectDetectionTracer (mldbg_callbacks.training) in your own loop")


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)

