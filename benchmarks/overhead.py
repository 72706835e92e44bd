"""Training-step overhead of quantization-aware training, as a ratio to float.

    python -m benchmarks.overhead [--steps=10] [--rounds=5] [--batch_size=128]
        [--methods=qil_w4a4,lsq_w4a4,...] [--tfmot] [--qn_temperature=T]
        [--output=benchmark_overhead.json]

Times steady-state training steps of ResNet-20 (32x32x3 input, 10 classes,
random data, SGD with momentum 0.9, one `tf.function` step with
`tf.GradientTape`) in float and quantized with each scheme of `--methods`
through `tfquant.quantize_model`. The variants run in one process and are
interleaved: each round times `--steps` steps of every variant in turn (one
untimed step first, the order rotating from round to round), so that load
from other processes on a shared machine falls on all of them alike. A
variant's figure is the median over rounds of its mean step time, and its
ratio is that median over the float median of the same run.

With `--tfmot` (the default), tensorflow-model-optimization's default 8-bit
QAT of the same architecture is measured the same way in a separate process
(`benchmarks.tfmot_steps`, under `TF_USE_LEGACY_KERAS=1` with tf_keras),
against its own tf_keras float model. It needs `pip install -e .[baseline]`;
without it that row is skipped.

Prints a table (variant, median step ms, spread over rounds, ratio to float,
the same ratio in process CPU time, which other processes on the machine
disturb less, and the method's target) and writes everything, per-round
times included, to `--output` as JSON.

Quantization Networks quantizers run at `--qn_temperature` (default: their
initial T = 1). Their cost depends on T: while T times half the spread of
the thresholds stays within 70 all thresholds share one exp per element, above
it each has its own (see `tfquant.quantizers.qnet`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from absl import app, flags

from tfquant.fileio import write_atomically

INPUT_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
LEARNING_RATE = 0.01
MOMENTUM = 0.9
CALIBRATION_SAMPLES = 256
TARGET_RATIO = 1.25  # the default target: QIL, LSQ, PACT, min/max, DQ
# Method-specific targets: QN with 7 levels (3-bit), CPQ at 4 bits.
METHOD_TARGETS = {"qn": 1.4, "cpq": 2.0}
DEFAULT_METHODS = ("qil_w4a4", "lsq_w4a4", "pact_w4a4", "dq_w4a4", "qn_w3a3", "cpq_w4a4")
BASELINE_INSTALL_HINT = "pip install -e .[baseline]"
_BASELINE_MODULES = ("tf_keras", "tensorflow_model_optimization")


def log(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------------------
# Framework-neutral timing (shared with benchmarks.tfmot_steps)


def time_interleaved(
    step_functions: dict[str, Callable[[], Any]],
    rounds: int,
    steps: int,
    warmup_steps: int = 3,
    progress: Callable[[str], None] = log,
) -> dict[str, dict[str, list[float]]]:
    """Times training steps of several variants, interleaved.

    Each function runs one training step and returns a tensor (the loss);
    reading it with `.numpy()` waits for the step to finish. Every variant
    first runs `warmup_steps` steps (the first one traces the graph). Then
    each of `rounds` rounds runs every variant in turn, in an order rotated
    by one per round: one untimed step, then `steps` timed steps.

    Args:
      step_functions: variant name -> a callable running one step.
      rounds: number of rounds (>= 1).
      steps: timed steps per variant per round (>= 1).
      warmup_steps: untimed steps per variant before the first round (>= 1).
      progress: called with one line of progress text at a time.

    Returns:
      `{"wall_ms": {variant: [...]}, "cpu_ms": {variant: [...]}}`: the mean
      wall-clock and process CPU milliseconds per step in each round, in
      round order. CPU time (all threads) is less sensitive than wall time
      to other processes taking turns on the cores.
    """
    if rounds < 1 or steps < 1 or warmup_steps < 1:
        raise ValueError(
            f"rounds, steps and warmup_steps must be >= 1, got {rounds}, {steps}, {warmup_steps}"
        )
    names = list(step_functions)
    for name in names:
        start = time.perf_counter()
        for _ in range(warmup_steps):
            loss = step_functions[name]()
        loss = float(loss.numpy())
        progress(
            f"  warm-up {name}: {warmup_steps} steps in {time.perf_counter() - start:.1f} s "
            f"(loss {loss:.3f})"
        )
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            step = step_functions[name]
            step().numpy()
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(steps):
                loss = step()
            loss.numpy()
            wall[name].append(1000.0 * (time.perf_counter() - start) / steps)
            cpu[name].append(1000.0 * (time.process_time() - start_cpu) / steps)
        progress(
            f"  round {index + 1}/{rounds}: "
            + ", ".join(f"{name} {wall[name][-1]:.1f} ms" for name in names)
        )
    return {"wall_ms": wall, "cpu_ms": cpu}


def summarize(times: dict[str, dict[str, list[float]]], baseline: str) -> dict[str, dict[str, Any]]:
    """Median step time per variant and its ratio to the baseline variant.

    Args:
      times: what `time_interleaved` returns.
      baseline: the variant the ratios divide by.

    Returns:
      Variant name -> `median_step_ms`, `min_step_ms`, `max_step_ms`,
      `round_step_ms` (wall clock), `ratio_to_float` (median / baseline
      median), `paired_ratio` (median over rounds of the per-round ratio: a
      check, both agree when the machine was quiet), `cpu_median_step_ms`,
      `cpu_round_step_ms` and `cpu_ratio_to_float` (the same for process CPU
      time).
    """
    wall, cpu = times["wall_ms"], times["cpu_ms"]
    if baseline not in wall:
        raise ValueError(f"baseline {baseline!r} was not timed; timed: {sorted(wall)}")
    base, base_cpu = wall[baseline], cpu[baseline]
    out = {}
    for name, values in wall.items():
        median = statistics.median(values)
        out[name] = {
            "median_step_ms": median,
            "min_step_ms": min(values),
            "max_step_ms": max(values),
            "round_step_ms": list(values),
            "ratio_to_float": median / statistics.median(base),
            "paired_ratio": statistics.median(v / b for v, b in zip(values, base, strict=True)),
            "cpu_median_step_ms": statistics.median(cpu[name]),
            "cpu_round_step_ms": list(cpu[name]),
            "cpu_ratio_to_float": statistics.median(cpu[name]) / statistics.median(base_cpu),
        }
    return out


# ---------------------------------------------------------------------------
# Keras 3 variants (this process)


def make_train_step(model, optimizer, loss_fn, x, y) -> Callable[[], Any]:
    """A callable running one training step of `model` on the batch (x, y)."""
    import tensorflow as tf

    variables = model.trainable_variables
    optimizer.build(variables)

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        optimizer.apply(tape.gradient(loss, variables), variables)
        return loss

    return lambda: train_step(x, y)


def random_batch(batch_size: int, seed: int, input_shape=INPUT_SHAPE, num_classes=NUM_CLASSES):
    """Images uniform in [0, 1) and uniform labels, as NumPy arrays."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.random((batch_size, *input_shape), dtype=np.float32)
    y = rng.integers(0, num_classes, size=(batch_size,)).astype(np.int32)
    return x, y


