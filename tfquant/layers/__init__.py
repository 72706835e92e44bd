"""Quantized Keras layers."""

from tfquant.layers.quant_layers import (
    QuantActivation,
    QuantAdd,
    QuantConv2D,
    QuantDense,
    QuantDepthwiseConv2D,
)

__all__ = ["QuantActivation", "QuantAdd", "QuantConv2D", "QuantDense", "QuantDepthwiseConv2D"]
