"""The DINO algorithm as pure functions: the loss, centering, the EMA teacher and one training step.

A batch is {"global": (B, 2, G, G, 3), "local": (B, L, l, l, 3)}, NHWC and ImageNet-normalised. Inside the step
every array keeps the batch axis first, (B, V, ...), so a batch sharded on B stays sharded from input to loss:
merging views crop-major, (V, B) -> V*B, cannot be expressed as a sharding of B and makes XLA gather the whole
batch onto every device. The reference's crop-major order matters only for which student view pairs with which
teacher view in the loss, and the view axis V says that. The public `dino_loss`/`update_center` take the
reference's crop-major tensors (student (n_crops*B, K) ordered [global1 batch, global2 batch, local1 batch, ...],
teacher (2*B, K)) so that parity tests can feed the reference's own outputs.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from dino_jax import optim, schedules
from dino_jax.models.head import DINOHead
from dino_jax.models.vit import build_vit


# ----------------------------------------------------------------------------------------------------------
# Loss and centering.


def dino_loss(student_output, teacher_output, center, teacher_temp, n_crops: int, student_temp: float = 0.1):
    """Cross-entropy between the centred, sharpened teacher and the student over all pairs of different views.

    The mean over the 2*(n_crops-1) (teacher global i, student view v != i) terms, each a batch mean.
    Crop-major inputs as the reference's: student (n_crops*B, K), teacher (2*B, K).
    """
    return _loss_and_entropy(batch_major(student_output, n_crops), batch_major(teacher_output, 2), center,
                             teacher_temp, student_temp)[0]


def batch_major(crop_major_output, n_views: int):
    """(V*B, K) in the reference's [view0 batch, view1 batch, ...] order -> (B, V, K)."""
    return jnp.swapaxes(crop_major_output.reshape((n_views, -1) + crop_major_output.shape[1:]), 0, 1)


def _loss_and_entropy(student_output, teacher_output, center, teacher_temp, student_temp=0.1):
    """Loss and the collapse monitors from batch-major outputs: student (B, V, K), teacher (B, 2, K)."""
    n_crops = student_output.shape[1]
    student_logp = jax.nn.log_softmax(student_output.astype(jnp.float32) / student_temp, axis=-1)
    teacher = jax.nn.softmax((teacher_output.astype(jnp.float32) - center) / teacher_temp, axis=-1)
    teacher = jax.lax.stop_gradient(teacher)
    batch = teacher.shape[0]
    cross = -jnp.einsum("bik,bvk->iv", teacher, student_logp) / batch  # (2, V) batch-mean cross-entropies
    same_view = jnp.eye(2, n_crops, dtype=bool)
    loss = jnp.sum(jnp.where(same_view, 0.0, cross)) / (2 * (n_crops - 1))
    entropy = -jnp.sum(teacher * jnp.log(jnp.maximum(teacher, 1e-30)), axis=-1).mean()
    marginal = teacher.mean((0, 1))
    batch_entropy = -jnp.sum(marginal * jnp.log(jnp.maximum(marginal, 1e-30)))
    return loss, entropy, batch_entropy


def update_center(center, teacher_output, momentum: float = 0.9):
    """EMA of the global batch mean of the raw teacher outputs (all rows: both global crops, all devices).

    Any leading layout, (2*B, K) or (B, 2, K): the mean is over every row.
    """
    k = teacher_output.shape[-1]
    batch_center = jnp.mean(teacher_output.astype(jnp.float32).reshape(-1, k), axis=0, keepdims=True)
    return center * momentum + batch_center * (1 - momentum)


# ----------------------------------------------------------------------------------------------------------
# Model: backbone + head, the reference's MultiCropWrapper.


