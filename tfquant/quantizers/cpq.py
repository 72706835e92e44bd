"""CPQ: cluster-promoting quantization with DropBits and learned bit widths.

Lee, Yun, Hwang, Yang, "Cluster-Promoting Quantization with Bit-Drop for
Minimizing Network Quantization Loss", ICCV 2021, arXiv:2109.02100; earlier
"Semi-Relaxed Quantization with DropBits", arXiv:1911.12990. The authors
published no code: everything below that the papers do not pin down is
marked "reconstructed".

Grid. Codes k in [-Q, Q], Q = 2^(b-1) - 1, for signed tensors (weights) and
k in [0, 2^b - 1] for unsigned ones (activations after ReLU); grid points
g_k = s * k with a learned step s. The papers use the two's-complement range
[-2^(b-1), 2^(b-1) - 1]; tfquant drops the lowest code so that the grid maps
one-to-one onto TFLite's narrow-range symmetric INT4/INT8 weights.

Forward. With logistic noise of learned scale sigma, grid point k gets the
probability of its cell of width s,
  pi_k = F((g_k + s/2 - x) / sigma) - F((g_k - s/2 - x) / sigma),  F = sigmoid,
and the output is the grid point of the largest pi_k (a one-hot r, no
sampling). All cells have the same width and the logistic density is
symmetric and unimodal around x, so the mass of a cell decreases with the
distance from its centre to x: the argmax is the nearest grid point, that is
round-to-nearest with clipping, `s * clip(round(x / s), kmin, kmax)`. The
forward pass computes that directly, in O(1) per element instead of 2^b
(tests/test_cpq.py checks the equality against the explicit argmax).

Backward, the multi-class straight-through estimator. y = sum_k g_k r_k; the
gradient reaching r is passed to the normalized probabilities
pi~_k = w_k pi_k / sum_j w_j pi_j (w_k: the DropBits / gate weight of point
k, 1 without them), i.e. r is treated as r + pi~ - stop_gradient(pi~):
  dy/dx     = sum_k g_k dpi~_k/dx
  dy/ds     = sum_k k r_k + sum_k g_k dpi~_k/ds   (g_k = s k also moves)
  dy/dsigma = sum_k g_k dpi~_k/dsigma
  dy/dw_k   = (g_k - ybar) pi_k / P,  P = sum_j w_j pi_j, ybar = sum_j w_j g_j pi_j / P
with, for a_k = (g_k + s/2 - x)/sigma, b_k = (g_k - s/2 - x)/sigma, f = F(1-F):
  dpi_k/dx = -(f(a_k) - f(b_k)) / sigma
  dpi_k/ds = (f(a_k) (k + 1/2) - f(b_k) (k - 1/2)) / sigma
  dpi_k/dsigma = -(f(a_k) a_k - f(b_k) b_k) / sigma
and dpi~_k = (w_k dpi_k - pi~_k sum_j w_j dpi_j) / P. Everything is
differentiated analytically; no probability tensor of size N x 2^b is kept.
The sums are accumulated over grid points in chunks (exact), or, by default
when the grid has more than 2 * neighbours + 1 points, over the
`neighbours` kept points on each side of the output only; the mass left out
is below 2 exp(-(neighbours + 1/2) s / sigma) (1e-11 at the initial
sigma = s / 3 and neighbours = 8). Inputs further than 10 sigma beyond the
outermost cell edges are evaluated at that distance (beyond it pi~ changes
by less than e^-10 relative) and get no x gradient. Cell masses are taken
from whichever tail of F is small, so far cells do not cancel to noise.

DropBits (weights only, training only). The signed b-bit grid is nested: the
(b-1)-bit grid is the even codes, the (b-2)-bit grid the multiples of 4, down
to the 2-bit grid {-2^(b-2), 0, 2^(b-2)}. Bit level l (l = 1..b-2) is the set
of points that exist only above b-l bits: the odd multiples of 2^(l-1).
At each training step every level is dropped with its own rate, one draw per
level for the whole tensor; dropped points are excluded from the argmax
(values round to the nearest kept point) and from the normalized
probabilities. Reconstructed: independent draws per level, and a scalar
`drop_rates=p` meaning rate p / 2^(l-1) at level l (fine levels are dropped
most often).

Learned bit widths (weights, `learn_bits=True`). Each level gets a
hard-concrete gate z_l (Louizos, Welling, Kingma, ICLR 2018,
arXiv:1712.01312; beta = 2/3, gamma = -0.1, zeta = 1.1) with a learned
log alpha_l. Reconstructed: the gates are nested so that the kept points
always form a uniform grid (exportable): the weight of level l is
m_l = prod_{j >= l} z_j, so closing a level also closes all finer ones. In
training the output is the nested residual sum (the form of Bayesian Bits,
van Baalen et al., NeurIPS 2020, arXiv:2005.07093)
  y = y_L + sum_{d < L} m_{d+1} (y_d - y_{d+1}),
y_d the CPQ output with levels 1..d dropped. With 0/1 gates this is exactly
the CPQ output on the kept sub-grid (computed by one CPQ call, which carries
the straight-through gradients to x, s and sigma); for a gate strictly
between 0 and 1 the output moves towards the coarser grid, and the gate gets
the gradient dL/dy (y_d - y_{d+1}): the task loss of removing the level.
(Passing the relaxed masks only through the normalized probabilities, as
`cpq_quantize` also allows, gave the gates no usable signal: a level's
probability mass moves the soft output towards and away from the target
about equally often.) The regularizer, added with `add_loss` in training, is
`bit_regularization * sum_l prod_{j >= l} P(z_j != 0)`, the expected number
of kept levels (expected bits - 2), which favours dropping.
At inference the gates are deterministic,
z_l = clip(sigmoid(log alpha_l) (zeta - gamma) + gamma, 0, 1), a level is
closed when z_l < 0.5, and the layer's learned bit width is b - d, d the
highest closed level: codes on the (b-d)-bit grid at scale s * 2^d. The
forward pass with `training=False` uses exactly that grid, which is what
`inference_form()` reports, so a layer that learned <= 4 bits exports INT4.

Parameters: s = exp(log_step) and sigma = exp(log_sigma), positive by
construction and updated in relative terms by Adam (reconstructed; the
papers do not say). Initial s: the MSE-optimal clip of the float weights (or
calibration activations) over the grid; initial sigma = sigma_ratio * s
(1/3, the relaxed-quantization convention). Gate logits are stored as
log alpha / gate_scale (default 10), so that with a fine-tuning learning rate
such as Adam 1e-3 a gate can move from its initial 3 to 0 within a few
hundred steps instead of a few thousand (reconstructed).

>>> q = CPQQuantizer(bits=2, signed=True, initial_step=1.0)
>>> q.build((4,))
>>> q(tf.constant([-2.0, -0.4, 0.6, 3.0])).numpy()
array([-1., -0.,  1.,  1.], dtype=float32)
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
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

# Hard-concrete constants of Louizos et al. (2018).
HARD_CONCRETE_BETA = 2.0 / 3.0
HARD_CONCRETE_GAMMA = -0.1
HARD_CONCRETE_ZETA = 1.1
# Inputs are evaluated at most this many sigma beyond the outermost cell edge.
_CLAMP_SIGMAS = 10.0
_TINY = 1e-30
# Run the estimator's helpers XLA-compiled (the default): CPQ W4A4 trains
# ResNet-20 at 1.93x float step time instead of 8.08x with plain graphs, and
# each call matches the NumPy reference to float32 round-off. False runs them
# as plain graphs, e.g. where XLA is not available.
XLA_KERNELS = True


def _kernel(body):
    return ops.switchable(body, lambda: XLA_KERNELS)


# exp(+-80) is a normal float32 number
_FACTOR_BOUND = 80.0


# ---------------------------------------------------------------------------
# Grid structure (static, NumPy)


def code_range(bits: int, signed: bool) -> tuple[int, int]:
    """(kmin, kmax): [-(2^(b-1) - 1), 2^(b-1) - 1] signed, [0, 2^b - 1] unsigned."""
    if signed:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def code_levels(bits: int, levels: int) -> np.ndarray:
    """The bit level of every signed code -Q..Q: l in 1..levels for the odd
    multiples of 2^(l-1), 0 for the points of the 2-bit base grid (and for
    every code when `levels` is 0)."""
    kmin, kmax = code_range(bits, True)
    out = np.zeros(kmax - kmin + 1, np.int32)
    if levels == 0:
        return out
    for i, k in enumerate(range(kmin, kmax + 1)):
        if k == 0:
            continue
        valuation = (abs(k) & -abs(k)).bit_length() - 1
        out[i] = valuation + 1 if valuation + 1 <= levels else 0
    return out


def drop_rates_per_level(drop_rates, levels: int) -> np.ndarray:
    """Per-level drop rates from a scalar p (p / 2^(l-1) at level l) or a list."""
    if np.ndim(drop_rates) == 0:
        return np.asarray([float(drop_rates) / 2.0**level for level in range(levels)], np.float32)
    rates = np.asarray(drop_rates, np.float32).reshape(-1)
    if rates.size != levels:
        raise ValueError(
            f"drop_rates needs one rate per droppable bit level ({levels} at this bit width), "
            f"got {rates.size}: {list(map(float, rates))}"
        )
    return rates


# ---------------------------------------------------------------------------
# Pure functions


def level_candidates(v, bits: int, levels: int):
    """For v = x / s: the nearest point of the 2-bit base grid and, per bit
    level l, the nearest odd multiple of 2^(l-1) within [-Q, Q]; (..., 1 + L)."""
    base = float(2 ** (bits - 2))
    nearest_base = base * tf.clip_by_value(ops.round_half_away(v / base), -1.0, 1.0)
    if levels == 0:
        return nearest_base[..., None]
    multiple = tf.constant([2.0 ** (level - 1) for level in range(1, levels + 1)])
    top = tf.constant([2.0 ** (bits - level) - 1 for level in range(1, levels + 1)])
    odd = tf.clip_by_value(2.0 * tf.floor(v[..., None] / (2.0 * multiple)) + 1.0, -top, top)
    return tf.concat([nearest_base[..., None], multiple * odd], -1)


def nearest_among(v, candidates, keep):
    """The candidate nearest to v among the base point and the kept levels."""
    keep = tf.concat([tf.constant([True]), keep], 0)
    distance = tf.where(keep, tf.abs(v[..., None] - candidates), np.inf)
    choice = tf.one_hot(tf.argmin(distance, -1), int(candidates.shape[-1]), dtype=v.dtype)
    return tf.reduce_sum(choice * candidates, -1)


def nearest_kept_code(v, keep, bits: int, signed: bool):
    """The code nearest to v = x / s among the kept points (float tensor).

    Args:
      v: inputs in units of the step.
      keep: boolean (L,) per bit level (L = 0 or bits - 2, signed only); the
        2-bit base grid is always kept.

    With every level kept this is `clip(round(v), kmin, kmax)`.
    """
    kmin, kmax = code_range(bits, signed)
    levels = int(keep.shape[0])
    if levels == 0:
        return tf.clip_by_value(ops.round_half_away(v), float(kmin), float(kmax))
    return nearest_among(v, level_candidates(v, bits, levels), keep)


def _cell_terms(x, codes, step, sigma):
    """pi_k and its partial derivatives in x and sigma for the cells of
    `codes` (broadcast against x[..., None]); the derivative in s follows
    from s dpi/ds = -x dpi/dx - sigma dpi/dsigma."""
    a = (step * (codes + 0.5) - x) / sigma
    b = (step * (codes - 0.5) - x) / sigma
    # F(a) - F(b) = F(-b) - F(-a): take the small tail to avoid cancellation.
    pi = tf.where(a + b > 0.0, tf.sigmoid(-b) - tf.sigmoid(-a), tf.sigmoid(a) - tf.sigmoid(b))
    fa = tf.sigmoid(a) * tf.sigmoid(-a)
    fb = tf.sigmoid(b) * tf.sigmoid(-b)
    d_x = -(fa - fb) / sigma
    d_sigma = -(fa * a - fb * b) / sigma
    return pi, d_x, d_sigma


def _soft_derivative(
    x, code, step, sigma, kmin: int, kmax: int, neighbours, wrt: str, factored: bool
):
    """sum_k g'_k dpi~_k / d(wrt), per element, without DropBits weights.

    Cells k = bot..top (the whole grid, or the `neighbours` cells on each
    side of the output code c), each of width s around s k; z_e = (e - x) /
    sigma at an edge e, F = sigmoid, G = 1 - F, f = F G. Adjacent cells share
    their edge, so every sum over cells telescopes into a sum over the
    interior edges plus the two outer edges:

      P = sum pi_k = F(z_top) - F(z_bot)
      W = sum g'_k pi_k / s = sum_{e > c} G(z_e) - sum_{e < c} F(z_e)
                              - (top - c) G(z_top) + (c - bot) F(z_bot)
      sum dpi_k/dx = -(f(z_top) - f(z_bot)) / sigma
      sum g'_k dpi_k/dx = -(s/sigma) ((top - c) f(z_top) - (bot - c) f(z_bot) - sum_e f(z_e))
      and the same for sigma with f(z) replaced by z f(z),

    with g'_k = s (k - c). The estimator is (sum g' dpi - (s W / P) sum dpi) / P:
    a part from the outer edges plus, for every interior edge, one term
    a f(z_e) + b (+-tail_e) with coefficients a, b fixed per element. So the
    loop over edges feeds a single sum, one exp and one division per edge,
    which XLA keeps in one fused loop. Every tail is taken on the side
    where it is small, so far cells do not cancel to noise. (Interior edges
    above the output code lie above x and those below it below x: the code is
    the nearest grid point; only the outer edges can lie on either side.)
    """
    inverse_sigma = 1.0 / sigma
    ratio = step * inverse_sigma
    base = (step * code - x) * inverse_sigma  # z at the output point
    if neighbours is None:
        top, bottom = float(kmax), float(kmin)
    else:
        top = tf.minimum(code + neighbours, float(kmax))
        bottom = tf.maximum(code - neighbours, float(kmin))
    z_top = base + (top - code + 0.5) * ratio
    z_bottom = base + (bottom - code - 0.5) * ratio

    # The outer edges as fractions over 1 + e, e = exp(-|z|) (the small tail
    # is e / (1 + e), the large one 1 / (1 + e), f = e / (1 + e)^2), and every
    # division below with a single use: XLA:CPU does not fuse a division with
    # several users but writes it to memory.
    e_top, e_bottom = tf.exp(-tf.abs(z_top)), tf.exp(-tf.abs(z_bottom))
    q_top, q_bottom = 1.0 + e_top, 1.0 + e_bottom
    lower_top = tf.where(z_top <= 0.0, e_top, 1.0)  # F(z_top) (1 + e_top)
    lower_bottom = tf.where(z_bottom <= 0.0, e_bottom, 1.0)
    upper_top = tf.where(z_top >= 0.0, e_top, 1.0)  # G(z_top) (1 + e_top)
    upper_bottom = tf.where(z_bottom >= 0.0, e_bottom, 1.0)
    denominator = q_top * q_bottom
    # P = total / denominator, the mass outside the outer edges from the small side
    total = tf.where(
        z_top + z_bottom > 0.0,
        upper_bottom * q_top - upper_top * q_bottom,
        lower_top * q_bottom - lower_bottom * q_top,
    )
    total = tf.maximum(total, _TINY * denominator)
    # outer part of W: outer_w / denominator
    outer_w = -(top - code) * upper_top * q_bottom + (code - bottom) * lower_bottom * q_top
    # h = f (x) or z f (sigma) = h_num / (1 + e)^2
    if wrt == "x":
        h_top, h_bottom = e_top, e_bottom
    else:
        h_top, h_bottom = z_top * e_top, z_bottom * e_bottom
    h_top, h_bottom = h_top * q_bottom * q_bottom, h_bottom * q_top * q_top
    # sum dpi = d_sum / (sigma denominator^2), outer sum g' dpi = outer_g / denominator^2
    d_sum = -(h_top - h_bottom)
    outer_g = -ratio * ((top - code) * h_top - (bottom - code) * h_bottom)
    # soft = (sum g' dpi - (s W / P) sum dpi) / P, over total^2:
    #   (outer_g total - ratio outer_w d_sum) / denominator
    #   + sum_e ratio (denominator total h_e - d_sum t_e) / (1 + e_e)^2
    # with t_e the signed small tail times (1 + e_e)^2.
    density_coefficient = ratio * denominator * total
    tail_coefficient = ratio * d_sum
    soft = (outer_g * total - ratio * outer_w * d_sum) / denominator

    def edge_term(z, e, above, inner):
        # The tail beyond the edge away from the output point is the small one
        # (the output is the nearest point, so the edges above it lie above x).
        one_plus = 1.0 + e
        h = e if wrt == "x" else z * e
        signed_tail = tf.where(above, e, -e) * one_plus
        term = (density_coefficient * h - tail_coefficient * signed_tail) / (one_plus * one_plus)
        return term if inner is None else tf.where(inner, term, 0.0)

    # Edges at p (in steps, from a reference point): z = p s / sigma - d with
    # d = (x - s * reference) / sigma. exp(-|z|) is exp(d) exp(-p s / sigma)
    # above the output and exp(-d) exp(p s / sigma) below it: one exp per
    # element and a constant per edge, exact while |d| and the constants stay
    # within e^80 (`_soft_derivative_either` checks); otherwise every edge gets
    # its own exp.
    if neighbours is None:
        reference = 0.5 * (kmin + kmax)
        edges = [(k + 0.5 - reference, code <= k, None) for k in range(kmin, kmax)]
    else:
        reference = code
        edges = [
            (
                offset + 0.5,
                tf.constant(offset >= 0),
                tf.logical_and(code + offset >= bottom, code + offset + 1.0 <= top),
            )
            for offset in range(-neighbours, neighbours)  # between c + o and c + o + 1
        ]
    distance = (x - step * reference) * inverse_sigma

    numerator = soft
    if factored:
        up, down = tf.exp(distance), tf.exp(-distance)
    for position, above, inner in edges:
        z = position * ratio - distance
        if factored:
            e = tf.where(above, up * tf.exp(-position * ratio), down * tf.exp(position * ratio))
        else:
            e = tf.exp(-tf.abs(z))
        numerator += edge_term(z, e, above, inner)
    return numerator / (total * total)


def _soft_derivative_either(x, code, step, sigma, kmin, kmax, neighbours, wrt):
    """`_soft_derivative`, factored while exact (see there). The condition
    selects between two whole computations on the inputs: a conditional's
    operands are written to memory, so it must not cut a computation."""
    ratio = step / sigma
    if neighbours is None:
        bound = 0.5 * (kmax - kmin + 1) * ratio + _CLAMP_SIGMAS
    else:
        bound = 0.5 * ratio + _CLAMP_SIGMAS
    args = (x, code, step, sigma, kmin, kmax, neighbours, wrt)
    return tf.cond(
        bound <= _FACTOR_BOUND,
        lambda: _soft_derivative(*args, factored=True),
        lambda: _soft_derivative(*args, factored=False),
    )


# The helpers below run as graphs, or XLA-compiled with `XLA_KERNELS`: XLA
# fuses the loop over edges into one pass over the input that keeps the sum
# in registers; op by op every edge costs several passes through memory.
@_kernel
def _cpq_upstream_x(x, low, high, code, step, sigma, upstream, kmin, kmax, neighbours):
    """upstream * sum_k g'_k dpi~_k/dx at x clipped to [low, high], elementwise."""
    x = tf.clip_by_value(x, low, high)
    return upstream * _soft_derivative_either(x, code, step, sigma, kmin, kmax, neighbours, "x")


