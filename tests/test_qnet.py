"""Quantization Networks: forward and gradients against NumPy and finite
differences, the step limit, initialization, the integer form, argument
checks, saving, phases, the temperature schedule and the export path."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfquant
from tfquant import quantizers
from tfquant.callbacks import TemperatureScheduler
from tfquant.layers import QuantActivation, QuantConv2D
from tfquant.quantizers import QuantizationNetworkQuantizer, qn_phase
from tfquant.quantizers.qnet import (
    LEVEL_PRESETS,
    LevelGrid,
    kmeans_1d,
    qn_quantize,
    qn_quantizers,
    qn_step_quantize,
)

# ---------------------------------------------------------------------------
# NumPy reference (float64), written from METHODS.md section 2


def np_qn(x, alpha, beta, biases, temperature, levels, signed, upstream):
    """Forward and gradients (x, alpha, beta, biases) of the soft form, with
    the sigmoid argument clipped to -+10 and g computed from the clipped value."""
    x = np.asarray(x, np.float64)
    levels = np.asarray(levels, np.float64)
    steps = np.diff(levels)
    offset = steps.sum() / 2 if signed else 0.0
    z = np.clip(temperature * (beta * x[..., None] - np.asarray(biases)), -10, 10)
    g = 1 / (1 + np.exp(-z))
    y = alpha * ((steps * g).sum(-1) - offset)
    d = steps * g * (1 - g)  # s_i g_i (1 - g_i), per threshold
    grad_x = upstream * temperature * alpha * beta * d.sum(-1)
    grad_alpha = np.sum(upstream * y / alpha)
    grad_beta = np.sum(upstream * temperature * alpha * x * d.sum(-1))
    grad_biases = -temperature * alpha * np.sum(upstream[..., None] * d, axis=tuple(range(x.ndim)))
    return y, grad_x, grad_alpha, grad_beta, grad_biases


def np_step(x, alpha, beta, biases, levels, signed):
    levels = np.asarray(levels, np.float64)
    steps = np.diff(levels)
    offset = steps.sum() / 2 if signed else 0.0
    above = (beta * np.asarray(x, np.float64)[..., None]) >= np.asarray(biases)
    return alpha * ((steps * above).sum(-1) - offset)


def qn_with_tape(x, alpha, beta, biases, temperature, levels, signed, upstream, **kwargs):
    tensors = [tf.constant(v, tf.float32) for v in (x, alpha, beta, biases)]
    with tf.GradientTape() as tape:
        tape.watch(tensors)
        y = qn_quantize(*tensors, temperature, levels, signed, **kwargs)
    grads = tape.gradient(y, tensors, output_gradients=tf.constant(upstream, tf.float32))
    return y.numpy(), [g.numpy() for g in grads]


CASES = [
    # levels, signed, alpha, beta, T, input range in the beta domain
    ((-1, 0, 1), True, 0.7, 1.3, 3.0, 2.0),
    ((-2, -1, 0, 1, 2), True, 0.4, 2.0, 2.5, 2.0),
    ((-4, -2, -1, 0, 1, 2, 4), True, 0.25, 1.5, 2.0, 1.2),
    ((0, 1, 2, 3), False, 0.5, 0.9, 3.5, 2.9),
    ((-2, -1, 0, 1), True, 1.1, 0.8, 3.0, 1.5),  # odd Y_0 + Y_n
]


def _inputs(levels, beta, temperature, span, count=48, seed=0):
    """Inputs with every sigmoid argument inside the clip (|T(beta x - b)| < 10)
    and biases a little off the midpoints."""
    rng = np.random.default_rng(seed)
    grid = LevelGrid(levels, levels[0] < 0)
    biases = np.asarray(grid.midpoints) + rng.uniform(-0.1, 0.1, size=grid.n)
    u = rng.uniform(-span, span, size=count) if levels[0] < 0 else rng.uniform(0, span, count)
    assert np.abs(temperature * (u[:, None] - biases)).max() < 9.5
    return (u / beta).astype(np.float32), biases.astype(np.float32), rng.normal(size=count)


@pytest.mark.parametrize("levels,signed,alpha,beta,temperature,span", CASES)
def test_forward_and_gradients_match_numpy(levels, signed, alpha, beta, temperature, span):
    x, biases, upstream = _inputs(levels, beta, temperature, span)
    y, (gx, ga, gb, gbias) = qn_with_tape(
        x, alpha, beta, biases, temperature, levels, signed, upstream, learn_biases=True
    )
    want = np_qn(x, alpha, beta, biases, temperature, levels, signed, upstream)
    np.testing.assert_allclose(y, want[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gx, want[1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ga, want[2], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gb, want[3], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gbias, want[4], rtol=1e-4, atol=1e-4)


def test_gradients_follow_the_formula_where_the_clip_is_active():
    """Far from a threshold the formula keeps the clipped sigmoid's slope
    (the authors' choice): NumPy with the same rule agrees."""
    levels, alpha, beta, temperature = (-1, 0, 1), 0.5, 1.0, 50.0
    x = np.linspace(-3, 3, 41).astype(np.float32)
    upstream = np.ones_like(x, np.float64)
    biases = np.array([-0.5, 0.5], np.float32)
    y, (gx, ga, gb, gbias) = qn_with_tape(
        x, alpha, beta, biases, temperature, levels, True, upstream, learn_biases=True
    )
    want = np_qn(x, alpha, beta, biases, temperature, levels, True, upstream)
    for got, expected in zip((y, gx, ga, gb, gbias), want, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert gx[0] > 0  # 2 thresholds x T * sigmoid(10) * (1 - sigmoid(10)) * alpha * beta
    np.testing.assert_allclose(gx[0], 2 * 50 * 4.5396e-5 * 0.5, rtol=1e-3)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 23.0, 23.5, 46.0, 47.0, 400.0])
