"""The export users have today: tensorflow-model-optimization 8-bit QAT to int8 TFLite.

    TF_USE_LEGACY_KERAS=1 python -m benchmarks.tfmot_export --data=SPLIT.npz \\
        --output_dir=DIR [--float_epochs=8] [--finetune_epochs=3] [--batch_size=64] \\
        [--float_learning_rate=1e-3] [--finetune_learning_rate=5e-4] [--seed=0] \\
        [--model=resnet20|small_cnn] [--weight_bits=8] [--activation_bits=8] \\
        [--name=tfmot_int8] [--batchnorm_momentum=M]

The baseline half of `benchmarks.exporter`, which runs it in its own
process: tensorflow-model-optimization needs tf_keras (legacy Keras 2) and
rejects Keras 3 models. Builds the same ResNet-20 as `train.models.resnet20`
with tf_keras (`benchmarks.tfmot_steps.resnet20`), trains it in float with
Adam, applies `tfmot.quantization.keras.quantize_model` (the default 8-bit
scheme), fine-tunes it for the same number of epochs as our schemes, and
converts it with the standard converter (`from_keras_model`,
`Optimize.DEFAULT`, int8 input and output; a representative dataset from the
training rows only if the converter asks for one). The TFLite model then runs
on the test rows.

`--model=small_cnn` builds `train.models.small_cnn` instead (the
`benchmarks.results` baseline). `--weight_bits` / `--activation_bits`
other than 8 use tfmot's experimental n-bit scheme
(`DefaultNBitQuantizeScheme` through `quantize_annotate_model` and
`quantize_apply`); the converted file still stores int8 tensors.

`--data` is a NumPy archive holding `x_train`, `y_train`, `x_test` and
`y_test` (float images in [0, 1], channels last; integer labels), the very
arrays the Keras 3 half trained on.

Writes `DIR/NAME.tflite` and `DIR/NAME.json` (NAME from `--name`, default
`tfmot_int8`): `{"status": "ok",
"keras_float_accuracy", "keras_accuracy", "tflite_accuracy", "top1_agreement",
"identical_output_codes", "max_output_step_difference", "size_bytes", ...}`,
or `{"status": "skipped", "reason": ...}` when tf_keras or
tensorflow_model_optimization cannot be imported.

The command line is parsed with argparse, not absl: importing
`benchmarks.tfmot_steps` defines absl flags of its own (a required `--output`
among them) in the global flag registry.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

DEFAULT_NAME = "tfmot_int8"
TFLITE_NAME = DEFAULT_NAME + ".tflite"
REPORT_NAME = DEFAULT_NAME + ".json"
MODELS = ("resnet20", "small_cnn")
INSTALL_HINT = "pip install -e .[baseline]"
REPRESENTATIVE_SAMPLES = 256


def log(message: str) -> None:
    print(message, flush=True)


def write_atomically(path: str, data: bytes | str) -> None:
    """Writes to a temporary file beside `path`, then renames it over `path`.

    `tfquant.fileio.write_atomically` does the same, but importing `tfquant`
    would load Keras 3 into this tf_keras process.
    """
    directory = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(
        dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp"
    )
    try:
        with os.fdopen(handle, "wb" if isinstance(data, bytes) else "w") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def load_split(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Reads `x_train`, `y_train`, `x_test`, `y_test` from a NumPy archive."""
    with np.load(path) as archive:
        missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in archive]
        if missing:
            raise ValueError(f"{path!r} lacks arrays {missing}; it holds {sorted(archive.files)}")
        return (
            archive["x_train"].astype(np.float32),
            archive["y_train"].astype(np.int32),
            archive["x_test"].astype(np.float32),
            archive["y_test"].astype(np.int32),
        )


def small_cnn(keras_module, input_shape=(28, 28, 1), num_classes=10, width=16):
    """`train.models.small_cnn`, layer for layer, built with `keras_module`."""
    layers = keras_module.layers
    blocks = (
        ("block1", width, 1),
        ("block2", 2 * width, 2 if input_shape[0] > 16 else 1),
        ("block3", 4 * width, 1),
    )
    x = inputs = keras_module.Input(input_shape, name="image")
    for name, filters, strides in blocks:
        if name == "block3":
            x = layers.MaxPooling2D(2, name="pool")(x)
        x = layers.Conv2D(
            filters, 3, strides=strides, padding="same", use_bias=False, name=name + "_conv"
        )(x)
        x = layers.BatchNormalization(name=name + "_bn")(x)
        x = layers.ReLU(name=name + "_relu")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras_module.Model(inputs, outputs, name="small_cnn")


