"""Host latency of TFLite models, measured side by side.

Every model is loaded with `ai_edge_litert.interpreter.Interpreter` once per
thread count, its inputs are filled with seeded random data (quantized with
the input's scale and zero point when the input is integer), and it is invoked
`warmup` times untimed. Then each invoke is timed on its own with
`time.perf_counter`. The models take turns in chunks of `chunk` invokes (the
order rotating every round), so a slow drift of the machine lands on all
models alike instead of on whichever ran last.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

_TFLITE_FILE_IDENTIFIER = b"TFL3"  # bytes 4..8 of every TFLite flatbuffer


def check_model_file(path: str) -> None:
    """Raises if `path` is missing or is not a TFLite flatbuffer.

    Raises:
        FileNotFoundError: the file does not exist (the message names it).
        ValueError: the file lacks the TFLite file identifier.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file not found: {path}")
    with open(path, "rb") as stream:
        header = stream.read(8)
    if len(header) < 8 or header[4:8] != _TFLITE_FILE_IDENTIFIER:
        raise ValueError(
            f"not a valid TFLite model: {path} (no {_TFLITE_FILE_IDENTIFIER.decode()} "
            "file identifier)"
        )


def load_interpreter(path: str, num_threads: int):
    """Loads `path` into a LiteRT interpreter with its tensors allocated.

    Dynamic input dimensions (-1 in the shape signature) are set to 1.

    Raises:
        FileNotFoundError, ValueError: see `check_model_file`; also a ValueError
            naming the file when the interpreter rejects it.
    """
    from ai_edge_litert.interpreter import Interpreter

    check_model_file(path)
    try:
        interpreter = Interpreter(model_path=path, num_threads=num_threads)
        for detail in interpreter.get_input_details():
            signature = detail.get("shape_signature", detail["shape"])
            if any(dim < 0 for dim in signature):
                shape = [dim if dim > 0 else 1 for dim in signature]
                interpreter.resize_tensor_input(detail["index"], shape)
        interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as err:
        raise ValueError(f"not a valid TFLite model: {path} ({err})") from err
    return interpreter


