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
from tfquant.quantizers.cpq import CPQQuantizer, cpq_quantize, report_bits
from tfquant.quantizers.dq import ChannelAwareActivationQuantizer, DirectQuantizer, direct_quantize
from tfquant.quantizers.qil import QILQuantizer, qil_activation_quantize, qil_weight_quantize
from tfquant.quantizers.qnet import QuantizationNetworkQuantizer, qn_phase, qn_quantize
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
    "MinMaxQuantizer",
    "PACTQuantizer",
    "QILQuantizer",
    "QuantizationNetworkQuantizer",
    "Quantizer",
    "cpq_quantize",
    "direct_quantize",
    "get",
    "lsq_quantize",
    "pact_quantize",
    "qil_activation_quantize",
    "qil_weight_quantize",
    "qn_phase",
    "qn_quantize",
    "register",
    "registered_names",
    "report_bits",
    "serialize",
]


def __getattr__(name):
    # The callbacks moved to tfquant.callbacks; the old names still resolve.
    if name in ("LearnedBitsLogger", "TemperatureScheduler"):
        from tfquant import callbacks

        return getattr(callbacks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