def quantize_for_qat(tfmot, model, weight_bits: int = 8, activation_bits: int = 8):
    """tfmot's default 8-bit QAT model, or its experimental n-bit scheme for
    other widths. Returns the model and the scheme's description."""
    keras_api = tfmot.quantization.keras
    if (weight_bits, activation_bits) == (8, 8):
        return keras_api.quantize_model(model), "tfmot default 8-bit (Default8BitQuantizeScheme)"
    scheme = keras_api.experimental.default_n_bit.DefaultNBitQuantizeScheme(
        num_bits_weight=weight_bits, num_bits_activation=activation_bits
    )
    annotated = keras_api.quantize_annotate_model(model)
    return (
        keras_api.quantize_apply(annotated, scheme=scheme),
        f"tfmot experimental DefaultNBitQuantizeScheme(num_bits_weight={weight_bits}, "
        f"num_bits_activation={activation_bits})",
    )


def convert_int8(tf, model, x_train: np.ndarray) -> tuple[bytes, bool]:
    """Standard full-int8 conversion of a QAT model.

    Returns the flatbuffer and whether a representative dataset was needed.
    """

    def converter(representative: bool):
        result = tf.lite.TFLiteConverter.from_keras_model(model)
        result.optimizations = [tf.lite.Optimize.DEFAULT]
        result.inference_input_type = tf.int8
        result.inference_output_type = tf.int8
        if representative:

            def dataset():
                for i in range(min(len(x_train), REPRESENTATIVE_SAMPLES)):
                    yield [x_train[i : i + 1]]

            result.representative_dataset = dataset
        return result

    try:
        return converter(representative=False).convert(), False
    except Exception as error:  # the converter raises several types when it lacks ranges
        log(f"  conversion without a representative dataset failed ({error}); retrying with one")
        return converter(representative=True).convert(), True


