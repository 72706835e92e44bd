"""The demo: float CNN -> QIL W4A4 and LSQ W4A4 with model.fit, on scikit-learn's
bundled digits (no download).

    python -m train.demo [--float_epochs=30] [--finetune_epochs=10] [--output_dir=DIR]

Prints Keras progress, then a table: method, bits, test accuracy, training time.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags

_FLOAT_EPOCHS = flags.DEFINE_integer(
    "float_epochs", 30, "Epochs for the float model.", lower_bound=1
)
_FINETUNE_EPOCHS = flags.DEFINE_integer(
    "finetune_epochs", 10, "Epochs of quantization-aware fine-tuning per method.", lower_bound=1
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Batch size.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "demo_output", "Where models and the table go.")
_METHODS = flags.DEFINE_list("methods", ["qil_w4a4", "lsq_w4a4"], "Schemes to fine-tune.")


def run_demo(float_epochs, finetune_epochs, batch_size, seed, output_dir, methods):
    """Trains, quantizes, fine-tunes and evaluates; returns the table rows."""
    import keras

    import tfquant
    from train import data, models

    dataset = data.load_arrays("digits")
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

    keras.utils.set_random_seed(seed)
    print(
        f"== float small CNN on digits ({len(dataset.x_train)} train / "
        f"{len(dataset.x_test)} test images), {float_epochs} epochs"
    )
    float_model = models.small_cnn(dataset.input_shape, dataset.num_classes)
    accuracy, elapsed = fit(float_model, float_epochs, 3e-3)
    float_model.save(os.path.join(output_dir, "float.keras"))
    rows = [
        {
            "method": "float",
            "bits": "W32A32",
            "accuracy": accuracy,
            "train_seconds": elapsed,
            "model": os.path.join(output_dir, "float.keras"),
        }
    ]

    for method in methods:
        keras.utils.set_random_seed(seed)
        scheme = tfquant.Scheme.from_any(method)
        print(f"== {method}: quantize_model + {finetune_epochs} epochs of fine-tuning")
        qmodel = tfquant.quantize_model(float_model, scheme, calibration_data=dataset.x_train[:512])
        accuracy, elapsed = fit(qmodel, finetune_epochs, 1e-3)
        path = os.path.join(output_dir, f"{method}.keras")
        qmodel.save(path)
        rows.append(
            {
                "method": str(scheme.activations).upper(),
                "bits": f"W{scheme.resolved_weight_bits}A{scheme.resolved_activation_bits}",
                "accuracy": accuracy,
                "train_seconds": elapsed,
                "model": path,
            }
        )
    return rows


def format_table(rows) -> str:
    lines = [f"{'method':<8} {'bits':<8} {'test acc':>9} {'train time':>11}", "-" * 39]
    for row in rows:
        lines.append(
            f"{row['method']:<8} {row['bits']:<8} {100 * row['accuracy']:>8.2f}% "
            f"{row['train_seconds']:>10.1f}s"
        )
    return "\n".join(lines)


def main(argv):
    del argv
    rows = run_demo(
        _FLOAT_EPOCHS.value,
        _FINETUNE_EPOCHS.value,
        _BATCH_SIZE.value,
        _SEED.value,
        _OUTPUT_DIR.value,
        _METHODS.value,
    )
    table = format_table(rows)
    print("\n" + table)
    with open(os.path.join(_OUTPUT_DIR.value, "demo_results.json"), "w") as f:
        json.dump(rows, f, indent=2)


if __name__ == "__main__":
    app.run(main)
