"""Integer TFLite export: exact weight codes, k-bit activations, agreement, bad input."""

import os

import keras
import numpy as np
import pytest

import tfquant
from tfquant import lite
from tfquant.datasets import load_arrays
from tfquant.lite import inspect as lite_inspect
from tfquant.lite import verify

L = keras.layers
# INT4 weights, made exact for this host's kernels, so that the host can verify them.
_INT4_HERE = {"int4_weights": True, "target": verify.host_target()}


def _float_model(input_shape):
    inputs = keras.Input(input_shape)
    x = L.Conv2D(8, 3, padding="same", use_bias=False)(inputs)
    x = L.BatchNormalization()(x)
    x = L.ReLU()(x)
    y = L.Conv2D(8, 3, padding="same", use_bias=False)(x)
    y = L.BatchNormalization()(y)
    x = L.ReLU()(L.Add()([x, y]))
    x = L.DepthwiseConv2D(3, padding="same")(x)
    x = L.BatchNormalization()(x)
    x = L.ReLU()(x)
    x = L.MaxPooling2D()(x)
    x = L.Conv2D(16, 3, padding="same")(x)
    x = L.ReLU()(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, L.Dense(10)(x))


@pytest.fixture(scope="module")
def digits():
    return load_arrays("digits")


@pytest.fixture(scope="module")
def trained(digits):
    keras.utils.set_random_seed(0)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model = _float_model(digits.input_shape)
    model.compile(keras.optimizers.Adam(3e-3), loss)
    model.fit(digits.x_train, digits.y_train, epochs=4, batch_size=64, verbose=0)
    # After 90 steps, BatchNormalization's moving averages (momentum 0.99) still
    # hold much of their initial values: the model would be at chance in inference.
    tfquant.reestimate_batch_norm(model, digits.x_train)
    qmodel = tfquant.quantize_model(model, "qil_w4a4", calibration_data=digits.x_train[:256])
    qmodel.compile(keras.optimizers.Adam(1e-3), loss)
    qmodel.fit(digits.x_train, digits.y_train, epochs=1, batch_size=64, verbose=0)
    tfquant.reestimate_batch_norm(qmodel, digits.x_train)
    return model, qmodel


@pytest.fixture(scope="module")
def exported(trained, digits):
    return lite.export_model(trained[1], digits.x_test, digits.y_test, **_INT4_HERE)


def test_fully_integer_with_int4_weights(exported):
    assert lite_inspect.non_integer_ops(exported.content) == []
    storage = [w["storage"] for w in exported.report["weights"]]
    # First conv and the classifier at 8 bits, the rest at 4; the requantized sum
    # feeding QIL's ReLU quantizer goes through an identity depthwise convolution
    # (8-bit weight 1), the global average pooling through a fully connected
    # layer with weights 1/(H*W).
    assert storage == ["INT8", "INT4", "INT8", "INT4", "INT4", "INT8", "INT8"]


def test_weight_codes_read_back_exactly(trained, exported):
    qmodel = trained[1]
    lowered = lite.lower_model(qmodel)
    reports = [r for r in lowered.layers if r.weight_bits]
    tensors = [
        t
        for t in lite_inspect.weight_tensors(exported.content)
        if not (t["op"] != "CONV_2D" and np.all(t["values"] == 127))
    ]
    assert len(reports) == len(tensors)
    for report, tensor in zip(reports, tensors, strict=True):
        stored = tensor["values"].astype(np.int64)
        if report.kind == "QuantConv2D":
            stored = stored.transpose(1, 2, 3, 0)  # OHWI -> HWIO
        elif report.kind == "QuantDepthwiseConv2D":
            stored = stored.reshape(report.codes.shape)  # (1, H, W, C*M) -> HWCM
        else:
            stored = stored.T  # (out, in) -> (in, out)
        # BatchNorm folding may flip a channel's sign (negative gamma), nothing else.
        np.testing.assert_array_equal(np.abs(stored), np.abs(report.codes), err_msg=report.name)
        expected = report.weight_scales[: tensor["scales"].size]  # Dense: one per tensor
        np.testing.assert_allclose(tensor["scales"], expected, rtol=1e-5)


