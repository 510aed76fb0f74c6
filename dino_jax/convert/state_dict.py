"""Reference state dicts <-> Flax parameters (backbone, and the head when the dict has one), checked against the
key table. torch is imported lazily, so nothing but writing torch tensors needs it."""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any

import numpy as np

from dino_jax.convert.keymap import Entry, StateDictMismatchError, _entries, _is_parameter
from dino_jax.models.vit import ARCHS

TORCH_HINT = "reading or writing .pth files needs PyTorch (the CPU build is enough): pip install 'dino_jax[torch]'"
G_ONES_ATOL = 1e-5  # a teacher's fixed g drifts from 1 by float32 rounding in the EMA; that is still "fixed"


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


def _to_flax_layout(x: np.ndarray, kind: str) -> np.ndarray:
    return np.ascontiguousarray(x.T if kind == "T" else x.transpose(2, 3, 1, 0) if kind == "conv" else x)


def _import_torch():
    try:
        import torch
    except ImportError:
        raise SystemExit(TORCH_HINT) from None
    return torch