@_kernel
def _cpq_upstream_sigma(x, low, high, code, step, sigma, upstream, kmin, kmax, neighbours):
    """upstream * sum_k g'_k dpi~_k/dsigma at x clipped to [low, high],
    elementwise (summed apart: XLA:CPU runs a reduction fused with this much
    work on one thread)."""
    x = tf.clip_by_value(x, low, high)
    soft = _soft_derivative_either(x, code, step, sigma, kmin, kmax, neighbours, "sigma")
    return upstream * soft


@_kernel
def _cpq_finish(x, low, high, code, step, upstream, upstream_x):
    """(grad_x, the elementwise terms of dL/ds but sigma's) from the x kernel's
    output: no x gradient beyond [low, high], and s dpi/ds = -x dpi/dx - sigma
    dpi/dsigma. (Sums are left to TensorFlow: XLA:CPU runs reductions on one
    thread.)"""
    inside = tf.logical_and(x >= low, x <= high)
    x_eval = tf.clip_by_value(x, low, high)
    return tf.where(inside, upstream_x, 0.0), upstream * code - x_eval * upstream_x / step


@_kernel
def _cpq_codes(x, step, kmin, kmax):
    """clip(round(x / s), kmin, kmax), rounding half away from zero."""
    return tf.clip_by_value(ops.round_half_away(x / step), float(kmin), float(kmax))


