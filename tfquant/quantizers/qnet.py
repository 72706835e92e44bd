"""Quantization Networks: quantization as a learned sum of sigmoids.

Yang et al., "Quantization Networks", CVPR 2019, arXiv:1911.09464; the
authors' code is github.com/aliyun/alibabacloud-quantization-networks.

Levels: a sorted set of distinct integers Y (presets "binary" {-1, 1},
"ternary" {-1, 0, 1}, "3(+-2)" {-2..2}, "3(+-4)" {-4, -2, -1, 0, 1, 2, 4},
or uniform b-bit sets), n = |Y| - 1 steps s_i = Y[i+1] - Y[i] and an offset
o = sum(s_i) / 2 for signed quantizers (weights), 0 for unsigned ones
(activations after a ReLU).

Forward in training:

    y = alpha * (sum_i s_i * g_i - o),  g_i = sigmoid(clip(T * (beta * x - b_i), -10, 10))

with a learned output scale alpha, input scale beta, thresholds b_i (frozen
after initialization unless `learn_biases=True`, as in the paper) and a
temperature T that a `TemperatureScheduler` raises during training. At
inference (`training=False`), and in training once T reaches
`step_temperature`, each sigmoid is the unit step (1 where beta * x >= b_i;
in training an exact tie beta * x = b_i gives 1/2): the output is
alpha * (Y_k - Y_0 - o) with k the number of thresholds b_i <= beta * x.

Backward (METHODS.md, section 2), with D = sum_i s_i * g_i * (1 - g_i):

    dy/dx = T * alpha * beta * D,   dL/dalpha = sum(dL/dy * y) / alpha,
    dL/dbeta = T * alpha * sum(dL/dy * x * D),
    dL/db_i = -T * alpha * s_i * sum(dL/dy * g_i * (1 - g_i)).

g_i is the sigmoid of the clamped argument, as in the authors' code: where
the clamp is active the formula still passes a gradient of T * sigmoid(10) *
(1 - sigmoid(10)) ~ 4.5e-5 * T per threshold (the exact derivative of the
clamped forward would be 0 there). The sums over thresholds are unrolled
loops (blocks in a `tf.while_loop` above 32 thresholds) that never build an
[n, ...] stack, and run in XLA-compiled functions that fuse each loop into
one pass over the input (`XLA_KERNELS`, or `compiled=` per call).
The backward pass recomputes the sigmoids instead of saving them. Thresholds
share exponentials: exp(-T (beta x - b_i)) is exp(-T (beta x - r)), one exp
per element, times a constant per threshold, exact up to rounding while T times
half the spread of the thresholds sharing r stays <= 70. All thresholds
share one while that holds, else groups of 4, else each threshold has its
own exp (about twice the time of one shared exp). `python -m
benchmarks.overhead --methods=qn_w3a3 [--qn_temperature=T]` measures
the cost. The step form is one
`searchsorted` and one `gather`, whatever n.

Initialization (`initialize(values)`), from the paper: beta = (5p/4) / max|x|
with p the largest output level (max|Y| for every preset), alpha = 1 / beta.
Thresholds, with `threshold_init="kmeans"` (the paper): a 1-D k-means with
|Y| clusters of beta * x (deterministic: centres start at the quantiles of the
distinct values, then Lloyd iterations on the sorted data) and b_i the
midpoints between consecutive centres. For weights, the two thresholds
around the level 0 (where Y has 0 and levels on both sides) are then set to
-+`central_threshold` (0.05, in the beta-scaled domain), as METHODS.md
reports from the paper; `central_threshold=None` keeps the k-means
midpoints. With fewer distinct values than levels the k-means falls back to
uniform thresholds. With `threshold_init="uniform"`, b_i are the midpoints
between consecutive output levels, (Y[i] + Y[i+1]) / 2 for every preset,
which makes the step form round-to-nearest onto the levels. The default
is k-means for weights and uniform for activations (see the class
docstring for why).

What tfquant chose where the paper leaves room:

* Activation scales are tied: alpha = 1 / beta, and only beta is learned
  (the gradient of alpha flows into beta through the chain rule). A single
  FakeQuant of step s maps x to round(x / s) and outputs s * code: its input
  and output steps are the same number, so an activation quantizer is exact
  in int8 only if alpha = 1 / beta. A free alpha would only rescale the next
  layer's input, which that layer's weights (and their own alpha) absorb.
  Weight quantizers (`for_weights=True`) learn alpha and beta independently,
  as in the paper: their thresholds never reach the exported model, only
  the codes of the quantized kernel do.
* `bits` describes the level set: with `levels` given it is derived as
  ceil(log2(|Y|)) ("3(+-4)" is 3-bit) and whatever `bits` was passed is
  ignored (the explicit levels win; `quantize_model` passes the scheme's
  bits to every quantizer). The integer codes can need more bits than
  that: "3(+-4)" has codes up to 4, stored as INT4; `inference_form().bits`
  is the storage width.
* The integer codes are the output levels divided by their common step:
  "3(+-4)" has codes {-4, -2, -1, 0, 1, 2, 4} at step alpha, an unsigned
  {0, 2, 4, 6} has codes 0..3 at step 2 * alpha, and a signed level set with
  an odd Y_0 + Y_n (e.g. {-2, -1, 0, 1}, output levels -1.5..1.5 times alpha)
  has odd codes at step alpha / 2.

Export: weights are exact: the kernel's step output is integers times
alpha, stored symmetric (INT4 for codes within -+7, INT8 otherwise).
Activations are exact when the quantizer is a uniform quantizer: contiguous
codes 0..2^b - 1 and uniform thresholds (`threshold_init="uniform"`, biases
frozen); `is_exactly_uniform()` says whether it is. Otherwise (k-means or
learned thresholds, or a level set that is not 0..2^b - 1) `inference_form()`
returns the nearest uniform quantizer (the same output levels, thresholds
moved to the midpoints) and `uniform_approximation_error(values)` measures
the fraction of values whose code changes; `tfquant.lite.export_model`
reports the resulting agreement with Keras. An exact lookup is not
generated: TFLite could map int8 input codes to output codes with one
GATHER, but its input would first need an 8-bit grid of its own, which
moves every learned threshold to the nearest midpoint of that grid (still
not exact, only finer) and adds a requantization and a gather per
activation that the converter does not fuse. For an exact model, train the
activations with uniform thresholds.

Training schedule (paper): fine-tune from a float model, weights first, then
activations, then both (`qn_phase`), with T = start + growth * epoch,
growth 5..10 (`TemperatureScheduler`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

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
    register,
)
from tfquant.quantizers.constraints import AtLeast

_METHOD = "QN"
_CLAMP = 10.0  # |T * (beta * x - b)| is clipped to this before the sigmoid
_MIN_SCALE = 1e-8  # alpha and beta are kept >= this
_KMEANS_SAMPLES = 200_000

LEVEL_PRESETS: dict[str, tuple[int, ...]] = {
    "binary": (-1, 1),
    "ternary": (-1, 0, 1),
    "3(+-2)": (-2, -1, 0, 1, 2),
    "3(+-4)": (-4, -2, -1, 0, 1, 2, 4),
}


def uniform_levels(bits: int, signed: bool) -> tuple[int, ...]:
    """The uniform level set of a bit width: -(2^(b-1) - 1)..2^(b-1) - 1 when
    signed ({-1, 1} at 1 bit), 0..2^b - 1 when unsigned."""
    if signed:
        if bits == 1:
            return (-1, 1)
        top = 2 ** (bits - 1) - 1
        return tuple(range(-top, top + 1))
    return tuple(range(2**bits))


def resolve_levels(levels: Any, bits: int, signed: bool) -> tuple[int, ...]:
    """The sorted integer level set named by `levels` (see the class docstring).

    Raises:
      ValueError: an unknown preset name, or a level set that is not made of
        at least two distinct sorted integers, or has negative levels for an
        unsigned (activation) quantizer.
    """
    if levels is None:
        values = uniform_levels(bits, signed)
    elif isinstance(levels, str):
        key = levels.strip().lower().replace(" ", "")
        if key in LEVEL_PRESETS:
            values = LEVEL_PRESETS[key]
        elif key.startswith("uniform") and key[7:].isdigit() and 1 <= int(key[7:]) <= 8:
            values = uniform_levels(int(key[7:]), signed)
        else:
            raise ValueError(
                f"unknown level preset {levels!r} for {_METHOD}; known presets: "
                f"{sorted(LEVEL_PRESETS)} and 'uniform1'..'uniform8', or pass a sorted list "
                "of integers"
            )
    else:
        values = _integer_levels(levels)
    if not signed and values[0] < 0:
        raise ValueError(
            f"level set {list(values)} has negative levels, but an unsigned {_METHOD} "
            "quantizer (signed=False, activations after a ReLU) needs levels >= 0; use "
            "signed=True or a non-negative level set such as 0..2^b-1"
        )
    return values


def _integer_levels(levels: Any) -> tuple[int, ...]:
    if isinstance(levels, (bytes, dict)) or not isinstance(levels, (Sequence, np.ndarray)):
        raise ValueError(
            f"levels must be a preset name or a sorted list of integers for {_METHOD}, "
            f"got {levels!r}"
        )
    items = list(np.asarray(levels, dtype=object).reshape(-1))
    out = []
    for item in items:
        if isinstance(item, (bool, np.bool_)) or not isinstance(
            item, (int, float, np.integer, np.floating)
        ):
            raise ValueError(f"levels must be integers for {_METHOD}, got {item!r} in {levels!r}")
        if not np.isfinite(item) or float(item) != int(item):
            raise ValueError(f"levels must be integers for {_METHOD}, got {item} in {levels!r}")
        out.append(int(item))
    if len(out) < 2:
        raise ValueError(f"a {_METHOD} level set needs at least 2 levels, got {out}")
    for previous, current in zip(out[:-1], out[1:], strict=True):
        if current == previous:
            raise ValueError(f"levels must be distinct for {_METHOD}, got {current} twice in {out}")
        if current < previous:
            raise ValueError(
                f"levels must be sorted in increasing order for {_METHOD}, got {current} "
                f"after {previous} in {out}"
            )
    return tuple(out)


class LevelGrid:
    """Integer facts about a level set: steps, offset, output levels, codes.

    Attributes:
      levels: Y, sorted integers.
      steps: s_i = Y[i+1] - Y[i].
      offset: o = sum(s_i) / 2 when signed, else 0.
      outputs: the output levels in units of alpha, Y_k - Y_0 - o.
      unit: the common step of the outputs (1 for contiguous sets, 0.5 for
        signed sets with an odd Y_0 + Y_n, larger for sets like {0, 2, 4}).
      codes: outputs / unit, integers.
      level_bits: ceil(log2(|Y|)), the paper's bit count.
      symmetric_bits: the width whose narrow symmetric range
        -(2^(b-1) - 1)..2^(b-1) - 1 holds every code (weights, signed).
      unsigned_bits: the width whose range 0..2^b - 1 holds every code
        (unsigned activations); None when codes are negative.
    """

    def __init__(self, levels: Sequence[int], signed: bool):
        self.levels = tuple(int(v) for v in levels)
        self.signed = bool(signed)
        self.steps = tuple(b - a for a, b in zip(self.levels[:-1], self.levels[1:], strict=True))
        self.offset = sum(self.steps) / 2.0 if signed else 0.0
        doubled = [2 * (v - self.levels[0]) - int(2 * self.offset) for v in self.levels]
        common = 0
        for value in doubled:
            common = math.gcd(common, abs(value))
        self.codes = tuple(v // common for v in doubled)
        self.unit = common / 2.0
        self.outputs = tuple(c * self.unit for c in self.codes)
        self.level_bits = max(1, math.ceil(math.log2(len(self.levels))))
        largest = max(abs(c) for c in self.codes)
        self.symmetric_bits = max(2, math.ceil(math.log2(2 * largest + 2)))
        self.unsigned_bits = (
            max(1, math.ceil(math.log2(self.codes[-1] + 1))) if self.codes[0] >= 0 else None
        )
        # uniform thresholds: midpoints between consecutive output levels
        self.midpoints = tuple(
            (a + b) / 2.0 for a, b in zip(self.outputs[:-1], self.outputs[1:], strict=True)
        )

    @property
    def n(self) -> int:
        return len(self.steps)

    @property
    def largest_output(self) -> float:
        return max(abs(v) for v in self.outputs)

    @property
    def inner_zero_index(self) -> int | None:
        """The index of the output level 0 when it has levels on both sides."""
        for index, value in enumerate(self.outputs):
            if value == 0 and 0 < index < len(self.outputs) - 1:
                return index
        return None


# ---------------------------------------------------------------------------
# Pure functions


def qn_step_quantize(x, alpha, beta, biases, levels: Sequence[int], signed: bool):
    """The inference form: `alpha * (sum_i s_i * [beta * x >= b_i] - o)`.

    One `searchsorted` over the sorted thresholds and one `gather` from the
    table of partial sums, whatever the number of levels. No gradient flows
    to x (the step is flat); alpha receives the usual product-rule gradient.
    """
    grid = LevelGrid(levels, signed)
    biases = tf.convert_to_tensor(biases, tf.float32)
    order = tf.argsort(biases)
    sorted_biases = tf.gather(biases, order)
    steps = tf.gather(tf.constant(grid.steps, tf.float32), order)
    table = tf.concat([tf.zeros((1,)), tf.cumsum(steps)], axis=0) - grid.offset
    scaled = beta * x
    index = tf.searchsorted(sorted_biases[tf.newaxis], tf.reshape(scaled, (1, -1)), side="right")
    return alpha * tf.reshape(tf.gather(table, index[0]), tf.shape(x))


def qn_quantize(
    x,
    alpha,
    beta,
    biases,
    temperature,
    levels: Sequence[int],
    signed: bool,
    learn_biases: bool = False,
    step_temperature: float = 1000.0,
    enabled=None,
    compiled: bool | None = None,
):
    """The training form of the Quantization Networks quantizer.

    Args:
      x: input tensor.
      alpha: scalar output scale.
      beta: scalar input scale.
      biases: thresholds b_i, shape (n,), in the beta-scaled domain.
      temperature: scalar T > 0.
      levels: the sorted integer level set Y.
      signed: subtract o = sum(s_i) / 2 (weights) or not (activations).
      learn_biases: return the biases' gradient (else zeros, which is
        cheaper: no per-threshold reduction).
      step_temperature: at T >= this the forward pass is the unit step.
      enabled: optional scalar; where it is 0 the function is the identity
        (gradient 1 to x, 0 to the parameters).
      compiled: run the sums in XLA-compiled functions (None: the module's
        `XLA_KERNELS`, True by default).

    Returns:
      `alpha * (sum_i s_i * sigmoid(clip(T * (beta * x - b_i), -10, 10)) - o)`
      with the gradients of the module docstring to x, alpha, beta, biases
      (zero to T).
    """
    grid = LevelGrid(levels, signed)
    weights = tf.constant(grid.steps, tf.float32)
    forward_sums, backward_sums, bias_sums = (
        kernel if compiled is None else kernel.variants[bool(compiled)]
        for kernel in (_qn_forward, _qn_backward, _qn_bias_sums)
    )

    @tf.custom_gradient
    def forward(x, alpha, beta, biases, temperature, enabled):
        on = enabled > 0.5
        hard = temperature >= step_temperature
        y = ops.call_compiled(
            forward_sums, x, alpha, beta, biases, weights, temperature, hard, on, grid.offset
        )

        def grad(upstream):
            grad_x = ops.call_compiled(
                backward_sums,
                x,
                beta,
                biases,
                weights,
                temperature,
                temperature * alpha * beta,
                on,
                upstream,
            )
            grad_alpha = tf.where(on, tf.reduce_sum(upstream * y) / alpha, 0.0)
            # grad_x = upstream * T * alpha * beta * D where on: dL/dbeta = sum(grad_x * x) / beta
            grad_beta = tf.where(on, tf.reduce_sum(grad_x * x) / beta, 0.0)
            if learn_biases:
                grad_biases = tf.where(
                    on,
                    -temperature
                    * alpha
                    * ops.call_compiled(bias_sums, x, beta, biases, weights, temperature, upstream),
                    0.0,
                )
            else:
                grad_biases = tf.zeros_like(biases)
            zero = tf.zeros_like(temperature)
            return grad_x, grad_alpha, grad_beta, grad_biases, zero, zero

        return y, grad

    return forward(
        tf.convert_to_tensor(x, tf.float32),
        tf.convert_to_tensor(alpha, tf.float32),
        tf.convert_to_tensor(beta, tf.float32),
        tf.convert_to_tensor(biases, tf.float32),
        tf.convert_to_tensor(temperature, tf.float32),
        tf.constant(1.0) if enabled is None else tf.convert_to_tensor(enabled, tf.float32),
    )


# The loop over thresholds is unrolled up to `_UNROLLED_THRESHOLDS`; above
# that (6- to 8-bit uniform sets) a `tf.while_loop` runs blocks of `_BLOCK`
# thresholds. Compiled by XLA (`XLA_KERNELS`), an unrolled loop or a block
# becomes one pass over the input that keeps the partial sums in registers.
_BLOCK = 16
_UNROLLED_THRESHOLDS = 32


_EXP_CLAMP = math.exp(_CLAMP)
# A shared exponential (below) keeps every factor within e^-+80 when
# T * (b_max - b_min) / 2 + 10 <= 80 over the thresholds that share it.
_FACTOR_LIMIT = 70.0
# Thresholds sharing one exp per element, tried in this order after "all of
# them" (group size 1: every threshold its own exp).
_GROUP_SIZES = (4, 1)


def _exponential_factory(x, beta, biases, temperature, group_size: int):
    """A function (b_i, i) -> q_i = exp(-clip(T (beta x - b_i), -10, 10)), elementwise.

    The thresholds are split into consecutive groups of `group_size` (all of
    them when it is >= n; with smaller groups i must be a Python int). Within a
    group with middle r, exp(-T (beta x - b)) = exp(-T (beta x - r)) *
    exp(T (b - r)): one exp per element and group, then a product and a clip
    per threshold, the same value up to rounding as long as no factor over-
    or underflows, which `_group_size_index` checks (beta x is first clipped
    to within 10 / T of the group's outermost thresholds, which changes no
    clipped argument). Group size 1 computes each threshold's exp directly.
    """
    n = int(biases.shape[0])
    if group_size == 1:
        argument = x * (temperature * beta)

        def direct(bias, index):
            del index
            return tf.exp(-tf.clip_by_value(argument - temperature * bias, -_CLAMP, _CLAMP))

        return direct
    scaled_input = x * beta
    margin = _CLAMP / temperature

    def shared(group):
        low, high = tf.reduce_min(group), tf.reduce_max(group)
        reference = 0.5 * (low + high)
        scaled = tf.clip_by_value(scaled_input, low - margin, high + margin)
        return reference, tf.exp(-temperature * (scaled - reference))

    def product(bias, reference, common):
        return tf.clip_by_value(
            common * tf.exp(temperature * (bias - reference)), 1.0 / _EXP_CLAMP, _EXP_CLAMP
        )

    if group_size >= n:
        reference, common = shared(biases)
        return lambda bias, index: product(bias, reference, common)
    groups = [shared(biases[start : start + group_size]) for start in range(0, n, group_size)]
    return lambda bias, index: product(bias, *groups[index // group_size])


def _group_sizes(n: int) -> list[int]:
    """The group sizes `_exponential_factory` may use for n thresholds, the
    cheapest first: all of them, then `_GROUP_SIZES` (uneven groups only
    while the loop over thresholds is unrolled)."""
    sizes = [n] + [m for m in _GROUP_SIZES if m < n and (m == 1 or n <= _UNROLLED_THRESHOLDS)]
    return sorted(set(sizes), reverse=True)


def _group_size_index(biases, temperature, sizes: list[int]):
    """The index in `sizes` of the largest group size whose shared
    exponentials are exact (group size 1 always is)."""
    n = int(biases.shape[0])
    index = tf.constant(len(sizes) - 1)
    for position in reversed(range(len(sizes) - 1)):
        size = sizes[position]
        spread = tf.reduce_max(
            tf.stack(
                [
                    tf.reduce_max(biases[start : start + size])
                    - tf.reduce_min(biases[start : start + size])
                    for start in range(0, n, size)
                ]
            )
        )
        exact = temperature * 0.5 * spread <= _FACTOR_LIMIT
        index = tf.where(exact, position, index)
    return index


def _slope(q):
    """g (1 - g) = q / (1 + q)^2 for g = 1 / (1 + q): one division, used once
    (XLA:CPU writes a division with several users to memory instead of fusing
    it)."""
    return q / ((1.0 + q) * (1.0 + q))


def _threshold_blocks(biases, weights):
    """Biases and weights as (blocks, `_BLOCK`), padded with thresholds of
    weight 0 (which add nothing)."""
    n = int(biases.shape[0])
    blocks = -(-n // _BLOCK)
    pad = blocks * _BLOCK - n
    biases = tf.pad(biases, [[0, pad]], constant_values=0.0)
    weights = tf.pad(weights, [[0, pad]])
    return blocks, tf.reshape(biases, (blocks, _BLOCK)), tf.reshape(weights, (blocks, _BLOCK))


def _threshold_sum(biases, weights, term, like):
    """sum_i w_i * term(b_i, i), a tensor shaped like `like`: unrolled up to
    `_UNROLLED_THRESHOLDS` thresholds (i a Python int), else a while loop
    over blocks (i None)."""
    n = int(biases.shape[0])
    total = tf.zeros_like(like)
    if n <= _UNROLLED_THRESHOLDS:
        for i in range(n):
            total += weights[i] * term(biases[i], i)
        return total
    blocks, block_biases, block_weights = _threshold_blocks(biases, weights)

    def loop_body(index, total):
        for i in range(_BLOCK):
            total += block_weights[index, i] * term(block_biases[index, i], None)
        return index + 1, total

    return tf.while_loop(
        lambda index, _: index < blocks,
        loop_body,
        (tf.constant(0), total),
        maximum_iterations=blocks,
    )[1]


# One output per compiled function: XLA:CPU computes each output of a
# function in its own loop, so returning the sum and the slope sum together
# would evaluate every sigmoid twice anyway.
def _qn_forward_body(x, alpha, beta, biases, weights, temperature, hard, on, offset):
    """where(on, alpha * (sum_i w_i g_i - offset), x), g_i = sigmoid(clip(T (beta x
    - b_i), -10, 10)), or the unit step where `hard` (1/2 at an exact tie)."""
    scaled_input = x * beta

    def steps():
        return _threshold_sum(
            biases, weights, lambda bias, _: 0.5 * (tf.sign(scaled_input - bias) + 1.0), x
        )

    def sigmoids(group_size):
        exponential = _exponential_factory(x, beta, biases, temperature, group_size)
        # g = 1 / (1 + q): one division, used once (XLA:CPU writes a division with
        # several users to memory instead of fusing it)
        return _threshold_sum(
            biases, weights, lambda bias, i: 1.0 / (1.0 + exponential(bias, i)), x
        )

    sizes = _group_sizes(int(biases.shape[0]))
    total = tf.cond(
        hard,
        steps,
        lambda: tf.switch_case(
            _group_size_index(biases, temperature, sizes),
            [lambda size=size: sigmoids(size) for size in sizes],
        ),
    )
    return tf.where(on, alpha * (total - offset), x)


def _qn_backward_body(x, beta, biases, weights, temperature, coefficient, on, upstream):
    """where(on, upstream * coefficient * sum_i w_i g_i (1 - g_i), upstream)."""

    def slopes(group_size):
        exponential = _exponential_factory(x, beta, biases, temperature, group_size)
        return _threshold_sum(biases, weights, lambda bias, i: _slope(exponential(bias, i)), x)

    sizes = _group_sizes(int(biases.shape[0]))
    total = tf.switch_case(
        _group_size_index(biases, temperature, sizes),
        [lambda size=size: slopes(size) for size in sizes],
    )
    return tf.where(on, upstream * (coefficient * total), upstream)


def _qn_bias_sums_body(x, beta, biases, weights, temperature, upstream):
    """sum(upstream * w_i * g_i (1 - g_i)) for every threshold i, shape (n,)."""
    exponential = _exponential_factory(x, beta, biases, temperature, group_size=1)

    def term(bias, weight):
        return weight * tf.reduce_sum(upstream * _slope(exponential(bias, None)))

    n = int(biases.shape[0])
    if n <= _UNROLLED_THRESHOLDS:
        return tf.stack([term(biases[i], weights[i]) for i in range(n)])
    blocks, block_biases, block_weights = _threshold_blocks(biases, weights)

    def loop_body(index, sums):
        values = [term(block_biases[index, i], block_weights[index, i]) for i in range(_BLOCK)]
        return index + 1, sums.write(index, tf.stack(values))

    _, sums = tf.while_loop(
        lambda index, _: index < blocks,
        loop_body,
        (tf.constant(0), tf.TensorArray(tf.float32, size=blocks)),
        maximum_iterations=blocks,
    )
    return tf.reshape(sums.stack(), (-1,))[:n]


# XLA-compiled and plain graph versions of the helpers above. Compiled is
# the default: ResNet-20 qn_w3a3 trains at 1.23x float step time against
# 1.96x with plain graphs, and each call matches the NumPy reference to
# float32 round-off. Fine-tuning with compiled helpers once ended lower in
# `make bench`. The cause was the recipe: scales ahead of a BatchNormalization
# get only rounding noise as gradient, Adam turns it into full steps (the
# two kinds of helper round differently), and the moving averages lag the
# drift. Over four runs of each kind (QN W4A4, small CNN), held-out accuracy
# was 74-84% compiled against 91-95% plain before `tfquant.reestimate_batch_norm`
# and 94.4-94.7% against 88-95% after it. Set `XLA_KERNELS = False` (or pass
# `compiled=False`) for plain graphs, e.g. where XLA is not available.
XLA_KERNELS = True
_qn_forward = ops.switchable(_qn_forward_body, lambda: XLA_KERNELS)
_qn_backward = ops.switchable(_qn_backward_body, lambda: XLA_KERNELS)
_qn_bias_sums = ops.switchable(_qn_bias_sums_body, lambda: XLA_KERNELS)


def kmeans_1d(values: np.ndarray, clusters: int, max_iterations: int = 100) -> np.ndarray | None:
    """Sorted centres of a deterministic 1-D k-means, or None when the values
    have fewer distinct entries than `clusters`.

    Centres start at the quantiles (i + 1/2) / k of the distinct values (so a
    mass of zeros after a ReLU does not collapse several centres onto 0) and
    move by Lloyd iterations; on sorted data each cluster is a contiguous
    range, so an iteration is a `searchsorted` and prefix sums. At most
    200,000 evenly spaced order statistics of the data are used.
    """
    data = np.sort(np.asarray(values, np.float64).ravel())
    if data.size > _KMEANS_SAMPLES:
        data = data[np.linspace(0, data.size - 1, _KMEANS_SAMPLES).round().astype(np.int64)]
    distinct = np.unique(data)
    if distinct.size < clusters:
        return None
    centres = np.quantile(distinct, (np.arange(clusters) + 0.5) / clusters)
    prefix = np.concatenate([[0.0], np.cumsum(data)])
    tolerance = 1e-9 * max(float(data[-1] - data[0]), 1e-30)
    for _ in range(max_iterations):
        bounds = (centres[1:] + centres[:-1]) / 2.0
        edges = np.concatenate([[0], np.searchsorted(data, bounds, side="left"), [data.size]])
        counts = np.diff(edges)
        sums = prefix[edges[1:]] - prefix[edges[:-1]]
        updated = np.sort(np.where(counts > 0, sums / np.maximum(counts, 1), centres))
        if np.max(np.abs(updated - centres)) <= tolerance:
            centres = updated
            break
        centres = updated
    return centres


# ---------------------------------------------------------------------------
# Keras class


@register("qn")
class QuantizationNetworkQuantizer(Quantizer):
    """Quantization Networks quantizer (arXiv:1911.09464); see the module docstring.

    Args:
      bits: 1..8. Used only when `levels` is None, to pick the uniform level
        set: signed -(2^(b-1) - 1)..2^(b-1) - 1 ({-1, 1} at 1 bit), unsigned
        0..2^b - 1. With `levels` given, `bits` becomes ceil(log2(|Y|)),
        whatever was passed.
      signed: True for weights (offset o = sum(s_i) / 2, symmetric outputs),
        False for activations after a ReLU (o = 0, levels >= 0).
      levels: None, a preset name ("binary", "ternary", "3(+-2)", "3(+-4)",
        "uniform1".."uniform8") or a sorted list of distinct integers.
      initial_temperature: T before any schedule sets it (> 0).
      learn_biases: train the thresholds b_i (the paper keeps them frozen).
      threshold_init: "kmeans" (the paper) or "uniform" (round-to-nearest
        onto the levels: exact in int8 for activations); None (default)
        picks k-means for weights and uniform for activations. The paper
        uses k-means for both, but k-means centres of post-ReLU values sit
        far from the integer output levels (on half-normal data at 4 bits
        about 87% of the codes differ from round-to-nearest), which distorts
        the starting point and makes the exported model approximate: on
        scikit-learn digits (small_cnn, W "3(+-4)" A4, 10 epochs) k-means
        activations reached 80% in Keras and 27% in TFLite, uniform ones
        98.9% in both.
      for_weights: True for a kernel quantizer: alpha and beta are learned
        independently. False (activations): alpha = 1 / beta, see the module
        docstring. `QuantConv2D` and `quantize_model` set it.
      central_threshold: for weights with k-means thresholds, the two
        thresholds around level 0 are set to -+ this (beta-scaled domain);
        None keeps the k-means midpoints.
      step_temperature: from this T on the training forward is the step.

    Attributes:
      grid: the `LevelGrid` of the level set.

    >>> q = QuantizationNetworkQuantizer(levels="ternary", signed=True, for_weights=True)
    >>> q.build((4,))
    >>> q(tf.constant([-2.0, -0.2, 0.3, 0.9]), training=False).numpy()
    array([-1.,  0.,  0.,  1.], dtype=float32)
    """

    clips_negative = False  # the soft form is > 0 below zero; a ReLU stays in front

    def __init__(
        self,
        bits=4,
        signed=False,
        levels=None,
        initial_temperature=1.0,
        learn_biases=False,
        threshold_init=None,
        for_weights=False,
        central_threshold=0.05,
        step_temperature=1000.0,
        **kwargs,
    ):
        bits = check_bits(bits, _METHOD, low=1, high=8)
        level_set = resolve_levels(levels, bits, bool(signed))
        grid = LevelGrid(level_set, bool(signed))
        storage = grid.symmetric_bits if signed or for_weights else grid.unsigned_bits
        if storage is None or storage > 8:
            raise ValueError(
                f"level set {list(level_set)} has codes {grid.codes[0]}..{grid.codes[-1]}, "
                f"which need more than 8 bits; {_METHOD} supports at most 8-bit codes"
            )
        super().__init__(bits=grid.level_bits, signed=signed, **kwargs)
        # as given: None (the uniform set of `bits`), a preset name, or the list
        self.levels = levels if levels is None or isinstance(levels, str) else list(level_set)
        self.grid = grid
        self.initial_temperature = check_temperature(initial_temperature, "initial_temperature")
        self.step_temperature = check_temperature(step_temperature, "step_temperature")
        if threshold_init not in (None, "kmeans", "uniform"):
            raise ValueError(
                f"threshold_init must be 'kmeans', 'uniform' or None for {_METHOD}, "
                f"got {threshold_init!r}"
            )
        self.threshold_init = threshold_init
        self.learn_biases = bool(learn_biases)
        self.for_weights = bool(for_weights)
        if central_threshold is not None:
            if not np.isfinite(central_threshold) or central_threshold < 0:
                raise ValueError(
                    f"central_threshold must be None or a finite number >= 0 for {_METHOD}, "
                    f"got {central_threshold!r}"
                )
            central_threshold = float(central_threshold)
        self.central_threshold = central_threshold

    # -- variables
    def build(self, input_shape):
        if self.for_weights:
            self.alpha = self._param("alpha", initializer="ones", constraint=AtLeast(_MIN_SCALE))
        self.beta = self._param("beta", initializer="ones", constraint=AtLeast(_MIN_SCALE))
        self.biases = self._param(
            "biases",
            shape=(self.grid.n,),
            initializer=tf.constant_initializer(self.grid.midpoints),
            trainable=self.learn_biases,
            constraint=SortedConstraint() if self.learn_biases else None,
        )
        self.temperature = self._param(
            "temperature",
            initializer=tf.constant_initializer(self.initial_temperature),
            trainable=False,
            aggregation="only_first_replica",
        )
        self.enabled = self._param(
            "enabled", initializer="ones", trainable=False, aggregation="only_first_replica"
        )
        super().build(input_shape)

    def _scales(self):
        """(alpha, beta) as tensors, clamped as the constraints keep them."""
        beta = tf.maximum(as_tensor(self.beta), _MIN_SCALE)
        if self.for_weights:
            alpha = tf.maximum(as_tensor(self.alpha), _MIN_SCALE)
        else:
            alpha = 1.0 / beta
        return alpha, beta

    def _numpy_scales(self) -> tuple[np.float32, np.float32]:
        beta = np.maximum(np.float32(self.beta.numpy()), np.float32(_MIN_SCALE))
        if self.for_weights:
            alpha = np.maximum(np.float32(self.alpha.numpy()), np.float32(_MIN_SCALE))
        else:
            alpha = np.float32(1.0) / beta
        return np.float32(alpha), np.float32(beta)

    @property
    def resolved_threshold_init(self) -> str:
        """The threshold initialization in use: `threshold_init`, or its
        default (k-means for weights, uniform for activations)."""
        if self.threshold_init is not None:
            return self.threshold_init
        return "kmeans" if self.for_weights else "uniform"

    # -- forward
    def call(self, inputs, training=None):
        alpha, beta = self._scales()
        biases = as_tensor(self.biases)
        enabled = as_tensor(self.enabled)
        if not training:
            step = qn_step_quantize(inputs, alpha, beta, biases, self.grid.levels, self.signed)
            return tf.where(enabled > 0.5, step, inputs)
        return qn_quantize(
            inputs,
            alpha,
            beta,
            biases,
            as_tensor(self.temperature),
            self.grid.levels,
            self.signed,
            learn_biases=self.learn_biases,
            step_temperature=self.step_temperature,
            enabled=enabled,
        )

    # -- initialization
    def initialize(self, values):
        values = check_finite_array(values, f"{_METHOD} initialization values")
        if not self.built:
            self.build(values.shape)
        top = float(np.abs(values).max())
        beta = 1.25 * self.grid.largest_output / (top if top > 0 else 1.0)
        biases = self._initial_thresholds(values.astype(np.float64) * beta)
        self.beta.assign(beta)
        if self.for_weights:
            self.alpha.assign(1.0 / beta)
        self.biases.assign(biases)

    def _initial_thresholds(self, scaled: np.ndarray) -> np.ndarray:
        uniform = np.asarray(self.grid.midpoints, np.float64)
        if self.resolved_threshold_init == "uniform":
            return uniform
        centres = kmeans_1d(scaled, len(self.grid.levels))
        if centres is None:
            return uniform
        thresholds = (centres[1:] + centres[:-1]) / 2.0
        zero = self.grid.inner_zero_index
        if self.for_weights and self.central_threshold is not None and zero is not None:
            thresholds[zero - 1] = -self.central_threshold
            thresholds[zero] = self.central_threshold
            thresholds = np.sort(thresholds)
        return thresholds

    # -- inference form
    def _check_enabled(self):
        if float(self.enabled.numpy()) <= 0.5:
            raise ValueError(
                f"{_METHOD} quantizer {self.name!r} is switched off (qn_phase), so the Keras "
                "model does not quantize there; call qn_phase(model, 'both') before exporting"
            )

    def inference_form(self, weights=None) -> InferenceForm:
        """The integer form the exporter uses (see the module docstring).

        Weights (`for_weights`, or when the exporter passes `weights`): exact,
        codes symmetric in the narrowest INT4/INT8-compatible range.
        Activations: the uniform quantizer with the same output levels;
        exact when `is_exactly_uniform()`, else the nearest one.
        """
        if not self.built:
            raise ValueError(f"{_METHOD} quantizer {self.name!r} is not built")
        self._check_enabled()
        alpha, _ = self._numpy_scales()
        scale = np.float32(alpha * np.float32(self.grid.unit))
        if self.for_weights or weights is not None or self.signed:
            bits = self.grid.symmetric_bits
            top = 2 ** (bits - 1) - 1
            return InferenceForm(bits=bits, signed=True, scale=scale, code_min=-top, code_max=top)
        bits = self.grid.unsigned_bits
        return InferenceForm(bits=bits, signed=False, scale=scale, code_min=0, code_max=2**bits - 1)

    def is_exactly_uniform(self) -> bool:
        """True when the step form equals one uniform quantizer of the input
        (round(x / scale), clipped to the form's codes): always for weights'
        outputs; for activations when the codes are contiguous and fill the
        form's range and the thresholds are the uniform midpoints."""
        if self.for_weights:
            return True
        codes = np.asarray(self.grid.codes)
        form = self.inference_form()
        if np.any(np.diff(codes) != 1) or codes[0] != form.code_min or codes[-1] != form.code_max:
            return False
        expected = np.asarray(self.grid.midpoints, np.float32)
        return bool(np.array_equal(np.asarray(self.biases.numpy(), np.float32), expected))

    def uniform_approximation_error(self, values) -> float:
        """The fraction of `values` (inputs of this quantizer) whose exported
        code differs from the code of the Keras inference output.

        0 for weights (the exporter stores the codes of the quantized kernel)
        and for exactly uniform activation quantizers up to float ties.
        """
        values = check_finite_array(values, f"{_METHOD} values")
        if self.for_weights:
            return 0.0
        form = self.inference_form()
        scale = np.float64(form.scale)
        keras_codes = np.round(self(values, training=False).numpy().astype(np.float64) / scale)
        scaled = values.astype(np.float64) / scale
        exported = np.clip(
            np.sign(scaled) * np.floor(np.abs(scaled) + 0.5), form.code_min, form.code_max
        )
        return float(np.mean(keras_codes != exported))

    # -- bookkeeping
    def parameters(self) -> dict[str, float]:
        alpha, beta = self._numpy_scales()
        biases = np.asarray(self.biases.numpy(), np.float64)
        return {
            "alpha": float(alpha),
            "beta": float(beta),
            "temperature": float(self.temperature.numpy()),
            "enabled": float(self.enabled.numpy()),
            "threshold_min": float(biases.min()),
            "threshold_max": float(biases.max()),
        }

    def get_config(self):
        config = super().get_config()
        config.update(
            levels=self.levels,
            initial_temperature=self.initial_temperature,
            learn_biases=self.learn_biases,
            threshold_init=self.threshold_init,
            for_weights=self.for_weights,
            central_threshold=self.central_threshold,
            step_temperature=self.step_temperature,
        )
        return config


def check_temperature(value: Any, name: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.integer, np.floating))
        or not np.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a finite number > 0 for {_METHOD}, got {value!r}")
    return float(value)


