"""DAVIS-2017 video object segmentation by label propagation (the reference's `eval_video_segmentation.py`), and a
J (region Jaccard) / F (boundary F-measure) scorer following davis2017-evaluation, in numpy.

Layout: DATA_PATH/ImageSets/2017/val.txt (one video name a line), DATA_PATH/JPEGImages/480p/<video>/*.jpg and
DATA_PATH/Annotations/480p/<video>/*.png (indexed PNGs, 0 = background, k = object k; the first frame's is the
input, the others are only read by the scorer).

Propagation, per target frame: the context is the first frame (its one-hot annotation at feature resolution) and
the `n_last_frames` previous frames (their soft predictions); affinity exp(cos / temperature) between the target's
and the context's last-block patch tokens, restricted to a (2s+1)^2 window around each target patch (s =
`size_mask_neighborhood`), of which only the `topk` largest over the whole context are kept and normalised to sum
to 1; the context labels averaged with those weights are the target's soft labels. They are upsampled x patch
(bilinear), min-max normalised per channel, arg-maxed and resized to the frame's size (nearest).
Frames are resized so the short side is 480 and the long side is floored to a multiple of 64, and normalised
with the reference's std (0.228, 0.224, 0.225) (0.228 comes from UVC).
"""
from __future__ import annotations

import collections
import functools
import io
import os
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dino_jax import paths
from dino_jax.data.normalization import IMAGENET_MEAN
from dino_jax.evaluation import images as imgs

FRAME_STD = (0.228, 0.224, 0.225)  # the reference's, not ImageNet's 0.229 (see the module docstring)


def davis_palette() -> np.ndarray:
    """(256, 3) uint8: the PASCAL VOC colour map that DAVIS annotations (and UVC's palette.txt) use."""
    pal = np.zeros((256, 3), np.uint8)
    for i in range(256):
        c, rgb = i, [0, 0, 0]
        for bit in range(8):
            for ch in range(3):
                rgb[ch] |= ((c >> ch) & 1) << (7 - bit)
            c >>= 3
        pal[i] = rgb
    return pal