@dataclasses.dataclass(frozen=True)
class MultiCropModel:
    """One backbone call per crop resolution, then the head once on all features (the reference wrapper).

    Views come batch-major, one (B, V_g, H, W, 3) array per resolution, and outputs are (B, V, ...) with the
    groups' views in order along V. Images are merged into the backbone's batch as B*V_g rows, batch first, which
    keeps a batch sharded on B sharded.

    `chunks` > 1 splits each resolution's batch into that many independent backbone calls. The maths is the same
    (a ViT without batch norm treats images independently); the separate chains let XLA:CPU's executor keep
    several cores busy with single-core kernels (docs/benchmarks_history.md, `backbone_chunks`). Chunk j holds
    the images b with b % chunks == j, a strided split that keeps every chunk sharded like the batch. Drop-path
    draws its masks per chunk, so they differ from `chunks=1`.
    """
    backbone: Any
    head: Any
    chunks: int = 1

    def features(self, params, views, train: bool = False, rng=None):
        """views: list of (B, V_g, H, W, 3) arrays, one per resolution -> (B, V, D), V = sum of the V_g."""
        feats = []
        for i, x in enumerate(views):
            b, v = x.shape[:2]
            if b % self.chunks:
                raise ValueError(f"backbone_chunks={self.chunks} must divide the per-step batch of {b} images "
                                 f"(crops of size {x.shape[2]}); pick a divisor of it")
            group_rng = jax.random.fold_in(rng, i) if train and rng is not None else None
            parts = x.reshape((b // self.chunks, self.chunks) + x.shape[1:])
            outs = []
            for j in range(self.chunks):
                rngs = {}
                if group_rng is not None:  # chunks=1 keeps the unsplit step's masks
                    rngs["drop_path"] = jax.random.fold_in(group_rng, j) if self.chunks > 1 else group_rng
                images = parts[:, j].reshape((b // self.chunks * v,) + x.shape[2:])
                out = self.backbone.apply({"params": params["backbone"]}, images, train, rngs=rngs)
                outs.append(out.reshape(b // self.chunks, v, -1))
            feats.append(jnp.stack(outs, axis=1).reshape(b, v, -1))
        return jnp.concatenate(feats, axis=1)

    def __call__(self, params, views, train: bool = False, rng=None):
        """Head outputs (B, V, K) of the views (see `features`)."""
        feats = self.features(params, views, train, rng)
        b, v, d = feats.shape
        return self.head.apply({"params": params["head"]}, feats.reshape(b * v, d)).reshape(b, v, -1)

    def init(self, rng, image_size: int):
        k1, k2 = jax.random.split(rng)
        x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
        backbone = self.backbone.init(k1, x)["params"]
        feat = jnp.zeros((2, self.backbone.embed_dim), jnp.float32)
        return {"backbone": backbone, "head": self.head.init(k2, feat)["params"]}


def student_views(batch):
    """The student's views per resolution: the global crops, then the local crops when there are any."""
    views = [batch["global"]]
    if "local" in batch and batch["local"].shape[1] > 0:
        views.append(batch["local"])
    return views


def build_model(config) -> MultiCropModel:
    """The student/teacher architecture from a config (the teacher is the same model without drop-path)."""
    dtype = jnp.dtype(config.get("dtype", "float32"))
    vit_kwargs = dict(drop_path_rate=config.drop_path_rate, img_size=config.global_crop_size,
                      pos_embed_interp=config.get("pos_embed_interp", "offset"), dtype=dtype,
                      attention=config.get("attention", "einsum"), remat=config.get("remat", False))
    if config.arch == "vit_custom":
        vit_kwargs.update(embed_dim=config.embed_dim, depth=config.depth, num_heads=config.num_heads)
    backbone = build_vit(config.arch, config.patch_size, **vit_kwargs)
    head = DINOHead(config.out_dim, use_bn=config.use_bn_in_head, norm_last_layer=config.norm_last_layer,
                    nlayers=config.head_nlayers, hidden_dim=config.head_hidden_dim,
                    bottleneck_dim=config.head_bottleneck_dim, dtype=dtype)
    return MultiCropModel(backbone, head, chunks=config.get("backbone_chunks", 1))


# ----------------------------------------------------------------------------------------------------------
# State and step.


class TrainState(struct.PyTreeNode):
    """Everything a run needs to continue, as one immutable pytree (checkpointed whole)."""
    step: jax.Array
    params: Any  # student {"backbone", "head"}
    teacher_params: Any
    opt_state: optax.OptState
    center: jax.Array  # (1, K)
    rng: jax.Array
    apply_fn: MultiCropModel = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)


def create_train_state(config, model: MultiCropModel, steps_per_epoch: int, rng, params=None) -> TrainState:
    """A state at step 0: a random student (or `params`), identical teacher, zero center, the reference optimiser."""
    sched = schedules.training_schedules(config, steps_per_epoch)
    tx = optim.make_optimizer(config.optimizer, sched["lr"], sched["wd"], clip_grad=config.clip_grad,
                              freeze_last_layer_steps=config.freeze_last_layer * steps_per_epoch)
    init_rng, rng = jax.random.split(rng)
    if params is None:
        params = model.init(init_rng, config.global_crop_size)
    return TrainState(step=jnp.zeros([], jnp.int32), params=params,
                      teacher_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params),
                      center=jnp.zeros((1, config.out_dim), jnp.float32), rng=rng, apply_fn=model, tx=tx)


def make_train_step(config, steps_per_epoch: int):
    """Returns the pure `train_step(state, batch) -> (state, metrics)` for this config's schedules."""
    sched = {k: jnp.asarray(v, jnp.float32) for k, v in schedules.training_schedules(config, steps_per_epoch).items()}
    student_temp, center_momentum = config.student_temp, config.center_momentum

    def at(name, step):
        return sched[name][jnp.minimum(step, sched[name].shape[0] - 1)]

    def train_step(state: TrainState, batch):
        model, step = state.apply_fn, state.step
        teacher_temp, momentum = at("teacher_temp", step), at("momentum", step)
        teacher_output = model(state.teacher_params, [batch["global"]], train=False)  # (B, 2, K)

        def loss_fn(params):
            student_output = model(params, student_views(batch), train=True,
                                   rng=jax.random.fold_in(state.rng, step))  # (B, V, K)
            loss, entropy, batch_entropy = _loss_and_entropy(
                student_output, teacher_output, state.center, teacher_temp, student_temp)
            return loss, (entropy, batch_entropy)

        (loss, (entropy, batch_entropy)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(state):
            updates, opt_state = state.tx.update(grads, state.opt_state, state.params, step=step)
            params = optax.apply_updates(state.params, updates)
            teacher_params = jax.tree.map(lambda t, s: momentum * t + (1 - momentum) * s, state.teacher_params,
                                          params)
            return state.replace(params=params, teacher_params=teacher_params, opt_state=opt_state,
                                 center=update_center(state.center, teacher_output, center_momentum))

        # A non-finite step never reaches the state: the old state is kept (the step number still advances,
        # and the optimiser reads lr, wd and the freeze at `step`, so they stay on schedule) and `finite`
        # tells the loop, which stops or, if configured, skips and continues. A cond, not a select over the
        # whole state, which cost an extra pass over every array of it per step.
        new_state = jax.lax.cond(finite, update, lambda state: state, state).replace(step=step + 1)
        metrics = {
            "loss": loss, "lr": at("lr", step), "wd": at("wd", step), "momentum": momentum,
            "teacher_temp": teacher_temp, "teacher_entropy": entropy, "teacher_batch_entropy": batch_entropy,
            "kl": loss - entropy, "grad_norm": grad_norm, "finite": finite,
        }
        return new_state, metrics

    return train_step


def collapse_warning(metrics, out_dim: int) -> str | None:
    """A message when the collapse monitors say the teacher output is collapsing, else None.

    Uniform collapse: every teacher output is nearly uniform (entropy near ln K). One-dimension collapse: all
    images pick the same prototypes (the batch-mean teacher distribution has entropy near 0). Same-output collapse:
    the teacher is not uniform but gives every image the same distribution (the batch mean's entropy equals the
    per-image entropy); the demo with momentum 0.98 sat there for most of its run (docs/demo_recipe_history.md).
    """
    ln_k = float(np.log(out_dim))
    entropy, batch_entropy = float(metrics["teacher_entropy"]), float(metrics["teacher_batch_entropy"])
    if entropy > 0.98 * ln_k:
        return (f"teacher output is nearly uniform (entropy {entropy:.3f} of ln K = {ln_k:.3f}): collapse. Try a "
                "lower teacher_temp, a higher momentum_teacher or a smaller out_dim.")
    if batch_entropy < 0.05 * ln_k:
        return (f"all images map to the same prototypes (batch entropy {batch_entropy:.3f}): collapse to one "
                "dimension. Check centering (center_momentum) and the learning rate.")
    if entropy < 0.9 * ln_k and batch_entropy - entropy < 0.01 * ln_k:
        return (f"every image gets the same teacher output (batch-mean entropy {batch_entropy:.3f}, per-image "
                f"{entropy:.3f}): collapse. Try a higher momentum_teacher or a lower lr.")
    return None
