"""The layers Keras applications are built from quantize and export code for code.

Small models exercise each layer kind in the quick suite; the slow suite
builds keras.applications families at their smallest input.
"""

import keras
import numpy as np
import pytest
from test_random_graphs import randomize_batch_norm

import tfquant
from tfquant import lite
from tfquant import quantize as quantize_module
from tfquant.layers import QuantActivation, QuantAveragePooling2D, QuantConcatenate
from tfquant.lite import inspect as lite_inspect
from tfquant.lite import verify

L = keras.layers


def _export(model, x, scheme="lsq_w4a4", int4=False):
    qmodel = tfquant.quantize_model(model, scheme, calibration_data=x[:64])
    result = lite.export_model(
        qmodel,
        x,
        int4_weights=int4,
        target=verify.host_target(),
        runtimes=("default",),
        allow_mismatch=True,
    )
    return qmodel, result.report["verification"]


def _exact(found):
    assert found["identical_output_codes"] == 1.0, found
    assert found["max_output_step_difference"] == 0, found


def _randomize_batch_norm(model, seed=0):
    randomize_batch_norm(model, np.random.default_rng(seed))


def _images(count=96, size=12, channels=3, scale=1.0, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, scale, (count, size, size, channels)).astype(np.float32)


@pytest.mark.parametrize("scheme", ["lsq_w4a4", "qil_w4a4"])
def test_relu6_in_every_form(scheme):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((12, 12, 3))
    x = L.Conv2D(8, 3, activation="relu6")(inputs)
    x = L.ReLU(max_value=6.0)(L.BatchNormalization()(L.Conv2D(8, 3)(x)))
    x = L.Activation("relu6")(L.DepthwiseConv2D(3)(x))
    model = keras.Model(inputs, L.Dense(5)(L.Flatten()(x)))
    _randomize_batch_norm(model)
    qmodel, found = _export(model, _images(scale=4.0), scheme)
    names = [layer.activation_name for layer in qmodel.layers if isinstance(layer, QuantActivation)]
    assert names.count("relu6") == 3, names
    _exact(found)


def test_relu_with_another_max_value_is_refused_at_quantize_time():
    model = keras.Sequential([keras.Input((8, 8, 1)), L.Conv2D(4, 3), L.ReLU(max_value=4.0)])
    with pytest.raises(ValueError, match="'re_lu.*ReLU"):
        tfquant.quantize_model(model, "lsq_w4a4")


@pytest.mark.parametrize("followed_by", ["relu", "relu6", "conv", "add"])
def test_batch_norm_that_follows_no_kernel(followed_by):
    """Pre-activation BatchNormalization (ResNet V2, DenseNet) and one alone
    become integer per-channel affine ops between two quantizers."""
    keras.utils.set_random_seed(1)
    inputs = keras.Input((10, 10, 3))
    y = L.ReLU()(L.Conv2D(6, 3, padding="same")(inputs))
    x = L.BatchNormalization()(y)
    if followed_by in ("relu", "relu6"):
        x = L.ReLU(6.0 if followed_by == "relu6" else None)(x)
    elif followed_by == "add":
        x = L.Add()([x, y])
    x = L.Conv2D(6, 3)(x)
    model = keras.Model(inputs, L.Dense(5)(L.GlobalAveragePooling2D()(x)))
    _randomize_batch_norm(model, seed=2)
    _, found = _export(model, _images(size=10))
    _exact(found)


def test_rescaling_and_normalization_at_the_input():
    keras.utils.set_random_seed(2)
    x = _images(scale=255.0)
    normalization = L.Normalization()
    normalization.adapt(x / 127.5 - 1.0)
    model = keras.Sequential(
        [
            keras.Input((12, 12, 3)),
            L.Rescaling(1 / 127.5, offset=-1.0),
            normalization,
            L.Conv2D(8, 3, activation="relu"),
            L.GlobalAveragePooling2D(),
            L.Dense(5),
        ]
    )
    qmodel, found = _export(model, x, "lsq_w8a8")
    _exact(found)
    # The chain is one fixed affine, one integer op in the file (each costs as
    # much as a small convolution on the full-size input).
    affines = [layer for layer in qmodel.layers if isinstance(layer, L.BatchNormalization)]
    assert [layer.name for layer in affines] == [model.layers[0].name]
    reference = model.predict(x, verbose=0)
    error = np.abs(qmodel.predict(x, verbose=0) - reference).max()
    assert error < 0.1 * np.abs(reference).max()


