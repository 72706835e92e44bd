"""quantize_model and schemes."""

import keras
import numpy as np
import pytest

import tfquant
from tfquant.layers import QuantActivation, QuantAdd, QuantConv2D, QuantDense

L = keras.layers


def _residual_model():
    inputs = keras.Input((8, 8, 1))
    x = L.Conv2D(8, 3, padding="same")(inputs)
    x = L.BatchNormalization()(x)
    x = L.ReLU()(x)
    y = L.Conv2D(8, 3, padding="same", use_bias=False)(x)
    y = L.BatchNormalization()(y)
    x = L.Add()([x, y])
    x = L.ReLU()(x)
    x = L.DepthwiseConv2D(3, activation="relu")(x)
    x = L.MaxPooling2D()(x)
    x = L.GlobalAveragePooling2D()(x)
    outputs = L.Dense(10)(x)
    return keras.Model(inputs, outputs)


@pytest.fixture
def data():
    return np.random.default_rng(0).random((64, 8, 8, 1)).astype("float32")


def _quantizers_of(model):
    found = []
    for layer in model.layers:
        for attribute in ("kernel_quantizer", "input_quantizer", "quantizer"):
            quantizer = getattr(layer, attribute, None)
            if quantizer is not None:
                found.append((layer.name, attribute, quantizer))
    return found


def test_residual_functional_model(data):
    model = _residual_model()
    qmodel = tfquant.quantize_model(model, "qil_w4a4", calibration_data=data)
    kinds = [type(layer).__name__ for layer in qmodel.layers]
    assert kinds.count("QuantConv2D") == 2
    assert kinds.count("QuantDepthwiseConv2D") == 1
    assert kinds.count("QuantDense") == 1
    assert kinds.count("QuantAdd") == 1
    found = _quantizers_of(qmodel)
    kernel_bits = [q.bits for _, attr, q in found if attr == "kernel_quantizer"]
    assert kernel_bits == [8, 4, 4, 8]  # first and last layers at 8 bits
    # The Add's non-quantized input (conv + BN) is requantized, and its sum gets
    # its own 8-bit grid (a QuantAdd), before the ReLU's quantizer, whatever the
    # method.
    for scheme in ("qil_w4a4", "lsq_w4a4"):
        quantized = (
            qmodel
            if scheme == "qil_w4a4"
            else tfquant.quantize_model(model, scheme, calibration_data=data)
        )
        add = next(layer for layer in quantized.layers if isinstance(layer, L.Add))
        add_inputs = [t._keras_history.operation for t in add.input]
        assert sum(isinstance(op, QuantActivation) for op in add_inputs) == 2
        assert isinstance(add, QuantAdd) and add.quantizer.bits == 8, scheme
        following = [
            layer
            for layer in quantized.layers
            if isinstance(layer, QuantActivation) and layer.input._keras_history.operation is add
        ]
        assert [layer.activation_name for layer in following] == ["relu"], scheme
    # Weights copied, quantizers initialized: at 8 bits, close to the float model.
    q8 = tfquant.quantize_model(
        model, {"weights": "lsq", "activations": "lsq", "bits": 8}, calibration_data=data
    )
    reference = model.predict(data, verbose=0)
    np.testing.assert_allclose(
        q8.predict(data, verbose=0), reference, atol=0.05 * np.abs(reference).max()
    )
    # And the original model is untouched.
    assert not any(isinstance(layer, QuantConv2D) for layer in model.layers)


def test_model_trains_and_reloads(tmp_path, data):
    qmodel = tfquant.quantize_model(_residual_model(), "lsq_w4a4", calibration_data=data)
    qmodel.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    qmodel.fit(data, np.arange(64) % 10, epochs=1, verbose=0)
    qmodel.save(tmp_path / "q.keras")
    reloaded = keras.models.load_model(tmp_path / "q.keras")
    np.testing.assert_array_equal(
        qmodel.predict(data, verbose=0), reloaded.predict(data, verbose=0)
    )


