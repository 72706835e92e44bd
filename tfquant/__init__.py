"""tfquant: learned low-bit quantizers for Keras 3 and exact integer TFLite export."""

from tfquant import callbacks, layers, ops, optimizers, quantizers
from tfquant.batch_norm import reestimate_batch_norm
from tfquant.quantize import quantize_model
from tfquant.schemes import Scheme

__version__ = "0.1.0"

__all__ = [
    "Scheme",
    "callbacks",
    "layers",
    "ops",
    "optimizers",
    "quantize_model",
    "quantizers",
    "reestimate_batch_norm",
]
