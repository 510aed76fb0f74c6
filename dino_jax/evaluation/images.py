"""One-image-at-a-time reading and forwards for the retrieval, copy-detection and video protocols.

These protocols see images at their own sizes (aspect-preserving thumbnails, DAVIS frames), one or a few at a time,
as the reference scripts do, so they read with PIL and numpy rather than the tf.data pipeline. `resize_bilinear` is
PyTorch's `interpolate(mode="bilinear", align_corners=False)` (and cv2's INTER_LINEAR): no antialiasing, edge
taps clamped, which the reference relies on for its multi-scale features and label upsampling.
"""
from __future__ import annotations

import functools

import jax
import numpy as np

from dino_jax import paths
from dino_jax.data.normalization import IMAGENET_MEAN, IMAGENET_STD

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "ppm", "bmp", "pgm", "tif", "tiff", "webp")  # the reference's list


def list_images(folder: str) -> list[str]:
    """Sorted paths of the image files in `folder` (not recursive)."""
    if not paths.Path(folder).is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    return [paths.join(folder, p.name) for p in sorted(paths.Path(folder).iterdir())
            if p.name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS]


def open_rgb(path: str):
    """A PIL RGB image; truncated files load as far as they go (the reference sets LOAD_TRUNCATED_IMAGES too)."""
    from PIL import ImageFile

    ImageFile.LOAD_TRUNCATED_IMAGES = True
    return paths.open_image(path).convert("RGB")


def normalize(image, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """uint8 (H, W, 3) or a PIL image -> float32 (H, W, 3), (x/255 - mean) / std (ToTensor + Normalize)."""
    x = np.asarray(image, np.float32) / 255.0
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def linear_matrix(n_in: int, n_out: int, scale: float | None = None) -> np.ndarray:
    """(n_out, n_in) matrix M with M @ x == PyTorch's bilinear resampling (align_corners=False) along one axis.

    With `scale` the source coordinate is (dst + 0.5) / scale - 0.5 (PyTorch's scale_factor= path), else
    (dst + 0.5) * n_in / n_out - 0.5; negative coordinates clamp to 0 and the upper tap to n_in - 1.
    """
    inv = 1.0 / scale if scale else n_in / n_out
    src = np.maximum((np.arange(n_out) + 0.5) * inv - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    m = np.zeros((n_out, n_in), np.float64)
    np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(m, (np.arange(n_out), hi), frac)
    return m.astype(np.float32)


def resize_bilinear(x, size: tuple[int, int], scale: float | None = None) -> np.ndarray:
    """Resample (H, W, ...) to size (h, w) bilinearly with PyTorch's align_corners=False convention, no antialias."""
    x = np.asarray(x, np.float32)
    mh = linear_matrix(x.shape[0], size[0], scale)
    mw = linear_matrix(x.shape[1], size[1], scale)
    return np.einsum("hi,ij...,wj->hw...", mh, x, mw).astype(np.float32)


@functools.lru_cache(maxsize=16)
def _forward(model, what: str):
    """One jitted forward per (model, output kind); jit itself caches one program per image shape."""
    def cls(params, images):
        return model.apply({"params": params}, images)

    def tokens(params, images):
        return model.apply({"params": params}, images, 1, method=model.get_intermediate_layers)[0]

    return jax.jit({"cls": cls, "tokens": tokens}[what])


def cls_features(model, params, images) -> np.ndarray:
    """(B, D) CLS token after the final norm (the reference's `model(x)`) for normalised NHWC images."""
    return np.asarray(_forward(model, "cls")(params, np.asarray(images, np.float32)))


def last_block_tokens(model, params, images) -> np.ndarray:
    """(B, 1 + h*w, D) tokens of the last block through the final norm (`get_intermediate_layers(x, n=1)[0]`)."""
    return np.asarray(_forward(model, "tokens")(params, np.asarray(images, np.float32)))
