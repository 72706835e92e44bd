"""DQ: direct quantization with learnable levels and channel-aware activations.

Hoang, Do, Nguyen, Cheung, "Direct Quantization for Training Highly Accurate
Low Bit-width Deep Neural Networks", IJCAI 2020, arXiv:2012.13762.

**This module is a reconstruction from the paper's abstract**, the only part
of the paper that could be read. The abstract fixes two ideas: (1) the
quantized weights are trained directly, with learnable quantization levels,
instead of training full-precision weights and re-quantizing them after every
step; (2) activations use one quantizer per layer whose levels are fit to the
quantization errors of the individual channels, so that a few high-variance
channels do not dominate. The equations below are tfquant's own; replace them
by the paper's if they become available.

Weights: `DirectQuantizer`
--------------------------
State (Keras variables of the quantizer, created in `build`):

* `levels` L, shape (G, K): K = 2^b sorted real levels per group, G = 1
  (one vector per layer, the default) or G = kernel.shape[-1]
  (`per_channel=True`, one vector per output channel). Trained by the
  optimizer; a `SortedLevels` constraint sorts each row after every step. With
  `levels="uniform"` the levels are L = s * k, k = -(2^(b-1)-1) .. 2^(b-1)-1
  (K = 2^b - 1 levels, symmetric around 0: a uniform grid of 2^b levels is
  asymmetric, and the symmetric narrow range is what maps one-to-one onto
  TFLite's INT4/INT8 weights), and the step s (one per group) is trained as
  log s (an optimizer such as Adam then changes it by a relative amount per
  step; in linear units its learning rate would have to suit steps 100 times
  smaller at 8 bits than at 2).
* `assignment` a, the kernel's shape: the index of each weight's level (whole
  numbers stored in float32).
* `accumulated_update` u, the kernel's shape: the update a weight has received
  since it last changed level, in the weight's units.
* `assignment_moves`: how many level changes training has made (a counter).

Forward: y = L[g, a] (`tf.gather`). The layer's float `kernel` variable is
read only by `initialize` (and by the first call of a quantizer that was never
initialized); the forward pass never uses it, so there is no float shadow
weight whose re-quantization could disagree with the trained weights.

Backward, with G_y = dLoss/dy:

* levels: dLoss/dL[g, k] = sum of G_y over the weights of group g assigned to
  k (for the uniform grid, through the chain rule, dLoss/d(log s) =
  s * sum of G_y * k over the group);
* assignments, directly: u <- u - lr_a * G_y / rms(G_y), with lr_a the
  `assignment_learning_rate` and rms(G_y) the root mean square of G_y over
  the kernel in this step. When the virtual position L[a] + u crosses the
  midpoint to a neighbouring level, i.e. u > (L[a+1] - L[a]) / 2 or
  u < -(L[a] - L[a-1]) / 2, the weight moves to that level (a <- a +- 1, at
  most one level per step) and u restarts at 0: the weight is exactly its new
  level, with no memory of a float position. At the outermost levels u cannot
  push outwards (it is clipped to 0 there): the level itself moves instead.
  Levels moving carry their weights with them; they never reassign weights.
* the float kernel gets a zero gradient.

Dividing by rms(G_y) is tfquant's choice: lr_a is then a step size in the
weights' units, like Adam's learning rate, whatever the scale of the
gradient, and weights with larger gradients still move faster. With the
plain step u <- u - lr_a * G_y (`normalize_assignment_update=False`) and
lr_a = 0.05, fine-tuning the digits CNN for 10 epochs moved thousands of
weights in its 8-bit layers and none in its 4-bit ones: the gradient's RMS
differs by an order of magnitude between layers and falls as training
converges. The default lr_a = 3e-4 comes from the same experiment (W4A4,
Adam 1e-3 for the levels): lr_a = 0, 3e-4, 1e-3 and 3e-3 gave 99.44, 99.44,
99.17 and 96.94% test accuracy with learned levels; 99.72, 99.44 and 98.61%
(lr_a = 0, 3e-4, 1e-3) with the uniform grid, on 360 test images (one
image is 0.28 points; float 99.72%). On that small problem the direct
assignment updates did not beat training the levels alone, and a large lr_a
hurts.

How this runs inside `model.fit` with any standard Keras optimizer: the
`assignment`, `accumulated_update` and `assignment_moves` variables are
created with Keras' `overwrite_with_gradient=True` (the mechanism Keras' own
float8 layers use for state computed in the backward pass). The custom
gradient returns their *next values* in place of gradients, and
`optimizer.apply` assigns those values directly, with no learning rate,
momentum, clipping or weight decay, and keeps no optimizer slots for them.
They are therefore listed in `trainable_weights` (Keras only passes trainable
variables to the optimizer) although no optimizer ever trains them. So the
discrete assignments change only at an optimizer step, only when an
accumulated update crosses a midpoint; the levels are trained by the
optimizer (Adam, SGD, ...) and kept sorted by the constraint. Under a
`tf.distribute` strategy the update uses the gradient summed over replicas, so
every replica makes the same moves (tested: MirroredStrategy over two CPU
devices makes the same moves as one device). Not supported: loss scaling (float16
mixed precision, which would scale G_y), `gradient_accumulation_steps`
(Keras keeps the maximum of overwrite values) and calling one quantizer more
than once per step.

Initialization (`initialize(kernel)`, tfquant's choice): the levels of each
group start at the K quantiles (k + 1/2) / K of its float weights, refined by
20 iterations of 1-D k-means (Lloyd); the uniform step by a grid search for
the least squared error; each weight is assigned to its nearest level. A
quantizer used before `initialize` initializes itself on its first call from
the kernel it is given (quantiles only, no k-means; not under a multi-replica
strategy, where `initialize` must be called first, as `quantize_model` does).

Inference (`inference_form`): uniform levels are integers in
[-(2^(b-1)-1), 2^(b-1)-1] times s, exact in INT4/INT8. Learned levels are
returned as `levels` (shape (K,) per layer, (C, K) per channel with `axis` -1)
with `scale` = max|L| / 127 per group and codes in [-127, 127]: the exporter
maps each level to its nearest int8 code and reports the mapping error.

Activations: `ChannelAwareActivationQuantizer`
----------------------------------------------
Uniform unsigned levels with one learned step s per layer (TFLite has one
scale per activation tensor): y = s * round(clip(x / s, 0, 2^b - 1)), the fused
FakeQuant forward and the LSQ straight-through step gradient (see
`uniform.lsq_quantize`). The channel-aware objective is

    E(s) = mean over channels c of  mean((Q_s(x) - x)^2 over c) / (var_c + eps)

on x = relu(input), the channel axis last, eps = 1e-3 * mean_c(var_c) + 1e-12
(so a constant channel cannot dominate). `initialize(values)` sets s by a
search minimizing E on the calibration batch; during training
`channel_loss_weight * E(s)` (gradient to s only) is added with `add_loss` on
top of the task-loss gradient.

Registry: one name, "dq", covers both roles: a scheme names one method for
weights and activations, and the registry maps a name to one class. The
dispatch sits in `DirectQuantizer.__new__`: constructing it with
`signed=False` (the activation role) returns a
`ChannelAwareActivationQuantizer`. Each class holds only its own role's
variables and options.

>>> q = DirectQuantizer(bits=2)
>>> q.initialize(np.array([[-1.0, -0.9], [0.1, 0.2], [0.95, 2.0]], np.float32))
>>> np.unique(q(tf.zeros((3, 2))).numpy()).size <= 4
True
>>> type(DirectQuantizer(bits=4, signed=False)).__name__
'ChannelAwareActivationQuantizer'
"""

