"""Quantizers: Keras layers with learned parameters, resolvable by name.

>>> from tfquant import quantizers
>>> quantizers.get("qil", signed=True).bits
4
"""

from tfquant.quantizers.base import (
    InferenceForm,
    Quantizer,
    get,
    register,
    registered_names,
    serialize,
)
from tfquant.quantizers.qil import QILQuantizer, qil_activation_quantize, qil_weight_quantize
from tfquant.quantizers.uniform import (
    LSQQuantizer,
    MinMaxQuantizer,
    PACTQuantizer,
    lsq_quantize,
    pact_quantize,
)

__all__ = [
    "InferenceForm",
    "LSQQuantizer",
    "MinMaxQuantizer",
    "PACTQuantizer",
    "QILQuantizer",
    "Quantizer",
    "get",
    "lsq_quantize",
    "pact_quantize",
    "qil_activation_quantize",
    "qil_weight_quantize",
    "register",
    "registered_names",
    "serialize",
]