def test_shared_exponentials_match_numpy_up_to_their_limit_and_beyond(temperature, compiled):
    """Up to T * (b_max - b_min) / 2 = 70 (here T = 23.3) one exp per element is
    shared by all 7 thresholds, up to T = 46.7 one per group of 4; above, each
    threshold has its own. All agree with the reference, also for inputs far
    outside the thresholds."""
    levels = tuple(range(8))
    rng = np.random.default_rng(5)
    biases = np.asarray(LevelGrid(levels, False).midpoints, np.float32)
    u = np.concatenate([rng.uniform(-1, 8, 200), [-1e4, -30.0, 30.0, 1e4], biases])
    x = (u / 0.9).astype(np.float32)
    upstream = rng.normal(size=x.shape)
    y, grads = qn_with_tape(
        x, 1.2, 0.9, biases, temperature, levels, False, upstream, compiled=compiled
    )
    want = np_qn(x, 1.2, 0.9, biases, temperature, levels, False, upstream)
    np.testing.assert_allclose(y, want[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads[0], want[1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(grads[1], want[2], rtol=1e-4, atol=1e-4)
    # dL/dbeta sums terms up to ~1e3 (the inputs at 1e4) into ~1e2, and at T = 400 the
    # float32 arguments T * beta * x carry ~1e-4 of round-off near a threshold
    terms = np.sum(np.abs(want[1] * x / 0.9))
    np.testing.assert_allclose(grads[2], want[3], rtol=0, atol=1e-5 * terms)


@pytest.mark.parametrize(
    "levels,signed", [(tuple(range(64)), False), (tuple(range(-127, 128)), True)]
)
def test_many_thresholds_match_numpy(levels, signed):
    """Above 32 thresholds the sums run as a loop over blocks of thresholds
    (the last block padded): still the same forward and gradients."""
    rng = np.random.default_rng(3)
    grid = LevelGrid(levels, signed)
    alpha, beta, temperature = 0.3, 0.8, 1.7
    biases = (np.asarray(grid.midpoints) + rng.uniform(-0.2, 0.2, grid.n)).astype(np.float32)
    x = (rng.uniform(grid.outputs[0] - 3, grid.outputs[-1] + 3, 300) / beta).astype(np.float32)
    upstream = rng.normal(size=x.shape)
    y, grads = qn_with_tape(
        x, alpha, beta, biases, temperature, levels, signed, upstream, learn_biases=True
    )
    want = np_qn(x, alpha, beta, biases, temperature, levels, signed, upstream)
    np.testing.assert_allclose(y, want[0], rtol=1e-5, atol=1e-4)
    for got, expected in zip(grads, want[1:], strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("levels,signed,alpha,beta,temperature,span", CASES)
def test_gradients_match_finite_differences(levels, signed, alpha, beta, temperature, span):
    x, biases, upstream = _inputs(levels, beta, temperature, span, seed=1)
    _, (gx, ga, gb, gbias) = qn_with_tape(
        x, alpha, beta, biases, temperature, levels, signed, upstream, learn_biases=True
    )

    def loss(x=x, alpha=alpha, beta=beta, biases=biases):
        y = qn_quantize(
            tf.constant(x, tf.float32), alpha, beta, tf.constant(biases, tf.float32),
            temperature, levels, signed,
        )  # fmt: skip
        return y.numpy().astype(np.float64) * upstream

    h = 1e-3
    # y_j depends on x_j only: one perturbation of the whole vector gives every slope
    fd_x = (loss(x=x + h) - loss(x=x - h)) / (2 * h) / upstream
    np.testing.assert_allclose(gx / upstream, fd_x, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(
        ga, (loss(alpha=alpha + h).sum() - loss(alpha=alpha - h).sum()) / (2 * h), rtol=2e-3
    )
    np.testing.assert_allclose(
        gb, (loss(beta=beta + h).sum() - loss(beta=beta - h).sum()) / (2 * h), rtol=2e-3
    )
    for i in range(len(biases)):
        step = np.zeros_like(biases)
        step[i] = h
        fd = (loss(biases=biases + step).sum() - loss(biases=biases - step).sum()) / (2 * h)
        np.testing.assert_allclose(gbias[i], fd, rtol=2e-3, atol=2e-3)


def test_frozen_biases_get_zero_gradient_and_temperature_none():
    x, biases, upstream = _inputs((-1, 0, 1), 1.0, 3.0, 2.0)
    _, grads = qn_with_tape(x, 0.5, 1.0, biases, 3.0, (-1, 0, 1), True, upstream)
    np.testing.assert_array_equal(grads[3], np.zeros(2))
    assert np.abs(grads[0]).max() > 0


# ---------------------------------------------------------------------------
# The step limit


@pytest.mark.parametrize("levels,signed", [((-4, -2, -1, 0, 1, 2, 4), True), ((0, 1, 2, 3), False)])
def test_large_temperature_gives_the_step_function(levels, signed):
    rng = np.random.default_rng(3)
    grid = LevelGrid(levels, signed)
    biases = np.asarray(grid.midpoints, np.float32)
    x = rng.uniform(-6, 6, size=2000).astype(np.float32)
    alpha, beta = 0.3, 1.7
    step = np_step(x, alpha, beta, biases, levels, signed)
    # at step_temperature the training forward is the step itself
    exact = qn_quantize(x, alpha, beta, biases, 1000.0, levels, signed).numpy()
    np.testing.assert_allclose(exact, step, rtol=0, atol=1e-6)
    inference = qn_step_quantize(x, alpha, beta, biases, levels, signed).numpy()
    np.testing.assert_allclose(inference, step, rtol=0, atol=1e-6)
    # below it the soft form converges to the step away from the thresholds
    previous = np.inf
    for temperature in (10.0, 50.0, 500.0):
        soft = qn_quantize(x, alpha, beta, biases, temperature, levels, signed).numpy()
        far = np.abs(beta * x[:, None] - biases).min(-1) > 10.0 / temperature
        error = np.abs(soft - step)[far].max()
        assert error <= alpha * sum(grid.steps) * 4.6e-5 + 1e-6
        mean_error = np.abs(soft - step).mean()
        assert mean_error < previous
        previous = mean_error
    assert previous < 0.01 * alpha


def test_layer_uses_the_step_at_inference_and_the_soft_form_in_training():
    q = QuantizationNetworkQuantizer(levels="3(+-2)", signed=True, for_weights=True)
    x = np.linspace(-1, 1, 101).astype(np.float32)
    q.build(x.shape)
    q.alpha.assign(0.5)
    q.beta.assign(2.0)
    want = np_step(x, 0.5, 2.0, q.biases.numpy(), LEVEL_PRESETS["3(+-2)"], True)
    np.testing.assert_allclose(q(x, training=False).numpy(), want, atol=1e-6)
    soft = q(x, training=True).numpy()
    assert np.abs(soft - want).max() > 0.1  # T = 1: far from the step
    q.temperature.assign(q.step_temperature)
    np.testing.assert_allclose(q(x, training=True).numpy(), want, atol=1e-6)


# ---------------------------------------------------------------------------
# Initialization


def _clustered(centres, spread, per_cluster, seed):
    rng = np.random.default_rng(seed)
    values = np.concatenate([c + rng.uniform(-spread, spread, per_cluster) for c in centres])
    return rng.permutation(values).astype(np.float32)


def test_kmeans_finds_separated_clusters():
    centres = [-3.0, -1.0, 0.5, 4.0]
    values = _clustered(centres, 0.2, 300, seed=4)
    found = kmeans_1d(values, 4)
    np.testing.assert_allclose(found, centres, atol=0.03)
    assert kmeans_1d(np.array([1.0, 1.0, 2.0]), 3) is None  # two distinct values


@pytest.mark.parametrize(
    "levels,signed,centres",
    [
        ("3(+-2)", True, [-0.2, -0.1, 0.0, 0.1, 0.2]),
        ("3(+-4)", True, [-0.8, -0.45, -0.2, 0.0, 0.25, 0.5, 0.9]),
        (None, False, [0.0, 0.3, 0.7, 1.5]),  # 2-bit activations, a heap of zeros
    ],
)
def test_kmeans_thresholds_lie_between_clusters(levels, signed, centres):
    values = _clustered(centres, 0.02, 200, seed=5)
    if not signed:
        values = np.concatenate([np.zeros(2000, np.float32), np.maximum(values, 0)])
    q = QuantizationNetworkQuantizer(
        bits=2,
        signed=signed,
        levels=levels,
        for_weights=signed,
        threshold_init="kmeans",
        central_threshold=None,
    )
    q.initialize(values)
    beta = float(q.beta.numpy())
    p = max(abs(v) for v in q.grid.outputs)
    np.testing.assert_allclose(beta, 1.25 * p / np.abs(values).max(), rtol=1e-6)
    if signed:
        np.testing.assert_allclose(float(q.alpha.numpy()), 1 / beta, rtol=1e-6)
    thresholds = q.biases.numpy() / beta  # back in the input domain
    for i, threshold in enumerate(thresholds):
        assert centres[i] + 0.02 < threshold < centres[i + 1] - 0.02
        np.testing.assert_allclose(threshold, (centres[i] + centres[i + 1]) / 2, atol=0.01)


def test_weight_kmeans_forces_the_central_thresholds():
    values = _clustered([-0.2, -0.1, 0.0, 0.1, 0.2], 0.02, 200, seed=6)
    q = QuantizationNetworkQuantizer(levels="3(+-2)", signed=True, for_weights=True)
    q.initialize(values)
    biases = q.biases.numpy()
    np.testing.assert_allclose(biases[1:3], [-0.05, 0.05], atol=1e-7)
    assert biases[0] < -0.05 and biases[3] > 0.05
    assert np.all(np.diff(biases) > 0)


def test_initialize_rejects_non_finite_values_and_sets_nothing():
    q = QuantizationNetworkQuantizer(bits=3)
    q.build((8,))
    before = [w.copy() for w in q.get_weights()]
    with pytest.raises(ValueError, match="NaN"):
        q.initialize(np.array([0.0, np.nan, 1.0], np.float32))
    for old, new in zip(before, q.get_weights(), strict=True):
        np.testing.assert_array_equal(old, new)


# ---------------------------------------------------------------------------
# Uniform thresholds and the integer form


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_uniform_activation_thresholds_are_round_to_nearest(bits):
    rng = np.random.default_rng(bits)
    x = np.abs(rng.normal(0, 1, size=4000)).astype(np.float32)
    q = QuantizationNetworkQuantizer(bits=bits, threshold_init="uniform")
    q.initialize(x)
    form = q.inference_form()
    assert (form.bits, form.code_min, form.code_max) == (bits, 0, 2**bits - 1)
    beta = np.float32(q.beta.numpy())
    np.testing.assert_allclose(float(form.scale), 1 / float(beta), rtol=1e-6)
    scaled = x.astype(np.float64) / float(form.scale)
    away = np.abs(scaled - np.floor(scaled) - 0.5) > 1e-3
    want = np.clip(np.floor(scaled + 0.5), 0, 2**bits - 1)
    codes = q(x, training=False).numpy() / form.scale
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-4)
    np.testing.assert_array_equal(np.round(codes)[away], want[away])
    assert q.is_exactly_uniform()
    assert q.uniform_approximation_error(x[away]) == 0.0


def test_kmeans_activation_reports_its_uniform_approximation():
    x = np.abs(np.random.default_rng(9).normal(0, 1, size=4000)).astype(np.float32)
    q = QuantizationNetworkQuantizer(bits=2, threshold_init="kmeans")  # the paper's choice
    q.initialize(x)
    assert not q.is_exactly_uniform()
    error = q.uniform_approximation_error(x)
    form = q.inference_form()
    keras_codes = np.round(q(x, training=False).numpy() / form.scale)
    uniform_codes = np.clip(np.floor(x / form.scale + 0.5), 0, 3)
    assert error == pytest.approx(np.mean(keras_codes != uniform_codes))
    assert 0 < error < 1


@pytest.mark.parametrize(
    "levels,signed,codes,unit,storage",
    [
        ("binary", True, [-1, 1], 1.0, 2),
        ("ternary", True, [-1, 0, 1], 1.0, 2),
        ("3(+-2)", True, [-2, -1, 0, 1, 2], 1.0, 3),
        ("3(+-4)", True, [-4, -2, -1, 0, 1, 2, 4], 1.0, 4),
        ("uniform4", True, list(range(-7, 8)), 1.0, 4),
        ("uniform8", True, list(range(-127, 128)), 1.0, 8),
        ([-2, -1, 0, 1], True, [-3, -1, 1, 3], 0.5, 3),
        ([0, 2, 4, 6], True, [-3, -1, 1, 3], 1.0, 3),
        ([-6, 0, 6], True, [-1, 0, 1], 6.0, 2),
    ],
)
def test_weight_outputs_are_symmetric_integer_codes(levels, signed, codes, unit, storage):
    q = QuantizationNetworkQuantizer(signed=signed, levels=levels, for_weights=True)
    assert list(q.grid.codes) == codes and q.grid.unit == unit
    w = np.random.default_rng(2).normal(0, 0.1, size=(3, 3, 4, 8)).astype(np.float32)
    q.initialize(w)
    y = q(w, training=False).numpy()
    form = q.inference_form(w)
    assert form.signed and form.bits == storage
    top = 7 if storage <= 4 else 127  # the exporter's INT4 / INT8 narrow range
    assert -top <= form.code_min and form.code_max <= top
    raw = y / form.scale
    np.testing.assert_allclose(raw, np.round(raw), atol=1e-4)
    assert set(np.unique(form.codes(y))) <= set(codes)
    np.testing.assert_allclose(form.codes(y) * form.scale, y, rtol=1e-6)
    assert q.uniform_approximation_error(w) == 0.0


def test_default_thresholds_are_kmeans_for_weights_and_uniform_for_activations():
    values = np.abs(np.random.default_rng(10).normal(0, 1, size=500)).astype(np.float32)
    activation = QuantizationNetworkQuantizer(bits=3)
    weights = QuantizationNetworkQuantizer(bits=3, signed=True, for_weights=True)
    assert activation.resolved_threshold_init == "uniform"
    assert weights.resolved_threshold_init == "kmeans"
    activation.initialize(values)
    weights.initialize(values - 0.5)
    assert activation.is_exactly_uniform()
    assert not np.allclose(weights.biases.numpy(), weights.grid.midpoints, atol=1e-3)
    assert activation.get_config()["threshold_init"] is None


def test_bits_follow_the_levels():
    assert QuantizationNetworkQuantizer(levels="3(+-4)", bits=8, signed=True).bits == 3
    assert QuantizationNetworkQuantizer(levels="binary", signed=True).bits == 1
    assert QuantizationNetworkQuantizer(bits=3, signed=True).grid.levels == tuple(range(-3, 4))
    assert QuantizationNetworkQuantizer(bits=3).grid.levels == tuple(range(8))
    assert QuantizationNetworkQuantizer(bits=1, signed=True).grid.levels == (-1, 1)
    q = QuantizationNetworkQuantizer(levels=[0, 1, 2, 5], bits=7)
    assert q.bits == 2 and q.get_config()["levels"] == [0, 1, 2, 5]


# ---------------------------------------------------------------------------
# Argument checks


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"levels": [0, 2, 1]}, r"sorted.*\[0, 2, 1\]"),
        ({"levels": [0, 0.5, 1]}, "integers.*0.5"),
        ({"levels": [0, 1, 1, 2]}, "distinct.*1 twice"),
        ({"levels": [3]}, "at least 2"),
        ({"levels": "quaternary"}, "'quaternary'"),
        ({"levels": "ternary", "signed": False}, r"\[-1, 0, 1\] has negative levels"),
        ({"levels": [-1, 0, 1]}, "negative levels"),
        ({"levels": [-200, 0, 200], "signed": True}, None),  # gcd: codes -1, 0, 1
        ({"levels": [0, 1, 300]}, "more than 8 bits"),
        ({"bits": 0}, "1..8.*got 0"),
        ({"bits": 9}, "1..8.*got 9"),
        ({"bits": 4.5}, "4.5"),
        ({"initial_temperature": 0.0}, "initial_temperature.*0.0"),
        ({"initial_temperature": -2}, "initial_temperature.*-2"),
        ({"step_temperature": 0}, "step_temperature.*0"),
        ({"threshold_init": "random"}, "'random'"),
        ({"central_threshold": -0.1}, "central_threshold.*-0.1"),
    ],
)
def test_bad_arguments_are_rejected_by_value(kwargs, match):
    if match is None:
        QuantizationNetworkQuantizer(**kwargs)
        return
    with pytest.raises(ValueError, match=match):
        QuantizationNetworkQuantizer(**kwargs)


