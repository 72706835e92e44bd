"""Verification on arm64 kernels: the worker protocol, the environment checks,
targets in export, and (slow) real runs under emulation."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import tfquant
from tfquant import lite
from tfquant.datasets import load_arrays
from tfquant.lite import arm64, litert_worker, verify

L = keras.layers


def _tiny_float_model(input_shape):
    inputs = keras.Input(input_shape)
    x = L.Conv2D(8, 3, padding="same", use_bias=False)(inputs)
    x = L.BatchNormalization()(x)
    x = L.ReLU()(x)
    x = L.Conv2D(12, 3, strides=2, padding="same")(x)
    x = L.ReLU()(x)
    x = L.GlobalAveragePooling2D()(x)
    x = L.Dense(16)(x)
    x = L.ReLU()(x)
    return keras.Model(inputs, L.Dense(10)(x))


@pytest.fixture(scope="module")
def digits():
    return load_arrays("digits")


@pytest.fixture(scope="module")
def quantized(digits):
    """A briefly trained LSQ W4A4 model (module scope: tests must not change it)."""
    keras.utils.set_random_seed(1)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model = _tiny_float_model(digits.input_shape)
    model.compile(keras.optimizers.Adam(3e-3), loss)
    model.fit(digits.x_train, digits.y_train, epochs=2, batch_size=64, verbose=0)
    qmodel = tfquant.quantize_model(model, "lsq_w4a4", calibration_data=digits.x_train[:256])
    qmodel.compile(keras.optimizers.Adam(1e-3), loss)
    qmodel.fit(digits.x_train, digits.y_train, epochs=1, batch_size=64, verbose=0)
    return qmodel


@pytest.fixture(scope="module")
def int8_file(quantized, digits):
    return lite.export_model(quantized, digits.x_test[:64], int4_weights=False).content


def test_worker_script_matches_in_process_run(int8_file, digits, tmp_path):
    """The worker, run as a script in a fresh Python, computes what the host's
    interpreter computes on the same prepared inputs."""
    x = digits.x_test[:40]
    expected, detail = verify.run_tflite(int8_file, x, batch_size=16)
    interpreter = lite.inspect.interpreter(int8_file)
    codes = verify.input_codes(x, interpreter.get_input_details()[0])
    request, result = tmp_path / "request.npz", tmp_path / "result.npz"
    np.savez(
        request,
        model=np.frombuffer(int8_file, np.uint8),
        inputs=codes,
        runtimes=np.array(["default", "reference"]),
        batch_size=16,
        num_threads=1,
    )
    worker = tmp_path / "litert_worker.py"
    worker.write_bytes(open(litert_worker.__file__, "rb").read())
    subprocess.run([sys.executable, str(worker), str(request), str(result)], check=True)
    with np.load(result) as loaded:
        assert sorted(loaded.files) == ["default", "litert_version", "machine", "reference"]
        np.testing.assert_array_equal(loaded["default"], expected)
        assert loaded["reference"].shape == expected.shape
    assert detail["dtype"] == np.int8


def test_input_codes_round_half_up_and_saturate():
    detail = {"dtype": np.int8, "quantization": (0.5, -3)}
    x = np.array([-0.25, 0.25, 0.75, 1000.0, -1000.0], np.float32)
    np.testing.assert_array_equal(verify.input_codes(x, detail), [-3, -2, -1, 127, -128])
    floats = {"dtype": np.float32, "quantization": (0.0, 0)}
    assert verify.input_codes(x, floats).dtype == np.float32


@pytest.mark.parametrize(
    "targets, runtimes, message",
    [
        (("arm32",), ("default",), "target must be one of"),
        (("x86",), ("xnnpack",), "runtime must be one of"),
    ],
)
def test_unknown_target_or_runtime_named(int8_file, digits, targets, runtimes, message):
    with pytest.raises(ValueError, match=message) as error:
        verify.run_on_targets(int8_file, digits.x_test[:4], targets, runtimes)
    assert (targets + runtimes)[0 if "target" in message else 1] in str(error.value)


def test_missing_environment_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(arm64, "is_native", lambda: False)
    with pytest.raises(arm64.Arm64Error, match="make arm64") as error:
        arm64.check_environment(str(tmp_path))
    assert str(tmp_path) in str(error.value)


def test_environment_of_another_litert_version_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(arm64, "is_native", lambda: False)
    (tmp_path / "environment.json").write_text(
        json.dumps({"litert_version": "0.0.1", "qemu": "qemu-aarch64"})
    )
    with pytest.raises(arm64.Arm64Error, match="0.0.1.*rebuild"):
        arm64.check_environment(str(tmp_path))


def test_default_directory_follows_the_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("TFQUANT_ARM64_DIR", str(tmp_path / "env"))
    assert arm64.default_directory() == str(tmp_path / "env")
    monkeypatch.delenv("TFQUANT_ARM64_DIR")
    assert arm64.default_directory().endswith(".arm64")


def test_export_without_environment_names_arm64(quantized, digits, tmp_path, monkeypatch):
    monkeypatch.setattr(arm64, "is_native", lambda: False)
    monkeypatch.setenv("TFQUANT_ARM64_DIR", str(tmp_path))
    with pytest.raises(lite.ExportError, match="cannot verify on arm64.*make arm64"):
        lite.export_model(
            quantized, digits.x_test[:8], int4_weights=False, targets=("x86", "arm64")
        )


def test_bar_applies_to_every_target(quantized, digits, monkeypatch):
    """A file that agrees on the host but not on arm64 is refused, naming arm64."""
    real = verify.compare_on_targets

    def fake(reference, content, x, y, targets, runtimes, arm64_cpu, fed):
        found = real(reference, content, x, y, ("x86",), runtimes, arm64_cpu, fed)
        worse = verify.Agreement(len(x), 0.5, 0.1, 9)
        return {**found, "arm64": {runtime: worse for runtime in runtimes}}

    monkeypatch.setattr(verify, "compare_on_targets", fake)
    with pytest.raises(lite.ExportError, match=r"on arm64 \(default runtime\).*50\.00%"):
        lite.export_model(
            quantized, digits.x_test[:32], int4_weights=False, targets=("x86", "arm64")
        )
    result = lite.export_model(
        quantized,
        digits.x_test[:32],
        int4_weights=False,
        targets=("x86", "arm64"),
        allow_mismatch=True,
    )
    assert result.report["targets"]["arm64"]["builtin"]["max_output_step_difference"] == 9
    assert "arm64   builtin" in lite.format_report(result.report)


def test_binary_refuses_verify_arm64_without_environment(tmp_path, monkeypatch, quantized):
    from export import export_tflite

    monkeypatch.setattr(arm64, "is_native", lambda: False)
    monkeypatch.setenv("TFQUANT_ARM64_DIR", str(tmp_path / "none"))
    model_path = tmp_path / "q.keras"
    quantized.save(model_path)
    output = tmp_path / "q.tflite"
    with pytest.raises(arm64.Arm64Error, match="make arm64"):
        export_tflite.run(
            str(model_path), str(output), "digits", 16, "int8", 0.99, False, False,
            verify_arm64=True,
        )  # fmt: skip
    assert sorted(os.listdir(tmp_path)) == ["q.keras"]


@pytest.fixture(scope="module")
def environment():
    """The emulated arm64 environment, built on first use (about a minute,
    needs Debian's archive and PyPI once); skipped where it cannot be built."""
    try:
        return arm64.build_environment(progress=None)
    except arm64.Arm64Error as error:
        pytest.skip(f"no arm64 environment: {error}")


@pytest.mark.slow
def test_emulated_arm64_is_an_aarch64_run_of_the_hosts_litert(environment, int8_file, digits):
    x = digits.x_test[:50]
    interpreter = lite.inspect.interpreter(int8_file)
    codes = verify.input_codes(x, interpreter.get_input_details()[0])
    ran = arm64.run(int8_file, codes, runtimes=("reference",), batch_size=25)
    assert ran["machine"] == "aarch64"
    assert ran["litert_version"] == arm64.host_litert_version()
    # The reference kernels are portable C++: the same codes on both CPUs
    # shows the emulated run computes faithfully.
    np.testing.assert_array_equal(
        ran["reference"], litert_worker.run_model(int8_file, codes, "reference")
    )


@pytest.mark.slow
def test_export_verified_on_x86_and_arm64(environment, quantized, digits, tmp_path):
    """INT8 weights run in XNNPACK, which requantizes in float32 the same way on
    both CPUs: the exported file computes the Keras model's codes on each."""
    from export import export_tflite

    model_path = tmp_path / "q.keras"
    quantized.save(model_path)
    report = export_tflite.run(
        str(model_path), str(tmp_path / "q.tflite"), "digits", 200, "int8", 1.0, False, False,
        int4_weights=False, verify_arm64=True,
    )  # fmt: skip
    assert set(report["targets"]) == {verify.host_target(), "arm64"}
    for target in report["targets"].values():
        assert set(target) == {"default", "builtin"}
        assert target["default"]["top1_agreement"] == 1.0
        assert target["default"]["identical_output_codes"] == 1.0
    text = (tmp_path / "q.txt").read_text()
    assert "arm64   default" in text and "arm64   builtin" in text


def test_target_matrix_table_and_bad_path(tmp_path):
    from export import target_matrix

    cell = {"identical_output_codes": 0.995, "max_output_step_difference": 2}
    cells = {
        (name, cpu): {**cell, "top1_agreement": 1.0 if cpu == "x86" else 0.99}
        for name, _, _ in target_matrix.VARIANTS
        for cpu in ("x86", "arm64")
    }
    table = target_matrix.format_markdown([{"model": "m", "cells": cells}]).splitlines()
    assert table[0].startswith("| model | INT8 weights, on x86 | INT8 weights, on arm64 |")
    assert table[2] == "| m | " + " | ".join(["99.50% (2)", "99.50% (2), top-1 99.00%"] * 3) + " |"
    with pytest.raises(ValueError, match="nothing.keras"):
        target_matrix.measure([str(tmp_path / "nothing.keras")], "digits", 4)
