"""The same training steps on 1 device and on 8 simulated CPU devices give the same numbers.

"The same" within float32's own noise: on 8 devices the gradients and means are summed in another order. The
noise floor is measured, not assumed: the 1-device run on the same batches with their rows permuted (the same
maths, another summation order) gives it, per tensor.
"""
import os
import pickle
import subprocess
import sys

import numpy as np


SCRIPT = r"""
import sys, numpy as np, jax
sys.path.insert(0, {tests!r})
from conftest import tiny_config
from dino_jax import dino, sharding
c = tiny_config(drop_path_rate=0.0, batch_size=16, freeze_last_layer=0)
spe = 2
model = dino.build_model(c)
mesh = sharding.make_mesh()
assert mesh.size == {n}, mesh
step = sharding.jit_train_step(dino.make_train_step(c, spe), mesh)
runs = {{}}
for permute in {variants}:
    state = sharding.shard_state(dino.create_train_state(c, model, spe, jax.random.PRNGKey(0)), mesh)
    rng = np.random.default_rng(0)
    order = np.random.default_rng(1).permutation(16) if permute else np.arange(16)
    losses = []
    for i in range(3):
        batch = {{"global": rng.normal(size=(16, 2, 32, 32, 3)).astype(np.float32)[order],
                  "local": rng.normal(size=(16, 2, 16, 16, 3)).astype(np.float32)[order]}}
        batch = jax.device_put(batch, sharding.batch_sharding(mesh))
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    runs[permute] = dict(losses=np.array(losses),
                         state=jax.device_get((state.params, state.teacher_params, state.center)))
import pickle
with open({out!r}, "wb") as f:
    pickle.dump(runs, f)
"""


def _run(n, out, variants=(False,)):
    """{permuted rows?: {"losses", "state"}} after 3 steps on N devices, one compiled step for every variant."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu")
    code = SCRIPT.format(tests=os.path.dirname(__file__), n=n, out=out, variants=tuple(variants))
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    with open(out, "rb") as f:
        return pickle.load(f)


def _differences(a, b) -> dict:
    """Per tensor max|a - b|, by path."""
    import jax

    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    return {jax.tree_util.keystr(path): float(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).max())
            for (path, x), y in zip(flat_a, jax.tree.leaves(b))}


def test_one_vs_eight_devices(tmp_path):
    import jax

    single = _run(1, str(tmp_path / "one.pkl"), variants=(False, True))
    one, permuted, eight = single[False], single[True], _run(8, str(tmp_path / "eight.pkl"))[False]
    np.testing.assert_allclose(one["losses"], eight["losses"], rtol=1e-5)
    noise, devices = _differences(one["state"], permuted["state"]), _differences(one["state"], eight["state"])
    scale = max(float(np.abs(np.asarray(x)).max()) for x in jax.tree.leaves(one["state"]))
    worst = max(devices, key=lambda k: devices[k] / (noise[k] + 1e-7 * scale))
    print(f"1 vs 8 devices after 3 steps: worst tensor {worst}: {devices[worst]:.3g} "
          f"(float32 noise from a row permutation: {noise[worst]:.3g})")
    for name in devices:  # 10x the measured noise, with a floor of 1e-7 of the largest value in the state
        assert devices[name] <= 10 * noise[name] + 1e-7 * scale, (name, devices[name], noise[name])


def _host_batches(n, fail_at=None):
    """Host-local numpy batches {"x": [i] * devices}; raises at `fail_at`."""
    import jax

    for i in range(n):
        if i == fail_at:
            raise OSError(f"input broke at batch {i}")
        yield {"x": np.full(jax.device_count(), i, np.float32)}


def test_global_batches_prefetched_match_direct_and_keep_order():
    from dino_jax import sharding

    data = sharding.batch_sharding(sharding.make_mesh())
    direct = [np.asarray(b["x"]) for b in sharding.GlobalBatches(_host_batches(5), data, prefetch=0)]
    ahead = sharding.GlobalBatches(_host_batches(5), data, prefetch=3)
    batches = list(ahead)  # ends with StopIteration after the last batch
    assert [np.asarray(b["x"]).tolist() for b in batches] == [d.tolist() for d in direct]
    assert len(batches) == 5 and all(b["x"].sharding == data for b in batches)


def test_global_batches_raise_the_input_error_and_stop():
    import pytest

    from dino_jax import sharding

    it = sharding.GlobalBatches(_host_batches(10, fail_at=2), sharding.batch_sharding(sharding.make_mesh()))
    assert [float(np.asarray(next(it)["x"])[0]) for _ in range(2)] == [0.0, 1.0]
    with pytest.raises(OSError, match="batch 2"):
        next(it)
    with pytest.raises(RuntimeError, match="closed"):
        next(it)


def test_global_batches_thread_stops_on_close_and_on_garbage_collection():
    import gc

    from dino_jax import sharding

    data = sharding.batch_sharding(sharding.make_mesh())
    it = sharding.GlobalBatches(_host_batches(10 ** 9), data)
    next(it)
    thread = it._thread
    assert thread.is_alive()
    it.close()
    assert not thread.is_alive()
    it = sharding.GlobalBatches(_host_batches(10 ** 9), data)
    next(it)
    thread = it._thread
    del it
    gc.collect()
    thread.join(timeout=10)
    assert not thread.is_alive()
