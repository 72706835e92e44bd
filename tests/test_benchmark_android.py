"""export/benchmark_android.sh and export.parse_benchmark_model, with a fake adb.

The fixture follows the log format of tensorflow/lite/tools/benchmark/
benchmark_model.cc in current builds (percentiles in the run statistics, memory
lines, op profiling on), for an int8 ResNet-20 at 4 threads with XNNPACK.
"""

import json
import os
import stat
import subprocess
import sys

import pytest

from export import parse_benchmark_model as parser

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS)
FIXTURE = os.path.join(TESTS, "fixtures", "benchmark_model_output.txt")
SCRIPT = os.path.join(REPO_ROOT, "export", "benchmark_android.sh")


def _fixture_text():
    with open(FIXTURE, encoding="utf-8") as stream:
        return stream.read()


def test_parser_reads_the_fixture_exactly():
    parsed = parser.parse_benchmark_output(_fixture_text())
    assert parsed["inference"] == {
        "count": 115, "first": 8812, "curr": 8700, "min": 8500, "max": 9400,
        "avg": 8765.43, "std": 150, "p5": 8540, "median": 8748, "p95": 9040,
    }  # fmt: skip
    assert parsed["warmup"]["count"] == 51 and parsed["warmup"]["avg"] == 9876.5
    assert parsed["init_us"] == 5123
    assert parsed["first_inference_us"] == 10342
    assert parsed["warmup_avg_us"] == 9876.5
    assert parsed["inference_avg_us"] == 8765.43
    assert parsed["memory_init_mb"] == 3.5
    assert parsed["memory_overall_mb"] == 12.25
    assert parsed["peak_memory_mb"] == 15.0156
    assert parsed["model_size_mb"] == 0.305152
    assert parsed["num_threads"] == 4
    assert parsed["graph"] == "/data/local/tmp/resnet20_int8.tflite"
    assert parsed["errors"] == []


def test_row_has_the_host_row_keys_and_the_device_extras():
    row = parser.to_row(parser.parse_benchmark_output(_fixture_text()), "m.tflite", 4, 298.0)
    assert row == {
        "model": "m.tflite", "threads": 4, "runs": 115, "warmup": 51,
        "median_us": 8748, "p90_us": None, "avg_us": 8765.43, "std_us": 150,
        "min_us": 8500, "max_us": 9400, "size_kib": 298.0, "ratio_to_first": 1.0,
        "p5_us": 8540, "p95_us": 9040, "init_us": 5123, "first_inference_us": 10342,
        "warmup_avg_us": 9876.5, "memory_init_mb": 3.5, "memory_overall_mb": 12.25,
        "peak_memory_mb": 15.0156,
    }  # fmt: skip


def test_parser_reads_builds_without_percentiles():
    text = "\r\n".join(
        [
            "Num threads: [2]",
            "Initialized session in 38.467ms.",
            "Running benchmark for at least 1 iterations and at least 0.5 seconds but "
            "terminate if exceeding 150 seconds.",
            "count=7 first=83235 curr=80000 min=80000 max=83235 avg=81000 std=1100",
            "",
            "Running benchmark for at least 50 iterations and at least 1 seconds but "
            "terminate if exceeding 150 seconds.",
            "count=50 first=79449 curr=81350 min=77385 max=88213 avg=79732 std=1929",
            "",
            "Average inference timings in us: Warmup: 83235, Init: 38467, Inference: 79760.9",
            "Peak memory footprint (MB): init=2.5 overall=9.75",
        ]
    )
    parsed = parser.parse_benchmark_output(text)
    assert parsed["inference"]["max"] == 88213
    assert "median" not in parsed["inference"]
    assert parsed["warmup_avg_us"] == 83235 and parsed["inference_avg_us"] == 79760.9
    assert (parsed["memory_init_mb"], parsed["memory_overall_mb"]) == (2.5, 9.75)
    row = parser.to_row(parsed, "m.tflite")
    assert row["threads"] == 2 and row["median_us"] is None and row["avg_us"] == 79760.9


