"""Quantized Keras layers."""

from tfquant.layers.merging import QuantAdd, QuantConcatenate, QuantMultiply
from tfquant.layers.pooling import QuantAveragePooling2D, window_reaches_padding
from tfquant.layers.quant_layers import (
    QuantActivation,
    QuantConv2D,
    QuantDense,
    QuantDepthwiseConv2D,
)

__all__ = [
    "QuantActivation",
    "QuantAdd",
    "QuantAveragePooling2D",
    "QuantConcatenate",
    "QuantMultiply",
    "QuantConv2D",
    "QuantDense",
    "QuantDepthwiseConv2D",
    "window_reaches_padding",
]
