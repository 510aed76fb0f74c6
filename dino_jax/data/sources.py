"""Datasets as random-access sources: `tfds:NAME[:split]`, `folder:PATH` and the procedural `demo`.

A `Source` maps a stable example index (0 .. num_examples-1) to a dict of tensors inside tf.data:
{"image": uint8 (H, W, 3), "label": int32, "index": int64, and "mask": uint8 (H, W) for the demo}.
Random access is what lets the pipeline shuffle globally, split examples between processes and resume mid-epoch by
skipping indices instead of decoded images.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import os
import threading
from typing import Callable, Optional

import numpy as np
import tensorflow as tf

from dino_jax.data import augment  # noqa: F401  (hides the GPUs from TF before anything else touches TF)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
DEMO_SIZES = {"train": 10000, "val": 1000}
DEMO_SEEDS = {"train": 0, "val": 12345}


@dataclasses.dataclass(frozen=True)
class Source:
    """A dataset with random access by index.

    `load(index)` is a TF-traceable function from an int64 scalar to the example dict.
    """
    name: str
    num_examples: int
    num_classes: int
    load: Callable[[tf.Tensor], dict]
    has_mask: bool = False
    skipped: tuple = ()  # files left out because they could not be read (folder sources)
    # Files that passed the scan but failed to decode while reading (folder sources); grows as they are met.
    decode_failures: set = dataclasses.field(default_factory=set, compare=False)

    def element(self, index_ds: tf.data.Dataset, num_parallel_calls=tf.data.AUTOTUNE) -> tf.data.Dataset:
        return index_ds.map(self.load, num_parallel_calls=num_parallel_calls, deterministic=True)

    def dataset(self) -> tf.data.Dataset:
        """Every example once, in index order."""
        return self.element(tf.data.Dataset.range(self.num_examples))


def load_source(spec: str, split: Optional[str] = None, *, data_dir: Optional[str] = None,
                image_size: Optional[int] = None, grayscale: bool = False,
                max_examples: Optional[int] = None) -> Source:
    """Open a dataset from its spec string.

    spec: `tfds:NAME[:SPLIT]` (e.g. tfds:imagenet2012:train), `folder:PATH` (PATH/<class>/<image>) or
    `demo[:SPLIT][:N]` (procedural, SPLIT train|val, N examples, `image_size` pixels, default 32).
    split: overrides the split in the spec. grayscale: convert every image to 3-channel grey (for the demo this
    renders grey at the source). max_examples: keep an evenly spread subset of this many examples (indices are
    those of the full dataset).
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
        parts = [p for p in rest.split(":") if p]
        spec_split = parts[0] if parts else "train"
        num = int(parts[1]) if len(parts) > 1 else None
        source = demo_source(split or spec_split, num_examples=num, image_size=image_size or 32, grayscale=grayscale)
    else:
        raise ValueError(f"dataset spec {spec!r}: unknown kind {kind!r}; use tfds:NAME[:SPLIT], folder:PATH or demo")
    if grayscale and kind != "demo":
        source = _grayscale(source)
    if max_examples and max_examples < source.num_examples:
        source = _subset(source, max_examples)
    return source


def _grayscale(source: Source) -> Source:
    def load(index):
        ex = source.load(index)
        grey = tf.cast(tf.round(augment.grey(tf.cast(ex["image"], tf.float32))), tf.uint8)
        return {**ex, "image": tf.tile(grey, [1, 1, 3])}

    return dataclasses.replace(source, load=load)