def test_scheduler_and_phase_arguments():
    with pytest.raises(ValueError, match="'cosine'"):
        TemperatureScheduler(schedule="cosine")
    with pytest.raises(ValueError, match="start.*0"):
        TemperatureScheduler(start=0)
    with pytest.raises(ValueError, match="growth.*-1"):
        TemperatureScheduler(growth=-1)
    with pytest.raises(ValueError, match="'batch'"):
        TemperatureScheduler(per="batch")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="'first'"):
        qn_phase(model, "first")
    with pytest.raises(ValueError, match="no Quantization Networks"):
        qn_phase(model, "both")


# ---------------------------------------------------------------------------
# Keras: registry, saving, phases, the schedule


def test_registry_and_config_round_trip():
    q = quantizers.get({"class_name": "qn", "config": {"levels": "3(+-4)"}}, signed=True)
    assert isinstance(q, QuantizationNetworkQuantizer) and q.signed
    assert type(quantizers.get("QuantizationNetworkQuantizer")) is QuantizationNetworkQuantizer
    q = QuantizationNetworkQuantizer(
        levels=[-2, 0, 2], signed=True, learn_biases=True, initial_temperature=3.0
    )
    config = q.get_config()
    clone = QuantizationNetworkQuantizer.from_config(config)
    assert clone.get_config() == config
    assert quantizers.get(quantizers.serialize(q)).get_config() == config
    # quantize_model overrides bits; explicit levels win
    config.update(bits=8)
    assert QuantizationNetworkQuantizer.from_config(config).grid.levels == (-2, 0, 2)


