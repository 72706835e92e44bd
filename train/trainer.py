"""The training library behind `train/train.py`.

    config = TrainConfig(method="qil", model="small_cnn", dataset="digits", epochs=5)
    validate_config(config)              # every check, before any work
    result = train(config, "/tmp/run")   # dict of final metrics

What `train` does, in order:
  1. builds the strategy (`train.strategy.make_strategy`) and checks that the
     global batch splits over its replicas;
  2. builds the input pipeline and, inside `strategy.scope()`, the float model
     (from the zoo or `--init_from`), quantizes it with `tfquant.quantize_model`
     (calibrated on training images), loads the distillation teacher, and
     creates two optimizers: one for the network's weights, one (with its own
     learning rate and no weight decay) for the variables of tfquant
     quantizers;
  3. trains: `model.fit` for off/one_device/mirrored, with
     `train.backup.AtomicBackup` (Keras's `BackupAndRestore`, committed
     atomically) in `model_dir/backup`; a custom
     distributed loop for multi_worker_mirrored and tpu (the Keras 3 `fit`
     does not run under MultiWorkerMirroredStrategy, keras-team/keras#20585),
     with `tf.train.CheckpointManager` in `model_dir/checkpoints`. Both resume
     at the last finished epoch after a crash or preemption;
  4. writes `metrics.json` after every epoch (atomically), TensorBoard scalars
     (`model_dir/tensorboard`: loss, accuracy and every quantizer's
     `parameters()`, prefixed by layer name), `config.json`, and at the end
     `final.keras` and a SavedModel in `saved_model/`. When kernel quantizers
     learn their bit widths (CPQ with `learn_bits`), each epoch also records
     `average_weight_bits` (parameter-weighted) and `learned_weight_bits` (per
     layer) and prints them on one line.

Quantizer options: `weight_quantizer_options` and `activation_quantizer_options`
(JSON objects on the command line) are extra constructor arguments of the
method's quantizers, e.g. `{"learn_bits": true, "bit_regularization": 1e-3}`
for CPQ weights; the learned-bits penalty they enable (`add_loss`) is part of
the training loss on both training paths.

Loss: sparse softmax cross-entropy on the logits, summed over the replica's
examples and divided by the *global* batch, so the gradient summed over
replicas equals the single-device gradient. With a teacher, the soft-target
loss T^2 * KL(softmax(teacher / T) || softmax(student / T)) (Hinton et al.,
2015, arXiv:1503.02531) is added with weight `distill_weight`; with
`labels="none"` it is the only loss and the training pipeline carries no
labels at all.

Weight decay is Keras' decoupled form (w -= lr * wd * w), applied to kernels
only (not to biases, BatchNorm parameters or quantizer parameters).

Multi-worker outputs: worker 0 writes `model_dir`; worker k > 0 writes
`model_dir/worker_k` (its checkpoints and final model), so workers sharing a
file system never write the same file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import zipfile
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import summary_pb2

import tfquant
from tfquant import callbacks, fileio, precision, quantizers
from tfquant.quantizers import cpq
from tfquant.quantizers.base import Quantizer, check_bits, registered_names
from train import backup, input_pipeline, models
from train import strategy as strategy_lib

FIT_STRATEGIES = ("off", "one_device", "mirrored")
LOOP_STRATEGIES = ("multi_worker_mirrored", "tpu")
_BACKUP = "backup"
_CHECKPOINTS = "checkpoints"
# Quantizer arguments the binary sets itself (from the bit-width flags and the
# quantizer's role); --*_quantizer_options may not override them.
_RESERVED_OPTIONS = ("bits", "signed", "for_weights")


@dataclasses.dataclass
class TrainConfig:
    """Everything a run depends on; written to `model_dir/config.json`.

    Attributes mirror the flags of `train/train.py`; see their help.
    """

    method: str = "float"
    weight_bits: int = 4
    activation_bits: int = 4
    first_last_bits: str = "8"
    model: str = "small_cnn"
    model_alpha: float = 1.0
    dataset: str = "digits"
    data_dir: str | None = None
    epochs: int = 1
    batch_size: int = 64
    steps_per_epoch: int | None = None
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    quantizer_learning_rate: float | None = None
    momentum: float = 0.9
    weight_decay: float = 0.0
    init_from: str | None = None
    strategy: str = "off"
    tpu: str | None = None
    mixed_precision: bool = False
    deterministic: bool = False
    seed: int = 0
    distill_from: str | None = None
    labels: str = "true"
    distill_temperature: float = 1.0
    distill_weight: float = 0.5
    calibration_samples: int = 512
    bn_reestimation_batches: int = 0
    weight_quantizer_options: dict | str = dataclasses.field(default_factory=dict)
    activation_quantizer_options: dict | str = dataclasses.field(default_factory=dict)
    qn_phases: str = ""

    def __post_init__(self):
        # The flags give JSON text: keep it parsed when it is an object; anything
        # else stays as given for `validate_config` to report.
        for flag in ("weight_quantizer_options", "activation_quantizer_options"):
            value = getattr(self, flag)
            if isinstance(value, str):
                try:
                    parsed = json.loads(value) if value.strip() else {}
                except ValueError:
                    continue
                if isinstance(parsed, dict):
                    setattr(self, flag, parsed)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def quantized(self) -> bool:
        return self.method != "float"

    @property
    def weight_method(self) -> str:
        """The weight quantizer of `method` ('pact' quantizes weights with LSQ)."""
        return "lsq" if self.method == "pact" else self.method

    def scheme(self) -> tfquant.Scheme | None:
        if not self.quantized:
            return None
        first_last = None if self.first_last_bits == "same" else int(self.first_last_bits)
        return tfquant.Scheme(
            weights=_quantizer_spec(self.weight_method, self.weight_quantizer_options),
            activations=_quantizer_spec(self.method, self.activation_quantizer_options),
            bits=self.weight_bits,
            weight_bits=self.weight_bits,
            activation_bits=self.activation_bits,
            first_last_bits=first_last,
        )


def _quantizer_spec(name: str, options: dict) -> str | dict:
    """A quantizer name, or `{"class_name": name, "config": options}` with options."""
    return {"class_name": name, "config": dict(options)} if options else name


class FlagError(ValueError):
    """A bad setting, as `--flag=value: reason`."""


def _bad(flag: str, value: Any, why: str) -> FlagError:
    if isinstance(value, dict):
        value = json.dumps(value)
    return FlagError(f"--{flag}={value}: {why}")


def _check_quantizer_options(config: TrainConfig) -> None:
    """JSON objects of arguments the method's quantizers accept; each is tried
    by constructing the quantizer at every bit width the scheme gives it."""
    weight_bits = [config.weight_bits]
    if config.first_last_bits != "same" and int(config.first_last_bits) != config.weight_bits:
        weight_bits.append(int(config.first_last_bits))
    roles = (
        ("weight_quantizer_options", config.weight_method, weight_bits, True),
        ("activation_quantizer_options", config.method, [config.activation_bits], False),
    )
    for flag, name, bit_widths, for_weights in roles:
        options = getattr(config, flag)
        if isinstance(options, str):
            try:
                options = json.loads(options)
            except ValueError as error:
                raise _bad(flag, options, f"not valid JSON ({error})") from None
        if not isinstance(options, dict):
            raise _bad(
                flag,
                getattr(config, flag),
                f"must be a JSON object of quantizer arguments, got {type(options).__name__}",
            )
        if not options:
            continue
        if not config.quantized:
            raise _bad(flag, options, "--method=float has no quantizers to configure")
        reserved = sorted(set(options) & set(_RESERVED_OPTIONS))
        if reserved:
            raise _bad(
                flag,
                options,
                f"{reserved} are set from the bit-width flags and the quantizer's role; "
                "remove them",
            )
        for bits in bit_widths:
            try:
                quantizers.get(
                    {"class_name": name, "config": options},
                    bits=bits,
                    signed=for_weights,
                    for_weights=for_weights,
                )
            except (TypeError, ValueError) as error:
                # Keras wraps constructor errors in a deserialization message; keep the cause.
                why = str(error).split("Exception encountered:")[-1].strip()
                role = "weight" if for_weights else "activation"
                raise _bad(
                    flag,
                    options,
                    f"not accepted by the {name!r} {role} quantizer at {bits} bits: {why}",
                ) from None


def validate_config(config: TrainConfig) -> None:
    """Checks every setting; reads (never writes) the files it names.

    Raises:
      ValueError: the first bad setting, as `--flag=value: reason`.
    """
    methods = ["float", *registered_names()]
    if config.method not in methods:
        raise _bad("method", config.method, f"unknown method; use one of {methods}")
    for flag in ("weight_bits", "activation_bits"):
        try:
            check_bits(getattr(config, flag), config.method)
        except ValueError as error:
            raise _bad(flag, getattr(config, flag), str(error)) from None
    if config.first_last_bits != "same":
        try:
            check_bits(int(config.first_last_bits), "the first and last layers")
        except ValueError as error:
            raise _bad("first_last_bits", config.first_last_bits, f"{error} (or 'same')") from None
    _check_quantizer_options(config)
    if config.quantized:
        try:
            config.scheme()
        except ValueError as error:
            raise _bad("method", config.method, str(error)) from None
    if config.model not in models.MODELS:
        raise _bad("model", config.model, f"unknown model; use one of {sorted(models.MODELS)}")
    if not config.model_alpha > 0:
        raise _bad("model_alpha", config.model_alpha, "must be > 0")
    for flag in ("epochs", "batch_size", "calibration_samples"):
        if getattr(config, flag) < 1:
            raise _bad(flag, getattr(config, flag), "must be >= 1")
    if config.bn_reestimation_batches < 0:
        raise _bad("bn_reestimation_batches", config.bn_reestimation_batches, "must be >= 0")
    if config.steps_per_epoch is not None and config.steps_per_epoch < 1:
        raise _bad("steps_per_epoch", config.steps_per_epoch, "must be >= 1 (or unset)")
    if config.optimizer not in ("sgd", "adam"):
        raise _bad("optimizer", config.optimizer, "use 'sgd' or 'adam'")
    for flag in ("learning_rate", "quantizer_learning_rate"):
        value = getattr(config, flag)
        if value is not None and not (np.isfinite(value) and value > 0):
            raise _bad(flag, value, "must be a finite number > 0")
    if not 0 <= config.momentum < 1:
        raise _bad("momentum", config.momentum, "must be in [0, 1)")
    if not (np.isfinite(config.weight_decay) and config.weight_decay >= 0):
        raise _bad("weight_decay", config.weight_decay, "must be a finite number >= 0")
    if config.strategy not in strategy_lib.STRATEGY_NAMES:
        raise _bad("strategy", config.strategy, f"use one of {strategy_lib.STRATEGY_NAMES}")
    if config.labels not in ("true", "none"):
        raise _bad("labels", config.labels, "use 'true' or 'none'")
    if config.labels == "none" and not config.distill_from:
        raise _bad("labels", config.labels, "training without labels needs --distill_from")
    if not config.distill_temperature > 0:
        raise _bad("distill_temperature", config.distill_temperature, "must be > 0")
    if not 0 <= config.distill_weight <= 1:
        raise _bad("distill_weight", config.distill_weight, "must be in [0, 1]")
    if config.qn_phases:
        if config.method != "qn":
            raise _bad("qn_phases", config.qn_phases, "needs --method=qn")
        epochs = qn_phase_epochs(config.qn_phases)
        if epochs is None:
            raise _bad(
                "qn_phases",
                config.qn_phases,
                "use three epoch counts >= 0 'WEIGHTS,ACTIVATIONS,BOTH', e.g. '3,3,4'",
            )
        if sum(epochs) != config.epochs:
            raise _bad(
                "qn_phases",
                config.qn_phases,
                f"the phases last {sum(epochs)} epochs, --epochs is {config.epochs}",
            )
    for flag in ("init_from", "distill_from"):
        path = getattr(config, flag)
        if path and not path.endswith(".keras"):
            raise _bad(flag, path, "must be a .keras file")
        if path and not os.path.isfile(path):
            raise _bad(flag, path, "file does not exist")
        if path:
            problem = keras_archive_problem(path)
            if problem:
                raise _bad(flag, path, problem)
    try:
        input_pipeline.check_dataset(config.dataset, config.data_dir)
    except ValueError as error:
        raise _bad("dataset", config.dataset, str(error)) from None


def keras_archive_problem(path: str) -> str | None:
    """What makes `path` not a readable `.keras` archive (a zip file holding
    config.json and the weights, model.weights.h5 or .npz), or None."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
    except (zipfile.BadZipFile, OSError) as error:
        return f"not a .keras archive (not a readable zip file: {error})"
    missing = [] if "config.json" in names else ["config.json"]
    if not names & {"model.weights.h5", "model.weights.npz"}:
        missing.append("model.weights.h5")
    if missing:
        return f"not a .keras archive (no {', '.join(missing)} inside)"
    return None


