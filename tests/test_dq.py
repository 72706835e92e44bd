"""DQ: direct level/assignment training, channel-aware activation steps,
argument checks, saving, and integer export of learned and uniform levels."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfquant
from tfquant import lite, quantizers
from tfquant.datasets import load_arrays
from tfquant.layers import QuantActivation, QuantConv2D, QuantDense
from tfquant.lite import inspect as lite_inspect
from tfquant.lite import verify
from tfquant.quantizers import ChannelAwareActivationQuantizer, DirectQuantizer
from tfquant.quantizers.dq import (
    channel_aware_step,
    channel_normalized_error,
    channel_normalized_error_numpy,
    direct_quantize,
)

L = keras.layers


BITS = 3
# One model covers the variants: per-channel learned levels, a per-layer
# uniform grid, per-layer learned levels.
VARIANTS = [
    {"per_channel": True, "levels": "learned"},
    {"per_channel": False, "levels": "uniform"},
    {"per_channel": False, "levels": "learned"},
]


def _small_model():
    """A tiny conv model on 6x6x2 inputs with DQ kernels and activations."""

    def weights(i):
        return DirectQuantizer(bits=BITS, assignment_learning_rate=0.02, **VARIANTS[i])

    return keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            QuantConv2D(6, 3, kernel_quantizer=weights(0), name="conv_a"),
            QuantActivation("relu", quantizer=ChannelAwareActivationQuantizer(bits=4)),
            QuantConv2D(4, 3, kernel_quantizer=weights(1), name="conv_b"),
            QuantActivation("relu", quantizer="dq"),
            L.Flatten(),
            QuantDense(3, kernel_quantizer=weights(2), name="dense"),
        ]
    )


def _regression_data(n=128):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, 6, 6, 2)).astype(np.float32)
    y = np.stack([x[:, 1:4, 1:4, 0].sum((1, 2)), x[..., 1].mean((1, 2)), x[:, 2, 2, 0]], 1)
    return x, y.astype(np.float32)


def _dq_layers(model):
    return [layer for layer in model.layers if hasattr(layer, "kernel_quantizer")]


def _expected_kernel(quantizer):
    """gather(L, a), computed in NumPy from the quantizer's state."""
    levels = quantizer.level_matrix().numpy()  # (G, K)
    index = quantizer.assignment.numpy().astype(np.int64)
    if levels.shape[0] == 1:
        return levels[0][index]
    return np.take_along_axis(levels.T, index.reshape(-1, levels.shape[0]), axis=0).reshape(
        index.shape
    )


class _SortedCheck(keras.callbacks.Callback):
    def __init__(self, quantizers_):
        super().__init__()
        self.quantizers = quantizers_
        self.unsorted = 0
        self.batches = 0

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1
        for q in self.quantizers:
            self.unsorted += int(np.sum(np.diff(q.level_matrix().numpy(), axis=-1) < 0))


@pytest.fixture(scope="module")
def trained():
    """The small model, initialized from its float kernels, then fit; with
    the state before training and the sortedness check of every step."""
    keras.utils.set_random_seed(0)
    x, y = _regression_data()
    model = _small_model()
    layers = _dq_layers(model)
    for layer in layers:
        layer.kernel_quantizer.initialize(layer.kernel.numpy())
    before = {
        layer.name: {
            "levels": layer.kernel_quantizer.level_matrix().numpy().copy(),
            "assignment": layer.kernel_quantizer.assignment.numpy().copy(),
            "kernel": layer.kernel.numpy().copy(),
        }
        for layer in layers
    }
    check = _SortedCheck([layer.kernel_quantizer for layer in layers])
    model.compile(keras.optimizers.Adam(0.02), "mse")
    history = model.fit(x, y, epochs=3, batch_size=32, verbose=0, callbacks=[check])
    return model, before, check, history.history["loss"], x


# ---------------------------------------------------------------------------
# Weights


