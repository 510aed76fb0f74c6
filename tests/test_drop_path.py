"""Stochastic depth as the reference does it, and masks that do not depend on resuming or on the device count."""
import functools
import os
import pickle
import subprocess
import sys

import jax
import numpy as np

import torch_reference as R
from conftest import max_relative_error, tiny_config
from dino_jax import checkpoint, dino, sharding
from dino_jax.models import vit


def test_masks_rates_and_scaling(monkeypatch):
    """Every drop-path call of a training forward, recorded: two per block with the reference's linear rate
    (none where it is 0), one keep/drop choice per sample, kept samples scaled by 1/keep (so E[output] = input),
    the fraction dropped at the rate, and the two masks of a block independent."""
    real, rates, traced = vit.drop_path, [], []

    def recording(x, rate, rng):
        out = real(x, rate, rng)
        rates.append(rate)
        traced.append((x, out))
        return out

    monkeypatch.setattr(vit, "drop_path", recording)
    depth, rate, n = 4, 0.3, 4000
    model = vit.build_vit("vit_custom", 8, embed_dim=16, depth=depth, num_heads=2, drop_path_rate=rate, img_size=16)
    x = jax.random.normal(jax.random.PRNGKey(0), (n, 16, 16, 3))
    params = jax.jit(model.init)(jax.random.PRNGKey(1), x[:1])

    @jax.jit
    def forward(params, x, key):  # returns every call's input and output
        model.apply(params, x, True, rngs={"drop_path": key})
        return traced

    recorded = jax.device_get(forward(params, x, jax.random.PRNGKey(2)))
    calls = [(r, np.asarray(a, np.float64), np.asarray(b, np.float64)) for r, (a, b) in zip(rates, recorded)]

    reference = R.VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=depth, num_heads=2,
                                    drop_path_rate=rate)
    ref_rates = [b.drop_path.drop_prob for b in reference.blocks if isinstance(b.drop_path, R.DropPath)]
    assert len(ref_rates) == depth - 1
    np.testing.assert_allclose([r for r, _, _ in calls], np.repeat(ref_rates, 2), rtol=1e-6)

    dropped = []
    for r, before, after in calls:
        keep = 1 - r
        zero = np.all(after == 0, axis=(1, 2))
        scaled = np.all(np.isclose(after, before / keep, rtol=1e-6, atol=0), axis=(1, 2))
        assert np.all(zero ^ scaled), "each sample is either dropped whole or kept and scaled by 1/keep"
        assert abs(zero.mean() - r) < 5 * np.sqrt(r * (1 - r) / n), (r, zero.mean())
        ratio = after.sum(axis=(1, 2)) / before.sum(axis=(1, 2))  # 0 or 1/keep per sample
        assert abs(ratio.mean() - 1) < 5 * np.sqrt(r / keep / n), ratio.mean()  # E[output] = input
        dropped.append(zero)
    for (r, _, _), first, second in zip(calls[::2], dropped[::2], dropped[1::2]):
        both = (first & second).mean()
        assert abs(both - r * r) < 5 * np.sqrt(r * r * (1 - r * r) / n), (r, both)


SPE, STEPS = 2, 3


def drop_path_config():
    return tiny_config(drop_path_rate=0.1, batch_size=8, freeze_last_layer=0)


def batches(c):
    rng = np.random.default_rng(0)
    return [{"global": rng.normal(size=(c.batch_size, 2, 32, 32, 3)).astype(np.float32),
             "local": rng.normal(size=(c.batch_size, 2, 16, 16, 3)).astype(np.float32)} for _ in range(STEPS)]


def state_factory(c):
    """seed -> a fresh TrainState, compiled once (eager initialisation compiles op by op)."""
    create = jax.jit(functools.partial(dino.create_train_state, c, dino.build_model(c), SPE))
    return lambda seed: create(jax.random.PRNGKey(seed))


def train(c, state, steps, mesh, step=None):
    step = step or sharding.jit_train_step(dino.make_train_step(c, SPE), mesh)
    state = sharding.shard_state(state, mesh)
    for batch in steps:
        state, _ = step(state, jax.device_put(batch, sharding.batch_sharding(mesh)))
    return state


def result(state):
    return jax.device_get((state.params, state.teacher_params, state.center))


_EIGHT_DEVICES = r"""
import pickle, sys
sys.path.insert(0, {tests!r})
import jax
import test_drop_path as T
from dino_jax import sharding
c = T.drop_path_config()
mesh = sharding.make_mesh()
assert mesh.size == 8, mesh
with open({out!r}, "wb") as f:
    pickle.dump(T.result(T.train(c, T.state_factory(c)(0), T.batches(c), mesh)), f)
"""


def test_masks_after_resume_and_on_eight_devices(tmp_path):
    """Drop path 0.1: three steps resumed from a checkpoint after the first are bit-identical to three steps
    uninterrupted, and the same three steps on 8 devices equal them to float32 rounding (2.7e-5 of a tensor's
    largest value). Another seed's masks move the weights by O(1) of that value, so equal weights mean equal
    masks."""
    c = drop_path_config()
    fresh_state = state_factory(c)
    mesh = sharding.make_mesh(jax.devices()[:1])
    steps, step = batches(c), sharding.jit_train_step(dino.make_train_step(c, SPE), mesh)
    uninterrupted = result(train(c, fresh_state(0), steps, mesh, step))

    ckpt = checkpoint.Checkpointer(str(tmp_path / "run"))
    ckpt.save(1, train(c, fresh_state(0), steps[:1], mesh, step), {}, force=True)
    ckpt.manager.wait_until_finished()
    template = fresh_state(7)  # another rng: the masks must come from the checkpoint
    restored, _ = checkpoint.Checkpointer(str(tmp_path / "run")).restore(template, sharding.replicated(mesh))
    assert int(restored.step) == 1
    resumed = result(train(c, restored, steps[1:], mesh, step))
    for a, b in zip(jax.tree.leaves(uninterrupted), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(a, b)

    out = str(tmp_path / "eight.pkl")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", _EIGHT_DEVICES.format(tests=os.path.dirname(__file__), out=out)],
                   env=env, check=True)
    with open(out, "rb") as f:
        eight = pickle.load(f)
    other_masks = fresh_state(0).replace(rng=jax.random.PRNGKey(3))
    other = result(train(c, other_masks, steps, mesh, step))
    err, control = max_relative_error(uninterrupted, eight), max_relative_error(uninterrupted, other)
    print(f"1 vs 8 devices: {err:.1e}; another seed's masks: {control:.1e}")
    assert err <= 1e-4 and control > 1e-2