def model_dir_problem(path: str) -> str | None:
    """What keeps the training binary from writing into `path`, or None: it
    names an existing file, sits under a file, or under a directory this
    process cannot write."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        return "exists and is not a directory"
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing} is a file, not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def check_replicas(config: TrainConfig, strategy: tf.distribute.Strategy) -> None:
    """Raises ValueError when the global batch does not split over the replicas."""
    try:
        strategy_lib.per_replica_batch_size(config.batch_size, strategy.num_replicas_in_sync)
    except ValueError as error:
        raise _bad("batch_size", config.batch_size, str(error)) from None


# ---------------------------------------------------------------------------
# Models


def quantizer_layers(model: keras.layers.Layer) -> list[tuple[str, Quantizer]]:
    """Every tfquant Quantizer in `model`, with the name of the top-level layer
    that holds it."""
    found, seen = [], set()
    for layer in getattr(model, "layers", [model]):
        for sub in layer._flatten_layers(include_self=True):
            if isinstance(sub, Quantizer) and id(sub) not in seen:
                seen.add(id(sub))
                found.append((layer.name, sub))
    return found


def quantizer_variable_ids(model: keras.layers.Layer) -> set[int]:
    return {id(v) for _, q in quantizer_layers(model) for v in q.trainable_variables}


def float_model_from(path: str, config: TrainConfig, input_shape, num_classes) -> keras.Model:
    """The float model to train or quantize from `--init_from`.

    A float checkpoint is returned as loaded. A quantized one (a previous
    stage of a progressive schedule) gives its float weights to a fresh zoo
    model `config.model`, matched by layer name; the next stage's quantizers
    are then initialized from them (DQ's float kernel is not trained, so a DQ
    checkpoint passes on its pre-DQ weights).
    """
    loaded = keras.saving.load_model(path, compile=False)
    if not quantizer_layers(loaded):
        return loaded
    model = models.build(config.model, input_shape, num_classes, **_model_options(config))
    for layer in model.layers:
        if not layer.weights:
            continue
        try:
            source = loaded.get_layer(layer.name)
        except ValueError:
            raise ValueError(
                f"--init_from={path}: layer {layer.name!r} of model {config.model!r} is not in "
                "the checkpoint; pass the --model it was trained with"
            ) from None
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            values = [source.kernel.numpy()] + ([source.bias.numpy()] if layer.use_bias else [])
        else:
            values = source.get_weights()
        layer.set_weights(values)
    return model


def _model_options(config: TrainConfig) -> dict:
    return {"alpha": config.model_alpha} if config.model == "mobilenet_v2" else {}


def build_network(config: TrainConfig, pipeline: input_pipeline.InputPipeline) -> keras.Model:
    """The model to train: zoo or `--init_from`, quantized by the method."""
    if config.init_from:
        model = float_model_from(
            config.init_from, config, pipeline.input_shape, pipeline.num_classes
        )
        shape = tuple(model.inputs[0].shape[1:])
        if shape != tuple(pipeline.input_shape):
            raise ValueError(
                f"--init_from={config.init_from}: the model takes inputs of shape {shape}, "
                f"dataset {config.dataset!r} has {tuple(pipeline.input_shape)}"
            )
    else:
        model = models.build(
            config.model, pipeline.input_shape, pipeline.num_classes, **_model_options(config)
        )
    if not config.quantized:
        return model
    calibration = pipeline.calibration_batch(config.calibration_samples)
    return tfquant.quantize_model(
        model, config.scheme(), calibration, calibration_samples=config.calibration_samples
    )


def _make_optimizer(name: str, learning_rate: float, momentum: float, weight_decay: float):
    weight_decay = weight_decay or None
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=momentum, weight_decay=weight_decay)
    return keras.optimizers.Adam(learning_rate, weight_decay=weight_decay)


class TrainingModel(keras.Model):
    """Wraps the network with its loss, optional teacher and two optimizers.

    `step(data)` is one replica's forward, backward and update; it returns
    the replica's loss sum, correct count and example count. `train_step`
    (for `fit`) and the custom loop both call it.
    """

    def __init__(
        self,
        network: keras.Model,
        teacher: keras.Model | None = None,
        labels: bool = True,
        distill_temperature: float = 1.0,
        distill_weight: float = 0.5,
        **kwargs,
    ):
        super().__init__(name="training_model", **kwargs)
        self.network = network
        self.teacher = teacher
        self.use_labels = labels
        self.distill_temperature = float(distill_temperature)
        self.distill_weight = float(distill_weight) if teacher is not None else 0.0
        self.quantizer_optimizer = None
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.accuracy_tracker = keras.metrics.Mean(name="accuracy")
        # Training without labels reports top-1 agreement with the teacher.
        self.agreement_tracker = keras.metrics.Mean(name="teacher_agreement")

    def call(self, inputs, training=None):
        return self.network(inputs, training=training)

    @property
    def metrics(self):
        return [self.loss_tracker, self.accuracy_tracker, self.agreement_tracker]

    def setup_optimizers(self, weight_optimizer, quantizer_optimizer) -> None:
        """Builds the two optimizers on their variables (inside the strategy
        scope) and compiles with the weight optimizer."""
        quantizer_ids = quantizer_variable_ids(self.network)
        variables = self.network.trainable_variables
        self.weight_variables = [v for v in variables if id(v) not in quantizer_ids]
        self.quantizer_variables = [v for v in variables if id(v) in quantizer_ids]
        self.state_variables = [
            v for v in self.network.non_trainable_variables if "float" in str(v.dtype)
        ]
        self.built = True  # the network is built; the wrapper has no weights of its own
        self.compile(optimizer=weight_optimizer)
        no_decay = [v for v in self.weight_variables if len(v.shape) < 2]
        if no_decay:
            weight_optimizer.exclude_from_weight_decay(var_list=no_decay)
        weight_optimizer.build(self.weight_variables)
        if self.quantizer_variables:
            self.quantizer_optimizer = quantizer_optimizer
            quantizer_optimizer.build(self.quantizer_variables)

    def _per_example_losses(self, data, training: bool):
        if self.use_labels or not training:
            x, y = data
        else:
            x, y = (data[0] if isinstance(data, (tuple, list)) else data), None
        logits = tf.cast(self.network(x, training=training), tf.float32)
        count = tf.shape(logits)[0]
        losses = tf.zeros([count])
        teacher_top1 = None
        if self.teacher is not None and training:
            teacher_logits = tf.stop_gradient(tf.cast(self.teacher(x, training=False), tf.float32))
            temperature = self.distill_temperature
            soft = tf.nn.softmax(teacher_logits / temperature)
            log_student = tf.nn.log_softmax(logits / temperature)
            log_teacher = tf.nn.log_softmax(teacher_logits / temperature)
            kl = tf.reduce_sum(soft * (log_teacher - log_student), axis=-1)
            weight = 1.0 if y is None else self.distill_weight
            losses += weight * temperature**2 * kl
            teacher_top1 = tf.argmax(teacher_logits, axis=-1, output_type=tf.int32)
        if y is not None:
            y = tf.cast(tf.reshape(y, [-1]), tf.int32)
            cross_entropy = tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits)
            weight = 1.0 if self.teacher is None or not training else 1.0 - self.distill_weight
            losses += weight * cross_entropy
        target = y if y is not None else teacher_top1
        correct = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), target), tf.float32)
        return losses, correct, count

    def step(self, data):
        """One replica's training step; returns (loss sum, correct, count)."""
        replicas = tf.distribute.get_replica_context().num_replicas_in_sync
        with tf.GradientTape() as tape:
            losses, correct, count = self._per_example_losses(data, training=True)
            global_batch = tf.cast(count * replicas, tf.float32)
            loss = tf.reduce_sum(losses) / global_batch
            regularization = self.network.losses
            if regularization:
                loss += tf.add_n(regularization) / replicas
        variables = self.weight_variables + self.quantizer_variables
        gradients = tape.gradient(loss, variables)
        split = len(self.weight_variables)
        self.optimizer.apply(gradients[:split], self.weight_variables)
        if self.quantizer_variables:
            self.quantizer_optimizer.apply(gradients[split:], self.quantizer_variables)
        return tf.reduce_sum(losses), tf.reduce_sum(correct), tf.cast(count, tf.float32)

    def evaluation_step(self, data):
        losses, correct, count = self._per_example_losses(data, training=False)
        return tf.reduce_sum(losses), tf.reduce_sum(correct), tf.cast(count, tf.float32)

    def _track(self, loss_sum, correct, count, accuracy_tracker):
        self.loss_tracker.update_state(loss_sum / count, sample_weight=count)
        accuracy_tracker.update_state(correct / count, sample_weight=count)
        return {m.name: m.result() for m in (self.loss_tracker, accuracy_tracker)}

    def train_step(self, data):
        tracker = self.accuracy_tracker if self.use_labels else self.agreement_tracker
        return self._track(*self.step(data), tracker)

    def test_step(self, data):
        return self._track(*self.evaluation_step(data), self.accuracy_tracker)