def _subset(source: Source, n: int) -> Source:
    """n examples spread evenly over the dataset (folders are sorted by class, so not simply the first n)."""
    keep = tf.constant((np.arange(n, dtype=np.int64) * source.num_examples) // n)
    return dataclasses.replace(source, num_examples=n, load=lambda i: source.load(tf.gather(keep, i)))


# ---------------------------------------------------------------- TFDS


def tfds_source(name: str, split: str, *, data_dir: Optional[str] = None) -> Source:
    """A TFDS image dataset through `tfds.data_source` (random access; needs the array_record file format)."""
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
    try:
        data = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                                decoders={image_key: tfds.decode.SkipDecoding()})
    except Exception as e:  # tfds raises several types here (missing files, tfrecord format, bad split)
        raise ValueError(
            f"tfds:{name}:{split}: cannot open it for random access ({type(e).__name__}: {e}). Prepare it first "
            f"(`tfds build {name} --file_format=array_record`, data_dir={data_dir or tfds.core.constants.DATA_DIR}); "
            "a dataset already prepared as tfrecord can be converted with `tfds convert_format`") from e
    num_examples = len(data)

    def fetch(index):
        ex = data[int(index)]
        return ex[image_key], np.int32(ex["label"] if label is not None else -1)

    def load(index):
        encoded, lab = tf.py_function(fetch, [index], [tf.string, tf.int32])
        image = tf.io.decode_image(tf.reshape(encoded, []), channels=3, expand_animations=False)
        return {"image": image, "label": tf.reshape(lab, []), "index": tf.cast(index, tf.int64)}

    return Source(f"tfds:{name}:{split}", num_examples, num_classes, load)


# ---------------------------------------------------------------- image folder

# How each file is decoded: by TF in the graph (fast) or by PIL in a py_function (formats or modes TF lacks).
_TF_JPEG, _TF_OTHER, _PIL = 0, 1, 2
_TF_MODES = {"RGB", "L", "RGBA", "LA", "P", "CMYK", "I;16", "I;16B"}


def _probe(path: str) -> Optional[int]:
    """How to decode `path`, from its header (cheap: PIL reads only the header); None if it is not an image."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            fmt, mode = im.format, im.mode
    except Exception:  # PIL raises many types for unreadable files
        return None
    if fmt == "JPEG" and mode in _TF_MODES:
        return _TF_JPEG
    if fmt in ("PNG", "BMP", "GIF") and mode in _TF_MODES:
        return _TF_OTHER
    return _PIL


def _pil_decode(path):
    """RGB uint8 via PIL; an empty (0, 0, 3) array marks a file that failed to decode (folder_source replaces it)."""
    from PIL import Image, ImageFile

    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        with Image.open(path.numpy().decode()) as im:
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

    return tf.switch_case(how, [tf_jpeg, tf_other, pil])


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
    if not os.path.isdir(path):
        raise ValueError(f"folder:{path}: no such directory; expected {path}/<class name>/<image files>")
    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    if not classes:
        raise ValueError(f"folder:{path}: no class subfolders; expected {path}/<class name>/<image files>")
    files, labels = [], []
    for label, cls in enumerate(classes):
        for root, _, names in sorted(os.walk(os.path.join(path, cls), followlinks=True)):
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


# ---------------------------------------------------------------- procedural demo

# Ten classes, each a distinct (shape, fill texture) pair: both the outline and the texture identify the class,
# and both survive DINO's crops (a local crop of the object still shows its texture). Position, size, mirror image,
# texture phase, tones and the cluttered background are nuisances, so raw pixels stay near chance.
DEMO_CLASSES = (("crescent", "shaded"), ("star", "stripes"), ("square", "dots"), ("ring", "checker"),
                ("triangle", "rings"), ("ellipse", "grid"), ("cross", "waves"), ("diamond", "thick_stripes"),
                ("hexagon", "zigzag"), ("arrow", "speckle"))


CLUTTER_AMPLITUDE, CLUTTER_SIGMA = 0.08, 1.0  # std of the background clutter (of the 0-1 range), its grain in px


def _shape_mask(shape: str, u, v):
    """Inside test in the object's own frame (object radius 1)."""
    rho = np.hypot(u, v)
    if shape == "crescent":  # not a circle: a rotation-invariant shape is easy for raw pixels
        return (rho <= 1.0) & (np.hypot(u - 0.45, v) > 0.75)
    if shape == "star":
        return rho <= 0.62 + 0.38 * np.cos(5 * np.arctan2(v, u))
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.78
    if shape == "ring":
        return (rho <= 1.0) & (rho >= 0.55)
    if shape == "triangle":  # equilateral, circumradius 1
        a = np.array([0.0, 2 * np.pi / 3, 4 * np.pi / 3])[:, None, None, None]
        return np.all(u * np.cos(a) + v * np.sin(a) <= 0.5, axis=0)
    if shape == "ellipse":
        return (u / 1.0) ** 2 + (v / 0.55) ** 2 <= 1.0
    if shape == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.95))
    if shape == "diamond":
        return np.abs(u) / 0.55 + np.abs(v) <= 1.0
    if shape == "hexagon":
        a = np.array([0.0, np.pi / 3, 2 * np.pi / 3])[:, None, None, None]
        return np.all(np.abs(u * np.cos(a) + v * np.sin(a)) <= 0.87, axis=0)
    if shape == "arrow":
        shaft = (np.abs(v) <= 0.22) & (u >= -0.95) & (u <= 0.15)
        head = (u >= 0.15) & (np.abs(v) <= 0.95 * (0.95 - u) / 0.8)
        return shaft | head
    raise ValueError(shape)


