"""PyTorch <-> Flax checkpoints: the reference's .pth files (backbone-only and full training checkpoints) to
dino_jax parameters and TrainStates, and back.

One table (`_entries`) pairs every reference state-dict key with its Flax path and layout change, in the order of
the reference's `named_parameters()`; conversion both ways, shape checks and the optimiser's parameter indices
all read it. Layouts: Linear weights are transposed (ours are (in, out)), the patch Conv goes OIHW -> HWIO, the
fused qkv stays fused, LayerNorm/BatchNorm weight -> scale, weight norm's g (K, 1) / v (K, b) are transposed.
With norm_last_layer=True the reference's g is fixed at 1 and has no Flax parameter.

torch is imported lazily, so everything that does not read or write .pth files works without it.

CLI:
    python -m dino_jax.convert --input dino_deitsmall16_pretrain.pth --output WORKDIR [--checkpoint_key teacher]
    python -m dino_jax.convert --to_torch --input WORKDIR --output teacher.pth [--full]
"""
from __future__ import annotations

import argparse
import contextlib
import re
import sys
from collections import OrderedDict
from typing import Any, NamedTuple

import numpy as np

from dino_jax import paths
from dino_jax.models.vit import ARCHS

TORCH_HINT = "reading or writing .pth files needs PyTorch (the CPU build is enough): pip install 'dino_jax[torch]'"
G_ONES_ATOL = 1e-5  # a teacher's fixed g drifts from 1 by float32 rounding in the EMA; that is still "fixed"
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


class StateDictMismatchError(ValueError):
    """The state dict is not the architecture asked for (or inferred); the message lists keys and shapes."""


class Entry(NamedTuple):
    torch_key: str
    flax_path: tuple | None  # None: not a Flax parameter (fixed g, BatchNorm buffers)
    kind: str  # copy | T | conv (parameters); ones_g (fixed g) | zeros | ones | count (BatchNorm buffers)
    shape: tuple  # torch shape


# ----------------------------------------------------------------------------------------------------------
# The key table.


def _backbone_entries(embed_dim: int, depth: int, patch_size: int, num_patches: int, mlp_ratio: int = 4):
    d, h = embed_dim, embed_dim * mlp_ratio
    out = [Entry("cls_token", ("cls_token",), "copy", (1, 1, d)),
           Entry("pos_embed", ("pos_embed",), "copy", (1, num_patches + 1, d)),
           Entry("patch_embed.proj.weight", ("patch_embed", "kernel"), "conv", (d, 3, patch_size, patch_size)),
           Entry("patch_embed.proj.bias", ("patch_embed", "bias"), "copy", (d,))]
    for i in range(depth):
        b = f"blocks_{i}"
        for tname, fpath, out_in in (("norm1", ("norm1",), None), ("attn.qkv", ("attn", "qkv"), (3 * d, d)),
                                     ("attn.proj", ("attn", "proj"), (d, d)), ("norm2", ("norm2",), None),
                                     ("mlp.fc1", ("mlp", "fc1"), (h, d)), ("mlp.fc2", ("mlp", "fc2"), (d, h))):
            key = f"blocks.{i}.{tname}"
            if out_in is None:
                out += [Entry(f"{key}.weight", (b, *fpath, "scale"), "copy", (d,)),
                        Entry(f"{key}.bias", (b, *fpath, "bias"), "copy", (d,))]
            else:
                out += [Entry(f"{key}.weight", (b, *fpath, "kernel"), "T", out_in),
                        Entry(f"{key}.bias", (b, *fpath, "bias"), "copy", (out_in[0],))]
    return out + [Entry("norm.weight", ("norm", "scale"), "copy", (d,)),
                  Entry("norm.bias", ("norm", "bias"), "copy", (d,))]


