"""Schemes: which quantizer goes where, as data.

A scheme names the weight and activation quantizers and their bit widths.
`quantize_model` reads it; so can a flagfile or a JSON file.

>>> Scheme.from_any("lsq_w4a4").activation_bits
4
>>> Scheme.from_any({"weights": "qil", "activations": "pact", "bits": 3}).weight_bits
3
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from tfquant.quantizers.base import check_bits, registered_names


@dataclasses.dataclass(frozen=True)
class Scheme:
    """Where each quantizer goes.

    Attributes:
      weights: quantizer for every Conv2D/DepthwiseConv2D/Dense kernel (name
        or config dict).
      activations: quantizer after every ReLU.
      bits: bit width of both, unless `weight_bits`/`activation_bits` say
        otherwise.
      weight_bits, activation_bits: per-role overrides of `bits`.
      first_last_bits: weight bits of the first and last quantized layers
        (8 in the papers); None keeps `weight_bits` there too.
      requantize: quantizer (8-bit) for tensors that feed integer ops but
        follow no ReLU: the model input, Add inputs and outputs, pooled
        averages, the logits.
      quantize_output: also quantize the model output (the logits), so the
        integer model can return int8.
    """

    weights: Any = "qil"
    activations: Any = "qil"
    bits: int = 4
    weight_bits: int | None = None
    activation_bits: int | None = None
    first_last_bits: int | None = 8
    requantize: Any = "minmax"
    quantize_output: bool = True

    def __post_init__(self):
        check_bits(self.bits, "a scheme")
        for field in ("weight_bits", "activation_bits", "first_last_bits"):
            value = getattr(self, field)
            if value is not None:
                check_bits(value, f"a scheme's {field}")
        for field in ("weights", "activations", "requantize"):
            value = getattr(self, field)
            name = value.get("class_name") if isinstance(value, dict) else value
            if not isinstance(name, str) or name.lower() not in registered_names():
                raise ValueError(
                    f"scheme field {field!r} names no quantizer: got {value!r}; "
                    f"known quantizers: {registered_names()}"
                )

    @property
    def resolved_weight_bits(self) -> int:
        return self.weight_bits if self.weight_bits is not None else self.bits

    @property
    def resolved_activation_bits(self) -> int:
        return self.activation_bits if self.activation_bits is not None else self.bits

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_any(cls, scheme: Any) -> Scheme:
        """A Scheme from a Scheme, a dict of its fields, or a preset name
        `METHOD_wWaA` (e.g. `qil_w4a4`, `lsq_w2a2`; `pact_w4a4` uses LSQ
        weights since PACT quantizes activations only)."""
        if isinstance(scheme, Scheme):
            return scheme
        if isinstance(scheme, dict):
            unknown = set(scheme) - {f.name for f in dataclasses.fields(cls)}
            if unknown:
                raise ValueError(f"unknown scheme field(s) {sorted(unknown)}")
            return cls(**scheme)
        if isinstance(scheme, str):
            match = re.fullmatch(r"([a-z]+)_w(\d+)a(\d+)", scheme.lower())
            if not match:
                raise ValueError(
                    f"cannot parse scheme {scheme!r}: expected METHOD_wWaA such as 'qil_w4a4', "
                    "a dict of Scheme fields or a Scheme"
                )
            method, weight_bits, activation_bits = match.groups()
            weights = "lsq" if method == "pact" else method
            return cls(
                weights=weights,
                activations=method,
                bits=int(weight_bits),
                weight_bits=int(weight_bits),
                activation_bits=int(activation_bits),
            )
        raise ValueError(f"cannot interpret {scheme!r} as a scheme")