def test_levels_train_under_fit_and_stay_sorted(trained):
    model, before, check, losses, _ = trained
    assert losses[-1] < losses[0]
    assert check.batches == 12 and check.unsorted == 0
    for layer in _dq_layers(model):
        q, old = layer.kernel_quantizer, before[layer.name]
        moved = np.abs(q.level_matrix().numpy() - old["levels"]).max()
        assert moved > 1e-3 * np.abs(old["levels"]).max(), layer.name  # the levels trained
        assert q.assignment_moves.numpy() > 0, layer.name
        assert np.sum(q.assignment.numpy() != old["assignment"]) > 0, layer.name
        # The float kernel is never trained: the forward pass does not use it.
        np.testing.assert_array_equal(layer.kernel.numpy(), old["kernel"])


def test_forward_uses_only_levels(trained):
    model = trained[0]
    for layer, variant in zip(_dq_layers(model), VARIANTS, strict=True):
        q = layer.kernel_quantizer
        kernel = layer.quantized_kernel(training=False).numpy()
        np.testing.assert_array_equal(kernel, _expected_kernel(q), err_msg=layer.name)
        per_channel = variant["per_channel"]
        by_group = kernel.reshape(-1, kernel.shape[-1]) if per_channel else kernel.reshape(-1, 1)
        limit = 2**BITS if variant["levels"] == "learned" else 2**BITS - 1
        assert max(np.unique(column).size for column in by_group.T) <= limit
        # Replacing the float kernel changes nothing.
        saved = layer.kernel.numpy()
        layer.kernel.assign(np.random.default_rng(0).normal(size=saved.shape))
        np.testing.assert_array_equal(layer.quantized_kernel(training=False).numpy(), kernel)
        layer.kernel.assign(saved)


def test_crossing_levels_are_sorted_after_the_step():
    # Weight 0 sits on level 1 (0.0) and wants to grow, weight 1 on level 2
    # (0.001) and wants to shrink: one Adam step (lr 0.1, each level moves by
    # 0.1) makes them cross; the constraint sorts them again.
    layer = QuantDense(
        1,
        use_bias=False,
        kernel_quantizer=DirectQuantizer(bits=2, assignment_learning_rate=0.0),
    )
    model = keras.Sequential([keras.Input((2,)), layer])
    q = layer.kernel_quantizer
    q.levels.assign([[-1.0, 0.0, 0.001, 1.0]])
    q.assignment.assign([[1.0], [2.0]])
    q.initialized.assign(1.0)
    x = np.eye(2, dtype=np.float32)
    y = np.array([[0.5], [-0.5]], np.float32)
    model.compile(keras.optimizers.Adam(0.1), "mse")
    model.fit(x, y, epochs=1, batch_size=2, verbose=0)
    np.testing.assert_allclose(q.levels.numpy(), [[-1.0, -0.099, 0.1, 1.0]], atol=1e-5)


def test_mirrored_training_makes_the_same_moves_as_one_device(cpu_mirrored):
    x, y = _regression_data(64)
    options = {"assignment_learning_rate": 0.02}

    def fit():
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((6, 6, 2)),
                QuantConv2D(4, 3, kernel_quantizer=DirectQuantizer(3, **options)),
                L.ReLU(),
                L.Flatten(),
                QuantDense(3, kernel_quantizer=DirectQuantizer(3, levels="uniform", **options)),
            ]
        )
        for layer in _dq_layers(model):
            layer.kernel_quantizer.initialize(layer.kernel.numpy())
        model.compile(keras.optimizers.Adam(0.02), "mse")
        model.fit(x, y, epochs=2, batch_size=32, verbose=0, shuffle=False)
        return model

    single = fit()
    with cpu_mirrored.scope():
        mirrored = fit()
    for one, two in zip(single.weights, mirrored.weights, strict=True):
        if one.path.endswith(("assignment", "assignment_moves")):
            np.testing.assert_array_equal(one.numpy(), two.numpy(), err_msg=one.path)
        else:
            np.testing.assert_allclose(one.numpy(), two.numpy(), atol=1e-5, err_msg=one.path)
    assert single.layers[0].kernel_quantizer.assignment_moves.numpy() > 0


