"""Quantizers: grids, gradients against NumPy and finite differences, parameter
validity under training, property tests, the registry and argument checks."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tfquant import quantizers
from tfquant.quantizers import (
    LSQQuantizer,
    MinMaxQuantizer,
    PACTQuantizer,
    QILQuantizer,
    lsq_quantize,
    pact_quantize,
    qil_activation_quantize,
    qil_weight_quantize,
)

# ---------------------------------------------------------------------------
# NumPy references (float64), written from METHODS.md and the module docstrings


def _round(v):
    """Round half away from zero (ties are kept out of the test inputs)."""
    return np.sign(v) * np.floor(np.abs(v) + 0.5)


def _near_tie(v, margin):
    frac = v - np.floor(v)
    return np.abs(frac - 0.5) < margin


def _pick(candidates, keep, count):
    chosen = candidates[keep][:count]
    assert chosen.size == count, "not enough test inputs away from thresholds"
    return chosen


def np_qil_weight(w, c, d, gamma, bits, rescale, upstream):
    """Forward and gradients (w, c, d, gamma) of the QIL weight quantizer."""
    w = np.asarray(w, np.float64)
    q = 2 ** (bits - 1) - 1
    alpha, beta = 0.5 / d, 0.5 - 0.5 * c / d
    sign, mag = np.sign(w), np.abs(w)
    u_raw = alpha * mag + beta
    inside = (u_raw > 0) & (u_raw < 1)
    u = np.clip(u_raw, 1e-12, 1.0)
    transformed = np.where(u_raw <= 0, 0.0, u**gamma)
    w_hat = sign * _round(q * transformed) / q
    scale = (c + d) if rescale else 1.0
    g = upstream * inside
    slope = gamma * u ** (gamma - 1)
    grad_w = scale * g * gamma * alpha * u ** (gamma - 1)
    grad_c = scale * np.sum(g * (-gamma * alpha * u ** (gamma - 1) * sign))
    grad_d = scale * np.sum(g * slope * (alpha / d) * (c - mag) * sign)
    grad_gamma = scale * np.sum(g * sign * u**gamma * np.log(u))
    if rescale:
        grad_c += np.sum(upstream * w_hat)
        grad_d += np.sum(upstream * w_hat)
    return scale * w_hat, w_hat, grad_w, grad_c, grad_d, grad_gamma


def np_qil_activation(x, c, d, bits, rescale, upstream):
    """Forward and gradients (x, c, d) of the QIL activation quantizer."""
    x = np.asarray(x, np.float64)
    q = 2**bits - 1
    alpha, beta = 0.5 / d, 0.5 - 0.5 * c / d
    t = np.clip(alpha * x + beta, 0.0, 1.0)
    x_hat = _round(q * t) / q  # the paper's output, in [0, 1]
    inside = (alpha * x + beta > 0) & (alpha * x + beta < 1)
    g = upstream * inside
    grad_x, grad_c, grad_d = g * alpha, -alpha * np.sum(g), (alpha / d) * np.sum(g * (c - x))
    if not rescale:
        return x_hat, x_hat, grad_x, grad_c, grad_d
    # y = 2d * x_hat: paper gradient times 2d, plus x_hat * d(2d)/dd
    return (
        2 * d * x_hat,
        x_hat,
        2 * d * grad_x,
        2 * d * grad_c,
        2 * d * grad_d + 2 * np.sum(upstream * x_hat),
    )


def np_lsq(x, s, qn, qp, upstream):
    """Forward and gradients (x, s before grad scaling) of LSQ."""
    v = np.asarray(x, np.float64) / s
    inside = (v >= -qn) & (v <= qp)
    rounded = _round(np.clip(v, -qn, qp))
    d_step = np.where(inside, rounded - v, np.where(v < -qn, -qn, qp))
    return rounded * s, upstream * inside, np.sum(upstream * d_step)


def np_pact(x, a, bits, upstream):
    x = np.asarray(x, np.float64)
    q = 2**bits - 1
    y = _round(np.clip(x, 0, a) * q / a) * a / q
    inside = (x >= 0) & (x <= a)
    return y, upstream * inside, np.sum(upstream * (x > a))


def tape_gradients(fn, upstream, *args):
    tensors = [tf.constant(a, tf.float32) for a in args]
    with tf.GradientTape() as tape:
        for t in tensors:
            tape.watch(t)
        y = fn(*tensors)
    grads = tape.gradient(y, tensors, output_gradients=tf.constant(upstream, tf.float32))
    return y.numpy(), [None if g is None else g.numpy() for g in grads]


def central_difference(f, value, h=1e-6):
    return (f(value + h) - f(value - h)) / (2 * h)


# ---------------------------------------------------------------------------
# QIL weight gradients


def _qil_weight_inputs(c, d, gamma, bits, count=60, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.uniform(-1.5 * (c + d), 1.5 * (c + d), size=4000)
    mag = np.abs(w)
    q = 2 ** (bits - 1) - 1
    u = np.clip((mag - (c - d)) / (2 * d), 0, 1)
    keep = (
        (np.abs(mag - (c - d)) > 0.02)
        & (np.abs(mag - (c + d)) > 0.02)
        & ~_near_tie(q * u**gamma, 0.02)
    )
    w = _pick(w, keep, count)
    inside = (mag > c - d) & (mag < c + d)
    assert inside[keep][:count].sum() >= count // 3
    return w.astype(np.float32), rng.normal(size=count)


@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("gamma", [1.0, 0.7, 1.6])
@pytest.mark.parametrize("bits", [2, 4])
def test_qil_weight_gradients_match_numpy(rescale, gamma, bits):
    c, d = 0.6, 0.4
    w, upstream = _qil_weight_inputs(c, d, gamma, bits)
    y, (gw, gi, gg) = tape_gradients(
        lambda w_, i_, g_: qil_weight_quantize(w_, i_, g_, bits, rescale),
        upstream,
        w,
        [c, d],
        gamma,
    )
    y_np, _, gw_np, gc_np, gd_np, gg_np = np_qil_weight(w, c, d, gamma, bits, rescale, upstream)
    np.testing.assert_allclose(y, y_np, atol=1e-6)
    np.testing.assert_allclose(gw, gw_np, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gi, [gc_np, gd_np], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gg, gg_np, rtol=1e-4, atol=1e-5)
    assert np.all(np.abs([gc_np, gd_np, gg_np]) > 1e-3)  # the check is not vacuous


@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("gamma", [1.0, 0.7])
def test_qil_weight_parameter_gradients_finite_difference(rescale, gamma):
    """Central differences of the straight-through surrogate: the rounding
    residual is frozen at its forward value, the rest is the smooth transformer
    times the (optional) c + d factor."""
    bits, c, d = 3, 0.5, 0.3
    w, upstream = _qil_weight_inputs(c, d, gamma, bits, seed=1)
    _, (_, gi, gg) = tape_gradients(
        lambda w_, i_, g_: qil_weight_quantize(w_, i_, g_, bits, rescale),
        upstream,
        w,
        [c, d],
        gamma,
    )
    w64 = w.astype(np.float64)
    sign, mag = np.sign(w64), np.abs(w64)

    def transformed(c_, d_, g_):
        u = (mag - (c_ - d_)) / (2 * d_)
        return np.where(u <= 0, 0.0, np.clip(u, 1e-12, 1) ** g_)

    _, w_hat0, *_ = np_qil_weight(w, c, d, gamma, bits, rescale, upstream)
    residual = w_hat0 - sign * transformed(c, d, gamma)

    def surrogate(c_, d_, g_):
        scale = (c_ + d_) if rescale else 1.0
        return np.sum(upstream * scale * (sign * transformed(c_, d_, g_) + residual))

    fd_c = central_difference(lambda v: surrogate(v, d, gamma), c)
    fd_d = central_difference(lambda v: surrogate(c, v, gamma), d)
    fd_g = central_difference(lambda v: surrogate(c, d, v), gamma)
    np.testing.assert_allclose(gi, [fd_c, fd_d], rtol=2e-4, atol=1e-4)
    np.testing.assert_allclose(gg, fd_g, rtol=2e-4, atol=1e-4)


@pytest.mark.parametrize("rescale", [True, False])
def test_qil_weight_gradients_vanish_outside_interval(rescale):
    c, d, bits = 0.6, 0.3, 3
    rng = np.random.default_rng(2)
    pruned = rng.uniform(0.0, 0.25, size=10) * rng.choice([-1, 1], size=10)
    clipped = rng.uniform(1.0, 2.0, size=10) * rng.choice([-1, 1], size=10)
    upstream = rng.normal(size=20)
    w = np.concatenate([pruned, clipped]).astype(np.float32)

    def fn(w_, i_, g_):
        return qil_weight_quantize(w_, i_, g_, bits, rescale)

    y, (gw, gi, gg) = tape_gradients(fn, upstream, w, [c, d], 0.8)
    scale = (c + d) if rescale else 1.0
    np.testing.assert_allclose(y, np.concatenate([np.zeros(10), scale * np.sign(clipped)]))
    np.testing.assert_array_equal(gw, np.zeros(20))
    np.testing.assert_allclose(gg, 0.0, atol=1e-7)
    expected = np.sum(upstream[10:] * np.sign(clipped)) if rescale else 0.0
    np.testing.assert_allclose(gi, [expected, expected], rtol=1e-5, atol=1e-6)
    # Outside the interval the forward pass is smooth: a plain finite difference
    # of the quantizer itself must agree.
    if rescale:
        h = 1e-2

        def loss(c_, d_):
            out = fn(tf.constant(w), tf.constant([c_, d_]), tf.constant(0.8))
            return float(np.sum(upstream * out.numpy().astype(np.float64)))

        fd_c = (loss(c + h, d) - loss(c - h, d)) / (2 * h)
        fd_d = (loss(c, d + h) - loss(c, d - h)) / (2 * h)
        np.testing.assert_allclose(gi, [fd_c, fd_d], rtol=1e-3, atol=1e-4)
    # only pruned weights: every gradient is zero, even with rescaling
    _, (gw, gi, gg) = tape_gradients(fn, upstream[:10], pruned.astype(np.float32), [c, d], 0.8)
    np.testing.assert_array_equal(gw, np.zeros(10))
    np.testing.assert_allclose(gi, [0.0, 0.0], atol=1e-7)
    np.testing.assert_allclose(gg, 0.0, atol=1e-7)


# ---------------------------------------------------------------------------
# QIL activation gradients


def _qil_activation_inputs(c, d, bits, count=60, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-0.5, 1.5 * (c + d), size=4000)
    low, high = c - d, c + d
    q = 2**bits - 1
    keep = (
        (np.abs(x - low) > 0.02)
        & (np.abs(x - high) > 0.02)
        & ~_near_tie((x - low) / (2 * d) * q, 0.02)
    )
    x = _pick(x, keep, count)
    assert ((x > low) & (x < high)).sum() >= count // 3
    assert (x > high).sum() >= 3 and (x < low).sum() >= 3
    return x.astype(np.float32), rng.normal(size=count)


@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 8])
def test_qil_activation_gradients_match_numpy(rescale, bits):
    c, d = 0.8, 0.5
    x, upstream = _qil_activation_inputs(c, d, bits)
    y, (gx, gi) = tape_gradients(
        lambda x_, i_: qil_activation_quantize(x_, i_, bits, rescale), upstream, x, [c, d]
    )
    y_np, _, gx_np, gc_np, gd_np = np_qil_activation(x, c, d, bits, rescale, upstream)
    np.testing.assert_allclose(y, y_np, atol=1e-5)
    np.testing.assert_allclose(gx, gx_np, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gi, [gc_np, gd_np], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rescale", [True, False])
def test_qil_activation_interval_gradients_finite_difference(rescale):
    bits, c, d = 3, 0.8, 0.5
    x, upstream = _qil_activation_inputs(c, d, bits, seed=3)
    _, (_, gi) = tape_gradients(
        lambda x_, i_: qil_activation_quantize(x_, i_, bits, rescale), upstream, x, [c, d]
    )
    x64 = x.astype(np.float64)

    def transformed(c_, d_):
        return np.clip((x64 - (c_ - d_)) / (2 * d_), 0.0, 1.0)

    _, x_hat0, *_ = np_qil_activation(x, c, d, bits, rescale, upstream)
    residual = x_hat0 - transformed(c, d)

    def surrogate(c_, d_):
        scale = 2 * d_ if rescale else 1.0
        return np.sum(upstream * scale * (transformed(c_, d_) + residual))

    fd_c = central_difference(lambda v: surrogate(v, d), c)
    fd_d = central_difference(lambda v: surrogate(c, v), d)
    np.testing.assert_allclose(gi, [fd_c, fd_d], rtol=2e-4, atol=1e-4)


@pytest.mark.parametrize("rescale", [True, False])
def test_qil_activation_gradients_vanish_below_interval(rescale):
    c, d, bits = 0.8, 0.5, 4
    rng = np.random.default_rng(4)
    below = rng.uniform(-1.0, 0.25, size=12).astype(np.float32)
    upstream = rng.normal(size=12)

    def fn(x_, i_):
        return qil_activation_quantize(x_, i_, bits, rescale)

    y, (gx, gi) = tape_gradients(fn, upstream, below, [c, d])
    np.testing.assert_array_equal(y, np.zeros(12))
    np.testing.assert_array_equal(gx, np.zeros(12))
    np.testing.assert_allclose(gi, [0.0, 0.0], atol=1e-7)

    above = rng.uniform(1.4, 3.0, size=12).astype(np.float32)
    y, (gx, gi) = tape_gradients(fn, upstream, above, [c, d])
    top = 2 * d if rescale else 1.0
    np.testing.assert_allclose(y, np.full(12, top), rtol=1e-6)
    np.testing.assert_array_equal(gx, np.zeros(12))
    expected_d = 2 * np.sum(upstream) if rescale else 0.0
    np.testing.assert_allclose(gi, [0.0, expected_d], rtol=1e-5, atol=1e-6)
    if rescale:  # y = 2d above the interval: a finite difference of the quantizer
        h = 1e-2

        def loss(c_, d_):
            return float(np.sum(upstream * fn(tf.constant(above), tf.constant([c_, d_])).numpy()))

        fd_c = (loss(c + h, d) - loss(c - h, d)) / (2 * h)
        fd_d = (loss(c, d + h) - loss(c, d - h)) / (2 * h)
        np.testing.assert_allclose(gi, [fd_c, fd_d], rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------------------
# LSQ gradients


def _lsq_inputs(s, qn, qp, count=60, seed=0):
    rng = np.random.default_rng(seed)
    margin = max(2.0, 0.25 * (qn + qp))  # in steps, on both sides of the range
    x = rng.uniform((-qn - margin) * s, (qp + margin) * s, size=4000)
    v = x / s
    keep = (np.abs(v + qn) > 0.05) & (np.abs(v - qp) > 0.05) & ~_near_tie(v, 0.02)
    x = _pick(x, keep, count)
    v = x / s
    assert (v > qp).sum() >= 3 and (v < -qn).sum() >= 3
    return x.astype(np.float32), rng.normal(size=count)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 8])
def test_lsq_gradients_match_numpy(signed, bits):
    s = 0.2 if signed else 0.15
    qn = 2 ** (bits - 1) - 1 if signed else 0
    qp = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    grad_scale = 0.37
    x, upstream = _lsq_inputs(s, qn, qp, seed=bits)
    y, (gx, gs) = tape_gradients(
        lambda x_, s_: lsq_quantize(x_, s_, qn, qp, grad_scale), upstream, x, s
    )
    y_np, gx_np, gs_np = np_lsq(x, s, qn, qp, upstream)
    np.testing.assert_allclose(y, y_np, atol=1e-5)
    np.testing.assert_allclose(gx, gx_np, atol=1e-7)
    np.testing.assert_allclose(gs, grad_scale * gs_np, rtol=1e-4, atol=1e-5)

    # central difference of the straight-through surrogate s * (clip(x/s) + r0)
    x64 = x.astype(np.float64)
    residual = y_np / s - np.clip(x64 / s, -qn, qp)

    def surrogate(s_):
        return np.sum(upstream * s_ * (np.clip(x64 / s_, -qn, qp) + residual))

    np.testing.assert_allclose(
        gs / grad_scale, central_difference(surrogate, s), rtol=2e-4, atol=1e-4
    )


@pytest.mark.parametrize("signed", [True, False])
def test_lsq_gradients_outside_range(signed):
    s = 0.1
    qn = 3 if signed else 0
    qp = 3 if signed else 7
    rng = np.random.default_rng(5)
    above = rng.uniform(qp * s + 0.1, 2.0, size=8)
    below = rng.uniform(-2.0, -qn * s - 0.1, size=8)
    x = np.concatenate([above, below]).astype(np.float32)
    upstream = rng.normal(size=16)
    y, (gx, gs) = tape_gradients(lambda x_, s_: lsq_quantize(x_, s_, qn, qp, 1.0), upstream, x, s)
    np.testing.assert_allclose(y, np.concatenate([np.full(8, qp * s), np.full(8, -qn * s)]))
    np.testing.assert_array_equal(gx, np.zeros(16))
    expected = qp * np.sum(upstream[:8]) - qn * np.sum(upstream[8:])
    np.testing.assert_allclose(gs, expected, rtol=1e-5)
    h = 1e-3  # the quantizer is linear in s outside its range

    def loss(s_):
        y_ = lsq_quantize(tf.constant(x), tf.constant(s_), qn, qp, 1.0).numpy()
        return float(np.sum(upstream * y_))

    np.testing.assert_allclose(gs, central_difference(loss, s, h), rtol=1e-3, atol=1e-4)
    if not signed:  # unsigned: nothing reaches x or s from negative inputs
        _, (gx, gs) = tape_gradients(
            lambda x_, s_: lsq_quantize(x_, s_, qn, qp, 1.0), upstream[8:], x[8:], s
        )
        np.testing.assert_array_equal(gx, np.zeros(8))
        assert gs == 0.0


def test_lsq_layer_gradient_scale_is_per_example():
    q = LSQQuantizer(bits=3, initial_step=0.2)  # unsigned: Qp = 7
    x = np.random.default_rng(6).uniform(-0.2, 1.8, size=(4, 5, 3)).astype(np.float32)
    q.build(x.shape)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(q(x))
    (g_layer,) = tape.gradient(loss, [q.step])
    _, (_, g_raw) = tape_gradients(
        lambda x_, s_: lsq_quantize(x_, s_, 0, 7, 1.0), np.ones_like(x), x, 0.2
    )
    np.testing.assert_allclose(g_layer.numpy(), g_raw / np.sqrt(15 * 7), rtol=1e-5)

    w = LSQQuantizer(bits=3, signed=True, initial_step=0.2)  # N = all elements, Qp = 3
    w.build(x.shape)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(w(x))
    (g_layer,) = tape.gradient(loss, [w.step])
    _, (_, g_raw) = tape_gradients(
        lambda x_, s_: lsq_quantize(x_, s_, 3, 3, 1.0), np.ones_like(x), x, 0.2
    )
    np.testing.assert_allclose(g_layer.numpy(), g_raw / np.sqrt(60 * 3), rtol=1e-5)


# ---------------------------------------------------------------------------
# PACT gradients


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pact_gradients_match_numpy_and_finite_difference(bits):
    a = 1.2
    q = 2**bits - 1
    rng = np.random.default_rng(bits)
    x = rng.uniform(-0.6, 2.2, size=4000)
    keep = (np.abs(x) > 0.02) & (np.abs(x - a) > 0.02) & ~_near_tie(x * q / a, 0.02)
    x = _pick(x, keep, 60).astype(np.float32)
    upstream = rng.normal(size=60)
    y, (gx, ga) = tape_gradients(lambda x_, a_: pact_quantize(x_, a_, bits), upstream, x, a)
    y_np, gx_np, ga_np = np_pact(x, a, bits, upstream)
    np.testing.assert_allclose(y, y_np, atol=1e-5)
    np.testing.assert_allclose(gx, gx_np, atol=1e-7)
    np.testing.assert_allclose(ga, ga_np, rtol=1e-5, atol=1e-6)
    assert abs(ga_np) > 1e-2

    x64 = x.astype(np.float64)
    residual = y_np - np.clip(x64, 0, a)

    def surrogate(a_):
        return np.sum(upstream * (np.clip(x64, 0, a_) + residual))

    np.testing.assert_allclose(ga, central_difference(surrogate, a), rtol=2e-4, atol=1e-5)


def test_pact_gradients_vanish_below_clip_and_follow_alpha_above():
    bits, a = 3, 0.9
    rng = np.random.default_rng(7)
    below = rng.uniform(-2.0, -0.01, size=10).astype(np.float32)
    above = rng.uniform(1.0, 3.0, size=10).astype(np.float32)
    upstream = rng.normal(size=10)

    def fn(x_, a_):
        return pact_quantize(x_, a_, bits)

    y, (gx, ga) = tape_gradients(fn, upstream, below, a)
    np.testing.assert_array_equal(y, np.zeros(10))
    np.testing.assert_array_equal(gx, np.zeros(10))
    assert ga == 0.0
    y, (gx, ga) = tape_gradients(fn, upstream, above, a)
    np.testing.assert_allclose(y, np.full(10, a), rtol=1e-6)
    np.testing.assert_array_equal(gx, np.zeros(10))
    np.testing.assert_allclose(ga, np.sum(upstream), rtol=1e-5)

    def loss(a_):
        return float(np.sum(upstream * fn(tf.constant(above), tf.constant(a_)).numpy()))

    np.testing.assert_allclose(ga, central_difference(loss, a, 1e-2), rtol=1e-3)


# ---------------------------------------------------------------------------
# Quantizers on their grids

QUANTIZER_KINDS = [
    "qil_weights",
    "qil_weights_gamma",
    "qil_weights_paper",
    "qil_weights_gamma_paper",
    "qil_activations",
    "lsq_weights",
    "lsq_activations",
    "pact",
    "minmax_weights",
    "minmax_activations",
    "minmax_activations_signed",
]

SIGNED_KINDS = {k for k in QUANTIZER_KINDS if "weights" in k} | {"minmax_activations_signed"}


def make_quantizer(kind: str, bits: int, x: np.ndarray, prune: bool = True):
    """A built quantizer of the given kind with parameters set from `x`.

    With `prune`, QIL intervals get a positive pruning threshold c - d (and a
    non-unit gamma when learned); without it they come from `initialize`."""
    top = float(np.abs(x).max()) or 1.0
    if kind.startswith("qil"):
        signed = "weights" in kind
        q = QILQuantizer(
            bits=bits,
            signed=signed,
            learn_gamma="gamma" in kind,
            rescale="paper" not in kind,
        )
        q.build(x.shape)
        if prune:
            low, high = 0.1 * top, 0.8 * top
            q.interval.assign([(low + high) / 2, (high - low) / 2])
            if q.learn_gamma:
                q.gamma.assign(0.7)
        else:
            q.initialize(x)
        return q
    if kind.startswith("lsq"):
        q = LSQQuantizer(bits=bits, signed=kind == "lsq_weights")
    elif kind == "pact":
        q = PACTQuantizer(bits=bits)
    elif kind == "minmax_weights":
        q = MinMaxQuantizer(bits=bits, signed=True, for_weights=True)
    else:
        q = MinMaxQuantizer(bits=bits, signed=kind == "minmax_activations_signed")
    q.build(x.shape)
    q.initialize(x)
    return q


def sample_input(kind, shape, rng):
    if kind in SIGNED_KINDS:
        return rng.normal(0.0, 0.5, size=shape).astype(np.float32)
    return rng.normal(0.4, 1.0, size=shape).astype(np.float32)  # some negatives


def check_on_grid(q, x, y):
    """y = scale * (codes - zero_point) with codes in range; returns the codes."""
    form = q.inference_form(x)
    scale = float(form.scale)
    assert scale > 0
    raw = y.astype(np.float64) / scale + form.zero_point
    np.testing.assert_allclose(raw, np.round(raw), atol=2e-3)
    assert raw.min() >= form.code_min - 1e-3 and raw.max() <= form.code_max + 1e-3
    codes = form.codes(y)
    np.testing.assert_allclose(
        y, scale * (codes - form.zero_point), rtol=1e-5, atol=1e-6 * max(1.0, scale)
    )
    narrow = form.code_min < 0  # symmetric signed grid, zero point 0
    limit = 2**form.bits - 1 if narrow else 2**form.bits
    if narrow:
        assert form.zero_point == 0
        assert form.code_min == -(2 ** (q.bits - 1) - 1) and form.code_max == -form.code_min
    else:
        assert (form.code_min, form.code_max) == (0, 2**q.bits - 1)
    assert len(np.unique(codes)) <= limit
    return form, codes


def expected_codes(kind, q, form, x):
    """Codes computed in NumPy from the input, and the pre-rounding values
    (to tell a genuine mismatch from a float tie)."""
    x = x.astype(np.float64)
    scale = float(form.scale)
    if kind.startswith("qil_weights"):
        c, d = (float(v) for v in q.interval.numpy())
        gamma = float(q.gamma.numpy()) if q.learn_gamma else 1.0
        levels = 2 ** (q.bits - 1) - 1
        u = np.clip((np.abs(x) - (c - d)) / (2 * d), 0, 1)
        pre = np.where(u <= 0, 0.0, u**gamma) * levels
        return np.sign(x) * _round(pre), pre
    if kind == "qil_activations":
        pre = (x - form.offset) / scale
    elif kind in ("lsq_weights", "minmax_weights"):
        pre = x / scale
    else:
        pre = x / scale + form.zero_point
    return np.clip(_round(pre), form.code_min, form.code_max), pre


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("kind", QUANTIZER_KINDS)
def test_quantizer_output_is_the_declared_integer_grid(kind, bits):
    rng = np.random.default_rng(bits)
    x = sample_input(kind, (40, 25), rng)
    q = make_quantizer(kind, bits, x)
    y = q(x, training=False).numpy()
    form, codes = check_on_grid(q, x, y)
    want, pre = expected_codes(kind, q, form, x)
    mismatch = codes != want
    # a mismatch is only allowed on a float tie, and by one code
    assert np.all(_near_tie(pre[mismatch], 1e-4)), f"{mismatch.sum()} codes differ"
    assert np.all(np.abs(codes - want)[mismatch] <= 1)
    assert mismatch.sum() <= 2
    if kind == "qil_activations":
        c, d = (float(v) for v in q.interval.numpy())
        assert form.offset == pytest.approx(c - d) and form.offset > 0
        np.testing.assert_allclose(float(form.scale), 2 * d / (2**bits - 1), rtol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("kind", QUANTIZER_KINDS)
def test_quantizer_uses_every_level_on_a_dense_input(kind, bits):
    """A dense sweep past both ends of the range reaches each level exactly once
    in the count: 2^b - 1 for signed narrow grids, 2^b for unsigned."""
    rng = np.random.default_rng(0)
    q = make_quantizer(kind, bits, sample_input(kind, (500,), rng))
    form = q.inference_form(np.linspace(-1, 1, 5))
    span = 3.0 * float(form.scale) * 2**bits + abs(form.offset)
    x = np.linspace(-span, span, 20001).astype(np.float32)
    if kind == "minmax_weights":
        x = np.linspace(-1, 1, 20001).astype(np.float32)
    y = q(x, training=False).numpy()
    form, codes = check_on_grid(q, x, y)
    expected = (
        2**bits - 1 if kind in SIGNED_KINDS and kind != "minmax_activations_signed" else 2**bits
    )
    assert len(np.unique(codes)) == expected


def test_qil_activation_paper_outputs_codes_over_q():
    """rescale=False: outputs are k / (2^b - 1) in [0, 1], with no integer form."""
    bits = 3
    x = np.random.default_rng(8).uniform(-1, 3, size=500).astype(np.float32)
    q = QILQuantizer(bits=bits, rescale=False, initial_center=1.0, initial_distance=0.6)
    q.build(x.shape)
    y = q(x).numpy().astype(np.float64)
    k = y * (2**bits - 1)
    np.testing.assert_allclose(k, np.round(k), atol=1e-4)
    assert set(np.round(k).astype(int)) == set(range(2**bits))
    y_np, *_ = np_qil_activation(x, 1.0, 0.6, bits, False, np.zeros(500))
    np.testing.assert_allclose(y, y_np, atol=1e-5)
    with pytest.raises(ValueError, match="rescale=False"):
        q.inference_form()


def test_qil_weights_without_rescale_lie_in_unit_interval():
    x = np.random.default_rng(9).normal(0, 1, size=300).astype(np.float32)
    q = QILQuantizer(bits=3, signed=True, rescale=False, initial_center=1.0, initial_distance=0.8)
    q.build(x.shape)
    y = q(x).numpy()
    assert np.abs(y).max() == pytest.approx(1.0)
    np.testing.assert_allclose(y * 3, np.round(y * 3), atol=1e-5)
    assert float(q.inference_form().scale) == pytest.approx(1 / 3)


def test_minmax_activation_tracks_moving_average():
    q = MinMaxQuantizer(bits=4, ema_decay=0.5)
    q.build((10,))
    q(np.linspace(0, 2, 10).astype(np.float32), training=True)
    assert float(q.range_max.numpy()) == pytest.approx(2.0)  # first batch: no decay
    q(np.linspace(0, 4, 10).astype(np.float32), training=True)
    assert float(q.range_max.numpy()) == pytest.approx(3.0)
    q(np.linspace(0, 40, 10).astype(np.float32), training=False)
    assert float(q.range_max.numpy()) == pytest.approx(3.0)  # inference leaves it alone
    y = q(np.array([5.0, -1.0, 1.0], np.float32)).numpy()
    np.testing.assert_allclose(y, [3.0, 0.0, 1.0], atol=1e-6)


def test_lsq_and_qil_initialization_formulas():
    x = np.random.default_rng(10).normal(0, 0.3, size=(64, 8)).astype(np.float32)
    lsq = LSQQuantizer(bits=3, signed=True)
    lsq.initialize(x)
    assert float(lsq.step.numpy()) == pytest.approx(2 * np.mean(np.abs(x)) / np.sqrt(3), rel=1e-5)
    qil = QILQuantizer(bits=3, signed=True)
    qil.initialize(x)
    c, d = qil.interval.numpy()
    assert c == pytest.approx(d)  # no pruning at initialization
    assert 0.2 * np.abs(x).max() <= c + d <= np.abs(x).max() + 1e-6


# ---------------------------------------------------------------------------
# Parameters stay valid under training


def _sgd_hammer(q, x, steps=200, magnitude=50.0, seed=0):
    """Random large gradients, and every 10th step the real gradient of a
    random linear loss, applied by SGD (which projects with the constraints)."""
    rng = np.random.default_rng(seed)
    optimizer = keras.optimizers.SGD(learning_rate=1.0)
    variables = q.trainable_variables
    for step in range(steps):
        if step % 10 == 9:
            upstream = tf.constant(rng.normal(size=x.shape) * magnitude, tf.float32)
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(q(x, training=True) * upstream)
            grads = tape.gradient(loss, variables)
        else:
            grads = [
                tf.constant(rng.normal(size=v.shape) * magnitude, tf.float32) for v in variables
            ]
        optimizer.apply_gradients(zip(grads, variables, strict=True))
        yield step


@pytest.mark.parametrize(
    "signed,learn_gamma,rescale",
    [(True, True, True), (True, False, False), (False, False, True), (False, False, False)],
)
def test_qil_interval_stays_valid_under_sgd(signed, learn_gamma, rescale):
    x = np.random.default_rng(11).normal(0.2, 0.5, size=(6, 5)).astype(np.float32)
    q = QILQuantizer(bits=3, signed=signed, learn_gamma=learn_gamma, rescale=rescale)
    q.build(x.shape)
    moved = set()
    for _ in _sgd_hammer(q, x):
        c, d = q.interval.numpy()
        moved.add((round(float(c), 3), round(float(d), 3)))
        assert d >= 1e-4 and c - d >= 0, (c, d)
        used_c, used_d = q._valid_interval().numpy()
        assert used_d > 0 and used_c - used_d >= 0
        if learn_gamma:
            assert float(q.gamma.numpy()) >= 0.1
    assert len(moved) > 100  # the interval really was updated
    y = q(x).numpy()
    assert np.all(np.isfinite(y))
    if rescale or signed:
        check_on_grid(q, x, y)


def test_qil_call_projects_an_invalid_interval():
    x = np.linspace(-2, 2, 41).astype(np.float32)
    for signed in (True, False):
        q = QILQuantizer(bits=3, signed=signed)
        q.build(x.shape)
        q.interval.assign([-0.5, -2.0])  # d < 0 and c - d > 0 is impossible after projection
        y = q(x).numpy()
        reference = QILQuantizer(bits=3, signed=signed, initial_center=1e-4, initial_distance=1e-4)
        reference.build(x.shape)
        np.testing.assert_allclose(y, reference(x).numpy(), atol=1e-7)
        assert np.all(np.isfinite(y))
        q.interval.assign([0.1, 0.5])  # c < d: pruning threshold would be negative
        np.testing.assert_allclose(q._valid_interval().numpy(), [0.5, 0.5])
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(q(x))
        assert np.all(np.isfinite(tape.gradient(loss, q.interval).numpy()))


@pytest.mark.parametrize("kind", ["lsq_weights", "lsq_activations", "pact"])
def test_step_and_alpha_stay_positive_under_sgd(kind):
    x = np.random.default_rng(12).normal(0.3, 0.7, size=(6, 5)).astype(np.float32)
    q = make_quantizer(kind, 3, x)
    variable = q.alpha if kind == "pact" else q.step
    minimum = np.float32(1e-3 if kind == "pact" else 1e-8)  # the constraint, in float32
    values = set()
    for _ in _sgd_hammer(q, x):
        value = float(variable.numpy())
        values.add(round(value, 4))
        assert value >= minimum
        y = q(x).numpy()
        assert np.all(np.isfinite(y))
    assert len(values) > 50
    # what call() uses is positive even if the variable is overwritten
    variable.assign(-3.0)
    y = q(x).numpy()
    assert np.all(np.isfinite(y))
    assert np.abs(y).max() <= (2**3) * minimum * 1.0001
    # and the integer form describes that same clamped grid
    check_on_grid(q, x, y)


# ---------------------------------------------------------------------------
# Property tests

PROPERTY = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
shapes = st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple)


@PROPERTY
@given(bits=st.integers(2, 8), shape=shapes, seed=st.integers(0, 2**16), prune=st.booleans())
@pytest.mark.parametrize("kind", QUANTIZER_KINDS)
def test_property_outputs_on_grid(kind, bits, shape, seed, prune):
    rng = np.random.default_rng(seed)
    x = sample_input(kind, shape, rng) * rng.uniform(0.1, 10.0)
    q = make_quantizer(kind, bits, x, prune=prune)
    y = q(x, training=False).numpy()
    assert y.shape == x.shape
    check_on_grid(q, x, y)


IDEMPOTENT_KINDS = [
    "qil_weights",
    "qil_activations",
    "lsq_weights",
    "lsq_activations",
    "pact",
    "minmax_weights",
    "minmax_activations",
    "minmax_activations_signed",
]


@PROPERTY
@given(bits=st.integers(2, 8), shape=shapes, seed=st.integers(0, 2**16))
@pytest.mark.parametrize("kind", IDEMPOTENT_KINDS)
def test_property_quantizing_twice_changes_nothing(kind, bits, shape, seed):
    """Idempotent where the grid is a fixed point: QIL with no pruning and
    gamma = 1 (as `initialize` sets it), and the uniform quantizers."""
    rng = np.random.default_rng(seed)
    x = sample_input(kind, shape, rng)
    q = make_quantizer(kind, bits, x, prune=False)
    once = q(x, training=False).numpy()
    twice = q(once, training=False).numpy()
    scale = float(q.inference_form(x).scale)
    np.testing.assert_allclose(twice, once, rtol=0, atol=1e-4 * scale)


@PROPERTY
@given(bits=st.integers(2, 8), seed=st.integers(0, 2**16))
def test_property_qil_paper_weights_idempotent_on_unit_interval(bits, seed):
    x = np.random.default_rng(seed).normal(0, 1, size=(7, 3)).astype(np.float32)
    q = QILQuantizer(
        bits=bits, signed=True, rescale=False, initial_center=0.5, initial_distance=0.5
    )
    q.build(x.shape)  # interval [0, 1]
    once = q(x).numpy()
    np.testing.assert_allclose(q(once).numpy(), once, atol=1e-6)
    assert len(np.unique(once)) <= 2**bits - 1


# ---------------------------------------------------------------------------
# Registry and serialization

CONFIGURED = [
    QILQuantizer(
        bits=3,
        signed=True,
        learn_gamma=True,
        rescale=False,
        initial_center=0.7,
        initial_distance=0.4,
    ),
    QILQuantizer(bits=5, initial_center=2.0, initial_distance=1.5),
    LSQQuantizer(bits=2, signed=True, initial_step=0.03),
    LSQQuantizer(bits=7, initial_step=0.5),
    PACTQuantizer(bits=3, initial_alpha=4.0, alpha_decay=1e-4),
    MinMaxQuantizer(bits=6, signed=True, for_weights=True),
    MinMaxQuantizer(bits=4, signed=True, ema_decay=0.9),
]


def test_registered_names():
    assert {"qil", "lsq", "pact", "minmax"} <= set(quantizers.registered_names())


@pytest.mark.parametrize(
    "name,cls", [("qil", QILQuantizer), ("lsq", LSQQuantizer), ("pact", PACTQuantizer)]
)
def test_get_by_name_and_class_name(name, cls):
    q = quantizers.get(name)
    assert type(q) is cls
    assert type(quantizers.get(cls.__name__)) is cls
    assert type(quantizers.get(name.upper())) is cls
    assert quantizers.get(None) is None


def test_get_dict_defaults_and_instance():
    q = quantizers.get({"class_name": "qil", "config": {"bits": 3}})
    assert isinstance(q, QILQuantizer) and q.bits == 3 and not q.signed
    q = quantizers.get({"class_name": "lsq", "config": {"bits": 3}}, signed=True)
    assert (q.bits, q.signed) == (3, True)
    q = quantizers.get({"class_name": "lsq", "config": {"signed": False}}, signed=True)
    assert not q.signed  # the identifier wins over the default
    q = quantizers.get("minmax", signed=True, for_weights=True)
    assert q.for_weights and q.signed
    q = quantizers.get("pact", for_weights=True)  # role hints go only where accepted
    assert isinstance(q, PACTQuantizer)
    instance = LSQQuantizer(bits=5)
    assert quantizers.get(instance) is instance


def test_get_rejects_unknown_and_malformed():
    with pytest.raises(ValueError, match="'no_such_quantizer'"):
        quantizers.get("no_such_quantizer")
    with pytest.raises(ValueError, match="'nope'"):
        quantizers.get({"class_name": "nope", "config": {}})
    with pytest.raises(ValueError, match="class_name"):
        quantizers.get({"config": {"bits": 3}})
    with pytest.raises(ValueError, match="42"):
        quantizers.get(42)


@pytest.mark.parametrize("quantizer", CONFIGURED, ids=lambda q: type(q).__name__)
def test_config_round_trip(quantizer):
    config = quantizer.get_config()
    clone = type(quantizer).from_config(config)
    assert clone.get_config() == config
    via_get = quantizers.get(quantizers.serialize(quantizer))
    assert type(via_get) is type(quantizer) and via_get.get_config() == config
    serialized = keras.saving.serialize_keras_object(quantizer)
    assert serialized["registered_name"] == f"tfquant>{type(quantizer).__name__}"
    from_keras_form = quantizers.get(serialized)
    assert type(from_keras_form) is type(quantizer)
    assert from_keras_form.get_config() == config
    deserialized = keras.saving.deserialize_keras_object(serialized)
    assert type(deserialized) is type(quantizer) and deserialized.get_config() == config


@pytest.mark.parametrize("quantizer", CONFIGURED, ids=lambda q: type(q).__name__)
def test_clone_with_same_weights_computes_the_same(quantizer):
    rng = np.random.default_rng(13)
    x = rng.normal(0.2, 1.0, size=(5, 4)).astype(np.float32)
    original = type(quantizer).from_config(quantizer.get_config())
    original.build(x.shape)
    if original.weights:
        original.set_weights([w + rng.uniform(0.0, 0.1) for w in original.get_weights()])
    clone = type(quantizer).from_config(original.get_config())
    clone.build(x.shape)
    clone.set_weights(original.get_weights())
    np.testing.assert_array_equal(clone(x).numpy(), original(x).numpy())


# ---------------------------------------------------------------------------
# Bad input

FACTORIES = {
    "QIL": lambda **kw: QILQuantizer(**kw),
    "LSQ": lambda **kw: LSQQuantizer(**kw),
    "PACT": lambda **kw: PACTQuantizer(**kw),
    "minmax": lambda **kw: MinMaxQuantizer(**kw),
}


@pytest.mark.parametrize("bits", [0, 1, 9, 4.5, True, "4", -3])
@pytest.mark.parametrize("method", sorted(FACTORIES))
def test_bad_bits_are_rejected_by_value(method, bits):
    with pytest.raises(ValueError) as info:
        FACTORIES[method](bits=bits)
    message = str(info.value)
    assert str(bits) in message, message
    assert "2..8" in message and method in message


@pytest.mark.parametrize("bits", [2, 8, np.int64(5)])
@pytest.mark.parametrize("method", sorted(FACTORIES))
def test_good_bits_are_accepted(method, bits):
    assert FACTORIES[method](bits=bits).bits == int(bits)


def test_qil_rejects_bad_intervals():
    with pytest.raises(ValueError, match=r"center 0\.5 and distance 1\.0"):
        QILQuantizer(initial_center=0.5, initial_distance=1.0)
    for distance in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="initial_distance"):
            QILQuantizer(initial_center=1.0, initial_distance=distance)
    with pytest.raises(ValueError, match="center nan"):
        QILQuantizer(initial_center=float("nan"))
    with pytest.raises(ValueError, match="learn_gamma"):
        QILQuantizer(signed=False, learn_gamma=True)
    QILQuantizer(initial_center=0.5, initial_distance=0.5)  # c - d = 0 is allowed


def test_other_argument_checks():
    with pytest.raises(ValueError, match="signed=True"):
        PACTQuantizer(signed=True)
    with pytest.raises(ValueError, match="-1.0"):
        PACTQuantizer(alpha_decay=-1.0)
    with pytest.raises(ValueError, match="initial_alpha"):
        PACTQuantizer(initial_alpha=0.0)
    with pytest.raises(ValueError, match="initial_step"):
        LSQQuantizer(initial_step=-0.1)
    with pytest.raises(ValueError, match="1.5"):
        MinMaxQuantizer(ema_decay=1.5)
    with pytest.raises(ValueError, match="must be signed"):
        MinMaxQuantizer(for_weights=True, signed=False)


@pytest.mark.parametrize("kind", QUANTIZER_KINDS)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_initialize_rejects_non_finite_values(kind, bad):
    x = np.random.default_rng(14).normal(size=(4, 4)).astype(np.float32)
    q = make_quantizer(kind, 3, x)
    before = [w.copy() for w in q.get_weights()]
    x[1, 2] = bad
    with pytest.raises(ValueError, match="NaN") as info:
        q.initialize(x)
    assert str(bad) in str(info.value)
    for old, new in zip(before, q.get_weights(), strict=True):
        np.testing.assert_array_equal(old, new)  # nothing was half-set
    with pytest.raises(ValueError, match="empty"):
        q.initialize(np.zeros((0,), np.float32))


def test_each_method_exports_its_pure_function_and_callbacks_live_apart():
    """Every method's tf.custom_gradient function is importable from
    tfquant.quantizers; the callbacks from tfquant.callbacks (the old names
    still resolve)."""
    from tfquant import callbacks

    for name in (
        "cpq_quantize",
        "direct_quantize",
        "lsq_quantize",
        "pact_quantize",
        "qil_activation_quantize",
        "qil_weight_quantize",
        "qn_quantize",
    ):
        assert name in quantizers.__all__ and callable(getattr(quantizers, name)), name
    assert set(callbacks.__all__) == {"LearnedBitsLogger", "TemperatureScheduler"}
    assert not {"LearnedBitsLogger", "TemperatureScheduler"} & set(quantizers.__all__)
    assert quantizers.TemperatureScheduler is callbacks.TemperatureScheduler
