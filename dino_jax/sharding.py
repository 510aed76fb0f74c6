"""Data-parallel sharding over one `jax.sharding.Mesh` with a `data` axis (no pmap).

The batch is split along its first axis; the state (student, teacher, optimiser, center) is replicated.
Means over the batch inside `jit` are global means, so the center update and the loss need no explicit psum.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def make_mesh(devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices).reshape(-1), ("data",))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_state(state, mesh: Mesh):
    """Place every array of the state replicated on the mesh."""
    return jax.device_put(state, replicated(mesh))


def jit_train_step(train_step, mesh: Mesh):
    """`train_step` compiled with explicit shardings and the state donated (updated in place)."""
    repl, data = replicated(mesh), batch_sharding(mesh)
    return jax.jit(train_step, in_shardings=(repl, data), out_shardings=(repl, repl), donate_argnums=0)


def check_batch_divisible(global_batch: int, mesh: Mesh):
    if global_batch % mesh.size:
        raise ValueError(f"config.batch_size={global_batch} must be divisible by the number of devices "
                         f"({mesh.size}); pick a multiple of {mesh.size}")
