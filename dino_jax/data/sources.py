"""Datasets: `tfds:NAME[:split]`, `folder:PATH` and the procedural `demo` (data/demo.py).

Most sources give random access: `Source.load` maps a stable example index (0 .. num_examples-1) to a dict of
tensors inside tf.data, {"image": uint8 (H, W, 3), "label": int32, "index": int64, and "mask": uint8 (H, W) for
the demo}. Random access lets the pipeline shuffle globally, split examples between processes and resume mid-epoch
by skipping indices instead of images. TFDS datasets stored as tfrecord (TFDS's default file format) cannot be read
by index: they are streams (`Source.read`), each process reading its own part (data/pipeline.py says how they are
shuffled and resumed).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import logging
import os
import threading
from typing import Callable, Optional

import numpy as np
import tensorflow as tf

from dino_jax import paths
from dino_jax.data import augment

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclasses.dataclass(frozen=True)
class Source:
    """A dataset, read by index (`load`) or, for TFDS tfrecord datasets, as a stream (`read`).

    `load(index)` is a TF-traceable function from an int64 scalar to the example dict.
    `read(process_index, process_count, seed=None, skip=0, drop_remainder=False)` returns that process's part of
    the dataset (TFDS's per-process split) once as a tf.data.Dataset of example dicts: files shuffled and examples
    passed through a shuffle buffer when `seed` is given (in dataset order when None), the first `skip` of them
    dropped before decoding. Its "index" is the example's position in that order plus the part's first index in
    the dataset, so with seed=None it is the example's index in the dataset.
    """
    name: str
    num_examples: int
    num_classes: int
    load: Optional[Callable[[tf.Tensor], dict]] = None
    read: Optional[Callable[..., tf.data.Dataset]] = None
    has_mask: bool = False
    skipped: tuple = ()  # files left out because they could not be read (folder sources)
    # Files that passed the scan but failed to decode while reading (folder sources); grows as they are met.
    decode_failures: set = dataclasses.field(default_factory=set, compare=False)

    @property
    def random_access(self) -> bool:
        return self.load is not None

    def element(self, index_ds: tf.data.Dataset, num_parallel_calls=tf.data.AUTOTUNE) -> tf.data.Dataset:
        return index_ds.map(self.load, num_parallel_calls=num_parallel_calls, deterministic=True)

    def dataset(self) -> tf.data.Dataset:
        """Every example once, in index order."""
        if not self.random_access:
            return self.read(0, 1)
        return self.element(tf.data.Dataset.range(self.num_examples))


def load_source(spec: str, split: Optional[str] = None, *, data_dir: Optional[str] = None,
                image_size: Optional[int] = None, grayscale: bool = False,
                max_examples: Optional[int] = None) -> Source:
    """Open a dataset from its spec string.

    spec: `tfds:NAME[:SPLIT]` (e.g. tfds:imagenet2012:train), `folder:PATH` (PATH/<class>/<image>) or
    `demo[:SPLIT][:N]` (procedural, SPLIT train|val, N examples, `image_size` pixels, default 32).
    split: overrides the split in the spec. grayscale: convert every image to 3-channel grey (for the demo this
    renders grey at the source). max_examples: keep an evenly spread subset of this many examples (indices are
    those of the full dataset; random-access sources only).
    """
    kind, _, rest = spec.partition(":")
    if kind == "tfds":
        name, _, spec_split = rest.partition(":")
        if not name:
            raise ValueError(f"dataset spec {spec!r}: expected tfds:NAME[:SPLIT], e.g. tfds:imagenet2012:train")
        source = tfds_source(name, split or spec_split or "train", data_dir=data_dir)
    elif kind == "folder":
        if not rest:
            raise ValueError(f"dataset spec {spec!r}: expected folder:PATH with PATH/<class>/<image files>")
        source = folder_source(rest)
    elif kind == "demo":
        from dino_jax.data import demo  # imports this module for Source

        parts = [p for p in rest.split(":") if p]
        spec_split = parts[0] if parts else "train"
        num = int(parts[1]) if len(parts) > 1 else None
        source = demo.source(split or spec_split, num_examples=num, image_size=image_size or 32, grayscale=grayscale)
    else:
        raise ValueError(f"dataset spec {spec!r}: unknown kind {kind!r}; use tfds:NAME[:SPLIT], folder:PATH or demo")
    if grayscale and kind != "demo":
        source = _grayscale(source)
    if max_examples and max_examples < source.num_examples:
        if not source.random_access:
            raise ValueError(f"{source.name}: a subset (max_examples={max_examples}) needs random access, and this "
                             "dataset is stored as tfrecord; convert it with `tfds convert_format` to array_record, "
                             "or use the whole dataset")
        source = _subset(source, max_examples)
    return source


def _grayscale(source: Source) -> Source:
    def grey(ex):
        image = tf.cast(tf.round(augment.grey(tf.cast(ex["image"], tf.float32))), tf.uint8)
        return {**ex, "image": tf.tile(image, [1, 1, 3])}

    if not source.random_access:
        return dataclasses.replace(source, read=lambda *a, **k: source.read(*a, **k).map(grey))
    return dataclasses.replace(source, load=lambda index: grey(source.load(index)))


def _subset(source: Source, n: int) -> Source:
    """n examples spread evenly over the dataset (folders are sorted by class, so not simply the first n)."""
    keep = tf.constant((np.arange(n, dtype=np.int64) * source.num_examples) // n)
    return dataclasses.replace(source, num_examples=n, load=lambda i: source.load(tf.gather(keep, i)))


# ---------------------------------------------------------------- TFDS

SHUFFLE_BUFFER = 10_000  # encoded examples per process in the tfrecord stream's shuffle buffer


def tfds_source(name: str, split: str, *, data_dir: Optional[str] = None) -> Source:
    """A TFDS image dataset: random access (`tfds.data_source`) when it is stored as array_record, else a stream."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(f"tfds:{name}: TFDS has no dataset called {name!r} (check the spelling, "
                         "see https://www.tensorflow.org/datasets/catalog)") from e
    features = builder.info.features
    image_keys = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
    if not image_keys:
        raise ValueError(f"tfds:{name} has no image feature (features: {sorted(features.keys())})")
    image_key = image_keys[0]
    label = features["label"] if "label" in features else None
    num_classes = label.num_classes if isinstance(label, tfds.features.ClassLabel) else 0
    decoders = {image_key: tfds.decode.SkipDecoding()}
    where = f"data_dir={data_dir or tfds.core.constants.DATA_DIR}"

    def decode(encoded):
        return tf.io.decode_image(tf.reshape(encoded, []), channels=3, expand_animations=False)

    formats = {builder.info.file_format, *builder.info.alternative_file_formats}
    if builder.info.splits and tfds.core.FileFormat.ARRAY_RECORD not in formats:  # prepared, not for random access
        try:
            num_examples = builder.info.splits[split].num_examples
        except (KeyError, ValueError) as e:
            raise ValueError(f"tfds:{name}:{split}: no such split ({where}; splits: "
                             f"{sorted(builder.info.splits.keys())})") from e

        def read(process_index, process_count, seed=None, skip=0, drop_remainder=False):
            # TFDS's per-process split (what tfds.split_for_jax_process returns): contiguous, in dataset order.
            parts = tfds.even_splits(split, process_count, drop_remainder=drop_remainder)
            first = sum(builder.info.splits[p].num_examples for p in parts[:process_index])
            ds = builder.as_dataset(split=parts[process_index], shuffle_files=seed is not None, decoders=decoders,
                                    read_config=tfds.ReadConfig(shuffle_seed=seed, try_autocache=False))
            if seed is not None:
                ds = ds.shuffle(SHUFFLE_BUFFER, seed=seed)
            no_label = tf.constant(-1, tf.int32)
            return ds.enumerate().skip(skip).map(
                lambda i, ex: {"image": decode(ex[image_key]), "index": first + i,
                               "label": tf.cast(ex["label"], tf.int32) if label is not None else no_label},
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

        return Source(f"tfds:{name}:{split}", num_examples, num_classes, read=read)

    try:
        data = tfds.data_source(name, split=split, data_dir=data_dir, download=False, decoders=decoders)
    except Exception as e:  # tfds raises several types here (missing files, bad split)
        raise ValueError(f"tfds:{name}:{split}: cannot open it ({type(e).__name__}: {e}); prepare it first "
                         f"(`tfds build {name}`, {where})") from e
    num_examples = len(data)

    def fetch(index):
        ex = data[int(index)]
        return ex[image_key], np.int32(ex["label"] if label is not None else -1)

    def load(index):
        encoded, lab = tf.py_function(fetch, [index], [tf.string, tf.int32])
        return {"image": decode(encoded), "label": tf.reshape(lab, []), "index": tf.cast(index, tf.int64)}

    return Source(f"tfds:{name}:{split}", num_examples, num_classes, load)


# ---------------------------------------------------------------- image folder

# How each file is decoded: by TF in the graph (fast) or by PIL in a py_function (formats or modes TF lacks).
_TF_JPEG, _TF_OTHER, _PIL, _TF_JPEG_CUT = 0, 1, 2, 3  # _TF_JPEG_CUT: a JPEG with no end-of-image marker
_TF_MODES = {"RGB", "L", "RGBA", "LA", "P", "CMYK", "I;16", "I;16B"}


def _probe(path: str) -> Optional[int]:
    """How to decode `path`, from its header (cheap: PIL reads only the header); None if it is not an image."""
    from PIL import Image

    try:
        with paths.Path(path).open("rb") as f, Image.open(f) as im:
            fmt, mode = im.format, im.mode
            cut = fmt == "JPEG" and f.seek(-2, os.SEEK_END) >= 0 and f.read(2) != b"\xff\xd9"
    except Exception:  # PIL raises many types for unreadable files
        return None
    if fmt == "JPEG" and mode in _TF_MODES:
        return _TF_JPEG_CUT if cut else _TF_JPEG
    if fmt in ("PNG", "BMP", "GIF") and mode in _TF_MODES:
        return _TF_OTHER
    return _PIL


def _pil_decode(path):
    """RGB uint8 via PIL; an empty (0, 0, 3) array marks a file that failed to decode (folder_source replaces it)."""
    from PIL import Image, ImageFile

    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        with Image.open(io.BytesIO(paths.Path(path.numpy().decode()).read_bytes())) as im:
            return np.asarray(im.convert("RGB"), np.uint8)
    except Exception:  # noqa: BLE001 (any decoder error means: skip this file)
        return np.zeros((0, 0, 3), np.uint8)


def decode_file(path, how):
    """Read and decode one image file to RGB uint8 (grey, RGBA and CMYK are converted like PIL's convert('RGB'))."""
    def tf_jpeg():
        return tf.io.decode_jpeg(tf.io.read_file(path), channels=3, try_recover_truncated=True,
                                 acceptable_fraction=0.25)

    def tf_other():
        return tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)

    def pil():
        image = tf.py_function(_pil_decode, [path], tf.uint8)
        return tf.ensure_shape(image, [None, None, 3])

    return tf.switch_case(how, [tf_jpeg, tf_other, pil, tf_jpeg])


def decode_or_flag(path, how):
    """(image, ok): decode_file's image, or an empty image and False where the file does not decode.

    A file can pass the header scan and still fail here (a JPEG with a valid header and corrupt data: TF's
    "jpeg::Uncompress failed"). TF ops cannot catch errors, so the decode runs in a one-element dataset whose error
    `ignore_errors` turns into "no element", and a flagged empty image follows it. Measured on 2 shared cores:
    +0.4-0.9 ms per decode alone (a 512x512 JPEG decode is ~1.5 ms), within noise in benchmarks/input_pipeline.py
    (the multi-crop costs ~20 ms per image).
    """
    decoded = tf.data.Dataset.from_tensors((path, how)).map(lambda p, h: (decode_file(p, h), True)).ignore_errors()
    failed = tf.data.Dataset.from_tensors((tf.zeros([0, 0, 3], tf.uint8), False))
    image, ok = decoded.concatenate(failed).take(1).get_single_element()
    return image, ok & (tf.size(image) > 0)  # the PIL path flags its failures with an empty image


def folder_source(path: str, num_threads: int = 16, max_substitutes: int = 16) -> Source:
    """An ImageFolder: PATH/<class>/<image>, classes sorted by name (labels as torchvision's ImageFolder).

    Every file's header is checked once here; files that are not readable images are skipped with one warning.
    A file that passes that check but fails to decode when it is read (a full decode of every file at start-up
    would take too long on ImageNet) is replaced by the next example (index + 1, + 2, ... mod N) that decodes,
    image and label, so the batch keeps its size and the same seed still gives the same batches; each such file
    gets one warning and is recorded in `Source.decode_failures`. The replaced example keeps its own index (and so
    its own crop seed).
    """
    if not paths.Path(path).is_dir():
        raise ValueError(f"folder:{path}: no such directory; expected {path}/<class name>/<image files>")
    classes = sorted(d.name for d in paths.Path(path).iterdir() if d.is_dir())
    if not classes:
        raise ValueError(f"folder:{path}: no class subfolders; expected {path}/<class name>/<image files>")
    files, labels = [], []
    for label, cls in enumerate(classes):
        for root, _, names in sorted(paths.walk(os.path.join(path, cls))):
            for n in sorted(names):
                if n.lower().endswith(IMAGE_EXTENSIONS):
                    files.append(os.path.join(root, n))
                    labels.append(label)
    if not files:
        raise ValueError(f"folder:{path}: no image files ({', '.join(IMAGE_EXTENSIONS)}) under its "
                         f"{len(classes)} class subfolders")
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
        how = list(pool.map(_probe, files))
    bad = [f for f, h in zip(files, how) if h is None]
    if bad:
        logging.warning("folder:%s: skipping %d unreadable file(s): %s%s", path, len(bad), ", ".join(bad[:10]),
                        " ..." if len(bad) > 10 else "")
    cut = [f for f, h in zip(files, how) if h == _TF_JPEG_CUT]
    if cut:  # libjpeg's own "Premature end of JPEG file" names no file
        logging.warning("folder:%s: %d JPEG file(s) end before their end-of-image marker (cut short?); their missing "
                        "part decodes as grey: %s%s", path, len(cut), ", ".join(cut[:10]), " ..." if len(cut) > 10 else "")
    keep = [i for i, h in enumerate(how) if h is not None]
    if not keep:
        raise ValueError(f"folder:{path}: none of the {len(files)} image files could be read")
    paths_t = tf.constant([files[i] for i in keep])
    labels_t = tf.constant([labels[i] for i in keep], tf.int32)
    how_t = tf.constant([how[i] for i in keep], tf.int32)
    num = len(keep)
    failures, lock = set(), threading.Lock()

    def report(file, index, substitute):
        """Warn once per file; runs only when a decode fails."""
        name = file.numpy().decode()
        with lock:
            new = name not in failures
            failures.add(name)
            count = len(failures)
        if new:
            logging.warning("folder:%s: skipping %s: it cannot be decoded (%d such file(s) so far); example %d is "
                            "replaced by example %d", path, name, count, int(index), int(substitute) % num)
        return substitute

    def attempt(i):
        return decode_or_flag(tf.gather(paths_t, i), tf.gather(how_t, i))

    def load(index):
        index = tf.cast(index, tf.int64)
        image, ok = attempt(index)

        def replace(k, i, image, ok):
            i = tf.reshape(tf.py_function(report, [tf.gather(paths_t, i), index, index + k], tf.int64), []) % num
            return (k + 1, i) + attempt(i)

        _, source_index, image, ok = tf.while_loop(
            lambda k, i, image, ok: ~ok & (k <= max_substitutes), replace,
            (tf.constant(1, tf.int64), index, image, ok),
            shape_invariants=(tf.TensorShape([]), tf.TensorShape([]), tf.TensorShape([None, None, 3]),
                              tf.TensorShape([])))
        checked = tf.debugging.Assert(ok, [f"folder:{path}: {max_substitutes + 1} files in a row from example",
                                           index, "failed to decode (see the warnings above)"])
        with tf.control_dependencies([checked]):
            image = tf.identity(image)
        return {"image": image, "label": tf.gather(labels_t, source_index), "index": index}

    return Source(f"folder:{path}", num, len(classes), load, skipped=tuple(bad), decode_failures=failures)
