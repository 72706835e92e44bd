"""End-to-end check of `tfquant.compat.tfmot`: annotate, train, convert, run.

    TF_USE_LEGACY_KERAS=1 python -m tfquant.compat._tfmot_check [qil lsq cpq]

For each method builds a tiny tf_keras model (Conv2D with 4 filters on 8x8x1
inputs, ReLU, Flatten, Dense with 3 units), quantizes the Conv2D at W4A4 and
the Dense kernel at 4 bits (float logits) with `quantize_annotate_layer` and
`quantize_apply`, trains a few steps on random data, converts the model with
the TFLite converter (`Optimize.DEFAULT`) and runs one batch through the
interpreter. Prints one JSON line: `{"status": "ok", "methods": {method:
{...}}, "bits_errors": [...]}`, or `{"status": "error", ...}`.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

_STEPS = 3
_BATCH = 8
_SEED = 0


def _parameter_values(model) -> dict[str, list[float]]:
    """The quantizer variables of the model by name (interval, step, ...)."""
    keys = ("_interval", "_step", "_log_sigma", "_gamma")
    out = {}
    for variable in model.variables:
        name = variable.name.split(":")[0]
        leaf = name.split("/")[-1]
        if leaf != "optimizer_step" and leaf.endswith(keys):
            out[name] = [float(v) for v in variable.numpy().reshape(-1)]
    return out


def _interpreter(model_bytes):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter  # noqa: N806
    return Interpreter(model_content=model_bytes)


def run_method(method: str) -> dict:
    """Annotates, trains, converts and runs the tiny model with `method`."""
    import numpy as np
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot

    from tfquant.compat import tfmot as compat

    keras = tf.keras
    tf.keras.utils.set_random_seed(_SEED)
    annotate = tfmot.quantization.keras.quantize_annotate_layer
    inputs = keras.Input((8, 8, 1))
    x = annotate(
        keras.layers.Conv2D(4, 3, name="conv"),
        quantize_config=compat.learned_quantize_config(method, 4, 4),
    )(inputs)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Flatten()(x)
    outputs = annotate(
        keras.layers.Dense(3, name="dense"),
        quantize_config=compat.learned_quantize_config(method, 4, None),
    )(x)
    annotated = keras.Model(inputs, outputs)
    with compat.quantize_scope():
        model = tfmot.quantization.keras.quantize_apply(annotated)

    rng = np.random.default_rng(_SEED)
    images = rng.uniform(0.0, 1.0, (_BATCH, 8, 8, 1)).astype(np.float32)
    labels = rng.integers(0, 3, _BATCH)
    model.compile(
        optimizer=keras.optimizers.Adam(0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    start = time.perf_counter()
    model(images, training=False)
    before = _parameter_values(model)
    losses = []
    for _ in range(_STEPS):
        losses.append(float(model.train_on_batch(images, labels)))
    after = _parameter_values(model)
    changed = sorted(name for name in before if before[name] != after[name])
    train_seconds = time.perf_counter() - start

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    model_bytes = converter.convert()
    convert_seconds = time.perf_counter() - start - train_seconds
    interpreter = _interpreter(model_bytes)
    interpreter.allocate_tensors()
    input_detail = interpreter.get_input_details()[0]
    output_detail = interpreter.get_output_details()[0]
    batch = images[:1]
    if tuple(input_detail["shape"]) != batch.shape:
        interpreter.resize_tensor_input(input_detail["index"], batch.shape)
        interpreter.allocate_tensors()
    interpreter.set_tensor(input_detail["index"], batch)
    interpreter.invoke()
    lite = interpreter.get_tensor(output_detail["index"])
    keras_out = model(batch, training=False).numpy()
    return {
        "losses": losses,
        "finite": bool(np.all(np.isfinite(losses))),
        "parameters": sorted(before),
        "changed": changed,
        "tflite_bytes": len(model_bytes),
        "tflite_output_shape": list(lite.shape),
        "tflite_finite": bool(np.all(np.isfinite(lite))),
        "tflite_max_abs_diff": float(np.max(np.abs(lite - keras_out))),
        "keras_output_scale": float(np.max(np.abs(keras_out))),
        "train_seconds": train_seconds,
        "convert_seconds": convert_seconds,
    }


def bits_errors() -> list[str]:
    """The messages of the ValueErrors raised for out-of-range bit widths."""
    from tfquant.compat import tfmot as compat

    messages = []
    for name in ("QILWeightQuantizer", "LSQActivationQuantizer", "CPQWeightQuantizer"):
        for bits in (1, 9):
            try:
                getattr(compat, name)(bits=bits)
            except ValueError as error:
                messages.append(f"{name}: {error}")
            else:
                messages.append(f"{name}: no error for bits={bits}")
    return messages


def main(argv: list[str]) -> int:
    methods = argv or ["qil", "lsq", "cpq"]
    if os.environ.get("TF_USE_LEGACY_KERAS") != "1":
        print(json.dumps({"status": "error", "error": "run with TF_USE_LEGACY_KERAS=1"}))
        return 2
    result: dict = {"status": "ok", "methods": {}}
    try:
        for method in methods:
            start = time.perf_counter()
            result["methods"][method] = run_method(method)
            result["methods"][method]["seconds"] = time.perf_counter() - start
        result["bits_errors"] = bits_errors()
    except Exception as error:  # reported to the parent process as JSON
        result = {"status": "error", "error": repr(error), "traceback": traceback.format_exc()}
    print(json.dumps(result))
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
