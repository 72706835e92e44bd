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

_PACKAGE = "tfquant"


class _QuantizedKernelMixin:
    """Holds the two quantizers, builds them and adds them to the config."""

    def _set_quantizers(self, kernel_quantizer, input_quantizer):
        self.kernel_quantizer = quantizers.get(kernel_quantizer, signed=True, for_weights=True)
        self.input_quantizer = quantizers.get(input_quantizer, signed=False, for_weights=False)

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
        return ops.cast(self.input_quantizer(inputs, training=training), self.compute_dtype)

    def _add_bias_and_activation(self, outputs, bias_shape):
        if self.use_bias:
            outputs = ops.add(outputs, ops.reshape(self.bias, bias_shape))
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

    def _quantizer_config(self):
        return {
            "kernel_quantizer": _serialize(self.kernel_quantizer),
            "input_quantizer": _serialize(self.input_quantizer),
        }


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
        self._set_quantizers(kernel_quantizer, input_quantizer)

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
        self._set_quantizers(kernel_quantizer, input_quantizer)

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
        self._set_quantizers(kernel_quantizer, input_quantizer)

    def build(self, input_shape):
        super().build(input_shape)
        self._build_quantizers(input_shape)

    def call(self, inputs, training=None):
        inputs = self._quantize_input(inputs, training)
        outputs = ops.matmul(inputs, self._compute_kernel(training))
        return self._add_bias_and_activation(outputs, (self.units,))

    def get_config(self):
        return {**super().get_config(), **self._quantizer_config()}


_SUPPORTED_ACTIVATIONS = ("linear", "relu", "relu6", "softmax")


def _round_on_fine_grid(x, scale, offset, exponents):
    """The first of a fixed-point kernel's two roundings, in real units.

    `v = (x - offset) / scale` is the value in output steps. The kernel
    rounds `v * 2^-e` to an integer, then shifts it right by `-e` bits,
    rounding ties up (toward +inf, for negative values too: measured on
    LiteRT's x86 kernels, where a tie-away-from-zero shift disagreed on 17% of
    a signed layer's codes). This returns `v` rounded to the fine grid and
    moved up by a quarter of a fine step, so that the quantizer's own
    rounding, whatever its tie-breaking, lands where the kernel's second
    rounding does; values not on a tie are at least one fine step from it and
    do not cross it.
    """
    # Below 2^-16 of a step the second rounding almost never differs, and
    # v * 2^16 stays an exact float32 integer for |v| <= 256.
    fine = np.exp2(-np.clip(np.asarray(exponents, np.float64), -16.0, 0.0))
    fine = ops.convert_to_tensor(fine if fine.size > 1 else fine.reshape(()), dtype=x.dtype)
    v = (x - offset) / scale * fine
    r = ops.floor(v + 0.5)
    r = r + 0.25
    return offset + scale * (r / fine)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class QuantActivation(keras.layers.Layer):
    """An activation followed by a quantizer.

    When the activation is ReLU and the quantizer already maps every
    negative input to 0 (`quantizer.clips_negative`), the ReLU is skipped:
    same output, one pass over the tensor fewer.

    Args:
      activation: "relu", "relu6", "linear" or "softmax".
      quantizer: a quantizer name, config dict or `Quantizer` (unsigned
        by default after relu/relu6/softmax, signed after linear).
      requantization: None, or how an integer kernel that rounds twice
        produces this tensor (see `set_requantization`); the exporter sets it.
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
        """Makes inference round the way TFLite's fixed-point kernels do.

        TFLite's builtin integer kernels requantize an int32 accumulator with
        a multiplier `m * 2^e` (m in [0.5, 1)): they round `acc * m` to an
        integer, then shift right by `-e` bits, rounding again (ties up).
        That is rounding to the grid of `2^e` steps first, then to whole
        steps; a value just below a half step can end one step up. With this set, the
        inference forward pass rounds the same way before the quantizer
        rounds, so the Keras model and the file agree code for code. Training
        is unaffected. The exporter sets it for tensors computed by kernels
        that round twice (INT4 weights) and clears it elsewhere; it holds the
        quantizer's step at export time, so export again after more training.

        Args:
          requantization: None (round once), or a dict with `scale` and
            `offset` (the quantizer's step and offset) and `exponents` (the
            exponent e of each output channel's multiplier, or one for all).
        """
        if requantization is None:
            self.requantization = None
            return
        try:
            scale = float(requantization["scale"])
            offset = float(requantization.get("offset", 0.0))
            exponents = [int(e) for e in np.ravel(requantization["exponents"])]
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(
                "requantization must be a dict with scale, offset and exponents, "
                f"got {requantization!r} ({error})"
            ) from None
        if not np.isfinite(scale) or scale <= 0 or not np.isfinite(offset) or not exponents:
            raise ValueError(f"invalid requantization {requantization!r}")
        self.requantization = {"scale": scale, "offset": offset, "exponents": exponents}

    def build(self, input_shape):
        if not self.quantizer.built:
            self.quantizer.build(tuple(input_shape))
        self.built = True

    def call(self, inputs, training=None):
        if not self._skip_activation:
            inputs = self.activation(inputs)
        if self.requantization is not None and not training:
            inputs = _round_on_fine_grid(inputs, **self.requantization)
        return self.quantizer(inputs, training=training)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(activation=self.activation_name, quantizer=_serialize(self.quantizer))
        if self.requantization is not None:
            config["requantization"] = dict(self.requantization)
        return config