def check_methods(methods: Sequence[str]) -> list[str]:
    """Validates scheme names (anything `tfquant.Scheme.from_any` accepts)."""
    from tfquant.schemes import Scheme

    methods = [m.strip() for m in methods if m.strip()]
    if "float" in methods:
        raise ValueError("'float' is always measured; --methods lists quantization schemes")
    if len(set(methods)) != len(methods):
        raise ValueError(f"--methods lists a scheme twice: {methods}")
    for method in methods:
        Scheme.from_any(method)  # raises ValueError naming the bad scheme
    return methods


def time_keras3_variants(
    methods: Sequence[str],
    steps: int,
    rounds: int,
    batch_size: int,
    warmup_steps: int,
    seed: int,
    calibrate: bool = True,
    qn_temperature: float | None = None,
) -> tuple[dict[str, dict[str, list[float]]], dict[str, dict[str, Any]]]:
    """Builds float ResNet-20 and its quantized twins, times them interleaved.

    With `calibrate`, `quantize_model` initializes the activation quantizers
    from a random calibration batch (one to a few minutes per scheme on two
    CPU cores); without it they keep their default ranges, which changes no
    step's work.

    Returns:
      (what `time_interleaved` returns, a description of each variant).
    """
    import keras
    import tensorflow as tf

    import tfquant
    from tfquant.quantizers.qnet import qn_quantizers
    from train import models

    keras.utils.set_random_seed(seed)
    x, y = random_batch(batch_size, seed)
    calibration, _ = random_batch(CALIBRATION_SAMPLES, seed + 1)
    x, y = tf.constant(x), tf.constant(y)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    float_model = models.resnet20(INPUT_SHAPE, NUM_CLASSES)
    built = {"float": float_model}
    for method in methods:
        log(
            f"  quantize_model(resnet20, {method!r})"
            + (f", calibrating on {len(calibration)} random images" if calibrate else "")
        )
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "quantize_model got no calibration_data")
            built[method] = tfquant.quantize_model(
                float_model,
                method,
                calibration_data=calibration if calibrate else None,
                calibration_samples=len(calibration),
            )
        log(f"  quantized with {method} in {time.perf_counter() - start:.1f} s")
        if qn_temperature is not None:
            found = qn_quantizers(built[method])
            for quantizer, _ in found:
                quantizer.temperature.assign(qn_temperature)
            if found:
                log(f"  {len(found)} QN quantizers of {method} at temperature {qn_temperature:g}")

    step_functions, info = {}, {}
    for name, model in built.items():
        optimizer = keras.optimizers.SGD(LEARNING_RATE, momentum=MOMENTUM)
        step_functions[name] = make_train_step(model, optimizer, loss_fn, x, y)
        info[name] = {
            "framework": f"keras {keras.__version__}",
            "scheme": None if name == "float" else tfquant.Scheme.from_any(name).to_dict(),
            "trainable_weights": int(sum(int(tf.size(v)) for v in model.trainable_variables)),
            "layers": len(model.layers),
        }
    return time_interleaved(step_functions, rounds, steps, warmup_steps), info


