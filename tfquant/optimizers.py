"""An optimizer for `model.fit` that updates the quantizers' parameters apart.

The learned parameters of a quantizer (LSQ's step, QIL's interval, PACT's
clipping level, DQ's levels, ...) live on another scale than the weights and
must not be decayed toward 0, which would shrink the grid. Papers give them
their own learning rate and no weight decay:

>>> import keras
>>> from tfquant.optimizers import QuantizerAwareOptimizer
>>> optimizer = QuantizerAwareOptimizer(
...     keras.optimizers.AdamW(1e-3, weight_decay=1e-4), quantizer_learning_rate=1e-4)
>>> optimizer.quantizer_optimizer.weight_decay
0.0

Then `model.compile(optimizer=optimizer, ...)` and `model.fit(...)` as usual;
it also runs under `tf.distribute` strategies and saves with the model.
"""

from __future__ import annotations

import keras
from keras.src import backend
from keras.src.saving import serialization_lib

__all__ = ["QuantizerAwareOptimizer", "is_quantizer_variable"]

# Set on every variable a tfquant Quantizer creates (tfquant.quantizers.Quantizer.add_weight).
QUANTIZER_VARIABLE_TAG = "_tfquant_quantizer_variable"


def is_quantizer_variable(variable) -> bool:
    """Whether `variable` is a learned parameter of a tfquant quantizer."""
    return bool(getattr(variable, QUANTIZER_VARIABLE_TAG, False))


@keras.saving.register_keras_serializable(package="tfquant")
class QuantizerAwareOptimizer(keras.optimizers.Optimizer):
    """Two optimizers in one: `optimizer` for every variable but the
    quantizers' parameters, `quantizer_optimizer` for those.

    Args:
      optimizer: a Keras optimizer (or its name) for the weights.
      quantizer_optimizer: one for the quantizers' parameters; default: a
        copy of `optimizer` without weight decay (None, or 0 where the class
        wants a number), at `quantizer_learning_rate` (default: the same
        learning rate).
      quantizer_learning_rate: the copy's learning rate (a float or a
        schedule); not with `quantizer_optimizer`.
      name: the optimizer's name.

    `learning_rate` and `iterations` are those of `optimizer` (so
    learning-rate callbacks steer the weights' rate); both optimizers step
    once per batch. Each applies its own options to its own variables: a
    `global_clipnorm` clips each side's gradients apart, and weight decay
    reaches every weight unless excluded (`exclude_from_weight_decay`; the
    training binary excludes biases and other 1-D weights).
    """

    def __init__(
        self,
        optimizer,
        quantizer_optimizer=None,
        quantizer_learning_rate=None,
        name="quantizer_aware",
        **kwargs,
    ):
        if kwargs:
            raise ValueError(
                f"QuantizerAwareOptimizer takes no {sorted(kwargs)}: set them on the optimizers "
                "it wraps"
            )
        optimizer = keras.optimizers.get(optimizer)
        if quantizer_optimizer is not None and quantizer_learning_rate is not None:
            raise ValueError("pass quantizer_optimizer or quantizer_learning_rate, not both")
        if quantizer_optimizer is None:
            config = optimizer.get_config()
            config.update(weight_decay=None, name=f"{optimizer.name}_quantizers")
            if quantizer_learning_rate is not None:
                config["learning_rate"] = quantizer_learning_rate
            try:
                quantizer_optimizer = type(optimizer).from_config(config)
            except ValueError:  # AdamW and its kind want a number: 0 decays nothing
                quantizer_optimizer = type(optimizer).from_config({**config, "weight_decay": 0.0})
        else:
            quantizer_optimizer = keras.optimizers.get(quantizer_optimizer)
        super().__init__(learning_rate=0.0, name=name)
        self.weight_optimizer = optimizer
        self.quantizer_optimizer = quantizer_optimizer

    @staticmethod
    def _split(values, variables):
        weights, quantizers = ([], []), ([], [])
        for value, variable in zip(values, variables, strict=True):
            side = quantizers if is_quantizer_variable(variable) else weights
            side[0].append(value)
            side[1].append(variable)
        return weights, quantizers

    def build(self, var_list):
        weights, quantizers = self._split(var_list, var_list)
        self.weight_optimizer.build(weights[1])
        self.quantizer_optimizer.build(quantizers[1])
        super().build(var_list)

    @property
    def variables(self):
        return (
            self._variables + self.weight_optimizer.variables + self.quantizer_optimizer.variables
        )

    def apply(self, grads, trainable_variables=None):
        trainable_variables = list(
            self._trainable_variables if trainable_variables is None else trainable_variables
        )
        if not self.built:
            with backend.name_scope(self.name, caller=self):
                self.build(trainable_variables)
            self.built = True
        weights, quantizers = self._split(list(grads), trainable_variables)
        if weights[1]:
            self.weight_optimizer.apply(*weights)
        if quantizers[1]:
            self.quantizer_optimizer.apply(*quantizers)

    @property
    def learning_rate(self):
        return self.weight_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        # The base class sets it once while it is built, before the wrapped
        # optimizer exists; from then on it steers the weights' optimizer.
        if "weight_optimizer" in self.__dict__:
            self.weight_optimizer.learning_rate = learning_rate

    @property
    def iterations(self):
        return self.weight_optimizer.iterations

    def exclude_from_weight_decay(self, var_list=None, var_names=None):
        self.weight_optimizer.exclude_from_weight_decay(var_list=var_list, var_names=var_names)

    def finalize_variable_values(self, var_list):
        weights, quantizers = self._split(var_list, var_list)
        self.weight_optimizer.finalize_variable_values(weights[1])
        self.quantizer_optimizer.finalize_variable_values(quantizers[1])

    def get_config(self):
        return {
            "name": self.name,
            "optimizer": serialization_lib.serialize_keras_object(self.weight_optimizer),
            "quantizer_optimizer": serialization_lib.serialize_keras_object(
                self.quantizer_optimizer
            ),
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        for key in ("optimizer", "quantizer_optimizer"):
            config[key] = serialization_lib.deserialize_keras_object(
                config[key], custom_objects=custom_objects
            )
        return cls(**config)
