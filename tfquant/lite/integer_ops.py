"""The integer ops the lowered graph is written in: FakeQuant'd tensors,
kernels and the ops that stand in for pooling and requantization.

Each function emits TensorFlow ops (while `tfquant.lite.lower` traces the
lowered graph) that `tf.lite.TFLiteConverter` turns into the int8 op named
in its docstring, with the quantization parameters the Keras model's
quantizers fix.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from tfquant.layers import QuantDense, window_reaches_padding
from tfquant.quantizers import InferenceForm

_L = keras.layers
# Layers that compute nothing in inference.
PASS_THROUGH = (_L.Dropout,)


class ExportError(ValueError):
    """The model cannot be lowered to an exact integer graph."""


def activation_range(form: InferenceForm, where: str) -> tuple[float, float]:
    """The (min, max) of the 8-bit FakeQuant that holds `form`'s codes exactly."""
    if not form.is_uniform:
        raise ExportError(f"{where}: non-uniform activation levels have no exact int8 form")
    scale = float(np.asarray(form.scale).reshape(-1)[0])
    if np.asarray(form.scale).size != 1:
        raise ExportError(f"{where}: TFLite activations have one scale per tensor")
    if form.zero_point == 0 and form.code_min == 0:
        # Unsigned b-bit codes at int8 zero point 128 - 2^b.
        return -(256 - 2**form.bits) * scale, (2**form.bits - 1) * scale
    if form.bits == 8:
        if form.signed and form.zero_point == 0:  # symmetric, codes -127..127
            return -128.0 * scale, 127.0 * scale
        return -form.zero_point * scale, (255 - form.zero_point) * scale
    raise ExportError(
        f"{where}: a {form.bits}-bit signed activation has no exact int8 form without a "
        "clamp; use 8 bits for tensors that can be negative"
    )


def int8_zero_point(form: InferenceForm) -> int:
    low, high = activation_range(form, "activation")
    scale = (high - low) / 255.0
    return int(round(-128 - low / scale))


def fake_quant_activation(x, form: InferenceForm, where: str):
    low, high = activation_range(form, where)
    return tf.quantization.fake_quant_with_min_max_vars(x, low, high, num_bits=8)


def offset_relu(x, form: InferenceForm, max_value: float | None):
    """relu / relu6 of the value v, on `x` = v - offset (the quantizer's offset
    is already subtracted): clamps `x` to [-offset, max_value - offset],
    each bound kept only where the quantizer's own clamp does not already
    apply it. Without an offset it is the op the converter fuses into the
    kernel before it."""
    offset = float(form.offset)
    if not offset:
        return tf.nn.relu(x) if max_value is None else tf.nn.relu6(x)
    x = tf.nn.relu(x) if offset > 0 else tf.maximum(x, -offset)
    _, top = activation_range(form, "activation")
    if max_value is not None and max_value - offset < top:
        x = tf.minimum(x, max_value - offset)
    return x


def emit_plain(operation, args):
    x = args[0]
    if isinstance(operation, _L.Add):
        return tf.add_n(args) if len(args) > 2 else tf.add(args[0], args[1])
    if isinstance(operation, PASS_THROUGH):
        return x
    if isinstance(operation, _L.MaxPooling2D):
        return tf.nn.max_pool2d(
            x, operation.pool_size, operation.strides, operation.padding.upper()
        )
    if isinstance(operation, _L.GlobalMaxPooling2D):
        return tf.reduce_max(x, axis=(1, 2), keepdims=operation.keepdims)
    if isinstance(operation, _L.Cropping2D):
        (top, bottom), (left, right) = operation.cropping
        height, width = int(x.shape[1]), int(x.shape[2])
        return x[:, top : height - bottom, left : width - right, :]
    if isinstance(operation, _L.AveragePooling2D):
        return average_pool(x, operation)
    if isinstance(operation, _L.GlobalAveragePooling2D):
        return global_average(x, operation.keepdims)
    if isinstance(operation, _L.Flatten):
        return tf.reshape(x, (-1, int(np.prod(x.shape[1:]))))
    if isinstance(operation, _L.Reshape):
        return tf.reshape(x, (-1,) + tuple(operation.target_shape))
    if isinstance(operation, _L.ZeroPadding2D):
        (top, bottom), (left, right) = operation.padding
        return tf.pad(x, [[0, 0], [top, bottom], [left, right], [0, 0]])
    if isinstance(operation, _L.Activation):
        name = getattr(operation.activation, "__name__", "")
        if name == "linear":
            return x
        if name == "softmax":
            # TFLite's int8 softmax output has scale 1/256 and zero point -128.
            probabilities = tf.nn.softmax(x)
            return tf.quantization.fake_quant_with_min_max_vars(
                probabilities, 0.0, 255.0 / 256.0, num_bits=8
            )
        if name == "relu":
            return tf.nn.relu(x)
    raise ExportError(f"cannot lower layer {operation.name!r} of type {type(operation).__name__}")


