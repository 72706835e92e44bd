"""Pure TensorFlow math shared by every quantizer: no Keras, no state."""

from tfquant.ops.compiled import call_compiled, switchable
from tfquant.ops.fake_quant import (
    fake_quant_unsigned,
    fake_quant_unsigned_with_gradient_terms,
    int8_range_for_unsigned_codes,
)
from tfquant.ops.rounding import round_half_away, round_ste

__all__ = [
    "call_compiled",
    "fake_quant_unsigned",
    "fake_quant_unsigned_with_gradient_terms",
    "int8_range_for_unsigned_codes",
    "round_half_away",
    "round_ste",
    "switchable",
]