def test_nested_model_is_flattened():
    """The transfer-learning pattern: a base model called inside a head."""
    keras.utils.set_random_seed(3)
    base = keras.Sequential(
        [
            keras.Input((12, 12, 3)),
            L.Conv2D(8, 3),
            L.BatchNormalization(),
            L.ReLU(6.0),
            L.Cropping2D(1),
            L.Conv2D(8, 3, padding="same", activation="relu"),
        ],
        name="base",
    )
    inputs = keras.Input((12, 12, 3))
    x = base(inputs, training=False)
    model = keras.Model(inputs, L.Dense(5)(L.GlobalMaxPooling2D()(x)))
    _randomize_batch_norm(base, seed=4)
    qmodel, found = _export(model, _images())
    assert not any(isinstance(layer, keras.Model) for layer in qmodel.layers)
    assert "base" not in [layer.name for layer in qmodel.layers]
    _exact(found)


def test_separable_conv_is_a_depthwise_and_a_pointwise_conv():
    keras.utils.set_random_seed(6)
    model = keras.Sequential(
        [
            keras.Input((12, 12, 3)),
            L.SeparableConv2D(8, 3, depth_multiplier=2, padding="same", activation="relu"),
            L.SeparableConv2D(6, 3, strides=2, use_bias=False),
            L.BatchNormalization(),
            L.ReLU(),
            L.Flatten(),
            L.Dense(5),
        ]
    )
    _randomize_batch_norm(model, seed=7)
    x = _images()
    qmodel, found = _export(model, x)
    kinds = [type(layer).__name__ for layer in qmodel.layers]
    assert kinds.count("QuantDepthwiseConv2D") == 2 and kinds.count("QuantConv2D") == 2
    _exact(found)
    # The rewrite itself computes what the float model computes.
    rewritten = quantize_module._flattened(model)
    np.testing.assert_allclose(
        rewritten.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-4, atol=1e-4
    )


def test_reshaped_head_gets_its_output_grid():
    """MobileNet's head: a 1x1 convolution on pooled features, then Reshape."""
    keras.utils.set_random_seed(4)
    inputs = keras.Input((8, 8, 3))
    x = L.GlobalAveragePooling2D(keepdims=True)(L.Conv2D(8, 3, activation="relu")(inputs))
    x = L.Reshape((5,))(L.Conv2D(5, 1)(L.Dropout(0.1)(x)))
    _, found = _export(keras.Model(inputs, x), _images(size=8))
    _exact(found)


def _concatenating_model():
    inputs = keras.Input((10, 10, 3))
    a = L.Conv2D(6, 3, padding="same", activation="relu")(inputs)
    b = L.Conv2D(4, 1)(a)
    x = L.ReLU()(L.BatchNormalization()(L.Concatenate()([a, b])))
    c = L.Conv2D(5, 3, padding="same")(x)
    # `a` feeds two concatenations, each on its own grid.
    x = L.Concatenate()([x, c, a])
    return keras.Model(inputs, L.Dense(5)(L.GlobalAveragePooling2D()(x)))


@pytest.mark.parametrize("scheme", ["lsq_w4a4", "qil_w4a4"])
def test_concatenate_shares_one_grid(scheme, tmp_path):
    """DenseNet's and Inception's pattern; the integer CONCATENATION copies bytes."""
    keras.utils.set_random_seed(5)
    model = _concatenating_model()
    _randomize_batch_norm(model, seed=6)
    x = _images(size=10)
    qmodel, found = _export(model, x, scheme)
    _exact(found)
    joins = [layer for layer in qmodel.layers if isinstance(layer, QuantConcatenate)]
    assert len(joins) == 2
    assert all(layer.requantization is not None for layer in joins)
    path = str(tmp_path / "concat.keras")
    qmodel.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), qmodel.predict(x, verbose=0))