from __future__ import annotations

import inspect

import keras
import numpy as np
import tensorflow as tf

from tfquant.quantizers.base import (
    InferenceForm,
    Quantizer,
    as_tensor,
    check_bits,
    check_finite_array,
    register,
)
from tfquant.quantizers.constraints import AtLeast
from tfquant.quantizers.uniform import lsq_quantize

LEVEL_MODES = ("learned", "uniform")
_KMEANS_ITERATIONS = 20
_STEP_CANDIDATES = 64

# ---------------------------------------------------------------------------
# Pure functions: weights


def direct_quantize(
    kernel, levels, assignment, accumulated_update, moves, learning_rate, normalize=True
):
    """DQ's weight quantizer as a pure function (see the module docstring).

    Args:
      kernel: the float kernel; only its shape matters (zero gradient).
      levels: (G, K) levels, sorted along the last axis; G = 1 or
        kernel.shape[-1].
      assignment: level index of each weight (kernel's shape, whole numbers).
      accumulated_update: pending update of each weight (kernel's shape).
      moves: scalar count of level changes so far.
      learning_rate: lr_a of the accumulated update (a Python float).
      normalize: divide dLoss/dy by its root mean square over the kernel
        before the update (see the module docstring).

    Returns:
      y = levels[g, assignment]. The gradient function returns, in order: a
      zero gradient for `kernel`, dLoss/dlevels (per-level sums), and the *next
      values* of `assignment`, `accumulated_update` and `moves` (the Keras
      `overwrite_with_gradient` convention).
    """

    @tf.custom_gradient
    def forward(kernel, levels, assignment, accumulated_update, moves):
        groups, count = levels.shape[0], levels.shape[1]
        index = tf.cast(assignment, tf.int32)
        flat_index = index + _group_offsets(index, groups, count)
        flat_levels = tf.reshape(levels, [-1])
        y = tf.gather(flat_levels, flat_index)

        def grad(upstream):
            grad_levels = tf.reshape(
                tf.math.unsorted_segment_sum(upstream, flat_index, groups * count),
                (groups, count),
            )
            total = _sum_over_replicas(upstream)
            has_up = index < count - 1
            has_down = index > 0
            above = tf.gather(flat_levels, tf.where(has_up, flat_index + 1, flat_index))
            below = tf.gather(flat_levels, tf.where(has_down, flat_index - 1, flat_index))
            half_up = tf.where(has_up, 0.5 * (above - y), 0.0)
            half_down = tf.where(has_down, 0.5 * (y - below), 0.0)
            if normalize:
                rms = tf.sqrt(tf.reduce_mean(tf.square(total)))
                total = tf.math.divide_no_nan(total, rms)
            update = accumulated_update - learning_rate * total
            move_up = tf.logical_and(has_up, update > half_up)
            move_down = tf.logical_and(has_down, update < -half_down)
            moved = tf.logical_or(move_up, move_down)
            step = tf.cast(move_up, tf.int32) - tf.cast(move_down, tf.int32)
            next_assignment = tf.cast(index + step, assignment.dtype)
            next_update = tf.where(
                moved, tf.zeros_like(update), tf.clip_by_value(update, -half_down, half_up)
            )
            next_moves = moves + tf.reduce_sum(tf.cast(moved, moves.dtype))
            return tf.zeros_like(kernel), grad_levels, next_assignment, next_update, next_moves

        return y, grad

    return forward(kernel, levels, assignment, accumulated_update, moves)


