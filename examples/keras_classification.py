"""Trace a small Keras 3 classifier on scikit-learn's digits during ``model.fit``, then evaluate it.

Offline and CPU-only. Keras runs on the torch backend unless KERAS_BACKEND is already set:

    python examples/keras_classification.py --epochs 5 --store ./mldbg
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")  # Keras reads it once, at import time

import argparse  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

from mldbg_callbacks.evaluator import Evaluator  # noqa: E402
from mldbg_callbacks.integrations.keras import MLDebuggerCallback  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--store", default=None, help="store directory (default: MLD_HOME, else ./mldbg)")
    parser.add_argument("--model-name", default="digits_keras")
    parser.add_argument("--version-name", default="v1")
    args = parser.parse_args(argv)

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    ids = np.arange(len(x))  # the sample's row in load_digits(): the same id in every epoch and split
    x_train, x_val, y_train, y_val, id_train, id_val = train_test_split(
        x, digits.target, ids, test_size=0.25, random_state=0, stratify=digits.target)

    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(32, activation="relu"),  # its output is what the callback stores as features
        keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])

    # Keras gives callbacks no predictions: at each epoch's end the callback predicts over `data` itself.
    callback = MLDebuggerCallback(args.model_name, args.version_name, store=args.store,
                                  data={"train": (x_train, y_train, id_train), "val": (x_val, y_val, id_val)})
    model.fit(x_train, y_train, batch_size=64, epochs=args.epochs, validation_data=(x_val, y_val), verbose=2,
              callbacks=[callback])
    print(f"label tracker: {callback.label_tracker_path}", flush=True)

    result = Evaluator(model_name=args.model_name, version_name=args.version_name,
                       store=args.store).request_evaluation()
    print(result.metrics_summary().to_string(index=False))


if __name__ == "__main__":
    main()
