"""Runs the training recipes on one dataset, each as a user would, and tabulates them.

    python -m benchmarks.recipes [--data=npz:../shared/data/mnist10k.npz]
        [--recipes=qil_small_cnn_w4a4,lsq_small_cnn_w4a4,...] [--steps_per_epoch=40]
        [--output_dir=recipes_output] [--results_md=FILE]

First the float recipe (`float_small_cnn.cfg`), then every quantized recipe of
`--recipes` starting from its `final.keras`, each in its own process:

    python -m train.train --flagfile=train/recipes/NAME.cfg --dataset=DATA \
        --steps_per_epoch=N --init_from=OUT/float_small_cnn/final.keras \
        --model_dir=OUT/NAME

The recipes keep their own epochs, optimizers and bit widths; `--dataset`
swaps their data for `--data` and `--steps_per_epoch` caps each epoch (0: the
whole training split), so that the set runs in minutes here. Each row is the
command, the last epoch's validation accuracy (on the test rows of `--data`:
MNIST-10k rows 8000..9999), the wall time of the process and, for CPQ with
learned bit widths, the average weight bits. A recipe that fails is kept as a
row with the end of its output, and the run goes on.

Writes `recipes.json` into `--output_dir` and, with `--results_md`, a
markdown table; both atomically.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from absl import app, flags

from tfquant.fileio import write_atomically

RECIPE_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train", "recipes"
)
FLOAT_RECIPE = "float_small_cnn"
DEFAULT_RECIPES = (
    "qil_small_cnn_w4a4",
    "lsq_small_cnn_w4a4",
    "lsq_small_cnn_w3a3",
    "lsq_small_cnn_w2a2",
    "pact_small_cnn_w4a4",
    "qn_small_cnn_w2a4",
    "qn_small_cnn_w3a3",
    "dq_small_cnn_w4a4",
    "cpq_small_cnn_w4a4_learned_bits",
)
DEFAULT_DATA = "npz:../shared/data/mnist10k.npz"
OUTPUT_TAIL = 2000  # characters of a failed run's output kept in its row


def log(message: str) -> None:
    print(message, flush=True)


def recipe_path(name: str) -> str:
    """The flagfile of a recipe name (with or without `.cfg`); ValueError if missing."""
    name = name[: -len(".cfg")] if name.endswith(".cfg") else name
    path = os.path.join(RECIPE_DIR, name + ".cfg")
    if not os.path.isfile(path):
        known = sorted(f[:-4] for f in os.listdir(RECIPE_DIR) if f.endswith(".cfg"))
        raise ValueError(f"no recipe named {name!r} in {RECIPE_DIR}; known recipes: {known}")
    return path


def recipe_command(
    name: str, data: str, steps_per_epoch: int, model_dir: str, init_from: str | None
) -> list[str]:
    """The `python -m train.train` command line of one recipe run."""
    command = [
        sys.executable,
        "-m",
        "train.train",
        f"--flagfile={_shown(recipe_path(name))}",
        f"--dataset={data}",
        f"--steps_per_epoch={steps_per_epoch}",
        f"--model_dir={model_dir}",
        "--verbose=2",
    ]
    if init_from is not None:
        command.append(f"--init_from={init_from}")
    return command


def _shown(path: str) -> str:
    """`path` relative to the working directory when it lies below it."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def recipe_flags(name: str) -> dict[str, str]:
    """The `--flag=value` lines of a recipe (comments skipped)."""
    values = {}
    with open(recipe_path(name), encoding="utf-8") as stream:
        for line in stream:
            line = line.strip()
            if line.startswith("--") and "=" in line:
                key, value = line[2:].split("=", 1)
                values[key] = value
    return values


def summarize(name: str, model_dir: str) -> dict[str, Any]:
    """The last epoch of a finished run's metrics.json."""
    path = os.path.join(model_dir, "metrics.json")
    with open(path, encoding="utf-8") as stream:
        history = json.load(stream)
    if not history:
        raise ValueError(f"{path} has no epoch")
    last = history[-1]
    row = {
        "epochs": len(history),
        "val_accuracy": last.get("val_accuracy"),
        "train_accuracy": last.get("accuracy"),
        "epoch_seconds": sum(r.get("seconds", 0.0) for r in history),
    }
    if "average_weight_bits" in last:
        row["average_weight_bits"] = last["average_weight_bits"]
        row["learned_weight_bits"] = last.get("learned_weight_bits")
    return row


def run_recipe(
    name: str,
    data: str,
    steps_per_epoch: int,
    output_dir: str,
    init_from: str | None,
    runner=subprocess.run,
) -> dict[str, Any]:
    """Runs one recipe in its own process; returns its row."""
    model_dir = os.path.join(output_dir, name)
    command = recipe_command(name, data, steps_per_epoch, model_dir, init_from)
    settings = recipe_flags(name)
    row: dict[str, Any] = {
        "recipe": name,
        "method": settings.get("method"),
        "bits": f"W{settings.get('weight_bits', '32')}A{settings.get('activation_bits', '32')}",
        "command": " ".join(shlex.quote(part) for part in command[1:]),
        "status": "ok",
    }
    if row["method"] == "float":
        row["bits"] = "float"
    start = time.perf_counter()
    completed = runner(command, capture_output=True, text=True, check=False)
    row["seconds"] = time.perf_counter() - start
    if completed.returncode != 0:
        output = (completed.stdout or "") + (completed.stderr or "")
        row.update(status="error", error=output[-OUTPUT_TAIL:].strip())
        return row
    try:
        row.update(summarize(name, model_dir))
    except (OSError, ValueError, json.JSONDecodeError) as error:
        row.update(status="error", error=f"no usable metrics: {error}")
    return row