def _texture(texture: str, x, y, cx, cy, period, angle, phase, radius):
    """Fill pattern in pixel units, 0..1, rotated by `angle`: a smooth ramp across the object ("shaded") or a
    binary pattern of the given period."""
    c, s = np.cos(angle), np.sin(angle)
    if texture == "shaded":
        return np.clip(0.5 + ((x - cx) * c + (y - cy) * s) / (2 * radius), 0, 1).astype(np.float32)
    a = (x * c + y * s) / period + phase
    b = (-x * s + y * c) / period + phase
    if texture == "stripes":
        return (np.mod(a, 1.0) < 0.5).astype(np.float32)
    if texture == "dots":
        return (np.hypot(np.mod(a, 1.0) - 0.5, np.mod(b, 1.0) - 0.5) < 0.3).astype(np.float32)
    if texture == "checker":
        return ((np.floor(a) + np.floor(b)) % 2 == 0).astype(np.float32)
    if texture == "rings":
        return (np.mod(np.hypot(x - cx, y - cy) / period + phase, 1.0) < 0.5).astype(np.float32)
    if texture == "grid":
        return ((np.mod(a, 1.0) < 0.3) | (np.mod(b, 1.0) < 0.3)).astype(np.float32)
    if texture == "waves":
        return (np.mod(a + 0.35 * np.sin(2 * np.pi * b / 1.5), 1.0) < 0.5).astype(np.float32)
    if texture == "thick_stripes":
        return (np.mod(a / 2.2, 1.0) < 0.5).astype(np.float32)
    if texture == "zigzag":
        return (np.mod(a + 2 * np.abs(np.mod(b, 1.0) - 0.5), 1.0) < 0.5).astype(np.float32)
    if texture == "speckle":  # a fixed pseudo-random binary pattern on a 1.5-pixel lattice
        cell = np.floor(a * period / 1.5) * 12.9898 + np.floor(b * period / 1.5) * 78.233
        return (np.mod(np.sin(cell) * 43758.5453, 1.0) < 0.5).astype(np.float32)
    raise ValueError(texture)


def _colours(rng, n, luminance, grayscale):
    """RGB colours with the given ITU-R 601 luminance (n, 3); grey when `grayscale`."""
    rgb = np.repeat(luminance[:, None], 3, axis=1)
    if not grayscale:
        chroma = rng.normal(0, 0.25, (n, 3))
        chroma -= (chroma @ np.array(augment.GREY_WEIGHTS))[:, None]  # keep the luminance
        rgb = rgb + chroma
    return np.clip(rgb, 0, 1).astype(np.float32)


