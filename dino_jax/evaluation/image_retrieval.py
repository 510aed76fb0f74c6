"""Image retrieval on revisited Oxford / Paris (the reference's `eval_image_retrieval.py`) as library calls.

Layout (as the revisitop download leaves it): DATA_PATH/<dataset>/gnd_<dataset>.pkl holding `imlist`, `qimlist`
and `gnd` (one dict per query with `easy`, `hard`, `junk` database indices and the query box `bbx`), and the images
DATA_PATH/<dataset>/jpg/<name>.jpg.

Protocol: every image is shrunk with PIL `thumbnail` so its longer side is at most `imsize` (aspect kept,
antialiased), the CLS feature (optionally averaged over scales 1, 1/sqrt 2, 1/2, bilinear without antialias) is
L2-normalised, the database is ranked by cosine, and `compute_map` scores the Medium (positives easy+hard, junk
ignored) and Hard (positives hard, easy and junk ignored) protocols with the revisited trapezoid AP and mP@k.
Queries are the full images, as in the reference; `crop_queries=True` crops them to `bbx` first, as the revisitop
protocol prescribes (the DINO numbers were measured without the crop).
"""
from __future__ import annotations

import os
import pickle
from typing import Sequence

import numpy as np

from dino_jax import paths
from dino_jax.evaluation import images as imgs
from dino_jax.evaluation.knn import l2_normalize

MULTISCALE = (1.0, 1.0 / 2 ** 0.5, 0.5)


def load_dataset(data_path: str, dataset: str) -> dict:
    """The ground-truth file as a dict plus `dir_images`; errors name the missing file or key."""
    gnd_file = os.path.join(data_path, dataset, f"gnd_{dataset}.pkl")
    if not paths.Path(gnd_file).is_file():
        raise FileNotFoundError(f"{gnd_file}: no such file; --data_path must hold {dataset}/gnd_{dataset}.pkl and "
                                f"{dataset}/jpg/ (the revisitop layout)")
    cfg = pickle.loads(paths.Path(gnd_file).read_bytes())
    for key in ("imlist", "qimlist", "gnd"):
        if key not in cfg:
            raise KeyError(f"{gnd_file} has no '{key}'; a revisited ground-truth file holds imlist, qimlist and gnd")
    if len(cfg["gnd"]) != len(cfg["qimlist"]):
        raise ValueError(f"{gnd_file}: {len(cfg['gnd'])} gnd entries for {len(cfg['qimlist'])} queries")
    cfg = dict(cfg, dir_images=os.path.join(data_path, dataset, "jpg"))
    return cfg


def image_path(cfg: dict, name: str) -> str:
    return os.path.join(cfg["dir_images"], name + ".jpg")


def load_image(path: str, imsize: int | None, bbx: Sequence[float] | None = None) -> np.ndarray:
    """Normalised (H, W, 3): optional crop to `bbx` (x1, y1, x2, y2), then PIL thumbnail to `imsize` (LANCZOS)."""
    from PIL import Image

    img = imgs.open_rgb(path)
    if bbx is not None:
        img = img.crop(tuple(int(round(v)) for v in bbx))
    if imsize:
        img.thumbnail((imsize, imsize), Image.LANCZOS)
    return imgs.normalize(img)


def image_feature(model, params, image: np.ndarray, multiscale: bool = False) -> np.ndarray:
    """(D,) CLS feature of one normalised image; multi-scale averages the scales then L2-normalises."""
    if not multiscale:
        return imgs.cls_features(model, params, image[None])[0]
    total = 0.0
    for s in MULTISCALE:
        x = image if s == 1 else imgs.resize_bilinear(
            image, (int(np.floor(image.shape[0] * s)), int(np.floor(image.shape[1] * s))), scale=s)
        total = total + imgs.cls_features(model, params, x[None])[0]
    return l2_normalize(total / len(MULTISCALE))


def extract_features(model, params, paths: Sequence[str], imsize: int | None, multiscale: bool = False,
                     bbxs: Sequence | None = None, log_every: int = 100, name: str = "images") -> np.ndarray:
    """(N, D) L2-normalised features, one image at a time (batch 1 as in the reference: sizes differ)."""
    out = []
    for i, p in enumerate(paths):
        out.append(image_feature(model, params, load_image(p, imsize, None if bbxs is None else bbxs[i]),
                                 multiscale))
        if log_every and (i + 1) % log_every == 0:
            print(f"  {name}: {i + 1}/{len(paths)}", flush=True)
    return l2_normalize(np.stack(out).astype(np.float32))


