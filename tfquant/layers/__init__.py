"""Quantized Keras layers."""

from tfquant.layers.quant_layers import (
    QuantActivation,
    QuantAdd,
    QuantAveragePooling2D,
    QuantConcatenate,
    QuantConv2D,
    QuantDense,
    QuantDepthwiseConv2D,
)

__all__ = [
    "QuantActivation",
    "QuantAdd",
    "QuantAveragePooling2D",
    "QuantConcatenate",
    "QuantConv2D",
    "QuantDense",
    "QuantDepthwiseConv2D",
]