def random_input(detail: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
    """Returns seeded random data shaped and typed for one input tensor.

    Float inputs get a standard normal tensor. Quantized integer inputs get the
    same standard normal tensor quantized with the input's scale and zero point
    (q = round(x / scale) + zero_point, clipped to the dtype), so a float model
    and its integer twin see the same real-valued input. Unquantized integer
    inputs (indices, ids) get 0 or 1, booleans a coin flip.

    Example:
        >>> detail = {"name": "x", "shape": (1, 4), "dtype": np.int8, "quantization": (0.5, 3)}
        >>> random_input(detail, np.random.default_rng(0)).dtype
        dtype('int8')
    """
    dtype = np.dtype(detail["dtype"])
    shape = tuple(int(dim) for dim in detail["shape"])
    scale, zero_point = detail.get("quantization", (0.0, 0))
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if np.issubdtype(dtype, np.integer):
        if scale > 0:
            info = np.iinfo(dtype)
            quantized = np.round(rng.standard_normal(shape) / scale) + zero_point
            return np.clip(quantized, info.min, info.max).astype(dtype)
        return rng.integers(0, 2, size=shape).astype(dtype)
    raise ValueError(
        f"input {detail.get('name', '?')!r} has dtype {dtype}; the benchmark fills "
        "float, integer and bool inputs only"
    )


def _check_arguments(paths: Sequence[str], threads: Sequence[int], runs: int, warmup: int):
    if not paths:
        raise ValueError("no models given; pass at least one .tflite file")
    for count in threads:
        if int(count) < 1:
            raise ValueError(f"threads must be >= 1, got {count}")
    if not threads:
        raise ValueError("no thread counts given; pass at least one, e.g. 1")
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    for path in paths:
        check_model_file(path)


def benchmark_models(
    paths: Sequence[str],
    threads: Sequence[int] = (1,),
    runs: int = 100,
    warmup: int = 10,
    chunk: int = 10,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Times every model at every thread count, interleaving the models.

    Args:
        paths: .tflite files; the first one is the reference for `ratio_to_first`.
        threads: interpreter thread counts, each >= 1.
        runs: timed invokes per model and thread count.
        warmup: untimed invokes per model and thread count before timing.
        chunk: invokes a model runs before the next model takes its turn.
        seed: seed of the random input data (the same for every model).

    Returns:
        One dict per (thread count, model), in that order, with keys `model`,
        `threads`, `runs`, `warmup`, `median_us`, `p90_us`, `avg_us`, `std_us`,
        `min_us`, `max_us`, `size_kib` and `ratio_to_first` (median over the
        first model's median at the same thread count).

    Raises:
        FileNotFoundError: a model file is missing (the message names it).
        ValueError: a file is not a TFLite model, or an argument is out of range.

    Example:
        >>> rows = benchmark_models(["float.tflite", "int8.tflite"], threads=[1], runs=50)
        ... # doctest: +SKIP
        >>> print(format_table(rows))  # doctest: +SKIP
    """
    threads = [int(count) for count in threads]
    _check_arguments(paths, threads, runs, warmup)
    chunk = max(1, min(int(chunk), runs))
    rows = []
    for num_threads in threads:
        interpreters = [load_interpreter(path, num_threads) for path in paths]
        for interpreter in interpreters:
            rng = np.random.default_rng(seed)
            for detail in interpreter.get_input_details():
                interpreter.set_tensor(detail["index"], random_input(detail, rng))
            for _ in range(warmup):
                interpreter.invoke()

        latencies: list[list[float]] = [[] for _ in paths]
        done = 0
        turn = 0
        while done < runs:
            count = min(chunk, runs - done)
            for offset in range(len(paths)):
                index = (offset + turn) % len(paths)
                invoke = interpreters[index].invoke
                times = latencies[index]
                for _ in range(count):
                    start = time.perf_counter()
                    invoke()
                    times.append(time.perf_counter() - start)
            done += count
            turn += 1
        del interpreters

        reference_median = None
        for path, times in zip(paths, latencies, strict=True):
            micros = np.asarray(times) * 1e6
            median = float(np.median(micros))
            if reference_median is None:
                reference_median = median
            rows.append(
                {
                    "model": path,
                    "threads": num_threads,
                    "runs": runs,
                    "warmup": warmup,
                    "median_us": median,
                    "p90_us": float(np.percentile(micros, 90)),
                    "avg_us": float(micros.mean()),
                    "std_us": float(micros.std()),
                    "min_us": float(micros.min()),
                    "max_us": float(micros.max()),
                    "size_kib": os.path.getsize(path) / 1024,
                    "ratio_to_first": median / reference_median if reference_median else None,
                }
            )
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Formats benchmark rows as an aligned text table.

    Missing values (a p90 that the Android tool does not report) print as `-`.
    """

    def number(value, digits):
        return "-" if value is None else f"{value:.{digits}f}"

    header = ("model", "threads", "median us", "p90 us", "size KiB", "ratio")
    body = [
        (
            str(row["model"]),
            str(row["threads"]),
            number(row.get("median_us"), 1),
            number(row.get("p90_us"), 1),
            number(row.get("size_kib"), 1),
            number(row.get("ratio_to_first"), 2),
        )
        for row in rows
    ]
    widths = [max(len(line[column]) for line in [header, *body]) for column in range(6)]

    def render(line):
        cells = [line[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(line[1:], widths[1:], strict=True)]
        return "  ".join(cells)

    separator = "  ".join("-" * width for width in widths)
    return "\n".join([render(header), separator, *(render(line) for line in body)])


def runtime_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("ai-edge-litert")
    except metadata.PackageNotFoundError:
        return None