def make_demo(num_examples: int, image_size: int = 32, *, seed: int = 0, grayscale: bool = False,
              size_range=(0.25, 0.42), chunk: int = 128):
    """Objects on cluttered backgrounds: (images uint8 (N, S, S, 3), labels int32 (N,), masks uint8 (N, S, S)).

    Each image shows one object of class (shape, texture) at a random position (up to 30% of its radius may leave
    the frame), radius (`size_range`, a fraction of the image side: large, so local crops see parts of it),
    aspect and tone, upright within +-20 degrees or mirrored, its texture at the class's own orientation (+-15
    degrees, mirrored with the object), on a cluttered background: a base tone, band-pass noise with a ~2-pixel
    grain and the same statistics in every image, and pixel noise. The object's two tones lie 0.25-0.4 above and
    below the background under it, so it stands out by its pattern and outline but not by its mean brightness: a
    random-init ViT's features are ~80% mean brightness (first principal component), and with one bright-or-dark
    object tone on a 0.2-0.8 background DINO's first epochs split images by brightness, not by class. The
    background has no large-scale structure because what two crops of one image share, DINO learns: with a
    brightness gradient and large blobs (the previous background) its teacher 20-NN gained 0.5 points in 2 epochs,
    with this clutter 8. The nuisances are the ones DINO's augmentations teach invariance to
    (crops: position and size; flips: the mirror image; colour jitter: tones): rotation and texture orientation,
    which no augmentation undoes, were what DINO clustered by when they were random, and background stripes and
    lines were textures that competed with the object's. Colour is a nuisance that DINO learns instead of shape
    (shared/research/demo_feasibility.md): `grayscale=True` renders luminance only. No rotation-invariant shape
    (no circle) and a shaded rather than flat fill, because those made raw-pixel neighbours informative.
    Deterministic in `seed`; 10k 32-px images take ~4 s on 2 cores.

    Raw-pixel weighted k-NN (k=20, T=0.07, cosine; 1000 val queries, seed 12345), chance 10%: grey 32 px 11.8%
    (2000-image bank; the masks alone 60.4%). tests/test_sources.py keeps it below 25%. Pixels with each image's
    mean subtracted do far better (61.3%; 32.2% on the previous background): a plain background leaves the object
    as the only structure, which is what makes it learnable by DINO in minutes.
    """
    # Whole chunks, each from its own generator, so image i is the same whatever num_examples (demo:train:2000 is
    # the first 2000 images of demo:train) and whatever the thread count.
    padded = -(-num_examples // chunk) * chunk
    images = np.empty((padded, image_size, image_size, 3), np.uint8)
    masks = np.empty((padded, image_size, image_size), np.uint8)
    labels = np.empty(padded, np.int32)
    ss = 2  # supersampling of the object (its edge and texture); the background (blurred noise) needs none
    fine = (np.arange(image_size * ss, dtype=np.float32) + 0.5) / ss
    fy, fx = (a[None] for a in np.meshgrid(fine, fine, indexing="ij"))
    taps = np.arange(image_size)[:, None] - np.arange(image_size)[None, :]
    blur = np.exp(-0.5 * (taps / CLUTTER_SIGMA) ** 2) * (np.abs(taps) <= 4)  # Gaussian rows, zero beyond 4 px
    blur = (blur / blur.sum(axis=1, keepdims=True)).astype(np.float32)

    def col(a):
        return np.asarray(a, np.float32)[:, None, None]

    def down(a):
        return a.reshape(-1, image_size, ss, image_size, ss).mean(axis=(2, 4))

    def render(start):
        n = chunk
        r = np.random.default_rng([seed, start])
        lab = r.integers(0, len(DEMO_CLASSES), n)
        labels[start:start + n] = lab

        # Background luminance: base tone + band-pass clutter + pixel noise. The clutter has the same statistics in
        # every image and a ~2-pixel grain, so it is texture that two crops of one image do not share recognisably.
        base = r.uniform(0.4, 0.6, n)
        clutter = blur @ r.standard_normal((n, image_size, image_size), np.float32) @ blur.T
        clutter /= clutter.std(axis=(1, 2), keepdims=True)
        noise = r.standard_normal((n, image_size, image_size), np.float32) * col(r.uniform(0.01, 0.05, n))
        bg = np.clip(col(base) + CLUTTER_AMPLITUDE * clutter + noise, 0, 1)

        # Object: position, radius, pose (upright or mirrored), aspect jitter; coverage and texture on the fine grid.
        rad = r.uniform(*size_range, n) * image_size
        margin = rad * 0.7  # up to 30% of the radius may leave the frame: more positions, fewer pixel look-alikes
        cx, cy = r.uniform(margin, image_size - margin), r.uniform(margin, image_size - margin)
        mirror = r.random(n) < 0.5
        theta = r.uniform(-0.35, 0.35, n) + np.pi * mirror
        aspect = np.exp(r.uniform(-0.15, 0.15, n))
        period, phase = r.uniform(3.5, 5.5, n), r.uniform(0, 1, n)
        t_angle = (np.arange(len(DEMO_CLASSES)) * 0.7 % np.pi)[lab] + r.uniform(-0.25, 0.25, n)
        t_angle = np.where(mirror, np.pi - t_angle, t_angle)
        alpha = np.zeros((n, image_size, image_size), np.float32)  # object coverage of each pixel
        alpha1 = np.zeros_like(alpha)  # coverage by the texture's first tone
        for c, (shape, texture) in enumerate(DEMO_CLASSES):
            sel = np.flatnonzero(lab == c)
            if not sel.size:
                continue
            dx, dy = fx - col(cx[sel]), fy - col(cy[sel])
            ct, st_ = col(np.cos(theta[sel])), col(np.sin(theta[sel]))
            u = (dx * ct + dy * st_) / col(rad[sel] * aspect[sel])
            v = (-dx * st_ + dy * ct) / col(rad[sel] / aspect[sel])
            inside = _shape_mask(shape, u, v).astype(np.float32)
            fill = _texture(texture, fx, fy, col(cx[sel]), col(cy[sel]), col(period[sel]),
                            col(t_angle[sel]), col(phase[sel]), col(rad[sel]))
            alpha[sel], alpha1[sel] = down(inside), down(inside * fill)

        # Tones: symmetric about the mean background under the object, so the object's mean brightness is the
        # background's.
        under = (bg * alpha).sum(axis=(1, 2)) / np.maximum(alpha.sum(axis=(1, 2)), 1e-6)
        swing = np.where(r.random(n) < 0.5, 1.0, -1.0) * r.uniform(0.25, 0.4, n)
        tone1, tone2 = np.clip(under + swing, 0, 1), np.clip(under - swing, 0, 1)
        bg_rgb = bg[..., None] + (_colours(r, n, np.full(n, 0.5, np.float32), grayscale) - 0.5)[:, None, None]
        c1, c2 = _colours(r, n, tone1, grayscale), _colours(r, n, tone2, grayscale)
        img = (alpha1[..., None] * c1[:, None, None] + (alpha - alpha1)[..., None] * c2[:, None, None]
               + (1 - alpha[..., None]) * bg_rgb)
        images[start:start + n] = np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)
        masks[start:start + n] = alpha >= 0.5

    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:  # numpy releases the GIL
        list(pool.map(render, range(0, num_examples, chunk)))
    return images[:num_examples], labels[:num_examples], masks[:num_examples]


@functools.lru_cache(maxsize=8)
def _demo_arrays(split: str, num_examples: int, image_size: int, grayscale: bool):
    return make_demo(num_examples, image_size, seed=DEMO_SEEDS[split], grayscale=grayscale)


def demo_source(split: str = "train", *, num_examples: Optional[int] = None, image_size: int = 32,
                grayscale: bool = False) -> Source:
    """The procedural demo (see `make_demo`), generated in memory once per (split, size, resolution, grey)."""
    if split not in DEMO_SEEDS:
        raise ValueError(f"demo: unknown split {split!r}; use one of {sorted(DEMO_SEEDS)}")
    num_examples = num_examples or DEMO_SIZES[split]
    images, labels, masks = _demo_arrays(split, num_examples, image_size, grayscale)
    images_t, labels_t, masks_t = tf.constant(images), tf.constant(labels), tf.constant(masks)

    def load(index):
        return {"image": tf.gather(images_t, index), "label": tf.gather(labels_t, index),
                "index": tf.cast(index, tf.int64), "mask": tf.gather(masks_t, index)}

    return Source(f"demo:{split}", num_examples, len(DEMO_CLASSES), load, has_mask=True)