def rank_database(db_features, query_features) -> np.ndarray:
    """(n_db, n_queries) database indices, most similar (cosine) first, for L2-normalised features."""
    sim = np.asarray(db_features, np.float64) @ np.asarray(query_features, np.float64).T
    return np.argsort(-sim, axis=0, kind="stable")


def protocol(gnd: Sequence[dict], name: str) -> list[dict]:
    """Per query {'ok', 'junk'} for the 'easy', 'medium' or 'hard' protocol of the revisited datasets."""
    pick = {"easy": (("easy",), ("junk", "hard")), "medium": (("easy", "hard"), ("junk",)),
            "hard": (("hard",), ("junk", "easy"))}
    if name not in pick:
        raise ValueError(f"protocol must be one of {sorted(pick)}, got {name!r}")
    ok_keys, junk_keys = pick[name]
    return [{"ok": np.concatenate([np.asarray(g[k], np.int64) for k in ok_keys]),
             "junk": np.concatenate([np.asarray(g.get(k, []), np.int64) for k in junk_keys])} for g in gnd]


def average_precision(ranks, n_positives: int) -> float:
    """Trapezoid AP (Holidays / revisitop `compute_ap`) from the sorted 0-based ranks of the retrieved positives.

    Each positive adds recall 1/n_positives at the mean of the precision just before it (j/rank, 1 at rank 0)
    and just after it ((j+1)/(rank+1)); positives never retrieved add nothing.
    """
    r = np.asarray(ranks, np.float64)
    j = np.arange(len(r), dtype=np.float64)
    before = np.where(r == 0, 1.0, j / np.maximum(r, 1))
    after = (j + 1) / (r + 1)
    return float(np.sum(before + after) / (2.0 * n_positives))


def compute_map(ranks, gnd: Sequence[dict], ks: Sequence[int] = (1, 5, 10)):
    """(mAP, per-query AP, mean precision at each k, per-query precisions) as the revisited protocol defines them.

    `ranks` is (n_db, n_queries); junk images are taken out of the ranking before scoring. Precision at k is the
    revisitop one: k is capped at the position of the last positive, kq = min(k, last), so P@k = hits in the
    first kq / kq. Queries without positives are NaN and left out of the means.
    """
    ranks = np.asarray(ranks)
    nq = ranks.shape[1]
    if len(gnd) != nq:
        raise ValueError(f"{len(gnd)} ground-truth entries for {nq} ranked queries")
    aps = np.full(nq, np.nan)
    prs = np.full((nq, len(ks)), np.nan)
    for i, g in enumerate(gnd):
        ok = np.asarray(g["ok"])
        if ok.size == 0:
            continue
        order = ranks[:, i]
        is_ok = np.isin(order, ok)
        is_junk = np.isin(order, np.asarray(g.get("junk", []), np.int64))
        junk_before = np.cumsum(is_junk) - is_junk  # junk images ranked strictly before each position
        where = np.flatnonzero(is_ok)
        pos = where - junk_before[where]
        aps[i] = average_precision(pos, len(ok))
        pos1 = pos + 1
        for j, k in enumerate(ks):
            kq = min(int(pos1.max()), int(k))
            prs[i, j] = np.sum(pos1 <= kq) / kq
    valid = ~np.isnan(aps)
    if not valid.any():
        raise ValueError("no query has a positive image; check the ground truth")
    return float(aps[valid].mean()), aps, prs[valid].mean(axis=0), prs


def evaluate(ranks, gnd: Sequence[dict], ks: Sequence[int] = (1, 5, 10)) -> dict:
    """{'medium': {'mAP', 'mP@k'}, 'hard': {...}} in percent, the two protocols DINO reports."""
    out = {}
    for name in ("medium", "hard"):
        m, _, mp, _ = compute_map(ranks, protocol(gnd, name), ks)
        out[name] = {"mAP": 100.0 * m, "mP@k": {int(k): 100.0 * float(v) for k, v in zip(ks, mp)}}
    return out