def test_initialization_is_nearest_level_of_kmeans_levels():
    w = np.random.default_rng(0).normal(size=(3, 3, 4, 8)).astype(np.float32)
    q = DirectQuantizer(bits=3)
    q.initialize(w)
    levels = q.sorted_levels()[0]
    nearest = levels[np.argmin(np.abs(w[..., None] - levels), axis=-1)]
    np.testing.assert_array_equal(q(tf.constant(w)).numpy(), nearest)
    # Lloyd's fixed point: each used level is the mean of its weights.
    index = q.assignment.numpy().astype(int)
    for k in np.unique(index):
        assert levels[k] == pytest.approx(w[index == k].mean(), rel=1e-4, abs=1e-6)
    # Better than the 8 quantiles it starts from.
    assert np.mean((nearest - w) ** 2) < 0.05


def test_assignment_moves_when_the_accumulated_update_crosses_the_midpoint():
    levels = tf.constant([[-1.0, 0.0, 0.5, 2.0]])
    assignment = tf.constant([1.0, 1.0, 1.0, 3.0, 0.0])
    accumulated = tf.constant([0.2, 0.2, -0.2, 0.0, 0.0])
    moves = tf.constant(3.0)
    upstream = tf.constant([-0.04, -0.06, 0.0, -1.0, 0.7])  # dLoss/dy
    kernel = tf.zeros(5)
    with tf.GradientTape() as tape:
        tape.watch([kernel, levels, assignment, accumulated, moves])
        y = direct_quantize(kernel, levels, assignment, accumulated, moves, 1.0, normalize=False)
        loss = tf.reduce_sum(y * upstream)
    np.testing.assert_array_equal(y.numpy(), [0.0, 0.0, 0.0, 2.0, -1.0])
    g_kernel, g_levels, next_assignment, next_update, next_moves = tape.gradient(
        loss, [kernel, levels, assignment, accumulated, moves]
    )
    np.testing.assert_array_equal(g_kernel.numpy(), np.zeros(5))
    np.testing.assert_allclose(g_levels.numpy(), [[0.7, -0.1, 0.0, -1.0]], atol=1e-7)
    # u = 0.2 + 0.04 = 0.24 < 0.25 = half the gap to 0.5: stays, keeps 0.24.
    # u = 0.2 + 0.06 = 0.26 >= 0.25: moves to level 2 and restarts at 0.
    # u = -0.2 > -0.5 (half the gap to -1): stays.
    # Top level pushed up / bottom level pushed down: nowhere to go, u clipped to 0.
    np.testing.assert_array_equal(next_assignment.numpy(), [1.0, 2.0, 1.0, 3.0, 0.0])
    np.testing.assert_allclose(next_update.numpy(), [0.24, 0.0, -0.2, 0.0, 0.0], atol=1e-7)
    assert next_moves.numpy() == 4.0


def test_normalized_update_divides_the_gradient_by_its_rms():
    levels = tf.constant([[-1.0, 0.0, 1.0]])
    state = [tf.ones(4), tf.zeros(4), tf.constant(0.0)]
    upstream = tf.constant([3e-4, -4e-4, 0.0, 0.0])  # RMS 2.5e-4
    with tf.GradientTape() as tape:
        tape.watch(state)
        y = direct_quantize(tf.zeros(4), levels, *state, 0.1, normalize=True)
        loss = tf.reduce_sum(y * upstream)
    _, next_update, _ = tape.gradient(loss, state)
    np.testing.assert_allclose(next_update.numpy(), [-0.12, 0.16, 0.0, 0.0], rtol=1e-5)


def test_no_move_without_a_push_between_equal_levels():
    levels = tf.constant([[0.0, 0.3, 0.3, 0.3]])  # duplicates: zero gaps
    assignment = tf.constant([2.0, 2.0, 2.0])
    state = [assignment, tf.zeros(3), tf.constant(0.0)]
    with tf.GradientTape() as tape:
        tape.watch(state)
        y = direct_quantize(tf.zeros(3), levels, *state, 1.0, normalize=False)
        loss = tf.reduce_sum(y * tf.constant([0.0, -1e-3, 1e-3]))
    next_assignment, _, next_moves = tape.gradient(loss, state)
    np.testing.assert_array_equal(next_assignment.numpy(), [2.0, 3.0, 1.0])
    assert next_moves.numpy() == 2.0