def test_parser_reads_a_run_whose_samples_were_all_equal():
    assert parser.parse_run_stats("count=20 curr=900(all same)") == {
        "count": 20, "curr": 900, "first": 900, "min": 900, "max": 900, "avg": 900, "std": 0,
    }  # fmt: skip


def test_parser_names_the_error_of_a_failed_run():
    text = (
        "INFO: Loaded model /data/local/tmp/m.tflite\n"
        "ERROR: Node number 57 (BATCH_MATMUL) failed to prepare.\n"
        "ERROR: Failed to allocate tensors!\n"
        "ERROR: Benchmarking failed.\n"
    )
    with pytest.raises(ValueError, match="last error: Benchmarking failed."):
        parser.parse_benchmark_output(text)


_FAKE_ADB = r"""#!/usr/bin/env bash
# Simulates adb: `devices` prints $FAKE_ADB_DEVICES; `push` succeeds; `shell`
# answers the benchmark command with $FAKE_ADB_STATUS; `pull` copies the
# recorded log. Every call is appended to $FAKE_ADB_CALLS.
echo "$*" >> "$FAKE_ADB_CALLS"
if [[ $1 == -s ]]; then shift 2; fi
case $1 in
  devices) printf 'List of devices attached\n%b\n' "$FAKE_ADB_DEVICES" ;;
  push) [[ -f $2 ]] || exit 1 ;;
  shell) [[ $2 == *--graph=* ]] && echo "${FAKE_ADB_STATUS:-0}" ;;
  pull) cp "$FAKE_ADB_LOG" "$3" ;;
  *) exit 1 ;;
esac
exit 0
"""


