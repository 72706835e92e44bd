"""`quantize_model`: a trained float Keras model to its quantized twin.

Walks the model's graph once, replacing Conv2D/DepthwiseConv2D/Dense by
their Quant twins and each ReLU by a `QuantActivation`, and inserting an
8-bit requantization wherever an integer kernel would otherwise receive an
unquantized tensor (the model input, Add inputs and outputs, averages, the
logits). Weights are copied; every quantizer is initialized from the float
kernel it quantizes, and activation quantizers from a calibration batch run
through the partly quantized model, in graph order, so that each one sees
the error of the quantizers before it.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tfquant import graph, quantizers
from tfquant.layers import (
    QuantActivation,
    QuantAdd,
    QuantAveragePooling2D,
    QuantConcatenate,
    QuantConv2D,
    QuantDense,
    QuantDepthwiseConv2D,
    QuantMultiply,
    window_reaches_padding,
)
from tfquant.schemes import Scheme

_L = keras.layers
_KERNEL_LAYERS = {
    _L.Conv2D: QuantConv2D,
    _L.DepthwiseConv2D: QuantDepthwiseConv2D,
    _L.Dense: QuantDense,
}
# Layers whose output stays on the grid of their input.
_GRID_PRESERVING = (
    _L.MaxPooling2D,
    _L.GlobalMaxPooling2D,
    _L.Flatten,
    _L.Dropout,
    _L.ZeroPadding2D,
    _L.Cropping2D,
    _L.Reshape,
)
_SUPPORTED = (
    _L.InputLayer,
    _L.Conv2D,
    _L.DepthwiseConv2D,
    _L.SeparableConv2D,
    _L.Dense,
    _L.BatchNormalization,
    _L.Rescaling,
    _L.Normalization,
    _L.ReLU,
    _L.Activation,
    _L.AveragePooling2D,
    _L.GlobalAveragePooling2D,
    _L.Add,
    _L.Multiply,
    _L.Concatenate,
) + _GRID_PRESERVING
# Per-channel x * a + b layers; Rescaling and Normalization become a
# BatchNormalization with fixed statistics, which the exporter lowers.
_AFFINE = (_L.BatchNormalization, _L.Rescaling, _L.Normalization)
_FIXED_AFFINE = (_L.Rescaling, _L.Normalization)
# Layers whose result an integer kernel computes (a BatchNormalization is
# folded into one, or is one).
_INTEGER_PRODUCERS = (
    QuantConv2D,
    QuantDepthwiseConv2D,
    QuantDense,
    _L.BatchNormalization,
)
_HEAD_PASSING = (_L.Reshape, _L.Flatten, _L.Dropout, _L.Activation)
_POOLING = (
    _L.MaxPooling2D,
    _L.GlobalMaxPooling2D,
    _L.AveragePooling2D,
    _L.GlobalAveragePooling2D,
)
_QUANT_LAYERS = (
    QuantConv2D,
    QuantDepthwiseConv2D,
    QuantDense,
    QuantActivation,
    QuantAdd,
    QuantConcatenate,
    QuantMultiply,
    QuantAveragePooling2D,
)


def quantize_model(
    model: keras.Model,
    scheme: Any = "qil_w4a4",
    calibration_data=None,
    calibration_samples: int = 512,
    layers: dict[str, Any] | None = None,
) -> keras.Model:
    """Converts a trained float model into a quantized model.

    Args:
      model: a built Sequential or Functional model made of Conv2D,
        DepthwiseConv2D, Dense, BatchNormalization, ReLU, Activation (relu,
        linear, softmax), pooling, Add, Flatten, Dropout, ZeroPadding2D,
        Reshape.
      scheme: a `Scheme`, a dict of its fields, or a preset name such as
        "qil_w4a4" or "lsq_w2a2".
      calibration_data: inputs (a NumPy array, or a `tf.data.Dataset` of
        inputs or (input, label) pairs) used to initialize the activation
        quantizers. Without it they keep their default ranges.
      calibration_samples: how many samples of `calibration_data` to use.
      layers: per-layer schemes, `{name or regular expression: scheme}`,
        for the layers whose name equals or fully matches the key (the first
        matching key wins): "8bit" (the scheme at 8 bits), a preset name or
        `Scheme`, or a dict of the Scheme fields to change. A layer named
        this way gets exactly its scheme's bits, also when it is the first or
        last layer. A kernel layer's scheme sets its weights and the
        activation fused into it; a ReLU layer's, that activation. Name
        both to keep, say, a sensitive block at 8 bits:
        `layers={"block1_.*": "8bit"}`.

    Returns:
      A new functional model; the float model is left untouched.

    Raises:
      ValueError: a layer the converter does not know (named in the error),
        an already quantized model, or an invalid scheme.

    >>> import keras
    >>> float_model = keras.Sequential([keras.Input((8, 8, 1)),
    ...     keras.layers.Conv2D(4, 3, activation="relu"), keras.layers.Flatten(),
    ...     keras.layers.Dense(10)])
    >>> qmodel = quantize_model(float_model, "lsq_w4a4")
    >>> [type(l).__name__ for l in qmodel.layers][1:3]
    ['QuantConv2D', 'QuantActivation']
    """
    scheme = Scheme.from_any(scheme)
    functional = _as_functional(model)
    functional = _flattened(_checked_operations(functional, _hard_sigmoid_patterns(functional)))
    model_graph = _ModelGraph(functional)
    builder = _Builder(scheme, model_graph, _LayerSchemes(scheme, layers, functional))
    qmodel = keras.models.clone_model(
        functional, clone_function=builder.clone, call_function=builder.call
    )
    builder.copy_weights()
    if calibration_data is not None:
        builder.calibrate(qmodel, _calibration_array(calibration_data, calibration_samples))
    elif builder.activation_quantizers:
        warnings.warn(
            "quantize_model got no calibration_data: activation quantizers keep their "
            "default ranges until training adjusts them",
            stacklevel=2,
        )
    return qmodel


def _as_functional(model) -> keras.Model:
    if not isinstance(model, keras.Model):
        raise ValueError(f"quantize_model needs a keras.Model, got {type(model).__name__}")
    if isinstance(model, keras.Sequential):
        if not model.built or not model.inputs:
            raise ValueError(
                f"Sequential model {model.name!r} has no defined input; start it with "
                "keras.Input(shape) or build it before quantizing"
            )
        inputs = keras.Input(batch_shape=model.inputs[0].shape, name="input")
        x = inputs
        for layer in model.layers:
            x = layer(x)
        return keras.Model(inputs, x, name=model.name)
    if not hasattr(model, "_operations") or not model.inputs:
        raise ValueError(
            f"quantize_model supports Sequential and Functional models; {model.name!r} is a "
            f"subclassed {type(model).__name__}"
        )
    return model


def _checked_operations(model: keras.Model, known=()) -> keras.Model:
    """`model`, if every node of its graph is a layer or in `known` (ids of
    recognized patterns): a `keras.ops` call written in a functional model
    (`x * 0.5`, `keras.ops.relu(x)`) is named, since it has no quantized twin."""
    for operation in getattr(model, "operations", model.layers):
        if not isinstance(operation, keras.layers.Layer) and id(operation) not in known:
            raise ValueError(
                f"quantize_model cannot quantize operation {operation.name!r} of model "
                f"{model.name!r}: a keras.ops call ({type(operation).__name__}) in the "
                "functional graph; write it as a layer (supported: "
                + ", ".join(sorted({c.__name__ for c in _SUPPORTED}))
                + ")"
            )
    return model


def _is_scalar(node, value: float) -> bool:
    numbers = [a for a in node.arguments.args if isinstance(a, (int, float))]
    return len(numbers) == 1 and abs(float(numbers[0]) - value) < 1e-6


def _hard_sigmoid_patterns(model: keras.Model) -> dict[int, str]:
    """The raw-op hard-sigmoid `ReLU(6.)(x + 3.) * (1. / 6.)` (MobileNetV3
    writes it so): {id(op): "start" | "pass"} for its add, ReLU and multiply."""
    order = graph.nodes_in_order(model)
    consumers = graph.consumers_of(order)
    found: dict[int, str] = {}
    for operation, node in order:
        if isinstance(operation, keras.layers.Layer) or type(operation).__name__ != "Add":
            continue
        if not _is_scalar(node, 3.0):
            continue
        relu = consumers.get(id(operation), [])
        if len(relu) != 1 or _activation_name(relu[0]) != "relu6":
            continue
        scaled = consumers.get(id(relu[0]), [])
        if (
            len(scaled) != 1
            or isinstance(scaled[0], keras.layers.Layer)
            or type(scaled[0]).__name__ != "Multiply"
            or not _is_scalar(scaled[0]._inbound_nodes[0], 1.0 / 6.0)
        ):
            continue
        found.update({id(operation): "start", id(relu[0]): "pass", id(scaled[0]): "pass"})
    return found


def _flattened(model: keras.Model) -> keras.Model:
    """`model` with every nested model (a base model inside a head, a
    Sequential block) replaced by its layers, so that each is quantized as
    if it had been written inline, and each SeparableConv2D by its
    DepthwiseConv2D and 1x1 Conv2D. Nested layers are copies with the same
    weights; a layer used several times stays one layer."""
    if not any(
        isinstance(layer, (keras.Model, _L.SeparableConv2D))
        or not isinstance(layer, keras.layers.Layer)
        for layer in getattr(model, "operations", model.layers)
    ):
        return model
    copies: dict[int, Any] = {}

    def copy_of(layer):
        if id(layer) not in copies:
            copies[id(layer)] = layer.__class__.from_config(layer.get_config())
        return copies[id(layer)]

    def separable(layer, x):
        """SeparableConv2D as what it computes: DepthwiseConv2D, then Conv2D 1x1."""
        if id(layer) not in copies:
            config = layer.get_config()
            depthwise = _L.DepthwiseConv2D(
                config["kernel_size"],
                strides=config["strides"],
                padding=config["padding"],
                depth_multiplier=config["depth_multiplier"],
                dilation_rate=config["dilation_rate"],
                use_bias=False,
                name=f"{layer.name}_depthwise",
            )
            pointwise = _L.Conv2D(
                config["filters"],
                1,
                activation=config["activation"],
                use_bias=config["use_bias"],
                name=layer.name,
            )
            copies[id(layer)] = (depthwise, pointwise)
        depthwise, pointwise = copies[id(layer)]
        fresh = not depthwise.built
        y = pointwise(depthwise(x))
        if fresh:
            depthwise.set_weights([layer.depthwise_kernel.numpy()])
            pointwise.set_weights(
                [layer.pointwise_kernel.numpy()] + ([layer.bias.numpy()] if layer.use_bias else [])
            )
        return y

    def run(inner, tensors):
        inner = _as_functional(inner)
        patterns = _hard_sigmoid_patterns(inner)
        inner = _checked_operations(inner, patterns)
        values = {id(t): v for t, v in zip(inner.inputs, tensors, strict=True)}
        for operation, node in graph.nodes_in_order(inner):
            if node.is_input:
                continue
            args, kwargs = node.arguments.fill_in(values)
            if id(operation) in patterns:
                # relu6(x + 3) / 6 as one hard-sigmoid activation; the ReLU6
                # and the division pass its result on.
                x = next(a for a in args if isinstance(a, keras.KerasTensor))
                if patterns[id(operation)] == "start":
                    if id(operation) not in copies:
                        copies[id(operation)] = _L.Activation(
                            "hard_sigmoid", name=f"{operation.name}_hard_sigmoid"
                        )
                    x = copies[id(operation)](x)
                values[id(node.outputs[0])] = x
                continue
            if isinstance(operation, keras.Model):
                outputs = run(operation, tf.nest.flatten((args, kwargs.pop("inputs", ()))))
            elif isinstance(operation, _L.SeparableConv2D):
                if operation.data_format != "channels_last":
                    raise ValueError(
                        f"layer {operation.name!r}: only channels_last SeparableConv2D is supported"
                    )
                outputs = separable(operation, args[0])
            else:
                layer = copy_of(operation)
                fresh = not layer.built
                outputs = layer(*args, **kwargs)
                if fresh and operation.weights:
                    layer.set_weights(operation.get_weights())
            for tensor, value in zip(node.outputs, tf.nest.flatten(outputs), strict=True):
                values[id(tensor)] = value
        return [values[id(t)] for t in inner.outputs]

    inputs = [keras.Input(batch_shape=t.shape, name=t.name) for t in model.inputs]
    outputs = run(model, inputs)
    return keras.Model(
        inputs[0] if len(inputs) == 1 else inputs,
        outputs[0] if len(outputs) == 1 else outputs,
        name=model.name,
    )


class _ModelGraph:
    """The float model's layers and its output layers."""

    def __init__(self, model: keras.Model):
        self.model = model
        # The layers whose output is a model output, also through the layers
        # that only reshape it or apply the head's softmax after it.
        self.output_layers = set()
        for tensor in model.outputs:
            layer = graph.producer(tensor)
            self.output_layers.add(id(layer))
            while isinstance(layer, _HEAD_PASSING) and _activation_name(layer) in (
                None,
                "linear",
                "softmax",
            ):
                layer = graph.producer(layer._inbound_nodes[0].input_tensors[0])
                self.output_layers.add(id(layer))
        for layer in model.layers:
            if isinstance(layer, _QUANT_LAYERS):
                raise ValueError(
                    f"model {model.name!r} is already quantized (layer {layer.name!r} is a "
                    f"{type(layer).__name__})"
                )
            if not isinstance(layer, _SUPPORTED) or not _supported_configuration(layer):
                raise ValueError(
                    f"quantize_model cannot quantize layer {layer.name!r} of type "
                    f"{type(layer).__name__}{_describe(layer)}; supported: "
                    + ", ".join(sorted({c.__name__ for c in _SUPPORTED}))
                    + f" (activations {', '.join(_ACTIVATIONS)}; ReLU with max_value 6 or none)"
                )
        # BatchNormalizations no kernel layer absorbs: they become per-channel
        # affine integer ops, between two quantizers.
        order = graph.nodes_in_order(model)
        consumers = graph.consumers_of(order)
        self.affine: set[int] = set()
        self.followed_by_relu: set[int] = set()
        for layer, node in order:
            if not isinstance(layer, _AFFINE):
                continue
            producer = graph.producer(node.input_tensors[0])
            if not isinstance(layer, _L.BatchNormalization) or not (
                type(producer) in _KERNEL_LAYERS
                and _name_of(producer.activation) == "linear"
                and len(consumers.get(id(producer), [])) == 1
            ):
                self.affine.add(id(layer))
                following = consumers.get(id(layer), [])
                if len(following) == 1 and _activation_name(following[0]) in _RELU_ACTIVATIONS:
                    self.followed_by_relu.add(id(layer))
        # A Rescaling or Normalization read only by another one: the chain
        # is one fixed affine (one integer op), held by its first layer.
        self.fused_into: dict[int, Any] = {}
        self.fused_chain: dict[int, list] = {}
        for layer, node in order:
            producer = graph.producer(node.input_tensors[0]) if node.input_tensors else None
            if (
                isinstance(layer, _FIXED_AFFINE)
                and isinstance(producer, _FIXED_AFFINE)
                and len(consumers.get(id(producer), [])) == 1
            ):
                head = self.fused_into.get(id(producer), producer)
                self.fused_into[id(layer)] = head
                self.fused_chain.setdefault(id(head), [head]).append(layer)
        self.consumers = consumers
        kernel_layers = [
            layer for layer in model.layers if isinstance(layer, tuple(_KERNEL_LAYERS))
        ]
        if not kernel_layers:
            raise ValueError(f"model {model.name!r} has no Conv2D, DepthwiseConv2D or Dense layer")
        self.first, self.last = kernel_layers[0], kernel_layers[-1]

    def reads_shared(self, layer) -> bool:
        """Whether `layer` reads a tensor that other layers read too."""
        if layer is None or not layer._inbound_nodes:
            return False
        tensors = layer._inbound_nodes[0].input_tensors
        producer = graph.producer(tensors[0]) if tensors else None
        return len(self.consumers.get(id(producer), [])) > 1