@_kernel
def _weighted_backward(
    x_eval, inside, code, step, sigma, level_weights, upstream, bits, signed, neighbours, chunk_size
):
    """The gradients of `cpq_quantize` with DropBits / gate weights, cell by
    cell over the whole grid in chunks, or over `neighbours` kept points on
    each side (not None). Compiled by XLA, which fuses the per-cell work."""
    levels = int(level_weights.shape[0])
    kmin, kmax = code_range(bits, signed)
    count = kmax - kmin + 1
    level_table = code_levels(bits, levels) if signed else np.zeros(count, np.int32)
    keep = level_weights > 0.0
    window = neighbours is not None
    weight_table = tf.gather(
        tf.concat([tf.ones([1], level_weights.dtype), level_weights], 0), level_table
    )
    xe = x_eval[..., None]
    # Grid values relative to the output, g'_k = s (k - code): sum_k dpi~_k = 0,
    # so the sums are unchanged and no large |g| cancels in float32.
    centre = code[..., None]

    if window:
        # Kept points are multiples of 2^(number of leading dropped levels).
        dropped_lead = tf.reduce_sum(tf.math.cumprod(1.0 - tf.cast(keep, tf.float32)))
        stride = tf.pow(2.0, dropped_lead)
        offsets = tf.range(-neighbours, neighbours + 1, dtype=tf.float32)
        codes = centre + stride * offsets
        valid = tf.cast(tf.logical_and(codes >= kmin, codes <= kmax), x_eval.dtype)
        index = tf.cast(tf.clip_by_value(codes - kmin, 0, count - 1), tf.int32)
        weights = tf.gather(weight_table, index) * valid
        pi, d_x, d_sigma = _cell_terms(xe, codes, step, sigma)
        grid = step * stride * offsets
        total = tf.maximum(tf.reduce_sum(weights * pi, -1), _TINY)
        mean = tf.reduce_sum(weights * pi * grid, -1) / total
        sums = [
            (tf.reduce_sum(weights * d, -1), tf.reduce_sum(weights * grid * d, -1))
            for d in (d_x, d_sigma)
        ]
    else:
        zeros = tf.zeros_like(x_eval)
        total, weighted_grid = zeros, zeros
        sums = [(zeros, zeros), (zeros, zeros)]
        for start in range(0, count, chunk_size):
            stop = min(start + chunk_size, count)
            codes = tf.constant(np.arange(kmin + start, kmin + stop), x_eval.dtype)
            weights = weight_table[start:stop]
            pi, d_x, d_sigma = _cell_terms(xe, codes, step, sigma)
            grid = step * (codes - centre)
            total += tf.reduce_sum(weights * pi, -1)
            weighted_grid += tf.reduce_sum(weights * grid * pi, -1)
            sums = [
                (
                    d_sum + tf.reduce_sum(weights * d, -1),
                    g_sum + tf.reduce_sum(weights * grid * d, -1),
                )
                for (d_sum, g_sum), d in zip(sums, (d_x, d_sigma), strict=True)
            ]
        total = tf.maximum(total, _TINY)
        mean = weighted_grid / total

    # sum_k g_k dpi~_k = (sum w g dpi - ybar sum w dpi) / P
    soft_x, soft_sigma = ((g_sum - mean * d_sum) / total for d_sum, g_sum in sums)
    # pi depends on x, s and sigma only through x/s and sigma/s, so
    # s dpi/ds = -x dpi/dx - sigma dpi/dsigma.
    soft_step = -(x_eval * soft_x + sigma * soft_sigma) / step
    grad_x = upstream * soft_x * inside
    grad_step = tf.reduce_sum(upstream * (code + soft_step))
    grad_sigma = tf.reduce_sum(upstream * soft_sigma)

    grad_levels = tf.zeros_like(level_weights)
    if levels:
        scale = (upstream / total)[..., None]
        if window:
            per_cell = scale * (grid - mean[..., None]) * pi * valid
            per_cell_level = tf.gather(tf.constant(level_table), index)
            grad_levels = tf.math.unsorted_segment_sum(
                tf.reshape(per_cell, [-1]), tf.reshape(per_cell_level, [-1]), levels + 1
            )[1:]
        else:
            per_code = []
            for start in range(0, count, chunk_size):
                stop = min(start + chunk_size, count)
                codes = tf.constant(np.arange(kmin + start, kmin + stop), x_eval.dtype)
                pi = _cell_terms(xe, codes, step, sigma)[0]
                contribution = scale * (step * (codes - centre) - mean[..., None]) * pi
                per_code.append(tf.reduce_sum(tf.reshape(contribution, [-1, stop - start]), 0))
            grad_levels = tf.math.unsorted_segment_sum(
                tf.concat(per_code, 0), tf.constant(level_table), levels + 1
            )[1:]
    return grad_x, grad_step, grad_sigma, grad_levels


