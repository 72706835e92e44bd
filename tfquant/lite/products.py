"""One integer MUL, the same codes on every CPU.

XNNPACK's int8 MUL multiplies the two inputs' codes (zero points removed)
into an exact integer p and rounds p * s, with s = s_a * s_b / s_out in
float32, onto the output grid; on x86 as `round_half_even(float32(p) * s)`,
on arm64 exactly, ties up (`tfquant.ops.requantize.multiply`). The two
differ where p * s is (within float32 round-off of) a half, so one file
computes other codes on the phone than on the host that verified it.

`align_products` moves each `QuantMultiply`'s output grid so that s is an
odd multiple of 2^-16, s = M / 2^16 (M odd); then
  * p * s is never a half: that needs p * M = 2^15 (mod 2^16), so p an odd
    multiple of 2^15, and no product of two codes in [-255, 255] is one;
  * it is at least 2^-16 from one, more than the float32 round-off of any
    |p * s| < 256 (half an ulp, at most 2^-17); larger values saturate.
so both CPUs round every product alike. The grid moves by at most one
part in M (M is about 2^16 s; ~2^8 for a swish or a squeeze-excite gate).
"""

from __future__ import annotations

import keras
import numpy as np

from tfquant import graph
from tfquant.layers import QuantMultiply
from tfquant.lite.integer_ops import activation_range
from tfquant.quantizers import MinMaxQuantizer
from tfquant.quantizers.uniform import range_form

FRACTION_BITS = 16


def file_scale(form) -> float:
    """The int8 scale the TFLite converter gives the tensor of `form`'s
    FakeQuant: (max - min) / 255 in double, from the float32 attributes."""
    low, high = activation_range(form, "tensor")
    return float(np.float32((np.float64(np.float32(high)) - np.float64(np.float32(low))) / 255.0))


def product_scale(scale_a: float, scale_b: float, scale_out: float) -> np.float32:
    """s of XNNPACK's int8 MUL, in float32 as it computes it."""
    return np.float32(np.float32(np.float32(scale_a) * np.float32(scale_b)) / np.float32(scale_out))


def safe(scale: np.float32) -> bool:
    """Whether s = M / 2^16 with M odd (see the module docstring)."""
    units = float(scale) * 2.0**FRACTION_BITS
    return units == np.round(units) and int(units) % 2 == 1


def align_products(model: keras.Model) -> dict[str, float]:
    """Moves each QuantMultiply's output grid so that its MUL rounds alike on
    every CPU (module docstring). In place, idempotent, in graph order (an
    upstream product's grid is an input grid downstream).

    Only min/max output quantizers are moved (the ones `quantize_model`
    places); another quantizer is left alone and its layer reported as NaN.

    Returns:
      Per QuantMultiply, the relative change of its output step.
    """
    from tfquant.lite.lower import _GRID_KEEPING, _QUANTIZING, _upstream

    changes = {}
    for layer, node in graph.nodes_in_order(model):
        if not isinstance(layer, QuantMultiply):
            continue
        sources = [_upstream(tensor, _GRID_KEEPING) for tensor in node.input_tensors]
        quantizer = layer.quantizer
        if (
            len(sources) != 2
            or not all(isinstance(s, _QUANTIZING) for s in sources)
            or not isinstance(quantizer, MinMaxQuantizer)
            or quantizer.for_weights
            or not quantizer.signed
        ):
            changes[layer.name] = float("nan")
            continue
        scale_a, scale_b = (file_scale(s.quantizer.inference_form()) for s in sources)
        form = quantizer.inference_form()
        current = file_scale(form)
        if safe(product_scale(scale_a, scale_b, current)):
            changes[layer.name] = 0.0
            continue
        chosen = _aligned_range(quantizer, form.zero_point, scale_a, scale_b, current)
        if chosen is None:
            changes[layer.name] = float("nan")
            continue
        low, high, scale = chosen
        quantizer.range_min.assign(low)
        quantizer.range_max.assign(high)
        changes[layer.name] = scale / current - 1.0
    return changes


def _aligned_range(quantizer, zero_point, scale_a, scale_b, current):
    """(min, max, file scale) of a range with the same zero point whose MUL
    scale is safe, nearest to `current`; None if none is found nearby."""
    product = float(np.float32(np.float32(scale_a) * np.float32(scale_b)))
    units = product / current * 2.0**FRACTION_BITS
    odd = 2 * int(np.floor(units / 2.0)) + 1
    for m in sorted({odd, odd + 2, odd - 2}, key=lambda m: abs(m - units)):
        if m <= 0:
            continue
        target = np.float32(product / (m / 2.0**FRACTION_BITS))
        for ulps in (0, 1, -1, 2, -2, 3, -3, 4, -4):
            step = float(np.float32(target + ulps * np.spacing(target)))
            low = np.float32(-zero_point * step)
            high = np.float32((255 - zero_point) * step)
            # The form the (signed) min/max quantizer will have with this range.
            form = range_form(float(low), float(high), quantizer.bits, signed=True)
            scale = file_scale(form)
            if form.zero_point == zero_point and safe(product_scale(scale_a, scale_b, scale)):
                return float(low), float(high), scale
    return None
