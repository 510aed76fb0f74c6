"""Checkpoints (the only module that imports orbax).

A checkpoint is one step directory under WORKDIR/checkpoints holding two items:
  state: the whole TrainState pytree (step, student and teacher params, optimiser state, center, rng),
  meta:  JSON with the resolved config, the data position (epoch, step in epoch) and the architecture.
Saves are asynchronous and atomic (orbax writes to a temporary directory and renames it when complete), so a
crash mid-save leaves the previous checkpoint as the latest one. Restores land directly in the target
shardings, whatever the device count that wrote them.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpointer:
    """Save every `every_steps` (always when forced), keep the last `max_to_keep` plus every `keep_period` steps."""

    def __init__(self, workdir: str, *, every_steps: int = 1000, max_to_keep: int = 3, keep_period: int | None = None,
                 read_only: bool = False):
        self.directory = os.path.join(os.path.abspath(workdir) if "://" not in workdir else workdir, "checkpoints")
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=every_steps, max_to_keep=max_to_keep, keep_period=keep_period or None,
            create=not read_only, read_only=read_only, enable_async_checkpointing=not read_only,
            cleanup_tmp_directories=not read_only)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict, force: bool = False) -> bool:
        """Start an asynchronous save (returns at once); True if a save was started."""
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(array_fields(state)), meta=ocp.args.JsonSave(meta)), force=force)

    def restore(self, template, sharding, step: int | None = None):
        """(state, meta) of `step` (default: the latest), shaped like `template` and placed with `sharding`."""
        step = self.latest_step() if step is None else step
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                              array_fields(template))
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        return template.replace(**restored.state), restored.meta

    def restore_meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def restore_raw(self, step: int | None = None) -> tuple[Any, dict]:
        """The state as plain nested dicts of numpy arrays (no target needed), and the meta.

        Whatever the devices that wrote it: without a target orbax would rebuild the writer's sharding and fail
        ("Topology mismatch") on a machine with another device count, so the target is the saved shapes on one
        local device.
        """
        step = self.latest_step() if step is None else step
        saved = ocp.StandardCheckpointHandler().metadata(self.manager.directory / str(step) / "state")
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device)
                              if hasattr(m, "shape") and hasattr(m, "dtype") else m, getattr(saved, "tree", saved))
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        return jax.tree.map(np.asarray, restored.state), restored.meta

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def array_fields(state) -> dict:
    """The TrainState's array fields as a dict: what is saved (the static model/optimiser are rebuilt from the config)."""
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if f.metadata.get("pytree_node", True)}


def find_checkpoint_dir(path: str) -> tuple[str, int | None]:
    """Accept a workdir, its checkpoints/ folder or one step folder; return (workdir, step or None for latest)."""
    path = path.rstrip("/")
    base = os.path.basename(path)
    if base.isdigit() and os.path.basename(os.path.dirname(path)) == "checkpoints":
        return os.path.dirname(os.path.dirname(path)), int(base)
    if base == "checkpoints":
        return os.path.dirname(path), None
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return path, None
    raise FileNotFoundError(
        f"{path} is not a dino_jax workdir (no checkpoints/ folder inside). Pass the --workdir of a training run, "
        "its checkpoints/ folder or one checkpoints/<step> folder.")


def load_params(path: str, step: int | None = None) -> tuple[dict, dict]:
    """(state as numpy dicts, meta) from a dino_jax workdir/checkpoint path, for evaluation and conversion."""
    workdir, found_step = find_checkpoint_dir(path)
    ckpt = Checkpointer(workdir, read_only=True)
    step = found_step if step is None else step
    if step is None and ckpt.latest_step() is None:
        raise FileNotFoundError(f"{workdir}/checkpoints holds no complete checkpoint")
    try:
        return ckpt.restore_raw(step)
    finally:
        ckpt.close()