def run_all(
    recipes: Sequence[str], data: str, steps_per_epoch: int, output_dir: str, runner=subprocess.run
) -> list[dict[str, Any]]:
    """The float recipe, then each recipe of `recipes` from its final model."""
    for name in (FLOAT_RECIPE, *recipes):
        recipe_path(name)  # every name checked before any work
    if steps_per_epoch < 0:
        raise ValueError(f"--steps_per_epoch must be >= 0, got {steps_per_epoch}")
    os.makedirs(output_dir, exist_ok=True)
    rows = []
    log(f"== {FLOAT_RECIPE}")
    float_row = run_recipe(FLOAT_RECIPE, data, steps_per_epoch, output_dir, None, runner)
    rows.append(float_row)
    log(format_row(float_row))
    init_from = os.path.join(output_dir, FLOAT_RECIPE, "final.keras")
    for name in recipes:
        log(f"== {name}")
        if float_row["status"] != "ok":
            row = {"recipe": name, "status": "error", "error": "the float recipe failed"}
        else:
            row = run_recipe(name, data, steps_per_epoch, output_dir, init_from, runner)
        rows.append(row)
        log(format_row(row))
    return rows


def format_row(row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return f"   {row['recipe']}: error: {row.get('error', '')[-400:]}"
    text = (
        f"   {row['recipe']}: {100 * row['val_accuracy']:.2f}% after {row['epochs']} epochs "
        f"in {row['seconds']:.0f} s"
    )
    if "average_weight_bits" in row:
        text += f", average weight bits {row['average_weight_bits']:.2f}"
    return text


def format_markdown(
    rows: Sequence[dict[str, Any]], data: str, steps_per_epoch: int, load: str | None = None
) -> str:
    steps = "whole epochs" if steps_per_epoch == 0 else f"at most {steps_per_epoch} steps per epoch"
    lines = [
        f"Recipes on `{data}`, {steps}, written by `python -m benchmarks.recipes`. Accuracy: the "
        "last epoch's validation accuracy on the held-out rows; time: the whole process "
        "(start-up, training, evaluation, saving)"
        + (f"; load average {load} on this shared host." if load else "."),
        "",
        "| recipe | method | bits | val accuracy | epochs | time s | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row["status"] != "ok":
            last_lines = (row.get("error") or "").splitlines()[-1:]
            note = "error: " + (last_lines[0] if last_lines else "")
            cells = [row["recipe"], row.get("method") or "-", row.get("bits", "-"), "-", "-"]
            cells += [f"{row['seconds']:.0f}" if "seconds" in row else "-", note]
        else:
            note = ""
            if "average_weight_bits" in row:
                note = f"average weight bits {row['average_weight_bits']:.2f}"
            cells = [
                row["recipe"],
                row["method"],
                row["bits"],
                f"{100 * row['val_accuracy']:.2f}%",
                str(row["epochs"]),
                f"{row['seconds']:.0f}",
                note,
            ]
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |")
    lines += ["", "Commands:", ""]
    lines += [f"- `{row['recipe']}`: `python {row['command']}`" for row in rows if "command" in row]
    return "\n".join(lines) + "\n"


def _load_average() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "unknown"


def _define_flags():
    flags.DEFINE_string("data", DEFAULT_DATA, "Dataset spec passed to every recipe as --dataset.")
    flags.DEFINE_list("recipes", list(DEFAULT_RECIPES), "Quantized recipes (train/recipes/*.cfg).")
    flags.DEFINE_integer(
        "steps_per_epoch",
        40,
        "Cap on steps per epoch for every recipe (0: whole epochs).",
        lower_bound=0,
    )
    flags.DEFINE_string("output_dir", "recipes_output", "Model directories and recipes.json.")
    flags.DEFINE_string("results_md", None, "Also write the table as markdown here.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    values = flags.FLAGS
    start_load = _load_average()
    try:
        rows = run_all(values.recipes, values.data, values.steps_per_epoch, values.output_dir)
    except ValueError as error:
        raise app.UsageError(str(error)) from None
    load = f"{start_load} at the start, {_load_average()} at the end"
    markdown = format_markdown(rows, values.data, values.steps_per_epoch, load)
    log("\n" + markdown)
    path = os.path.join(values.output_dir, "recipes.json")
    write_atomically(path, json.dumps(rows, indent=1) + "\n")
    log(f"wrote {path}")
    if values.results_md:
        write_atomically(values.results_md, markdown, make_directory=True)
        log(f"wrote {values.results_md}")
    if any(row["status"] != "ok" for row in rows):
        sys.exit(1)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
