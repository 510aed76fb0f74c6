"""Linear probe on a frozen backbone (the reference's `eval_linear.py`) as library calls.

Features: the CLS tokens of the last `n_last_blocks` blocks (each through the final norm), concatenated earliest
first; with `avgpool` (n=1 only, as in the reference) the CLS vector u and the mean patch token a are INTERLEAVED
[u0, a0, u1, a1, ...], the order the released ViT-B `*_linearweights.pth` expect. Classifier: Linear(F, C) with
weight ~ N(0, 0.01) and zero bias; SGD momentum 0.9, no weight decay, cross-entropy; the lr follows
CosineAnnealingLR(T_max=epochs, eta_min=0) stepped per epoch; the reported accuracy is the best over epochs.
Weights load from and save to the reference layout {'state_dict': {'module.linear.weight' (C, F),
'module.linear.bias' (C,)}}.

Training batches are pipeline-style dicts {"features" (B, F), "label", "valid"}; `image_feature_batches` turns
image batches into them (the augmented ones come from `data.pipeline.linear_train_iterator`), `array_batches` serves
precomputed features, so the same loop runs either way.
"""
from __future__ import annotations

import functools
import json
import math
import time
from typing import Callable, Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dino_jax import paths

_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------------------------------
# Features.


def linear_features(intermediate, avgpool: bool = False):
    """The reference's ViT linear-probe feature from get_intermediate_layers output (list of (B, N+1, D))."""
    out = jnp.concatenate([x[:, 0] for x in intermediate], axis=-1)
    if avgpool:
        if len(intermediate) != 1:
            raise ValueError("--avgpool_patchtokens only works with --n_last_blocks 1 (as in the reference, whose "
                             "interleaved [cls, avg] feature is defined for one block)")
        avg = jnp.mean(intermediate[-1][:, 1:], axis=1)
        out = jnp.stack([out, avg], axis=-1).reshape(out.shape[0], -1)  # interleaved, like torch.stack(dim=-1)
    return out.astype(jnp.float32)


def feature_dim(model, n_last_blocks: int, avgpool: bool) -> int:
    return model.embed_dim * (2 if avgpool else n_last_blocks)


@functools.lru_cache(maxsize=16)
def feature_fn(model, n_last_blocks: int, avgpool: bool):
    """Jitted (params, images) -> (B, F) probe features of the frozen backbone."""
    if avgpool and n_last_blocks != 1:
        raise ValueError("--avgpool_patchtokens only works with --n_last_blocks 1 (the reference's rule)")
    if not 1 <= n_last_blocks <= model.depth:
        raise ValueError(f"--n_last_blocks {n_last_blocks}: the backbone has {model.depth} blocks")

    def fn(params, images):
        inter = model.apply({"params": params}, images, n_last_blocks, method=model.get_intermediate_layers)
        return linear_features(inter, avgpool)

    return jax.jit(fn)


def image_feature_batches(model, params, batches: Iterable[Mapping], n_last_blocks: int,
                          avgpool: bool) -> Iterator[dict]:
    """Image batches {"image", "label", ("valid")} -> feature batches {"features", "label", "valid"}."""
    from dino_jax import sharding as shd

    fn, mesh = feature_fn(model, n_last_blocks, avgpool), None
    for b in batches:
        if mesh is None:  # the frozen params go (once) where the batches live: replicated on their mesh
            mesh = shd.mesh_of(b["image"])
            params = jax.device_put(params, shd.replicated(mesh))
        valid = b["valid"] if "valid" in b else np.ones(len(b["label"]), bool)
        yield {"features": fn(params, shd.place_batch(b["image"], mesh)), "label": b["label"], "valid": valid}


def array_batches(features, labels, batch_size: int, seed: int | None = None) -> Iterator[dict]:
    """Feature batches from arrays (shuffled when `seed` is given); the tail is padded with valid=False rows."""
    n = len(labels)
    order = np.random.default_rng(seed).permutation(n) if seed is not None else np.arange(n)
    for s in range(0, n, batch_size):
        idx = order[s:s + batch_size]
        valid = np.ones(batch_size, bool)
        if len(idx) < batch_size:
            valid[len(idx):] = False
            idx = np.concatenate([idx, np.full(batch_size - len(idx), idx[0])])
        yield {"features": features[idx], "label": labels[idx], "valid": valid}


