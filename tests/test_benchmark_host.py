"""export.benchmark_host: side-by-side LiteRT latency of tiny float and int8 models."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from export import benchmark_host
from tfquant.lite import benchmark as lite_benchmark

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INPUT_SHAPE = (1, 8, 8, 3)


class _TinyConvNet(tf.Module):
    """conv 3x3 -> relu -> global mean -> dense, with fixed weights."""

    def __init__(self):
        super().__init__()
        rng = np.random.default_rng(1)
        self.kernel = tf.Variable(rng.standard_normal((3, 3, 3, 4)).astype(np.float32))
        self.dense = tf.Variable(rng.standard_normal((4, 2)).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec(INPUT_SHAPE, tf.float32)])
    def __call__(self, x):
        y = tf.nn.relu(tf.nn.conv2d(x, self.kernel, strides=1, padding="SAME"))
        return tf.matmul(tf.reduce_mean(y, axis=[1, 2]), self.dense)


def _convert(module, int8):
    function = module.__call__.get_concrete_function()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([function], module)
    if int8:

        def representative_dataset():
            rng = np.random.default_rng(2)
            for _ in range(8):
                yield [rng.standard_normal(INPUT_SHAPE).astype(np.float32)]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative_dataset
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    return converter.convert()


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    directory = tmp_path_factory.mktemp("models")
    module = _TinyConvNet()
    paths = []
    for name, int8 in (("float.tflite", False), ("int8.tflite", True)):
        path = directory / name
        path.write_bytes(_convert(module, int8))
        paths.append(str(path))
    return paths


def test_rows_for_float_and_int8_side_by_side(tiny_models):
    rows = benchmark_host.benchmark_models(tiny_models, threads=[1, 2], runs=30, warmup=3)
    assert [(row["model"], row["threads"]) for row in rows] == [
        (tiny_models[0], 1),
        (tiny_models[1], 1),
        (tiny_models[0], 2),
        (tiny_models[1], 2),
    ]
    for row in rows:
        assert row["runs"] == 30 and row["warmup"] == 3
        assert row["median_us"] > 0
        assert row["min_us"] <= row["median_us"] <= row["p90_us"] <= row["max_us"]
        assert row["size_kib"] * 1024 == os.path.getsize(row["model"])
    for first, second in (rows[0:2], rows[2:4]):
        assert first["ratio_to_first"] == 1.0
        assert second["ratio_to_first"] == pytest.approx(second["median_us"] / first["median_us"])


def test_int8_input_is_the_float_input_quantized(tiny_models):
    interpreter = benchmark_host.load_interpreter(tiny_models[1], num_threads=1)
    (detail,) = interpreter.get_input_details()
    assert detail["dtype"] == np.int8
    scale, zero_point = detail["quantization"]
    assert scale > 0

    data = benchmark_host.random_input(detail, np.random.default_rng(7))
    real = np.random.default_rng(7).standard_normal(INPUT_SHAPE)
    expected = np.clip(np.round(real / scale) + zero_point, -128, 127).astype(np.int8)
    np.testing.assert_array_equal(data, expected)

    float_detail = {"name": "x", "shape": np.array(INPUT_SHAPE), "dtype": np.float32}
    float_data = benchmark_host.random_input(float_detail, np.random.default_rng(7))
    np.testing.assert_array_equal(float_data, real.astype(np.float32))


class _RecordingInterpreter:
    """Stands in for a LiteRT interpreter and records the order of invokes."""

    def __init__(self, name, calls):
        self.name = name
        self.calls = calls

    def get_input_details(self):
        return [{"name": "x", "index": 0, "shape": np.array([1, 2]), "dtype": np.float32}]

    def set_tensor(self, index, value):
        assert value.shape == (1, 2)

    def invoke(self):
        self.calls.append(self.name)


def test_models_take_turns_in_rotating_chunks(tiny_models, monkeypatch):
    calls = []
    monkeypatch.setattr(
        lite_benchmark,
        "load_interpreter",
        lambda path, num_threads: _RecordingInterpreter(os.path.basename(path)[0], calls),
    )
    benchmark_host.benchmark_models(tiny_models, threads=[1], runs=5, warmup=1, chunk=2)
    # f = float, i = int8: one warm-up each, then chunks of 2 (the last one short),
    # the model that starts a round rotating.
    assert "".join(calls) == "fi" + "ffii" + "iiff" + "fi"


def test_missing_file_is_named(tiny_models, tmp_path):
    missing = str(tmp_path / "missing.tflite")
    with pytest.raises(FileNotFoundError, match=re.escape(f"model file not found: {missing}")):
        benchmark_host.benchmark_models([tiny_models[0], missing], runs=1, warmup=0)


@pytest.mark.parametrize("content", ["garbage", "truncated"])
def test_corrupt_file_is_named(tiny_models, tmp_path, content):
    corrupt = tmp_path / "corrupt.tflite"
    if content == "garbage":
        corrupt.write_bytes(b"this is not a flatbuffer" * 4)
    else:  # a real header, so only the flatbuffer verifier can tell
        with open(tiny_models[0], "rb") as stream:
            corrupt.write_bytes(stream.read(600))
    with pytest.raises(ValueError, match=re.escape(f"not a valid TFLite model: {corrupt}")):
        benchmark_host.benchmark_models([str(corrupt)], runs=1, warmup=0)


@pytest.mark.parametrize(
    "arguments,message",
    [
        ({"threads": [1, 0]}, "threads must be >= 1, got 0"),
        ({"runs": 0}, "runs must be >= 1, got 0"),
        ({"warmup": -1}, "warmup must be >= 0, got -1"),
    ],
)
def test_out_of_range_arguments(tiny_models, arguments, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        benchmark_host.benchmark_models(tiny_models, **arguments)


def test_format_table():
    rows = [
        {
            "model": "a.tflite",
            "threads": 1,
            "median_us": 374.04,
            "p90_us": 380.0,
            "size_kib": 1068.0,
            "ratio_to_first": 1.0,
        },
        {
            "model": "long_name.tflite",
            "threads": 1,
            "median_us": 107.0,
            "p90_us": None,
            "size_kib": 298.25,
            "ratio_to_first": 107.0 / 374.04,
        },
    ]
    lines = benchmark_host.format_table(rows).splitlines()
    assert lines[0].split() == [
        "model",
        "threads",
        "median",
        "us",
        "p90",
        "us",
        "size",
        "KiB",
        "ratio",
    ]
    assert lines[2].split() == ["a.tflite", "1", "374.0", "380.0", "1068.0", "1.00"]
    assert lines[3].split() == ["long_name.tflite", "1", "107.0", "-", "298.2", "0.29"]
    assert len({len(line) for line in lines}) == 1  # aligned


def _run_binary(*arguments, cwd):
    return subprocess.run(
        [sys.executable, "-m", "export.benchmark_host", *arguments],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": REPO_ROOT},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_binary_prints_table_and_writes_json(tiny_models, tmp_path):
    output = tmp_path / "out" / "bench.json"
    result = _run_binary(
        f"--models={','.join(tiny_models)}",
        "--threads=1",
        "--runs=10",
        "--warmup=1",
        f"--output={output}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "median us" in result.stdout and tiny_models[1] in result.stdout
    report = json.loads(output.read_text())
    assert report["backend"] == "host"
    assert [row["model"] for row in report["rows"]] == tiny_models
    assert not [name for name in os.listdir(output.parent) if name.endswith(".tmp")]


@pytest.mark.parametrize(
    "arguments,message",
    [
        (
            ["--models=nowhere.tflite"],
            "benchmark_host: error: model file not found: nowhere.tflite",
        ),
        (["--models={float}", "--threads=0"], "benchmark_host: error: threads must be >= 1, got 0"),
        (["--models={float}", "--threads=two"], "threads must be integers >= 1, got 'two'"),
    ],
)
def test_binary_errors_are_one_line(tiny_models, tmp_path, arguments, message):
    arguments = [argument.format(float=tiny_models[0]) for argument in arguments]
    result = _run_binary(*arguments, f"--output={tmp_path / 'bench.json'}", cwd=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "bench.json").exists()
