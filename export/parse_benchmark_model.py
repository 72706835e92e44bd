r"""Parses the log of TensorFlow Lite's `benchmark_model` tool into a report row.

    python -m export.parse_benchmark_model LOG --model=m.tflite --threads=4 \
        [--output=bench_android.json] [--use_xnnpack=true] [--use_gpu=false] \
        [--taskset=f0] [--serial=DEVICE]

`benchmark_model` (tensorflow/lite/tools/benchmark/benchmark_model.cc) prints,
among its log lines:

    INFO: Running benchmark for at least 5 iterations and at least 0.5 seconds ...
    INFO: count=51 first=10342 curr=9790 min=9702 max=10342 avg=9876.5 std=118 ...
    INFO: Running benchmark for at least 50 iterations and at least 1 seconds ...
    INFO: count=115 first=8812 curr=8700 min=8500 max=9400 avg=8765.43 std=150 p5=8540 ...
    INFO: Inference timings in us: Init: 5123, First inference: 10342, Warmup (avg): ...
    INFO: Memory footprint delta from the start of the tool (MB): init=3.5 overall=12.25
    INFO: Overall peak memory footprint (MB) via periodic monitoring: 15.0156

The first `count=` line after a "Running benchmark" line holds the statistics of
that run: warm-up first, then the timed runs. Newer builds add `p5=`, `median=`
and `p95=`; older ones stop at `std=`, and a run whose every sample was equal
prints `count=N curr=V(all same)`. The `Timings (microseconds): count=...` lines
of the op profiler are not run statistics and are skipped. The tool prints no
p90, so the row's `p90_us` is null; `median_us` is null on builds without
percentiles.

The row has the keys of `export.benchmark_host` rows (model, threads, runs,
warmup, median_us, p90_us, avg_us, std_us, min_us, max_us, size_kib,
ratio_to_first) plus what only the device tool reports (init_us,
first_inference_us, warmup_avg_us, p5_us, p95_us, the memory figures).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

from absl import app, flags

from export.json_output import write_json_atomic

FLAGS = flags.FLAGS

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|-?inf"
_RUN_START = re.compile(r"Running benchmark for at least (\d+) iterations")
_RUN_STATS = re.compile(r"^\s*(?:INFO:\s*)?(count=\d+.*)$")
_STAT_FIELD = re.compile(rf"(\w+)=({_NUMBER})")
_TIMINGS = re.compile(r"[Ii]nference timings in us:\s*(.*)$")
_TIMING_FIELD = re.compile(rf"([A-Za-z][A-Za-z ()]*?):\s*({_NUMBER})")
_MEMORY = re.compile(
    rf"(?:Memory footprint delta from the start of the tool|Peak memory footprint) \(MB\): "
    rf"init=({_NUMBER}) overall=({_NUMBER})"
)
_PEAK_MEMORY = re.compile(
    rf"Overall peak memory footprint \(MB\) via periodic monitoring: ({_NUMBER})"
)
_MODEL_SIZE = re.compile(rf"The input model file size \(MB\): ({_NUMBER})")
_NUM_THREADS = re.compile(r"Num threads: \[(\d+)\]")
_GRAPH = re.compile(r"Graph: \[(.*)\]")
_ERROR = re.compile(r"^\s*ERROR:\s*(.*)$")

# "Inference timings in us" keys, current and pre-2020 spellings.
_TIMING_KEYS = {
    "Init": "init_us",
    "First inference": "first_inference_us",
    "Warmup (avg)": "warmup_avg_us",
    "Warmup": "warmup_avg_us",
    "Inference (avg)": "inference_avg_us",
    "Inference": "inference_avg_us",
}


def _number(text: str) -> int | float:
    return int(text) if re.fullmatch(r"[-+]?\d+", text) else float(text)


def parse_run_stats(text: str) -> dict[str, int | float]:
    """Parses one `count=...` statistics line into a dict of numbers.

    Example:
        >>> parse_run_stats("count=3 first=9 curr=8 min=8 max=9 avg=8.5 std=0.5")["avg"]
        8.5
        >>> parse_run_stats("count=4 curr=7(all same)")["max"]
        7
    """
    stats = {key: _number(value) for key, value in _STAT_FIELD.findall(text)}
    if "(all same)" in text or ("curr" in stats and "avg" not in stats):
        value = stats["curr"]
        stats.update(first=value, min=value, max=value, avg=value, std=0)
    return stats


def parse_benchmark_output(text: str) -> dict[str, Any]:
    """Parses a `benchmark_model` log.

    Returns:
        A dict with `inference` (the timed run's statistics: count, first, curr,
        min, max, avg, std and, when printed, p5, median, p95), `warmup` (the
        warm-up run's statistics or None), `init_us`, `first_inference_us`,
        `warmup_avg_us`, `inference_avg_us`, `memory_init_mb`,
        `memory_overall_mb`, `peak_memory_mb`, `model_size_mb`, `num_threads`,
        `graph` (None when absent) and `errors` (the ERROR lines).

    Raises:
        ValueError: the log has neither the timings line nor run statistics,
            i.e. the benchmark failed; the message quotes its last ERROR line.
    """
    result: dict[str, Any] = {
        "inference": None,
        "warmup": None,
        "init_us": None,
        "first_inference_us": None,
        "warmup_avg_us": None,
        "inference_avg_us": None,
        "memory_init_mb": None,
        "memory_overall_mb": None,
        "peak_memory_mb": None,
        "model_size_mb": None,
        "num_threads": None,
        "graph": None,
        "errors": [],
    }
    runs = []
    awaiting_stats = False
    for raw_line in text.splitlines():
        line = raw_line.rstrip("\r")
        if _RUN_START.search(line):
            awaiting_stats = True
            continue
        if awaiting_stats:
            stats = _RUN_STATS.match(line)
            if stats:
                runs.append(parse_run_stats(stats.group(1)))
                awaiting_stats = False
                continue
        if match := _TIMINGS.search(line):
            for key, value in _TIMING_FIELD.findall(match.group(1)):
                name = _TIMING_KEYS.get(key.strip())
                if name:
                    result[name] = _number(value)
        elif match := _MEMORY.search(line):
            result["memory_init_mb"] = _number(match.group(1))
            result["memory_overall_mb"] = _number(match.group(2))
        elif match := _PEAK_MEMORY.search(line):
            result["peak_memory_mb"] = _number(match.group(1))
        elif match := _MODEL_SIZE.search(line):
            result["model_size_mb"] = _number(match.group(1))
        elif match := _NUM_THREADS.search(line):
            result["num_threads"] = int(match.group(1))
        elif match := _GRAPH.search(line):
            result["graph"] = match.group(1)
        elif match := _ERROR.match(line):
            result["errors"].append(match.group(1))
    if runs:
        result["inference"] = runs[-1]
        result["warmup"] = runs[0] if len(runs) > 1 else None
    if result["inference"] is None and result["inference_avg_us"] is None:
        last_error = result["errors"][-1] if result["errors"] else "no ERROR line either"
        raise ValueError(
            "benchmark_model output has no 'Inference timings in us' line and no run "
            f"statistics, so the benchmark did not finish; last error: {last_error}"
        )
    return result


def to_row(
    parsed: dict[str, Any], model: str, threads: int | None = None, size_kib: float | None = None
) -> dict[str, Any]:
    """Turns `parse_benchmark_output`'s result into a report row.

    Args:
        parsed: the parsed log.
        model: the model file as the user named it.
        threads: the thread count asked for; defaults to the one in the log.
        size_kib: the model file size; defaults to the size the log reports.
    """
    stats = parsed["inference"] or {}
    warmup = parsed["warmup"] or {}
    if size_kib is None and parsed["model_size_mb"] is not None:
        size_kib = parsed["model_size_mb"] * 1e6 / 1024  # the tool's MB is 10^6 bytes
    avg = parsed["inference_avg_us"]
    return {
        "model": model,
        "threads": threads if threads is not None else parsed["num_threads"],
        "runs": stats.get("count"),
        "warmup": warmup.get("count"),
        "median_us": stats.get("median"),
        "p90_us": None,
        "avg_us": avg if avg is not None else stats.get("avg"),
        "std_us": stats.get("std"),
        "min_us": stats.get("min"),
        "max_us": stats.get("max"),
        "size_kib": size_kib,
        "ratio_to_first": 1.0,
        "p5_us": stats.get("p5"),
        "p95_us": stats.get("p95"),
        "init_us": parsed["init_us"],
        "first_inference_us": parsed["first_inference_us"],
        "warmup_avg_us": parsed["warmup_avg_us"],
        "memory_init_mb": parsed["memory_init_mb"],
        "memory_overall_mb": parsed["memory_overall_mb"],
        "peak_memory_mb": parsed["peak_memory_mb"],
    }


def _define_flags() -> None:
    """Defines the flags; only when run as a program, so the module imports cleanly."""
    flags.DEFINE_string("model", None, "The local .tflite file that was benchmarked.")
    flags.DEFINE_integer("threads", None, "Thread count; defaults to the log's.")
    flags.DEFINE_string("output", "bench_android.json", "Where the JSON report goes.")
    flags.DEFINE_string("use_xnnpack", None, "Recorded in the report as given.")
    flags.DEFINE_string("use_gpu", None, "Recorded in the report as given.")
    flags.DEFINE_string("taskset", None, "CPU mask the run was pinned to, if any.")
    flags.DEFINE_string("serial", None, "Serial number of the device.")


def main(argv: Sequence[str]) -> None:
    if len(argv) != 2:
        raise SystemExit(
            "parse_benchmark_model: error: pass exactly one log file, e.g. "
            "python -m export.parse_benchmark_model run.log --model=m.tflite --threads=4"
        )
    log_path = argv[1]
    if not os.path.isfile(log_path):
        raise SystemExit(f"parse_benchmark_model: error: log file not found: {log_path}")
    with open(log_path, encoding="utf-8", errors="replace") as stream:
        text = stream.read()
    try:
        parsed = parse_benchmark_output(text)
    except ValueError as err:
        raise SystemExit(f"parse_benchmark_model: error: {log_path}: {err}") from None
    model = FLAGS.model or parsed["graph"] or "?"
    size_kib = os.path.getsize(model) / 1024 if os.path.isfile(model) else None
    row = to_row(parsed, model, FLAGS.threads, size_kib)
    write_json_atomic(
        FLAGS.output,
        {
            "backend": "android",
            "tool": "benchmark_model",
            "serial": FLAGS.serial,
            "settings": {
                "use_xnnpack": FLAGS.use_xnnpack,
                "use_gpu": FLAGS.use_gpu,
                "taskset": FLAGS.taskset,
            },
            "log": log_path,
            "graph": parsed["graph"],
            "errors": parsed["errors"],
            "rows": [row],
        },
    )
    median = "-" if row["median_us"] is None else f"{row['median_us']:.1f}"
    print(
        f"{row['model']}: threads {row['threads']}, avg {row['avg_us']} us, median {median} us, "
        f"init {row['init_us']} us, {row['runs']} runs; wrote {FLAGS.output}"
    )


if __name__ == "__main__":
    _define_flags()
    app.run(main)