# ----------------------------------------------------------------------------------------------------------
# Classifier, optimiser, weights.


def init_linear(seed_or_key, feat_dim: int, num_labels: int) -> dict:
    """Linear(F, C) as the reference initialises it: weight ~ N(0, 0.01), bias 0. Kernel stored (F, C)."""
    key = jax.random.PRNGKey(seed_or_key) if isinstance(seed_or_key, int) else seed_or_key
    return {"kernel": 0.01 * jax.random.normal(key, (feat_dim, num_labels), jnp.float32),
            "bias": jnp.zeros((num_labels,), jnp.float32)}


def cosine_annealing_lr(base_lr: float, epoch: int, epochs: int) -> float:
    """CosineAnnealingLR(T_max=epochs, eta_min=0) during `epoch` (0-based), stepped once per epoch."""
    return 0.5 * base_lr * (1 + math.cos(math.pi * epoch / epochs))


def _logits(lin, feats):
    return jnp.dot(feats.astype(jnp.float32), lin["kernel"], precision=_HIGHEST) + lin["bias"]


@jax.jit
def sgd_step(lin, momentum, feats, labels, valid, lr):
    """One SGD step with torch semantics (buf = 0.9*buf + g; p -= lr*buf; no weight decay) on the mean
    cross-entropy of the valid rows. Returns (lin, momentum, loss)."""
    def loss_fn(p):
        logp = jax.nn.log_softmax(_logits(p, feats))
        nll = -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=1)[:, 0]
        w = valid.astype(jnp.float32)
        return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)

    loss, grads = jax.value_and_grad(loss_fn)(lin)
    momentum = jax.tree.map(lambda m, g: 0.9 * m + g, momentum, grads)
    lin = jax.tree.map(lambda p, m: p - lr * m, lin, momentum)
    return lin, momentum, loss


@jax.jit
def _eval_counts(lin, feats, labels, valid):
    logits = _logits(lin, feats)
    labels = labels.astype(jnp.int32)
    w = valid.astype(jnp.float32)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1)[:, 0]
    k = min(5, logits.shape[1])
    _, top = jax.lax.top_k(logits, k)
    hit = top == labels[:, None]
    return jnp.sum(hit[:, 0] * w), jnp.sum(jnp.any(hit, axis=1) * w), jnp.sum(nll * w), jnp.sum(w)


def evaluate_linear(lin, feature_batches: Iterable[Mapping]) -> dict:
    """{"acc1", "acc5", "loss", "n"} in percent over the valid rows (acc5 = acc1 with fewer than 5 classes)."""
    totals = np.zeros(4)
    for b in feature_batches:
        totals += np.array([float(v) for v in _eval_counts(lin, b["features"], b["label"], b["valid"])])
    n = max(totals[3], 1)
    return {"acc1": float(100 * totals[0] / n), "acc5": float(100 * totals[1] / n), "loss": float(totals[2] / n),
            "n": int(totals[3])}


def to_reference_state_dict(lin) -> dict:
    """{'module.linear.weight' (C, F), 'module.linear.bias' (C,)} as numpy: the DDP-wrapped LinearClassifier."""
    return {"module.linear.weight": np.asarray(lin["kernel"]).T.copy(),
            "module.linear.bias": np.asarray(lin["bias"]).copy()}


def from_reference_state_dict(sd: Mapping) -> dict:
    """Linear params from a reference linear state dict (with or without the 'state_dict' wrapper / 'module.')."""
    if "state_dict" in sd:
        sd = sd["state_dict"]
    sd = {k.replace("module.", ""): v for k, v in sd.items()}
    for key in ("linear.weight", "linear.bias"):
        if key not in sd:
            raise KeyError(f"no '{key}' (or 'module.{key}') in the linear weights; keys found: {sorted(sd)[:8]}")
    w = np.asarray(sd["linear.weight"].numpy() if hasattr(sd["linear.weight"], "numpy") else sd["linear.weight"])
    b = np.asarray(sd["linear.bias"].numpy() if hasattr(sd["linear.bias"], "numpy") else sd["linear.bias"])
    return {"kernel": jnp.asarray(w.T, jnp.float32), "bias": jnp.asarray(b, jnp.float32)}