def _average_pool_reference(codes, window, stride):
    """TFLite's int8 AVERAGE_POOL_2D with SAME padding, one loop per output."""
    _, height, width, _ = codes.shape
    out_h, out_w = -(-height // stride), -(-width // stride)
    top = max((out_h - 1) * stride + window - height, 0) // 2
    left = max((out_w - 1) * stride + window - width, 0) // 2
    out = np.zeros((codes.shape[0], out_h, out_w, codes.shape[3]), np.int64)
    for i in range(out_h):
        for j in range(out_w):
            r0, c0 = i * stride - top, j * stride - left
            rows = slice(max(r0, 0), min(r0 + window, height))
            cols = slice(max(c0, 0), min(c0 + window, width))
            block = codes[:, rows, cols, :].astype(np.int64)
            total, count = block.sum(axis=(1, 2)), block.shape[1] * block.shape[2]
            # C integer division truncates: ties round away from zero.
            rounded = np.where(
                total >= 0, (total + count // 2) // count, -((-total + count // 2) // count)
            )
            out[:, i, j, :] = np.clip(rounded, -128, 127)
    return out


@pytest.mark.parametrize("window,stride", [(3, 1), (2, 2), (3, 2)])
def test_padded_average_pooling_rounds_like_the_kernel(window, stride):
    rng = np.random.default_rng(window * 10 + stride)
    scale, zero_point, offset = 0.05, -3, 0.1
    codes = rng.integers(-128, 128, (4, 7, 7, 3))
    x = (offset + scale * (codes - zero_point)).astype(np.float32)
    layer = QuantAveragePooling2D(pool_size=window, strides=stride, padding="same")
    layer.set_requantization({"scale": scale, "zero_point": zero_point, "offset": offset})
    got = np.round((np.asarray(layer(x)) - offset) / scale).astype(np.int64) + zero_point
    np.testing.assert_array_equal(got, _average_pool_reference(codes, window, stride))
    # Training averages in float.
    float_mean = keras.layers.AveragePooling2D(window, stride, padding="same")(x)
    np.testing.assert_allclose(layer(x, training=True), float_mean, rtol=1e-6)


def test_per_layer_schemes():
    inputs = keras.Input((10, 10, 3))
    x = L.Conv2D(4, 3, activation="relu", name="stem")(inputs)
    x = L.Conv2D(4, 3, name="block1_conv")(x)
    x = L.ReLU(name="block1_relu")(x)
    x = L.Conv2D(4, 3, activation="relu", name="block2_conv")(x)
    model = keras.Model(inputs, L.Dense(5, name="head")(L.Flatten()(x)))
    qmodel = tfquant.quantize_model(
        model,
        "lsq_w4a4",
        layers={"block1_.*": "8bit", "block2_conv": {"weight_bits": 3}, "head": "lsq_w4a4"},
    )

    def weight_bits(name):
        return qmodel.get_layer(name).kernel_quantizer.inference_form().bits

    assert weight_bits("stem") == 8  # the first layer keeps the scheme's 8 bits
    assert weight_bits("block1_conv") == 8
    assert qmodel.get_layer("block1_relu").quantizer.inference_form().bits == 8
    assert weight_bits("block2_conv") == 3
    assert weight_bits("head") == 4  # named: its own scheme, not the last layer's 8 bits
    with pytest.raises(ValueError, match="'block9' matches no layer"):
        tfquant.quantize_model(model, "lsq_w4a4", layers={"block9": "8bit"})
    with pytest.raises(ValueError, match="layers\\['stem'\\]: unknown scheme field"):
        tfquant.quantize_model(model, "lsq_w4a4", layers={"stem": {"bitz": 3}})


def test_unsupported_layer_is_named_at_quantize_time():
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3)(inputs)
    x = L.LayerNormalization(name="norm")(x)
    model = keras.Model(inputs, x)
    with pytest.raises(ValueError, match="'norm' of type LayerNormalization.*supported"):
        tfquant.quantize_model(model, "lsq_w4a4")


def test_raw_keras_ops_are_named_at_quantize_time():
    """A keras.ops call in a functional graph (MobileNetV3 writes hard-sigmoid so)."""
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3)(inputs)
    x = keras.ops.relu(x) * (1.0 / 6.0)
    model = keras.Model(inputs, L.Dense(3)(L.Flatten()(x)))
    with pytest.raises(ValueError, match="operation 'relu'.*keras.ops call \\(Relu\\)"):
        tfquant.quantize_model(model, "lsq_w4a4")


