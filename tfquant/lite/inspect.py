"""Reading a .tflite model back: ops, tensor storage types, weight codes."""

from __future__ import annotations

import contextlib
import io
import re

import numpy as np

_INTEGER_OPS_WITH_WEIGHTS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


def analyzer_text(content: bytes) -> str:
    """The text of `tf.lite.experimental.Analyzer`, which names each tensor's
    storage type (it tells INT4 from INT8, which the interpreter does not)."""
    import tensorflow as tf

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        tf.lite.experimental.Analyzer.analyze(model_content=content)
    return buffer.getvalue()


def storage_types(content: bytes) -> dict[int, str]:
    """Maps tensor index to its storage type name (INT4, INT8, INT32, FLOAT32...)."""
    types = {}
    for match in re.finditer(
        r"^\s*T#(\d+)\(.*?\) shape:.*?type:(\w+)", analyzer_text(content), re.MULTILINE
    ):
        types[int(match.group(1))] = match.group(2)
    return types


def interpreter(content: bytes, num_threads: int = 1):
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_content=content, num_threads=num_threads)


def ops(content: bytes) -> list[dict]:
    """The model's operators: name, input and output tensor indices."""
    return interpreter(content)._get_ops_details()


def non_integer_ops(content: bytes) -> list[str]:
    """Describes each op that is not integer: float tensors inside the graph,
    QUANTIZE/DEQUANTIZE except at the graph's boundary, weights that are
    neither INT4 nor INT8. Empty for a fully integer model."""
    interp = interpreter(content)
    details = {d["index"]: d for d in interp.get_tensor_details()}
    graph_inputs = {d["index"] for d in interp.get_input_details()}
    graph_outputs = {d["index"] for d in interp.get_output_details()}
    storage = storage_types(content)
    problems = []
    for op in interp._get_ops_details():
        name = op["op_name"]
        inputs = [i for i in op["inputs"] if i >= 0]
        outputs = list(op["outputs"])
        label = f"#{op['index']} {name}"
        if name == "QUANTIZE" and set(inputs) <= graph_inputs:
            continue
        if name == "DEQUANTIZE" and set(outputs) <= graph_outputs:
            continue
        if name == "QUANTIZE" and all(details[i]["dtype"] == np.int8 for i in inputs + outputs):
            continue  # an int8 -> int8 requantization
        if name in ("QUANTIZE", "DEQUANTIZE"):
            problems.append(f"{label} inside the graph")
            continue
        floats = [details[i]["name"] for i in inputs + outputs if details[i]["dtype"] == np.float32]
        if floats:
            problems.append(f"{label} has float tensors {floats}")
        if name in _INTEGER_OPS_WITH_WEIGHTS:
            weight = inputs[1]
            if storage.get(weight) not in ("INT4", "INT8"):
                problems.append(f"{label} weights are {storage.get(weight)}")
    return problems


def weight_tensors(content: bytes) -> list[dict]:
    """For each CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED, in graph order:
    its op name, weight storage type, integer weight values (as stored,
    TFLite's layout) and per-channel scales."""
    interp = interpreter(content)
    details = {d["index"]: d for d in interp.get_tensor_details()}
    storage = storage_types(content)
    found = []
    for op in interp._get_ops_details():
        if op["op_name"] not in _INTEGER_OPS_WITH_WEIGHTS:
            continue
        index = op["inputs"][1]
        try:
            values = np.asarray(interp.get_tensor(index))
        except ValueError:
            values = None
        found.append(
            {
                "op": op["op_name"],
                "storage": storage.get(index),
                "values": values,
                "scales": np.asarray(details[index]["quantization_parameters"]["scales"]),
            }
        )
    return found
