"""Projections applied by Keras optimizers after each update."""

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="tfquant")
class AtLeast(keras.constraints.Constraint):
    """Clamps a variable to be >= `minimum` (a step size or a clip value)."""

    def __init__(self, minimum: float = 1e-8):
        self.minimum = float(minimum)

    def __call__(self, w):
        return tf.maximum(w, self.minimum)

    def get_config(self):
        return {"minimum": self.minimum}


@keras.saving.register_keras_serializable(package="tfquant")
class IntervalConstraint(keras.constraints.Constraint):
    """Keeps a QIL interval `[center, distance]` valid.

    The distance stays >= `min_distance` (so alpha = 0.5 / d is finite) and
    the center >= distance (so the pruning threshold c - d is >= 0).
    """

    def __init__(self, min_distance: float = 1e-4):
        self.min_distance = float(min_distance)

    def __call__(self, interval):
        distance = tf.maximum(interval[1], self.min_distance)
        center = tf.maximum(interval[0], distance)
        return tf.stack([center, distance])

    def get_config(self):
        return {"min_distance": self.min_distance}
