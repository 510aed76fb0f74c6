"""Full training checkpoints: the reference's {student, teacher, optimizer, dino_loss, args, epoch} <-> a TrainState,
optimiser moments included."""
from __future__ import annotations

import argparse
from collections import OrderedDict

import numpy as np

from dino_jax.convert.keymap import Entry, StateDictMismatchError, _entries, _is_parameter
from dino_jax.convert.state_dict import (
    _import_torch, _info_from_flax, _np, _numpy_state_dict, _to_flax_layout, _to_torch_layout, torch_to_flax,
)
from dino_jax.models.vit import ARCHS

MOMENTS = {  # optax state field -> torch optimizer state key, per reference optimiser
    "adamw": {"mu": "exp_avg", "nu": "exp_avg_sq"},
    "sgd": {"trace": "momentum_buffer"},
    "lars": {"trace": "mu"},
}
REFERENCE_ARGS = ("patch_size", "out_dim", "norm_last_layer", "momentum_teacher", "use_bn_in_head",
                  "warmup_teacher_temp", "teacher_temp", "warmup_teacher_temp_epochs", "weight_decay",
                  "weight_decay_end", "clip_grad", "epochs", "freeze_last_layer", "lr", "warmup_epochs", "min_lr",
                  "optimizer", "drop_path_rate", "global_crops_scale", "local_crops_number", "local_crops_scale",
                  "seed")


def _optimizer_order(entries: list[Entry]) -> tuple[list[Entry], list[Entry]]:
    """The reference's get_params_groups: trainable parameters in named_parameters order, split into the
    regularised group (not a bias, not 1-D) and the rest."""
    params = [e for e in entries if _is_parameter(e)]
    reg = [e for e in params if not (e.torch_key.endswith(".bias") or len(e.shape) == 1)]
    return reg, [e for e in params if e not in reg]


def _opt_role(path) -> tuple[str, str, tuple, bool]:
    """(partition label, state field, param path, inside the frozen wrapper's inner state) of an opt_state leaf."""
    from jax.tree_util import DictKey, GetAttrKey

    i = next(n for n, k in enumerate(path) if isinstance(k, DictKey))
    attrs = [(n, k.name) for n, k in enumerate(path) if isinstance(k, GetAttrKey)]
    n_field, field = attrs[-1]
    param_path = tuple(k.key for k in path[n_field + 1:])
    return path[i].key, field, param_path, any(name == "inner" for _, name in attrs)


def _torch_step(s: dict) -> int:
    return int(float(s["step"])) if "step" in s else 0


def infer_steps_per_epoch(ckpt: dict) -> int | None:
    """Iterations per epoch of a reference run: the optimizer's (AdamW) step count over the epoch, when whole."""
    epoch = int(ckpt.get("epoch", 0))
    steps = {_torch_step(s) for s in (ckpt.get("optimizer") or {}).get("state", {}).values()} - {0}
    if epoch > 0 and steps and max(steps) % epoch == 0:
        return max(steps) // epoch
    return None