_RELU_ACTIVATIONS = ("relu", "relu6")
_ACTIVATIONS = (
    "linear",
    "relu",
    "relu6",
    "softmax",
    "sigmoid",
    "silu",
    "swish",
    "hard_sigmoid",
    "hard_silu",
    "hard_swish",
)
_SWISH = ("silu", "swish")
_HARD_SWISH = ("hard_silu", "hard_swish")


def _activation_name(layer) -> str | None:
    if isinstance(layer, _L.ReLU):
        return "relu" if layer.get_config().get("max_value") is None else "relu6"
    if isinstance(layer, _L.Activation):
        return _name_of(layer.activation)
    return None


def _name_of(activation) -> str:
    name = getattr(activation, "__name__", str(activation))
    return "linear" if name in ("linear", "None") else name


def _supported_configuration(layer) -> bool:
    if isinstance(layer, _L.ReLU):
        config = layer.get_config()
        return (
            config.get("max_value") in (None, 6.0)
            and not config.get("negative_slope")
            and not config.get("threshold")
        )
    if isinstance(layer, (_L.Activation, *_KERNEL_LAYERS)):
        return _name_of(layer.activation) in _ACTIVATIONS
    return True


def _describe(layer) -> str:
    if isinstance(layer, (_L.Activation, *_KERNEL_LAYERS)):
        return f" with activation {_name_of(layer.activation)!r}"
    return ""