@pytest.fixture
def device(tmp_path):
    """A fake adb first on PATH, a model and a binary; returns a runner."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    adb = bin_dir / "adb"
    adb.write_text(_FAKE_ADB)
    adb.chmod(adb.stat().st_mode | stat.S_IXUSR)
    model = tmp_path / "resnet20_int8.tflite"
    model.write_bytes(b"\0" * 3072)
    binary = tmp_path / "benchmark_model"
    binary.write_bytes(b"\x7fELF")
    calls = tmp_path / "adb_calls.txt"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHON": sys.executable,
        "FAKE_ADB_CALLS": str(calls),
        "FAKE_ADB_LOG": FIXTURE,
        "FAKE_ADB_DEVICES": "emulator-5554\\tdevice",
    }

    def run(*arguments, **env_overrides):
        result = subprocess.run(
            [SCRIPT, *arguments],
            cwd=tmp_path,
            env={**env, **env_overrides},
            capture_output=True,
            text=True,
            timeout=60,
        )
        result.calls = calls.read_text().splitlines() if calls.exists() else []
        return result

    run.model = str(model)
    run.binary = str(binary)
    run.output = tmp_path / "out" / "result.json"
    run.env = env
    return run


def test_script_pushes_runs_and_writes_the_report(device):
    result = device(
        "--model", device.model, "--benchmark_binary", device.binary, "--threads", "2",
        "--use_xnnpack", "false", "--taskset", "f0", "--enable_op_profiling",
        "--num_runs=80", "--warmup_runs=3", "--output", str(device.output),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    pushes = [call for call in result.calls if " push " in call]
    assert pushes == [
        f"-s emulator-5554 push {device.model} /data/local/tmp/resnet20_int8.tflite",
        f"-s emulator-5554 push {device.binary} /data/local/tmp/benchmark_model",
    ]
    (run,) = [call for call in result.calls if "--graph=" in call]
    assert run.startswith(
        "-s emulator-5554 shell taskset f0 '/data/local/tmp/benchmark_model' "
        "--graph='/data/local/tmp/resnet20_int8.tflite' --num_threads=2 --use_xnnpack=false "
        "--use_gpu=false --num_runs=80 --warmup_runs=3 --enable_op_profiling=true > "
    )

    log = device.output.with_suffix(".log")
    assert log.read_text() == _fixture_text()
    report = json.loads(device.output.read_text())
    assert report["backend"] == "android" and report["serial"] == "emulator-5554"
    assert report["settings"] == {"use_xnnpack": "false", "use_gpu": "false", "taskset": "f0"}
    (row,) = report["rows"]
    assert row["model"] == device.model and row["threads"] == 2
    assert (row["avg_us"], row["median_us"], row["p90_us"]) == (8765.43, 8748, None)
    assert (row["min_us"], row["max_us"], row["std_us"]) == (8500, 9400, 150)
    assert (row["init_us"], row["memory_overall_mb"]) == (5123, 12.25)
    assert row["size_kib"] == 3.0


def test_script_without_adb_fails_clearly(device):
    path = os.pathsep.join(
        directory
        for directory in device.env["PATH"].split(os.pathsep)[1:]  # drops the fake adb
        if not os.path.exists(os.path.join(directory, "adb"))
    )
    result = device("--model", device.model, "--benchmark_binary", device.binary, PATH=path)
    assert result.returncode != 0
    assert "'adb' not found on PATH" in result.stderr


@pytest.mark.parametrize(
    "devices,arguments,message",
    [
        ("", [], "no Android device connected"),
        ("a1\\tdevice\\nb2\\tdevice", [], "2 devices connected (a1 b2); choose one with --serial"),
        ("a1\\tunauthorized", [], "device 'a1' is in state 'unauthorized', expected 'device'"),
        ("a1\\tdevice", ["--serial", "zz9"], "device 'zz9' is not connected"),
    ],
)
def test_script_device_checks(device, devices, arguments, message):
    result = device(
        "--model", device.model, "--benchmark_binary", device.binary, *arguments,
        FAKE_ADB_DEVICES=devices,
    )  # fmt: skip
    assert result.returncode != 0
    assert message in result.stderr
    assert not [call for call in result.calls if " push " in call]


def test_script_picks_the_serial_among_several(device):
    result = device(
        "--model", device.model, "--benchmark_binary", device.binary, "--serial", "b2",
        "--output", str(device.output), FAKE_ADB_DEVICES="a1\\tdevice\\nb2\\tdevice",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert all(call.startswith("-s b2 ") for call in result.calls if call != "devices")


@pytest.mark.parametrize(
    "arguments,message",
    [
        (["--model", "{model}", "--benchmark_binary", "{binary}", "--bogus"],
         "unknown argument '--bogus'"),
        (["--model", "{model}", "--benchmark_binary", "{binary}", "--use_gpu", "yes"],
         "--use_gpu must be true or false, got 'yes'"),
        (["--model", "{model}", "--benchmark_binary", "{binary}", "--threads"],
         "--threads needs a value"),
        (["--model", "missing.tflite", "--benchmark_binary", "{binary}"],
         "model file not found: missing.tflite"),
        (["--model", "{model}", "--benchmark_binary", "missing_binary"],
         "benchmark binary not found: missing_binary"),
        (["--benchmark_binary", "{binary}"], "--model is required"),
    ],
)  # fmt: skip
def test_script_rejects_bad_arguments(device, arguments, message):
    arguments = [a.format(model=device.model, binary=device.binary) for a in arguments]
    result = device(*arguments)
    assert result.returncode != 0
    assert message in result.stderr
    assert result.calls == []  # rejected before adb is touched


def test_script_help(device):
    result = device("--help")
    assert result.returncode == 0
    assert result.stdout.startswith("Usage: benchmark_android.sh --model")


def test_script_reports_a_failed_benchmark(device):
    result = device(
        "--model", device.model, "--benchmark_binary", device.binary,
        "--output", str(device.output), FAKE_ADB_STATUS="1",
    )  # fmt: skip
    assert result.returncode != 0
    assert "benchmark_model exited with status '1'" in result.stderr
    assert not device.output.exists()


def test_parser_binary(tmp_path):
    output = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "export.parse_benchmark_model", FIXTURE,
         "--model=m.tflite", "--threads=4", f"--output={output}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(output.read_text())["rows"]
    assert (row["model"], row["threads"], row["avg_us"], row["size_kib"]) == (
        "m.tflite", 4, 8765.43, 0.305152e6 / 1024,
    )  # fmt: skip
