"""A tiny TFDS image dataset prepared locally (no download), in either of TFDS's file formats: tfrecord (TFDS's
default, read as a stream) or array_record (read by index)."""
import tensorflow_datasets as tfds

from dino_jax.data import demo

NAME = "tiny_demo_shapes"
SPLITS = {"train": 16, "test": 8}


class TinyDemoShapes(tfds.core.GeneratorBasedBuilder):
    """Demo images (32 px, 10 classes) as PNG-encoded TFDS examples."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(32, 32, 3)),
            "label": tfds.features.ClassLabel(num_classes=len(demo.CLASSES))}))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(n, seed) for seed, (split, n) in enumerate(SPLITS.items())}

    def _generate_examples(self, n, seed):
        images, labels, _ = demo.generate(n, 32, seed=seed)
        for i in range(n):
            yield i, {"image": images[i], "label": int(labels[i])}


def build(data_dir, file_format: str) -> str:
    """Prepare the dataset under data_dir in `file_format` ('tfrecord' or 'array_record'); returns data_dir."""
    TinyDemoShapes(data_dir=str(data_dir), file_format=file_format).download_and_prepare()
    return str(data_dir)
