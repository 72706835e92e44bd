"""tfquant.optimizers.QuantizerAwareOptimizer: the quantizers' parameters get
their own optimizer (own learning rate, no weight decay) under `fit`, also
under a mirrored strategy, and the pair saves and reloads with the model."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfquant import layers as TL
from tfquant.optimizers import QuantizerAwareOptimizer, is_quantizer_variable

L = keras.layers


def _model():
    inputs = keras.Input((6, 6, 2))
    x = TL.QuantConv2D(4, 3, kernel_quantizer="lsq", input_quantizer="lsq")(inputs)
    x = TL.QuantActivation("relu", quantizer="pact")(x)
    return keras.Model(inputs, TL.QuantDense(3, kernel_quantizer="lsq")(L.Flatten()(x)))


def _data(count=64):
    rng = np.random.default_rng(0)
    return rng.uniform(0, 1, (count, 6, 6, 2)).astype("float32"), rng.integers(0, 3, count)


def _fit(model, optimizer, epochs=1):
    x, y = _data()
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=16, epochs=epochs, verbose=0)


def _split(model):
    quantizers = [v for v in model.trainable_variables if is_quantizer_variable(v)]
    weights = [v for v in model.trainable_variables if not is_quantizer_variable(v)]
    return weights, quantizers


@pytest.mark.parametrize("frozen", ["weights", "quantizers"])
def test_each_side_moves_with_its_own_learning_rate(frozen):
    keras.utils.set_random_seed(0)
    model = _model()
    weights, quantizers = _split(model)
    assert len(quantizers) == 4 and len(weights) == 4  # steps and alpha; kernels and biases
    before = [v.numpy().copy() for v in model.trainable_variables]
    rates = (0.0, 0.05) if frozen == "weights" else (0.05, 0.0)
    optimizer = QuantizerAwareOptimizer(
        keras.optimizers.SGD(rates[0]), quantizer_learning_rate=rates[1]
    )
    _fit(model, optimizer)
    moved = {"weights": 0, "quantizers": 0}
    for variable, old in zip(model.trainable_variables, before, strict=True):
        side = "quantizers" if is_quantizer_variable(variable) else "weights"
        moved[side] += int(not np.array_equal(variable.numpy(), old))
    # The frozen side stays; on the other, all but PACT's alpha (no value
    # reached it, so no gradient) move.
    assert moved[frozen] == 0 and sum(moved.values()) >= 3, moved
    assert int(optimizer.iterations.numpy()) == 4
    assert int(optimizer.quantizer_optimizer.iterations.numpy()) == 4


def test_the_default_quantizer_optimizer_has_no_weight_decay():
    optimizer = QuantizerAwareOptimizer(keras.optimizers.AdamW(1e-3, weight_decay=0.5))
    assert optimizer.quantizer_optimizer.weight_decay in (None, 0.0)
    assert QuantizerAwareOptimizer("adam").quantizer_optimizer.weight_decay is None
    assert float(optimizer.quantizer_optimizer.learning_rate.numpy()) == pytest.approx(1e-3)
    # With weight decay and a zero gradient, AdamW still shrinks a weight;
    # the quantizers' parameters stay where they are.
    keras.utils.set_random_seed(1)
    model = _model()
    weights, quantizers = _split(model)
    before = [v.numpy().copy() for v in quantizers]
    kernels = [v.numpy().copy() for v in weights]
    variables = model.trainable_variables
    optimizer.apply([tf.zeros_like(v) for v in variables], variables)
    for variable, old in zip(quantizers, before, strict=True):
        np.testing.assert_array_equal(variable.numpy(), old)
    decayed = [not np.array_equal(v.numpy(), old) for v, old in zip(weights, kernels, strict=True)]
    assert any(decayed), "the weights' optimizer decays the weights"
    with pytest.raises(ValueError, match="not both"):
        QuantizerAwareOptimizer("sgd", quantizer_optimizer="adam", quantizer_learning_rate=1e-3)
    with pytest.raises(ValueError, match=r"no \['clipnorm'\]"):
        QuantizerAwareOptimizer("sgd", clipnorm=1.0)


def test_saves_and_resumes_with_the_model(tmp_path):
    keras.utils.set_random_seed(2)
    model = _model()
    _fit(model, QuantizerAwareOptimizer(keras.optimizers.Adam(1e-2), quantizer_learning_rate=1e-3))
    saved = {
        side: [v.numpy().copy() for v in getattr(model.optimizer, side).variables]
        for side in ("weight_optimizer", "quantizer_optimizer")
    }
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    optimizer = loaded.optimizer
    for side, values in saved.items():  # Adam's moments, each in its own optimizer
        restored = [v.numpy() for v in getattr(optimizer, side).variables]
        assert len(restored) == len(values) > 2, side
        for old, new in zip(values, restored, strict=True):
            np.testing.assert_array_equal(old, new)
    assert isinstance(optimizer, QuantizerAwareOptimizer)
    assert int(optimizer.iterations.numpy()) == 4
    rate = float(optimizer.quantizer_optimizer.learning_rate.numpy())
    assert rate == pytest.approx(1e-3)
    x, y = _data()
    loaded.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert int(optimizer.iterations.numpy()) == 8


def test_under_a_mirrored_strategy(cpu_mirrored):
    with cpu_mirrored.scope():
        keras.utils.set_random_seed(3)
        model = _model()
        optimizer = QuantizerAwareOptimizer(keras.optimizers.SGD(0.0), quantizer_learning_rate=0.05)
        _, quantizers = _split(model)
        before = [v.numpy().copy() for v in quantizers]
        _fit(model, optimizer)
    assert any(
        not np.array_equal(v.numpy(), old) for v, old in zip(quantizers, before, strict=True)
    )
    assert int(optimizer.iterations.numpy()) == 4
