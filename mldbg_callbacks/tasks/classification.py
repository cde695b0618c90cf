"""Classification codec: model outputs, labels and features of one batch -> validated Arrow rows.

Stored per sample and epoch (``docs/storage.md`` has the byte counts):

- ``input_id`` (string), ``label`` (int64; null for rows traced without labels, ``labels=None``:
  operation-time logs and unlabelled pools, which also carry ``logged_at``, see ``core/trace_core.py``)
Vector columns are fixed-size binary with dtype/width metadata (``core/vectors.py``):

- ``logits`` or ``probs``: float32 vector of the C class scores when C <= ``max_stored_classes``;
  above that only the ``top_k`` largest probabilities (``topk_index``/``topk_prob``), the label's
  probability (``label_prob``) and, for logits, the AUM margin (``logit_margin``), so storage stays
  bounded for 10k-class models.
- ``features`` (optional): float16 penultimate features; wider than ``max_feature_dim`` they are
  reduced by a fixed, seeded Gaussian random projection (which preserves cosine geometry,
  Johnson-Lindenstrauss), so storage stays bounded for wide backbones.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ..core.arrays import leading_dim, to_float16, to_numpy
from ..core.batch import EncodedBatch, PendingBatch, RowProblem
from ..core.hashing import batch_ids
from ..core.vectors import FeatureReducer, vector_table
from ..errors import TraceInputError


class ClassificationCodec:
    """Validates and encodes classification batches; learns C, output kind and feature width once.

    Args:
        output_kind: ``"logits"``, ``"probs"`` or ``"auto"`` (probabilities when every row of the first
            batch lies in [0, 1] and sums to 1, else logits).
        max_stored_classes: store the full score vector up to this many classes, top-k above.
        top_k: how many classes to keep per sample above ``max_stored_classes``.
        max_feature_dim: project wider features down to this width.
    """

    task = "classification"

    def __init__(self, output_kind: str = "auto", max_stored_classes: int = 128, top_k: int = 32,
                 max_feature_dim: int = 1024):
        if output_kind not in ("auto", "logits", "probs"):
            raise ValueError(f"output_kind must be 'auto', 'logits' or 'probs', got {output_kind!r}")
        self.output_kind = output_kind
        self.max_stored_classes = max_stored_classes
        self.top_k = top_k
        self.num_classes: int | None = None
        self.features = FeatureReducer(max_feature_dim)

    # -- training thread: metadata only ---------------------------------------------------------
    def check(self, batch: PendingBatch) -> int:
        size = leading_dim(batch.outputs)
        shape = getattr(batch.outputs, "shape", None)
        if size is None or (shape is not None and len(shape) > 2):
            raise TraceInputError(
                f"outputs has shape {tuple(shape) if shape is not None else '?'}; a classifier must return "
                "(batch, num_classes) scores (or (batch,) for a binary model)"
            )
        for name, value in (("labels", batch.targets), ("input_ids", batch.input_ids),
                            ("features", batch.features), ("inputs", batch.inputs)):
            if value is None:
                continue
            n = leading_dim(value)
            if n != size:
                raise TraceInputError(f"{name} has {n} entries but outputs has {size} rows; "
                                      f"pass one entry of {name} per sample")
        return size

    # -- worker thread -------------------------------------------------------------------------
    def encode(self, batch: PendingBatch) -> EncodedBatch:
        scores = self._scores(to_numpy(batch.outputs))
        labelled = batch.targets is not None
        # Unlabelled rows: the predicted class stands in for the label where top-k storage needs one
        # (label_prob, logit_margin), and the stored label is null.
        labels = (self._labels(to_numpy(batch.targets), scores.shape[1]) if labelled
                  else scores.argmax(axis=1).astype(np.int64))
        ids = batch_ids(batch.input_ids, batch.inputs, len(scores))
        features = self.features.reduce(to_numpy(batch.features), len(scores))

        problems = []
        keep = np.isfinite(scores).all(axis=1)
        if not keep.all():
            problems.append(RowProblem("non_finite_outputs", int((~keep).sum()),
                                       "outputs contain NaN or Inf (diverged training or a bad batch); "
                                       "those samples are not traced"))
        in_range = (labels >= 0) & (labels < scores.shape[1])
        if not in_range.all():
            bad = labels[~in_range]
            problems.append(RowProblem(
                "label_out_of_range", int((~in_range).sum()),
                f"label {int(bad[0])} is outside [0, {scores.shape[1]}) for outputs with {scores.shape[1]} "
                "columns; labels must be class indices matching the model's output columns"))
            keep &= in_range
        if features is not None:
            finite_features = np.isfinite(features).all(axis=1)
            if not finite_features.all():
                problems.append(RowProblem("non_finite_features", int((~finite_features & keep).sum()),
                                           "features contain NaN or Inf; those samples are not traced"))
                keep &= finite_features

        if not keep.all():
            scores, labels, ids = scores[keep], labels[keep], ids[keep]
            features = None if features is None else features[keep]
        columns = {"input_id": pa.array(ids, type=pa.string()),
                   "label": pa.array(labels, type=pa.int64()) if labelled else pa.nulls(len(labels), pa.int64())}
        columns.update(self._score_columns(scores, labels))
        if features is not None:
            columns["features"] = to_float16(features)
        return EncodedBatch(vector_table(columns), problems)

    def merge_key(self, batch: PendingBatch) -> tuple:
        """What batches must share to be encoded as one (metadata only)."""
        return (batch.targets is None, batch.features is None, batch.logged_at, _tail(batch.outputs),
                _tail(batch.targets), _tail(batch.features))

    def merge(self, batches: list[PendingBatch]) -> PendingBatch:
        """One batch of host arrays from several with the same ``merge_key``."""
        def joined(values):
            return None if values[0] is None else np.concatenate([to_numpy(v) for v in values])

        first = batches[0]
        if self.output_kind == "auto":  # decided by the first batch, as without merging
            self._scores(to_numpy(first.outputs))
        ids = np.concatenate([batch_ids(b.input_ids, b.inputs, leading_dim(b.outputs)) for b in batches])
        return PendingBatch(joined([b.outputs for b in batches]), joined([b.targets for b in batches]), ids,
                            joined([b.features for b in batches]), None, first.dataset_type, first.n_epoch,
                            first.logged_at)

    def run_meta(self) -> dict:
        return {
            "task": self.task,
            "num_classes": self.num_classes,
            "output_kind": self.output_kind,
            "score_storage": "topk" if self._topk else "dense",
            "top_k": min(self.top_k, self.num_classes) if self._topk else None,
            **self.features.meta(),
        }

    # -- pieces --------------------------------------------------------------------------------
    @property
    def _topk(self) -> bool:
        return self.num_classes is not None and self.num_classes > self.max_stored_classes

    def _scores(self, outputs: np.ndarray) -> np.ndarray:
        if outputs.dtype.kind not in "fiu":
            raise TraceInputError(f"outputs must be numeric scores, got dtype {outputs.dtype}")
        scores = outputs.astype(np.float32, copy=False)
        if scores.ndim == 1:
            scores = scores[:, None]
        if scores.shape[1] == 1:  # binary model with one output: P(class 1) or its logit
            column = scores[:, 0]
            if self._resolve_kind(column[np.isfinite(column)], binary=True) == "probs":
                scores = np.stack([1.0 - column, column], axis=1)
            else:
                scores = np.stack([np.zeros_like(column), column], axis=1)
        if self.num_classes is None:
            self.num_classes = scores.shape[1]
        elif scores.shape[1] != self.num_classes:
            raise TraceInputError(f"outputs has {scores.shape[1]} columns but earlier batches had "
                                  f"{self.num_classes}; trace one model head per tracer")
        if self.output_kind == "auto":
            self._resolve_kind(scores[np.isfinite(scores).all(axis=1)], binary=False)
        return scores

    def _resolve_kind(self, finite_scores: np.ndarray, binary: bool) -> str:
        if self.output_kind == "auto" and len(finite_scores):
            in_unit = bool(np.all((finite_scores >= 0) & (finite_scores <= 1)))
            # atol covers bfloat16 rounding (8-bit mantissa: a row's sum can be off by ~4e-3)
            sums_to_one = binary or bool(np.allclose(finite_scores.sum(axis=1), 1.0, atol=1e-2))
            self.output_kind = "probs" if in_unit and sums_to_one else "logits"
        return self.output_kind

    @staticmethod
    def _labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
        if labels.dtype.kind in "USO":
            raise TraceInputError(f"labels must be integer class indices, got {labels.dtype} values such as "
                                  f"{labels.reshape(-1)[:1].tolist()}; map class names to indices first")
        if labels.ndim == 2 and labels.shape[1] == num_classes and labels.shape[1] > 1:
            one_hot = np.isin(labels, (0, 1)).all() and np.all(labels.sum(axis=1) == 1)
            if not one_hot:
                raise TraceInputError("labels look like soft labels (rows of class probabilities); pass hard "
                                      "class indices (e.g. the original labels before mixup/smoothing)")
            labels = labels.argmax(axis=1)
        labels = labels.reshape(len(labels), -1)
        if labels.shape[1] != 1:
            raise TraceInputError(f"labels have shape {labels.shape}; pass one class index per sample")
        labels = labels[:, 0]
        if labels.dtype.kind == "f":
            finite = np.isfinite(labels)
            if not finite.all() or not np.all(labels == np.round(labels)):
                example = labels[~finite | (labels != np.round(labels))][0]
                raise TraceInputError(f"labels must be integer class indices, got the value {example!r}; "
                                      "pass hard class indices (argmax of one-hot or soft targets)")
        elif labels.dtype.kind not in "iub":
            raise TraceInputError(f"labels must be integer class indices, got dtype {labels.dtype}")
        return labels.astype(np.int64)

    def _score_columns(self, scores: np.ndarray, labels: np.ndarray) -> dict[str, pa.Array]:
        if not self._topk:
            return {self.output_kind: scores}
        if self.output_kind == "logits":
            probs = _softmax(scores)
            label_logit = scores[np.arange(len(scores)), labels]
            others = scores.copy()
            others[np.arange(len(scores)), labels] = -np.inf
            columns = {"logit_margin": pa.array(label_logit - others.max(axis=1), type=pa.float32())}
        else:
            probs, columns = scores, {}
        k = min(self.top_k, probs.shape[1])  # top_k may exceed the number of classes
        top = np.argpartition(-probs, k - 1, axis=1)[:, :k].astype(np.int32)
        columns["topk_index"] = top
        columns["topk_prob"] = np.take_along_axis(probs, top, axis=1).astype(np.float32)
        columns["label_prob"] = pa.array(probs[np.arange(len(probs)), labels], type=pa.float32())
        return columns


def _tail(value) -> tuple | None:
    shape = getattr(value, "shape", None)
    return None if shape is None else tuple(shape[1:])


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted, dtype=np.float64)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)