@keras.saving.register_keras_serializable(package="tfquant")
class SortedConstraint(keras.constraints.Constraint):
    """Keeps learned thresholds in increasing order after each update."""

    def __call__(self, w):
        return tf.sort(w)

    def get_config(self):
        return {}


# ---------------------------------------------------------------------------
# Finding the quantizers of a model, phases and the temperature schedule


def qn_quantizers(model: keras.layers.Layer) -> list[tuple[QuantizationNetworkQuantizer, str]]:
    """Every Quantization Networks quantizer in `model`, with its role.

    Walks `model.layers` (into nested models) and each layer's attributes,
    so quantizers held by Quant layers (`kernel_quantizer`,
    `input_quantizer`, `quantizer`) or by other custom layers are found.
    The role is "weights" for a `kernel_quantizer` or a quantizer built with
    `for_weights=True`, else "activations".
    """
    found: dict[int, tuple[QuantizationNetworkQuantizer, str]] = {}
    visited: set[int] = set()

    def role_of(quantizer, attribute):
        return (
            "weights"
            if attribute == "kernel_quantizer" or quantizer.for_weights
            else ("activations")
        )

    def visit(layer, attribute=None):
        if id(layer) in visited:
            return
        visited.add(id(layer))
        if isinstance(layer, QuantizationNetworkQuantizer):
            found.setdefault(id(layer), (layer, role_of(layer, attribute)))
            return
        children = list(layer.layers) if isinstance(layer, keras.Model) else []
        for name, value in vars(layer).items():
            if isinstance(value, keras.layers.Layer):
                children.append((value, name))
            elif isinstance(value, (list, tuple)):
                children.extend(v for v in value if isinstance(v, keras.layers.Layer))
        for child in children:
            if isinstance(child, tuple):
                visit(*child)
            else:
                visit(child)

    visit(model)
    return list(found.values())


PHASES = ("weights", "activations", "both")


def qn_phase(model: keras.layers.Layer, phase: str) -> dict[str, int]:
    """Switches the model's Quantization Networks quantizers for a training phase.

    The paper fine-tunes weights first, then activations, then both:
    "weights" leaves only the weight quantizers on (activation quantizers
    pass their input through unchanged), "activations" only the activation
    quantizers, "both" all of them. The switch is a non-trainable variable
    read inside the graph, so a compiled model needs no recompilation.
    Quantizers of other methods are not affected.

    Returns:
      How many quantizers are on and off: `{"on": k, "off": m}`.

    Raises:
      ValueError: an unknown phase, or a model without QN quantizers.
    """
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    quantizers = qn_quantizers(model)
    if not quantizers:
        raise ValueError(f"model {model.name!r} has no Quantization Networks ('qn') quantizers")
    counts = {"on": 0, "off": 0}
    for quantizer, role in quantizers:
        on = phase == "both" or phase == role
        quantizer.enabled.assign(1.0 if on else 0.0)
        counts["on" if on else "off"] += 1
    return counts
