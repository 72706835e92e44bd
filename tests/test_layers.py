"""Quant layers: Keras parity, serialization, save/reload and tf.distribute."""

import inspect

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfquant import quantizers
from tfquant.layers import QuantActivation, QuantConv2D, QuantDense, QuantDepthwiseConv2D

TWINS = [
    (QuantConv2D, keras.layers.Conv2D),
    (QuantDepthwiseConv2D, keras.layers.DepthwiseConv2D),
    (QuantDense, keras.layers.Dense),
]


@pytest.mark.parametrize("quant_class,keras_class", TWINS)
def test_signature_matches_keras_twin(quant_class, keras_class):
    ours = inspect.signature(quant_class.__init__).parameters
    theirs = inspect.signature(keras_class.__init__).parameters
    assert list(ours)[: len(theirs) - 1] == list(theirs)[:-1]  # all but **kwargs, same order
    for name, parameter in theirs.items():
        assert ours[name].default == parameter.default, name
    assert {"kernel_quantizer", "input_quantizer"} <= set(ours)


def _layer(quant_class, **quantizer_args):
    if quant_class is QuantDense:
        return QuantDense(5, **quantizer_args)
    if quant_class is QuantConv2D:
        return QuantConv2D(4, 3, padding="same", **quantizer_args)
    return QuantDepthwiseConv2D(3, depth_multiplier=2, **quantizer_args)


def _input_shape(quant_class):
    return (2, 7) if quant_class is QuantDense else (2, 6, 6, 3)


@pytest.mark.parametrize("quant_class,keras_class", TWINS)
def test_without_quantizers_equals_keras_twin(quant_class, keras_class):
    x = np.random.default_rng(0).normal(size=_input_shape(quant_class)).astype("float32")
    ours = _layer(quant_class)
    ours.build(x.shape)
    config = {k: v for k, v in ours.get_config().items() if "quantizer" not in k}
    twin = keras_class.from_config(config)
    twin.build(x.shape)
    twin.set_weights(ours.get_weights())
    np.testing.assert_allclose(ours(x).numpy(), twin(x).numpy(), atol=1e-6)


@pytest.mark.parametrize("quant_class,_", TWINS)
@pytest.mark.parametrize("method", ["qil", "lsq", "minmax"])
def test_kernel_is_quantized_on_grid(quant_class, _, method):
    layer = _layer(quant_class, kernel_quantizer={"class_name": method, "config": {"bits": 3}})
    layer.build(_input_shape(quant_class))
    kernel = layer.quantized_kernel().numpy()
    form = layer.kernel_quantizer.inference_form(layer.kernel.numpy())
    codes = form.codes(kernel)
    np.testing.assert_allclose(codes * form.scale, kernel, rtol=1e-5, atol=1e-7)
    assert len(np.unique(codes)) <= 7
    assert codes.min() >= -3 and codes.max() <= 3


@pytest.mark.parametrize("quant_class,_", TWINS)
def test_config_round_trip(quant_class, _):
    layer = _layer(
        quant_class,
        kernel_quantizer={"class_name": "qil", "config": {"bits": 3}},
        input_quantizer="lsq",
    )
    config = layer.get_config()
    clone = quant_class.from_config(config)
    assert clone.get_config() == config
    assert isinstance(clone.kernel_quantizer, quantizers.QILQuantizer)
    assert clone.kernel_quantizer.bits == 3 and clone.kernel_quantizer.signed
    assert isinstance(clone.input_quantizer, quantizers.LSQQuantizer)
    assert not clone.input_quantizer.signed


def _small_model():
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            QuantConv2D(
                6,
                3,
                kernel_quantizer={"class_name": "qil", "config": {"bits": 4}},
                input_quantizer="minmax",
            ),
            keras.layers.BatchNormalization(),
            QuantActivation("relu", quantizer={"class_name": "qil", "config": {"bits": 4}}),
            QuantDepthwiseConv2D(3, kernel_quantizer="lsq"),
            QuantActivation("relu", quantizer="pact"),
            keras.layers.Flatten(),
            QuantDense(10, kernel_quantizer="minmax"),
        ]
    )


def test_keras_save_and_reload_identical(tmp_path):
    model = _small_model()
    x = np.random.default_rng(1).random((16, 8, 8, 1)).astype("float32")
    y = np.arange(16) % 10
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=1, verbose=0)  # moves every parameter off its initial value
    path = str(tmp_path / "m.keras")
    model.save(path)
    reloaded = keras.models.load_model(path)  # no custom_objects needed
    np.testing.assert_array_equal(model.predict(x, verbose=0), reloaded.predict(x, verbose=0))
    assert [w.name for w in model.weights] == [w.name for w in reloaded.weights]
    for a, b in zip(model.weights, reloaded.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_quant_activation_skips_redundant_relu_with_same_output():
    x = tf.constant(np.linspace(-3, 3, 61, dtype="float32"))
    skipping = QuantActivation("relu", quantizer="lsq")
    assert skipping._skip_activation
    skipping.build(x.shape)
    reference = skipping.quantizer(tf.nn.relu(x))
    np.testing.assert_array_equal(skipping(x).numpy(), reference.numpy())


def test_quant_activation_rejects_unknown_activation():
    with pytest.raises(ValueError, match="'tanh'"):
        QuantActivation("tanh", quantizer="minmax")


def test_unknown_quantizer_name_is_named():
    with pytest.raises(ValueError, match="'nosuch'"):
        QuantConv2D(4, 3, kernel_quantizer="nosuch")


def _model_without_batch_statistics():
    # BatchNormalization and min/max ranges use per-replica batch statistics,
    # which legitimately differ from one device's; every learned quantizer is here.
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            QuantConv2D(6, 3, kernel_quantizer="qil", input_quantizer="lsq"),
            QuantActivation("relu", quantizer="qil"),
            QuantDepthwiseConv2D(3, kernel_quantizer="lsq"),
            QuantActivation("relu", quantizer="pact"),
            keras.layers.Flatten(),
            QuantDense(10, kernel_quantizer={"class_name": "qil", "config": {"learn_gamma": True}}),
        ]
    )


