"""Prepares a small TFDS image-classification dataset with TFDS's own builder and writer.

    python -m tests.tfds_builder DATA_DIR

Writes ``eqjax_tiny_images`` (ArrayRecord; features ``image`` uint8 [32, 32, 3], ``label``
ClassLabel(4), ``file_name`` like ``imagenet2012``; splits ``train`` 24 and ``test`` 16
images) into DATA_DIR. Preparing needs TensorFlow (extra ``test``); reading does not.
"""

import sys

import numpy as np
import tensorflow_datasets as tfds

NAME = "eqjax_tiny_images"
SPLITS = {"train": 24, "test": 16}
NUM_CLASSES = 4


class EqjaxTinyImages(tfds.core.GeneratorBasedBuilder):
    """Random 32x32 textures, 4 classes: a stand-in with the feature names of imagenet2012/cifar100."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(32, 32, 3)),
            "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
            "file_name": tfds.features.Text()}), supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split, n) for split, n in SPLITS.items()}

    def _generate_examples(self, split, num):
        for i, (image, label) in enumerate(examples(split)):
            yield f"{split}_{i}", {"image": image, "label": label, "file_name": f"{split}_{i:04d}.png"}


def examples(split: str) -> list[tuple[np.ndarray, int]]:
    """The (image uint8 [32, 32, 3], label) pairs of ``split``, in generation order (TFDS stores
    them shuffled)."""
    rng = np.random.default_rng(len(split))
    return [(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), i % NUM_CLASSES) for i in range(SPLITS[split])]


def prepare(data_dir: str) -> None:
    EqjaxTinyImages(data_dir=data_dir).download_and_prepare(file_format="array_record")


if __name__ == "__main__":
    prepare(sys.argv[1])
