"""The key table: every reference state-dict key with its Flax path and layout change, in the order of the
reference's `named_parameters()`. Conversion both ways, shape checks and the optimiser's parameter indices all read it.

Layouts: Linear weights are transposed (ours are (in, out)), the patch Conv goes OIHW -> HWIO, the fused qkv stays
fused, LayerNorm/BatchNorm weight -> scale, weight norm's g (K, 1) / v (K, b) are transposed. With
norm_last_layer=True the reference's g is fixed at 1 and has no Flax parameter.
"""
from __future__ import annotations

from typing import NamedTuple


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