def load_teacher(path: str, num_classes: int) -> keras.Model:
    teacher = keras.saving.load_model(path, compile=False)
    teacher.trainable = False
    classes = teacher.outputs[0].shape[-1]
    if classes != num_classes:
        raise ValueError(
            f"--distill_from={path}: the teacher has {classes} outputs, the dataset "
            f"{num_classes} classes"
        )
    return teacher


# ---------------------------------------------------------------------------
# Recording


class RunRecorder:
    """metrics.json, TensorBoard scalars and one summary line per epoch."""

    def __init__(self, model_dir: str, network: keras.Model, enabled: bool = True):
        self.model_dir = model_dir
        self.network = network
        self.enabled = enabled
        self.path = os.path.join(model_dir, "metrics.json")
        self.history: list[dict] = []
        self.writer = None
        self.epoch_start = time.perf_counter()

    def start(self, start_epoch: int) -> None:
        """Keeps the records of the epochs before `start_epoch` (a resumed run)."""
        if os.path.exists(self.path):
            with open(self.path) as stream:
                self.history = [r for r in json.load(stream) if r["epoch"] < start_epoch]
        if self.enabled:
            self.writer = tf.summary.create_file_writer(os.path.join(self.model_dir, "tensorboard"))

    def quantizer_scalars(self) -> dict[str, float]:
        scalars = {}
        for layer_name, quantizer in quantizer_layers(self.network):
            for key, value in quantizer.parameters().items():
                scalars[f"quantizers/{layer_name}/{quantizer.name}/{key}"] = value
        return scalars

    def epoch_begin(self) -> None:
        self.epoch_start = time.perf_counter()

    def record(self, epoch: int, logs: dict) -> dict:
        row = {"epoch": epoch}
        row.update({k: float(v) for k, v in logs.items()})
        row["seconds"] = time.perf_counter() - self.epoch_start
        bits = learned_bits_report(self.network)
        if bits is not None:
            row["average_weight_bits"] = bits["average_weight_bits"]
            row["learned_weight_bits"] = bits["layers"]
        quantizer_values = self.quantizer_scalars()
        self.history.append(row)
        if self.enabled:
            fileio.write_atomically(self.path, json.dumps(self.history, indent=1))
            with self.writer.as_default(step=epoch + 1):
                for key, value in row.items():
                    if key not in ("epoch", "seconds") and isinstance(value, float):
                        write_scalar(key, value, epoch + 1)
                for key, value in quantizer_values.items():
                    write_scalar(key, value, epoch + 1)
            self.writer.flush()
        print(format_epoch(row), flush=True)
        if bits is not None:
            print(format_bits(row), flush=True)
        return row


