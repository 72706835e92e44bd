"""Quantized twins of Keras' Conv2D, DepthwiseConv2D and Dense, and
QuantActivation.

Each Quant layer takes exactly its Keras twin's arguments plus
`kernel_quantizer=` (the weights) and `input_quantizer=` (the input tensor,
used where no QuantActivation already produced it), each a quantizer name,
config dict or `Quantizer`. With both None the layer is its Keras twin.

>>> import keras
>>> from tfquant.layers import QuantConv2D, QuantActivation
>>> model = keras.Sequential([
...     keras.Input((8, 8, 1)),
...     QuantConv2D(8, 3, kernel_quantizer="qil", input_quantizer="minmax"),
...     QuantActivation("relu", quantizer="qil"),
... ])
>>> model.output_shape
(None, 6, 6, 8)
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from tfquant import quantizers
from tfquant.ops import requantize as requantize_ops

_PACKAGE = "tfquant"


class _QuantizedKernelMixin:
    """Holds the two quantizers, builds them and adds them to the config."""

    def _set_quantizers(self, kernel_quantizer, input_quantizer, input_requantization=None):
        self.kernel_quantizer = quantizers.get(kernel_quantizer, signed=True, for_weights=True)
        if self.kernel_quantizer is not None and not self.kernel_quantizer.signed:
            # An unsigned grid would clip every negative weight to 0.
            raise ValueError(
                f"layer {self.name!r}: kernel_quantizer {type(self.kernel_quantizer).__name__} "
                f"({self.kernel_quantizer.name!r}) is unsigned and would set every negative "
                "weight to 0; pass a signed one (signed=True), or a name or config dict, which "
                "the layer makes signed"
            )
        self.input_quantizer = quantizers.get(input_quantizer, signed=False, for_weights=False)
        self.set_input_requantization(input_requantization)

    def set_input_requantization(self, requantization):
        """Makes inference round the input as the integer op that produces it.

        Where the input quantizer's tensor is computed in the file by an
        integer convolution (the depthwise convolution that lowers a global
        or windowed average pooling), this holds that op's rounding rule, as
        `QuantActivation.set_requantization` does for activations; the
        exporter sets it. None rounds in float.
        """
        self.input_requantization = _validated_requantization(requantization)

    def _build_quantizers(self, input_shape):
        if self.kernel_quantizer is not None and not self.kernel_quantizer.built:
            self.kernel_quantizer.build(tuple(self.kernel.shape))
        if self.input_quantizer is not None and not self.input_quantizer.built:
            self.input_quantizer.build(tuple(input_shape))

    def quantized_kernel(self, training=None):
        """The kernel as the forward pass uses it."""
        if self.kernel_quantizer is None:
            return self.kernel
        return self.kernel_quantizer(self.kernel, training=training)

    def _compute_kernel(self, training):
        """The quantized kernel in the layer's compute dtype (bfloat16 or
        float16 under a mixed-precision policy; the quantizer runs in float32)."""
        return ops.cast(self.quantized_kernel(training), self.compute_dtype)

    def _quantize_input(self, inputs, training):
        if self.input_quantizer is None:
            return inputs
        if self.input_requantization is not None and not training:
            inputs = _requantize(inputs, self.input_requantization)
        return ops.cast(self.input_quantizer(inputs, training=training), self.compute_dtype)

    def _add_bias_and_activation(self, outputs, bias_shape):
        if self.use_bias:
            outputs = ops.add(outputs, ops.reshape(self.bias, bias_shape))
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

    def _quantizer_config(self):
        config = {
            "kernel_quantizer": _serialize(self.kernel_quantizer),
            "input_quantizer": _serialize(self.input_quantizer),
        }
        if self.input_requantization is not None:
            config["input_requantization"] = dict(self.input_requantization)
        return config


def _serialize(quantizer):
    return None if quantizer is None else quantizers.serialize(quantizer)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class QuantConv2D(_QuantizedKernelMixin, keras.layers.Conv2D):
    """`keras.layers.Conv2D` with a quantized kernel and optionally a quantized input."""

    def __init__(
        self,
        filters,
        kernel_size,
        strides=(1, 1),
        padding="valid",
        data_format=None,
        dilation_rate=(1, 1),
        groups=1,
        activation=None,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        kernel_quantizer=None,
        input_quantizer=None,
        **kwargs,
    ):
        input_requantization = kwargs.pop("input_requantization", None)
        super().__init__(
            filters=filters,
            kernel_size=kernel_size,
            strides=strides,
            padding=padding,
            data_format=data_format,
            dilation_rate=dilation_rate,
            groups=groups,
            activation=activation,
            use_bias=use_bias,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            bias_regularizer=bias_regularizer,
            activity_regularizer=activity_regularizer,
            kernel_constraint=kernel_constraint,
            bias_constraint=bias_constraint,
            **kwargs,
        )
        self._set_quantizers(kernel_quantizer, input_quantizer, input_requantization)

    def build(self, input_shape):
        super().build(input_shape)
        self._build_quantizers(input_shape)

    def call(self, inputs, training=None):
        inputs = self._quantize_input(inputs, training)
        outputs = self.convolution_op(inputs, self._compute_kernel(training))
        if self.data_format == "channels_last":
            bias_shape = (1,) * (self.rank + 1) + (self.filters,)
        else:
            bias_shape = (1, self.filters) + (1,) * self.rank
        return self._add_bias_and_activation(outputs, bias_shape)

    def get_config(self):
        return {**super().get_config(), **self._quantizer_config()}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class QuantDepthwiseConv2D(_QuantizedKernelMixin, keras.layers.DepthwiseConv2D):
    """`keras.layers.DepthwiseConv2D` with a quantized kernel and optionally a quantized input."""

    def __init__(
        self,
        kernel_size,
        strides=(1, 1),
        padding="valid",
        depth_multiplier=1,
        data_format=None,
        dilation_rate=(1, 1),
        activation=None,
        use_bias=True,
        depthwise_initializer="glorot_uniform",
        bias_initializer="zeros",
        depthwise_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        depthwise_constraint=None,
        bias_constraint=None,
        kernel_quantizer=None,
        input_quantizer=None,
        **kwargs,
    ):
        input_requantization = kwargs.pop("input_requantization", None)
        super().__init__(
            kernel_size=kernel_size,
            strides=strides,
            padding=padding,
            depth_multiplier=depth_multiplier,
            data_format=data_format,
            dilation_rate=dilation_rate,
            activation=activation,
            use_bias=use_bias,
            depthwise_initializer=depthwise_initializer,
            bias_initializer=bias_initializer,
            depthwise_regularizer=depthwise_regularizer,
            bias_regularizer=bias_regularizer,
            activity_regularizer=activity_regularizer,
            depthwise_constraint=depthwise_constraint,
            bias_constraint=bias_constraint,
            **kwargs,
        )
        self._set_quantizers(kernel_quantizer, input_quantizer, input_requantization)

    def build(self, input_shape):
        super().build(input_shape)
        self._build_quantizers(input_shape)

    def call(self, inputs, training=None):
        inputs = self._quantize_input(inputs, training)
        channels = self._get_input_channel(inputs.shape) * self.depth_multiplier
        outputs = ops.depthwise_conv(
            inputs,
            self._compute_kernel(training),
            strides=self.strides,
            padding=self.padding,
            dilation_rate=self.dilation_rate,
            data_format=self.data_format,
        )
        if self.data_format == "channels_last":
            bias_shape = (1,) * (self.rank + 1) + (channels,)
        else:
            bias_shape = (1, channels) + (1,) * self.rank
        return self._add_bias_and_activation(outputs, bias_shape)

    def get_config(self):
        return {**super().get_config(), **self._quantizer_config()}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class QuantDense(_QuantizedKernelMixin, keras.layers.Dense):
    """`keras.layers.Dense` with a quantized kernel and optionally a quantized input."""

    def __init__(
        self,
        units,
        activation=None,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        lora_rank=None,
        lora_alpha=None,
        quantization_config=None,
        kernel_quantizer=None,
        input_quantizer=None,
        **kwargs,
    ):
        input_requantization = kwargs.pop("input_requantization", None)
        if lora_rank is not None or quantization_config is not None:
            raise ValueError(
                "QuantDense does not combine with Keras' own LoRA or quantization modes "
                f"(got lora_rank={lora_rank!r}, quantization_config={quantization_config!r})"
            )
        super().__init__(
            units=units,
            activation=activation,
            use_bias=use_bias,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            bias_regularizer=bias_regularizer,
            activity_regularizer=activity_regularizer,
            kernel_constraint=kernel_constraint,
            bias_constraint=bias_constraint,
            **kwargs,
        )
        self._set_quantizers(kernel_quantizer, input_quantizer, input_requantization)

    def build(self, input_shape):
        super().build(input_shape)
        self._build_quantizers(input_shape)

    def call(self, inputs, training=None):
        inputs = self._quantize_input(inputs, training)
        outputs = ops.matmul(inputs, self._compute_kernel(training))
        return self._add_bias_and_activation(outputs, (self.units,))

    def get_config(self):
        return {**super().get_config(), **self._quantizer_config()}


_SUPPORTED_ACTIVATIONS = ("linear", "relu", "relu6", "softmax", "sigmoid")


def in_compute_dtype(layer, outputs):
    """A quantizer's float32 result in `layer`'s compute dtype: under a mixed
    policy a layer returns float16 or bfloat16, as Keras layers do."""
    if outputs.dtype != layer.compute_dtype:
        outputs = keras.ops.cast(outputs, layer.compute_dtype)
    return outputs


def _validated_requantization(requantization):
    """A `QuantActivation.set_requantization` spec, checked and made plain (JSON);
    None for None or for a spec of the earlier approximate form (`exponents`)."""
    if requantization is None or "exponents" in requantization:
        return None
    try:
        spec = {
            "rounding": str(requantization["rounding"]),
            "accumulator_scale": [float(v) for v in np.ravel(requantization["accumulator_scale"])],
            "output_scale": float(requantization["output_scale"]),
            "offset": float(requantization.get("offset", 0.0)),
        }
        if requantization.get("bias") is not None:
            spec["bias"] = int(requantization["bias"])
        if spec["rounding"] == "float32":
            spec["scale"] = [float(v) for v in np.ravel(requantization["scale"])]
        else:
            spec["multiplier"] = [int(v) for v in np.ravel(requantization["multiplier"])]
            spec["exponent"] = [int(v) for v in np.ravel(requantization["exponent"])]
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(
            "requantization must be a dict with rounding, accumulator_scale, output_scale, "
            f"offset and the rule's constants, got {requantization!r} ({error})"
        ) from None
    numbers = spec["accumulator_scale"] + [spec["output_scale"]] + spec.get("scale", [])
    if (
        spec["rounding"] not in requantize_ops.ROUNDINGS
        or not all(np.isfinite(v) and v > 0 for v in numbers)
        or not np.isfinite(spec["offset"])
    ):
        raise ValueError(f"invalid requantization {requantization!r}")
    return spec


def _validated_logistic(requantization):
    """A sigmoid QuantActivation's spec: {"input_scale": the int8 step of its input}."""
    if requantization is None:
        return None
    try:
        scale = float(requantization["input_scale"])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(
            f"a sigmoid's requantization must be a dict with input_scale, got {requantization!r} "
            f"({error})"
        ) from None
    if not (np.isfinite(scale) and scale > 0):
        raise ValueError(f"invalid requantization {requantization!r}")
    return {"input_scale": scale}


