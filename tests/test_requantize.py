"""tfquant.ops.requantize against integer references written out in Python."""

import numpy as np
import pytest
import tensorflow as tf

from tfquant.ops import requantize as R


def _single(acc, m, e):
    return np.array([(int(a) * m + (1 << (30 - e))) >> (31 - e) for a in acc])


def _double(acc, m, e):
    left, right = max(e, 0), max(-e, 0)
    high = [((int(a) << left) * m + (1 << 30)) >> 31 for a in acc]
    return np.array([(h + ((1 << (right - 1)) if right else 0)) >> right for h in high])


@pytest.mark.parametrize("real", [0.0123, 0.7431 / 8, 1.7, 3e-5])
def test_fixed_point_rules_match_python_integers(real):
    acc = np.random.default_rng(0).integers(-200_000, 200_000, size=5000)
    (m,), (e,) = R.quantize_multiplier(np.array([real]))
    assert m * 2.0 ** (e - 31) == pytest.approx(real, rel=1e-9)
    single = R.apply_rounding(tf.constant(acc), "single", multiplier=[m], exponent=[e])
    double = R.apply_rounding(tf.constant(acc), "double", multiplier=[m], exponent=[e])
    np.testing.assert_array_equal(single.numpy(), _single(acc, int(m), int(e)))
    np.testing.assert_array_equal(double.numpy(), _double(acc, int(m), int(e)))


def test_double_rounding_differs_from_single_on_some_values():
    acc = np.arange(-5000, 5000)
    (m,), (e,) = R.quantize_multiplier(np.array([0.0928875]))
    single = R.apply_rounding(tf.constant(acc), "single", multiplier=[m], exponent=[e])
    double = R.apply_rounding(tf.constant(acc), "double", multiplier=[m], exponent=[e])
    differ = single.numpy() != double.numpy()
    assert differ.any() and differ.mean() < 0.1
    assert np.abs(single.numpy() - double.numpy()).max() == 1


def test_quantize_multiplier_rounds_halves_away_from_zero():
    # 0.5 + 2^-32 has fraction 0.5 + 2^-32 -> M = 2^30 + 0.5 -> 2^30 + 1.
    (m,), (e,) = R.quantize_multiplier(np.array([0.5 + 2.0**-32]))
    assert (m, e) == ((1 << 30) + 1, 0)
    (m,), (e,) = R.quantize_multiplier(np.array([1.0 - 2.0**-33]))  # rounds up to 2^31
    assert (m, e) == (1 << 30, 1)


def test_float32_rule_rounds_half_to_even_after_a_float32_product():
    scale = R.float32_scale(0.5, np.array([0.25]), 0.125)
    assert scale.dtype == np.float32 and scale[0] == 1.0
    steps = R.apply_rounding(tf.constant([1, 2, 3, -1, -3], tf.int64), "float32", scale=scale * 2.5)
    np.testing.assert_array_equal(steps.numpy(), [2, 5, 8, -2, -8])  # 2.5 -> 2, 7.5 -> 8


def test_requantize_recovers_the_accumulator_from_float_values():
    rng = np.random.default_rng(1)
    acc = rng.integers(-30_000, 30_000, size=(64, 3))
    unit = np.array([0.0013, 0.0021, 0.00077])
    offset = 0.3
    x = tf.constant((acc * unit + offset).astype(np.float32))
    (m,), (e,) = R.quantize_multiplier(np.array([0.013]))
    out = R.requantize(x, unit, "single", 0.1, offset, multiplier=[m], exponent=[e]).numpy()
    expected = _single(acc.ravel(), int(m), int(e)).reshape(acc.shape)
    np.testing.assert_array_equal(np.round((out - offset) / 0.1), expected)
    with pytest.raises(ValueError, match="'nearest'"):
        R.apply_rounding(tf.constant([1], tf.int64), "nearest")


def test_add_constants_follow_the_largest_ratio():
    multipliers, shift = R.add_multipliers([0.02, 0.01], 0.03)
    ratio = np.float32(0.02) / np.float32(0.03)  # in [0.5, 1): floor(log2) = -1
    assert shift == 21
    assert multipliers == [int(np.rint(ratio * np.float32(2**21))), 699051]
    assert R.add_multipliers([1.0, 1.0], 1e-3) is None  # ratio 1000 > 256: not XNNPACK's
    assert R.add_multipliers([1.0, 1e-4], 1.0) is None  # ratio below 2^-10


def test_integer_add_matches_python_integers():
    rng = np.random.default_rng(2)
    scales = [0.0173, 0.0411]
    codes = [rng.integers(-128, 128, size=4000), rng.integers(-128, 128, size=4000)]
    multipliers, shift = R.add_multipliers(scales, 0.05)
    values = [tf.constant((c * s).astype(np.float32)) for c, s in zip(codes, scales, strict=True)]
    out = R.add(values, scales, multipliers, shift, 0.05).numpy()
    expected = [
        (int(a) * multipliers[0] + int(b) * multipliers[1] + (1 << (shift - 1))) >> shift
        for a, b in zip(*codes, strict=True)
    ]
    np.testing.assert_array_equal(np.round(out / 0.05), expected)
    # The float sum rounded to the output grid differs somewhere: the test can fail.
    float_sum = np.round((codes[0] * scales[0] + codes[1] * scales[1]) / 0.05)
    assert (float_sum != np.asarray(expected)).any()


def test_a_product_scale_of_odd_sixteenths_rounds_alike_on_both_cpus():
    """tfquant.lite.products: with s = M / 2^16 (M odd) XNNPACK's x86 rule
    (float32, ties to even) and arm64 rule (exact, ties up) agree on every
    product of two int8 codes (zero points removed, so in [-255, 255]) that
    does not saturate the int8 output."""
    from tfquant.lite import products

    codes = np.arange(-255, 256, dtype=np.float64)
    p = np.unique(np.outer(codes, codes))
    for m in (1, 3, 255, 257, 511, 4097, 65535):
        s = np.float32(m / 2.0**16)
        assert products.safe(s)
        reached = p[np.abs(p * float(s)) < 256]  # beyond, the int8 output saturates
        a = tf.constant(reached, tf.float32)
        b = tf.fill(a.shape, s)  # the code 1 on the grid s: the MUL's scale is s
        x86 = R.multiply(a, b, [1.0, float(s)], 1.0, "float32").numpy()
        arm64 = R.multiply(a, b, [1.0, float(s)], 1.0, "upward").numpy()
        np.testing.assert_array_equal(x86, arm64)
    # An even M: ties exist (16384 / 2^15 = 128 * 128 / 2^15 = 0.5).
    assert not products.safe(np.float32(2 / 2.0**16))
    s = np.float32(1 / 2.0**15)
    a = tf.constant([16384.0, 3 * 16384.0])
    b = tf.fill(a.shape, s)
    x86 = R.multiply(a, b, [1.0, float(s)], 1.0, "float32").numpy()
    arm64 = R.multiply(a, b, [1.0, float(s)], 1.0, "upward").numpy()
    assert not np.array_equal(x86, arm64)


def test_logistic_table_is_on_the_fixed_grid():
    x = tf.constant(np.arange(-128, 128) * 0.05, tf.float32)
    y = R.logistic(x, 0.05).numpy()
    assert y.min() >= 0.0 and y.max() <= 255 / 256
    np.testing.assert_array_equal(y * 256, np.round(y * 256))
    expected = np.minimum(1 / (1 + np.exp(-x.numpy().astype(np.float64))), 255 / 256)
    np.testing.assert_allclose(y, expected, atol=1 / 512 + 1e-7)
