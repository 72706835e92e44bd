"""Calling XLA-compiled helpers from inside a custom gradient."""

import tensorflow as tf


def call_compiled(function, *args, **static):
    """Calls `function` (a `tf.function(jit_compile=True)`) on constants of
    its tensor arguments; `static` are Python values it is traced for.

    The custom gradient around such a call is the gradient, so no tape may
    record inside it: recording would also ask XLA for every intermediate
    value of the compiled loops.
    """
    return function(*(tf.stop_gradient(arg) for arg in args), **static)
