"""Keras's own layer conformance checks on every tfquant layer and quantizer:
config round trip, serialization, a training step, and a mixed_float16
policy (output in the compute dtype, variables in float32); plus the same
dtype contract under mixed_bfloat16, with the quantized values of the
float32 layer."""

import keras
import numpy as np
import pytest
from keras.src.testing import TestCase

from tfquant import layers as TL
from tfquant import quantizers

_CHECKER = TestCase("run_layer_test")


def _signed(name: str) -> bool:
    return name != "pact"  # PACT clips at 0: unsigned only


@pytest.mark.parametrize("name", quantizers.registered_names())
def test_quantizer_passes_keras_layer_checks(name):
    quantizer = quantizers.get(name, signed=_signed(name))
    config = quantizers.serialize(quantizer)["config"]
    _CHECKER.run_layer_test(
        type(quantizer),
        config,
        input_shape=(2, 4, 4, 3),
        expected_output_shape=(2, 4, 4, 3),
        custom_objects={type(quantizer).__name__: type(quantizer)},
    )


LAYERS = [
    (TL.QuantConv2D, {"filters": 4, "kernel_size": 3, "input_quantizer": "lsq"}, (2, 6, 6, 3)),
    (TL.QuantConv2D, {"filters": 4, "kernel_size": 3, "kernel_quantizer": "qil"}, (2, 6, 6, 3)),
    (TL.QuantDepthwiseConv2D, {"kernel_size": 3, "kernel_quantizer": "lsq"}, (2, 6, 6, 3)),
    (TL.QuantDense, {"units": 5, "kernel_quantizer": "dq"}, (2, 7)),
    (TL.QuantDense, {"units": 5, "kernel_quantizer": "cpq"}, (2, 7)),
    (TL.QuantActivation, {"activation": "relu", "quantizer": "pact"}, (2, 6, 6, 3)),
    (TL.QuantActivation, {"activation": "sigmoid", "quantizer": "fixed_range"}, (2, 6, 6, 3)),
    (TL.QuantAveragePooling2D, {"pool_size": 2, "padding": "same"}, (2, 5, 5, 3)),
    (TL.QuantAdd, {"quantizer": "lsq"}, ((2, 4, 4, 3), (2, 4, 4, 3))),
    (TL.QuantConcatenate, {"quantizer": "minmax"}, ((2, 4, 4, 3), (2, 4, 4, 3))),
    (TL.QuantMultiply, {"quantizer": "minmax"}, ((2, 4, 4, 3), (2, 4, 1, 3))),
]


def _ids(case):
    cls, kwargs, _ = case
    return cls.__name__ + "-" + "-".join(str(v) for v in kwargs.values() if isinstance(v, str))


@pytest.mark.parametrize("case", LAYERS, ids=[_ids(c) for c in LAYERS])
def test_layer_passes_keras_layer_checks(case):
    cls, kwargs, shape = case
    _CHECKER.run_layer_test(cls, kwargs, input_shape=shape, custom_objects={cls.__name__: cls})


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("case", LAYERS, ids=[_ids(c) for c in LAYERS])
def test_mixed_policy_keeps_float32_math(case, policy):
    """Under a mixed policy a layer returns its compute dtype and keeps
    float32 variables, and its quantized values are those of the float32
    layer on the same (16-bit representable) input: the quantizer's math
    stays in float32."""
    cls, kwargs, shape = case
    rng = np.random.default_rng(0)
    shapes = shape if isinstance(shape[0], tuple) else (shape,)
    compute = policy.split("_")[1]
    # A batch of 256 within the grids' range: enough values near half steps.
    values = [0.3 * rng.normal(size=(256, *s[1:])).astype("float32") for s in shapes]
    inputs = [
        keras.ops.convert_to_numpy(keras.ops.cast(keras.ops.cast(v, compute), "float32"))
        for v in values
    ]
    single = inputs if len(inputs) > 1 else inputs[0]
    reference = cls(**kwargs)
    expected = keras.ops.convert_to_numpy(reference(single))
    mixed = cls(**kwargs, dtype=policy)
    mixed(single)  # builds it
    mixed.set_weights(reference.get_weights())
    outputs = mixed(single)
    assert keras.backend.standardize_dtype(outputs.dtype) == compute
    assert all(keras.backend.standardize_dtype(w.dtype) == "float32" for w in mixed.weights)
    if cls in (TL.QuantActivation, TL.QuantAdd, TL.QuantConcatenate, TL.QuantMultiply):
        # No 16-bit kernel arithmetic before the quantizer: the same codes,
        # up to the rounding of the result to the compute dtype.
        rounded = keras.ops.convert_to_numpy(
            keras.ops.cast(keras.ops.cast(expected, compute), "float32")
        )
        got = keras.ops.convert_to_numpy(keras.ops.cast(outputs, "float32"))
        np.testing.assert_array_equal(got, rounded)
    if cls in (TL.QuantAdd, TL.QuantMultiply):
        # The check has teeth: the sum or product computed in 16 bits lands
        # on other codes.
        a, b = (keras.ops.cast(v, compute) for v in inputs)
        merged = a + b if cls is TL.QuantAdd else a * b
        naive = reference.quantizer(keras.ops.cast(merged, "float32"))
        assert not np.array_equal(keras.ops.convert_to_numpy(naive), expected)


@pytest.mark.parametrize("name", quantizers.registered_names())
def test_quantizer_takes_float64_input(name):
    """NumPy arrays are float64: quantized in float32, as a float32 input."""
    quantizer = quantizers.get(name, signed=_signed(name))
    values = np.random.default_rng(1).normal(size=(2, 4, 4, 3))
    outputs = quantizer(values)
    assert keras.backend.standardize_dtype(outputs.dtype) == "float32"
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(outputs),
        keras.ops.convert_to_numpy(quantizer(values.astype("float32"))),
    )
