"""QIL, LSQ and CPQ as tensorflow-model-optimization quantizers.

tensorflow-model-optimization (tfmot) quantizes legacy Keras (tf_keras)
models through `QuantizeConfig` objects that pair a layer's weights and
outputs with `Quantizer` objects. This module offers tfquant's learned
quantizers in that form, so a tf_keras model can be trained with learned
intervals or steps and exported with the standard TFLite converter:

    # in a process started with TF_USE_LEGACY_KERAS=1
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot
    from tfquant.compat import tfmot as tq

    annotate = tfmot.quantization.keras.quantize_annotate_layer
    inputs = tf.keras.Input((8, 8, 1))
    x = annotate(
        tf.keras.layers.Conv2D(4, 3, activation="relu"),
        quantize_config=tq.learned_quantize_config("qil", weight_bits=4, activation_bits=4),
    )(inputs)
    x = tf.keras.layers.Flatten()(x)
    outputs = annotate(
        tf.keras.layers.Dense(3),
        quantize_config=tq.learned_quantize_config("qil", weight_bits=4, activation_bits=None),
    )(x)
    with tq.quantize_scope():
        model = tfmot.quantization.keras.quantize_apply(tf.keras.Model(inputs, outputs))

Math. The quantizers call the same `tf.custom_gradient` functions as
tfquant's Keras 3 quantizers (`qil_weight_quantize`, `qil_activation_quantize`,
`lsq_quantize`, `cpq_quantize`); only the variable handling differs. Weight
quantizers are signed (a symmetric narrow grid), activation quantizers are
unsigned and map negative inputs to 0, so put them on non-negative tensors
(the output of a layer with a ReLU, or of a layer followed by one) and leave
logits unquantized (`activation_bits=None`).

Initialization. Weight quantizers set their parameters from the weights the
first time they run in training (until then, inference computes them from
the weights on the fly), so a quantized float model starts from its own
weights:

- QIL: interval [c - d, c + d] = [0, max|w|] (c = d = max|w| / 2; no pruning).
- LSQ: step 2 * mean|w| / sqrt(Qp), the paper's rule.
- CPQ: step max|w| / Q, sigma = sigma_ratio * step.

Activation quantizers start from constants, by default the range [0, 2]:
QIL c = d = 1, LSQ and CPQ step 2 / (2^b - 1) (CPQ sigma = step / 3). All
these parameters are trainable.

Export. In inference (`training=False`, which is what the TFLite converter
traces) the quantizers compute the same values and mark the integer grid
with FakeQuant ops: weights with a `bits`-bit narrow-range FakeQuant at
+-Q * step, activations with an 8-bit FakeQuant whose range holds the
2^b codes exactly (`tfquant.ops.int8_range_for_unsigned_codes`), after a
ReLU. With `tf.lite.Optimize.DEFAULT` the converter then emits integer
kernels where a layer's input and output are quantized (for example a
quantized Conv2D after tfmot's input quantization) and float kernels
elsewhere.

Not offered here: QIL without rescaling, CPQ's learned bit widths (the
hard-concrete gates), and tfquant's own integer exporter (it reads Keras 3
models). Saving: whole-model HDF5 files do not reload (tfmot's wrapper
orders trainable quantizer variables differently when it rebuilds a layer);
use the SavedModel format or `save_weights` / `load_weights` with a
TensorFlow checkpoint.

tfmot works with legacy Keras only: run everything that builds or trains a
tfmot model in a process started with `TF_USE_LEGACY_KERAS=1`. Importing this
module does not import tfmot; the classes are created on first use and raise
ImportError with an install hint when tfmot is missing.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tfquant import ops
from tfquant.quantizers.base import check_bits, check_positive
from tfquant.quantizers.constraints import AtLeast, IntervalConstraint
from tfquant.quantizers.cpq import code_range, cpq_quantize, drop_rates_per_level
from tfquant.quantizers.qil import qil_activation_quantize, qil_weight_quantize
from tfquant.quantizers.uniform import lsq_quantize

INSTALL_HINT = "pip install tfquant[baseline]"

_DEFAULT_ACTIVATION_RANGE = 2.0


def _require_tfmot():
    """Imports tensorflow_model_optimization or raises ImportError with a hint."""
    try:
        import tensorflow_model_optimization as tfmot
    except ImportError as error:
        raise ImportError(
            "tfquant.compat.tfmot needs tensorflow-model-optimization and tf_keras "
            f"(install them with `{INSTALL_HINT}`) and a process started with "
            f"TF_USE_LEGACY_KERAS=1: {error}"
        ) from error
    return tfmot


# ---------------------------------------------------------------------------
# Quantizer behaviour (combined with tfmot's Quantizer base on first use)


class _LearnedQuantizer:
    """Variables and calls shared by the quantizers.

    Subclasses set `method` and `for_weights` and implement `_specs` (the
    variables: name -> (shape, initial value, constraint)), `_quantize`
    (the math, on tensors) and, for weight quantizers,
    `_initial_from_weights` (data-dependent initial values of some of the
    variables).
    """

    method = ""
    for_weights = False

    def __init__(self, bits=4):
        self.bits = check_bits(bits, self.method)

    # -- to implement
    def _specs(self) -> dict:
        raise NotImplementedError

    def _quantize(self, inputs, params, training):
        raise NotImplementedError

    def _initial_from_weights(self, w) -> dict:
        raise NotImplementedError

    def _weight_scale(self, params):
        """Weight quantizers: the real value of code 1."""
        raise NotImplementedError

    def _activation_grid(self, params):
        """Activation quantizers: (offset or None, step) of the unsigned codes."""
        raise NotImplementedError

    # -- tfmot's Quantizer interface
    def build(self, tensor_shape, name, layer):
        """Creates the variables on `layer` (the tfmot QuantizeWrapper).

        Args:
          tensor_shape: shape of the quantized tensor (None for activations).
          name: prefix of the variable names.
          layer: the layer that owns the variables.

        Returns:
          The variables by name, passed back to `__call__` as `weights`.
        """
        # Weight-quantizer variables are written in the replica context (the
        # data-dependent initialization), with identical values on every replica.
        aggregation = (
            tf.VariableAggregation.ONLY_FIRST_REPLICA
            if self.for_weights
            else tf.VariableAggregation.NONE
        )
        variables = {}
        for key, (shape, value, constraint) in self._specs().items():
            variables[key] = layer.add_weight(
                f"{name}_{key}",
                shape=shape,
                initializer=tf.constant_initializer(value),
                trainable=True,
                constraint=constraint,
                dtype=tf.float32,
                aggregation=aggregation,
            )
        if self.for_weights:
            variables["initialized"] = layer.add_weight(
                f"{name}_initialized",
                shape=(),
                initializer=tf.constant_initializer(0.0),
                trainable=False,
                dtype=tf.float32,
                aggregation=aggregation,
            )
        return variables

    # Plain TensorFlow with Python control flow on Python values only: AutoGraph
    # would add nothing but tracing time (the tfmot wrapper's call is converted).
    @tf.autograph.experimental.do_not_convert
    def __call__(self, inputs, training, weights, **kwargs):
        """Quantizes `inputs` with the variables from `build`.

        Args:
          inputs: the tensor to quantize (a weight variable or an activation).
          training: Python bool, whether the graph is training.
          weights: the dictionary returned by `build`.
          **kwargs: unused.

        Returns:
          The quantized tensor.
        """
        # A weight variable enters the custom-gradient functions as a tensor, and
        # the math runs in float32 (as in tfquant) even under mixed precision.
        inputs = tf.convert_to_tensor(inputs)
        dtype = inputs.dtype
        inputs = tf.cast(inputs, tf.float32)
        keys = list(self._specs())
        if not self.for_weights:
            params = {key: tf.convert_to_tensor(weights[key]) for key in keys}
        elif training:
            params = self._initialize_once(inputs, weights, keys)
        else:
            initial = self._initial_from_weights(inputs)
            ready = weights["initialized"] > 0.5
            params = {
                key: tf.where(ready, tf.convert_to_tensor(weights[key]), initial[key])
                if key in initial
                else tf.convert_to_tensor(weights[key])
                for key in keys
            }
        if training:
            return tf.cast(self._quantize(inputs, params, True), dtype)
        return tf.cast(self._inference_form(inputs, params), dtype)

    def _inference_form(self, inputs, params):
        """The inference graph: the same values as the training forward pass,
        written as FakeQuant ops that carry the integer grid to the TFLite
        converter."""
        if self.for_weights:
            outputs = self._quantize(inputs, params, False)
            bound = float(2 ** (self.bits - 1) - 1) * self._weight_scale(params)
            return tf.quantization.fake_quant_with_min_max_vars(
                outputs, -bound, bound, num_bits=self.bits, narrow_range=True
            )
        offset, step = self._activation_grid(params)
        low, high = ops.int8_range_for_unsigned_codes(step, self.bits)
        shifted = inputs if offset is None else inputs - offset
        return tf.quantization.fake_quant_with_min_max_vars(
            tf.nn.relu(shifted), low, high, num_bits=8
        )

    def _initialize_once(self, inputs, weights, keys):
        """Sets the variables from the weights on the first training call;
        returns the current values as tensors."""
        flag = weights["initialized"]

        def assign():
            initial = self._initial_from_weights(tf.stop_gradient(inputs))
            updates = [weights[key].assign(value) for key, value in initial.items()]
            with tf.control_dependencies(updates):
                return tf.identity(flag.assign(1.0))

        done = tf.cond(flag > 0.5, lambda: tf.identity(flag), assign)
        with tf.control_dependencies([done]):
            return {key: tf.convert_to_tensor(weights[key]) for key in keys}

    def get_config(self):
        return {"bits": self.bits}

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __ne__(self, other):
        return not self == other

    __hash__ = object.__hash__


def _default_activation_step(bits: int, initial_step) -> float:
    if initial_step is None:
        return _DEFAULT_ACTIVATION_RANGE / float(2**bits - 1)
    return check_positive(initial_step, "initial_step", "an activation quantizer")


def _lsq_grad_scale(inputs, q_positive: int, per_example: bool):
    """1 / sqrt(N * Qp), N the elements of the tensor (per example for activations)."""
    shape = inputs.shape[1:] if per_example else inputs.shape
    if shape.is_fully_defined():
        count = max(int(np.prod(shape.as_list())), 1)
        return 1.0 / float(np.sqrt(count * q_positive))
    count = tf.size(inputs[0] if per_example else inputs)
    return tf.math.rsqrt(tf.cast(tf.maximum(count, 1) * q_positive, tf.float32))


class _QILWeight(_LearnedQuantizer):
    """QIL weight quantizer (arXiv:1808.05779) for tensorflow-model-optimization.

    Calls `tfquant.quantizers.qil.qil_weight_quantize` (rescaled by c + d).
    The interval `[c, d]` starts at c = d = max|w| / 2 on the first training
    call and is kept valid (d >= 1e-4, c >= d) by `IntervalConstraint`.

    Args:
      bits: 2..8 (2^(b-1) - 1 positive levels).
      learn_gamma: also learn the transformer exponent gamma (starts at 1,
        kept >= 0.1).
    """

    method = "QIL"
    for_weights = True

    def __init__(self, bits=4, learn_gamma=False):
        super().__init__(bits)
        self.learn_gamma = bool(learn_gamma)

    def _specs(self):
        specs = {"interval": ((2,), [1.0, 1.0], IntervalConstraint())}
        if self.learn_gamma:
            specs["gamma"] = ((), 1.0, AtLeast(0.1))
        return specs

    def _initial_from_weights(self, w):
        half = tf.maximum(tf.reduce_max(tf.abs(w)) / 2.0, 1e-4)
        return {"interval": tf.stack([half, half])}

    def _quantize(self, inputs, params, training):
        interval = IntervalConstraint()(params["interval"])
        gamma = params["gamma"] if self.learn_gamma else tf.constant(1.0)
        return qil_weight_quantize(inputs, interval, gamma, self.bits)

    def _weight_scale(self, params):
        interval = IntervalConstraint()(params["interval"])
        return (interval[0] + interval[1]) / float(2 ** (self.bits - 1) - 1)

    def get_config(self):
        return {"bits": self.bits, "learn_gamma": self.learn_gamma}


class _QILActivation(_LearnedQuantizer):
    """QIL activation quantizer (arXiv:1808.05779) for tensorflow-model-optimization.

    Calls `tfquant.quantizers.qil.qil_activation_quantize`: codes 0..2^b - 1
    of x - (c - d) at step 2d / (2^b - 1); negative inputs map to 0.

    Args:
      bits: 2..8.
      initial_center: c at the start (default 1).
      initial_distance: d at the start (default 1: the interval [0, 2]).
    """

    method = "QIL"

    def __init__(self, bits=4, initial_center=1.0, initial_distance=1.0):
        super().__init__(bits)
        self.initial_distance = check_positive(initial_distance, "initial_distance", "QIL")
        if not np.isfinite(initial_center) or initial_center < initial_distance:
            raise ValueError(
                "QIL needs initial_center >= initial_distance (pruning threshold c - d >= 0), "
                f"got center {initial_center} and distance {initial_distance}"
            )
        self.initial_center = float(initial_center)

    def _specs(self):
        value = [self.initial_center, self.initial_distance]
        return {"interval": ((2,), value, IntervalConstraint())}

    def _quantize(self, inputs, params, training):
        interval = IntervalConstraint()(params["interval"])
        return qil_activation_quantize(inputs, interval, self.bits)

    def _activation_grid(self, params):
        center, distance = tf.unstack(IntervalConstraint()(params["interval"]))
        return center - distance, 2.0 * distance / float(2**self.bits - 1)

    def get_config(self):
        return {
            "bits": self.bits,
            "initial_center": self.initial_center,
            "initial_distance": self.initial_distance,
        }


class _LSQ(_LearnedQuantizer):
    """Shared by the LSQ weight and activation quantizers."""

    method = "LSQ"

    @property
    def q_negative(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.for_weights else 0

    @property
    def q_positive(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.for_weights else 2**self.bits - 1

    def _quantize(self, inputs, params, training):
        step = tf.maximum(params["step"], 1e-8)
        grad_scale = _lsq_grad_scale(inputs, self.q_positive, per_example=not self.for_weights)
        return lsq_quantize(inputs, step, self.q_negative, self.q_positive, grad_scale)

    def _weight_scale(self, params):
        return tf.maximum(params["step"], 1e-8)

    def _activation_grid(self, params):
        return None, tf.maximum(params["step"], 1e-8)


class _LSQWeight(_LSQ):
    """LSQ weight quantizer (arXiv:1902.08153) for tensorflow-model-optimization.

    Calls `tfquant.quantizers.uniform.lsq_quantize` on the symmetric narrow
    grid -Qp..Qp, Qp = 2^(b-1) - 1. The step starts at 2 * mean|w| / sqrt(Qp)
    on the first training call; its gradient is scaled by 1 / sqrt(N * Qp).

    Args:
      bits: 2..8.
    """

    for_weights = True

    def _specs(self):
        return {"step": ((), 0.1, AtLeast(1e-8))}

    def _initial_from_weights(self, w):
        step = 2.0 * tf.reduce_mean(tf.abs(w)) / float(np.sqrt(self.q_positive))
        return {"step": tf.maximum(step, 1e-6)}


class _LSQActivation(_LSQ):
    """LSQ activation quantizer (arXiv:1902.08153) for tensorflow-model-optimization.

    Calls `tfquant.quantizers.uniform.lsq_quantize` on codes 0..2^b - 1
    (negative inputs map to 0); the step gradient is scaled by
    1 / sqrt(N * Qp), N the elements per example.

    Args:
      bits: 2..8.
      initial_step: the step at the start; None for 2 / (2^b - 1) (the range [0, 2]).
    """

    def __init__(self, bits=4, initial_step=None):
        super().__init__(bits)
        self.initial_step = None if initial_step is None else float(initial_step)
        self._step = _default_activation_step(self.bits, initial_step)

    def _specs(self):
        return {"step": ((), self._step, AtLeast(1e-8))}

    def get_config(self):
        return {"bits": self.bits, "initial_step": self.initial_step}


class _CPQ(_LearnedQuantizer):
    """Shared by the CPQ weight and activation quantizers."""

    method = "CPQ"

    def __init__(self, bits=4, sigma_ratio=1.0 / 3.0, neighbours=8):
        super().__init__(bits)
        self.sigma_ratio = check_positive(sigma_ratio, "sigma_ratio (initial sigma / step)", "CPQ")
        if neighbours is not None and (isinstance(neighbours, bool) or int(neighbours) < 1):
            raise ValueError(f"neighbours must be None or an integer >= 1, got {neighbours!r}")
        self.neighbours = None if neighbours is None else int(neighbours)

    def _log_specs(self, step: float):
        return {
            "log_step": ((), float(np.log(step)), None),
            "log_sigma": ((), float(np.log(self.sigma_ratio * step)), None),
        }

    def _level_weights(self, training):
        return tf.zeros([0], tf.float32)

    def _quantize(self, inputs, params, training):
        return cpq_quantize(
            inputs,
            tf.exp(params["log_step"]),
            tf.exp(params["log_sigma"]),
            self._level_weights(training),
            self.bits,
            self.for_weights,
            self.neighbours,
        )

    def _weight_scale(self, params):
        return tf.exp(params["log_step"])

    def _activation_grid(self, params):
        return None, tf.exp(params["log_step"])

    def get_config(self):
        return {"bits": self.bits, "sigma_ratio": self.sigma_ratio, "neighbours": self.neighbours}


class _CPQWeight(_CPQ):
    """CPQ weight quantizer with DropBits (arXiv:2109.02100) for tensorflow-model-optimization.

    Calls `tfquant.quantizers.cpq.cpq_quantize` on the signed grid -Q..Q,
    Q = 2^(b-1) - 1: nearest-point forward, multi-class straight-through
    backward to the weights, the step and sigma (stored as logarithms). The
    step starts at max|w| / Q on the first training call, sigma at
    `sigma_ratio` times the step. In training, DropBits drops each bit level
    (l = 1..b-2) with its own rate, one draw per level and step. Learned bit
    widths are not offered in this form.

    Args:
      bits: 2..8.
      sigma_ratio: initial sigma / step.
      drop_rates: DropBits rates, a list of b - 2 rates (finest level first)
        or a scalar p (p / 2^(l-1) at level l); 0 disables DropBits.
      neighbours: kept points per side in the backward sums (None: all).
      seed: operation seed of the DropBits draws.
    """

    for_weights = True

    def __init__(self, bits=4, sigma_ratio=1.0 / 3.0, drop_rates=0.1, neighbours=8, seed=None):
        super().__init__(bits, sigma_ratio, neighbours)
        self.levels = self.bits - 2
        self.drop_rates = (
            float(drop_rates) if np.ndim(drop_rates) == 0 else [float(r) for r in drop_rates]
        )
        rates = np.asarray(self.drop_rates, np.float64).reshape(-1)
        bad = rates[~((rates >= 0) & (rates < 1))]
        if bad.size:
            raise ValueError(f"drop_rates must be in [0, 1) for CPQ, got {float(bad[0])!r}")
        self._rates = drop_rates_per_level(self.drop_rates, self.levels)
        self.seed = seed

    def _specs(self):
        return self._log_specs(0.1)

    def _initial_from_weights(self, w):
        q = float(code_range(self.bits, True)[1])
        step = tf.maximum(tf.reduce_max(tf.abs(w)) / q, 1e-8)
        return {"log_step": tf.math.log(step), "log_sigma": tf.math.log(self.sigma_ratio * step)}

    def _level_weights(self, training):
        if not training or not np.any(self._rates > 0):
            return tf.ones([self.levels], tf.float32)
        draw = tf.random.uniform([self.levels], seed=self.seed)
        return tf.cast(draw >= tf.constant(self._rates), tf.float32)

    def get_config(self):
        config = super().get_config()
        config.update(drop_rates=self.drop_rates, seed=self.seed)
        return config


class _CPQActivation(_CPQ):
    """CPQ activation quantizer (arXiv:2109.02100) for tensorflow-model-optimization.

    Calls `tfquant.quantizers.cpq.cpq_quantize` on codes 0..2^b - 1
    (negative inputs map to 0), with a learned step and sigma.

    Args:
      bits: 2..8.
      initial_step: the step at the start; None for 2 / (2^b - 1) (the range [0, 2]).
      sigma_ratio: initial sigma / step.
      neighbours: kept points per side in the backward sums (None: all).
    """

    def __init__(self, bits=4, initial_step=None, sigma_ratio=1.0 / 3.0, neighbours=8):
        super().__init__(bits, sigma_ratio, neighbours)
        self.initial_step = None if initial_step is None else float(initial_step)
        self._step = _default_activation_step(self.bits, initial_step)

    def _specs(self):
        return self._log_specs(self._step)

    def get_config(self):
        config = super().get_config()
        config.update(initial_step=self.initial_step)
        return config


# ---------------------------------------------------------------------------
# The QuantizeConfig


class _LearnedQuantizeConfigBase:
    """A tfmot QuantizeConfig for Conv2D, DepthwiseConv2D and Dense layers:
    `weight_quantizer` on the kernel, `activation_quantizer` on the layer's
    output (after its activation function). A ReLU activation is replaced by
    the identity when there is an activation quantizer: the quantizer maps
    negative inputs to 0 itself, so the output is the same.

    Args:
      weight_quantizer: a weight quantizer of this module, or None.
      activation_quantizer: an activation quantizer of this module, or None
        (unsigned: use it where the output is non-negative).
      weight_attr: the attribute holding the kernel; None picks
        `depthwise_kernel` when the layer has one, else `kernel`.
    """

    def __init__(self, weight_quantizer=None, activation_quantizer=None, weight_attr=None):
        for role, quantizer, for_weights in (
            ("weight_quantizer", weight_quantizer, True),
            ("activation_quantizer", activation_quantizer, False),
        ):
            if quantizer is None:
                continue
            if not isinstance(quantizer, _LearnedQuantizer):
                raise TypeError(
                    f"{role} must be a quantizer of tfquant.compat.tfmot or None, "
                    f"got {type(quantizer).__name__}"
                )
            if quantizer.for_weights != for_weights:
                raise ValueError(
                    f"{role} got {type(quantizer).__name__}, a quantizer for "
                    f"{'weights' if quantizer.for_weights else 'activations'}"
                )
        self.weight_quantizer = weight_quantizer
        self.activation_quantizer = activation_quantizer
        self.weight_attr = weight_attr

    def _attr(self, layer) -> str:
        if self.weight_attr is not None:
            return self.weight_attr
        return "depthwise_kernel" if hasattr(layer, "depthwise_kernel") else "kernel"

    def get_weights_and_quantizers(self, layer):
        if self.weight_quantizer is None:
            return []
        return [(getattr(layer, self._attr(layer)), self.weight_quantizer)]

    def get_activations_and_quantizers(self, layer):
        return []

    def set_quantize_weights(self, layer, quantize_weights):
        if self.weight_quantizer is not None:
            setattr(layer, self._attr(layer), quantize_weights[0])

    def set_quantize_activations(self, layer, quantize_activations):
        # The activation quantizers map negative inputs to 0, so a ReLU before
        # them changes nothing; dropping it lets the converter fuse the output
        # quantizer's ReLU (and QIL's offset) into the kernel.
        if self.activation_quantizer is not None and _is_plain_relu(layer):
            layer.activation = tf.keras.activations.linear

    def get_output_quantizers(self, layer):
        return [] if self.activation_quantizer is None else [self.activation_quantizer]

    def get_config(self):
        return {
            "weight_quantizer": _serialize(self.weight_quantizer),
            "activation_quantizer": _serialize(self.activation_quantizer),
            "weight_attr": self.weight_attr,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("weight_quantizer", "activation_quantizer"):
            config[key] = _deserialize(config.get(key))
        return cls(**config)


def _is_plain_relu(layer) -> bool:
    return getattr(getattr(layer, "activation", None), "__name__", None) == "relu"


def _serialize(quantizer):
    if quantizer is None:
        return None
    return {"class_name": type(quantizer).__name__, "config": quantizer.get_config()}


def _deserialize(config):
    if config is None:
        return None
    classes = _classes()
    name = config["class_name"]
    if name not in _QUANTIZER_BEHAVIOURS:
        raise ValueError(
            f"unknown quantizer {name!r}; expected one of {sorted(_QUANTIZER_BEHAVIOURS)}"
        )
    return classes[name].from_config(config["config"])


# ---------------------------------------------------------------------------
# Public classes, created on first use


_QUANTIZER_BEHAVIOURS = {
    "QILWeightQuantizer": _QILWeight,
    "QILActivationQuantizer": _QILActivation,
    "LSQWeightQuantizer": _LSQWeight,
    "LSQActivationQuantizer": _LSQActivation,
    "CPQWeightQuantizer": _CPQWeight,
    "CPQActivationQuantizer": _CPQActivation,
}
_METHODS = {
    "qil": ("QILWeightQuantizer", "QILActivationQuantizer"),
    "lsq": ("LSQWeightQuantizer", "LSQActivationQuantizer"),
    "cpq": ("CPQWeightQuantizer", "CPQActivationQuantizer"),
}
_CLASSES: dict[str, type] = {}


def _classes() -> dict[str, type]:
    """The public classes, subclassing tfmot's Quantizer and QuantizeConfig."""
    if not _CLASSES:
        quantization = _require_tfmot().quantization.keras
        created = {}
        for name, behaviour in _QUANTIZER_BEHAVIOURS.items():
            created[name] = type(
                name,
                (behaviour, quantization.quantizers.Quantizer),
                {"__module__": __name__, "__qualname__": name, "__doc__": behaviour.__doc__},
            )
        created["LearnedQuantizeConfig"] = type(
            "LearnedQuantizeConfig",
            (_LearnedQuantizeConfigBase, quantization.QuantizeConfig),
            {
                "__module__": __name__,
                "__qualname__": "LearnedQuantizeConfig",
                "__doc__": _LearnedQuantizeConfigBase.__doc__,
            },
        )
        _CLASSES.update(created)
    return _CLASSES