class _LayerSchemes:
    """`quantize_model`'s `layers=`: the scheme of each layer by its name."""

    def __init__(self, scheme: Scheme, layers: dict | None, model: keras.Model):
        self.default = scheme
        self.rules = []
        if layers is None:
            return
        if not isinstance(layers, dict):
            raise ValueError(f"layers must be a dict {{name or regex: scheme}}, got {layers!r}")
        names = [layer.name for layer in model.layers]
        for pattern, value in layers.items():
            try:
                regex = re.compile(pattern)
            except (re.error, TypeError) as error:
                raise ValueError(
                    f"layers key {pattern!r} is not a regular expression: {error}"
                ) from None
            if not any(name == pattern or regex.fullmatch(name) for name in names):
                raise ValueError(f"layers key {pattern!r} matches no layer of {model.name!r}")
            self.rules.append((pattern, regex, self._resolve(pattern, value)))

    def _resolve(self, pattern, value) -> Scheme:
        try:
            if isinstance(value, str) and value.lower() == "8bit":
                return dataclasses.replace(self.default, bits=8, weight_bits=8, activation_bits=8)
            if isinstance(value, dict):
                fields = {field.name for field in dataclasses.fields(Scheme)}
                unknown = sorted(set(value) - fields)
                if unknown:
                    raise ValueError(f"unknown scheme field(s) {unknown}")
                return dataclasses.replace(self.default, **value)
            return Scheme.from_any(value)
        except (TypeError, ValueError) as error:
            raise ValueError(f"layers[{pattern!r}]: {error}") from None

    def get(self, layer) -> Scheme | None:
        """The scheme named for `layer`, or None."""
        name = layer.name
        for pattern, regex, scheme in self.rules:
            if name == pattern or regex.fullmatch(name):
                return scheme
        return None


