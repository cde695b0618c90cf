"""Keras 3 callback: trace a classifier's per-sample predictions and features during ``model.fit``, and
its predictions without labels at inference.

Keras hands callbacks no predictions, so at the end of every k-th epoch the callback runs one extra
prediction pass over the data it was given, with a sub-model that returns the model's output and its
penultimate features in one pass, and records it into the tracing core.

Inference (predictions without labels, into ``dataset_type="operation"`` by default, for the label-free
evaluation ``result.unlabelled()``, docs/operation.md), two ways:

- ``callback.trace_predictions(x, input_ids=None)``: predicts ``x`` with the same sub-model pass (scores
  and penultimate features in one pass, any backend) and returns the scores, like ``model.predict``.
- ``model.predict(x, callbacks=[callback])``: Keras' own predict; the callback records the outputs Keras
  hands to ``on_predict_batch_end``. Keras passes callbacks no inputs and no features: on the torch
  backend (not jit-compiled) the feature layer's ``call`` is wrapped while ``predict`` runs, so the
  features come from the same forward; on compiled backends (jax, tensorflow) rows have no features
  (one warning), which weakens density / out-of-distribution / neighbour signals: use
  ``trace_predictions`` there.

Rows get unique generated ids (``<12 hex>-<n>``, as InferenceLogger's) unless ``input_ids`` are given;
``callback.predicted_ids`` lists those of the latest call in the order of the returned predictions. The
epoch is that of the weights used (the last epoch of the latest ``fit``, 0 without one); the traces are
durable when the call returns.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
import weakref
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any

try:  # the only framework import of this module (importing mldbg_callbacks imports no framework)
    import keras
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("mldbg_callbacks.integrations.keras needs Keras 3: pip install 'mldbg-callbacks[keras]' "
                      "(and set KERAS_BACKEND=torch|jax|tensorflow before importing keras)") from exc

import numpy as np

from mldbg_callbacks.core.trace_core import TraceStats, TraceWarning
from mldbg_callbacks.errors import TraceInputError
from mldbg_callbacks.operation import UniqueIds
from mldbg_callbacks.store import LocalStore, resolve_store
from mldbg_callbacks.store.names import validate_name
from mldbg_callbacks.training import classification_core, scores_of

__all__ = ["MLDebuggerCallback"]

log = logging.getLogger("mldbg_callbacks")

DETECTION_KEYS = ("boxes", "bboxes", "bbox", "box", "pred_boxes", "detection_boxes")

# (store root, model_name, version_name) -> the callback that traces it in the fit now running
_ACTIVE_RUNS: "weakref.WeakValueDictionary[tuple, MLDebuggerCallback]" = weakref.WeakValueDictionary()


class MLDebuggerCallback(keras.callbacks.Callback):
    """Trace every sample's prediction, label and penultimate features at the end of Keras epochs.

    Example::

        import os
        os.environ.setdefault("KERAS_BACKEND", "torch")   # before importing keras
        import keras
        from mldbg_callbacks.integrations.keras import MLDebuggerCallback

        callback = MLDebuggerCallback("digits_mlp", "v1", data={"train": (x_train, y_train),
                                                                "val": (x_val, y_val)})
        model.fit(x_train, y_train, epochs=4, callbacks=[callback])
        # traces of epochs 0..3 are in the store; the LabelTracker PNG lies next to them

    What it does: at the end of every ``every_n_epochs``-th epoch it predicts over each entry of
    ``data`` with a sub-model ``keras.Model(model.inputs, [model.outputs, penultimate])`` (built once,
    sharing the model's weights), so one pass yields the scores and the features. Records go to the
    tracing core with ``dataset_type`` = the key of ``data`` and ``n_epoch`` = Keras' 0-based epoch,
    so ``fit(..., initial_epoch=2)`` after a resume continues with epochs 2, 3, ... At the end of
    ``fit`` it waits until the traces are durable and saves the LabelTracker graph (per-label loss over
    epochs) as a PNG next to the run.

    Args:
        model_name, version_name: identify the run in the store (letters, digits, ``_ . - + @``).
        data: ``{dataset_type: source}`` traced at epoch ends (``None``: none, for a callback that only traces
            inference). A source is
            ``(x, y)`` or ``(x, y, ids)`` arrays (NumPy, tensors; ``x`` may be a dict or list of
            arrays for multi-input models), a ``keras.utils.PyDataset``, a ``torch.utils.data.DataLoader``
            or a ``tf.data.Dataset`` (TensorFlow backend) yielding ``(x, y)`` or ``(x, y, ids)`` batches.
            A third batch element with a floating dtype is Keras' ``sample_weight`` and is ignored.
            Without ids a sample's id is its position in the source, which is stable across epochs only
            when the order is: a PyDataset that shuffles (e.g. in its ``on_epoch_end``) must yield ids,
            and a shuffling DataLoader without ids is refused.
        every_n_epochs: trace the epochs ``e`` (0-based) with ``(e + 1) % every_n_epochs == 0``, the
            convention of Keras' ``validation_freq``: ``every_n_epochs=2`` traces epochs 1, 3, 5, ...
        feature_layer: ``None`` = the input of the last Dense layer (penultimate features); a layer
            name = that layer's output; ``False`` = no features.
        batch_size: batch size of the prediction pass over ``(x, y)`` arrays (datasets keep theirs).
        store: a directory, a ``LocalStore``, or ``None`` (MLD_HOME, else ``./mldbg``).
        label_tracker: save the LabelTracker PNG at the end of ``fit`` (True: next to the run; a path:
            there; False: off). Needs matplotlib; skipped without it.
        strict: ``False`` (default): nothing the callback does stops ``fit``; every kind of problem is
            warned about once and counted in ``callback.failures`` (skipped rows also in
            ``callback.stats.rows_skipped``). ``True``: raise with the fix. A callback listed twice only
            warns: the second entry does nothing.
        output_kind: ``"auto"`` (probabilities when the output rows lie in [0, 1] and sum to 1, e.g. a
            softmax output layer; else logits), ``"logits"`` or ``"probs"``. A model with several
            outputs: the dict's ``logits`` entry, else the first output, holds the class scores.
        flush_every, max_stored_classes, top_k, max_feature_dim: as for ``ClassificationTracer``.
        predict_dataset_type: where predictions without labels go (``trace_predictions``,
            ``model.predict(callbacks=[callback])``; module docstring), default ``"operation"``.

    Backends: tested with ``KERAS_BACKEND=torch`` (the pass calls the sub-model directly under
    ``torch.no_grad()``, so outputs stay on the device until the background writer converts them).
    With ``jax`` and ``tensorflow`` it uses ``sub_model.predict_on_batch`` (compiled by the backend);
    ``tf.data.Dataset`` sources need TensorFlow. Subclassed models (no symbolic ``inputs``) are run
    eagerly with the last Dense layer's ``call`` wrapped during the pass (``integrations.keras_model``).
    """

    def __init__(self, model_name: str, version_name: str, data: Mapping[str, Any] | None = None, *,
                 every_n_epochs: int = 1,
                 feature_layer: Any = None, batch_size: int = 256,
                 store: str | os.PathLike | LocalStore | None = None, label_tracker: bool | str | os.PathLike = True,
                 strict: bool = False, output_kind: str = "auto", flush_every: int = 1,
                 max_stored_classes: int = 128, top_k: int = 32, max_feature_dim: int = 1024,
                 predict_dataset_type: str = "operation"):
        super().__init__()
        self.model_name = validate_name(model_name, "model_name")
        self.version_name = validate_name(version_name, "version_name")
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be a positive int, got {every_n_epochs!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.every_n_epochs = every_n_epochs
        self.feature_layer = feature_layer
        self.batch_size = batch_size
        self.label_tracker = label_tracker
        self.strict = strict
        self.store = resolve_store(store)
        self.sources = {} if data is None else {name: _source(name, value, batch_size)
                                                for name, value in _checked_data(data).items()}
        self.predict_dataset_type = validate_name(predict_dataset_type, "predict_dataset_type")
        self.core = classification_core(self.model_name, self.version_name, store=self.store, flush_every=flush_every,
                                        strict=strict, output_kind=output_kind,
                                        max_stored_classes=max_stored_classes, top_k=top_k,
                                        max_feature_dim=max_feature_dim)
        self.pass_seconds: dict[int, float] = {}  # epoch -> seconds of the extra prediction pass
        self.label_tracker_path: Any = None
        self._predictor: _Predictor | None = None
        self.failures: Counter = Counter()  # reason -> how often the callback skipped something
        self._skipped: Counter = Counter()  # reason -> rows skipped by the callback itself
        self._warned: set[str] = set()
        self._fit_params: Any = None  # the params dict of the fit now running (one per CallbackList)
        self._traced_in_fit: set[int] = set()
        self._inactive_reason: str | None = None
        self._weights_epoch = 0  # the last epoch of the latest fit: the weights predictions are made with
        self._unique_ids = UniqueIds()
        self.predicted_ids: list = []  # ids of the rows of the latest prediction call, in order
        self._predict_forward: Any = None  # model.predict on torch: the feature layer's call wrapped
        self._predict_epoch: int | None = None

    # -- Keras events ----------------------------------------------------------------------------
    def on_train_begin(self, logs: dict | None = None) -> None:
        if self._fit_params is not None and self.params is self._fit_params:
            self._warn_once("duplicate", "this MLDebuggerCallback is in the callbacks list twice; the second "
                                         "entry does nothing (pass it once)", strict_raises=False)
            return
        self._fit_params = self.params
        self._traced_in_fit = set()
        self._inactive_reason = None
        key = (str(self.store.root), self.model_name, self.version_name)
        other = _ACTIVE_RUNS.get(key)
        if other is not None and other is not self and other._fit_params is self.params:
            self._inactive_reason = "duplicate"
            self._warn_once("duplicate", f"two MLDebuggerCallbacks trace {self.model_name}/{self.version_name} in "
                                         "the same fit; this one does nothing (pass one callback)",
                            strict_raises=False)
            return
        _ACTIVE_RUNS[key] = self
        self._guarded("setup", lambda: self._ensure_predictor())

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self._weights_epoch = epoch
        if not self.sources or self._inactive_reason is not None or (epoch + 1) % self.every_n_epochs:
            return
        if epoch in self._traced_in_fit:  # the same callback listed twice: trace once
            return
        self._traced_in_fit.add(epoch)
        self._guarded("prediction_failed", lambda: self.trace_epoch(epoch))

    def on_train_end(self, logs: dict | None = None) -> None:
        if self._fit_params is None:  # second entry of a callback listed twice, or never begun
            return
        self._fit_params = None
        key = (str(self.store.root), self.model_name, self.version_name)
        if _ACTIVE_RUNS.get(key) is self:
            del _ACTIVE_RUNS[key]
        if self._inactive_reason is not None:
            return
        if self._traced_in_fit:
            self._guarded("write_failed", lambda: self.core.wait_for_save())
            if self.label_tracker:
                self._guarded("label_tracker", self._save_label_tracker)

    # -- inference -------------------------------------------------------------------------------
    def trace_predictions(self, x: Any, input_ids: Any = None, *, batch_size: int | None = None) -> Any:
        """Predict ``x`` (arrays, or a dict/list of arrays for several inputs) and trace the predictions
        without labels, with penultimate features, into ``predict_dataset_type``; return the scores as
        NumPy (``model.predict``'s output for a single-output classifier). ``input_ids``: one per sample,
        else unique ids are generated (``callback.predicted_ids``). Durable when it returns."""
        if self.model is None:
            raise RuntimeError("the callback has no model yet: call callback.set_model(model) first (fit and "
                               "predict do it)")
        size = _rows(x)
        ids = np.asarray(self._unique_ids.take(size) if input_ids is None else input_ids)
        if ids.ndim != 1 or len(ids) != size:
            raise ValueError(f"input_ids has shape {ids.shape} but x has {size} rows; pass one id per sample")
        predictor = self._ensure_predictor()
        step = batch_size or self.batch_size
        scores = []
        with predictor.session():
            for start in range(0, size, step):
                cut = slice(start, start + step)
                batch_scores, features = predictor(keras.tree.map_structure(lambda leaf: leaf[cut], x))
                self.core.record(batch_scores, None, input_ids=ids[cut], dataset_type=self.predict_dataset_type,
                                 n_epoch=self._weights_epoch, features=features)
                scores.append(keras.ops.convert_to_numpy(batch_scores))
        self.predicted_ids = ids.tolist()
        self._guarded("write_failed", lambda: self._save_predictions(self._weights_epoch))
        return np.concatenate(scores) if scores else np.empty((0,))

    def on_predict_begin(self, logs: dict | None = None) -> None:
        self.predicted_ids = []
        self._predict_epoch = self._weights_epoch
        self._predict_forward = None
        if keras.backend.backend() == "torch" and not getattr(self.model, "jit_compile", False):
            from mldbg_callbacks.integrations.keras_model import KerasForward

            self._predict_forward = self._guarded("setup", lambda: KerasForward(self.model, self.feature_layer))
        elif self.feature_layer is not False:
            self._warn_once("predict_features", f"model.predict on the {keras.backend.backend()} backend (compiled) "
                            "gives callbacks no features, so its rows have none; call "
                            "callback.trace_predictions(x) for predictions with penultimate features",
                            strict_raises=False)

    def on_predict_batch_end(self, batch: int, logs: dict | None = None) -> None:
        features = self._predict_forward.take_features() if self._predict_forward is not None else None
        # Keras flattens a dict of outputs into the logs themselves (python_utils.pythonify_logs)
        outputs = (logs or {}).get("outputs", logs or None)
        self._guarded("prediction_failed", lambda: self._record_predicted(outputs, features))

    def on_predict_end(self, logs: dict | None = None) -> None:
        if self._predict_forward is not None:
            self._predict_forward.remove()
            self._predict_forward = None
        if self.predicted_ids:
            self._guarded("write_failed", lambda: self._save_predictions(self._predict_epoch))

    def _record_predicted(self, outputs: Any, features: Any) -> None:
        if outputs is None:
            raise TraceInputError("Keras passed on_predict_batch_end no 'outputs'; call "
                                  "callback.trace_predictions(x) instead")
        _refuse_detection(outputs, self.model)
        scores = scores_of(outputs)
        ids = self._unique_ids.take(_rows(scores))
        self.core.record(scores, None, input_ids=ids, dataset_type=self.predict_dataset_type,
                         n_epoch=self._predict_epoch, features=features)
        self.predicted_ids.extend(ids)

    def _save_predictions(self, epoch: int) -> None:
        self.core.end_epoch(epoch)
        self.core.wait_for_save()

    # -- the prediction pass ----------------------------------------------------------------------
    def trace_epoch(self, epoch: int) -> None:
        """Predict over every source of ``data`` and record it as epoch ``epoch`` (what
        ``on_epoch_end`` calls; public so a custom loop can call it)."""
        predictor = self._ensure_predictor()
        if predictor is None:
            return
        start = time.perf_counter()
        try:
            with predictor.session():
                for name, source in self.sources.items():
                    try:
                        self._trace_source(name, source, predictor, epoch)
                    except _UnstableIds as exc:
                        self._problem("unstable_ids", str(exc))
        finally:  # what was recorded before a failure is committed as this epoch's partial traces
            self.core.end_epoch(epoch)
            self.pass_seconds[epoch] = time.perf_counter() - start

    def _trace_source(self, name: str, source: "_Source", predictor: "_Predictor", epoch: int) -> None:
        for x, labels, ids in source.batches(self._problem):
            if labels is None:
                self._problem("no_labels", f"data[{name!r}] yields batches without labels (x only); the callback "
                                           "needs (x, y) or (x, y, ids) batches", rows=_rows(x))
                continue
            scores, features = predictor(x)
            self.core.record(scores, labels, input_ids=ids, dataset_type=name, n_epoch=epoch, features=features)

    def _ensure_predictor(self) -> "_Predictor | None":
        if self._predictor is None or self._predictor.model is not self.model:
            if self.model is None:
                raise RuntimeError("the callback has no model yet; pass it to model.fit(callbacks=[...])")
            self._predictor = _Predictor(self.model, self.feature_layer)
        return self._predictor

    def _save_label_tracker(self) -> None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            log.info("mldbg-callbacks: matplotlib is not installed, no LabelTracker graph")
            return
        from mldbg_callbacks.evaluation.label_tracker import save_label_tracker_plot

        dataset_type = "train" if "train" in self.sources else next(iter(self.sources))
        path = None if self.label_tracker is True else self.label_tracker
        self.label_tracker_path = save_label_tracker_plot(self.store, self.model_name, self.version_name,
                                                          path=path, dataset_type=dataset_type)

    # -- results and failures ---------------------------------------------------------------------
    @property
    def stats(self) -> TraceStats:
        """The core's counters plus the callback's own skips (``rows_skipped[reason]``)."""
        stats = self.core.stats
        stats.rows_skipped.update(self._skipped)
        return stats

    def wait_for_save(self, n_epoch: int | None = None, timeout_s: float | None = None) -> TraceStats:
        """Block until the traces (of ``n_epoch``, or all) are durable; raise if a write failed."""
        self.core.wait_for_save(n_epoch=n_epoch, timeout_s=timeout_s)
        return self.stats

    def close(self) -> None:
        """Save what is buffered and stop the background writer."""
        self.core.close()

    def get_config(self) -> dict:
        """The plain options of this callback (``data`` and ``store`` objects left out)."""
        return {"model_name": self.model_name, "version_name": self.version_name,
                "every_n_epochs": self.every_n_epochs, "feature_layer": self.feature_layer,
                "batch_size": self.batch_size, "store": str(self.store.root), "strict": self.strict,
                "label_tracker": (self.label_tracker if isinstance(self.label_tracker, bool)
                                  else os.fspath(self.label_tracker)),
                "data": sorted(self.sources)}

    def _guarded(self, reason: str, action: Any) -> Any:
        """Run ``action``; with strict=False nothing it raises reaches ``fit`` (warned once, counted)."""
        try:
            return action()
        except Exception as exc:
            if self.strict:
                raise
            self.failures[reason] += 1
            self._warn_once(reason, f"{type(exc).__name__}: {exc}")
            if isinstance(exc, _NotAClassifier):
                self._inactive_reason = reason
            return None

    def _problem(self, reason: str, message: str, rows: int = 0) -> None:
        if self.strict:
            raise TraceInputError(message)
        self.failures[reason] += 1
        if rows:
            self._skipped[reason] += rows
        self._warn_once(reason, message)

    def _warn_once(self, reason: str, message: str, strict_raises: bool = True) -> None:
        if reason in self._warned:
            return
        self._warned.add(reason)
        if strict_raises:
            message += (". Training goes on; later occurrences are counted in callback.failures (and skipped rows "
                        "in callback.stats.rows_skipped) without a warning. Pass strict=True to raise instead")
        warnings.warn(f"mldbg-callbacks (Keras, {reason}): {message}", TraceWarning, stacklevel=3)


class _NotAClassifier(TraceInputError):
    """The model's output is not class scores (e.g. detection boxes): the callback switches off."""


class _UnstableIds(TraceInputError):
    """A shuffled source without ids: positions are no ids; that source is not traced this epoch."""


# -- the sub-model ----------------------------------------------------------------------------------
class _Predictor:
    """``predictor(x) -> (scores, features)`` in one pass: a symbolic sub-model when the model has
    symbolic inputs (Sequential, Functional), else an eager call with the last Dense layer wrapped."""

    def __init__(self, model: Any, feature_layer: Any):
        self.model = model
        self.feature_layer = feature_layer
        self.torch = keras.backend.backend() == "torch"
        self.sub_model = None
        self.has_features = False
        self.eager_reason = None
        self._forward: Any = None  # eager mode: the KerasForward of the pass now running
        _refuse_detection(_structure(model, "output", "outputs"), model)
        try:
            self.sub_model = self._build_sub_model()
        except _NotAClassifier:
            raise
        except Exception as exc:  # noqa: BLE001 - any graph the sub-model cannot be cut from runs eagerly
            self.eager_reason = f"{type(exc).__name__}: {exc}"
        if self.sub_model is None:
            warnings.warn(f"mldbg-callbacks: no sub-model can be cut from {model.name} ({self.eager_reason}); the "
                          "callback calls it eagerly with the feature layer's call wrapped during the pass "
                          "(integrations.keras_model.KerasForward), which is slower than a sub-model", stacklevel=4)

    def _build_sub_model(self) -> Any:
        model_input = _structure(self.model, "input", "inputs")
        model_output = _structure(self.model, "output", "outputs")
        if model_input is None or model_output is None:
            self.eager_reason = "a subclassed model has no symbolic inputs"
            return None
        features = self._feature_tensor()
        self.has_features = features is not None
        sub_outputs = [model_output, features] if self.has_features else model_output
        return keras.Model(model_input, sub_outputs, name=f"{self.model.name}_mldbg_trace")

    def _feature_tensor(self) -> Any:
        if self.feature_layer is False:
            return None
        if self.feature_layer is None:
            dense = [layer for layer in self.model.layers if isinstance(layer, keras.layers.Dense)]
            if dense:
                return dense[-1].input
            if any(isinstance(layer, keras.layers.Dense) for layer in _nested_layers(self.model)):
                # the head sits inside a nested model, whose tensors belong to another graph
                raise ValueError("the last Dense layer is inside a nested model")
            warnings.warn(f"mldbg-callbacks: {self.model.name} has no Dense layer, so no penultimate features are "
                          "traced; pass feature_layer='<layer name>'", stacklevel=5)
            return None
        if isinstance(self.feature_layer, str):
            try:
                return self.model.get_layer(self.feature_layer).output
            except ValueError:
                names = [layer.name for layer in self.model.layers]
                raise ValueError(f"feature_layer={self.feature_layer!r} is not a layer of {self.model.name}; "
                                 f"layers: {names}") from None
        return self.feature_layer.output

    @contextmanager
    def session(self) -> Iterator["_Predictor"]:
        """One prediction pass. Eager mode wraps the feature layer for the pass only, so training
        steps never run through the wrap."""
        if self.sub_model is None:
            from mldbg_callbacks.integrations.keras_model import KerasForward

            self._forward = KerasForward(self.model, self.feature_layer)
        try:
            with _no_grad(self.torch):
                yield self
        finally:
            if self._forward is not None:
                self._forward.remove()
                self._forward = None

    def __call__(self, x: Any) -> tuple[Any, Any]:
        if self.sub_model is not None:
            if self.torch:  # a direct call: no host sync here, the background writer converts the tensors
                result = self.sub_model(x, training=False)
            else:  # compiled by the backend (jit on jax, tf.function on tensorflow)
                result = self.sub_model.predict_on_batch(x)
            outputs, features = (result[0], result[1]) if self.has_features else (result, None)
        else:
            outputs, features = self._forward(x)
            _refuse_detection(outputs, self.model)
        return scores_of(outputs), features


def _structure(model: Any, single: str, plural: str) -> Any:
    """The model's symbolic inputs or outputs as it was built (a tensor, a list, a dict), or None.

    Functional models keep the structure in ``.input``/``.output``; Sequential ones only have the
    ``.inputs``/``.outputs`` lists; subclassed models have neither."""
    for name in (single, plural):
        try:
            value = getattr(model, name)
        except (AttributeError, ValueError):  # missing, or "has no defined inputs"
            continue
        if value is None:
            continue
        if name == plural and isinstance(value, (list, tuple)) and len(value) == 1:
            return value[0]
        return value
    return None


def _nested_layers(layer: Any) -> Iterator[Any]:
    for child in getattr(layer, "layers", None) or []:
        yield child
        yield from _nested_layers(child)


def _refuse_detection(outputs: Any, model: Any) -> None:
    if isinstance(outputs, Mapping):
        keys = {str(k).lower() for k in outputs}
        if keys & set(DETECTION_KEYS):
            raise _NotAClassifier(
                f"{model.name} returns {sorted(map(str, outputs))}, which looks like object detection; "
                "MLDebuggerCallback traces classifiers. Use ObjectDetectionTracer "
                "(mldbg_callbacks.training) for detection models")


def _no_grad(is_torch: bool) -> Any:
    if is_torch:
        import torch

        return torch.no_grad()
    return nullcontext()


# -- data sources -----------------------------------------------------------------------------------
def _checked_data(data: Any) -> dict:
    if not isinstance(data, Mapping) or not data:
        raise TypeError("data must be a non-empty dict {dataset_type: source}, e.g. "
                        "data={'train': (x_train, y_train), 'val': (x_val, y_val)}")
    return {validate_name(str(name), "dataset_type"): value for name, value in data.items()}


def _source(name: str, value: Any, batch_size: int) -> "_Source":
    if isinstance(value, (tuple, list)):
        return _ArraySource(name, value, batch_size)
    if hasattr(value, "shape") or isinstance(value, Mapping):
        raise TypeError(f"data[{name!r}] holds inputs without labels; pass (x, y) or (x, y, ids)")
    if isinstance(value, keras.utils.PyDataset):
        return _PyDatasetSource(name, value)
    if hasattr(value, "as_numpy_iterator"):  # tf.data.Dataset, recognised without importing TensorFlow
        return _TfDataSource(name, value)
    if isinstance(value, Iterator) or not hasattr(value, "__iter__"):
        raise TypeError(f"data[{name!r}] is a {type(value).__name__}, which cannot be read again every epoch; "
                        "pass (x, y) arrays, a keras.utils.PyDataset, a torch DataLoader or a tf.data.Dataset")
    return _LoaderSource(name, value)


class _Source:
    """Yields ``(x, labels, ids)`` batches; ``ids`` default to positions in the source."""

    def __init__(self, name: str):
        self.name = name

    def batches(self, problem: Any) -> Iterator[tuple[Any, Any, Any]]:
        position = 0
        for batch in self._raw_batches():
            x, labels, ids = self._unpack(batch, problem)
            rows = _rows(x)
            if ids is None:
                ids = np.arange(position, position + rows)
            position += rows
            yield x, labels, ids

    def _raw_batches(self) -> Iterator[Any]:
        raise NotImplementedError

    def _unpack(self, batch: Any, problem: Any) -> tuple[Any, Any, Any]:
        if not isinstance(batch, (tuple, list)):
            return batch, None, None
        if len(batch) == 1:
            return batch[0], None, None
        if len(batch) > 3:
            problem("batch_structure", f"data[{self.name!r}] yields batches of {len(batch)} elements; the callback "
                                       "reads (x, y) or (x, y, ids) and ignores the rest", rows=0)
        third = batch[2] if len(batch) >= 3 else None
        if third is not None and _is_float(third):  # Keras' (x, y, sample_weight)
            third = None
        return batch[0], batch[1], third


class _ArraySource(_Source):
    def __init__(self, name: str, value: tuple | list, batch_size: int):
        super().__init__(name)
        if len(value) not in (2, 3):
            raise TypeError(f"data[{name!r}] has {len(value)} elements; pass (x, y) or (x, y, ids)"
                            + (" (labels are missing)" if len(value) == 1 else ""))
        self.x, self.labels = value[0], value[1]
        self.ids = None if len(value) == 2 else np.asarray(value[2])
        if self.labels is None:
            raise TypeError(f"data[{name!r}] has no labels (y is None); pass (x, y) or (x, y, ids)")
        sizes = {_rows(leaf) for leaf in keras.tree.flatten(self.x)}
        if len(sizes) != 1:
            raise ValueError(f"data[{name!r}]: the inputs have different numbers of rows {sorted(sizes)}")
        self.size = sizes.pop()
        for what, part in (("y", self.labels), ("ids", self.ids)):
            if part is not None and _rows(part) != self.size:
                raise ValueError(f"data[{name!r}]: {what} has {_rows(part)} entries but x has {self.size} rows; "
                                 f"pass one entry of {what} per sample")
        self.batch_size = batch_size

    def _raw_batches(self) -> Iterator[Any]:
        for start in range(0, self.size, self.batch_size):
            cut = slice(start, start + self.batch_size)
            x = keras.tree.map_structure(lambda leaf: leaf[cut], self.x)
            yield (x, self.labels[cut]) if self.ids is None else (x, self.labels[cut], self.ids[cut])


class _PyDatasetSource(_Source):
    def __init__(self, name: str, dataset: Any):
        super().__init__(name)
        self.dataset = dataset
        if dataset.num_batches is None:
            raise ValueError(f"data[{name!r}] is an infinite PyDataset (num_batches is None); give it a __len__")

    def _raw_batches(self) -> Iterator[Any]:
        for index in range(self.dataset.num_batches):
            yield self.dataset[index]


class _LoaderSource(_Source):
    def __init__(self, name: str, loader: Any):
        super().__init__(name)
        self.loader = loader
        sampler = getattr(loader, "sampler", None)
        self.shuffled = type(sampler).__name__ == "RandomSampler"

    def _unpack(self, batch: Any, problem: Any) -> tuple[Any, Any, Any]:
        x, labels, ids = super()._unpack(batch, problem)
        if self.shuffled and ids is None:
            raise _UnstableIds(
                f"data[{self.name!r}] is a shuffling DataLoader that yields no ids, so a sample's position changes "
                "every epoch and its history would mix samples; yield (x, y, ids) batches (e.g. a TensorDataset "
                "with an index tensor) or pass a DataLoader with shuffle=False")
        return x, labels, ids

    def _raw_batches(self) -> Iterator[Any]:
        return iter(self.loader)


class _TfDataSource(_Source):
    def __init__(self, name: str, dataset: Any):
        super().__init__(name)
        self.dataset = dataset
        cardinality = getattr(dataset, "cardinality", None)
        if cardinality is not None and int(cardinality()) == -1:  # tf.data.INFINITE_CARDINALITY
            raise ValueError(f"data[{name!r}] is an infinite tf.data.Dataset (repeat()); pass a finite one")

    def _raw_batches(self) -> Iterator[Any]:
        return self.dataset.as_numpy_iterator()


def _is_float(value: Any) -> bool:
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        return False
    for flag in ("is_floating_point", "is_floating"):  # torch.dtype, tf.DType
        if isinstance(getattr(dtype, flag, None), bool):
            return getattr(dtype, flag)
    try:
        return np.dtype(dtype).kind == "f"
    except TypeError:
        return "float" in str(dtype)


def _rows(value: Any) -> int:
    leaves = keras.tree.flatten(value) if isinstance(value, (Mapping, list, tuple)) else [value]
    leaf = leaves[0] if leaves else None
    shape = getattr(leaf, "shape", None)
    if shape is not None and len(shape):
        return int(shape[0])
    try:
        return len(leaf)
    except TypeError:
        return 0