def save_linear_weights(path: str, lin, **extra) -> str:
    """torch.save({'state_dict': reference layout, **extra}) so the reference (and --evaluate) load it back."""
    import torch

    sd = {k: torch.from_numpy(v) for k, v in to_reference_state_dict(lin).items()}
    paths.torch_save({"state_dict": sd, **extra}, path)
    return path


def load_linear_weights(path: str) -> dict:
    """Linear params from a reference `*_linearweights.pth` / `checkpoint.pth.tar` written by either codebase."""
    if not paths.Path(path).exists():
        raise FileNotFoundError(f"linear weights {path} not found; pass --linear_weights PATH (a reference "
                                "*_linearweights.pth or the checkpoint.pth.tar an --output_dir run wrote)")
    return from_reference_state_dict(paths.torch_load(path, weights_only=False))


# ----------------------------------------------------------------------------------------------------------
# The training loop.


def train_linear(train_epoch: Callable[[int], Iterable[Mapping]], val_batches: Callable[[], Iterable[Mapping]],
                 feat_dim: int, num_labels: int, *, epochs: int = 100, lr: float = 0.001, val_freq: int = 1,
                 seed: int = 0, output_dir: str | None = None, log: Callable[[str], None] = print,
                 save_weights: bool = True) -> dict:
    """Train the probe; return {"best_acc", "last": val stats, "history": [...], "params"}.

    train_epoch(epoch) yields the epoch's training feature batches (augmented/shuffled as the caller wants);
    val_batches() yields validation feature batches. `lr` is the actual learning rate (the reference's CLI scales
    its --lr by global_batch/256 before this). With `output_dir`: log.txt (one JSON line per epoch, the reference's
    keys) and checkpoint.pth.tar in the reference layout (last validated epoch, like the reference).
    """
    lin = init_linear(seed, feat_dim, num_labels)
    momentum = jax.tree.map(jnp.zeros_like, lin)
    best, history, last = 0.0, [], None
    for epoch in range(epochs):
        lr_e = cosine_annealing_lr(lr, epoch, epochs)
        t0, losses, n_steps = time.time(), [], 0
        for b in train_epoch(epoch):
            lin, momentum, loss = sgd_step(lin, momentum, b["features"], b["label"], b["valid"], jnp.float32(lr_e))
            losses.append(loss)
            n_steps += 1
        if n_steps == 0:
            raise ValueError("train_linear: an epoch yielded no batches; is the training set empty?")
        stats = {"train_loss": float(np.mean([float(x) for x in losses])), "train_lr": lr_e, "epoch": epoch}
        if (epoch + 1) % val_freq == 0 or epoch == epochs - 1:
            last = evaluate_linear(lin, val_batches())
            best = max(best, last["acc1"])
            stats.update({"test_acc1": last["acc1"], "test_acc5": last["acc5"], "test_loss": last["loss"]})
            log(f"epoch {epoch}: train loss {stats['train_loss']:.4f}, lr {lr_e:.3g}, val acc1 {last['acc1']:.2f} "
                f"acc5 {last['acc5']:.2f} (best {best:.2f}) [{time.time() - t0:.1f}s]")
            if output_dir and save_weights and jax.process_index() == 0:
                save_linear_weights(paths.join(output_dir, "checkpoint.pth.tar"), lin, epoch=epoch + 1,
                                    best_acc=best)
        else:
            log(f"epoch {epoch}: train loss {stats['train_loss']:.4f}, lr {lr_e:.3g} [{time.time() - t0:.1f}s]")
        history.append(stats)
        if output_dir and jax.process_index() == 0:
            log_txt = paths.GrowingFile(paths.join(output_dir, "log.txt"))
            log_txt.write((json.dumps(stats) + "\n").encode())
            log_txt.close()
    log(f"Training of the supervised linear classifier on frozen features completed.\n"
        f"Top-1 test accuracy: {best:.1f}")
    return {"best_acc": best, "last": last, "history": history, "params": lin}