def run_baseline(
    data: str,
    output_dir: str,
    float_epochs: int,
    finetune_epochs: int,
    batch_size: int = 64,
    float_learning_rate: float = 1e-3,
    finetune_learning_rate: float = 5e-4,
    seed: int = 0,
    model: str = "resnet20",
    weight_bits: int = 8,
    activation_bits: int = 8,
    name: str = DEFAULT_NAME,
    batchnorm_momentum: float | None = None,
) -> dict[str, Any]:
    """Trains, QAT-fine-tunes and converts the tf_keras model; returns the report.

    Writes `NAME.tflite` into `output_dir` when it succeeds.
    """
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    os.environ["TF_USE_LEGACY_KERAS"] = "1"  # before TensorFlow resolves tf.keras
    try:
        import tensorflow_model_optimization as tfmot
        import tf_keras
    except ImportError as error:
        return {"status": "skipped", "reason": f"{error}; install with `{INSTALL_HINT}`"}
    import tensorflow as tf

    from benchmarks.tfmot_steps import resnet20

    builder = resnet20 if model == "resnet20" else small_cnn
    x_train, y_train, x_test, y_test = load_split(data)
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    tf_keras.utils.set_random_seed(seed)
    loss = tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def fit(model, epochs, learning_rate):
        model.compile(
            optimizer=tf_keras.optimizers.Adam(learning_rate), loss=loss, metrics=["accuracy"]
        )
        start = time.perf_counter()
        model.fit(x_train, y_train, batch_size=batch_size, epochs=epochs, verbose=2)
        seconds = time.perf_counter() - start
        _, accuracy = model.evaluate(x_test, y_test, batch_size=256, verbose=0)
        return float(accuracy), seconds

    log(
        f"  tf_keras {model} {'x'.join(map(str, x_train.shape[1:]))}: float, "
        f"{float_epochs} epochs of Adam({float_learning_rate:g}), seed {seed}"
    )
    float_model = builder(tf_keras, x_train.shape[1:], num_classes)
    for layer in float_model.layers:
        if batchnorm_momentum is not None and isinstance(layer, tf_keras.layers.BatchNormalization):
            layer.momentum = batchnorm_momentum
    float_accuracy, float_seconds = fit(float_model, float_epochs, float_learning_rate)
    log(f"  tf_keras float test accuracy {100 * float_accuracy:.2f}% ({float_seconds:.0f} s)")

    qat_model, scheme = quantize_for_qat(tfmot, float_model, weight_bits, activation_bits)
    log(f"  {scheme}: {finetune_epochs} epochs of Adam({finetune_learning_rate:g})")
    qat_accuracy, qat_seconds = fit(qat_model, finetune_epochs, finetune_learning_rate)
    log(f"  tfmot QAT Keras test accuracy {100 * qat_accuracy:.2f}% ({qat_seconds:.0f} s)")

    start = time.perf_counter()
    content, representative = convert_int8(tf, qat_model, x_train)
    convert_seconds = time.perf_counter() - start
    path = os.path.join(output_dir, name + ".tflite")
    write_atomically(path, content)
    # tfquant's runner and comparison (int8 inputs quantized round half up),
    # so both exports are measured alike; importing tfquant loads Keras 3
    # beside tf_keras, and neither touches the other.
    from tfquant.lite import verify

    reference = qat_model.predict(x_test, batch_size=256, verbose=0)
    raw, detail = verify.run_tflite(content, x_test)
    if detail["dtype"] != np.int8:
        raise ValueError(f"the converted model's output is {detail['dtype']}, expected int8")
    verification = verify.compare_outputs(reference, raw, detail, y_test).to_dict()
    log(
        f"  tfmot int8 TFLite: {len(content) / 1024:.1f} KiB, accuracy "
        f"{100 * verification['tflite_accuracy']:.2f}%, top-1 agreement with its Keras model "
        f"{100 * verification['top1_agreement']:.2f}%"
    )
    return {
        "status": "ok",
        "tflite": path,
        "size_bytes": len(content),
        "keras_float_accuracy": float_accuracy,
        **verification,
        "representative_dataset_used": representative,
        "float_train_seconds": float_seconds,
        "finetune_seconds": qat_seconds,
        "convert_seconds": convert_seconds,
        "config": {
            "float_epochs": float_epochs,
            "finetune_epochs": finetune_epochs,
            "batch_size": batch_size,
            "float_learning_rate": float_learning_rate,
            "finetune_learning_rate": finetune_learning_rate,
            "seed": seed,
            "model": model,
            "batchnorm_momentum": batchnorm_momentum,
            "weight_bits": weight_bits,
            "activation_bits": activation_bits,
            "scheme": scheme,
            "converter": "TFLiteConverter.from_keras_model, Optimize.DEFAULT, int8 in/out",
        },
        "versions": {
            "tensorflow": tf.__version__,
            "tf_keras": tf_keras.__version__,
            "tfmot": tfmot.__version__,
        },
    }


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.tfmot_export",
        description="tfmot QAT of ResNet-20 or the small CNN, converted to int8 TFLite (needs "
        "TF_USE_LEGACY_KERAS=1).",
    )
    parser.add_argument("--data", required=True, help="NumPy archive with the split.")
    parser.add_argument("--output_dir", required=True, help="Where the .tflite and .json go.")
    parser.add_argument("--float_epochs", type=int, default=8)
    parser.add_argument("--finetune_epochs", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--float_learning_rate", type=float, default=1e-3)
    parser.add_argument("--finetune_learning_rate", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", choices=MODELS, default="resnet20")
    parser.add_argument("--weight_bits", type=int, default=8)
    parser.add_argument("--activation_bits", type=int, default=8)
    parser.add_argument("--name", default=DEFAULT_NAME, help="Stem of the output files.")
    parser.add_argument(
        "--batchnorm_momentum", type=float, default=None, help="Default: the layers' own."
    )
    arguments = parser.parse_args(argv)
    for name in ("float_epochs", "finetune_epochs", "batch_size"):
        if getattr(arguments, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(arguments, name)}")
    for name in ("weight_bits", "activation_bits"):
        if not 2 <= getattr(arguments, name) <= 8:
            parser.error(f"--{name} must be in 2..8, got {getattr(arguments, name)}")
    return arguments


def main(argv: Sequence[str] | None = None) -> None:
    arguments = parse_arguments(argv)
    if not os.path.isdir(arguments.output_dir):
        raise SystemExit(f"output directory {arguments.output_dir!r} does not exist")
    result = run_baseline(
        arguments.data,
        arguments.output_dir,
        arguments.float_epochs,
        arguments.finetune_epochs,
        arguments.batch_size,
        arguments.float_learning_rate,
        arguments.finetune_learning_rate,
        arguments.seed,
        arguments.model,
        arguments.weight_bits,
        arguments.activation_bits,
        arguments.name,
        arguments.batchnorm_momentum,
    )
    if result["status"] != "ok":
        log(f"  tfmot baseline {result['status']}: {result['reason']}")
    write_atomically(
        os.path.join(arguments.output_dir, arguments.name + ".json"),
        json.dumps(result, indent=2) + "\n",
    )


if __name__ == "__main__":
    main()
