"""Integer requantization exactly as LiteRT's int8 kernels compute it.

An integer convolution (or fully connected layer) produces an int32
accumulator `acc` per output channel; the kernel then maps it to the output's
int8 grid. How it rounds depends on the kernel that runs:

* "float32" (XNNPACK, LiteRT's default delegate, on every CPU): the scale
  `s = s_in * s_w[c] / s_out` in float32, `round_half_even(float32(acc) * s)`.
* "single" (TFLite's builtin kernels through ruy on arm64): a 31-bit
  multiplier `M * 2^e` (`quantize_multiplier`), one rounding, ties up:
  `(acc * M + 2^(30 - e)) >> (31 - e)`.
* "double" (builtin kernels on x86, and depthwise convolutions on arm64):
  a rounding doubling high multiply, `(acc * 2^max(e, 0) * M + 2^30) >> 31`,
  then a rounding right shift by `max(-e, 0)`, ties up in both.

An integer ADD (XNNPACK, on every CPU) rescales each input's codes with a
21-bit multiplier and rounds once (`add_multipliers`, `add`).

`requantize` recovers `acc` from the float value a Keras model computes
(exact while the float error stays below half an accumulator unit, which
float64 gives for any realistic layer), and applies the rule.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

ROUNDINGS = ("float32", "single", "double")


def quantize_multiplier(real: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """TFLite's `QuantizeMultiplier`, per element: `real = M * 2^(e - 31)` with
    `M = round(fraction * 2^31)` (ties away from zero, as std::round) a 31-bit integer."""
    fraction, exponent = np.frexp(np.asarray(real, np.float64))
    multiplier = (np.sign(fraction) * np.floor(np.abs(fraction) * 2.0**31 + 0.5)).astype(np.int64)
    overflow = multiplier == 2**31
    multiplier = np.where(overflow, multiplier // 2, multiplier)
    exponent = np.where(overflow, exponent + 1, exponent).astype(np.int64)
    tiny = exponent < -31
    return np.where(tiny, 0, multiplier), np.where(tiny, 0, exponent)


def float32_scale(input_scale: float, weight_scales: np.ndarray, output_scale: float) -> np.ndarray:
    """XNNPACK's requantization scale: (s_in * s_w) / s_out, each step in float32."""
    product = np.float32(input_scale) * np.asarray(weight_scales, np.float32)
    return (product / np.float32(output_scale)).astype(np.float32)


