"""The demo: float CNN -> QIL, LSQ, QN, DQ and CPQ at W4A4 with model.fit, on scikit-learn's
bundled digits (no download), each exported to a verified integer TFLite file.

    python -m train.demo [--float_epochs=30] [--finetune_epochs=10] [--output_dir=DIR]

Prints Keras progress, then a table: method, bits, Keras and TFLite test
accuracy, TFLite/Keras top-1 agreement, file size, training time.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags

_FLOAT_EPOCHS = flags.DEFINE_integer("float_epochs", 30, "Epochs of float training.", lower_bound=1)
_FINETUNE_EPOCHS = flags.DEFINE_integer(
    "finetune_epochs", 10, "Epochs of quantization-aware fine-tuning per method.", lower_bound=1
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Batch size.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "demo_output", "Where models and the table go.")
_VERIFY_ARM64 = flags.DEFINE_enum(
    "verify_arm64",
    "auto",
    ["auto", "yes", "no"],
    "Also verify each file on arm64 kernels (emulated; `make arm64` builds them once): "
    "auto does where they are built.",
)
_METHODS = flags.DEFINE_list(
    "methods",
    ["qil_w4a4", "lsq_w4a4", "qn_w4a4", "dq_w4a4", "cpq_w4a4"],
    "Schemes to fine-tune (any tfquant.Scheme preset name).",
)


def verification_targets(verify_arm64: str) -> tuple[str, ...]:
    """The host's architecture, and arm64 when asked for or ("auto") built."""
    from tfquant.lite import arm64, verify

    targets = (verify.host_target(),)
    if verify_arm64 == "no":
        return targets
    try:
        arm64.check_environment()
    except arm64.Arm64Error as error:
        if verify_arm64 == "yes":
            raise
        print(f"== not verifying on arm64 ({error})")
        return targets
    return tuple(dict.fromkeys((*targets, "arm64")))


def run_demo(
    float_epochs, finetune_epochs, batch_size, seed, output_dir, methods, verify_arm64="auto"
):
    """Trains, quantizes, fine-tunes, exports and verifies; returns the table rows."""
    import keras

    import tfquant
    from tfquant import datasets, lite
    from tfquant.lite import verify
    from train import models

    targets = verification_targets(verify_arm64)

    dataset = datasets.load_arrays("digits")
    os.makedirs(output_dir, exist_ok=True)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def fit(model, epochs, learning_rate):
        model.compile(
            optimizer=keras.optimizers.Adam(learning_rate), loss=loss, metrics=["accuracy"]
        )
        start = time.perf_counter()
        model.fit(
            dataset.x_train,
            dataset.y_train,
            batch_size=batch_size,
            epochs=epochs,
            validation_data=(dataset.x_test, dataset.y_test),
            verbose=2,
        )
        elapsed = time.perf_counter() - start
        _, accuracy = model.evaluate(dataset.x_test, dataset.y_test, verbose=0)
        return float(accuracy), elapsed

    def save(result, name):
        path = os.path.join(output_dir, f"{name}.tflite")
        lite.save_export(result, path)
        return {"tflite": path, "size_kib": len(result.content) / 1024}

    keras.utils.set_random_seed(seed)
    print(
        f"== float small CNN on digits ({len(dataset.x_train)} train / "
        f"{len(dataset.x_test)} test images), {float_epochs} epochs"
    )
    float_model = models.small_cnn(dataset.input_shape, dataset.num_classes)
    accuracy, elapsed = fit(float_model, float_epochs, 3e-3)
    float_path = os.path.join(output_dir, "float.keras")
    float_model.save(float_path)
    print("== float model: standard full-integer post-training quantization, for comparison")
    result = lite.export_model(
        float_model, dataset.x_train[:256], post_training=True, min_agreement=0.0
    )
    raw, _ = verify.run_tflite(result.content, dataset.x_test)
    row = {"method": "float", "bits": "W32A32", "accuracy": accuracy, "train_seconds": elapsed}
    row.update(model=float_path, top1_agreement=None, **save(result, "float_ptq"))
    row["tflite_accuracy"] = float((raw.argmax(axis=1) == dataset.y_test).mean())
    rows = [row]

    for method in methods:
        keras.utils.set_random_seed(seed)
        scheme = tfquant.Scheme.from_any(method)
        print(f"== {method}: quantize_model + {finetune_epochs} epochs of fine-tuning")
        qmodel = tfquant.quantize_model(float_model, scheme, calibration_data=dataset.x_train[:512])
        _, elapsed = fit(qmodel, finetune_epochs, 1e-3)
        print(f"== {method}: export to integer TFLite, verified against Keras")
        result = lite.export_model(qmodel, dataset.x_test, dataset.y_test, targets=targets)
        print(lite.format_report(result.report))
        # Export aligned the model with the file (report["model_changes"]):
        # its accuracy and its saved form are now those of the file.
        _, accuracy = qmodel.evaluate(dataset.x_test, dataset.y_test, verbose=0)
        path = os.path.join(output_dir, f"{method}.keras")
        qmodel.save(path)
        verification = result.report["verification"]
        checked = {
            target: by_runtime[verify.CHECKED_RUNTIME]
            for target, by_runtime in result.report["targets"].items()
        }
        row = {
            "method": str(scheme.activations).upper(),
            "bits": f"W{scheme.resolved_weight_bits}A{scheme.resolved_activation_bits}",
            "accuracy": float(accuracy),
            "train_seconds": elapsed,
            "model": path,
            "tflite_accuracy": verification["tflite_accuracy"],
            "top1_agreement": min(a["top1_agreement"] for a in checked.values()),
            "identical_codes": {t: a["identical_output_codes"] for t, a in checked.items()},
        }
        row.update(save(result, method))
        rows.append(row)
    return rows


def format_table(rows) -> str:
    targets = list(dict.fromkeys(t for row in rows for t in row.get("identical_codes", {})))
    header = (
        f"{'method':<7} {'bits':<7} {'Keras acc':>9} {'TFLite acc':>10} {'agreement':>9} "
        + "".join(f"{'codes ' + t:>12}" for t in targets)
        + f" {'size':>9} {'train time':>10}"
    )
    lines = [header, "-" * len(header)]

    def percent(value):
        return "-" if value is None else f"{100 * value:.2f}%"

    for row in rows:
        codes = row.get("identical_codes", {})
        lines.append(
            f"{row['method']:<7} {row['bits']:<7} {100 * row['accuracy']:>8.2f}% "
            f"{100 * row['tflite_accuracy']:>9.2f}% {percent(row.get('top1_agreement')):>9} "
            + "".join(f"{percent(codes.get(t)):>12}" for t in targets)
            + f" {row['size_kib']:>5.1f} KiB {row['train_seconds']:>9.1f}s"
        )
    lines.append("float row, TFLite column: standard full-integer post-training quantization.")
    if targets:
        lines.append(
            "agreement: top-1 agreement with Keras, the lowest over "
            + " and ".join(targets)
            + "; codes: identical int8 output codes (LiteRT's default runtime on each CPU)."
        )
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    rows = run_demo(
        _FLOAT_EPOCHS.value,
        _FINETUNE_EPOCHS.value,
        _BATCH_SIZE.value,
        _SEED.value,
        _OUTPUT_DIR.value,
        _METHODS.value,
        _VERIFY_ARM64.value,
    )
    print("\n" + format_table(rows))
    from tfquant.lite import write_atomically

    write_atomically(
        os.path.join(_OUTPUT_DIR.value, "demo_results.json"), json.dumps(rows, indent=2)
    )


if __name__ == "__main__":
    app.run(main)
