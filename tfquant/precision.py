"""Models trained under a mixed-precision policy, back in float32.

Under `keras.mixed_precision.set_global_policy("mixed_bfloat16")` the layers
compute in bfloat16 (the quantizers stay in float32, see
`tfquant.quantizers.Quantizer`) and keep float32 variables. A model saved
that way also reloads computing in bfloat16, which is not what the integer
file computes: the exporter's verification needs the float32 twin.

>>> import keras
>>> keras.mixed_precision.set_global_policy("mixed_bfloat16")
>>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="d")])
>>> keras.mixed_precision.set_global_policy("float32")
>>> reduced_precision_layers(model)
['d']
>>> reduced_precision_layers(float32_copy(model))
[]
"""

from __future__ import annotations

from typing import Any

import keras


def reduced_precision_layers(model: keras.Model) -> list[str]:
    """Names of the layers of `model` that compute in a dtype other than float32."""
    return [
        layer.name for layer in model.layers if getattr(layer, "compute_dtype", None) != "float32"
    ]


def _float32_policies(value: Any) -> Any:
    """The config `value` with every dtype policy replaced by float32."""
    if isinstance(value, dict):
        if value.get("class_name") in ("DTypePolicy", "FloatDTypePolicy"):
            name = (value.get("config") or {}).get("name", "")
            if name.startswith("mixed_") or name in ("bfloat16", "float16"):
                return "float32"
        return {key: _float32_policies(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_float32_policies(item) for item in value]
    if isinstance(value, str) and value in ("mixed_bfloat16", "mixed_float16"):
        return "float32"
    return value


def float32_copy(model: keras.Model) -> keras.Model:
    """A copy of a functional or Sequential `model` computing in float32,
    with the same weights (its variables are float32 already); `model`
    itself when it computes in float32 throughout."""
    if not reduced_precision_layers(model):
        return model
    config = _float32_policies(model.get_config())
    copy = model.__class__.from_config(config)
    copy.set_weights(model.get_weights())
    return copy
