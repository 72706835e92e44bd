"""Keras callbacks for training quantized models with `fit`.

>>> from tfquant import callbacks
>>> callbacks.TemperatureScheduler(start=1.0, growth=10.0).temperature_at(2)
21.0
"""

from __future__ import annotations

import keras
import numpy as np

from tfquant.quantizers.cpq import report_bits
from tfquant.quantizers.qnet import QuantizationNetworkQuantizer, check_temperature, qn_quantizers

__all__ = ["LearnedBitsLogger", "TemperatureScheduler"]


class TemperatureScheduler(keras.callbacks.Callback):
    """Sets T in every Quantization Networks quantizer of the model.

    T(i) = min(cap, start + growth * i) ("linear", the paper's 5..10 x epoch)
    or min(cap, start * growth^i) ("exponential"), or a callable i -> T, with
    i the epoch (0-based, `per="epoch"`) or the optimizer step
    (`per="step"`, counted from `optimizer.iterations`, so a resumed run
    continues the schedule). T is logged as `temperature` at each epoch end.

    Args:
      schedule: "linear", "exponential" or a callable.
      start: T at i = 0 (> 0).
      growth: the slope (linear, >= 0) or the factor (exponential, > 0).
      cap: the largest T (the authors cap it; at or above a quantizer's
        `step_temperature` its training forward is the step).
      per: "epoch" or "step".

    >>> scheduler = TemperatureScheduler(start=1.0, growth=10.0)
    >>> [scheduler.temperature_at(i) for i in range(3)]
    [1.0, 11.0, 21.0]
    """

    def __init__(self, schedule="linear", start=1.0, growth=10.0, cap=1000.0, per="epoch"):
        super().__init__()
        if not callable(schedule) and schedule not in ("linear", "exponential"):
            raise ValueError(
                f"schedule must be 'linear', 'exponential' or a callable, got {schedule!r}"
            )
        if per not in ("epoch", "step"):
            raise ValueError(f"per must be 'epoch' or 'step', got {per!r}")
        self.start = check_temperature(start, "start")
        self.cap = check_temperature(cap, "cap")
        if not np.isfinite(growth) or growth < 0 or (schedule == "exponential" and growth <= 0):
            raise ValueError(
                f"growth must be a finite number >= 0 (> 0 for 'exponential'), got {growth!r}"
            )
        self.schedule = schedule
        self.growth = float(growth)
        self.per = per
        self._quantizers: list[QuantizationNetworkQuantizer] = []
        self.current = None

    def temperature_at(self, index: int) -> float:
        if callable(self.schedule):
            value = float(self.schedule(index))
        elif self.schedule == "linear":
            value = self.start + self.growth * index
        else:
            value = self.start * self.growth**index
        value = min(value, self.cap)
        if not np.isfinite(value) or value <= 0:
            raise ValueError(f"the temperature schedule gave T = {value} at {self.per} {index}")
        return value

    def _assign(self, index: int):
        value = self.temperature_at(index)
        for quantizer in self._quantizers:
            quantizer.temperature.assign(value)
        self.current = value

    def on_train_begin(self, logs=None):
        self._quantizers = [q for q, _ in qn_quantizers(self.model)]
        if not self._quantizers:
            raise ValueError(
                f"TemperatureScheduler: model {self.model.name!r} has no Quantization Networks "
                "('qn') quantizers"
            )

    def on_epoch_begin(self, epoch, logs=None):
        if self.per == "epoch":
            self._assign(epoch)

    def on_train_batch_begin(self, batch, logs=None):
        if self.per == "step":
            # the optimizer's count, right with steps_per_execution and on resume
            self._assign(int(self.model.optimizer.iterations.numpy()))

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self.current is not None:
            logs["temperature"] = self.current


class LearnedBitsLogger(keras.callbacks.Callback):
    """Prints the learned weight bit widths after each epoch and logs their
    parameter-weighted average as `average_weight_bits`.

    Args:
      print_fn: where the line goes (default `print`).
    """

    def __init__(self, print_fn=print):
        super().__init__()
        self.print_fn = print_fn
        self.history: list[dict] = []

    def on_epoch_end(self, epoch, logs=None):
        report = report_bits(self.model)
        self.history.append(report)
        layers = ", ".join(f"{name}={bits}" for name, bits in report["layers"].items())
        self.print_fn(
            f"epoch {epoch + 1}: weight bits {layers}; average {report['average_weight_bits']:.2f}"
        )
        if logs is not None:
            logs["average_weight_bits"] = report["average_weight_bits"]