def cpq_quantize(
    x,
    step,
    sigma,
    level_weights,
    bits: int,
    signed: bool,
    neighbours: int | None = 8,
    chunk_size: int = 16,
):
    """The CPQ quantizer as a pure function (see the module docstring).

    Args:
      x: input tensor.
      step: scalar tensor s > 0.
      sigma: scalar tensor, the logistic noise scale > 0.
      level_weights: (L,) tensor, the weight of each bit level's points in
        [0, 1] (0 drops the level from the argmax); L = 0, or bits - 2 for a
        signed grid.
      bits: 2..8.
      signed: symmetric narrow grid (True) or 0..2^b - 1.
      neighbours: accumulate the backward sums over this many kept points on
        each side of the output (None: over the whole grid, in chunks).
      chunk_size: grid points per chunk of the whole-grid computation.

    Returns:
      s * code; gradients flow to x, step, sigma and level_weights.
    """
    levels = int(level_weights.shape[0])
    if levels and (not signed or levels != bits - 2):
        raise ValueError(
            f"level_weights must have bits - 2 = {bits - 2} entries for a signed grid "
            f"(none for an unsigned one), got {levels}"
        )
    kmin, kmax = code_range(bits, signed)
    count = kmax - kmin + 1
    window = neighbours is not None and 2 * neighbours + 1 < count

    @tf.custom_gradient
    def forward(x, step, sigma, level_weights):
        keep = level_weights > 0.0
        if levels:
            # every level kept: plain round-to-nearest, as without levels
            code = tf.cond(
                tf.reduce_all(keep),
                lambda: ops.call_compiled(_cpq_codes, x, step, kmin=kmin, kmax=kmax),
                lambda: nearest_kept_code(x / step, keep, bits, signed),
            )
        else:
            code = ops.call_compiled(_cpq_codes, x, step, kmin=kmin, kmax=kmax)
        y = step * code

        def grad(upstream):
            # Evaluate far outliers at 10 sigma beyond the outermost kept cell edge.
            if levels:
                level_tops = np.array(
                    [2 ** (bits - 1) - 2 ** (level - 1) for level in range(1, levels + 1)],
                    np.float32,
                )
                top = tf.maximum(
                    float(2 ** (bits - 2)),
                    tf.reduce_max(tf.where(keep, level_tops, tf.zeros_like(level_tops))),
                )
                bottom = -top
            else:
                top, bottom = float(kmax), float(kmin)
            low = step * (bottom - 0.5) - _CLAMP_SIGMAS * sigma
            high = step * (top + 0.5) + _CLAMP_SIGMAS * sigma

            def unweighted():
                # Every point weighs 1: the sums telescope over shared cell edges
                # (`_soft_derivative`).
                tensors = (x, low, high, code, step, sigma, upstream)
                static = dict(kmin=kmin, kmax=kmax, neighbours=neighbours if window else None)
                upstream_x = ops.call_compiled(_cpq_upstream_x, *tensors, **static)
                grad_sigma = tf.reduce_sum(
                    ops.call_compiled(_cpq_upstream_sigma, *tensors, **static)
                )
                grad_x, step_terms = ops.call_compiled(
                    _cpq_finish, x, low, high, code, step, upstream, upstream_x
                )
                return grad_x, tf.reduce_sum(step_terms) - sigma * grad_sigma / step, grad_sigma

            if not levels:
                return (*unweighted(), tf.zeros_like(level_weights))

            def weighted():
                # With DropBits / gate weights, cell by cell (weights: small tensors).
                x_eval = tf.clip_by_value(x, low, high)
                inside = tf.cast(tf.logical_and(x >= low, x <= high), x.dtype)
                return ops.call_compiled(
                    _weighted_backward,
                    x_eval,
                    inside,
                    code,
                    step,
                    sigma,
                    level_weights,
                    upstream,
                    bits=bits,
                    signed=signed,
                    neighbours=neighbours if window else None,
                    chunk_size=chunk_size,
                )

            # Every level kept (most training steps under DropBits): the weights
            # are all 1 and the fused form applies. The level weights' own
            # gradient is computed apart, so that a graph that does not use it
            # (the layers: their masks carry no gradient) prunes it.
            grad_x, grad_step, grad_sigma = tf.cond(
                tf.reduce_all(tf.equal(level_weights, 1.0)), unweighted, lambda: weighted()[:3]
            )
            return grad_x, grad_step, grad_sigma, weighted()[3]

        return y, grad

    return forward(x, step, sigma, level_weights)