class _Builder:
    """The clone and call functions for `keras.models.clone_model`."""

    def __init__(self, scheme: Scheme, model_graph: _ModelGraph, schemes: _LayerSchemes):
        self.scheme = scheme
        self.schemes = schemes
        self.graph = model_graph
        self.old_for_new: dict[int, Any] = {}
        self.pairs: list[tuple[Any, Any]] = []
        self.inline_activation: dict[int, str] = {}
        self.on_grid: set[int] = set()
        self.requantized: dict[int, Any] = {}
        self.activation_quantizers: list[tuple[quantizers.Quantizer, Any]] = []

    # -- quantizer factories
    def _quantizer(self, spec, bits, signed, for_weights=False, first_last=False):
        quantizer = quantizers.get(spec, signed=signed, for_weights=for_weights)
        config = quantizer.get_config()
        config.update(bits=bits, signed=signed)
        if (
            first_last
            and config.get("levels") is not None
            and type(quantizer).registered_name == "qn"
        ):
            # An explicit QN level set (a preset such as "3(+-4)") fixes the
            # codes whatever `bits` says; the first and last layers get the
            # uniform set of their own bit width instead.
            config["levels"] = None
        if "for_weights" in config:
            config["for_weights"] = for_weights
        config.pop("name", None)
        return type(quantizer).from_config(config)

    def _requantizer(self):
        return self._quantizer(self.scheme.requantize, 8, signed=True)

    def _requantize(self, tensor):
        layer = QuantActivation("linear", quantizer=self._requantizer())
        return self._call_activation(layer, tensor)

    def _grid(self, tensor):
        """`tensor` on a grid: itself where it is on one, else one 8-bit
        requantization shared by all its readers (the integer op that
        computes it writes one int8 tensor, on one grid)."""
        if id(tensor) in self.on_grid:
            return tensor
        if id(tensor) not in self.requantized:
            self.requantized[id(tensor)] = self._requantize(tensor)
        return self.requantized[id(tensor)]

    def _sigmoid(self, tensor, name: str):
        layer = QuantActivation("sigmoid", quantizer=_sigmoid_grid(), name=name)
        return self._call_activation(layer, tensor)

    def _hard_sigmoid(self, tensor, name: str):
        """relu6(x + 3) / 6 = clip(x / 6 + 1/2, 0, 1): a per-channel affine
        op (a frozen BatchNormalization, lowered as a 1x1 depthwise
        convolution) onto the fixed grid [0, 1], whose clamp is the clip."""
        affine = _L.BatchNormalization(name=f"{name}_affine", trainable=False)
        y = affine(tensor)
        channels = int(affine.gamma.shape[0])
        spread = np.sqrt(1.0 + affine.epsilon)
        affine.set_weights(
            [
                np.full(channels, spread / 6.0, np.float32),
                np.full(channels, 0.5, np.float32),
                np.zeros(channels, np.float32),
                np.ones(channels, np.float32),
            ]
        )
        grid = quantizers.FixedRangeQuantizer(bits=8, low=0.0, high=1.0)
        return self._call_activation(QuantActivation("linear", quantizer=grid, name=name), y)

    def _swish(self, tensor, name: str, hard: bool = False):
        """x * sigmoid(x): an integer LOGISTIC, then an integer MUL onto an
        8-bit grid of its own (swish reaches below 0, to about -0.28); with
        `hard`, x * hard_sigmoid(x) (hard-swish)."""
        x = self._grid(tensor)
        if hard:
            gate = self._hard_sigmoid(x, f"{name}_hard_sigmoid")
        else:
            gate = self._sigmoid(x, f"{name}_sigmoid")
        out = QuantMultiply(quantizer=self._requantizer(), name=name)([x, gate])
        self.on_grid.add(id(out))
        return out

    def _call_activation(self, layer, tensor):
        self.activation_quantizers.append((layer.quantizer, tensor))
        out = layer(tensor)
        self.on_grid.add(id(out))
        return out

    # -- clone_function
    def clone(self, layer):
        named = self.schemes.get(layer)
        scheme = named or self.scheme
        quant_class = next((q for f, q in _KERNEL_LAYERS.items() if type(layer) is f), None)
        if quant_class is not None:
            config = layer.get_config()
            config["activation"] = "linear"
            bits = scheme.resolved_weight_bits
            first_last = (
                named is None
                and bool(scheme.first_last_bits)
                and layer in (self.graph.first, self.graph.last)
            )
            if first_last:
                bits = scheme.first_last_bits
            config["kernel_quantizer"] = self._quantizer(
                scheme.weights, bits, signed=True, for_weights=True, first_last=first_last
            )
            new = quant_class.from_config(config)
            self.inline_activation[id(new)] = _name_of(layer.activation)
        elif isinstance(layer, (_L.Rescaling, _L.Normalization)):
            new = _L.BatchNormalization(name=layer.name, trainable=False)
        elif type(layer) is _L.Add:
            new = QuantAdd(quantizer=self._requantizer(), **layer.get_config())
        elif type(layer) is _L.AveragePooling2D and _reaches_padding(layer):
            new = QuantAveragePooling2D(**layer.get_config())
        elif type(layer) is _L.Concatenate:
            new = QuantConcatenate(quantizer=self._requantizer(), **layer.get_config())
        elif type(layer) is _L.Multiply:
            new = QuantMultiply(quantizer=self._requantizer(), **layer.get_config())
        elif _activation_name(layer) == "sigmoid":
            new = QuantActivation("sigmoid", quantizer=_sigmoid_grid(), name=layer.name)
        elif _activation_name(layer) in _RELU_ACTIVATIONS:
            quantizer = self._quantizer(
                scheme.activations, scheme.resolved_activation_bits, signed=False
            )
            new = QuantActivation(_activation_name(layer), quantizer=quantizer, name=layer.name)
        else:
            new = layer.__class__.from_config(layer.get_config())
        self.old_for_new[id(new)] = layer
        self.pairs.append((layer, new))
        return new

    # -- call_function
    def call(self, layer, *args, **kwargs):
        old = self.old_for_new.get(id(layer))
        if args and not isinstance(args[0], (list, tuple)) and self.graph.reads_shared(old):
            args = (self._grid(args[0]), *args[1:])
        if isinstance(layer, (QuantConv2D, QuantDepthwiseConv2D, QuantDense)):
            x = args[0]
            producer = graph.producer(x)
            if isinstance(producer, _INTEGER_PRODUCERS):
                # Its own quantizer after the op that computes `x`, where the
                # exporter makes inference round as that op (an input
                # quantizer rounds in float).
                x = self._grid(x)
            if id(x) not in self.on_grid:
                layer.input_quantizer = self._requantizer()
                self.activation_quantizers.append((layer.input_quantizer, x))
            out = layer(x, *args[1:], **kwargs)
            inline = self.inline_activation[id(layer)]
            if inline in _RELU_ACTIVATIONS:
                scheme = self.schemes.get(old) or self.scheme
                quantizer = self._quantizer(
                    scheme.activations, scheme.resolved_activation_bits, signed=False
                )
                out = self._call_activation(QuantActivation(inline, quantizer=quantizer), out)
            elif inline == "sigmoid":
                out = self._sigmoid(self._grid(out), f"{layer.name}_sigmoid")
            elif inline in _SWISH:
                out = self._swish(out, f"{layer.name}_swish")
            elif inline in _HARD_SWISH:
                out = self._swish(out, f"{layer.name}_hard_swish", hard=True)
            elif inline == "hard_sigmoid":
                out = self._hard_sigmoid(self._grid(out), f"{layer.name}_hard_sigmoid")
            elif inline == "softmax":
                # The integer SOFTMAX reads int8 logits, also where the
                # scheme leaves the model's output unquantized.
                out = _softmax(self._requantize(out), f"{layer.name}_softmax")
            elif self.scheme.quantize_output and id(old) in self.graph.output_layers:
                out = self._requantize(out)
            return out
        if isinstance(layer, QuantActivation):
            if layer.activation_name == "sigmoid":  # LOGISTIC reads int8 codes
                return self._call_activation(layer, self._grid(args[0]))
            return self._call_activation(layer, args[0])
        if isinstance(layer, _L.Activation) and _name_of(layer.activation) in _SWISH:
            return self._swish(args[0], layer.name)
        if isinstance(layer, _L.Activation) and _name_of(layer.activation) in _HARD_SWISH:
            return self._swish(args[0], layer.name, hard=True)
        if isinstance(layer, _L.Activation) and _name_of(layer.activation) == "softmax":
            return _softmax(self._grid(args[0]), layer.name)
        if isinstance(layer, _L.Activation) and _name_of(layer.activation) == "hard_sigmoid":
            return self._hard_sigmoid(self._grid(args[0]), layer.name)
        if isinstance(layer, (QuantAdd, QuantConcatenate, QuantMultiply)):
            inputs = [self._grid(t) for t in args[0]]
            # The sum always gets its own 8-bit grid (QuantAdd's quantizer),
            # also before a ReLU's quantizer: it gives an offset (QIL's c - d)
            # somewhere to go (an Add has no bias), and the integer ADD's
            # rounding, which the exporter makes QuantAdd emulate, lands on a
            # fine grid rather than straight on a coarse k-bit one.
            out = layer(inputs, **kwargs)
            self.on_grid.add(id(out))
            return out
        if id(old) in self.graph.fused_into:
            return args[0]  # folded into the Rescaling / Normalization before it
        if id(old) in self.graph.affine:
            # Integer x * a + b per channel: it reads a grid and its result
            # gets one (the ReLU's quantizer that follows, or an 8-bit one).
            out = layer(self._grid(args[0]), *args[1:], **kwargs)
            last = self.graph.fused_chain.get(id(old), [old])[-1]
            if id(last) not in self.graph.followed_by_relu:
                out = self._requantize(out)
            return out
        if isinstance(layer, _POOLING) and id(args[0]) not in self.on_grid:
            # In the integer file a pooling reads int8: its input needs a grid
            # (an average is lowered to a convolution, which needs one too).
            args = (self._grid(args[0]), *args[1:])
        out = layer(*args, **kwargs)
        # A QuantAveragePooling2D rounds onto its input's grid.
        grid_kept = _GRID_PRESERVING + (QuantAveragePooling2D,)
        if isinstance(layer, grid_kept) and args and id(args[0]) in self.on_grid:
            self.on_grid.add(id(out))
        return out

    # -- weights
    def copy_weights(self):
        for old, new in self.pairs:
            if isinstance(new, (QuantConv2D, QuantDepthwiseConv2D, QuantDense)):
                kernel = np.asarray(old.kernel.numpy())
                new.kernel.assign(kernel)
                if old.use_bias:
                    new.bias.assign(old.bias.numpy())
                try:
                    new.kernel_quantizer.initialize(kernel)
                except ValueError as error:
                    raise ValueError(f"layer {old.name!r}: {error}") from None
            elif id(old) in self.graph.fused_into:
                continue  # its new layer is not in the model: the chain's first holds it
            elif isinstance(old, _FIXED_AFFINE):
                chain = self.graph.fused_chain.get(id(old), [old])
                new.set_weights(_affine_as_batch_norm(chain, new))
            elif old.weights:
                new.set_weights(old.get_weights())

    def calibrate(self, qmodel, data):
        """One inference pass in graph order; each activation quantizer is
        initialized from its input as soon as that is computed, so it sees
        the output of the quantizers upstream, already initialized."""
        waiting: dict[int, list] = {}
        for quantizer, tensor in self.activation_quantizers:
            waiting.setdefault(id(tensor), []).append(quantizer)
        order = graph.nodes_in_order(qmodel)
        uses: dict[int, int] = {}
        for _, node in order:
            for tensor in node.input_tensors:
                uses[id(tensor)] = uses.get(id(tensor), 0) + 1
        values = {}

        def computed(tensor, value):
            for quantizer in waiting.pop(id(tensor), []):
                quantizer.initialize(np.asarray(value))
            values[id(tensor)] = value

        computed(qmodel.inputs[0], tf.constant(data))
        for operation, node in order:
            if node.is_input:
                continue
            args, kwargs = node.arguments.fill_in(values)
            if getattr(operation, "_call_has_training_arg", False):
                kwargs["training"] = False
            if isinstance(operation, QuantAdd):  # its quantizer reads the sum of its inputs
                operation.quantizer.initialize(np.asarray(tf.add_n(list(args[0]))))
            if isinstance(operation, QuantConcatenate):
                joined = tf.concat(list(args[0]), axis=operation.axis)
                operation.quantizer.initialize(np.asarray(joined))
            if isinstance(operation, QuantMultiply):
                operation.quantizer.initialize(np.asarray(args[0][0] * args[0][1]))
            outputs = operation(*args, **kwargs)
            for tensor in node.input_tensors:
                uses[id(tensor)] -= 1
                if not uses[id(tensor)]:
                    values.pop(id(tensor), None)  # free what no later node reads
            for tensor, value in zip(node.outputs, tf.nest.flatten(outputs), strict=True):
                computed(tensor, value)


