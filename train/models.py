"""Float model builders. Quantize them with `tfquant.quantize_model`."""

from __future__ import annotations

import keras

_L = keras.layers


def _conv_bn_relu(x, filters, kernel_size=3, strides=1, name=None):
    x = _L.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding="same",
        use_bias=False,
        name=None if name is None else name + "_conv",
    )(x)
    x = _L.BatchNormalization(name=None if name is None else name + "_bn")(x)
    return _L.ReLU(name=None if name is None else name + "_relu")(x)


def small_cnn(input_shape=(28, 28, 1), num_classes=10, width=16) -> keras.Model:
    """Three conv-BN-ReLU blocks, a max-pool, global average pooling and a
    linear classifier (logits)."""
    inputs = keras.Input(input_shape, name="image")
    x = _conv_bn_relu(inputs, width, name="block1")
    x = _conv_bn_relu(x, 2 * width, strides=2 if input_shape[0] > 16 else 1, name="block2")
    x = _L.MaxPooling2D(2, name="pool")(x)
    x = _conv_bn_relu(x, 4 * width, name="block3")
    x = _L.GlobalAveragePooling2D(name="gap")(x)
    outputs = _L.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="small_cnn")


def resnet20(input_shape=(32, 32, 3), num_classes=10, width=16) -> keras.Model:
    """ResNet-20 for CIFAR (He et al., 2016): 3 stages of 3 basic blocks,
    16/32/64 channels, projection shortcuts (1x1 conv + BN) where the shape
    changes; logits out."""
    inputs = keras.Input(input_shape, name="image")
    x = _conv_bn_relu(inputs, width, name="stem")
    for stage, filters in enumerate((width, 2 * width, 4 * width)):
        for block in range(3):
            strides = 2 if stage > 0 and block == 0 else 1
            name = f"stage{stage + 1}_block{block + 1}"
            shortcut = x
            y = _conv_bn_relu(x, filters, strides=strides, name=name + "_a")
            y = _L.Conv2D(filters, 3, padding="same", use_bias=False, name=name + "_b_conv")(y)
            y = _L.BatchNormalization(name=name + "_b_bn")(y)
            if strides != 1 or shortcut.shape[-1] != filters:
                shortcut = _L.Conv2D(
                    filters, 1, strides=strides, use_bias=False, name=name + "_proj_conv"
                )(shortcut)
                shortcut = _L.BatchNormalization(name=name + "_proj_bn")(shortcut)
            x = _L.Add(name=name + "_add")([y, shortcut])
            x = _L.ReLU(name=name + "_relu")(x)
    x = _L.GlobalAveragePooling2D(name="gap")(x)
    outputs = _L.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="resnet20")


def lenet5(input_shape=(28, 28, 1), num_classes=10) -> keras.Model:
    """LeNet-5 (LeCun et al., 1998) with ReLU and max pooling: conv 6@5x5,
    pool, conv 16@5x5, pool, dense 120, dense 84, logits. "same" padding, so
    it also takes the 8x8 digits."""
    inputs = keras.Input(input_shape, name="image")
    x = _L.Conv2D(6, 5, padding="same", name="conv1")(inputs)
    x = _L.ReLU(name="conv1_relu")(x)
    x = _L.MaxPooling2D(2, name="pool1")(x)
    x = _L.Conv2D(16, 5, padding="same", name="conv2")(x)
    x = _L.ReLU(name="conv2_relu")(x)
    x = _L.MaxPooling2D(2, name="pool2")(x)
    x = _L.Flatten(name="flatten")(x)
    x = _L.Dense(120, name="fc1")(x)
    x = _L.ReLU(name="fc1_relu")(x)
    x = _L.Dense(84, name="fc2")(x)
    x = _L.ReLU(name="fc2_relu")(x)
    outputs = _L.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="lenet5")


def _bn_relu(x, name):
    x = _L.BatchNormalization(name=name + "_bn")(x)
    return _L.ReLU(name=name + "_relu")(x)


def _conv(x, filters, kernel_size, strides, name):
    return _L.Conv2D(
        filters, kernel_size, strides=strides, padding="same", use_bias=False, name=name
    )(x)


def preact_resnet20(input_shape=(32, 32, 3), num_classes=10, width=16) -> keras.Model:
    """Pre-activation ResNet-20 for CIFAR (He et al., 2016b, arXiv:1603.05027),
    the CIFAR network of the QIL and PACT papers: blocks BN-ReLU-conv-BN-ReLU-
    conv, identity added without a ReLU after it; projection shortcuts (1x1
    conv on the pre-activated input) where the shape changes."""
    inputs = keras.Input(input_shape, name="image")
    x = _conv(inputs, width, 3, 1, "stem_conv")
    for stage, filters in enumerate((width, 2 * width, 4 * width)):
        for block in range(3):
            strides = 2 if stage > 0 and block == 0 else 1
            x = _preact_block(x, filters, strides, f"stage{stage + 1}_block{block + 1}")
    x = _bn_relu(x, "final")
    x = _L.GlobalAveragePooling2D(name="gap")(x)
    outputs = _L.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="preact_resnet20")


def _preact_block(x, filters, strides, name):
    pre = _bn_relu(x, name + "_pre")
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        shortcut = _conv(pre, filters, 1, strides, name + "_proj_conv")
    y = _conv(pre, filters, 3, strides, name + "_a_conv")
    y = _bn_relu(y, name + "_a")
    y = _conv(y, filters, 3, 1, name + "_b_conv")
    return _L.Add(name=name + "_add")([y, shortcut])


