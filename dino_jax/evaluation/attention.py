"""Self-attention maps of the last block's CLS query (the reference's `visualize_attention.py`) as library calls.

`attention_maps` gives per-head maps over the patch grid, `threshold_masks` the reference's "keep `threshold` of
the mass" masks, `jaccard` / `attention_jaccard` compare masks with ground-truth object masks, and
`save_attention_pngs` / `save_attention_grid` write pictures (matplotlib, Agg backend; imported lazily so the
numeric functions do not need it).

Jaccard protocol (the trainer's `attention_jaccard` metric). The paper compares masks that keep 60% of the
attention mass with ground-truth masks and shows individual heads, so a single head has to be chosen. We report,
over a set of images:
- "best_head" (the default scalar): the mean Jaccard of each head over all images, then the best head. One head is
  picked for the whole set, so there is no per-image cherry-picking and random-init networks are not flattered;
- "best_head_per_image": per image the best head, averaged (an upper bound, optimistic with many heads);
- "mean_map": the head-averaged map thresholded the same way (no selection at all);
- "per_head": the per-head means.
"""
from __future__ import annotations

import functools
import io

import jax
import jax.numpy as jnp
import numpy as np

from dino_jax import paths


# ----------------------------------------------------------------------------------------------------------
# Maps.


def crop_to_patch_multiple(images, patch: int):
    """Top-left crop of (..., H, W, C) to multiples of the patch size, as the reference does before the forward."""
    h, w = images.shape[-3], images.shape[-2]
    hh, ww = h - h % patch, w - w % patch
    if hh == 0 or ww == 0:
        raise ValueError(f"image of {h}x{w} pixels is smaller than one {patch}x{patch} patch")
    return images[..., :hh, :ww, :]


@functools.lru_cache(maxsize=16)
def _cls_attention_fn(model):
    def fn(params, images):
        attn = model.apply({"params": params}, images, method=model.get_last_selfattention)
        return attn[:, :, 0, 1:]  # (B, heads, N): CLS query over the patch keys, CLS key left out

    return jax.jit(fn)


def attention_maps_batch(model, params, images, patch: int | None = None) -> np.ndarray:
    """(B, heads, h, w) CLS attention maps of the last block for normalised NHWC images (cropped to the patch)."""
    patch = patch or model.patch_size
    images = crop_to_patch_multiple(np.asarray(images, np.float32), patch)
    h, w = images.shape[1] // patch, images.shape[2] // patch
    attn = np.asarray(_cls_attention_fn(model)(params, images))
    return attn.reshape(attn.shape[0], attn.shape[1], h, w)


def attention_maps(model, params, image, patch: int | None = None) -> np.ndarray:
    """(heads, h, w) maps for one normalised (H, W, 3) image of any size (cropped to a multiple of the patch)."""
    image = np.asarray(image)
    if image.ndim == 4:
        if image.shape[0] != 1:
            raise ValueError(f"attention_maps takes one image, got a batch of {image.shape[0]}; "
                             "use attention_maps_batch")
        image = image[0]
    return attention_maps_batch(model, params, image[None], patch)[0]


def threshold_masks(attn, threshold: float):
    """The reference's masks: per map keep the smallest set of top patches holding >= `threshold` of its mass.

    Over the last two axes (h, w) of `attn` (any leading axes, e.g. heads): sort ascending, normalise to sum 1,
    cumulative sum, keep entries with cumsum > 1 - threshold, undo the sort. Returns a bool array like `attn`.
    """
    xp = jnp if isinstance(attn, jax.Array) else np
    shape = attn.shape
    flat = attn.reshape(shape[:-2] + (-1,))
    order = xp.argsort(flat, axis=-1)
    val = xp.take_along_axis(flat, order, axis=-1)
    val = val / xp.sum(val, axis=-1, keepdims=True)
    keep_sorted = xp.cumsum(val, axis=-1) > (1 - threshold)
    unsort = xp.argsort(order, axis=-1)
    return xp.take_along_axis(keep_sorted, unsort, axis=-1).reshape(shape)