def test_activation_codes_use_at_most_2_to_k_levels(trained, exported, digits):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interp = Interpreter(
        model_content=exported.content,
        experimental_preserve_all_tensors=True,
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    detail = interp.get_input_details()[0]
    x = digits.x_test[:64]
    interp.resize_tensor_input(detail["index"], x.shape)
    interp.allocate_tensors()
    scale, zero_point = interp.get_input_details()[0]["quantization"]
    interp.set_tensor(
        detail["index"], np.clip(np.floor(x / scale + 0.5) + zero_point, -128, 127).astype(np.int8)
    )
    interp.invoke()
    first_conv = interp._get_ops_details()[0]
    assert first_conv["op_name"] == "CONV_2D"
    values = interp.get_tensor(first_conv["outputs"][0])
    assert 8 < len(np.unique(values)) <= 16  # a 4-bit activation inside int8
    _, zp = interp.get_tensor_details()[first_conv["outputs"][0]]["quantization"]
    assert zp == 128 - 16 and values.min() >= zp


def test_agreement_with_keras(exported):
    verification = exported.report["verification"]
    assert verification["top1_agreement"] >= 0.99
    assert verification["max_output_step_difference"] <= 16
    assert abs(verification["tflite_accuracy"] - verification["keras_accuracy"]) <= 0.01


def test_align_biases_puts_biases_on_the_int32_grid(trained, digits):
    qmodel = trained[1]
    before = qmodel.predict(digits.x_test[:64], verbose=0)
    lite.align_biases(qmodel)
    again = lite.align_biases(qmodel)
    assert again, "no layer was aligned"
    steps = {
        r["name"]: r["bias_step"]
        for r in lite.export_model(
            qmodel, digits.x_test[:64], allow_mismatch=True, align=False
        ).report["layers"]
        if "bias_step" in r
    }
    for name, shift in again.items():
        assert shift <= 1e-3 * steps[name], (name, shift, steps[name])
    after = qmodel.predict(digits.x_test[:64], verbose=0)
    # A shift of at most half a bias step flips a 4-bit code only where a value
    # sat within that of a half step; each flip moves the logits it feeds by a
    # fraction of their range, and seldom the prediction.
    assert (after.argmax(axis=1) == before.argmax(axis=1)).mean() >= 63 / 64
    assert np.abs(after - before).max() <= 0.1 * np.abs(before).max()


@pytest.mark.parametrize("int4", [True, False], ids=["int4_weights", "int8_weights"])
def test_file_matches_keras_code_for_code(trained, digits, int4):
    options = _INT4_HERE if int4 else {}
    result = lite.export_model(trained[1], digits.x_test, digits.y_test, **options)
    verification = result.report["verification"]
    # Every kernel's requantization and the integer ADD emulated exactly.
    assert verification["top1_agreement"] == 1.0, verification
    assert verification["identical_output_codes"] == 1.0, verification
    assert verification["max_output_step_difference"] == 0, verification
    ops = {op["op_name"] for op in lite_inspect.ops(result.content)}
    assert "SUB" not in ops, ops  # offsets ride in depthwise biases, inside the delegate
    roundings = {
        layer.name: layer.requantization["rounding"]
        for layer in trained[1].layers
        if isinstance(layer, tfquant.layers.QuantActivation) and layer.requantization
    }
    # XNNPACK (INT8 weights) rounds once in float32; x86's INT4 kernels twice.
    expected = {"float32"} | ({"double"} if int4 and verify.host_target() == "x86" else set())
    assert set(roundings.values()) == expected, roundings


def test_int4_rounding_follows_the_target(exported, trained):
    """arm64's INT4 convolutions round once (ruy), x86's twice; depthwise
    convolutions twice on both; INT8 weights in XNNPACK, in float32; the sum
    as XNNPACK's integer ADD."""
    from tfquant.lite import rounding

    qmodel = keras.models.clone_model(trained[1])
    qmodel.set_weights(trained[1].get_weights())
    on_arm64 = lite.match_integer_kernels(qmodel, exported.content, target="arm64")
    on_x86 = lite.match_integer_kernels(qmodel, exported.content, target="x86")
    assert set(on_arm64) == set(on_x86) and len(on_arm64) >= 4, on_arm64
    assert set(on_arm64.values()) == {"float32", "single", "double", "add"}, on_arm64
    assert set(on_x86.values()) == {"float32", "double", "add"}, on_x86
    # The classifier's input quantizer after global average pooling: the
    # pooling's fully connected layer runs in XNNPACK.
    dense = next(layer for layer in qmodel.layers if isinstance(layer, tfquant.layers.QuantDense))
    assert on_x86[dense.name] == "float32" and dense.input_requantization is not None
    assert rounding.kernel_rounding("FULLY_CONNECTED", "INT4", 64, "x86") == "float32"
    assert rounding.kernel_rounding("FULLY_CONNECTED", "INT4", 63, "arm64") == "single"
    with pytest.raises(lite.ExportError, match="'mips'"):
        lite.match_integer_kernels(qmodel, exported.content, target="mips")
    with pytest.raises(lite.ExportError, match="'mips'"):
        lite.export_model(qmodel, np.zeros((1, 8, 8, 1), np.float32), target="mips")


def test_compare_layers_finds_each_quantizer_tensor(trained, digits):
    from tfquant.lite import verify

    result = lite.export_model(trained[1], digits.x_test, digits.y_test)
    rows = verify.compare_layers(trained[1], result.content, digits.x_test[:32])
    matched = [row for row in rows if row["tensor"] is not None]
    assert len(matched) >= len(rows) - 1, rows
    assert all(row["identical_codes"] == 1.0 for row in matched), rows
    assert "identical codes" in verify.format_layers(rows)


def test_exact_requantization_round_trips_and_refuses_bad_specs():
    spec = {
        "rounding": "single",
        "accumulator_scale": [0.01, 0.02],
        "output_scale": 0.1,
        "offset": 0.25,
        "multiplier": [1 << 30, 1 << 30],
        "exponent": [-2, -3],
    }
    layer = tfquant.layers.QuantActivation("linear", quantizer="minmax", requantization=spec)
    restored = tfquant.layers.QuantActivation.from_config(layer.get_config())
    assert restored.requantization == layer.requantization
    with pytest.raises(ValueError, match="requantization"):
        layer.set_requantization({"rounding": "single"})
    with pytest.raises(ValueError, match="invalid requantization"):
        layer.set_requantization({**spec, "rounding": "nearest"})
    # The earlier approximate form is dropped, not applied.
    layer.set_requantization({"scale": 0.5, "offset": 0.0, "exponents": [-3]})
    assert layer.requantization is None


@pytest.mark.parametrize("count", [5, 256, 300])
def test_keras_outputs_match_predict_whatever_the_count(count):
    inputs = keras.Input((3,))
    model = keras.Model(inputs, [keras.layers.Dense(2)(inputs), keras.layers.Dense(4)(inputs)])
    x = np.random.default_rng(count).normal(size=(count, 3)).astype(np.float32)
    got = verify.keras_outputs(model, x)
    want = model.predict(x, batch_size=256, verbose=0)
    assert [g.shape for g in got] == [(count, 2), (count, 4)]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


def test_report_lists_every_change_export_makes_to_the_model(trained, digits):
    """export_model aligns the model in place; the report names each layer
    whose variables it moved, and no other layer changed."""
    # A model no export has aligned yet (other tests export the fixture's).
    qmodel = tfquant.quantize_model(trained[0], "qil_w4a4", calibration_data=digits.x_train[:256])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    qmodel.compile(loss=loss)
    qmodel.evaluate(digits.x_test, digits.y_test, verbose=0)  # traces evaluate's function
    before = {layer.name: [w.copy() for w in layer.get_weights()] for layer in qmodel.layers}
    result = lite.export_model(qmodel, digits.x_test, digits.y_test, **_INT4_HERE)
    changes = result.report["model_changes"]
    # evaluate traces again: it measures the aligned model, as predict does.
    after = qmodel.evaluate(digits.x_test, digits.y_test, verbose=0)
    predicted = qmodel.predict(digits.x_test, verbose=0)
    assert after == pytest.approx(float(loss(digits.y_test, predicted)), rel=1e-5)
    moved = {
        layer.name
        for layer in qmodel.layers
        if any(
            not np.array_equal(a, b)
            for a, b in zip(before[layer.name], layer.get_weights(), strict=True)
        )
    }
    listed = set(changes["bias_shifted"]) | set(changes["levels_rounded"])
    listed |= set(changes["product_grids_moved"])

    def owner(name):  # a folded bias moves in the BatchNormalization after the kernel
        layer = qmodel.get_layer(name)
        if isinstance(layer, L.BatchNormalization):
            return layer._inbound_nodes[0].input_tensors[0]._keras_history[0].name
        return name

    assert moved and {owner(name) for name in moved} == listed, (moved, changes)
    assert set(changes["requantization_set"]) >= {
        layer.name for layer in qmodel.layers if getattr(layer, "requantization", None)
    }
    # The aligned model is what the file computes.
    raw, _ = verify.run_tflite(result.content, digits.x_test)
    keras_top1 = np.argmax(qmodel.predict(digits.x_test, verbose=0), -1)
    np.testing.assert_array_equal(np.argmax(raw, -1), keras_top1)


def test_save_writes_model_and_reports(exported, tmp_path):
    path = tmp_path / "m.tflite"
    lite.save_export(exported, str(path))
    assert path.read_bytes() == exported.content
    assert "top-1 agreement" in (tmp_path / "m.txt").read_text()
    assert '"verification"' in (tmp_path / "m.json").read_text()
    assert sorted(os.listdir(tmp_path)) == ["m.json", "m.tflite", "m.txt"]  # no temporary left


def test_float_model_needs_quantizers_or_post_training(trained, digits):
    with pytest.raises(lite.ExportError, match="quantize_model.*post-training"):
        lite.export_model(trained[0], digits.x_test[:32])
    result = lite.export_model(
        trained[0], digits.x_train[:64], post_training=True, min_agreement=0.0
    )
    assert lite_inspect.non_integer_ops(result.content) == []


def test_unsupported_layer_is_named(trained):
    qmodel = trained[1]
    x = L.LayerNormalization(name="odd_norm")(qmodel.outputs[0])
    with pytest.raises(lite.ExportError, match="'odd_norm'.*LayerNormalization"):
        lite.lower_model(keras.Model(qmodel.inputs, x))


def test_bits_above_8_rejected(trained):
    qmodel = keras.models.clone_model(trained[1])
    qmodel.set_weights(trained[1].get_weights())
    layer = next(layer for layer in qmodel.layers if hasattr(layer, "kernel_quantizer"))
    layer.kernel_quantizer.bits = 9
    with pytest.raises(lite.ExportError, match="got 9"):
        lite.lower_model(qmodel)


def _verification_lowered(monkeypatch, **values):
    """Makes export_model see each CPU's default-runtime figures set to `values`."""
    real = verify.compare_on_targets

    def lowered(*args, **kwargs):
        found = real(*args, **kwargs)
        for by_runtime in found.values():
            for name, value in values.items():
                setattr(by_runtime["default"], name, value)
        return found

    monkeypatch.setattr(verify, "compare_on_targets", lowered)


def test_mismatch_refused_without_flag(trained, digits, monkeypatch):
    _verification_lowered(monkeypatch, top1_agreement=0.9)
    with pytest.raises(lite.ExportError, match=r"top-1 agreement .* below the required 100\.00%"):
        lite.export_model(trained[1], digits.x_test[:64])
    with pytest.raises(lite.ExportError, match="min_agreement must be in"):
        lite.export_model(trained[1], digits.x_test[:64], min_agreement=1.01)
    assert lite.export_model(trained[1], digits.x_test[:64], allow_mismatch=True).content


@pytest.mark.parametrize("case", ["missing_model", "corrupt_model", "missing_directory"])
def test_binary_bad_input(tmp_path, trained, case):
    from export import export_tflite

    model_path = tmp_path / "m.keras"
    output = tmp_path / "out.tflite"
    if case == "corrupt_model":
        model_path.write_bytes(b"not a zip file")
    elif case == "missing_directory":
        trained[1].save(model_path)
        output = tmp_path / "nowhere" / "out.tflite"
    messages = {
        "missing_model": "does not exist",
        "corrupt_model": "cannot load",
        "missing_directory": "does not exist",
    }
    with pytest.raises(lite.ExportError, match=messages[case]):
        export_tflite.run(str(model_path), str(output), "digits", 64, "int8", 0.995, False, False)
    assert not output.exists()
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())


