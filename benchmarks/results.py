"""The results benchmark: every method at every bit width on MNIST-10k, one table.

    python -m benchmarks.results [--data=npz:../shared/data/mnist10k.npz]
        [--methods=qil,lsq,pact,qn,dq,cpq] [--bits=8,4,3,2] [--float_epochs=3]
        [--finetune_epochs=1] [--runs=200] [--threads=1,2] [--tfmot] [--seed=0]
        [--output_dir=benchmark_results_output] [--results_md=docs/RESULTS.md]
        [--image_dir=docs/img] [--quick]

1. Trains `train.models.small_cnn` in float with Adam on the training rows
   (MNIST-10k: rows 0..7999). Then, for each method of `--methods` and each
   width B of `--bits`, the scheme `METHOD_wBaB` goes through
   `tfquant.quantize_model` (calibrated on 512 training rows), fine-tuning
   with `model.fit`, BatchNormalization statistics re-estimated on 2048
   training rows (`tfquant.reestimate_batch_norm`; the accuracy of the file
   exported without it is kept in the row) and `tfquant.lite.export_model(...,
   allow_mismatch=True)`
   (INT4 weight storage where B <= 4), verified on the held-out rows
   (8000..9999). Each row records Keras and TFLite accuracy, top-1 agreement,
   identical output codes, file size, fine-tuning seconds and the training
   step time as a ratio to float (`train_on_batch` steps of the quantized
   model and of a float copy, interleaved, after the export). A combination
   that raises is kept as a row with `status: "error"` and the message, and
   the run goes on. QN rows use the paper's weight level sets (ternary at 2
   bits, 3(+-2) at 3 bits, 3(+-4) at 4 bits, uniform at 8 bits) and a
   temperature that climbs per step from 1 to 200 over the fine-tuning budget.
   During fine-tuning the scalar parameters of every
   quantizer (QIL center and distance, LSQ/PACT steps and clips, QN
   temperature, CPQ learned bits ...) are recorded a few times per epoch.
2. With `--tfmot` (the default, off under `--quick`), in a separate process
   (`benchmarks.tfmot_export --model=small_cnn`, TF_USE_LEGACY_KERAS=1):
   tensorflow-model-optimization's default 8-bit QAT and its experimental
   n-bit scheme at W4A8, the same architecture, data, epochs and seed,
   converted to full int8 by the standard converter. Without tf_keras or
   tfmot these rows are skipped with the reason.
3. Host latency of every .tflite file (`tfquant.lite.benchmark`, models
   interleaved) at each thread count of `--threads`.
4. Writes the .tflite files, `results.json` (config, rows with the command
   line and seed that produced them, parameter histories) and the plots'
   source data into `--output_dir`; the plots (`benchmarks.plots`) into
   `--image_dir`; the markdown table to `--results_md`, atomically.

`--quick` shrinks the default budget (2 float epochs and 1 fine-tuning
epoch, qil and lsq at 4 bits, 2000 training and 500 held-out rows, 20 timed
runs, no tfmot); explicit flags still win. It is a smoke run, not a result:
with 32 steps per epoch the float model's BatchNorm statistics still lag (28%
float accuracy, about 75% after fine-tuning). It took 68 s of wall time on
this 2-core host (load average about 3).

Budget. Float training uses Adam(3e-3) and BatchNormalization momentum 0.9
(Keras' 0.99 averages over about as many steps as the whole budget, and its
moving statistics then lag far behind the weights). The default budget
(float 3 epochs, fine-tuning 1 epoch of 125 steps of 64, 6 methods x 4
widths, both tfmot baselines, 200 timed runs) took 23.9 minutes on this
2-core host with nothing else running (2026-11-23). Most of it is QN and CPQ,
whose cost grows with the grid: QN W8A8 280 s of fine-tuning (255
thresholds, 44x the float step), CPQ W8A8 152 s and W4A4 about 100 s; QIL,
LSQ, PACT and DQ take 9 to 17 s per fine-tuning epoch. Under a load average
of 4 to 7 from other work the same run took close to two hours; each extra
fine-tuning epoch adds about 12 minutes on a quiet host.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from absl import app, flags

from benchmarks.exporter import (
    FINETUNE_LEARNING_RATE,
    _number,
    _percent,
    add_latency,
    fit,
    float_tflite,
    load_split,
)
from benchmarks.overhead import (
    BASELINE_INSTALL_HINT,
    baseline_skip_result,
    legacy_keras_environment,
    summarize,
    time_interleaved,
)

DEFAULT_DATA = "npz:../shared/data/mnist10k.npz"
DEFAULT_METHODS = ("qil", "lsq", "pact", "qn", "dq", "cpq")
DEFAULT_BITS = (8, 4, 3, 2)
RESULT_NAME = "results.json"
BATCH_SIZE = 64
FLOAT_LEARNING_RATE = 3e-3  # the demo's float rate for the small CNN
# Keras' default BatchNormalization momentum (0.99) averages over about 100
# steps, as long as the whole budget here: its moving statistics would lag
# far behind the weights and ruin inference-mode accuracy.
BATCHNORM_MOMENTUM = 0.9
CALIBRATION_SAMPLES = 512
# Training rows whose statistics replace the BatchNormalization moving
# averages after fine-tuning (`tfquant.reestimate_batch_norm`). Scale
# parameters ahead of a BatchNormalization get no loss gradient beyond
# rounding noise, which Adam turns into steps of the learning rate; e.g. QN's
# first-layer alpha (about 0.002, against steps of 5e-4) grew by up to 2.3x
# within one epoch, and the moving averages lagged behind it by enough to
# cost QN W4A4 10 to 20 points of held-out accuracy in some runs.
BN_REESTIMATION_ROWS = 2048
FULL_BUDGET = {"float_epochs": 3, "finetune_epochs": 1, "runs": 200}
QUICK_BUDGET = {
    "float_epochs": 2,
    "finetune_epochs": 1,
    "runs": 20,
    "methods": ["qil", "lsq"],
    "bits": [4],
    "train_samples": 2000,
    "test_samples": 500,
    "tfmot": False,
}
TFMOT_SCHEMES = ((8, 8), (4, 8))
HISTORY_BITS = 4
HISTORY_POINTS_PER_EPOCH = 4
PARAMETER_KEYS = (
    "center",
    "distance",
    "temperature",
    "step",
    "bits",
    "alpha",
    "gamma",
    "sigma",
    "level",
)
STEP_ROUNDS = 3
STEP_STEPS = 4
# Published ImageNet ResNet-18 top-1 (%), quoted on the results page:
# docs/paper_figures.json beside it (docs/methods/*.md say which figures were
# checked against the papers).
PAPER_FIGURES_PATH = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "paper_figures.json"
)


def paper_figures(path: str = PAPER_FIGURES_PATH) -> list[dict[str, Any]]:
    """The published figures: method, source, setting, full_precision_top1,
    top1_by_bits ({"4": top-1, ...}) and full_scale_recipe per entry."""
    with open(path, encoding="utf-8") as stream:
        return json.load(stream)["figures"]


PAPER_DIFFERENCES = (
    "What differs: the papers train ResNet-18 on ImageNet (1.28 M images of 224x224x3, "
    "1000 classes) for tens of epochs on GPUs, from a converged float model; the table "
    "above trains a small CNN on 8,000 MNIST digits (28x28x1, 10 classes) for a few epochs "
    "on 2 CPU cores, from a float model trained just as briefly, with constant learning "
    "rates and no weight decay. Only the ordering of methods and the cost of fewer bits "
    "carry over, not the numbers. The recipes named above run the paper settings with "
    "`python -m train.train --flagfile=RECIPE --init_from=FLOAT_RUN/final.keras "
    "--data_dir=DIR --model_dir=RUN` on GPUs (`--strategy=mirrored`) or a TPU "
    "(`--strategy=tpu --tpu=NAME`); they were not run on this machine."
)


def paper_section(result: dict[str, Any]) -> list[str]:
    """The published figures beside ours (Keras accuracy at the same widths)."""
    ours = {
        (row["method"], row["weight_bits"]): row["keras_accuracy"]
        for row in result["rows"]
        if row["status"] == "ok" and row.get("keras_accuracy") is not None
    }
    float_accuracy = ours.get(("float", 32))

    def percent(value):
        return "-" if value is None else f"{100 * value:.2f}"

    header = "| method | paper (ImageNet ResNet-18 top-1) | setting | FP | 4 bits | 3 bits |"
    header += " 2 bits | ours FP | ours 4 | ours 3 | ours 2 | full-scale recipe |"
    lines = [header, "|" + "---|" * 12]
    for figure in paper_figures():
        method, paper = figure["method"], figure["top1_by_bits"]
        cells = [
            method,
            figure["source"],
            figure["setting"],
            f"{figure['full_precision_top1']:.1f}",
        ]
        cells += [f"{paper[str(b)]:.1f}" if str(b) in paper else "-" for b in (4, 3, 2)]
        cells += [percent(float_accuracy)] + [percent(ours.get((method, b))) for b in (4, 3, 2)]
        cells.append(f"`{figure['full_scale_recipe']}`")
        lines.append("| " + " | ".join(cells) + " |")
    return lines + ["", PAPER_DIFFERENCES]


def log(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------------------
# Configuration


def check_config(
    methods: Sequence[str],
    bits: Sequence[int | str],
    float_epochs: int = 1,
    finetune_epochs: int = 1,
    runs: int = 1,
    threads: Sequence[int | str] = (1,),
) -> tuple[list[str], list[int], list[int]]:
    """Validates the run's settings before any work.

    Args:
      methods: quantizer names such as "qil"; each `METHOD_wBaB` must be a
        `tfquant.Scheme` preset.
      bits: weight and activation widths, each in 2..8.
      float_epochs, finetune_epochs, runs: each >= 1.
      threads: interpreter thread counts, each >= 1.

    Returns:
      (methods, bits, threads), stripped and converted to int.

    Raises:
      ValueError: naming the first bad value.
    """
    from tfquant.schemes import Scheme

    methods = [str(m).strip().lower() for m in methods if str(m).strip()]
    if not methods:
        raise ValueError("--methods is empty; name at least one, e.g. qil")
    if len(set(methods)) != len(methods):
        raise ValueError(f"--methods lists a method twice: {methods}")
    for method in methods:
        if not re.fullmatch(r"[a-z]+", method):
            raise ValueError(f"unknown method {method!r} in --methods (e.g. qil, lsq, pact)")
        try:
            Scheme.from_any(f"{method}_w4a4")
        except ValueError as error:
            raise ValueError(f"unknown method {method!r} in --methods: {error}") from None
    widths = _integers("bits", bits, 2, 8)
    if not widths:
        raise ValueError("--bits is empty; name at least one width in 2..8")
    if len(set(widths)) != len(widths):
        raise ValueError(f"--bits lists a width twice: {widths}")
    counts = _integers("threads", threads, 1, None)
    for name, value in (
        ("float_epochs", float_epochs),
        ("finetune_epochs", finetune_epochs),
        ("runs", runs),
    ):
        if value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")
    return methods, widths, counts


def _integers(flag: str, values: Sequence[int | str], low: int, high: int | None) -> list[int]:
    """`values` as integers, each checked against low..high (no upper bound for None)."""
    out = []
    for value in values:
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"--{flag} value {value!r} is not an integer") from None
        if number < low or (high is not None and number > high):
            bounds = f"outside {low}..{high}" if high is not None else f"below {low}"
            raise ValueError(f"--{flag} value {number} is {bounds}")
        out.append(number)
    return out


def scheme_name(method: str, bits: int) -> str:
    return f"{method}_w{bits}a{bits}"


# QN rows take the paper's weight level sets: 2 bits ternary {-1, 0, 1}, 3 bits
# "3(+-2)" {-2, ..., 2}, 4 bits "3(+-4)" {-4, -2, -1, 0, 1, 2, 4} (its codes need
# INT4); the activations use the uniform set of the width.
QN_WEIGHT_PRESETS = {2: "ternary", 3: "3(+-2)", 4: "3(+-4)"}


def bench_scheme(method: str, bits: int):
    """The scheme of one row (a `tfquant.Scheme` or its preset name) and the
    note the table shows for it."""
    from tfquant.schemes import Scheme

    name = scheme_name(method, bits)
    if method == "qn" and bits in QN_WEIGHT_PRESETS:
        preset = QN_WEIGHT_PRESETS[bits]
        weights = {"class_name": "qn", "config": {"levels": preset}}
        return dataclasses.replace(Scheme.from_any(name), weights=weights), f"weights {preset}"
    return name, ""


# ---------------------------------------------------------------------------
# Training helpers


def parameter_scalars(model, keys: Sequence[str] = PARAMETER_KEYS) -> dict[str, float]:
    """Scalar quantizer parameters whose name contains one of `keys`.

    Keys are `LAYER/QUANTIZER/PARAMETER`, from each quantizer's `parameters()`
    (QIL center and distance, LSQ and PACT steps and clips, QN temperature,
    CPQ learned bits ...).
    """
    from train.trainer import quantizer_layers

    scalars = {}
    for layer_name, quantizer in quantizer_layers(model):
        for key, value in quantizer.parameters().items():
            if any(part in key for part in keys) and np.isfinite(value):
                scalars[f"{layer_name}/{quantizer.name}/{key}"] = float(value)
    return scalars


def parameter_recorder(model, points_per_epoch: int = HISTORY_POINTS_PER_EPOCH):
    """A Keras callback recording `parameter_scalars(model)` during `fit`.

    It records before the first step, `points_per_epoch - 1` times within
    each epoch and at each epoch's end; its `history` is a list of
    `{"epoch": fractional epoch, "step": steps so far, "values": {...}}`.
    """
    import keras

    class ParameterRecorder(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.history: list[dict[str, Any]] = []
            self.steps = 0
            self.epoch = 0
            self.every = None

        def _record(self, epoch: float):
            values = parameter_scalars(model)
            self.history.append({"epoch": epoch, "step": self.steps, "values": values})

        def on_train_begin(self, logs=None):
            steps_per_epoch = self.params.get("steps") or 0
            self.every = max(1, steps_per_epoch // max(1, points_per_epoch))
            self.steps_per_epoch = steps_per_epoch
            self._record(0.0)

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            self.steps += 1
            last = self.steps_per_epoch and batch + 1 >= self.steps_per_epoch
            if (batch + 1) % self.every == 0 and not last:
                fraction = (batch + 1) / self.steps_per_epoch if self.steps_per_epoch else 0.0
                self._record(self.epoch + fraction)

        def on_epoch_end(self, epoch, logs=None):
            self._record(float(epoch + 1))

    return ParameterRecorder()


def set_batchnorm_momentum(model, momentum: float = BATCHNORM_MOMENTUM):
    """Sets the momentum of every BatchNormalization layer (before training;
    `tfquant.quantize_model` copies it into the quantized model)."""
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = momentum
    return model


def compile_for_finetuning(model):
    """Compiles `model` with the fine-tuning optimizer and loss."""
    import keras

    model.compile(
        optimizer=keras.optimizers.Adam(FINETUNE_LEARNING_RATE),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def finetune(model, dataset, epochs: int, batch_size: int, callbacks=()) -> float:
    """Quantization-aware fine-tuning with Adam; returns seconds."""
    start = time.perf_counter()
    compile_for_finetuning(model).fit(
        x=dataset.x_train,
        y=dataset.y_train,
        epochs=epochs,
        batch_size=batch_size,
        callbacks=list(callbacks),
        verbose=2,
    )
    return time.perf_counter() - start


# QN's temperature over the fine-tuning budget: the paper raises T by 5..10 per
# epoch over tens of epochs; a budget of one epoch gets the same climb per step.
# At T = 41 the first activation quantizer's sigmoids were still soft enough
# that its step function of inference alone cost one run 9 points; at 200 the
# training-form accuracy was within 0.25 points of the step form's in four runs.
QN_FINAL_TEMPERATURE = 200.0


def tflite_accuracy_as_is(model, dataset, bits: int) -> float:
    """Held-out accuracy of the integer file `model` exports to as it is,
    from a copy (the export aligns the Keras model it is given to the file)."""
    import keras

    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return export_row(copy, dataset, bits).report["verification"]["tflite_accuracy"]


def export_row(qmodel, dataset, bits: int):
    """A row's integer file, verified on the test split: 2..4-bit weights as
    INT4 made exact for, and verified on, this host's kernels."""
    from tfquant import lite
    from tfquant.lite import verify

    return lite.export_model(
        qmodel,
        dataset.x_test,
        dataset.y_test,
        allow_mismatch=True,
        int4_weights=bits <= 4,
        target=verify.host_target(),
    )


