"""Re-estimating BatchNormalization statistics after quantization-aware training.

During fine-tuning the moving mean and variance of a BatchNormalization layer
are exponential averages over the last few steps, taken while the weights
(and their quantizers' scales) were still moving. When the weights drift
steadily, as scale parameters that feed a BatchNormalization do under Adam
(the loss does not depend on their scale, so their gradient is noise), the
averages lag behind and the inference network, which normalizes with them,
no longer matches the trained one. A low-bit activation quantizer right after
the normalization turns that small mismatch into many changed codes.

`reestimate_batch_norm` replaces the moving statistics with the statistics of
a set of inputs under the final weights, with every other layer in its
inference form (quantizers as exported). Re-estimating BatchNormalization
statistics after quantization-aware training is recommended by Nagel et al.,
"Overcoming Oscillations in Quantization-Aware Training" (arXiv:2203.11086).
"""

from collections.abc import Callable, Iterable

import keras
import numpy as np
import tensorflow as tf


def batch_norm_layers(model: keras.layers.Layer) -> list[keras.layers.BatchNormalization]:
    """Every BatchNormalization layer of `model`, nested models included, in
    order, each once."""
    found, seen = [], set()

    def visit(layer):
        if id(layer) in seen:
            return
        seen.add(id(layer))
        if isinstance(layer, keras.layers.BatchNormalization):
            found.append(layer)
        for inner in getattr(layer, "layers", None) or ():
            visit(inner)

    visit(model)
    return found


def _input_batches(data, batch_size: int) -> Iterable[np.ndarray]:
    """Input batches of `data`: an array (cut into `batch_size` rows) or a
    `tf.data.Dataset` of batches (x or (x, y, ...))."""
    if isinstance(data, tf.data.Dataset):
        for element in data:
            yield np.asarray(element[0] if isinstance(element, (tuple, list)) else element)
        return
    data = np.asarray(data)
    for start in range(0, len(data), batch_size):
        yield data[start : start + batch_size]


class _Moments:
    """Count, mean and variance per channel, merged over batches in float64."""

    def __init__(self):
        self.count = 0
        self.mean = None
        self.variance = None

    def add(self, count: int, mean: np.ndarray, variance: np.ndarray):
        mean, variance = mean.astype(np.float64), variance.astype(np.float64)
        if self.count == 0:
            self.count, self.mean, self.variance = count, mean, variance
            return
        total = self.count + count
        delta = mean - self.mean
        self.variance = (
            self.count * self.variance + count * variance + delta**2 * self.count * count / total
        ) / total
        self.mean = self.mean + delta * count / total
        self.count = total


def reestimate_batch_norm(
    model: keras.Model,
    data,
    batch_size: int = 64,
    max_batches: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, dict[str, float]]:
    """Sets each BatchNormalization layer's moving mean and variance to the
    statistics of its inputs over `data`.

    The model runs in inference mode (quantizers in their exported form,
    dropout off), except that each BatchNormalization layer normalizes with
    the statistics of the current batch, as in training, and records them.
    The per-batch statistics are merged into the exact mean and (biased)
    variance over all rows seen. Weights are not changed.

    Args:
      model: a Keras model with at least one BatchNormalization layer.
      data: input rows (an array) or a `tf.data.Dataset` of batches, x or
        (x, y, ...); labels are ignored.
      batch_size: rows per batch for an array (a dataset keeps its batches).
        Statistics are exact for any batch size, but the normalization that
        later layers see in between uses batch statistics, so use batches
        like the training ones.
      max_batches: stop after this many batches (None: all of `data`).
      progress: called with a line of text every 10 batches and at the end.

    Returns:
      {layer name: {"batches", "mean_shift", "std_ratio"}}: how many batches
      reached the layer, the largest |new - old| mean over old standard
      deviations, and the largest new / old standard deviation ratio (or its
      inverse, whichever is larger) over the channels.

    Raises:
      ValueError: the model has no BatchNormalization layer, `batch_size` or
        `max_batches` is not a positive integer, `data` is empty or holds
        NaN or inf, a layer receives a mask, or the statistics come out
        non-finite (weights with NaN). The moving statistics are then left
        as they were.
    """
    layers = batch_norm_layers(model)
    if not layers:
        raise ValueError(f"model {model.name!r} has no BatchNormalization layer to re-estimate")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise ValueError(f"max_batches must be a positive integer or None, got {max_batches!r}")

    moments = {id(layer): _Moments() for layer in layers}
    batches_seen = {id(layer): 0 for layer in layers}

    def recording_call(layer):
        def call(inputs, training=None, mask=None):
            del training
            if mask is not None:
                raise ValueError(
                    f"reestimate_batch_norm: layer {layer.name!r} received a mask; masked "
                    "statistics are not supported"
                )
            x = tf.cast(inputs, tf.float32)
            axis = layer.axis % x.shape.rank
            axes = [i for i in range(x.shape.rank) if i != axis]
            mean, variance = tf.nn.moments(x, axes)
            count = int(np.prod([x.shape[i] for i in axes]))
            moments[id(layer)].add(count, mean.numpy(), variance.numpy())
            batches_seen[id(layer)] += 1
            outputs = keras.ops.batch_normalization(
                x,
                mean,
                variance,
                axis=axis,
                offset=layer.beta if layer.center else None,
                scale=layer.gamma if layer.scale else None,
                epsilon=layer.epsilon,
            )
            return tf.cast(outputs, layer.compute_dtype)

        return call

    batches = 0
    for layer in layers:
        layer.call = recording_call(layer)
    try:
        for batch in _input_batches(data, batch_size):
            if max_batches is not None and batches >= max_batches:
                break
            batch = np.asarray(batch, np.float32)
            if batch.size and not np.isfinite(batch).all():
                raise ValueError(f"reestimate_batch_norm: batch {batches} of data has NaN or inf")
            if len(batch):
                model(batch, training=False)
                batches += 1
                if progress is not None and batches % 10 == 0:
                    progress(f"batch norm re-estimation: {batches} batches")
    finally:
        for layer in layers:
            del layer.call
    if batches == 0:
        raise ValueError("reestimate_batch_norm: data holds no rows")

    report = {}
    for layer in layers:
        estimate = moments[id(layer)]
        if estimate.count == 0:
            continue  # not on the path of this input
        if not (np.isfinite(estimate.mean).all() and np.isfinite(estimate.variance).all()):
            raise ValueError(
                f"reestimate_batch_norm: the statistics of layer {layer.name!r} are not finite "
                "(NaN or inf weights upstream?); moving statistics left unchanged"
            )
        old_mean = layer.moving_mean.numpy().astype(np.float64)
        old_std = np.sqrt(layer.moving_variance.numpy().astype(np.float64) + layer.epsilon)
        new_std = np.sqrt(estimate.variance + layer.epsilon)
        ratio = new_std / old_std
        report[layer.name] = {
            "batches": batches_seen[id(layer)],
            "mean_shift": float(np.max(np.abs(estimate.mean - old_mean) / old_std)),
            "std_ratio": float(np.max(np.maximum(ratio, 1.0 / ratio))),
        }
    for layer in layers:
        estimate = moments[id(layer)]
        if estimate.count:
            layer.moving_mean.assign(estimate.mean.astype(np.float32))
            layer.moving_variance.assign(estimate.variance.astype(np.float32))
    if progress is not None:
        progress(f"batch norm re-estimation: {len(report)} layers from {batches} batches")
    return report
