"""The Quantizer base class, the registry and the inference-form contract.

A quantizer is a Keras layer: its learnable parameters are Keras variables
created in `build`, so they are checkpointed, saved in `.keras` files and
mirrored under `tf.distribute`. The math lives in plain functions (most of
them `tf.custom_gradient`) that take those variables as tensors, so it can be
tested without Keras.

Every quantizer describes the integer form it takes at inference through
`inference_form()`; the exporter reads only that, never the class.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any

import keras
import numpy as np
import tensorflow as tf

_REGISTRY: dict[str, type[Quantizer]] = {}


def register(name: str):
    """Class decorator: makes a quantizer resolvable by `get(name)` and
    serializable as `tfquant>ClassName`."""

    def decorator(cls):
        if name in _REGISTRY:
            raise ValueError(f"a quantizer named {name!r} is already registered")
        cls.registered_name = name
        _REGISTRY[name] = cls
        return keras.saving.register_keras_serializable(package="tfquant")(cls)

    return decorator


def registered_names() -> list[str]:
    """The names `get` accepts, sorted."""
    return sorted(_REGISTRY)


@dataclasses.dataclass(frozen=True)
class InferenceForm:
    """How a quantizer's output is represented in integers at inference.

    The real value of integer code k is `scale * (k - zero_point)`, with k in
    `[code_min, code_max]`. The quantizer subtracts `offset` from its input
    before quantizing (QIL's pruning threshold c - d; 0 for most). When the
    learned values are not uniform, `levels` holds them (real values, sorted)
    and the exporter maps each to the nearest code.

    Attributes:
      bits: the bit width of the codes (2..8).
      signed: whether codes are symmetric around 0 (weights) or unsigned.
      scale: step size, a scalar or one value per channel along `axis`.
      zero_point: the code of real 0 (0 for symmetric and unsigned forms).
      code_min: smallest code used.
      code_max: largest code used.
      offset: real value subtracted from the input before quantization.
      axis: channel axis of a per-channel scale, or None.
      levels: explicit real levels of a non-uniform quantizer, or None.
    """

    bits: int
    signed: bool
    scale: np.ndarray
    zero_point: int = 0
    code_min: int = 0
    code_max: int = 0
    offset: float = 0.0
    axis: int | None = None
    levels: np.ndarray | None = None

    @property
    def is_uniform(self) -> bool:
        return self.levels is None

    def codes(self, values: np.ndarray) -> np.ndarray:
        """Integer codes of already-quantized real values."""
        scale = np.asarray(self.scale, dtype=np.float64)
        if self.axis is not None and scale.ndim == 1:
            shape = [1] * np.ndim(values)
            shape[self.axis] = -1
            scale = scale.reshape(shape)
        codes = np.round(np.asarray(values, np.float64) / scale) + self.zero_point
        return np.clip(codes, self.code_min, self.code_max).astype(np.int32)


def check_bits(bits: Any, method: str, low: int = 2, high: int = 8) -> int:
    """Validates a bit width; the error names the value and the range."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise ValueError(f"bits must be an integer in {low}..{high} for {method}, got {bits!r}")
    if not low <= bits <= high:
        raise ValueError(f"bits must be in {low}..{high} for {method}, got {bits}")
    return int(bits)


def check_positive(value: Any, name: str, method: str) -> float:
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0 for {method}, got {value!r}")
    return float(value)


def check_finite_array(values: np.ndarray, what: str) -> np.ndarray:
    values = np.asarray(values, dtype=np.float32)
    if values.size == 0:
        raise ValueError(f"cannot initialize a quantizer from an empty array of {what}")
    bad = ~np.isfinite(values)
    if bad.any():
        raise ValueError(
            f"{what} contain {int(bad.sum())} non-finite value(s) (NaN or inf), "
            f"e.g. {values[bad].flat[0]}; cannot initialize the quantizer"
        )
    return values


class Quantizer(keras.layers.Layer):
    """Base class: a Keras layer mapping a tensor to its quantized version.

    Subclasses implement `build`, `call(inputs, training=None)`,
    `initialize(values)` (set parameters from float weights or from a
    calibration batch of activations), `inference_form(weights=None)` and
    `get_config`, and register a name with `register` so that schemes and
    saved models find them. docs/QUANTIZERS.md has a worked example.

    Attributes:
      bits: bit width.
      signed: True for a symmetric signed grid (weights, zero-centered
        inputs), False for an unsigned grid (activations after ReLU).
      clips_negative: True when the quantizer maps every negative input to 0,
        so a ReLU before it is redundant and may be skipped.
    """

    registered_name = "base"
    clips_negative = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "call" in cls.__dict__:
            cls.call = _in_float32(cls.__dict__["call"])

    def __init__(self, bits: int = 8, signed: bool = False, **kwargs):
        # Quantizer math runs in float32 even under a mixed-precision policy:
        # by default the quantizer's own policy is float32 (Keras casts the
        # input up and the next layer casts the output down); given a mixed
        # policy, `call` computes in float32 on float32 variables and returns
        # the policy's compute dtype.
        kwargs.setdefault("dtype", "float32")
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        self.bits = int(bits)
        self.signed = bool(signed)

    def __call__(self, inputs, *args, **kwargs):
        # A kernel variable goes into tf.custom_gradient functions as a tensor:
        # its gradient is then an output of the function, which is also what
        # tf.distribute needs.
        if isinstance(inputs, (tf.Variable, keras.Variable)):
            inputs = tf.convert_to_tensor(inputs)
        return super().__call__(inputs, *args, **kwargs)

    def add_weight(self, *args, **kwargs):
        # Tagged, so that tfquant.optimizers.QuantizerAwareOptimizer finds the
        # quantizers' parameters among a model's variables.
        variable = super().add_weight(*args, **kwargs)
        variable._tfquant_quantizer_variable = True
        return variable

    # Quantizers hold a handful of scalars; keep their math in float32 even
    # under mixed precision.
    def _param(self, name, shape=(), initializer="zeros", trainable=True, constraint=None, **kw):
        return self.add_weight(
            name=name,
            shape=shape,
            initializer=initializer,
            trainable=trainable,
            constraint=constraint,
            dtype="float32",
            autocast=False,
            **kw,
        )

    def initialize(self, values: np.ndarray) -> None:
        """Sets the parameters from representative values of the input."""
        raise NotImplementedError(f"{type(self).__name__} does not implement initialize")

    def inference_form(self, weights=None) -> InferenceForm:
        """The integer form of the quantizer's output (`InferenceForm`).

        Args:
          weights: the float kernel a weight quantizer quantizes (the
            exporter passes it; a quantizer whose grid depends on the values,
            such as a min/max one, reads it), or None for an activation.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement inference_form")

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(bits=self.bits, signed=self.signed)
        return config

    def parameters(self) -> dict[str, float]:
        """Scalar summaries of the learned parameters, for logs and plots."""
        out = {}
        for var in self.weights:
            value = np.asarray(var.numpy())
            key = var.path.split("/")[-1]
            if value.size == 1:
                out[key] = float(value.reshape(()))
            else:
                out[key + "_mean"] = float(value.mean())
        return out


def _in_float32(call):
    """Wraps a quantizer's `call`: the input is quantized in float32 (a
    16-bit float cannot hold x / step exactly enough to round it as the
    integer file will; a float64 input, such as a NumPy array, meets float32
    variables) and the result returned in the quantizer's compute dtype
    (float16 or bfloat16 under a mixed policy)."""

    @functools.wraps(call)
    def wrapper(self, inputs, *args, **kwargs):
        inputs = tf.convert_to_tensor(inputs)
        if inputs.dtype.is_floating and inputs.dtype != tf.float32:  # float16/bfloat16/64
            inputs = tf.cast(inputs, tf.float32)
        outputs = call(self, inputs, *args, **kwargs)
        if self.compute_dtype != "float32":
            outputs = tf.cast(outputs, self.compute_dtype)
        return outputs

    return wrapper


def serialize(quantizer: Quantizer) -> dict:
    """The config dict `get` accepts: `{"class_name": name, "config": {...}}`."""
    return {"class_name": quantizer.registered_name, "config": quantizer.get_config()}


def get(identifier: Any, **defaults) -> Quantizer | None:
    """Resolves a quantizer from a name, a config dict or an instance.

    Args:
      identifier: None, a registered name (`"qil"`), a dict
        `{"class_name": "qil", "config": {"bits": 3}}` (also accepts Keras'
        own serialized form), or a `Quantizer` instance (returned as is).
      **defaults: config values used where the identifier does not set
        them (layers pass `signed=True` for kernels, for example).

    Returns:
      A new quantizer (or the instance given, or None).

    Raises:
      ValueError: the name is not registered, or the dict is malformed.

    >>> q = get({"class_name": "lsq", "config": {"bits": 3}}, signed=True)
    >>> (q.bits, q.signed)
    (3, True)
    """
    if identifier is None:
        return None
    if isinstance(identifier, Quantizer):
        return identifier
    if isinstance(identifier, str):
        cls = _lookup(identifier)
        return cls(**_accepted(cls, defaults))
    if isinstance(identifier, dict):
        if "class_name" not in identifier:
            raise ValueError(
                f"a quantizer dict needs a 'class_name' key, got keys {sorted(identifier)}"
            )
        name = identifier["class_name"]
        config = dict(identifier.get("config") or {})
        if "module" in identifier or "registered_name" in identifier:
            # keras.saving.serialize_keras_object form: config holds everything.
            name = identifier.get("registered_name") or name
            name = name.split(">")[-1]
            cls = next((c for c in _REGISTRY.values() if c.__name__ == name), None)
            if cls is None:
                cls = _lookup(name)
        else:
            cls = _lookup(name)
        return cls.from_config({**_accepted(cls, defaults), **config})
    raise ValueError(
        f"cannot interpret {identifier!r} (type {type(identifier).__name__}) as a quantizer; "
        f"pass a name in {registered_names()}, a config dict or a Quantizer"
    )


def _accepted(cls, defaults: dict) -> dict:
    """The defaults that `cls.__init__` names (a role hint such as
    `for_weights` only goes to the quantizers that take it)."""
    names = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in defaults.items() if k in names}


def _lookup(name: str) -> type[Quantizer]:
    key = name.lower()
    if key not in _REGISTRY:
        by_class = {cls.__name__.lower(): cls for cls in _REGISTRY.values()}
        if key in by_class:
            return by_class[key]
        raise ValueError(f"unknown quantizer {name!r}; known quantizers: {registered_names()}")
    return _REGISTRY[key]


def as_tensor(variable) -> tf.Tensor:
    """A variable as a tensor, the form a `tf.custom_gradient` function needs
    under `tf.distribute` (its gradient is then returned as an output)."""
    return tf.convert_to_tensor(variable)