def upsample_nearest(x, patch: int):
    """Patch-grid maps (..., h, w) to pixels (..., h*patch, w*patch), nearest (the reference's interpolate)."""
    x = np.asarray(x)
    return np.repeat(np.repeat(x, patch, axis=-2), patch, axis=-1)


# ----------------------------------------------------------------------------------------------------------
# Jaccard against ground-truth masks.


def binarize_mask(gt) -> np.ndarray:
    """Ground truth to bool: bool as is; uint8 at >= 128 (soft 0..255 masks) unless it only holds 0/1; floats > 0.5."""
    gt = np.asarray(gt)
    if gt.dtype == bool:
        return gt
    if np.issubdtype(gt.dtype, np.integer):
        return gt >= 128 if gt.max(initial=0) > 1 else gt > 0
    return gt > 0.5


def jaccard(mask, gt) -> float:
    """|mask & gt| / |mask | gt| for two same-shaped masks; 1.0 when both are empty."""
    mask, gt = np.asarray(mask, bool), binarize_mask(gt)
    if mask.shape != gt.shape:
        raise ValueError(f"mask {mask.shape} and ground truth {gt.shape} differ in shape")
    union = np.logical_or(mask, gt).sum()
    return 1.0 if union == 0 else float(np.logical_and(mask, gt).sum() / union)


def _jaccard_many(masks, gt):
    """Jaccard over the last two axes, broadcasting masks (..., H, W) against gt (H, W) or (..., H, W)."""
    inter = np.logical_and(masks, gt).sum(axis=(-2, -1))
    union = np.logical_or(masks, gt).sum(axis=(-2, -1))
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def attention_jaccard_scores(model, params, images, gt_masks, patch: int | None = None, threshold: float = 0.6,
                             batch_size: int = 64) -> dict:
    """Jaccard of thresholded attention masks with ground-truth masks; see the module docstring for the keys.

    images: normalised (B, H, W, 3); gt_masks: (B, H, W) (bool, 0/1, 0..255 or float). Both are cropped to a
    multiple of the patch; masks are upsampled to pixels with nearest interpolation.
    """
    patch = patch or model.patch_size
    images = crop_to_patch_multiple(np.asarray(images, np.float32), patch)
    gt_masks = np.asarray(gt_masks)
    if gt_masks.ndim == 4 and gt_masks.shape[-1] == 1:
        gt_masks = gt_masks[..., 0]
    if len(gt_masks) != len(images):
        raise ValueError(f"{len(images)} images but {len(gt_masks)} ground-truth masks")
    gt = binarize_mask(gt_masks[:, :images.shape[1], :images.shape[2]])
    per_head, mean_map = [], []
    for s in range(0, len(images), batch_size):
        attn = attention_maps_batch(model, params, images[s:s + batch_size], patch)  # (b, heads, h, w)
        g = gt[s:s + batch_size]
        per_head.append(_jaccard_many(upsample_nearest(threshold_masks(attn, threshold), patch), g[:, None]))
        mean_map.append(_jaccard_many(upsample_nearest(threshold_masks(attn.mean(1), threshold), patch), g))
    per_head, mean_map = np.concatenate(per_head), np.concatenate(mean_map)  # (B, heads), (B,)
    head_means = per_head.mean(0)
    return {"best_head": float(head_means.max()), "best_head_index": int(head_means.argmax()),
            "best_head_per_image": float(per_head.max(1).mean()), "mean_map": float(mean_map.mean()),
            "per_head": [float(v) for v in head_means]}


def attention_jaccard(model, params, images, gt_masks, patch: int | None = None, threshold: float = 0.6,
                      which: str = "best_head") -> float:
    """One number for training logs: by default the best single head's mean Jaccard (see the module docstring)."""
    scores = attention_jaccard_scores(model, params, images, gt_masks, patch, threshold)
    if which not in ("best_head", "best_head_per_image", "mean_map"):
        raise ValueError(f"which={which!r}: choose best_head, best_head_per_image or mean_map")
    return scores[which]


