"""tf.data input pipelines for the training binary.

Two sources:
  * in-memory arrays from `tfquant.datasets.load_arrays` (`digits`,
    `npz:PATH[:SPLIT]`), and
  * tensorflow-datasets builders for `mnist`, `cifar10`, `cifar100` and
    `imagenet2012`, read from `data_dir` (never downloaded here: a missing
    dataset raises an error that says how to prepare it).

Augmentation (training only): CIFAR: 4-pixel zero pad, random 32x32 crop,
random horizontal flip. ImageNet: random area-and-aspect crop resized to
224x224 plus a random flip for training; resize to 256 and central 224 crop
for evaluation. MNIST and the array datasets: none.

Every random choice is stateless and keyed by (seed, epoch, example index) for
the in-memory datasets, so the batches of epoch k are the same whether a run
starts at epoch 0 or resumes at epoch k: this is what makes a resumed run end
with the weights of an uninterrupted one. tfds datasets are shuffled with a
buffer; a resumed run continues at the right epoch with a different order.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from tfquant import datasets

AUTOTUNE = tf.data.AUTOTUNE
IMAGENET_SIZE = 224
_TFDS_TEST_SPLIT = {"imagenet2012": "validation"}
_SHUFFLE_BUFFER = 10_000


def augmentation_for(name: str) -> str:
    """'cifar', 'imagenet' or 'none' for a dataset spec."""
    if name in ("cifar10", "cifar100"):
        return "cifar"
    if name == "imagenet2012":
        return "imagenet"
    return "none"


def check_dataset(spec: str, data_dir: str | None = None) -> None:
    """Raises ValueError (naming the spec and how to provide it) when the
    dataset cannot be read; reads at most one example, writes nothing."""
    if spec in datasets.TFDS_NAMES:
        _load_tfds(spec, "train[:1]", data_dir)
    elif spec == "digits":
        return
    elif spec.startswith("npz:"):
        datasets.load_arrays(spec)
    else:
        raise ValueError(
            f"unknown dataset {spec!r}; use 'digits', 'npz:PATH[:SPLIT]' or one of "
            f"{datasets.TFDS_NAMES}"
        )


def _load_tfds(name: str, split: str, data_dir: str | None, with_info: bool = False):
    import tensorflow_datasets as tfds

    try:
        return tfds.load(
            name,
            split=split,
            data_dir=data_dir,
            download=False,
            as_supervised=True,
            with_info=with_info,
            shuffle_files=False,
        )
    except Exception as error:  # DatasetNotFoundError, AssertionError, OSError
        where = data_dir or "~/tensorflow_datasets"
        raise ValueError(
            f"dataset {name!r} is not available in {where} ({type(error).__name__}); prepare it "
            f"with `tfds build {name} --data_dir={where}` on a machine with network access and "
            f"pass --data_dir (imagenet2012 also needs the ILSVRC2012 tar files in "
            f"{where}/downloads/manual), or use --dataset=digits or --dataset=npz:PATH"
        ) from None


def _stateless_seed(seed, epoch, index):
    base = tf.cast(seed, tf.int64) * 1_000_003 + tf.cast(epoch, tf.int64)
    return tf.stack([base, tf.cast(index, tf.int64)])


def augment(image, mode: str, seed):
    """Training augmentation `mode` with a stateless seed (shape [2], int64)."""
    if mode == "cifar":
        height, width = image.shape[0], image.shape[1]
        image = tf.pad(image, [[4, 4], [4, 4], [0, 0]])
        image = tf.image.stateless_random_crop(image, [height, width, image.shape[-1]], seed)
        return tf.image.stateless_random_flip_left_right(image, seed + 1)
    if mode == "imagenet":
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            tf.shape(image),
            bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
            seed=seed,
            min_object_covered=0.1,
            aspect_ratio_range=(3 / 4, 4 / 3),
            area_range=(0.08, 1.0),
            max_attempts=10,
            use_image_if_no_bounding_boxes=True,
        )
        image = tf.slice(image, begin, size)
        image = tf.image.resize(image, [IMAGENET_SIZE, IMAGENET_SIZE])
        return tf.image.stateless_random_flip_left_right(image, seed + 1)
    return image


def _imagenet_eval(image):
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = 256.0 / tf.reduce_min(shape)
    image = tf.image.resize(image, tf.cast(tf.round(shape * scale), tf.int32))
    return tf.image.resize_with_crop_or_pad(image, IMAGENET_SIZE, IMAGENET_SIZE)


@dataclasses.dataclass
class InputPipeline:
    """Training and evaluation datasets of one dataset spec.

    Attributes:
      name: the dataset spec.
      input_shape: shape of one image.
      num_classes: number of labels.
      steps_per_epoch: training batches per epoch (full batches only).
    """

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    steps_per_epoch: int
    batch_size: int
    seed: int
    arrays: datasets.ArrayDataset | None = None
    data_dir: str | None = None

    def train_dataset(self, start_epoch: int, end_epoch: int, with_labels: bool = True):
        """Batches of epochs [start_epoch, end_epoch), `steps_per_epoch` per
        epoch, global batch size; (image, label) pairs or images only."""
        mode = augmentation_for(self.name)
        if self.arrays is not None:
            x = tf.constant(self.arrays.x_train)
            y = tf.constant(self.arrays.y_train)
            count = len(self.arrays.x_train)
            seed, steps, batch = self.seed, self.steps_per_epoch, self.batch_size

            def one_epoch(epoch):
                order = tf.random.experimental.stateless_shuffle(
                    tf.range(count, dtype=tf.int64), _stateless_seed(seed, epoch, -1)
                )

                def example(index):
                    image = tf.gather(x, index)
                    if mode != "none":
                        image = augment(image, mode, _stateless_seed(seed, epoch, index))
                    return (image, tf.gather(y, index)) if with_labels else image

                return (
                    tf.data.Dataset.from_tensor_slices(order)
                    .map(example, num_parallel_calls=AUTOTUNE, deterministic=True)
                    .batch(batch, drop_remainder=True)
                    .take(steps)
                )

            dataset = tf.data.Dataset.range(start_epoch, end_epoch).flat_map(one_epoch)
        else:
            dataset = _load_tfds(self.name, "train", self.data_dir)
            dataset = dataset.shuffle(_SHUFFLE_BUFFER, seed=self.seed).repeat()
            randoms = tf.data.Dataset.random(seed=self.seed).batch(2)
            with_label = with_labels

            def example(pair, random):
                image, label = pair
                image = tf.cast(image, tf.float32) / 255.0
                image = augment(image, mode, random)
                if mode == "none" and self.name == "mnist":
                    image = tf.reshape(image, self.input_shape)
                return (image, tf.cast(label, tf.int32)) if with_label else image

            dataset = (
                tf.data.Dataset.zip((dataset, randoms))
                .map(example, num_parallel_calls=AUTOTUNE)
                .batch(self.batch_size, drop_remainder=True)
                .take((end_epoch - start_epoch) * self.steps_per_epoch)
            )
        return dataset.prefetch(AUTOTUNE)

    def eval_dataset(self, batch_size: int | None = None):
        """(image, label) batches of the test split, in order; the last
        batch may be partial."""
        batch_size = batch_size or self.batch_size
        if self.arrays is not None:
            dataset = tf.data.Dataset.from_tensor_slices((self.arrays.x_test, self.arrays.y_test))
        else:
            split = _TFDS_TEST_SPLIT.get(self.name, "test")
            dataset = _load_tfds(self.name, split, self.data_dir)
            imagenet = augmentation_for(self.name) == "imagenet"

            def example(image, label):
                image = tf.cast(image, tf.float32) / 255.0
                if imagenet:
                    image = _imagenet_eval(image)
                return image, tf.cast(label, tf.int32)

            dataset = dataset.map(example, num_parallel_calls=AUTOTUNE)
        return dataset.batch(batch_size).prefetch(AUTOTUNE)

    def calibration_batch(self, samples: int = 512) -> np.ndarray:
        """Un-augmented training images for quantizer initialization."""
        if self.arrays is not None:
            return self.arrays.x_train[:samples]
        images = []
        for image, _ in self.eval_like_train().take(samples):
            images.append(image.numpy())
        return np.stack(images)

    def eval_like_train(self):
        dataset = _load_tfds(self.name, "train", self.data_dir)
        imagenet = augmentation_for(self.name) == "imagenet"

        def example(image, label):
            image = tf.cast(image, tf.float32) / 255.0
            return (_imagenet_eval(image) if imagenet else image), label

        return dataset.map(example)


def make_pipeline(
    spec: str,
    batch_size: int,
    data_dir: str | None = None,
    seed: int = 0,
    steps_per_epoch: int | None = None,
) -> InputPipeline:
    """The pipeline of a dataset spec with a global batch of `batch_size`.

    `steps_per_epoch` caps the batches per epoch (for quick runs).

    Raises:
      ValueError: an unknown or unavailable dataset, or a batch larger than
        the training set.
    """
    if spec in datasets.TFDS_NAMES:
        train_split, info = _load_tfds(spec, "train", data_dir, with_info=True)
        features = info.features
        num_classes = int(features["label"].num_classes)
        if augmentation_for(spec) == "imagenet":
            input_shape = (IMAGENET_SIZE, IMAGENET_SIZE, 3)
        else:
            input_shape = tuple(int(d) for d in features["image"].shape)
        try:
            count = int(info.splits["train"].num_examples)
        except KeyError:  # no split metadata (e.g. tensorflow_datasets.testing.mock_data)
            count = int(train_split.cardinality())
        if count < 0 and steps_per_epoch:
            count = steps_per_epoch * batch_size
        arrays = None
    else:
        arrays = datasets.load_arrays(spec, data_dir)
        input_shape, num_classes = arrays.input_shape, arrays.num_classes
        count = len(arrays.x_train)
    full_steps = count // batch_size
    if full_steps < 1:
        raise ValueError(
            f"batch_size {batch_size} is larger than the {count} training examples of {spec!r}"
        )
    steps = min(full_steps, steps_per_epoch) if steps_per_epoch else full_steps
    return InputPipeline(
        name=spec,
        input_shape=input_shape,
        num_classes=num_classes,
        steps_per_epoch=steps,
        batch_size=batch_size,
        seed=seed,
        arrays=arrays,
        data_dir=data_dir,
    )