def test_optimizer_step_applies_the_assignment_update_directly():
    q = DirectQuantizer(bits=2, assignment_learning_rate=1.0, normalize_assignment_update=False)
    q.build((2,))
    q.levels.assign([[-1.0, 0.0, 0.5, 2.0]])
    q.assignment.assign([1.0, 1.0])
    q.accumulated_update.assign([0.2, 0.1])
    q.initialized.assign(1.0)
    optimizer = keras.optimizers.Adam(0.01)
    kernel = tf.zeros(2)
    variables = q.trainable_variables
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(q(kernel) * tf.constant([-0.06, 0.1]))
    optimizer.apply(tape.gradient(loss, variables), variables)
    np.testing.assert_array_equal(q.assignment.numpy(), [2.0, 1.0])
    np.testing.assert_allclose(q.accumulated_update.numpy(), [0.0, 0.0], atol=1e-7)
    assert q.assignment_moves.numpy() == 1.0
    # Only the levels were updated by Adam (by lr = 0.01, against the sign).
    np.testing.assert_allclose(q.levels.numpy(), [[-1.0, -0.01, 0.5, 2.0]], atol=1e-6)


def test_uninitialized_quantizer_initializes_itself_on_first_call():
    layer = QuantConv2D(4, 3, kernel_quantizer="dq")
    model = keras.Sequential([keras.Input((6, 6, 2)), layer])
    model.predict(np.zeros((1, 6, 6, 2), np.float32), verbose=0)
    q = layer.kernel_quantizer
    assert q.initialized.numpy() == 1.0
    kernel = layer.kernel.numpy()
    levels = q.sorted_levels()[0]
    assert levels.min() >= kernel.min() and levels.max() <= kernel.max()
    assert np.unique(layer.quantized_kernel().numpy()).size > 8


# ---------------------------------------------------------------------------
# Activations


def _mixed_channels():
    rng = np.random.default_rng(0)
    std = np.ones(64)
    std[[3, 17, 40, 58]] = 20.0
    return np.abs(rng.normal(size=(2000, 64)) * std).astype(np.float32), std


def _per_tensor_mse_step(values, bits):
    top = values.max() / (2**bits - 1)
    steps = top * np.geomspace(1e-3, 1.0, 400)
    errors = [
        np.mean((np.clip(np.floor(values / s + 0.5), 0, 2**bits - 1) * s - values) ** 2)
        for s in steps
    ]
    return float(steps[int(np.argmin(errors))])


def test_channel_aware_step_is_not_dominated_by_high_variance_channels():
    values, std = _mixed_channels()
    bits = 4
    mse_step = _per_tensor_mse_step(values, bits)
    q = ChannelAwareActivationQuantizer(bits=bits)
    q.initialize(values)
    channel_step = float(q.step.numpy())
    objective = channel_normalized_error_numpy(values, [mse_step, channel_step], bits)
    assert objective[1] < 0.5 * objective[0]
    assert channel_step < 0.5 * mse_step

    # Per channel: the 60 ordinary channels are all quantized better.
    def per_channel(step):
        q_values = np.clip(np.floor(values / step + 0.5), 0, 15) * step
        return np.mean((q_values - values) ** 2, axis=0) / values.var(axis=0)

    ordinary = std == 1.0
    assert np.all(per_channel(channel_step)[ordinary] < per_channel(mse_step)[ordinary])
    assert channel_step == pytest.approx(channel_aware_step(values, bits))


def test_channel_objective_in_tensorflow_matches_numpy():
    values, _ = _mixed_channels()
    x = tf.constant(values.reshape(100, 20, 64))
    for step in [0.05, 0.3, 2.0]:
        ours = float(channel_normalized_error(x, tf.constant(step), 4))
        reference = channel_normalized_error_numpy(values, [step], 4)[0]
        assert ours == pytest.approx(reference, rel=1e-4)


def test_channel_loss_is_added_in_training_and_trains_only_the_step():
    values, _ = _mixed_channels()
    q = ChannelAwareActivationQuantizer(bits=4, channel_loss_weight=0.5)
    q.build((None, 64))
    q.step.assign(1.0)
    x = tf.constant(values[:256])
    assert q(x, training=False) is not None and q.losses == []
    with tf.GradientTape() as tape:
        tape.watch(x)
        q(x, training=True)
        (loss,) = q.losses
    expected = 0.5 * channel_normalized_error_numpy(values[:256], [1.0], 4)[0]
    assert float(loss) == pytest.approx(expected, rel=1e-4)
    grad_x, grad_step = tape.gradient(loss, [x, q.step])
    assert grad_x is None or np.all(grad_x.numpy() == 0)
    # A step of 1.0 is far too coarse for the 60 ordinary channels: the objective
    # pushes it down.
    assert float(grad_step) > 0