def hard_concrete_sample(log_alpha, uniform):
    """A hard-concrete gate in [0, 1] from uniform noise (Louizos et al., 2018)."""
    uniform = tf.clip_by_value(uniform, 1e-6, 1.0 - 1e-6)
    logistic = tf.math.log(uniform) - tf.math.log(1.0 - uniform)
    relaxed = tf.sigmoid((logistic + log_alpha) / HARD_CONCRETE_BETA)
    stretched = relaxed * (HARD_CONCRETE_ZETA - HARD_CONCRETE_GAMMA) + HARD_CONCRETE_GAMMA
    return tf.clip_by_value(stretched, 0.0, 1.0)


def hard_concrete_open_probability(log_alpha):
    """P(gate != 0), the differentiable count the L0 penalty sums."""
    shift = HARD_CONCRETE_BETA * np.log(-HARD_CONCRETE_GAMMA / HARD_CONCRETE_ZETA)
    return tf.sigmoid(log_alpha - shift)


def hard_concrete_deterministic(log_alpha):
    """The test-time gate: clip(sigmoid(log alpha) (zeta - gamma) + gamma, 0, 1)."""
    stretched = (
        tf.sigmoid(log_alpha) * (HARD_CONCRETE_ZETA - HARD_CONCRETE_GAMMA) + HARD_CONCRETE_GAMMA
    )
    return tf.clip_by_value(stretched, 0.0, 1.0)


