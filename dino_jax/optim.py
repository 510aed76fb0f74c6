"""The reference's optimisers as optax transformations: AdamW / SGD / LARS with DINO's exact semantics.

What differs from the usual optax recipe, and why:
- Gradient clipping is per tensor (each gradient rescaled to norm <= clip on its own), not by global norm.
- Weight decay applies to everything except biases and 1-D tensors, so cls_token, pos_embed and a trainable
  prototype gain ARE decayed (the reference's `get_params_groups`); its value follows the wd cosine.
- During the last-layer freeze the reference sets the prototypes' gradient to None, so PyTorch skips them
  entirely: no moment update, no weight decay, and their per-parameter Adam step counter does not advance.
  Here the prototypes get their own copy of the optimiser whose state is held still during the freeze.
- lr, weight decay and the end of the freeze are read at the global step, which `update` takes as `step=`
  (the reference indexes every schedule by the iteration), so a skipped non-finite step, whose optimiser state
  the train step keeps, leaves them on schedule. Adam's step count, like PyTorch's per-parameter `step`, counts
  the updates applied (fp16's GradScaler skips a step without advancing it either).
- Adam's bias corrections 1 - beta^t are computed as -expm1(t log beta): optax's float32 power gives
  1 - 0.999 with a relative error of 1.3e-5, the largest difference from PyTorch, which computes them in float64.
lr and wd come from the precomputed per-iteration reference schedules (see `schedules.py`).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


def clip_per_tensor(max_norm: float) -> optax.GradientTransformation:
    """Rescale each gradient tensor by min(1, max_norm / (||g|| + 1e-6)) (the reference's `clip_gradients`)."""

    def update(updates, state, params=None):
        del params

        def clip(g):
            coef = max_norm / (jnp.linalg.norm(g.ravel()) + 1e-6)
            return jnp.where(coef < 1, g * coef, g)

        return jax.tree.map(clip, updates), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


class FrozenState(NamedTuple):
    inner: optax.OptState


def frozen_for(inner: optax.GradientTransformation, num_steps: int) -> optax.GradientTransformationExtraArgs:
    """Zero updates and an untouched inner state while step < `num_steps` (PyTorch's grad=None skip)."""
    inner = optax.with_extra_args_support(inner)

    def init(params):
        return FrozenState(inner.init(params))

    def update(updates, state, params=None, *, step):
        new_updates, new_inner = inner.update(updates, state.inner, params, step=step)
        frozen = step < num_steps
        new_updates = jax.tree.map(lambda u: jnp.where(frozen, jnp.zeros_like(u), u), new_updates)
        new_inner = jax.tree.map(lambda old, new: jnp.where(frozen, old, new), state.inner, new_inner)
        return new_updates, FrozenState(new_inner)

    return optax.GradientTransformationExtraArgs(init, update)


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """optax.scale_by_adam (same state) with the bias corrections accurate to float32 rounding."""
    log_b1, log_b2 = math.log(b1), math.log(b2)

    def init(params):
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=jax.tree.map(jnp.zeros_like, params),
                                      nu=jax.tree.map(jnp.zeros_like, params))

    def update(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda m, g: (1 - b1) * g + b1 * m, state.mu, updates)
        nu = jax.tree.map(lambda v, g: (1 - b2) * (g * g) + b2 * v, state.nu, updates)
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        correction1, sqrt_correction2 = -jnp.expm1(t * log_b1), jnp.sqrt(-jnp.expm1(t * log_b2))
        updates = jax.tree.map(lambda m, v: (m / correction1) / (jnp.sqrt(v) / sqrt_correction2 + eps), mu, nu)
        return updates, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init, update)


def decay_mask(params):
    """True where the reference decays: not a bias and not 1-D."""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: p.ndim != 1 and getattr(path[-1], "key", None) != "bias", params)


def is_prototype_path(path) -> bool:
    return any(getattr(k, "key", None) == "last_layer" for k in path)


def _at(table: np.ndarray, step):
    """table[step], clamped at the last value (a numpy table: an optimiser built under a trace holds no tracer)."""
    return jnp.asarray(table)[jnp.minimum(step, len(table) - 1)]


def add_decayed_weights(wd_schedule: np.ndarray) -> optax.GradientTransformationExtraArgs:
    """update + wd[step] * param where `decay_mask` says so."""
    table = np.asarray(wd_schedule, np.float32)

    def update(updates, state, params=None, *, step):
        wd = _at(table, step)
        return jax.tree.map(lambda u, p, m: u + wd * p if m else u, updates, params, decay_mask(params)), state

    return optax.GradientTransformationExtraArgs(lambda _: optax.EmptyState(), update)


def scale_by_learning_rate(lr_schedule: np.ndarray) -> optax.GradientTransformationExtraArgs:
    """-lr[step] * update; the state counts the updates applied (what convert.py writes as PyTorch's `step`)."""
    table = np.asarray(lr_schedule, np.float32)

    def init(params):
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None, *, step):
        lr = _at(table, step)
        return (jax.tree.map(lambda u: -lr * u, updates),
                optax.ScaleByScheduleState(count=optax.safe_increment(state.count)))

    return optax.GradientTransformationExtraArgs(init, update)


def base_optimizer(name: str, lr_schedule: np.ndarray, wd_schedule: np.ndarray) -> optax.GradientTransformation:
    """One reference optimiser; `update` takes the global step as `step=`."""
    decay, lr = add_decayed_weights(wd_schedule), scale_by_learning_rate(lr_schedule)
    if name == "adamw":  # torch.optim.AdamW defaults: betas (0.9, 0.999), eps 1e-8, decoupled decay times lr
        return optax.chain(scale_by_adam(0.9, 0.999, 1e-8), decay, lr)
    if name == "sgd":  # torch SGD(momentum=0.9): coupled decay goes through the momentum buffer
        return optax.chain(decay, optax.trace(decay=0.9), lr)
    if name == "lars":  # the reference's LARS: decay and trust ratio on non-1-D tensors, then momentum, then lr
        not_1d = lambda params: jax.tree.map(lambda p: p.ndim != 1, params)  # noqa: E731
        return optax.chain(decay, optax.masked(optax.scale_by_trust_ratio(trust_coefficient=0.001), not_1d),
                           optax.trace(decay=0.9), lr)
    raise ValueError(f"config.optimizer must be 'adamw', 'sgd' or 'lars', got {name!r}")


def make_optimizer(name: str, lr_schedule: np.ndarray, wd_schedule: np.ndarray, *, clip_grad: float,
                   freeze_last_layer_steps: int) -> optax.GradientTransformationExtraArgs:
    """The full DINO optimiser: per-tensor clip, then the optimiser with the prototypes frozen at first.

    `tx.update(grads, opt_state, params, step=global_step)`.
    """
    rest = base_optimizer(name, lr_schedule, wd_schedule)
    prototypes = frozen_for(base_optimizer(name, lr_schedule, wd_schedule), freeze_last_layer_steps)
    labels = lambda params: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda path, _: "prototypes" if is_prototype_path(path) else "rest", params)
    tx = optax.partition({"rest": rest, "prototypes": prototypes}, labels)
    return optax.chain(clip_per_tensor(clip_grad), tx) if clip_grad > 0 else tx
