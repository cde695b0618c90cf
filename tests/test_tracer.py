"""ClassificationTracer wrapped around real PyTorch and Keras 3 models (tiny, CPU).

Features and outputs are compared with references taken independently of the tracer: a manual
forward hook, a Keras sub-model, the model's own output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from mldbg_callbacks.training import ClassificationTracer  # noqa: E402
from mldbg_callbacks.core.vectors import decoded_rows

MODEL, VERSION = "m", "v1"


# -- helpers ---------------------------------------------------------------------------------------
def stored_rows(root, version=VERSION, n_epoch=None) -> dict:
    """{input_id: row} of every committed part of one version (read with plain pyarrow)."""
    rows = {}
    base = Path(root) / MODEL / version / "traces"
    for marker in base.glob("dataset_type=*/n_epoch=*/rank=*/_COMMITTED"):
        if n_epoch is not None and marker.parent.parent.name != f"n_epoch={n_epoch}":
            continue
        for part in json.loads(marker.read_text())["parts"]:
            for row in decoded_rows(pq.read_table(marker.parent / part)):
                rows[row["input_id"]] = row
    return rows


def stored_matrix(rows: dict, column: str, ids, dtype=np.float32) -> np.ndarray:
    return np.stack([np.array(rows[str(i)][column], dtype) for i in ids])


def stored_columns(root, version=VERSION) -> set:
    names = set()
    for part in (Path(root) / MODEL / version).rglob("*.parquet"):
        names |= set(pq.read_schema(part).names)
    return names


def mlp(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


class HeadFirst(nn.Module):
    """The head is registered before the body: registration order != execution order."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.head = nn.Linear(8, 3)
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh())

    def forward(self, x):
        return self.head(self.body(x))


@dataclass
class SequenceClassifierOutput:  # the shape of a Hugging Face model output
    loss: object = None
    logits: object = None
    hidden_states: object = None


class HFStyle(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.encoder = nn.Linear(6, 5)
        self.classifier = nn.Linear(5, 4)

    def forward(self, x, loss_targets=None):
        hidden = torch.relu(self.encoder(x))
        logits = self.classifier(hidden)
        loss = None if loss_targets is None else nn.functional.cross_entropy(logits, loss_targets)
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=hidden)


def batches(rng, n_batches=3, size=5, dim=6, classes=3):
    for b in range(n_batches):
        x = torch.from_numpy(rng.standard_normal((size, dim)).astype(np.float32))
        y = torch.from_numpy(rng.integers(0, classes, size))
        yield x, y, np.arange(b * size, (b + 1) * size)


# -- PyTorch ---------------------------------------------------------------------------------------
def test_output_is_the_models_output_and_gradients_flow(store_dir, rng):
    model = mlp()
    reference = mlp()  # same seed, same weights
    tracer = ClassificationTracer(model, MODEL, VERSION)
    for x, y, ids in batches(rng):
        out = tracer(x, y, input_ids=ids)
        expected = reference(x)
        assert isinstance(out, torch.Tensor) and out.requires_grad
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        model.zero_grad()
        reference.zero_grad()
        nn.functional.cross_entropy(out, y).backward()
        nn.functional.cross_entropy(expected, y).backward()
        for p, q in zip(model.parameters(), reference.parameters()):
            assert p.grad is not None
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
    tracer.wait_for_save()
    rows = stored_rows(store_dir)
    assert len(rows) == 15


def test_features_are_the_input_of_the_last_executed_linear(store_dir, rng):
    model = mlp()
    seen = []
    model[4].register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach().clone()))
    tracer = ClassificationTracer(model, MODEL, VERSION)
    all_ids, logits = [], []
    with torch.no_grad():
        for x, y, ids in batches(rng):  # the first call finds the layer, later calls use the installed hook
            logits.append(tracer(x, y, input_ids=ids))
            all_ids.extend(ids)
    tracer.wait_for_save()
    rows = stored_rows(store_dir)
    expected = torch.cat(seen).numpy()
    assert expected.shape == (15, 8)
    np.testing.assert_array_equal(stored_matrix(rows, "features", all_ids, np.float16), expected.astype(np.float16))
    np.testing.assert_array_equal(stored_matrix(rows, "logits", all_ids), torch.cat(logits).numpy())