def _pooled_model(input_shape, pooling):
    inputs = keras.Input(input_shape)
    x = L.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    x = pooling(x)
    x = L.Conv2D(8, 2, activation="relu")(x)
    x = L.Flatten()(x)
    return keras.Model(inputs, L.Dense(10)(x))


@pytest.mark.parametrize(
    "pooling, kept",
    [
        (lambda: L.AveragePooling2D(2), False),
        (lambda: L.AveragePooling2D(2, padding="same"), False),  # 8x8: windows tile it
        (lambda: L.AveragePooling2D(3, strides=1, padding="valid"), False),
        (lambda: L.AveragePooling2D(3, strides=2, padding="same"), True),  # edge windows padded
    ],
    ids=["2x2", "2x2_same_tiled", "3x3_stride1", "3x3_same_padded"],
)
def test_average_pooling_rounds_once(digits, pooling, kept):
    """A window average is a convolution with weights 1/(h*w), rounded once onto
    the next grid as in Keras; AVERAGE_POOL_2D would first round onto its input's
    grid. Only windows that reach into SAME padding keep AVERAGE_POOL_2D."""
    model = _pooled_model(digits.input_shape, pooling())
    qmodel = tfquant.quantize_model(model, "lsq_w4a4", calibration_data=digits.x_train[:256])
    result = lite.export_model(qmodel, digits.x_test, digits.y_test, allow_mismatch=True)
    ops = [op["op_name"] for op in lite_inspect.ops(result.content)]
    assert ("AVERAGE_POOL_2D" in ops) == kept, ops
    if not kept:
        verification = result.report["verification"]
        assert verification["identical_output_codes"] == 1.0, verification
        assert verification["max_output_step_difference"] == 0, verification


