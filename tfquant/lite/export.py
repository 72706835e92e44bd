"""Export: lower, convert, check, verify, then write atomically."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from tfquant import fileio, precision
from tfquant.lite import inspect as lite_inspect
from tfquant.lite import verify
from tfquant.lite.arm64 import Arm64Error
from tfquant.lite.lower import (
    TARGETS,
    ExportError,
    align_biases,
    align_levels,
    lower_model,
)
from tfquant.lite.products import align_products
from tfquant.lite.rounding import match_integer_kernels


@dataclasses.dataclass
class ExportResult:
    content: bytes
    report: dict


def convert_lowered(lowered, output_type: str = "int8") -> bytes:
    """Converts a lowered graph to a fully integer TFLite flatbuffer."""
    concrete = lowered.function.get_concrete_function()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], lowered.function)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8 if output_type == "int8" else tf.float32
    return converter.convert()


def convert_post_training(model, representative: np.ndarray, output_type: str = "int8") -> bytes:
    """Standard full-integer post-training quantization of a float model."""

    def dataset():
        for i in range(min(len(representative), 256)):
            yield [representative[i : i + 1].astype(np.float32)]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = dataset
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8 if output_type == "int8" else tf.float32
    return converter.convert()


def _has_quantizers(model) -> bool:
    from tfquant.layers import QuantActivation, QuantConv2D, QuantDense, QuantDepthwiseConv2D

    return any(
        isinstance(layer, (QuantConv2D, QuantDepthwiseConv2D, QuantDense, QuantActivation))
        for layer in model.layers
    )


def export_model(
    model,
    x: np.ndarray,
    y: np.ndarray | None = None,
    output_type: str = "int8",
    min_agreement: float | None = None,
    min_identical_codes: float | None = None,
    allow_mismatch: bool = False,
    post_training: bool = False,
    int4_weights: bool = False,
    align: bool = True,
    target: str = "arm64",
    targets: Sequence[str] | None = None,
    runtimes: Sequence[str] = ("default", "builtin"),
    arm64_cpu: str | None = None,
) -> ExportResult:
    """Exports a quantized Keras model to integer TFLite and verifies it.

    With `align` (the default) it changes `model` in place, so that the
    Keras model computes what the file computes: biases, DQ levels and
    product grids move onto what the integer file can hold, and inference
    gets the file's exact requantization (see `align` below). The report's
    `model_changes` lists every layer changed and by how much. Evaluate the
    model after export for the accuracy the file has; to keep the model as
    it was, export a copy (`keras.models.clone_model`, then `set_weights`).

    Args:
      model: a quantized model (from `tfquant.quantize_model` or built from
        tfquant layers), or a float model with `post_training=True`.
      x, y: verification inputs (and labels, optional); with
        `post_training` also the representative data.
      output_type: "int8" or "float32".
      min_agreement: smallest acceptable top-1 agreement with Keras; default
        1.0 for a quantized model (the file computes the Keras model's
        codes by construction), 0.99 with `post_training`.
      min_identical_codes: smallest acceptable share of output codes
        identical to the Keras model's; default 0.999 for a quantized model
        (a near-tie the emulation does not cover, see docs/EXPORT.md, may
        flip one), not checked with `post_training`.
      allow_mismatch: return the model even below `min_agreement`.
      post_training: the float baseline: standard post-training quantization.
      int4_weights: store 2..4-bit weight codes as packed INT4 (0.5 byte a
        weight) instead of INT8. INT8-weight layers run in XNNPACK, LiteRT's
        default delegate, which computes the same codes on every CPU; INT4
        convolutions run in TFLite's builtin kernels, which are slower and
        round differently on arm64 and x86, so an INT4 file is exact on
        `target` only. Hence INT8 by default.
      target: the CPU architecture the file is for, "arm64" (Android phones,
        the default) or "x86": `align` makes the Keras model round like that
        CPU's kernels (it matters only for INT4 convolutions).
      align: first move the model's biases onto TFLite's int32 bias grid, in
        place (`tfquant.lite.align_biases`: at most half a bias step per
        channel), and, after conversion, make its inference round exactly as
        the file's integer kernels on `target`
        (`tfquant.lite.match_integer_kernels`), so the Keras model computes
        what the file computes; each layer's largest bias shift is in
        the report as `bias_shift_max`. Learned non-uniform weight levels (DQ)
        are first rounded onto their int8 codes (`tfquant.lite.align_levels`,
        at most half an int8 step, reported as `level_shift_max` in int8 steps).
        Each `QuantMultiply`'s output grid is moved so that its integer MUL
        rounds alike on x86 and arm64 (`tfquant.lite.align_products`; the
        relative change of each step is in the report as `products`).
      targets: the CPU architectures whose LiteRT kernels run the file for
        the verification: "x86" and/or "arm64". Default: the host's own, and
        `target` too when the file has INT4 weights. On an x86 host, "arm64"
        runs under emulation
        (`tfquant.lite.arm64`; build it once with `make arm64`). The bar
        applies to each target.
      runtimes: the LiteRT runtimes run on each target: "default" (with the
        XNNPACK delegate, what an app gets unless it opts out), "builtin"
        (optimized builtin kernels only), "reference". `min_agreement`
        applies to "default", always run; the others are reported.
      arm64_cpu: QEMU's CPU model for the emulated arm64 run (default
        `tfquant.lite.arm64.DEFAULT_CPU`).

    Returns:
      The flatbuffer and a report dict (per layer, size, verification).

    Raises:
      ExportError: the model cannot be lowered, the result is not fully
        integer, or it disagrees with Keras.
    """
    if target not in TARGETS:
        raise ExportError(f"target must be one of {TARGETS}, got {target!r}")
    if min_agreement is None:
        min_agreement = 0.99 if post_training else 1.0
    if min_identical_codes is None:
        min_identical_codes = 0.0 if post_training else 0.999
    for name, value in (
        ("min_agreement", min_agreement),
        ("min_identical_codes", min_identical_codes),
    ):
        if not 0.0 <= value <= 1.0:
            raise ExportError(f"{name} must be in [0, 1], got {value}")
    if output_type not in ("int8", "float32"):
        raise ExportError(f"output_type must be 'int8' or 'float32', got {output_type!r}")
    low = precision.reduced_precision_layers(model)
    if low:
        raise ExportError(
            f"model {model.name!r} computes in reduced precision (layer {low[0]!r}: "
            f"{model.get_layer(low[0]).compute_dtype}); the verification needs float32: export "
            "tfquant.precision.float32_copy(model)"
        )
    quantized = _has_quantizers(model)
    _check_finite(model)
    if post_training:
        if quantized:
            raise ExportError("--post_training is for float models; this model has quantizers")
        content = convert_post_training(model, x, output_type)
        layers = []
    else:
        if not quantized:
            raise ExportError(
                f"model {model.name!r} has no quantizers: quantize it with "
                "tfquant.quantize_model(model, scheme) and fine-tune it, or export it with "
                "post-training integer quantization (post_training=True / --post_training "
                "with --data)"
            )
        level_shifts = align_levels(model) if align else {}
        # Product grids first: they are input grids of the kernels whose
        # biases align_biases then puts on the int32 grid.
        products = align_products(model) if align else {}
        shifts = align_biases(model) if align else {}
        lowered = lower_model(model, int4_weights=int4_weights)
        content = convert_lowered(lowered, output_type)
        requantized = match_integer_kernels(model, content, target) if align else {}
        for layer in lowered.layers:
            if layer.name in shifts:
                layer.bias_shift_max = shifts[layer.name]
            if layer.name in level_shifts:
                layer.level_shift_max = level_shifts[layer.name]
        layers = [layer.to_dict() for layer in lowered.layers]
        _check_steps(layers)
    problems = lite_inspect.non_integer_ops(content)
    if problems:
        raise ExportError("the converted model is not fully integer:\n  " + "\n  ".join(problems))
    report_weights = [
        {"op": w["op"], "storage": w["storage"], "channels": int(w["scales"].size)}
        for w in lite_inspect.weight_tensors(content)
    ]
    int4 = any(w["storage"] == "INT4" for w in report_weights)
    if targets is None:
        targets = (verify.host_target(), target) if int4 else (verify.host_target(),)
    targets = tuple(dict.fromkeys(targets))
    runtimes = tuple(dict.fromkeys((verify.CHECKED_RUNTIME, *runtimes)))
    reference = verify.keras_outputs(model, x)
    try:
        fed = None if post_training else verify.quantized_input(model, x, content)
        by_target = verify.compare_on_targets(
            reference, content, x, y, targets, runtimes, arm64_cpu, fed
        )
    except Arm64Error as error:
        hint = (
            " (INT4 convolutions round differently per CPU: verify on the target, or store "
            "INT8 weights, which compute the same on every CPU)"
            if target == "arm64" and int4
            else ""
        )
        raise ExportError(f"cannot verify on arm64: {error}{hint}") from None
    except ExportError:
        raise
    except ValueError as error:  # LiteRT refused the file, or a bad target / runtime
        steps = [(r["activation_scale"], r["name"]) for r in layers if "activation_scale" in r]
        step, name = min(steps, default=(1.0, None))
        hint = (
            f" (layer {name!r} has a quantization step of {step:.3g}: its quantizer was "
            "calibrated on (nearly) constant values)"
            if step < 1e-5
            else ""
        )
        raise ExportError(f"cannot verify the file: {error}{hint}") from None
    agreement = by_target[targets[0]][verify.CHECKED_RUNTIME]
    report = {
        "mode": "post_training" if post_training else "quantization_aware",
        "output_type": output_type,
        "size_bytes": len(content),
        "layers": layers,
        "weights": report_weights,
        "target": target,
        "verification": agreement.to_dict(),
        "targets": {
            target: {runtime: a.to_dict() for runtime, a in by_runtime.items()}
            for target, by_runtime in by_target.items()
        },
        "min_agreement": min_agreement,
        "min_identical_codes": min_identical_codes,
    }
    if not post_training and align:
        report["products"] = products
        report["model_changes"] = {
            "bias_shifted": {k: float(v) for k, v in shifts.items() if v},
            "levels_rounded": {k: float(v) for k, v in level_shifts.items() if v},
            "product_grids_moved": {
                k: float(v) for k, v in products.items() if v and np.isfinite(v)
            },
            "requantization_set": sorted(requantized),
        }
    for target, by_runtime in by_target.items():
        checked = by_runtime[verify.CHECKED_RUNTIME]
        for what, found, bar in (
            ("top-1 agreement", checked.top1_agreement, min_agreement),
            ("identical output codes", checked.identical_output_codes, min_identical_codes),
        ):
            if found < bar and not allow_mismatch:
                raise ExportError(
                    f"{what} between TFLite on {target} ({verify.CHECKED_RUNTIME} runtime) and "
                    f"Keras is {100 * found:.2f}% on {checked.samples} samples, below the "
                    f"required {100 * bar:.2f}% (nothing written; pass allow_mismatch / "
                    "--allow_mismatch to write it anyway)"
                )
    return ExportResult(content, report)


# Below this an int8 requantization multiplier leaves the range LiteRT's
# kernels take, and some abort the process instead of reporting an error.
_SMALLEST_STEP = 1e-7


def _check_steps(layers: list[dict]) -> None:
    steps = [(r["activation_scale"], r["name"]) for r in layers if "activation_scale" in r]
    step, name = min(steps, default=(1.0, None))
    if step < _SMALLEST_STEP:
        raise ExportError(
            f"layer {name!r} has a quantization step of {step:.3g}: its quantizer was "
            "calibrated on (nearly) constant values, and LiteRT cannot run the file; "
            "calibrate it on data that reaches the layer, or train it further"
        )


def _check_finite(model: keras.Model) -> None:
    """One error naming the first variable that holds NaN or inf (a diverged
    training run), before any of it reaches a quantization range."""
    for layer in model.layers:
        for variable in layer.weights:
            values = np.asarray(keras.ops.convert_to_numpy(variable))
            if values.dtype.kind == "f" and not np.isfinite(values).all():
                bad = int(values.size - np.isfinite(values).sum())
                raise ExportError(
                    f"layer {layer.name!r}: variable {variable.path!r} holds NaN or inf "
                    f"({bad} of {values.size} values); the model diverged in training "
                    "(a lower learning rate, or gradient clipping, usually helps)"
                )


def write_atomically(path: str, data: bytes | str) -> None:
    """Writes to a temporary file in the same directory, then renames it."""
    try:
        fileio.write_atomically(path, data)
    except FileNotFoundError as error:
        raise ExportError(str(error)) from None


def format_report(report: dict) -> str:
    """The human-readable report written beside the .tflite file."""
    lines = [
        f"size: {report['size_bytes'] / 1024:.1f} KiB ({report['mode']}, "
        f"{report['output_type']} output)"
    ]
    if report["layers"]:
        lines.append(
            f"{'layer':<28} {'kind':<22} {'w bits':>6} {'storage':>7} "
            f"{'act bits':>8} {'act zp':>6}  scale(s)"
        )
        for layer in report["layers"]:
            scales = layer.get("weight_scales") or (
                [layer["activation_scale"]] if "activation_scale" in layer else []
            )
            shown = ", ".join(f"{s:.4g}" for s in scales[:3]) + (" ..." if len(scales) > 3 else "")
            lines.append(
                f"{layer['name']:<28} {layer['kind']:<22} {layer.get('weight_bits', ''):>6} "
                f"{layer.get('weight_storage', ''):>7} {layer.get('activation_bits', ''):>8} "
                f"{layer.get('activation_zero_point', ''):>6}  {shown}"
            )
    v = report["verification"]
    lines.append(
        f"verification on {v['samples']} samples: "
        f"top-1 agreement {100 * v['top1_agreement']:.2f}%, "
        f"identical output codes {100 * v['identical_output_codes']:.2f}%, max difference "
        f"{v['max_output_step_difference']} step(s)"
    )
    targets = report.get("targets", {})
    if sum(len(by_runtime) for by_runtime in targets.values()) > 1:
        lines.append(
            f"  {'target':<7} {'runtime':<10} {'top-1 agr.':>10} {'identical':>10} {'max diff':>8}"
        )
        for target, by_runtime in targets.items():
            for runtime, a in by_runtime.items():
                lines.append(
                    f"  {target:<7} {runtime:<10} {100 * a['top1_agreement']:9.2f}% "
                    f"{100 * a['identical_output_codes']:9.2f}% "
                    f"{a['max_output_step_difference']:8d}"
                )
    if "tflite_accuracy" in v:
        lines.append(
            f"accuracy: Keras {100 * v['keras_accuracy']:.2f}%, "
            f"TFLite {100 * v['tflite_accuracy']:.2f}%"
        )
    changes = report.get("model_changes")
    if changes:
        lines.append(
            "the Keras model was aligned with the file in place: "
            f"{len(changes['bias_shifted'])} bias(es) shifted, "
            f"{len(changes['levels_rounded'])} level set(s) rounded, "
            f"{len(changes['product_grids_moved'])} product grid(s) moved, "
            f"{len(changes['requantization_set'])} layer(s) given the file's requantization"
        )
    return "\n".join(lines)


def save_export(result: ExportResult, output_path: str) -> None:
    """Writes the .tflite file, `<output>.json` and `<output>.txt`, each atomically."""
    base = os.path.splitext(output_path)[0]
    write_atomically(output_path, result.content)
    write_atomically(base + ".json", json.dumps(result.report, indent=2))
    write_atomically(base + ".txt", format_report(result.report) + "\n")


__all__ = [
    "ExportError",
    "ExportResult",
    "export_model",
    "format_report",
    "save_export",
    "write_atomically",
]
