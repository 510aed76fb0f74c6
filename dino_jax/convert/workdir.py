"""A reference .pth into a dino_jax workdir, and a workdir's checkpoint back into a reference .pth."""
from __future__ import annotations

from typing import Any

import numpy as np

from dino_jax import paths
from dino_jax.convert.files import is_full_checkpoint, load_pretrained, load_torch_file
from dino_jax.convert.full_checkpoint import (
    _train_state, config_from_reference, infer_steps_per_epoch, reference_checkpoint_to_state,
    state_to_reference_checkpoint,
)
from dino_jax.convert.state_dict import (
    _describe, _import_torch, _info_from_flax, flax_to_torch, infer_model_config, torch_to_flax,
)


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