def _imagenet_stem(inputs, name="stem"):
    x = _conv(inputs, 64, 7, 2, name + "_conv")
    x = _bn_relu(x, name)
    x = _L.ZeroPadding2D(1, name=name + "_pad")(x)
    return _L.MaxPooling2D(3, strides=2, name=name + "_pool")(x)


def resnet18(input_shape=(224, 224, 3), num_classes=1000) -> keras.Model:
    """ResNet-18 for ImageNet (He et al., 2016, arXiv:1512.03385): 7x7/2 stem
    and 3x3/2 max pool, four stages of two basic blocks (64/128/256/512),
    projection shortcuts where the shape changes; logits out. The network of
    the QIL, LSQ, PACT, QN and CPQ ImageNet tables."""
    inputs = keras.Input(input_shape, name="image")
    x = _imagenet_stem(inputs)
    for stage, filters in enumerate((64, 128, 256, 512)):
        for block in range(2):
            strides = 2 if stage > 0 and block == 0 else 1
            name = f"stage{stage + 1}_block{block + 1}"
            shortcut = x
            y = _conv_bn_relu(x, filters, strides=strides, name=name + "_a")
            y = _conv(y, filters, 3, 1, name + "_b_conv")
            y = _L.BatchNormalization(name=name + "_b_bn")(y)
            if strides != 1 or shortcut.shape[-1] != filters:
                shortcut = _conv(shortcut, filters, 1, strides, name + "_proj_conv")
                shortcut = _L.BatchNormalization(name=name + "_proj_bn")(shortcut)
            x = _L.Add(name=name + "_add")([y, shortcut])
            x = _L.ReLU(name=name + "_relu")(x)
    x = _L.GlobalAveragePooling2D(name="gap")(x)
    outputs = _L.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="resnet18")


def preact_resnet18(input_shape=(224, 224, 3), num_classes=1000) -> keras.Model:
    """Pre-activation ResNet-18 for ImageNet (arXiv:1603.05027 blocks on the
    ResNet-18 layout), the variant of the QIL paper's ImageNet experiments."""
    inputs = keras.Input(input_shape, name="image")
    x = _imagenet_stem(inputs)
    for stage, filters in enumerate((64, 128, 256, 512)):
        for block in range(2):
            strides = 2 if stage > 0 and block == 0 else 1
            x = _preact_block(x, filters, strides, f"stage{stage + 1}_block{block + 1}")
    x = _bn_relu(x, "final")
    x = _L.GlobalAveragePooling2D(name="gap")(x)
    outputs = _L.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="preact_resnet18")


def _divisible(value, divisor=8):
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


# (expansion t, output channels c, repeats n, first stride s), Sandler et al. Table 2.
_MOBILENET_V2_BLOCKS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def mobilenet_v2(input_shape=(224, 224, 3), num_classes=1000, alpha=1.0) -> keras.Model:
    """MobileNetV2 (Sandler et al., 2018, arXiv:1801.04381) with width
    multiplier `alpha`: inverted residual blocks of 1x1 expansion, 3x3
    DepthwiseConv2D and a linear 1x1 projection, identity Add where shapes
    match. ReLU replaces ReLU6 (the activation quantizers clip the range
    themselves, as in the DQ and CPQ papers' quantized MobileNetV2)."""
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0 for mobilenet_v2, got {alpha!r}")
    inputs = keras.Input(input_shape, name="image")
    x = _conv_bn_relu(inputs, _divisible(32 * alpha), strides=2, name="stem")
    index = 0
    for expansion, channels, repeats, first_stride in _MOBILENET_V2_BLOCKS:
        out_channels = _divisible(channels * alpha)
        for repeat in range(repeats):
            strides = first_stride if repeat == 0 else 1
            name = f"block{index}"
            y = x
            if expansion != 1:
                y = _conv_bn_relu(y, x.shape[-1] * expansion, 1, name=name + "_expand")
            y = _L.DepthwiseConv2D(
                3, strides=strides, padding="same", use_bias=False, name=name + "_dw_conv"
            )(y)
            y = _bn_relu(y, name + "_dw")
            y = _conv(y, out_channels, 1, 1, name + "_project_conv")
            y = _L.BatchNormalization(name=name + "_project_bn")(y)
            if strides == 1 and x.shape[-1] == out_channels:
                y = _L.Add(name=name + "_add")([x, y])
            x = y
            index += 1
    last = _divisible(1280 * alpha) if alpha > 1.0 else 1280
    x = _conv_bn_relu(x, last, 1, name="head")
    x = _L.GlobalAveragePooling2D(name="gap")(x)
    outputs = _L.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="mobilenet_v2")


MODELS = {
    "small_cnn": small_cnn,
    "resnet20": resnet20,
    "lenet5": lenet5,
    "preact_resnet20": preact_resnet20,
    "resnet18": resnet18,
    "preact_resnet18": preact_resnet18,
    "mobilenet_v2": mobilenet_v2,
}


def build(name: str, input_shape, num_classes: int, **options) -> keras.Model:
    """The float model `name` for `input_shape` and `num_classes`; `options`
    go to the builder (e.g. `alpha=0.5` for mobilenet_v2)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {sorted(MODELS)}")
    return MODELS[name](input_shape=input_shape, num_classes=num_classes, **options)
