"""Uniform baselines: min/max with moving averages, LSQ and PACT.

All three produce `step * k` with integer codes k on a fixed grid; they differ
in how the step is obtained and trained.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tfquant import ops
from tfquant.quantizers.base import (
    InferenceForm,
    Quantizer,
    as_tensor,
    check_bits,
    check_finite_array,
    check_positive,
    register,
)
from tfquant.quantizers.calibration import mse_optimal_clip
from tfquant.quantizers.constraints import AtLeast

# ---------------------------------------------------------------------------
# Pure functions


def symmetric_quantize(x, step, levels):
    """`step * round(clip(x / step, -levels, levels))`, straight-through in x
    inside the range and zero gradient outside; no gradient to `step`."""
    step = tf.stop_gradient(step)
    clipped = tf.clip_by_value(x, -levels * step, levels * step)
    return ops.round_ste(clipped / step) * step


def lsq_quantize(x, step, q_negative: int, q_positive: int, grad_scale: float):
    """LSQ (Esser et al., ICLR 2020, arXiv:1902.08153).

    Forward: `y = s * round(clip(x / s, -Qn, Qp))`.
    Backward: dy/dx = 1 inside the range, 0 outside; dy/ds =
    round(x/s) - x/s inside, -Qn below, Qp above; the step gradient is
    multiplied by `grad_scale` = 1 / sqrt(N * Qp).
    An unsigned grid (Qn = 0) runs on the fused FakeQuant kernel.
    """
    if q_negative == 0:
        bits = int(np.log2(q_positive + 1))
        return _lsq_unsigned(x, step, bits, grad_scale)
    return _lsq_signed(x, step, q_negative, q_positive, grad_scale)


def _lsq_signed(x, step, q_negative, q_positive, grad_scale):
    @tf.custom_gradient
    def forward(x, step):
        scaled = x / step
        clipped = tf.clip_by_value(scaled, -float(q_negative), float(q_positive))
        rounded = ops.round_half_away(clipped)
        y = rounded * step

        def grad(upstream):
            inside = tf.logical_and(scaled >= -q_negative, scaled <= q_positive)
            d_step = tf.where(inside, rounded - scaled, clipped)
            grad_step = tf.reduce_sum(upstream * d_step) * grad_scale
            return upstream * tf.cast(inside, upstream.dtype), grad_step

        return y, grad

    return forward(x, step)


def _lsq_unsigned(x, step, bits, grad_scale):
    @tf.custom_gradient
    def forward(x, step):
        y = ops.fake_quant_unsigned(x, step, bits)

        def grad(upstream):
            grad_x, _, above, error = ops.fake_quant_unsigned_with_gradient_terms(
                upstream, x, y, step, bits
            )
            grad_step = (error / step + float(2**bits - 1) * above) * grad_scale
            return grad_x, grad_step

        return y, grad

    return forward(x, step)


def pact_quantize(x, alpha, bits: int):
    """PACT (Choi et al., 2018, arXiv:1805.06085).

    Forward: `y = round(clip(x, 0, a) * (2^b - 1) / a) * a / (2^b - 1)`.
    Backward: dy/dx = 1 for 0 <= x <= a, else 0; dy/da = 1 where x > a, else
    0 (the straight-through form of the paper, eq. 3).
    """

    @tf.custom_gradient
    def forward(x, alpha):
        zero = tf.zeros_like(alpha)
        y = tf.quantization.fake_quant_with_min_max_vars(x, zero, alpha, num_bits=bits)

        def grad(upstream):
            grad_x, _, grad_alpha = tf.quantization.fake_quant_with_min_max_vars_gradient(
                upstream, x, zero, alpha, num_bits=bits
            )
            return grad_x, grad_alpha

        return y, grad

    return forward(x, alpha)


# ---------------------------------------------------------------------------
# Keras classes


@register("minmax")
class MinMaxQuantizer(Quantizer):
    """Min/max quantization, the scheme of tensorflow-model-optimization.

    Weights (`signed=True`): symmetric, step = max|w| / (2^(b-1) - 1) taken
    from the current weights at every call (narrow range, zero point 0).
    Activations (`signed=False`): range [0, max], `signed=True` for tensors
    that can be negative: range [min, max]; min and max are exponential
    moving averages of the batch extremes, updated in training mode. The
    forward pass is `tf.quantization.fake_quant_with_min_max_vars`, the
    gradient straight-through inside the range; the range gets no gradient.

    Args:
      bits: 2..8.
      signed: see above.
      for_weights: True to take the range from the tensor itself at every
        call (weights); False to track it with moving averages (activations).
      ema_decay: decay of the moving averages, in [0, 1).
    """

    def __init__(self, bits=8, signed=False, for_weights=False, ema_decay=0.999, **kwargs):
        super().__init__(bits=check_bits(bits, "minmax"), signed=signed, **kwargs)
        if for_weights and not signed:
            raise ValueError("a minmax weight quantizer (for_weights=True) must be signed")
        self.for_weights = bool(for_weights)
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) for minmax, got {ema_decay}")
        self.ema_decay = float(ema_decay)
        self.clips_negative = not self.signed and not self.for_weights

    @property
    def _levels(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def build(self, input_shape):
        if not self.for_weights:
            self.range_min = self._param(
                "range_min", initializer="zeros", trainable=False, aggregation="mean"
            )
            self.range_max = self._param(
                "range_max", initializer="ones", trainable=False, aggregation="mean"
            )
            self.seen = self._param(
                "seen", initializer="zeros", trainable=False, aggregation="only_first_replica"
            )
        super().build(input_shape)

    def call(self, inputs, training=None):
        if self.for_weights:
            step = tf.maximum(tf.reduce_max(tf.abs(inputs)), 1e-8) / self._levels
            return symmetric_quantize(inputs, step, float(self._levels))
        if training:
            batch_min = tf.minimum(tf.reduce_min(inputs), 0.0) if self.signed else 0.0
            batch_max = tf.maximum(tf.reduce_max(inputs), 1e-6)
            first = tf.equal(self.seen, 0.0)
            decay = tf.where(first, 0.0, self.ema_decay)
            self.range_min.assign(decay * self.range_min + (1 - decay) * batch_min)
            self.range_max.assign(decay * self.range_max + (1 - decay) * batch_max)
            self.seen.assign(1.0)
        low = tf.stop_gradient(as_tensor(self.range_min)) if self.signed else 0.0
        high = tf.stop_gradient(as_tensor(self.range_max))
        return tf.quantization.fake_quant_with_min_max_vars(inputs, low, high, num_bits=self.bits)

    def initialize(self, values):
        values = check_finite_array(values, "minmax calibration values")
        if self.for_weights:
            return
        if not self.built:
            self.build(values.shape)
        self.range_min.assign(min(float(values.min()), 0.0) if self.signed else 0.0)
        self.range_max.assign(max(float(values.max()), 1e-6))
        self.seen.assign(1.0)

    def inference_form(self, weights=None):
        if self.for_weights:
            if weights is None:
                raise ValueError("a weight minmax quantizer needs the weights to describe its form")
            step = max(float(np.abs(weights).max()), 1e-8) / self._levels
            return InferenceForm(
                bits=self.bits,
                signed=True,
                scale=np.float32(step),
                code_min=-self._levels,
                code_max=self._levels,
            )
        low = float(self.range_min.numpy()) if self.signed else 0.0
        return range_form(low, float(self.range_max.numpy()), self.bits, self.signed)

    def get_config(self):
        config = super().get_config()
        config.update(for_weights=self.for_weights, ema_decay=self.ema_decay)
        return config


@register("fixed_range")
class FixedRangeQuantizer(Quantizer):
    """A grid that does not learn: `fake_quant_with_min_max_vars` on [low, high].

    For tensors whose integer kernel fixes the grid: TFLite's int8 LOGISTIC
    (sigmoid) writes scale 1/256 and zero point -128, i.e. [0, 255/256]
    (the defaults).

    Args:
      bits: 2..8.
      low, high: the range; low <= 0 < high.
      signed: whether the range reaches below 0 (set from `low`).
      inference_only: pass values through unchanged in training (for a
        softmax's probabilities: the grid is the file's, but a loss on
        probabilities rounded to 1/256 would lose its gradient).
    """

    def __init__(
        self, bits=8, low=0.0, high=255.0 / 256.0, signed=None, inference_only=False, **kwargs
    ):
        self.inference_only = bool(inference_only)
        low, high = float(low), float(high)
        if not (np.isfinite(low) and np.isfinite(high) and low <= 0.0 < high):
            raise ValueError(f"fixed_range needs low <= 0 < high, got low={low}, high={high}")
        super().__init__(bits=check_bits(bits, "fixed_range"), signed=low < 0.0, **kwargs)
        self.low, self.high = low, high
        self.clips_negative = low == 0.0

    def call(self, inputs, training=None):
        if training and self.inference_only:
            return inputs
        return tf.quantization.fake_quant_with_min_max_vars(
            inputs, self.low, self.high, num_bits=self.bits
        )

    def initialize(self, values):
        check_finite_array(values, "fixed_range calibration values")

    def inference_form(self, weights=None):
        return range_form(self.low, self.high, self.bits, self.signed)

    def parameters(self):
        return {"low": self.low, "high": self.high}

    def get_config(self):
        config = super().get_config()
        config.update(low=self.low, high=self.high, inference_only=self.inference_only)
        config.pop("signed", None)
        return config


def range_form(low: float, high: float, bits: int, signed: bool) -> InferenceForm:
    """The form of `fake_quant_with_min_max_vars` on [low, high] at `bits`."""
    scale, zero_point = nudged_scale_zero_point(low, high, bits)
    return InferenceForm(
        bits=bits,
        signed=signed,
        scale=np.float32(scale),
        zero_point=zero_point,
        code_min=0,
        code_max=2**bits - 1,
    )


def nudged_scale_zero_point(low: float, high: float, bits: int) -> tuple[float, int]:
    """The scale and zero point `fake_quant_with_min_max_vars` uses for
    [low, high] at `bits` (it nudges the range so that 0 is a code)."""
    quant_max = 2**bits - 1
    # As TensorFlow's kernel computes it: float32, and std::round (ties away
    # from zero); a zero point one off would clamp one code differently.
    scale = (np.float32(high) - np.float32(low)) / np.float32(quant_max)
    from_min = np.float32(0.0) - np.float32(low) / scale
    zero_point = int(np.clip(np.sign(from_min) * np.floor(np.abs(from_min) + 0.5), 0, quant_max))
    return float(scale), zero_point


@register("lsq")
class LSQQuantizer(Quantizer):
    """Learned Step Size Quantization (Esser et al., ICLR 2020, arXiv:1902.08153).

    `y = s * round(clip(x / s, -Qn, Qp))` with a learned step s. Signed
    (weights): Qn = Qp = 2^(b-1) - 1, a symmetric narrow grid (the paper uses
    Qn = 2^(b-1); the narrow grid maps one-to-one onto TFLite's symmetric
    INT4/INT8 weights). Unsigned (activations): Qn = 0, Qp = 2^b - 1.
    Gradient in s: round(x/s) - x/s inside, -Qn below, Qp above, scaled by
    1 / sqrt(N * Qp) with N the number of elements (per example for
    activations). Init s = 2 * mean|x| / sqrt(Qp) (paper).

    Args:
      bits: 2..8.
      signed: symmetric signed grid (weights) or unsigned (after ReLU).
      initial_step: step before `initialize` is called.
    """

    def __init__(self, bits=4, signed=False, initial_step=0.1, **kwargs):
        super().__init__(bits=check_bits(bits, "LSQ"), signed=signed, **kwargs)
        self.initial_step = check_positive(initial_step, "initial_step", "LSQ")
        self.clips_negative = not self.signed

    @property
    def q_negative(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 0

    @property
    def q_positive(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    def build(self, input_shape):
        self.step = self._param(
            "step", initializer=tf.constant_initializer(self.initial_step), constraint=AtLeast(1e-8)
        )
        per_example = (
            [d for d in input_shape[1:] if d is not None]
            if not self.signed
            else [d for d in input_shape if d is not None]
        )
        self._grad_scale = 1.0 / float(np.sqrt(max(int(np.prod(per_example)), 1) * self.q_positive))
        super().build(input_shape)

    def call(self, inputs, training=None):
        step = tf.maximum(as_tensor(self.step), 1e-8)
        return lsq_quantize(inputs, step, self.q_negative, self.q_positive, self._grad_scale)

    def initialize(self, values):
        values = check_finite_array(values, "LSQ initialization values")
        if not self.built:
            self.build(values.shape)
        step = 2.0 * float(np.mean(np.abs(values))) / np.sqrt(self.q_positive)
        self.step.assign(max(step, 1e-6))

    def inference_form(self, weights=None):
        return InferenceForm(
            bits=self.bits,
            signed=self.signed,
            scale=np.float32(max(float(self.step.numpy()), 1e-8)),  # as call() clamps it
            code_min=-self.q_negative,
            code_max=self.q_positive,
        )

    def get_config(self):
        config = super().get_config()
        config.update(initial_step=self.initial_step)
        return config


@register("pact")
class PACTQuantizer(Quantizer):
    """PACT (Choi et al., 2018, arXiv:1805.06085): a learned clip a for
    non-negative activations, `y = round(clip(x, 0, a) * (2^b-1)/a) * a/(2^b-1)`;
    dy/da = 1 above a, 0 below (straight-through rounding).

    PACT quantizes activations only: `signed=True` is rejected.

    Args:
      bits: 2..8.
      initial_alpha: the clip before `initialize` (the paper starts at 10).
      alpha_decay: L2 weight decay on a, as in the paper (0 to disable).
    """

    def __init__(self, bits=4, signed=False, initial_alpha=10.0, alpha_decay=0.0, **kwargs):
        if signed:
            raise ValueError(
                "PACT clips at 0 and learns the upper bound: it quantizes non-negative "
                "activations only (signed=False), got signed=True; use 'lsq', 'qil' or "
                "'minmax' for weights"
            )
        super().__init__(bits=check_bits(bits, "PACT"), signed=False, **kwargs)
        self.initial_alpha = check_positive(initial_alpha, "initial_alpha", "PACT")
        if alpha_decay < 0:
            raise ValueError(f"alpha_decay must be >= 0 for PACT, got {alpha_decay}")
        self.alpha_decay = float(alpha_decay)
        self.clips_negative = True

    def build(self, input_shape):
        self.alpha = self._param(
            "alpha",
            initializer=tf.constant_initializer(self.initial_alpha),
            constraint=AtLeast(1e-3),
            regularizer=(lambda a: self.alpha_decay * tf.square(a)) if self.alpha_decay else None,
        )
        super().build(input_shape)

    def call(self, inputs, training=None):
        return pact_quantize(inputs, tf.maximum(as_tensor(self.alpha), 1e-3), self.bits)

    def initialize(self, values):
        values = check_finite_array(values, "PACT calibration values")
        if not self.built:
            self.build(values.shape)
        self.alpha.assign(mse_optimal_clip(np.maximum(values, 0), 2**self.bits - 1))

    def inference_form(self, weights=None):
        step = max(float(self.alpha.numpy()), 1e-3) / (2**self.bits - 1)  # as call() clamps it
        return InferenceForm(
            bits=self.bits,
            signed=False,
            scale=np.float32(step),
            code_min=0,
            code_max=2**self.bits - 1,
        )

    def get_config(self):
        config = super().get_config()
        config.update(initial_alpha=self.initial_alpha, alpha_decay=self.alpha_decay)
        return config