def test_quantizer_output_is_uniform_and_unsigned():
    values, _ = _mixed_channels()
    q = ChannelAwareActivationQuantizer(bits=3)
    q.initialize(values)
    out = q(tf.constant(values - 1.0)).numpy()
    step = float(q.step.numpy())
    codes = out / step
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-4)
    assert codes.min() == 0 and codes.max() <= 7
    form = q.inference_form()
    assert (form.bits, form.code_min, form.code_max, form.signed) == (3, 0, 7, False)


# ---------------------------------------------------------------------------
# Registry and argument checks


def test_one_name_two_roles():
    weights = quantizers.get("dq", signed=True, for_weights=True)
    activations = quantizers.get("dq", signed=False, for_weights=False)
    assert type(weights) is DirectQuantizer
    assert type(activations) is ChannelAwareActivationQuantizer
    assert type(quantizers.get("dq", signed=False)) is ChannelAwareActivationQuantizer
    for q in (weights, activations):
        again = quantizers.get(quantizers.serialize(q))
        assert type(again) is type(q)
        assert again.get_config() == q.get_config()


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: DirectQuantizer(bits=1), "2..8.*got 1"),
        (lambda: DirectQuantizer(bits=9), "2..8.*got 9"),
        (lambda: ChannelAwareActivationQuantizer(bits=9), "2..8.*got 9"),
        (lambda: DirectQuantizer(levels="lloyd"), "levels.*'lloyd'"),
        (lambda: ChannelAwareActivationQuantizer(channel_loss_weight=-0.1), "got -0.1"),
        (lambda: DirectQuantizer(assignment_learning_rate=-1.0), "assignment_learning_rate.*-1"),
        (lambda: DirectQuantizer(signed=False, levels="uniform"), "'levels'.*weight quantizer"),
        (lambda: DirectQuantizer(signed=False, for_weights=True), "must be signed"),
        (lambda: DirectQuantizer(signed=True, for_weights=False), "for_weights=False"),
        (lambda: ChannelAwareActivationQuantizer(signed=True), "signed=True"),
    ],
)
def test_bad_arguments_are_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_channel_loss_weight_through_the_registry():
    # Keras' from_config re-raises constructor errors as TypeError, message kept.
    with pytest.raises((ValueError, TypeError), match="channel_loss_weight.*-2"):
        quantizers.get({"class_name": "dq", "config": {"channel_loss_weight": -2.0}}, signed=False)


# ---------------------------------------------------------------------------
# Saving


