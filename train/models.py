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


MODELS = {"small_cnn": small_cnn, "resnet20": resnet20}


def build(name: str, input_shape, num_classes: int) -> keras.Model:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {sorted(MODELS)}")
    return MODELS[name](input_shape=input_shape, num_classes=num_classes)