def nested(gates):
    """m_l = prod_{j >= l} gate_j: closing a level closes every finer one."""
    return tf.math.cumprod(gates, reverse=True)


# ---------------------------------------------------------------------------
# Keras class


@register("cpq")
class CPQQuantizer(Quantizer):
    """CPQ with DropBits and learned bit widths (arXiv:2109.02100); see the
    module docstring for the formulas and what is reconstructed.

    Args:
      bits: 2..8 (the largest bit width; with `learn_bits` the layer may
        learn fewer).
      signed: symmetric narrow grid (weights) or unsigned (after ReLU).
      for_weights: enables DropBits and the bit gates (kernels only;
        `quantize_model` and the Quant layers set it).
      initial_step: s before `initialize`.
      sigma_ratio: initial sigma as a fraction of s (> 0).
      drop_rates: DropBits rate per bit level, each in [0, 1): a list of
        bits - 2 rates (finest level first) or a scalar p (p / 2^(l-1) at
        level l). 0 disables DropBits.
      learn_bits: learn the bit width with hard-concrete gates.
      bit_regularization: weight (>= 0) of the expected-kept-levels penalty.
      initial_log_alpha: initial gate logit (3: gates open, P(z = 0) < 1%).
      gate_scale: log alpha = gate_scale * the `gate_logit` variable, so that
        an optimizer step moves log alpha gate_scale times further than a
        step or sigma update (a gate must travel from 3 to 0 to close).
      neighbours: kept points per side in the backward sums (None: all, in
        chunks of `chunk_size`).
      chunk_size: grid points per chunk of the whole-grid backward pass.
      seed: seed of the DropBits / gate noise.
    """

    def __init__(
        self,
        bits=4,
        signed=False,
        for_weights=False,
        initial_step=0.1,
        sigma_ratio=1.0 / 3.0,
        drop_rates: float | Sequence[float] = 0.1,
        learn_bits=False,
        bit_regularization=0.0,
        initial_log_alpha=3.0,
        gate_scale=10.0,
        neighbours: int | None = 8,
        chunk_size=16,
        seed=None,
        **kwargs,
    ):
        super().__init__(bits=check_bits(bits, "CPQ"), signed=signed, **kwargs)
        if for_weights and not self.signed:
            raise ValueError(
                "CPQ weight quantizers use the signed grid: got for_weights=True, signed=False"
            )
        self.for_weights = bool(for_weights)
        self.initial_step = check_positive(initial_step, "initial_step", "CPQ")
        self.sigma_ratio = check_positive(sigma_ratio, "sigma_ratio (initial sigma / step)", "CPQ")
        self.levels = self.bits - 2 if self.for_weights else 0
        if np.ndim(drop_rates) == 0:
            self.drop_rates = float(drop_rates)
        else:
            self.drop_rates = [float(r) for r in drop_rates]
        rates = np.asarray(self.drop_rates, np.float64).reshape(-1)
        bad = rates[~((rates >= 0) & (rates < 1))]
        if bad.size:
            raise ValueError(f"drop_rates must be in [0, 1) for CPQ, got {float(bad[0])!r}")
        if self.for_weights:
            self._rates = drop_rates_per_level(self.drop_rates, self.levels)
        else:
            self._rates = np.zeros(0, np.float32)
        self.learn_bits = bool(learn_bits)
        if not np.isfinite(bit_regularization) or bit_regularization < 0:
            raise ValueError(
                "bit_regularization must be a finite number >= 0 for CPQ, got "
                f"{bit_regularization!r}"
            )
        self.bit_regularization = float(bit_regularization)
        if not np.isfinite(initial_log_alpha):
            raise ValueError(f"initial_log_alpha must be finite, got {initial_log_alpha!r}")
        self.initial_log_alpha = float(initial_log_alpha)
        self.gate_scale = check_positive(gate_scale, "gate_scale", "CPQ")
        if neighbours is not None and (isinstance(neighbours, bool) or int(neighbours) < 1):
            raise ValueError(f"neighbours must be None or an integer >= 1, got {neighbours!r}")
        self.neighbours = None if neighbours is None else int(neighbours)
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
        self.chunk_size = int(chunk_size)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.clips_negative = not self.signed

    @property
    def gated(self) -> bool:
        return self.learn_bits and self.levels > 0

    def build(self, input_shape):
        self.log_step = self._param(
            "log_step", initializer=tf.constant_initializer(np.log(self.initial_step))
        )
        self.log_sigma = self._param(
            "log_sigma",
            initializer=tf.constant_initializer(np.log(self.sigma_ratio * self.initial_step)),
        )
        if self.gated:
            self.gate_logit = self._param(
                "gate_logit",
                shape=(self.levels,),
                initializer=tf.constant_initializer(self.initial_log_alpha / self.gate_scale),
            )
        super().build(input_shape)

    def log_alpha(self):
        """The (L,) gate logits log alpha_l."""
        return self.gate_scale * as_tensor(self.gate_logit)

    def set_log_alpha(self, values) -> None:
        """Sets the gate logits (e.g. -5 closes a level, 3 opens it)."""
        self.gate_logit.assign(np.asarray(values, np.float32) / self.gate_scale)

    # -- the bit levels of one forward pass
    def drop_mask(self, training=None):
        """The (L,) DropBits keep mask: a fresh 0/1 draw per level in training
        (level l kept with probability 1 - rate_l), all ones otherwise."""
        if self.levels == 0:
            return tf.zeros([0], tf.float32)
        if not training or not np.any(self._rates > 0):
            return tf.ones([self.levels], tf.float32)
        draw = keras.random.uniform([self.levels], seed=self.seed_generator)
        return tf.cast(draw >= tf.constant(self._rates), tf.float32)

    def gates(self, training=None):
        """The (L,) nested gate weights m_l = prod_{j >= l} z_j: sampled
        hard-concrete gates in training, 0/1 deterministic gates otherwise."""
        log_alpha = self.log_alpha()
        if training:
            noise = keras.random.uniform([self.levels], seed=self.seed_generator)
            return nested(hard_concrete_sample(log_alpha, noise))
        return nested(tf.cast(hard_concrete_deterministic(log_alpha) >= 0.5, tf.float32))

    def bit_penalty(self):
        """Expected number of kept levels (expected bits - 2), unweighted."""
        return tf.reduce_sum(nested(hard_concrete_open_probability(self.log_alpha())))

    def call(self, inputs, training=None):
        step = tf.exp(as_tensor(self.log_step))
        sigma = tf.exp(as_tensor(self.log_sigma))
        mask = self.drop_mask(training)

        def quantize(level_mask):
            return cpq_quantize(
                inputs,
                step,
                sigma,
                level_mask,
                self.bits,
                self.signed,
                self.neighbours,
                self.chunk_size,
            )

        if not self.gated:
            return quantize(mask)
        gates = self.gates(training)
        if not training:
            return quantize(mask * gates)  # the learned sub-grid, as inference_form
        if self.bit_regularization > 0:
            self.add_loss(self.bit_regularization * self.bit_penalty())
        # Nested residuals (reconstructed): y = y_L + sum_d m_{d+1} (y_d - y_{d+1}), y_d the
        # output with levels 1..d dropped. With 0/1 gates this is the CPQ output on
        # the kept sub-grid; the gates get the gradient y_d - y_{d+1}. One CPQ call
        # carries the straight-through gradients; the residuals are constants.
        open_ = tf.cast(gates > 0.0, tf.float32)
        outputs = quantize(mask * open_)
        v = tf.stop_gradient(inputs) / tf.stop_gradient(step)
        level_ids = np.arange(1, self.levels + 1)
        candidates = level_candidates(v, self.bits, self.levels)
        coarser = [
            nearest_among(
                v, candidates, (mask * tf.constant((level_ids > d).astype(np.float32))) > 0.0
            )
            for d in range(self.levels + 1)
        ]
        step_constant = tf.stop_gradient(step)
        for d in range(self.levels):
            residual = step_constant * (coarser[d] - coarser[d + 1])
            outputs = outputs + (gates[d] - open_[d]) * residual
        return outputs

    def initialize(self, values):
        values = check_finite_array(values, "CPQ initialization values")
        if not self.built:
            self.build(values.shape)
        if self.signed:
            levels = 2 ** (self.bits - 1) - 1
            magnitudes = np.abs(values)
        else:
            levels = 2**self.bits - 1
            magnitudes = np.maximum(values, 0.0)
        step = max(mse_optimal_clip(magnitudes, levels) / levels, 1e-8)
        self.log_step.assign(np.log(step))
        self.log_sigma.assign(np.log(self.sigma_ratio * step))

    # -- learned bit width and the inference form
    def dropped_levels(self) -> int:
        """d: the highest closed level of the deterministic gates (0 if none)."""
        if not self.gated:
            return 0
        gates = np.asarray(hard_concrete_deterministic(self.log_alpha()).numpy())
        closed = np.nonzero(gates < 0.5)[0]
        return int(closed.max()) + 1 if closed.size else 0

    def learned_bits(self) -> int:
        return self.bits - self.dropped_levels()

    def inference_form(self, weights=None):
        step = tf.exp(as_tensor(self.log_step))
        dropped = self.dropped_levels()
        scale = float((step * float(2**dropped)).numpy())
        bits = self.bits - dropped
        kmin, kmax = code_range(bits, self.signed)
        return InferenceForm(
            bits=bits, signed=self.signed, scale=np.float32(scale), code_min=kmin, code_max=kmax
        )

    def parameters(self):
        out = {
            "step": float(np.exp(self.log_step.numpy())),
            "sigma": float(np.exp(self.log_sigma.numpy())),
        }
        if self.gated:
            gates = hard_concrete_deterministic(self.log_alpha()).numpy()
            for level, gate in enumerate(gates, start=1):
                out[f"gate_level{level}"] = float(gate)
            out["learned_bits"] = float(self.learned_bits())
        return out

    def get_config(self):
        config = super().get_config()
        config.update(
            for_weights=self.for_weights,
            initial_step=self.initial_step,
            sigma_ratio=self.sigma_ratio,
            drop_rates=self.drop_rates,
            learn_bits=self.learn_bits,
            bit_regularization=self.bit_regularization,
            initial_log_alpha=self.initial_log_alpha,
            gate_scale=self.gate_scale,
            neighbours=self.neighbours,
            chunk_size=self.chunk_size,
            seed=self.seed,
        )
        return config


# ---------------------------------------------------------------------------
# Reading the learned bit widths off a model


def learned_bits(quantizer) -> int:
    """The bit width a quantizer exports with: the learned one for a CPQ
    weight quantizer with gates, its configured `bits` otherwise."""
    if isinstance(quantizer, CPQQuantizer):
        return quantizer.learned_bits()
    return int(quantizer.bits)


def report_bits(model) -> dict:
    """Per-layer weight bit widths and their average weighted by parameter count.

    Returns:
      `{"layers": {name: bits}, "parameters": {name: count},
      "average_weight_bits": float}` over the layers that have a
      `kernel_quantizer` (QuantConv2D, QuantDepthwiseConv2D, QuantDense).
    """
    bits, counts = {}, {}
    for layer in model.layers:
        quantizer = getattr(layer, "kernel_quantizer", None)
        if quantizer is None or not hasattr(layer, "kernel"):
            continue
        bits[layer.name] = learned_bits(quantizer)
        counts[layer.name] = int(np.prod(layer.kernel.shape))
    total = sum(counts.values())
    average = sum(bits[n] * counts[n] for n in bits) / total if total else float("nan")
    return {"layers": bits, "parameters": counts, "average_weight_bits": float(average)}
