"""Plots of `benchmarks.results` output (matplotlib, Agg backend, PNG).

    from benchmarks import plots
    plots.write_plots(result, "docs/img")          # result: results.json, loaded

`plot_accuracy_vs_bits`, `plot_size_vs_accuracy` and
`plot_parameter_history` each take what the benchmark wrote and leave out
rows that failed or were skipped; a figure with nothing to show says so.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

ACCURACY_KEY = "tflite_accuracy"


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ok(rows: Sequence[dict[str, Any]], kind: str | None = None, key: str = ACCURACY_KEY):
    return [
        row
        for row in rows
        if row.get("status") == "ok"
        and row.get(key) is not None
        and (kind is None or row.get("kind") == kind)
    ]


def _save(figure, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot().close(figure)
    return path


def _no_data(axes, text: str = "no successful rows") -> None:
    axes.text(0.5, 0.5, text, ha="center", va="center", transform=axes.transAxes)


def plot_accuracy_vs_bits(result: dict[str, Any], path: str, key: str = ACCURACY_KEY) -> str:
    """TFLite accuracy against bit width, one line per method, the float
    model as a horizontal line and the tfmot baselines as points at their
    weight width."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    rows = result["rows"]
    quantized = _ok(rows, "tfquant", key)
    for method in dict.fromkeys(row["method"] for row in quantized):
        points = sorted(
            (row["weight_bits"], 100 * row[key]) for row in quantized if row["method"] == method
        )
        axes.plot(*zip(*points, strict=True), marker="o", label=method)
    for row in _ok(rows, "float", key):
        axes.axhline(100 * row[key], color="black", linestyle="--", label="float")
    for row in _ok(rows, None, key):
        if row["kind"].startswith("tfmot"):
            label = f"tfmot W{row['weight_bits']}A{row['activation_bits']}"
            axes.scatter([row["weight_bits"]], [100 * row[key]], marker="s", s=60, label=label)
    if axes.has_data():
        axes.set_xticks(range(2, 9))
        axes.legend(fontsize="small")
    else:
        _no_data(axes)
    axes.set_xlabel("weight and activation bits (tfmot: weight bits)")
    axes.set_ylabel("test accuracy (%)" if key == ACCURACY_KEY else f"{key} (%)")
    axes.set_title("Accuracy of the integer TFLite files vs bit width")
    axes.grid(alpha=0.3)
    return _save(figure, path)


def plot_size_vs_accuracy(result: dict[str, Any], path: str, key: str = ACCURACY_KEY) -> str:
    """File size against TFLite accuracy, one labelled point per file."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    rows = [row for row in _ok(result["rows"], None, key) if row.get("size_kib") is not None]
    for method in dict.fromkeys(row["method"] for row in rows):
        chosen = [row for row in rows if row["method"] == method]
        axes.scatter(
            [row["size_kib"] for row in chosen],
            [100 * row[key] for row in chosen],
            label=method,
        )
        for row in chosen:
            text = "float" if row["kind"] == "float" else f"W{row['weight_bits']}"
            axes.annotate(
                text,
                (row["size_kib"], 100 * row[key]),
                textcoords="offset points",
                xytext=(4, 3),
                fontsize="x-small",
            )
    if rows:
        axes.legend(fontsize="small")
    else:
        _no_data(axes)
    axes.set_xlabel("file size (KiB)")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title("Size vs accuracy of the TFLite files")
    axes.grid(alpha=0.3)
    return _save(figure, path)


def load_history(history: str | Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """A parameter history: a list of `{"epoch", "values": {name: value}}`,
    or the path of a JSON file holding one."""
    if isinstance(history, str):
        with open(history, encoding="utf-8") as stream:
            history = json.load(stream)
    return list(history)


def plot_parameter_history(
    history: str | Sequence[dict[str, Any]], path: str, title: str = "Learned parameters"
) -> str:
    """Each recorded quantizer parameter against the training epoch, one
    panel per parameter kind (the last part of its name: center, distance,
    step ...), one line per quantizer.

    Args:
      history: records `{"epoch": float, "values": {"LAYER/QUANTIZER/KIND":
        value}}` (what `benchmarks.results.parameter_recorder` keeps),
        or the path of a JSON file holding them.
      path: the PNG to write.
      title: the figure's title.
    """
    records = load_history(history)
    series: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for record in records:
        for name, value in record.get("values", {}).items():
            owner, _, kind = name.rpartition("/")
            series.setdefault(kind, {}).setdefault(owner, []).append((record["epoch"], value))
    plt = pyplot()
    kinds = sorted(series)
    columns = min(3, max(1, len(kinds)))
    rows = max(1, -(-len(kinds) // columns))
    figure, grid = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    panels = [axes for line in grid for axes in line]
    for axes, kind in zip(panels, kinds, strict=False):
        for owner, points in series[kind].items():
            axes.plot(*zip(*points, strict=True), marker=".", label=owner)
        axes.set_title(kind, fontsize="small")
        axes.set_xlabel("epoch")
        axes.grid(alpha=0.3)
        if len(series[kind]) <= 8:
            axes.legend(fontsize="xx-small")
    for axes in panels[len(kinds) :]:
        axes.axis("off")
    if not kinds:
        _no_data(panels[0], "no parameters recorded")
    figure.suptitle(title)
    return _save(figure, path)


def write_plots(result: dict[str, Any], image_dir: str) -> dict[str, str]:
    """Writes every plot of a benchmark result into `image_dir`.

    Returns:
      Figure title -> PNG path: accuracy vs bits, size vs accuracy, and the
      learned parameters of each scheme in `result["parameter_history"]`.
    """
    paths = {
        "Accuracy vs bits": plot_accuracy_vs_bits(
            result, os.path.join(image_dir, "results_accuracy_vs_bits.png")
        ),
        "Size vs accuracy": plot_size_vs_accuracy(
            result, os.path.join(image_dir, "results_size_vs_accuracy.png")
        ),
    }
    for scheme, history in sorted(result.get("parameter_history", {}).items()):
        title = f"Learned parameters during fine-tuning: {scheme}"
        paths[title] = plot_parameter_history(
            history, os.path.join(image_dir, f"results_parameters_{scheme}.png"), title
        )
    return paths
