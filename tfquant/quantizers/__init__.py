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
from tfquant.quantizers.cpq import CPQQuantizer, LearnedBitsLogger, cpq_quantize, report_bits
from tfquant.quantizers.dq import ChannelAwareActivationQuantizer, DirectQuantizer
from tfquant.quantizers.qil import QILQuantizer, qil_activation_quantize, qil_weight_quantize
from tfquant.quantizers.qnet import QuantizationNetworkQuantizer, TemperatureScheduler, qn_phase
from tfquant.quantizers.uniform import (
    FixedRangeQuantizer,
    LSQQuantizer,
    MinMaxQuantizer,
    PACTQuantizer,
    lsq_quantize,
    pact_quantize,
)

__all__ = [
    "CPQQuantizer",
    "ChannelAwareActivationQuantizer",
    "DirectQuantizer",
    "FixedRangeQuantizer",
    "InferenceForm",
    "LSQQuantizer",
    "LearnedBitsLogger",
    "MinMaxQuantizer",
    "PACTQuantizer",
    "QILQuantizer",
    "QuantizationNetworkQuantizer",
    "Quantizer",
    "TemperatureScheduler",
    "cpq_quantize",
    "get",
    "lsq_quantize",
    "pact_quantize",
    "qil_activation_quantize",
    "qil_weight_quantize",
    "qn_phase",
    "register",
    "registered_names",
    "report_bits",
    "serialize",
]