def _head_entries(in_dim: int, out_dim: int, nlayers: int, hidden_dim: int, bottleneck_dim: int, use_bn: bool,
                  norm_last_layer: bool):
    """The reference's Sequential indices: Linear j at 2j (3j with BatchNorm at 3j+1); `mlp.*` when nlayers=1."""
    out = []
    widths = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
    for j in range(nlayers):
        key = "mlp" if nlayers == 1 else f"mlp.{j * (3 if use_bn else 2)}"
        out += [Entry(f"{key}.weight", (f"mlp_{j}", "kernel"), "T", (widths[j + 1], widths[j])),
                Entry(f"{key}.bias", (f"mlp_{j}", "bias"), "copy", (widths[j + 1],))]
        if use_bn and j < nlayers - 1:
            bn, w = f"mlp.{3 * j + 1}", (widths[j + 1],)
            out += [Entry(f"{bn}.weight", (f"bn_{j}", "scale"), "copy", w),
                    Entry(f"{bn}.bias", (f"bn_{j}", "bias"), "copy", w),
                    Entry(f"{bn}.running_mean", None, "zeros", w), Entry(f"{bn}.running_var", None, "ones", w),
                    Entry(f"{bn}.num_batches_tracked", None, "count", ())]
    g = Entry("last_layer.weight_g", None if norm_last_layer else ("last_layer", "weight_g"),
              "ones_g" if norm_last_layer else "T", (out_dim, 1))
    return out + [g, Entry("last_layer.weight_v", ("last_layer", "weight_v"), "T", (out_dim, bottleneck_dim))]