def reference_checkpoint_to_state(ckpt: dict, config, *, steps_per_epoch: int | None = None, rng=None):
    """A dino_jax TrainState that resumes a reference run: student from 'student', teacher from 'teacher', center
    from dino_loss, step = epoch * steps_per_epoch and, when present, the optimiser's moments and step counts.

    `config` must describe the same model (see `config_from_reference`). `steps_per_epoch` defaults to the
    optimiser's step count divided by the epoch (a resumed run's schedules depend on it).
    """
    import jax
    import jax.numpy as jnp

    epoch = int(ckpt.get("epoch", 0))
    optimizer = ckpt.get("optimizer")
    student = torch_to_flax(ckpt["student"], checkpoint_key="student", norm_last_layer=config.norm_last_layer)
    teacher = torch_to_flax(ckpt["teacher"], checkpoint_key="teacher", norm_last_layer=config.norm_last_layer)
    info = _info_from_flax(student)
    entries = _entries(info)
    reg, rest = _optimizer_order(entries)
    opt_params = optimizer["param_groups"] if optimizer else None
    if opt_params is not None and [len(g["params"]) for g in opt_params] != [len(reg), len(rest)]:
        raise ValueError(f"the optimizer holds parameter groups of {[len(g['params']) for g in opt_params]} "
                         f"tensors; this model's get_params_groups gives {[len(reg), len(rest)]}")
    index = {}
    if opt_params is not None:
        index = {e.flax_path: i for group, es in zip(opt_params, (reg, rest)) for e, i in zip(es, group["params"])}
    torch_state = optimizer["state"] if optimizer else {}

    def torch_steps(es):
        return {_torch_step(torch_state[index[e.flax_path]]) for e in es if index.get(e.flax_path) in torch_state}

    rest_steps = torch_steps([e for e in reg + rest if "last_layer" not in e.torch_key])
    if len(rest_steps) > 1:
        raise ValueError(f"the optimizer's per-parameter step counts differ ({sorted(rest_steps)}); dino_jax keeps one")
    steps_per_epoch = steps_per_epoch or infer_steps_per_epoch(ckpt)
    if steps_per_epoch is None:
        raise ValueError(f"cannot infer steps_per_epoch from epoch {epoch} and the optimizer's step count; pass it "
                         "(--steps_per_epoch)")
    step = epoch * steps_per_epoch
    if rest_steps and rest_steps != {step}:
        raise ValueError(f"epoch {epoch} x steps_per_epoch {steps_per_epoch} = {step}, but the optimizer has taken "
                         f"{rest_steps.pop()} steps")
    proto_step = max(step - config.freeze_last_layer * steps_per_epoch, 0)
    proto_steps = torch_steps([e for e in reg + rest if "last_layer" in e.torch_key]) - {0}
    if proto_steps and proto_steps != {proto_step}:
        raise ValueError(f"last_layer has taken {sorted(proto_steps)} optimizer steps; with freeze_last_layer="
                         f"{config.freeze_last_layer} epochs it should have taken {proto_step}")

    fresh = _train_state(config, steps_per_epoch, student, teacher, rng)
    fields = MOMENTS.get(config.optimizer, {})
    by_path = {e.flax_path: e for e in entries if _is_parameter(e)}

    def fill(path, leaf):
        partition, field, param_path, inner = _opt_role(path)
        if field == "count":
            value = step if partition == "rest" or not inner else proto_step
            return jnp.asarray(value, leaf.dtype)
        if field in fields and index.get(param_path) in torch_state:
            value = torch_state[index[param_path]].get(fields[field])
            if value is not None:
                return jnp.asarray(_to_flax_layout(_np(value), by_path[param_path].kind))
        return leaf

    center = ckpt.get("dino_loss", {}).get("center")
    return fresh.replace(step=jnp.asarray(step, jnp.int32),
                         opt_state=jax.tree_util.tree_map_with_path(fill, fresh.opt_state),
                         center=fresh.center if center is None else jnp.asarray(_np(center)))


def _train_state(config, steps_per_epoch: int, params, teacher_params, rng=None):
    """dino.create_train_state around given student and teacher params, checked against the config's model."""
    import jax
    import jax.numpy as jnp

    from dino_jax import dino

    model = dino.build_model(config)
    rng = jax.random.PRNGKey(config.seed) if rng is None else rng
    shapes = jax.eval_shape(lambda r: model.init(r, config.global_crop_size), rng)
    _check_tree(params, shapes, "student")
    _check_tree(teacher_params, shapes, "teacher")
    state = dino.create_train_state(config, model, steps_per_epoch, rng, params=jax.tree.map(jnp.asarray, params))
    return state.replace(teacher_params=jax.tree.map(jnp.asarray, teacher_params))


def _check_tree(got, want, what: str) -> None:
    import jax

    got_shapes = {jax.tree_util.keystr(p): np.shape(x) for p, x in jax.tree_util.tree_flatten_with_path(got)[0]}
    want_shapes = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(want)[0]}
    diff = [f"{k}: {got_shapes.get(k, 'absent')} in the checkpoint, {want_shapes.get(k, 'absent')} in the config"
            for k in sorted(set(got_shapes) | set(want_shapes)) if got_shapes.get(k) != want_shapes.get(k)]
    if diff:
        raise StateDictMismatchError(f"the {what} does not match the config's model: " + "; ".join(diff[:15]) +
                                     (f"; ... ({len(diff) - 15} more)" if len(diff) > 15 else ""))


def reference_args(config) -> dict:
    """main_dino.py's argparse values for this config, as a plain dict. batch_size is global here, so it is
    written as batch_size_per_gpu with world_size 1 (the reference's lr scaling uses their product)."""
    args = {k: (list(config[k]) if isinstance(config[k], tuple) else config[k]) for k in REFERENCE_ARGS}
    args.update(arch=config.arch, batch_size_per_gpu=config.batch_size, world_size=1, use_fp16=False)
    return args


