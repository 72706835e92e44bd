"""Dataset specs for the training binaries; see `tfquant.datasets`."""

from tfquant.datasets import TFDS_NAMES, ArrayDataset, load_arrays

__all__ = ["TFDS_NAMES", "ArrayDataset", "load_arrays"]
