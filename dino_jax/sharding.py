"""Data-parallel sharding over one `jax.sharding.Mesh` with a `data` axis (no pmap).

The batch is split along its first axis; the state (student, teacher, optimiser, center) is replicated.
Means over the batch inside `jit` are global means, so the center update and the loss need no explicit psum.
Host-local batches become global arrays in `GlobalBatches`, a few batches ahead of the step; `to_host` brings a
global array back to every host (evaluation features, images to draw).
"""
from __future__ import annotations

import queue
import threading
import time
import weakref

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from orbax.checkpoint import multihost


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


def wait_for_every_process(what: str, timeout_s: int = 3600) -> float:
    """Block until every process of a multi-process run gets here; returns the seconds waited.

    Hosts of a slice build their data sources and state at different speeds. JAX's CPU collectives set up their
    communicator at the first collective with a fixed 30 s deadline, so a host that arrives later than that fails
    the run; this barrier (the coordination service's, no device collective) lines them up first.
    """
    if jax.process_count() == 1:
        return 0.0
    t0 = time.time()
    multihost.get_barrier_sync_fn()(key=f"dino_jax:{what}", timeout_ms=timeout_s * 1000)
    return time.time() - t0


def jit_train_step(train_step, mesh: Mesh):
    """`train_step` compiled with explicit shardings and the state donated (updated in place)."""
    repl, data = replicated(mesh), batch_sharding(mesh)
    return jax.jit(train_step, in_shardings=(repl, data), out_shardings=(repl, repl), donate_argnums=0)


def check_batch_divisible(global_batch: int, mesh: Mesh):
    if global_batch % mesh.size:
        raise ValueError(f"config.batch_size={global_batch} must be divisible by the number of devices "
                         f"({mesh.size}); pick a multiple of {mesh.size}")


def global_batch(sharding: NamedSharding, local: dict) -> dict:
    """A dict of this process's rows (numpy) as global `jax.Array`s sharded by `sharding`."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def mesh_of(array) -> Mesh:
    """The mesh an array lives on when it is sharded by name, else a new mesh over every device."""
    s = getattr(array, "sharding", None)
    return s.mesh if isinstance(s, NamedSharding) else make_mesh()


def place_batch(x, mesh: Mesh):
    """A batch (numpy, or a jax.Array from elsewhere) on `mesh`: split on its first axis where that divides over the
    devices, else replicated; an array already on `mesh` stays where it is."""
    if isinstance(x, jax.Array):
        if isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh:
            return x
        x = to_host(x)
    return jax.device_put(x, batch_sharding(mesh) if len(x) % mesh.size == 0 else replicated(mesh))


def to_host(x) -> np.ndarray:
    """A (possibly sharded, possibly multi-process) global array as one numpy array on this host: every process gets
    all of it (an all-gather across processes where this one does not hold every row)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.sharding.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _fill(host_batches, sharding, out: queue.Queue, stop: threading.Event):
    """Prefetch thread: put global batches, then StopIteration or the exception that ended the input, on `out`;
    returns as soon as `stop` is set."""
    def put(item) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        for local in host_batches:
            if not put(global_batch(sharding, local)):
                return
        put(StopIteration())
    except Exception as e:  # noqa: BLE001 - handed to the consumer, which raises it
        put(e)


class GlobalBatches:
    """Global `jax.Array` batches from an iterator of host-local numpy dicts (this process's rows), built `prefetch`
    batches ahead by a background thread, so the training loop does not wait for the host-to-device copy (as
    big_vision's start_global). An error in the input is raised from next(); close() (or garbage collection) stops
    the thread, and the batches it holds are dropped. prefetch=0 builds each batch inside next().
    """

    def __init__(self, host_batches, sharding: NamedSharding, prefetch: int = 2):
        self._host, self._sharding = iter(host_batches), sharding
        self._queue, self._stop, self._thread = None, threading.Event(), None
        if prefetch > 0:
            self._queue = queue.Queue(maxsize=prefetch)
            self._thread = threading.Thread(target=_fill, args=(self._host, sharding, self._queue, self._stop),
                                            name="device-prefetch", daemon=True)
            self._thread.start()
            weakref.finalize(self, self._stop.set)  # the thread holds no reference to self

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._stop.is_set():
            raise RuntimeError("next() on closed GlobalBatches")
        if self._queue is None:
            return global_batch(self._sharding, next(self._host))
        batch = self._queue.get()
        if isinstance(batch, BaseException):
            self.close()
            raise batch
        return batch

    def close(self):
        """Stop the prefetch thread (it finishes the batch it is building)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None
