"""Which CPU each weight storage is exact on: a table for docs/EXPORT.md.

    python -m export.target_matrix --models=demo_output/qil_w4a4.keras,... \
        [--data=digits] [--samples=360]

Exports every model three ways (INT8 weights; INT4 made exact for arm64; INT4
made exact for x86), runs each file on x86 and on (emulated) arm64 kernels with
LiteRT's default runtime, and prints, per file and CPU, the share of output
codes identical to the Keras model's and the largest difference in steps.
Needs `make arm64` on an x86 host. Nothing is written.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

FLAGS = flags.FLAGS

VARIANTS = (
    ("INT8 weights", False, "arm64"),
    ("INT4 for arm64", True, "arm64"),
    ("INT4 for x86", True, "x86"),
)


def define_flags() -> None:
    flags.DEFINE_list("models", None, "Quantized .keras models.", required=True)
    flags.DEFINE_string("data", "digits", "Verification data (see export.export_tflite).")
    flags.DEFINE_integer("samples", 360, "Test samples to verify on.", lower_bound=1)


def measure(model_paths, data_spec, samples, progress=print) -> list[dict]:
    """One row per model: for each variant and CPU, identical codes and max steps."""
    import keras

    from tfquant import datasets, lite

    for path in model_paths:
        if not os.path.exists(path):
            raise ValueError(f"--models: {path!r} does not exist")
    dataset = datasets.load_arrays(data_spec)
    x, y = dataset.x_test[:samples], dataset.y_test[:samples]
    rows = []
    for path in model_paths:
        row = {"model": os.path.splitext(os.path.basename(path))[0], "cells": {}}
        for name, int4, target in VARIANTS:
            model = keras.models.load_model(path)  # export aligns the model it is given
            result = lite.export_model(
                model,
                x,
                y,
                int4_weights=int4,
                target=target,
                targets=("x86", "arm64"),
                runtimes=("default",),
                allow_mismatch=True,
            )
            for cpu, by_runtime in result.report["targets"].items():
                row["cells"][(name, cpu)] = by_runtime["default"]
            progress(f"{row['model']}: {name} done")
        rows.append(row)
    return rows


def format_markdown(rows) -> str:
    columns = [(name, cpu) for name, _, _ in VARIANTS for cpu in ("x86", "arm64")]
    lines = [
        "| model | " + " | ".join(f"{name}, on {cpu}" for name, cpu in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for row in rows:
        cells = []
        for column in columns:
            a = row["cells"][column]
            cell = f"{100 * a['identical_output_codes']:.2f}% ({a['max_output_step_difference']})"
            if a["top1_agreement"] != 1.0:
                cell += f", top-1 {100 * a['top1_agreement']:.2f}%"
            cells.append(cell)
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from tfquant import lite
    from tfquant.lite import arm64

    try:
        rows = measure(FLAGS.models, FLAGS.data, FLAGS.samples, lambda m: print(m, file=sys.stderr))
    except (lite.ExportError, arm64.Arm64Error, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    print(format_markdown(rows))


if __name__ == "__main__":
    define_flags()
    app.run(main)