def __getattr__(name):
    if name in _QUANTIZER_BEHAVIOURS or name == "LearnedQuantizeConfig":
        return _classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def custom_objects() -> dict[str, type]:
    """The classes of this module by name, for tfmot's `quantize_scope`."""
    return dict(_classes())


def quantize_scope(*extra):
    """`tfmot.quantization.keras.quantize_scope` with this module's classes.

    Args:
      *extra: further dictionaries of custom objects.

    Returns:
      The scope, for a `with` statement around `quantize_apply` and loading.
    """
    objects = custom_objects()
    for more in extra:
        objects.update(more)
    return _require_tfmot().quantization.keras.quantize_scope(objects)


def learned_quantize_config(method, weight_bits=4, activation_bits=4, **kwargs):
    """A `LearnedQuantizeConfig` with the weight and activation quantizers of `method`.

    Args:
      method: "qil", "lsq" or "cpq".
      weight_bits: bits of the kernel quantizer, or None for float weights.
      activation_bits: bits of the output quantizer, or None for a float
        output (for example logits, which can be negative).
      **kwargs: passed to `LearnedQuantizeConfig` (e.g. `weight_attr`).

    Returns:
      The config, for `tfmot.quantization.keras.quantize_annotate_layer`.
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {sorted(_METHODS)}, got {method!r}")
    classes = _classes()
    weight_name, activation_name = _METHODS[method]
    return classes["LearnedQuantizeConfig"](
        weight_quantizer=None if weight_bits is None else classes[weight_name](weight_bits),
        activation_quantizer=(
            None if activation_bits is None else classes[activation_name](activation_bits)
        ),
        **kwargs,
    )


__all__ = sorted(
    [
        *_QUANTIZER_BEHAVIOURS,
        "INSTALL_HINT",
        "LearnedQuantizeConfig",
        "custom_objects",
        "learned_quantize_config",
        "quantize_scope",
    ]
)
