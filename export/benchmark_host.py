r"""Host latency benchmark for TFLite models, run side by side.

    python -m export.benchmark_host --models=float.tflite,int8.tflite \
        [--threads=1,2] [--runs=100] [--warmup=10] [--output=bench_host.json]

Every model is loaded with `ai_edge_litert.interpreter.Interpreter` once per
thread count, its inputs are filled with seeded random data (a standard normal
tensor, quantized with the input's scale and zero point when the input is
integer), and it is invoked `warmup` times untimed. Then each invoke is timed
on its own with `time.perf_counter`. The models take turns in chunks of
`chunk` invokes (the order rotating every round), so a slow drift of the
machine (frequency scaling, another process) lands on all models alike instead
of on whichever ran last.

Prints a table (model, threads, median and p90 latency in microseconds, file
size in KiB, median relative to the first model at the same thread count) and
writes the rows as JSON, atomically.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence

from absl import app, flags

from export.json_output import write_json_atomic
from tfquant.lite.benchmark import (  # noqa: F401  (re-exported for scripts)
    benchmark_models,
    check_model_file,
    format_table,
    load_interpreter,
    random_input,
    runtime_version,
)

FLAGS = flags.FLAGS


def _parse_threads(values: Sequence[str]) -> list[int]:
    threads = []
    for value in values:
        try:
            threads.append(int(value))
        except ValueError:
            raise ValueError(f"threads must be integers >= 1, got {value!r}") from None
    return threads


def _define_flags() -> None:
    """Defines the flags; only when run as a program, so the module imports cleanly."""
    flags.DEFINE_list("models", None, "Comma-separated .tflite files; the first is the base.")
    flags.DEFINE_list("threads", ["1"], "Comma-separated interpreter thread counts.")
    flags.DEFINE_integer("runs", 100, "Timed invokes per model and thread count.")
    flags.DEFINE_integer("warmup", 10, "Untimed invokes before timing.")
    flags.DEFINE_integer("chunk", 10, "Invokes per model before the next model's turn.")
    flags.DEFINE_integer("seed", 0, "Seed of the random input data.")
    flags.DEFINE_string("output", "bench_host.json", "Where the JSON report goes.")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.models:
        raise SystemExit("benchmark_host: error: --models is required (comma-separated .tflite)")
    try:
        threads = _parse_threads(FLAGS.threads)
        rows = benchmark_models(
            FLAGS.models, threads, FLAGS.runs, FLAGS.warmup, FLAGS.chunk, FLAGS.seed
        )
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"benchmark_host: error: {err}") from None
    print(format_table(rows))
    write_json_atomic(
        FLAGS.output,
        {
            "backend": "host",
            "runtime": f"ai-edge-litert {runtime_version()}",
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "runs": FLAGS.runs,
            "warmup": FLAGS.warmup,
            "chunk": FLAGS.chunk,
            "seed": FLAGS.seed,
            "rows": rows,
        },
    )
    print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