@pytest.mark.parametrize("size, lowered", [(5, "DEPTHWISE_CONV_2D"), (12, "FULLY_CONNECTED")])
def test_global_average_lowers_to_a_fast_exact_op(size, lowered):
    """Global average pooling sums in int32 and rounds once: a depthwise
    convolution up to 5x5 (one XNNPACK pass), a TRANSPOSE and a fully
    connected layer above it (the convolution's multi-pass path is 10-40x
    slower). Both give Keras's codes, as a squeeze-excite gate and as the
    classifier's input, on x86 and (when built) on emulated arm64."""
    from tfquant.lite import arm64

    rng = np.random.default_rng(size)
    inputs = keras.Input((size, size, 3))
    x = L.ReLU()(L.BatchNormalization()(L.Conv2D(16, 3, padding="same")(inputs)))
    gate = L.Dense(16, activation="sigmoid")(L.GlobalAveragePooling2D()(x))
    x = L.Multiply()([x, L.Reshape((1, 1, 16))(gate)])
    model = keras.Model(inputs, L.Dense(5)(L.GlobalAveragePooling2D()(x)))
    images = rng.uniform(0, 1, (96, size, size, 3)).astype(np.float32)
    qmodel = tfquant.quantize_model(model, "lsq_w8a8", calibration_data=images[:64])
    targets = [verify.host_target()]
    try:
        arm64.check_environment()
        targets.append("arm64")
    except arm64.Arm64Error:
        pass
    result = lite.export_model(qmodel, images, targets=targets, runtimes=("default",))
    ops = [op["op_name"] for op in lite_inspect.ops(result.content)]
    assert ("TRANSPOSE" in ops) == (lowered == "FULLY_CONNECTED") and "MEAN" not in ops, ops
    assert ops.count("FULLY_CONNECTED") == 2 + 2 * (lowered == "FULLY_CONNECTED"), ops
    for target in targets:
        checked = result.report["targets"][target]["default"]
        assert checked["identical_output_codes"] == 1.0, (target, checked)