def test_last_executed_linear_wins_over_registration_order(store_dir, rng):
    model = HeadFirst()
    assert [n for n, m in model.named_modules() if isinstance(m, nn.Linear)] == ["head", "body.0"]
    tracer = ClassificationTracer(model, MODEL, VERSION)
    xs, all_ids = [], []
    with torch.no_grad():
        for x, y, ids in batches(rng, n_batches=2):
            tracer(x, y, input_ids=ids)
            xs.append(x)
            all_ids.extend(ids)
        expected = model.body(torch.cat(xs)).numpy()  # the head's input
    tracer.wait_for_save()
    stored = stored_matrix(stored_rows(store_dir), "features", all_ids, np.float16)
    assert stored.shape == (10, 8)
    np.testing.assert_array_equal(stored, expected.astype(np.float16))


def test_named_feature_layer_captures_that_layers_output(store_dir, rng):
    model = HeadFirst()
    tracer = ClassificationTracer(model, MODEL, VERSION, feature_layer="body.0")  # pre-activation output
    with torch.no_grad():
        x, y, ids = next(batches(rng))
        tracer(x, y, input_ids=ids)
        expected = model.body[0](x).numpy()
    tracer.wait_for_save()
    np.testing.assert_array_equal(stored_matrix(stored_rows(store_dir), "features", ids, np.float16),
                                  expected.astype(np.float16))


def test_unknown_feature_layer_lists_the_layers(store_dir):
    with pytest.raises(ValueError, match="body.0"):
        ClassificationTracer(HeadFirst(), MODEL, VERSION, feature_layer="backbone.avgpool")


def test_feature_layer_false_stores_no_features(store_dir, rng):
    tracer = ClassificationTracer(mlp(), MODEL, VERSION, feature_layer=False)
    with torch.no_grad():
        for x, y, ids in batches(rng, n_batches=2):
            tracer(x, y, input_ids=ids)
    tracer.wait_for_save()
    assert stored_columns(store_dir) == {"input_id", "label", "logits"}
    meta = json.loads((Path(store_dir) / MODEL / VERSION / "_meta.json").read_text())
    assert "feature_dim" not in meta or meta["feature_dim"] is None


def test_close_removes_the_feature_hook(store_dir, rng):
    model = mlp()
    tracer = ClassificationTracer(model, MODEL, VERSION)
    x, y, ids = next(batches(rng))
    with torch.no_grad():
        tracer(x, y, input_ids=ids)
    assert model[4]._forward_pre_hooks
    tracer.close()
    assert not model[4]._forward_pre_hooks and not any(m._forward_hooks for m in model.modules())
    assert len(stored_rows(store_dir)) == 5


def test_hugging_face_style_output_object(store_dir, rng):
    model = HFStyle()
    tracer = ClassificationTracer(model, MODEL, VERSION)
    x = torch.from_numpy(rng.standard_normal((6, 6)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 4, 6))
    out = tracer(x, y, input_ids=np.arange(6), loss_targets=y)  # extra keyword arguments reach the model
    assert isinstance(out, SequenceClassifierOutput)
    out.loss.backward()  # still a training step
    assert model.classifier.weight.grad is not None
    tracer.wait_for_save()
    rows = stored_rows(store_dir)
    np.testing.assert_array_equal(stored_matrix(rows, "logits", range(6)), out.logits.detach().numpy())
    np.testing.assert_array_equal(stored_matrix(rows, "features", range(6), np.float16),
                                  out.hidden_states.detach().numpy().astype(np.float16))


