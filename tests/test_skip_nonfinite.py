"""A non-finite step is skipped whole (config.skip_nonfinite_steps): the state stays bit for bit, the step advances.

Whether later steps keep the schedules of the global step is tested against the reference in
test_update_parity.py (test_a_skipped_step_keeps_every_schedule_on_the_global_step).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from dino_jax import dino

SPE = 2


def zero_bottleneck(params):
    """The head's last MLP layer zeroed: its output is 0, the L2 normalisation returns 0 (the loss is finite,
    ln K) but the gradient of ||x|| at 0 is NaN."""
    last = max(k for k in params["head"] if k.startswith("mlp_"))
    head = dict(params["head"], **{last: jax.tree.map(jnp.zeros_like, params["head"][last])})
    return dict(params, head=head)


def batch(seed):
    rng = np.random.default_rng(seed)
    return {"global": rng.normal(size=(4, 2, 32, 32, 3)).astype(np.float32),
            "local": rng.normal(size=(4, 2, 16, 16, 3)).astype(np.float32)}


@pytest.fixture(scope="module")
def trained():
    """A state after one real step (moments, teacher and center away from their init) and the compiled step."""
    c = tiny_config(batch_size=4, drop_path_rate=0.1, freeze_last_layer=0, skip_nonfinite_steps=True)
    state = jax.jit(functools.partial(dino.create_train_state, c, dino.build_model(c), SPE))(jax.random.PRNGKey(0))
    step = jax.jit(dino.make_train_step(c, SPE))
    state, metrics = step(state, batch(0))
    assert metrics["finite"]
    return state, step


@pytest.mark.parametrize("fault", ["nan_image", "finite_loss_nonfinite_gradient"])
def test_a_non_finite_step_leaves_the_state_bit_identical(trained, fault):
    state, step = trained
    bad = batch(1)
    if fault == "nan_image":
        bad["global"][1, 0, 3, 3, 0] = np.nan
    else:
        state = state.replace(params=zero_bottleneck(state.params))
    before = jax.device_get(state)
    after, metrics = step(state, bad)
    assert not metrics["finite"]
    if fault == "finite_loss_nonfinite_gradient":
        assert np.isfinite(metrics["loss"]) and not np.isfinite(metrics["grad_norm"]), metrics
    assert int(after.step) == int(before.step) + 1
    after = jax.device_get(after)
    for name in ("params", "teacher_params", "opt_state", "center", "rng"):
        for x, y in zip(jax.tree.leaves(getattr(before, name)), jax.tree.leaves(getattr(after, name))):
            np.testing.assert_array_equal(x, y, err_msg=name)