def frame_size(h: int, w: int, short_side: int = 480) -> tuple[int, int]:
    """(th, tw): the short side becomes `short_side`, the long side scales and floors to a multiple of 64."""
    if h > w:
        return int((short_side * h / w) // 64 * 64), short_side
    return short_side, int((short_side * w / h) // 64 * 64)


def read_frame(path: str, short_side: int = 480) -> tuple[np.ndarray, tuple[int, int]]:
    """(normalised (th, tw, 3) float32, original (h, w)); bilinear resize without antialias, rounded to uint8
    levels as cv2 does on the reference's uint8 frames."""
    rgb = np.asarray(imgs.open_rgb(path))
    h, w = rgb.shape[:2]
    size = frame_size(h, w, short_side)
    if min(size) < 1:
        raise ValueError(f"{path}: a {h}x{w} frame cannot be resized to short side {short_side}")
    resized = np.clip(np.round(imgs.resize_bilinear(rgb, size)), 0, 255)
    return imgs.normalize(resized, IMAGENET_MEAN, FRAME_STD), (h, w)


def read_indexed(path: str) -> np.ndarray:
    """Label indices (H, W) uint8 of an indexed (palette) or greyscale PNG."""
    im = paths.open_image(path)
    if im.mode not in ("P", "L", "1"):
        raise ValueError(f"{path}: mode {im.mode}; annotations must be indexed (palette) or greyscale PNGs "
                         "whose values are object ids")
    return np.asarray(im, np.uint8)


def read_seg(path: str, patch: int, short_side: int = 480) -> tuple[np.ndarray, np.ndarray]:
    """(one-hot (C, th//patch, tw//patch) float32 with C = max id + 1, original label array)."""
    from PIL import Image

    seg = read_indexed(path)
    th, tw = frame_size(seg.shape[0], seg.shape[1], short_side)
    small = np.asarray(Image.fromarray(seg).resize((tw // patch, th // patch), Image.NEAREST))
    n = int(small.max()) + 1
    return np.eye(n, dtype=np.float32)[small].transpose(2, 0, 1), seg


def write_indexed_png(path: str, labels: np.ndarray, palette: np.ndarray | None = None) -> None:
    """An indexed PNG with the DAVIS palette, as DAVIS results are stored."""
    from PIL import Image

    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"an indexed PNG needs a 2-D label array, got shape {labels.shape}")
    im = Image.fromarray(labels.astype(np.uint8), mode="P")
    im.putpalette((davis_palette() if palette is None else palette).ravel().tolist())
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    paths.write_bytes(path, buf.getvalue())


# ----------------------------------------------------------------------------------------------------------
# Label propagation.


def neighbourhood_mask(h: int, w: int, size: int):
    """(h*w, h*w) float32: 1 where the source patch lies within `size` rows and columns of the target patch
    (built in the graph: at DAVIS sizes it is too large to embed as a constant)."""
    i, j = jnp.divmod(jnp.arange(h * w), w)
    near = (jnp.abs(i[:, None] - i[None]) <= size) & (jnp.abs(j[:, None] - j[None]) <= size)
    return near.astype(jnp.float32)


def _normalize(x):
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames=("grid", "size_mask_neighborhood", "topk"))
def label_propagation(feat_tar, feats_src, segs_src, temperature=0.1, *, grid: tuple[int, int],
                      size_mask_neighborhood: int = 12, topk: int = 5):
    """Soft labels (C, h*w) of a target frame from its patch features (h*w, D) and a context of n frames:
    features (n, h*w, D) and labels (n, C, h*w)."""
    n, hw, _ = feats_src.shape
    cos = jnp.einsum("qd,nkd->nqk", _normalize(feat_tar), _normalize(feats_src),
                     precision=jax.lax.Precision.HIGHEST)
    aff = jnp.exp(cos / temperature)  # (context, target, source)
    if size_mask_neighborhood > 0:
        aff = aff * neighbourhood_mask(*grid, size_mask_neighborhood)[None]
    aff = aff.transpose(1, 0, 2).reshape(hw, n * hw)  # per target, every context position
    kth = jax.lax.top_k(aff, topk)[0][:, -1:]
    aff = jnp.where(aff < kth, 0.0, aff)
    aff = aff / jnp.sum(aff, axis=1, keepdims=True)
    segs = segs_src.transpose(1, 0, 2).reshape(segs_src.shape[1], n * hw)
    return jnp.dot(segs, aff.T, precision=jax.lax.Precision.HIGHEST)


def propagate(frame_features: Iterable, first_seg, n_last_frames: int = 7, size_mask_neighborhood: int = 12,
              topk: int = 5, temperature: float = 0.1):
    """Yield the soft labels (C, h, w) of every frame after the first.

    `frame_features` gives (h, w, D) patch features per frame, the first frame first; `first_seg` is its one-hot
    annotation (C, h, w). The context is the first frame plus the last `n_last_frames` predictions.
    """
    first_seg = np.asarray(first_seg, np.float32)
    c, h, w = first_seg.shape
    it = iter(frame_features)
    first = np.asarray(next(it), np.float32)
    if first.shape[:2] != (h, w):
        raise ValueError(f"the first annotation is {h}x{w} at feature resolution but the features are "
                         f"{first.shape[0]}x{first.shape[1]} patches")
    if topk > h * w:
        raise ValueError(f"--topk {topk} is more than the {h * w} patches of a frame")
    first, first_seg = first.reshape(h * w, -1), first_seg.reshape(c, h * w)
    queue = collections.deque(maxlen=n_last_frames)
    for feat in it:
        feat = np.asarray(feat, np.float32).reshape(h * w, -1)
        feats = np.stack([first] + [f for f, _ in queue])
        segs = np.stack([first_seg] + [s for _, s in queue])
        seg = np.asarray(label_propagation(feat, feats, segs, temperature, grid=(h, w),
                                           size_mask_neighborhood=size_mask_neighborhood, topk=topk))
        queue.append((feat, seg))
        yield seg.reshape(c, h, w)


def to_mask(soft, patch: int, out_hw: tuple[int, int]) -> np.ndarray:
    """uint8 (H, W) labels from soft labels (C, h, w): bilinear x patch, per-channel min-max, argmax, nearest
    resize to the original frame size."""
    from PIL import Image

    soft = np.asarray(soft, np.float32)
    c, h, w = soft.shape
    up = imgs.resize_bilinear(soft.transpose(1, 2, 0), (h * patch, w * patch), scale=patch)
    lo, hi = up.min(axis=(0, 1)), up.max(axis=(0, 1))
    rng = hi - lo
    norm = np.where(hi > 0, (up - lo) / np.where(rng > 0, rng, 1.0), up)  # channels that are all 0 stay as they are
    labels = np.argmax(norm, axis=-1).astype(np.uint8)
    return np.asarray(Image.fromarray(labels).resize((out_hw[1], out_hw[0]), Image.NEAREST))


def frame_tokens(model, params, frame: np.ndarray) -> np.ndarray:
    """(h, w, D) last-block patch tokens of one normalised frame (CLS dropped)."""
    p = model.patch_size
    h, w = frame.shape[0] // p, frame.shape[1] // p
    return imgs.last_block_tokens(model, params, frame[None])[0, 1:].reshape(h, w, -1)


def segment_video(model, params, frame_paths: Sequence[str], annotation_path: str, out_dir: str, *,
                  n_last_frames: int = 7, size_mask_neighborhood: int = 12, topk: int = 5,
                  temperature: float = 0.1, short_side: int = 480) -> list[str]:
    """Propagate the first frame's annotation through the video; write <out_dir>/<frame>.png for every frame
    (the first is the annotation itself). Returns the written paths."""
    if not frame_paths:
        raise ValueError(f"no frames for {out_dir}")
    patch = model.patch_size
    first_seg, seg_ori = read_seg(annotation_path, patch, short_side)
    _, ori_hw = read_frame(frame_paths[0], short_side)
    palette = davis_palette()
    names = [os.path.splitext(os.path.basename(p))[0] + ".png" for p in frame_paths]
    written = [paths.join(out_dir, names[0])]
    write_indexed_png(written[0], seg_ori, palette)
    features = (frame_tokens(model, params, read_frame(p, short_side)[0]) for p in frame_paths)
    soft = propagate(features, first_seg, n_last_frames, size_mask_neighborhood, topk, temperature)
    for name, s in zip(names[1:], soft):
        written.append(paths.join(out_dir, name))
        write_indexed_png(written[-1], to_mask(s, patch, ori_hw), palette)
    return written


# ----------------------------------------------------------------------------------------------------------
# J and F (davis2017-evaluation's db_eval_iou and db_eval_boundary).


def region_jaccard(gt, pred, void=None) -> float:
    """|gt & pred| / |gt | pred| outside `void`; 1 when both are empty."""
    gt, pred = np.asarray(gt, bool), np.asarray(pred, bool)
    if gt.shape != pred.shape:
        raise ValueError(f"mask shapes differ: ground truth {gt.shape}, prediction {pred.shape}")
    keep = np.ones_like(gt) if void is None else ~np.asarray(void, bool)
    union = np.sum((gt | pred) & keep)
    return 1.0 if union == 0 else float(np.sum(gt & pred & keep) / union)


def boundary_map(mask) -> np.ndarray:
    """1-pixel boundaries of a binary mask: pixels that differ from their right, lower or lower-right neighbour
    (the seg2bmap convention, half a pixel towards the origin); the last row/column compare along themselves."""
    m = np.asarray(mask, bool)
    e, s, se = np.zeros_like(m), np.zeros_like(m), np.zeros_like(m)
    e[:, :-1], s[:-1, :], se[:-1, :-1] = m[:, 1:], m[1:, :], m[1:, 1:]
    b = (m ^ e) | (m ^ s) | (m ^ se)
    b[-1, :] = m[-1, :] ^ e[-1, :]
    b[:, -1] = m[:, -1] ^ s[:, -1]
    b[-1, -1] = False
    return b


def disk(radius: int) -> np.ndarray:
    """Offsets within Euclidean distance `radius` (skimage.morphology.disk)."""
    r = np.arange(-radius, radius + 1)
    return (r[:, None] ** 2 + r[None] ** 2) <= radius ** 2


def boundary_f(gt, pred, void=None, bound_th: float = 0.008) -> float:
    """Boundary F-measure: precision and recall of boundary pixels matched within a tolerance of
    ceil(bound_th * image diagonal) pixels (bound_th >= 1 is taken as pixels)."""
    from scipy import ndimage

    gt, pred = np.asarray(gt, bool), np.asarray(pred, bool)
    if gt.shape != pred.shape:
        raise ValueError(f"mask shapes differ: ground truth {gt.shape}, prediction {pred.shape}")
    if void is not None:
        keep = ~np.asarray(void, bool)
        gt, pred = gt & keep, pred & keep
    radius = int(bound_th if bound_th >= 1 else np.ceil(bound_th * np.linalg.norm(gt.shape)))
    fg_b, gt_b = boundary_map(pred), boundary_map(gt)
    fg_dil = ndimage.binary_dilation(fg_b, structure=disk(radius))
    gt_dil = ndimage.binary_dilation(gt_b, structure=disk(radius))
    n_fg, n_gt = fg_b.sum(), gt_b.sum()
    if n_fg == 0 and n_gt == 0:
        return 1.0
    if n_fg == 0 or n_gt == 0:
        return 0.0  # precision or recall is 0 (the other 1)
    precision = np.sum(fg_b & gt_dil) / n_fg
    recall = np.sum(gt_b & fg_dil) / n_gt
    return 0.0 if precision + recall == 0 else float(2 * precision * recall / (precision + recall))


def score_video(gt, pred, bound_th: float = 0.008) -> dict:
    """Per-object J and F over the frames DAVIS scores (all but the first and the last).

    `gt` and `pred` are (T, H, W) label arrays; objects are the ids 1..max of the first annotation. Void (255) in
    the ground truth counts as background, which is what davis2017-evaluation ends up doing.
    Returns {"J": (objects, T-2), "F": (objects, T-2)}.
    """
    gt, pred = np.asarray(gt), np.asarray(pred)
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth {gt.shape} and results {pred.shape} differ in shape")
    first = gt[0][gt[0] != 255]
    n_obj = int(first.max(initial=0))
    gt = np.where(gt == 255, 0, gt)[1:-1]
    pred = pred[1:-1]
    j = np.array([[region_jaccard(g == k, p == k) for g, p in zip(gt, pred)] for k in range(1, n_obj + 1)])
    f = np.array([[boundary_f(g == k, p == k, bound_th=bound_th) for g, p in zip(gt, pred)]
                  for k in range(1, n_obj + 1)])
    return {"J": j.reshape(n_obj, len(gt)), "F": f.reshape(n_obj, len(gt))}


def statistics(per_frame) -> tuple[float, float]:
    """(mean, recall = fraction of frames above 0.5), DAVIS's M and R of one object."""
    v = np.asarray(per_frame, np.float64)
    return float(np.nanmean(v)), float(np.nanmean(v > 0.5))


def score_results(data_path: str, results_dir: str, videos: Sequence[str]) -> dict:
    """The DAVIS semi-supervised summary over `videos`: J&F-Mean, J/F Mean and Recall (means over objects,
    in [0, 1]) and per-object J/F means. Results are <results_dir>/<video>/<frame>.png."""
    per_object, jm, jr, fm, fr = {}, [], [], [], []
    for video in videos:
        ann_dir = os.path.join(data_path, "Annotations", "480p", video)
        if not paths.Path(ann_dir).is_dir():
            raise FileNotFoundError(f"{ann_dir} is not a folder: no ground truth to score {video} against")
        names = sorted(p.name for p in paths.Path(ann_dir).iterdir() if p.name.endswith(".png"))
        if len(names) < 3:
            print(f"note: {video} has {len(names)} annotated frames; DAVIS scores frames 1..T-2, so it is skipped")
            continue
        gt = np.stack([read_indexed(os.path.join(ann_dir, n)) for n in names])
        pred = np.stack([read_indexed(os.path.join(results_dir, video, n)) for n in names])
        s = score_video(gt, pred)
        for k, (jv, fv) in enumerate(zip(s["J"], s["F"]), 1):
            (a, b), (c, d) = statistics(jv), statistics(fv)
            jm.append(a), jr.append(b), fm.append(c), fr.append(d)
            per_object[f"{video}_{k}"] = {"J": a, "F": c}
    if not per_object:
        raise ValueError("nothing to score: no video with objects and at least 3 annotated frames")
    out = {"J-Mean": float(np.mean(jm)), "J-Recall": float(np.mean(jr)), "F-Mean": float(np.mean(fm)),
           "F-Recall": float(np.mean(fr)), "per_object": per_object}
    out["J&F-Mean"] = (out["J-Mean"] + out["F-Mean"]) / 2
    return out
