"""Exports a quantized .keras model to a verified, fully integer .tflite file.

    python -m export.export_tflite --model=qil_w4a4.keras --output=qil_w4a4.tflite \
        --data=digits [--samples=2000] [--output_type=int8|float32] \
        [--min_agreement=1.0] [--min_identical_codes=0.999] [--allow_mismatch] [--post_training] \
        [--int4_weights [--target=arm64|x86]] [--verify_arm64 [--arm64_cpu=MODEL]]

Writes OUTPUT, OUTPUT-without-extension.json and .txt (the report), each
atomically, and only after verification against the Keras model passed.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the flags; called when run as a program, so that importing
    `run` defines nothing global."""
    flags.DEFINE_string("model", None, "Path of the .keras model.", required=True)
    flags.DEFINE_string("output", None, "Path of the .tflite file to write.", required=True)
    flags.DEFINE_string(
        "data",
        "digits",
        "Verification (and post-training calibration) data: 'digits', "
        "'npz:PATH[:SPLIT]' or a tensorflow-datasets name; its test split is used.",
    )
    flags.DEFINE_integer("samples", 2000, "How many test samples to verify on.", lower_bound=1)
    flags.DEFINE_enum("output_type", "int8", ["int8", "float32"], "Type of the model output.")
    flags.DEFINE_float(
        "min_agreement",
        None,
        "Smallest top-1 agreement with Keras accepted (default 1.0; 0.99 with --post_training).",
        lower_bound=0.0,
        upper_bound=1.0,
    )
    flags.DEFINE_float(
        "min_identical_codes",
        None,
        "Smallest share of output codes identical to Keras's accepted (default 0.999; not "
        "checked with --post_training).",
        lower_bound=0.0,
        upper_bound=1.0,
    )
    flags.DEFINE_bool(
        "int4_weights",
        False,
        "Store 2..4-bit weights as packed INT4 (about 0.6x the file) instead of INT8. INT4 "
        "convolutions run in builtin kernels that round differently per CPU: the file is made "
        "exact for --target and verified there.",
    )
    flags.DEFINE_enum(
        "target",
        "arm64",
        ["arm64", "x86"],
        "The CPU the file is for (arm64: Android phones); decides how INT4 layers round.",
    )
    flags.DEFINE_bool("allow_mismatch", False, "Write the file even below --min_agreement.")
    flags.DEFINE_integer(
        "per_layer",
        0,
        "Also compare every activation quantizer's codes with the file's tensor on this many "
        "samples and print a table (where Keras and TFLite first differ).",
        lower_bound=0,
    )
    flags.DEFINE_bool(
        "verify_arm64",
        False,
        "Also verify on arm64 (Android's CPU) kernels, emulated on an x86 host: build the "
        "environment once with `make arm64`. The file must reach --min_agreement there too.",
    )
    flags.DEFINE_string(
        "arm64_cpu",
        None,
        "QEMU CPU model for --verify_arm64 (default: max, every feature QEMU implements).",
    )
    flags.DEFINE_bool(
        "post_training",
        False,
        "The model is a float model: apply standard full-integer post-training quantization "
        "with --data as representative data (the baseline).",
    )


def run(
    model_path,
    output_path,
    data_spec,
    samples,
    output_type,
    min_agreement,
    allow_mismatch,
    post_training,
    int4_weights=False,
    per_layer=0,
    verify_arm64=False,
    arm64_cpu=None,
    target="arm64",
    min_identical_codes=None,
):
    import keras

    from tfquant import datasets, lite, precision
    from tfquant.lite import arm64, verify

    directory = os.path.dirname(os.path.abspath(output_path))
    if not os.path.isdir(directory):
        raise lite.ExportError(f"output directory {directory!r} does not exist")
    if not os.path.exists(model_path):
        raise lite.ExportError(f"model file {model_path!r} does not exist")
    try:
        model = keras.models.load_model(model_path)
    except Exception as error:  # corrupt zip, wrong format, unknown layers
        raise lite.ExportError(f"cannot load {model_path!r} as a Keras model: {error}") from None
    float32_model = precision.float32_copy(model)
    if float32_model is not model:
        print(
            f"{model_path} computes in reduced precision (mixed-precision training); "
            "exporting its float32 copy"
        )
        model = float32_model
    targets = (verify.host_target(),)
    if int4_weights and not post_training:
        targets = (*targets, target)
    if verify_arm64:
        targets = (*targets, "arm64")
    targets = tuple(dict.fromkeys(targets))
    if "arm64" in targets:
        arm64.check_environment()  # before any work: say at once if it is not built
    dataset = datasets.load_arrays(data_spec)
    x, y = dataset.x_test[:samples], dataset.y_test[:samples]
    if post_training:
        x = dataset.x_train[:samples]
        y = dataset.y_train[:samples]
    print(f"exporting {model_path} -> {output_path}, verifying on {len(x)} samples of {data_spec}")
    result = lite.export_model(
        model,
        x,
        y,
        output_type=output_type,
        min_agreement=min_agreement,
        min_identical_codes=min_identical_codes,
        allow_mismatch=allow_mismatch,
        post_training=post_training,
        int4_weights=int4_weights,
        target=target,
        targets=targets,
        arm64_cpu=arm64_cpu,
    )
    lite.save_export(result, output_path)
    print(lite.format_report(result.report))
    if per_layer and not post_training:
        print(verify.format_layers(verify.compare_layers(model, result.content, x[:per_layer])))
    return result.report


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from tfquant import lite
    from tfquant.lite import arm64

    try:
        run(
            FLAGS.model,
            FLAGS.output,
            FLAGS.data,
            FLAGS.samples,
            FLAGS.output_type,
            FLAGS.min_agreement,
            FLAGS.allow_mismatch,
            FLAGS.post_training,
            FLAGS.int4_weights,
            FLAGS.per_layer,
            FLAGS.verify_arm64,
            FLAGS.arm64_cpu,
            FLAGS.target,
            FLAGS.min_identical_codes,
        )
    except (lite.ExportError, arm64.Arm64Error, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    define_flags()
    app.run(main)
