"""Property: on random small graphs the integer file computes the Keras model's codes.

Each graph is a random chain of Conv2D / DepthwiseConv2D (with or without
BatchNormalization), residual blocks (Add), ReLU or ReLU6, BatchNormalization
that follows no kernel (pre-activation, or alone), concatenations, a result
read by two layers, max and average pooling
and a Dense head (average pooling 2x2, or 3x3 stride 1 SAME as in Inception), with
random weights, BatchNorm statistics, bit widths (2..8) and
weight storage (INT4 where the bits allow, else INT8). It is quantized with
`quantize_model`, exported and verified with LiteRT's default runtime on this
host's kernels, and must give identical output codes on every input.
"""

import keras
import numpy as np
import pytest

import tfquant
from tfquant import lite
from tfquant.layers import QuantActivation, QuantAdd, QuantConcatenate, QuantMultiply
from tfquant.lite import verify

L = keras.layers
METHODS = ("lsq", "qil", "minmax", "pact")


def _random_model(rng: np.random.Generator) -> keras.Model:
    size = int(rng.choice([6, 8, 10]))
    inputs = keras.Input((size, size, int(rng.choice([1, 3]))))
    x = inputs
    for _ in range(int(rng.integers(2, 6))):
        kind = rng.choice(
            [
                "conv",
                "depthwise",
                "residual",
                "maxpool",
                "avgpool",
                "preact",
                "affine",
                "branch",
                "concat",
                "swish",
                "gate",
            ]
        )
        relu = L.ReLU(6.0) if rng.integers(2) else L.ReLU()
        spatial = int(x.shape[1])
        if kind in ("maxpool", "avgpool") and spatial >= 4:
            padding = str(rng.choice(["valid", "same"]))
            if kind == "avgpool" and rng.integers(2):
                # Windows that reach into the padding: AVERAGE_POOL_2D.
                x = L.AveragePooling2D(3, strides=1, padding="same")(x)
                continue
            pool = L.MaxPooling2D if kind == "maxpool" else L.AveragePooling2D
            x = pool(2, padding=padding)(x)
            continue
        if kind == "branch":
            # One result read by two layers: it gets one grid.
            y = L.Conv2D(int(x.shape[-1]), 1)(x)
            y = L.BatchNormalization()(y) if rng.integers(2) else y
            x = L.Add()([relu(y), L.MaxPooling2D(3, strides=1, padding="same")(y)])
            continue
        if kind == "concat":
            y = relu(L.Conv2D(int(rng.integers(2, 6)), 3, padding="same")(x))
            x = L.Concatenate()([x, y] if rng.integers(2) else [y, x, y])
            continue
        if kind == "swish":
            if rng.integers(2):
                x = L.Conv2D(int(rng.integers(3, 9)), 3, padding="same", activation="swish")(x)
            else:
                x = L.Activation("swish")(L.BatchNormalization()(x))
            continue
        if kind == "gate":
            # Squeeze-excite: a sigmoid per channel, broadcast by Multiply.
            channels = int(x.shape[-1])
            gate = L.Reshape((1, 1, channels))(L.GlobalAveragePooling2D()(x))
            gate = L.Conv2D(channels, 1, activation="sigmoid")(gate)
            x = L.Multiply()([x, gate])
            continue
        if kind in ("preact", "affine"):
            x = L.BatchNormalization()(x)
            x = relu(x) if kind == "preact" else x
            continue
        if kind == "residual":
            y = L.Conv2D(int(x.shape[-1]), 3, padding="same", use_bias=False)(x)
            y = L.BatchNormalization()(y)
            x = relu(L.Add()([x, y]))
            continue
        if kind == "depthwise":
            x = L.DepthwiseConv2D(3, padding="same", use_bias=bool(rng.integers(2)))(x)
        else:
            kernel = int(rng.choice([1, 3]))
            strides = int(rng.choice([1, 2])) if spatial >= 4 else 1
            x = L.Conv2D(int(rng.integers(3, 9)), kernel, strides=strides, padding="same")(x)
        if rng.integers(2):
            x = L.BatchNormalization()(x)
        x = relu(x)
    if rng.integers(2):
        x = L.GlobalAveragePooling2D()(x)
    else:
        x = L.Flatten()(x)
    if rng.integers(2):
        x = L.ReLU()(L.Dense(int(rng.integers(4, 12)))(x))
    return keras.Model(inputs, L.Dense(5)(x))


def randomize_batch_norm(model: keras.Model, rng: np.random.Generator) -> None:
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            channels = layer.gamma.shape[0]
            layer.gamma.assign(rng.uniform(0.5, 1.5, channels) * rng.choice([-1, 1], channels))
            layer.beta.assign(rng.normal(0, 0.3, channels))
            layer.moving_mean.assign(rng.normal(0, 0.3, channels))
            layer.moving_variance.assign(rng.uniform(0.3, 2.0, channels))


def move_learned_parameters(model: keras.Model, rng: np.random.Generator) -> None:
    """Moves every quantizer's learned values as fine-tuning would: each
    element by its own factor, so a QIL interval's center and distance part
    (its activations' offset c - d is no longer 0), and LSQ steps and PACT
    clips change."""
    for variable in model.trainable_weights:
        if "_quantizer" in variable.path:
            value = variable.numpy()
            variable.assign(value * rng.uniform(0.7, 1.3, value.shape).astype(value.dtype))


def check_random_graph(seed: int) -> dict:
    """Builds, quantizes and exports graph `seed`; returns the verification."""
    rng = np.random.default_rng(seed)
    keras.utils.set_random_seed(seed)
    while True:
        model = _random_model(rng)
        randomize_batch_norm(model, rng)
        x = rng.normal(0.5, 0.5, (96, *model.inputs[0].shape[1:])).astype(np.float32)
        bits = int(rng.integers(2, 9))
        method = str(rng.choice(METHODS))
        scheme = {
            "weights": "lsq" if method in ("pact", "minmax") else method,
            "activations": method,
            "bits": bits,
        }
        qmodel = tfquant.quantize_model(model, scheme, calibration_data=x[:64])
        if rng.integers(2):
            move_learned_parameters(qmodel, rng)
        # Random weights can leave a layer's output (nearly) constant, all dead
        # ReLUs: it has no grid to quantize onto (export says so, see
        # tests/test_export.py), and the graph is drawn again.
        steps = [
            float(np.ravel(layer.quantizer.inference_form().scale)[0])
            for layer in qmodel.layers
            if isinstance(layer, (QuantActivation, QuantAdd, QuantConcatenate, QuantMultiply))
        ]
        if qmodel.predict(x, verbose=0).std() > 1e-3 and min(steps) > 1e-5:
            break
    result = lite.export_model(
        qmodel,
        x,
        int4_weights=bool(rng.integers(2)),
        target=verify.host_target(),
        runtimes=("default",),
        allow_mismatch=True,
    )
    return {"scheme": scheme, **result.report["verification"]}


@pytest.mark.parametrize("seed", range(6))
def test_random_graph_exports_code_for_code(seed):
    found = check_random_graph(seed)
    assert found["identical_output_codes"] == 1.0, found
    assert found["max_output_step_difference"] == 0, found


@pytest.mark.slow
@pytest.mark.parametrize("chunk", range(10))
def test_many_random_graphs_export_code_for_code(chunk):
    """200 graphs in all, in chunks that run in parallel."""
    failures = []
    for seed in range(100 + 20 * chunk, 120 + 20 * chunk):
        found = check_random_graph(seed)
        if found["identical_output_codes"] != 1.0:
            failures.append((seed, found))
    assert not failures, failures
