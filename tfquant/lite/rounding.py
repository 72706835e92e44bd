"""Making the Keras model round exactly as the converted file's kernels.

After conversion, each activation quantizer fed by a quantized kernel layer
(`lower.kernel_activation_pairs`) gets, from the file itself, the scales of
the op that computes its tensor (input, per-channel weights, output) and the
rounding rule of the LiteRT kernel that will run that op with the default
runtime on the target CPU (`tfquant.ops.requantize`):

* INT8 weights, and INT4 FULLY_CONNECTED with an even input depth: XNNPACK,
  float32 scale, round half to even, on every CPU.
* INT4 CONV_2D (and FULLY_CONNECTED with an odd input depth): TFLite's
  builtin kernels through ruy: one rounding on arm64, two on x86.
* INT4 DEPTHWISE_CONV_2D: builtin kernels, two roundings on both CPUs.
"""

from __future__ import annotations

import keras
import numpy as np

from tfquant.layers import QuantActivation
from tfquant.lite import inspect as lite_inspect
from tfquant.lite.lower import TARGETS, ExportError, kernel_activation_pairs
from tfquant.ops import requantize as requantize_ops

_KERNEL_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


def kernel_rounding(op_name: str, storage: str, input_depth: int, target: str) -> str:
    """The rounding rule (`tfquant.ops.requantize.ROUNDINGS`) of the kernel
    that runs an integer op with LiteRT's default runtime on `target`."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    in_xnnpack = storage == "INT8" or (op_name == "FULLY_CONNECTED" and input_depth % 2 == 0)
    if in_xnnpack:
        return "float32"
    if op_name == "DEPTHWISE_CONV_2D" or target == "x86":
        return "double"
    return "single"


def _scopes(tensor_name: str) -> set[str]:
    """The Keras layer names a TFLite tensor's (fused) name mentions."""
    return {part.split("/")[0] for part in tensor_name.split(";")}


def _kernel_ops(content: bytes) -> list[dict]:
    """Each CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED op of the file with
    its scales, weight storage and output tensor name."""
    interp = lite_inspect.interpreter(content)
    details = {d["index"]: d for d in interp.get_tensor_details()}
    storage = lite_inspect.storage_types(content)
    found = []
    for op in interp._get_ops_details():
        if op["op_name"] not in _KERNEL_OPS:
            continue
        source, weights = (details[int(i)] for i in op["inputs"][:2])
        output = details[int(op["outputs"][0])]
        found.append(
            {
                "op": op["op_name"],
                "storage": storage.get(weights["index"], "INT8"),
                "input_scale": float(source["quantization"][0]),
                "input_depth": int(source["shape"][-1]),
                "weight_scales": np.asarray(weights["quantization_parameters"]["scales"]),
                "output_scale": float(output["quantization"][0]),
                "output_name": output["name"],
            }
        )
    return found


def match_integer_kernels(
    model: keras.Model, content: bytes, target: str = "arm64"
) -> dict[str, str]:
    """Sets each kernel-fed activation quantizer's exact requantization from `content`.

    Every `QuantActivation` of the model that one kernel layer computes gets
    `set_requantization` with the file's scales and the rounding of the
    kernel that runs it on `target` (see the module docstring); every other
    one is cleared. Call it on the model the file was converted from, after
    conversion; `export_model` does.

    Returns:
      The rounding rule set per activation layer name.

    Raises:
      ExportError: the file has no op for a kernel layer, or its output grid
        is not the quantizer's.
    """
    if target not in TARGETS:
        raise ExportError(f"target must be one of {TARGETS}, got {target!r}")
    ops = _kernel_ops(content)
    pairs = {
        id(activation): (layer, activation) for layer, activation in kernel_activation_pairs(model)
    }
    chosen = {}
    for activation in _activations(model):
        if id(activation) not in pairs:
            activation.set_requantization(None)
            continue
        layer = pairs[id(activation)][0]
        form = activation.quantizer.inference_form()
        step = float(np.ravel(form.scale)[0])
        candidates = [
            op
            for op in ops
            if layer.name in _scopes(op["output_name"])
            and np.isclose(op["output_scale"], step, rtol=1e-5)
        ]
        if len(candidates) != 1:
            raise ExportError(
                f"layer {layer.name!r}: expected one integer op computing {activation.name!r} "
                f"in the file, found {len(candidates)}"
            )
        op = candidates[0]
        rounding = kernel_rounding(op["op"], op["storage"], op["input_depth"], target)
        weight_scales = op["weight_scales"].astype(np.float64)
        spec = {
            "rounding": rounding,
            "accumulator_scale": np.float64(op["input_scale"]) * weight_scales,
            "output_scale": op["output_scale"],
            "offset": float(form.offset),
        }
        if rounding == "float32":
            spec["scale"] = requantize_ops.float32_scale(
                op["input_scale"], op["weight_scales"], op["output_scale"]
            )
        else:
            spec["multiplier"], spec["exponent"] = requantize_ops.fixed_point_multiplier(
                op["input_scale"], op["weight_scales"], op["output_scale"]
            )
        activation.set_requantization(spec)
        chosen[activation.name] = rounding
    # Traced predict functions hold the previous constants.
    if getattr(model, "predict_function", None) is not None:
        model.predict_function = None
    return chosen


def _activations(model: keras.Model) -> list[QuantActivation]:
    return [layer for layer in model.layers if isinstance(layer, QuantActivation)]
