"""Trains a float or quantized model: the tfquant training binary.

    python -m train.train --flagfile=train/recipes/qil_small_cnn_w4a4.cfg --model_dir=/tmp/run

Every flag is checked before any work; a bad value stops the run with a
message naming the flag and the value, exit status 1, and nothing written to
--model_dir. A run killed at any point resumes from --model_dir at its last
finished epoch. The library behind this binary is `train.trainer`.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from train import strategy as strategy_lib

_METHOD = flags.DEFINE_string(
    "method",
    "float",
    "A registered quantizer name (tfquant.quantizers.registered_names()) "
    "used for weights and activations ('pact' uses LSQ weights), or 'float'.",
)
_WEIGHT_QUANTIZER_OPTIONS = flags.DEFINE_string(
    "weight_quantizer_options",
    "{}",
    "JSON object of extra constructor arguments of the weight quantizer of --method, "
    'e.g. \'{"learn_bits": true, "bit_regularization": 0.01}\' for cpq.',
)
_ACTIVATION_QUANTIZER_OPTIONS = flags.DEFINE_string(
    "activation_quantizer_options",
    "{}",
    "JSON object of extra constructor arguments of the activation quantizer of --method.",
)
_QN_PHASES = flags.DEFINE_string(
    "qn_phases",
    "",
    "--method=qn only: epochs of the three training phases 'WEIGHTS,ACTIVATIONS,BOTH' "
    "(weight quantizers only, then activation quantizers only, then both; they must add "
    "up to --epochs). Empty: both from the start.",
)
_WEIGHT_BITS = flags.DEFINE_integer("weight_bits", 4, "Weight bit width (2..8).")
_ACTIVATION_BITS = flags.DEFINE_integer("activation_bits", 4, "Activation bit width (2..8).")
_FIRST_LAST_BITS = flags.DEFINE_string(
    "first_last_bits", "8", "Weight bits of the first and last layers (2..8), or 'same'."
)
_MODEL = flags.DEFINE_string("model", "small_cnn", "Model from train/models.py.")
_MODEL_ALPHA = flags.DEFINE_float("model_alpha", 1.0, "Width multiplier of mobilenet_v2.")
_DATASET = flags.DEFINE_string(
    "dataset", "digits", "digits, npz:PATH[:SPLIT], mnist, cifar10, cifar100 or imagenet2012."
)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "tensorflow-datasets data directory.")
_EPOCHS = flags.DEFINE_integer("epochs", 1, "Training epochs.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Global batch size (over all replicas).")
_STEPS_PER_EPOCH = flags.DEFINE_integer(
    "steps_per_epoch", None, "Cap on training steps per epoch (for quick runs)."
)
_OPTIMIZER = flags.DEFINE_string("optimizer", "adam", "sgd (with momentum) or adam.")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 1e-3, "Learning rate of the weights.")
_QUANTIZER_LEARNING_RATE = flags.DEFINE_float(
    "quantizer_learning_rate",
    None,
    "Learning rate of quantizer parameters (QIL: 100x smaller); default --learning_rate.",
)
_MOMENTUM = flags.DEFINE_float("momentum", 0.9, "SGD momentum.")
_WEIGHT_DECAY = flags.DEFINE_float("weight_decay", 0.0, "Decoupled weight decay of kernels.")
_INIT_FROM = flags.DEFINE_string(
    "init_from", None, "A .keras checkpoint to start from (float, or a previous quantized stage)."
)
_STRATEGY = flags.DEFINE_string(
    "strategy", "off", "off, one_device, mirrored, multi_worker_mirrored or tpu."
)
_TPU = flags.DEFINE_string("tpu", None, "TPU address or name (--strategy=tpu).")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", 0, "Split the CPU into this many logical devices (mirrored without GPUs)."
)
_MIXED_PRECISION = flags.DEFINE_bool(
    "mixed_precision", False, "Compute in bfloat16 (quantizers stay float32)."
)
_DETERMINISTIC = flags.DEFINE_bool(
    "deterministic", False, "tf.config.experimental.enable_op_determinism()."
)
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_DISTILL_FROM = flags.DEFINE_string(
    "distill_from", None, "A float teacher .keras for knowledge distillation."
)
_LABELS = flags.DEFINE_string(
    "labels", "true", "'true': labels in the loss; 'none': distillation only, no labels read."
)
_DISTILL_TEMPERATURE = flags.DEFINE_float("distill_temperature", 1.0, "Softmax temperature.")
_DISTILL_WEIGHT = flags.DEFINE_float(
    "distill_weight", 0.5, "Weight of the distillation loss when labels are used."
)
_BN_REESTIMATION_BATCHES = flags.DEFINE_integer(
    "bn_reestimation_batches",
    0,
    "After training, replace BatchNormalization moving statistics with those of this many "
    "un-augmented training batches under the final weights (0: keep the moving averages).",
)
_MODEL_DIR = flags.DEFINE_string("model_dir", None, "Output directory.")
_VERBOSE = flags.DEFINE_integer("verbose", 1, "Keras progress bar mode: 0, 1 or 2.")


def config_from_flags():
    from train import trainer

    return trainer.TrainConfig(
        method=_METHOD.value,
        weight_bits=_WEIGHT_BITS.value,
        activation_bits=_ACTIVATION_BITS.value,
        first_last_bits=_FIRST_LAST_BITS.value,
        model=_MODEL.value,
        model_alpha=_MODEL_ALPHA.value,
        dataset=_DATASET.value,
        data_dir=_DATA_DIR.value,
        epochs=_EPOCHS.value,
        batch_size=_BATCH_SIZE.value,
        steps_per_epoch=_STEPS_PER_EPOCH.value,
        optimizer=_OPTIMIZER.value,
        learning_rate=_LEARNING_RATE.value,
        quantizer_learning_rate=_QUANTIZER_LEARNING_RATE.value,
        momentum=_MOMENTUM.value,
        weight_decay=_WEIGHT_DECAY.value,
        init_from=_INIT_FROM.value,
        strategy=_STRATEGY.value,
        tpu=_TPU.value,
        mixed_precision=_MIXED_PRECISION.value,
        deterministic=_DETERMINISTIC.value,
        seed=_SEED.value,
        distill_from=_DISTILL_FROM.value,
        labels=_LABELS.value,
        distill_temperature=_DISTILL_TEMPERATURE.value,
        distill_weight=_DISTILL_WEIGHT.value,
        weight_quantizer_options=_WEIGHT_QUANTIZER_OPTIONS.value,
        activation_quantizer_options=_ACTIVATION_QUANTIZER_OPTIONS.value,
        qn_phases=_QN_PHASES.value,
        bn_reestimation_batches=_BN_REESTIMATION_BATCHES.value,
    )


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}")
    if not _MODEL_DIR.value:
        _fail("--model_dir is required")
    if _VERBOSE.value not in (0, 1, 2):
        _fail(f"--verbose={_VERBOSE.value}: use 0, 1 or 2")
    if _CPU_DEVICES.value < 0:
        _fail(f"--cpu_devices={_CPU_DEVICES.value}: must be >= 0")
    import tensorflow as tf

    if _CPU_DEVICES.value > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * _CPU_DEVICES.value
        )
    from train import trainer

    problem = trainer.model_dir_problem(_MODEL_DIR.value)
    if problem:
        _fail(f"--model_dir={_MODEL_DIR.value}: {problem}")
    config = config_from_flags()
    try:
        trainer.validate_config(config)
        strategy = strategy_lib.make_strategy(config.strategy, config.tpu)
        trainer.check_replicas(config, strategy)
    except ValueError as error:
        _fail(str(error))
    try:
        trainer.train(config, os.path.abspath(_MODEL_DIR.value), strategy, verbose=_VERBOSE.value)
    except trainer.FlagError as error:  # a setting that only the built model refutes
        _fail(str(error))


if __name__ == "__main__":
    app.run(main)