# Most identity convolutions that may read one tensor (see below).
MAX_IDENTITY_SITES = 32


def identity_weight(site: int) -> float:
    """The weight of identity convolution `site`: 1 for site 0, then
    distinct float32 values just above 1 (at most ~70 ulps, so that an int8
    accumulator 127 * code divided by the weight stays within 0.3 of the
    integer it equals for weight 1).

    The converter merges ops that compute the same float values from one
    tensor, and a merged op cannot keep two output grids (it falls back to
    float): each identity convolution reading a tensor needs its own weight
    value once its FakeQuant is folded. The values are those folds, found
    by folding candidates 1 + 2j ulps with TensorFlow's own kernel.
    """
    return float(_identity_weights()[site])


_FOLDED: list = []


def _identity_weights() -> list:
    if not _FOLDED:
        ulps = np.arange(0, 4 * MAX_IDENTITY_SITES, 2, dtype=np.float32)
        candidates = np.float32(1.0) + np.float32(2.0**-23) * ulps
        with tf.init_scope():  # eager, also when called while tracing
            folded = tf.quantization.fake_quant_with_min_max_vars_per_channel(
                candidates[None, :], -candidates, candidates, num_bits=8, narrow_range=True
            ).numpy()[0]
        for value in folded:
            if value not in _FOLDED and value >= 1.0:
                _FOLDED.append(value)
    return _FOLDED


def requantize_through_identity(x, offset, site: int = 0):
    """x - offset as a 1x1 depthwise convolution with weight ~1 (`identity_weight`).

    A FakeQuant straight after another one is merged by the converter into
    one requantization, which rounds once where the Keras model rounds
    twice; a SUB of a constant would keep both roundings but runs outside
    the XNNPACK delegate. The convolution keeps both, stays in the delegate
    and holds the offset in its int32 bias, which the exact inference form
    reads back from the file (`tfquant.lite.match_integer_kernels`).
    """
    channels = int(x.shape[-1])
    weight = identity_weight(site)
    kernel = tf.quantization.fake_quant_with_min_max_vars(
        tf.fill((1, 1, channels, 1), np.float32(weight)),
        -weight,
        weight,
        num_bits=8,
        narrow_range=True,
    )
    flat = x.shape.rank != 4
    y = tf.reshape(x, (-1, 1, 1, channels)) if flat else x
    y = tf.nn.depthwise_conv2d(y, kernel, (1, 1, 1, 1), "VALID")
    y = y - tf.fill((channels,), tf.constant(offset, tf.float32))
    return tf.reshape(y, (-1, channels)) if flat else y


# XNNPACK runs a depthwise convolution of up to 25 taps (5x5) in one pass
# and as fast as MEAN; from 6x6 on it takes a multi-pass path 20-40x slower
# (measured on LiteRT 2.3: 1.2 us at 5x5x480, 31 us at 6x6x480).
_ONE_PASS_DEPTHWISE_TAPS = 25


def global_average(x, keepdims):
    """Global average pooling as one integer op with weights 1/(h*w) (the int8
    code 127 at scale 1/(127*h*w)), which sums in int32 and requantizes once,
    onto its output's grid, inside XNNPACK:

    * up to 5x5, a depthwise convolution with an h x w kernel;
    * larger, a FULLY_CONNECTED over each channel's values, the channels
      moved in front by a TRANSPOSE (which only moves int8 codes), since the
      depthwise convolution is 10-40x slower there (7x7x2048, ResNet50's
      pooling at 224x224: 247 us against 23 us).

    TFLite's int8 MEAN is faster still, but requantizes its result inexactly
    (up to 7 output steps away from the exact mean on LiteRT 2.3, with the
    reference kernels too).
    """
    height, width, channels = (int(d) for d in x.shape[1:])
    count = height * width
    if count <= _ONE_PASS_DEPTHWISE_TAPS:
        y = window_average(x, (height, width), (1, 1))
        return y if keepdims else tf.reshape(y, (-1, channels))
    weight = 1.0 / count
    kernel = tf.quantization.fake_quant_with_min_max_vars(
        tf.fill((count, 1), weight), -weight, weight, num_bits=8, narrow_range=True
    )
    rows = tf.transpose(tf.reshape(x, (-1, count, channels)), (0, 2, 1))
    y = tf.matmul(tf.reshape(rows, (-1, count)), kernel)
    return tf.reshape(y, (-1, 1, 1, channels) if keepdims else (-1, channels))


def average_pool(x, layer):
    """AveragePooling2D as a depthwise convolution where no window reaches
    into padding (VALID, or SAME on a size the windows tile).

    TFLite's int8 AVERAGE_POOL_2D keeps its input's scale, so it rounds the
    mean onto the input grid before the next quantizer rounds again; the
    convolution rounds once, onto the next grid, as the Keras model does.
    A window that reaches into SAME padding averages fewer values, which one
    convolution weight cannot express: such a layer keeps AVERAGE_POOL_2D.
    """
    if layer.data_format != "channels_last":
        raise ExportError(f"layer {layer.name!r}: only channels_last pooling is supported")
    pool, strides = tuple(layer.pool_size), tuple(layer.strides)
    if window_reaches_padding(pool, strides, layer.padding, x.shape[1:3]):
        return tf.nn.avg_pool2d(x, pool, strides, "SAME")
    return window_average(x, pool, strides)