def test_transformers_model_output_if_available(store_dir, rng):
    outputs_mod = pytest.importorskip("transformers.modeling_outputs")
    logits = torch.from_numpy(rng.standard_normal((4, 3)).astype(np.float32))

    class Wrapped(nn.Module):
        def forward(self, x):
            return outputs_mod.SequenceClassifierOutput(logits=x)

    tracer = ClassificationTracer(Wrapped(), MODEL, VERSION, feature_layer=False)
    out = tracer(logits, torch.tensor([0, 1, 2, 0]), input_ids=np.arange(4))
    assert out.logits is logits
    tracer.wait_for_save()
    np.testing.assert_array_equal(stored_matrix(stored_rows(store_dir), "logits", range(4)), logits.numpy())


@pytest.mark.parametrize("wrap", [lambda t: {"logits": t, "aux": t * 0}, lambda t: (t, t * 2)])
def test_dict_and_tuple_outputs(store_dir, rng, wrap):
    class Model(nn.Module):
        def forward(self, x):
            return wrap(x)

    x = torch.from_numpy(rng.standard_normal((4, 3)).astype(np.float32) * 3)
    tracer = ClassificationTracer(Model(), MODEL, VERSION, feature_layer=False, strict=True)
    out = tracer(x, torch.tensor([0, 1, 2, 0]), input_ids=np.arange(4))
    assert type(out) is type(wrap(x))
    tracer.wait_for_save()
    np.testing.assert_array_equal(stored_matrix(stored_rows(store_dir), "logits", range(4)), x.numpy())


def test_softmax_torch_output_is_stored_as_probs(store_dir, rng):
    model = nn.Sequential(mlp(), nn.Softmax(dim=1))
    tracer = ClassificationTracer(model, MODEL, VERSION)
    x, y, ids = next(batches(rng))
    with torch.no_grad():
        out = tracer(x, y, input_ids=ids)
    tracer.wait_for_save()
    assert stored_columns(store_dir) == {"input_id", "label", "probs", "features"}
    np.testing.assert_array_equal(stored_matrix(stored_rows(store_dir), "probs", ids), out.numpy())


# -- Keras 3 (torch backend) -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def keras():
    if os.environ.get("KERAS_BACKEND", "torch") != "torch":
        pytest.skip("these tests run Keras on the torch backend")
    return pytest.importorskip("keras")


def keras_mlp(keras, activation=None):
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((6,)),
        keras.layers.Dense(12, activation="relu", name="hidden1"),
        keras.layers.Dense(7, activation="tanh", name="hidden2"),
        keras.layers.Dense(3, activation=activation, name="head"),
    ])


def test_keras_model_outputs_and_penultimate_features(store_dir, rng, keras):
    model = keras_mlp(keras)
    tracer = ClassificationTracer(model, MODEL, VERSION)
    x = rng.standard_normal((10, 6)).astype(np.float32)
    y = rng.integers(0, 3, 10)
    out_a = tracer(x[:5], y[:5], input_ids=np.arange(5))
    out_b = tracer(x[5:], y[5:], input_ids=np.arange(5, 10))
    tracer.wait_for_save()

    expected_out = keras.ops.convert_to_numpy(model(x, training=False))
    outputs = np.concatenate([keras.ops.convert_to_numpy(out_a), keras.ops.convert_to_numpy(out_b)])
    np.testing.assert_array_equal(outputs, expected_out)
    sub_model = keras.Model(model.inputs, model.layers[-1].input)
    expected_features = sub_model.predict(x, verbose=0)
    assert expected_features.shape == (10, 7)

    rows = stored_rows(store_dir)
    np.testing.assert_allclose(stored_matrix(rows, "features", range(10), np.float16),
                               expected_features.astype(np.float16), atol=1e-3)
    np.testing.assert_array_equal(stored_matrix(rows, "logits", range(10)), expected_out)
    assert stored_columns(store_dir) == {"input_id", "label", "logits", "features"}


