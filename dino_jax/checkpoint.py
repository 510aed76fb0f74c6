"""Checkpoints: the only module that reads or writes them (orbax; sharding.py uses only its process barrier).

A checkpoint is one step directory under WORKDIR/checkpoints holding two items:
  state: the whole TrainState pytree (step, student and teacher params, optimiser state, center, rng),
  meta:  JSON with the resolved config, the data position (epoch, step in epoch), and a checksum of each array.
Saves are asynchronous and atomic (orbax writes to a temporary directory and renames it when complete), so a
crash mid-save leaves the previous checkpoint as the latest one. Restores land directly in the target
shardings, whatever the device count that wrote them. Storage can still damage a complete checkpoint (a lost or
cut file, flipped bytes): a restore checks every array against its checksum and falls back to the previous
checkpoint, moving the damaged one to WORKDIR/checkpoints_damaged/.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from dino_jax import paths
from dino_jax.config import UserError


class CheckpointError(UserError):
    """No checkpoint in the workdir can be restored; the message names each one and what is wrong with it."""


def _directory(workdir: str) -> str:
    return paths.join(paths.absolute(workdir), "checkpoints")


def latest_step(workdir: str) -> int | None:
    """The highest step folder under WORKDIR/checkpoints, read without opening a manager (cheap, before any work)."""
    directory = paths.Path(_directory(workdir))
    if not directory.is_dir():
        return None
    return max((int(p.name) for p in directory.iterdir() if p.name.isdigit()), default=None)


class Checkpointer:
    """Save every `every_steps` (always when forced), keep the last `max_to_keep` plus every `keep_period` steps."""

    def __init__(self, workdir: str, *, every_steps: int = 1000, max_to_keep: int = 3, keep_period: int | None = None,
                 read_only: bool = False):
        self.directory = _directory(workdir)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=every_steps, max_to_keep=max_to_keep, keep_period=keep_period or None,
            create=not read_only, read_only=read_only, enable_async_checkpointing=not read_only,
            cleanup_tmp_directories=not read_only)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict, force: bool = False) -> bool:
        """Start an asynchronous save (returns once the checksums are computed); True if a save was started."""
        if not (force or self.manager.should_save(step)):
            return False
        arrays = array_fields(state)
        meta = {**meta, "checksums": checksums(arrays)}
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, template, sharding, check_meta: Callable[[int, dict], None] | None = None):
        """(state, meta) of the latest checkpoint that restores and matches its checksums.

        The state is shaped like `template` and placed with `sharding`. `check_meta(step, meta)` runs on each
        candidate's meta before its arrays are read (to refuse a checkpoint the config cannot resume). Damaged checkpoints
        newer than the one restored are moved to WORKDIR/checkpoints_damaged/ with a warning naming both; if none
        restores, a CheckpointError names each one and why. Every process makes the same choice.
        """
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                              array_fields(template))
        damaged = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            state, meta, problem = None, None, None
            try:
                meta = self.restore_meta(step)
            except Exception as e:  # noqa: BLE001 -- any failure to read is damage, reported with its cause
                problem = f"its meta does not read ({_first_line(e)})"
            if _disagree(problem):
                damaged.append((step, problem or "its meta does not read on another process"))
                continue
            if check_meta is not None:
                check_meta(step, meta)
            try:
                state = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target))).state
            except Exception as e:  # noqa: BLE001
                problem = f"its arrays do not read ({_first_line(e)})"
            if _disagree(problem):
                damaged.append((step, problem or "its arrays do not read on another process"))
                continue
            bad = [k for k, v in checksums(state).items() if k in meta.get("checksums", {}) and
                   meta["checksums"][k] != v]
            if bad:
                damaged.append((step, f"{len(bad)} array(s) differ from their checksums ({', '.join(bad[:3])})"))
                continue
            if damaged:
                self._set_aside(damaged, step)
            meta = {k: v for k, v in meta.items() if k != "checksums"}
            return template.replace(**state), meta
        raise CheckpointError(
            f"no checkpoint in {self.directory} can be restored: "
            + "; ".join(f"{self._step_dir(s)}: {why}" for s, why in damaged)
            + ". If another version of dino_jax wrote them, resume with that version; to start from scratch, use "
            "another --workdir (or move them away).")

    def _step_dir(self, step: int) -> str:
        return paths.join(self.directory, str(step))

    def _set_aside(self, damaged, restored_step):
        """Move damaged checkpoints out of the manager's sight (later saves reuse their step numbers)."""
        aside = paths.Path(self.directory).parent / "checkpoints_damaged"
        for step, why in damaged:
            logging.warning("checkpoint %s is damaged: %s; restored the previous complete one, %s, instead; the "
                            "damaged one is moved to %s", self._step_dir(step), why, self._step_dir(restored_step),
                            aside / str(step))
        if jax.process_index() == 0:
            aside.mkdir(parents=True, exist_ok=True)
            for step, _ in damaged:
                target = aside / str(step)
                if target.exists():
                    target.rmtree()
                paths.Path(self._step_dir(step)).rename(target)
        multihost_utils.sync_global_devices("dino_jax:checkpoint:set_aside")
        self.manager.reload()

    def restore_meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def restore_raw(self, step: int | None = None, verify: bool = True) -> tuple[Any, dict]:
        """The state as plain nested dicts of numpy arrays (no target needed), and the meta (with the checksums,
        checked unless verify=False).

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
        saved_sums = restored.meta.get("checksums", {})
        bad = [k for k, v in checksums(restored.state).items() if verify and k in saved_sums and saved_sums[k] != v]
        if bad:
            raise CheckpointError(f"checkpoint {self._step_dir(step)} is damaged: {len(bad)} array(s) differ from "
                                  f"their checksums ({', '.join(bad[:3])}); use an earlier one")
        return jax.tree.map(np.asarray, restored.state), restored.meta

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def _first_line(e: BaseException) -> str:
    """The exception's first line, without the spec dump tensorstore appends to it."""
    text = str(e).strip().splitlines()
    first = re.split(r"\s*(?:See full TensorStore details|\[tensorstore_spec)", text[0] if text else "")[0]
    return f"{type(e).__name__}: {first}"[:300]


def _disagree(problem) -> bool:
    """True if this process or any other found a problem (all processes must skip the same checkpoints)."""
    if jax.process_count() == 1:
        return problem is not None
    return bool(np.any(multihost_utils.process_allgather(np.int32(problem is not None))))


def _fingerprint(x):
    """64 bits of an array's contents: two position-weighted sums of its words (odd weights: any single changed
    word changes both)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    word = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    u = jax.lax.bitcast_convert_type(x, word).astype(jnp.uint32).ravel()
    i = jax.lax.iota(jnp.uint32, u.size)
    return jnp.stack([jnp.sum(u * (2 * i + 1)), jnp.sum(u * ((i * jnp.uint32(2654435761)) | 1))])


_fingerprints = jax.jit(lambda tree: jax.tree.map(_fingerprint, tree))


def checksums(arrays) -> dict[str, str]:
    """{path: 16 hex digits} for every array of a pytree, computed where the arrays are (any sharding)."""
    prints = jax.device_get(_fingerprints(arrays))
    return {jax.tree_util.keystr(path): "".join(f"{int(w):08x}" for w in np.asarray(v))
            for path, v in jax.tree_util.tree_flatten_with_path(prints)[0]}


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
    if paths.Path(path, "checkpoints").is_dir():
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