# ---------------------------------------------------------------------------
# tensorflow-model-optimization baseline (separate process)


def missing_baseline_modules() -> list[str]:
    """The baseline's modules that cannot be found (without importing them:
    importing tensorflow_model_optimization sets TF_USE_LEGACY_KERAS)."""
    return [name for name in _BASELINE_MODULES if importlib.util.find_spec(name) is None]


def baseline_skip_result() -> dict | None:
    """A "skipped" result naming the missing baseline modules, or None."""
    missing = missing_baseline_modules()
    if not missing:
        return None
    return {
        "status": "skipped",
        "reason": f"{', '.join(missing)} not installed; install with `{BASELINE_INSTALL_HINT}`",
    }


def legacy_keras_environment() -> dict[str, str]:
    """The environment of a baseline subprocess: legacy Keras, and this
    repository on PYTHONPATH so `python -m benchmarks...` finds its modules."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def run_tfmot_process(steps: int, rounds: int, batch_size: int, warmup_steps: int, seed: int):
    """Runs `benchmarks.tfmot_steps` in a subprocess; returns its JSON result.

    The result has `status` "ok" (with `variants`), "skipped" (with `reason`)
    or "error" (with `reason`).
    """
    skipped = baseline_skip_result()
    if skipped:
        return skipped
    env = legacy_keras_environment()
    handle, result_path = tempfile.mkstemp(prefix="tfmot_step_timer_", suffix=".json")
    os.close(handle)
    command = [
        sys.executable,
        "-m",
        "benchmarks.tfmot_steps",
        f"--steps={steps}",
        f"--rounds={rounds}",
        f"--batch_size={batch_size}",
        f"--warmup_steps={warmup_steps}",
        f"--seed={seed}",
        f"--output={result_path}",
    ]
    try:
        completed = subprocess.run(command, env=env, check=False)
        if completed.returncode != 0:
            return {
                "status": "error",
                "reason": f"{' '.join(command[1:3])} exited with status {completed.returncode}",
            }
        with open(result_path, encoding="utf-8") as f:
            return json.load(f)
    finally:
        os.remove(result_path)


# ---------------------------------------------------------------------------
# The benchmark


def run_benchmark(
    methods: Sequence[str] = DEFAULT_METHODS,
    steps: int = 10,
    rounds: int = 5,
    batch_size: int = 128,
    warmup_steps: int = 3,
    tfmot: bool = True,
    seed: int = 0,
    calibrate: bool = True,
    qn_temperature: float | None = None,
) -> dict[str, Any]:
    """Runs the benchmark; returns the result as a JSON-ready dict.

    Args:
      methods: scheme names for `tfquant.quantize_model` (anything
        `tfquant.Scheme.from_any` accepts); float is always timed.
      steps, rounds, warmup_steps: see `time_interleaved`.
      batch_size: images per training step.
      tfmot: also time tensorflow-model-optimization's 8-bit QAT (in a
        subprocess; skipped with a message when it is not installed).
      seed: seed of the weights and the random data.
      calibrate: calibrate the activation quantizers (see
        `time_keras3_variants`); tests turn it off to save minutes.
      qn_temperature: the temperature of every Quantization Networks
        quantizer (None: their initial 1). Its cost depends on it: see
        `tfquant.quantizers.qnet`.

    The dict holds `config`, `rows` (one per table row: `variant`, `process`,
    `median_step_ms`, `ratio_to_float`, per-round times ...) and `tfmot`
    (its status, and the reason when it was skipped or failed).
    """
    methods = check_methods(methods)
    for name, value in (("steps", steps), ("rounds", rounds), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    import keras
    import tensorflow as tf

    log(
        f"== ResNet-20 {'x'.join(map(str, INPUT_SHAPE))}, batch {batch_size}: float and "
        f"{', '.join(methods) or 'no scheme'}, {rounds} rounds x {steps} steps, interleaved"
    )
    if qn_temperature is not None and not qn_temperature > 0:
        raise ValueError(f"qn_temperature must be > 0, got {qn_temperature}")
    times, info = time_keras3_variants(
        methods, steps, rounds, batch_size, warmup_steps, seed, calibrate, qn_temperature
    )
    rows = []
    for name, summary in summarize(times, "float").items():
        rows.append({"variant": name, "process": "keras3", **info[name], **summary})

    tfmot_result: dict[str, Any] = {"status": "disabled"}
    if tfmot:
        log("== tensorflow-model-optimization 8-bit QAT (tf_keras), in a separate process")
        tfmot_result = run_tfmot_process(steps, rounds, batch_size, warmup_steps, seed)
        if tfmot_result["status"] == "ok":
            for name, summary in summarize(tfmot_result.pop("times"), "float").items():
                variant = "tf_keras float" if name == "float" else name
                rows.append(
                    {
                        "variant": variant,
                        "process": "tf_keras",
                        **tfmot_result["variants"][name],
                        **summary,
                    }
                )
        else:
            log(f"  tfmot baseline {tfmot_result['status']}: {tfmot_result['reason']}")

    return {
        "config": {
            "model": "resnet20",
            "input_shape": list(INPUT_SHAPE),
            "num_classes": NUM_CLASSES,
            "batch_size": batch_size,
            "steps": steps,
            "rounds": rounds,
            "warmup_steps": warmup_steps,
            "seed": seed,
            "methods": methods,
            "calibrated": calibrate,
            "qn_temperature": 1.0 if qn_temperature is None else qn_temperature,
            "optimizer": f"SGD(learning_rate={LEARNING_RATE}, momentum={MOMENTUM})",
            "data": "random, one fixed batch",
            "statistic": "median over rounds of the mean step time in the round",
            "target_ratio": TARGET_RATIO,
            "method_targets": dict(METHOD_TARGETS),
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
        },
        "rows": rows,
        "tfmot": tfmot_result,
    }


def target_of(variant: str) -> float | None:
    """The step-time target of a Keras 3 variant (None for float and tf_keras rows)."""
    if variant == "float" or variant.startswith("tf_keras") or variant.startswith("tfmot"):
        return None
    return METHOD_TARGETS.get(variant.split("_")[0], TARGET_RATIO)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The printed table: one line per variant, a blank line between processes."""
    header = (
        f"{'variant':<18} {'median step ms':>14} {'min..max ms':>16} {'ratio to float':>14} "
        f"{'CPU-time ratio':>14} {'target':>8}"
    )
    lines = [header, "-" * len(header)]
    process = None
    for row in rows:
        if process is not None and row["process"] != process:
            lines.append("")
        process = row["process"]
        spread = f"{row['min_step_ms']:.0f}..{row['max_step_ms']:.0f}"
        target = target_of(row["variant"]) if row["process"] == "keras3" else None
        lines.append(
            f"{row['variant']:<18} {row['median_step_ms']:>14.1f} {spread:>16} "
            f"{row['ratio_to_float']:>13.2f}x {row['cpu_ratio_to_float']:>13.2f}x "
            f"{'' if target is None else f'<= {target:.2f}x':>8}"
        )
    return "\n".join(lines)


