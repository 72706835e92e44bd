"""One factory for tf.distribute strategies, from a name.

    strategy = make_strategy("mirrored")
    per_replica = per_replica_batch_size(256, strategy.num_replicas_in_sync)

Names:
  off, one_device        the default strategy on one device (the first GPU,
                         else the CPU).
  mirrored               `MirroredStrategy` over all local GPUs, or over all
                         logical CPU devices when there is no GPU.
  multi_worker_mirrored  `MultiWorkerMirroredStrategy`; the cluster comes from
                         the `TF_CONFIG` environment variable.
  tpu                    `TPUStrategy` on the TPU at `tpu_address` (a gRPC
                         address, a TPU name, or "" / "local" for a TPU VM).

Batch and learning rate rule (Goyal et al., 2017, arXiv:1706.02677):
`--batch_size` is the *global* batch, split evenly over the replicas, so a
run gives the same result on any number of replicas. A learning rate given
for `reference_batch_size` scales linearly with the global batch:
`scaled_learning_rate(0.1, 1024, 256) == 0.4`. The recipes state their
learning rate for the global batch they set, so no scaling is applied unless
a caller asks for it.
"""

from __future__ import annotations

import json
import os

import tensorflow as tf

STRATEGY_NAMES = ("off", "one_device", "mirrored", "multi_worker_mirrored", "tpu")


def make_strategy(name: str, tpu_address: str | None = None) -> tf.distribute.Strategy:
    """Builds the strategy called `name` (see the module docstring).

    Raises:
      ValueError: an unknown name, or multi_worker_mirrored without a
        usable TF_CONFIG.
    """
    if name not in STRATEGY_NAMES:
        raise ValueError(f"unknown strategy {name!r}; use one of {STRATEGY_NAMES}")
    if name in ("off", "one_device"):
        gpus = tf.config.list_logical_devices("GPU")
        device = gpus[0].name if gpus else tf.config.list_logical_devices("CPU")[0].name
        if name == "off":
            return tf.distribute.get_strategy()
        return tf.distribute.OneDeviceStrategy(device)
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        if len(devices) == 1:
            return tf.distribute.MirroredStrategy(devices)
        cross_device = None if gpus else tf.distribute.ReductionToOneDevice()
        return tf.distribute.MirroredStrategy(devices, cross_device_ops=cross_device)
    if name == "multi_worker_mirrored":
        cluster = cluster_spec_from_environment()
        if cluster is None:
            raise ValueError(
                "strategy 'multi_worker_mirrored' needs TF_CONFIG, e.g. "
                '{"cluster": {"worker": ["host1:port", "host2:port"]}, '
                '"task": {"type": "worker", "index": 0}}'
            )
        options = tf.distribute.experimental.CommunicationOptions(
            implementation=tf.distribute.experimental.CommunicationImplementation.RING
        )
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
        tpu="" if tpu_address in (None, "local") else tpu_address
    )
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def cluster_spec_from_environment() -> dict | None:
    """The parsed TF_CONFIG, or None when it is unset.

    Raises:
      ValueError: TF_CONFIG is not JSON or lacks a worker cluster and task.
    """
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(f"TF_CONFIG is not valid JSON ({error}): {raw!r}") from None
    workers = config.get("cluster", {}).get("worker")
    task = config.get("task", {})
    if not workers or "index" not in task:
        raise ValueError(f"TF_CONFIG needs cluster.worker and task.index, got {raw!r}")
    return config


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True on the worker that writes shared outputs (worker 0, or the only one)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type is None or task_type == "chief" or (task_type == "worker" and task_id == 0)


def task_id(strategy: tf.distribute.Strategy) -> int:
    resolver = getattr(strategy, "cluster_resolver", None)
    return int(getattr(resolver, "task_id", 0) or 0)


def per_replica_batch_size(global_batch_size: int, num_replicas: int) -> int:
    """The batch each replica sees; the global batch must split evenly.

    Raises:
      ValueError: `global_batch_size` is not a positive multiple of `num_replicas`.
    """
    if global_batch_size <= 0 or global_batch_size % num_replicas:
        raise ValueError(
            f"batch_size {global_batch_size} must be a positive multiple of the number of "
            f"replicas ({num_replicas})"
        )
    return global_batch_size // num_replicas


def scaled_learning_rate(
    base_learning_rate: float, global_batch_size: int, reference_batch_size: int
) -> float:
    """The linear scaling rule: lr * global_batch / reference_batch."""
    return base_learning_rate * global_batch_size / reference_batch_size
