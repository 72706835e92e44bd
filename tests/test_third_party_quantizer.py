"""The quantizer protocol, from the outside: a quantizer written in this file
against `tfquant.quantizers.Quantizer` alone (the worked example of
docs/QUANTIZERS.md) is used by `quantize_model`, trains with `fit`, saves and
reloads, and exports to an integer file that matches Keras code for code."""

import keras
import numpy as np
import tensorflow as tf

import tfquant
from tfquant import lite, quantizers
from tfquant.datasets import load_arrays
from tfquant.lite import verify

L = keras.layers


@quantizers.register("power_of_two_example")
class PowerOfTwoQuantizer(quantizers.Quantizer):
    """A uniform grid whose step is a power of two, chosen at initialization
    so that the largest value seen fits."""

    def __init__(self, bits=4, signed=False, log2_step=0.0, **kwargs):
        super().__init__(bits=bits, signed=signed, **kwargs)
        self.log2_step = float(log2_step)

    def _code_range(self):
        if self.signed:
            return -(2 ** (self.bits - 1) - 1), 2 ** (self.bits - 1) - 1
        return 0, 2**self.bits - 1

    def call(self, inputs, training=None):
        step = 2.0**self.log2_step
        low, high = self._code_range()

        @tf.custom_gradient
        def quantize(x):
            codes = tf.clip_by_value(tf.round(x / step), low, high)

            def grad(dy):  # straight through inside the range
                inside = (x >= low * step) & (x <= high * step)
                return dy * tf.cast(inside, dy.dtype)

            return codes * step, grad

        return quantize(inputs)

    def initialize(self, values):
        largest = max(float(np.abs(values).max()), 1e-8)
        self.log2_step = float(np.ceil(np.log2(largest / self._code_range()[1])))

    def inference_form(self, weights=None):
        low, high = self._code_range()
        return quantizers.InferenceForm(
            bits=self.bits,
            signed=self.signed,
            scale=np.float32(2.0**self.log2_step),
            code_min=low,
            code_max=high,
        )

    def get_config(self):
        config = super().get_config()
        config.update(log2_step=self.log2_step)
        return config


def test_a_quantizer_defined_outside_the_library_trains_and_exports_exactly(tmp_path):
    keras.utils.set_random_seed(0)
    digits = load_arrays("digits")
    inputs = keras.Input(digits.input_shape)
    x = L.ReLU()(L.BatchNormalization()(L.Conv2D(8, 3, padding="same", use_bias=False)(inputs)))
    x = L.MaxPooling2D()(x)
    x = L.ReLU()(L.Conv2D(16, 3, padding="same")(x))
    model = keras.Model(inputs, L.Dense(10)(L.GlobalAveragePooling2D()(x)))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(keras.optimizers.Adam(3e-3), loss, metrics=["accuracy"])
    model.fit(digits.x_train, digits.y_train, epochs=15, batch_size=32, verbose=0)
    tfquant.reestimate_batch_norm(model, digits.x_train)

    scheme = {"weights": "power_of_two_example", "activations": "power_of_two_example", "bits": 4}
    qmodel = tfquant.quantize_model(model, scheme, calibration_data=digits.x_train[:256])
    found = [q for layer in qmodel.layers for q in layer._flatten_layers() if q is not layer]
    assert any(isinstance(q, PowerOfTwoQuantizer) and q.signed for q in found)  # kernels
    assert any(isinstance(q, PowerOfTwoQuantizer) and not q.signed for q in found)  # activations
    qmodel.compile(keras.optimizers.Adam(1e-3), loss, metrics=["accuracy"])
    qmodel.fit(digits.x_train, digits.y_train, epochs=3, batch_size=32, verbose=0)
    tfquant.reestimate_batch_norm(qmodel, digits.x_train)
    accuracy = qmodel.evaluate(digits.x_test, digits.y_test, verbose=0)[1]
    assert accuracy > 0.85, accuracy

    path = tmp_path / "pow2.keras"
    qmodel.save(path)
    reloaded = keras.models.load_model(path)
    np.testing.assert_array_equal(
        reloaded.predict(digits.x_test[:32], verbose=0),
        qmodel.predict(digits.x_test[:32], verbose=0),
    )

    result = lite.export_model(
        reloaded, digits.x_test, digits.y_test, int4_weights=True, target=verify.host_target()
    )
    checked = result.report["targets"][verify.host_target()]["default"]
    assert checked["top1_agreement"] == 1.0 and checked["identical_output_codes"] == 1.0, checked
    # The file keeps each of its activation grids a power of two.
    ours = [
        layer
        for layer in result.report["layers"]
        if isinstance(
            getattr(reloaded.get_layer(layer["name"]), "quantizer", None), PowerOfTwoQuantizer
        )
    ]
    assert ours
    for layer in ours:
        exponent = np.log2(layer["activation_scale"])
        assert exponent == np.round(exponent), layer