def test_keras_softmax_output_is_stored_as_probs(store_dir, rng, keras):
    model = keras_mlp(keras, activation="softmax")
    tracer = ClassificationTracer(model, MODEL, VERSION)
    x = rng.standard_normal((8, 6)).astype(np.float32)
    out = tracer(x, rng.integers(0, 3, 8), input_ids=np.arange(8))
    tracer.wait_for_save()
    assert stored_columns(store_dir) == {"input_id", "label", "probs", "features"}
    np.testing.assert_array_equal(stored_matrix(stored_rows(store_dir), "probs", range(8)),
                                  keras.ops.convert_to_numpy(out))


def test_keras_named_feature_layer_and_none(store_dir, rng, keras):
    model = keras_mlp(keras)
    x = rng.standard_normal((4, 6)).astype(np.float32)
    named = ClassificationTracer(model, MODEL, "named", feature_layer="hidden1")
    named(x, np.array([0, 1, 2, 0]), input_ids=np.arange(4))
    named.wait_for_save()
    named.close()  # restores the layer's call
    none = ClassificationTracer(model, MODEL, "none", feature_layer=False)
    none(x, np.array([0, 1, 2, 0]), input_ids=np.arange(4))
    none.wait_for_save()
    expected = keras.Model(model.inputs, model.get_layer("hidden1").output).predict(x, verbose=0)
    np.testing.assert_allclose(stored_matrix(stored_rows(store_dir, "named"), "features", range(4), np.float16),
                               expected.astype(np.float16), atol=1e-3)
    assert stored_columns(store_dir, "none") == {"input_id", "label", "logits"}
    assert "call" not in vars(model.get_layer("hidden1"))  # close() removed the instance patch


def test_keras_content_ids_from_numpy_inputs(store_dir, rng, keras):
    model = keras_mlp(keras)
    tracer = ClassificationTracer(model, MODEL, VERSION, feature_layer=False)
    x = rng.standard_normal((4, 6)).astype(np.float32)
    tracer(x, np.array([0, 1, 2, 0]), n_epoch=0)
    tracer(x[::-1].copy(), np.array([0, 2, 1, 0]), n_epoch=1)
    tracer.wait_for_save()
    e0, e1 = stored_rows(store_dir, n_epoch=0), stored_rows(store_dir, n_epoch=1)
    assert len(e0) == 4 and set(e0) == set(e1)
    for input_id, row in e0.items():  # the same sample, in another batch order: same id, same scores
        np.testing.assert_allclose(row["logits"], e1[input_id]["logits"], rtol=1e-5, atol=1e-6)


# -- import hygiene --------------------------------------------------------------------------------
def test_import_pulls_in_no_framework():
    code = (
        "import sys\n"
        "import mldbg_callbacks\n"
        "from mldbg_callbacks.training import ClassificationTracer\n"
        "import mldbg_callbacks.store, mldbg_callbacks.core.trace_core, mldbg_callbacks.tasks.classification\n"
        "import mldbg_callbacks.integrations\n"
        "heavy = {'torch', 'keras', 'tensorflow', 'jax', 'transformers', 'lightning'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_plain_callable_model(store_dir, rng):
    weights = rng.standard_normal((6, 3)).astype(np.float32)
    tracer = ClassificationTracer(lambda x: x @ weights, MODEL, VERSION)
    x = rng.standard_normal((5, 6)).astype(np.float32)
    out = tracer(x, np.array([0, 1, 2, 0, 1]), input_ids=np.arange(5))
    np.testing.assert_array_equal(out, x @ weights)
    tracer.wait_for_save()
    np.testing.assert_array_equal(stored_matrix(stored_rows(store_dir), "logits", range(5)), x @ weights)
    with pytest.raises(ValueError, match="PyTorch or Keras"):
        ClassificationTracer(lambda x: x, MODEL, VERSION, feature_layer="fc")