def state_to_reference_checkpoint(state, config, epoch: int) -> dict:
    """A reference full checkpoint (what main_dino.py writes to checkpoint.pth) from a TrainState: student
    (module.backbone./module.head.), teacher (backbone./head.), optimizer (the reference's parameter groups and
    per-parameter state; tensors still frozen have none, as in PyTorch), dino_loss.center, epoch, args (a dict).
    """
    import jax

    torch = _import_torch()
    params = jax.tree.map(np.asarray, jax.device_get(state.params))
    teacher = jax.tree.map(np.asarray, jax.device_get(state.teacher_params))
    entries = _entries(_info_from_flax(params))

    def tensors(tree, prefix):
        return OrderedDict((prefix + k, torch.from_numpy(v)) for k, v in _numpy_state_dict(tree, entries).items())

    fields = MOMENTS.get(config.optimizer, {})
    counts, moments = {}, {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(state.opt_state))[0]:
        partition, field, param_path, inner = _opt_role(path)
        if field == "count" and (partition == "rest" or inner):
            counts[partition] = int(leaf)
        elif field in fields:
            moments.setdefault(param_path, {})[fields[field]] = np.asarray(leaf)
    reg, rest = _optimizer_order(entries)
    opt_state = {}
    for i, e in enumerate(reg + rest):
        count = counts.get("prototypes" if "last_layer" in e.torch_key else "rest", 0)
        if count > 0 and e.flax_path in moments:
            s = {k: torch.from_numpy(_to_torch_layout(v, e.kind)) for k, v in moments[e.flax_path].items()}
            opt_state[i] = {"step": count, **s} if config.optimizer == "adamw" else s
    lr = config.lr * config.batch_size / 256.0
    group = {"adamw": dict(lr=lr, betas=(0.9, 0.999), eps=1e-8, amsgrad=False),
             "sgd": dict(lr=lr, momentum=0.9, dampening=0, nesterov=False),
             "lars": dict(lr=lr, momentum=0.9, eta=0.001)}[config.optimizer]
    groups = [dict(group, weight_decay=config.weight_decay, params=list(range(len(reg)))),
              dict(group, weight_decay=0.0, params=list(range(len(reg), len(reg) + len(rest))))]
    return {
        "student": tensors(params, "module."),
        "teacher": tensors(teacher, ""),
        "optimizer": {"state": opt_state, "param_groups": groups},
        "epoch": int(epoch),
        "args": reference_args(config),
        "dino_loss": {"center": torch.from_numpy(np.array(jax.device_get(state.center), np.float32))},
    }


def config_from_reference(info: dict, args: dict | None = None, num_heads: int | None = None):
    """A dino_jax config (base_config) for a converted model: the reference's training args when known, then
    the architecture read from the weights (which wins)."""
    from dino_jax.config import base_config

    c = base_config()
    args = dict(vars(args) if isinstance(args, argparse.Namespace) else args or {})
    for k in REFERENCE_ARGS:
        if k in args and args[k] is not None:
            c[k] = tuple(args[k]) if isinstance(c[k], tuple) else type(c[k])(args[k])
    if "batch_size_per_gpu" in args:
        c.batch_size = int(args["batch_size_per_gpu"]) * int(args.get("world_size", 1))
    heads = num_heads or info.get("num_heads")
    if "embed_dim" in info:
        if heads is None:
            raise ValueError(f"embed_dim {info['embed_dim']} is not a multiple of 64 (the reference's head size), "
                             "so the number of heads is unknown: pass num_heads (--num_heads)")
        if info["arch"] != "vit_custom" and heads != ARCHS[info["arch"]]["num_heads"]:
            info = dict(info, arch="vit_custom")
        c.update(arch=info["arch"], patch_size=info["patch_size"], embed_dim=info["embed_dim"], depth=info["depth"],
                 num_heads=heads, global_crop_size=info["img_size"])
    for k in ("out_dim", "use_bn_in_head", "norm_last_layer", "head_nlayers", "head_hidden_dim",
              "head_bottleneck_dim"):
        # g == 1 also fits a norm_last_layer=False run whose last layer is still frozen: the args decide then.
        if k in info and not (k == "norm_last_layer" and args.get(k) is not None and info[k]):
            c[k] = type(c[k])(info[k])
    return c