def test_identical_codes_have_their_own_bar(trained, digits, monkeypatch):
    _verification_lowered(monkeypatch, identical_output_codes=0.99)
    with pytest.raises(lite.ExportError, match=r"identical output codes .* 99\.00%.*99\.90%"):
        lite.export_model(trained[1], digits.x_test[:64])
    result = lite.export_model(trained[1], digits.x_test[:64], min_identical_codes=0.98)
    assert result.report["min_identical_codes"] == 0.98 and result.report["min_agreement"] == 1.0
    with pytest.raises(lite.ExportError, match="min_identical_codes must be in"):
        lite.export_model(trained[1], digits.x_test[:64], min_identical_codes=1.5)


def test_a_quantizer_calibrated_on_zeros_is_named(digits, monkeypatch):
    """A layer whose calibration saw only zeros gets a near-zero step, which
    LiteRT's delegate may refuse: the error then names the layer."""
    inputs = keras.Input(digits.input_shape)
    x = L.ReLU(name="dead")(L.Conv2D(4, 3, padding="same")(inputs))
    model = keras.Model(inputs, L.Dense(3)(L.Flatten()(x)))
    scheme = {"weights": "lsq", "activations": "minmax", "bits": 8}
    qmodel = tfquant.quantize_model(model, scheme, calibration_data=digits.x_train[:64])
    qmodel.get_layer("dead").quantizer.range_max.assign(1e-6)

    def refused(*args, **kwargs):
        raise ValueError("LiteRT cannot run the file on x86 with the default runtime: prepare")

    monkeypatch.setattr(verify, "compare_on_targets", refused)
    with pytest.raises(lite.ExportError, match="layer 'dead' has a quantization step of .* calib"):
        lite.export_model(qmodel, digits.x_test[:16], allow_mismatch=True)