def learned_bits_report(network: keras.Model) -> dict | None:
    """`cpq.report_bits(network)` when a kernel quantizer learns its bit width
    (CPQ with `learn_bits`), else None."""
    learning = any(
        isinstance(getattr(layer, "kernel_quantizer", None), cpq.CPQQuantizer)
        and layer.kernel_quantizer.gated
        for layer in network.layers
    )
    return cpq.report_bits(network) if learning else None


def write_scalar(tag: str, value: float, step: int) -> None:
    """A TensorBoard scalar through core TensorFlow (`tf.summary.scalar` needs the
    tensorboard package; this writes the same record, tagged for its scalar
    plugin)."""
    tf.summary.write(tag, tf.constant(value, tf.float32), step=step, metadata=_SCALAR_METADATA)


_SCALAR_METADATA = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
).SerializeToString()


def format_epoch(row: dict) -> str:
    parts = [f"epoch {row['epoch'] + 1}"]
    for key in ("loss", "accuracy", "teacher_agreement", "val_loss", "val_accuracy"):
        if key in row:
            value = row[key]
            parts.append(f"{key} {100 * value:.2f}%" if "acc" in key else f"{key} {value:.4f}")
    parts.append(f"{row['seconds']:.1f}s")
    return " | ".join(parts)


def format_bits(row: dict) -> str:
    layers = ", ".join(f"{name}={bits}" for name, bits in row["learned_weight_bits"].items())
    return (
        f"epoch {row['epoch'] + 1} | learned weight bits {layers} | "
        f"average {row['average_weight_bits']:.2f}"
    )


