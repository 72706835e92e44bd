"""Quantized Add and Concatenate: layers whose inputs are on quantizers'
grids and whose result gets one grid of its own."""

from __future__ import annotations

import keras
import numpy as np

from tfquant import quantizers
from tfquant.layers.quant_layers import (
    _PACKAGE,
    _requantize,
    _serialize,
    _validated_requantization,
    in_compute_dtype,
)
from tfquant.ops import requantize as requantize_ops


def _floats(values) -> list[float]:
    return [float(v) for v in values]


def _ints(values) -> list[int]:
    return [int(v) for v in values]


def _parsed(requantization: dict, fields: dict) -> dict:
    """The `fields` (name -> converter) of a requantization dict, converted;
    one ValueError naming the fields when one is missing or malformed, or a
    scale is not a positive finite number."""
    try:
        spec = {name: convert(requantization[name]) for name, convert in fields.items()}
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(
            f"requantization must be a dict with {', '.join(fields)}, got {requantization!r} "
            f"({error})"
        ) from None
    scales = spec["input_scales"] + [spec["output_scale"]]
    if not all(np.isfinite(v) and v > 0 for v in scales):
        raise ValueError(f"invalid requantization {requantization!r}: scales must be positive")
    return spec


class _QuantizedResult:
    """Holds the quantizer of a merging layer's result: built from a name,
    config dict or `Quantizer` (signed by default), built on the output
    shape and saved in the config."""

    def _set_quantizer(self, quantizer, requantization):
        self.quantizer = quantizers.get(quantizer, signed=True)
        if self.quantizer is None:
            raise ValueError(f"{type(self).__name__} needs a quantizer, got None")
        self.requantization = None
        self.set_requantization(requantization)

    def build(self, input_shape):
        super().build(input_shape)
        if not self.quantizer.built:
            self.quantizer.build(tuple(self.compute_output_shape(input_shape)))

    @staticmethod
    def _in_float32(inputs):
        # The sum or product too is computed in float32 under a mixed policy:
        # a 16-bit result moves values across the grid's half steps.
        return [keras.ops.cast(x, "float32") for x in inputs]

    def _quantized(self, values, training):
        """The result on the quantizer's grid, in this layer's compute dtype."""
        return in_compute_dtype(self, self.quantizer(values, training=training))

    def get_config(self):
        config = super().get_config()
        config["quantizer"] = _serialize(self.quantizer)
        spec = self.requantization
        if isinstance(spec, list):  # a concatenation's: one spec or None per input
            config["requantization"] = [None if s is None else dict(s) for s in spec]
        elif spec is not None:
            config["requantization"] = dict(spec)
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class QuantAdd(_QuantizedResult, keras.layers.Add):
    """`keras.layers.Add` whose sum is quantized onto its own grid.

    `tfquant.quantize_model` uses it for every Add, with an 8-bit quantizer:
    in the integer file the sum is an int8 ADD. Its inputs must be on
    quantizers' grids (codes times a step).

    Args:
      quantizer: a quantizer name, config dict or `Quantizer` (signed by default).
      requantization: None, or the integer ADD's constants (see
        `set_requantization`); the exporter sets it.
      **kwargs: `keras.layers.Add`'s arguments.
    """

    def __init__(self, quantizer="minmax", requantization=None, **kwargs):
        super().__init__(**kwargs)
        self._set_quantizer(quantizer, requantization)

    def set_requantization(self, requantization):
        """Makes inference add exactly as the file's integer ADD.

        XNNPACK's int8 ADD rescales each input's codes with a 21-bit integer
        multiplier and rounds the sum once
        (`tfquant.ops.requantize.add_multipliers`); the float sum agrees
        except near a half step. With this set, inference recovers each
        input's codes and adds them that way before the quantizer. Training
        is unaffected; `tfquant.lite.match_integer_kernels` sets it from the
        converted file.

        Args:
          requantization: None, or a dict with `input_scales` (one per
            input), `multipliers` (one per input), `shift` and `output_scale`.
        """
        if requantization is None:
            self.requantization = None
            return
        spec = _parsed(
            requantization,
            {"input_scales": _floats, "multipliers": _ints, "shift": int, "output_scale": float},
        )
        if len(spec["multipliers"]) != len(spec["input_scales"]) or not 12 <= spec["shift"] <= 30:
            raise ValueError(f"invalid requantization {requantization!r}")
        self.requantization = spec

    def call(self, inputs, training=None):
        inputs = self._in_float32(inputs)
        spec = self.requantization
        if spec is not None and not training and len(inputs) == len(spec["multipliers"]):
            total = requantize_ops.add(
                inputs,
                spec["input_scales"],
                spec["multipliers"],
                spec["shift"],
                spec["output_scale"],
            )
        else:
            total = super().call(inputs)
        return self._quantized(total, training)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class QuantConcatenate(_QuantizedResult, keras.layers.Concatenate):
    """`keras.layers.Concatenate` whose result is quantized onto one grid.

    TFLite's int8 CONCATENATION copies bytes: its inputs must share the
    output's grid. `tfquant.quantize_model` uses it for every Concatenate,
    with an 8-bit quantizer; the exporter moves each input that is on
    another grid onto this one with an integer op, whose rounding inference
    then follows (`set_requantization`). Its inputs must be on quantizers'
    grids.

    Args:
      quantizer: a quantizer name, config dict or `Quantizer` (signed by default).
      requantization: None, or one spec or None per input (see
        `set_requantization`); the exporter sets it.
      **kwargs: `keras.layers.Concatenate`'s arguments (`axis`).
    """

    def __init__(self, quantizer="minmax", requantization=None, **kwargs):
        super().__init__(**kwargs)
        self._set_quantizer(quantizer, requantization)

    def set_requantization(self, requantization):
        """Makes inference move each input onto the output grid as the file does.

        Args:
          requantization: None, or a list with one entry per input: None
            (the input is already on the output grid, or rounds in float)
            or a `QuantActivation.set_requantization` spec of the integer op
            that requantizes that input.
        """
        if requantization is None:
            self.requantization = None
            return
        if not isinstance(requantization, (list, tuple)):
            raise ValueError(
                f"requantization must be a list with one spec or None per input, got "
                f"{requantization!r}"
            )
        self.requantization = [_validated_requantization(spec) for spec in requantization]

    def call(self, inputs, training=None):
        inputs = self._in_float32(inputs)
        specs = self.requantization
        if specs is not None and not training and len(specs) == len(inputs):
            inputs = [
                x if s is None else _requantize(x, s) for x, s in zip(inputs, specs, strict=True)
            ]
        return self._quantized(super().call(inputs), training)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class QuantMultiply(_QuantizedResult, keras.layers.Multiply):
    """`keras.layers.Multiply` (two inputs, broadcast allowed) whose product
    is quantized onto its own grid.

    `tfquant.quantize_model` uses it for every Multiply (a squeeze-excite
    gate) and for swish, x * sigmoid(x), with an 8-bit quantizer; in the
    integer file the product is an int8 MUL. Its inputs must be on
    quantizers' grids.

    Args:
      quantizer: a quantizer name, config dict or `Quantizer` (signed by default).
      requantization: None, or the integer MUL's constants (see
        `set_requantization`); the exporter sets it.
      **kwargs: `keras.layers.Multiply`'s arguments.
    """

    def __init__(self, quantizer="minmax", requantization=None, **kwargs):
        super().__init__(**kwargs)
        self._set_quantizer(quantizer, requantization)

    def set_requantization(self, requantization):
        """Makes inference multiply exactly as the file's integer MUL.

        XNNPACK's int8 MUL multiplies the inputs' codes and rounds the
        product times `s_a * s_b / s_out` once, in float32 to even on x86
        and exactly with ties up on arm64 (`tfquant.ops.requantize.multiply`).

        Args:
          requantization: None, or a dict with `input_scales` (two),
            `output_scale` and `rounding` (one of
            `tfquant.ops.requantize.MULTIPLY_ROUNDINGS`).
        """
        if requantization is None:
            self.requantization = None
            return
        spec = _parsed(
            requantization, {"input_scales": _floats, "output_scale": float, "rounding": str}
        )
        if (
            len(spec["input_scales"]) != 2
            or spec["rounding"] not in requantize_ops.MULTIPLY_ROUNDINGS
        ):
            raise ValueError(f"invalid requantization {requantization!r}")
        self.requantization = spec

    def call(self, inputs, training=None):
        inputs = self._in_float32(inputs)
        spec = self.requantization
        if spec is not None and not training and len(inputs) == 2:
            product = requantize_ops.multiply(
                inputs[0],
                inputs[1],
                spec["input_scales"],
                spec["output_scale"],
                spec["rounding"],
            )
        else:
            product = super().call(inputs)
        return self._quantized(product, training)
