"""Datasets by spec string.

Specs:
  digits          scikit-learn's bundled 8x8 digits (1,797 images), no download.
  npz:PATH        a NumPy archive with arrays `x` (N, H, W[, C]) and `y` (N,);
                  rows [0, split) train, [split, N) test; `npz:PATH:SPLIT`
                  sets the split (default 8000, the MNIST-10k convention).
  mnist, cifar10, cifar100, imagenet2012
                  tensorflow-datasets; data must already be in `data_dir`
                  (imagenet2012 needs its manual download there).

Images come back as float32 in [0, 1], channels last.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

TFDS_NAMES = ("mnist", "cifar10", "cifar100", "imagenet2012")


@dataclasses.dataclass
class ArrayDataset:
    """A train/test split held in memory."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1


def load_arrays(spec: str, data_dir: str | None = None) -> ArrayDataset:
    """Loads a dataset spec into memory (see the module docstring)."""
    if spec == "digits":
        return _digits()
    if spec.startswith("npz:"):
        return _npz(spec[4:])
    if spec in TFDS_NAMES:
        return _tfds_arrays(spec, data_dir)
    raise ValueError(
        f"unknown dataset {spec!r}; use 'digits', 'npz:PATH[:SPLIT]' or one of {TFDS_NAMES}"
    )


def _digits() -> ArrayDataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[..., None]
    y = digits.target.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    split = int(0.8 * len(x))
    return ArrayDataset("digits", x[:split], y[:split], x[split:], y[split:])


def _npz(rest: str) -> ArrayDataset:
    path, split = rest, None
    head, sep, tail = rest.rpartition(":")
    if sep and tail.isdigit():
        path, split = head, int(tail)
    if not os.path.exists(path):
        raise ValueError(f"dataset file {path!r} does not exist")
    try:
        with np.load(path) as archive:
            if "x" not in archive or "y" not in archive:
                raise ValueError(
                    f"{path!r} must hold arrays 'x' and 'y', it holds {sorted(archive.files)}"
                )
            x, y = archive["x"], archive["y"]
    except ValueError:
        raise
    except Exception as error:  # zipfile.BadZipFile, OSError, pickle errors
        raise ValueError(f"cannot read {path!r} as a .npz archive: {error}") from None
    if len(x) != len(y):
        raise ValueError(f"{path!r}: x has {len(x)} rows but y has {len(y)}")
    split = split if split is not None else min(8000, int(0.8 * len(x)))
    if not 0 < split < len(x):
        raise ValueError(f"split {split} must be in 1..{len(x) - 1} for {path!r}")
    x = x.astype(np.float32)
    if x.max() > 1.0:
        x = x / 255.0
    if x.ndim == 3:
        x = x[..., None]
    y = y.astype(np.int32)
    name = os.path.basename(path)
    return ArrayDataset(name, x[:split], y[:split], x[split:], y[split:])


def _tfds_arrays(name: str, data_dir: str | None) -> ArrayDataset:
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
        if not builder.is_prepared():
            raise FileNotFoundError
        train = tfds.as_numpy(builder.as_dataset(split="train", batch_size=-1, as_supervised=True))
        test = tfds.as_numpy(builder.as_dataset(split="test", batch_size=-1, as_supervised=True))
    except FileNotFoundError:
        where = data_dir or "~/tensorflow_datasets"
        raise ValueError(
            f"dataset {name!r} is not prepared in {where}; run `tfds build {name} "
            f"--data_dir={where}` on a machine with network access (imagenet2012 also needs "
            "the manual download placed in its downloads/manual directory), or use "
            "'digits' or 'npz:PATH'"
        ) from None
    x_train, y_train = train
    x_test, y_test = test
    return ArrayDataset(
        name,
        x_train.astype(np.float32) / 255.0,
        y_train.astype(np.int32),
        x_test.astype(np.float32) / 255.0,
        y_test.astype(np.int32),
    )