def format_table(history: list[dict]) -> str:
    header = f"{'epoch':>5} {'loss':>8} {'train acc':>9} {'val loss':>8} {'val acc':>8} {'time':>7}"
    lines = [header, "-" * len(header)]
    for row in history:
        train_acc = row.get("accuracy", row.get("teacher_agreement", float("nan")))
        lines.append(
            f"{row['epoch'] + 1:>5} {row.get('loss', float('nan')):>8.4f} "
            f"{100 * train_acc:>8.2f}% {row.get('val_loss', float('nan')):>8.4f} "
            f"{100 * row.get('val_accuracy', float('nan')):>7.2f}% {row['seconds']:>6.1f}s"
        )
    return "\n".join(lines)


def averaged_state(strategy, variables):
    """Means over all replicas (and workers) of non-trainable variables.

    Keras updates BatchNorm moving statistics and the moving ranges of
    min/max quantizers on each replica's copy only, so the copies (and the
    workers) drift apart. The training paths assign these means back after
    every step, which keeps all replicas equal: exact for moving means with
    equal per-replica batches; a moving variance becomes the mean of the
    per-replica variances. Call in cross-replica context (eager or inside a
    `tf.function`).
    """
    local = strategy.run(lambda: [tf.identity(v.value) for v in variables])
    return [strategy.reduce(tf.distribute.ReduceOp.MEAN, value, axis=None) for value in local]


