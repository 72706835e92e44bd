"""Exact integer TFLite export of quantized Keras models.

>>> from tfquant import lite                                   # doctest: +SKIP
>>> result = lite.export_model(qmodel, x_test[:2000], y_test[:2000])  # doctest: +SKIP
>>> lite.save_export(result, "model.tflite")                   # doctest: +SKIP
"""

from tfquant.lite.export import (
    ExportResult,
    export_model,
    format_report,
    save_export,
    write_atomically,
)
from tfquant.lite.lower import (
    TARGETS,
    ExportError,
    align_biases,
    align_levels,
    lower_model,
)
from tfquant.lite.products import align_products
from tfquant.lite.rounding import match_integer_kernels

__all__ = [
    "TARGETS",
    "ExportError",
    "align_biases",
    "align_levels",
    "align_products",
    "ExportResult",
    "export_model",
    "format_report",
    "lower_model",
    "match_integer_kernels",
    "save_export",
    "write_atomically",
]
