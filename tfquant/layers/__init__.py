"""Quantized Keras layers."""

from tfquant.layers.quant_layers import (
    QuantActivation,
    QuantConv2D,
    QuantDense,
    QuantDepthwiseConv2D,
)

__all__ = ["QuantActivation", "QuantConv2D", "QuantDense", "QuantDepthwiseConv2D"]
