"""Average pooling that rounds as TFLite's int8 AVERAGE_POOL_2D."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from tfquant.layers.quant_layers import _PACKAGE


def window_reaches_padding(pool_size, strides, padding: str, spatial) -> bool:
    """Whether a SAME pooling window at the edge reaches into the padding (it
    then averages fewer values than the others)."""
    return padding.lower() == "same" and any(
        (-(-int(size) // stride) - 1) * stride + window > int(size)
        for size, window, stride in zip(spatial, pool_size, strides, strict=True)
    )


def _in_bounds_counts(size: int, window: int, stride: int) -> np.ndarray:
    """Per SAME output position along one axis, how many window taps fall inside."""
    out = -(-size // stride)
    before = max((out - 1) * stride + window - size, 0) // 2
    starts = np.arange(out) * stride - before
    return np.minimum(starts + window, size) - np.maximum(starts, 0)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class QuantAveragePooling2D(keras.layers.AveragePooling2D):
    """`keras.layers.AveragePooling2D` with SAME windows that reach into the
    padding, rounded in inference as TFLite's int8 AVERAGE_POOL_2D rounds.

    That kernel keeps its input's grid: it sums the raw int8 codes of the
    in-bounds taps and divides by their count, rounding half away from zero.
    `tfquant.quantize_model` uses this layer for such poolings (Inception's
    and NASNet's 3x3 stride-1 branches); the exporter sets the grid of its
    input (`set_requantization`). Training, and inference without it, average
    in float.

    Args:
      requantization: None, or {scale, zero_point, offset}: the int8 grid of
        the input (value = offset + scale * (code - zero_point)).
      **kwargs: `keras.layers.AveragePooling2D`'s arguments.
    """

    def __init__(self, requantization=None, **kwargs):
        super().__init__(**kwargs)
        self.requantization = None
        self.set_requantization(requantization)

    def set_requantization(self, requantization):
        """Makes inference round as the integer AVERAGE_POOL_2D does (see the class)."""
        if requantization is None:
            self.requantization = None
            return
        try:
            spec = {
                "scale": float(requantization["scale"]),
                "zero_point": int(requantization["zero_point"]),
                "offset": float(requantization.get("offset", 0.0)),
            }
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(
                "requantization must be a dict with scale, zero_point and offset, got "
                f"{requantization!r} ({error})"
            ) from None
        if not (np.isfinite(spec["scale"]) and spec["scale"] > 0 and np.isfinite(spec["offset"])):
            raise ValueError(f"invalid requantization {requantization!r}")
        self.requantization = spec

    def call(self, inputs, training=None):
        spec = self.requantization
        if spec is None or training or self.data_format != "channels_last":
            return super().call(inputs)
        pool, strides = tuple(self.pool_size), tuple(self.strides)
        codes = tf.round((tf.cast(inputs, tf.float64) - spec["offset"]) / spec["scale"])
        codes = codes + spec["zero_point"]
        height, width = (int(d) for d in inputs.shape[1:3])
        if self.padding.lower() == "same":
            counts = np.outer(
                _in_bounds_counts(height, pool[0], strides[0]),
                _in_bounds_counts(width, pool[1], strides[1]),
            )
        else:
            counts = np.full(
                ((height - pool[0]) // strides[0] + 1, (width - pool[1]) // strides[1] + 1),
                pool[0] * pool[1],
            )
        counts = tf.constant(counts[None, :, :, None], tf.float64)
        means = tf.nn.avg_pool2d(codes, pool, strides, self.padding.upper())
        total = tf.round(means * counts)  # the exact sum of the in-bounds codes
        out = tf.sign(total) * tf.floor((tf.abs(total) + tf.floor(counts / 2)) / counts)
        out = tf.clip_by_value(out, -128.0, 127.0)
        values = spec["offset"] + spec["scale"] * (out - spec["zero_point"])
        return tf.cast(values, inputs.dtype)

    def get_config(self):
        config = super().get_config()
        if self.requantization is not None:
            config["requantization"] = dict(self.requantization)
        return config
