"""Tests of the training binary (train/train.py) and its library modules."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags

import tfquant
from train import input_pipeline, models, trainer
from train import strategy as strategy_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = dict(dataset="digits", model="small_cnn", batch_size=32, steps_per_epoch=3)


def _env(**extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="")
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


def _binary(*args):
    return [sys.executable, "-m", "train.train", "--verbose=2", *args]


def _run(args, timeout=300, **env):
    return subprocess.run(
        _binary(*args), cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=timeout
    )


def _weights(path):
    return keras.saving.load_model(path, compile=False).get_weights()


def _assert_same_weights(first, second, atol=1e-6):
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_allclose(a, b, atol=atol, rtol=1e-5)


# ---------------------------------------------------------------- strategy


def test_strategy_names_and_batch_rule(cpu_devices):
    assert strategy_lib.make_strategy("off").num_replicas_in_sync == 1
    assert strategy_lib.make_strategy("one_device").num_replicas_in_sync == 1
    assert strategy_lib.make_strategy("mirrored").num_replicas_in_sync == len(cpu_devices)
    with pytest.raises(ValueError, match="'nccl'"):
        strategy_lib.make_strategy("nccl")
    assert strategy_lib.per_replica_batch_size(64, 2) == 32
    with pytest.raises(ValueError, match="batch_size 63 .* replicas \\(2\\)"):
        strategy_lib.per_replica_batch_size(63, 2)
    assert strategy_lib.scaled_learning_rate(0.1, 1024, 256) == pytest.approx(0.4)


def test_multi_worker_needs_tf_config(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="TF_CONFIG"):
        strategy_lib.make_strategy("multi_worker_mirrored")
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        strategy_lib.cluster_spec_from_environment()


# ---------------------------------------------------------------- input pipeline


def test_epochs_are_the_same_when_resumed():
    pipeline = input_pipeline.make_pipeline("digits", 32, seed=3, steps_per_epoch=4)
    full = list(pipeline.train_dataset(0, 3))
    resumed = list(pipeline.train_dataset(2, 3))
    assert len(full) == 12 and len(resumed) == 4
    for (x1, y1), (x2, y2) in zip(full[8:], resumed, strict=True):
        np.testing.assert_array_equal(x1.numpy(), x2.numpy())
        np.testing.assert_array_equal(y1.numpy(), y2.numpy())
    # Epochs differ from each other, and every label of an epoch is a real one.
    assert not np.array_equal(full[0][1].numpy(), full[4][1].numpy())
    images_only = pipeline.train_dataset(0, 1, with_labels=False)
    assert isinstance(images_only.element_spec, tf.TensorSpec)


def test_cifar_augmentation_crops_and_flips():
    image = tf.reshape(tf.range(32 * 32 * 3, dtype=tf.float32), (32, 32, 3))
    out = [input_pipeline.augment(image, "cifar", tf.constant([0, i], tf.int64)) for i in range(8)]
    assert all(o.shape == (32, 32, 3) for o in out)
    assert len({o.numpy().tobytes() for o in out}) > 1
    big = tf.random.uniform((300, 400, 3))
    assert input_pipeline.augment(big, "imagenet", tf.constant([1, 2], tf.int64)).shape == (
        224,
        224,
        3,
    )


def test_tfds_pipeline_with_mock_data(tmp_path):
    import tensorflow_datasets as tfds

    with pytest.raises(ValueError, match="tfds build mnist"):
        input_pipeline.check_dataset("mnist", str(tmp_path))
    with tfds.testing.mock_data(num_examples=64):
        input_pipeline.check_dataset("mnist")
        pipeline = input_pipeline.make_pipeline("mnist", 16, steps_per_epoch=2)
        assert pipeline.input_shape == (28, 28, 1) and pipeline.num_classes == 10
        batches = list(pipeline.train_dataset(0, 2))
        assert len(batches) == 4
        x, y = batches[0]
        assert x.shape == (16, 28, 28, 1) and x.dtype == tf.float32 and y.dtype == tf.int32
        assert float(tf.reduce_max(x)) <= 1.0
        x_test, _ = next(iter(pipeline.eval_dataset()))
        assert x_test.shape[1:] == (28, 28, 1)
        cifar = input_pipeline.make_pipeline("cifar10", 8, steps_per_epoch=1)
        x, _ = next(iter(cifar.train_dataset(0, 1)))
        assert x.shape == (8, 32, 32, 3)


# ---------------------------------------------------------------- models


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,shape,options",
    [
        ("lenet5", (8, 8, 1), {}),
        ("preact_resnet20", (32, 32, 3), {}),
        ("resnet18", (64, 64, 3), {}),
        ("preact_resnet18", (64, 64, 3), {}),
        ("mobilenet_v2", (64, 64, 3), {"alpha": 0.35}),
    ],
)
def test_zoo_models_quantize(name, shape, options):
    model = models.build(name, shape, 10, **options)
    with pytest.warns(UserWarning, match="calibration_data"):
        qmodel = tfquant.quantize_model(model, "lsq_w4a4")
    assert qmodel(np.zeros((2, *shape), np.float32)).shape == (2, 10)
    if name == "mobilenet_v2":
        assert any(isinstance(layer, keras.layers.DepthwiseConv2D) for layer in model.layers)
        assert models.build(name, shape, 10, alpha=1.0).count_params() > model.count_params()


# ---------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("method", "nope", "--method=nope: unknown method"),
        ("weight_bits", 0, "--weight_bits=0: bits must be in 2..8"),
        ("activation_bits", 9, "--activation_bits=9"),
        ("first_last_bits", "1", "--first_last_bits=1"),
        ("dataset", "npz:/no/such/file.npz", "--dataset=npz:/no/such/file.npz: .*does not exist"),
        ("dataset", "imagenet", "--dataset=imagenet: unknown dataset"),
        ("model", "vgg", "--model=vgg: unknown model"),
        ("optimizer", "rmsprop", "--optimizer=rmsprop"),
        ("labels", "none", "--labels=none: training without labels needs --distill_from"),
        ("init_from", "/no/model.keras", "--init_from=/no/model.keras: file does not exist"),
        ("quantizer_learning_rate", -1.0, "--quantizer_learning_rate=-1.0"),
        ("bn_reestimation_batches", -1, "--bn_reestimation_batches=-1: must be >= 0"),
    ],
)
def test_validate_config_names_flag_and_value(field, value, match):
    config = trainer.TrainConfig(**{field: value})
    with pytest.raises(ValueError, match=match):
        trainer.validate_config(config)


@pytest.mark.parametrize(
    "content,match",
    [
        (b"not a zip", "not a .keras archive \\(not a readable zip file"),
        (None, "not a .keras archive \\(no config.json, model.weights.h5 inside\\)"),
    ],
)
@pytest.mark.parametrize("flag", ["init_from", "distill_from"])
def test_a_file_that_is_not_a_keras_archive_is_named(tmp_path, flag, content, match):
    """Keras itself reports "File not found" for a .keras file that exists
    but is no archive; the flag check says what is wrong."""
    path = tmp_path / "model.keras"
    if content is None:
        import zipfile

        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("notes.txt", "a zip, but no model")
    else:
        path.write_bytes(content)
    config = trainer.TrainConfig(**{flag: str(path)})
    with pytest.raises(ValueError, match=f"--{flag}={path}: {match}"):
        trainer.validate_config(config)


def _main_with_flags(argv):
    from train import train as binary

    flags.FLAGS.unparse_flags()
    try:
        flags.FLAGS(["train", *argv])
        with pytest.raises(SystemExit) as exit_info:
            binary.main(["train"])
        return exit_info.value.code
    finally:
        flags.FLAGS.unparse_flags()


def test_a_model_dir_that_cannot_be_written_is_named(tmp_path, capsys, cpu_devices):
    """Before: a FileExistsError traceback from the first write."""
    taken = tmp_path / "taken"
    taken.write_text("a file")
    assert _main_with_flags(["--method=float", f"--model_dir={taken}"]) not in (0, None)
    assert f"--model_dir={taken}: exists and is not a directory" in capsys.readouterr().err
    under = taken / "run"
    assert _main_with_flags(["--method=float", f"--model_dir={under}"]) not in (0, None)
    assert f"--model_dir={under}: {taken} is a file, not a directory" in capsys.readouterr().err
    assert taken.read_text() == "a file"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--method=nope"], "--method=nope"),
        (["--weight_bits=0"], "--weight_bits=0"),
        (["--dataset=npz:/missing.npz"], "--dataset=npz:/missing.npz"),
        (["--strategy=mirrored", "--batch_size=63"], "--batch_size=63"),
        (
            ["--method=cpq", '--weight_quantizer_options={"learn_bits": 1'],
            '--weight_quantizer_options={"learn_bits": 1: not valid JSON',
        ),
        (["--method=qn", "--qn_phases=2,2,2"], "--qn_phases=2,2,2"),
    ],
)
def test_bad_flags_exit_and_write_nothing(tmp_path, capsys, cpu_devices, args, message):
    model_dir = tmp_path / "run"
    code = _main_with_flags([*args, f"--model_dir={model_dir}"])
    assert code not in (0, None)
    assert message in capsys.readouterr().err
    assert not model_dir.exists()


@pytest.mark.slow
def test_bad_flag_in_a_real_process(tmp_path):
    model_dir = tmp_path / "run"
    result = _run(["--method=nope", f"--model_dir={model_dir}"], timeout=180)
    assert result.returncode != 0
    assert "--method=nope: unknown method" in result.stderr
    assert not model_dir.exists()


# ---------------------------------------------------------------- optimizers


def test_quantizer_variables_get_their_own_optimizer():
    config = trainer.TrainConfig(method="qil", **QUICK)
    pipeline = input_pipeline.make_pipeline("digits", 32, steps_per_epoch=1)
    network = trainer.build_network(config, pipeline)
    model = trainer.TrainingModel(network)
    weights = keras.optimizers.SGD(0.1)
    quantizer = keras.optimizers.SGD(1e-3)
    model.setup_optimizers(weights, quantizer)
    quantizer_ids = trainer.quantizer_variable_ids(network)
    assert model.quantizer_variables and model.weight_variables
    assert {id(v) for v in model.quantizer_variables} == quantizer_ids
    assert len(model.weight_variables) + len(model.quantizer_variables) == len(
        network.trainable_variables
    )
    before = [v.numpy().copy() for v in model.quantizer_variables]
    kernel_before = [v.numpy().copy() for v in model.weight_variables]
    x, y = next(iter(pipeline.train_dataset(0, 1)))
    model.step((x, y))
    quantizer_change = max(
        np.abs(v.numpy() - b).max() for v, b in zip(model.quantizer_variables, before, strict=True)
    )
    weight_change = max(
        np.abs(v.numpy() - b).max()
        for v, b in zip(model.weight_variables, kernel_before, strict=True)
    )
    assert weight_change > 0
    # SGD without momentum: the step is lr * gradient; recompute the quantizer
    # step with the weight learning rate to check the 100x ratio.
    assert quantizer_change < weight_change


# ---------------------------------------------------------------- training runs


def _quick_config(**overrides):
    return trainer.TrainConfig(**{**QUICK, "epochs": 1, **overrides})


def test_mirrored_matches_one_device(tmp_path, cpu_devices):
    results = {}
    for name in ("one_device", "mirrored"):
        keras.backend.clear_session()
        # LeNet-5 has no BatchNorm, and the float model no min/max requantizer:
        # both take statistics of each replica's half batch.
        config = _quick_config(
            method="float", model="lenet5", batch_size=32, optimizer="sgd", learning_rate=0.05
        )
        strategy = strategy_lib.make_strategy(name)
        results[name] = trainer.train(config, str(tmp_path / name), strategy, verbose=0)
        results[name]["weights"] = _weights(results[name]["final_model"])
    assert strategy_lib.make_strategy("mirrored").num_replicas_in_sync == 2
    one, mirrored = results["one_device"], results["mirrored"]
    assert mirrored["loss"] == pytest.approx(one["loss"], rel=1e-4)
    assert mirrored["val_loss"] == pytest.approx(one["val_loss"], rel=1e-4)
    _assert_same_weights(one["weights"], mirrored["weights"], atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lsq", "pact", "qn", "dq"])
def test_each_method_trains(tmp_path, method):
    if method not in tfquant.quantizers.registered_names():
        pytest.skip(f"{method} is not registered")
    result = trainer.train(_quick_config(method=method), str(tmp_path), verbose=0)
    assert np.isfinite(result["loss"])
    assert os.path.exists(tmp_path / "final.keras")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics] == [0]


def test_bn_reestimation_sets_the_statistics_of_training_rows(tmp_path, capsys):
    from tfquant.datasets import load_arrays

    config = _quick_config(method="lsq", bn_reestimation_batches=2)
    result = trainer.train(config, str(tmp_path), verbose=0)
    assert "re-estimated on 64 training rows (3 layers" in capsys.readouterr().out
    model = keras.models.load_model(result["final_model"])
    rows = load_arrays("digits").x_train[:64]
    conv = model.get_layer("block1_conv")
    outputs = keras.Model(model.inputs, conv.output)(rows, training=False).numpy()
    bn = model.get_layer("block1_bn")
    np.testing.assert_allclose(
        bn.moving_mean.numpy(), outputs.reshape(-1, outputs.shape[-1]).mean(0), atol=1e-4
    )
    # a model without BatchNormalization is refused before any training
    lenet = _quick_config(method="float", model="lenet5", bn_reestimation_batches=1)
    with pytest.raises(ValueError, match="--bn_reestimation_batches=1: model .* no BatchNorm"):
        trainer.train(lenet, str(tmp_path / "lenet"), verbose=0)
    assert not os.path.exists(tmp_path / "lenet" / "metrics.json")
    assert not os.path.exists(tmp_path / "lenet")


def test_mixed_precision_trains_and_saves_a_float32_model(tmp_path):
    from tfquant import lite, precision
    from tfquant.datasets import load_arrays

    config = _quick_config(method="qil", mixed_precision=True)
    result = trainer.train(config, str(tmp_path), verbose=0)
    assert np.isfinite(result["loss"])
    assert keras.mixed_precision.global_policy().name == "float32"  # restored
    model = keras.models.load_model(result["final_model"])
    assert precision.reduced_precision_layers(model) == []
    data = load_arrays("digits")
    exported = lite.export_model(model, data.x_test[:100], data.y_test[:100], allow_mismatch=True)
    assert exported.report["verification"]["top1_agreement"] >= 0.95
    # A model still computing in bfloat16 is refused with the layer named.
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        low = models.small_cnn((8, 8, 1), 10)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    with pytest.raises(lite.ExportError, match="reduced precision.*bfloat16.*float32_copy"):
        lite.export_model(low, data.x_test[:10])


@pytest.mark.slow
def test_distillation_without_labels(tmp_path):
    teacher = models.small_cnn((8, 8, 1), 10)
    teacher_path = str(tmp_path / "teacher.keras")
    teacher.save(teacher_path)
    config = _quick_config(method="qil", distill_from=teacher_path, labels="none")
    trainer.validate_config(config)
    result = trainer.train(config, str(tmp_path / "run"), verbose=0)
    assert np.isfinite(result["loss"])
    # Training saw no labels: it reports agreement with the teacher, and
    # accuracy only on the (labelled) validation split.
    assert 0.0 <= result["teacher_agreement"] <= 1.0
    assert "accuracy" not in result and 0.0 <= result["val_accuracy"] <= 1.0


@pytest.mark.slow
def test_binary_end_to_end_float_then_qil(tmp_path):
    float_dir, qil_dir = tmp_path / "float", tmp_path / "qil"
    common = ["--dataset=digits", "--model=small_cnn", "--epochs=1", "--steps_per_epoch=10"]
    result = _run([*common, "--method=float", f"--model_dir={float_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("final.keras", "metrics.json", "config.json", "saved_model", "tensorboard"):
        assert (float_dir / name).exists(), name
    result = _run(
        [
            *common,
            "--method=qil",
            "--quantizer_learning_rate=1e-5",
            f"--init_from={float_dir / 'final.keras'}",
            f"--model_dir={qil_dir}",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "epoch 1 | loss" in result.stdout and "val acc" in result.stdout
    config = json.loads((qil_dir / "config.json").read_text())
    assert config["method"] == "qil" and config["scheme"]["weights"] == "qil"
    metrics = json.loads((qil_dir / "metrics.json").read_text())
    assert 0.0 <= metrics[-1]["val_accuracy"] <= 1.0
    events = os.listdir(qil_dir / "tensorboard")
    assert events
    tags = set()
    for path in events:
        for event in tf.compat.v1.train.summary_iterator(str(qil_dir / "tensorboard" / path)):
            tags.update(value.tag for value in event.summary.value)
    assert {"loss", "accuracy", "val_accuracy"} <= tags
    assert any(tag.startswith("quantizers/") for tag in tags)
    qmodel = keras.saving.load_model(qil_dir / "final.keras")
    assert any(type(layer).__name__ == "QuantConv2D" for layer in qmodel.layers)


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.slow
def test_two_worker_multi_worker_mirrored(tmp_path):
    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    model_dir = tmp_path / "run"
    args = [
        "--strategy=multi_worker_mirrored",
        "--method=qil",
        "--dataset=digits",
        "--epochs=2",
        "--steps_per_epoch=4",
        "--batch_size=32",
        f"--model_dir={model_dir}",
    ]
    processes = []
    for index in range(2):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        processes.append(
            subprocess.Popen(
                _binary(*args),
                cwd=ROOT,
                env=_env(TF_CONFIG=json.dumps(tf_config)),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=420))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr[-3000:]
    chief = _weights(model_dir / "final.keras")
    other = _weights(model_dir / "worker_1" / "final.keras")
    _assert_same_weights(chief, other, atol=0)
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics] == [0, 1]
    assert os.path.isdir(model_dir / "checkpoints")


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(tmp_path):
    args = [
        "--method=qil",
        "--dataset=digits",
        "--epochs=3",
        "--batch_size=64",
        "--deterministic",
        "--seed=1",
    ]
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    reference = subprocess.Popen(
        _binary(*args, f"--model_dir={reference_dir}"),
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    victim = subprocess.Popen(
        _binary(*args, f"--model_dir={killed_dir}"),
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metadata = killed_dir / "backup" / "training_metadata.json"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and victim.poll() is None:
            if metadata.exists():
                break
            time.sleep(0.02)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
    finally:
        if victim.poll() is None:
            victim.kill()
    assert victim.returncode == -signal.SIGKILL
    assert metadata.exists(), "the run was killed before its first backup"
    killed_at = json.loads(metadata.read_text())["epoch"]
    assert killed_at < 3 and not (killed_dir / "final.keras").exists()
    resumed = _run([*args, f"--model_dir={killed_dir}"], timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from the backup after epoch {killed_at}" in resumed.stdout
    _, stderr = reference.communicate(timeout=300)
    assert reference.returncode == 0, stderr[-3000:]
    _assert_same_weights(
        _weights(reference_dir / "final.keras"), _weights(killed_dir / "final.keras"), atol=1e-6
    )
    metrics = json.loads((killed_dir / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics] == [0, 1, 2]


@pytest.mark.parametrize(
    "recipe",
    sorted(f for f in os.listdir(os.path.join(ROOT, "train", "recipes")) if f.endswith(".cfg")),
)
def test_recipes_parse_and_validate(recipe):
    from train import train as binary

    path = os.path.join(ROOT, "train", "recipes", recipe)
    text = open(path).read()
    assert text.startswith("#"), "each recipe starts with the paper setting it reproduces"
    flags.FLAGS.unparse_flags()
    try:
        flags.FLAGS(["train", f"--flagfile={path}", "--model_dir=/unused"])
        config = binary.config_from_flags()
    finally:
        flags.FLAGS.unparse_flags()
    if config.dataset.startswith("npz:"):
        data = config.dataset[len("npz:") :].split(":")[0]
        if not os.path.exists(data):
            pytest.skip(f"{recipe}: the data file {data} is not on this machine")
    else:
        try:
            input_pipeline.check_dataset(config.dataset, config.data_dir)
        except ValueError:
            # A full-scale recipe (ImageNet) on a machine without the data:
            # every other setting is still checked.
            config = dataclasses.replace(config, dataset="digits")
    trainer.validate_config(config)
    if config.method != "float":
        assert config.method in tfquant.quantizers.registered_names()


# ---------------------------------------------------------------- quantizer options


@pytest.mark.parametrize(
    "overrides,match",
    [
        (
            {"method": "cpq", "weight_quantizer_options": '{"learn_bits": true'},
            '--weight_quantizer_options={"learn_bits": true: not valid JSON',
        ),
        (
            {"method": "cpq", "activation_quantizer_options": "[1, 2]"},
            r"--activation_quantizer_options=\[1, 2\]: must be a JSON object",
        ),
        (
            {"method": "cpq", "weight_quantizer_options": '{"learn_bit": true}'},
            '--weight_quantizer_options={"learn_bit": true}: not accepted by the '
            "'cpq' weight quantizer.*learn_bit",
        ),
        (
            {"method": "cpq", "weight_quantizer_options": {"gate_scale": -1.0}},
            '--weight_quantizer_options={"gate_scale": -1.0}: .*gate_scale must be',
        ),
        (
            # Two rates fit the 4-bit layers, not the 8-bit first and last ones.
            {"method": "cpq", "weight_quantizer_options": '{"drop_rates": [0.1, 0.05]}'},
            "--weight_quantizer_options=.*at 8 bits: drop_rates needs one rate per",
        ),
        (
            {"method": "cpq", "weight_quantizer_options": '{"bits": 3}'},
            "--weight_quantizer_options=.*'bits'.* set from the bit-width flags",
        ),
        (
            # 'pact' quantizes weights with LSQ, which learns no bit widths.
            {"method": "pact", "weight_quantizer_options": '{"learn_bits": true}'},
            "--weight_quantizer_options=.*'lsq' weight quantizer",
        ),
        (
            {"method": "float", "weight_quantizer_options": '{"learn_bits": true}'},
            "--weight_quantizer_options=.*--method=float has no quantizers",
        ),
        (
            {"method": "float", "activation_quantizer_options": '{"sigma_ratio": 0.5}'},
            "--activation_quantizer_options=.*--method=float",
        ),
    ],
)
def test_bad_quantizer_options_name_the_flag(overrides, match):
    with pytest.raises(ValueError, match=match):
        trainer.validate_config(trainer.TrainConfig(**overrides))


def test_quantizer_options_reach_the_quantizers():
    config = trainer.TrainConfig(
        method="cpq",
        weight_quantizer_options='{"learn_bits": true, "bit_regularization": 0.01}',
        activation_quantizer_options='{"sigma_ratio": 0.5}',
    )
    trainer.validate_config(config)
    assert config.weight_quantizer_options == {"learn_bits": True, "bit_regularization": 0.01}
    assert json.loads(json.dumps(config.to_dict()))["activation_quantizer_options"] == {
        "sigma_ratio": 0.5
    }
    scheme = config.scheme()
    assert scheme.weights == {
        "class_name": "cpq",
        "config": {"learn_bits": True, "bit_regularization": 0.01},
    }
    weight = tfquant.quantizers.get(scheme.weights, signed=True, for_weights=True)
    activation = tfquant.quantizers.get(scheme.activations, signed=False)
    assert weight.learn_bits and weight.gated and weight.bit_regularization == 0.01
    assert activation.sigma_ratio == 0.5 and not activation.learn_bits
    # Without options the scheme keeps plain names; 'pact' keeps LSQ weights.
    assert trainer.TrainConfig(method="cpq").scheme().weights == "cpq"
    pact = trainer.TrainConfig(method="pact", activation_quantizer_options={"initial_alpha": 4.0})
    assert pact.scheme().weights == "lsq"
    assert pact.scheme().activations == {"class_name": "pact", "config": {"initial_alpha": 4.0}}


def test_learned_bits_regularizer_in_the_fit_loss():
    """The gates' penalty (add_loss) reaches the gradients of `fit`'s train_step."""
    config = trainer.TrainConfig(
        method="cpq",
        weight_quantizer_options={"learn_bits": True, "bit_regularization": 100.0},
        **QUICK,
    )
    trainer.validate_config(config)
    pipeline = input_pipeline.make_pipeline("digits", 32, steps_per_epoch=1)
    network = trainer.build_network(config, pipeline)
    gated = [
        layer.kernel_quantizer
        for layer in network.layers
        if getattr(getattr(layer, "kernel_quantizer", None), "gated", False)
    ]
    assert gated
    before = [q.log_alpha().numpy() for q in gated]
    model = trainer.TrainingModel(network)
    model.setup_optimizers(keras.optimizers.SGD(1e-3), keras.optimizers.SGD(1e-3))
    model.fit(pipeline.train_dataset(0, 1), epochs=1, steps_per_epoch=1, shuffle=False, verbose=0)
    # The penalty dominates: every gate logit moves towards closing.
    for quantizer, old in zip(gated, before, strict=True):
        assert np.all(quantizer.log_alpha().numpy() < old)
    report = trainer.learned_bits_report(network)
    assert set(report["layers"]) == {"block1_conv", "block2_conv", "block3_conv", "logits"}
    without = trainer.build_network(trainer.TrainConfig(method="cpq", **QUICK), pipeline)
    assert trainer.learned_bits_report(without) is None


@pytest.mark.slow
def test_cpq_learned_bits_are_recorded(tmp_path, capsys):
    config = _quick_config(
        method="cpq",
        steps_per_epoch=2,
        weight_quantizer_options='{"learn_bits": true, "bit_regularization": 0.001}',
    )
    trainer.validate_config(config)
    result = trainer.train(config, str(tmp_path), verbose=0)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    learned = metrics[-1]["learned_weight_bits"]
    assert learned and all(2 <= bits <= 8 for bits in learned.values()), learned
    # A parameter-weighted average of the layers' widths lies between them.
    average = metrics[-1]["average_weight_bits"]
    assert min(learned.values()) <= average <= max(learned.values()), (average, learned)
    assert result["average_weight_bits"] == average
    assert "learned weight bits" in capsys.readouterr().out
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["weight_quantizer_options"]["learn_bits"] is True
    assert saved["scheme"]["weights"]["config"]["learn_bits"] is True


@pytest.mark.slow
def test_finished_run_started_again_keeps_its_weights(tmp_path, capsys):
    import keras

    config = _quick_config(method="lsq", steps_per_epoch=2)
    trainer.train(config, str(tmp_path), verbose=0)
    first = keras.models.load_model(tmp_path / "final.keras").get_weights()
    trainer.train(config, str(tmp_path), verbose=0)
    again = keras.models.load_model(tmp_path / "final.keras").get_weights()
    assert "epochs are done" in capsys.readouterr().out
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- QN phases


@pytest.mark.parametrize(
    "overrides,match",
    [
        (
            {"method": "lsq", "qn_phases": "1,1,1", "epochs": 3},
            "--qn_phases=1,1,1: needs --method=qn",
        ),
        ({"method": "qn", "qn_phases": "1,1", "epochs": 2}, "--qn_phases=1,1: use three"),
        ({"method": "qn", "qn_phases": "1,-1,2", "epochs": 2}, "--qn_phases=1,-1,2: use three"),
        ({"method": "qn", "qn_phases": "1,1,1", "epochs": 4}, "--qn_phases=1,1,1: .*--epochs is 4"),
    ],
)
def test_bad_qn_phases_name_the_flag(overrides, match):
    with pytest.raises(ValueError, match=match):
        trainer.validate_config(trainer.TrainConfig(**overrides))


def test_qn_phases_switch_the_quantizers_per_epoch(capsys):
    from tfquant.quantizers import qnet

    config = trainer.TrainConfig(method="qn", qn_phases="1,2,1", **{**QUICK, "epochs": 4})
    trainer.validate_config(config)
    assert [trainer.qn_phase_at(e, (1, 2, 1)) for e in range(5)] == [
        "weights",
        "activations",
        "activations",
        "both",
        "both",
    ]
    pipeline = input_pipeline.make_pipeline("digits", 32, steps_per_epoch=1)
    network = trainer.build_network(config, pipeline)
    hooks = trainer._epoch_hooks(network, config)
    quantizers = qnet.qn_quantizers(network)
    for epoch, phase in enumerate(("weights", "activations", "activations", "both")):
        for hook in hooks:
            hook(epoch)
        for quantizer, role in quantizers:
            on = phase in ("both", role)
            assert float(quantizer.enabled.numpy()) == (1.0 if on else 0.0), (epoch, role)
    assert "epoch 1 | QN phase weights" in capsys.readouterr().out