def _train_loss(strategy, x, y, steps=3):
    keras.utils.set_random_seed(3)
    with strategy.scope():
        model = _model_without_batch_statistics()
        model.compile(
            optimizer=keras.optimizers.SGD(0.05),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    history = model.fit(x, y, batch_size=16, epochs=steps, shuffle=False, verbose=0)
    return history.history["loss"], [w.numpy() for w in model.weights]


def test_mirrored_strategy_matches_one_device(cpu_devices, cpu_mirrored):
    x = np.random.default_rng(2).random((32, 8, 8, 1)).astype("float32")
    y = np.arange(32) % 10
    single, single_weights = _train_loss(tf.distribute.OneDeviceStrategy(cpu_devices[0]), x, y)
    mirrored, mirrored_weights = _train_loss(cpu_mirrored, x, y)
    np.testing.assert_allclose(single, mirrored, atol=1e-5)
    for a, b in zip(single_weights, mirrored_weights, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_quant_add_quantizes_the_sum_and_reloads_with_its_integer_add(tmp_path):
    from tfquant.layers import QuantAdd
    from tfquant.ops import requantize as requantize_ops

    inputs = [keras.Input((6,)), keras.Input((6,))]
    add = QuantAdd(quantizer={"class_name": "minmax", "config": {"bits": 8}}, name="sum")
    model = keras.Model(inputs, add(inputs))
    a = (np.random.default_rng(0).integers(-100, 100, (32, 6)) * 0.02).astype(np.float32)
    b = (np.random.default_rng(1).integers(-100, 100, (32, 6)) * 0.03).astype(np.float32)
    add.quantizer.initialize(a + b)
    step = float(add.quantizer.inference_form().scale)
    plain = model.predict([a, b], verbose=0)
    np.testing.assert_allclose(plain, add.quantizer(a + b, training=False), atol=1e-6)
    multipliers, shift = requantize_ops.add_multipliers([0.02, 0.03], step)
    spec = {"input_scales": [0.02, 0.03], "multipliers": multipliers, "shift": shift}
    add.set_requantization({**spec, "output_scale": step})
    exact = keras.Model(inputs, add(inputs)).predict([a, b], verbose=0)
    expected = requantize_ops.add([a, b], [0.02, 0.03], multipliers, shift, step).numpy()
    np.testing.assert_allclose(exact, add.quantizer(expected, training=False), atol=1e-6)
    path = tmp_path / "add.keras"
    model.save(path)
    restored = keras.models.load_model(path).get_layer("sum")
    assert restored.requantization == add.requantization
    with pytest.raises(ValueError, match="invalid requantization"):
        add.set_requantization({**spec, "output_scale": step, "shift": 40})


@pytest.mark.parametrize("layer_class", [QuantConv2D, QuantDepthwiseConv2D, QuantDense])
def test_unsigned_kernel_quantizer_object_is_refused(layer_class):
    """A quantizer object keeps the signedness it was built with; an unsigned
    one would zero every negative weight."""
    arguments = {"kernel_size": 3} if layer_class is not QuantDense else {}
    if layer_class is QuantConv2D:
        arguments["filters"] = 4
    if layer_class is QuantDense:
        arguments["units"] = 4
    for unsigned in (quantizers.PACTQuantizer(bits=4), quantizers.LSQQuantizer(bits=4)):
        with pytest.raises(ValueError, match="'weights_layer': kernel_quantizer .* unsigned"):
            layer_class(kernel_quantizer=unsigned, name="weights_layer", **arguments)
    signed = quantizers.LSQQuantizer(bits=4, signed=True)
    assert layer_class(kernel_quantizer=signed, **arguments).kernel_quantizer is signed


def test_quant_multiply_and_sigmoid_reload_with_their_integer_forms(tmp_path):
    from tfquant.layers import QuantMultiply
    from tfquant.quantizers import FixedRangeQuantizer

    inputs = keras.Input((4, 4, 6))
    gate = QuantActivation("sigmoid", quantizer=FixedRangeQuantizer(), name="gate")(inputs)
    product = QuantMultiply(quantizer={"class_name": "minmax", "config": {"signed": True}})
    model = keras.Model(inputs, product([inputs, gate]))
    x = (np.random.default_rng(0).integers(-100, 100, (8, 4, 4, 6)) * 0.05).astype(np.float32)
    product.quantizer.initialize(x)
    gate_layer = model.get_layer("gate")
    np.testing.assert_array_equal(gate_layer.quantizer.inference_form().scale, np.float32(1 / 256))
    gate_layer.set_requantization({"input_scale": 0.05})
    step = float(product.quantizer.inference_form().scale)
    product.set_requantization(
        {"input_scales": [0.05, 1 / 256], "output_scale": step, "rounding": "upward"}
    )
    before = model.predict(x, verbose=0)
    path = tmp_path / "gated.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    np.testing.assert_array_equal(restored.predict(x, verbose=0), before)
    assert restored.layers[-1].requantization == product.requantization
    with pytest.raises(ValueError, match="invalid requantization"):
        product.set_requantization({"input_scales": [0.05], "output_scale": step, "rounding": "up"})
    with pytest.raises(ValueError, match="sigmoid's requantization"):
        gate_layer.set_requantization({"scale": 0.05})
    with pytest.raises(ValueError, match="low <= 0 < high"):
        FixedRangeQuantizer(low=0.5, high=1.0)