def _group_offsets(index, groups: int, count: int):
    """Offset of each weight's group in the flattened (G * K) level vector."""
    if groups == 1:
        return tf.zeros_like(index)
    return tf.range(groups, dtype=index.dtype) * count  # broadcasts along the last axis


def _sum_over_replicas(value):
    context = tf.distribute.get_replica_context()
    if context is not None and context.num_replicas_in_sync > 1:
        return context.all_reduce(tf.distribute.ReduceOp.SUM, value)
    return value


def _by_group(kernel, groups: int):
    """(G, N) view of a kernel: row g holds the weights of channel g."""
    if groups == 1:
        return tf.reshape(kernel, (1, -1))
    return tf.transpose(tf.reshape(kernel, (-1, groups)))


def _from_groups(values, kernel_shape, groups: int):
    if groups == 1:
        return tf.reshape(values, kernel_shape)
    return tf.reshape(tf.transpose(values), kernel_shape)


def nearest_level(values, levels):
    """Index of the nearest level for each row of `values` (G, N), with
    `levels` (G, K) sorted: a search among the midpoints."""
    midpoints = 0.5 * (levels[:, 1:] + levels[:, :-1])
    return tf.searchsorted(midpoints, values, side="left")


def fit_levels(values, count: int, iterations: int = _KMEANS_ITERATIONS):
    """K sorted levels per row of `values` (G, N): the quantiles (k + 1/2) / K,
    then `iterations` steps of 1-D k-means (a level with no weights stays)."""
    values = tf.convert_to_tensor(values, tf.float32)
    groups = values.shape[0]
    ordered = tf.sort(values, axis=1)
    size = tf.shape(values)[1]
    positions = tf.cast(
        (tf.range(count, dtype=tf.float32) + 0.5) / count * tf.cast(size, tf.float32), tf.int32
    )
    levels = tf.gather(ordered, tf.minimum(positions, size - 1), axis=1)
    offsets = tf.range(groups)[:, None] * count
    for _ in range(iterations):
        segments = nearest_level(values, levels) + offsets
        sums = tf.math.unsorted_segment_sum(values, segments, groups * count)
        counts = tf.math.unsorted_segment_sum(tf.ones_like(values), segments, groups * count)
        means = tf.reshape(sums / tf.maximum(counts, 1.0), (groups, count))
        levels = tf.where(tf.reshape(counts, (groups, count)) > 0, means, levels)
    return tf.sort(levels, axis=1)


