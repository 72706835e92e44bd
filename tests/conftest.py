"""Shared fixtures. Splits the CPU into logical devices before TensorFlow
starts, so tf.distribute tests can mirror over two of them."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

_CPUS = tf.config.list_physical_devices("CPU")
try:
    tf.config.set_logical_device_configuration(
        _CPUS[0], [tf.config.LogicalDeviceConfiguration()] * 2
    )
except RuntimeError:  # TensorFlow was already initialized by another plugin
    pass


@pytest.fixture
def cpu_devices():
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    if len(devices) < 2:
        pytest.skip("needs two logical CPU devices")
    return devices


@pytest.fixture
def cpu_mirrored(cpu_devices):
    """MirroredStrategy over two logical CPUs, reducing on one device as
    train.strategy does without GPUs: the default collective all-reduce reuses
    instance keys across strategies created in one process, and a test that
    follows another one's strategy then fails with a collective shape mismatch."""
    return tf.distribute.MirroredStrategy(
        cpu_devices[:2], cross_device_ops=tf.distribute.ReductionToOneDevice()
    )


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)
    yield
