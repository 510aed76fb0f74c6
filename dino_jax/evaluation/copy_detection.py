"""Copy detection on Copydays (the reference's `eval_copy_detection.py`) as library calls.

Layout: DATA_PATH/original/*.jpg (the database), and the query blocks DATA_PATH/strong/, DATA_PATH/jpegqual/<q>/,
DATA_PATH/crops/<c>/ (the reference's 20 blocks; the blocks present are used, `original` included, as queries).
A query in `original`, `jpegqual/*` or `crops/*` is the copy of the original at the same sorted position (Copydays
gives them the same file names); a `strong` query's positives are the originals whose names share its first 4
characters. Optional distractors join the database; an optional whitening set trains PCA whitening.

Descriptor: the last block's tokens (final norm): CLS ⊕ GeM(p=4) of the patch tokens (clamped at 1e-6), images
resized to a square `imsize` (PIL bicubic). Whitening (the reference's): subtract the whitening set's mean, then
project with D^-1/2 Vᵀ from the eigen-decomposition of the whitening features' (uncentred) second-moment matrix,
eigenvalues floored at 1e-5 of the largest. Then L2-normalise, cosine top-20, Holidays AP, mean per block.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from dino_jax import paths
from dino_jax.evaluation import images as imgs
from dino_jax.evaluation.image_retrieval import average_precision
from dino_jax.evaluation.knn import l2_normalize

BLOCKS = (["original", "strong"] + [f"jpegqual/{q}" for q in (3, 5, 8, 10, 15, 20, 30, 50, 75)]
          + [f"crops/{c}" for c in (10, 15, 20, 30, 40, 50, 60, 70, 80)])
TOPK = 20  # the reference scores the top 20 results of each query


def find_blocks(data_path: str) -> dict[str, list[str]]:
    """{block name: sorted .jpg paths} for the Copydays blocks present, in the reference's order."""
    if not paths.Path(data_path, "original").is_dir():
        raise FileNotFoundError(f"{os.path.join(data_path, 'original')} is not a folder; --data_path must be a "
                                "Copydays-layout folder with original/ and query blocks (strong/, jpegqual/Q/, "
                                "crops/C/)")
    blocks = {}
    for name in BLOCKS:
        d = os.path.join(data_path, name)
        if paths.Path(d).is_dir():
            blocks[name] = [paths.join(d, p.name) for p in sorted(paths.Path(d).iterdir()) if p.name.endswith(".jpg")]
    if not blocks["original"]:
        raise FileNotFoundError(f"{os.path.join(data_path, 'original')} holds no .jpg images")
    return blocks


def positives(block: str, queries: Sequence[str], originals: Sequence[str]) -> list[list[int]]:
    """Database indices of each query's true copies (see the module docstring)."""
    if block == "strong":
        names = [os.path.basename(p) for p in originals]
        return [[j for j, n in enumerate(names) if n[:4] == os.path.basename(q)[:4]] for q in queries]
    if len(queries) != len(originals):
        raise ValueError(f"block {block}: {len(queries)} images for {len(originals)} originals; every block but "
                         "strong holds one copy of each original, in the same sorted order")
    return [[i] for i in range(len(queries))]


def gem(x, p: float = 4.0, eps: float = 1e-6, axis: int = -2):
    """Generalised mean pooling: mean(clamp(x, eps)^p)^(1/p) over `axis`."""
    return np.mean(np.maximum(x, eps) ** p, axis=axis) ** (1.0 / p)


def descriptors(tokens) -> np.ndarray:
    """(B, 2D) CLS ⊕ GeM(p=4) of the patch tokens, from (B, 1 + h*w, D) last-block tokens."""
    tokens = np.asarray(tokens, np.float64)
    return np.concatenate([tokens[:, 0], gem(tokens[:, 1:])], axis=1).astype(np.float32)


def load_image(path: str, imsize: int) -> np.ndarray:
    from PIL import Image

    return imgs.normalize(imgs.open_rgb(path).resize((imsize, imsize), Image.BICUBIC))


def extract_descriptors(model, params, paths: Sequence[str], imsize: int, batch_size: int = 16,
                        name: str = "images", log_every: int = 10) -> np.ndarray:
    """(N, 2D) unnormalised descriptors of square-resized images, in the order of `paths`."""
    if not paths:
        raise ValueError(f"{name}: no images")
    out = []
    for i, s in enumerate(range(0, len(paths), batch_size)):
        batch = np.stack([load_image(p, imsize) for p in paths[s:s + batch_size]])
        out.append(descriptors(imgs.last_block_tokens(model, params, batch)))
        if log_every and (i + 1) % log_every == 0:
            print(f"  {name}: {min(s + batch_size, len(paths))}/{len(paths)}", flush=True)
    return np.concatenate(out)


def train_whitening(features, whit: float = 0.5):
    """(mean, projection P) with whitened(x) = (x - mean) @ P.T, the reference's PCA whitening of all dimensions."""
    f = np.asarray(features, np.float64)
    cov = f.T @ f / f.shape[0]  # second moment of the uncentred features, as the reference computes it
    d, v = np.linalg.eigh(cov)
    d = np.maximum(d, d.max() * 1e-5)
    order = np.argsort(d)[::-1]
    d, v = d[order], v[:, order]
    return f.mean(axis=0), (v / d ** whit).T


def apply_whitening(x, mean, projection) -> np.ndarray:
    return ((np.asarray(x, np.float64) - mean) @ projection.T).astype(np.float32)


def evaluate(query_blocks: dict[str, np.ndarray], database: np.ndarray, positives_per_block: dict[str, list],
             topk: int = TOPK) -> dict[str, float]:
    """{block: mAP} from the cosine top-k of each query among L2-normalised database descriptors."""
    db = l2_normalize(np.asarray(database, np.float64))
    out = {}
    k = min(topk, len(db))
    for block, q in query_blocks.items():
        sim = l2_normalize(np.asarray(q, np.float64)) @ db.T
        top = np.argsort(-sim, axis=1, kind="stable")[:, :k]
        aps = []
        for row, pos in zip(top, positives_per_block[block]):
            ranks = np.flatnonzero(np.isin(row, pos))
            aps.append(average_precision(ranks, len(pos)) if pos else 0.0)
        out[block] = float(np.mean(aps))
    return out