def fit_uniform_step(values, q: int):
    """Per row of `values` (G, N), the step s minimizing the squared error of
    s * clip(round(w / s), -q, q): a search over clips from 20% to 100% of
    max|w|."""
    values = tf.convert_to_tensor(values, tf.float32)
    top = tf.maximum(tf.reduce_max(tf.abs(values), axis=1), 1e-8)  # (G,)
    fractions = tf.linspace(0.2, 1.0, _STEP_CANDIDATES)
    steps = fractions[:, None] * top[None, :] / q  # (S, G)
    scaled = values[None] / steps[:, :, None]
    quantized = tf.clip_by_value(tf.round(scaled), -q, q) * steps[:, :, None]
    errors = tf.reduce_mean(tf.square(quantized - values[None]), axis=2)  # (S, G)
    best = tf.argmin(errors, axis=0)
    return tf.gather(tf.transpose(steps), best, batch_dims=1)


def uniform_codes(q: int):
    return tf.range(-q, q + 1, dtype=tf.float32)


# ---------------------------------------------------------------------------
# Pure functions: activations


def channel_normalized_error(x, step, bits: int):
    """E(s): the mean over channels (last axis) of each channel's squared
    quantization error divided by its variance (+ eps, see the module
    docstring). `x` must be non-negative; the gradient flows to `step`
    (straight-through, as LSQ) and to `x`."""
    q_positive = 2**bits - 1
    quantized = lsq_quantize(x, step, 0, q_positive, 1.0)
    axes = list(range(len(x.shape) - 1))
    error = tf.reduce_mean(tf.square(quantized - x), axis=axes)
    variance = tf.math.reduce_variance(x, axis=axes)
    eps = 1e-3 * tf.reduce_mean(variance) + 1e-12
    return tf.reduce_mean(error / (variance + eps))