def qn_temperature(rows: int, batch_size: int, epochs: int):
    """A per-step `TemperatureScheduler` taking T from 1 to QN_FINAL_TEMPERATURE
    over `epochs` epochs of `rows` training rows."""
    from tfquant import callbacks

    steps = max(1, epochs * -(-rows // batch_size) - 1)
    return callbacks.TemperatureScheduler(
        start=1.0, growth=(QN_FINAL_TEMPERATURE - 1.0) / steps, cap=QN_FINAL_TEMPERATURE, per="step"
    )


def batch_step(model, x, y) -> Callable[[], Any]:
    """One `train_on_batch` step of a compiled model, returning the loss as a
    tensor (what `benchmark_overhead.time_interleaved` reads)."""
    import tensorflow as tf

    return lambda: tf.constant(model.train_on_batch(x, y, return_dict=True)["loss"])


def step_time_ratio(float_step, model, x, y, rounds: int = STEP_ROUNDS, steps: int = STEP_STEPS):
    """Median train-step time of the compiled `model` over that of `float_step`.

    Both run `train_on_batch` on the same batch, interleaved over `rounds`
    rounds of `steps` steps. The steps change the model's weights: call it
    after the export.
    """
    times = time_interleaved(
        {"float": float_step, "quantized": batch_step(model, x, y)},
        rounds,
        steps,
        warmup_steps=2,
        progress=lambda line: None,
    )
    summary = summarize(times, "float")["quantized"]
    return {
        "step_time_ratio": summary["ratio_to_float"],
        "step_ms": summary["median_step_ms"],
        "float_step_ms": statistics.median(times["wall_ms"]["float"]),
    }


# ---------------------------------------------------------------------------
# tensorflow-model-optimization baselines (separate processes)


def run_tfmot_baselines(
    dataset,
    output_dir: str,
    float_epochs: int,
    finetune_epochs: int,
    batch_size: int,
    seed: int,
    schemes: Sequence[tuple[int, int]] = TFMOT_SCHEMES,
    progress: Callable[[str], None] = log,
) -> list[dict[str, Any]]:
    """Runs `benchmarks.tfmot_export --model=small_cnn` once per (W, A) of
    `schemes` on the same arrays; returns one report per scheme.

    Each report has `status` "ok", "skipped" or "error" (with `reason`),
    `weight_bits`, `activation_bits`, `name` and the `baseline_command` (its
    `--data` is a temporary copy of the benchmark's split, removed afterwards).
    """
    skipped = baseline_skip_result()
    reports = []
    with tempfile.TemporaryDirectory(prefix="benchmark_results_") as directory:
        split_path = os.path.join(directory, "split.npz")
        if not skipped:
            arrays = ("x_train", "y_train", "x_test", "y_test")
            np.savez(split_path, **{key: getattr(dataset, key) for key in arrays})
        for weight_bits, activation_bits in schemes:
            name = f"tfmot_w{weight_bits}a{activation_bits}"
            command = [
                sys.executable,
                "-m",
                "benchmarks.tfmot_export",
                "--model=small_cnn",
                f"--data={split_path}",
                f"--output_dir={output_dir}",
                f"--float_epochs={float_epochs}",
                f"--finetune_epochs={finetune_epochs}",
                f"--batch_size={batch_size}",
                f"--float_learning_rate={FLOAT_LEARNING_RATE}",
                f"--finetune_learning_rate={FINETUNE_LEARNING_RATE}",
                f"--seed={seed}",
                f"--batchnorm_momentum={BATCHNORM_MOMENTUM}",
                f"--weight_bits={weight_bits}",
                f"--activation_bits={activation_bits}",
                f"--name={name}",
            ]
            shown = "TF_USE_LEGACY_KERAS=1 python " + shlex.join(command[1:])
            described = {
                "name": name,
                "weight_bits": weight_bits,
                "activation_bits": activation_bits,
                "baseline_command": shown,
            }
            if skipped:
                reports.append({**skipped, **described})
                continue
            progress(f"== {name}: tfmot QAT in a separate process")
            report_path = os.path.join(output_dir, name + ".json")
            if os.path.exists(report_path):
                os.remove(report_path)  # never read a previous run's result
            completed = subprocess.run(command, env=legacy_keras_environment(), check=False)
            if completed.returncode != 0 or not os.path.exists(report_path):
                reason = f"benchmarks.tfmot_export exited with status {completed.returncode}"
                reports.append({"status": "error", "reason": reason, **described})
                continue
            with open(report_path, encoding="utf-8") as stream:
                reports.append({**json.load(stream), **described})
    return reports


# ---------------------------------------------------------------------------
# The benchmark


def _error_row(row: dict[str, Any], stage: str, error: Exception) -> dict[str, Any]:
    message = f"{type(error).__name__} in {stage}: {error}".strip()
    row.update(status="error", error=message[:500])
    return row


def _quantized_row(
    method: str,
    bits: int,
    dataset,
    float_model,
    float_step,
    output_dir: str,
    finetune_epochs: int,
    batch_size: int,
    calibration_samples: int,
) -> tuple[dict[str, Any], list[dict[str, Any]] | None]:
    """Quantizes, fine-tunes, exports and times one scheme; returns its row
    and the recorded parameter history (None when not recorded)."""
    import tfquant
    from tfquant import lite

    name = scheme_name(method, bits)
    scheme, note = bench_scheme(method, bits)
    row: dict[str, Any] = {
        "name": name,
        "kind": "tfquant",
        "method": method,
        "weight_bits": bits,
        "activation_bits": bits,
        "status": "ok",
        "note": note,
    }
    stage = "quantize_model"
    recorder = None
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Statistics for quantized inputs were expected")
            start = time.perf_counter()
            qmodel = tfquant.quantize_model(
                float_model,
                scheme,
                calibration_data=dataset.x_train[:calibration_samples],
                calibration_samples=calibration_samples,
            )
            row["quantize_seconds"] = time.perf_counter() - start
            stage = "fine-tuning"
            recorder = parameter_recorder(qmodel)
            callbacks = [recorder]
            if method == "qn":
                callbacks.append(qn_temperature(len(dataset.x_train), batch_size, finetune_epochs))
            row["finetune_seconds"] = finetune(
                qmodel, dataset, finetune_epochs, batch_size, callbacks=callbacks
            )
            stage = "export without batch norm re-estimation"
            row["accuracy_before_bn_reestimation"] = tflite_accuracy_as_is(qmodel, dataset, bits)
            stage = "batch norm re-estimation"
            reestimation = tfquant.reestimate_batch_norm(
                qmodel, dataset.x_train[:BN_REESTIMATION_ROWS], batch_size=batch_size
            )
            row["bn_std_ratio"] = max(layer["std_ratio"] for layer in reestimation.values())
            stage = "export"
            start = time.perf_counter()
            result = export_row(qmodel, dataset, bits)
            path = os.path.join(output_dir, f"{name}.tflite")
            lite.save_export(result, path)
            verification = result.report["verification"]
            row.update(
                tflite=path,
                export_seconds=time.perf_counter() - start,
                keras_accuracy=verification.get("keras_accuracy"),
                tflite_accuracy=verification.get("tflite_accuracy"),
                top1_agreement=verification.get("top1_agreement"),
                identical_output_codes=verification.get("identical_output_codes"),
                size_kib=os.path.getsize(path) / 1024,
                weight_storage=sorted({w["storage"] for w in result.report["weights"]}),
            )
            stage = "step timing"
            x, y = dataset.x_train[:batch_size], dataset.y_train[:batch_size]
            row.update(step_time_ratio(float_step, qmodel, x, y))
    except Exception as error:  # noqa: BLE001 - one failing scheme must not end the run
        _error_row(row, stage, error)
    history = recorder.history if recorder is not None and recorder.history else None
    return row, history


def _float_row(float_model, dataset, output_dir: str, float_seconds: float) -> dict[str, Any]:
    from tfquant import lite
    from tfquant.lite import verify

    logits = float_model.predict(dataset.x_test, batch_size=256, verbose=0)
    path = os.path.join(output_dir, "float.tflite")
    lite.write_atomically(path, float_tflite(float_model))
    with open(path, "rb") as stream:
        outputs, _ = verify.run_tflite(stream.read(), dataset.x_test)
    return {
        "name": "float",
        "kind": "float",
        "method": "float",
        "weight_bits": 32,
        "activation_bits": 32,
        "status": "ok",
        "tflite": path,
        "keras_accuracy": float((logits.argmax(1) == dataset.y_test).mean()),
        "tflite_accuracy": float((outputs.argmax(1) == dataset.y_test).mean()),
        "top1_agreement": float((outputs.argmax(1) == logits.argmax(1)).mean()),
        "identical_output_codes": None,
        "size_kib": os.path.getsize(path) / 1024,
        "train_seconds": float_seconds,
        "step_time_ratio": 1.0,
    }


def _tfmot_row(report: dict[str, Any]) -> dict[str, Any]:
    eight_bit = (report["weight_bits"], report["activation_bits"]) == (8, 8)
    row = {
        "name": report["name"],
        "kind": "tfmot_int8" if eight_bit else "tfmot_nbit",
        "method": "tfmot",
        "weight_bits": report["weight_bits"],
        "activation_bits": report["activation_bits"],
        "status": report["status"],
        "baseline_command": report["baseline_command"],
    }
    if report["status"] != "ok":
        row["error"] = report.get("reason")
        return row
    row.update({key: report.get(key) for key in ("tflite", "finetune_seconds")})
    for key in ("keras_accuracy", "tflite_accuracy", "top1_agreement", "identical_output_codes"):
        row[key] = report.get(key)
    row["size_kib"] = report["size_bytes"] / 1024
    row["scheme"] = report.get("config", {}).get("scheme")
    return row


def run_benchmark(
    data: str = DEFAULT_DATA,
    methods: Sequence[str] = DEFAULT_METHODS,
    bits: Sequence[int] = DEFAULT_BITS,
    float_epochs: int = FULL_BUDGET["float_epochs"],
    finetune_epochs: int = FULL_BUDGET["finetune_epochs"],
    runs: int = FULL_BUDGET["runs"],
    output_dir: str = "benchmark_results_output",
    tfmot: bool = True,
    warmup: int = 20,
    threads: Sequence[int] = (1, 2),
    batch_size: int = BATCH_SIZE,
    seed: int = 0,
    train_samples: int | None = None,
    test_samples: int | None = None,
    calibration_samples: int = CALIBRATION_SAMPLES,
    command: str = "python -m benchmarks.results",
    progress: Callable[[str], None] = log,
) -> dict[str, Any]:
    """Runs the benchmark; returns the result as a JSON-ready dict.

    Args:
      data: a `tfquant.datasets` spec.
      methods, bits: every `METHOD_wBaB` combination is measured.
      float_epochs, finetune_epochs: training budget (tfmot uses the same).
      runs, warmup, threads: latency benchmark settings.
      output_dir: where the .tflite files go.
      tfmot: also run the tensorflow-model-optimization baselines.
      batch_size, seed: training batch size and the seed of everything.
      train_samples, test_samples: keep only the first rows.
      calibration_samples: training rows that initialize the quantizers.
      command: the command line recorded with every row.
      progress: called with each line of progress text.

    Returns:
      A dict with `config`, `rows` (float, each scheme, the tfmot
      baselines), `parameter_history` (per W4A4 scheme), `latency` and
      `runtime_seconds`.
    """
    methods, bits, threads = check_config(
        methods, bits, float_epochs, finetune_epochs, runs, threads
    )
    import keras
    import tensorflow as tf

    from tfquant.lite import benchmark
    from train import models

    started = time.perf_counter()
    os.makedirs(output_dir, exist_ok=True)
    dataset = load_split(data, train_samples, test_samples)
    progress(
        f"== data {dataset.name}: {len(dataset.x_train)} training rows, {len(dataset.x_test)} "
        f"held-out rows; seed {seed}"
    )
    keras.utils.set_random_seed(seed)
    progress(f"== float small CNN: {float_epochs} epochs, Adam({FLOAT_LEARNING_RATE:g})")
    float_model = set_batchnorm_momentum(models.small_cnn(dataset.input_shape, dataset.num_classes))
    float_seconds = fit(float_model, dataset, float_epochs, FLOAT_LEARNING_RATE, batch_size)
    float_row = _float_row(float_model, dataset, output_dir, float_seconds)
    progress(
        f"== float: Keras {100 * float_row['keras_accuracy']:.2f}%, TFLite fp32 "
        f"{100 * float_row['tflite_accuracy']:.2f}% ({float_seconds:.0f} s)"
    )
    timing_model = compile_for_finetuning(keras.models.clone_model(float_model))
    float_step = batch_step(
        timing_model, dataset.x_train[:batch_size], dataset.y_train[:batch_size]
    )

    rows = [float_row]
    histories: dict[str, Any] = {}
    for method in methods:
        for width in bits:
            name = scheme_name(method, width)
            keras.utils.set_random_seed(seed)
            progress(f"== {name}: quantize_model, {finetune_epochs} epochs of fine-tuning, export")
            row, history = _quantized_row(
                method,
                width,
                dataset,
                float_model,
                float_step,
                output_dir,
                finetune_epochs,
                batch_size,
                calibration_samples,
            )
            if history is not None and width == HISTORY_BITS:
                histories[name] = history
            rows.append(row)
            if row["status"] == "ok":
                progress(
                    f"== {name}: Keras {100 * row['keras_accuracy']:.2f}%, TFLite "
                    f"{100 * row['tflite_accuracy']:.2f}%, agreement "
                    f"{100 * row['top1_agreement']:.2f}%, {row['size_kib']:.1f} KiB, "
                    f"fine-tuning {row['finetune_seconds']:.0f} s, step x"
                    f"{row['step_time_ratio']:.2f}"
                )
            else:
                progress(f"== {name}: {row['status']}: {row['error']}")

    tfmot_status: dict[str, Any] = {"status": "disabled"}
    if tfmot:
        reports = run_tfmot_baselines(
            dataset, output_dir, float_epochs, finetune_epochs, batch_size, seed, progress=progress
        )
        for report in reports:
            row = _tfmot_row(report)
            rows.append(row)
            if row["status"] != "ok":
                progress(f"== {row['name']}: {row['status']}: {row['error']}")
        failed = [r["status"] for r in reports if r["status"] != "ok"]
        tfmot_status = {"status": failed[0] if failed else "ok", "reports": reports}

    for row in rows:
        row.update(command=command, seed=seed)
    timed = [row for row in rows if row.get("tflite") and row["status"] == "ok"]
    progress(
        f"== latency: {len(timed)} files, threads {threads}, {runs} timed runs each (interleaved)"
    )
    timings = benchmark.benchmark_models(
        [row["tflite"] for row in timed], threads=threads, runs=runs, warmup=warmup
    )
    add_latency(timed, timings)
    return {
        "config": {
            "data": data,
            "dataset": dataset.name,
            "train_rows": len(dataset.x_train),
            "test_rows": len(dataset.x_test),
            "model": "small_cnn",
            "methods": methods,
            "bits": bits,
            "float_epochs": float_epochs,
            "finetune_epochs": finetune_epochs,
            "batch_size": batch_size,
            "optimizer": "Adam",
            "batchnorm_momentum": BATCHNORM_MOMENTUM,
            "float_learning_rate": FLOAT_LEARNING_RATE,
            "finetune_learning_rate": FINETUNE_LEARNING_RATE,
            "calibration_samples": calibration_samples,
            "bn_reestimation_rows": min(BN_REESTIMATION_ROWS, len(dataset.x_train)),
            "seed": seed,
            "tfmot": tfmot,
            "runs": runs,
            "warmup": warmup,
            "threads": threads,
            "step_timing": f"train_on_batch, {STEP_ROUNDS} interleaved rounds x {STEP_STEPS} "
            f"steps, batch {batch_size}",
            "command": command,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine_description(),
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "ai_edge_litert": benchmark.runtime_version(),
            "python": platform.python_version(),
        },
        "rows": rows,
        "parameter_history": histories,
        "tfmot": tfmot_status,
        "latency": timings,
        "runtime_seconds": time.perf_counter() - started,
    }


def machine_description() -> str:
    processor = platform.processor() or platform.machine() or "unknown processor"
    return f"{processor}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}"


# ---------------------------------------------------------------------------
# Output


def format_table(result: dict[str, Any]) -> str:
    """The results as a markdown table, one line per row (errors and skips included)."""
    threads = [str(t) for t in result["config"]["threads"]]
    header = ["method", "W/A bits", "Keras acc", "TFLite acc", "agreement", "identical codes"]
    header += ["size KiB", *(f"latency {t}T us" for t in threads), "step time vs float", "notes"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in result["rows"]:
        bits = f"W{row['weight_bits']}A{row['activation_bits']}"
        if row["kind"] == "float":
            bits = "float"
        latency = row.get("latency", {})
        ratio = row.get("step_time_ratio")
        note = row.get("note") or ""
        if row["status"] != "ok":
            note = f"{row['status']}: {row.get('error') or ''}"
        cells = [
            row["method"],
            bits,
            _percent(row.get("keras_accuracy")),
            _percent(row.get("tflite_accuracy")),
            _percent(row.get("top1_agreement")),
            _percent(row.get("identical_output_codes")),
            _number(row.get("size_kib"), 1),
            *(_number(latency.get(t, {}).get("median_us"), 1) for t in threads),
            "-" if ratio is None else f"{ratio:.2f}x",
            note.replace("|", "/").replace("\n", " "),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_markdown(
    result: dict[str, Any], images: dict[str, str] | None = None, markdown_path: str = "."
) -> str:
    """The whole results page: table, how it was made, plots, paper figures.

    Args:
      result: what `run_benchmark` returns.
      images: plot title -> image path (as `benchmarks.plots.write_plots` returns).
      markdown_path: where the page goes; image links are relative to it.
    """
    config = result["config"]
    minutes = result.get("runtime_seconds", 0.0) / 60
    lines = [
        "# Results",
        "",
        "Written by `python -m benchmarks.results` (`make bench`); do not edit by hand.",
        "",
        f"Small CNN on {config['dataset']} ({config['train_rows']} training rows, "
        f"{config['test_rows']} held-out rows). Accuracy, agreement and identical output codes on "
        "the held-out rows; agreement is TFLite vs Keras top-1. Latency: median of "
        f"{config['runs']} interleaved invokes per file on this host. Step time: "
        f"{config['step_timing']}, as a ratio to the float model. tfmot rows: "
        "tensorflow-model-optimization QAT (default 8-bit, experimental n-bit at W4A8) "
        "converted to full int8 by the standard converter.",
        "",
        format_table(result),
        "",
        "## How this was made",
        "",
        f"- Command: `{config['command']}`",
        f"- Seed: {config['seed']}",
        f"- Date: {config['date']}",
        f"- Machine: {config['machine']}; TensorFlow {config['tensorflow']}, "
        f"Keras {config['keras']}, Python {config['python']}",
        f"- Budget: float {config['float_epochs']} epochs (Adam {config['float_learning_rate']:g}),"
        f" fine-tuning {config['finetune_epochs']} epochs (Adam "
        f"{config['finetune_learning_rate']:g}), batch {config['batch_size']}, BatchNormalization "
        f"momentum {config.get('batchnorm_momentum', 0.99):g}, calibration on "
        f"{config['calibration_samples']} training rows, BatchNormalization statistics "
        f"re-estimated after fine-tuning on {config.get('bn_reestimation_rows', 0)} training rows "
        f"(tfquant rows; `tfquant.reestimate_batch_norm`), methods {', '.join(config['methods'])} "
        f"at {', '.join(map(str, config['bits']))} bits; total {minutes:.1f} min",
    ]
    moved = [
        f"{row['name']} {100 * row['accuracy_before_bn_reestimation']:.2f}%"
        for row in result["rows"]
        if row.get("tflite_accuracy") is not None
        and row.get("accuracy_before_bn_reestimation") is not None
        and abs(row["tflite_accuracy"] - row["accuracy_before_bn_reestimation"]) >= 0.01
    ]
    if moved:
        lines.append(
            "- TFLite accuracy without the re-estimation, where it differs by a point or more: "
            + ", ".join(moved)
        )
    tfmot = result.get("tfmot", {})
    if tfmot.get("status") == "disabled":
        lines.append("- tfmot baselines: not run")
    errors = [row for row in result["rows"] if row["status"] != "ok"]
    if errors:
        lines += ["", "## Errors and skipped rows", ""]
        lines += [f"- {row['name']}: {row['status']}: {row.get('error')}" for row in errors]
    if images:
        lines += ["", "## Plots", ""]
        base = os.path.dirname(os.path.abspath(markdown_path))
        for title, path in images.items():
            link = os.path.relpath(os.path.abspath(path), base).replace(os.sep, "/")
            lines += [f"![{title}]({link})", ""]
        lines.pop()
    lines += ["", "## Paper figures we scale down from", "", *paper_section(result), ""]
    return "\n".join(lines)


def write_outputs(
    result: dict[str, Any], output_dir: str, results_md: str, image_dir: str
) -> dict[str, str]:
    """Writes the plots, `results.json` and the markdown page; returns their paths."""
    from benchmarks import plots
    from tfquant import fileio

    images = plots.write_plots(result, image_dir)
    result["images"] = images
    histories = {}
    for scheme, history in result.get("parameter_history", {}).items():
        histories[scheme] = os.path.join(output_dir, f"parameters_{scheme}.json")
        fileio.write_atomically(
            histories[scheme], json.dumps(history, indent=1) + "\n", make_directory=True
        )
    json_path = os.path.join(output_dir, RESULT_NAME)
    fileio.write_atomically(json_path, json.dumps(result, indent=2) + "\n", make_directory=True)
    fileio.write_atomically(
        results_md, format_markdown(result, images, results_md), make_directory=True
    )
    return {"json": json_path, "markdown": results_md, **histories, **images}


# ---------------------------------------------------------------------------
# The binary


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines the binary's flags (only when run as a program, or by tests on
    their own `FlagValues`)."""
    flags.DEFINE_string(
        "data", DEFAULT_DATA, "Dataset spec (see tfquant.datasets).", flag_values=flag_values
    )
    flags.DEFINE_list(
        "methods",
        None,
        f"Quantizer methods (default {','.join(DEFAULT_METHODS)}; --quick "
        f"{','.join(QUICK_BUDGET['methods'])}).",
        flag_values=flag_values,
    )
    flags.DEFINE_list(
        "bits",
        None,
        f"Weight and activation widths, each 2..8 (default "
        f"{','.join(map(str, DEFAULT_BITS))}; --quick 4).",
        flag_values=flag_values,
    )
    for name, text in (
        ("float_epochs", "Float training epochs"),
        ("finetune_epochs", "Fine-tuning epochs per scheme and for tfmot QAT"),
        ("runs", "Timed invokes per file and thread count"),
    ):
        flags.DEFINE_integer(
            name,
            None,
            f"{text} (default {FULL_BUDGET[name]}, --quick {QUICK_BUDGET[name]}).",
            flag_values=flag_values,
        )
    flags.DEFINE_integer(
        "train_samples", None, "Keep only the first training rows.", flag_values=flag_values
    )
    flags.DEFINE_integer(
        "test_samples", None, "Keep only the first held-out rows.", flag_values=flag_values
    )
    flags.DEFINE_bool(
        "tfmot",
        None,
        "Also run the tensorflow-model-optimization baselines in a separate process (needs "
        f"`{BASELINE_INSTALL_HINT}`; default on, off under --quick).",
        flag_values=flag_values,
    )
    flags.DEFINE_integer("warmup", 20, "Untimed invokes before timing.", flag_values=flag_values)
    flags.DEFINE_list(
        "threads", ["1", "2"], "Interpreter thread counts for latency.", flag_values=flag_values
    )
    flags.DEFINE_integer("batch_size", BATCH_SIZE, "Training batch size.", flag_values=flag_values)
    flags.DEFINE_integer(
        "seed", 0, "Seed of weights, data order and inputs.", flag_values=flag_values
    )
    flags.DEFINE_string(
        "output_dir",
        "benchmark_results_output",
        "Where .tflite files and results.json go.",
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "results_md", "docs/RESULTS.md", "Where the markdown page goes.", flag_values=flag_values
    )
    flags.DEFINE_string("image_dir", "docs/img", "Where the plots go.", flag_values=flag_values)
    flags.DEFINE_bool("quick", False, "A tiny budget, for a smoke run.", flag_values=flag_values)


def settings_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> dict[str, Any]:
    """`run_benchmark` keyword arguments from parsed flags, budget defaults
    filled in and every value checked.

    Raises:
      app.UsageError: naming the bad flag value.
    """
    quick = flag_values.quick
    defaults = dict(FULL_BUDGET, methods=list(DEFAULT_METHODS), bits=list(DEFAULT_BITS))
    defaults.update(train_samples=None, test_samples=None, tfmot=True)
    if quick:
        defaults.update(QUICK_BUDGET)
    settings = {
        name: default if getattr(flag_values, name) is None else getattr(flag_values, name)
        for name, default in defaults.items()
    }
    try:
        settings["methods"], settings["bits"], threads = check_config(
            settings["methods"],
            settings["bits"],
            settings["float_epochs"],
            settings["finetune_epochs"],
            settings["runs"],
            flag_values.threads,
        )
        for name in ("train_samples", "test_samples"):
            if settings[name] is not None and settings[name] < 1:
                raise ValueError(f"--{name} must be >= 1, got {settings[name]}")
        if flag_values.batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {flag_values.batch_size}")
        if flag_values.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {flag_values.warmup}")
    except ValueError as error:
        raise app.UsageError(str(error)) from None
    settings.update(
        data=flag_values.data,
        output_dir=flag_values.output_dir,
        warmup=flag_values.warmup,
        threads=threads,
        batch_size=flag_values.batch_size,
        seed=flag_values.seed,
    )
    return settings


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    flag_values = flags.FLAGS
    settings = settings_from_flags(flag_values)
    command = shlex.join(["python", "-m", "benchmarks.results", *sys.argv[1:]])
    result = run_benchmark(command=command, **settings)
    paths = write_outputs(
        result, flag_values.output_dir, flag_values.results_md, flag_values.image_dir
    )
    log("\n" + format_table(result))
    for row in result["rows"]:
        if row["status"] != "ok":
            log(f"{row['name']} {row['status']}: {row.get('error')}")
    failed = [row for row in result["rows"] if row["status"] == "error"]  # not "skipped"
    log(f"wrote {', '.join(paths.values())} (total {result['runtime_seconds'] / 60:.1f} min)")
    if failed:  # the page is written with what there is; the run still fails
        log(f"failed rows: {', '.join(row['name'] for row in failed)}")
        sys.exit(1)


if __name__ == "__main__":
    define_flags()
    app.run(main)