def fixed_point_multiplier(
    input_scale: float, weight_scales: np.ndarray, output_scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """TFLite's per-channel (M, e): s_in * s_w / s_out in double, then `quantize_multiplier`."""
    real = (
        np.float64(np.float32(input_scale))
        * np.asarray(weight_scales, np.float32).astype(np.float64)
        / np.float64(np.float32(output_scale))
    )
    return quantize_multiplier(real)


def apply_rounding(acc, rounding: str, scale=None, multiplier=None, exponent=None):
    """The output step count (before the zero point) for int64 accumulators `acc`.

    Args:
      acc: int64 tensor, channels last.
      rounding: one of `ROUNDINGS`.
      scale: float32 per channel (or scalar), for "float32".
      multiplier, exponent: int64 per channel, for "single" and "double".
    """
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if rounding == "float32":
        product = tf.cast(acc, tf.float32) * tf.constant(scale, tf.float32)
        return tf.cast(tf.round(product), tf.int64)  # tf.round: ties to even
    multiplier = tf.constant(np.asarray(multiplier, np.int64))
    exponent = np.asarray(exponent, np.int64)
    if rounding == "single":
        shift = 31 - exponent
        nudge = tf.constant(np.left_shift(np.int64(1), shift - 1))
        return tf.bitwise.right_shift(acc * multiplier + nudge, tf.constant(shift))
    # "double": a rounding doubling high multiply, then a rounding shift.
    left, right = np.maximum(exponent, 0), np.maximum(-exponent, 0)
    high = tf.bitwise.right_shift(
        tf.bitwise.left_shift(acc, tf.constant(left)) * multiplier + (1 << 30), 31
    )
    half = np.where(right > 0, np.left_shift(np.int64(1), np.maximum(right - 1, 0)), 0)
    return tf.bitwise.right_shift(high + tf.constant(half), tf.constant(right))


def requantize(
    x,
    accumulator_scale,
    rounding: str,
    output_scale: float,
    offset: float = 0.0,
    bias: int | None = None,
    **rule,
):
    """Rounds float values `x` as the integer kernel rounds their accumulators.

    `(x - offset) / accumulator_scale` is the kernel's int32 accumulator
    (bias included; `accumulator_scale` = s_in * s_w per channel); it is
    rounded to that integer in float64 and requantized by `apply_rounding`.
    With `bias` (the kernel's int32 bias, as its file holds it), the
    accumulator is `x / accumulator_scale` rounded, plus `bias`, instead:
    the kernel's own sum, whatever float offset the bias was made from.
    Returns `offset + output_scale * steps` in `x`'s dtype: on the output
    grid, where the quantizer that follows keeps it.
    """
    dtype = x.dtype
    values = tf.cast(x, tf.float64)
    if offset and bias is None:
        values = values - offset
    acc = tf.round(values / tf.constant(accumulator_scale, tf.float64))
    if bias is not None:
        acc = acc + float(bias)
    if rounding == "float32":
        # Integer-valued float64 to float32 rounds as int32 to float32 does:
        # no detour through int64 (three passes fewer over the tensor).
        product = tf.cast(acc, tf.float32) * tf.constant(rule["scale"], tf.float32)
        steps = tf.cast(tf.round(product), tf.float64)
    else:
        steps = tf.cast(apply_rounding(tf.cast(acc, tf.int64), rounding, **rule), tf.float64)
    steps = steps * output_scale
    return tf.cast(steps + offset if offset else steps, dtype)


def add_multipliers(input_scales, output_scale: float) -> tuple[list[int], int] | None:
    """XNNPACK's int8 ADD constants: per input `M_i = lrintf((s_i / s_out) * 2^k)`
    (float32 ratio, ties to even) and the shift `k = 20 - floor(log2(max ratio))`.
    None where the delegate does not take the op (a ratio outside [2^-10, 2^8])
    and TFLite's own kernel runs it instead."""
    ratios = np.asarray(input_scales, np.float32) / np.float32(output_scale)
    largest = float(np.abs(ratios).max())
    if not (2.0**-10 <= largest and float(np.abs(ratios).min()) >= 2.0**-10 and largest < 256):
        return None
    shift = 20 - (int(np.frexp(np.float32(largest))[1]) - 1)
    if not 12 <= shift <= 30:
        return None
    multipliers = np.rint(ratios * np.float32(2.0**shift)).astype(np.int64)
    return [int(m) for m in multipliers], shift


def add(inputs, input_scales, multipliers, shift: int, output_scale: float):
    """Sums tensors on grids `input_scales` as XNNPACK's int8 ADD does:
    `(sum_i code_i * M_i + 2^(k-1)) >> k` output steps (ties up), returned as
    values on the output grid in the inputs' dtype."""
    dtype = inputs[0].dtype
    total = tf.constant(1 << (shift - 1), tf.int64)
    for x, scale, multiplier in zip(inputs, input_scales, multipliers, strict=True):
        codes = tf.cast(tf.round(tf.cast(x, tf.float64) / scale), tf.int64)
        total = total + codes * multiplier
    steps = tf.bitwise.right_shift(total, shift)
    return tf.cast(tf.cast(steps, tf.float64) * output_scale, dtype)


MULTIPLY_ROUNDINGS = ("float32", "upward")


def multiply(a, b, input_scales, output_scale: float, rounding: str):
    """Multiplies tensors on grids `input_scales` as XNNPACK's int8 MUL does.

    The product of the two inputs' codes (zero points removed) is an exact
    integer `p`; with `s = float32(float32(s_a * s_b) / s_out)`:
    * "float32" (x86): `round_half_even(float32(p) * s)` in float32;
    * "upward" (arm64, rndnu): `floor(p * s + 1/2)`, exact.
    Returns values on the output grid (zero point removed) in `a`'s dtype;
    the quantizer that follows clamps them to its range.
    """
    if rounding not in MULTIPLY_ROUNDINGS:
        raise ValueError(f"rounding must be one of {MULTIPLY_ROUNDINGS}, got {rounding!r}")
    dtype = a.dtype
    scale_a, scale_b = (np.float32(s) for s in input_scales)
    scale = np.float32(np.float32(scale_a * scale_b) / np.float32(output_scale))
    codes_a = tf.round(tf.cast(a, tf.float64) / float(scale_a))
    codes_b = tf.round(tf.cast(b, tf.float64) / float(scale_b))
    product = codes_a * codes_b
    if rounding == "float32":
        steps = tf.cast(tf.round(tf.cast(product, tf.float32) * scale), tf.float64)
    else:
        steps = tf.floor(product * float(scale) + 0.5)
    return tf.cast(steps * float(output_scale), dtype)


def logistic(x, input_scale: float):
    """The sigmoid of values on the grid `input_scale` as XNNPACK's int8
    LOGISTIC computes it: its table holds `float32(sigmoid(x))` (computed in
    double from the code's value) times 256, rounded half to even, on the
    fixed output grid 1/256 (codes 0..255 above the zero point -128).
    Returns values on that grid in `x`'s dtype."""
    dtype = x.dtype
    scale = float(np.float32(input_scale))
    values = tf.round(tf.cast(x, tf.float64) / scale) * scale
    sigmoid = tf.cast(tf.cast(1.0 / (1.0 + tf.exp(-values)), tf.float32), tf.float64)
    steps = tf.clip_by_value(tf.round(sigmoid * 256.0), 0.0, 255.0)
    return tf.cast(steps / 256.0, dtype)
