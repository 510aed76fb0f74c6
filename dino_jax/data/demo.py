"""The procedural `demo` dataset: objects on cluttered backgrounds, with class labels and object masks.

Generated in memory, deterministically, in a few seconds: a dataset on which DINO visibly learns on a CPU in
minutes (configs/demo.py), with no download.
"""
from __future__ import annotations

import concurrent.futures
import functools
import os
from typing import Optional

import numpy as np
import tensorflow as tf

from dino_jax.data.augment import GREY_WEIGHTS
from dino_jax.data.sources import Source

SIZES = {"train": 10000, "val": 1000}
SEEDS = {"train": 0, "val": 12345}

# Ten classes, each a distinct (shape, fill texture) pair: both the outline and the texture identify the class,
# and both survive DINO's crops (a local crop of the object still shows its texture). Position, size, mirror image,
# texture phase, tones and the cluttered background are nuisances, so raw pixels stay near chance.
CLASSES = (("crescent", "shaded"), ("star", "stripes"), ("square", "dots"), ("ring", "checker"),
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
        chroma -= (chroma @ np.array(GREY_WEIGHTS))[:, None]  # keep the luminance
        rgb = rgb + chroma
    return np.clip(rgb, 0, 1).astype(np.float32)


def generate(num_examples: int, image_size: int = 32, *, seed: int = 0, grayscale: bool = False,
             size_range=(0.25, 0.42), chunk: int = 128):
    """Objects on cluttered backgrounds: (images uint8 (N, S, S, 3), labels int32 (N,), masks uint8 (N, S, S)).

    Each image shows one object of class (shape, texture) at a random position (up to 30% of its radius may leave
    the frame), radius (`size_range`, a fraction of the image side: large, so local crops see parts of it),
    aspect and tones, upright within +-20 degrees or mirrored, its texture at the class's own orientation (+-15
    degrees, mirrored with the object), on a background of a base tone, band-pass clutter with a ~2-pixel grain and
    the same statistics in every image, and pixel noise.

    Why these choices (each measured, docs/demo_recipe_history.md):
    - The nuisances are the ones DINO's augmentations teach invariance to (crops: position and size; flips: the
      mirror image; colour jitter: tones). Random rotation and texture orientation, which no augmentation undoes,
      are what DINO clusters by.
    - The background has no large-scale structure: what two crops of one image share, DINO learns.
    - The object's two tones lie 0.25-0.4 above and below the background under it, so it stands out by its
      pattern and outline, not by its mean brightness (a random-init ViT's features are mostly mean brightness).
    - No rotation-invariant shape and a shaded rather than flat fill: those make raw-pixel neighbours informative.
    - Colour is a nuisance DINO learns instead of shape: `grayscale=True` renders luminance only.

    Deterministic in `seed`; image i is the same whatever `num_examples`. 10k 32-px images take ~4 s on 2 cores.
    Raw-pixel weighted 20-NN stays near chance (tests/test_sources.py keeps it below 25%).
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
        lab = r.integers(0, len(CLASSES), n)
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
        t_angle = (np.arange(len(CLASSES)) * 0.7 % np.pi)[lab] + r.uniform(-0.25, 0.25, n)
        t_angle = np.where(mirror, np.pi - t_angle, t_angle)
        alpha = np.zeros((n, image_size, image_size), np.float32)  # object coverage of each pixel
        alpha1 = np.zeros_like(alpha)  # coverage by the texture's first tone
        for c, (shape, texture) in enumerate(CLASSES):
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
def _arrays(split: str, num_examples: int, image_size: int, grayscale: bool):
    return generate(num_examples, image_size, seed=SEEDS[split], grayscale=grayscale)


def source(split: str = "train", *, num_examples: Optional[int] = None, image_size: int = 32,
           grayscale: bool = False) -> Source:
    """The procedural demo (see `generate`), generated in memory once per (split, size, resolution, grey)."""
    if split not in SEEDS:
        raise ValueError(f"demo: unknown split {split!r}; use one of {sorted(SEEDS)}")
    num_examples = num_examples or SIZES[split]
    images, labels, masks = _arrays(split, num_examples, image_size, grayscale)
    images_t, labels_t, masks_t = tf.constant(images), tf.constant(labels), tf.constant(masks)

    def load(index):
        return {"image": tf.gather(images_t, index), "label": tf.gather(labels_t, index),
                "index": tf.cast(index, tf.int64), "mask": tf.gather(masks_t, index)}

    return Source(f"demo:{split}", num_examples, len(CLASSES), load, has_mask=True)
