"""The model matrix: keras.applications families through tfquant, beside
post-training int8 and tensorflow-model-optimization.

    python -m benchmarks.models [--families=MobileNet,...] [--output=docs/MODELS.md]

For each family (random initial weights, a small input): train it float for a
short while on MNIST-10k digits resized to RGB, convert it with
`tfquant.quantize_model` at W8A8 and W4A4 (LSQ, and the seed method QIL),
fine-tune briefly, export it with `tfquant.lite.export_model` and verify it
against the Keras model on this host and on emulated arm64 (when `make arm64`
has built it). Beside it: the float TFLite file, LiteRT's post-training int8
file of the same float model (size, and latency at 1 and 2 threads, measured
interleaved with the W8A8 file, twice), and whether tensorflow-model-
optimization's `quantize_model` takes the same architecture (in its own
process, with tf_keras; with its int8 file's size). Writes a Markdown table
and exits 1 if any family failed to quantize or export.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence

import numpy as np

# (family, input size, constructor arguments)
FAMILIES = (
    ("MobileNet", 64, {"alpha": 0.25}),
    ("MobileNetV2", 64, {"alpha": 0.35}),
    ("MobileNetV3Small", 64, {"alpha": 0.75}),
    ("EfficientNetB0", 64, {}),
    ("EfficientNetV2B0", 64, {}),
    # The three largest at 48x48, to keep the matrix within an hour on 2 cores.
    ("ResNet50V2", 48, {}),
    ("DenseNet121", 48, {}),
    ("InceptionV3", 75, {}),  # its smallest input
    ("NASNetMobile", 48, {}),
)
# Families whose model starts with its own preprocessing (Rescaling, and
# Normalization for EfficientNet) and so expects pixels in [0, 255]; the
# others get [0, 1].
PIXELS_TO_255 = ("MobileNetV3Small", "EfficientNetB0", "EfficientNetV2B0")
SCHEMES = ("lsq_w8a8", "lsq_w4a4", "qil_w4a4")
DEFAULT_DATA = "npz:../shared/data/mnist10k.npz"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build(family: str, size: int, kwargs: dict, keras_module):
    return getattr(keras_module.applications, family)(
        weights=None,
        input_shape=(size, size, 3),
        classes=10,
        classifier_activation=None,
        **kwargs,
    )


def as_rgb(images: np.ndarray, size: int, scale: float = 1.0) -> np.ndarray:
    """Grey digits (N, H, W, 1) in [0, 1] as (N, size, size, 3) images in
    [0, scale]."""
    import tensorflow as tf

    resized = tf.image.resize(images, (size, size)).numpy()
    return (scale * np.repeat(resized, 3, axis=-1)).astype(np.float32)


def accuracy(model, x, y) -> float:
    from tfquant.lite import verify

    return float(np.mean(np.argmax(verify.keras_outputs(model, x), -1) == y))


def tflite_accuracy(content: bytes, x, y) -> float:
    from tfquant.lite import verify

    raw, _ = verify.run_tflite(content, x)
    return float(np.mean(np.argmax(raw, -1) == y))


def run_family(family, size, kwargs, data, args, workdir) -> dict:
    """Everything measured for one family (errors are recorded, not raised)."""
    import keras
    import tensorflow as tf

    import tfquant
    from tfquant import lite
    from tfquant.lite import arm64, benchmark, verify

    row: dict = {"family": family, "input": f"{size}x{size}x3", "schemes": {}}
    keras.utils.set_random_seed(args.seed)
    scale = 255.0 if family in PIXELS_TO_255 else 1.0
    x_train = as_rgb(data.x_train[: args.train_samples], size, scale)
    y_train = data.y_train[: args.train_samples]
    x_test = as_rgb(data.x_test[: args.test_samples], size, scale)
    y_test = data.y_test[: args.test_samples]
    model = build(family, size, kwargs, keras)
    row["parameters"] = int(model.count_params())
    try:  # an unsupported layer is named at once, before any training
        tfquant.quantize_model(model, "lsq_w8a8")
    except ValueError as error:
        row["error"] = str(error)
        return row
    start = time.time()
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x_train, y_train, batch_size=64, epochs=args.epochs, verbose=0)
    tfquant.reestimate_batch_norm(model, x_train[:512])
    row["float_accuracy"] = accuracy(model, x_test, y_test)
    row["float_seconds"] = time.time() - start
    log(f"  float: {100 * row['float_accuracy']:.1f}% ({row['float_seconds']:.0f} s)")
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    row["float_kib"] = len(converter.convert()) / 1024
    ptq = lite.export_model(model, x_train[:256], post_training=True, allow_mismatch=True)
    row["ptq_kib"] = len(ptq.content) / 1024
    row["ptq_accuracy"] = tflite_accuracy(ptq.content, x_test, y_test)
    ptq_path = os.path.join(workdir, f"{family}_ptq.tflite")
    with open(ptq_path, "wb") as stream:
        stream.write(ptq.content)

    targets = [verify.host_target()]
    if args.arm64 and "arm64" not in targets:
        try:
            arm64.check_environment()
            targets.append("arm64")
        except arm64.Arm64Error as error:
            log(f"  arm64 not verified: {error}")
    for scheme in SCHEMES:
        entry: dict = {}
        row["schemes"][scheme] = entry
        try:
            start = time.time()
            qmodel = tfquant.quantize_model(model, scheme, calibration_data=x_train[:256])
            qmodel.compile(
                optimizer=keras.optimizers.Adam(1e-4),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            )
            qmodel.fit(x_train, y_train, batch_size=64, epochs=args.fine_tune_epochs, verbose=0)
            entry["fit_seconds"] = time.time() - start
            result = lite.export_model(
                qmodel,
                x_test[: args.verify_samples],
                targets=targets,
                runtimes=("default",),
                allow_mismatch=True,
            )
            entry["export_seconds"] = time.time() - start - entry["fit_seconds"]
            entry["keras_accuracy"] = accuracy(qmodel, x_test, y_test)
            entry["tflite_accuracy"] = tflite_accuracy(result.content, x_test, y_test)
            entry["kib"] = len(result.content) / 1024
            entry["targets"] = {
                target: by_runtime["default"]
                for target, by_runtime in result.report["targets"].items()
            }
            entry["seconds"] = time.time() - start
            if scheme == "lsq_w8a8":
                path = os.path.join(workdir, f"{family}_{scheme}.tflite")
                with open(path, "wb") as stream:
                    stream.write(result.content)
                entry["path"] = path
            codes = ", ".join(
                f"{t} {100 * a['identical_output_codes']:.2f}%" for t, a in entry["targets"].items()
            )
            log(
                f"  {scheme}: identical codes {codes} ({entry['seconds']:.0f} s: quantize and "
                f"fit {entry['fit_seconds']:.0f}, export and verify {entry['export_seconds']:.0f})"
            )
        except Exception as error:  # recorded in the table; the run exits 1
            entry["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:300]
            log(f"  {scheme} failed: {entry['error']}")
            traceback.print_exc()
    path = row["schemes"].get("lsq_w8a8", {}).get("path")
    if path:
        ratios = {1: [], 2: []}
        for _ in range(args.latency_repeats):
            rows = benchmark.benchmark_models(
                [ptq_path, path], threads=(1, 2), runs=args.latency_runs, warmup=5
            )
            for measured in rows:
                if measured["model"] == path:
                    ratios[measured["threads"]].append(measured["ratio_to_first"])
        row["latency_ratio"] = ratios
    row["tfmot"] = tfmot_check(family, size, kwargs, args)
    return row


def run_isolated(family, size, kwargs, args, workdir) -> dict:
    """`run_family` in a process of its own: the memory of one family's
    models is returned when it ends (in one process the matrix grew past
    16 GB). Errors are recorded in the row."""
    import multiprocessing

    path = os.path.join(workdir, f"{family}.json")
    options = {k: v for k, v in vars(args).items() if k != "family_list"}
    process = multiprocessing.get_context("spawn").Process(
        target=_family_child, args=(family, size, kwargs, options, workdir, path)
    )
    process.start()
    process.join()
    if not os.path.exists(path):
        return {
            "family": family,
            "input": f"{size}x{size}x3",
            "error": f"its process ended with exit code {process.exitcode} and no result",
        }
    with open(path) as stream:
        row = json.load(stream)
    if "latency_ratio" in row:  # JSON keys are strings; the thread counts are ints
        row["latency_ratio"] = {int(k): v for k, v in row["latency_ratio"].items()}
    return row


def _family_child(family, size, kwargs, options, workdir, path) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from tfquant.datasets import load_arrays

    args = argparse.Namespace(**options)
    try:
        row = run_family(family, size, kwargs, load_arrays(args.data), args, workdir)
    except Exception as error:
        traceback.print_exc()
        row = {"family": family, "input": f"{size}x{size}x3", "error": f"{error}"[:300]}
    with open(path, "w") as stream:
        json.dump(row, stream)


def tfmot_check(family: str, size: int, kwargs: dict, args) -> dict:
    """Whether tfmot's quantize_model takes the family (its own process)."""
    command = [
        sys.executable,
        "-m",
        "benchmarks.models",
        "--tfmot_family",
        json.dumps([family, size, kwargs]),
    ]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=args.tfmot_timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return {"status": "timeout"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": "crashed", "reason": tail[:200]}
    return json.loads(lines[-1])


def tfmot_child(spec: str) -> None:
    """In a process of its own: tfmot's quantize_model on the tf_keras model."""
    family, size, kwargs = json.loads(spec)
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    try:
        import tensorflow as tf
        import tensorflow_model_optimization as tfmot
        import tf_keras
    except ImportError as error:
        print(json.dumps({"status": "not installed", "reason": str(error)}))
        return
    model = build(family, size, kwargs, tf_keras)
    try:
        qat = tfmot.quantization.keras.quantize_model(model)
    except Exception as error:  # the answer this probe is for
        reason = f"{type(error).__name__}: {error}".splitlines()[0][:200]
        print(json.dumps({"status": "refused", "reason": reason}))
        return
    converter = tf.lite.TFLiteConverter.from_keras_model(qat)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    try:
        content = converter.convert()
    except Exception as error:
        reason = f"{type(error).__name__}: {error}".splitlines()[0][:200]
        print(json.dumps({"status": "accepted, conversion failed", "reason": reason}))
        return
    print(json.dumps({"status": "accepted", "kib": len(content) / 1024}))


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _spread(values) -> str:
    if not values:
        return "-"
    low, high = min(values), max(values)
    return f"{low:.2f}" if abs(high - low) < 0.005 else f"{low:.2f}-{high:.2f}"


def format_markdown(rows: Sequence[dict], args, seconds: float) -> str:
    lines = [
        "# keras.applications through tfquant",
        "",
        "Written by `make models` (`python -m benchmarks.models`); do not edit by hand.",
        f"Made on this host in {seconds / 60:.0f} minutes. Each family: random initial weights, "
        f"{args.epochs} float epoch(s) on {args.train_samples} MNIST-10k digits resized to RGB, "
        f"then per scheme `tfquant.quantize_model` and {args.fine_tune_epochs} epoch(s) of "
        f"fine-tuning, exported with the default flags (INT8 weights) and verified on "
        f"{args.verify_samples} held-out digits with LiteRT's default runtime. Accuracies are on "
        f"{args.test_samples} held-out digits (short training: they show that nothing broke, "
        "not what the family can reach).",
        "",
        "## Exactness",
        "",
        "Top-1 agreement / identical output codes between the Keras model and the file, per CPU "
        "(arm64 under emulation).",
        "",
        "| family | input | " + " | ".join(SCHEMES) + " |",
        "|---|---|" + "---|" * len(SCHEMES),
    ]
    for row in rows:
        if "error" in row:
            cells = [f"not quantized: {row['error'][:160]}"] + [""] * (len(SCHEMES) - 1)
        else:
            cells = []
            for scheme in SCHEMES:
                entry = row["schemes"].get(scheme, {})
                if "error" in entry:
                    cells.append(f"error: {entry['error'][:120]}")
                    continue
                cells.append(
                    "<br>".join(
                        f"{t}: {_percent(a['top1_agreement'])} / "
                        f"{_percent(a['identical_output_codes'])} (max "
                        f"{a['max_output_step_difference']})"
                        for t, a in entry.get("targets", {}).items()
                    )
                )
        lines.append(f"| {row['family']} | {row['input']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Size, accuracy and latency",
        "",
        "Sizes in KiB. Latency: median of the W8A8 file over the post-training int8 file of the "
        f"same float model, {args.latency_runs} interleaved invokes each, run "
        f"{args.latency_repeats} times (the spread is shown). tfmot: whether "
        "tensorflow-model-optimization's `quantize_model` takes the same family (tf_keras), and "
        "its int8 file's size.",
        "",
        "| family | float acc. | float file | PTQ int8 file (acc.) | W8A8 file (acc.) | W4A4 "
        "LSQ acc. | W4A4 QIL acc. | latency W8A8/PTQ, 1 thread | 2 threads | tfmot |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['family']} | not quantized | | | | | | | | |")
            continue
        schemes = row["schemes"]

        def file_cell(scheme, schemes=schemes):
            entry = schemes.get(scheme, {})
            if "kib" not in entry:
                return "error"
            return f"{entry['kib']:.0f} ({_percent(entry['tflite_accuracy'])})"

        def acc_cell(scheme, schemes=schemes):
            entry = schemes.get(scheme, {})
            return _percent(entry.get("tflite_accuracy")) if "kib" in entry else "error"

        tfmot = row.get("tfmot", {})
        tfmot_cell = tfmot.get("status", "-")
        if "kib" in tfmot:
            tfmot_cell += f", {tfmot['kib']:.0f} KiB"
        elif tfmot.get("reason"):
            tfmot_cell += f": {tfmot['reason'][:100]}"
        ratios = row.get("latency_ratio", {})
        lines.append(
            f"| {row['family']} | {_percent(row.get('float_accuracy'))} | "
            f"{row.get('float_kib', 0):.0f} | {row.get('ptq_kib', 0):.0f} "
            f"({_percent(row.get('ptq_accuracy'))}) | {file_cell('lsq_w8a8')} | "
            f"{acc_cell('lsq_w4a4')} | {acc_cell('qil_w4a4')} | "
            f"{_spread(ratios.get(1, []))} | {_spread(ratios.get(2, []))} | {tfmot_cell} |"
        )
    return "\n".join(lines) + "\n"


def previous_rows(path: str) -> list[dict]:
    """The rows a run wrote to `path` (JSON), [] when there is none."""
    if not os.path.exists(path):
        return []
    try:
        with open(path) as stream:
            rows = json.load(stream)
    except ValueError as error:
        raise SystemExit(f"--update: {path} is not a models.py JSON file ({error})") from None
    for row in rows:  # JSON object keys are strings; the thread counts are ints
        if "latency_ratio" in row:
            row["latency_ratio"] = {int(k): v for k, v in row["latency_ratio"].items()}
    return rows


def merged_rows(previous: Sequence[dict], new: Sequence[dict]) -> list[dict]:
    """`new` rows replace `previous` rows of the same family; in FAMILIES order."""
    by_family = {row["family"]: row for row in previous}
    by_family.update({row["family"]: row for row in new})
    order = [family for family, _, _ in FAMILIES]
    return sorted(by_family.values(), key=lambda row: order.index(row["family"]))


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default=",".join(f for f, _, _ in FAMILIES))
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--output", default="docs/MODELS.md")
    parser.add_argument("--json_output", default="models_output/models.json")
    parser.add_argument("--train_samples", type=int, default=1000)
    parser.add_argument("--test_samples", type=int, default=300)
    parser.add_argument("--verify_samples", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--fine_tune_epochs", type=int, default=1)
    parser.add_argument("--latency_runs", type=int, default=30)
    parser.add_argument("--latency_repeats", type=int, default=2)
    parser.add_argument("--tfmot_timeout", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noarm64", dest="arm64", action="store_false")
    parser.add_argument(
        "--update",
        action="store_true",
        help="keep the rows of --json_output for the families not run, and rewrite the table",
    )
    parser.add_argument("--tfmot_family", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    known = {f: (s, k) for f, s, k in FAMILIES}
    args.family_list = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in args.family_list if f not in known]
    if unknown:
        parser.error(f"unknown --families {unknown}; known: {sorted(known)}")
    for name in ("train_samples", "test_samples", "verify_samples", "latency_runs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_arguments(argv)
    if args.tfmot_family:
        tfmot_child(args.tfmot_family)
        return 0
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from tfquant import fileio
    from tfquant.datasets import load_arrays

    load_arrays(args.data)  # a bad --data is named before any family runs
    known = {f: (s, k) for f, s, k in FAMILIES}
    rows, start = [], time.time()
    with tempfile.TemporaryDirectory() as workdir:
        for index, family in enumerate(args.family_list, 1):
            size, kwargs = known[family]
            log(f"[{index}/{len(args.family_list)}] {family} at {size}x{size}x3")
            family_start = time.time()
            row = run_isolated(family, size, kwargs, args, workdir)
            row["seconds"] = time.time() - family_start
            rows.append(row)
    seconds = time.time() - start
    if args.update:
        rows = merged_rows(previous_rows(args.json_output), rows)
        seconds = sum(row.get("seconds", 0.0) for row in rows)
    text = format_markdown(rows, args, seconds)
    fileio.write_atomically(args.output, text, make_directory=True)
    for row in rows:
        for entry in row.get("schemes", {}).values():
            entry.pop("path", None)
    fileio.write_atomically(args.json_output, json.dumps(rows, indent=1), make_directory=True)
    print(text)
    failed = [
        r["family"]
        for r in rows
        if "error" in r or any("error" in e for e in r["schemes"].values())
    ]
    if failed:
        log(f"failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