def write_json_atomically(data: Any, path: str) -> None:
    """Writes JSON to a temporary file next to `path`, then renames it over `path`."""
    write_atomically(path, json.dumps(data, indent=2) + "\n", make_directory=True)


def _define_flags():
    # Defined only when run as a binary: benchmarks.tfmot_steps imports the
    # timing functions above and defines flags of the same names.
    flags.DEFINE_integer("steps", 10, "Timed steps per variant per round.", lower_bound=1)
    flags.DEFINE_integer(
        "rounds", 5, "Interleaved rounds; the median is over rounds.", lower_bound=1
    )
    flags.DEFINE_integer("batch_size", 128, "Batch size.", lower_bound=1)
    flags.DEFINE_integer(
        "warmup_steps", 3, "Untimed steps per variant before the first round.", lower_bound=1
    )
    flags.DEFINE_list(
        "methods",
        list(DEFAULT_METHODS),
        "Schemes to time against float: any name tfquant.Scheme.from_any accepts (METHOD_wWaA).",
    )
    flags.DEFINE_bool(
        "tfmot",
        True,
        "Also time tensorflow-model-optimization's 8-bit QAT in a separate process "
        f"(needs `{BASELINE_INSTALL_HINT}`).",
    )
    flags.DEFINE_integer("seed", 0, "Random seed for the weights and the data.")
    flags.DEFINE_float(
        "qn_temperature",
        None,
        "Temperature of every Quantization Networks quantizer while timing (default: the "
        "initial 1). Above T * (threshold spread) / 2 = 70 each threshold needs its own exp.",
        lower_bound=1e-6,
    )
    flags.DEFINE_string("output", "benchmark_overhead.json", "Where the JSON result goes.")


def main(argv):
    del argv
    flag_values = flags.FLAGS
    try:
        methods = check_methods(flag_values.methods)
    except ValueError as error:
        raise app.UsageError(f"--methods: {error}") from None
    result = run_benchmark(
        methods=methods,
        steps=flag_values.steps,
        rounds=flag_values.rounds,
        batch_size=flag_values.batch_size,
        warmup_steps=flag_values.warmup_steps,
        tfmot=flag_values.tfmot,
        seed=flag_values.seed,
        qn_temperature=flag_values.qn_temperature,
    )
    log("\n" + format_table(result["rows"]))
    status = result["tfmot"]["status"]
    if status in ("skipped", "error"):
        log(f"tfmot 8-bit QAT row {status}: {result['tfmot']['reason']}")
    log("Ratios are to the float model of the same process.")
    write_json_atomically(result, flag_values.output)
    log(f"wrote {flag_values.output}")
    if status == "error":
        sys.exit(1)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
