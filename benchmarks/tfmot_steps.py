"""Step time of tensorflow-model-optimization's 8-bit QAT against tf_keras float.

    TF_USE_LEGACY_KERAS=1 python -m benchmarks.tfmot_steps --output=tfmot.json \\
        [--steps=10] [--rounds=5] [--batch_size=128]

The baseline half of `benchmarks.overhead`, which runs it in its own
process: tensorflow-model-optimization needs tf_keras (legacy Keras 2) and
rejects Keras 3 models. Builds the same ResNet-20 as `train.models.resnet20`
with tf_keras, quantizes a copy with `tfmot.quantization.keras.quantize_model`
(the default 8-bit scheme) and times both with the same interleaved rounds,
optimizer and kind of training step as the Keras 3 variants.

Writes JSON: `{"status": "ok", "times": {variant: [ms per step per round]},
"variants": {variant: description}}`, or `{"status": "skipped", "reason": ...}`
when tf_keras or tensorflow_model_optimization cannot be imported.
"""

from __future__ import annotations

import os
import time

from absl import app, flags

from benchmarks.overhead import (
    BASELINE_INSTALL_HINT,
    INPUT_SHAPE,
    LEARNING_RATE,
    MOMENTUM,
    NUM_CLASSES,
    log,
    random_batch,
    time_interleaved,
    write_json_atomically,
)

QAT_VARIANT = "tfmot 8-bit QAT"

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the flags; called only when run as a program, so importing the
    ResNet-20 builder defines nothing global."""
    flags.DEFINE_integer("steps", 10, "Timed steps per variant per round.", lower_bound=1)
    flags.DEFINE_integer("rounds", 5, "Interleaved rounds.", lower_bound=1)
    flags.DEFINE_integer("batch_size", 128, "Batch size.", lower_bound=1)
    flags.DEFINE_integer(
        "warmup_steps", 3, "Untimed steps per variant before the first round.", lower_bound=1
    )
    flags.DEFINE_integer("seed", 0, "Random seed for the weights and the data.")
    flags.DEFINE_string("output", None, "Where the JSON result goes.", required=True)


def resnet20(keras_module, input_shape=INPUT_SHAPE, num_classes=NUM_CLASSES, width=16):
    """`train.models.resnet20`, layer for layer, built with `keras_module`
    (tf_keras here; the Keras 3 builder cannot make tf_keras layers)."""
    layers = keras_module.layers

    def conv_bn_relu(x, filters, strides, name):
        x = layers.Conv2D(
            filters, 3, strides=strides, padding="same", use_bias=False, name=name + "_conv"
        )(x)
        x = layers.BatchNormalization(name=name + "_bn")(x)
        return layers.ReLU(name=name + "_relu")(x)

    inputs = keras_module.Input(input_shape, name="image")
    x = conv_bn_relu(inputs, width, 1, "stem")
    for stage, filters in enumerate((width, 2 * width, 4 * width)):
        for block in range(3):
            strides = 2 if stage > 0 and block == 0 else 1
            name = f"stage{stage + 1}_block{block + 1}"
            shortcut = x
            y = conv_bn_relu(x, filters, strides, name + "_a")
            y = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=name + "_b_conv")(y)
            y = layers.BatchNormalization(name=name + "_b_bn")(y)
            if strides != 1 or shortcut.shape[-1] != filters:
                shortcut = layers.Conv2D(
                    filters, 1, strides=strides, use_bias=False, name=name + "_proj_conv"
                )(shortcut)
                shortcut = layers.BatchNormalization(name=name + "_proj_bn")(shortcut)
            x = layers.Add(name=name + "_add")([y, shortcut])
            x = layers.ReLU(name=name + "_relu")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras_module.Model(inputs, outputs, name="resnet20")


def _train_step(tf, model, optimizer, loss_fn, x, y):
    variables = model.trainable_variables
    optimizer.build(variables)

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
        return loss

    return lambda: train_step(x, y)


def time_tfmot(steps: int, rounds: int, batch_size: int, warmup_steps: int, seed: int) -> dict:
    """Times tf_keras float ResNet-20 and its tfmot 8-bit QAT twin, interleaved."""
    os.environ["TF_USE_LEGACY_KERAS"] = "1"  # before TensorFlow resolves tf.keras
    try:
        import tensorflow_model_optimization as tfmot
        import tf_keras
    except ImportError as error:
        return {"status": "skipped", "reason": f"{error}; install with `{BASELINE_INSTALL_HINT}`"}
    import tensorflow as tf

    tf_keras.utils.set_random_seed(seed)
    x, y = random_batch(batch_size, seed)
    x, y = tf.constant(x), tf.constant(y)
    loss_fn = tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    float_model = resnet20(tf_keras)
    twin = resnet20(tf_keras)
    twin.set_weights(float_model.get_weights())
    start = time.perf_counter()
    qat_model = tfmot.quantization.keras.quantize_model(twin)
    log(f"  tfmot.quantization.keras.quantize_model in {time.perf_counter() - start:.1f} s")

    step_functions, variants = {}, {}
    for name, model in (("float", float_model), (QAT_VARIANT, qat_model)):
        optimizer = tf_keras.optimizers.SGD(LEARNING_RATE, momentum=MOMENTUM)
        step_functions[name] = _train_step(tf, model, optimizer, loss_fn, x, y)
        variants[name] = {
            "framework": f"tf_keras {tf_keras.__version__}, tfmot {tfmot.__version__}",
            "scheme": None
            if name == "float"
            else "tfmot default 8-bit (Default8BitQuantizeScheme)",
            "trainable_weights": int(sum(int(tf.size(v)) for v in model.trainable_variables)),
            "layers": len(model.layers),
        }
    times = time_interleaved(step_functions, rounds, steps, warmup_steps)
    return {"status": "ok", "times": times, "variants": variants}


def main(argv):
    del argv
    result = time_tfmot(FLAGS.steps, FLAGS.rounds, FLAGS.batch_size, FLAGS.warmup_steps, FLAGS.seed)
    if result["status"] != "ok":
        log(f"  tfmot baseline {result['status']}: {result['reason']}")
    write_json_atomically(result, FLAGS.output)


if __name__ == "__main__":
    define_flags()
    app.run(main)
