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

Each `QuantAdd` gets the constants of XNNPACK's integer ADD; each
`QuantMultiply` the rounding of XNNPACK's integer MUL on the target (float32
to even on x86, exact with ties up on arm64); each sigmoid `QuantActivation`
the input step of XNNPACK's LOGISTIC table.
"""

from __future__ import annotations

import keras
import numpy as np

from tfquant.layers import (
    QuantActivation,
    QuantAdd,
    QuantConcatenate,
    QuantMultiply,
)
from tfquant.lite import inspect as lite_inspect
from tfquant.lite.lower import (
    TARGETS,
    ExportError,
    forget_traced_functions,
    input_grid,
    integer_producers,
)
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


def _integer_ops(content: bytes) -> list[dict]:
    """Each CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED / ADD / MUL / LOGISTIC op of the file
    with its input scales, weight scales and storage, and output tensor."""
    interp = lite_inspect.interpreter(content)
    details = {d["index"]: d for d in interp.get_tensor_details()}
    storage = lite_inspect.storage_types(content)
    found = []
    for op in interp._get_ops_details():
        if op["op_name"] not in (*_KERNEL_OPS, "ADD", "MUL", "LOGISTIC"):
            continue
        inputs = [details[int(i)] for i in op["inputs"] if int(i) >= 0]
        output = details[int(op["outputs"][0])]
        entry = {
            "op": op["op_name"],
            "input_scales": [float(inputs[0]["quantization"][0])],
            "output_scale": float(output["quantization"][0]),
            "output_name": output["name"],
        }
        if op["op_name"] in ("ADD", "MUL"):
            entry["input_scales"].append(float(inputs[1]["quantization"][0]))
        elif op["op_name"] != "LOGISTIC":
            weights = inputs[1]
            entry["storage"] = storage.get(weights["index"], "INT8")
            entry["input_depth"] = int(inputs[0]["shape"][-1])
            entry["weight_scales"] = np.asarray(weights["quantization_parameters"]["scales"])
            if len(inputs) > 2 and inputs[2]["dtype"] == np.int32:
                entry["bias"] = interp.get_tensor(inputs[2]["index"]).astype(np.int64)
        found.append(entry)
    return found


def match_integer_kernels(
    model: keras.Model, content: bytes, target: str = "arm64"
) -> dict[str, str]:
    """Sets each quantizing layer's exact requantization from the file `content`.

    Every `QuantActivation` of the model that an integer convolution or fully
    connected layer computes (`lower.integer_producers`) gets
    `set_requantization` with the file's scales and the rounding of the
    kernel that runs it on `target` (see the module docstring), and so does,
    through `set_input_requantization`, every kernel layer's input quantizer
    fed by an average pooling; every `QuantAdd` gets the constants of
    XNNPACK's integer ADD. Every other one is cleared. Call it on the model
    the file was converted from, after conversion; `export_model` does.

    Returns:
      The rule set per layer name ("add" for a QuantAdd; a kernel layer's
      name for its input quantizer).

    Raises:
      ExportError: `target` is unknown, or the file has no single op for a
        layer, or its output grid is not the quantizer's.
    """
    if target not in TARGETS:
        raise ExportError(f"target must be one of {TARGETS}, got {target!r}")
    ops = _integer_ops(content)
    chosen = {}
    concatenations: dict[str, tuple] = {}
    for layer, scope, what in integer_producers(model):
        if what == "pool":  # a QuantAveragePooling2D: AVERAGE_POOL_2D on its input's grid
            layer.set_requantization(input_grid(layer))
            chosen[layer.name] = "pool"
            continue
        if isinstance(what, int):  # input `what` of a QuantConcatenate
            form = layer.quantizer.inference_form()
            step = float(np.ravel(form.scale)[0])
            op = _op_computing(ops, scope, step, layer, source=input_grid(layer, what)["scale"])
            specs = concatenations.setdefault(layer.name, (layer, {}))[1]
            specs[what] = _identity_spec(op, target, float(form.offset))
            continue
        quantizer = layer.input_quantizer if what == "input" else layer.quantizer
        form = quantizer.inference_form()
        source = input_grid(layer)["scale"] if what == "identity" else None
        step = float(np.ravel(form.scale)[0])
        op = _op_computing(ops, scope, step, layer, what != "input", source)
        if op is None:
            continue  # a pooling the file keeps as AVERAGE_POOL_2D: rounded in float
        if what == "mul":
            if op["op"] != "MUL":
                raise ExportError(f"layer {layer.name!r}: computed by {op['op']}, not MUL")
            layer.set_requantization(
                {
                    "input_scales": op["input_scales"],
                    "output_scale": op["output_scale"],
                    "rounding": "upward" if target == "arm64" else "float32",
                }
            )
            chosen[layer.name] = "mul"
            continue
        if what == "logistic":
            if op["op"] != "LOGISTIC":
                raise ExportError(f"layer {layer.name!r}: computed by {op['op']}, not LOGISTIC")
            layer.set_requantization({"input_scale": op["input_scales"][0]})
            chosen[layer.name] = "logistic"
            continue
        if what == "add":
            constants = requantize_ops.add_multipliers(op["input_scales"], op["output_scale"])
            if op["op"] != "ADD" or constants is None or form.offset:
                continue  # not XNNPACK's ADD: left to the float sum
            layer.set_requantization(
                {
                    "input_scales": op["input_scales"],
                    "multipliers": constants[0],
                    "shift": constants[1],
                    "output_scale": op["output_scale"],
                }
            )
            chosen[layer.name] = "add"
            continue
        if what == "identity":
            spec = _identity_spec(op, target, float(form.offset))
        else:
            spec = _kernel_spec(op, target, float(form.offset))
        if np.size(spec["accumulator_scale"]) > 1 and what == "input":
            continue  # per-channel rounding seen through a Flatten: channels are mixed
        if what == "input":
            layer.set_input_requantization(spec)
        else:
            layer.set_requantization(spec)
        chosen[layer.name] = spec["rounding"]
    for layer, specs in concatenations.values():
        layer.set_requantization([specs.get(i) for i in range(len(layer.input))])
        chosen[layer.name] = "concatenation"
    for layer in model.layers:  # clear what an earlier export set and this one did not
        if (
            isinstance(layer, (QuantActivation, QuantAdd, QuantConcatenate, QuantMultiply))
            and layer.name not in chosen
        ):
            layer.set_requantization(None)
        if hasattr(layer, "set_input_requantization") and layer.name not in chosen:
            layer.set_input_requantization(None)
    # Traced predict / evaluate / train functions hold the previous constants.
    forget_traced_functions(model)
    return chosen


def _kernel_spec(op: dict, target: str, offset: float) -> dict:
    """The `set_requantization` spec of a convolution / fully connected op."""
    rounding = kernel_rounding(op["op"], op["storage"], op["input_depth"], target)
    input_scale = op["input_scales"][0]
    spec = {
        "rounding": rounding,
        "accumulator_scale": np.float64(input_scale) * op["weight_scales"].astype(np.float64),
        "output_scale": op["output_scale"],
        "offset": offset,
    }
    if rounding == "float32":
        spec["scale"] = requantize_ops.float32_scale(
            input_scale, op["weight_scales"], op["output_scale"]
        )
    else:
        spec["multiplier"], spec["exponent"] = requantize_ops.fixed_point_multiplier(
            input_scale, op["weight_scales"], op["output_scale"]
        )
    # One value where every channel has the same (an average pooling's
    # weights): it then also holds after a Flatten.
    for key in ("accumulator_scale", "scale", "multiplier", "exponent"):
        if key in spec and np.all(np.asarray(spec[key]) == np.ravel(spec[key])[0]):
            spec[key] = np.ravel(spec[key])[:1]
    return spec


def _identity_spec(op: dict, target: str, offset: float) -> dict:
    """The spec of an identity convolution between two grids
    (`tfquant.lite.integer_ops.requantize_through_identity`) with its int32
    bias as the file holds it: the accumulator of an input on the grid is
    then exactly the file's, 127 * code + bias, for any offset."""
    if "bias" not in op or np.unique(op["bias"]).size != 1:
        raise ExportError(f"op {op['output_name']!r}: an identity convolution without one bias")
    spec = _kernel_spec(op, target, offset)
    spec["bias"] = int(op["bias"][0])
    return spec


def _op_computing(
    ops: list[dict],
    scope: str,
    step: float,
    layer,
    required: bool = True,
    source: float | None = None,
) -> dict | None:
    """The op of the file named after `scope` whose output step is `step`.

    With `source` (the input step of an identity convolution between two
    grids): the converter merges identical ops on one tensor, so another
    identity convolution from a `source` grid onto a `step` grid computes
    the same and stands in for a merged one.
    """
    candidates = [
        op
        for op in ops
        if scope in _scopes(op["output_name"]) and np.isclose(op["output_scale"], step, rtol=1e-5)
    ]
    if not candidates and source is not None:
        candidates = [
            op
            for op in ops
            if op["op"] == "DEPTHWISE_CONV_2D"
            and np.isclose(op["output_scale"], step, rtol=1e-6)
            and np.isclose(op["input_scales"][0], source, rtol=1e-6)
            and np.allclose(op["weight_scales"], 1 / 127, rtol=1e-4)
        ][:1]
    if not candidates and not required:
        return None
    if len(candidates) != 1:
        raise ExportError(
            f"layer {layer.name!r}: expected one integer op computing it in the file "
            f"(tensors named after {scope!r}), found {len(candidates)}"
        )
    return candidates[0]
