"""Lowering a quantized Keras model to an integer-ready TensorFlow graph.

The lowered graph computes what the Keras model computes in inference mode,
written so that `tf.lite.TFLiteConverter` turns it into a fully integer model
with no calibration data:

* BatchNormalization after a Conv2D/DepthwiseConv2D/Dense is folded into its
  kernel and bias. The kernel's integer codes k are kept and only the scale
  changes, per output channel: w = k * (s * gamma / sqrt(var + eps)).
* Each kernel becomes its codes times the folded scale behind a FakeQuant
  with min/max = -+Q * |scale| (Q = 7 for 2..4-bit weights, stored as packed
  INT4; Q = 127 for 5..8-bit weights, INT8), narrow range: the converter
  recovers exactly the codes k (up to a sign where gamma < 0). Conv kernels
  are quantized per output channel; Dense kernels per tensor (the converter
  transposes FULLY_CONNECTED weights and cannot keep a per-channel axis
  there), so a BatchNorm after a Dense must not make the channel scales
  differ.
* Each activation quantizer becomes an 8-bit FakeQuant holding its b-bit codes
  exactly: for unsigned codes at step s, min = -(256 - 2^b) s and max =
  (2^b - 1) s, so the int8 tensor has scale s and zero point 128 - 2^b; the
  ReLU before it (fused into the producer) clamps below at that zero point
  and int8 saturation clamps above. An offset (QIL's c - d) is subtracted in
  the producer's bias when the producer feeds only that quantizer; otherwise
  it is an explicit subtraction.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from tfquant import graph
from tfquant.layers import (
    QuantActivation,
    QuantAdd,
    QuantAveragePooling2D,
    QuantConcatenate,
    QuantConv2D,
    QuantDense,
    QuantDepthwiseConv2D,
    QuantMultiply,
)
from tfquant.lite.integer_ops import (
    MAX_IDENTITY_SITES,
    PASS_THROUGH,
    ExportError,
    activation_range,
    emit_plain,
    fake_quant_activation,
    int8_zero_point,
    kernel_maker,
    level_scales,
    nearest_int8_codes,
    offset_relu,
    requantize_through_identity,
)
from tfquant.quantizers import InferenceForm

_L = keras.layers
_KERNEL_LAYERS = (QuantConv2D, QuantDepthwiseConv2D, QuantDense)
# Layers whose output is a quantizer's grid.
_QUANTIZING = (QuantActivation, QuantAdd, QuantConcatenate, QuantMultiply)


@dataclasses.dataclass
class LayerReport:
    """What the exporter did with one layer."""

    name: str
    kind: str
    weight_bits: int | None = None
    weight_storage: str | None = None
    weight_scales: list[float] | None = None
    folded_batch_norm: str | None = None
    activation_bits: int | None = None
    activation_scale: float | None = None
    activation_zero_point: int | None = None
    folded_offset: float | None = None
    # The int32 bias step of TFLite (input step x weight step), largest channel.
    bias_step: float | None = None
    bias_shift_max: float | None = None
    # Non-uniform weight levels mapped to int8 codes: the largest and the RMS
    # distance between a weight's level and its code, in units of the code's scale.
    level_mapping_max_error: float | None = None
    level_mapping_rms_error: float | None = None
    level_shift_max: float | None = None
    codes: np.ndarray | None = dataclasses.field(default=None, repr=False)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("codes")
        return {k: v for k, v in out.items() if v is not None}


@dataclasses.dataclass
class LoweredModel:
    """A tf.function computing the integer-ready graph, and the per-layer report."""

    function: tf.types.experimental.PolymorphicFunction
    input_spec: tf.TensorSpec
    layers: list[LayerReport]


def lower_model(model: keras.Model, int4_weights: bool = True) -> LoweredModel:
    """Lowers a quantized functional or Sequential model (see module docstring).

    Args:
      model: the quantized Keras model.
      int4_weights: store 2..4-bit weight codes as packed INT4 (default); with
        False they are stored as INT8 (same codes, for runtimes without INT4
        kernels, and to measure what INT4 saves).

    Raises:
      ExportError: a layer that cannot be lowered, named in the message.
    """
    model, order, consumers = _prepare(model)
    plan = _plan(order, consumers, int4_weights)

    input_shape = tuple(model.inputs[0].shape)
    spec = tf.TensorSpec((None,) + input_shape[1:], tf.float32, name="input")
    outputs_ref = model.outputs[0]

    @tf.function(input_signature=[spec])
    def lowered(x):
        values = {id(model.inputs[0]): x}
        for operation, node in order:
            if isinstance(operation, _L.InputLayer):
                continue
            args = [values[id(t)] for t in node.input_tensors]
            # The layer's name becomes part of its TFLite tensors' names.
            with tf.name_scope(operation.name):
                out = plan.emit(operation, args)
            for tensor in node.outputs:
                values[id(tensor)] = out
        return values[id(outputs_ref)]

    return LoweredModel(lowered, spec, plan.reports)


def _prepare(model):
    """The functional form of `model`, its nodes in order and their consumers."""
    if not isinstance(model, keras.Model):
        raise ExportError(f"expected a keras.Model, got {type(model).__name__}")
    if isinstance(model, keras.Sequential):
        if not model.inputs:
            raise ExportError(f"Sequential model {model.name!r} has no defined input")
        inputs = keras.Input(batch_shape=model.inputs[0].shape)
        x = inputs
        for layer in model.layers:
            x = layer(x)
        model = keras.Model(inputs, x)
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ExportError("the exporter supports models with one input and one output")
    order = graph.nodes_in_order(model)
    consumers = graph.consumers_of(order)
    if not any(isinstance(op, _KERNEL_LAYERS) for op, _ in order):
        raise ExportError(
            f"model {model.name!r} has no quantizers: quantize it with "
            "tfquant.quantize_model(model, scheme) and fine-tune, or export it with "
            "post-training integer quantization (--post_training with --data)"
        )
    return model, order, consumers


def align_biases(model: keras.Model) -> dict[str, float]:
    """Moves each layer's bias onto the int32 grid TFLite will store it on.

    TFLite keeps a convolution's bias in int32 at the accumulator's scale
    (input step x weight step), so a float bias is rounded by up to half that
    step; with 4-bit activations this flips about 1% of a layer's output
    codes against the Keras model. This shifts the Keras variables (the
    BatchNormalization beta when one is folded, else the layer's bias) by the
    same rounding, so both compute the same value. The shift is at most half
    a bias step, far below an activation step; accuracy does not move.

    Idempotent. Layers whose input step is not fixed by a quantizer
    upstream, or with no variable to hold the shift, are left alone.

    Returns:
      The largest absolute shift per aligned layer, in the folded bias's units.
    """
    _, order, consumers = _prepare(model)
    plan = _plan(order, consumers, True)
    shifts = {}
    for layer, batch_norm, shift in plan.bias_shifts.values():
        if not np.any(shift):
            shifts[layer.name] = 0.0
            continue
        if batch_norm is not None and batch_norm[0].center:
            variable, delta = batch_norm[0].beta, shift
        elif getattr(layer, "use_bias", False) and (
            batch_norm is None or np.all(batch_norm[1] != 0)
        ):
            variable = layer.bias
            delta = shift if batch_norm is None else shift / batch_norm[1]
        else:
            continue
        old = np.asarray(variable.numpy())
        new = (old.astype(np.float64) + delta).astype(old.dtype)
        if np.array_equal(new, old):  # already on the grid, up to float32 round-off
            shifts[layer.name] = 0.0
            continue
        variable.assign(new)
        shifts[layer.name] = float(np.abs(shift).max())
    return shifts


def align_levels(model: keras.Model) -> dict[str, float]:
    """Moves learned (non-uniform) weight levels onto the int8 grid TFLite stores them on.

    The exporter stores such weights as the nearest int8 code of each level at
    the scale max|L| / 127 (`level_scales`); this rounds the Keras levels
    themselves to those codes, so both models use the same weights. A level
    moves by at most half an int8 step (1/254 of the largest level); the
    largest level and so the scale stay put. Idempotent; uniform levels and
    other quantizers are left alone.

    Returns:
      Per aligned layer, the largest shift of a level in int8 steps.
    """
    _, order, _ = _prepare(model)
    shifts = {}
    for operation, _ in order:
        quantizer = getattr(operation, "kernel_quantizer", None)
        variable = getattr(quantizer, "levels", None)
        if not isinstance(variable, keras.Variable) or quantizer.inference_form().levels is None:
            continue
        levels = np.asarray(variable.numpy(), np.float64)
        scale = level_scales(levels, operation)[:, None]
        snapped = np.clip(np.round(levels / scale), -127, 127) * scale
        variable.assign(snapped.astype(np.float32))
        shifts[operation.name] = float((np.abs(snapped - levels) / scale).max())
    if shifts:
        forget_traced_functions(model)
    return shifts


def forget_traced_functions(model: keras.Model) -> None:
    """Drops the model's traced predict / evaluate / train functions: they
    hold constants (levels, requantization rules) read while tracing, so the
    next call traces again with the current ones."""
    for name in ("predict_function", "test_function", "train_function"):
        if getattr(model, name, None) is not None:
            setattr(model, name, None)


# CPU architectures whose kernels the exporter can align a model to.
TARGETS = ("arm64", "x86")


def integer_producers(model: keras.Model) -> list[tuple]:
    """Where an integer op of the file requantizes straight onto a quantizer's
    grid: (layer, the name the op's tensors carry in the file, what) with
    what "activation" (a QuantActivation computed by a quantized Conv2D /
    DepthwiseConv2D / Dense, through a folded BatchNormalization, named after
    the kernel layer; or by the identity convolution between two quantizers
    in a row, named after the activation), "add" (a QuantAdd) or "input" (a
    kernel layer's input quantizer fed by an average pooling, which lowers
    to a depthwise convolution, or a global one over more than 5x5 to a
    fully connected layer, named after the pooling layer), "identity" (a
    QuantActivation right after another quantizer: an identity convolution
    named after it), "pool" (a QuantAveragePooling2D), or the index
    of a QuantConcatenate's input that an identity convolution moves onto
    its grid (named `concat_input_scope`)."""
    _, order, consumers = _prepare(model)
    plan = _plan(order, consumers, True)
    found = [
        (activation, layer.name, "activation")
        for layer, activation in plan.kernel_for_activation.values()
    ]
    for operation, node in order:
        if isinstance(operation, QuantAveragePooling2D):
            found.append((operation, operation.name, "pool"))
            continue
        for index, offset in enumerate(plan.concat_inputs.get(id(operation), ())):
            if offset is not None:
                found.append((operation, concat_input_scope(operation, index), index))
        if id(operation) in plan.after_quantizer:
            found.append((operation, operation.name, "identity"))
        elif isinstance(operation, QuantAdd):
            found.append((operation, operation.name, "add"))
        elif isinstance(operation, QuantMultiply):
            found.append((operation, operation.name, "mul"))
        elif isinstance(operation, QuantActivation) and operation.activation_name == "sigmoid":
            found.append((operation, operation.name, "logistic"))
        elif isinstance(operation, (*_KERNEL_LAYERS, QuantActivation)):
            if isinstance(operation, _KERNEL_LAYERS) and operation.input_quantizer is None:
                continue
            producer = _upstream(node.input_tensors[0], _SHAPE_ONLY)
            averaging = (_L.GlobalAveragePooling2D, _L.AveragePooling2D)
            if isinstance(producer, averaging) and not isinstance(producer, QuantAveragePooling2D):
                what = "input" if isinstance(operation, _KERNEL_LAYERS) else "activation"
                found.append((operation, producer.name, what))
    return found


class _Plan:
    """Per-layer constants decided before tracing (folding, codes, ranges)."""

    def __init__(self):
        self.kernels: dict[int, tuple] = {}
        self.skip: set[int] = set()
        self.folded_offsets: set[int] = set()
        self.reports: list[LayerReport] = []
        self.activation_forms: dict[int, InferenceForm] = {}
        self.int4_weights = True
        # QuantActivations right after another quantizer, with their site number.
        self.after_quantizer: dict[int, int] = {}
        self.bias_shifts: dict[int, tuple] = {}
        self.kernel_for_activation: dict[int, tuple] = {}
        self.affines: dict[int, tuple] = {}
        # Per QuantConcatenate, per input: None (already on its grid) or
        # (offset to subtract while moving it onto the grid, site number).
        self.concat_inputs: dict[int, list] = {}
        self.identity_reads: dict[int, int] = {}

    def identity_site(self, tensor) -> int:
        """0, 1, 2, ... for successive identity convolutions reading `tensor`."""
        while isinstance(graph.producer(tensor), PASS_THROUGH):
            tensor = graph.producer(tensor)._inbound_nodes[0].input_tensors[0]
        site = self.identity_reads.get(id(tensor), 0)
        if site >= MAX_IDENTITY_SITES:
            raise ExportError(
                f"more than {MAX_IDENTITY_SITES} quantizers read one tensor straight from another"
            )
        self.identity_reads[id(tensor)] = site + 1
        return site

    def emit(self, operation, args):
        key = id(operation)
        if key in self.skip:
            return args[0]
        if key in self.affines:
            return self._emit_affine(operation, args[0])
        if isinstance(operation, _KERNEL_LAYERS):
            return self._emit_kernel(operation, args[0])
        if isinstance(operation, QuantActivation):
            return self._emit_activation(operation, args[0])
        if isinstance(operation, QuantConcatenate):
            return self._emit_concatenate(operation, args)
        if isinstance(operation, QuantAveragePooling2D):
            # AVERAGE_POOL_2D keeps its input's grid (the layer rounds so).
            form = _upstream_form(self, operation)
            where = f"layer {operation.name!r}"
            x = fake_quant_activation(args[0], form, where)
            y = tf.nn.avg_pool2d(
                x, operation.pool_size, operation.strides, operation.padding.upper()
            )
            return fake_quant_activation(y, form, where)
        if isinstance(operation, QuantMultiply):
            # MUL reads both inputs' int8 codes and requantizes the product once.
            form = self.activation_forms[id(operation)]
            y = args[0][0] * args[0][1] if len(args) == 1 else args[0] * args[1]
            if form.offset:
                y = y - form.offset
            return fake_quant_activation(y, form, f"layer {operation.name!r}")
        if isinstance(operation, QuantAdd):
            form = self.activation_forms[id(operation)]
            y = emit_plain(operation, args)
            if form.offset:
                y = y - form.offset
            return fake_quant_activation(y, form, f"layer {operation.name!r}")
        return emit_plain(operation, args)

    def _emit_concatenate(self, layer, args):
        """Inputs on another grid are moved onto the output's by an identity
        convolution (one rounding, in XNNPACK); CONCATENATION then copies."""
        form = self.activation_forms[id(layer)]
        where = f"layer {layer.name!r}"
        parts = []
        for index, (x, move) in enumerate(zip(args, self.concat_inputs[id(layer)], strict=True)):
            if move is not None:
                # A scope of its own (absolute: trailing "/"), by which
                # `match_integer_kernels` finds this op in the file.
                with tf.name_scope(concat_input_scope(layer, index) + "/"):
                    x = requantize_through_identity(x, *move)
                    x = fake_quant_activation(x, form, where)
            parts.append(x)
        return fake_quant_activation(tf.concat(parts, axis=layer.axis), form, where)

    def _emit_affine(self, layer, x):
        """A per-channel x * a + b as a 1x1 depthwise convolution with int8
        weights +-127 at scale |a| / 127 (exact) and an int32 bias."""
        make_kernel, bias = self.affines[id(layer)]
        flat = x.shape.rank != 4
        channels = int(x.shape[-1])
        y = tf.reshape(x, (-1, 1, 1, channels)) if flat else x
        y = tf.nn.depthwise_conv2d(y, make_kernel(), (1, 1, 1, 1), "VALID") + tf.constant(bias)
        return tf.reshape(y, (-1, channels)) if flat else y

    def _emit_kernel(self, layer, x):
        make_kernel, bias, input_form = self.kernels[id(layer)]
        kernel = make_kernel()
        if input_form is not None:
            if input_form.offset:
                x = x - input_form.offset
            x = fake_quant_activation(x, input_form, f"layer {layer.name!r} input")
        if isinstance(layer, QuantDense):
            y = tf.matmul(x, kernel)
        elif isinstance(layer, QuantDepthwiseConv2D):
            y = tf.nn.depthwise_conv2d(
                x,
                kernel,
                (1,) + tuple(layer.strides) + (1,),
                layer.padding.upper(),
                dilations=layer.dilation_rate,
            )
        else:
            y = tf.nn.conv2d(
                x, kernel, layer.strides, layer.padding.upper(), dilations=layer.dilation_rate
            )
        return y + tf.constant(bias)

    def _emit_activation(self, layer, x):
        form = self.activation_forms[id(layer)]
        if id(layer) in self.after_quantizer:
            # Two quantizers in a row: the converter would keep only the
            # second grid, so the first one's rounding gets its own op.
            x = requantize_through_identity(x, form.offset, self.after_quantizer[id(layer)])
        elif form.offset and id(layer) not in self.folded_offsets:
            x = x - form.offset
        if layer.activation_name in ("relu", "relu6"):
            x = offset_relu(x, form, 6.0 if layer.activation_name == "relu6" else None)
        elif layer.activation_name == "softmax":
            x = tf.nn.softmax(x)
        elif layer.activation_name == "sigmoid":
            x = tf.sigmoid(x)
        return fake_quant_activation(x, form, f"layer {layer.name!r}")


def concat_input_scope(layer, index: int) -> str:
    """The name scope of the op that moves input `index` of a QuantConcatenate
    onto its grid."""
    return f"{layer.name}__input{index}"


_SHAPE_ONLY = (_L.Flatten, _L.Reshape, *PASS_THROUGH)

_GRID_KEEPING = (
    QuantAveragePooling2D,
    _L.MaxPooling2D,
    _L.GlobalMaxPooling2D,
    _L.Flatten,
    _L.Reshape,
    _L.ZeroPadding2D,
    _L.Cropping2D,
    *PASS_THROUGH,
)

_LOWERABLE = (
    _L.Add,
    QuantConcatenate,
    QuantMultiply,
    _L.MaxPooling2D,
    _L.GlobalMaxPooling2D,
    _L.AveragePooling2D,
    _L.GlobalAveragePooling2D,
    _L.Cropping2D,
    _L.Flatten,
    _L.Reshape,
    _L.ZeroPadding2D,
    _L.Activation,
    _L.InputLayer,
    _L.BatchNormalization,
    QuantActivation,
    *_KERNEL_LAYERS,
    *PASS_THROUGH,
)


def _plan(order, consumers, int4_weights: bool) -> _Plan:
    plan = _Plan()
    plan.int4_weights = int4_weights
    for operation, node in order:
        if not isinstance(operation, _LOWERABLE):
            raise ExportError(
                f"the exporter cannot lower layer {operation.name!r} of type "
                f"{type(operation).__name__}; supported: "
                + ", ".join(sorted({c.__name__ for c in _LOWERABLE}))
            )
        if isinstance(operation, _L.Activation) and getattr(
            operation.activation, "__name__", ""
        ) not in ("linear", "softmax", "relu"):
            raise ExportError(
                f"cannot lower activation layer {operation.name!r} "
                f"({operation.activation.__name__})"
            )
        if isinstance(operation, _QUANTIZING):
            form = operation.quantizer.inference_form()
            activation_range(form, f"layer {operation.name!r}")
            plan.activation_forms[id(operation)] = form
            if isinstance(operation, QuantConcatenate):
                plan.concat_inputs[id(operation)] = [
                    _concat_input_offset(plan, operation, tensor, form)
                    for tensor in node.input_tensors
                ]
            producer = graph.producer(node.input_tensors[0])
            if (
                isinstance(operation, QuantActivation)
                # LOGISTIC and SOFTMAX read the codes
                and operation.activation_name not in ("sigmoid", "softmax")
                and isinstance(producer, _QUANTIZING)
            ):
                plan.after_quantizer[id(operation)] = plan.identity_site(node.input_tensors[0])
            plan.reports.append(
                LayerReport(
                    name=operation.name,
                    kind=type(operation).__name__,
                    activation_bits=form.bits,
                    activation_scale=float(form.scale),
                    activation_zero_point=int8_zero_point(form),
                )
            )
    for operation, node in order:
        if isinstance(operation, _KERNEL_LAYERS):
            _plan_kernel(plan, operation, node, consumers)
    for operation, node in order:
        if isinstance(operation, _L.BatchNormalization) and id(operation) not in plan.skip:
            _plan_affine(plan, operation, node, consumers)
    return plan


def _plan_affine(plan: _Plan, layer, node, consumers):
    """A BatchNormalization that no kernel layer absorbs: its inference form
    x * a + b per channel, lowered as a 1x1 depthwise convolution (integer,
    and inside XNNPACK) onto the grid of the quantizer that follows it."""
    where = f"BatchNormalization {layer.name!r}"
    if layer.axis not in (-1, len(layer.input.shape) - 1):
        raise ExportError(f"{where}: only the last (channels) axis can be lowered")
    input_scale = _input_scale(plan, node)
    follower = _sole_consumer(layer, consumers)
    if input_scale is None or not isinstance(follower, QuantActivation):
        raise ExportError(
            f"cannot lower {where}: it does not follow a quantized Conv2D, DepthwiseConv2D "
            "or Dense used only by it, and it is not between two quantizers (a quantized "
            "input, and a QuantActivation as its only consumer); tfquant.quantize_model "
            "places them"
        )
    channels = int(layer.moving_mean.shape[0])
    gamma = layer.gamma.numpy() if layer.scale else np.ones(channels)
    beta = layer.beta.numpy() if layer.center else np.zeros(channels)
    factor = np.asarray(gamma, np.float64) / np.sqrt(
        np.asarray(layer.moving_variance.numpy(), np.float64) + layer.epsilon
    )
    if not np.isfinite(factor).all() or not np.isfinite(beta).all():
        raise ExportError(f"{where}: its statistics or weights contain NaN or inf")
    bias = np.asarray(beta, np.float64) - np.asarray(layer.moving_mean.numpy(), np.float64) * factor
    codes = np.sign(factor) * 127.0
    magnitude = np.where(factor != 0, np.abs(factor) / 127.0, 1.0 / 127.0)
    plan.kernel_for_activation[id(follower)] = (layer, follower)
    offset = plan.activation_forms[id(follower)].offset
    report = LayerReport(
        name=layer.name,
        kind="BatchNormalization",
        weight_bits=8,
        weight_storage="INT8",
        weight_scales=[float(v) for v in magnitude],
    )
    if offset:
        bias = bias - offset
        plan.folded_offsets.add(id(follower))
        report.folded_offset = float(offset)
    grid = input_scale * magnitude
    report.bias_step = float(grid.max())
    plan.bias_shifts[id(layer)] = (layer, (layer, factor), np.round(bias / grid) * grid - bias)
    folded = (codes * magnitude).reshape(1, 1, 1, channels)
    make_kernel = kernel_maker(folded, magnitude, 127, final_shape=(1, 1, channels, 1))
    plan.affines[id(layer)] = (make_kernel, bias.astype(np.float32))
    plan.reports.append(report)


def _concat_input_offset(plan: _Plan, layer, tensor, form: InferenceForm) -> float | None:
    """None where `tensor` is already on `form`'s int8 grid, else the offset
    to subtract while requantizing it and a number distinct per
    requantization. A quantizer's output excludes its own offset (in Keras
    and lowered alike): the input's value is its step times its codes, and
    the concatenation's quantizer subtracts its offset from that."""
    upstream = _upstream(tensor, _GRID_KEEPING)
    if not isinstance(upstream, _QUANTIZING):
        raise ExportError(
            f"layer {layer.name!r}: an input of the concatenation is on no quantizer's grid "
            f"(it comes from {upstream.name!r}); tfquant.quantize_model places them"
        )
    source = plan.activation_forms[id(upstream)]
    same = activation_range(source, "input") == activation_range(form, "output")
    if same and not float(form.offset):
        return None
    return float(form.offset), plan.identity_site(tensor)


def _upstream_form(plan: _Plan, layer) -> InferenceForm:
    """The form of the quantizer whose grid `layer`'s input is on."""
    upstream = _upstream(layer._inbound_nodes[0].input_tensors[0], _GRID_KEEPING)
    if not isinstance(upstream, _QUANTIZING):
        raise ExportError(
            f"layer {layer.name!r}: its input is on no quantizer's grid (it comes from "
            f"{upstream.name!r}); tfquant.quantize_model places one"
        )
    return plan.activation_forms[id(upstream)]


def input_grid(layer, index: int = 0) -> dict:
    """The int8 grid of `layer`'s input `index`, {scale, zero_point}: that
    of the quantizer upstream (through layers that keep the grid). A
    quantizer's output excludes its offset, so the input's value is
    `scale * (code - zero_point)` whatever that offset is."""
    upstream = _upstream(layer._inbound_nodes[0].input_tensors[index], _GRID_KEEPING)
    if not isinstance(upstream, _QUANTIZING):
        raise ExportError(f"layer {layer.name!r}: its input is on no quantizer's grid")
    form = upstream.quantizer.inference_form()
    return {
        "scale": float(np.ravel(form.scale)[0]),
        "zero_point": int8_zero_point(form),
    }


def _input_scale(plan: _Plan, node) -> float | None:
    """The step of the int8 tensor a kernel layer reads, when a quantizer
    upstream fixes it (through layers that keep the grid), else None."""
    operation = _upstream(node.input_tensors[0], _GRID_KEEPING)
    if isinstance(operation, _QUANTIZING):
        return float(plan.activation_forms[id(operation)].scale)
    return None


def _upstream(tensor, through: tuple):
    """The operation that computed `tensor`, looking through layers of the
    types in `through` (each read on its first input)."""
    operation = graph.producer(tensor)
    while isinstance(operation, through):
        operation = graph.producer(operation._inbound_nodes[0].input_tensors[0])
    return operation


def _sole_consumer(operation, consumers):
    """The one layer that reads `operation`'s result (through layers that
    pass it unchanged at inference, e.g. Dropout), else None."""
    following = consumers.get(id(operation), [])
    while len(following) == 1 and isinstance(following[0], PASS_THROUGH):
        following = consumers.get(id(following[0]), [])
    return following[0] if len(following) == 1 else None


def _plan_kernel(plan: _Plan, layer, node, consumers):
    where = f"layer {layer.name!r}"
    if layer.kernel_quantizer is None:
        raise ExportError(f"{where} ({type(layer).__name__}) has no kernel quantizer")
    if layer.activation is not None and getattr(layer.activation, "__name__", "") != "linear":
        raise ExportError(
            f"{where}: fused activation {layer.activation.__name__!r} is not "
            "supported; use a QuantActivation after the layer"
        )
    kernel = np.asarray(layer.kernel.numpy(), np.float64)
    if not np.isfinite(kernel).all():
        raise ExportError(f"{where}: the kernel contains NaN or inf")
    quantized = np.asarray(layer.quantized_kernel(training=False).numpy(), np.float64)
    form = layer.kernel_quantizer.inference_form(kernel)
    if form.bits > 8:
        raise ExportError(f"{where}: weight bits must be <= 8 for TFLite, got {form.bits}")
    channels = (
        kernel.shape[-1]
        if not isinstance(layer, QuantDepthwiseConv2D)
        else (kernel.shape[2] * kernel.shape[3])
    )
    mapping_errors = None
    storage_bits = form.bits
    if form.is_uniform:
        codes = form.codes(quantized)
        scale = np.asarray(form.scale, np.float64)
        if np.abs(codes * scale - quantized).max() > 1e-4 * max(float(np.abs(scale).max()), 1e-12):
            raise ExportError(f"{where}: the quantized kernel is not codes x scale")
    else:
        codes, scale, mapping_errors = nearest_int8_codes(form, quantized, layer, channels, where)
        storage_bits = 8
    channel_scale = np.broadcast_to(scale.reshape(-1), (channels,)).astype(np.float64).copy()
    # An INT4 fully connected layer runs in XNNPACK (exact, the same on every
    # CPU) only with an even input depth. TFLite's own INT4 kernel, which runs
    # it otherwise, is not emulated: measured on x86, values 15/32 of a step
    # above a code rounded up, as if its multiplier had 16 bits. Such a layer
    # (a small head) keeps its codes in INT8.
    int4 = (
        storage_bits <= 4
        and plan.int4_weights
        and not (isinstance(layer, QuantDense) and kernel.shape[0] % 2)
    )
    bias = np.asarray(layer.bias.numpy(), np.float64) if layer.use_bias else np.zeros(channels)
    report = LayerReport(
        name=layer.name,
        kind=type(layer).__name__,
        weight_bits=form.bits,
        weight_storage="INT4" if int4 else "INT8",
        codes=codes,
    )
    if mapping_errors is not None:
        report.level_mapping_max_error, report.level_mapping_rms_error = mapping_errors

    last = layer
    batch_norm = None
    follower = _sole_consumer(layer, consumers)
    if isinstance(follower, _L.BatchNormalization):
        gamma = follower.gamma.numpy() if follower.scale else np.ones(channels)
        beta = follower.beta.numpy() if follower.center else np.zeros(channels)
        mean = follower.moving_mean.numpy()
        variance = follower.moving_variance.numpy()
        factor = np.asarray(gamma, np.float64) / np.sqrt(
            np.asarray(variance, np.float64) + follower.epsilon
        )
        channel_scale = channel_scale * factor
        bias = (bias - mean) * factor + beta
        batch_norm = (follower, factor)
        plan.skip.add(id(follower))
        report.folded_batch_norm = follower.name
        last = follower
    follower = _sole_consumer(last, consumers)
    if isinstance(follower, QuantActivation):
        plan.kernel_for_activation[id(follower)] = (layer, follower)
        offset = plan.activation_forms[id(follower)].offset
        if offset:
            bias = bias - offset
            plan.folded_offsets.add(id(follower))
            report.folded_offset = float(offset)

    q_max = 7 if int4 else 127
    magnitude = np.maximum(np.abs(channel_scale), 1e-30)
    if isinstance(layer, QuantDense):
        if not np.allclose(magnitude, magnitude[0], rtol=1e-6):
            raise ExportError(
                f"{where}: a BatchNormalization after a Dense gives per-channel weight scales, "
                "which TFLite's FULLY_CONNECTED cannot hold exactly"
            )
        make_kernel = kernel_maker(codes * channel_scale, magnitude[:1], q_max)
    elif isinstance(layer, QuantDepthwiseConv2D):
        h, w, c_in, multiplier = codes.shape
        folded = (codes * channel_scale.reshape(c_in, multiplier)).reshape(h, w, 1, -1)
        make_kernel = kernel_maker(folded, magnitude, q_max, final_shape=codes.shape)
    else:
        make_kernel = kernel_maker(codes * channel_scale, magnitude, q_max)
    report.weight_scales = [float(v) for v in np.abs(channel_scale)]

    input_form = None
    if layer.input_quantizer is not None:
        input_form = layer.input_quantizer.inference_form()
        activation_range(input_form, f"{where} input")
        report.activation_bits = input_form.bits
        report.activation_scale = float(input_form.scale)
        report.activation_zero_point = int8_zero_point(input_form)
        input_scale = float(input_form.scale)
    else:
        input_scale = _input_scale(plan, node)
    if input_scale is not None:
        # TFLite holds the bias in int32 at the accumulator's scale.
        grid = input_scale * (magnitude[:1] if isinstance(layer, QuantDense) else magnitude)
        shift = np.round(bias / grid) * grid - bias
        report.bias_step = float(grid.max())
        plan.bias_shifts[id(layer)] = (layer, batch_norm, shift)
    plan.kernels[id(layer)] = (make_kernel, bias.astype(np.float32), input_form)
    plan.reports.append(report)