def test_a_degenerate_step_is_named_before_litert_runs(digits):
    """LiteRT aborts the process on some requantization multipliers out of
    range: a near-zero step is refused first, naming the layer."""
    inputs = keras.Input(digits.input_shape)
    x = L.ReLU(name="dead")(L.Conv2D(4, 3, padding="same")(inputs))
    model = keras.Model(inputs, L.Dense(3)(L.Flatten()(x)))
    scheme = {"weights": "lsq", "activations": "minmax", "bits": 8}
    qmodel = tfquant.quantize_model(model, scheme, calibration_data=digits.x_train[:64])
    qmodel.get_layer("dead").quantizer.range_max.assign(1e-9)
    with pytest.raises(lite.ExportError, match="layer 'dead' has a quantization step of .* calib"):
        lite.export_model(qmodel, digits.x_test[:16], allow_mismatch=True)


@pytest.mark.parametrize("post_training", [False, True])
def test_nan_weights_are_named_before_conversion(digits, post_training):
    """A diverged run leaves NaN in a variable (here a quantizer range, where
    it surfaced as "cannot convert float NaN to integer"): one error names
    the layer and the variable."""
    inputs = keras.Input(digits.input_shape)
    x = L.ReLU(name="act")(L.Conv2D(4, 3, padding="same", name="conv")(inputs))
    model = keras.Model(inputs, L.Dense(3)(L.Flatten()(x)))
    if post_training:
        kernel = model.get_layer("conv").kernel
        kernel.assign(np.where(np.arange(kernel.shape[-1]) == 1, np.nan, kernel.numpy()))
        target, name = model, "'conv': variable 'conv/kernel'"
    else:
        scheme = {"weights": "lsq", "activations": "minmax", "bits": 8}
        target = tfquant.quantize_model(model, scheme, calibration_data=digits.x_train[:64])
        target.get_layer("act").quantizer.range_max.assign(np.nan)
        name = "'act': variable 'act/.*range_max'"
    with pytest.raises(lite.ExportError, match=f"layer {name} holds NaN or inf") as raised:
        lite.export_model(
            target, digits.x_test[:16], post_training=post_training, allow_mismatch=True
        )
    assert "diverged" in str(raised.value)