def window_average(x, window, strides):
    """The mean over each window as a depthwise convolution with weights
    1/(h*w): the int8 code 127 at scale 1/(127*h*w). The convolution sums in
    int32 and requantizes once, onto its output's grid."""
    channels = int(x.shape[-1])
    count = int(window[0]) * int(window[1])
    weight = 1.0 / count
    kernel = tf.quantization.fake_quant_with_min_max_vars(
        tf.fill((*window, channels, 1), weight),
        -weight,
        weight,
        num_bits=8,
        narrow_range=True,
    )
    return tf.nn.depthwise_conv2d(x, kernel, (1, *strides, 1), "VALID")


# Layers that only move values: a rounding before them is the rounding after them.


def level_scales(levels: np.ndarray, layer) -> np.ndarray:
    """The int8 scale of each level vector (G, K): max|L| / 127, or the largest
    of them for one vector or a Dense kernel (FULLY_CONNECTED weights cannot
    keep a per-channel axis)."""
    group_scale = np.maximum(np.abs(levels).max(axis=1), 1e-12) / 127.0
    if levels.shape[0] == 1 or isinstance(layer, QuantDense):
        group_scale = np.full(levels.shape[0], group_scale.max())
    return group_scale


def nearest_int8_codes(form: InferenceForm, quantized, layer, channels: int, where: str):
    """Maps non-uniform weight levels to their nearest int8 codes.

    `form.levels` holds one sorted level vector (K,) for the layer, or one per
    channel of the kernel's last axis (G, K). The int8 scale of a level vector
    is max|L| / 127; a Dense kernel gets one scale per tensor (the largest),
    since FULLY_CONNECTED weights cannot keep a per-channel axis. Each weight
    is then the code round(w / scale), stored as INT8 whatever `form.bits`.

    Returns:
      The codes, the scale (one value, or one per output channel), and the
      (max, RMS) over the kernel's weights of |w - code * scale| / scale, the
      mapping error the exporter reports.

    Raises:
      ExportError: the levels are not grouped along the last kernel axis, or
        the quantized kernel takes values that are not the levels.
    """
    levels = np.asarray(form.levels, np.float64)
    levels = levels.reshape(1, -1) if levels.ndim == 1 else levels
    groups = levels.shape[0]
    if levels.ndim != 2 or (groups > 1 and groups != quantized.shape[-1]):
        raise ExportError(
            f"{where}: expected one level vector or one per channel of the kernel's last axis "
            f"({quantized.shape[-1]}), got levels of shape {np.shape(form.levels)}"
        )
    by_group = quantized.reshape(-1, groups)
    for g in range(groups):
        row = np.sort(levels[g])
        index = np.clip(np.searchsorted(row, by_group[:, g]), 0, row.size - 1)
        nearest = np.minimum(
            np.abs(by_group[:, g] - row[index]),
            np.abs(by_group[:, g] - row[np.maximum(index - 1, 0)]),
        )
        if nearest.max() > 1e-5 * max(float(np.abs(row).max()), 1e-12):
            raise ExportError(f"{where}: the quantized kernel takes values that are not its levels")
    group_scale = level_scales(levels, layer)
    codes = np.clip(np.round(by_group / group_scale), -127, 127)
    relative = np.abs(by_group - codes * group_scale) / group_scale
    errors = (float(relative.max()), float(np.sqrt(np.mean(relative**2))))
    codes = codes.reshape(quantized.shape).astype(np.int32)
    if groups == 1 or isinstance(layer, QuantDense):
        return codes, group_scale[:1], errors
    # Output channel c of a depthwise kernel (H, W, C_in, M) is c_in * M + m.
    return codes, np.tile(group_scale, channels // groups), errors


def kernel_maker(folded, magnitude, q_max, final_shape=None):
    """A function that emits the kernel constant behind its FakeQuant while the
    lowered graph is traced (a FakeQuant run eagerly would be folded away)."""
    folded = np.asarray(folded, np.float32)
    low = (-q_max * magnitude).astype(np.float32)
    high = (q_max * magnitude).astype(np.float32)
    bits = 4 if q_max == 7 else 8

    def make():
        value = tf.constant(folded)
        if low.size == 1:
            value = tf.quantization.fake_quant_with_min_max_vars(
                value, float(low[0]), float(high[0]), num_bits=bits, narrow_range=True
            )
        else:
            value = tf.quantization.fake_quant_with_min_max_vars_per_channel(
                value, tf.constant(low), tf.constant(high), num_bits=bits, narrow_range=True
            )
        if final_shape is not None:
            value = tf.reshape(value, final_shape)
        return value

    return make