def _application(name, size):
    kwargs = {"alpha": 0.35} if name.startswith("MobileNet") else {}
    return getattr(keras.applications, name)(
        weights=None,
        input_shape=(size, size, 3),
        classes=10,
        classifier_activation=None,
        **kwargs,
    )


# The smallest input each family takes.
_SIZES = {"InceptionV3": 75}


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        "MobileNet",
        "MobileNetV2",
        "MobileNetV3Small",
        "EfficientNetB0",
        "EfficientNetV2B0",
        "ResNet50V2",
        "DenseNet121",
        "InceptionV3",
        "NASNetMobile",
    ],
)
@pytest.mark.parametrize("scheme", ["lsq_w8a8", "lsq_w4a4"])
def test_application_exports_code_for_code(name, scheme):
    keras.utils.set_random_seed(5)
    size = _SIZES.get(name, 32)
    model = _application(name, size)
    x = _images(count=64, size=size)
    tfquant.reestimate_batch_norm(model, x)
    _, found = _export(model, x, scheme)
    assert found["top1_agreement"] == 1.0, found
    _exact(found)


def _gated_model():
    """EfficientNet's layers: swish as an Activation and inside a Conv2D, a
    squeeze-excite gate (a Conv2D with a sigmoid, broadcast by Multiply), Dropout."""
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", use_bias=False)(inputs)
    x = L.BatchNormalization()(x)
    x = L.Activation("swish")(x)
    x = L.DepthwiseConv2D(3, padding="same")(x)
    gate = L.Reshape((1, 1, 8))(L.GlobalAveragePooling2D()(x))
    gate = L.Conv2D(4, 1, activation="swish")(gate)
    gate = L.Conv2D(8, 1, activation="sigmoid")(gate)
    x = L.Multiply()([x, gate])
    x = L.Dropout(0.2)(L.Conv2D(8, 1)(x))
    return keras.Model(inputs, L.Dense(5)(L.GlobalAveragePooling2D()(x)))


@pytest.mark.parametrize("scheme", ["lsq_w8a8", "qil_w4a4"])
def test_swish_sigmoid_and_multiply(scheme, tmp_path):
    from test_random_graphs import move_learned_parameters

    from tfquant.layers import QuantMultiply

    keras.utils.set_random_seed(3)
    model = _gated_model()
    _randomize_batch_norm(model, seed=4)
    x = _images(size=8, scale=2.0)
    qmodel = tfquant.quantize_model(model, scheme, calibration_data=x[:64])
    move_learned_parameters(qmodel, np.random.default_rng(5))
    result = lite.export_model(qmodel, x, runtimes=("default",), allow_mismatch=True)
    _exact(result.report["verification"])
    ops = {op["op_name"] for op in lite.inspect.ops(result.content)}
    assert {"LOGISTIC", "MUL"} <= ops, ops
    products = [layer for layer in qmodel.layers if isinstance(layer, QuantMultiply)]
    assert len(products) == 3  # two swish, one gate
    assert set(result.report["products"]) == {layer.name for layer in products}
    assert all(abs(change) < 0.01 for change in result.report["products"].values())
    path = str(tmp_path / "gated.keras")
    qmodel.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), qmodel.predict(x, verbose=0))


@pytest.mark.slow
def test_multiply_computes_the_same_codes_on_x86_and_arm64():
    """XNNPACK's MUL rounds differently on the two CPUs; with the product grids
    the exporter chooses (tfquant.lite.align_products) both agree with Keras."""
    from tfquant.lite import arm64

    try:
        arm64.check_environment()
    except arm64.Arm64Error as error:
        pytest.skip(f"no arm64 environment: {error}")
    keras.utils.set_random_seed(7)
    model = _gated_model()
    _randomize_batch_norm(model, seed=8)
    x = _images(count=128, size=8, scale=3.0, seed=9)
    qmodel = tfquant.quantize_model(model, "lsq_w8a8", calibration_data=x[:64])
    result = lite.export_model(
        qmodel, x, targets=("x86", "arm64"), runtimes=("default",), allow_mismatch=True
    )
    for target in ("x86", "arm64"):
        _exact(result.report["targets"][target]["default"])


