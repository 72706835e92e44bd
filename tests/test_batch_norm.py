"""reestimate_batch_norm: exact statistics, inference-form quantizers, errors."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfquant
from tfquant.batch_norm import batch_norm_layers, reestimate_batch_norm

L = keras.layers


def _conv_bn_model():
    inputs = keras.Input((6, 6, 2))
    x = L.Conv2D(4, 3, padding="same", name="conv")(inputs)
    x = L.BatchNormalization(name="bn")(x)
    x = L.ReLU()(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, L.Dense(3, name="dense")(x))


@pytest.fixture
def rows():
    return np.random.default_rng(1).normal(0.5, 2.0, (100, 6, 6, 2)).astype("float32")


def test_statistics_are_exact_over_all_rows_for_any_batch_size(rows):
    model = _conv_bn_model()
    conv_outputs = keras.Model(model.inputs, model.get_layer("conv").output)(rows).numpy()
    expected_mean = conv_outputs.reshape(-1, 4).mean(0)
    expected_variance = conv_outputs.reshape(-1, 4).var(0)
    report = reestimate_batch_norm(model, rows, batch_size=32)  # 32, 32, 32, 4 rows
    bn = model.get_layer("bn")
    np.testing.assert_allclose(bn.moving_mean.numpy(), expected_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.moving_variance.numpy(), expected_variance, rtol=1e-4)
    assert report["bn"]["batches"] == 4
    # the moving statistics started at mean 0, variance 1
    assert report["bn"]["mean_shift"] == pytest.approx(
        np.max(np.abs(expected_mean) / np.sqrt(1 + bn.epsilon)), rel=1e-4
    )


def test_inference_then_matches_training_mode_on_the_same_batch(rows):
    model = _conv_bn_model()
    reestimate_batch_norm(model, rows, batch_size=len(rows))
    np.testing.assert_allclose(
        model(rows, training=False).numpy(), model(rows, training=True).numpy(), atol=1e-4
    )


def test_repairs_a_drifted_quantized_model():
    """Moving statistics off by 4x in variance (a lagging average): the
    re-estimated model agrees with the batch-statistics model again."""
    rng = np.random.default_rng(2)
    inputs = keras.Input((8, 8, 1))
    x = L.Conv2D(8, 3, padding="same")(inputs)
    x = L.BatchNormalization(name="bn")(x)
    x = L.ReLU()(x)
    x = L.GlobalAveragePooling2D()(x)
    float_model = keras.Model(inputs, L.Dense(4)(x))
    data = rng.random((128, 8, 8, 1)).astype("float32")
    model = tfquant.quantize_model(float_model, "lsq_w4a4", calibration_data=data)
    reestimate_batch_norm(model, data, batch_size=len(data))
    reference = model(data, training=False).numpy()
    bn = model.get_layer("bn")
    variance = bn.moving_variance.numpy()
    bn.moving_variance.assign(variance * 4.0)
    drifted = model(data, training=False).numpy()
    assert np.abs(drifted - reference).max() > 1e-2
    report = reestimate_batch_norm(model, data, batch_size=len(data))
    ratio = np.sqrt((4.0 * variance + bn.epsilon) / (variance + bn.epsilon))
    assert report["bn"]["std_ratio"] == pytest.approx(ratio.max(), rel=1e-4)
    np.testing.assert_allclose(model(data, training=False).numpy(), reference, atol=1e-5)


def test_calls_are_restored_and_training_still_works(rows):
    model = _conv_bn_model()
    reestimate_batch_norm(model, rows)
    assert "call" not in vars(model.get_layer("bn"))
    model.compile(optimizer="sgd", loss="mse")
    before = model.get_layer("bn").moving_mean.numpy()
    model.fit(rows, np.zeros((len(rows), 3)), epochs=1, batch_size=50, verbose=0)
    assert not np.allclose(model.get_layer("bn").moving_mean.numpy(), before)


def test_nested_models_datasets_and_max_batches(rows):
    inner = _conv_bn_model()
    inputs = keras.Input((6, 6, 2))
    outer = keras.Model(inputs, L.Dense(2)(inner(inputs)))
    assert [layer.name for layer in batch_norm_layers(outer)] == ["bn"]
    dataset = tf.data.Dataset.from_tensor_slices((rows, np.zeros(len(rows)))).batch(10)
    lines = []
    report = reestimate_batch_norm(outer, dataset, max_batches=3, progress=lines.append)
    assert report["bn"]["batches"] == 3
    conv = keras.Model(inner.inputs, inner.get_layer("conv").output)
    expected = conv(rows[:30]).numpy().reshape(-1, 4).mean(0)
    np.testing.assert_allclose(inner.get_layer("bn").moving_mean.numpy(), expected, atol=1e-5)
    assert lines and "1 layers from 3 batches" in lines[-1]


def test_errors_name_the_bad_value(rows):
    model = _conv_bn_model()
    no_bn = keras.Sequential([keras.Input((3,)), L.Dense(2)], name="plain_dense")
    with pytest.raises(ValueError, match="'plain_dense' has no BatchNormalization"):
        reestimate_batch_norm(no_bn, np.zeros((4, 3)))
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        reestimate_batch_norm(model, rows, batch_size=0)
    with pytest.raises(ValueError, match="max_batches must be a positive integer or None, got -1"):
        reestimate_batch_norm(model, rows, max_batches=-1)
    with pytest.raises(ValueError, match="holds no rows"):
        reestimate_batch_norm(model, rows[:0])
    bad = rows.copy()
    bad[40, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="batch 1 of data has NaN or inf"):
        reestimate_batch_norm(model, bad, batch_size=32)
    assert "call" not in vars(model.get_layer("bn"))


def test_nan_weights_leave_the_statistics_unchanged(rows):
    model = _conv_bn_model()
    bn = model.get_layer("bn")
    before = bn.moving_mean.numpy().copy(), bn.moving_variance.numpy().copy()
    kernel = model.get_layer("conv").kernel
    kernel.assign(np.full(kernel.shape, np.nan, np.float32))
    with pytest.raises(ValueError, match="layer 'bn' are not finite"):
        reestimate_batch_norm(model, rows)
    np.testing.assert_array_equal(bn.moving_mean.numpy(), before[0])
    np.testing.assert_array_equal(bn.moving_variance.numpy(), before[1])