def test_sequential_with_inline_activations_and_softmax(data):
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            L.Conv2D(4, 3, activation="relu"),
            L.Flatten(),
            L.Dense(10, activation="softmax"),
        ]
    )
    qmodel = tfquant.quantize_model(model, "pact_w4a4", calibration_data=data)
    kinds = [type(layer).__name__ for layer in qmodel.layers]
    assert kinds == [
        "InputLayer",
        "QuantConv2D",
        "QuantActivation",
        "Flatten",
        "QuantDense",
        "QuantActivation",
        "QuantActivation",
    ]
    relu = qmodel.layers[2]
    assert type(relu.quantizer).__name__ == "PACTQuantizer"
    dense = qmodel.layers[4]
    assert isinstance(dense, QuantDense) and dense.input_quantizer is None  # Flatten of a grid
    # The softmax on the int8 SOFTMAX's grid (1/256) in inference, float in training.
    softmax = qmodel.layers[6]
    assert softmax.activation_name == "softmax" and softmax.quantizer.inference_only
    probabilities = qmodel.predict(data, verbose=0)
    np.testing.assert_array_equal(probabilities * 256, np.round(probabilities * 256))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=10 / 512)
    in_training = keras.ops.convert_to_numpy(qmodel(data, training=True))
    np.testing.assert_allclose(in_training.sum(axis=1), 1.0, rtol=1e-5)


def test_activation_quantizers_calibrated(data):
    qmodel = tfquant.quantize_model(_residual_model(), "qil_w4a4", calibration_data=data)
    relu = next(
        layer
        for layer in qmodel.layers
        if isinstance(layer, QuantActivation) and type(layer.quantizer).__name__ == "QILQuantizer"
    )
    # Default interval is [0, 2]; calibration moves it to the data.
    assert relu.quantizer.parameters()["high"] != pytest.approx(2.0)


def test_unsupported_layer_is_named():
    model = keras.Sequential(
        [keras.Input((8,)), L.Dense(4), L.LayerNormalization(name="my_norm"), L.Dense(2)]
    )
    with pytest.raises(ValueError, match="'my_norm'.*LayerNormalization"):
        tfquant.quantize_model(model, "qil_w4a4")


def test_unsupported_activation_is_named():
    model = keras.Sequential(
        [keras.Input((8,)), L.Dense(4, activation="tanh", name="t"), L.Dense(2)]
    )
    with pytest.raises(ValueError, match="'t'.*'tanh'"):
        tfquant.quantize_model(model, "qil_w4a4")


def test_already_quantized_model_is_rejected(data):
    qmodel = tfquant.quantize_model(_residual_model(), "qil_w4a4", calibration_data=data)
    with pytest.raises(ValueError, match="already quantized"):
        tfquant.quantize_model(qmodel, "qil_w4a4")


def test_nan_weights_name_the_layer():
    model = keras.Sequential([keras.Input((8,)), L.Dense(4, name="broken"), L.Dense(2)])
    kernel = model.layers[0].kernel
    kernel.assign(np.full(kernel.shape, np.nan, dtype="float32"))
    with pytest.raises(ValueError, match="'broken'.*NaN"):
        tfquant.quantize_model(model, "lsq_w4a4")


@pytest.mark.parametrize(
    "scheme,message",
    [
        ("qil_w9a4", "got 9"),
        ("qil_w1a1", "got 1"),
        ("nosuch_w4a4", "'nosuch'"),
        ("four bits please", "cannot parse"),
        ({"weights": "qil", "bits": 0}, "got 0"),
        ({"weights": "qil", "colour": "red"}, "colour"),
    ],
)
def test_bad_schemes(scheme, message):
    with pytest.raises(ValueError, match=message):
        tfquant.Scheme.from_any(scheme)


def test_scheme_presets():
    scheme = tfquant.Scheme.from_any("pact_w2a3")
    assert (scheme.weights, scheme.activations) == ("lsq", "pact")
    assert (scheme.resolved_weight_bits, scheme.resolved_activation_bits) == (2, 3)
    assert tfquant.Scheme.from_any(scheme.to_dict()) == scheme


def test_qn_level_preset_gives_way_to_first_last_bits():
    float_model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
    )
    scheme = {
        "weights": {"class_name": "qn", "config": {"levels": "3(+-4)"}},
        "activations": "qn",
        "bits": 3,
        "first_last_bits": 8,
    }
    qmodel = tfquant.quantize_model(float_model, scheme)
    kernels = [
        layer.kernel_quantizer for layer in qmodel.layers if hasattr(layer, "kernel_quantizer")
    ]
    first, middle, last = kernels
    assert middle.levels == "3(+-4)"
    for quantizer in (first, last):
        assert quantizer.levels is None
        assert quantizer.inference_form(np.ones((3, 3))).bits == 8
