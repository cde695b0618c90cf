"""PyTorch Lightning: ``MLDebuggerCallback`` traces every sample of the train, validation, test and predict loops.

Example::

    import lightning.pytorch as pl
    from mldbg_callbacks.integrations.lightning import MLDebuggerCallback
    from mldbg_callbacks.evaluator import Evaluator

    trainer = pl.Trainer(max_epochs=5, callbacks=[MLDebuggerCallback(model_name="digits_mlp", version_name="v1")])
    trainer.fit(model, train_loader, val_loader)      # batches: (x, y) or (x, y, ids) or dicts
    print(Evaluator("digits_mlp", "v1").request_evaluation().metrics_summary())
    trainer.predict(model, new_data_loader)          # inference: traced without labels into "operation"


Where each piece comes from:

- *epoch*: ``trainer.current_epoch`` during ``fit``; a standalone ``trainer.validate()`` /
  ``trainer.test()`` / ``trainer.predict()`` records at the epoch whose weights it uses (``current_epoch - 1``
  after a fit, else 0). The sanity-check validation and validations in the middle of a training epoch
  (``val_check_interval < 1``) are not traced.
- *dataset_type*: the loop, ``"train"``, ``"val"``, ``"test"``, and ``"operation"`` for ``predict``
  (rename with ``dataset_types=``, e.g. ``{"predict": "pool"}``; a
  second validation or test dataloader ``k`` becomes ``"<name>_<k>"``); ``mode=`` filters loops like
  LabelTracker's ``mode`` (``"train"``, ``["train", "val"]``, ``"!test"``, ``"!predict"``).
- *scores*: the step's returned dict (keys ``logits_key=``, default ``"logits"`` then ``"preds"``) or
  a tensor it returns; when the step returns only a loss, the output of the LightningModule's
  forward (or of the submodule named by ``output_module=``) during that step, via a forward hook.
- *labels and ids*: from the batch: a tuple ``(x, y)`` / ``(x, y, ids)``, a dict with common keys
  (inputs ``x``/``input``/``inputs``/``image``/``images``/``pixel_values``/``input_ids``, labels
  ``y``/``label``/``labels``/``target``/``targets``, sample ids ``id``/``ids``/``idx``/``index``/
  ``indices``/``sample_id``/``sample_ids``/``input_id``), or ``batch_fn(batch) -> (inputs, labels[, ids])``.
  Without ids the content hash of each input is its id (pass ids when inputs are augmented randomly).
- *inference* (``trainer.predict``): labels are optional; batches without them (``x`` alone, ``(x,)``, a
  dict without a label key) are traced with ``label`` null and a ``logged_at`` time, for the label-free
  evaluation (``result.unlabelled()``, ``docs/operation.md``). Batches with labels (e.g. the test loader)
  are traced with them. A pair ``(x, second)`` is ``(x, y)`` as in every loop, unless ``second`` is a
  list of strings (ids: class indices are never strings); a float ``second`` is neither and is refused
  (skipped with a warning, ``strict=True`` raises). Integer ids without labels: a dict ``{"x": x,
  "id": ids}`` or ``batch_fn=lambda b: (b[0], None, b[1])``. The traces are durable when
  ``trainer.predict`` returns.
- *features*: the input of the last ``nn.Linear`` run in the step (``feature_layer=`` as for
  ClassificationTracer).

Distributed training: every rank traces its own shard into ``rank=<r>``; nothing is gathered during
training (one barrier at the end of ``fit``, so rank 0 draws the LabelTracker graph from every rank's
traces). The padding a DistributedSampler adds repeats samples another rank traced; the evaluator keeps
one row per sample id (the lowest rank's), so ids must identify samples, not batch positions.

Resume: Lightning restores ``current_epoch``, so a run resumed from an end-of-epoch checkpoint traces
the next epoch and no epoch twice. The callback's ``state_dict`` (saved in checkpoints) names the run
(a resumed run whose version name the environment switch generated continues in the checkpoint's
version) and the epochs already traced. Resumed from an earlier checkpoint, an epoch runs again and is
traced again (with a warning): the evaluator keeps the newest rows of each sample, i.e. those of the
run that produced the final weights.

Switching the callback on without code changes (entry point ``lightning.pytorch.callbacks_factory``,
read by every ``Trainer`` of the process):

- ``MLDBG_LIGHTNING=1``: add the callback to every Trainer.
- ``MLDBG_MODEL_NAME``: default: the LightningModule's class name.
- ``MLDBG_VERSION_NAME``: default: ``run-<UTC time>``, chosen per Trainer and handed to the DDP ranks
  Lightning starts itself; set it explicitly under torchrun/SLURM (independently started ranks cannot
  agree on a generated name) and to resume into the same version.
- ``MLDBG_MODE``: the ``mode=`` filter, e.g. ``!test``.  ``MLDBG_STRICT=1``: ``strict=True``.
- ``MLD_HOME``: the store directory, as for every tracer.

Failure policy as for every tracer: with ``strict=False`` (default) a batch that cannot be traced is
skipped with one warning per reason and counted in ``callback.stats``; ``strict=True`` raises a
``TraceInputError`` naming the option to set.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import os
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

try:
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import Callback
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("mldbg_callbacks.integrations.lightning needs PyTorch Lightning 2.x "
                      "(`import lightning.pytorch`): pip install 'mldbg-callbacks[lightning]'") from exc

from mldbg_callbacks.errors import MLDebuggerError, TraceInputError

__all__ = ["MLDebuggerCallback", "callbacks_factory"]

LOOPS = ("train", "val", "test", "predict")
MODE_ALIASES = {"eval": "val", "valid": "val", "validation": "val", "validate": "val", "fit": "train",
                "training": "train", "testing": "test", "predicting": "predict", "inference": "predict"}
# What each loop is stored as unless dataset_types= renames it: predictions without labels are operation data.
DEFAULT_DATASET_TYPES = {"train": "train", "val": "val", "test": "test", "predict": "operation"}
INPUT_KEYS = ("x", "input", "inputs", "image", "images", "pixel_values", "input_ids")
LABEL_KEYS = ("y", "label", "labels", "target", "targets")
ID_KEYS = ("id", "ids", "idx", "index", "indices", "sample_id", "sample_ids", "input_id")
DETECTION_KEYS = ("boxes", "bboxes", "pred_boxes")

ENV_ENABLE = "MLDBG_LIGHTNING"
ENV_MODEL_NAME = "MLDBG_MODEL_NAME"
ENV_VERSION_NAME = "MLDBG_VERSION_NAME"
ENV_MODE = "MLDBG_MODE"
ENV_STRICT = "MLDBG_STRICT"
# A version name generated by the factory, exported so the DDP ranks Lightning re-executes use it too.
ENV_GENERATED_VERSION = "MLDBG_GENERATED_VERSION_NAME"

# state_key -> the live callback holding it: a second callback in the same Trainer needs its own key,
# or Lightning refuses two stateful callbacks of one type before any hook could warn about it.
_STATE_KEY_HOLDERS: "weakref.WeakValueDictionary[str, MLDebuggerCallback]" = weakref.WeakValueDictionary()


class MLDebuggerCallback(Callback):
    """Trace per-sample predictions, labels and penultimate features of a LightningModule classifier.

    Example::

        trainer = pl.Trainer(max_epochs=5, callbacks=[MLDebuggerCallback(model_name="resnet18", version_name="v1")])
        trainer.fit(model, train_loader, val_loader)

    Args:
        model_name: identifies the model in the store; ``None``: the LightningModule's class name.
        version_name: identifies the run (letters, digits, ``_ . - + @``).
        store: a directory, a ``LocalStore`` or ``None`` (MLD_API_ENDPOINT, else MLD_HOME, else ``./mldbg``).
        mode: which loops to trace: ``None`` (all), ``"train"``, ``["train", "val"]``, ``"!test"``,
            ``"!predict"`` (``trainer.predict``, traced without labels: see the module docstring).
        dataset_types: names stored for the loops, e.g. ``{"val": "validation"}``, ``{"predict": "pool"}``
            (default ``"operation"``); a list gives one name per validation/test/predict dataloader.
        logits_key: key(s) of the step's returned dict holding the class scores.
        output_module: name of the submodule whose output is the class scores (default: the
            LightningModule's forward), used when the step returns no scores.
        batch_fn: ``batch -> (inputs, labels)`` or ``(inputs, labels, ids)`` for batches of other shapes
            (labels may be ``None`` in predict batches).
        feature_layer: ``None`` = input of the last Linear; a submodule name = its output; ``False`` = none.
        label_tracker_plot: save the per-label loss graph (PNG next to the run) at the end of ``fit``
            (rank 0, needs matplotlib).
        flush_every, strict, output_kind, max_stored_classes, top_k, max_feature_dim,
            max_pending_batches: as for ClassificationTracer.
    """

    def __init__(self, model_name: str | None, version_name: str, *, store: Any = None,
                 mode: str | Iterable[str] | None = None,
                 dataset_types: Mapping[str, str | Sequence[str]] | None = None,
                 logits_key: str | Sequence[str] = ("logits", "preds"), output_module: str | None = None,
                 batch_fn: Callable[[Any], tuple] | None = None, feature_layer: Any = None,
                 label_tracker_plot: bool = True, flush_every: int = 1, strict: bool = False,
                 output_kind: str = "auto", max_stored_classes: int = 128, top_k: int = 32,
                 max_feature_dim: int = 1024, max_pending_batches: int = 32):
        from mldbg_callbacks.store import resolve_store
        from mldbg_callbacks.store.names import validate_name

        self.model_name = None if model_name is None else validate_name(model_name, "model_name")
        self.version_name = validate_name(version_name, "version_name")
        self.store = resolve_store(store)
        self.loops = _parse_mode(mode, dataset_types)
        self.dataset_types = _dataset_names(dataset_types)
        for names in self.dataset_types.values():
            for name in names:
                validate_name(name, "dataset_types")
        self.logits_keys = (logits_key,) if isinstance(logits_key, str) else tuple(logits_key)
        self.output_module = output_module
        self.batch_fn = batch_fn
        self.feature_layer = feature_layer
        self.label_tracker_plot = label_tracker_plot
        self.strict = strict
        self._core_options = dict(flush_every=flush_every, strict=strict, output_kind=output_kind,
                                  max_stored_classes=max_stored_classes, top_k=top_k,
                                  max_feature_dim=max_feature_dim, max_pending_batches=max_pending_batches)
        self._version_generated = False  # set by the factory: a resumed run adopts the checkpoint's name
        self._state_key: str | None = None
        self.core = None  # the TraceCore, created at the first traced batch (after a resume renamed the run)
        self._active = True
        self._traced: dict[str, set[int]] = {}  # epochs whose end was declared to the core
        self._open: set[tuple[str, int]] = set()  # partitions recorded since the last end_epoch
        self._epoch: dict[str, int | None] = {}
        self._warned: set[str] = set()
        self._capture = None
        self._output_hooks: list = []
        self._hook_output: Any = None
        self._hook_depth = 0  # nesting depth of the forward whose output _hook_output is
        self._forward_depth = 0

    # -- Lightning's state --------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        if self._state_key is None:
            base = key = type(self).__qualname__
            n = 1
            while (holder := _STATE_KEY_HOLDERS.get(key)) is not None and holder is not self:
                n += 1
                key = f"{base}#{n}"
            _STATE_KEY_HOLDERS[key] = self
            self._state_key = key
        return self._state_key

    def _release_state_key(self) -> None:
        # After a run the key is free again: the callback of the next (resumed) Trainer gets the plain
        # key under which this one's state sits in the checkpoint.
        if self._state_key is not None and _STATE_KEY_HOLDERS.get(self._state_key) is self:
            del _STATE_KEY_HOLDERS[self._state_key]
        self._state_key = None

    def state_dict(self) -> dict[str, Any]:
        if not self._active:
            return {}
        return {"model_name": self.model_name, "version_name": self.version_name,
                "traced_epochs": {name: sorted(epochs) for name, epochs in self._traced.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self._version_generated and self.core is None:  # the factory's default name: resume the run
            self.model_name = state_dict.get("model_name") or self.model_name
            self.version_name = state_dict.get("version_name") or self.version_name
        if (state_dict.get("model_name"), state_dict.get("version_name")) != (self.model_name, self.version_name):
            return  # traces go to another run now: what the old one traced does not matter
        for name, epochs in state_dict.get("traced_epochs", {}).items():
            self._traced.setdefault(name, set()).update(int(e) for e in epochs)

    def __getstate__(self) -> dict:
        # ddp_spawn pickles callbacks: hook handles do not pickle and belong to this process's model.
        state = self.__dict__.copy()
        state.update(_capture=None, _output_hooks=[], _hook_output=None)
        return state

    # -- set-up and tear-down -----------------------------------------------------------------
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        first = next(cb for cb in trainer.callbacks if isinstance(cb, MLDebuggerCallback))
        self._active = first is self
        if not self._active:
            message = ("MLDebuggerCallback was added to this Trainer more than once (e.g. passed in callbacks= "
                       f"and switched on with {ENV_ENABLE}=1); the first one traces, this one does nothing. "
                       "Remove one of them.")
            if self.strict:
                raise MLDebuggerError(message)
            self._warn_once("added_twice", message)
            return
        if self.model_name is None:
            from mldbg_callbacks.store.names import validate_name

            self.model_name = validate_name(type(pl_module).__name__, "model_name")
        self._attach_hooks(pl_module)

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._release_state_key()
        if not self._active:
            return
        self._detach_hooks()
        if self.core is not None:
            try:
                self.core.close()  # everything buffered becomes durable; the worker stops until next time
            except Exception as exc:  # noqa: BLE001
                self._report_save_failure(exc)

    def _attach_hooks(self, pl_module: "pl.LightningModule") -> None:
        from mldbg_callbacks.integrations.torch_model import TorchFeatureCapture

        self._detach_hooks()
        self._capture = TorchFeatureCapture(pl_module, self.feature_layer)
        if self.output_module is None:
            target = pl_module
        else:
            try:
                target = pl_module.get_submodule(self.output_module)
            except AttributeError:
                names = [name for name, _ in pl_module.named_modules() if name]
                raise ValueError(f"output_module={self.output_module!r} is not a submodule of "
                                 f"{type(pl_module).__name__}; some names: {names[:8]}") from None
        self._output_hooks = [target.register_forward_pre_hook(self._enter_forward),
                              target.register_forward_hook(self._keep_output)]

    def _detach_hooks(self) -> None:
        if self._capture is not None:
            self._capture.remove()
            self._capture = None
        for handle in self._output_hooks:
            handle.remove()
        self._output_hooks = []
        self._hook_output = None

    def _enter_forward(self, module: torch.nn.Module, inputs: tuple) -> None:
        self._forward_depth += 1

    def _keep_output(self, module: torch.nn.Module, inputs: tuple, output: Any) -> None:
        # Keep the innermost call's output: under DDP, Lightning runs the whole step as a call of the
        # module (forward redirected to training_step), which wraps the step's own self(x).
        depth, self._forward_depth = self._forward_depth, max(self._forward_depth - 1, 0)
        if depth >= self._hook_depth:
            self._hook_output, self._hook_depth = output, depth  # a reference; detached when traced

    # -- epochs -------------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._begin("train", trainer)

    def on_validation_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._begin("val", trainer)

    def on_test_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._begin("test", trainer)

    def on_predict_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._begin("predict", trainer)

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # Lightning runs the epoch-end validation before this hook: train and val of the epoch are done.
        self._end(self._epoch.pop("train", None))

    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        epoch = self._epoch.pop("val", None)
        if not _fitting(trainer):  # during fit the training epoch's end closes it
            self._end(epoch)

    def on_test_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._end(self._epoch.pop("test", None))

    def on_predict_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._end(self._epoch.pop("predict", None))

    def on_predict_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # trainer.predict() returns with its traces durable: serving code may evaluate right after it
        if self._active and self.core is not None:
            try:
                self.core.wait_for_save()
            except Exception as exc:  # noqa: BLE001
                self._report_save_failure(exc)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self._active:
            return
        failure = None
        try:
            if self.core is not None:
                self.core.wait_for_save()
        except Exception as exc:  # noqa: BLE001 - reach the barrier on every rank whatever happened
            failure = exc
        if trainer.world_size > 1:  # rank 0's graph reads every rank's commits
            trainer.strategy.barrier("mldbg_traces_saved")
        if failure is not None:
            self._report_save_failure(failure)
        elif self.label_tracker_plot and trainer.is_global_zero and self._traced.get(self.dataset_types["train"][0]):
            self._save_label_tracker_plot()

    def _begin(self, loop: str, trainer: "pl.Trainer") -> None:
        self._epoch[loop] = None
        if not self._active or trainer.sanity_checking or loop not in self.loops:
            return
        if loop == "val" and _fitting(trainer):
            progress = getattr(getattr(trainer.fit_loop, "epoch_loop", None), "batch_progress", None)
            if progress is not None and not getattr(progress, "is_last_batch", True):
                self._warn_once("mid_epoch_validation",
                                f"validation ran in the middle of training epoch {trainer.current_epoch} "
                                "(val_check_interval < 1); only the validation at the end of a training epoch "
                                "is traced, so every traced epoch has one validation pass")
                return
        self._epoch[loop] = trainer.current_epoch if _fitting(trainer) else max(trainer.current_epoch - 1, 0)

    def _end(self, epoch: int | None) -> None:
        if epoch is None or self.core is None:
            return
        try:
            self.core.end_epoch(epoch)  # asynchronous: the worker commits while training goes on
        except Exception as exc:  # noqa: BLE001
            self._report_save_failure(exc)
        for name, n_epoch in [key for key in self._open if key[1] <= epoch]:
            self._traced.setdefault(name, set()).add(n_epoch)
            self._open.discard((name, n_epoch))

    # -- batches ------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        self._forget_latest()

    def on_validation_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        self._forget_latest()

    def on_test_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                            batch_idx: int, dataloader_idx: int = 0) -> None:
        self._forget_latest()

    def on_predict_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                               batch_idx: int, dataloader_idx: int = 0) -> None:
        self._forget_latest()

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        self._trace("train", pl_module, outputs, batch, 0)

    def on_validation_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._trace("val", pl_module, outputs, batch, dataloader_idx)

    def on_test_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any,
                          batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._trace("test", pl_module, outputs, batch, dataloader_idx)

    def on_predict_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any,
                             batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._trace("predict", pl_module, outputs, batch, dataloader_idx)

    def _forget_latest(self) -> None:
        # Outputs and features of a forward outside the step (or of the previous batch) must not be traced.
        self._hook_output, self._hook_depth, self._forward_depth = None, 0, 0
        if self._capture is not None:
            self._capture.pop()

    def _trace(self, loop: str, pl_module: "pl.LightningModule", outputs: Any, batch: Any,
               dataloader_idx: int) -> None:
        try:
            self._trace_batch(loop, pl_module, outputs, batch, dataloader_idx)
        finally:
            self._hook_output = None  # no reference to the step's output outlives the batch

    def _trace_batch(self, loop: str, pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                     dataloader_idx: int) -> None:
        epoch = self._epoch.get(loop)
        if epoch is None:
            return
        dataset_type = self._dataset_type(loop, dataloader_idx)
        if loop != "predict":  # predicting new data at the same weights again is no retrace
            self._notice_retrace(dataset_type, epoch)
        features = self._capture.pop() if self._capture is not None else None
        try:
            inputs, labels, ids = self._split_batch(batch, loop)
            scores = self._scores(loop, pl_module, outputs)
            if labels is None and loop != "predict":
                raise _Skip("no_labels", f"the {loop} batches carry no labels ({_describe(batch)}); the callback "
                            "traces the class index of every sample: return batches as (x, y[, ids]) or dicts "
                            f"with one of the keys {list(LABEL_KEYS)}, or pass batch_fn=lambda batch: "
                            "(inputs, labels, ids)")
            if ids is None and not _is_array(inputs):
                raise _Skip("no_ids", f"the {loop} batches carry no sample ids and no array inputs to hash "
                            f"({_describe(batch)}); return ids in the batch ((x, y, ids), or a dict with one of "
                            f"the keys {list(ID_KEYS)}) or pass batch_fn=lambda batch: (inputs, labels, ids)")
        except _Skip as skip:
            self._skip(skip.reason, _rows(outputs, batch), skip.message)
            return
        except Exception as exc:  # noqa: BLE001 - a user's batch can fail in any way; never break training
            if self.strict:
                raise
            self._skip("invalid_batch", _rows(outputs, batch), f"{type(exc).__name__}: {exc}")
            return
        if self._capture is not None and features is not None:
            self._capture.settle()  # from now on only the last Linear of a forward keeps a hook
        try:
            self._ensure_core().record(scores, labels, input_ids=ids, dataset_type=dataset_type, n_epoch=epoch,
                                       features=features, inputs=inputs if ids is None else None)
        except Exception as exc:  # noqa: BLE001 - e.g. a dead writer thread: training goes on unless strict
            if self.strict:
                raise
            self._skip("record_failed", _rows(outputs, batch), f"{type(exc).__name__}: {exc}")
            return
        self._open.add((dataset_type, epoch))

    def _dataset_type(self, loop: str, dataloader_idx: int) -> str:
        names = self.dataset_types[loop]
        if dataloader_idx < len(names):
            return names[dataloader_idx]
        return f"{names[0]}_{dataloader_idx}"

    def _notice_retrace(self, dataset_type: str, epoch: int) -> None:
        if (dataset_type, epoch) in self._open or epoch not in self._traced.get(dataset_type, ()):
            return
        self._warn_once(f"traced_again:{dataset_type}:{epoch}",
                        f"{dataset_type} epoch {epoch} of {self.model_name}/{self.version_name} was traced before "
                        "(e.g. resumed from an earlier checkpoint); it is traced again and the evaluator keeps the "
                        "newest rows of each sample. To keep both runs apart, pass a new version_name")

    def _ensure_core(self):
        if self.core is None:
            from mldbg_callbacks.training import classification_core

            self.core = classification_core(self.model_name, self.version_name, store=self.store,
                                            **self._core_options)
        return self.core

    # -- what a batch holds -------------------------------------------------------------------
    def _split_batch(self, batch: Any, loop: str) -> tuple[Any, Any, Any]:
        """(inputs, labels, ids) of a batch; labels and ids may be None.

        A pair ``(x, second)`` is ``(x, y)`` in every loop, so ``trainer.predict`` accepts the val/test
        dataloaders. In predict batches, which usually have no labels, a list of strings as ``second`` is
        ids (class indices are never strings) and a float tensor is refused: it is neither labels nor ids.
        Integer ids without labels need a dict (``{"x": x, "id": ids}``) or ``batch_fn``."""
        if self.batch_fn is not None:
            parts = self.batch_fn(batch)
            if not isinstance(parts, (tuple, list)) or len(parts) not in (2, 3):
                raise TraceInputError(f"batch_fn must return (inputs, labels) or (inputs, labels, ids), got "
                                      f"{_describe(parts)}")
            inputs, labels, ids = (*parts, None) if len(parts) == 2 else parts
            return inputs, labels, ids
        if isinstance(batch, Mapping):
            return (_first_key(batch, INPUT_KEYS), _first_key(batch, LABEL_KEYS), _first_key(batch, ID_KEYS))
        if isinstance(batch, (tuple, list)):
            if len(batch) == 1:
                return batch[0], None, None
            if len(batch) == 2:
                if loop == "predict":
                    return _predict_pair(batch)
                return batch[0], batch[1], None
            if len(batch) == 3:
                ids = batch[2]
                if isinstance(ids, torch.Tensor) and ids.is_floating_point():
                    raise TraceInputError("the third element of the batch is a float tensor, not sample ids; "
                                          "ids must be ints or strings: pass batch_fn=lambda batch: "
                                          "(inputs, labels, ids)")
                return batch[0], batch[1], ids
            raise TraceInputError(f"a batch of {len(batch)} elements has no known layout; pass "
                                  "batch_fn=lambda batch: (inputs, labels, ids)")
        return batch, None, None

    def _scores(self, loop: str, pl_module: "pl.LightningModule", outputs: Any) -> Any:
        """The class scores of the batch: from the step's output, else from the forward hook."""
        notes = []
        if isinstance(outputs, Mapping):
            for key in self.logits_keys:
                if key in outputs:
                    if _is_scores(outputs[key]):
                        return outputs[key]
                    notes.append(f"its {key!r} holds {_describe(outputs[key])}, not float class scores")
        elif _is_scores(outputs) and outputs.ndim >= 1:
            return outputs
        elif _is_scores(getattr(outputs, "logits", None)):
            return outputs.logits
        for value in (outputs, self._hook_output):
            if _looks_like_detection(value):
                raise _Skip("detection_outputs",
                            f"the {loop} outputs look like object detections ({_describe(value)}); "
                            "MLDebuggerCallback traces classifiers. Trace detection models with the detection "
                            "adapters (mldbg_callbacks.training.ObjectDetectionTracer)")
        hooked = self._hook_output
        if hooked is not None:
            from mldbg_callbacks.training import scores_of

            scores = scores_of(hooked)
            if _is_scores(scores):
                return scores
            notes.append(f"the forward of {self._output_name(pl_module)} returned {_describe(hooked)}")
        else:
            notes.append(f"no forward of {self._output_name(pl_module)} ran during the step")
        raise _Skip("no_logits",
                    f"the {loop} step returned {_describe(outputs)} with no class scores ({'; '.join(notes)}). "
                    f"Return them from the step, e.g. {{'loss': loss, 'logits': logits}}, name the key with "
                    f"logits_key='<key>' (now {list(self.logits_keys)}), or name the submodule that computes "
                    "them with output_module='<submodule name>'")

    def _output_name(self, pl_module: "pl.LightningModule") -> str:
        return (f"submodule {self.output_module!r}" if self.output_module else type(pl_module).__name__)

    # -- reporting ----------------------------------------------------------------------------
    @property
    def stats(self):
        """Counters: rows received, written, skipped by reason (the callback's own refusals included)."""
        from mldbg_callbacks.core.trace_core import TraceStats

        return self.core.stats if self.core is not None else TraceStats()

    def wait_for_save(self, timeout_s: float | None = None):
        """Block until everything traced so far is durable; raise if a write failed."""
        if self.core is None:
            return self.stats
        self.core.wait_for_save(timeout_s=timeout_s)
        return self.stats

    def _skip(self, reason: str, rows: int, message: str) -> None:
        if self.strict:
            raise TraceInputError(message)
        self._ensure_core().skip(reason, rows, message)  # counted in stats, warned about once per reason

    def _warn_once(self, reason: str, message: str) -> None:
        if reason in self._warned:
            return
        self._warned.add(reason)
        from mldbg_callbacks.core.trace_core import TraceWarning

        warnings.warn(message, TraceWarning, stacklevel=3)

    def _report_save_failure(self, exc: BaseException) -> None:
        if self.strict:
            raise exc
        self._warn_once("save_failed", f"mldbg-callbacks could not save traces: {exc}")

    def _save_label_tracker_plot(self) -> None:
        if importlib.util.find_spec("matplotlib") is None:
            return
        from mldbg_callbacks.evaluation.label_tracker import save_label_tracker_plot

        try:
            save_label_tracker_plot(self.store, self.model_name, self.version_name,
                                    dataset_type=self.dataset_types["train"][0])
        except Exception as exc:  # noqa: BLE001 - a missing graph must not fail the training run
            self._warn_once("label_tracker_plot", f"mldbg-callbacks could not draw the LabelTracker graph: "
                            f"{type(exc).__name__}: {exc}")


def callbacks_factory() -> list[Callback]:
    """Entry point of ``lightning.pytorch.callbacks_factory``: the callback when ``MLDBG_LIGHTNING`` is set.

    Called by every ``Trainer()``; returns ``[]`` (importing nothing else) unless switched on.
    """
    if os.environ.get(ENV_ENABLE, "").strip().lower() in ("", "0", "false", "no", "off"):
        return []
    version = os.environ.get(ENV_VERSION_NAME, "").strip()
    generated = not version
    if generated:
        inherited = os.environ.get(ENV_GENERATED_VERSION, "")
        if inherited and int(os.environ.get("LOCAL_RANK", "0") or 0) > 0:
            version = inherited  # a DDP rank re-executed by Lightning: use the launching process's name
        else:
            version = "run-" + dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
            os.environ[ENV_GENERATED_VERSION] = version
    callback = MLDebuggerCallback(os.environ.get(ENV_MODEL_NAME, "").strip() or None, version,
                                  mode=os.environ.get(ENV_MODE) or None,
                                  strict=os.environ.get(ENV_STRICT, "").strip().lower() in ("1", "true", "yes", "on"))
    callback._version_generated = generated
    return [callback]


# -- helpers -----------------------------------------------------------------------------------
class _Skip(Exception):
    """A batch the callback cannot trace: (reason, message naming the fix)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


def _fitting(trainer: "pl.Trainer") -> bool:
    return trainer.state.fn == "fit"


def _parse_mode(mode: str | Iterable[str] | None, dataset_types: Mapping | None) -> frozenset[str]:
    """LabelTracker-style ``mode``: None = every loop; names select loops; ``"!name"`` removes one."""
    if mode is None:
        return frozenset(LOOPS)
    terms = [mode] if isinstance(mode, str) else list(mode)
    aliases = dict(MODE_ALIASES) | {name: loop for loop, name in DEFAULT_DATASET_TYPES.items()}
    for loop, names in (dataset_types or {}).items():
        for name in ([names] if isinstance(names, str) else names):
            aliases[name] = loop
    wanted, removed = set(), set()
    for term in terms:
        negate = term.startswith("!")
        name = term[1:] if negate else term
        loop = name if name in LOOPS else aliases.get(name)
        if loop is None:
            raise ValueError(f"mode={mode!r}: unknown loop {name!r}; use 'train', 'val', 'test', 'predict' (or a "
                             "name from dataset_types), optionally negated as '!test'")
        (removed if negate else wanted).add(loop)
    return frozenset((wanted or set(LOOPS)) - removed)


def _dataset_names(dataset_types: Mapping[str, str | Sequence[str]] | None) -> dict[str, tuple[str, ...]]:
    names = {loop: (DEFAULT_DATASET_TYPES[loop],) for loop in LOOPS}
    for loop, value in (dataset_types or {}).items():
        if loop not in LOOPS:
            raise ValueError(f"dataset_types keys are the loops {list(LOOPS)}, got {loop!r}")
        names[loop] = (value,) if isinstance(value, str) else tuple(value)
        if not names[loop]:
            raise ValueError(f"dataset_types[{loop!r}] is empty; give at least one name")
    return names


def _predict_pair(batch: Sequence) -> tuple[Any, Any, Any]:
    """``(x, second)`` of a predict batch: ``(x, ids)`` when ``second`` holds strings, else ``(x, y)``."""
    inputs, second = batch
    if isinstance(second, (list, tuple)) and second and all(isinstance(item, str) for item in second):
        return inputs, None, list(second)
    if isinstance(second, torch.Tensor) and second.is_floating_point():
        raise TraceInputError(f"a predict batch (x, second) whose second element is {_describe(second)}: neither "
                              "class labels nor sample ids; return x alone, a dict ({'x': x, 'id': ids}) or pass "
                              "batch_fn=lambda batch: (inputs, labels or None, ids or None)")
    return inputs, second, None


def _first_key(batch: Mapping, keys: Sequence[str]) -> Any:
    for key in keys:
        if key in batch:
            return batch[key]
    return None


def _is_array(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype") and len(value.shape) >= 1


def _is_scores(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.ndim >= 1


def _looks_like_detection(value: Any) -> bool:
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], Mapping):
        return any(key in value[0] for key in DETECTION_KEYS)
    if isinstance(value, Mapping):
        return any(key in value for key in DETECTION_KEYS)
    return hasattr(value, "pred_boxes")


def _rows(outputs: Any, batch: Any) -> int:
    from mldbg_callbacks.core.arrays import leading_dim

    for value in (outputs, batch[0] if isinstance(batch, (tuple, list)) and batch else batch):
        if hasattr(value, "shape"):
            n = leading_dim(value)
            if n:
                return n
    return 0


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).replace('torch.', '')} tensor of shape {tuple(value.shape)}"
    if isinstance(value, Mapping):
        return f"a dict with keys {list(value)[:8]}"
    if isinstance(value, (list, tuple)):
        inner = f" of {type(value[0]).__name__}" if value else ""
        return f"a {type(value).__name__} of {len(value)}{inner}"
    return "None" if value is None else f"a {type(value).__name__}"