def _requantize(x, spec):
    """`tfquant.ops.requantize.requantize` with a `set_requantization` spec."""
    rule = (
        {"scale": np.asarray(spec["scale"], np.float32)}
        if spec["rounding"] == "float32"
        else {"multiplier": spec["multiplier"], "exponent": spec["exponent"]}
    )
    return requantize_ops.requantize(
        x,
        np.asarray(spec["accumulator_scale"], np.float64),
        spec["rounding"],
        spec["output_scale"],
        spec["offset"],
        spec.get("bias"),
        **rule,
    )


@keras.saving.register_keras_serializable(package=_PACKAGE)
class QuantActivation(keras.layers.Layer):
    """An activation followed by a quantizer.

    When the activation is ReLU and the quantizer already maps every
    negative input to 0 (`quantizer.clips_negative`), the ReLU is skipped:
    same output, one pass over the tensor fewer.

    Args:
      activation: "relu", "relu6", "linear", "softmax" or "sigmoid".
      quantizer: a quantizer name, config dict or `Quantizer` (unsigned
        by default after relu/relu6/softmax/sigmoid, signed after linear).
        After a sigmoid, use `FixedRangeQuantizer()` (TFLite's LOGISTIC
        writes the grid [0, 255/256]).
      requantization: None, or how the integer kernel that produces this
        tensor rounds (see `set_requantization`); the exporter sets it.
    """

    def __init__(self, activation="relu", quantizer="minmax", requantization=None, **kwargs):
        super().__init__(**kwargs)
        name = activation if isinstance(activation, str) else getattr(activation, "__name__", "")
        name = name or "linear"
        if name not in _SUPPORTED_ACTIVATIONS:
            raise ValueError(
                f"QuantActivation supports activations {_SUPPORTED_ACTIVATIONS}, got {activation!r}"
            )
        self.activation_name = name
        self.activation = keras.activations.get(name)
        self.quantizer = quantizers.get(quantizer, signed=(name == "linear"))
        if self.quantizer is None:
            raise ValueError("QuantActivation needs a quantizer, got None")
        self._skip_activation = name == "relu" and self.quantizer.clips_negative
        self.requantization = None
        self.set_requantization(requantization)

    def set_requantization(self, requantization):
        """Makes inference round exactly as the integer kernel that computes this tensor.

        In the integer file, the layer that produces this tensor (a
        convolution or fully connected layer, BatchNorm folded) computes an
        int32 accumulator per output channel and requantizes it onto this
        quantizer's grid. Float inference gets the same codes except where a
        value sits within float round-off of a half step, or where the
        kernel's fixed-point multiplier rounds differently
        (`tfquant.ops.requantize` has the rules of each kernel). With this
        set, inference recovers the accumulator from the float value and
        applies the kernel's own rule before the quantizer, so the Keras model
        and the file agree code for code. Training is unaffected. The
        exporter sets it from the converted file's scales
        (`tfquant.lite.match_integer_kernels`) and clears it where no integer
        kernel produces the tensor; it holds the scales at export time, so
        export again after more training.

        Args:
          requantization: None; for a sigmoid, {"input_scale": s} (the
            integer LOGISTIC's input step; inference then computes its
            table); otherwise a dict with `rounding` (one of
            `tfquant.ops.requantize.ROUNDINGS`), `accumulator_scale` (input
            step x weight step, per channel or one), `output_scale`,
            `offset`, and the rule's constants: `scale` for "float32",
            `multiplier` and `exponent` for "single" and "double" (per
            channel or one). A dict of the earlier form (`exponents`) is
            dropped: inference rounds once until the next export.
        """
        if self.activation_name == "sigmoid":
            self.requantization = _validated_logistic(requantization)
            return
        self.requantization = _validated_requantization(requantization)

    def build(self, input_shape):
        if not self.quantizer.built:
            self.quantizer.build(tuple(input_shape))
        self.built = True

    def call(self, inputs, training=None):
        # The activation too runs in float32 under a mixed policy: a 16-bit
        # sigmoid moves values across the grid's half steps.
        inputs = keras.ops.cast(inputs, "float32")
        if self.requantization is not None and not training:
            if self.activation_name == "sigmoid":
                # LOGISTIC reads the input's codes and looks its result up.
                values = requantize_ops.logistic(inputs, self.requantization["input_scale"])
                return in_compute_dtype(self, self.quantizer(values, training=training))
            # The kernel's rounding first, then its fused clamp (relu6 clamps
            # the value the kernel computed, on the output grid).
            inputs = _requantize(inputs, self.requantization)
        if not self._skip_activation:
            inputs = self.activation(inputs)
        return in_compute_dtype(self, self.quantizer(inputs, training=training))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(activation=self.activation_name, quantizer=_serialize(self.quantizer))
        if self.requantization is not None:
            config["requantization"] = dict(self.requantization)
        return config
