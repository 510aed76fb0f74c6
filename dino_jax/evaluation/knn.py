"""Weighted k-NN evaluation (the reference's `eval_knn.py`) as plain library calls.

`extract_features` runs the frozen backbone over global batches (sharded P('data') on the mesh) and returns
L2-normalised CLS features ordered by example index; `knn_classifier` / `knn_classifier_multi_k` are the
reference's cosine top-k vote with weights exp(sim/T). `KnnProtocol` (bank, queries, transform, k, T) puts them
together for the trainer's periodic evaluation and the CLI `python -m dino_jax.eval_knn`.

Differences from the reference, all deliberate:
- test rows go in fixed-size chunks (padded, so one compiled program serves every chunk) instead of
  `num_test // 100` rows, so any number of test images works (the reference divides by zero below 100);
  per-row results do not depend on the chunking.
- top-5 counts a hit within the first min(5, k, num_classes) ranked classes (the reference's min(5, k) fails for
  fewer than 5 classes). Classes with equal scores rank lower class index first (stable). The reference's
  `torch.sort` is stable only for rows of <= 16 classes; beyond that, classes with equal scores (in practice
  classes with no votes when the k neighbours span fewer than 5 classes) come in an arbitrary order there.
- several k share one top-max(k) search (`knn_classifier_multi_k`).
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dino_jax import sharding as shd

_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------------------------------
# Feature extraction.


def l2_normalize(x, eps: float = 1e-12):
    """torch.nn.functional.normalize(x, dim=-1): x / max(||x||, eps), so an all-zero row stays zero."""
    xp = jnp if isinstance(x, jax.Array) else np
    norm = xp.sqrt(xp.sum(xp.square(x), axis=-1, keepdims=True))
    return x / xp.maximum(norm, eps)


@functools.lru_cache(maxsize=16)
def feature_fn(model):
    """One compiled forward per model: CLS feature after the final norm, L2-normalised, float32.

    The features come out sharded like the images, so each device runs the backbone on its own rows only;
    `sharding.to_host` gathers them afterwards.
    """
    def fwd(params, images):
        return l2_normalize(model.apply({"params": params}, images).astype(jnp.float32))

    return jax.jit(fwd)


def extract_features(model, params, batches: Iterable[Mapping], *, log_every: int = 20, name: str = "features"):
    """Run the frozen backbone over `batches`; return (features (N, D) float32 L2-normalised, labels (N,) int64).

    Batches are the pipeline's global eval batches: {"image" (B,H,W,3), "label", "index", "valid"} with the batch
    axis sharded P('data'). Padded rows (valid False) are dropped and rows come back sorted by "index", so the
    result does not depend on the device count or on the order batches arrive (the reference's index_copy_).
    Every process gets the full matrices. Batches without "index"/"valid" are taken as-is, in order.
    """
    feats, labels, indices = [], [], []
    fn, mesh, params_on_mesh = None, None, None
    t0, n_done = time.time(), 0
    for i, batch in enumerate(batches):
        images = batch["image"]
        if fn is None:
            mesh = shd.mesh_of(images)
            fn = feature_fn(model)
            params_on_mesh = jax.device_put(params, shd.replicated(mesh))
        f = shd.to_host(fn(params_on_mesh, shd.place_batch(images, mesh)))
        n = f.shape[0]
        valid = shd.to_host(batch["valid"]).astype(bool) if "valid" in batch else np.ones(n, bool)
        index = shd.to_host(batch["index"]).astype(np.int64) if "index" in batch else n_done + np.arange(n)
        label = shd.to_host(batch["label"]).astype(np.int64) if "label" in batch else np.full(n, -1, np.int64)
        feats.append(f[valid])
        labels.append(label[valid])
        indices.append(index[valid])
        n_done += int(valid.sum())
        if log_every and (i + 1) % log_every == 0:
            print(f"  {name}: {n_done} images, {n_done / max(time.time() - t0, 1e-9):.1f} img/s", flush=True)
    if fn is None:
        raise ValueError(f"extract_features({name}): the batch iterator yielded nothing; is the dataset empty?")
    feats, labels, indices = np.concatenate(feats), np.concatenate(labels), np.concatenate(indices)
    order = np.argsort(indices, kind="stable")
    if len(np.unique(indices)) != len(indices):
        raise ValueError(f"extract_features({name}): duplicate example indices; the eval iterator must visit each "
                         "example once (padded rows need valid=False)")
    return feats[order], labels[order]


# ----------------------------------------------------------------------------------------------------------
# The weighted k-NN vote.


@functools.partial(jax.jit, static_argnames=("ks", "num_classes"))
def _knn_chunk(train_t, train_labels, feats, targets, row_valid, T, *, ks, num_classes):
    """Hits of one padded chunk of test rows: {k: (top1 hits, top5 hits)} as int32 scalars."""
    sim = jnp.dot(feats, train_t, precision=_HIGHEST)  # (b, n_train) cosine similarities
    kmax = max(ks)
    dist, idx = jax.lax.top_k(sim, kmax)  # sorted, ties -> lower train index first (as torch.topk in practice)
    neigh = train_labels[idx]  # (b, kmax)
    weights = jnp.exp(dist / T)
    rows = jnp.arange(feats.shape[0])[:, None]
    out = {}
    for k in ks:
        scores = jnp.zeros((feats.shape[0], num_classes), jnp.float32)
        scores = scores.at[jnp.broadcast_to(rows, (feats.shape[0], k)), neigh[:, :k]].add(weights[:, :k])
        n5 = min(5, k, num_classes)
        _, ranked = jax.lax.top_k(scores, n5)  # ties -> lower class index first (a stable descending sort)
        hit = ranked == targets[:, None]
        out[k] = (jnp.sum(hit[:, 0] & row_valid), jnp.sum(jnp.any(hit, axis=1) & row_valid))
    return out


def knn_classifier_multi_k(train_features, train_labels, test_features, test_labels, ks: Sequence[int], T: float,
                           num_classes: int, chunk_size: int | None = None) -> dict:
    """{k: {"top1", "top5"}} (percent) for every k in `ks` (k larger than the bank is skipped with a note), from
    one top-max(k) search per chunk of test rows.

    Features must already be L2-normalised (as `extract_features` returns them); jnp or numpy inputs.
    `chunk_size` test rows are compared with the whole bank at once; by default as many as keep the similarity
    block near 2**27 entries (512 MB), between 16 and 1024 rows.
    """
    ks = tuple(int(k) for k in ks)
    train_features = jnp.asarray(train_features, jnp.float32)
    train_labels = jnp.asarray(train_labels, jnp.int32)
    test_features = np.asarray(test_features, np.float32)
    test_labels = np.asarray(test_labels, np.int64)
    n_train, n_test = train_features.shape[0], test_features.shape[0]
    if not ks or min(ks) < 1:
        raise ValueError(f"--nb_knn must be positive integers, got {list(ks)}")
    if max(ks) > n_train:  # skipped rather than fatal: a periodic evaluation on a small bank should not stop training
        if min(ks) > n_train:
            raise ValueError(f"k={min(ks)} neighbours asked for but the train bank holds only {n_train} images; "
                             "lower --nb_knn (or config.nb_knn) or use more train images")
        print(f"k-NN: skipping k={[k for k in ks if k > n_train]} (the train bank holds only {n_train} images)",
              flush=True)
        ks = tuple(k for k in ks if k <= n_train)
    if n_test == 0:
        raise ValueError("knn_classifier: no test images")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"train features are {train_features.shape[1]}-d but test features "
                         f"{test_features.shape[1]}-d; they must come from the same backbone")
    labels_seen = np.concatenate([np.asarray(train_labels), test_labels])
    if labels_seen.min() < 0 or labels_seen.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, num_classes={num_classes}); found "
                         f"[{labels_seen.min()}, {labels_seen.max()}]")
    train_t = train_features.T
    if chunk_size is None:
        chunk_size = int(np.clip(2 ** 27 // max(n_train, 1), 16, 1024))
    chunk = max(1, min(chunk_size, n_test))
    hits = {k: [0, 0] for k in ks}
    for start in range(0, n_test, chunk):
        f = test_features[start:start + chunk]
        t = test_labels[start:start + chunk]
        b = len(t)
        if b < chunk:  # pad to the compiled chunk size; padded rows do not count
            f = np.concatenate([f, np.zeros((chunk - b, f.shape[1]), f.dtype)])
            t = np.concatenate([t, np.full(chunk - b, -1, t.dtype)])
        valid = np.arange(chunk) < b
        res = _knn_chunk(train_t, train_labels, jnp.asarray(f), jnp.asarray(t, jnp.int32), jnp.asarray(valid),
                         jnp.float32(T), ks=ks, num_classes=int(num_classes))
        for k in ks:
            hits[k][0] += int(res[k][0])
            hits[k][1] += int(res[k][1])
    return {k: {"top1": hits[k][0] * 100.0 / n_test, "top5": hits[k][1] * 100.0 / n_test} for k in ks}


def knn_classifier(train_features, train_labels, test_features, test_labels, k: int, T: float,
                   num_classes: int) -> tuple[float, float]:
    """The reference's weighted k-NN: (top1, top5) in percent. Features must be L2-normalised."""
    r = knn_classifier_multi_k(train_features, train_labels, test_features, test_labels, [k], T, num_classes)[int(k)]
    return r["top1"], r["top5"]


def training_sources(config, *, data_dir: str | None = None, open_source=None):
    """(bank, queries) of a training config's periodic k-NN evaluation: `eval_train_dataset` (an evenly spread
    `eval_max_train_examples` of it, when set) and `eval_dataset`, rendered at `global_crop_size` (the demo) and grey
    when the run trained on grey input. `open_source` defaults to data.sources.load_source."""
    if open_source is None:
        from dino_jax.data.sources import load_source as open_source
    kw = {"data_dir": data_dir or config.get("data_dir"), "image_size": config.get("global_crop_size"),
          "grayscale": bool(config.get("grayscale_input"))}
    return (open_source(config["eval_train_dataset"], max_examples=config.get("eval_max_train_examples") or None,
                        **kw),
            open_source(config["eval_dataset"], **kw))


@dataclasses.dataclass(frozen=True)
class KnnProtocol:
    """The k-NN evaluation of a backbone: L2-normalised CLS features of a labelled bank and of the queries (the eval
    transform: resize the shorter side, centre crop), then the weighted vote for every k in `nb_knn`.

    One object serves the trainer's periodic evaluation and `eval_knn`, so the command line, pointed at a run, repeats
    what the trainer logged. The classes are those of the larger of the two sources.
    """
    bank: Any  # data.sources.Source
    queries: Any
    global_batch: int
    resize_size: int = 256
    crop_size: int = 224
    nb_knn: tuple = (10, 20, 100, 200)
    temperature: float = 0.07

    @classmethod
    def from_config(cls, config, *, open_source=None) -> "KnnProtocol":
        """The protocol a training config describes: `training_sources`, eval_batch_size, eval_resize_size,
        eval_crop_size, nb_knn and knn_temperature."""
        return cls(*training_sources(config, open_source=open_source), global_batch=config["eval_batch_size"],
                   resize_size=config["eval_resize_size"], crop_size=config["eval_crop_size"],
                   nb_knn=tuple(config["nb_knn"]), temperature=config["knn_temperature"])

    @property
    def num_classes(self) -> int:
        return max(self.bank.num_classes, self.queries.num_classes)

    def batches(self, source, mesh=None):
        """The pipeline's global eval batches of `source`, split over `mesh` (default: every device)."""
        from dino_jax.data import pipeline

        mesh = shd.make_mesh() if mesh is None else mesh
        return pipeline.eval_iterator(source, global_batch=self.global_batch, sharding=shd.batch_sharding(mesh),
                                      resize_size=self.resize_size, crop_size=self.crop_size)

    def features(self, model, params, mesh=None):
        """(bank features, bank labels, query features, query labels), as `extract_features` returns them."""
        bank = extract_features(model, params, self.batches(self.bank, mesh), name="bank")
        queries = extract_features(model, params, self.batches(self.queries, mesh), name="queries")
        return (*bank, *queries)

    def classify(self, bank_f, bank_l, query_f, query_l) -> dict:
        """{k: {"top1", "top5"}} in percent (`knn_classifier_multi_k`)."""
        return knn_classifier_multi_k(bank_f, bank_l, query_f, query_l, self.nb_knn, self.temperature,
                                      self.num_classes)

    def __call__(self, model, params, mesh=None) -> dict:
        return self.classify(*self.features(model, params, mesh))


def format_table(results: Mapping) -> str:
    """The k-NN results as a small text table (k, top-1, top-5)."""
    lines = [f"{'k':>6} {'top-1':>8} {'top-5':>8}"]
    for k in sorted(results):
        lines.append(f"{k:>6} {results[k]['top1']:8.2f} {results[k]['top5']:8.2f}")
    return "\n".join(lines)
