"""tfquant.ops: straight-through rounding, fused unsigned fake-quant, int8 ranges."""

import numpy as np
import pytest
import tensorflow as tf

from tfquant import ops


def _away_from_ties(values: np.ndarray, step: float, margin: float = 0.05) -> np.ndarray:
    """Moves values whose value/step is within `margin` of a .5 tie off it."""
    ratio = values / step
    frac = ratio - np.floor(ratio)
    near = np.abs(frac - 0.5) < margin
    return np.where(near, (np.floor(ratio) + 0.5 + 2 * margin) * step, values)


# ---------------------------------------------------------------------------
# round_half_away / round_ste


def test_round_half_away_ties_go_away_from_zero():
    x = tf.constant([-2.5, -1.5, -0.5, -0.4, 0.0, 0.4, 0.5, 1.5, 2.5, 2.6])
    expected = [-3.0, -2.0, -1.0, 0.0, 0.0, 0.0, 1.0, 2.0, 3.0, 3.0]
    np.testing.assert_array_equal(ops.round_half_away(x).numpy(), expected)


def test_round_ste_forward_rounds():
    x = np.random.default_rng(1).uniform(-20, 20, size=(4, 5)).astype(np.float32)
    x = _away_from_ties(x, 1.0)
    y = ops.round_ste(tf.constant(x)).numpy()
    np.testing.assert_array_equal(y, np.round(x))
    np.testing.assert_array_equal(ops.round_ste(tf.constant([0.4, 1.6, -1.5])).numpy(), [0, 2, -2])


def test_round_ste_backward_is_identity():
    rng = np.random.default_rng(2)
    x = tf.constant(rng.uniform(-5, 5, size=(3, 7)).astype(np.float32))
    upstream = rng.normal(size=(3, 7)).astype(np.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = ops.round_ste(x)
    grad = tape.gradient(y, x, output_gradients=tf.constant(upstream)).numpy()
    np.testing.assert_array_equal(grad, upstream)
    # plain tf.round would give no gradient: the estimator is what makes it nonzero
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(3.0 * ops.round_ste(x))
    np.testing.assert_array_equal(tape.gradient(loss, x).numpy(), np.full((3, 7), 3.0))


# ---------------------------------------------------------------------------
# fake_quant_unsigned


def _numpy_fake_quant(x, step, bits, offset=0.0):
    x = np.asarray(x, np.float64)
    return step * np.round(np.clip((x - offset) / step, 0, 2**bits - 1))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("offset", [None, 0.3])
def test_fake_quant_unsigned_matches_formula(bits, offset):
    rng = np.random.default_rng(bits)
    step = 0.17
    top = step * (2**bits - 1)
    x = rng.uniform(-0.5, top + 0.8, size=(5, 11))
    x[0, :2] = [-0.4, -0.2]  # below the range
    x[1, :2] = [top + 0.3, top + 0.7]  # above it
    shift = 0.0 if offset is None else offset
    x = (_away_from_ties(x - shift, step) + shift).astype(np.float32)
    y = ops.fake_quant_unsigned(tf.constant(x), tf.constant(step), bits, offset=offset).numpy()
    expected = _numpy_fake_quant(x, step, bits, shift)
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-5)
    codes = np.round(y / step)
    np.testing.assert_allclose(y, codes * step, atol=1e-5)
    assert codes.min() == 0 and codes.max() == 2**bits - 1
    assert len(np.unique(codes)) <= 2**bits


def test_fake_quant_unsigned_gradient_terms_match_numpy():
    rng = np.random.default_rng(3)
    bits, step, offset = 3, 0.25, 0.1
    x = rng.uniform(-0.6, 2.4, size=(40,)).astype(np.float32)
    upstream = rng.normal(size=(40,)).astype(np.float32)
    xt = tf.constant(x)
    y = ops.fake_quant_unsigned(xt, tf.constant(step), bits, offset=tf.constant(offset))
    grad_x, inside, above, error = ops.fake_quant_unsigned_with_gradient_terms(
        tf.constant(upstream), xt, y, tf.constant(step), bits, offset=tf.constant(offset)
    )
    shifted = x.astype(np.float64) - offset
    top = step * (2**bits - 1)
    in_range = (shifted >= 0) & (shifted <= top)
    assert in_range.any() and (shifted > top).any() and (shifted < 0).any()
    np.testing.assert_allclose(grad_x.numpy(), upstream * in_range, atol=1e-6)
    np.testing.assert_allclose(inside.numpy(), np.sum(upstream * in_range), rtol=1e-5)
    np.testing.assert_allclose(above.numpy(), np.sum(upstream * (shifted > top)), rtol=1e-5)
    y_np = _numpy_fake_quant(x, step, bits, offset)
    np.testing.assert_allclose(
        error.numpy(), np.sum(upstream * in_range * (y_np - shifted)), rtol=1e-4, atol=1e-6
    )


# ---------------------------------------------------------------------------
# int8_range_for_unsigned_codes


@pytest.mark.parametrize("bits", range(1, 9))
def test_int8_range_zero_point_and_scale(bits):
    step = 0.0625
    low, high = ops.int8_range_for_unsigned_codes(step, bits)
    assert low == -(256 - 2**bits) * step
    assert high == (2**bits - 1) * step
    scale = (high - low) / 255.0
    assert scale == pytest.approx(step, rel=1e-12)
    zero_point = -128 - low / scale
    assert zero_point == pytest.approx(128 - 2**bits, abs=1e-9)
    if bits == 4:
        assert round(zero_point) == 112


@pytest.mark.parametrize("bits", [2, 4, 6])
def test_int8_range_holds_the_b_bit_grid_exactly(bits):
    step = 0.05
    low, high = ops.int8_range_for_unsigned_codes(step, bits)
    grid = (np.arange(2**bits) * step).astype(np.float32)
    y = tf.quantization.fake_quant_with_min_max_vars(
        tf.constant(grid), low, high, num_bits=8, narrow_range=False
    ).numpy()
    np.testing.assert_allclose(y, grid, atol=1e-6)
    # above the top code int8 saturates at the b-bit maximum
    beyond = tf.quantization.fake_quant_with_min_max_vars(
        tf.constant([high + 3 * step]), low, high, num_bits=8
    ).numpy()
    np.testing.assert_allclose(beyond, [high], atol=1e-6)


@pytest.mark.parametrize("bits", [0, 9, -1])
def test_int8_range_rejects_bits(bits):
    with pytest.raises(ValueError, match=f"got {bits}"):
        ops.int8_range_for_unsigned_codes(0.1, bits)
