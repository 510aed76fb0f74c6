""".pth files (unpickled with torch's safe loader) and pretrained backbones from either codebase."""
from __future__ import annotations

import argparse
import contextlib

import numpy as np

from dino_jax import paths
from dino_jax.convert.keymap import StateDictMismatchError
from dino_jax.convert.state_dict import _import_torch, _info_from_flax, torch_to_flax
from dino_jax.models.vit import ARCHS


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
