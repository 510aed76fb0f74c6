"""benchmarks/tpu_aot.py: the trainer's step compiles for a TPU slice on this CPU host (libtpu from the test extra),
divides the work over the chips, fits, and all-reduces the gradients; a bad topology is a one-line error."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import tpu_aot  # noqa: E402


@pytest.fixture(scope="module")
def tiny_on_v5e_2x2():
    return tpu_aot.analyse(tiny_config(), "v5e:2x2", batch_size=16, steps_per_epoch=10)


def test_tiny_step_compiles_for_four_tpu_chips_and_divides_the_work(tiny_on_v5e_2x2):
    r = tiny_on_v5e_2x2
    assert (r["chips"], r["devices"], r["hosts"], r["batch_per_chip"]) == (4, 4, 1, 4)
    assert r["device_kind"].startswith("TPU v5")
    assert 0.95 <= r["work_split"] <= 1.05, r["work_split"]  # 0.25 when every chip computes the whole batch
    assert r["fits"] and 0 < r["hbm_fraction"] < 0.01


def test_the_only_collective_is_the_gradient_all_reduce(tiny_on_v5e_2x2):
    from dino_jax import dino

    config = tiny_config()
    model = dino.build_model(config)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), config.global_crop_size))
    grad_bytes = sum(np.prod(p.shape) * p.dtype.itemsize for p in jax.tree.leaves(params))
    kinds = tiny_on_v5e_2x2["collectives"]
    assert set(kinds) == {"all-reduce"}, kinds  # no all-gather of activations, no reduce-scatter
    count, size = kinds["all-reduce"]
    assert grad_bytes <= size <= 1.1 * grad_bytes + 2 ** 20, (size, grad_bytes)  # gradients + loss/center means


def test_memory_holds_at_least_the_state_and_the_batch(tiny_on_v5e_2x2):
    from dino_jax import dino

    config = tiny_config()
    model = dino.build_model(config)
    state = jax.eval_shape(lambda: dino.create_train_state(config, model, 10, jax.random.PRNGKey(0)))
    state_bytes = sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state))
    per_chip_batch = 4 * 3 * (2 * 32 * 32 + 2 * 16 * 16) * 4  # images x channels x pixels x float32
    per_device = tiny_on_v5e_2x2["per_device"]
    assert per_device["arguments"] >= state_bytes + per_chip_batch
    assert per_device["aliased"] >= 0.9 * state_bytes  # the donated state is updated in place
    assert tiny_on_v5e_2x2["per_chip_bytes"] >= per_device["arguments"] + per_device["temporaries"] - state_bytes


def test_report_ends_with_the_summary_line(tiny_on_v5e_2x2):
    last = tpu_aot.report(tiny_on_v5e_2x2).splitlines()[-1]
    fields = dict(kv.split("=") for kv in last.split())
    assert list(fields) == ["fits", "hbm_fraction", "work_split"]
    assert fields["fits"] == "1" and float(fields["work_split"]) == pytest.approx(tiny_on_v5e_2x2["work_split"],
                                                                                  abs=1e-3)


def test_unknown_topology_is_a_one_line_error_listing_the_accepted_forms():
    env = dict(os.environ, PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "tpu_aot.py"),
                          "--config=" + os.path.join(REPO, "configs", "vits16.py"), "--topology=v5litepod-8"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: unknown TPU topology 'v5litepod-8'") and "v5e:2x4" in last and "v4:2x2x1" in last
    with pytest.raises(ValueError, match="v5e:AxB"):
        tpu_aot.parse_topology("v5e:2x2x2")


def test_a_step_that_does_not_fit_says_by_how_much():
    r = tpu_aot.analyse(tiny_config(), "v5e:2x2", batch_size=400000, steps_per_epoch=10)  # 100k images per chip
    assert not r["fits"] and r["hbm_fraction"] > 1.5, r
    lines = tpu_aot.report(r).splitlines()
    assert any(line.startswith("DOES NOT FIT") and "over the chip's HBM by" in line for line in lines)
    assert lines[-1].startswith("fits=0 hbm_fraction=")


def test_choices_autodiff_variant_drops_every_custom_backward_pass_and_only_inside():
    """tpu_choices' plain-autodiff variant: the step's loss has no custom_vjp inside the context, five kinds outside
    (softmax, LayerNorm, GELU, the prototypes' column norm and scaling), and the same value either way (only the
    backward passes differ)."""
    import tpu_choices
    from test_precision_paths import dino_objective, views

    config = tiny_config()

    def traced():
        model, loss = dino_objective(config)
        params = model.init(jax.random.PRNGKey(0), config.global_crop_size)
        args = (params, views(config, jax.random.PRNGKey(1)), jax.random.PRNGKey(2))
        return str(jax.make_jaxpr(loss)(*args)), float(loss(*args))

    custom, custom_loss = traced()
    with tpu_choices.plain_autodiff():
        plain, plain_loss = traced()
    again, _ = traced()
    assert "custom_vjp_call" in custom and "custom_vjp_call" not in plain and again == custom
    for name in ("softmax", "layer_norm", "gelu", "inverse_column_norm", "scale_columns"):
        assert name in custom, name
    np.testing.assert_allclose(plain_loss, custom_loss, rtol=1e-6)