@pytest.mark.parametrize("method", ["lsq", "qil"])
def test_many_quantizers_reading_one_tensor_stay_integer(method):
    """NASNet's pattern: one quantized tensor read by several ReLUs, each with
    its own (trained, so different) grid, and by a concatenation. Each read
    is an identity convolution; identical ones would be merged by the
    converter into one op that cannot keep two grids and falls back to
    float."""
    from test_random_graphs import move_learned_parameters

    rng = np.random.default_rng(3)
    inputs = keras.Input((6, 6, 3))
    shared = L.Add()([L.Conv2D(8, 1)(inputs), L.Conv2D(8, 3, padding="same")(inputs)])
    branches = [L.Conv2D(4, 1)(L.ReLU()(shared)) for _ in range(5)]
    y = L.Concatenate()([shared, *branches])
    outputs = L.Dense(5)(L.GlobalAveragePooling2D()(y))
    model = keras.Model(inputs, outputs)
    x = rng.normal(0.3, 1.0, (64, 6, 6, 3)).astype(np.float32)
    scheme = {"weights": method, "activations": method, "bits": 4}
    qmodel = tfquant.quantize_model(model, scheme, calibration_data=x)
    move_learned_parameters(qmodel, rng)
    result = lite.export_model(qmodel, x, allow_mismatch=True, runtimes=("default",))
    assert lite_inspect.non_integer_ops(result.content) == []
    verification = result.report["verification"]
    assert verification["identical_output_codes"] == 1.0, verification


def test_identity_convolutions_fold_to_distinct_weights():
    """What keeps the converter from merging two identity convolutions that
    read one tensor: their weights differ once their FakeQuant is folded, and
    stay close enough to 1 that 127 * code / weight rounds to 127 * code."""
    import tensorflow as tf

    from tfquant.lite.integer_ops import MAX_IDENTITY_SITES, identity_weight

    weights = np.float32([identity_weight(site) for site in range(MAX_IDENTITY_SITES)])
    folded = tf.quantization.fake_quant_with_min_max_vars_per_channel(
        weights[None, :], -weights, weights, num_bits=8, narrow_range=True
    ).numpy()[0]
    assert weights[0] == 1.0 and len(set(folded.tolist())) == MAX_IDENTITY_SITES
    codes = np.arange(-255, 256, dtype=np.float64)[:, None]
    assert np.abs(127 * codes / weights.astype(np.float64) - 127 * codes).max() < 0.3