def _entries(info: dict) -> list[Entry]:
    """Entries of the parts described by `info` (see `infer_model_config`), keys prefixed backbone./head. and Flax
    paths under "backbone"/"head" when both parts are there, in the reference MultiCropWrapper's order."""
    parts = []
    if "embed_dim" in info:
        parts.append(("backbone", _backbone_entries(info["embed_dim"], info["depth"], info["patch_size"],
                                                    (info["img_size"] // info["patch_size"]) ** 2)))
    if "out_dim" in info:
        parts.append(("head", _head_entries(info["head_in_dim"], info["out_dim"], info["head_nlayers"],
                                            info["head_hidden_dim"], info["head_bottleneck_dim"],
                                            info["use_bn_in_head"], info["norm_last_layer"])))
    return [Entry(f"{name}.{e.torch_key}", None if e.flax_path is None else (name, *e.flax_path), e.kind, e.shape)
            for name, entries in parts for e in entries]


def _is_parameter(e: Entry) -> bool:
    return e.flax_path is not None


# ----------------------------------------------------------------------------------------------------------
# Reading state dicts.


def _shape(x) -> tuple:
    return tuple(x.shape)


def _np(x) -> np.ndarray:
    """A float32 copy: .numpy() shares memory with the tensor, which torch optimisers then update in place."""
    if hasattr(x, "detach"):  # a torch tensor (any dtype, any device)
        x = x.detach().cpu().float().numpy()
    return np.array(x, np.float32, copy=True)


def _select(obj, checkpoint_key: str | None) -> dict:
    """The eval scripts' loading: descend into `checkpoint_key` when present, strip `module.` and `backbone.`
    (anywhere in the key), then name the newer weight-norm parametrization like the legacy one; keys are
    unprefixed for the backbone and `head.*` for the head."""
    if not isinstance(obj, dict):
        raise TypeError(f"expected a state dict (a dict of tensors), got {type(obj).__name__}")
    key = checkpoint_key or "teacher"
    if key in obj and isinstance(obj[key], dict):
        obj = obj[key]
    nested = [k for k, v in obj.items() if not hasattr(v, "shape")]
    if nested:
        raise ValueError(f"no state dict under checkpoint_key {key!r}: the file holds {sorted(obj)[:12]} "
                         "(pass --checkpoint_key teacher or student for a full training checkpoint)")
    out = OrderedDict()
    for k, v in obj.items():
        k = k.replace("module.", "").replace("backbone.", "")
        k = k.replace("parametrizations.weight.original0", "weight_g")
        k = k.replace("parametrizations.weight.original1", "weight_v")
        out[k] = v
    return out


def _listing(sd: dict, limit: int = 12) -> str:
    items = [f"{k} {_shape(v)}" for k, v in sd.items()]
    return ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _infer(sd: dict, norm_last_layer: bool | None = None) -> dict:
    info: dict[str, Any] = {}
    backbone = {k: v for k, v in sd.items() if not k.startswith("head.")}
    head = {k[5:]: v for k, v in sd.items() if k.startswith("head.")}
    if backbone:
        if "patch_embed.proj.weight" not in backbone or "pos_embed" not in backbone:
            raise StateDictMismatchError(
                "not a DINO ViT state dict (no patch_embed.proj.weight / pos_embed); it holds " + _listing(backbone))
        d, _, p, _ = _shape(backbone["patch_embed.proj.weight"])
        n = _shape(backbone["pos_embed"])[1] - 1
        side = int(round(np.sqrt(n)))
        if side * side != n:
            raise StateDictMismatchError(f"pos_embed {_shape(backbone['pos_embed'])} is not a square patch grid")
        blocks = {int(m.group(1)) for k in backbone if (m := re.match(r"blocks\.(\d+)\.", k))}
        depth = max(blocks) + 1 if blocks else 0
        arch = next((a for a, v in ARCHS.items() if (v["embed_dim"], v["depth"]) == (d, depth)), "vit_custom")
        info.update(arch=arch, patch_size=p, embed_dim=d, depth=depth, num_heads=d // 64 if d % 64 == 0 else None,
                    img_size=side * p)
    if head:
        if "last_layer.weight_v" not in head:
            raise StateDictMismatchError(
                "the head has no weight-normalised last_layer (weight_g/weight_v), so it is not a DINOHead "
                "(the released ResNet-50 head is not supported); it holds " + _listing(head))
        out_dim, bottleneck = _shape(head["last_layer.weight_v"])
        if "mlp.weight" in head:
            linears, bns = [head["mlp.weight"]], []
        else:
            idx = sorted({int(m.group(1)) for k in head if (m := re.match(r"mlp\.(\d+)\.weight$", k))})
            linears = [head[f"mlp.{i}.weight"] for i in idx if len(_shape(head[f"mlp.{i}.weight"])) == 2]
            bns = [i for i in idx if len(_shape(head[f"mlp.{i}.weight"])) == 1]
        if not linears:
            raise StateDictMismatchError("the head has no mlp Linear layers; it holds " + _listing(head))
        g = head.get("last_layer.weight_g")
        fixed_g = g is None or bool(np.allclose(_np(g), 1.0, rtol=0, atol=G_ONES_ATOL))
        if norm_last_layer and not fixed_g:
            raise ValueError("norm_last_layer=True needs the head's weight_g to be all ones; this one ranges over "
                             f"[{_np(g).min():.4g}, {_np(g).max():.4g}] (a norm_last_layer=False model)")
        info.update(out_dim=out_dim, use_bn_in_head=bool(bns),
                    norm_last_layer=fixed_g if norm_last_layer is None else bool(norm_last_layer),
                    head_nlayers=len(linears),
                    head_hidden_dim=_shape(linears[0])[0] if len(linears) > 1 else 2048,
                    head_bottleneck_dim=bottleneck, head_in_dim=_shape(linears[0])[1])
    return info


def _check(sd: dict, entries: list[Entry], what: str) -> None:
    """Raise StateDictMismatchError listing missing, unexpected and wrongly shaped keys."""
    expected = {e.torch_key.removeprefix("backbone."): e for e in entries}
    optional = {k for k, e in expected.items() if e.kind in ("zeros", "ones", "count")}
    missing = [f"{k} {e.shape}" for k, e in expected.items() if k not in sd and k not in optional]
    unexpected = [f"{k} {_shape(v)}" for k, v in sd.items() if k not in expected]
    wrong = [f"{k}: {_shape(sd[k])}, expected {e.shape}" for k, e in expected.items()
             if k in sd and k not in optional and _shape(sd[k]) != e.shape]
    if missing or unexpected or wrong:
        lines = [f"the state dict does not match {what}:"]
        for title, items in (("wrong shape", wrong), ("missing", missing), ("unexpected", unexpected)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + "; ".join(items[:15]) +
                             (f"; ... ({len(items) - 15} more)" if len(items) > 15 else ""))
        raise StateDictMismatchError("\n".join(lines))


def _describe(info: dict) -> str:
    parts = []
    if "embed_dim" in info:
        parts.append(f"{info['arch']}/{info['patch_size']} (embed_dim {info['embed_dim']}, depth {info['depth']}, "
                     f"img_size {info['img_size']})")
    if "out_dim" in info:
        parts.append(f"DINOHead(out_dim={info['out_dim']}, use_bn={info['use_bn_in_head']}, "
                     f"norm_last_layer={info['norm_last_layer']}, nlayers={info['head_nlayers']}, "
                     f"hidden_dim={info['head_hidden_dim']}, bottleneck_dim={info['head_bottleneck_dim']})")
    return " + ".join(parts)


def infer_model_config(state_dict, *, checkpoint_key: str | None = None) -> dict:
    """The model a reference state dict describes, in dino_jax config names.

    Backbone: arch (vit_tiny/small/base for depth 12 at 192/384/768, else vit_custom), patch_size, embed_dim,
    depth, num_heads (embed_dim/64, the reference's head size; None when that is not whole), img_size (from
    pos_embed). Head, when present: out_dim, use_bn_in_head, norm_last_layer (g all ones), head_nlayers,
    head_hidden_dim, head_bottleneck_dim.
    """
    info = _infer(_select(state_dict, checkpoint_key))
    info.pop("head_in_dim", None)
    return info


def torch_to_flax(state_dict, *, checkpoint_key: str | None = None, arch: str | None = None,
                  patch_size: int | None = None, norm_last_layer: bool | None = None) -> dict:
    """{"backbone": ..., "head": ...} (each part when present) as nested dicts of float32 numpy arrays.

    Accepts backbone-only files, full training checkpoints (`checkpoint_key`, default "teacher"), MultiCropWrapper
    state dicts, `module.`/`backbone.` prefixes and both weight-norm namings. `arch`/`patch_size` are checks: a
    file of another architecture is an error listing the mismatched keys. `norm_last_layer` (default: inferred
    from g == 1) decides whether the head keeps g as a parameter.
    """
    sd = _select(state_dict, checkpoint_key)
    info = _infer(sd, norm_last_layer)
    what = _describe(info)
    if arch is not None or patch_size is not None:
        if "embed_dim" not in info:
            raise StateDictMismatchError(f"arch/patch_size given but the state dict has no backbone: {_listing(sd)}")
        want = dict(info)
        if arch is not None:
            arch = arch.replace("deit", "vit")  # the reference's aliases
            if arch not in ARCHS and arch != "vit_custom":
                raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)} or vit_custom")
            want.update(ARCHS.get(arch, {}))
        want["patch_size"] = patch_size or info["patch_size"]
        _check(sd, _entries(want), f"{arch or info['arch']}/{want['patch_size']} (asked for)")
    entries = _entries(info)
    _check(sd, entries, what)
    out: dict = {}
    for e in entries:
        if _is_parameter(e):
            node = out
            for k in e.flax_path[:-1]:
                node = node.setdefault(k, {})
            node[e.flax_path[-1]] = _to_flax_layout(_np(sd[e.torch_key.removeprefix("backbone.")]), e.kind)
    return out


# ----------------------------------------------------------------------------------------------------------
# Writing state dicts.


def _info_from_flax(params: dict) -> dict:
    info: dict[str, Any] = {}
    if "backbone" in params:
        b = params["backbone"]
        p, _, _, d = np.shape(b["patch_embed"]["kernel"])
        depth = sum(1 for k in b if k.startswith("blocks_"))
        side = int(round(np.sqrt(np.shape(b["pos_embed"])[1] - 1)))
        arch = next((a for a, v in ARCHS.items() if (v["embed_dim"], v["depth"]) == (d, depth)), "vit_custom")
        info.update(arch=arch, patch_size=p, embed_dim=d, depth=depth, num_heads=d // 64 if d % 64 == 0 else None,
                    img_size=side * p)
    if "head" in params:
        h = params["head"]
        nlayers = sum(1 for k in h if k.startswith("mlp_"))
        bottleneck, out_dim = np.shape(h["last_layer"]["weight_v"])
        info.update(out_dim=out_dim, use_bn_in_head=any(k.startswith("bn_") for k in h),
                    norm_last_layer="weight_g" not in h["last_layer"], head_nlayers=nlayers,
                    head_hidden_dim=np.shape(h["mlp_0"]["kernel"])[1] if nlayers > 1 else 2048,
                    head_bottleneck_dim=bottleneck, head_in_dim=np.shape(h["mlp_0"]["kernel"])[0])
    return info


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _to_torch_layout(x: np.ndarray, kind: str) -> np.ndarray:
    """A writable float32 copy (torch.from_numpy shares memory and jax hands out read-only arrays)."""
    x = np.asarray(x, np.float32)
    return np.array(x.T if kind == "T" else x.transpose(3, 2, 0, 1) if kind == "conv" else x, order="C", copy=True)


def _numpy_state_dict(params: dict, entries: list[Entry]) -> OrderedDict:
    out = OrderedDict()
    for e in entries:
        if _is_parameter(e):
            out[e.torch_key] = _to_torch_layout(_get(params, e.flax_path), e.kind)
        elif e.kind == "count":
            out[e.torch_key] = np.zeros((), np.int64)
        else:
            out[e.torch_key] = (np.zeros if e.kind == "zeros" else np.ones)(e.shape, np.float32)
    return out


def _as_model_params(params: dict) -> dict:
    return params if "backbone" in params or "head" in params else {"backbone": params}


def flax_to_torch(params: dict, *, include_head: bool = False, prefix: str = "") -> "OrderedDict[str, Any]":
    """A reference state dict of torch tensors from Flax params ({"backbone", "head"} or a bare backbone).

    Without `include_head`: the backbone-only layout (unprefixed keys) the reference ViT loads with strict=True.
    With it, also `head.*` with the legacy weight_g/weight_v (g = ones (K, 1) under norm_last_layer=True) and
    BatchNorm buffers (never read by DINO). `prefix` goes in front of every key.
    """
    torch = _import_torch()
    params = _as_model_params(params)
    if include_head and "head" not in params:
        raise ValueError("include_head=True but the params have no head")
    if "backbone" not in params:
        raise ValueError("the params have no backbone")
    info = _info_from_flax({k: params[k] for k in (("backbone", "head") if include_head else ("backbone",))})
    entries = [e._replace(torch_key=e.torch_key.removeprefix("backbone.")) for e in _entries(info)]
    return OrderedDict((prefix + k, torch.from_numpy(v)) for k, v in _numpy_state_dict(params, entries).items())


# ----------------------------------------------------------------------------------------------------------
# Full training checkpoints.


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
    """dino.create_train_state's state at step 0 around given params, checked against the config's model.
    Built here rather than there because initialising a model eagerly compiles every initialiser op by op."""
    import jax
    import jax.numpy as jnp

    from dino_jax import dino, optim, schedules

    model = dino.build_model(config)
    rng = jax.random.PRNGKey(config.seed) if rng is None else rng
    init_rng, rng = jax.random.split(rng)
    shapes = jax.eval_shape(lambda r: model.init(r, config.global_crop_size), init_rng)
    _check_tree(params, shapes, "student")
    _check_tree(teacher_params, shapes, "teacher")
    sched = schedules.training_schedules(config, steps_per_epoch)
    tx = optim.make_optimizer(config.optimizer, sched["lr"], sched["wd"], clip_grad=config.clip_grad,
                              freeze_last_layer_steps=config.freeze_last_layer * steps_per_epoch)
    params = jax.tree.map(jnp.asarray, params)
    return dino.TrainState(step=jnp.zeros([], jnp.int32), params=params,
                           teacher_params=jax.tree.map(jnp.asarray, teacher_params),
                           opt_state=jax.jit(tx.init)(params),  # one compilation instead of one per leaf shape
                           center=jnp.zeros((1, config.out_dim), jnp.float32), rng=rng, apply_fn=model, tx=tx)


def _to_flax_layout(x: np.ndarray, kind: str) -> np.ndarray:
    return np.ascontiguousarray(x.T if kind == "T" else x.transpose(2, 3, 1, 0) if kind == "conv" else x)


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


# ----------------------------------------------------------------------------------------------------------
# Files.


def _import_torch():
    try:
        import torch
    except ImportError:
        raise SystemExit(TORCH_HINT) from None
    return torch


def _safe_globals() -> list:
    """What reference checkpoints hold besides tensors: argparse args, and numpy scalars (the lr/wd that
    main_dino.py sets from numpy schedules into the optimizer's param_groups), under numpy 1 and 2 names."""
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy 1
        from numpy.core.multiarray import scalar
    return [argparse.Namespace, np.dtype, scalar, (scalar, "numpy.core.multiarray.scalar"),
            (scalar, "numpy._core.multiarray.scalar")] + [getattr(np.dtypes, n) for n in np.dtypes.__all__]


def load_torch_file(path: str):
    """torch.load on the CPU with the safe (weights-only) unpickler, allowing what reference checkpoints hold."""
    torch = _import_torch()
    if not paths.Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file")
    allow = getattr(torch.serialization, "safe_globals", None)
    with allow(_safe_globals()) if allow else contextlib.nullcontext():
        try:
            return paths.torch_load(path, weights_only=True)
        except Exception as e:  # noqa: BLE001 - the unpickler raises several types; all mean "not loadable"
            lines = [line for line in str(e).splitlines() if "Unsupported global" in line] or str(e).splitlines()
            raise ValueError(f"{path}: not loadable with torch's safe (weights-only) unpickler: {lines[0].strip()}") \
                from e


def is_full_checkpoint(obj) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("student"), dict) and isinstance(obj.get("teacher"), dict)


def load_pretrained(path: str, checkpoint_key: str = "teacher") -> tuple[dict, dict]:
    """(backbone params, model info) from a .pth (reference or ours) or a dino_jax workdir/checkpoint folder.

    The info has arch, patch_size, embed_dim, depth, num_heads, img_size, and pos_embed_interp when the source
    records it. For a dino_jax folder, checkpoint_key 'teacher' reads teacher_params and 'student' params.
    """
    if paths.Path(path).is_dir():
        from dino_jax import checkpoint

        if checkpoint_key not in ("teacher", "student"):
            raise ValueError(f"checkpoint_key must be 'teacher' or 'student', got {checkpoint_key!r}")
        raw, meta = checkpoint.load_params(path)
        params = raw["teacher_params" if checkpoint_key == "teacher" else "params"]["backbone"]
        info = _info_from_flax({"backbone": params})
        config = meta.get("config", {})
        info["num_heads"] = ARCHS[info["arch"]]["num_heads"] if info["arch"] in ARCHS else config.get("num_heads")
        if config.get("pos_embed_interp"):
            info["pos_embed_interp"] = config["pos_embed_interp"]
        info["training_config"] = config  # lets the evaluation CLIs repeat the run's own protocol (data, grey input)
        return params, info
    obj = load_torch_file(path)
    params = torch_to_flax(obj, checkpoint_key=checkpoint_key)
    if "backbone" not in params:
        raise StateDictMismatchError(f"{path} holds no backbone")
    info = _info_from_flax({"backbone": params["backbone"]})
    if info["num_heads"] is None:
        raise ValueError(f"{path}: embed_dim {info['embed_dim']} is not a multiple of 64, so the number of heads "
                         "is unknown (the reference's ViTs use 64 per head)")
    return params["backbone"], info


# ----------------------------------------------------------------------------------------------------------
# CLI.


def _count(tree) -> int:
    import jax

    return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


def torch_file_to_workdir(path: str, workdir: str, *, checkpoint_key: str = "teacher", arch: str | None = None,
                          patch_size: int | None = None, num_heads: int | None = None,
                          steps_per_epoch: int | None = None, out_dim: int | None = None) -> str:
    """Convert a .pth into a dino_jax checkpoint in `workdir`; returns the checkpoint folder. `out_dim` sizes the
    fresh head given to a backbone-only file (default: the reference's 65536)."""
    import jax

    from dino_jax import checkpoint, dino

    print(f"reading {path}", flush=True)
    obj = load_torch_file(path)
    meta: dict[str, Any] = {"converted_from": paths.absolute(path)}
    if is_full_checkpoint(obj):
        if arch or patch_size:
            torch_to_flax(obj, checkpoint_key="teacher", arch=arch, patch_size=patch_size)
        info = infer_model_config(obj, checkpoint_key="student")
        config = config_from_reference(info, obj.get("args"), num_heads)
        info["norm_last_layer"] = config.norm_last_layer  # the run's args settle a g that is still all ones
        print(f"full training checkpoint at epoch {obj.get('epoch', 0)}: {_describe(info)}; "
              f"optimizer state: {'yes' if obj.get('optimizer') else 'no'}", flush=True)
        state = reference_checkpoint_to_state(obj, config, steps_per_epoch=steps_per_epoch)
        meta.update(epoch=int(obj.get("epoch", 0)), steps_per_epoch=steps_per_epoch or infer_steps_per_epoch(obj))
        print(f"student and teacher: {_count(state.params):,} parameters each; step {int(state.step)}, center "
              f"{'restored' if 'dino_loss' in obj else 'zeros (none in the file)'}", flush=True)
    else:
        params = torch_to_flax(obj, checkpoint_key=checkpoint_key, arch=arch, patch_size=patch_size)
        info = _info_from_flax(params)
        config = config_from_reference(info, None, num_heads)
        if out_dim and "head" not in params:
            config.out_dim = out_dim
        print(f"state dict ({checkpoint_key if isinstance(obj.get(checkpoint_key), dict) else 'as is'}): "
              f"{_describe(info)}; {_count(params):,} parameters", flush=True)
        if "head" not in params:
            print(f"no head in the file: the head is a fresh DINOHead(out_dim={config.out_dim}) init", flush=True)
        model = dino.build_model(config)
        init = jax.jit(lambda r: model.init(r, config.global_crop_size))(jax.random.PRNGKey(config.seed))
        params = {**init, **params}
        state = _train_state(config, steps_per_epoch or 1, params, params)
        if steps_per_epoch:
            meta["steps_per_epoch"] = steps_per_epoch
    ckpt = checkpoint.Checkpointer(workdir)
    if ckpt.latest_step() is not None:
        ckpt.close()
        raise FileExistsError(f"{workdir} already holds a checkpoint; give an empty --output folder")
    meta["config"] = config.to_dict()
    print(f"saving to {ckpt.directory}/{int(state.step)}", flush=True)
    ckpt.save(int(state.step), state, meta, force=True)
    ckpt.close()
    return paths.join(ckpt.directory, str(int(state.step)))


def workdir_to_torch_file(workdir: str, path: str, *, checkpoint_key: str = "teacher", full: bool = False) -> None:
    """Write a backbone-only reference .pth (default) or, with `full`, a reference full checkpoint."""
    import jax
    import ml_collections

    from dino_jax import checkpoint, dino

    _import_torch()  # its clear error before any work
    print(f"reading {workdir}", flush=True)
    if not full:
        params, info = load_pretrained(workdir, checkpoint_key)
        sd = flax_to_torch(params)
        print(f"{checkpoint_key} backbone {info['arch']}/{info['patch_size']}: {len(sd)} tensors", flush=True)
        out = sd
    else:
        root, step = checkpoint.find_checkpoint_dir(workdir)
        ckpt = checkpoint.Checkpointer(root, read_only=True)
        try:
            meta = ckpt.restore_meta(step)
            config = ml_collections.ConfigDict(meta["config"])
            spe = int(meta.get("steps_per_epoch") or 1)
            model = dino.build_model(config)
            # Shapes only (no init); the restored state's tx is not usable, and not needed to write a .pth.
            template = jax.eval_shape(lambda r: dino.create_train_state(config, model, spe, r),
                                      jax.random.PRNGKey(0))
            state, _ = ckpt.restore(template, jax.sharding.SingleDeviceSharding(jax.devices()[0]), step)
        finally:
            ckpt.close()
        epoch = int(state.step) // spe
        if int(state.step) % spe:
            print(f"warning: step {int(state.step)} is inside epoch {epoch}; the reference resumes at the start of "
                  f"epoch {epoch} with the optimizer as it is now", flush=True)
        out = state_to_reference_checkpoint(state, config, epoch)
        print(f"full checkpoint at epoch {epoch} (step {int(state.step)}): student, teacher, optimizer "
              f"({len(out['optimizer']['state'])} tensors with state), dino_loss.center, args", flush=True)
    paths.torch_save(out, path)
    print(f"wrote {path}", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dino_jax.convert",
        description="Convert reference DINO .pth files to dino_jax checkpoints (default) or back (--to_torch).")
    parser.add_argument("--input", required=True, help=".pth file, or with --to_torch a dino_jax workdir/checkpoint")
    parser.add_argument("--output", required=True, help="dino_jax workdir, or with --to_torch the .pth to write")
    parser.add_argument("--checkpoint_key", default="teacher", choices=("teacher", "student"),
                        help="which network goes into a backbone file, or is read from a reference full "
                             "checkpoint's state dict by key (.pth -> dino_jax converts a full checkpoint whole)")
    parser.add_argument("--arch", default=None, help="check that the file is this arch (vit_tiny|vit_small|vit_base)")
    parser.add_argument("--patch_size", default=None, type=int, help="check that the file has this patch size")
    parser.add_argument("--num_heads", default=None, type=int, help="heads, when embed_dim is not a multiple of 64")
    parser.add_argument("--out_dim", default=None, type=int,
                        help="prototypes of the fresh head given to a backbone-only file (default 65536)")
    parser.add_argument("--steps_per_epoch", default=None, type=int,
                        help="iterations per epoch of the reference run (default: from its optimizer state)")
    parser.add_argument("--to_torch", action="store_true", help="dino_jax -> reference .pth")
    parser.add_argument("--full", action="store_true", help="with --to_torch: a full training checkpoint")
    args = parser.parse_args(argv)
    if not paths.Path(args.input).exists():
        sys.exit(f"--input {args.input}: no such file or folder")
    if args.full and not args.to_torch:
        sys.exit("--full goes with --to_torch (a .pth full checkpoint is detected automatically the other way)")
    try:
        if args.to_torch:
            workdir_to_torch_file(args.input, args.output, checkpoint_key=args.checkpoint_key, full=args.full)
        else:
            torch_file_to_workdir(args.input, args.output, checkpoint_key=args.checkpoint_key, arch=args.arch,
                                  patch_size=args.patch_size, num_heads=args.num_heads,
                                  steps_per_epoch=args.steps_per_epoch, out_dim=args.out_dim)
    except (ValueError, FileNotFoundError, FileExistsError, TypeError) as e:
        sys.exit(f"error: {e}")
    print("done", flush=True)


if __name__ == "__main__":
    main()