def channel_normalized_error_numpy(values, steps, bits: int) -> np.ndarray:
    """E(s) for each step in `steps`, on non-negative `values` of shape (N, C)."""
    values = np.asarray(values, np.float64)
    variance = values.var(axis=0)
    eps = 1e-3 * variance.mean() + 1e-12
    out = np.empty(len(steps))
    for i, step in enumerate(steps):
        quantized = np.clip(np.floor(values / step + 0.5), 0, 2**bits - 1) * step
        error = np.mean((quantized - values) ** 2, axis=0)
        out[i] = np.mean(error / (variance + eps))
    return out


def channel_aware_step(values, bits: int, max_rows: int = 8192) -> float:
    """The step minimizing `channel_normalized_error_numpy` on `values`
    (channels last; negative values are clipped to 0, as after a ReLU).

    A log-spaced search over steps from max / (1000 (2^b - 1)) to
    max / (2^b - 1), then a linear one between the best candidate's
    neighbours, on at most `max_rows` evenly spaced rows.
    """
    values = np.maximum(np.asarray(values, np.float64), 0.0)
    values = values.reshape(-1, values.shape[-1]) if values.ndim > 1 else values.reshape(-1, 1)
    if len(values) > max_rows:
        values = values[np.linspace(0, len(values) - 1, max_rows).astype(np.int64)]
    top = float(values.max())
    if top <= 0.0:
        return 1e-3
    q_positive = 2**bits - 1
    coarse = top / q_positive * np.geomspace(1e-3, 1.0, 48)
    errors = channel_normalized_error_numpy(values, coarse, bits)
    best = int(np.argmin(errors))
    low, high = coarse[max(best - 1, 0)], coarse[min(best + 1, len(coarse) - 1)]
    fine = np.linspace(low, high, 33)
    fine_errors = channel_normalized_error_numpy(values, fine, bits)
    if fine_errors.min() < errors[best]:
        return float(fine[int(np.argmin(fine_errors))])
    return float(coarse[best])


# ---------------------------------------------------------------------------
# Keras classes


@keras.saving.register_keras_serializable(package="tfquant")
class SortedLevels(keras.constraints.Constraint):
    """Sorts each row of a level matrix (last axis) after an optimizer step.

    Two levels that cross swap places; the weights keep their index, so they
    stay attached to the lower or upper level, whose values were equal at the
    crossing.
    """

    def __call__(self, levels):
        return tf.sort(levels, axis=-1)

    def get_config(self):
        return {}


