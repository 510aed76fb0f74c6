"""Data parallelism divides the work: on 4 simulated CPU devices each device runs a quarter of the flops.

Equal numbers on 1 and 8 devices (test_sharding.py) do not show this: a step that gathers the batch onto every
device and computes it whole gives the same numbers. Here the compiled programs' own cost analysis and HLO do.
"""
import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp
sys.path.insert(0, {tests!r})
sys.path.insert(0, {benchmarks!r})
from conftest import tiny_config
from tpu_aot import collectives
from dino_jax import dino, sharding
from dino_jax.evaluation import knn, linear

B = 16


def analyse(jitted, *args):
    compiled = jitted.lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return dict(flops=float(cost["flops"]), collectives=collectives(compiled.as_text()))


def spec(shape, sharding_, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding_)


def train_step(mesh, **overrides):
    c = tiny_config(batch_size=B, drop_path_rate=0.1, **overrides)
    model = dino.build_model(c)
    state = jax.eval_shape(lambda: dino.create_train_state(c, model, 2, jax.random.PRNGKey(0)))
    repl, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    state = jax.tree.map(lambda a: spec(a.shape, repl, a.dtype), state)
    batch = {{"global": spec((B, 2, 32, 32, 3), data), "local": spec((B, 2, 16, 16, 3), data)}}
    return analyse(sharding.jit_train_step(dino.make_train_step(c, 2), mesh), state, batch)


def backbone_params(mesh):
    model = dino.build_model(tiny_config()).backbone
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"])
    return model, jax.tree.map(lambda a: spec(a.shape, sharding.replicated(mesh), a.dtype), params)


def knn_features(mesh):
    model, params = backbone_params(mesh)
    images = spec((B, 32, 32, 3), sharding.batch_sharding(mesh))
    return analyse(knn.feature_fn(model), params, images)


def linear_features(mesh):
    model, params = backbone_params(mesh)
    images = spec((B, 32, 32, 3), sharding.batch_sharding(mesh))
    return analyse(linear.feature_fn(model, 2, False), params, images)


def linear_step(mesh):
    repl, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    # The update of the replicated classifier is the same on every device; at a probe's batch it is a small
    # part of the step, as in the reference's 1024 x 1536 x 1000 probe.
    rows, dim, classes = 512, 2 * 48, 10
    lin = {{"kernel": spec((dim, classes), repl), "bias": spec((classes,), repl)}}
    return analyse(linear.sgd_step, lin, lin, spec((rows, dim), data), spec((rows,), data, jnp.int32),
                   spec((rows,), data, jnp.bool_), spec((), repl))


out = {{}}
for name, fn in [("train_step", train_step), ("train_step_bn_head", lambda m: train_step(m, use_bn_in_head=True)),
                 ("knn_features", knn_features), ("linear_features", linear_features),
                 ("linear_step", linear_step)]:
    out[name] = {{n: fn(sharding.make_mesh(jax.devices()[:n])) for n in (1, 4)}}
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def analyses():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    tests = os.path.dirname(__file__)
    code = SCRIPT.format(tests=tests, benchmarks=os.path.join(os.path.dirname(tests), "benchmarks"))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


# What each program may communicate: reductions of gradients, means and statistics, never gathers of the batch.
ALLOWED = {"all-reduce", "reduce-scatter"}


@pytest.mark.parametrize("program", ["train_step", "train_step_bn_head", "knn_features", "linear_features",
                                     "linear_step"])
def test_each_device_does_a_quarter_of_the_work(analyses, program):
    one, four = analyses[program]["1"], analyses[program]["4"]
    ratio = four["flops"] / one["flops"]
    print(f"{program}: {one['flops']:.4g} flops on 1 device, {four['flops']:.4g} per device on 4: ratio {ratio:.3f}; "
          f"collectives on 4 (kind: count, bytes): {four['collectives']}")
    assert ratio <= 0.275, f"{program}: each of 4 devices does {ratio:.3f} of the 1-device work"
    kinds = set(four["collectives"])
    assert kinds <= ALLOWED, f"{program}: unexpected collectives {four['collectives']}"
    assert not one["collectives"]