def _small_model():
    return keras.Sequential(
        [
            keras.Input((6, 6, 1)),
            QuantConv2D(
                4, 3, kernel_quantizer={"class_name": "qn", "config": {"levels": "3(+-4)"}}
            ),
            QuantActivation("relu", quantizer={"class_name": "qn", "config": {"bits": 4}}),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
    )


def test_keras_save_and_reload_gives_identical_outputs(tmp_path):
    model = _small_model()
    x = np.random.default_rng(7).uniform(0, 1, (5, 6, 6, 1)).astype(np.float32)
    conv, activation = model.layers[0], model.layers[1]
    conv.kernel_quantizer.initialize(conv.kernel.numpy())
    activation.quantizer.initialize(np.maximum(conv(x).numpy(), 0))
    for quantizer, _ in qn_quantizers(model):
        quantizer.temperature.assign(7.0)
    path = str(tmp_path / "qn.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.layers[0].kernel_quantizer, QuantizationNetworkQuantizer)
    assert loaded.layers[0].kernel_quantizer.for_weights
    assert float(loaded.layers[1].quantizer.temperature.numpy()) == 7.0
    for training in (False, True):
        np.testing.assert_array_equal(
            loaded(x, training=training).numpy(), model(x, training=training).numpy()
        )


def test_qn_quantizers_finds_roles_and_phases_switch_them():
    model = _small_model()
    found = qn_quantizers(model)
    roles = sorted(role for _, role in found)
    assert roles == ["activations", "weights"]
    conv, activation = model.layers[0], model.layers[1]
    kernel = conv.kernel.numpy()
    conv.kernel_quantizer.initialize(kernel)
    pre = np.random.default_rng(8).normal(0, 2, (2, 4, 4, 4)).astype(np.float32)

    assert qn_phase(model, "weights") == {"on": 1, "off": 1}
    assert not np.allclose(conv.quantized_kernel(training=False).numpy(), kernel)
    for training in (False, True):
        np.testing.assert_array_equal(
            activation(pre, training=training).numpy(), np.maximum(pre, 0)
        )
    with pytest.raises(ValueError, match="switched off"):
        activation.quantizer.inference_form()

    assert qn_phase(model, "activations") == {"on": 1, "off": 1}
    np.testing.assert_array_equal(conv.quantized_kernel(training=True).numpy(), kernel)
    assert not np.allclose(activation(pre, training=False).numpy(), np.maximum(pre, 0))

    # switched off, the gradient passes through unchanged
    tensor = tf.constant(kernel)
    with tf.GradientTape() as tape:
        tape.watch(tensor)
        y = conv.kernel_quantizer(tensor, training=True)
    np.testing.assert_array_equal(tape.gradient(y, tensor).numpy(), np.ones_like(kernel))

    assert qn_phase(model, "both") == {"on": 2, "off": 0}
    assert not np.allclose(conv.quantized_kernel(training=False).numpy(), kernel)


def test_temperature_scheduler_sets_every_quantizer():
    model = _small_model()
    model.compile(keras.optimizers.SGD(0.1), "mse")
    model.optimizer.build(model.trainable_variables)
    scheduler = TemperatureScheduler(start=2.0, growth=5.0, cap=20.0)
    scheduler.set_model(model)
    scheduler.on_train_begin()
    for epoch, want in [(0, 2.0), (3, 17.0), (10, 20.0)]:
        scheduler.on_epoch_begin(epoch)
        assert [float(q.temperature.numpy()) for q, _ in qn_quantizers(model)] == [want, want]
    logs = {}
    scheduler.on_epoch_end(10, logs)
    assert logs == {"temperature": 20.0}

    stepwise = TemperatureScheduler(schedule="exponential", start=1.0, growth=2.0, per="step")
    stepwise.set_model(model)
    stepwise.on_train_begin()
    model.optimizer.iterations.assign(6)  # the optimizer's count, also on resume
    stepwise.on_train_batch_begin(0)
    assert [float(q.temperature.numpy()) for q, _ in qn_quantizers(model)] == [64.0, 64.0]
    assert TemperatureScheduler(schedule=lambda i: 3.0 * i + 1).temperature_at(2) == 7.0

    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    empty = TemperatureScheduler()
    empty.set_model(plain)
    with pytest.raises(ValueError, match="no Quantization Networks"):
        empty.on_train_begin()


def test_learned_biases_stay_sorted_under_sgd():
    q = QuantizationNetworkQuantizer(levels="3(+-2)", signed=True, learn_biases=True)
    x = tf.constant(np.linspace(-2, 2, 64), tf.float32)
    q.build(x.shape)
    assert q.biases.trainable
    q.biases.assign([-1.5, 0.4, -0.5, 1.5])
    optimizer = keras.optimizers.SGD(0.1)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(q(x, training=True))
    optimizer.apply(tape.gradient(loss, q.trainable_variables), q.trainable_variables)
    assert np.all(np.diff(q.biases.numpy()) >= 0)


# ---------------------------------------------------------------------------
# quantize_model, training and export


@pytest.mark.slow
def test_quantize_model_trains_and_exports_to_an_integer_model():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (96, 8, 8, 1)).astype(np.float32)
    y = (x[:, :4].mean((1, 2, 3)) > x[:, 4:].mean((1, 2, 3))).astype(np.int32)
    float_model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(8, 3, activation="relu"),
            keras.layers.Conv2D(8, 3, use_bias=False),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(2),
        ]
    )
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    float_model.compile(keras.optimizers.Adam(1e-2), loss)
    float_model.fit(x, y, epochs=5, batch_size=32, verbose=0)
    scheme = {
        "weights": {"class_name": "qn", "config": {"levels": "3(+-4)"}},
        "activations": {"class_name": "qn", "config": {"threshold_init": "uniform"}},
        "bits": 4,
        "first_last_bits": None,  # every layer on the preset, first and last included
    }
    qmodel = tfquant.quantize_model(float_model, scheme, calibration_data=x)
    found = qn_quantizers(qmodel)
    assert sorted(role for _, role in found) == ["activations"] * 2 + ["weights"] * 3
    for quantizer, role in found:
        if role == "activations":
            assert quantizer.is_exactly_uniform() and quantizer.inference_form().bits == 4
        else:
            assert quantizer.grid.levels == LEVEL_PRESETS["3(+-4)"]
    qmodel.compile(keras.optimizers.Adam(1e-3), loss)
    history = qmodel.fit(
        x, y, epochs=2, batch_size=48, verbose=0, callbacks=[TemperatureScheduler(growth=10.0)]
    )
    assert history.history["temperature"] == [1.0, 11.0]
    assert all(float(q.temperature.numpy()) == 11.0 for q, _ in found)
    assert np.isfinite(history.history["loss"]).all()

    from tfquant.lite import export_model, verify
    from tfquant.lite.lower import lower_model

    # the integer-ready graph computes what Keras does (BatchNorm folding changes
    # float rounding, which can move a value sitting on a threshold by one code)
    lowered = lower_model(qmodel).function(tf.constant(x)).numpy()
    same = np.isclose(lowered, qmodel.predict(x, verbose=0), atol=1e-5).all(axis=1)
    assert same.mean() >= 0.95
    # raises unless fully integer; INT4 made exact for, and verified on, this host's kernels
    result = export_model(
        qmodel, x, y, allow_mismatch=True, int4_weights=True, target=verify.host_target()
    )
    kernels = [w for w in result.report["weights"] if w["op"] in ("CONV_2D", "FULLY_CONNECTED")]
    assert len(kernels) == 3 and {w["storage"] for w in kernels} == {"INT4"}
    assert result.report["verification"]["top1_agreement"] >= 0.95