class _StateAveraging(keras.callbacks.Callback):
    """Averages the replicas' non-trainable state after every batch (fit path)."""

    def __init__(self, strategy, variables):
        super().__init__()
        self.strategy = strategy
        self.variables = variables
        self.update = tf.function(self._update)

    def _update(self):
        for variable, mean in zip(
            self.variables, averaged_state(self.strategy, self.variables), strict=True
        ):
            variable.assign(mean)

    def on_train_batch_end(self, batch, logs=None):
        self.update()


class _EpochCallback(keras.callbacks.Callback):
    def __init__(self, recorder: RunRecorder, epoch_hooks):
        super().__init__()
        self.recorder = recorder
        self.epoch_hooks = epoch_hooks

    def on_epoch_begin(self, epoch, logs=None):
        self.recorder.epoch_begin()
        for hook in self.epoch_hooks:
            hook(epoch)

    def on_epoch_end(self, epoch, logs=None):
        self.recorder.record(epoch, logs or {})


def qn_phase_epochs(text: str) -> tuple[int, int, int] | None:
    """'W,A,B' (epochs of QN's weights, activations and both phases), or None."""
    parts = text.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
        return None
    return tuple(int(p) for p in parts)


def qn_phase_at(epoch: int, epochs: tuple[int, int, int]) -> str:
    """The QN phase of a (0-based) epoch; epochs past the schedule train both."""
    from tfquant.quantizers import qnet

    end = 0
    for phase, length in zip(qnet.PHASES, epochs, strict=True):
        end += length
        if epoch < end:
            return phase
    return "both"


