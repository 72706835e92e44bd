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


def switchable(body, compiled):
    """`body` as a `tf.function`, XLA-compiled when `compiled()` is true at
    the call (checked each time, so a module flag can switch it). The two
    versions are also `call.variants[False]` (plain) and `[True]` (compiled),
    for a caller that chooses per call."""
    variants = {flag: tf.function(body, jit_compile=flag) for flag in (False, True)}

    def call(*args, **kwargs):
        return variants[bool(compiled())](*args, **kwargs)

    call.variants = variants
    return call