def test_keras_save_and_reload_round_trip(trained, tmp_path):
    model, x = trained[0], trained[4]
    path = str(tmp_path / "dq.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    for old, new in zip(model.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(old.numpy(), new.numpy(), err_msg=old.path)
    assert type(loaded.layers[1].quantizer) is ChannelAwareActivationQuantizer
    assert loaded.get_layer("conv_b").kernel_quantizer.levels_mode == "uniform"
    assert loaded.get_layer("conv_a").kernel_quantizer.per_channel


# ---------------------------------------------------------------------------
# quantize_model, training and integer export


@pytest.fixture(scope="module")
def digits():
    return load_arrays("digits")


@pytest.fixture(scope="module")
def float_model(digits):
    keras.utils.set_random_seed(0)
    inputs = keras.Input(digits.input_shape)
    x = L.Conv2D(8, 3, padding="same", use_bias=False)(inputs)
    x = L.BatchNormalization()(x)
    x = L.ReLU()(x)
    x = L.Conv2D(16, 3, padding="same")(x)
    x = L.ReLU()(x)
    x = L.Flatten()(x)
    model = keras.Model(inputs, L.Dense(10)(x))
    model.compile(
        keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    model.fit(digits.x_train, digits.y_train, epochs=2, batch_size=64, verbose=0)
    return model


def _quantize_train_export(float_model, digits, weights):
    scheme = {"weights": weights, "activations": "dq", "bits": 4}
    qmodel = tfquant.quantize_model(float_model, scheme, calibration_data=digits.x_train[:256])
    qmodel.compile(
        keras.optimizers.Adam(1e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    history = qmodel.fit(
        digits.x_train[:512], digits.y_train[:512], epochs=1, batch_size=64, verbose=0
    )
    assert np.isfinite(history.history["loss"][0])
    x, y = digits.x_test[:200], digits.y_test[:200]
    # INT4 where the levels allow it, made exact for, and verified on, this host's kernels.
    exported = lite.export_model(
        qmodel, x, y, min_agreement=0.0, int4_weights=True, target=verify.host_target()
    )
    assert lite_inspect.non_integer_ops(exported.content) == []
    return qmodel, exported


def test_learned_levels_export_to_int8_with_reported_mapping_error(float_model, digits):
    qmodel, exported = _quantize_train_export(float_model, digits, "dq")
    kernel_reports = [r for r in exported.report["layers"] if "weight_bits" in r]
    assert [r["weight_bits"] for r in kernel_reports] == [8, 4, 8]
    # export_model first rounds the Keras levels onto their int8 codes, by at
    # most half a code step: then the file stores exactly the Keras weights.
    for report in kernel_reports:
        assert report["weight_storage"] == "INT8"
        assert 0.0 < report["level_shift_max"] <= 0.5 + 1e-6
        assert report["level_mapping_max_error"] < 1e-3
    assert [w["storage"] for w in exported.report["weights"]] == ["INT8", "INT8", "INT8"]
    assert exported.report["verification"]["top1_agreement"] >= 0.99
    # Idempotent, up to float32 storage of the levels.
    assert max(lite.align_levels(qmodel).values()) < 1e-4
    # The stored codes are the nearest int8 codes of the learned levels.
    lowered = lite.lower_model(qmodel)
    middle = next(r for r in lowered.layers if r.weight_bits == 4)
    layer = qmodel.get_layer(middle.name)
    levels = layer.kernel_quantizer.sorted_levels()[0]
    scale = np.abs(levels).max() / 127.0
    expected = np.round(layer.quantized_kernel(training=False).numpy() / scale)
    np.testing.assert_array_equal(middle.codes, expected)
    assert np.unique(middle.codes).size <= 16


def test_without_alignment_the_level_mapping_error_is_reported(float_model, digits):
    qmodel = tfquant.quantize_model(
        float_model,
        {"weights": "dq", "activations": "dq", "bits": 4},
        calibration_data=digits.x_train[:128],
    )
    x, y = digits.x_test[:100], digits.y_test[:100]
    exported = lite.export_model(qmodel, x, y, align=False, allow_mismatch=True)
    for report in (r for r in exported.report["layers"] if "weight_bits" in r):
        assert 0.0 < report["level_mapping_rms_error"] <= report["level_mapping_max_error"] <= 0.5
        assert "level_shift_max" not in report


def test_uniform_levels_export_exact_int4_codes(float_model, digits):
    weights = {"class_name": "dq", "config": {"levels": "uniform"}}
    qmodel, exported = _quantize_train_export(float_model, digits, weights)
    assert [w["storage"] for w in exported.report["weights"]] == ["INT8", "INT4", "INT8"]
    assert all("level_mapping_max_error" not in r for r in exported.report["layers"])
    lowered = lite.lower_model(qmodel)
    reports = [r for r in lowered.layers if r.weight_bits]
    tensors = lite_inspect.weight_tensors(exported.content)
    for report, tensor in zip(reports, tensors, strict=True):
        quantizer = qmodel.get_layer(report.name).kernel_quantizer
        # Keras codes are the assignments, centered.
        keras_codes = quantizer.assignment.numpy().astype(np.int64) - quantizer.q_positive
        np.testing.assert_array_equal(report.codes, keras_codes)
        stored = tensor["values"].astype(np.int64)
        stored = stored.transpose(1, 2, 3, 0) if report.kind == "QuantConv2D" else stored.T
        # BatchNorm folding may flip a channel's sign (negative gamma), nothing else.
        np.testing.assert_array_equal(np.abs(stored), np.abs(keras_codes), err_msg=report.name)
    assert exported.report["verification"]["top1_agreement"] >= 0.95