def _epoch_hooks(network: keras.Model, config: TrainConfig):
    """Per-epoch schedules of the methods that have one (QN's temperature and,
    with `qn_phases`, its weights / activations / both phases)."""
    hooks = []
    if config.method == "qn":
        from tfquant.quantizers import qnet

        scheduler = callbacks.TemperatureScheduler()
        scheduler.set_model(network)
        scheduler.on_train_begin()
        hooks.append(scheduler.on_epoch_begin)
        if config.qn_phases:
            epochs = qn_phase_epochs(config.qn_phases)

            def set_phase(epoch):
                # Set from the epoch alone, so a resumed run is in the right phase.
                phase = qn_phase_at(epoch, epochs)
                counts = qnet.qn_phase(network, phase)
                print(
                    f"epoch {epoch + 1} | QN phase {phase}: {counts['on']} quantizers on, "
                    f"{counts['off']} off",
                    flush=True,
                )

            hooks.append(set_phase)
    return hooks


# ---------------------------------------------------------------------------
# Training


def _output_dir(model_dir: str, strategy) -> str:
    if strategy_lib.is_chief(strategy):
        return model_dir
    return os.path.join(model_dir, f"worker_{strategy_lib.task_id(strategy)}")


def train(config: TrainConfig, model_dir: str, strategy=None, verbose: int = 1) -> dict:
    """Runs (or resumes) training as described in the module docstring.

    Args:
      config: a validated `TrainConfig`.
      model_dir: where checkpoints, metrics and the final model go.
      strategy: a strategy to use instead of `make_strategy(config.strategy)`.
      verbose: Keras progress bar mode for `fit` (0, 1 or 2).

    Returns:
      The last epoch's metrics, with `final_model` and `history`.
    """
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    if strategy is None:
        strategy = strategy_lib.make_strategy(config.strategy, config.tpu)
    check_replicas(config, strategy)
    previous_policy = keras.mixed_precision.global_policy()
    if config.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        return _train(config, model_dir, strategy, verbose)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)


def _train(config: TrainConfig, model_dir: str, strategy, verbose: int) -> dict:
    keras.utils.set_random_seed(config.seed)
    pipeline = input_pipeline.make_pipeline(
        config.dataset, config.batch_size, config.data_dir, config.seed, config.steps_per_epoch
    )
    with strategy.scope():
        network = build_network(config, pipeline)
        if config.bn_reestimation_batches and not tfquant.batch_norm.batch_norm_layers(network):
            raise _bad(
                "bn_reestimation_batches",
                config.bn_reestimation_batches,
                f"model {network.name!r} has no BatchNormalization layer",
            )
        teacher = (
            load_teacher(config.distill_from, pipeline.num_classes) if config.distill_from else None
        )
        model = TrainingModel(
            network,
            teacher,
            labels=config.labels == "true",
            distill_temperature=config.distill_temperature,
            distill_weight=config.distill_weight,
        )
        weight_optimizer = _make_optimizer(
            config.optimizer, config.learning_rate, config.momentum, config.weight_decay
        )
        quantizer_optimizer = _make_optimizer(
            config.optimizer,
            config.quantizer_learning_rate or config.learning_rate,
            config.momentum,
            0.0,
        )
        model.setup_optimizers(weight_optimizer, quantizer_optimizer)
    # Written once the model is built, so that a setting refused there leaves nothing.
    output_dir = _output_dir(model_dir, strategy)
    os.makedirs(output_dir, exist_ok=True)
    resolved = config.to_dict()
    resolved.update(
        num_replicas=strategy.num_replicas_in_sync,
        steps_per_epoch=pipeline.steps_per_epoch,
        input_shape=list(pipeline.input_shape),
        num_classes=pipeline.num_classes,
        scheme=config.scheme().to_dict() if config.quantized else None,
    )
    fileio.write_atomically(os.path.join(output_dir, "config.json"), json.dumps(resolved, indent=2))

    recorder = RunRecorder(output_dir, network)
    hooks = _epoch_hooks(network, config)
    if config.strategy in FIT_STRATEGIES:
        history = _train_with_fit(config, model, pipeline, recorder, hooks, output_dir, verbose)
    else:
        history = _train_with_loop(config, model, strategy, pipeline, recorder, hooks, output_dir)
    final_path = os.path.join(output_dir, "final.keras")
    # Mixed precision is a training detail: the saved model computes in float32,
    # as the integer file's verification expects.
    final = precision.float32_copy(network)
    if config.bn_reestimation_batches:
        final = _reestimated_batch_norm(final, network, config, pipeline)
    final.save(final_path)
    final.export(os.path.join(output_dir, "saved_model"), verbose=False)
    print("\n" + format_table(history), flush=True)
    result = dict(history[-1]) if history else {}
    result.update(final_model=final_path, history=history)
    return result