def _softmax(tensor, name: str):
    """Softmax with TFLite's int8 SOFTMAX output grid (scale 1/256, zero
    point -128: [0, 255/256]) in inference, so that two classes the file
    cannot tell apart tie in Keras too; training sees the float
    probabilities."""
    grid = quantizers.FixedRangeQuantizer(bits=8, low=0.0, high=255.0 / 256.0, inference_only=True)
    return QuantActivation("softmax", quantizer=grid, name=name)(tensor)


def _sigmoid_grid():
    """TFLite's int8 LOGISTIC writes scale 1/256, zero point -128: [0, 255/256]."""
    return quantizers.FixedRangeQuantizer(bits=8, low=0.0, high=255.0 / 256.0)


def _reaches_padding(layer) -> bool:
    shape = layer._inbound_nodes[0].input_tensors[0].shape
    return layer.data_format == "channels_last" and window_reaches_padding(
        layer.pool_size, layer.strides, layer.padding, shape[1:3]
    )


def _fixed_affine(layer, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """The per-channel scale and offset of a Rescaling or Normalization."""
    if isinstance(layer, _L.Rescaling):
        scale = np.asarray(layer.scale, np.float64)
        offset = np.asarray(layer.offset, np.float64)
    else:
        if layer.invert:
            raise ValueError(f"layer {layer.name!r}: an inverted Normalization is not supported")
        mean = np.asarray(keras.ops.convert_to_numpy(layer.mean), np.float64)
        deviation = np.sqrt(np.asarray(keras.ops.convert_to_numpy(layer.variance), np.float64))
        scale = 1.0 / np.maximum(deviation, keras.backend.epsilon())
        offset = -mean * scale
    if scale.size not in (1, channels) or offset.size not in (1, channels):
        raise ValueError(
            f"layer {layer.name!r}: only a scale and offset per channel (the last axis) or "
            f"one for all can be quantized, got shapes {scale.shape} and {offset.shape}"
        )
    return (
        np.broadcast_to(scale.reshape(-1), (channels,)),
        np.broadcast_to(offset.reshape(-1), (channels,)),
    )


def _affine_as_batch_norm(layers, batch_norm) -> list[np.ndarray]:
    """gamma, beta, moving mean and variance that make `batch_norm` compute
    what a chain of Rescaling / Normalization layers computes, per channel
    (x * a1 + b1, then * a2 + b2, ...)."""
    channels = int(batch_norm.gamma.shape[0])
    scale, offset = np.ones(channels), np.zeros(channels)
    for layer in layers:
        a, b = _fixed_affine(layer, channels)
        scale, offset = scale * a, offset * a + b
    spread = np.sqrt(1.0 + batch_norm.epsilon)
    return [
        (scale * spread).astype(np.float32),
        offset.astype(np.float32),
        np.zeros(channels, np.float32),
        np.ones(channels, np.float32),
    ]


def _calibration_array(data, samples: int) -> np.ndarray:
    if isinstance(data, tf.data.Dataset):
        chunks, count = [], 0
        for batch in data:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            x = np.asarray(x)
            chunks.append(x)
            count += len(x)
            if count >= samples:
                break
        data = np.concatenate(chunks)
    data = np.asarray(data, dtype=np.float32)
    if not np.isfinite(data).all():
        raise ValueError("calibration_data contains NaN or inf values")
    return data[:samples]