@pytest.mark.parametrize("scheme", ["lsq_w8a8", "qil_w4a4"])
def test_hard_swish_and_raw_hard_sigmoid(scheme):
    """MobileNetV3's layers: Activation("hard_swish"), and a squeeze-excite gate
    whose hard-sigmoid is written with raw keras.ops calls."""
    from test_random_graphs import move_learned_parameters

    inputs = keras.Input((8, 8, 3))
    x = L.Rescaling(1.0 / 127.5, offset=-1.0)(inputs)
    x = L.Conv2D(8, 3, padding="same", use_bias=False)(x)
    x = L.Activation("hard_swish")(L.BatchNormalization()(x))
    gate = L.GlobalAveragePooling2D(keepdims=True)(x)
    gate = L.Conv2D(8, 1)(L.ReLU()(L.Conv2D(4, 1)(gate)))
    gate = L.ReLU(6.0)(gate + 3.0) * (1.0 / 6.0)
    x = L.Multiply()([x, gate])
    model = keras.Model(inputs, L.Dense(5)(L.Flatten()(L.Conv2D(4, 1)(x))))
    keras.utils.set_random_seed(11)
    _randomize_batch_norm(model, seed=12)
    x_data = _images(size=8, scale=255.0)
    qmodel = tfquant.quantize_model(model, scheme, calibration_data=x_data[:64])
    move_learned_parameters(qmodel, np.random.default_rng(13))
    names = [layer.name for layer in qmodel.layers]
    assert any(name.endswith("_hard_sigmoid") for name in names)
    result = lite.export_model(qmodel, x_data, runtimes=("default",), allow_mismatch=True)
    _exact(result.report["verification"])


@pytest.mark.parametrize("head", ["dense_softmax", "activation_softmax"])
def test_softmax_head_ties_as_the_file_does(head, tmp_path):
    """keras.applications' default head ends in softmax. TFLite's int8 SOFTMAX
    writes probabilities on a 1/256 grid, where near-equal classes tie; the
    Keras model rounds onto the same grid in inference (not in training), so
    its top-1 is the file's. Before, an untrained model's top-1 agreement was
    82% with 100% identical codes."""
    rng = np.random.default_rng(0)
    inputs = keras.Input((8, 8, 3))
    x = L.GlobalAveragePooling2D()(L.Conv2D(8, 3, activation="relu")(inputs))
    if head == "dense_softmax":
        outputs = L.Dense(10, activation="softmax")(x)
    else:
        outputs = L.Activation("softmax")(L.Dense(10)(x))
    model = keras.Model(inputs, outputs)
    x = rng.uniform(0, 1, (256, 8, 8, 3)).astype(np.float32)
    qmodel = tfquant.quantize_model(model, "lsq_w8a8", calibration_data=x[:64])
    probabilities = qmodel.predict(x, verbose=0)
    np.testing.assert_array_equal(probabilities * 256, np.round(probabilities * 256))
    result = lite.export_model(qmodel, x, runtimes=("default",))  # default bars: 100% top-1
    _exact(result.report["verification"])
    assert result.report["verification"]["top1_agreement"] == 1.0
    ops = [op["op_name"] for op in lite_inspect.ops(result.content)]
    assert ops.count("SOFTMAX") == 1 and "DEQUANTIZE" not in ops, ops
    # Training sees the float probabilities: a loss on them keeps its gradient.
    in_training = keras.ops.convert_to_numpy(qmodel(x[:8], training=True))
    assert not np.array_equal(in_training * 256, np.round(in_training * 256))
    qmodel.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy())
    history = qmodel.fit(x, rng.integers(0, 10, 256), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    path = str(tmp_path / "softmax.keras")
    qmodel.save(path)
    np.testing.assert_array_equal(
        keras.models.load_model(path).predict(x, verbose=0), qmodel.predict(x, verbose=0)
    )