def _check_non_negative(value, name: str, method: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number >= 0 for {method}, got {value!r}")
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0 for {method}, got {value}")
    return float(value)


@register("dq")
class DirectQuantizer(Quantizer):
    """DQ weight quantizer: learned levels, directly trained assignments.

    See the module docstring for the formulas, the training mechanics and
    what was reconstructed. Constructed with `signed=False` it returns a
    `ChannelAwareActivationQuantizer` (the activation role of "dq").

    Args:
      bits: 2..8.
      signed: True (weights). False selects the activation quantizer.
      for_weights: must be True for this class (a kernel quantizer).
      per_channel: one level vector per channel of the kernel's last axis
        (the output channels of Conv2D and Dense; the depth multiplier of a
        DepthwiseConv2D kernel (H, W, C, M)) instead of one per layer.
      levels: "learned" (2^b free levels, default) or "uniform" (2^b - 1
        levels s * k, exact integer export).
      assignment_learning_rate: lr_a of the accumulated update (>= 0; 0
        freezes the assignments). With normalization, the step a weight with
        an average gradient makes per optimizer step, in the weights' units.
      normalize_assignment_update: divide dLoss/dy by its root mean square
        over the kernel (default); False gives the plain step lr_a * dLoss/dy.

    >>> q = DirectQuantizer(bits=3, levels="uniform")
    >>> q.initialize(np.linspace(-1.0, 1.0, 12, dtype=np.float32).reshape(3, 4))
    >>> form = q.inference_form()
    >>> (form.code_min, form.code_max, form.is_uniform)
    (-3, 3, True)
    """

    def __new__(cls, *args, **kwargs):
        if cls is DirectQuantizer:
            bound = inspect.signature(DirectQuantizer.__init__).bind_partial(None, *args, **kwargs)
            arguments = dict(bound.arguments)
            arguments.pop("self", None)
            arguments.update(arguments.pop("kwargs", {}))
            if not arguments.get("signed", True):
                return ChannelAwareActivationQuantizer.from_role_arguments(arguments)
        return super().__new__(cls, *args, **kwargs)

    def __init__(
        self,
        bits=4,
        signed=True,
        for_weights=True,
        per_channel=False,
        levels="learned",
        assignment_learning_rate=3e-4,
        normalize_assignment_update=True,
        **kwargs,
    ):
        super().__init__(bits=check_bits(bits, "DQ"), signed=signed, **kwargs)
        if not for_weights:
            raise ValueError(
                "DQ's signed quantizer quantizes kernels (for_weights=True), got "
                "for_weights=False; DQ's activation quantizer is unsigned (signed=False), and "
                "a signed activation tensor needs 'minmax' or 'lsq'"
            )
        if levels not in LEVEL_MODES:
            raise ValueError(f"levels must be one of {LEVEL_MODES} for DQ, got {levels!r}")
        self.for_weights = True
        self.per_channel = bool(per_channel)
        self.levels_mode = levels
        self.assignment_learning_rate = _check_non_negative(
            assignment_learning_rate, "assignment_learning_rate", "DQ"
        )
        self.normalize_assignment_update = bool(normalize_assignment_update)

    @property
    def uniform(self) -> bool:
        return self.levels_mode == "uniform"

    @property
    def q_positive(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def level_count(self) -> int:
        return 2 * self.q_positive + 1 if self.uniform else 2**self.bits

    def build(self, input_shape):
        shape = tuple(input_shape)
        if not shape or any(d is None for d in shape):
            raise ValueError(
                f"DQ's weight quantizer needs a fully defined kernel shape, got {shape}"
            )
        self.groups = int(shape[-1]) if self.per_channel else 1
        if self.uniform:
            self.log_step = self._param(
                "log_step", shape=(self.groups,), initializer="zeros", aggregation="mean"
            )
        else:
            self.levels = self._param(
                "levels",
                shape=(self.groups, self.level_count),
                initializer=tf.constant_initializer(
                    np.tile(np.linspace(-1.0, 1.0, self.level_count, dtype=np.float32), self.groups)
                ),
                constraint=SortedLevels(),
                aggregation="mean",
            )
        state = dict(trainable=True, overwrite_with_gradient=True, aggregation="mean")
        self.assignment = self._param("assignment", shape=shape, **state)
        self.accumulated_update = self._param("accumulated_update", shape=shape, **state)
        self.assignment_moves = self._param("assignment_moves", **state)
        self.initialized = self._param("initialized", trainable=False, aggregation="mean")
        super().build(input_shape)

    def step(self):
        """The uniform grid's step per group, exp(log_step), as a tensor."""
        return tf.exp(as_tensor(self.log_step))

    def level_matrix(self):
        """The (G, K) levels as a tensor (differentiable in the step)."""
        if self.uniform:
            return self.step()[:, None] * uniform_codes(self.q_positive)[None, :]
        return as_tensor(self.levels)

    def call(self, inputs, training=None):
        self._initialize_if_needed(inputs)
        return direct_quantize(
            inputs,
            self.level_matrix(),
            as_tensor(self.assignment),
            as_tensor(self.accumulated_update),
            as_tensor(self.assignment_moves),
            self.assignment_learning_rate,
            self.normalize_assignment_update,
        )

    # -- initialization
    def _initial_state(self, kernel, iterations):
        values = _by_group(tf.cast(kernel, tf.float32), self.groups)
        if self.uniform:
            step = fit_uniform_step(values, self.q_positive)
            index = tf.clip_by_value(
                tf.round(values / step[:, None]), -self.q_positive, self.q_positive
            )
            index = tf.cast(index, tf.int32) + self.q_positive
            return step, _from_groups(index, kernel.shape, self.groups)
        levels = fit_levels(values, self.level_count, iterations)
        index = nearest_level(values, levels)
        return levels, _from_groups(index, kernel.shape, self.groups)

    def _assign_state(self, parameters, index):
        if self.uniform:
            self.log_step.assign(tf.math.log(parameters))
        else:
            self.levels.assign(parameters)
        self.assignment.assign(tf.cast(index, tf.float32))
        self.accumulated_update.assign(tf.zeros_like(self.accumulated_update))
        self.assignment_moves.assign(0.0)
        self.initialized.assign(1.0)

    def _initialize_if_needed(self, kernel):
        # Decided when the call runs eagerly or is traced: a graph traced after
        # `initialize` carries no initialization branch.
        with tf.init_scope():
            if float(self.initialized.numpy()) > 0.0:
                return
        if tf.executing_eagerly():
            self._assign_state(*self._initial_state(kernel, iterations=0))
            return
        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            return  # initialize() must have run (see the module docstring)

        def initialize():
            self._assign_state(*self._initial_state(kernel, iterations=0))
            return tf.constant(True)

        tf.cond(self.initialized > 0.0, lambda: tf.constant(False), initialize)

    def initialize(self, values):
        """Levels from quantiles + k-means of the float weights (or the
        least-squares uniform step), each weight at its nearest level."""
        values = check_finite_array(values, "DQ weights")
        if not self.built:
            self.build(values.shape)
        if tuple(values.shape) != tuple(self.assignment.shape):
            raise ValueError(
                f"DQ was built for a kernel of shape {tuple(self.assignment.shape)}, "
                f"got values of shape {values.shape}"
            )
        self._assign_state(*self._initial_state(tf.constant(values), _KMEANS_ITERATIONS))

    # -- inference
    def sorted_levels(self) -> np.ndarray:
        """The (G, K) levels as NumPy, sorted along the last axis."""
        return np.sort(np.asarray(self.level_matrix().numpy(), np.float32), axis=-1)

    def inference_form(self, weights=None):
        axis = -1 if self.groups > 1 else None
        if self.uniform:
            step = np.asarray(self.step().numpy(), np.float32)
            return InferenceForm(
                bits=self.bits,
                signed=True,
                scale=step if axis is not None else np.float32(step[0]),
                code_min=-self.q_positive,
                code_max=self.q_positive,
                axis=axis,
            )
        levels = self.sorted_levels()
        scale = np.maximum(np.abs(levels).max(axis=-1), 1e-12) / 127.0
        return InferenceForm(
            bits=self.bits,
            signed=True,
            scale=scale.astype(np.float32) if axis is not None else np.float32(scale[0]),
            code_min=-127,
            code_max=127,
            axis=axis,
            levels=levels if axis is not None else levels[0],
        )

    def parameters(self):
        levels = self.sorted_levels()
        used = np.unique(np.asarray(self.assignment.numpy()).astype(np.int64)).size
        out = {
            "level_min": float(levels.min()),
            "level_max": float(levels.max()),
            "assignment_moves": float(self.assignment_moves.numpy()),
            "level_indices_in_use": float(used),
        }
        if self.uniform:
            out["step_mean"] = float(np.mean(self.step().numpy()))
        return out

    def get_config(self):
        config = super().get_config()
        config.update(
            for_weights=self.for_weights,
            per_channel=self.per_channel,
            levels=self.levels_mode,
            assignment_learning_rate=self.assignment_learning_rate,
            normalize_assignment_update=self.normalize_assignment_update,
        )
        return config


_WEIGHT_ONLY_OPTIONS = (
    "per_channel",
    "levels",
    "assignment_learning_rate",
    "normalize_assignment_update",
)


@keras.saving.register_keras_serializable(package="tfquant")
class ChannelAwareActivationQuantizer(Quantizer):
    """DQ activation quantizer: one learned step per layer, fit to the mean
    normalized error of the channels (see the module docstring).

    Registered under "dq" through `DirectQuantizer` (signed=False).

    Args:
      bits: 2..8.
      signed: must be False (unsigned codes after a ReLU).
      channel_loss_weight: weight of the channel-aware objective added to the
        loss during training (>= 0; 0 leaves only the task-loss gradient).
      initial_step: step before `initialize`.

    >>> x = np.abs(np.random.default_rng(0).normal(size=(256, 8))).astype(np.float32)
    >>> x[:, 0] *= 20.0  # one high-variance channel
    >>> q = ChannelAwareActivationQuantizer(bits=4)
    >>> q.initialize(x)
    >>> bool(q.step.numpy() * 15 < x[:, 0].max() / 4)  # the grid does not stretch to channel 0
    True
    """

    registered_name = "dq"

    def __init__(self, bits=4, signed=False, channel_loss_weight=1e-3, initial_step=0.1, **kwargs):
        if signed:
            raise ValueError(
                "DQ's channel-aware activation quantizer is unsigned (signed=False), got "
                "signed=True"
            )
        super().__init__(bits=check_bits(bits, "DQ"), signed=False, **kwargs)
        self.channel_loss_weight = _check_non_negative(
            channel_loss_weight, "channel_loss_weight", "DQ"
        )
        if not np.isfinite(initial_step) or initial_step <= 0:
            raise ValueError(f"initial_step must be a finite number > 0 for DQ, got {initial_step}")
        self.initial_step = float(initial_step)
        self.clips_negative = True

    @classmethod
    def from_role_arguments(cls, arguments: dict) -> ChannelAwareActivationQuantizer:
        """Builds the activation quantizer from arguments given to
        `DirectQuantizer` with signed=False; weight-only options are errors."""
        arguments = dict(arguments)
        if arguments.pop("for_weights", False):
            raise ValueError(
                "a DQ weight quantizer (for_weights=True) must be signed, got signed=False"
            )
        wrong = [name for name in _WEIGHT_ONLY_OPTIONS if name in arguments]
        if wrong:
            raise ValueError(
                f"option(s) {wrong} apply to DQ's weight quantizer only (signed=True), "
                "not to its activation quantizer (signed=False)"
            )
        return cls(**arguments)

    @property
    def q_positive(self) -> int:
        return 2**self.bits - 1

    def build(self, input_shape):
        self.step = self._param(
            "step", initializer=tf.constant_initializer(self.initial_step), constraint=AtLeast(1e-8)
        )
        per_example = [d for d in tuple(input_shape)[1:] if d is not None]
        self._grad_scale = 1.0 / float(np.sqrt(max(int(np.prod(per_example)), 1) * self.q_positive))
        super().build(input_shape)

    def call(self, inputs, training=None):
        step = tf.maximum(as_tensor(self.step), 1e-8)
        outputs = lsq_quantize(inputs, step, 0, self.q_positive, self._grad_scale)
        if training and self.channel_loss_weight > 0:
            positive = tf.nn.relu(tf.stop_gradient(inputs))
            self.add_loss(
                self.channel_loss_weight * channel_normalized_error(positive, step, self.bits)
            )
        return outputs

    def initialize(self, values):
        values = check_finite_array(values, "DQ calibration values")
        if not self.built:
            self.build(values.shape)
        self.step.assign(channel_aware_step(values, self.bits))

    def inference_form(self, weights=None):
        return InferenceForm(
            bits=self.bits,
            signed=False,
            scale=np.float32(max(float(self.step.numpy()), 1e-8)),  # as call() clamps it
            code_min=0,
            code_max=self.q_positive,
        )

    def get_config(self):
        config = super().get_config()
        config.update(channel_loss_weight=self.channel_loss_weight, initial_step=self.initial_step)
        return config