# ----------------------------------------------------------------------------------------------------------
# Pictures.


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def display_image(image) -> np.ndarray:
    """A normalised image as [0, 1] RGB for display, min-max scaled like the reference's save_image(normalize=True)."""
    image = np.asarray(image, np.float32)
    lo, hi = image.min(), image.max()
    return (image - lo) / max(hi - lo, 1e-8)


def _overlay(plt, path, image, mask, color=(1.0, 0.2, 0.2)):
    """The reference's display_instances for one mask: colour overlay at alpha 0.5 plus the mask contour."""
    h, w = mask.shape
    out = image[:h, :w].copy()
    m = mask.astype(bool)
    out[m] = 0.5 * out[m] + 0.5 * np.asarray(color)
    fig = plt.figure(figsize=(w / 100, h / 100), dpi=100, frameon=False)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.axis("off")
    ax.imshow(out, interpolation="nearest")
    if m.any() and not m.all():
        ax.contour(m.astype(float), levels=[0.5], colors=[color], linewidths=1)
    paths.savefig(fig, path, dpi=100)
    plt.close(fig)


def save_attention_pngs(outdir: str, image, attn, masks=None, patch: int = 16, threshold: float | None = None,
                        ) -> list[str]:
    """Write img.png, attn-head{j}.png, attn-mean.png and, with masks, mask_th{t}_head{j}.png; return the paths.

    image: the normalised (H, W, 3) input (cropped to the map size); attn: (heads, h, w) patch-grid maps;
    masks: (heads, h, w) bool from `threshold_masks`, or None.
    """
    plt = _plt()
    img = display_image(image)
    attn_px = upsample_nearest(attn, patch)
    img = img[:attn_px.shape[1], :attn_px.shape[2]]
    written = []

    def save(name, array):
        path = paths.join(outdir, name)
        buf = io.BytesIO()
        plt.imsave(buf, array, format="png")
        paths.write_bytes(path, buf.getvalue())
        written.append(path)

    save("img.png", img)
    for j in range(attn_px.shape[0]):
        save(f"attn-head{j}.png", attn_px[j])
    save("attn-mean.png", attn_px.mean(0))
    if masks is not None:
        masks_px = upsample_nearest(masks, patch)
        t = threshold if threshold is not None else "x"
        for j in range(masks_px.shape[0]):
            path = paths.join(outdir, f"mask_th{t}_head{j}.png")
            _overlay(plt, path, img, masks_px[j])
            written.append(path)
    return written


def save_attention_grid(path: str, model, params, images, patch: int | None = None, threshold: float = 0.6,
                        attn=None) -> str:
    """One PNG for training logs: per image (row) the input, the head-mean map, its `threshold` mask and each head.

    Pass `attn` (B, heads, h, w) to draw precomputed maps; otherwise they are computed from model and params.
    """
    plt = _plt()
    patch = patch or model.patch_size
    images = crop_to_patch_multiple(np.asarray(images, np.float32), patch)
    if attn is None:
        attn = attention_maps_batch(model, params, images, patch)
    attn = np.asarray(attn)
    b, heads = attn.shape[:2]
    cols = 3 + heads
    fig, axes = plt.subplots(b, cols, figsize=(1.6 * cols, 1.6 * b), squeeze=False)
    for i in range(b):
        img = display_image(images[i])
        mean = attn[i].mean(0)
        mask = upsample_nearest(threshold_masks(mean, threshold), patch)
        shown = [(img, "image"), (upsample_nearest(mean, patch), "mean"),
                 (np.where(mask[..., None], img, 0.25 * img), f"mean th{threshold}")]
        shown += [(upsample_nearest(attn[i, j], patch), f"head {j}") for j in range(heads)]
        for ax, (array, title) in zip(axes[i], shown):
            ax.imshow(array, interpolation="nearest")
            ax.set_axis_off()
            if i == 0:
                ax.set_title(title, fontsize=8)
    fig.tight_layout()
    paths.savefig(fig, path, dpi=80)
    plt.close(fig)
    return path