def _reestimated_batch_norm(final, network, config, pipeline) -> keras.Model:
    """A copy of `final` outside any strategy whose BatchNormalization
    statistics are those of `--bn_reestimation_batches` un-augmented
    training batches under the final weights (`tfquant.reestimate_batch_norm`)."""
    if final is network:
        final = network.__class__.from_config(network.get_config())
        final.set_weights(network.get_weights())
    rows = pipeline.calibration_batch(config.bn_reestimation_batches * config.batch_size)
    report = tfquant.reestimate_batch_norm(final, rows, batch_size=config.batch_size)
    worst = max(report.values(), key=lambda layer: layer["std_ratio"])
    print(
        f"BatchNormalization statistics re-estimated on {len(rows)} training rows "
        f"({len(report)} layers; largest std change {worst['std_ratio']:.3f}x)",
        flush=True,
    )
    return final


def _train_with_fit(config, model, pipeline, recorder, hooks, output_dir, verbose):
    backup_dir = os.path.join(output_dir, _BACKUP)
    start_epoch, weights = backup.committed(backup_dir)
    recorder.start(start_epoch)
    if start_epoch >= config.epochs:
        # A finished run started again: the result is the backup's weights,
        # not the freshly built model's (fit would not run to restore them).
        model.load_weights(weights)
        print(f"all {config.epochs} epochs are done; weights from the backup", flush=True)
        return recorder.history
    if start_epoch:
        print(f"resuming from the backup after epoch {start_epoch}", flush=True)
    train_data = pipeline.train_dataset(start_epoch, config.epochs, config.labels == "true")
    callbacks = [
        _EpochCallback(recorder, hooks),
        backup.AtomicBackup(backup_dir),
    ]
    strategy = model.distribute_strategy
    if strategy.num_replicas_in_sync > 1 and model.state_variables:
        callbacks.insert(0, _StateAveraging(strategy, model.state_variables))
    model.fit(
        train_data,
        epochs=config.epochs,
        steps_per_epoch=pipeline.steps_per_epoch,
        validation_data=pipeline.eval_dataset(),
        callbacks=callbacks,
        shuffle=False,
        verbose=verbose,
    )
    return recorder.history


def _train_with_loop(config, model, strategy, pipeline, recorder, hooks, output_dir):
    epoch_variable = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
    checkpoint = tf.train.Checkpoint(
        network=model.network,
        optimizer=model.optimizer,
        quantizer_optimizer=model.quantizer_optimizer or tf.train.Checkpoint(),
        epoch=epoch_variable,
    )
    manager = tf.train.CheckpointManager(
        checkpoint, os.path.join(output_dir, _CHECKPOINTS), max_to_keep=2
    )
    if manager.latest_checkpoint:
        checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        print(f"resuming from {manager.latest_checkpoint}", flush=True)
    start_epoch = int(epoch_variable.numpy())
    recorder.start(start_epoch)
    if start_epoch >= config.epochs:
        return recorder.history
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    train_data = pipeline.train_dataset(start_epoch, config.epochs, config.labels == "true")
    iterator = iter(strategy.experimental_distribute_dataset(train_data.with_options(options)))
    eval_data = strategy.experimental_distribute_dataset(
        pipeline.eval_dataset().with_options(options)
    )

    def reduce(values):
        return [strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for v in values]

    synchronize = strategy.num_replicas_in_sync > 1 and bool(model.state_variables)

    @tf.function
    def train_step(iterator):
        results = reduce(strategy.run(model.step, args=(next(iterator),)))
        if synchronize:
            means = averaged_state(strategy, model.state_variables)
            for variable, mean in zip(model.state_variables, means, strict=True):
                variable.assign(mean)
        return results

    @tf.function
    def eval_step(batch):
        return reduce(strategy.run(model.evaluation_step, args=(batch,)))

    accuracy_key = "accuracy" if config.labels == "true" else "teacher_agreement"
    chief = strategy_lib.is_chief(strategy)
    for epoch in range(start_epoch, config.epochs):
        recorder.epoch_begin()
        for hook in hooks:
            hook(epoch)
        progress = keras.utils.Progbar(pipeline.steps_per_epoch, verbose=1 if chief else 0)
        totals = np.zeros(3)
        for step in range(pipeline.steps_per_epoch):
            totals += np.array([float(v) for v in train_step(iterator)])
            progress.update(step + 1, [("loss", totals[0] / totals[2])])
        evaluation = np.zeros(3)
        for batch in eval_data:
            evaluation += np.array([float(v) for v in eval_step(batch)])
        logs = {
            "loss": totals[0] / totals[2],
            accuracy_key: totals[1] / totals[2],
            "val_loss": evaluation[0] / evaluation[2],
            "val_accuracy": evaluation[1] / evaluation[2],
        }
        recorder.record(epoch, logs)
        epoch_variable.assign(epoch + 1)
        manager.save(checkpoint_number=epoch + 1)
    return recorder.history
