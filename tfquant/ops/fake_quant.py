"""Fused uniform quantization of a non-negative range.

Every uniform activation quantizer in tfquant (QIL, LSQ, PACT, min/max) has
the same forward pass once its parameters are known: codes 0..2^b-1 of the
input shifted by an offset, at a step s:

    y = s * round(clip((x - offset) / s, 0, 2^b - 1))

`tf.quantization.fake_quant_with_min_max_vars` computes this in one fused
kernel (min = 0, max = (2^b - 1) * s, no nudging since 0 is representable),
which matters: each extra elementwise op is a full pass over an activation
tensor. The quantizers differ only in their backward pass, which they build
from the terms returned by `fake_quant_unsigned_with_gradient_terms`.
"""

import tensorflow as tf


def fake_quant_unsigned(x: tf.Tensor, step: tf.Tensor, bits: int, offset=None) -> tf.Tensor:
    """Forward only: `step * round(clip((x - offset) / step, 0, 2^bits - 1))`."""
    if offset is not None:
        x = x - offset
    top = step * float(2**bits - 1)
    return tf.quantization.fake_quant_with_min_max_vars(
        x, tf.zeros_like(top), top, num_bits=bits, narrow_range=False
    )


def fake_quant_unsigned_with_gradient_terms(upstream, x, y, step, bits, offset=None):
    """Backward helpers for a quantizer whose forward is `fake_quant_unsigned`.

    Args:
      upstream: dL/dy.
      x: the quantizer input (before the offset).
      y: the forward output.
      step: quantization step s.
      bits: bit width b.
      offset: optional offset subtracted before quantizing.

    Returns:
      A tuple `(grad_x, sum_inside, sum_above, sum_inside_error)`:
      `grad_x` is upstream masked to the clipping range (straight-through),
      `sum_inside` = sum of upstream inside the range, `sum_above` = sum of
      upstream where the input was clipped at the top, and
      `sum_inside_error` = sum of upstream * (y - (x - offset)) inside the
      range, the rounding error that LSQ- and QIL-style step gradients need.
    """
    shifted = x - offset if offset is not None else x
    top = step * float(2**bits - 1)
    grad_x, _, sum_above = tf.quantization.fake_quant_with_min_max_vars_gradient(
        upstream, shifted, tf.zeros_like(top), top, num_bits=bits, narrow_range=False
    )
    sum_inside = tf.reduce_sum(grad_x)
    sum_inside_error = tf.reduce_sum(grad_x * (y - shifted))
    return grad_x, sum_inside, sum_above, sum_inside_error


def int8_range_for_unsigned_codes(step: float, bits: int) -> tuple[float, float]:
    """Min/max of an 8-bit FakeQuant that holds b-bit unsigned codes exactly.

    With min = -(256 - 2^b) * s and max = (2^b - 1) * s the int8 tensor has
    scale s and zero point 128 - 2^b: code 0 of the b-bit grid is int8 value
    128 - 2^b, code 2^b - 1 is 127. A fused ReLU clamps below at the zero
    point and int8 saturation clamps above, so the tensor carries exactly 2^b
    levels with no extra op.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8 for an int8 activation, got {bits}")
    return -(256 - 2**bits) * step, (2**bits - 1) * step
