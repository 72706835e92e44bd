"""Comparing a TFLite model with the Keras model it came from."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from tfquant.lite import inspect as lite_inspect
from tfquant.lite import litert_worker
from tfquant.lite.lower import TARGETS


@dataclasses.dataclass
class Agreement:
    """How closely the TFLite model reproduces the Keras model."""

    samples: int
    top1_agreement: float
    identical_output_codes: float
    max_output_step_difference: int
    tflite_accuracy: float | None = None
    keras_accuracy: float | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


# The runtime whose figures must reach the bar; the others are reported.
CHECKED_RUNTIME = "default"


def host_target() -> str:
    """ "arm64" on an aarch64 host, else "x86"."""
    from tfquant.lite import arm64

    return "arm64" if arm64.is_native() else "x86"


def input_codes(batch: np.ndarray, detail: dict) -> np.ndarray:
    """What to feed for float inputs `batch`: int8 codes (round half up, as
    TFLite's QUANTIZE does) when the input `detail` is int8, else the floats."""
    batch = np.asarray(batch, np.float32)
    if detail["dtype"] != np.int8:
        return batch
    scale, zero_point = detail["quantization"]
    return np.clip(np.floor(batch / scale + 0.5) + zero_point, -128, 127).astype(np.int8)


def feed_input(interp, batch: np.ndarray) -> None:
    """Resizes the interpreter's input to `batch` and sets it (see `input_codes`)."""
    batch = np.asarray(batch, np.float32)
    index = interp.get_input_details()[0]["index"]
    interp.resize_tensor_input(index, batch.shape)
    interp.allocate_tensors()
    interp.set_tensor(index, input_codes(batch, interp.get_input_details()[0]))


def _details(content: bytes) -> tuple[dict, dict]:
    interp = lite_inspect.interpreter(content)
    return interp.get_input_details()[0], interp.get_output_details()[0]


def run_tflite(
    content: bytes,
    x: np.ndarray,
    batch_size: int = 256,
    num_threads: int = 2,
    runtime: str = "default",
) -> tuple[np.ndarray, dict]:
    """Runs the model on the host on float inputs (quantized here if the
    model takes int8), with `runtime` ("default": XNNPACK delegate,
    "builtin": builtin kernels only, "reference").

    Returns the raw outputs (int8 codes or floats) and the output details.
    """
    input_detail, output_detail = _details(content)
    raw = litert_worker.run_model(
        content, input_codes(x, input_detail), runtime, batch_size, num_threads
    )
    return raw, output_detail


def run_on_targets(
    content: bytes,
    x: np.ndarray,
    targets: Sequence[str],
    runtimes: Sequence[str] = ("default", "builtin"),
    arm64_cpu: str | None = None,
    fed: np.ndarray | None = None,
) -> tuple[dict[str, dict[str, np.ndarray]], dict]:
    """Runs the file on each target's kernels with each runtime.

    The host's own architecture runs in process; arm64 on an x86 host runs
    under emulation (`tfquant.lite.arm64`, built once with `make arm64`).

    `fed`, when given, is exactly what to feed (e.g. `quantized_input`);
    otherwise `x` is quantized with `input_codes`.

    Returns:
      {target: {runtime: raw outputs}} and the output details.

    Raises:
      ValueError: an unknown target or runtime, or x86 asked for on an arm64 host.
      tfquant.lite.arm64.Arm64Error: the arm64 environment is missing or failed.
    """
    from tfquant.lite import arm64

    for target in targets:
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    for runtime in runtimes:
        if runtime not in litert_worker.RUNTIMES:
            raise ValueError(
                f"runtime must be one of {sorted(litert_worker.RUNTIMES)}, got {runtime!r}"
            )
    input_detail, output_detail = _details(content)
    inputs = input_codes(x, input_detail) if fed is None else fed
    host = host_target()
    outputs = {}
    for target in dict.fromkeys(targets):
        if target == host:
            outputs[target] = {}
            for runtime in runtimes:
                try:
                    outputs[target][runtime] = litert_worker.run_model(content, inputs, runtime)
                except (RuntimeError, ValueError) as error:
                    raise ValueError(
                        f"LiteRT cannot run the file on {target} with the {runtime} runtime: "
                        f"{str(error).strip()}"
                    ) from None
        elif target == "arm64":
            ran = arm64.run(content, inputs, runtimes, cpu=arm64_cpu or arm64.DEFAULT_CPU)
            outputs[target] = {runtime: ran[runtime] for runtime in runtimes}
        else:
            raise ValueError(f"cannot run {target} kernels on this {host} host")
    return outputs, output_detail


def quantized_input(keras_model, x: np.ndarray, content: bytes) -> np.ndarray | None:
    """The int8 codes the Keras model's own first quantizer gives `x`.

    A float input becomes int8 codes before the file sees it, and quantizers
    round differently (half up, half away, float32 division or reciprocal):
    the same codes as the Keras model's are what an app must feed, and what
    the verification feeds. Found where one quantizer (a `QuantActivation`'s
    or a kernel layer's input quantizer) reads the model input, directly or
    through layers that only move or pad values, on the file's input grid.
    Otherwise None (then `input_codes` quantizes, half up).
    """
    input_detail, _ = _details(content)
    quantizer = _first_quantizer(keras_model)
    if input_detail["dtype"] != np.int8 or quantizer is None:
        return None
    scale, zero_point = input_detail["quantization"]
    form = quantizer.inference_form()
    if form.offset or not np.isclose(float(np.ravel(form.scale)[0]), scale, rtol=1e-5):
        return None
    values = np.asarray(quantizer(np.asarray(x, np.float32), training=False))
    return np.clip(np.round(values / scale) + zero_point, -128, 127).astype(np.int8)


def _first_quantizer(keras_model):
    import keras

    from tfquant import graph
    from tfquant.layers import QuantActivation
    from tfquant.lite.lower import _prepare

    moving = (keras.layers.Flatten, keras.layers.Reshape, keras.layers.ZeroPadding2D)
    functional, _, consumers = _prepare(keras_model)
    layer = graph.producer(functional.inputs[0])
    while True:
        readers = consumers.get(id(layer), [])
        if len(readers) != 1:
            return None
        layer = readers[0]
        if isinstance(layer, QuantActivation):
            return None if layer.activation_name != "linear" else layer.quantizer
        if getattr(layer, "input_quantizer", None) is not None:
            return layer.input_quantizer
        if not isinstance(layer, moving):
            return None


def keras_outputs(keras_model, x: np.ndarray, batch_size: int = 256):
    """`keras_model.predict(x)` traced for one batch shape only.

    `predict` traces its function once per batch shape, so a last, shorter
    batch costs a second trace (about as long as running a few hundred
    images through a ResNet-20); the last batch is padded instead and the
    padding's outputs dropped.
    """
    x = np.asarray(x, np.float32)
    count = len(x)
    if count > batch_size and count % batch_size:
        pad = np.zeros((batch_size - count % batch_size, *x.shape[1:]), x.dtype)
        x = np.concatenate([x, pad])
    outputs = keras_model.predict(x, batch_size=min(batch_size, count), verbose=0)
    if isinstance(outputs, list):
        return [o[:count] for o in outputs]
    return outputs[:count]


def compare(keras_model, content: bytes, x: np.ndarray, y: np.ndarray | None = None) -> Agreement:
    """Top-1 agreement, identical output codes and the largest difference in
    output quantization steps between the Keras and the TFLite model."""
    reference = keras_outputs(keras_model, x)
    raw, detail = run_tflite(content, x)
    return compare_outputs(reference, raw, detail, y)


def compare_on_targets(
    reference: np.ndarray,
    content: bytes,
    x: np.ndarray,
    y: np.ndarray | None = None,
    targets: Sequence[str] = ("x86",),
    runtimes: Sequence[str] = ("default", "builtin"),
    arm64_cpu: str | None = None,
    fed: np.ndarray | None = None,
) -> dict[str, dict[str, Agreement]]:
    """`compare` against the Keras outputs `reference`, per target and runtime."""
    outputs, detail = run_on_targets(content, x, targets, runtimes, arm64_cpu, fed)
    return {
        target: {runtime: compare_outputs(reference, raw, detail, y) for runtime, raw in by.items()}
        for target, by in outputs.items()
    }


def compare_outputs(
    reference: np.ndarray, raw: np.ndarray, detail: dict, y: np.ndarray | None = None
) -> Agreement:
    """`compare` on outputs already computed: the Keras model's `reference`
    and the interpreter's `raw` outputs with its output `detail`."""
    reference = np.asarray(reference, np.float64)
    scale, zero_point = detail["quantization"]
    if detail["dtype"] == np.int8:
        tflite_codes = raw.astype(np.int64)
        ours = (tflite_codes - zero_point) * scale
    else:
        ours = raw.astype(np.float64)
        scale, zero_point = _implied_step(reference), 0
        tflite_codes = np.round(ours / scale).astype(np.int64)
    keras_codes = np.clip(np.round(reference / scale) + zero_point, -128, 127).astype(np.int64)
    if detail["dtype"] != np.int8:
        keras_codes = np.round(reference / scale).astype(np.int64)
    top1 = reference.argmax(axis=1) == ours.argmax(axis=1)
    agreement = Agreement(
        samples=len(reference),
        top1_agreement=float(top1.mean()),
        identical_output_codes=float((keras_codes == tflite_codes).mean()),
        max_output_step_difference=int(np.abs(keras_codes - tflite_codes).max()),
    )
    if y is not None:
        y = np.asarray(y).reshape(-1)
        agreement.keras_accuracy = float((reference.argmax(axis=1) == y).mean())
        agreement.tflite_accuracy = float((ours.argmax(axis=1) == y).mean())
    return agreement


def _implied_step(values: np.ndarray) -> float:
    """The grid step of already-quantized float outputs (smallest nonzero gap)."""
    gaps = np.diff(np.unique(values))
    gaps = gaps[gaps > 1e-9]
    return float(gaps.min()) if gaps.size else 1.0


def compare_layers(keras_model, content: bytes, x: np.ndarray) -> list[dict]:
    """Each activation quantizer's codes in Keras against the file's tensor.

    Runs both models on `x` (keep it small: the interpreter holds every
    intermediate tensor) and, for each `QuantActivation`, `QuantAdd`,
    `QuantConcatenate` and (exported) `QuantAveragePooling2D`, finds the int8
    tensor of the file on the same grid (by the layer's name, else by size and
    scale). Where codes first differ, and how the difference grows with depth,
    points at the layer to look at.

    Returns:
      One dict per quantizer, in model order: `layer`, `tensor` (None when the
      file has no tensor on that grid: the converter merged it away),
      `identical_codes` and `max_step_difference`.
    """
    import keras
    from ai_edge_litert.interpreter import Interpreter

    from tfquant.layers import (
        QuantActivation,
        QuantAdd,
        QuantAveragePooling2D,
        QuantConcatenate,
        QuantMultiply,
    )

    def grid_step(layer) -> float | None:
        if isinstance(layer, (QuantActivation, QuantAdd, QuantConcatenate, QuantMultiply)):
            return float(np.ravel(layer.quantizer.inference_form().scale)[0])
        if isinstance(layer, QuantAveragePooling2D) and layer.requantization is not None:
            return layer.requantization["scale"]  # it keeps its input's grid
        return None

    layers = [layer for layer in keras_model.layers if grid_step(layer) is not None]
    if not layers:
        return []
    probe = keras.Model(keras_model.inputs, [layer.output for layer in layers])
    outputs = keras_outputs(probe, x)
    outputs = outputs if isinstance(outputs, list) else [outputs]
    interp = Interpreter(model_content=content, experimental_preserve_all_tensors=True)
    fed = quantized_input(keras_model, x, content)
    feed_input(interp, x)
    if fed is not None:
        interp.set_tensor(interp.get_input_details()[0]["index"], fed)
    interp.invoke()
    tensors = [t for t in interp.get_tensor_details() if t["dtype"] == np.int8]
    names = {layer.name for layer in layers}

    def scopes(tensor) -> set[str]:
        # "conv/BiasAdd;concat__input1/depthwise" -> {"conv", "concat"}
        return {p.split("/")[0].split("__input")[0] for p in tensor["name"].split(";")}

    rows = []
    for layer, output in zip(layers, outputs, strict=True):
        scale = grid_step(layer)
        same_grid = [
            t
            for t in tensors
            if int(np.prod(t["shape"])) == output.size
            and np.isclose(t["quantization"][0], scale, rtol=1e-5)
        ]
        # A tensor of the layer's own shape before its reshaped or transposed
        # copies (a global average pooling moves the channels in front).
        same_shape = [t for t in same_grid if tuple(t["shape"][1:]) == output.shape[1:]]
        same_grid = same_shape or same_grid
        # The tensor carries the layer's name, or that of the op computing it
        # (a kernel or affine op with the requantization fused in).
        producer = layer._inbound_nodes[0].input_tensors[0]._keras_history[0]
        named = [t for t in same_grid if layer.name in scopes(t)] or [
            t for t in same_grid if producer.name in scopes(t)
        ]
        # Unnamed (the converter named it after the op that computes it):
        # any tensor on the grid that no other quantizer's scope claims.
        unclaimed = [t for t in same_grid if not scopes(t) & (names - {layer.name})]
        chosen = (named or unclaimed or [None])[-1]
        row = {"layer": layer.name, "tensor": None if chosen is None else chosen["name"]}
        if chosen is not None:
            step, zero_point = chosen["quantization"]
            codes = interp.get_tensor(chosen["index"]).astype(np.int64).reshape(output.shape)
            expected = np.clip(np.round(output / step) + zero_point, -128, 127).astype(np.int64)
            difference = np.abs(codes - expected)
            row["identical_codes"] = float((difference == 0).mean())
            row["max_step_difference"] = int(difference.max())
        rows.append(row)
    return rows


def format_layers(rows: list[dict]) -> str:
    """`compare_layers` output as a text table."""
    lines = [f"{'layer':32s} {'identical codes':>16s} {'max steps':>10s}"]
    for row in rows:
        if row["tensor"] is None:
            lines.append(f"{row['layer']:32s} {'(merged)':>16s} {'':>10s}")
        else:
            lines.append(
                f"{row['layer']:32s} {100 * row['identical_codes']:15.2f}% "
                f"{row['max_step_difference']:10d}"
            )
    return "\n".join(lines)
