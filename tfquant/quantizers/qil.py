"""QIL: learned quantization intervals.

Jung et al., "Learning to Quantize Deep Networks by Optimizing Quantization
Intervals with Task Loss", CVPR 2019, arXiv:1808.05779.

Each quantizer learns an interval [c - d, c + d] (center c, distance d). With
alpha = 0.5 / d and beta = 0.5 - 0.5 * c / d the interval maps onto [0, 1].

Weights (signed): u = clip(alpha * |w| + beta, 0, 1), so |w| < c - d is
pruned to 0 and |w| > c + d clipped to 1; the transformer is
w^ = sign(w) * u^gamma and the discretizer D(v) = round(q * v) / q with
q = 2^(b-1) - 1. Gradients inside the interval (straight-through D):
  dw^/dw = gamma * alpha * u^(gamma-1)
  dw^/dc = -gamma * alpha * u^(gamma-1) * sign(w)
  dw^/dd = gamma * u^(gamma-1) * (alpha / d) * (c - |w|) * sign(w)
  dw^/dgamma = sign(w) * u^gamma * ln(u)
and zero outside it.

Activations (unsigned, after ReLU): x^ = D(clip(alpha * x + beta, 0, 1))
with q = 2^b - 1 and gamma = 1; inside, dx^/dx = alpha, dx^/dc = -alpha,
dx^/dd = (alpha / d) * (c - x).

Rescaling (tfquant's choice, `rescale=True`, the default): the paper's
outputs live in [-1, 1] / [0, 1] and rely on the following BatchNorm to
absorb the scale. tfquant multiplies the weight output by c + d and the
activation output by 2d, so a quantized layer keeps the float layer's scale
(a converted model starts close to the float one, and layers with no
BatchNorm after them, such as the classifier, work unchanged). The extra
factor is differentiated normally (product rule on top of the paper's
gradients). `rescale=False` gives the paper's exact outputs.

The interval is one variable `[c, d]`, projected after each optimizer step
so that d >= 1e-4 and c >= d (pruning threshold c - d >= 0); gamma stays
>= 0.1. Initialization is not stated in the paper: tfquant sets c - d = 0
(no pruning) and c + d to the clip that minimizes the quantization MSE of the
float weights, or of a calibration batch for activations.

At inference weights are integers in [-q, q] times (c + d) / q (exact for
gamma = 1; with a learned gamma the codes are still integers, the transform is
only applied before rounding). Activations are codes 0..2^b-1 of x - (c - d)
at step 2d / (2^b - 1): `inference_form().offset` is c - d, which the exporter
folds into the producer's bias.
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
    register,
)
from tfquant.quantizers.calibration import mse_optimal_clip
from tfquant.quantizers.constraints import AtLeast, IntervalConstraint

_EPS = 1e-6


def qil_weight_quantize(w, interval, gamma, bits: int, rescale: bool = True):
    """The QIL weight quantizer as a pure function.

    Args:
      w: weights.
      interval: tensor `[c, d]`.
      gamma: scalar tensor, the transformer exponent.
      bits: 2..8 (q = 2^(b-1) - 1 positive levels).
      rescale: multiply the output by c + d (see the module docstring).

    Returns:
      The quantized weights; gradients flow to w, interval and gamma.
    """
    levels = float(2 ** (bits - 1) - 1)

    @tf.custom_gradient
    def forward(w, interval, gamma):
        c, d = interval[0], interval[1]
        alpha = 0.5 / d
        beta = 0.5 - 0.5 * c / d
        magnitude = tf.abs(w)
        sign = tf.sign(w)
        u_raw = alpha * magnitude + beta
        inside = tf.logical_and(u_raw > 0.0, u_raw < 1.0)
        u = tf.clip_by_value(u_raw, _EPS, 1.0)
        transformed = tf.pow(u, gamma)
        transformed = tf.where(u_raw <= 0.0, tf.zeros_like(transformed), transformed)
        w_hat = sign * ops.round_half_away(transformed * levels) / levels
        scale = c + d if rescale else tf.ones_like(c)
        y = scale * w_hat

        def grad(upstream):
            mask = tf.cast(inside, upstream.dtype)
            g = upstream * mask
            slope = gamma * tf.pow(u, gamma - 1.0)  # d(u^gamma)/du
            grad_w = scale * g * slope * alpha
            sum_g_slope_sign = tf.reduce_sum(g * slope * sign)
            grad_c = -scale * alpha * sum_g_slope_sign
            grad_d = scale * (alpha / d) * tf.reduce_sum(g * slope * (c - magnitude) * sign)
            grad_gamma = scale * tf.reduce_sum(g * sign * transformed * tf.math.log(u))
            if rescale:
                # d(scale)/dc = d(scale)/dd = 1: the product rule adds sum(g * w^).
                extra = tf.reduce_sum(upstream * w_hat)
                grad_c += extra
                grad_d += extra
            return grad_w, tf.stack([grad_c, grad_d]), grad_gamma

        return y, grad

    return forward(w, interval, gamma)


def qil_activation_quantize(x, interval, bits: int, rescale: bool = True):
    """The QIL activation quantizer (gamma = 1) as a pure function.

    With rescaling the forward pass is one fused FakeQuant of x - (c - d) at
    step 2d / (2^b - 1); the backward pass is the paper's gradient times 2d
    plus the product-rule term of the 2d factor:
      dy/dx = 1, dy/dc = -1, dy/dd = 1 + (rounding error) / d inside;
      dy/dd = 2 above the interval; zero below.
    """
    levels = float(2**bits - 1)

    @tf.custom_gradient
    def forward(x, interval):
        c, d = interval[0], interval[1]
        low = c - d
        step = 2.0 * d / levels
        y = ops.fake_quant_unsigned(x, step, bits, offset=low)

        def grad(upstream):
            grad_x, inside, above, error = ops.fake_quant_unsigned_with_gradient_terms(
                upstream, x, y, step, bits, offset=low
            )
            grad_c = -inside
            grad_d = inside + error / d + 2.0 * above
            return grad_x, tf.stack([grad_c, grad_d])

        if not rescale:
            y_paper = y / (2.0 * d)

            def grad_paper(upstream):
                alpha = 0.5 / d
                shifted = x - low
                in_range = tf.cast(
                    tf.logical_and(shifted >= 0.0, shifted <= 2.0 * d), upstream.dtype
                )
                g = upstream * in_range
                grad_c = -alpha * tf.reduce_sum(g)
                grad_d = (alpha / d) * tf.reduce_sum(g * (c - x))
                return g * alpha, tf.stack([grad_c, grad_d])

            return y_paper, grad_paper
        return y, grad

    return forward(x, interval)


@register("qil")
class QILQuantizer(Quantizer):
    """QIL quantizer (arXiv:1808.05779); see the module docstring.

    Args:
      bits: 2..8.
      signed: True for weights (sign-magnitude transformer with gamma),
        False for non-negative activations.
      learn_gamma: learn the transformer exponent (weights only).
      rescale: keep the float scale (default) or output the paper's [-1, 1].
      initial_center, initial_distance: the interval before `initialize`.

    >>> q = QILQuantizer(bits=2, signed=True)
    >>> q.build((3,))
    >>> q(tf.constant([0.05, 0.4, 2.0])).numpy()  # interval [0, 2]: q = 1
    array([0., 0., 2.], dtype=float32)
    """

    def __init__(
        self,
        bits=4,
        signed=False,
        learn_gamma=False,
        rescale=True,
        initial_center=1.0,
        initial_distance=1.0,
        **kwargs,
    ):
        super().__init__(bits=check_bits(bits, "QIL"), signed=signed, **kwargs)
        if not np.isfinite(initial_distance) or initial_distance <= 0:
            raise ValueError(
                f"initial_distance must be > 0 for QIL (the interval is [c-d, c+d]), "
                f"got {initial_distance}"
            )
        if not np.isfinite(initial_center) or initial_center < initial_distance:
            raise ValueError(
                f"QIL needs center >= distance (pruning threshold c - d >= 0), got "
                f"center {initial_center} and distance {initial_distance}, a negative interval"
            )
        if learn_gamma and not signed:
            raise ValueError("learn_gamma applies to weight quantizers (signed=True) only")
        self.learn_gamma = bool(learn_gamma)
        self.rescale = bool(rescale)
        self.initial_center = float(initial_center)
        self.initial_distance = float(initial_distance)
        self.clips_negative = not self.signed

    def build(self, input_shape):
        self.interval = self._param(
            "interval",
            shape=(2,),
            initializer=tf.constant_initializer([self.initial_center, self.initial_distance]),
            constraint=IntervalConstraint(),
        )
        if self.learn_gamma:
            self.gamma = self._param("gamma", initializer="ones", constraint=AtLeast(0.1))
        super().build(input_shape)

    def _valid_interval(self):
        interval = as_tensor(self.interval)
        return IntervalConstraint()(interval)

    def call(self, inputs, training=None):
        interval = self._valid_interval()
        if self.signed:
            gamma = as_tensor(self.gamma) if self.learn_gamma else tf.constant(1.0)
            return qil_weight_quantize(inputs, interval, gamma, self.bits, self.rescale)
        return qil_activation_quantize(inputs, interval, self.bits, self.rescale)

    def initialize(self, values):
        values = check_finite_array(values, "QIL initialization values")
        if not self.built:
            self.build(values.shape)
        levels = 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1
        magnitudes = np.abs(values) if self.signed else np.maximum(values, 0.0)
        top = mse_optimal_clip(magnitudes, levels)
        self.interval.assign([top / 2.0, top / 2.0])

    def inference_form(self, weights=None):
        c, d = (float(v) for v in self.interval.numpy())
        d = max(d, 1e-4)
        c = max(c, d)
        if self.signed:
            levels = 2 ** (self.bits - 1) - 1
            width = (c + d) if self.rescale else 1.0
            return InferenceForm(
                bits=self.bits,
                signed=True,
                scale=np.float32(width / levels),
                code_min=-levels,
                code_max=levels,
            )
        if not self.rescale:
            raise ValueError(
                "a QIL activation quantizer with rescale=False outputs codes / q, not a "
                "tensor in the producer's units, so it has no integer form; use rescale=True"
            )
        levels = 2**self.bits - 1
        return InferenceForm(
            bits=self.bits,
            signed=False,
            scale=np.float32(2.0 * d / levels),
            code_min=0,
            code_max=levels,
            offset=c - d,
        )

    def parameters(self):
        c, d = (float(v) for v in self.interval.numpy())
        out = {"center": c, "distance": d, "low": c - d, "high": c + d}
        if self.learn_gamma:
            out["gamma"] = float(self.gamma.numpy())
        return out

    def get_config(self):
        config = super().get_config()
        config.update(
            learn_gamma=self.learn_gamma,
            rescale=self.rescale,
            initial_center=self.initial_center,
            initial_distance=self.initial_distance,
        )
        return config
